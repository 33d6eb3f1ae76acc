//! Per-core backend pools under one budget per target group.
//!
//! Each worker thread owns a [`CorePool`] per target group: idle connections keyed by
//! (backend user, behaviour capabilities, collation), and the local borrowers waiting for
//! them. The `max_connections` budget is a semaphore shared by all cores; a borrower that
//! finds the budget spent asks the other cores to close idle connections they can spare.

pub mod backend;

use crate::config::TargetGroupConfig;
use crate::io::{idle_socket_is_healthy, Driver, Stream};
use crate::mysql::backend::Credentials;
use crate::mysql::consts::cap;
use backend::{BackendConn, BackendError, Database, ServerProfile};
use parking_lot::RwLock;
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit, Semaphore};

/// Why no backend connection could be handed out.
#[derive(Debug, thiserror::Error)]
pub enum BorrowError {
    #[error("timed out after {0:?} waiting for a free database connection in target group '{1}'")]
    Timeout(Duration, String),
    #[error("cannot open a database connection to {addr} (target group '{group}'): {source}")]
    Connect {
        addr: SocketAddr,
        group: String,
        source: BackendError,
    },
}

/// What a pooled connection was negotiated for: only clients that match may use it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub backend_user: Rc<str>,
    /// The client's `cap::BEHAVIOUR` bits.
    pub behaviour: u32,
    pub collation: u8,
}

/// Counters a target group keeps (read by status and metrics).
#[derive(Debug, Default)]
pub struct GroupStats {
    pub opened: AtomicU64,
    pub closed: AtomicU64,
    pub borrowed: AtomicU64,
    pub borrow_timeouts: AtomicU64,
    pub connect_errors: AtomicU64,
    pub reset_errors: AtomicU64,
}

/// State of a target group shared by all cores.
pub struct GroupShared {
    pub name: String,
    pub writer: SocketAddr,
    pub budget: Arc<Semaphore>,
    pub max_connections: usize,
    pub max_idle: usize,
    pub idle_total: AtomicUsize,
    /// Borrowers (any core) waiting because the budget is spent.
    pub starving: AtomicUsize,
    /// Idle connections other cores were asked to close.
    pub evict_debt: AtomicUsize,
    pub evict: Notify,
    pub borrow_timeout: Duration,
    pub connect_timeout: Duration,
    pub init_query: String,
    pub profile: RwLock<ServerProfile>,
    pub stats: GroupStats,
}

impl GroupShared {
    pub fn new(cfg: &TargetGroupConfig, writer: SocketAddr) -> Arc<Self> {
        Arc::new(GroupShared {
            name: cfg.name.clone(),
            writer,
            budget: Arc::new(Semaphore::new(cfg.max_connections)),
            max_connections: cfg.max_connections,
            max_idle: cfg.max_idle_connections,
            idle_total: AtomicUsize::new(0),
            starving: AtomicUsize::new(0),
            evict_debt: AtomicUsize::new(0),
            evict: Notify::new(),
            borrow_timeout: cfg.connection_borrow_timeout,
            connect_timeout: cfg.connect_timeout,
            init_query: cfg.init_query.clone(),
            profile: RwLock::new(ServerProfile::default()),
            stats: GroupStats::default(),
        })
    }

    /// Backend connections open now (idle and in use, all cores).
    pub fn open_connections(&self) -> usize {
        self.max_connections - self.budget.available_permits()
    }
}

/// A backend connection with its share of the budget.
pub struct Pooled<S> {
    pub conn: BackendConn<S>,
    pub key: PoolKey,
    _permit: OwnedSemaphorePermit,
}

impl<S: Stream> Pooled<S> {
    /// Says goodbye to the backend, then gives the budget back.
    pub async fn quit(self) {
        let Pooled { conn, _permit, .. } = self;
        conn.quit().await;
    }
}

impl<S> std::ops::Deref for Pooled<S> {
    type Target = BackendConn<S>;
    fn deref(&self) -> &BackendConn<S> {
        &self.conn
    }
}

impl<S> std::ops::DerefMut for Pooled<S> {
    fn deref_mut(&mut self) -> &mut BackendConn<S> {
        &mut self.conn
    }
}

/// One core's pool for one target group.
pub struct CorePool<D: Driver> {
    pub shared: Arc<GroupShared>,
    idle: RefCell<HashMap<PoolKey, Vec<Pooled<D::Stream>>>>,
    waiters: RefCell<HashMap<PoolKey, VecDeque<oneshot::Sender<Pooled<D::Stream>>>>>,
}

/// Decrements a counter when dropped (a waiter that gives up or is cancelled).
struct CountGuard<'a>(&'a AtomicUsize);
impl Drop for CountGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<D: Driver> CorePool<D> {
    pub fn new(shared: Arc<GroupShared>) -> Rc<Self> {
        Rc::new(CorePool {
            shared,
            idle: RefCell::default(),
            waiters: RefCell::default(),
        })
    }

    /// Hands out a connection for `key` whose default database is `db`; waits up to the
    /// group's `connection_borrow_timeout`. On `Ok(Err(e))` the connection was fine but the
    /// server refused `db` (the connection went back to the pool).
    pub async fn borrow(
        self: &Rc<Self>,
        key: &PoolKey,
        creds: &Arc<Credentials>,
        db: Option<&[u8]>,
    ) -> Result<Pooled<D::Stream>, BorrowError> {
        let deadline = tokio::time::Instant::now() + self.shared.borrow_timeout;
        let mut conn = self.acquire(key, creds, db, deadline).await?;
        self.shared.stats.borrowed.fetch_add(1, Ordering::Relaxed);
        if db.is_none() && conn.database != Database::None {
            // Clear the default database another client left: a session reset.
            if let Err(e) = self.prepare_clean(&mut conn).await {
                return Err(self.connect_error(e));
            }
        }
        Ok(conn)
    }

    async fn prepare_clean(&self, conn: &mut Pooled<D::Stream>) -> Result<(), BackendError> {
        conn.change_user().await?;
        if !self.shared.init_query.is_empty() {
            conn.query(&self.shared.init_query).await?;
        }
        Ok(())
    }

    fn connect_error(&self, source: BackendError) -> BorrowError {
        self.shared
            .stats
            .connect_errors
            .fetch_add(1, Ordering::Relaxed);
        BorrowError::Connect {
            addr: self.shared.writer,
            group: self.shared.name.clone(),
            source,
        }
    }

    async fn acquire(
        self: &Rc<Self>,
        key: &PoolKey,
        creds: &Arc<Credentials>,
        db: Option<&[u8]>,
        deadline: tokio::time::Instant,
    ) -> Result<Pooled<D::Stream>, BorrowError> {
        loop {
            if let Some(c) = self.take_idle(key, db) {
                return Ok(c);
            }
            if let Ok(permit) = self.shared.budget.clone().try_acquire_owned() {
                return self.open(key, creds, permit).await;
            }
            // The budget is spent: close an idle connection of another key on this core.
            if self.evict_one_local() {
                continue;
            }
            let (tx, rx) = oneshot::channel();
            self.waiters
                .borrow_mut()
                .entry(key.clone())
                .or_default()
                .push_back(tx);
            self.shared.starving.fetch_add(1, Ordering::AcqRel);
            let _starving = CountGuard(&self.shared.starving);
            self.shared.evict_debt.fetch_add(1, Ordering::AcqRel);
            self.shared.evict.notify_waiters();
            let budget = self.shared.budget.clone();
            let got = tokio::time::timeout_at(deadline, async {
                tokio::select! {
                    c = rx => c.ok().map(Ok),
                    p = budget.acquire_owned() => p.ok().map(Err),
                }
            })
            .await;
            let _ = self
                .shared
                .evict_debt
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| d.checked_sub(1));
            match got {
                Ok(Some(Ok(conn))) => return Ok(conn),
                Ok(Some(Err(permit))) => return self.open(key, creds, permit).await,
                Ok(None) => continue,
                Err(_) => {
                    self.shared
                        .stats
                        .borrow_timeouts
                        .fetch_add(1, Ordering::Relaxed);
                    return Err(BorrowError::Timeout(
                        self.shared.borrow_timeout,
                        self.shared.name.clone(),
                    ));
                }
            }
        }
    }

    /// An idle connection for `key`, preferring one already on `db`; dead ones are dropped.
    fn take_idle(&self, key: &PoolKey, db: Option<&[u8]>) -> Option<Pooled<D::Stream>> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(key)?;
        let want = db.map_or(Database::None, |d| Database::Known(d.to_vec()));
        while !list.is_empty() {
            let i = list
                .iter()
                .rposition(|c| c.database == want)
                .unwrap_or(list.len() - 1);
            let c = list.swap_remove(i);
            self.shared.idle_total.fetch_sub(1, Ordering::AcqRel);
            if idle_socket_is_healthy(c.stream.raw_fd()) {
                return Some(c);
            }
            self.shared.stats.closed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(group = %self.shared.name, thread_id = c.thread_id, "dropping a dead idle backend connection");
        }
        None
    }

    fn evict_one_local(&self) -> bool {
        let mut idle = self.idle.borrow_mut();
        for list in idle.values_mut() {
            if let Some(c) = list.pop() {
                self.shared.idle_total.fetch_sub(1, Ordering::AcqRel);
                self.shared.stats.closed.fetch_add(1, Ordering::Relaxed);
                tokio::task::spawn_local(c.quit());
                return true;
            }
        }
        false
    }

    async fn open(
        &self,
        key: &PoolKey,
        creds: &Arc<Credentials>,
        permit: OwnedSemaphorePermit,
    ) -> Result<Pooled<D::Stream>, BorrowError> {
        let sh = &self.shared;
        let attempt = async {
            let stream = D::connect(sh.writer).await?;
            let wanted = cap::BACKEND_BASE | key.behaviour;
            let (mut conn, profile) =
                BackendConn::login(stream, creds.clone(), wanted, key.collation).await?;
            if !sh.init_query.is_empty() {
                conn.query(&sh.init_query).await?;
            }
            Ok::<_, BackendError>((conn, profile))
        };
        let res = match tokio::time::timeout(sh.connect_timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(BackendError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no answer within connect_timeout ({:?})",
                    sh.connect_timeout
                ),
            ))),
        };
        match res {
            Ok((conn, profile)) => {
                sh.stats.opened.fetch_add(1, Ordering::Relaxed);
                if *sh.profile.read() != profile {
                    *sh.profile.write() = profile;
                }
                Ok(Pooled {
                    conn,
                    key: key.clone(),
                    _permit: permit,
                })
            }
            Err(e) => Err(self.connect_error(e)),
        }
    }

    /// Takes a connection back from a client that is done with it: reset in the
    /// background, then handed to a waiter or kept idle.
    pub fn release(self: &Rc<Self>, mut conn: Pooled<D::Stream>) {
        let pool = self.clone();
        tokio::task::spawn_local(async move {
            let init = pool.shared.init_query.clone();
            match conn.reset(&init).await {
                Ok(()) => pool.checkin(conn),
                Err(e) => {
                    pool.shared
                        .stats
                        .reset_errors
                        .fetch_add(1, Ordering::Relaxed);
                    pool.shared.stats.closed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(group = %pool.shared.name, thread_id = conn.thread_id, "closing a backend connection that failed to reset: {e}");
                }
            }
        });
    }

    /// Drops a connection whose state is unknown (broken, or abandoned mid-response).
    pub fn discard(&self, conn: Pooled<D::Stream>) {
        self.shared.stats.closed.fetch_add(1, Ordering::Relaxed);
        drop(conn);
    }

    fn checkin(&self, mut conn: Pooled<D::Stream>) {
        // A waiter on this core for the same key gets it directly.
        loop {
            let tx = self
                .waiters
                .borrow_mut()
                .get_mut(&conn.key)
                .and_then(|q| q.pop_front());
            let Some(tx) = tx else { break };
            match tx.send(conn) {
                Ok(()) => return,
                Err(back) => conn = back,
            }
        }
        let sh = &self.shared;
        let spare = sh.starving.load(Ordering::Acquire) > 0;
        if spare || sh.idle_total.load(Ordering::Acquire) >= sh.max_idle {
            sh.stats.closed.fetch_add(1, Ordering::Relaxed);
            tokio::task::spawn_local(conn.quit());
            return;
        }
        sh.idle_total.fetch_add(1, Ordering::AcqRel);
        self.idle
            .borrow_mut()
            .entry(conn.key.clone())
            .or_default()
            .push(conn);
    }

    /// Background duty of a core: close idle connections other cores' borrowers need the
    /// budget for, and drop idle connections the backend has closed.
    pub async fn maintain(self: Rc<Self>) {
        loop {
            let notified = self.shared.evict.notified();
            let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
            while self
                .shared
                .evict_debt
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| d.checked_sub(1))
                .is_ok()
            {
                if !self.evict_one_local() {
                    self.shared.evict_debt.fetch_add(1, Ordering::AcqRel);
                    break;
                }
            }
            self.prune_dead();
        }
    }

    fn prune_dead(&self) {
        let mut idle = self.idle.borrow_mut();
        for list in idle.values_mut() {
            let before = list.len();
            list.retain(|c| idle_socket_is_healthy(c.stream.raw_fd()));
            let gone = before - list.len();
            if gone > 0 {
                self.shared.idle_total.fetch_sub(gone, Ordering::AcqRel);
                self.shared
                    .stats
                    .closed
                    .fetch_add(gone as u64, Ordering::Relaxed);
            }
        }
        idle.retain(|_, l| !l.is_empty());
    }

    /// Closes every idle connection on this core (shutdown).
    pub async fn close_idle(&self) {
        let all: Vec<_> = self
            .idle
            .borrow_mut()
            .drain()
            .flat_map(|(_, l)| l)
            .collect();
        self.shared
            .idle_total
            .fetch_sub(all.len(), Ordering::AcqRel);
        for c in all {
            c.quit().await;
        }
    }

    /// Idle connections on this core.
    pub fn idle_count(&self) -> usize {
        self.idle.borrow().values().map(Vec::len).sum()
    }
}
