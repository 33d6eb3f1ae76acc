//! Commands forwarded as they came (COM_INIT_DB, COM_PING, COM_STATISTICS, COM_SET_OPTION,
//! COM_FIELD_LIST, ...), and those dbproxy answers itself: a ping from a client that holds
//! no connection, and a refused command.

use super::{release, Cx, Flow, Got, Readiness, Ready, Refusing, Step};
use crate::mysql::command::ResponseKind;
use crate::mysql::wire::{ok_packet, ErrPacket};
use crate::session::borrowing::Borrowing;
use crate::session::pins::PinReason;
use crate::session::sql::SqlInfo;
use crate::session::state::Needs;
use std::borrow::Cow;

/// A command forwarded as it came, its answer relayed.
#[derive(Debug)]
pub struct Forward {
    seq: u8,
    kind: ResponseKind,
    /// What the command does to the session, as far as tracking cannot tell.
    info: SqlInfo,
    stage: Stage,
}

#[derive(Debug)]
enum Stage {
    Readying(Ready),
    Refusing(Refusing),
    Sending,
    Relaying,
    Releasing,
}

impl Forward {
    /// The command numbered `seq`, answered as `kind`; `replay`: it depends on the
    /// session state (all but COM_PING and COM_STATISTICS); `set_option`: it is
    /// COM_SET_OPTION, which changes the connection's multi-statement option, which session
    /// tracking does not report (the client is pinned).
    pub fn new(seq: u8, kind: ResponseKind, replay: bool, set_option: bool) -> Forward {
        let mut info = SqlInfo::default();
        if set_option {
            info.starts.push(PinReason::Unclassified);
        }
        Forward {
            seq,
            kind,
            info,
            stage: Stage::Readying(Ready::new(Borrowing::new(Needs::default(), replay, false))),
        }
    }
}

impl Flow for Forward {
    fn next(&mut self, cx: &mut Cx<'_>, got: Got) -> Step<'_> {
        match &mut self.stage {
            Stage::Readying(ready) => match ready.step(cx, got) {
                Readiness::Step(step) => step,
                Readiness::Ready(_) => {
                    self.stage = Stage::Sending;
                    Step::SendCommand
                }
                Readiness::Failed(e) => {
                    self.stage = Stage::Refusing(Refusing::new(self.seq, e));
                    Step::DropCommand
                }
            },
            Stage::Refusing(r) => r.step(cx, got).unwrap_or(Step::Done),
            Stage::Sending => {
                self.stage = Stage::Relaying;
                Step::Relay {
                    kind: self.kind,
                    info: Cow::Borrowed(&self.info),
                }
            }
            Stage::Relaying => {
                if let (Got::Relayed(outcome, tracked), Some(b)) = (got, cx.held.as_deref_mut()) {
                    let c = cx.s.after_command(&self.info, outcome, tracked, b);
                    cx.count(c);
                }
                self.stage = Stage::Releasing;
                release(cx, Got::Start)
            }
            Stage::Releasing => release(cx, got),
        }
    }
}

/// COM_PING from a client that holds no connection: answered OK by dbproxy (pools
/// validate with pings, and must not wait for a saturated pool).
#[derive(Debug)]
pub struct Pong {
    seq: u8,
    told: bool,
}

impl Pong {
    pub fn new(seq: u8) -> Pong {
        Pong { seq, told: false }
    }
}

impl Flow for Pong {
    fn next(&mut self, cx: &mut Cx<'_>, got: Got) -> Step<'_> {
        match got {
            Got::Start => Step::DropCommand,
            Got::Dropped if !self.told => {
                self.told = true;
                Step::Tell {
                    seq: self.seq.wrapping_add(1),
                    payload: ok_packet(cx.s.status),
                }
            }
            _ => Step::Done,
        }
    }
}

/// A command dbproxy does not serve (unknown, malformed), or the error a client's next
/// command gets after its connection was lost behind its previous answer: the command is
/// read and dropped, and the client gets the error.
#[derive(Debug)]
pub struct Refuse(Refusing);

impl Refuse {
    pub fn new(seq: u8, e: ErrPacket) -> Refuse {
        Refuse(Refusing::unserved(seq, e))
    }
}

impl Flow for Refuse {
    fn next(&mut self, cx: &mut Cx<'_>, got: Got) -> Step<'_> {
        match got {
            Got::Start => Step::DropCommand,
            got => self.0.step(cx, got).unwrap_or(Step::Done),
        }
    }
}

/// COM_RESET_CONNECTION: the client's session starts afresh (its default database stays,
/// as with MariaDB); a connection it held goes back to be reset.
#[derive(Debug)]
pub struct ResetConnection {
    seq: u8,
    stage: ResetStage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResetStage {
    Start,
    Dropping,
    CheckingIn,
    Told,
}

impl ResetConnection {
    pub fn new(seq: u8) -> ResetConnection {
        ResetConnection {
            seq,
            stage: ResetStage::Start,
        }
    }

    fn ok(&mut self, cx: &mut Cx<'_>) -> Step<'static> {
        self.stage = ResetStage::Told;
        Step::Tell {
            seq: self.seq.wrapping_add(1),
            payload: ok_packet(cx.s.status),
        }
    }
}

impl Flow for ResetConnection {
    fn next(&mut self, cx: &mut Cx<'_>, _: Got) -> Step<'_> {
        match self.stage {
            ResetStage::Start => {
                self.stage = ResetStage::Dropping;
                Step::DropCommand
            }
            ResetStage::Dropping => {
                let ended = cx.s.reset(cx.s.state.schema.clone());
                cx.pins.ended.extend(ended);
                if cx.held.is_some() {
                    self.stage = ResetStage::CheckingIn;
                    return Step::CheckInReset;
                }
                self.ok(cx)
            }
            ResetStage::CheckingIn => self.ok(cx),
            ResetStage::Told => Step::Done,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mysql::consts::{errcode, status};
    use crate::serving::testing::{self, Script};
    use crate::session::borrowing::{Replayed, ATTEMPTS};
    use crate::session::state::BackendSession;
    use crate::session::{ClientSession, Release};

    fn session() -> ClientSession {
        crate::session::testing::session(None)
    }

    fn relay() -> Step<'static> {
        Step::Relay {
            kind: ResponseKind::Single,
            info: Cow::Owned(SqlInfo::default()),
        }
    }

    fn ok(status: u16) -> Got {
        testing::ok(status, 0)
    }

    #[test]
    fn a_forwarded_command_borrows_sends_relays_and_gives_the_connection_back() {
        let mut t = Script::new(session(), None);
        let mut f = Forward::new(0, ResponseKind::Single, true, false);
        let steps = t.run(&mut f, vec![Got::Lent, Got::Sent, ok(status::AUTOCOMMIT)]);
        assert_eq!(
            steps,
            [
                Step::Borrow,
                Step::SendCommand,
                relay(),
                Step::CheckIn,
                Step::Done
            ]
        );
        assert!(t.held.is_none());
    }

    #[test]
    fn a_command_in_a_transaction_keeps_its_connection() {
        let mut t = Script::new(session(), Some(BackendSession::default()));
        let mut f = Forward::new(0, ResponseKind::Single, true, false);
        let steps = t.run(&mut f, vec![Got::Sent, ok(status::IN_TRANS)]);
        assert_eq!(steps, [Step::SendCommand, relay(), Step::Done]);
        assert!(t.held.is_some());
        assert_eq!(t.pins.started, [PinReason::Transaction]);
    }

    #[test]
    fn set_option_pins_the_client() {
        let mut t = Script::new(session(), Some(BackendSession::default()));
        let mut f = Forward::new(0, ResponseKind::Single, true, true);
        t.run(&mut f, vec![Got::Sent, ok(status::AUTOCOMMIT)]);
        assert_eq!(t.pins.started, [PinReason::Unclassified]);
        assert!(t.held.is_some(), "pinned: kept");
    }

    #[test]
    fn a_command_that_finds_no_connection_is_dropped_and_refused() {
        let mut t = Script::new(session(), None);
        let mut f = Forward::new(0, ResponseKind::Single, true, false);
        let busy = ErrPacket::new(errcode::PROXY_BORROW_TIMEOUT, "HY000", "busy");
        let steps = t.run(
            &mut f,
            vec![Got::Refused(busy.clone()), Got::Dropped, Got::Told],
        );
        assert_eq!(steps, testing::refused(&busy));
    }

    #[test]
    fn a_connection_that_breaks_while_restored_is_replaced() {
        let mut t = Script::new(crate::session::testing::session(Some(b"shop")), None);
        let mut f = Forward::new(0, ResponseKind::Single, true, false);
        let broken = || Got::Replayed(Replayed::Broken("reset".into()));
        let mut answers = Vec::new();
        for _ in 1..ATTEMPTS {
            answers.extend([Got::Lent, broken()]);
        }
        answers.extend([Got::Lent, Got::Replayed(Replayed::Done), Got::Sent, ok(2)]);
        let steps = t.run(&mut f, answers);
        let borrows = steps.iter().filter(|s| **s == Step::Borrow).count();
        assert_eq!(borrows as u32, ATTEMPTS);
        assert!(steps.ends_with(&[Step::SendCommand, relay(), Step::CheckIn, Step::Done]));
    }

    /// A held connection on which a `SET insert_id` meant for the client is pending.
    fn with_one_shot() -> Option<BackendSession> {
        Some(BackendSession {
            insert_id_pending: true,
            ..BackendSession::default()
        })
    }

    #[test]
    fn one_shots_are_cleared_before_the_connection_goes_back() {
        let mut t = Script::new(session(), with_one_shot());
        let mut f = Forward::new(0, ResponseKind::Single, true, false);
        let steps = t.run(
            &mut f,
            vec![Got::Sent, ok(status::AUTOCOMMIT), Got::Released(Ok(None))],
        );
        let want = Release {
            capture_warnings: false,
            statements: vec!["SET insert_id = 0".into()],
        };
        assert_eq!(
            steps,
            [
                Step::SendCommand,
                relay(),
                Step::Release(want),
                Step::CheckIn,
                Step::Done
            ]
        );
    }

    #[test]
    fn a_release_that_fails_leaves_the_client_without_the_connection() {
        let mut t = Script::new(session(), with_one_shot());
        let mut f = Forward::new(0, ResponseKind::Single, true, false);
        let failed = Got::Released(Err("reset".into()));
        let steps = t.run(&mut f, vec![Got::Sent, ok(status::AUTOCOMMIT), failed]);
        assert_eq!(steps.last(), Some(&Step::Done));
        assert!(!steps.contains(&Step::CheckIn));
        assert!(t.held.is_none());
    }

    #[test]
    fn a_ping_without_a_connection_is_answered_here() {
        let mut t = Script::new(session(), None);
        let steps = t.run(&mut Pong::new(0), vec![Got::Dropped, Got::Told]);
        assert_eq!(
            steps,
            [
                Step::DropCommand,
                Step::Tell {
                    seq: 1,
                    payload: ok_packet(status::AUTOCOMMIT)
                },
                Step::Done
            ]
        );
    }

    #[test]
    fn a_refused_command_is_dropped_then_answered_without_touching_pins() {
        let mut s = session();
        s.status |= status::IN_TRANS;
        let mut t = Script::new(s, None);
        let e = ErrPacket::new(errcode::ER_UNKNOWN_COM_ERROR, "08S01", "Unknown command");
        let steps = t.run(
            &mut Refuse::new(0, e.clone()),
            vec![Got::Dropped, Got::Told],
        );
        assert_eq!(
            steps,
            [
                Step::DropCommand,
                Step::Tell {
                    seq: 1,
                    payload: e.encode()
                },
                Step::Done
            ]
        );
        assert!(t.pins.started.is_empty());
    }
}

#[cfg(test)]
mod reset_tests {
    use super::*;
    use crate::mysql::consts::status;
    use crate::serving::testing::Script;
    use crate::session::state::BackendSession;

    #[test]
    fn a_reset_gives_a_held_connection_back_to_be_reset_and_answers_ok() {
        let mut s = crate::session::testing::session(Some(b"shop"));
        s.status |= status::IN_TRANS;
        let mut t = Script::new(s, Some(BackendSession::default()));
        let steps = t.run(
            &mut ResetConnection::new(0),
            vec![Got::Dropped, Got::CheckedIn, Got::Told],
        );
        let [Step::DropCommand, Step::CheckInReset, Step::Tell { seq: 1, .. }, Step::Done] = steps
        else {
            panic!("{steps:?}");
        };
        // The schema stays, as with MariaDB; the transaction is gone.
        assert_eq!(t.s.state.schema.as_deref(), Some(&b"shop"[..]));
        assert_eq!(t.s.status & status::IN_TRANS, 0);
    }
}
