//! The round trip of a client's statement, decided before anything is sent: the text
//! that goes instead of the client's (a rewrite, or the query whose answer carries the
//! client's own conditions), how its answer reaches the client (streamed, or collected
//! and changed), and whether the read-back after it rides in the same round trip. The
//! driver sends and relays in that order (a replay ahead, the statement, the read-back);
//! nothing here reads or writes.

use super::diag::Answer;
use super::sql::SqlInfo;
use super::ReadBack;

/// What is sent for the statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Text {
    /// The client's own command, as it came.
    Client,
    /// This query text instead (the client's command is dropped).
    Replace(Vec<u8>),
}

/// How the statement's answer reaches the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Relay {
    /// Streamed as it comes.
    Stream,
    /// Collected, and its single row's values replaced by the client's own.
    PatchRow(Vec<Vec<u8>>),
    /// Collected, with the client's own conditions as its rows.
    Splice(Vec<Vec<u8>>),
}

/// A statement's round trip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub text: Text,
    pub relay: Relay,
    /// The read-back after the statement, if any.
    pub read_back: Option<ReadBack>,
    /// The read-back is sent right behind the statement, in the same round trip;
    /// otherwise it goes once the statement's answer is in.
    pub pipelined: bool,
    /// The text was rewritten: the counts the server reports for it are not the client's.
    pub counts_stale: bool,
}

/// Plans a statement with `info`, answered as the client's diagnostics say (`answer`,
/// already past [`Answer::Capture`]), with `read_back` after it.
pub fn plan(answer: Answer, info: &SqlInfo, read_back: Option<ReadBack>) -> Plan {
    let (text, relay, counts_stale) = match answer {
        Answer::Rewrite(sql) => (Text::Replace(sql), Relay::Stream, true),
        Answer::Splice { query, rows } => (
            Text::Replace(query.as_bytes().to_vec()),
            Relay::Splice(rows),
            false,
        ),
        Answer::PatchRow(values) => (Text::Client, Relay::PatchRow(values), false),
        Answer::Forward | Answer::Capture => (Text::Client, Relay::Stream, false),
    };
    // Nothing rides behind LOAD DATA (the server may ask for a local file), behind an
    // answer that is collected and spliced, or a read-back that names tables (it could
    // fail on the statement's own changes to them).
    let pipelined = !info.load_data
        && !matches!(relay, Relay::Splice(_))
        && !read_back.as_ref().is_some_and(ReadBack::names_tables);
    Plan {
        text,
        relay,
        read_back,
        pipelined,
        counts_stale,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::sql::analyze;

    fn read_back(sql: &[u8]) -> Option<ReadBack> {
        ReadBack::for_statement(&analyze(sql), false)
    }

    #[test]
    fn a_plain_statement_streams_with_its_read_back_behind_it() {
        let sql: &[u8] = b"SELECT @a := 1";
        let rb = read_back(sql);
        assert!(rb.is_some(), "a user variable set in a SELECT is read back");
        let p = plan(Answer::Forward, &analyze(sql), rb.clone());
        assert_eq!(
            p,
            Plan {
                text: Text::Client,
                relay: Relay::Stream,
                read_back: rb,
                pipelined: true,
                counts_stale: false,
            }
        );
    }

    #[test]
    fn a_rewrite_goes_instead_and_its_counts_are_not_the_clients() {
        let p = plan(
            Answer::Rewrite(b"SELECT 3".to_vec()),
            &analyze(b"SELECT ROW_COUNT()"),
            None,
        );
        assert_eq!(p.text, Text::Replace(b"SELECT 3".to_vec()));
        assert!(p.counts_stale && p.relay == Relay::Stream);
    }

    #[test]
    fn a_spliced_answer_is_collected_and_nothing_rides_behind_it() {
        let rows = vec![b"row".to_vec()];
        let p = plan(
            Answer::Splice {
                query: "SHOW WARNINGS LIMIT 0",
                rows: rows.clone(),
            },
            &analyze(b"SHOW WARNINGS"),
            read_back(b"SELECT @a := 1"),
        );
        assert_eq!(p.text, Text::Replace(b"SHOW WARNINGS LIMIT 0".to_vec()));
        assert_eq!(p.relay, Relay::Splice(rows));
        assert!(!p.pipelined);
        let p = plan(
            Answer::PatchRow(vec![b"7".to_vec()]),
            &analyze(b"SELECT @a"),
            None,
        );
        assert_eq!(
            (p.text, p.relay),
            (Text::Client, Relay::PatchRow(vec![b"7".to_vec()]))
        );
    }

    #[test]
    fn nothing_rides_behind_load_data() {
        let sql: &[u8] = b"LOAD DATA LOCAL INFILE 'f' INTO TABLE t SET c = @a := 1";
        let p = plan(Answer::Forward, &analyze(sql), read_back(sql));
        assert!(!p.pipelined);
    }
}
