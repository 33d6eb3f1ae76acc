//! PostgreSQL cancel keys. Each client gets BackendKeyData of dbproxy's own (a process id
//! and a secret key); a CancelRequest that names them is sent on to the server process
//! the client holds at that moment, and to no other.
//!
//! The race PgBouncer had (#717: a cancel for a query that had just finished hit the next
//! client's query on the same server process) is closed here: a server connection a
//! cancel was sent towards while its client held it is never lent again (the session
//! closes it instead of releasing it), so a late cancel can only reach the query it was
//! meant for, or nothing.

use crate::target::BackendAddr;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

/// The server process a client holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldServer {
    pub addr: BackendAddr,
    pub pid: i32,
    pub key: i32,
}

/// One client's cancel slot.
#[derive(Debug, Default)]
struct Slot {
    key: i32,
    held: Option<HeldServer>,
    /// A cancel was sent towards `held` while the client held it.
    cancelled: bool,
}

/// Every client's cancel key, by process id (shared by all workers).
#[derive(Debug, Default)]
pub struct CancelKeys {
    slots: Mutex<HashMap<i32, Arc<Mutex<Slot>>>>,
}

/// A client's registration; it ends when dropped.
#[derive(Debug)]
pub struct Registration {
    keys: Arc<CancelKeys>,
    pid: i32,
    slot: Arc<Mutex<Slot>>,
}

impl CancelKeys {
    /// Registers a client under `pid` with `key` (the caller draws the key at random and
    /// makes `pid` unique among live clients).
    pub fn register(self: &Arc<Self>, pid: i32, key: i32) -> Registration {
        let slot = Arc::new(Mutex::new(Slot {
            key,
            ..Slot::default()
        }));
        self.slots.lock().insert(pid, slot.clone());
        Registration {
            keys: self.clone(),
            pid,
            slot,
        }
    }

    /// A CancelRequest for `pid` with `key`: the server process to send it to, if the key
    /// is right and the client holds one now. That server connection is then marked, so
    /// that it is not lent again.
    pub fn cancel(&self, pid: i32, key: i32) -> Option<HeldServer> {
        let slot = self.slots.lock().get(&pid).cloned()?;
        let mut s = slot.lock();
        if s.key != key {
            return None;
        }
        let held = s.held.clone()?;
        s.cancelled = true;
        Some(held)
    }

    /// Clients registered now.
    pub fn len(&self) -> usize {
        self.slots.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Registration {
    /// The client now holds `server`.
    pub fn hold(&self, server: HeldServer) {
        let mut s = self.slot.lock();
        s.held = Some(server);
        s.cancelled = false;
    }

    /// The client lets its server go; false when a cancel was sent towards it meanwhile
    /// (the connection must then be closed, not lent again).
    pub fn let_go(&self) -> bool {
        let mut s = self.slot.lock();
        s.held = None;
        !std::mem::take(&mut s.cancelled)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut slots = self.keys.slots.lock();
        if slots
            .get(&self.pid)
            .is_some_and(|s| Arc::ptr_eq(s, &self.slot))
        {
            slots.remove(&self.pid);
        }
    }
}

/// The 16 bytes of a CancelRequest for `server`.
pub fn request(server: &HeldServer) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&16i32.to_be_bytes());
    b[4..8].copy_from_slice(&crate::postgres::startup::CANCEL_REQUEST.to_be_bytes());
    b[8..12].copy_from_slice(&server.pid.to_be_bytes());
    b[12..].copy_from_slice(&server.key.to_be_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(pid: i32) -> HeldServer {
        HeldServer {
            addr: BackendAddr::Tcp("127.0.0.1:5432".parse().unwrap()),
            pid,
            key: 7,
        }
    }

    #[test]
    fn a_cancel_reaches_the_server_held_now_with_the_right_key_only() {
        let keys = Arc::new(CancelKeys::default());
        let r = keys.register(1, 42);
        assert_eq!(keys.cancel(1, 42), None, "nothing held");
        r.hold(server(100));
        assert_eq!(keys.cancel(1, 41), None, "wrong key");
        assert_eq!(keys.cancel(2, 42), None, "unknown client");
        assert_eq!(keys.cancel(1, 42), Some(server(100)));
        // The connection a cancel went towards is not lent again.
        assert!(!r.let_go());
        assert_eq!(keys.cancel(1, 42), None, "released: nothing to cancel");
        r.hold(server(101));
        assert!(r.let_go(), "no cancel this time");
        drop(r);
        assert!(keys.is_empty());
    }

    #[test]
    fn the_request_is_what_postgresql_reads() {
        let b = request(&server(0x0102_0304));
        assert_eq!(&b[..8], &[0, 0, 0, 16, 4, 210, 22, 46]);
        assert_eq!(&b[8..12], &[1, 2, 3, 4]);
        assert_eq!(&b[12..], &[0, 0, 0, 7]);
    }
}
