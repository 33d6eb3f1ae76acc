//! `KILL` statements: dbproxy answers them itself, since the ids clients know are the ones
//! of their greetings, not the database's thread ids.
//!
//! MariaDB's form: `KILL [HARD | SOFT] [CONNECTION | QUERY [ID]] {id | USER user}`.

use super::sql::{Kind, Tokens};
use crate::clients::FIRST_ID;
use crate::mysql::consts::errcode;
use crate::mysql::wire::ErrPacket;

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

/// The clients a KILL may name, as the session sees them.
pub trait Clients {
    type Client;
    /// The client with this greeting id.
    fn by_greeting(&self, id: u64) -> Option<Self::Client>;
    /// The client holding the database connection with this thread id now (what
    /// `CONNECTION_ID()` answers it).
    fn holding_thread(&self, thread_id: u64) -> Option<Self::Client>;
    /// Its dbproxy user.
    fn user(&self, c: &Self::Client) -> String;
    /// Its greeting id.
    fn id(&self, c: &Self::Client) -> u32;
}

/// What a KILL comes to.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict<C> {
    /// Nothing is killed; the client is told this.
    Refuse(ErrPacket),
    /// The client's own connection (as MariaDB): a `KILL QUERY` interrupts only the KILL
    /// itself; a `KILL CONNECTION` marks the client killed. Either way it is told `told`.
    Own { connection: bool, told: ErrPacket },
    /// Another client of the same user: the statement it runs now is killed where it
    /// runs, and unless `query_only` the client is closed. The KILL is answered OK.
    Other {
        client: C,
        id: u64,
        query_only: bool,
    },
}

/// Decides a KILL by the client with greeting id `own`, logged in as `user`. Ids at or
/// above the first greeting id name clients; smaller ones name database threads (the
/// client holding that connection now: a pooled connection nobody holds runs nothing of
/// anyone's). Only the same dbproxy user's clients may be killed.
pub fn decide<R: Clients>(k: &Kill, own: u32, user: &str, clients: &R) -> Verdict<R::Client> {
    let refuse = |code, state, msg: String| Verdict::Refuse(ErrPacket::new(code, state, msg));
    let id = match k.target {
        Target::Thread(id) => id,
        Target::Own => u64::from(own),
        Target::QueryId(q) => {
            return refuse(
                errcode::ER_NO_SUCH_QUERY,
                "HY000",
                format!("Unknown query id: {q}"),
            )
        }
        Target::User | Target::Other => {
            return refuse(
                errcode::ER_NOT_SUPPORTED_YET,
                "42000",
                "(dbproxy) KILL takes a connection id (from the greeting or CONNECTION_ID())"
                    .into(),
            )
        }
    };
    let client = if id >= u64::from(FIRST_ID) {
        clients.by_greeting(id)
    } else {
        clients.holding_thread(id)
    };
    let Some(client) = client else {
        return refuse(
            errcode::ER_NO_SUCH_THREAD,
            "HY000",
            format!("Unknown thread id: {id}"),
        );
    };
    if clients.user(&client) != user {
        return refuse(
            errcode::ER_KILL_DENIED_ERROR,
            "HY000",
            format!("You are not owner of thread {id}"),
        );
    }
    if clients.id(&client) == own {
        let told = if k.query_only {
            ErrPacket::new(
                errcode::ER_QUERY_INTERRUPTED,
                "70100",
                "Query execution was interrupted",
            )
        } else {
            ErrPacket::new(
                errcode::ER_CONNECTION_KILLED,
                "70100",
                "Connection was killed",
            )
        };
        return Verdict::Own {
            connection: !k.query_only,
            told,
        };
    }
    Verdict::Other {
        client,
        id,
        query_only: k.query_only,
    }
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

    /// Clients by greeting id: (id, user, database thread held).
    struct Registry(Vec<(u32, &'static str, Option<u64>)>);

    impl Clients for Registry {
        type Client = u32;
        fn by_greeting(&self, id: u64) -> Option<u32> {
            self.0.iter().find(|c| u64::from(c.0) == id).map(|c| c.0)
        }
        fn holding_thread(&self, thread_id: u64) -> Option<u32> {
            self.0.iter().find(|c| c.2 == Some(thread_id)).map(|c| c.0)
        }
        fn user(&self, c: &u32) -> String {
            self.0
                .iter()
                .find(|x| x.0 == *c)
                .map_or(String::new(), |x| x.1.to_string())
        }
        fn id(&self, c: &u32) -> u32 {
            *c
        }
    }

    fn verdict(sql: &str, own: u32, user: &str) -> Verdict<u32> {
        let r = Registry(vec![
            (FIRST_ID, "app", Some(17)),
            (FIRST_ID + 1, "app", None),
            (FIRST_ID + 2, "other", Some(18)),
        ]);
        decide(&parse(sql.as_bytes()).unwrap(), own, user, &r)
    }

    fn code(v: Verdict<u32>) -> u16 {
        match v {
            Verdict::Refuse(e) | Verdict::Own { told: e, .. } => e.code,
            Verdict::Other { .. } => 0,
        }
    }

    #[test]
    fn a_kill_hits_only_the_same_users_clients() {
        let (a, b) = (FIRST_ID, FIRST_ID + 1);
        assert_eq!(
            verdict(&format!("KILL QUERY {a}"), b, "app"),
            Verdict::Other {
                client: a,
                id: u64::from(a),
                query_only: true
            }
        );
        // A database thread id names the client that holds that connection now.
        assert_eq!(
            verdict("KILL 17", b, "app"),
            Verdict::Other {
                client: a,
                id: 17,
                query_only: false
            }
        );
        let c = FIRST_ID + 2;
        assert_eq!(code(verdict(&format!("KILL {c}"), a, "app")), 1095);
        assert_eq!(code(verdict("KILL 18", a, "app")), 1095);
        // A pooled connection nobody holds, an unknown client.
        assert_eq!(code(verdict("KILL 19", a, "app")), 1094);
        assert_eq!(code(verdict(&format!("KILL {}", c + 1), a, "app")), 1094);
    }

    #[test]
    fn a_kill_of_oneself_is_what_gets_interrupted() {
        let a = FIRST_ID;
        assert_eq!(
            verdict("KILL QUERY CONNECTION_ID()", a, "app"),
            Verdict::Own {
                connection: false,
                told: ErrPacket::new(1317, "70100", "Query execution was interrupted")
            }
        );
        let v = verdict(&format!("KILL {a}"), a, "app");
        assert!(matches!(
            v,
            Verdict::Own {
                connection: true,
                ..
            }
        ));
        assert_eq!(code(v), 1927);
    }

    #[test]
    fn forms_dbproxy_does_not_serve_are_refused() {
        assert_eq!(code(verdict("KILL QUERY ID 5", FIRST_ID, "app")), 1957);
        assert_eq!(code(verdict("KILL USER app", FIRST_ID, "app")), 1235);
        assert_eq!(code(verdict("KILL 1 + 1", FIRST_ID, "app")), 1235);
    }
}
