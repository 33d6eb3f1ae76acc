//! SQL-level prepared statements (`PREPARE`, `EXECUTE`, `DEALLOCATE`) without pinning.
//! Sans-IO: names and read-back rows in, what each server connection needs out.
//!
//! A client's SQL statements keep the client's names on the servers (`EXECUTE q1` names
//! it in the SQL text, which dbproxy forwards unchanged). So two clients may hold the same
//! name with different definitions, and a server connection may hold another client's.
//! Before a client's query or Parse that names a statement reaches a connection, the
//! connection is made to agree with the client on that name: another client's statement
//! of the name is closed, and the client's own is prepared again from its defining text
//! (the `PREPARE` the client sent, which the server kept). What a client's own `PREPARE`
//! or `DEALLOCATE` did is not guessed from its text: once its exchange settles, dbproxy
//! reads `pg_prepared_statements` back ([`READ_BACK_SQL`]), and the names it changed are
//! what the server says. PREPARE and DEALLOCATE are not transactional in PostgreSQL; the
//! read-back sees them whatever the transaction's fate.

use super::postgres::{sql_definition, SqlNames};
use std::collections::HashMap;
use std::sync::Arc;

/// The query whose rows [`ClientSql::read_back`] takes: `(name, statement)`.
pub const READ_BACK_SQL: &str =
    "SELECT name, statement FROM pg_catalog.pg_prepared_statements WHERE from_sql";

/// A client's SQL-level prepared statements, by name, with their defining text.
#[derive(Debug, Default)]
pub struct ClientSql {
    defs: HashMap<Vec<u8>, Arc<[u8]>>,
    /// Names the client defined or removed since the last read-back: the server it ran
    /// on knows what they are now, dbproxy does not yet (they are not made to agree).
    changing: Vec<Vec<u8>>,
    /// The client removed every statement (`DEALLOCATE ALL`, `DISCARD ALL`) since the last
    /// read-back: nothing is made to agree until then.
    changing_all: bool,
    /// Changing names whose fixup failed: the server did not agree with the client on
    /// them when its statements ran (in an aborted transaction, say, where those failed
    /// too), so a read-back does not speak for the client there; its definitions stay.
    failed: Vec<Vec<u8>>,
}

/// What a server connection holds of SQL-level statements, by name: the defining text,
/// or `None` when a statement of the name may be there but its text is not known (a
/// re-prepare that failed).
#[derive(Debug, Default, Clone)]
pub struct ServerSql {
    held: HashMap<Vec<u8>, Option<Arc<[u8]>>>,
}

/// What a server connection needs before a client's message that names a statement.
#[derive(Debug, PartialEq, Eq)]
pub enum Fix {
    Nothing,
    /// Close the server's statement of the name (the client has none).
    Close,
    /// Prepare the client's statement from this text, after closing the server's when
    /// `close`.
    Prepare {
        close: bool,
        text: Arc<[u8]>,
    },
}

/// A `PREPARE` read back whose defining text cannot be found in its source: the client
/// is pinned to the connection that holds it.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("the text of the prepared statement {name} cannot be found in its source")]
pub struct Unreplayable {
    pub name: String,
}

impl ServerSql {
    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    pub fn clear(&mut self) {
        self.held.clear();
    }

    /// The names of the statements that may be on the connection.
    pub fn names(&self) -> impl Iterator<Item = &[u8]> {
        self.held.keys().map(Vec::as_slice)
    }

    /// Whether a statement of this name may be on the connection.
    pub fn may_hold(&self, name: &[u8]) -> bool {
        self.held.contains_key(name)
    }

    /// The names it surely holds (their text known).
    pub fn known_names(&self) -> impl Iterator<Item = &[u8]> {
        self.held
            .iter()
            .filter(|(_, t)| t.is_some())
            .map(|(n, _)| n.as_slice())
    }

    /// A statement of the name is there, with this text (`None`: unknown).
    pub fn holds(&mut self, name: &[u8], text: Option<Arc<[u8]>>) {
        self.held.insert(name.to_vec(), text);
    }

    /// No statement of the name is there.
    pub fn lacks(&mut self, name: &[u8]) {
        self.held.remove(name);
    }
}

impl ClientSql {
    pub fn len(&self) -> usize {
        self.defs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.defs.is_empty()
    }

    /// The names of the client's statements.
    pub fn names(&self) -> impl Iterator<Item = &[u8]> {
        self.defs.keys().map(Vec::as_slice)
    }

    /// What `server` needs for the name to mean what it means to this client; `unsure`:
    /// a re-prepare of it is still unanswered there (it may yet fail).
    pub fn fix(&self, server: &ServerSql, name: &[u8], unsure: bool) -> Fix {
        if self.changing_all || self.changing.iter().any(|n| n == name) {
            return Fix::Nothing;
        }
        let held = server.held.get(name);
        match (self.defs.get(name), held) {
            (None, None) => Fix::Nothing,
            (None, Some(_)) => Fix::Close,
            (Some(mine), Some(Some(theirs))) if !unsure && mine[..] == theirs[..] => Fix::Nothing,
            (Some(mine), held) => Fix::Prepare {
                close: held.is_some() || unsure,
                text: mine.clone(),
            },
        }
    }

    /// The client's message defines or removes these names (after they were made to
    /// agree): they are read back once the exchange settles.
    pub fn changing(&mut self, names: &SqlNames) {
        self.changing_all |= names.all;
        for n in &names.changed {
            if !self.changing.contains(n) {
                self.changing.push(n.clone());
            }
        }
    }

    /// A fixup of `name` failed on the server.
    pub fn fixup_failed(&mut self, name: &[u8]) {
        let changing = self.changing_all || self.changing.iter().any(|n| n == name);
        if changing && !self.failed.iter().any(|n| n == name) {
            self.failed.push(name.to_vec());
        }
    }

    /// Whether the statements must be read back before the connection goes.
    pub fn needs_read_back(&self) -> bool {
        self.changing_all || !self.changing.is_empty()
    }

    /// The rows of [`READ_BACK_SQL`] on the connection the client ran on: that
    /// connection's statements, and the client's for the names it changed.
    pub fn read_back<'a>(
        &mut self,
        server: &mut ServerSql,
        rows: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Result<(), Unreplayable> {
        let mut held = HashMap::new();
        for (name, source) in rows {
            let text: Option<Arc<[u8]>> = sql_definition(source, name).map(Arc::from);
            held.insert(name.to_vec(), text);
        }
        let all = std::mem::take(&mut self.changing_all);
        let changing = std::mem::take(&mut self.changing);
        let failed = std::mem::take(&mut self.failed);
        let mine =
            |n: &[u8]| (all || changing.iter().any(|c| c == n)) && !failed.iter().any(|f| f == n);
        self.defs.retain(|n, _| !mine(n));
        let mut unreplayable = None;
        for (name, text) in &held {
            if mine(name) {
                match text {
                    Some(t) => {
                        self.defs.insert(name.clone(), t.clone());
                    }
                    None => {
                        unreplayable = Some(Unreplayable {
                            name: String::from_utf8_lossy(name).into_owned(),
                        })
                    }
                }
            }
        }
        server.held = held;
        unreplayable.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::postgres::sql_names;

    fn text(s: &str) -> Arc<[u8]> {
        Arc::from(s.as_bytes())
    }

    #[test]
    fn a_name_is_made_to_mean_what_it_means_to_the_client() {
        let mut client = ClientSql::default();
        let mut server = ServerSql::default();
        // Neither has it: the server answers for it.
        assert_eq!(client.fix(&server, b"q", false), Fix::Nothing);
        // Another client's statement of the name is closed.
        server.holds(b"q", Some(text("PREPARE q AS SELECT 2")));
        assert_eq!(client.fix(&server, b"q", false), Fix::Close);
        // The client prepares it; the server it ran on says what it is.
        client.changing(&sql_names(b"PREPARE q AS SELECT 1"));
        assert_eq!(client.fix(&server, b"q", false), Fix::Nothing, "changing");
        assert!(client.needs_read_back());
        client
            .read_back(&mut server, [(&b"q"[..], &b"PREPARE q AS SELECT 1"[..])])
            .unwrap();
        assert!(!client.needs_read_back());
        assert_eq!(client.fix(&server, b"q", false), Fix::Nothing);
        assert_eq!(
            client.fix(&server, b"q", true),
            Fix::Prepare {
                close: true,
                text: text("PREPARE q AS SELECT 1")
            }
        );
        // On a connection that lacks it, or holds another's.
        let mut other = ServerSql::default();
        assert_eq!(
            client.fix(&other, b"q", false),
            Fix::Prepare {
                close: false,
                text: text("PREPARE q AS SELECT 1")
            }
        );
        other.holds(b"q", None);
        assert!(matches!(
            client.fix(&other, b"q", false),
            Fix::Prepare { close: true, .. }
        ));
    }

    #[test]
    fn a_read_back_takes_only_the_names_the_client_changed() {
        let mut client = ClientSql::default();
        let mut server = ServerSql::default();
        client.changing(&sql_names(b"PREPARE a AS SELECT 1"));
        client
            .read_back(
                &mut server,
                [
                    (&b"a"[..], &b"PREPARE a AS SELECT 1"[..]),
                    (&b"b"[..], &b"PREPARE b AS SELECT 'other client'"[..]),
                ],
            )
            .unwrap();
        assert_eq!(client.len(), 1);
        assert_eq!(server.len(), 2);
        // A failed PREPARE of a name it holds leaves the first definition.
        client.changing(&sql_names(b"PREPARE a AS SELECT 9"));
        client
            .read_back(&mut server, [(&b"a"[..], &b"PREPARE a AS SELECT 1"[..])])
            .unwrap();
        assert_eq!(
            client.fix(&ServerSql::default(), b"a", false),
            Fix::Prepare {
                close: false,
                text: text("PREPARE a AS SELECT 1")
            }
        );
        // DEALLOCATE ALL: every name is read back.
        client.changing(&sql_names(b"DEALLOCATE ALL"));
        client.read_back(&mut server, []).unwrap();
        assert!(client.is_empty() && server.is_empty());
    }

    #[test]
    fn a_name_whose_fixup_failed_keeps_the_clients_definition() {
        let mut client = ClientSql::default();
        let mut server = ServerSql::default();
        client.changing(&sql_names(b"PREPARE a AS SELECT 1"));
        client
            .read_back(&mut server, [(&b"a"[..], &b"PREPARE a AS SELECT 1"[..])])
            .unwrap();
        // In an aborted transaction: the re-prepare fails, and so does the PREPARE.
        let mut other = ServerSql::default();
        client.changing(&sql_names(b"PREPARE a AS SELECT 2"));
        client.fixup_failed(b"a");
        client.read_back(&mut other, []).unwrap();
        assert_eq!(client.len(), 1);
        // A failure of a name it did not change is not remembered.
        client.fixup_failed(b"b");
        assert!(!client.needs_read_back());
    }

    #[test]
    fn a_source_without_the_definition_pins() {
        let mut client = ClientSql::default();
        let mut server = ServerSql::default();
        client.changing(&sql_names(b"PREPARE a AS SELECT 1"));
        let e = client
            .read_back(&mut server, [(&b"a"[..], &b"SELECT 1; SELECT 2"[..])])
            .unwrap_err();
        assert_eq!(e.name, "a");
        assert!(server.may_hold(b"a"));
    }
}
