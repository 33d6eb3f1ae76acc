//! A PostgreSQL client whose transaction was lost with its server connection (the server
//! died, a failover): the client is kept, in a failed transaction block, as if the
//! transaction had failed on the server. dbproxy answers it alone, as a server answers in
//! that state, until the client ends the transaction: every statement gets "current
//! transaction is aborted" (25P02), and `ROLLBACK` (or `COMMIT`, `END`, `ABORT`, which
//! roll back then) ends it. The client's next transaction goes to a server connection as
//! usual. Sans-IO: bytes in, answers out.

use super::pg_statements::ClientStatements;
use crate::postgres::frame::{message, put_cstr, write};
use crate::postgres::messages::{ready_for_query, ErrorResponse, TxStatus};

const IN_FAILED_TRANSACTION: &str = "25P02";
const MESSAGE: &str =
    "current transaction is aborted, commands ignored until end of transaction block";

/// Where the client's extended-protocol messages stand.
#[derive(Debug, Default)]
pub struct LostTransaction {
    /// An error was sent: messages are skipped up to the next Sync.
    skipping: bool,
    /// The unnamed statement (since the last Parse) ends the transaction.
    unnamed_ends: bool,
    /// The unnamed portal (since the last Bind) ends the transaction.
    portal_ends: bool,
    /// An Execute ended the transaction: the next Sync answers `I`.
    ended: bool,
    /// The error the first failing statement gets instead of 25P02: why the transaction
    /// was lost, when the client has not been told yet.
    untold: Option<String>,
}

/// What [`LostTransaction::answer`] did.
#[derive(Debug, PartialEq, Eq)]
pub struct Answered {
    /// Bytes of the input answered (whole messages).
    pub consumed: usize,
    /// The transaction is over: the rest of the input is served as usual.
    pub over: bool,
}

/// Whether `sql` ends a transaction block: `ROLLBACK`, `ABORT`, `COMMIT` or `END` (not
/// `ROLLBACK TO` a savepoint, nor the two-phase `... PREPARED`).
pub fn ends_transaction(sql: &[u8]) -> bool {
    let mut words = sql
        .split(|b| b.is_ascii_whitespace() || *b == b';')
        .filter(|w| !w.is_empty());
    let first = words.next().unwrap_or_default();
    let second = words.next().unwrap_or_default();
    let is = |w: &[u8], k: &str| w.eq_ignore_ascii_case(k.as_bytes());
    let exit = ["rollback", "abort", "commit", "end"]
        .iter()
        .any(|k| is(first, k));
    exit && !is(second, "to") && !is(second, "prepared") && words.next().is_none()
}

fn failed(out: &mut Vec<u8>, untold: &mut Option<String>) {
    match untold.take() {
        Some(why) => ErrorResponse {
            severity: "ERROR",
            code: crate::postgres::messages::sqlstate::CONNECTION_FAILURE,
            message: why.into(),
        }
        .write(out),
        None => ErrorResponse {
            severity: "ERROR",
            code: IN_FAILED_TRANSACTION,
            message: MESSAGE.into(),
        }
        .write(out),
    }
}

fn rolled_back(out: &mut Vec<u8>) {
    write(out, b'C', |o| put_cstr(o, b"ROLLBACK"));
}

fn split_cstr(b: &[u8]) -> (&[u8], &[u8]) {
    match b.iter().position(|&c| c == 0) {
        Some(i) => (
            b.get(..i).unwrap_or_default(),
            b.get(i + 1..).unwrap_or_default(),
        ),
        None => (b, &[]),
    }
}

impl LostTransaction {
    /// A transaction lost; `untold`: the loss's message, for the client's next statement
    /// (it had nothing in flight to fail with it).
    pub fn new(untold: Option<String>) -> LostTransaction {
        LostTransaction {
            untold,
            ..LostTransaction::default()
        }
    }

    /// Answers the whole messages at the start of `input` into `out`, up to the end of
    /// the transaction (a partial message waits for its rest).
    pub fn answer(
        &mut self,
        stmts: &mut ClientStatements,
        input: &[u8],
        out: &mut Vec<u8>,
    ) -> Answered {
        let mut at = 0;
        while let Ok(Some((h, body))) = message(input.get(at..).unwrap_or_default()) {
            at += h.total();
            match h.tag {
                b'S' => {
                    self.skipping = false;
                    let over = std::mem::take(&mut self.ended);
                    let status = if over {
                        TxStatus::Idle
                    } else {
                        TxStatus::Failed
                    };
                    ready_for_query(out, status);
                    if over {
                        return Answered { consumed: at, over };
                    }
                }
                b'Q' => {
                    let sql = split_cstr(body).0;
                    if ends_transaction(sql) {
                        rolled_back(out);
                        ready_for_query(out, TxStatus::Idle);
                        return Answered {
                            consumed: at,
                            over: true,
                        };
                    }
                    failed(out, &mut self.untold);
                    ready_for_query(out, TxStatus::Failed);
                }
                b'F' => {
                    failed(out, &mut self.untold);
                    ready_for_query(out, TxStatus::Failed);
                }
                // Flush, and COPY messages outside a COPY: nothing to answer.
                b'H' | b'd' | b'c' | b'f' => {}
                _ if self.skipping => {}
                b'P' => {
                    let (name, rest) = split_cstr(body);
                    if ends_transaction(split_cstr(rest).0) {
                        if name.is_empty() {
                            self.unnamed_ends = true;
                        } else {
                            stmts.define(name, rest);
                        }
                        write(out, b'1', |_| {});
                    } else {
                        self.fail(out);
                    }
                }
                b'B' => {
                    let (_portal, rest) = split_cstr(body);
                    let name = split_cstr(rest).0;
                    let ends = if name.is_empty() {
                        self.unnamed_ends
                    } else {
                        stmts.text_of(name).is_some_and(ends_transaction)
                    };
                    if ends {
                        self.portal_ends = true;
                        write(out, b'2', |_| {});
                    } else {
                        self.fail(out);
                    }
                }
                b'D' if self.portal_ends || self.unnamed_ends => {
                    if body.first() == Some(&b'S') {
                        // ParameterDescription: no parameters.
                        write(out, b't', |o| o.extend_from_slice(&0u16.to_be_bytes()));
                    }
                    write(out, b'n', |_| {});
                }
                b'E' if self.portal_ends => {
                    self.portal_ends = false;
                    self.ended = true;
                    rolled_back(out);
                }
                b'C' => {
                    if let (Some(b'S'), name) = (
                        body.first(),
                        split_cstr(body.get(1..).unwrap_or_default()).0,
                    ) {
                        stmts.forget(name);
                    }
                    write(out, b'3', |_| {});
                }
                _ => self.fail(out),
            }
        }
        Answered {
            consumed: at,
            over: false,
        }
    }

    /// An error for this message; the rest up to Sync is skipped.
    fn fail(&mut self, out: &mut Vec<u8>) {
        failed(out, &mut self.untold);
        self.skipping = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres::frame::msg;

    fn tags(out: &[u8]) -> String {
        let mut t = String::new();
        let mut at = 0;
        while let Ok(Some((h, body))) = message(&out[at..]) {
            t.push(h.tag as char);
            if h.tag == b'Z' {
                t.push(body[0] as char);
            }
            at += h.total();
        }
        t
    }

    #[test]
    fn the_words_that_end_a_transaction() {
        for sql in [
            "ROLLBACK",
            "rollback;",
            " COMMIT ",
            "END",
            "abort",
            "ROLLBACK WORK",
            "commit transaction",
        ] {
            assert!(ends_transaction(sql.as_bytes()), "{sql}");
        }
        for sql in [
            "ROLLBACK TO SAVEPOINT a",
            "ROLLBACK TO a",
            "COMMIT PREPARED 'x'",
            "SELECT 1",
            "ROLLBACK; SELECT 1",
            "",
        ] {
            assert!(!ends_transaction(sql.as_bytes()), "{sql}");
        }
    }

    #[test]
    fn statements_fail_until_a_rollback_ends_it() {
        let mut t = LostTransaction::new(Some("lost".into()));
        let mut stmts = ClientStatements::new(1);
        let mut out = Vec::new();
        let input = [
            msg(b'Q', b"INSERT INTO t VALUES (1)\0"),
            msg(b'Q', b"ROLLBACK TO SAVEPOINT a\0"),
            msg(b'Q', b"COMMIT\0"),
            msg(b'Q', b"SELECT 1\0"),
        ]
        .concat();
        let a = t.answer(&mut stmts, &input, &mut out);
        assert!(a.over);
        assert_eq!(a.consumed, input.len() - msg(b'Q', b"SELECT 1\0").len());
        assert_eq!(tags(&out), "EZEEZECZI");
        assert!(
            String::from_utf8_lossy(&out).contains("08006"),
            "the first error says why"
        );
        assert_eq!(String::from_utf8_lossy(&out).matches("25P02").count(), 1);
    }

    #[test]
    fn the_extended_protocol_fails_to_sync_and_a_prepared_rollback_ends_it() {
        let mut t = LostTransaction::default();
        let mut stmts = ClientStatements::new(1);
        let mut out = Vec::new();
        // pgjdbc: an update, then its ROLLBACK, each up to a Sync.
        let update = [
            msg(b'P', b"\0UPDATE t SET v = 1\0\0\0"),
            msg(b'B', b"\0\0\0\0\0\0\0\0"),
            msg(b'E', b"\0\0\0\0\0"),
            msg(b'S', b""),
        ]
        .concat();
        let a = t.answer(&mut stmts, &update, &mut out);
        assert_eq!((a.consumed, a.over), (update.len(), false));
        assert_eq!(tags(&out), "EZE");
        out.clear();
        let rollback = [
            msg(b'P', b"rb\0ROLLBACK\0\0\0"),
            msg(b'B', b"\0rb\0\0\0\0\0\0\0"),
            msg(b'D', b"P\0"),
            msg(b'E', b"\0\0\0\0\0"),
            msg(b'S', b""),
            msg(b'Q', b"SELECT 1\0"),
        ]
        .concat();
        let a = t.answer(&mut stmts, &rollback, &mut out);
        assert!(a.over);
        assert_eq!(a.consumed, rollback.len() - msg(b'Q', b"SELECT 1\0").len());
        assert_eq!(tags(&out), "12nCZI");
        assert_eq!(stmts.text_of(b"rb"), Some(&b"ROLLBACK"[..]));
        // A partial message waits.
        let mut t = LostTransaction::default();
        let q = msg(b'Q', b"ROLLBACK\0");
        let a = t.answer(&mut stmts, &q[..q.len() - 1], &mut out);
        assert_eq!((a.consumed, a.over), (0, false));
    }
}
