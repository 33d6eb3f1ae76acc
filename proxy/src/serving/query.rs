//! COM_QUERY: analysed; the connection made ready (the client's state replayed, ahead of
//! the statement when nothing in the replay can be refused); answered from the client's
//! own diagnostics when the connection does not have them (its warning list read first
//! when it is still there); then the statement's round trip; then the connection goes
//! back at a transaction boundary.

use super::statement::{Send, Statement};
use super::{release, Cx, Flow, Got, Readiness, Ready, Refusing, Step};
use crate::mysql::command::ResponseKind;
use crate::session::borrowing::Borrowing;
use crate::session::diag::Answer;
use crate::session::plan;
use crate::session::sql::{analyze, SqlInfo};
use crate::session::state::{Needs, Replay};

/// One COM_QUERY.
#[derive(Debug)]
pub struct Query {
    seq: u8,
    /// The command spans more than one packet (diagnostics are not answered from the
    /// session then: the text is not whole in the buffer).
    long: bool,
    info: SqlInfo,
    ahead: Option<Replay>,
    stage: Stage,
    /// A causal wait to send ahead of the statement (a read on a reader).
    wait: Option<Vec<u8>>,
    /// The wait timed out: the statement is to be served again on the writer.
    rerouted: bool,
    /// Sent instead of the client's text (`SELECT @@dbproxy_causal_position`).
    instead: Option<Vec<u8>>,
}

// Not boxed: the statement would allocate for every statement; the flow lives on the
// driver's stack, one per session.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Stage {
    Readying(Ready),
    Refusing(Refusing),
    /// The client's warning list is being read from the connection.
    Capturing,
    Running(Statement),
    Releasing,
}

impl Query {
    /// The COM_QUERY numbered `seq` whose text is `sql` (of its first packet); `long`:
    /// more packets follow.
    pub fn new(seq: u8, sql: &[u8], long: bool) -> Query {
        let info = analyze(sql);
        let needs = Needs {
            last_insert_id: info.readers.last_insert_id || info.changes_last_insert_id,
        };
        Query {
            seq,
            long,
            info,
            ahead: None,
            stage: Stage::Readying(Ready::new(Borrowing::new(needs, true, true))),
            wait: None,
            rerouted: false,
            instead: None,
        }
    }

    /// The COM_QUERY numbered `seq`, answered by sending `text` instead of the client's.
    pub fn instead(seq: u8, text: Vec<u8>) -> Query {
        let mut q = Query::new(seq, &text, false);
        q.instead = Some(text);
        q
    }

    /// The statement first waits on its connection with this query (a read on a reader,
    /// for the client's causal position).
    pub fn wait_first(&mut self, sql: Vec<u8>) {
        self.wait = Some(sql);
    }

    /// The causal wait timed out: the statement did not run for the client, and is to be
    /// served again on the writer.
    pub fn rerouted(&self) -> bool {
        self.rerouted
    }

    /// The statement's analysis (the driver notes the temporary tables it creates).
    pub fn info(&self) -> &SqlInfo {
        &self.info
    }

    /// The text of the statement, as buffered.
    fn sql<'c>(cx: &Cx<'c>) -> &'c [u8] {
        cx.command.get(1..).unwrap_or_default()
    }

    /// The connection is ready: the statement's answer as the client's diagnostics say.
    fn answer(&mut self, cx: &mut Cx<'_>) -> Option<Answer> {
        if let Some(text) = self.instead.take() {
            return Some(Answer::Rewrite(text));
        }
        if !self.info.readers.diagnostics_any() || self.long {
            return Some(Answer::Forward);
        }
        let a =
            cx.s.diag
                .answer(Self::sql(cx), &self.info, &cx.s.state.user_vars);
        (a != Answer::Capture).then_some(a)
    }

    /// The statement, answered as `answer`.
    fn run(&mut self, cx: &mut Cx<'_>, answer: Answer) -> Statement {
        let text = if self.info.next_transaction {
            Self::sql(cx).to_vec()
        } else {
            Vec::new()
        };
        let read_back = cx.s.read_back(&self.info);
        let mut statement = Statement::new(
            self.seq,
            ResponseKind::Query,
            text,
            plan::plan(answer, &self.info, read_back),
            self.ahead.take(),
            Send::Client,
        );
        if let Some(wait) = self.wait.take() {
            statement.wait_first(wait);
        }
        statement
    }
}

impl Flow for Query {
    fn next(&mut self, cx: &mut Cx<'_>, mut got: Got) -> Step<'_> {
        loop {
            match &mut self.stage {
                Stage::Readying(ready) => match ready.step(cx, got) {
                    Readiness::Step(step) => return step,
                    Readiness::Ready(ahead) => {
                        self.ahead = ahead;
                        let Some(answer) = self.answer(cx) else {
                            self.stage = Stage::Capturing;
                            return Step::CaptureWarnings {
                                seq: self.seq,
                                drop_command: true,
                            };
                        };
                        self.stage = Stage::Running(self.run(cx, answer));
                        got = Got::Start;
                    }
                    Readiness::Failed(e) => {
                        self.stage = Stage::Refusing(Refusing::new(self.seq, e));
                        return Step::DropCommand;
                    }
                },
                Stage::Refusing(r) => return r.step(cx, got).unwrap_or(Step::Done),
                Stage::Capturing => {
                    // Asked once more, with the list in the session now.
                    let answer = self.answer(cx).unwrap_or(Answer::Forward);
                    self.stage = Stage::Running(self.run(cx, answer));
                    got = Got::Start;
                }
                Stage::Running(_) => break,
                Stage::Releasing => return release(cx, got),
            }
        }
        // The statement's steps borrow from it (and from the analysis) until carried out.
        let Stage::Running(statement) = &mut self.stage else {
            return Step::Done;
        };
        if statement.advance(cx, got, &self.info) {
            let Stage::Running(statement) = &mut self.stage else {
                return Step::Done;
            };
            return statement.step(&self.info);
        }
        self.rerouted = statement.rerouted();
        self.stage = Stage::Releasing;
        release(cx, Got::Start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mysql::consts::{errcode, status};
    use crate::mysql::wire::ErrPacket;
    use crate::serving::testing::{self, rows, Script};
    use crate::session::uservars::UserValue;
    use crate::session::ClientSession;
    use std::borrow::Cow;

    fn relay(sql: &[u8]) -> Step<'static> {
        Step::Relay {
            kind: ResponseKind::Query,
            info: Cow::Owned(analyze(sql)),
        }
    }

    fn run(
        s: ClientSession,
        sql: &[u8],
        answers: Vec<Got>,
    ) -> (Vec<Step<'static>>, Script<'static>) {
        let mut t = Script::new(s, None);
        let mut command = vec![crate::mysql::consts::com::QUERY];
        command.extend_from_slice(sql);
        t.command = command;
        let mut q = Query::new(0, sql, false);
        let steps = t.run(&mut q, answers).to_vec();
        (steps, t)
    }

    #[test]
    fn a_select_borrows_sends_relays_and_gives_the_connection_back() {
        let sql = b"SELECT 1";
        let s = crate::session::testing::session(None);
        let (steps, t) = run(s, sql, vec![Got::Lent, Got::Sent, rows(status::AUTOCOMMIT)]);
        assert_eq!(
            steps,
            [
                Step::Borrow,
                Step::SendCommand,
                relay(sql),
                Step::CheckIn,
                Step::Done
            ]
        );
        assert!(t.held.is_none());
    }

    #[test]
    fn a_replay_that_cannot_be_refused_rides_ahead_of_the_statement() {
        let sql = b"SELECT @x";
        let mut s = crate::session::testing::session(None);
        s.state.user_vars.insert(b"x".to_vec(), UserValue::int("1"));
        let answers = vec![Got::Lent, Got::Sent, Got::Sent, Got::AheadDone, rows(2)];
        let (steps, _) = run(s, sql, answers);
        let [Step::Borrow, Step::SendQuery { sql: set, seq: 0 }, Step::SendCommand, Step::FinishAhead { .. }, relayed, Step::CheckIn, Step::Done] =
            &steps[..]
        else {
            panic!("{steps:?}");
        };
        assert!(set.starts_with(b"SET "));
        assert_eq!(*relayed, relay(sql));
    }

    #[test]
    fn an_assignment_is_read_back_in_the_same_round_trip() {
        let sql = b"SELECT @a := 1";
        let s = crate::session::testing::session(None);
        let answers = vec![Got::Lent, Got::Sent, Got::Sent, rows(2), Got::ReadBack];
        let (steps, _) = run(s, sql, answers);
        let [Step::Borrow, Step::SendCommand, Step::SendQuery { sql: rb, .. }, relayed, Step::ReadBack { sent: true, .. }, ..] =
            &steps[..]
        else {
            panic!("{steps:?}");
        };
        assert!(rb.starts_with(b"SELECT "));
        assert_eq!(*relayed, relay(sql));
        assert_eq!(steps.last(), Some(&Step::Done));
    }

    #[test]
    fn a_statement_that_finds_no_connection_is_dropped_and_refused() {
        let s = crate::session::testing::session(None);
        let busy = ErrPacket::new(errcode::PROXY_BORROW_TIMEOUT, "HY000", "busy");
        let answers = vec![Got::Refused(busy.clone()), Got::Dropped, Got::Told];
        let (steps, _) = run(s, b"SELECT 1", answers);
        assert_eq!(steps, testing::refused(&busy));
    }

    fn run_waiting(answers: Vec<Got>) -> (Vec<Step<'static>>, bool) {
        let s = crate::session::testing::session(None);
        let sql = b"SELECT a FROM t WHERE id = 1";
        let mut t = Script::new(s, None);
        let mut command = vec![crate::mysql::consts::com::QUERY];
        command.extend_from_slice(sql);
        t.command = command;
        let mut q = Query::new(0, sql, false);
        q.wait_first(b"SELECT MASTER_GTID_WAIT('0-1-5', 0.250)".to_vec());
        let steps = t.run(&mut q, answers).to_vec();
        (steps, q.rerouted())
    }

    #[test]
    fn a_causal_wait_rides_ahead_of_a_read_and_its_answer_comes_first() {
        let answers = vec![
            Got::Lent,
            Got::Sent,
            Got::Sent,
            Got::Waited(true),
            rows(status::AUTOCOMMIT),
        ];
        let (steps, rerouted) = run_waiting(answers);
        let [Step::Borrow, Step::SendWait { sql: wait, .. }, Step::SendCommand, Step::CausalWait { seq: 0 }, Step::Relay { .. }, Step::CheckIn, Step::Done] =
            &steps[..]
        else {
            panic!("{steps:?}");
        };
        assert!(wait.starts_with(b"SELECT MASTER_GTID_WAIT("));
        assert!(!rerouted);
    }

    #[test]
    fn a_reader_known_to_have_the_position_is_not_waited_on() {
        let answers = vec![
            Got::Lent,
            Got::WaitNeedless,
            Got::Sent,
            rows(status::AUTOCOMMIT),
        ];
        let (steps, rerouted) = run_waiting(answers);
        let [Step::Borrow, Step::SendWait { .. }, Step::SendCommand, Step::Relay { .. }, Step::CheckIn, Step::Done] =
            &steps[..]
        else {
            panic!("{steps:?}");
        };
        assert!(!rerouted);
    }

    #[test]
    fn a_wait_that_times_out_drops_the_stale_answer_and_sends_the_read_elsewhere() {
        let answers = vec![
            Got::Lent,
            Got::Sent,
            Got::Sent,
            Got::Waited(false),
            Got::Discarded,
        ];
        let (steps, rerouted) = run_waiting(answers);
        let [Step::Borrow, Step::SendWait { .. }, Step::SendCommand, Step::CausalWait { .. }, Step::DiscardAnswer {
            kind: ResponseKind::Query,
            ..
        }, Step::CheckIn, Step::Done] = &steps[..]
        else {
            panic!("{steps:?}");
        };
        assert!(rerouted, "nothing went to the client: served again");
    }

    #[test]
    fn a_transaction_keeps_its_connection_and_is_pinned() {
        let sql = b"BEGIN";
        let s = crate::session::testing::session(None);
        let ok = testing::ok(status::IN_TRANS | status::AUTOCOMMIT, 0);
        let (steps, t) = run(s, sql, vec![Got::Lent, Got::Sent, ok]);
        assert_eq!(
            steps,
            [Step::Borrow, Step::SendCommand, relay(sql), Step::Done]
        );
        assert!(t.held.is_some());
        assert_eq!(t.s.status & status::IN_TRANS, status::IN_TRANS);
    }
}
