//! What a client's command packet is, and what kind of response it gets.

use super::consts::com;

/// The shape of the backend's response to a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseKind {
    /// No response at all (COM_QUIT, COM_STMT_CLOSE, COM_STMT_SEND_LONG_DATA).
    None,
    /// One packet: OK, ERR, EOF or (COM_STATISTICS) a bare string.
    Single,
    /// Text result sets, OK or ERR, possibly several (multi-statements), possibly a
    /// LOAD DATA LOCAL INFILE request.
    Query,
    /// Binary result sets from COM_STMT_EXECUTE (or MariaDB's bulk execute); with a cursor
    /// the rows come later through COM_STMT_FETCH.
    Execute,
    /// COM_STMT_PREPARE: OK_stmt, parameter definitions, column definitions.
    Prepare,
    /// COM_STMT_FETCH: binary rows up to a terminator.
    Fetch,
    /// COM_FIELD_LIST: column definitions up to a terminator.
    FieldList,
}

/// How dbproxy treats a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Forward to the backend and relay a response of this kind.
    Forward(ResponseKind),
    /// The client ends the session: answered by dbproxy, never forwarded.
    Quit,
    /// COM_CHANGE_USER: authenticated by dbproxy against its own users.
    ChangeUser,
    /// Not served through a proxy (replication, obsolete or unknown commands).
    Refuse,
}

/// Decides from the command byte.
pub fn classify(command: u8) -> Disposition {
    use Disposition::*;
    use ResponseKind as K;
    match command {
        com::QUIT => Quit,
        com::CHANGE_USER => ChangeUser,
        com::QUERY => Forward(K::Query),
        com::STMT_EXECUTE | com::STMT_BULK_EXECUTE => Forward(K::Execute),
        com::STMT_PREPARE => Forward(K::Prepare),
        com::STMT_FETCH => Forward(K::Fetch),
        com::FIELD_LIST => Forward(K::FieldList),
        com::PROCESS_INFO => Forward(K::Query),
        com::STMT_CLOSE | com::STMT_SEND_LONG_DATA => Forward(K::None),
        com::INIT_DB
        | com::PING
        | com::STMT_RESET
        | com::RESET_CONNECTION
        | com::SET_OPTION
        | com::STATISTICS
        | com::PROCESS_KILL
        | com::REFRESH
        | com::DEBUG
        | com::SHUTDOWN
        | com::CREATE_DB
        | com::DROP_DB => Forward(K::Single),
        _ => Refuse,
    }
}

/// Whether a command may change the connection's default database in a way dbproxy cannot
/// see from the reply: COM_QUERY text that could contain a `USE` statement, checked
/// conservatively (the word `use` anywhere, even inside a string or a comment).
pub fn may_change_database(payload: &[u8]) -> bool {
    match payload.first() {
        Some(&com::QUERY) => contains_word(&payload[1..], b"use"),
        Some(&com::DROP_DB) => true,
        _ => false,
    }
}

fn is_ident_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

/// Whether `word` occurs (ASCII case-insensitively) as a whole word in `text`.
fn contains_word(text: &[u8], word: &[u8]) -> bool {
    text.windows(word.len()).enumerate().any(|(i, w)| {
        w.eq_ignore_ascii_case(word)
            && (i == 0 || !is_ident_byte(text[i - 1]))
            && text.get(i + word.len()).is_none_or(|&b| !is_ident_byte(b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        assert_eq!(
            classify(com::QUERY),
            Disposition::Forward(ResponseKind::Query)
        );
        assert_eq!(
            classify(com::STMT_CLOSE),
            Disposition::Forward(ResponseKind::None)
        );
        assert_eq!(classify(com::QUIT), Disposition::Quit);
        assert_eq!(classify(0x12), Disposition::Refuse); // COM_BINLOG_DUMP
        assert_eq!(classify(0xee), Disposition::Refuse);
    }

    #[test]
    fn database_change_detection() {
        assert!(may_change_database(b"\x03USE shop"));
        assert!(may_change_database(b"\x03select 1; use `x`"));
        assert!(may_change_database(b"\x03/*!40000 USE`x`*/"));
        assert!(may_change_database(b"\x03SELECT 'use'")); // conservative
        assert!(!may_change_database(
            b"\x03SELECT user(), reuse, users FROM t"
        ));
        assert!(!may_change_database(b"\x03SELECT 1"));
        assert!(!may_change_database(b"\x02shop"));
        assert!(!may_change_database(b""));
    }
}
