//! Which statements a split endpoint may send to a reader: a conservative reading of the
//! text. Only a single `SELECT` (or `WITH ... SELECT`, or one in parentheses) that locks
//! nothing, writes nothing (no `INTO`, no `:=`, no sequence), leaves no per-connection
//! state behind (`SQL_CALC_FOUND_ROWS`, `LAST_INSERT_ID()`, locks) and reads no state only
//! the writer's connection has is a read. Anything dbproxy cannot prove is a write.

use crate::session::sql::{Kind, Tok, Tokens};

/// What a statement is, for routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Reads only. `pure`: every function it calls is a built-in known to have no side
    /// effects (a stored function might write: such a read goes to the writer unless a
    /// `/* dbproxy:reader */` hint says otherwise).
    Read { pure: bool },
    /// `START TRANSACTION READ ONLY`: the transaction may run on a reader.
    ReadOnlyTransaction,
    /// Changes only the session (`SET` without subqueries or function calls, `USE`,
    /// `BEGIN`, `ROLLBACK`): not a write of data.
    Session,
    /// May write, lock, or depend on the writer's connection.
    Write,
}

/// A routing hint in a comment: `/* dbproxy:writer */`, `/* dbproxy:reader */`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hint {
    Writer,
    Reader,
}

/// The first routing hint in the statement's comments (quoted text is passed over).
pub fn hint(sql: &[u8]) -> Option<Hint> {
    let mut i = 0;
    while let Some(&c) = sql.get(i) {
        match c {
            b'\'' | b'"' | b'`' => {
                i += 1;
                while let Some(&d) = sql.get(i) {
                    i += 1;
                    if d == b'\\' && c != b'`' {
                        i += 1;
                    } else if d == c {
                        break;
                    }
                }
            }
            b'/' if sql.get(i + 1) == Some(&b'*') => {
                let body = sql.get(i + 2..).unwrap_or_default();
                let end = find(body, b"*/").unwrap_or(body.len());
                let text = body.get(..end).unwrap_or_default().trim_ascii();
                if text.eq_ignore_ascii_case(b"dbproxy:writer") {
                    return Some(Hint::Writer);
                }
                if text.eq_ignore_ascii_case(b"dbproxy:reader") {
                    return Some(Hint::Reader);
                }
                i += 2 + end + 2;
            }
            _ => i += 1,
        }
    }
    None
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Built-in functions that read per-connection state a reader's connection does not have,
/// take locks, wait, or write: a statement that calls one goes to the writer.
const WRITER_FUNCTIONS: &[&str] = &[
    "LAST_INSERT_ID",
    "FOUND_ROWS",
    "ROW_COUNT",
    "GET_LOCK",
    "RELEASE_LOCK",
    "RELEASE_ALL_LOCKS",
    "IS_FREE_LOCK",
    "IS_USED_LOCK",
    "MASTER_POS_WAIT",
    "MASTER_GTID_WAIT",
    "SOURCE_POS_WAIT",
    "WAIT_FOR_EXECUTED_GTID_SET",
    "NEXTVAL",
    "LASTVAL",
    "SETVAL",
    "CONNECTION_ID",
    "SLEEP",
    "BENCHMARK",
    "LOAD_FILE",
    "SYS_EXEC",
];

/// Built-in functions without side effects (the common ones; any other name may be a
/// stored function).
const PURE_FUNCTIONS: &[&str] = &[
    "ABS",
    "ACOS",
    "ADDDATE",
    "ADDTIME",
    "AES_DECRYPT",
    "AES_ENCRYPT",
    "ASCII",
    "ASIN",
    "ATAN",
    "ATAN2",
    "AVG",
    "BIN",
    "BIT_AND",
    "BIT_COUNT",
    "BIT_LENGTH",
    "BIT_OR",
    "BIT_XOR",
    "CAST",
    "CEIL",
    "CEILING",
    "CHAR",
    "CHARSET",
    "CHAR_LENGTH",
    "CHARACTER_LENGTH",
    "COALESCE",
    "COERCIBILITY",
    "COLLATION",
    "COMPRESS",
    "CONCAT",
    "CONCAT_WS",
    "CONV",
    "CONVERT",
    "CONVERT_TZ",
    "COS",
    "COT",
    "COUNT",
    "CRC32",
    "CUME_DIST",
    "CURDATE",
    "CURRENT_DATE",
    "CURRENT_TIME",
    "CURRENT_TIMESTAMP",
    "CURRENT_USER",
    "CURTIME",
    "DATABASE",
    "DATE",
    "DATEDIFF",
    "DATE_ADD",
    "DATE_FORMAT",
    "DATE_SUB",
    "DAY",
    "DAYNAME",
    "DAYOFMONTH",
    "DAYOFWEEK",
    "DAYOFYEAR",
    "DECODE",
    "DEGREES",
    "DENSE_RANK",
    "ELT",
    "ENCODE",
    "EXP",
    "EXPORT_SET",
    "EXTRACT",
    "FIELD",
    "FIND_IN_SET",
    "FIRST_VALUE",
    "FLOOR",
    "FORMAT",
    "FROM_BASE64",
    "FROM_DAYS",
    "FROM_UNIXTIME",
    "GREATEST",
    "GROUP_CONCAT",
    "HEX",
    "HOUR",
    "IF",
    "IFNULL",
    "INET_ATON",
    "INET_NTOA",
    "INET6_ATON",
    "INET6_NTOA",
    "INSERT",
    "INSTR",
    "ISNULL",
    "JSON_ARRAY",
    "JSON_ARRAYAGG",
    "JSON_CONTAINS",
    "JSON_CONTAINS_PATH",
    "JSON_EXTRACT",
    "JSON_KEYS",
    "JSON_LENGTH",
    "JSON_OBJECT",
    "JSON_OBJECTAGG",
    "JSON_QUOTE",
    "JSON_SEARCH",
    "JSON_TABLE",
    "JSON_TYPE",
    "JSON_UNQUOTE",
    "JSON_VALID",
    "JSON_VALUE",
    "LAG",
    "LAST_DAY",
    "LAST_VALUE",
    "LCASE",
    "LEAD",
    "LEAST",
    "LEFT",
    "LENGTH",
    "LN",
    "LOCALTIME",
    "LOCALTIMESTAMP",
    "LOCATE",
    "LOG",
    "LOG10",
    "LOG2",
    "LOWER",
    "LPAD",
    "LTRIM",
    "MAKEDATE",
    "MAKETIME",
    "MAKE_SET",
    "MATCH",
    "MAX",
    "MD5",
    "MICROSECOND",
    "MID",
    "MIN",
    "MINUTE",
    "MOD",
    "MONTH",
    "MONTHNAME",
    "NOW",
    "NTILE",
    "NULLIF",
    "OCT",
    "OCTET_LENGTH",
    "ORD",
    "PERCENT_RANK",
    "PERIOD_ADD",
    "PERIOD_DIFF",
    "PI",
    "POSITION",
    "POW",
    "POWER",
    "QUARTER",
    "QUOTE",
    "RADIANS",
    "RAND",
    "RANK",
    "REGEXP_INSTR",
    "REGEXP_REPLACE",
    "REGEXP_SUBSTR",
    "REPEAT",
    "REPLACE",
    "REVERSE",
    "RIGHT",
    "ROUND",
    "ROW_NUMBER",
    "RPAD",
    "RTRIM",
    "SCHEMA",
    "SECOND",
    "SEC_TO_TIME",
    "SESSION_USER",
    "SHA",
    "SHA1",
    "SHA2",
    "SIGN",
    "SIN",
    "SOUNDEX",
    "SPACE",
    "SQRT",
    "STD",
    "STDDEV",
    "STDDEV_POP",
    "STDDEV_SAMP",
    "STRCMP",
    "STR_TO_DATE",
    "SUBDATE",
    "SUBSTR",
    "SUBSTRING",
    "SUBSTRING_INDEX",
    "SUBTIME",
    "SUM",
    "SYSDATE",
    "SYSTEM_USER",
    "TAN",
    "TIME",
    "TIMEDIFF",
    "TIMESTAMP",
    "TIMESTAMPADD",
    "TIMESTAMPDIFF",
    "TIME_FORMAT",
    "TIME_TO_SEC",
    "TO_BASE64",
    "TO_DAYS",
    "TO_SECONDS",
    "TRIM",
    "TRUNCATE",
    "UCASE",
    "UNCOMPRESS",
    "UNHEX",
    "UNIX_TIMESTAMP",
    "UPPER",
    "USER",
    "UTC_DATE",
    "UTC_TIME",
    "UTC_TIMESTAMP",
    "UUID",
    "VARIANCE",
    "VAR_POP",
    "VAR_SAMP",
    "VERSION",
    "WEEK",
    "WEEKDAY",
    "WEEKOFYEAR",
    "YEAR",
    "YEARWEEK",
];

/// Words that take parentheses without being a function call.
const NOT_CALLS: &[&str] = &[
    "ALL",
    "AND",
    "ANY",
    "AS",
    "BETWEEN",
    "BY",
    "CASE",
    "DISTINCT",
    "ELSE",
    "EXISTS",
    "FROM",
    "HAVING",
    "IN",
    "INTERVAL",
    "IS",
    "JOIN",
    "LATERAL",
    "LIKE",
    "NOT",
    "ON",
    "OR",
    "OVER",
    "RECURSIVE",
    "ROW",
    "SELECT",
    "SOME",
    "THEN",
    "UNION",
    "EXCEPT",
    "INTERSECT",
    "USING",
    "VALUES",
    "WHEN",
    "WHERE",
    "WITH",
    "XOR",
    "WINDOW",
    "PARTITION",
    "USE",
    "FORCE",
    "IGNORE",
    "KEY",
    "INDEX",
    "LIMIT",
    "OFFSET",
    "DIV",
    "REGEXP",
    "RLIKE",
    "ESCAPE",
    "SOUNDS",
];

/// System variables whose value belongs to the writer's connection, to one server's
/// replication state, or to the writer's role (a client reads `@@read_only` to learn
/// whether it reached a writer; a split endpoint is one).
const WRITER_VARIABLES: &[&str] = &[
    "read_only",
    "innodb_read_only",
    "super_read_only",
    "last_insert_id",
    "identity",
    "insert_id",
    "warning_count",
    "error_count",
    "last_gtid",
    "gtid_current_pos",
    "gtid_binlog_pos",
    "gtid_slave_pos",
    "gtid_executed",
    "dbproxy_causal_position",
];

fn word_is(sql: &[u8], t: &Tok, w: &str) -> bool {
    t.kind == Kind::Word
        && sql
            .get(t.start..t.end)
            .is_some_and(|b| b.eq_ignore_ascii_case(w.as_bytes()))
}

fn word_in(sql: &[u8], t: &Tok, list: &[&str]) -> bool {
    t.kind == Kind::Word
        && sql
            .get(t.start..t.end)
            .is_some_and(|b| list.iter().any(|w| b.eq_ignore_ascii_case(w.as_bytes())))
}

/// The statement's class (see [`Class`]).
pub fn classify(sql: &[u8]) -> Class {
    let mut prev: Option<Tok> = None;
    let mut prev2: Option<Tok> = None;
    let mut first: Option<Tok> = None;
    let mut lead = Lead::Unknown;
    let mut pure = true;
    let mut ended = false;
    let mut parens_seen = false;
    for t in Tokens::new(sql) {
        if ended {
            // A second statement.
            return Class::Write;
        }
        if t.kind == Kind::Punct(b';') {
            ended = true;
            continue;
        }
        if first.is_none() {
            if t.kind == Kind::Punct(b'(') {
                // `(SELECT ...)`: decided by the first word.
                continue;
            }
            first = Some(t);
            lead = Lead::of(sql, &t);
            if lead == Lead::Other {
                return Class::Write;
            }
        }
        match t.kind {
            Kind::Assign => return Class::Write,
            Kind::SysVar => {
                let name = sql.get(t.start + 2..t.end).unwrap_or_default();
                let (scope, name) = match name.iter().rposition(|b| *b == b'.') {
                    Some(dot) => (
                        name.get(..dot).unwrap_or_default(),
                        name.get(dot + 1..).unwrap_or_default(),
                    ),
                    None => (&b""[..], name),
                };
                // `@@global.x`: the server's own value, which for this endpoint is the
                // writer's (a reader's may differ).
                if scope.eq_ignore_ascii_case(b"global")
                    || WRITER_VARIABLES
                        .iter()
                        .any(|v| name.eq_ignore_ascii_case(v.as_bytes()))
                {
                    return Class::Write;
                }
            }
            Kind::Punct(b'(') => {
                parens_seen = true;
                if let Some(p) = prev.filter(|p| p.kind == Kind::Word || p.kind == Kind::Ident) {
                    let qualified = prev2.is_some_and(|q| q.kind == Kind::Punct(b'.'));
                    if qualified || p.kind == Kind::Ident {
                        // `db.f(...)` or `` `f`(...) ``: a stored function.
                        pure = false;
                    } else if word_in(sql, &p, WRITER_FUNCTIONS) {
                        return Class::Write;
                    } else if !word_in(sql, &p, PURE_FUNCTIONS) && !word_in(sql, &p, NOT_CALLS) {
                        pure = false;
                    }
                }
            }
            Kind::Punct(b'.')
                if prev.is_some_and(|p| {
                    matches!(p.kind, Kind::Word | Kind::Ident)
                        && sql
                            .get(p.start..p.end)
                            .is_some_and(|name| server_local_schema(unquote(name)))
                }) =>
            {
                return Class::Write;
            }
            Kind::Word => {
                if word_is(sql, &t, "INTO") || word_is(sql, &t, "SQL_CALC_FOUND_ROWS") {
                    return Class::Write;
                }
                if let Some(p) = prev {
                    // FOR UPDATE, FOR SHARE, LOCK IN SHARE MODE, NEXT/PREVIOUS VALUE FOR.
                    if word_is(sql, &p, "FOR")
                        && (word_is(sql, &t, "UPDATE") || word_is(sql, &t, "SHARE"))
                    {
                        return Class::Write;
                    }
                    if word_is(sql, &p, "LOCK") && word_is(sql, &t, "IN") {
                        return Class::Write;
                    }
                    if word_is(sql, &p, "VALUE") && word_is(sql, &t, "FOR") {
                        return Class::Write;
                    }
                }
                if lead == Lead::With
                    && word_in(sql, &t, &["UPDATE", "DELETE", "INSERT", "REPLACE"])
                {
                    return Class::Write;
                }
                if lead == Lead::Start && word_is(sql, &t, "WRITE") {
                    return Class::Write;
                }
            }
            _ => {}
        }
        prev2 = prev;
        prev = Some(t);
    }
    match lead {
        Lead::Select | Lead::With => Class::Read { pure },
        Lead::Start => {
            // START TRANSACTION [READ ONLY | READ WRITE | WITH CONSISTENT SNAPSHOT].
            if has_pair(sql, "READ", "ONLY") {
                Class::ReadOnlyTransaction
            } else {
                Class::Session
            }
        }
        Lead::Session if !parens_seen => Class::Session,
        Lead::Session | Lead::Unknown | Lead::Other => Class::Write,
    }
}

/// How the statement begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lead {
    Unknown,
    Select,
    With,
    /// START TRANSACTION
    Start,
    /// SET, USE, BEGIN, ROLLBACK
    Session,
    Other,
}

impl Lead {
    fn of(sql: &[u8], t: &Tok) -> Lead {
        if word_is(sql, t, "SELECT") {
            Lead::Select
        } else if word_is(sql, t, "WITH") {
            Lead::With
        } else if word_is(sql, t, "START") {
            Lead::Start
        } else if word_in(sql, t, &["SET", "USE", "BEGIN", "ROLLBACK"]) {
            Lead::Session
        } else {
            Lead::Other
        }
    }
}

/// A schema whose tables describe the server answering, not the replicated data (its
/// connections, status, locks and transactions): a read of it is about the writer.
pub fn server_local_schema(name: &[u8]) -> bool {
    ["information_schema", "performance_schema", "sys"]
        .iter()
        .any(|s| name.eq_ignore_ascii_case(s.as_bytes()))
}

/// An identifier without its backquotes.
fn unquote(name: &[u8]) -> &[u8] {
    name.strip_prefix(b"`")
        .and_then(|n| n.strip_suffix(b"`"))
        .unwrap_or(name)
}

/// Whether the word `a` is followed by the word `b` somewhere in the statement.
fn has_pair(sql: &[u8], a: &str, b: &str) -> bool {
    let mut prev: Option<Tok> = None;
    Tokens::new(sql).any(|t| {
        let found = prev.is_some_and(|p| word_is(sql, &p, a)) && word_is(sql, &t, b);
        prev = Some(t);
        found
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(sql: &str) -> Class {
        classify(sql.as_bytes())
    }

    const PURE: Class = Class::Read { pure: true };

    #[test]
    fn plain_reads_are_reads() {
        for sql in [
            "SELECT 1",
            "select @@server_id",
            "SELECT @@session.time_zone, @@max_allowed_packet",
            "SELECT id, name FROM t WHERE id IN (1, 2) ORDER BY id LIMIT 10",
            "  (SELECT COUNT(*) FROM t) UNION (SELECT MAX(id) FROM u)",
            "WITH x AS (SELECT 1 AS a) SELECT a FROM x",
            "SELECT c FROM sbtest1 WHERE id BETWEEN 5 AND 10;",
            "SELECT * FROM t JOIN u ON (t.id = u.id) WHERE EXISTS (SELECT 1 FROM v)",
            "SELECT @a, CONCAT('x', UPPER(name)) FROM t",
            "SELECT 'FOR UPDATE', \"INTO\" FROM t",
            "SELECT /* INTO */ 1 -- FOR UPDATE",
        ] {
            assert_eq!(c(sql), PURE, "{sql}");
        }
    }

    #[test]
    fn locks_writes_and_connection_state_go_to_the_writer() {
        for sql in [
            "SELECT * FROM t FOR UPDATE",
            "SELECT * FROM t WHERE id = 1 FOR SHARE",
            "SELECT * FROM t LOCK IN SHARE MODE",
            "SELECT LAST_INSERT_ID()",
            "SELECT FOUND_ROWS()",
            "SELECT SQL_CALC_FOUND_ROWS * FROM t LIMIT 1",
            "SELECT GET_LOCK('a', 0)",
            "SELECT RELEASE_LOCK('a')",
            "SELECT @a := 1",
            "SELECT id INTO @x FROM t",
            "SELECT * FROM t INTO OUTFILE '/tmp/x'",
            "SELECT NEXT VALUE FOR s",
            "SELECT NEXTVAL(s)",
            "SELECT @@last_insert_id",
            "SELECT @@session.warning_count",
            "SELECT @@gtid_current_pos",
            "SELECT @@read_only",
            "SELECT @@global.innodb_read_only",
            "SELECT @@GLOBAL.max_connections",
            "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = 'app'",
            "SELECT * FROM `performance_schema`.threads",
            "SELECT * FROM sys.session",
            "SELECT 1; SELECT 2",
            "INSERT INTO t VALUES (1)",
            "UPDATE t SET a = 1",
            "DELETE FROM t",
            "CREATE TEMPORARY TABLE x (a INT)",
            "SHOW SLAVE STATUS",
            "CALL p()",
            "DO 1",
            "WITH x AS (SELECT 1) UPDATE t SET a = 1",
            "SET @x = (SELECT 1)",
            "SET @x = f()",
            "START TRANSACTION READ WRITE",
            "SELECT CONNECTION_ID()",
            "SELECT SLEEP(1)",
        ] {
            assert_eq!(c(sql), Class::Write, "{sql}");
        }
    }

    #[test]
    fn stored_functions_are_not_known_to_be_pure() {
        for sql in [
            "SELECT f(1)",
            "SELECT shop.f(1) FROM t",
            "SELECT `f`(1)",
            "SELECT COUNT(*) FROM t WHERE my_func(id) > 0",
        ] {
            assert_eq!(c(sql), Class::Read { pure: false }, "{sql}");
        }
    }

    #[test]
    fn session_statements_and_read_only_transactions() {
        for sql in [
            "SET NAMES utf8mb4",
            "SET @x = 1",
            "SET autocommit = 1",
            "USE shop",
            "BEGIN",
            "START TRANSACTION",
            "ROLLBACK",
        ] {
            assert_eq!(c(sql), Class::Session, "{sql}");
        }
        assert_eq!(c("START TRANSACTION READ ONLY"), Class::ReadOnlyTransaction);
        assert_eq!(
            c("start transaction read only, with consistent snapshot"),
            Class::ReadOnlyTransaction
        );
    }

    #[test]
    fn hints() {
        assert_eq!(hint(b"/* dbproxy:writer */ SELECT 1"), Some(Hint::Writer));
        assert_eq!(hint(b"SELECT /*dbproxy:reader*/ 1"), Some(Hint::Reader));
        assert_eq!(
            hint(b"/* other */ SELECT /* DBPROXY:READER */ 1"),
            Some(Hint::Reader)
        );
        assert_eq!(hint(b"SELECT 1 /* dbproxy:"), None);
        assert_eq!(hint(b"SELECT '/* dbproxy:reader */'"), None);
        assert_eq!(
            hint(b"SELECT 'it''s' /* dbproxy:writer */"),
            Some(Hint::Writer)
        );
        assert_eq!(hint(b"SELECT 1"), None);
    }

    #[test]
    fn hostile_text_is_never_a_read_by_accident() {
        let mut rng = crate::test_rng::Rng(7);
        let words: &[&[u8]] = &[
            b"SELECT ", b"(", b")", b"'", b"/*", b"*/", b"@@", b"FOR ", b";",
        ];
        for _ in 0..20_000 {
            let mut bytes = rng.bytes(40);
            let k = (rng.next() % words.len() as u64) as usize;
            bytes.splice(0..0, words[k].iter().copied());
            let _ = classify(&bytes);
            let _ = hint(&bytes);
        }
    }
}
