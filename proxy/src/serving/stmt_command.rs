//! COM_STMT_SEND_LONG_DATA, COM_STMT_FETCH and COM_STMT_RESET, with the statement id
//! rewritten for the connection that holds the statement's long data or cursor; and
//! COM_STMT_CLOSE, which ends the client's statement (connections keep theirs cached).

use super::{release, Cx, Flow, Got, Readiness, Ready, Refusing, Step};
use crate::mysql::command::ResponseKind;
use crate::mysql::consts::com;
use crate::mysql::stmt;
use crate::mysql::wire::{ok_packet, ErrPacket};
use crate::session::borrowing::Borrowing;
use crate::session::execute;
use crate::session::state::Needs;

/// One COM_STMT_SEND_LONG_DATA, COM_STMT_FETCH or COM_STMT_RESET.
#[derive(Debug)]
pub struct StatementCommand {
    seq: u8,
    command: u8,
    /// The client's statement.
    cid: u32,
    stage: Stage,
}

#[derive(Debug)]
enum Stage {
    Start,
    Readying(Ready),
    Preparing,
    /// Dropped and answered (or, for long data, dropped: it has no answer).
    Refusing(Option<Refusing>),
    /// A reset of a statement no connection has: dropped, answered OK next.
    Answering,
    /// Nothing more to do (the reset answered, the long data sent).
    Over,
    Sent,
    Relaying,
    Releasing,
}

impl StatementCommand {
    /// The command numbered `seq` whose first packet's payload is `payload`, for a client
    /// session that has `s`'s statements.
    pub fn new(seq: u8, cx: &Cx<'_>) -> Result<StatementCommand, Refused> {
        let command = cx.command.first().copied().unwrap_or(0);
        match execute::client_statement(cx.s, cx.command, "mysqld_stmt_fetch") {
            Ok(cid) => Ok(StatementCommand {
                seq,
                command,
                cid,
                stage: Stage::Start,
            }),
            Err(e) => Err(Refused::new(seq, command, e)),
        }
    }

    /// Refuses the command: COM_STMT_SEND_LONG_DATA has no reply in the protocol (the
    /// execute that follows fails instead), the others get the error.
    fn refuse(&mut self, e: ErrPacket) -> Step<'static> {
        let r = (self.command != com::STMT_SEND_LONG_DATA).then(|| Refusing::new(self.seq, e));
        self.stage = Stage::Refusing(r);
        Step::DropCommand
    }

    fn release(&mut self, cx: &mut Cx<'_>) -> Step<'static> {
        self.stage = Stage::Releasing;
        release(cx, Got::Start)
    }

    /// The statement's id on the held connection, if it is prepared there.
    fn on_held(&self, cx: &mut Cx<'_>) -> Option<u32> {
        let key = &cx.s.stmts.get(self.cid)?.key;
        cx.held_stmts.as_deref_mut()?.get_mut(key).map(|s| s.id)
    }

    fn start(&mut self, cx: &mut Cx<'_>) -> Step<'static> {
        if self.command == com::STMT_RESET {
            let pins = cx.s.statement_reset(self.cid);
            cx.count(pins);
            let Some(id) = self.on_held(cx) else {
                // Nothing of it lives on a connection: nothing to reset.
                self.stage = Stage::Answering;
                return Step::DropCommand;
            };
            self.stage = Stage::Sent;
            return Step::SendCommandAs { id };
        }
        if self.command == com::STMT_FETCH && !cx.s.has_cursor(self.cid) {
            let e = ErrPacket::new(1421, "HY000", "The statement has no open cursor");
            self.stage = Stage::Refusing(Some(Refusing::unserved(self.seq, e)));
            return Step::DropCommand;
        }
        let mut ready = Ready::new(Borrowing::new(Needs::default(), true, false));
        match ready.step(cx, Got::Start) {
            Readiness::Step(step) => {
                self.stage = Stage::Readying(ready);
                step
            }
            Readiness::Ready(_) => self.prepare(),
            Readiness::Failed(e) => self.refuse(e),
        }
    }

    fn prepare(&mut self) -> Step<'static> {
        self.stage = Stage::Preparing;
        Step::PrepareStatement {
            cid: self.cid,
            seq: self.seq,
        }
    }

    /// The statement's id on the connection is known: the command goes with it.
    fn send(&mut self, cx: &mut Cx<'_>, id: u32) -> Step<'static> {
        if self.command == com::STMT_SEND_LONG_DATA {
            let pins = cx.s.long_data_sent(self.cid);
            cx.count(pins);
            // No answer comes.
            self.stage = Stage::Over;
        } else {
            self.stage = Stage::Sent;
        }
        Step::SendCommandAs { id }
    }
}

impl Flow for StatementCommand {
    fn next(&mut self, cx: &mut Cx<'_>, got: Got) -> Step<'_> {
        match &mut self.stage {
            Stage::Start => self.start(cx),
            Stage::Readying(ready) => match ready.step(cx, got) {
                Readiness::Step(step) => step,
                Readiness::Ready(_) => self.prepare(),
                Readiness::Failed(e) => self.refuse(e),
            },
            Stage::Preparing => match got {
                Got::Prepared(Ok(id)) => self.send(cx, id),
                Got::Prepared(Err(e)) => self.refuse(e),
                _ => Step::Done,
            },
            Stage::Refusing(r) => match (got, r.as_mut()) {
                (got, Some(r)) => r.step(cx, got).unwrap_or(Step::Done),
                (_, None) => Step::Done,
            },
            Stage::Answering => {
                self.stage = Stage::Over;
                Step::Tell {
                    seq: self.seq.wrapping_add(1),
                    payload: ok_packet(cx.s.status),
                }
            }
            Stage::Over => Step::Done,
            Stage::Sent => {
                self.stage = Stage::Relaying;
                let kind = if self.command == com::STMT_RESET {
                    ResponseKind::Single
                } else {
                    ResponseKind::Fetch
                };
                Step::Relay {
                    kind,
                    info: std::borrow::Cow::Borrowed(&super::NO_STATEMENT),
                }
            }
            Stage::Relaying => {
                if let Got::Relayed(outcome, tracked) = got {
                    if self.command == com::STMT_FETCH {
                        let pins = cx.s.fetched(&outcome);
                        cx.count(pins);
                    }
                    if let Some(b) = cx.held.as_deref_mut() {
                        let c =
                            cx.s.after_command(&super::NO_STATEMENT, outcome, tracked, b);
                        cx.count(c);
                    }
                }
                self.release(cx)
            }
            Stage::Releasing => release(cx, got),
        }
    }
}

/// A statement command naming a statement the client does not have.
#[derive(Debug)]
pub struct Refused {
    r: Option<Refusing>,
    started: bool,
}

impl Refused {
    fn new(seq: u8, command: u8, e: ErrPacket) -> Refused {
        Refused {
            r: (command != com::STMT_SEND_LONG_DATA).then(|| Refusing::new(seq, e)),
            started: false,
        }
    }
}

impl Flow for Refused {
    fn next(&mut self, cx: &mut Cx<'_>, got: Got) -> Step<'_> {
        if !std::mem::replace(&mut self.started, true) {
            return Step::DropCommand;
        }
        match self.r.as_mut() {
            Some(r) => r.step(cx, got).unwrap_or(Step::Done),
            None => Step::Done,
        }
    }
}

/// COM_STMT_CLOSE: the client's statement goes; a cursor it had open on the held
/// connection is closed with a reset of the connection's statement.
#[derive(Debug)]
pub struct CloseStatement {
    cid: Option<u32>,
    stage: CloseStage,
}

#[derive(Debug, PartialEq, Eq)]
enum CloseStage {
    Start,
    Dropped,
    Closing,
    Releasing,
}

impl CloseStatement {
    /// The close whose payload (of the first packet) `cx` holds.
    pub fn new(cx: &Cx<'_>) -> CloseStatement {
        let cid = stmt::stmt_id(cx.command)
            .ok()
            .and_then(|i| cx.s.stmts.resolve(i));
        CloseStatement {
            cid,
            stage: CloseStage::Start,
        }
    }
}

impl Flow for CloseStatement {
    fn next(&mut self, cx: &mut Cx<'_>, got: Got) -> Step<'_> {
        let Some(cid) = self.cid else {
            return match self.stage {
                CloseStage::Start => {
                    self.stage = CloseStage::Dropped;
                    Step::DropCommand
                }
                _ => Step::Done,
            };
        };
        let step = match self.stage {
            CloseStage::Start => {
                self.stage = CloseStage::Dropped;
                return Step::DropCommand;
            }
            CloseStage::Dropped => {
                let (had_cursor, pins) = cx.s.statement_closed(cid);
                cx.count(pins);
                let id = had_cursor
                    .then(|| {
                        let key = &cx.s.stmts.get(cid)?.key;
                        cx.held_stmts.as_deref_mut()?.get_mut(key).map(|s| s.id)
                    })
                    .flatten();
                match (had_cursor, id) {
                    (true, Some(id)) => {
                        self.stage = CloseStage::Closing;
                        let mut payload = vec![com::STMT_RESET];
                        payload.extend_from_slice(&id.to_le_bytes());
                        Some(Step::Command {
                            payload,
                            kind: ResponseKind::Single,
                        })
                    }
                    (true, None) => self.releasing(cx, Got::Start),
                    (false, _) => None,
                }
            }
            CloseStage::Closing => self.releasing(cx, Got::Start),
            CloseStage::Releasing => Some(release(cx, got)).filter(|s| *s != Step::Done),
        };
        step.unwrap_or_else(|| {
            cx.s.stmts.remove(cid);
            Step::Done
        })
    }
}

impl CloseStatement {
    fn releasing(&mut self, cx: &mut Cx<'_>, got: Got) -> Option<Step<'static>> {
        self.stage = CloseStage::Releasing;
        Some(release(cx, got)).filter(|s| *s != Step::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mysql::consts::{errcode, status};
    use crate::mysql::response::End;
    use crate::serving::testing::{self, Script};
    use crate::session::sql::analyze;
    use crate::session::state::BackendSession;
    use crate::session::stmts::{StmtContext, StmtKey};
    use crate::session::Outcome;
    use std::sync::Arc;

    /// A client with `SELECT 1` prepared (as its statement 1), holding a connection on
    /// which it is prepared as 42 when `on_held`; `command`: the payload it sends.
    fn client(on_held: bool, command: &[u8]) -> Script<'static> {
        let mut s = crate::session::testing::session(None);
        let sql: Arc<[u8]> = Arc::from(&b"SELECT 1"[..]);
        let key = StmtKey::new(StmtContext::default(), sql.clone());
        let cid = s.stmts.add(key.clone(), Arc::new(analyze(&sql)), 0, 1);
        assert_eq!(cid, 1);
        let mut t = Script::new(s, Some(BackendSession::default()));
        if on_held {
            t.stmts.insert(key, 42, 0);
        }
        t.command = command.to_vec();
        t
    }

    fn flow(t: &mut Script<'static>) -> Result<StatementCommand, Refused> {
        let mut held = t.held.clone();
        let cx = Cx {
            s: &mut t.s,
            held: held.as_mut(),
            pins: Default::default(),
            held_stmts: None,
            command: &t.command,
        };
        StatementCommand::new(0, &cx)
    }

    fn ok() -> Got {
        testing::ok(status::AUTOCOMMIT, 0)
    }

    #[test]
    fn a_reset_goes_with_the_connections_own_id() {
        let mut t = client(true, b"\x1a\x01\x00\x00\x00");
        let mut f = flow(&mut t).unwrap();
        let steps = t.run(&mut f, vec![Got::Sent, ok()]);
        assert_eq!(steps[0], Step::SendCommandAs { id: 42 });
        assert!(steps.ends_with(&[Step::CheckIn, Step::Done]));
    }

    #[test]
    fn a_reset_of_a_statement_on_no_connection_is_answered_here() {
        let mut t = client(false, b"\x1a\x01\x00\x00\x00");
        let mut f = flow(&mut t).unwrap();
        let steps = t.run(&mut f, vec![Got::Dropped, Got::Told]);
        let [Step::DropCommand, Step::Tell { seq: 1, payload }, Step::Done] = steps else {
            panic!("{steps:?}");
        };
        assert_eq!(payload.first(), Some(&0));
    }

    #[test]
    fn long_data_is_sent_without_an_answer_and_pins() {
        let mut t = client(true, b"\x18\x01\x00\x00\x00\x00\x00data");
        let mut f = flow(&mut t).unwrap();
        let steps = t.run(&mut f, vec![Got::Prepared(Ok(42)), Got::Sent]);
        assert_eq!(
            steps,
            [
                Step::PrepareStatement { cid: 1, seq: 0 },
                Step::SendCommandAs { id: 42 },
                Step::Done
            ]
        );
        assert_eq!(t.pins.started, [crate::session::pins::PinReason::LongData]);
    }

    #[test]
    fn a_fetch_without_a_cursor_is_refused() {
        let mut t = client(true, b"\x1c\x01\x00\x00\x00\x01\x00\x00\x00");
        let mut f = flow(&mut t).unwrap();
        let steps = t.run(&mut f, vec![Got::Dropped, Got::Told]);
        let [Step::DropCommand, Step::Tell { payload, .. }, Step::Done] = steps else {
            panic!("{steps:?}");
        };
        assert_eq!(ErrPacket::parse(payload).unwrap().code, 1421);
    }

    #[test]
    fn an_unknown_statement_is_refused_but_long_data_gets_no_answer() {
        let mut t = client(true, b"\x1a\x09\x00\x00\x00");
        let Err(mut refused) = flow(&mut t) else {
            panic!("refused");
        };
        let steps = t.run(&mut refused, vec![Got::Dropped, Got::Told]);
        let [Step::DropCommand, Step::Tell { payload, .. }, Step::Done] = steps else {
            panic!("{steps:?}");
        };
        assert_eq!(
            ErrPacket::parse(payload).unwrap().code,
            errcode::ER_UNKNOWN_STMT_HANDLER
        );
        let mut t = client(true, b"\x18\x09\x00\x00\x00\x00\x00data");
        let Err(mut refused) = flow(&mut t) else {
            panic!("refused");
        };
        let steps = t.run(&mut refused, vec![Got::Dropped]);
        assert_eq!(steps, [Step::DropCommand, Step::Done]);
    }

    #[test]
    fn closing_a_statement_with_a_cursor_resets_it_on_the_connection() {
        let mut t = client(true, b"\x19\x01\x00\x00\x00");
        let opened = Outcome {
            ending: End::Rows {
                rows: 0,
                warnings: 0,
            },
            status: Some(status::AUTOCOMMIT | status::CURSOR_EXISTS),
        };
        let _ = t.s.executed(1, true, &opened);
        let mut close = {
            let cx = Cx::new(&mut t.s, None);
            let mut cx = cx;
            cx.command = b"\x19\x01\x00\x00\x00";
            CloseStatement::new(&cx)
        };
        let steps = t.run(&mut close, vec![Got::Dropped, Got::Answered(true)]);
        let reset = Step::Command {
            payload: vec![com::STMT_RESET, 42, 0, 0, 0],
            kind: ResponseKind::Single,
        };
        assert_eq!(steps[..2], [Step::DropCommand, reset]);
        assert_eq!(steps.last(), Some(&Step::Done));
        assert!(t.s.stmts.get(1).is_none(), "the client's statement is gone");
    }
}
