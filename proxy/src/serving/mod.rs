//! The session's `Serving` state: one client command served, as a flow of steps. A flow
//! says what comes next ([`Step`]: borrow, replay, send the command, relay its answer, tell
//! the client, give the connection back) and is told how each step went ([`Got`]). It is
//! plain code over `session/`'s parts: the driver borrows, reads, writes and runs the
//! scripts, and the flow decides. `conn.rs` drives flows today; the worker loop drives the
//! same flows.
//!
//! A step that fails in a way no flow decides on (the client gone, the connection lost
//! mid-answer) ends the command in the driver, as before: a flow only sees what it has a
//! choice about.

pub mod forward;

use crate::mysql::command::ResponseKind;
use crate::mysql::wire::ErrPacket;
use crate::session::borrowing::{self, Borrowing, Replayed};
use crate::session::sql::SqlInfo;
use crate::session::state::{BackendSession, Needs, Replay};
use crate::session::{ClientSession, Outcome, PinChanges, Release, Tracked};

/// What a flow reads and changes: the client's session and, while the client holds one,
/// its connection's session; the pins the step started and ended go to `pins` (the driver
/// counts them).
pub struct Cx<'a> {
    pub s: &'a mut ClientSession,
    pub held: Option<&'a mut BackendSession>,
    pub pins: PinChanges,
}

impl<'a> Cx<'a> {
    pub fn new(s: &'a mut ClientSession, held: Option<&'a mut BackendSession>) -> Cx<'a> {
        Cx {
            s,
            held,
            pins: PinChanges::default(),
        }
    }

    fn count(&mut self, c: PinChanges) {
        self.pins.started.extend(c.started);
        self.pins.ended.extend(c.ended);
    }
}

/// What the driver does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Borrow a connection for the client: [`Got::Lent`] or [`Got::Refused`].
    Borrow,
    /// Run this replay on the held connection on its own (replanned with `needs` after a
    /// reset): [`Got::Replayed`].
    Replay { plan: Replay, needs: Needs },
    /// Send the client's command to the held connection as it came, every packet of it:
    /// [`Got::Sent`].
    SendCommand,
    /// Read the client's command (every packet of it) and drop it: [`Got::Dropped`].
    DropCommand,
    /// Relay the held connection's answer to a command of this kind (the statement the
    /// flow's [`Flow::info`]): [`Got::Relayed`].
    Relay(ResponseKind),
    /// Send the client this packet: [`Got::Told`].
    Tell { seq: u8, payload: Vec<u8> },
    /// Run these steps on the held connection before it goes back: [`Got::Released`].
    Release(Release),
    /// Give the held connection back to the pool, clean (nothing of the client's on it).
    /// Nothing comes back: the flow goes on at once with [`Got::CheckedIn`].
    CheckIn,
    /// The command is over.
    Done,
}

/// How the last step went.
#[derive(Debug)]
pub enum Got {
    /// Nothing yet: the flow begins.
    Start,
    /// The pool lent a connection; the client holds it now.
    Lent,
    /// The pool lent nothing: the client is told this.
    Refused(ErrPacket),
    Replayed(Replayed),
    Sent,
    Dropped,
    Relayed(Outcome, Tracked),
    Told,
    /// The release steps ran (the warning list they read back, if asked), or failed
    /// (the connection was discarded by the driver).
    Released(Result<Option<crate::mysql::resultset::TextResult>, String>),
    CheckedIn,
}

/// What flows that serve no statement of the client's report as theirs.
pub static NO_STATEMENT: std::sync::LazyLock<SqlInfo> = std::sync::LazyLock::new(SqlInfo::default);

/// One command's flow.
pub trait Flow {
    fn next(&mut self, cx: &mut Cx<'_>, got: Got) -> Step;

    /// The statement being served (what its answer's session tracking means).
    fn info(&self) -> &SqlInfo;
}

/// Makes the connection ready (see [`Borrowing`]): driven through [`Ready::step`] until
/// it says the connection is ready or the command cannot run.
#[derive(Debug)]
pub struct Ready {
    m: Borrowing,
}

/// Where making the connection ready stands.
#[derive(Debug)]
pub enum Readiness {
    /// Not yet: this step first.
    Step(Step),
    /// Ready; a replay to send ahead of the command.
    Ready(Option<Replay>),
    /// The command cannot run: the client gets this.
    Failed(ErrPacket),
}

impl Ready {
    pub fn new(m: Borrowing) -> Ready {
        Ready { m }
    }

    /// Takes `got` (the answer to the last step this returned, or [`Got::Start`]).
    pub fn step(&mut self, cx: &mut Cx<'_>, got: Got) -> Readiness {
        let step = match got {
            Got::Start => self.m.start(cx.s, cx.held.as_deref()),
            Got::Lent => match cx.held.as_deref() {
                Some(b) => self.m.lent(cx.s, b),
                None => borrowing::Step::Failed(borrowing::unavailable("no database connection")),
            },
            Got::Refused(e) => self.m.refused(e),
            Got::Replayed(r) => self.m.replayed(r),
            other => borrowing::Step::Failed(unexpected(&other)),
        };
        match step {
            borrowing::Step::Borrow => Readiness::Step(Step::Borrow),
            borrowing::Step::Replay(plan) => Readiness::Step(Step::Replay {
                plan,
                needs: self.m.needs(),
            }),
            borrowing::Step::Ready { ahead } => Readiness::Ready(ahead),
            borrowing::Step::Failed(e) => Readiness::Failed(e),
        }
    }
}

/// The end of a command that holds a connection: it goes back at a transaction boundary
/// with nothing pinned, after the client's warning list is read and the one-shots meant
/// for it alone are cleared.
#[derive(Debug, Default)]
pub struct Releasing {
    running: bool,
}

impl Releasing {
    /// Takes `got` ([`Got::Start`] first); `None` once the command is over.
    pub fn step(&mut self, cx: &mut Cx<'_>, got: Got) -> Option<Step> {
        match got {
            Got::Released(result) => {
                self.running = false;
                match (result, cx.held.as_deref_mut()) {
                    (Ok(warnings), Some(b)) => {
                        cx.s.released(b, warnings.as_ref());
                        Some(Step::CheckIn)
                    }
                    // Discarded by the driver: the client's next connection is another.
                    _ => {
                        cx.s.moved();
                        None
                    }
                }
            }
            Got::CheckedIn => None,
            _ => {
                if !cx.s.releasable() {
                    return None;
                }
                let b = cx.held.as_deref()?;
                let steps = cx.s.release(b);
                if steps.is_empty() {
                    return Some(Step::CheckIn);
                }
                self.running = true;
                Some(Step::Release(steps))
            }
        }
    }
}

/// A command refused before it reached the server: its packets are read and dropped, then
/// the client gets the error.
#[derive(Debug)]
pub struct Refusing {
    seq: u8,
    error: Option<ErrPacket>,
    /// The command was to run on the database (so a transaction the client has open is
    /// still its own: the transaction pin is kept as it stands).
    was_to_run: bool,
}

impl Refusing {
    /// Refuses the command numbered `seq`, which was to run on the database, with `e`.
    pub fn new(seq: u8, e: ErrPacket) -> Refusing {
        Refusing {
            seq,
            error: Some(e),
            was_to_run: true,
        }
    }

    /// Refuses a command dbproxy does not serve (unknown, malformed, or the error of a
    /// connection lost after the previous answer) with `e`.
    pub fn unserved(seq: u8, e: ErrPacket) -> Refusing {
        Refusing {
            seq,
            error: Some(e),
            was_to_run: false,
        }
    }

    /// The first step.
    pub fn start(&self) -> Step {
        Step::DropCommand
    }

    /// Takes `got`; `None` once the client is told.
    pub fn step(&mut self, cx: &mut Cx<'_>, got: Got) -> Option<Step> {
        match (got, self.error.take()) {
            (Got::Dropped, Some(e)) => {
                if self.was_to_run {
                    let c = cx.s.command_refused();
                    cx.count(c);
                }
                Some(Step::Tell {
                    seq: self.seq.wrapping_add(1),
                    payload: e.encode(),
                })
            }
            _ => None,
        }
    }
}

/// A step's answer that the flow did not ask for: a bug in the driver, told to the client
/// as the database being unavailable rather than taking the process down.
fn unexpected(got: &Got) -> ErrPacket {
    tracing::error!(?got, "a command's flow got an answer it did not ask for");
    borrowing::unavailable("internal error: unexpected step")
}

#[cfg(test)]
pub(crate) mod testing {
    //! Drives flows in memory: a scripted pool, connection and client.

    use super::*;

    /// The steps a flow asked for, and the answers it was given.
    pub struct Script<'a> {
        pub s: ClientSession,
        pub held: Option<BackendSession>,
        pub pins: PinChanges,
        /// What comes back for each step the flow asks for, in order.
        pub answers: std::collections::VecDeque<Got>,
        pub steps: Vec<Step>,
        _life: std::marker::PhantomData<&'a ()>,
    }

    impl Script<'_> {
        pub fn new(s: ClientSession, held: Option<BackendSession>) -> Self {
            Script {
                s,
                held,
                pins: PinChanges::default(),
                answers: Default::default(),
                steps: Vec::new(),
                _life: std::marker::PhantomData,
            }
        }

        /// Runs `flow` to its end, answering each step from `answers` (a borrow lends a
        /// fresh connection, a check-in gives it back, unless an answer says otherwise).
        pub fn run(&mut self, flow: &mut dyn Flow, answers: Vec<Got>) -> &[Step] {
            self.answers = answers.into();
            let mut got = Got::Start;
            for _ in 0..64 {
                let mut cx = Cx::new(&mut self.s, self.held.as_mut());
                let step = flow.next(&mut cx, got);
                let pins = std::mem::take(&mut cx.pins);
                self.pins.started.extend(pins.started);
                self.pins.ended.extend(pins.ended);
                got = match &step {
                    Step::Done => {
                        self.steps.push(step);
                        return &self.steps;
                    }
                    Step::Borrow => match self.answers.pop_front() {
                        Some(Got::Lent) | None => {
                            self.held = Some(BackendSession::default());
                            Got::Lent
                        }
                        Some(other) => other,
                    },
                    Step::CheckIn => {
                        self.held = None;
                        Got::CheckedIn
                    }
                    _ => self.answers.pop_front().expect("an answer for every step"),
                };
                if let Got::Released(Err(_)) = got {
                    self.held = None;
                }
                self.steps.push(step);
            }
            panic!("the flow did not end: {:?}", self.steps);
        }
    }
}
