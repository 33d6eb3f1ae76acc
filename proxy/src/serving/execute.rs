//! COM_STMT_EXECUTE (and MariaDB's bulk execute), read whole by the driver: on whichever
//! connection serves it, the statement prepared there (in its context) if needed, its
//! diagnostics answered as for a text query where a prepared statement can be, the command
//! rebuilt for that connection (its id, the parameter types it lacks), then the
//! statement's round trip; then the connection goes back at a transaction boundary.

use super::statement::{Send, Statement};
use super::{release, Cx, Flow, Got, Readiness, Ready, Refusing, Step};
use crate::mysql::command::ResponseKind;
use crate::mysql::wire::ErrPacket;
use crate::session::borrowing::Borrowing;
use crate::session::diag::Answer;
use crate::session::execute::{self, Execute as Read};
use crate::session::plan;
use crate::session::state::Replay;
use crate::session::{Outcome, Tracked};
use std::borrow::Cow;

/// One execute.
#[derive(Debug)]
pub struct Execute {
    seq: u8,
    ex: Read,
    ahead: Option<Replay>,
    answer: Option<Answer>,
    stage: Stage,
    /// A causal wait to send ahead (an execute on a reader).
    wait: Option<Vec<u8>>,
    /// The wait timed out, or a reader could not prepare the statement: the execute is
    /// to be served again on the writer.
    rerouted: bool,
    /// It runs on a reader (a split endpoint's read).
    reader: bool,
}

// Not boxed: the statement would allocate for every statement; the flow lives on the
// driver's stack, one per session.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Stage {
    Readying(Ready),
    Refusing(Refusing),
    /// The statement is being prepared on the connection.
    Preparing,
    /// The server refused to prepare it: the client is being told.
    Failing,
    /// The client's warning list is being read from the connection.
    Capturing,
    /// The command is being built for the connection.
    Building,
    Running(Statement),
    Releasing,
}

impl Execute {
    /// The execute numbered `seq`, read (`ex`).
    pub fn new(seq: u8, ex: Read) -> Execute {
        let needs = ex.needs;
        Execute {
            seq,
            ex,
            ahead: None,
            answer: None,
            stage: Stage::Readying(Ready::new(Borrowing::new(needs, true, true))),
            wait: None,
            rerouted: false,
            reader: false,
        }
    }

    /// The execute runs on a reader: one that cannot prepare the statement (a table it has
    /// not got yet) sends it to the writer instead of failing.
    pub fn on_reader(&mut self) {
        self.reader = true;
    }

    /// The execute first waits on its connection with this query (see
    /// [`crate::serving::query::Query::wait_first`]).
    pub fn wait_first(&mut self, sql: Vec<u8>) {
        self.wait = Some(sql);
    }

    /// The causal wait timed out, or the reader could not prepare the statement: the
    /// execute is to be served again on the writer.
    pub fn rerouted(&self) -> bool {
        self.rerouted
    }

    /// What the driver builds the command for the connection from.
    pub fn read(&self) -> &Read {
        &self.ex
    }

    /// The client's command was read whole already: a refusal is only told.
    fn refuse(&mut self, cx: &mut Cx<'_>, e: ErrPacket) -> Step<'static> {
        let mut r = Refusing::new(self.seq, e);
        let step = r.step(cx, Got::Dropped).unwrap_or(Step::Done);
        self.stage = Stage::Refusing(r);
        step
    }

    /// The statement's answer as the client's diagnostics say; `None`: its warning list
    /// must be read first.
    fn answer(&self, cx: &mut Cx<'_>) -> Option<Answer> {
        let (key, info) = (&self.ex.key, &self.ex.info);
        if !info.readers.diagnostics_any() {
            return Some(Answer::Forward);
        }
        let a = cx.s.diag.answer(&key.sql, info, &cx.s.state.user_vars);
        (a != Answer::Capture).then_some(a)
    }

    /// The answer known: refused if a prepared statement cannot get it, else the command
    /// is built.
    fn answered(&mut self, cx: &mut Cx<'_>, answer: Answer) -> Step<'_> {
        match execute::answer(answer) {
            Ok(a) => {
                self.answer = Some(a);
                self.stage = Stage::Building;
                Step::BuildExecute {
                    ex: Cow::Borrowed(&self.ex),
                }
            }
            Err(e) => self.refuse(cx, e),
        }
    }

    /// The command is built: the statement's round trip.
    fn run(&mut self, cx: &mut Cx<'_>) -> Statement {
        let info = &self.ex.info;
        let text = if info.next_transaction {
            self.ex.key.sql.to_vec()
        } else {
            Vec::new()
        };
        // A cursor leaves its statement open: nothing may run after it.
        let read_back = cx.s.read_back(info).filter(|_| !self.ex.cursor);
        let answer = self.answer.take().unwrap_or(Answer::Forward);
        let mut statement = Statement::new(
            self.seq,
            ResponseKind::Execute,
            text,
            plan::plan(answer, info, read_back),
            self.ahead.take(),
            Send::Built,
        );
        if let Some(wait) = self.wait.take() {
            statement.wait_first(wait);
        }
        statement
    }

    fn release(&mut self, cx: &mut Cx<'_>) -> Step<'static> {
        self.stage = Stage::Releasing;
        release(cx, Got::Start)
    }
}

impl Flow for Execute {
    fn next(&mut self, cx: &mut Cx<'_>, mut got: Got) -> Step<'_> {
        loop {
            match &mut self.stage {
                Stage::Readying(ready) => match ready.step(cx, got) {
                    Readiness::Step(step) => return step,
                    Readiness::Ready(ahead) => {
                        self.ahead = ahead;
                        self.stage = Stage::Preparing;
                        return Step::PrepareStatement {
                            cid: self.ex.cid,
                            seq: self.seq,
                        };
                    }
                    Readiness::Failed(e) => return self.refuse(cx, e),
                },
                Stage::Refusing(r) => return r.step(cx, got).unwrap_or(Step::Done),
                Stage::Preparing => match got {
                    Got::Prepared(Err(_)) if self.reader => {
                        // Nothing went to the client: the writer has every table.
                        self.rerouted = true;
                        return self.release(cx);
                    }
                    Got::Prepared(Err(e)) => {
                        // The server refused to prepare it here (its table is gone, a READ
                        // ONLY transaction is pending, ...): to the client that is its
                        // execute failing, with the server's error in its warning list.
                        if let Some(b) = cx.held.as_deref_mut() {
                            let c = cx.s.after_statement(
                                &self.ex.info,
                                b"",
                                Outcome::FAILED,
                                Tracked::default(),
                                b,
                            );
                            cx.count(c);
                        }
                        self.stage = Stage::Failing;
                        return Step::Tell {
                            seq: self.seq.wrapping_add(1),
                            payload: e.encode(),
                        };
                    }
                    // Decided after the prepare, which changes the connection's ROW_COUNT().
                    _ => match self.answer(cx) {
                        Some(a) => return self.answered(cx, a),
                        None => {
                            self.stage = Stage::Capturing;
                            return Step::CaptureWarnings {
                                seq: self.seq,
                                drop_command: false,
                            };
                        }
                    },
                },
                Stage::Failing => return self.release(cx),
                Stage::Capturing => {
                    let a = self.answer(cx).unwrap_or(Answer::Capture);
                    return self.answered(cx, a);
                }
                Stage::Building => match got {
                    Got::Built(Err(e)) => return self.refuse(cx, e),
                    _ => {
                        self.stage = Stage::Running(self.run(cx));
                        got = Got::Start;
                    }
                },
                Stage::Running(_) => break,
                Stage::Releasing => return release(cx, got),
            }
        }
        let Stage::Running(statement) = &mut self.stage else {
            return Step::Done;
        };
        if statement.advance(cx, got, &self.ex.info) {
            let Stage::Running(statement) = &mut self.stage else {
                return Step::Done;
            };
            return statement.step(&self.ex.info);
        }
        if statement.rerouted() {
            // Not run for the client (the reader had not caught up): served again.
            self.rerouted = true;
            return self.release(cx);
        }
        let outcome = statement.outcome();
        let pins = cx.s.executed(self.ex.cid, self.ex.cursor, &outcome);
        cx.count(pins);
        self.release(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mysql::consts::status;
    use crate::serving::testing::{self, Script};
    use crate::session::sql::analyze;
    use crate::session::state::Needs;
    use crate::session::stmts::{StmtContext, StmtKey};
    use std::sync::Arc;

    /// A client with `SELECT ?` prepared, executing it.
    fn prepared() -> (Script<'static>, Read) {
        let mut s = crate::session::testing::session(None);
        let sql: Arc<[u8]> = Arc::from(&b"SELECT ?"[..]);
        let key = StmtKey::new(StmtContext::default(), sql.clone());
        let info = Arc::new(analyze(&sql));
        let cid = s.stmts.add(key.clone(), info.clone(), 1, 1);
        let ex = Read {
            cid,
            key,
            info,
            needs: Needs::default(),
            cursor: false,
        };
        (Script::new(s, None), ex)
    }

    fn rows() -> Got {
        testing::rows(status::AUTOCOMMIT)
    }

    #[test]
    fn an_execute_prepares_where_needed_builds_sends_and_relays() {
        let (mut t, ex) = prepared();
        let mut f = Execute::new(0, ex.clone());
        let answers = vec![
            Got::Lent,
            Got::Prepared(Ok(7)),
            Got::Built(Ok(())),
            Got::Sent,
            rows(),
        ];
        let steps = t.run(&mut f, answers);
        assert_eq!(
            steps,
            [
                Step::Borrow,
                Step::PrepareStatement {
                    cid: ex.cid,
                    seq: 0
                },
                Step::BuildExecute {
                    ex: Cow::Owned(ex.clone())
                },
                Step::SendBuilt { seq: 0 },
                Step::Relay {
                    kind: ResponseKind::Execute,
                    info: Cow::Owned((*ex.info).clone())
                },
                Step::CheckIn,
                Step::Done
            ]
        );
    }

    #[test]
    fn a_reader_that_cannot_prepare_sends_the_execute_to_the_writer() {
        let (mut t, ex) = prepared();
        let mut f = Execute::new(0, ex.clone());
        f.on_reader();
        let gone = ErrPacket::new(1146, "42S02", "Table 'shop.t' doesn't exist");
        let steps = t.run(&mut f, vec![Got::Lent, Got::Prepared(Err(gone))]);
        assert_eq!(
            steps,
            [
                Step::Borrow,
                Step::PrepareStatement {
                    cid: ex.cid,
                    seq: 0
                },
                Step::CheckIn,
                Step::Done
            ],
            "nothing told: the connection goes back and the execute is served again"
        );
        assert!(f.rerouted());
    }

    #[test]
    fn a_statement_the_server_will_not_prepare_fails_the_execute() {
        let (mut t, ex) = prepared();
        let mut f = Execute::new(0, ex.clone());
        let gone = ErrPacket::new(1146, "42S02", "Table 'shop.t' doesn't exist");
        let answers = vec![
            Got::Lent,
            Got::Prepared(Err(gone.clone())),
            Got::Told,
            Got::Released(Ok(None)),
        ];
        let steps = t.run(&mut f, answers);
        // The error is the client's last condition: its warning list is read before the
        // connection goes back.
        let capture = crate::session::Release {
            capture_warnings: true,
            statements: Vec::new(),
        };
        assert_eq!(
            steps,
            [
                Step::Borrow,
                Step::PrepareStatement {
                    cid: ex.cid,
                    seq: 0
                },
                Step::Tell {
                    seq: 1,
                    payload: gone.encode()
                },
                Step::Release(capture),
                Step::CheckIn,
                Step::Done
            ]
        );
    }

    #[test]
    fn malformed_parameters_are_refused_before_anything_is_sent() {
        let (mut t, ex) = prepared();
        let mut f = Execute::new(0, ex.clone());
        let bad = ErrPacket::new(1210, "HY000", "Incorrect arguments");
        let answers = vec![
            Got::Lent,
            Got::Prepared(Ok(7)),
            Got::Built(Err(bad.clone())),
            Got::Told,
        ];
        let steps = t.run(&mut f, answers);
        assert!(!steps.contains(&Step::SendBuilt { seq: 0 }));
        assert!(steps.contains(&Step::Tell {
            seq: 1,
            payload: bad.encode()
        }));
        assert_eq!(steps.last(), Some(&Step::Done));
    }
}
