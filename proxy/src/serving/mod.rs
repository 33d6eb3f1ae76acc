//! The session's `Serving` state: one client command served, as a flow of steps. A flow
//! says what comes next ([`Step`]: borrow, replay, send the command, relay its answer, tell
//! the client, give the connection back) and is told how each step went ([`Got`]). It is
//! plain code over `session/`'s parts: the driver borrows, reads, writes and runs the
//! scripts, and the flow decides. `conn/` drives flows today; the worker loop drives the
//! same flows.
//!
//! A step that fails in a way no flow decides on (the client gone, the connection lost
//! mid-answer) ends the command in the driver, as before: a flow only sees what it has a
//! choice about.

pub mod connect;
pub mod execute;
pub mod forward;
pub mod prepare;
pub mod query;
pub mod statement;
pub mod stmt_command;

use crate::mysql::command::ResponseKind;
use crate::mysql::wire::ErrPacket;
use crate::session::answer::PrepareCapture;
use crate::session::borrowing::{self, Borrowing, Replayed};
use crate::session::plan::Relay as PlanRelay;
use crate::session::sql::SqlInfo;
use crate::session::state::{BackendSession, Needs, Replay};
use crate::session::stmts::BackendStmts;
use crate::session::{ClientSession, Outcome, PinChanges, ReadBack, Release, Tracked};
use std::borrow::Cow;

/// What a flow reads and changes: the client's session and, while the client holds one,
/// its connection's session; the pins the step started and ended go to `pins` (the driver
/// counts them).
pub struct Cx<'a> {
    pub s: &'a mut ClientSession,
    pub held: Option<&'a mut BackendSession>,
    pub pins: PinChanges,
    /// The held connection's prepared statements.
    pub held_stmts: Option<&'a mut BackendStmts>,
    /// The payload of the client's command: its first packet's while it is buffered, all
    /// of it once read whole ([`Step::ReadCommand`]).
    pub command: &'a [u8],
}

impl<'a> Cx<'a> {
    pub fn new(s: &'a mut ClientSession, held: Option<&'a mut BackendSession>) -> Cx<'a> {
        Cx {
            s,
            held,
            pins: PinChanges::default(),
            held_stmts: None,
            command: &[],
        }
    }

    fn count(&mut self, c: PinChanges) {
        self.pins.started.extend(c.started);
        self.pins.ended.extend(c.ended);
    }
}

/// What the driver does next. What the step names of the flow's own (the statement, a
/// query text) is lent by the flow until the step is carried out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step<'f> {
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
    /// Read the client's command whole (every packet of it, within max_allowed_packet):
    /// [`Got::Read`]; it is [`Cx::command`] from then on.
    ReadCommand,
    /// Send the command read whole to the held connection: [`Got::Sent`].
    SendRead { seq: u8 },
    /// Send the client's command (buffered, one packet) with the statement id in it
    /// changed to the held connection's `id`: [`Got::Sent`].
    SendCommandAs { id: u32 },
    /// Send a command of dbproxy's to the held connection and read its answer; a
    /// connection that fails it is discarded: [`Got::Answered`].
    Command {
        payload: Vec<u8>,
        kind: ResponseKind,
    },
    /// Relay the answer to a COM_STMT_PREPARE, recording the statement (for the client
    /// and the connection) as it goes: [`Got::PrepareRelayed`].
    RelayPrepare(PrepareCapture),
    /// Give the held connection back to be reset (the client's session on it is no
    /// longer wanted): [`Got::CheckedIn`].
    CheckInReset,
    /// Send a query of dbproxy's (a replay sent ahead, a read-back, the client's statement
    /// rewritten) to the held connection: [`Got::Sent`]. `seq`: the client's command's
    /// (what it is told if the connection fails).
    SendQuery { sql: Cow<'f, [u8]>, seq: u8 },
    /// Read the answer to the replay sent ahead of the statement and record what it set:
    /// [`Got::AheadDone`].
    FinishAhead { plan: Replay, seq: u8 },
    /// Read the client's warning list from the held connection (`SHOW WARNINGS`):
    /// [`Got::Captured`]. `drop_command`: the client's command is still buffered, and is
    /// dropped if the connection fails.
    CaptureWarnings { seq: u8, drop_command: bool },
    /// Relay the held connection's answer to a command of `kind` (the statement `info`):
    /// [`Got::Relayed`].
    Relay {
        kind: ResponseKind,
        info: Cow<'f, SqlInfo>,
    },
    /// Make sure the client's statement `cid` is prepared on the held connection:
    /// [`Got::Prepared`].
    PrepareStatement { cid: u32, seq: u8 },
    /// Build the client's execute for the held connection (its statement id there, the
    /// parameter types it lacks), to be sent by [`Step::SendBuilt`]: [`Got::Built`].
    BuildExecute {
        ex: Cow<'f, crate::session::execute::Execute>,
    },
    /// Send the command dbproxy built for the client's (in the driver's buffer) to the
    /// held connection: [`Got::Sent`].
    SendBuilt { seq: u8 },
    /// Collect the held connection's (small) answer, change it as `rewrite` says, and send
    /// it: [`Got::Relayed`].
    RelayRewritten {
        kind: ResponseKind,
        rewrite: PlanRelay,
        seq: u8,
    },
    /// Read a read-back's answer (sent already, when `sent`; else send it first, keeping
    /// the client's warnings if it would clear them) and learn from it: [`Got::ReadBack`].
    ReadBack {
        rb: Cow<'f, ReadBack>,
        sent: bool,
        seq: u8,
    },
    /// Send the causal wait ahead of the statement to the held connection: [`Got::Sent`],
    /// or [`Got::WaitNeedless`] (nothing sent) when that connection's server is known to
    /// have the client's position already.
    SendWait { sql: Cow<'f, [u8]>, seq: u8 },
    /// Read the answer to the causal wait sent ahead of the statement: [`Got::Waited`].
    CausalWait { seq: u8 },
    /// Read the held connection's answer to a command of `kind` to its end and drop it
    /// (a read served again elsewhere): [`Got::Discarded`].
    DiscardAnswer { kind: ResponseKind, seq: u8 },
    /// Send the client this packet: [`Got::Told`].
    Tell { seq: u8, payload: Vec<u8> },
    /// Run these steps on the held connection before it goes back: [`Got::Released`].
    Release(Release),
    /// Give the held connection back to the pool, clean (nothing of the client's on it).
    /// Nothing comes back: the flow goes on at once with [`Got::CheckedIn`].
    CheckIn,
    /// The command is over.
    Done,
    /// The session ends here (the client was told why).
    EndSession,
}

impl Step<'_> {
    /// The step with what it borrows copied (tests keep the steps a flow took).
    pub fn into_owned(self) -> Step<'static> {
        match self {
            Step::Borrow => Step::Borrow,
            Step::Replay { plan, needs } => Step::Replay { plan, needs },
            Step::SendCommand => Step::SendCommand,
            Step::DropCommand => Step::DropCommand,
            Step::ReadCommand => Step::ReadCommand,
            Step::SendRead { seq } => Step::SendRead { seq },
            Step::SendCommandAs { id } => Step::SendCommandAs { id },
            Step::Command { payload, kind } => Step::Command { payload, kind },
            Step::RelayPrepare(c) => Step::RelayPrepare(c),
            Step::CheckInReset => Step::CheckInReset,
            Step::SendQuery { sql, seq } => Step::SendQuery {
                sql: Cow::Owned(sql.into_owned()),
                seq,
            },
            Step::FinishAhead { plan, seq } => Step::FinishAhead { plan, seq },
            Step::SendBuilt { seq } => Step::SendBuilt { seq },
            Step::PrepareStatement { cid, seq } => Step::PrepareStatement { cid, seq },
            Step::BuildExecute { ex } => Step::BuildExecute {
                ex: Cow::Owned(ex.into_owned()),
            },
            Step::CaptureWarnings { seq, drop_command } => {
                Step::CaptureWarnings { seq, drop_command }
            }
            Step::Relay { kind, info } => Step::Relay {
                kind,
                info: Cow::Owned(info.into_owned()),
            },
            Step::RelayRewritten { kind, rewrite, seq } => {
                Step::RelayRewritten { kind, rewrite, seq }
            }
            Step::ReadBack { rb, sent, seq } => Step::ReadBack {
                rb: Cow::Owned(rb.into_owned()),
                sent,
                seq,
            },
            Step::SendWait { sql, seq } => Step::SendWait {
                sql: Cow::Owned(sql.into_owned()),
                seq,
            },
            Step::CausalWait { seq } => Step::CausalWait { seq },
            Step::DiscardAnswer { kind, seq } => Step::DiscardAnswer { kind, seq },
            Step::Tell { seq, payload } => Step::Tell { seq, payload },
            Step::Release(r) => Step::Release(r),
            Step::CheckIn => Step::CheckIn,
            Step::Done => Step::Done,
            Step::EndSession => Step::EndSession,
        }
    }
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
    Read,
    /// The command of [`Step::Command`] was answered (`false`: the connection failed it
    /// and is gone).
    Answered(bool),
    PrepareRelayed(Outcome, PrepareCapture),
    Relayed(Outcome, Tracked),
    Told,
    AheadDone,
    Captured,
    /// The statement's id on the held connection, or the server's refusal to prepare it.
    Prepared(Result<u32, ErrPacket>),
    /// The execute is built, or the client gets this error (its parameters are malformed).
    Built(Result<(), ErrPacket>),
    ReadBack,
    /// The causal wait answered: the reader has the client's position (`false`: it timed
    /// out, or the wait failed).
    Waited(bool),
    /// The held connection's server has the client's position: the wait was not sent.
    WaitNeedless,
    /// The answer was read and dropped.
    Discarded,
    /// The release steps ran (the warning list they read back, if asked), or failed
    /// (the connection was discarded by the driver).
    Released(Result<Option<crate::mysql::resultset::TextResult>, String>),
    CheckedIn,
}

/// What flows that serve no statement of the client's report as theirs.
pub static NO_STATEMENT: std::sync::LazyLock<SqlInfo> = std::sync::LazyLock::new(SqlInfo::default);

/// One command's flow.
pub trait Flow {
    fn next(&mut self, cx: &mut Cx<'_>, got: Got) -> Step<'_>;
}

/// Makes the connection ready (see [`Borrowing`]): driven through [`Ready::step`] until
/// it says the connection is ready or the command cannot run.
#[derive(Debug)]
pub struct Ready {
    m: Borrowing,
    /// The step asked for last, whose answer comes next.
    asked: Asked,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Asked {
    Nothing,
    Borrow,
    Replay,
}

/// Where making the connection ready stands.
#[derive(Debug)]
pub enum Readiness {
    /// Not yet: this step first.
    Step(Step<'static>),
    /// Ready; a replay to send ahead of the command.
    Ready(Option<Replay>),
    /// The command cannot run: the client gets this.
    Failed(ErrPacket),
}

impl Ready {
    pub fn new(m: Borrowing) -> Ready {
        Ready {
            m,
            asked: Asked::Nothing,
        }
    }

    /// Takes `got` (the answer to the last step this returned, or [`Got::Start`]). An
    /// answer to a step it did not ask for fails the command.
    pub fn step(&mut self, cx: &mut Cx<'_>, got: Got) -> Readiness {
        let step = match (std::mem::replace(&mut self.asked, Asked::Nothing), got) {
            (Asked::Nothing, Got::Start) => self.m.start(cx.s, cx.held.as_deref()),
            (Asked::Borrow, Got::Lent) => match cx.held.as_deref() {
                Some(b) => self.m.lent(cx.s, b),
                None => borrowing::Step::Failed(borrowing::unavailable("no database connection")),
            },
            (Asked::Borrow, Got::Refused(e)) => self.m.refused(e),
            (Asked::Replay, Got::Replayed(r)) => self.m.replayed(r),
            (_, other) => borrowing::Step::Failed(unexpected(&other)),
        };
        match step {
            borrowing::Step::Borrow => {
                self.asked = Asked::Borrow;
                Readiness::Step(Step::Borrow)
            }
            borrowing::Step::Replay(plan) => {
                self.asked = Asked::Replay;
                Readiness::Step(Step::Replay {
                    plan,
                    needs: self.m.needs(),
                })
            }
            borrowing::Step::Ready { ahead } => Readiness::Ready(ahead),
            borrowing::Step::Failed(e) => Readiness::Failed(e),
        }
    }
}

/// The end of a command that holds a connection: it goes back at a transaction boundary
/// with nothing pinned, after the client's warning list is read and the one-shots meant
/// for it alone are cleared. Takes `got` ([`Got::Start`] first, then the answers to the
/// steps it asked for); [`Step::Done`] once the command is over.
pub fn release(cx: &mut Cx<'_>, got: Got) -> Step<'static> {
    match got {
        Got::Released(result) => match (result, cx.held.as_deref_mut()) {
            (Ok(warnings), Some(b)) => {
                cx.s.released(b, warnings.as_ref());
                Step::CheckIn
            }
            // Discarded by the driver: the client's next connection is another.
            _ => {
                cx.s.moved();
                Step::Done
            }
        },
        Got::CheckedIn => Step::Done,
        Got::Start => {
            let Some(b) = cx.held.as_deref().filter(|_| cx.s.releasable()) else {
                return Step::Done;
            };
            let steps = cx.s.release(b);
            if steps.is_empty() {
                return Step::CheckIn;
            }
            Step::Release(steps)
        }
        // Not an answer to a release step: the command ends here (the driver gives the
        // connection back as a session's end does) rather than asking again.
        other => {
            unexpected(&other);
            Step::Done
        }
    }
}

/// A command refused before it reached the server: its packets are read and dropped
/// ([`Step::DropCommand`] first), then the client gets the error.
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

    /// Takes `got`; `None` once the client is told.
    pub fn step(&mut self, cx: &mut Cx<'_>, got: Got) -> Option<Step<'static>> {
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

    /// A relayed answer that ended as `ending`, with `status`.
    pub fn relayed(ending: crate::mysql::response::End, status: u16) -> Got {
        Got::Relayed(
            Outcome {
                ending,
                status: Some(status),
            },
            Tracked::default(),
        )
    }

    /// An OK with `warnings`.
    pub fn ok(status: u16, warnings: u16) -> Got {
        let affected = 0;
        relayed(
            crate::mysql::response::End::Ok { affected, warnings },
            status,
        )
    }

    /// One row.
    pub fn rows(status: u16) -> Got {
        let (rows, warnings) = (1, 0);
        relayed(crate::mysql::response::End::Rows { rows, warnings }, status)
    }

    /// The steps of a command that found no connection (`told`: the pool's error).
    pub fn refused(told: &ErrPacket) -> [Step<'static>; 4] {
        let payload = told.encode();
        [
            Step::Borrow,
            Step::DropCommand,
            Step::Tell { seq: 1, payload },
            Step::Done,
        ]
    }

    /// The steps a flow asked for, and the answers it was given.
    pub struct Script<'a> {
        pub s: ClientSession,
        pub held: Option<BackendSession>,
        pub pins: PinChanges,
        /// What comes back for each step the flow asks for, in order.
        pub answers: std::collections::VecDeque<Got>,
        pub steps: Vec<Step<'static>>,
        /// The command's payload the flows see.
        pub command: Vec<u8>,
        /// The held connection's statements.
        pub stmts: BackendStmts,
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
                command: Vec::new(),
                stmts: BackendStmts::new(8),
                _life: std::marker::PhantomData,
            }
        }

        /// Runs `flow` to its end, answering each step from `answers` (a borrow lends a
        /// fresh connection, a check-in gives it back, unless an answer says otherwise).
        pub fn run(&mut self, flow: &mut dyn Flow, answers: Vec<Got>) -> &[Step<'static>] {
            self.answers = answers.into();
            let mut got = Got::Start;
            for _ in 0..64 {
                let held = self.held.is_some();
                let mut cx = Cx::new(&mut self.s, self.held.as_mut());
                cx.held_stmts = held.then_some(&mut self.stmts);
                cx.command = &self.command;
                let step = flow.next(&mut cx, got).into_owned();
                let pins = std::mem::take(&mut cx.pins);
                self.pins.started.extend(pins.started);
                self.pins.ended.extend(pins.ended);
                got = match &step {
                    Step::Done | Step::EndSession => {
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
