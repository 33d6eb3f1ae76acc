//! One statement of the client's on the held connection, in one round trip where it can
//! be: a replay ahead of it, the statement (as it came, rewritten, or built by dbproxy),
//! a read-back behind it; then the answers in that order, the statement's relayed (or
//! collected and changed), the session learning from each.
//!
//! On a split endpoint a read may first wait on a reader for the client's causal position
//! (a query sent ahead of the statement, in the same round trip). When that wait times
//! out, the statement's answer (stale, maybe) is read and dropped, and the statement is
//! over without an outcome: the driver serves it again on the writer.

use super::{Cx, Got, Step};
use crate::mysql::command::ResponseKind;
use crate::session::plan::{Plan, Relay as PlanRelay, Text as PlanText};
use crate::session::sql::SqlInfo;
use crate::session::state::Replay;
use crate::session::{Outcome, ReadBack, Tracked};
use std::borrow::Cow;

/// What goes to the database for the statement.
#[derive(Debug)]
pub enum Send {
    /// The client's command, as it came.
    Client,
    /// A command dbproxy built (a rewritten COM_STMT_EXECUTE), sent by the driver from its
    /// own buffer.
    Built,
}

/// The step the statement is at, in the order they come; those that do not apply to a
/// statement are passed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Start,
    /// The replay's SET goes ahead of the statement.
    Ahead,
    /// The causal wait goes ahead of the statement.
    Wait,
    /// The statement goes (or the client's command is dropped, for a text sent instead).
    Send,
    /// The text sent instead of the client's.
    Replace,
    /// The read-back, right behind the statement.
    ReadBackSend,
    /// The replay's answer is read.
    FinishAhead,
    /// The causal wait's answer is read.
    WaitRead,
    /// The wait timed out: the statement's answer (and a pipelined read-back's) is
    /// dropped.
    Discard,
    /// The statement's answer is relayed.
    Relay,
    /// The read-back's answer is read (sent now, if it was not pipelined).
    ReadBack,
    /// Variables coupled to those the statement changed are read back.
    Coupled,
    Over,
}

impl Stage {
    fn after(self) -> Stage {
        match self {
            Stage::Start => Stage::Ahead,
            Stage::Ahead => Stage::Wait,
            Stage::Wait => Stage::Send,
            Stage::Send => Stage::Replace,
            Stage::Replace => Stage::ReadBackSend,
            Stage::ReadBackSend => Stage::FinishAhead,
            Stage::FinishAhead => Stage::WaitRead,
            Stage::WaitRead => Stage::Relay,
            Stage::Discard => Stage::Over,
            Stage::Relay => Stage::ReadBack,
            Stage::ReadBack => Stage::Coupled,
            Stage::Coupled | Stage::Over => Stage::Over,
        }
    }
}

/// One statement's round trip.
#[derive(Debug)]
pub struct Statement {
    seq: u8,
    kind: ResponseKind,
    /// Its text, when the session keeps it (a `SET TRANSACTION` to repeat).
    text: Vec<u8>,
    send: Send,
    ahead: Option<Replay>,
    replace: Option<Vec<u8>>,
    relay: PlanRelay,
    read_back: Option<ReadBack>,
    pipelined: bool,
    counts_stale: bool,
    /// The read-back of variables coupled to those the statement changed.
    coupled: Option<ReadBack>,
    outcome: Option<Outcome>,
    stage: Stage,
    /// The causal wait sent ahead (it answers one row: 0 when the reader has caught up).
    wait: Option<Vec<u8>>,
    /// The wait timed out: the statement is to be served again elsewhere.
    rerouted: bool,
    /// Answers still to be dropped after a wait that timed out.
    to_discard: u8,
}

impl Statement {
    /// The statement of the command numbered `seq`, answered as `kind`, in the round trip
    /// `plan` says, with `ahead` before it.
    pub fn new(
        seq: u8,
        kind: ResponseKind,
        text: Vec<u8>,
        plan: Plan,
        ahead: Option<Replay>,
        send: Send,
    ) -> Statement {
        let Plan {
            text: replace,
            relay,
            read_back,
            pipelined,
            counts_stale,
        } = plan;
        Statement {
            seq,
            kind,
            text,
            send,
            ahead,
            replace: match replace {
                PlanText::Replace(sql) => Some(sql),
                PlanText::Client => None,
            },
            relay,
            read_back,
            pipelined,
            counts_stale,
            coupled: None,
            outcome: None,
            stage: Stage::Start,
            wait: None,
            rerouted: false,
            to_discard: 0,
        }
    }

    /// The statement waits first on its (reader's) connection with this query (see
    /// [`crate::routing::causal::Position::wait_sql`]).
    pub fn wait_first(&mut self, sql: Vec<u8>) {
        self.wait = Some(sql);
    }

    /// The causal wait timed out: the statement did not run for the client.
    pub fn rerouted(&self) -> bool {
        self.rerouted
    }

    /// Takes `got` ([`Got::Start`] first) for the statement `info` and moves to the next
    /// step ([`Statement::step`]); `false` once the statement is over.
    pub fn advance(&mut self, cx: &mut Cx<'_>, got: Got, info: &SqlInfo) -> bool {
        match (self.stage, got) {
            (Stage::Relay, Got::Relayed(outcome, tracked)) => {
                self.learn(cx, info, outcome, tracked);
            }
            (Stage::Wait, Got::WaitNeedless) => {
                // Nothing to read for it either.
                self.wait = None;
            }
            (Stage::WaitRead, Got::Waited(false)) => {
                self.rerouted = true;
                let pipelined_read_back = self.pipelined && self.read_back.is_some();
                self.to_discard = 1 + u8::from(pipelined_read_back);
                self.stage = Stage::Discard;
                return true;
            }
            (Stage::Discard, Got::Discarded) => {
                self.to_discard = self.to_discard.saturating_sub(1);
                if self.to_discard > 0 {
                    return true;
                }
                self.stage = Stage::Over;
                return false;
            }
            _ => {}
        }
        loop {
            self.stage = self.stage.after();
            if self.applies(cx) {
                return self.stage != Stage::Over;
            }
        }
    }

    /// Whether the stage just reached has a step for this statement.
    fn applies(&mut self, cx: &mut Cx<'_>) -> bool {
        match self.stage {
            Stage::Start => false,
            Stage::Ahead => self.ahead.as_ref().is_some_and(|a| a.set.is_some()),
            Stage::Wait | Stage::WaitRead => self.wait.is_some(),
            Stage::Discard => false,
            Stage::Send | Stage::Relay | Stage::Over => true,
            Stage::Replace => matches!(self.send, Send::Client) && self.replace.is_some(),
            Stage::ReadBackSend => self.pipelined && self.read_back.is_some(),
            Stage::FinishAhead => self.ahead.is_some(),
            Stage::ReadBack => self.read_back.is_some(),
            Stage::Coupled => {
                self.coupled = cx.s.coupled_read_back();
                self.coupled.is_some()
            }
        }
    }

    /// The step the statement is at (after [`Statement::advance`] said it is not over),
    /// for the statement `info`.
    pub fn step<'f>(&'f mut self, info: &'f SqlInfo) -> Step<'f> {
        let seq = self.seq;
        let query = |sql: &'f [u8]| Step::SendQuery {
            sql: Cow::Borrowed(sql),
            seq,
        };
        let read_back = |rb: &'f ReadBack, sent: bool| Step::ReadBack {
            rb: Cow::Borrowed(rb),
            sent,
            seq,
        };
        match self.stage {
            Stage::Ahead => match self.ahead.as_ref().and_then(|a| a.set.as_ref()) {
                Some(set) => query(set.as_bytes()),
                None => Step::Done,
            },
            Stage::Wait => match &self.wait {
                Some(sql) => Step::SendWait {
                    sql: Cow::Borrowed(sql),
                    seq,
                },
                None => Step::Done,
            },
            Stage::WaitRead => Step::CausalWait { seq },
            Stage::Discard => Step::DiscardAnswer {
                kind: self.kind,
                seq,
            },
            Stage::Send => match (&self.send, &self.replace) {
                (Send::Client, Some(_)) => Step::DropCommand,
                (Send::Client, None) => Step::SendCommand,
                (Send::Built, _) => Step::SendBuilt { seq },
            },
            Stage::Replace => match &self.replace {
                Some(sql) => query(sql),
                None => Step::Done,
            },
            Stage::ReadBackSend => match &self.read_back {
                Some(rb) => query(rb.sql.as_bytes()),
                None => Step::Done,
            },
            Stage::FinishAhead => match self.ahead.take() {
                Some(plan) => Step::FinishAhead { plan, seq },
                None => Step::Done,
            },
            Stage::Relay => match std::mem::replace(&mut self.relay, PlanRelay::Stream) {
                PlanRelay::Stream => Step::Relay {
                    kind: self.kind,
                    info: Cow::Borrowed(info),
                },
                rewrite => Step::RelayRewritten {
                    kind: self.kind,
                    rewrite,
                    seq,
                },
            },
            Stage::ReadBack => match &self.read_back {
                Some(rb) => read_back(rb, self.pipelined),
                None => Step::Done,
            },
            Stage::Coupled => match &self.coupled {
                Some(rb) => read_back(rb, false),
                None => Step::Done,
            },
            Stage::Start | Stage::Over => Step::Done,
        }
    }

    /// How the statement went (failed, if its answer never came).
    pub fn outcome(&self) -> Outcome {
        self.outcome.unwrap_or(Outcome::FAILED)
    }

    /// What the session learns from the statement's answer.
    fn learn(&mut self, cx: &mut Cx<'_>, info: &SqlInfo, outcome: Outcome, tracked: Tracked) {
        self.outcome = Some(outcome);
        if let Some(b) = cx.held.as_deref_mut() {
            let c = cx.s.after_statement(info, &self.text, outcome, tracked, b);
            cx.count(c);
        }
        if self.counts_stale {
            cx.s.diag.counts_stale();
        }
    }
}
