//! `KILL` statements: dbproxy answers them itself, since the ids clients know are the ones
//! of their greetings, not the database's thread ids.
//!
//! MariaDB's form: `KILL [HARD | SOFT] [CONNECTION | QUERY [ID]] {id | USER user}`.

use super::sql::{Kind, Tokens};

/// What a KILL names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A connection id (a dbproxy greeting id).
    Thread(u64),
    /// `CONNECTION_ID()`: the client's own connection.
    Own,
    /// `KILL QUERY ID n`: a query id of the database, which dbproxy does not hand out.
    QueryId(u64),
    /// `KILL ... USER name`.
    User,
    /// An expression dbproxy does not evaluate, or more than one statement.
    Other,
}

/// A KILL statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kill {
    /// `KILL QUERY`: the statement only; otherwise the connection.
    pub query_only: bool,
    pub target: Target,
}

/// The KILL a statement is, if it is one.
pub fn parse(sql: &[u8]) -> Option<Kill> {
    let mut it = Tokens::new(sql);
    let first = it.next()?;
    if first.kind != Kind::Word || !sql[first.start..first.end].eq_ignore_ascii_case(b"KILL") {
        return None;
    }
    let toks: Vec<_> = std::iter::once(first).chain(it).collect();
    let word = |i: usize, w: &str| {
        toks.get(i).is_some_and(|t| {
            t.kind == Kind::Word && sql[t.start..t.end].eq_ignore_ascii_case(w.as_bytes())
        })
    };
    if !word(0, "KILL") {
        return None;
    }
    let mut i = 1;
    if word(i, "HARD") || word(i, "SOFT") {
        i += 1;
    }
    let mut query_only = false;
    let mut query_id = false;
    if word(i, "CONNECTION") && !word(i + 1, "CONNECTION_ID") {
        i += 1;
    } else if word(i, "QUERY") {
        query_only = true;
        i += 1;
        if word(i, "ID") {
            query_id = true;
            i += 1;
        }
    }
    // A trailing `;` is fine; anything else after the id is not evaluated here.
    let rest = toks.get(i..).unwrap_or_default();
    let rest = match rest.last() {
        Some(t) if t.kind == Kind::Punct(b';') => &rest[..rest.len() - 1],
        _ => rest,
    };
    let text = |k: usize| rest.get(k).map(|t| &sql[t.start..t.end]);
    let target = match rest.len() {
        n if n >= 2 && word(i, "USER") => Target::User,
        1 => match text(0).and_then(|n| std::str::from_utf8(n).ok()?.parse().ok()) {
            Some(n) if query_id => Target::QueryId(n),
            Some(n) => Target::Thread(n),
            None => Target::Other,
        },
        3 if !query_id
            && word(i, "CONNECTION_ID")
            && rest.get(1).is_some_and(|t| t.kind == Kind::Punct(b'('))
            && rest.get(2).is_some_and(|t| t.kind == Kind::Punct(b')')) =>
        {
            Target::Own
        }
        _ => Target::Other,
    };
    Some(Kill { query_only, target })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(query_only: bool, target: Target) -> Option<Kill> {
        Some(Kill { query_only, target })
    }

    #[test]
    fn every_form() {
        assert_eq!(
            parse(b"KILL 1073741825"),
            k(false, Target::Thread(1073741825))
        );
        assert_eq!(parse(b"kill connection 12;"), k(false, Target::Thread(12)));
        assert_eq!(parse(b"KILL QUERY 12"), k(true, Target::Thread(12)));
        assert_eq!(parse(b"KILL HARD QUERY 12"), k(true, Target::Thread(12)));
        assert_eq!(
            parse(b"KILL SOFT CONNECTION 12"),
            k(false, Target::Thread(12))
        );
        assert_eq!(
            parse(b"/* c */ KILL QUERY ID 99"),
            k(true, Target::QueryId(99))
        );
        assert_eq!(parse(b"KILL USER app"), k(false, Target::User));
        assert_eq!(parse(b"KILL QUERY USER 'app'@'%'"), k(true, Target::User));
        assert_eq!(parse(b"KILL CONNECTION_ID()"), k(false, Target::Own));
        assert_eq!(parse(b"KILL QUERY CONNECTION_ID()"), k(true, Target::Own));
        assert_eq!(parse(b"KILL 5 + 1"), k(false, Target::Other));
        assert_eq!(parse(b"KILL 5; SELECT 1"), k(false, Target::Other));
        assert_eq!(parse(b"KILL 'x'"), k(false, Target::Other));
        assert_eq!(parse(b"KILL"), k(false, Target::Other));
        assert_eq!(parse(b"SELECT 'KILL 5'"), None);
        assert_eq!(parse(b"KILLX 5"), None);
        assert_eq!(parse(b""), None);
    }
}
