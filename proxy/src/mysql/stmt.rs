//! Binary-protocol prepared statements without pinning: a client's statements live at
//! dbproxy (ids dbproxy hands out), each backend connection keeps a bounded cache of the
//! statements prepared on it, and a client's execute is rewritten for whichever backend
//! serves it.

use super::wire::Reader;
use super::ProtocolError;
use std::collections::HashMap;
use std::sync::Arc;

/// Statement id meaning "the statement prepared last" (MariaDB).
pub const LAST_PREPARED: u32 = 0xffff_ffff;

/// A statement a client prepared.
#[derive(Debug, Clone)]
pub struct ClientStmt {
    pub sql: Arc<[u8]>,
    pub params: u16,
    pub columns: u16,
    /// Parameter types the client last sent (2 bytes per parameter).
    pub types: Option<Vec<u8>>,
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
    pub fn add(&mut self, sql: Arc<[u8]>, params: u16, columns: u16) -> u32 {
        self.next_id = self.next_id.wrapping_add(1).max(1);
        while self.map.contains_key(&self.next_id) || self.next_id == LAST_PREPARED {
            self.next_id = self.next_id.wrapping_add(1).max(1);
        }
        let id = self.next_id;
        self.map.insert(
            id,
            ClientStmt {
                sql,
                params,
                columns,
                types: None,
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
    last_use: u64,
}

/// Statements prepared on one backend connection, by SQL text, least recently used
/// evicted beyond the capacity.
#[derive(Debug)]
pub struct BackendStmts {
    by_sql: HashMap<Arc<[u8]>, BackendStmt>,
    tick: u64,
    capacity: usize,
}

impl BackendStmts {
    pub fn new(capacity: usize) -> Self {
        BackendStmts {
            by_sql: HashMap::new(),
            tick: 0,
            capacity: capacity.max(1),
        }
    }

    pub fn get_mut(&mut self, sql: &[u8]) -> Option<&mut BackendStmt> {
        self.tick += 1;
        let t = self.tick;
        let s = self.by_sql.get_mut(sql)?;
        s.last_use = t;
        Some(s)
    }

    /// Records a statement; returns backend ids to close: a duplicate of one already
    /// cached, or the least recently used one beyond the capacity.
    pub fn insert(&mut self, sql: Arc<[u8]>, id: u32, params: u16) -> Option<u32> {
        self.tick += 1;
        if let Some(s) = self.by_sql.get_mut(&sql) {
            s.last_use = self.tick;
            return (s.id != id).then_some(id);
        }
        let mut evicted = None;
        if self.by_sql.len() >= self.capacity {
            let oldest = self
                .by_sql
                .iter()
                .min_by_key(|(_, s)| s.last_use)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                evicted = self.by_sql.remove(&k).map(|s| s.id);
            }
        }
        self.by_sql.insert(
            sql,
            BackendStmt {
                id,
                params,
                types: None,
                last_use: self.tick,
            },
        );
        evicted
    }

    /// The server dropped every statement (reset, change of user).
    pub fn clear(&mut self) {
        self.by_sql.clear();
    }

    pub fn len(&self) -> usize {
        self.by_sql.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_sql.is_empty()
    }
}

/// The statement id of a COM_STMT_* payload (bytes 1..5).
pub fn stmt_id(payload: &[u8]) -> Result<u32, ProtocolError> {
    let mut r = Reader::new(payload);
    r.u8("command")?;
    r.u32("statement id")
}

/// Writes `id` as the statement id of a COM_STMT_* payload or an OK_stmt reply.
pub fn patch_stmt_id(payload: &mut [u8], id: u32) {
    if let Some(b) = payload.get_mut(1..5) {
        b.copy_from_slice(&id.to_le_bytes());
    }
}

/// The parts of an OK_stmt reply dbproxy needs: (statement id, columns, parameters).
pub fn parse_prepare_ok(payload: &[u8]) -> Result<(u32, u16, u16), ProtocolError> {
    let mut r = Reader::new(payload);
    if r.u8("OK_stmt header")? != 0 {
        return Err(ProtocolError::Malformed("not an OK_stmt packet"));
    }
    let id = r.u32("statement id")?;
    let columns = r.u16("column count")?;
    let params = r.u16("parameter count")?;
    Ok((id, columns, params))
}

/// Where the parameter types of a COM_STMT_EXECUTE payload are, for a statement with
/// `params` parameters: `(offset of the new-params-bound flag, flag)`.
fn bound_flag(payload: &[u8], params: u16) -> Result<Option<(usize, u8)>, ProtocolError> {
    if params == 0 {
        return Ok(None);
    }
    let at = 1 + 4 + 1 + 4 + usize::from(params).div_ceil(8);
    let flag = *payload
        .get(at)
        .ok_or(ProtocolError::Truncated("new-params-bound flag"))?;
    Ok(Some((at, flag)))
}

/// Whether a COM_STMT_EXECUTE opens a cursor (any cursor type flag).
pub fn execute_opens_cursor(payload: &[u8]) -> bool {
    payload.get(5).is_some_and(|f| f & 0x0f != 0)
}

/// Rewrites a client's COM_STMT_EXECUTE for a backend statement: the backend's id, and
/// the parameter types when the client leaves them out (it sent them on an earlier
/// execute, perhaps to another backend) and the backend statement last saw other ones.
/// Appends the rewritten payload to `out`; updates the types remembered on both sides.
pub fn rewrite_execute(
    payload: &[u8],
    client: &mut ClientStmt,
    backend: &mut BackendStmt,
    out: &mut Vec<u8>,
) -> Result<(), ProtocolError> {
    let start = out.len();
    match bound_flag(payload, client.params)? {
        Some((at, 1)) => {
            let n = 2 * usize::from(client.params);
            let types = payload
                .get(at + 1..at + 1 + n)
                .ok_or(ProtocolError::Truncated("parameter types"))?;
            if client.types.as_deref() != Some(types) {
                client.types = Some(types.to_vec());
            }
            if backend.types.as_deref() != Some(types) {
                backend.types = Some(types.to_vec());
            }
            out.extend_from_slice(payload);
        }
        Some((at, _)) => match &client.types {
            Some(types) if backend.types.as_ref() != Some(types) => {
                out.reserve(payload.len() + types.len());
                out.extend_from_slice(&payload[..at]);
                out.push(1);
                out.extend_from_slice(types);
                out.extend_from_slice(&payload[at + 1..]);
                backend.types = Some(types.clone());
            }
            _ => out.extend_from_slice(payload),
        },
        None => out.extend_from_slice(payload),
    }
    patch_stmt_id(&mut out[start..], backend.id);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewritten(
        payload: &[u8],
        client: &mut ClientStmt,
        backend: &mut BackendStmt,
    ) -> Result<Vec<u8>, ProtocolError> {
        let mut out = b"kept".to_vec();
        rewrite_execute(payload, client, backend, &mut out)?;
        assert_eq!(&out[..4], b"kept", "appends after what is there");
        Ok(out.split_off(4))
    }

    fn execute(id: u32, params: u16, bound: bool, values: &[u8]) -> Vec<u8> {
        let mut p = vec![0x17];
        p.extend_from_slice(&id.to_le_bytes());
        p.push(0);
        p.extend_from_slice(&1u32.to_le_bytes());
        p.extend(std::iter::repeat_n(0u8, usize::from(params).div_ceil(8)));
        p.push(u8::from(bound));
        if bound {
            for _ in 0..params {
                p.extend_from_slice(&[0x08, 0x00]); // LONGLONG
            }
        }
        p.extend_from_slice(values);
        p
    }

    #[test]
    fn client_ids_and_last_prepared() {
        let mut c = ClientStmts::default();
        let a = c.add(Arc::from(&b"SELECT 1"[..]), 0, 1);
        let b = c.add(Arc::from(&b"SELECT 2"[..]), 0, 1);
        assert_ne!(a, b);
        assert_eq!(c.resolve(LAST_PREPARED), Some(b));
        assert_eq!(c.resolve(a), Some(a));
        c.remove(a);
        assert_eq!(c.resolve(a), None);
    }

    #[test]
    fn cache_evicts_least_recently_used_and_reports_duplicates() {
        let mut s = BackendStmts::new(2);
        let q = |t: &str| Arc::<[u8]>::from(t.as_bytes());
        assert_eq!(s.insert(q("a"), 1, 0), None);
        assert_eq!(s.insert(q("b"), 2, 0), None);
        s.get_mut(b"a");
        assert_eq!(s.insert(q("c"), 3, 0), Some(2));
        assert_eq!(
            s.insert(q("a"), 9, 0),
            Some(9),
            "a duplicate prepare is closed"
        );
        assert_eq!(s.get_mut(b"a").map(|x| x.id), Some(1));
    }

    #[test]
    fn execute_gets_the_backend_id_and_types_when_needed() {
        let mut client = ClientStmt {
            sql: Arc::from(&b"SELECT ?"[..]),
            params: 1,
            columns: 1,
            types: None,
        };
        let mut b1 = BackendStmt {
            id: 77,
            params: 1,
            types: None,
            last_use: 0,
        };
        let first = execute(5, 1, true, &7i64.to_le_bytes());
        let out = rewritten(&first, &mut client, &mut b1).unwrap();
        assert_eq!(stmt_id(&out).unwrap(), 77);
        assert_eq!(out.len(), first.len());
        assert_eq!(client.types.as_deref(), Some(&[0x08, 0x00][..]));
        // A later execute without types on a backend that has them: only the id changes.
        let later = execute(5, 1, false, &8i64.to_le_bytes());
        let out = rewritten(&later, &mut client, &mut b1).unwrap();
        assert_eq!(out.len(), later.len());
        // The same on a backend that never saw the types: they are put in.
        let mut b2 = BackendStmt {
            id: 3,
            params: 1,
            types: None,
            last_use: 0,
        };
        let out = rewritten(&later, &mut client, &mut b2).unwrap();
        assert_eq!(out, {
            let mut e = execute(3, 1, true, &8i64.to_le_bytes());
            e[1..5].copy_from_slice(&3u32.to_le_bytes());
            e
        });
        assert!(rewritten(&later[..10], &mut client, &mut b2).is_err());
    }

    #[test]
    fn prepare_ok_and_cursor_flag() {
        let ok = [0u8, 9, 0, 0, 0, 2, 0, 1, 0, 0, 0, 0];
        assert_eq!(parse_prepare_ok(&ok).unwrap(), (9, 2, 1));
        assert!(parse_prepare_ok(&[0xff, 1, 2]).is_err());
        let mut e = execute(1, 0, false, &[]);
        assert!(!execute_opens_cursor(&e));
        e[5] = 1;
        assert!(execute_opens_cursor(&e));
    }
}
