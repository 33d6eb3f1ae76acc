//! COM_STMT_PREPARE: prepared on the connection serving it, in the client's context; the
//! client gets an id of dbproxy's, valid on every connection (a statement is prepared
//! again, in the context it was prepared in, wherever an execute lands). The statement's
//! key holds that context (schema, sql_mode, character sets).

use super::{release, Cx, Flow, Got, Readiness, Ready, Refusing, Step};
use crate::mysql::consts::errcode;
use crate::mysql::wire::ErrPacket;
use crate::session::answer::PrepareCapture;
use crate::session::borrowing::Borrowing;
use crate::session::sql::analyze;
use crate::session::state::Needs;
use crate::session::stmts::StmtKey;
use std::sync::Arc;

/// One prepare.
#[derive(Debug)]
pub struct Prepare {
    seq: u8,
    stage: Stage,
}

#[derive(Debug)]
enum Stage {
    Readying(Ready),
    Refusing(Refusing),
    Reading,
    Sending(Option<PrepareCapture>),
    Relaying,
    Releasing,
}

impl Prepare {
    /// The prepare numbered `seq`, from a client allowed `most` statements at a time.
    pub fn new(seq: u8, most: usize, held: usize) -> Prepare {
        // Each statement a client keeps costs dbproxy memory until it closes it.
        let stage = if held >= most {
            Stage::Refusing(Refusing::new(
                seq,
                ErrPacket::new(
                    errcode::ER_MAX_PREPARED_STMT_COUNT_REACHED,
                    "42000",
                    format!("Can't create more than max_prepared_stmt_count statements (current value: {most}) (dbproxy max_prepared_statements_per_client)"),
                ),
            ))
        } else {
            Stage::Readying(Ready::new(Borrowing::new(Needs::default(), true, false)))
        };
        Prepare { seq, stage }
    }
}

impl Flow for Prepare {
    fn next(&mut self, cx: &mut Cx<'_>, got: Got) -> Step<'_> {
        match &mut self.stage {
            Stage::Readying(ready) => match ready.step(cx, got) {
                Readiness::Step(step) => step,
                Readiness::Ready(_) => {
                    self.stage = Stage::Reading;
                    Step::ReadCommand
                }
                Readiness::Failed(e) => {
                    self.stage = Stage::Refusing(Refusing::new(self.seq, e));
                    Step::DropCommand
                }
            },
            Stage::Refusing(r) => match got {
                Got::Start => Step::DropCommand,
                got => r.step(cx, got).unwrap_or(Step::Done),
            },
            Stage::Reading => {
                let sql: Arc<[u8]> = Arc::from(cx.command.get(1..).unwrap_or_default());
                let info = Arc::new(analyze(&sql));
                let key = StmtKey::new(cx.s.state.stmt_context(), sql);
                self.stage = Stage::Sending(Some(PrepareCapture::new(key, info)));
                Step::SendRead { seq: self.seq }
            }
            Stage::Sending(capture) => match capture.take() {
                Some(c) => {
                    self.stage = Stage::Relaying;
                    Step::RelayPrepare(c)
                }
                None => Step::Done,
            },
            Stage::Relaying => {
                if let Got::PrepareRelayed(outcome, capture) = got {
                    let c =
                        cx.s.after_prepare(&capture.info, outcome.failed(), capture.warnings);
                    cx.count(c);
                }
                self.stage = Stage::Releasing;
                release(cx, Got::Start)
            }
            Stage::Releasing => release(cx, got),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mysql::consts::status;
    use crate::mysql::response::End;
    use crate::serving::testing::Script;
    use crate::session::Outcome;

    fn prepared(capture: &PrepareCapture) -> Got {
        let mut c = capture.clone();
        c.client_id = Some(1);
        let ending = End::Ok {
            affected: 0,
            warnings: 0,
        };
        Got::PrepareRelayed(
            Outcome {
                ending,
                status: Some(status::AUTOCOMMIT),
            },
            c,
        )
    }

    #[test]
    fn a_prepare_reads_the_statement_sends_it_and_relays_the_answer() {
        let mut t = Script::new(crate::session::testing::session(Some(b"shop")), None);
        t.command = b"\x16SELECT ?".to_vec();
        let mut f = Prepare::new(0, 10, 0);
        let sql: Arc<[u8]> = Arc::from(&b"SELECT ?"[..]);
        let key = StmtKey::new(t.s.state.stmt_context(), sql.clone());
        let capture = PrepareCapture::new(key, Arc::new(analyze(&sql)));
        let answers = vec![
            Got::Lent,
            Got::Replayed(crate::session::borrowing::Replayed::Done),
            Got::Read,
            Got::Sent,
            prepared(&capture),
        ];
        let steps = t.run(&mut f, answers);
        let [Step::Borrow, Step::Replay { .. }, Step::ReadCommand, Step::SendRead { seq: 0 }, Step::RelayPrepare(c), Step::CheckIn, Step::Done] =
            steps
        else {
            panic!("{steps:?}");
        };
        // The statement is keyed by its text and the context it was prepared in.
        assert_eq!(*c, capture);
        assert_eq!(c.key.context.schema.as_deref(), Some(&b"shop"[..]));
    }

    #[test]
    fn a_client_at_its_limit_of_statements_is_refused() {
        let mut t = Script::new(crate::session::testing::session(None), None);
        let steps = t.run(&mut Prepare::new(0, 2, 2), vec![Got::Dropped, Got::Told]);
        let [Step::DropCommand, Step::Tell { seq: 1, payload }, Step::Done] = steps else {
            panic!("{steps:?}");
        };
        let e = ErrPacket::parse(payload).unwrap();
        assert_eq!(e.code, errcode::ER_MAX_PREPARED_STMT_COUNT_REACHED);
    }
}
