//! The session's `Borrowing` state: a connection made ready for the client's next command.
//! One is borrowed if the client holds none; then, when the command depends on the
//! session, the client's state is replayed on it: ahead of the command in the same round
//! trip when nothing in the replay can be refused, else as a script of its own first.
//!
//! A connection borrowed for this command that fails while it is restored has run nothing
//! of the client's: another is borrowed, up to [`ATTEMPTS`] in all. Connections and
//! verdicts in; what to do next out. The driver borrows and runs the replay.

use crate::mysql::consts::errcode;
use crate::mysql::wire::ErrPacket;
use crate::session::state::{BackendSession, Needs, Replay};
use crate::session::ClientSession;

/// Connections tried for one command before the client is told the database is
/// unavailable.
pub const ATTEMPTS: u32 = 3;

/// What the driver does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Borrow a connection for the client (then [`Borrowing::lent`], or
    /// [`Borrowing::refused`]).
    Borrow,
    /// Run the replay on the held connection on its own (then [`Borrowing::replayed`]).
    Replay(Replay),
    /// The connection is ready; a replay in `ahead` (if any) goes in front of the command,
    /// its answer read before the command's.
    Ready { ahead: Option<Replay> },
    /// The command cannot run: the client gets this error (the connection, if one is held,
    /// stays held).
    Failed(ErrPacket),
}

/// How a replay run on its own ended.
#[derive(Debug)]
pub enum Replayed {
    Done,
    /// The server refused one of its statements: the client gets the server's error. The
    /// connection, half restored, goes back to be reset.
    Refused(ErrPacket),
    /// The connection failed (why): it is lost.
    Broken(String),
}

/// Making a connection ready for one command.
#[derive(Debug)]
pub struct Borrowing {
    needs: Needs,
    /// The command depends on the session state: replay it.
    replay: bool,
    /// A replay that cannot be refused may go ahead of the command.
    ahead: bool,
    /// Connections borrowed so far.
    attempts: u32,
}

impl Borrowing {
    /// For a command that `needs`, with the session `replay`ed on the connection or not;
    /// `ahead`: the command can carry a replay in front of it.
    pub fn new(needs: Needs, replay: bool, ahead: bool) -> Borrowing {
        Borrowing {
            needs,
            replay,
            ahead,
            attempts: 0,
        }
    }

    /// What the command needs of the connection (a replay is planned again with it after
    /// a reset).
    pub fn needs(&self) -> Needs {
        self.needs
    }

    /// Where it starts: the client holds a connection in the state `held`, or none.
    pub fn start(&mut self, s: &mut ClientSession, held: Option<&BackendSession>) -> Step {
        match held {
            None => Step::Borrow,
            Some(_) if !self.replay => Step::Ready { ahead: None },
            Some(b) => {
                let plan = s.replay(b, self.needs, false);
                self.plan(s, plan)
            }
        }
    }

    /// The pool lent the client a connection in the state `conn`.
    pub fn lent(&mut self, s: &mut ClientSession, conn: &BackendSession) -> Step {
        self.attempts += 1;
        s.moved();
        if !self.replay {
            return Step::Ready { ahead: None };
        }
        let plan = s.replay(conn, self.needs, true);
        self.plan(s, plan)
    }

    /// The pool could lend nothing: the client gets `told`.
    pub fn refused(&mut self, told: ErrPacket) -> Step {
        Step::Failed(told)
    }

    /// The replay run on its own ended.
    pub fn replayed(&mut self, r: Replayed) -> Step {
        match r {
            Replayed::Done => Step::Ready { ahead: None },
            Replayed::Refused(e) => Step::Failed(e),
            // Borrowed for this command and nothing of the client's ran on it: another.
            Replayed::Broken(_) if self.attempts > 0 && self.attempts < ATTEMPTS => Step::Borrow,
            Replayed::Broken(why) => {
                Step::Failed(unavailable(&format!("database connection failed: {why}")))
            }
        }
    }

    fn plan(&mut self, s: &mut ClientSession, plan: Replay) -> Step {
        if plan.is_empty() {
            return Step::Ready { ahead: None };
        }
        s.backend_used();
        if self.ahead && plan.pipelinable() {
            return Step::Ready { ahead: Some(plan) };
        }
        Step::Replay(plan)
    }
}

/// The error of a command that found no database connection to run on (`why`).
pub fn unavailable(why: &str) -> ErrPacket {
    ErrPacket::new(
        errcode::PROXY_BACKEND_UNAVAILABLE,
        "08S01",
        format!("(dbproxy) {why}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::uservars::UserValue;

    fn session() -> ClientSession {
        crate::session::testing::session(Some(b"shop"))
    }

    /// A connection in the state the pool hands out: no default database.
    fn fresh() -> BackendSession {
        BackendSession::default()
    }

    /// The same connection once the client's schema is on it.
    fn restored() -> BackendSession {
        BackendSession {
            schema: Some(b"shop".to_vec()),
            ..BackendSession::default()
        }
    }

    #[test]
    fn a_client_without_a_connection_borrows_one_and_has_its_schema_replayed() {
        let mut s = session();
        let mut m = Borrowing::new(Needs::default(), true, true);
        assert_eq!(m.start(&mut s, None), Step::Borrow);
        // The schema is a COM_INIT_DB, which the server may refuse: on its own first.
        let Step::Replay(plan) = m.lent(&mut s, &fresh()) else {
            panic!("a replay");
        };
        assert_eq!(plan.init_db.as_deref(), Some(&b"shop"[..]));
        assert_eq!(m.replayed(Replayed::Done), Step::Ready { ahead: None });
    }

    #[test]
    fn a_held_connection_in_the_clients_state_is_ready_at_once() {
        let mut s = session();
        let mut m = Borrowing::new(Needs::default(), true, true);
        assert_eq!(
            m.start(&mut s, Some(&restored())),
            Step::Ready { ahead: None }
        );
        // A command that does not depend on the session needs no replay at all.
        let mut m = Borrowing::new(Needs::default(), false, true);
        assert_eq!(m.start(&mut s, Some(&fresh())), Step::Ready { ahead: None });
        assert_eq!(m.start(&mut s, None), Step::Borrow);
        assert_eq!(m.lent(&mut s, &fresh()), Step::Ready { ahead: None });
    }

    #[test]
    fn a_replay_that_cannot_be_refused_goes_ahead_of_the_command_when_it_may() {
        let mut s = crate::session::testing::session(None);
        s.state.user_vars.insert(b"x".to_vec(), UserValue::int("1"));
        let mut m = Borrowing::new(Needs::default(), true, true);
        assert_eq!(m.start(&mut s, None), Step::Borrow);
        let Step::Ready { ahead: Some(plan) } = m.lent(&mut s, &fresh()) else {
            panic!("a replay sent ahead");
        };
        assert!(plan.set.as_deref().is_some_and(|q| q.contains('x')));
        // A command that cannot carry it has it run on its own.
        let mut m = Borrowing::new(Needs::default(), true, false);
        assert_eq!(m.start(&mut s, None), Step::Borrow);
        assert!(matches!(m.lent(&mut s, &fresh()), Step::Replay(p) if p.set.is_some()));
    }

    #[test]
    fn a_connection_broken_while_restored_is_replaced_at_most_twice() {
        let mut s = session();
        let mut m = Borrowing::new(Needs::default(), true, true);
        assert_eq!(m.start(&mut s, None), Step::Borrow);
        for _ in 1..ATTEMPTS {
            assert!(matches!(m.lent(&mut s, &fresh()), Step::Replay(_)));
            assert_eq!(m.replayed(Replayed::Broken("reset".into())), Step::Borrow);
        }
        assert!(matches!(m.lent(&mut s, &fresh()), Step::Replay(_)));
        let Step::Failed(e) = m.replayed(Replayed::Broken("reset".into())) else {
            panic!("failed");
        };
        assert_eq!(e.code, errcode::PROXY_BACKEND_UNAVAILABLE);
        assert!(e.message.ends_with("database connection failed: reset"));
    }

    #[test]
    fn a_held_connection_that_breaks_while_restored_is_not_replaced() {
        // The client held it (its transaction or pins were there); LAST_INSERT_ID() is
        // replayed lazily on a held connection.
        let mut s = session();
        s.state.last_insert_id = 42;
        let needs = Needs {
            last_insert_id: true,
        };
        let mut m = Borrowing::new(needs, true, false);
        assert!(matches!(
            m.start(&mut s, Some(&restored())),
            Step::Replay(_)
        ));
        assert!(matches!(
            m.replayed(Replayed::Broken("reset".into())),
            Step::Failed(_)
        ));
    }

    #[test]
    fn refusals_reach_the_client() {
        let mut s = session();
        let mut m = Borrowing::new(Needs::default(), true, true);
        assert_eq!(m.start(&mut s, None), Step::Borrow);
        let busy = ErrPacket::new(errcode::PROXY_BORROW_TIMEOUT, "HY000", "busy");
        assert_eq!(m.refused(busy.clone()), Step::Failed(busy));
        let denied = ErrPacket::new(1049, "42000", "Unknown database 'shop'");
        assert!(matches!(m.lent(&mut s, &fresh()), Step::Replay(_)));
        assert_eq!(
            m.replayed(Replayed::Refused(denied.clone())),
            Step::Failed(denied)
        );
    }
}
