//! The pins a prepared statement's own commands start and end: a cursor open on the
//! connection (COM_STMT_EXECUTE with a cursor, read with COM_STMT_FETCH) and long data
//! sent ahead of an execute (COM_STMT_SEND_LONG_DATA). Both live on one database
//! connection, which the client keeps until they end.

use super::pins::PinReason;
use super::{ClientSession, Outcome, PinChanges};
use crate::mysql::consts::status;

impl ClientSession {
    /// Whether statement `cid` has a cursor open (a fetch from it can be served).
    pub fn has_cursor(&self, cid: u32) -> bool {
        self.cursor == Some(cid)
    }

    /// Long data for statement `cid` went to the connection: kept until the statement
    /// executes, is reset or is closed.
    pub fn long_data_sent(&mut self, cid: u32) -> PinChanges {
        self.long_data = Some(cid);
        self.pin(PinReason::LongData, true)
    }

    /// Statement `cid` executed: its long data was used up; the cursor it asked for
    /// (`cursor`) is open if the server says one exists.
    pub fn executed(&mut self, cid: u32, cursor: bool, outcome: &Outcome) -> PinChanges {
        let mut c = self.end_long_data(cid);
        let opened = cursor && !outcome.failed() && Self::flag(outcome, status::CURSOR_EXISTS);
        if opened {
            self.cursor = Some(cid);
            c.merge_one(self.pin(PinReason::Cursor, true));
        }
        c
    }

    /// A fetch was answered: the cursor ends with an error, with its last row, or when
    /// the server no longer has it.
    pub fn fetched(&mut self, outcome: &Outcome) -> PinChanges {
        let ended = outcome.failed()
            || Self::flag(outcome, status::LAST_ROW_SENT)
            || !Self::flag(outcome, status::CURSOR_EXISTS);
        if !ended {
            return PinChanges::default();
        }
        self.cursor = None;
        self.pin(PinReason::Cursor, false)
    }

    /// COM_STMT_RESET of statement `cid`: its cursor and its long data end.
    pub fn statement_reset(&mut self, cid: u32) -> PinChanges {
        let mut c = self.end_cursor(cid);
        c.merge_one(self.end_long_data(cid));
        c
    }

    /// COM_STMT_CLOSE of statement `cid`: its long data ends, and its cursor, which the
    /// driver closes on the connection first when `true` is returned.
    pub fn statement_closed(&mut self, cid: u32) -> (bool, PinChanges) {
        let had_cursor = self.has_cursor(cid);
        let mut c = self.end_long_data(cid);
        c.merge_one(self.end_cursor(cid));
        (had_cursor, c)
    }

    fn end_cursor(&mut self, cid: u32) -> PinChanges {
        if self.cursor != Some(cid) {
            return PinChanges::default();
        }
        self.cursor = None;
        self.pin(PinReason::Cursor, false)
    }

    fn end_long_data(&mut self, cid: u32) -> PinChanges {
        if self.long_data != Some(cid) {
            return PinChanges::default();
        }
        self.long_data = None;
        self.pin(PinReason::LongData, false)
    }

    fn pin(&mut self, r: PinReason, start: bool) -> PinChanges {
        let mut c = PinChanges::default();
        if start && self.pins.start(r) {
            c.started.push(r);
        } else if !start && self.pins.end(r) {
            c.ended.push(r);
        }
        c
    }

    fn flag(outcome: &Outcome, flag: u16) -> bool {
        outcome.status.unwrap_or(0) & flag != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::diag::Ending;

    fn session() -> ClientSession {
        crate::session::testing::session(None)
    }

    fn ok(flags: u16) -> Outcome {
        Outcome {
            ending: Ending::Ok {
                affected: 0,
                warnings: 0,
            },
            status: Some(flags),
        }
    }

    const ERR: Outcome = Outcome {
        ending: Ending::Err,
        status: None,
    };

    #[test]
    fn a_cursor_pins_until_its_last_row() {
        let mut s = session();
        let c = s.executed(1, true, &ok(status::CURSOR_EXISTS));
        assert_eq!(c.started, vec![PinReason::Cursor]);
        assert!(s.has_cursor(1) && !s.releasable());
        assert_eq!(s.fetched(&ok(status::CURSOR_EXISTS)), PinChanges::default());
        let c = s.fetched(&ok(status::CURSOR_EXISTS | status::LAST_ROW_SENT));
        assert_eq!(c.ended, vec![PinReason::Cursor]);
        assert!(!s.has_cursor(1) && s.releasable());
    }

    #[test]
    fn a_cursor_the_server_did_not_open_pins_nothing() {
        let mut s = session();
        assert_eq!(s.executed(1, true, &ok(0)), PinChanges::default());
        assert_eq!(s.executed(1, true, &ERR), PinChanges::default());
        assert_eq!(
            s.executed(1, false, &ok(status::CURSOR_EXISTS)),
            PinChanges::default(),
            "not asked for"
        );
        assert!(s.releasable());
    }

    #[test]
    fn a_failed_fetch_or_a_vanished_cursor_ends_it() {
        for end in [ERR, ok(0)] {
            let mut s = session();
            s.executed(1, true, &ok(status::CURSOR_EXISTS));
            assert_eq!(s.fetched(&end).ended, vec![PinReason::Cursor]);
            assert!(s.releasable());
        }
    }

    #[test]
    fn long_data_pins_until_the_execute_reset_or_close() {
        let mut s = session();
        assert_eq!(s.long_data_sent(2).started, vec![PinReason::LongData]);
        assert!(!s.releasable());
        assert_eq!(
            s.executed(2, false, &ok(0)).ended,
            vec![PinReason::LongData]
        );
        assert!(s.releasable());
        s.long_data_sent(2);
        assert_eq!(s.statement_reset(3), PinChanges::default(), "another one");
        assert_eq!(s.statement_reset(2).ended, vec![PinReason::LongData]);
        s.long_data_sent(2);
        assert_eq!(
            s.statement_closed(2),
            (
                false,
                PinChanges {
                    started: vec![],
                    ended: vec![PinReason::LongData]
                }
            )
        );
    }

    #[test]
    fn closing_a_statement_with_a_cursor_asks_for_it_to_be_closed() {
        let mut s = session();
        s.executed(4, true, &ok(status::CURSOR_EXISTS));
        let (close, c) = s.statement_closed(4);
        assert!(close);
        assert_eq!(c.ended, vec![PinReason::Cursor]);
        assert!(!s.statement_closed(4).0);
        s.executed(4, true, &ok(status::CURSOR_EXISTS));
        assert_eq!(s.statement_reset(4).ended, vec![PinReason::Cursor]);
        assert!(s.releasable());
    }
}
