//! Binary-protocol prepared statements without pinning. A client's statements live at dbproxy
//! (ids dbproxy hands out); each backend connection keeps a bounded cache of statements
//! prepared on it. A server-side statement is bound to what was in force when it was
//! prepared (unqualified table names resolve in the default schema; sql_mode and the
//! character sets decide how the text parses), so the cache key holds that context with the
//! text: a client never executes a statement prepared in another client's context.

use super::sql::SqlInfo;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// Statement id meaning "the statement prepared last" (MariaDB).
pub const LAST_PREPARED: u32 = 0xffff_ffff;

/// The session variables that change how a statement's text is parsed and bound.
pub const CONTEXT_VARS: [&str; 3] = ["sql_mode", "character_set_client", "collation_connection"];

/// What a statement was prepared in: the default schema and [`CONTEXT_VARS`] (`None`: the
/// connection's own value after a reset, i.e. the client never changed it).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct StmtContext {
    pub schema: Option<Vec<u8>>,
    pub vars: [Option<Vec<u8>>; 3],
}

/// A statement's cache key: its context and its text, with the hash computed once.
#[derive(Debug)]
pub struct StmtKey {
    pub context: StmtContext,
    pub sql: Arc<[u8]>,
    hash: u64,
}

impl StmtKey {
    pub fn new(context: StmtContext, sql: Arc<[u8]>) -> Arc<Self> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        context.hash(&mut h);
        sql.hash(&mut h);
        Arc::new(StmtKey {
            context,
            sql,
            hash: h.finish(),
        })
    }
}

impl PartialEq for StmtKey {
    fn eq(&self, o: &Self) -> bool {
        self.hash == o.hash && self.sql == o.sql && self.context == o.context
    }
}
impl Eq for StmtKey {}
impl Hash for StmtKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        h.write_u64(self.hash);
    }
}

/// A statement a client prepared.
#[derive(Debug, Clone)]
pub struct ClientStmt {
    pub key: Arc<StmtKey>,
    pub params: u16,
    pub columns: u16,
    /// Parameter types the client last sent (2 bytes per parameter).
    pub types: Option<Vec<u8>>,
    /// What the text does, classified once at prepare time and applied on every execute.
    pub info: Arc<SqlInfo>,
}

/// A client's statements, by the ids dbproxy gave it.
#[derive(Debug, Default)]
pub struct ClientStmts {
    next_id: u32,
    map: HashMap<u32, ClientStmt>,
    last: Option<u32>,
}

impl ClientStmts {
    /// Registers a statement; returns the id the client will use.
    pub fn add(&mut self, key: Arc<StmtKey>, info: Arc<SqlInfo>, params: u16, columns: u16) -> u32 {
        self.next_id = self.next_id.wrapping_add(1).max(1);
        while self.map.contains_key(&self.next_id) || self.next_id == LAST_PREPARED {
            self.next_id = self.next_id.wrapping_add(1).max(1);
        }
        let id = self.next_id;
        self.map.insert(
            id,
            ClientStmt {
                key,
                params,
                columns,
                types: None,
                info,
            },
        );
        self.last = Some(id);
        id
    }

    /// The client id `id` stands for (resolving [`LAST_PREPARED`]).
    pub fn resolve(&self, id: u32) -> Option<u32> {
        if id == LAST_PREPARED {
            self.last
        } else {
            self.map.contains_key(&id).then_some(id)
        }
    }

    pub fn get(&self, id: u32) -> Option<&ClientStmt> {
        self.map.get(&id)
    }

    pub fn get_mut(&mut self, id: u32) -> Option<&mut ClientStmt> {
        self.map.get_mut(&id)
    }

    pub fn remove(&mut self, id: u32) {
        self.map.remove(&id);
        if self.last == Some(id) {
            self.last = None;
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// A statement prepared on one backend connection.
#[derive(Debug, Clone)]
pub struct BackendStmt {
    pub id: u32,
    pub params: u16,
    /// Parameter types the backend last received for it.
    pub types: Option<Vec<u8>>,
}

/// Statements prepared on one backend connection, by context and text, least recently used
/// evicted beyond the capacity (an `lru` map: O(1) lookups and evictions).
#[derive(Debug)]
pub struct BackendStmts {
    by_key: lru::LruCache<Arc<StmtKey>, BackendStmt>,
}

impl BackendStmts {
    pub fn new(capacity: usize) -> Self {
        BackendStmts {
            by_key: lru::LruCache::new(
                std::num::NonZeroUsize::new(capacity).unwrap_or(std::num::NonZeroUsize::MIN),
            ),
        }
    }

    /// The statement prepared for `key`, now the most recently used.
    pub fn get_mut(&mut self, key: &StmtKey) -> Option<&mut BackendStmt> {
        self.by_key.get_mut(key)
    }

    /// Records a statement; returns a backend id to close: a duplicate of one already
    /// cached, or the least recently used one beyond the capacity.
    pub fn insert(&mut self, key: Arc<StmtKey>, id: u32, params: u16) -> Option<u32> {
        if let Some(s) = self.by_key.get(&key) {
            return (s.id != id).then_some(id);
        }
        let stmt = BackendStmt {
            id,
            params,
            types: None,
        };
        self.by_key.push(key, stmt).map(|(_, old)| old.id)
    }

    /// The server dropped every statement (reset, change of user).
    pub fn clear(&mut self) {
        self.by_key.clear();
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(schema: &str, sql: &str) -> Arc<StmtKey> {
        StmtKey::new(
            StmtContext {
                schema: Some(schema.as_bytes().to_vec()),
                vars: Default::default(),
            },
            Arc::from(sql.as_bytes()),
        )
    }

    #[test]
    fn client_ids_and_last_prepared() {
        let mut c = ClientStmts::default();
        let info = Arc::new(SqlInfo::default());
        let a = c.add(key("a", "SELECT 1"), info.clone(), 0, 1);
        let b = c.add(key("a", "SELECT 2"), info, 0, 1);
        assert_ne!(a, b);
        assert_eq!(c.resolve(LAST_PREPARED), Some(b));
        c.remove(a);
        assert_eq!(c.resolve(a), None);
    }

    #[test]
    fn the_same_text_in_another_schema_is_another_statement() {
        let mut s = BackendStmts::new(8);
        assert_eq!(
            s.insert(key("t1", "SELECT owner FROM orders WHERE id = ?"), 1, 1),
            None
        );
        assert!(s
            .get_mut(&key("t2", "SELECT owner FROM orders WHERE id = ?"))
            .is_none());
        assert_eq!(
            s.get_mut(&key("t1", "SELECT owner FROM orders WHERE id = ?"))
                .map(|x| x.id),
            Some(1)
        );
        let mut ansi = StmtContext {
            schema: Some(b"t1".to_vec()),
            vars: Default::default(),
        };
        ansi.vars[0] = Some(b"ANSI_QUOTES".to_vec());
        let k = StmtKey::new(
            ansi,
            Arc::from(&b"SELECT owner FROM orders WHERE id = ?"[..]),
        );
        assert!(s.get_mut(&k).is_none(), "sql_mode is part of the key");
    }

    #[test]
    fn cache_evicts_least_recently_used_and_reports_duplicates() {
        let mut s = BackendStmts::new(2);
        assert_eq!(s.insert(key("d", "a"), 1, 0), None);
        assert_eq!(s.insert(key("d", "b"), 2, 0), None);
        s.get_mut(&key("d", "a"));
        assert_eq!(s.insert(key("d", "c"), 3, 0), Some(2));
        assert_eq!(
            s.insert(key("d", "a"), 9, 0),
            Some(9),
            "a duplicate prepare is closed"
        );
        assert_eq!(s.get_mut(&key("d", "a")).map(|x| x.id), Some(1));
    }
}
