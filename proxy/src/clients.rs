//! Client sessions by the connection id of their greeting, for KILL: whose client an id
//! is, which backend connection serves it at this moment, and a way to end it.
//!
//! The pool records which client holds a backend connection (on borrow) and forgets it
//! (on check-in, release or discard), so the record cannot outlive the lease. Every change
//! bumps a sequence number: a KILL that looked the thread up, then asked the server which
//! query runs there, can tell whether the lease stayed the same in between.

use futures_util::task::AtomicWaker;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// The first greeting id: far above the database's own thread ids, so that an id tells
/// which of the two it is.
pub const FIRST_ID: u32 = 0x4000_0000;

/// The backend connection serving a client, as of one change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Serving {
    /// Bumped by every change of lease.
    pub seq: u64,
    /// The backend's thread id, while the client holds a connection.
    pub thread_id: Option<u32>,
    /// The target (index in its group's topology) of that connection.
    pub target: usize,
}

/// One client session.
#[derive(Debug)]
pub struct ClientSlot {
    /// The connection id of its greeting.
    pub id: u32,
    /// The dbproxy user it is logged in as (COM_CHANGE_USER changes it).
    user: Mutex<String>,
    /// Its target group.
    pub group: String,
    serving: Mutex<Serving>,
    killed: AtomicBool,
    /// Wakes the session's wait for its next command: a kill, or a drain starting. Only
    /// the session's own task waits on it; `woke` is the permit a wake leaves.
    attention: AtomicWaker,
    woke: AtomicBool,
    /// Where it came from (status): address, endpoint, TLS, when it logged in (seconds
    /// since the Unix epoch).
    pub origin: Origin,
    /// Statements it sent.
    pub queries: AtomicU64,
}

/// Where a client came from, for `SHOW CLIENTS` and the status page (no allocation: it is
/// kept for every client).
#[derive(Debug, Clone, Default)]
pub struct Origin {
    /// Its address; `None` for a client of a Unix socket endpoint.
    pub peer: Option<std::net::SocketAddr>,
    pub endpoint: Option<Arc<crate::stats::EndpointStats>>,
    pub tls: bool,
    pub since: f64,
}

impl Origin {
    /// The endpoint's name.
    pub fn endpoint_name(&self) -> &str {
        self.endpoint.as_ref().map_or("", |e| e.name.as_str())
    }

    /// The address, or the Unix socket it came through.
    pub fn peer_label(&self) -> String {
        match (&self.peer, &self.endpoint) {
            (Some(p), _) => p.to_string(),
            (None, Some(e)) => e.listen.clone(),
            (None, None) => String::new(),
        }
    }
}

impl ClientSlot {
    pub fn new(id: u32, user: &str, group: &str) -> Arc<Self> {
        Arc::new(ClientSlot {
            id,
            user: Mutex::new(user.to_string()),
            group: group.to_string(),
            serving: Mutex::new(Serving {
                seq: 0,
                thread_id: None,
                target: 0,
            }),
            killed: AtomicBool::new(false),
            attention: AtomicWaker::new(),
            woke: AtomicBool::new(false),
            origin: Origin::default(),
            queries: AtomicU64::new(0),
        })
    }

    /// A slot that says where its client came from.
    pub fn with_origin(id: u32, user: &str, group: &str, origin: Origin) -> Arc<Self> {
        let mut s = Self::new(id, user, group);
        if let Some(slot) = Arc::get_mut(&mut s) {
            slot.origin = origin;
        }
        s
    }

    pub fn user(&self) -> String {
        self.user.lock().clone()
    }

    pub fn set_user(&self, user: &str) {
        *self.user.lock() = user.to_string();
    }

    /// The client now holds the backend connection `thread_id` to `target`.
    pub fn serve(&self, thread_id: u32, target: usize) {
        let mut s = self.serving.lock();
        s.seq += 1;
        s.thread_id = Some(thread_id);
        s.target = target;
    }

    /// The client gave its backend connection up.
    pub fn unserve(&self) {
        let mut s = self.serving.lock();
        s.seq += 1;
        s.thread_id = None;
    }

    pub fn serving(&self) -> Serving {
        *self.serving.lock()
    }

    /// KILL CONNECTION: the session ends at its next chance.
    pub fn kill(&self) {
        self.killed.store(true, Ordering::Release);
        self.wake();
    }

    /// Makes the session look at why it should stop (killed, or a drain started); a permit
    /// is stored if it is not waiting right now, so the wake is never lost.
    pub fn wake(&self) {
        self.woke.store(true, Ordering::Release);
        self.attention.wake();
    }

    /// Resolves at the next [`Self::wake`] (or at once for one that came meanwhile). One
    /// waiter at a time: the session's task.
    pub async fn woken(&self) {
        std::future::poll_fn(|cx| {
            if self.woke.swap(false, Ordering::AcqRel) {
                return std::task::Poll::Ready(());
            }
            // Registered before the second look, so that a wake in between is not lost.
            self.attention.register(cx.waker());
            match self.woke.swap(false, Ordering::AcqRel) {
                true => std::task::Poll::Ready(()),
                false => std::task::Poll::Pending,
            }
        })
        .await
    }

    pub fn is_killed(&self) -> bool {
        self.killed.load(Ordering::Acquire)
    }

    /// Resolves once the session is killed.
    pub async fn killed(&self) {
        while !self.is_killed() {
            self.woken().await;
        }
    }
}

/// Every client session of this process, by id.
#[derive(Debug, Default)]
pub struct Clients {
    by_id: Mutex<HashMap<u32, Arc<ClientSlot>>>,
}

impl Clients {
    /// Registers a session until the returned guard is dropped.
    pub fn register(self: &Arc<Self>, slot: Arc<ClientSlot>) -> Registration {
        self.by_id.lock().insert(slot.id, slot.clone());
        Registration {
            clients: self.clone(),
            slot,
        }
    }

    /// Every session now, by id.
    pub fn list(&self) -> Vec<Arc<ClientSlot>> {
        let mut v: Vec<_> = self.by_id.lock().values().cloned().collect();
        v.sort_by_key(|s| s.id);
        v
    }

    pub fn get(&self, id: u64) -> Option<Arc<ClientSlot>> {
        let id = u32::try_from(id).ok()?;
        self.by_id.lock().get(&id).cloned()
    }

    /// The client of target group `group` that holds the backend connection `thread_id`
    /// (what `CONNECTION_ID()` said to it), if any holds it now.
    pub fn holding(&self, group: &str, thread_id: u64) -> Option<Arc<ClientSlot>> {
        let thread_id = u32::try_from(thread_id).ok()?;
        self.by_id
            .lock()
            .values()
            .find(|s| s.group == group && s.serving().thread_id == Some(thread_id))
            .cloned()
    }
}

/// A registered session; unregisters on drop.
#[derive(Debug)]
pub struct Registration {
    clients: Arc<Clients>,
    pub slot: Arc<ClientSlot>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.clients.by_id.lock().remove(&self.slot.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wake_is_kept_until_the_session_waits_and_one_from_another_thread_reaches_it() {
        use std::future::Future;
        use std::task::{Context, Poll, Waker};
        let slot = ClientSlot::new(1, "app", "default");
        let mut cx = Context::from_waker(Waker::noop());
        // A wake that came before the wait: the wait ends at once, and only once.
        slot.wake();
        assert!(std::pin::pin!(slot.woken()).poll(&mut cx).is_ready());
        let mut waiting = std::pin::pin!(slot.woken());
        assert!(waiting.as_mut().poll(&mut cx).is_pending());
        // A kill from another thread while the session waits.
        let other = slot.clone();
        std::thread::spawn(move || other.kill()).join().ok();
        assert!(matches!(waiting.as_mut().poll(&mut cx), Poll::Ready(())));
        assert!(slot.is_killed());
    }

    #[test]
    fn leases_are_sequenced_and_registrations_end_with_their_guard() {
        let clients = Arc::new(Clients::default());
        let slot = ClientSlot::new(7, "app", "default");
        let reg = clients.register(slot.clone());
        assert_eq!(clients.get(7).map(|s| s.id), Some(7));
        assert!(clients.get(8).is_none());
        assert_eq!(slot.user(), "app");
        slot.set_user("other");
        assert_eq!(slot.user(), "other");
        assert!(clients.get(u64::MAX).is_none());
        let before = slot.serving();
        slot.serve(41, 0);
        let during = slot.serving();
        assert_eq!(during.thread_id, Some(41));
        assert_eq!(clients.holding("default", 41).map(|s| s.id), Some(7));
        assert!(clients.holding("other", 41).is_none());
        assert!(during.seq > before.seq);
        slot.unserve();
        slot.serve(41, 0);
        // Same thread again, but not the same lease.
        assert_ne!(slot.serving(), during);
        assert!(!slot.is_killed());
        slot.kill();
        assert!(slot.is_killed());
        drop(reg);
        assert!(clients.get(7).is_none());
    }
}
