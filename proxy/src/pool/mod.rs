//! Per-core backend pools under one budget per target group.
//!
//! Each worker thread owns a [`CorePool`] per target group: idle connections keyed by
//! [`PoolKey`], and the local borrowers waiting for them. The `max_connections` budget is a
//! semaphore shared by all cores. A borrower that finds the budget spent and nothing idle
//! on its own core registers with the group; other cores then hand it a matching idle
//! connection (the socket moves between threads) or, failing that, close an idle one of
//! another key so that the budget frees up. Connections are only ever touched by the
//! worker that holds them.

mod budget;
mod idle;
mod key;
mod ladder;
mod waiting;

pub use budget::{Budget, Permit};
pub use key::PoolKey;
pub use waiting::{Class, Turns};

use crate::backend_conn::{self as backend, BackendConn, BackendError, ServerProfile, TlsTo};
use crate::clients::ClientSlot;
use crate::config::{PinningFilter, TargetGroupConfig};
use crate::io::{BackendAddr, Driver, Stream};
use crate::mysql::consts::{cap, errcode};
use crate::mysql::wire::ErrPacket;
use crate::secrets::BackendLogin;
use crate::session::pins::PinReason;
use crate::stats::{GaugeGuard, Latency};
use crate::tls::BackendTls;
use crate::topology::{Choice, Route, Snapshot, Topology};
use idle::{IdleConn, IdleSet};
use key::KeyHasher;
use parking_lot::{Mutex, RwLock};
use std::cell::{Cell, RefCell};
use std::hash::BuildHasherDefault;
use std::rc::Rc;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, Notify};
use waiting::{LocalWaiters, StarvingQueue, Waiter};

/// Why no backend connection could be handed out.
#[derive(Debug, thiserror::Error)]
pub enum BorrowError {
    #[error("timed out after {0:?} waiting for a free database connection in target group '{1}'")]
    Timeout(Duration, String),
    #[error("cannot open a database connection to {addr} (target group '{group}'): {source}")]
    Connect {
        addr: BackendAddr,
        group: String,
        source: BackendError,
    },
    #[error("target group '{group}': {why}")]
    Unavailable { group: String, why: String },
}

impl BorrowError {
    /// What the client whose command found no connection is told.
    pub fn told(&self) -> ErrPacket {
        let (code, state) = match self {
            BorrowError::Timeout(..) => (errcode::PROXY_BORROW_TIMEOUT, "HY000"),
            BorrowError::Connect { .. } | BorrowError::Unavailable { .. } => {
                (errcode::PROXY_BACKEND_UNAVAILABLE, "08S01")
            }
        };
        ErrPacket::new(code, state, format!("(dbproxy) {self}"))
    }
}

/// Why [`CorePool::acquire`] handed nothing out.
enum AcquireError {
    /// The chosen target is no longer the route's: choose again.
    Moved,
    /// It could not be reached: the monitor should look at it.
    Unreachable(BorrowError),
    Failed(BorrowError),
}

/// Counters a target group keeps (read by status and metrics).
#[derive(Debug, Default)]
pub struct GroupStats {
    /// Pins started, by reason (index: `PinReason::index`).
    pub pins_started: [AtomicU64; PinReason::ALL.len()],
    /// Clients pinned now, by reason.
    pub pins_active: [AtomicI64; PinReason::ALL.len()],
    pub opened: AtomicU64,
    pub closed: AtomicU64,
    pub borrowed: crate::stats::Counter,
    pub moved_between_cores: AtomicU64,
    pub borrow_timeouts: AtomicU64,
    pub connect_errors: AtomicU64,
    pub reset_errors: AtomicU64,
    /// Check-ins whose session was not what dbproxy recorded (test-only verification).
    pub checkin_violations: AtomicU64,
    /// Check-ins verified (test-only verification).
    pub checkins_verified: AtomicU64,
    /// Borrows served by an idle connection at once (no clock is read for them).
    pub borrow_immediate: crate::stats::Counter,
    /// Borrows that waited (for a new connection, another core's, or budget), by how long.
    pub borrow_wait: Latency,
    /// Sessions holding a connection in an open transaction now.
    pub in_transaction: AtomicI64,
    /// Borrowers waiting now: for a free connection or budget, for a new connection to
    /// open, or for a writer or fit reader (PgBouncer's `cl_waiting`).
    pub waiting: AtomicI64,
    /// Client statement sent to the database to its response's first packet.
    pub db_latency: Latency,
    /// Executions of a prepared statement the connection had prepared already.
    pub stmt_cache_hits: crate::stats::Counter,
    /// Prepares of a client's statement on a connection that did not have it (another
    /// connection, or evicted).
    pub stmt_reprepares: AtomicU64,
    /// A split endpoint's routing (on the writer's pool of the group).
    pub split: crate::stats::SplitStats,
}

impl GroupStats {
    /// The borrow latency histogram, immediate borrows counted as zero.
    pub fn borrow_latency(&self) -> crate::stats::HistogramSnapshot {
        self.borrow_wait
            .snapshot_with_zeros(self.borrow_immediate.get())
    }

    /// Clients pinned now for a reason other than an open transaction (RDS Proxy's
    /// "currently session pinned"; transactions are counted apart).
    pub fn pinned_now(&self) -> i64 {
        PinReason::ALL
            .iter()
            .filter(|r| **r != PinReason::Transaction)
            .map(|r| self.pins_active[r.index()].load(Ordering::Relaxed).max(0))
            .sum()
    }
    pub fn pin_started(&self, r: PinReason) {
        self.pins_started[r.index()].fetch_add(1, Ordering::Relaxed);
        self.pins_active[r.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn pin_ended(&self, r: PinReason) {
        self.pins_active[r.index()].fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection on its way from one worker to another.
type Detached = Pooled<crate::io::Detached>;

/// A handed-over connection's channel: its borrower gave up once the receiver is gone.
impl<T> Waiter for oneshot::Sender<T> {
    fn gone(&self) -> bool {
        self.is_closed()
    }
}

/// A PostgreSQL borrower on one core waiting for a connection from another.
pub struct PgHandoff {
    pub login: u64,
    pub database: String,
    /// The borrower's worker thread (its core).
    pub thread: std::thread::ThreadId,
    pub tx: oneshot::Sender<Box<dyn std::any::Any + Send>>,
}

/// State of a target group shared by all cores.
pub struct GroupShared {
    pub name: String,
    /// The protocol the group's databases speak.
    pub engine: crate::config::Engine,
    /// The pool's key in `ProxyShared::groups`: the group's name, with `/read_only` for
    /// the pool of its read-only endpoints.
    pub id: String,
    /// RDS Proxy's target role of this pool: `read_write` (the writer) or `read_only`.
    pub role: &'static str,
    /// What this pool serves: the group's writer, or its readers.
    pub route: Route,
    pub topology: Arc<Topology>,
    /// Connections borrowed now, per target (readers are chosen by the fewest; counted for
    /// reader pools only).
    pub borrowed_at: Vec<AtomicUsize>,
    /// `max_connections`, shared by every core.
    pub budget: Budget,
    /// `max_connections` as configured, and the fleet's cap on this instance (none:
    /// `usize::MAX`); the budget is the smaller.
    configured_max: AtomicUsize,
    fleet_cap: AtomicUsize,
    /// The settings a reload may change.
    settings: arc_swap::ArcSwap<PoolSettings>,
    pub idle_total: AtomicUsize,
    /// Each core's idle connections, as of its last maintenance round (status).
    cores: Mutex<Vec<Arc<AtomicUsize>>>,
    starving: Mutex<StarvingQueue<PoolKey, oneshot::Sender<Detached>>>,
    /// Entries in `starving` (stale ones included until the next clean-up): lets a
    /// check-in skip the lock in the common case where nobody starves.
    starving_len: AtomicUsize,
    /// Wakes every core's maintenance task when a borrower starts starving.
    starving_notify: Notify,
    pub init_query: String,
    /// `[proxy] verify_checkin` (for tests): check every clean check-in against the record.
    pub verify_checkin: bool,
    /// Names of temporary tables clients created (the verification looks for them).
    pub temp_tables: Mutex<std::collections::BTreeSet<Vec<u8>>>,
    pub profile: RwLock<ServerProfile>,
    pub stats: GroupStats,
    /// TLS to this group's databases.
    pub backend_tls: BackendTls,
    /// PostgreSQL pools: borrowers that found no budget left, waiting for a connection
    /// another core lets go (handed over at its release, or an idle one) or for budget
    /// (an idle connection of another login closed); `wanted_notify` wakes every core's
    /// maintenance when one starts waiting. Entries are `(login id, database, sender)`;
    /// what is sent is the PostgreSQL pool's own lease type, boxed (this room does not
    /// know it).
    pub wanted: AtomicUsize,
    pub wanted_notify: Notify,
    /// PostgreSQL pools of this group route: one per worker core.
    pub pg_cores: AtomicUsize,
    pub pg_handoff: Mutex<std::collections::VecDeque<PgHandoff>>,
    /// PostgreSQL pools: what a new server connection of each database login reported
    /// (ParameterStatus), by login id: a client's login is answered from it without a
    /// server connection.
    pub pg_params: Mutex<std::collections::HashMap<u64, Vec<(String, String)>>>,
}

impl GroupShared {
    pub fn new(
        cfg: &TargetGroupConfig,
        topology: Arc<Topology>,
        route: Route,
        verify_checkin: bool,
        backend_tls: BackendTls,
    ) -> Arc<Self> {
        let (id, role) = match route {
            Route::Writer => (cfg.name.clone(), "read_write"),
            Route::Reader { .. } => (format!("{}/read_only", cfg.name), "read_only"),
        };
        Arc::new(GroupShared {
            name: cfg.name.clone(),
            engine: cfg.engine,
            id,
            role,
            route,
            borrowed_at: crate::topology::borrowed_counters(
                crate::topology::MAX_TARGETS.max(cfg.targets.len()),
            ),
            topology,
            budget: Budget::new(if cfg.max_connections_total.is_some() {
                // Nothing until the fleet says how much (or its floor is due).
                0
            } else {
                cfg.max_connections
            }),
            configured_max: AtomicUsize::new(cfg.max_connections),
            fleet_cap: AtomicUsize::new(if cfg.max_connections_total.is_some() {
                0
            } else {
                usize::MAX
            }),
            settings: arc_swap::ArcSwap::from_pointee(PoolSettings::of(cfg)),
            idle_total: AtomicUsize::new(0),
            cores: Mutex::default(),
            starving: Mutex::default(),
            starving_len: AtomicUsize::new(0),
            starving_notify: Notify::new(),
            init_query: cfg.init_query.clone(),
            verify_checkin,
            temp_tables: Mutex::new(Default::default()),
            profile: RwLock::new(ServerProfile::default()),
            stats: GroupStats::default(),
            backend_tls,
            wanted: AtomicUsize::new(0),
            pg_cores: AtomicUsize::new(0),
            wanted_notify: Notify::new(),
            pg_handoff: Mutex::default(),
            pg_params: Mutex::default(),
        })
    }

    /// The configured name of the target at `addr` now (what `verify_full` checks).
    pub fn target_name(&self, addr: &BackendAddr) -> String {
        let snap = self.topology.load();
        snap.targets
            .iter()
            .find(|t| t.addr.as_ref() == Some(addr))
            .map(|t| t.name.clone())
            .unwrap_or_else(|| addr.to_string())
    }

    /// Backend connections open now (idle and in use, all cores).
    pub fn open_connections(&self) -> usize {
        self.budget.open()
    }

    /// `max_connections` now.
    pub fn max_connections(&self) -> usize {
        self.budget.max()
    }

    /// The settings a reload may change, as of now.
    pub fn settings(&self) -> arc_swap::Guard<Arc<PoolSettings>> {
        self.settings.load()
    }

    /// Applies a reloaded configuration of this group: the budget grows or shrinks to
    /// its `max_connections` (connections above it close as they come back, none is cut
    /// off), and timeouts, idle and lifetime limits apply from the next use.
    pub fn reconfigure(&self, cfg: &TargetGroupConfig) {
        self.settings.store(Arc::new(PoolSettings::of(cfg)));
        self.configured_max
            .store(cfg.max_connections, Ordering::Release);
        self.resize(
            cfg.max_connections
                .min(self.fleet_cap.load(Ordering::Acquire)),
        );
    }

    fn resize(&self, max: usize) {
        let shrinks = max < self.budget.max();
        self.budget.resize(max);
        if shrinks {
            // Idle connections above the new budget close at the next maintenance round.
            self.starving_notify.notify_waiters();
        }
    }

    /// Idle connections per core (as of each core's last maintenance round, at most a
    /// second ago).
    pub fn idle_per_core(&self) -> Vec<usize> {
        self.cores
            .lock()
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// Whether the budget is owed permits (`max_connections` shrank below what is open).
    pub fn over_budget(&self) -> bool {
        self.budget.over()
    }

    /// Whether `c` may still serve this pool's route (its target still has the role, in
    /// the same epoch).
    fn still_valid<S>(&self, snap: &Snapshot, c: &Pooled<S>) -> bool {
        snap.valid(self.route, c.target, c.epoch)
    }

    /// Whether any borrower may be starving (cheap; no lock).
    fn anyone_starving(&self) -> bool {
        self.starving_len.load(Ordering::Acquire) > 0
    }

    /// Locks the starving queue, dropping borrowers that gave up; the count follows.
    fn starving_queue(
        &self,
    ) -> parking_lot::MutexGuard<'_, StarvingQueue<PoolKey, oneshot::Sender<Detached>>> {
        let mut q = self.starving.lock();
        let n = q.prune();
        self.starving_len.store(n, Ordering::Release);
        q
    }

    /// Hands `conn` to a starving borrower of the same key on another core, if any.
    /// Gives it back otherwise.
    fn offer_to_starving(&self, mut conn: Detached) -> Option<Detached> {
        let mut q = self.starving_queue();
        while let Some(tx) = q.take(&conn.key) {
            self.starving_len.store(q.len(), Ordering::Release);
            match tx.send(conn) {
                Ok(()) => {
                    self.stats
                        .moved_between_cores
                        .fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                Err(back) => conn = back,
            }
        }
        Some(conn)
    }

    /// When the longest-waiting starving borrower of `key` started waiting.
    fn oldest_starving(&self, key: &PoolKey) -> Option<Duration> {
        if !self.anyone_starving() {
            return None;
        }
        self.starving_queue().oldest(key)
    }

    /// Whether a borrower matching `pred` is starving with nobody having freed budget for
    /// it yet; if so it is marked as served.
    fn claim_starving(&self, pred: impl Fn(&PoolKey) -> bool) -> bool {
        if !self.anyone_starving() {
            return false;
        }
        self.starving_queue().claim(pred)
    }
}

impl crate::fleet::FleetPool for GroupShared {
    fn usage(&self) -> (u32, u32) {
        let open = self.budget.open();
        let in_use = open.saturating_sub(self.idle_total.load(Ordering::Relaxed));
        let waiting = self.stats.waiting.load(Ordering::Relaxed).max(0) as usize;
        (open as u32, (in_use + waiting) as u32)
    }

    fn set_fleet_cap(&self, cap: usize) {
        if self.fleet_cap.swap(cap, Ordering::AcqRel) == cap {
            return;
        }
        self.resize(self.configured_max.load(Ordering::Acquire).min(cap));
    }
}

/// What a reload may change in a pool (read at each use).
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSettings {
    pub max_idle: usize,
    /// `max_connection_lifetime` (zero: none).
    pub max_lifetime: Duration,
    pub borrow_timeout: Duration,
    pub connect_timeout: Duration,
    /// `session_pinning_filters = ["exclude_variable_sets"]`: user variables that could not
    /// be read back do not pin.
    pub exclude_variable_sets: bool,
    /// `internal_query_timeout` and `query_timeout`.
    pub limits: backend::ReadLimits,
}

impl PoolSettings {
    pub fn of(cfg: &TargetGroupConfig) -> Self {
        PoolSettings {
            max_idle: cfg.max_idle(),
            max_lifetime: cfg.max_connection_lifetime,
            borrow_timeout: cfg.connection_borrow_timeout,
            connect_timeout: cfg.connect_timeout,
            exclude_variable_sets: cfg
                .session_pinning_filters
                .contains(&PinningFilter::ExcludeVariableSets),
            limits: backend::ReadLimits::of(cfg),
        }
    }
}

/// A backend connection with its share of the budget.
///
/// The connection is boxed: a `Pooled` moves through several futures and collections per
/// borrow, and moving the whole connection state each time showed in profiles.
pub struct Pooled<S> {
    pub conn: Box<BackendConn<S>>,
    pub key: PoolKey,
    permit: Permit,
    /// When it last went idle ([`coarse_now`]).
    idle_since: Duration,
    /// The client it serves (for KILL), from [`Pooled::hold`] until the pool takes the
    /// connection back.
    holder: Option<Arc<ClientSlot>>,
    /// The target (index in the group's topology) and the epoch it was opened in.
    pub target: usize,
    pub epoch: u64,
    /// Counted in the group's `borrowed_at`.
    lent: bool,
    /// The client's user's place under its `max_database_connections`, while it holds the
    /// connection.
    pub tenant: Option<crate::tenants::TenantPermit>,
}

/// Monotonic time at the kernel tick's resolution (a few ms): cheap enough to read on
/// every check-in, precise enough for idleness measured in tenths of seconds.
fn coarse_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write; CLOCK_MONOTONIC_COARSE always exists on
    // Linux, and on failure ts stays zero (the liveness check then runs).
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// A connection idle for less than this is handed out without a liveness check: one
/// `recv(MSG_PEEK)` syscall per borrow is measurable at transaction-level multiplexing
/// (hot connections go idle for microseconds), while a connection the server closed is
/// caught before reuse as soon as it has been idle a little longer. A server crash within
/// this window reaches the client as an error, as for a query in flight.
const CHECK_AFTER_IDLE: Duration = Duration::from_millis(100);

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

impl<S: Stream> Pooled<S> {
    /// Says goodbye to the backend, then gives the budget back.
    pub async fn quit(self) {
        let Pooled { conn, permit, .. } = self;
        (*conn).quit().await;
        drop(permit);
    }
}

impl<S> Pooled<S> {
    /// Records that `client` holds this connection now.
    pub fn hold(&mut self, client: &Arc<ClientSlot>) {
        client.serve(self.conn.thread_id, self.target);
        self.holder = Some(client.clone());
    }

    /// The pool has the connection back: nobody holds it.
    fn unhold(&mut self) {
        if let Some(c) = self.holder.take() {
            c.unserve();
        }
        self.tenant = None;
    }

    fn map_stream<T>(self, f: impl FnOnce(S) -> std::io::Result<T>) -> std::io::Result<Pooled<T>> {
        Ok(Pooled {
            conn: Box::new((*self.conn).map_stream(f)?),
            key: self.key,
            permit: self.permit,
            idle_since: self.idle_since,
            holder: self.holder,
            target: self.target,
            epoch: self.epoch,
            lent: self.lent,
            tenant: self.tenant,
        })
    }
}

/// Opens a backend connection of its own, outside `max_connections` and the pool (a KILL
/// must get through when every pooled connection is busy); the caller quits it.
pub async fn side_connection<D: Driver>(
    group: &GroupShared,
    addr: &BackendAddr,
    login: Arc<BackendLogin>,
) -> Result<BackendConn<D::Stream>, BackendError> {
    let deadline = std::time::Instant::now() + group.settings().connect_timeout;
    let name = group.target_name(addr);
    let open = async {
        backend::connect_login(
            || D::connect(addr),
            &login,
            cap::BACKEND_BASE,
            0,
            DEFAULT_COLLATION,
            deadline,
            TlsTo::for_addr(&group.backend_tls, &name, addr),
        )
        .await
    };
    match crate::rt::time::timeout_at(deadline + Duration::from_secs(1), Box::pin(open)).await {
        Ok(r) => r.map(|(c, _)| c),
        Err(_) => Err(BackendError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no answer within connect_timeout",
        ))),
    }
}

/// Kills the statement running on `thread_id` now, if any and if `still()` holds once its
/// query id is known, from a side connection (the pool may be saturated by the very
/// statement to kill). `KILL QUERY ID`: once that statement ended, its id names nothing,
/// so the next statement on the thread is never hit.
pub async fn kill_running_query<D: Driver>(
    group: &GroupShared,
    addr: &BackendAddr,
    login: Arc<BackendLogin>,
    thread_id: u32,
    still: impl Fn() -> bool,
) -> Result<(), BackendError> {
    let mut c = side_connection::<D>(group, addr, login).await?;
    let sql = format!("SELECT QUERY_ID FROM information_schema.PROCESSLIST WHERE ID = {thread_id}");
    let query_id = match c.query_result(&sql).await? {
        Ok(r) => r
            .rows
            .first()
            .and_then(|row| crate::mysql::resultset::parse_text_row(row, 1).ok())
            .and_then(|v| v.first().copied().flatten().map(<[u8]>::to_vec))
            .and_then(|v| String::from_utf8(v).ok()?.parse::<u64>().ok()),
        Err(_) => None,
    };
    if let Some(q) = query_id.filter(|_| still()) {
        let kill = crate::backend_script::query_packet(&format!("KILL QUERY ID {q}"));
        if let Err(e) = c
            .command(&kill, crate::mysql::command::ResponseKind::Query)
            .await?
        {
            tracing::debug!(group = %group.name, thread_id, "KILL QUERY ID {q}: {e}");
        }
    }
    c.quit().await;
    Ok(())
}

/// `KILL CONNECTION thread_id` from a side connection; a thread that ended already is fine.
pub async fn kill_thread<D: Driver>(
    group: &GroupShared,
    addr: &BackendAddr,
    login: Arc<BackendLogin>,
    thread_id: u32,
) {
    let sql = format!("KILL CONNECTION {thread_id}");
    let r = match side_connection::<D>(group, addr, login).await {
        Ok(mut c) => {
            let r = c
                .command(
                    &crate::backend_script::query_packet(&sql),
                    crate::mysql::command::ResponseKind::Query,
                )
                .await;
            c.quit().await;
            r
        }
        Err(e) => Err(e),
    };
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) if e.code == crate::mysql::consts::errcode::ER_NO_SUCH_THREAD => {}
        Ok(Err(e)) => {
            tracing::warn!(group = %group.name, thread_id, "could not kill a backend thread: {e}")
        }
        // The server is gone, and the thread with it.
        Err(BackendError::Io(e)) => {
            tracing::debug!(group = %group.name, thread_id, %addr, "could not kill a backend thread: {e}")
        }
        Err(e) => {
            tracing::warn!(group = %group.name, thread_id, "could not kill a backend thread: {e}")
        }
    }
}

/// utf8mb4_general_ci: side connections send ASCII only.
const DEFAULT_COLLATION: u8 = 45;

/// Maps keyed by [`PoolKey`], which carries its hash.
type KeyHash = BuildHasherDefault<KeyHasher>;

/// A core's borrowers waiting for a connection of their key, each with its channel.
type Waiters<S> = LocalWaiters<PoolKey, oneshot::Sender<Pooled<S>>, KeyHash>;

impl<S> IdleConn for Pooled<S> {
    fn target(&self) -> usize {
        self.target
    }
    fn epoch(&self) -> u64 {
        self.epoch
    }
    fn schema(&self) -> Option<&[u8]> {
        self.conn.session.schema.as_deref()
    }
    fn idle_since(&self) -> Duration {
        self.idle_since
    }
}

/// One core's pool for one target group.
pub struct CorePool<D: Driver> {
    pub shared: Arc<GroupShared>,
    idle: RefCell<IdleSet<PoolKey, Pooled<D::Stream>, KeyHash>>,
    /// Borrowers on this core waiting for a connection of their key.
    waiters: RefCell<Waiters<D::Stream>>,
    /// The topology generation idle connections were last checked against.
    pruned: Cell<u64>,
    /// This core's idle count, published for status.
    idle_now: Arc<AtomicUsize>,
}

impl<D: Driver> CorePool<D> {
    pub fn new(shared: Arc<GroupShared>) -> Rc<Self> {
        Rc::new(CorePool {
            idle: RefCell::default(),
            waiters: RefCell::default(),
            pruned: Cell::new(0),
            idle_now: {
                let c = Arc::new(AtomicUsize::new(0));
                shared.cores.lock().push(c.clone());
                c
            },
            shared,
        })
    }

    /// Hands out a connection for `key` on this pool's route: an idle one at once
    /// ([`CorePool::borrow_now`]), else as [`CorePool::borrow_waiting`] does.
    pub async fn borrow(
        self: &Rc<Self>,
        key: &PoolKey,
        db: Option<&[u8]>,
    ) -> Result<Pooled<D::Stream>, BorrowError> {
        match self.borrow_now(key, db) {
            Some(c) => Ok(c),
            None => self.borrow_waiting(key, db, Class::NONE).await,
        }
    }

    /// Hands out a connection for `key` on this pool's route (the writer, or the least
    /// busy fit reader) once [`CorePool::borrow_now`] found no idle one to lend at once: it
    /// waits for one, or opens one. The caller brings its session state over. While the
    /// route has no target (the writer is lost, no reader is fit and the fallback says
    /// wait) or its target is being checked after a failure, the borrower waits for the
    /// topology to change: up to the group's `connection_borrow_timeout` in all.
    pub async fn borrow_waiting(
        self: &Rc<Self>,
        key: &PoolKey,
        db: Option<&[u8]>,
        class: Class,
    ) -> Result<Pooled<D::Stream>, BorrowError> {
        let sh = &self.shared;
        let topo = &sh.topology;
        let mut start = None;
        let mut unreachable = 0;
        // Counted from the moment the borrow cannot be served at once until it returns.
        let mut _waiting = None;
        loop {
            let changed = topo.changed();
            let choice = {
                let snap = topo.load();
                if snap.generation != self.pruned.get() {
                    self.prune_stale(&snap);
                }
                snap.choose(sh.route, &sh.borrowed_at)
            };
            let why = match choice {
                Choice::Target(t, epoch) if !topo.suspected(t) => {
                    let begun = *start.get_or_insert_with(crate::rt::time::now);
                    _waiting.get_or_insert_with(|| GaugeGuard::new(&sh.stats.waiting));
                    let deadline = begun + sh.settings().borrow_timeout;
                    // Boxed: waiting or opening a connection (connect, TLS, login) is a large
                    // future, and every session's future would otherwise be sized for it,
                    // idle ones included; a borrow served by an idle connection allocates
                    // nothing.
                    match Box::pin(self.acquire(key, db, deadline, t, epoch, class)).await {
                        Ok(c) => {
                            sh.stats
                                .borrow_wait
                                .observe(crate::rt::time::now().saturating_duration_since(begun));
                            return Ok(self.lend(c));
                        }
                        Err(AcquireError::Moved) => continue,
                        Err(AcquireError::Failed(e)) => return Err(e),
                        Err(AcquireError::Unreachable(e)) => {
                            // Let the monitor look; a target it still finds fine after two
                            // such failures has another problem: say it.
                            unreachable += 1;
                            if unreachable > 2 {
                                return Err(e);
                            }
                            topo.suspect(t);
                            e.to_string()
                        }
                    }
                }
                Choice::Target(t, _) => format!(
                    "target {} is being checked",
                    topo.load().targets.get(t).map_or("?", |t| t.name.as_str())
                ),
                Choice::Wait(why) => why,
                Choice::Fail(why) => {
                    return Err(BorrowError::Unavailable {
                        group: sh.name.clone(),
                        why,
                    })
                }
            };
            let begun = *start.get_or_insert_with(crate::rt::time::now);
            _waiting.get_or_insert_with(|| GaugeGuard::new(&sh.stats.waiting));
            let borrow_timeout = sh.settings().borrow_timeout;
            if crate::rt::time::timeout_at(begun + borrow_timeout, changed)
                .await
                .is_err()
            {
                sh.stats.borrow_timeouts.fetch_add(1, Ordering::Relaxed);
                return Err(BorrowError::Unavailable {
                    group: sh.name.clone(),
                    why: format!("{why} (waited connection_borrow_timeout, {borrow_timeout:?})"),
                });
            }
        }
    }

    /// A borrow served at once by an idle connection to the route's target, if one is
    /// there (no waiting, no clock); `None` otherwise, and [`CorePool::borrow_waiting`]
    /// waits.
    pub fn borrow_now(
        self: &Rc<Self>,
        key: &PoolKey,
        db: Option<&[u8]>,
    ) -> Option<Pooled<D::Stream>> {
        let sh = &self.shared;
        let topo = &sh.topology;
        let (t, epoch) = {
            let snap = topo.load();
            if snap.generation != self.pruned.get() {
                self.prune_stale(&snap);
            }
            match snap.choose(sh.route, &sh.borrowed_at) {
                Choice::Target(t, epoch) if !topo.suspected(t) => (t, epoch),
                _ => return None,
            }
        };
        let c = self.take_idle(key, db, t, epoch)?;
        sh.stats.borrow_immediate.add(1);
        Some(self.lend(c))
    }

    /// A connection leaves the pool for a client.
    fn lend(&self, mut c: Pooled<D::Stream>) -> Pooled<D::Stream> {
        let sh = &self.shared;
        // A reload may have changed them since the connection was opened.
        c.conn.limits = sh.settings().limits;
        sh.stats.borrowed.add(1);
        match sh.route {
            // One target: nothing to choose by, and no shared counter to bounce between cores.
            Route::Writer => sh.topology.served_on_writer(),
            Route::Reader { .. } => {
                if let Some(n) = sh.borrowed_at.get(c.target) {
                    n.fetch_add(1, Ordering::Relaxed);
                    c.lent = true;
                }
            }
        }
        c
    }

    /// A connection comes back from its client.
    fn returned(&self, c: &mut Pooled<D::Stream>) {
        c.unhold();
        if std::mem::take(&mut c.lent) {
            if let Some(n) = self.shared.borrowed_at.get(c.target) {
                n.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    fn connect_error(&self, addr: BackendAddr, source: BackendError) -> AcquireError {
        self.shared
            .stats
            .connect_errors
            .fetch_add(1, Ordering::Relaxed);
        let unreachable = matches!(source, BackendError::Io(_));
        let e = BorrowError::Connect {
            addr,
            group: self.shared.name.clone(),
            source,
        };
        if unreachable {
            AcquireError::Unreachable(e)
        } else {
            AcquireError::Failed(e)
        }
    }

    /// A connection of `target` in `epoch` (idle, handed over, or opened).
    async fn acquire(
        self: &Rc<Self>,
        key: &PoolKey,
        db: Option<&[u8]>,
        deadline: std::time::Instant,
        target: usize,
        epoch: u64,
        class: Class,
    ) -> Result<Pooled<D::Stream>, AcquireError> {
        loop {
            if let Some(c) = self.take_idle(key, db, target, epoch) {
                return Ok(c);
            }
            if let Some(permit) = self.shared.budget.try_take() {
                return self.open(key, permit, target, epoch).await;
            }
            // The budget is spent: close an idle connection of another key on this core.
            if self.evict_one_local(None) {
                continue;
            }
            // Wait for a connection from this core, one moved from another core, or budget.
            let since = coarse_now();
            let (tx, mut rx) = oneshot::channel();
            self.waiters
                .borrow_mut()
                .push(key.clone(), since, class, tx);
            let (rtx, mut rrx) = oneshot::channel();
            {
                let mut q = self.shared.starving.lock();
                q.push(key.clone(), since, rtx);
                self.shared.starving_len.store(q.len(), Ordering::Release);
            }
            self.shared.starving_notify.notify_waiters();
            let budget = &self.shared.budget;
            let first = crate::rt::time::timeout_at(deadline, async {
                tokio::select! {
                    biased;
                    Ok(c) = &mut rx => Some(Got::Local(c)),
                    Ok(c) = &mut rrx => Some(Got::Moved(c)),
                    p = budget.take() => p.map(Got::Budget),
                    else => None,
                }
            })
            .await;
            // A connection may have been handed over while another branch won: never drop
            // one on the floor.
            rx.close();
            rrx.close();
            let mut got: Vec<Got<D::Stream>> = first.ok().flatten().into_iter().collect();
            got.extend(rx.try_recv().ok().map(Got::Local));
            got.extend(rrx.try_recv().ok().map(Got::Moved));
            let mut chosen = None;
            let snap = self.shared.topology.load_full();
            for g in got {
                let conn = match g {
                    Got::Local(c) => Some(c),
                    Got::Moved(c) => match c.map_stream(D::attach) {
                        Ok(c) if c.stream.idle_healthy() => Some(c),
                        Ok(c) => {
                            self.discard(c, "moved from another core but no longer healthy");
                            None
                        }
                        Err(e) => {
                            tracing::warn!("cannot adopt a connection from another core: {e}");
                            None
                        }
                    },
                    Got::Budget(p) => {
                        if chosen.is_none() {
                            chosen = Some(Err(p));
                        }
                        None
                    }
                };
                if let Some(c) = conn {
                    if !self.shared.still_valid(&snap, &c) {
                        self.close(c, "its target no longer serves this route");
                        continue;
                    }
                    match chosen {
                        Some(Ok(_)) => self.checkin(c),
                        _ => chosen = Some(Ok(c)),
                    }
                }
            }
            match chosen {
                Some(Ok(conn)) => return Ok(conn),
                Some(Err(permit)) => return self.open(key, permit, target, epoch).await,
                None if std::time::Instant::now() >= deadline => {
                    self.shared
                        .stats
                        .borrow_timeouts
                        .fetch_add(1, Ordering::Relaxed);
                    return Err(AcquireError::Failed(BorrowError::Timeout(
                        self.shared.settings().borrow_timeout,
                        self.shared.name.clone(),
                    )));
                }
                None => {}
            }
        }
    }

    /// An idle connection for `key` to `target` in `epoch`, preferring one already on
    /// `db` (see [`IdleSet::take`]); dead ones are dropped.
    fn take_idle(
        &self,
        key: &PoolKey,
        db: Option<&[u8]>,
        target: usize,
        epoch: u64,
    ) -> Option<Pooled<D::Stream>> {
        let mut dead = Vec::new();
        let c = self.idle.borrow_mut().take(
            key,
            db,
            target,
            epoch,
            coarse_now(),
            CHECK_AFTER_IDLE,
            |c| c.stream.idle_healthy(),
            &mut dead,
        );
        if c.is_some() {
            self.shared.idle_total.fetch_sub(1, Ordering::AcqRel);
        }
        for d in dead {
            self.shared.idle_total.fetch_sub(1, Ordering::AcqRel);
            self.shared.stats.closed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(group = %self.shared.name, thread_id = d.thread_id, "dropping a dead idle backend connection");
        }
        c
    }

    /// Closes idle connections whose target no longer serves this pool's route (the
    /// writer changed, a reader went away, an address moved).
    fn prune_stale(&self, snap: &Snapshot) {
        self.pruned.set(snap.generation);
        let stale = self
            .idle
            .borrow_mut()
            .remove_unless(|c| self.shared.still_valid(snap, c));
        if stale.is_empty() {
            return;
        }
        tracing::info!(group = %self.shared.name, closed = stale.len(), "closing idle connections to a target that no longer serves this route");
        self.shared
            .idle_total
            .fetch_sub(stale.len(), Ordering::AcqRel);
        for c in stale {
            self.shared.stats.closed.fetch_add(1, Ordering::Relaxed);
            crate::rt::spawn(c.quit());
        }
    }

    /// Closes one idle connection (of any key but `keep`), freeing its budget.
    fn evict_one_local(&self, keep: Option<&PoolKey>) -> bool {
        let Some(c) = self.idle.borrow_mut().evict_one(keep) else {
            return false;
        };
        tracing::debug!(group = %self.shared.name, thread_id = c.thread_id, "closing an idle connection to free the budget");
        self.shared.idle_total.fetch_sub(1, Ordering::AcqRel);
        self.shared.stats.closed.fetch_add(1, Ordering::Relaxed);
        crate::rt::spawn(c.quit());
        true
    }

    /// Opens a connection to `target`, if it still serves the route in `epoch`.
    async fn open(
        &self,
        key: &PoolKey,
        permit: Permit,
        target: usize,
        epoch: u64,
    ) -> Result<Pooled<D::Stream>, AcquireError> {
        let sh = &self.shared;
        let (addr, name) = {
            let snap = sh.topology.load();
            if !snap.valid(sh.route, target, epoch) {
                return Err(AcquireError::Moved);
            }
            match snap.targets.get(target) {
                Some(crate::topology::TargetView {
                    addr: Some(a),
                    name,
                    ..
                }) => (a.clone(), name.clone()),
                _ => return Err(AcquireError::Moved),
            }
        };
        let connect_timeout = sh.settings().connect_timeout;
        let deadline = std::time::Instant::now() + connect_timeout;
        let attempt = async {
            let wanted = cap::BACKEND_BASE | cap::SESSION_TRACK | key.behaviour;
            let (mut conn, profile) = backend::connect_login(
                || D::connect(&addr),
                &key.backend,
                wanted,
                key.ext,
                key.collation,
                deadline,
                TlsTo::for_addr(&sh.backend_tls, &name, &addr),
            )
            .await?;
            conn.limits = sh.settings().limits;
            conn.init_session(&sh.init_query, sh.verify_checkin).await?;
            Ok::<_, BackendError>((conn, profile))
        };
        // The reads inside give up at `deadline` themselves; this bounds the connect too.
        // Boxed: opening a connection (login, TLS) is rare, and its state would otherwise
        // be carried by every client session's future, idle ones included.
        let attempt = Box::pin(attempt);
        let res =
            match crate::rt::time::timeout_at(deadline + Duration::from_secs(1), attempt).await {
                Ok(r) => r,
                Err(_) => Err(BackendError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within connect_timeout ({connect_timeout:?})"),
                ))),
            };
        match res {
            Ok((conn, profile)) => {
                tracing::debug!(group = %sh.name, thread_id = conn.thread_id, open = sh.open_connections(), "opened a backend connection");
                sh.stats.opened.fetch_add(1, Ordering::Relaxed);
                if *sh.profile.read() != profile {
                    *sh.profile.write() = profile;
                }
                Ok(Pooled {
                    key: key.clone(),
                    permit,
                    conn: Box::new(conn),
                    idle_since: coarse_now(),
                    holder: None,
                    target,
                    epoch,
                    lent: false,
                    tenant: None,
                })
            }
            Err(e) => Err(self.connect_error(addr, e)),
        }
    }

    /// Takes a connection back at a transaction boundary, its session state known: handed
    /// to a waiter or kept idle as it is (the next borrower replays its own state). With
    /// the test-only `verify_checkin`, the session is first checked against the record;
    /// a connection that differs is logged, counted and closed.
    pub fn checkin_clean(self: &Rc<Self>, mut conn: Pooled<D::Stream>) {
        self.returned(&mut conn);
        if !self.shared.verify_checkin {
            self.checkin(conn);
            return;
        }
        let pool = self.clone();
        crate::rt::spawn(async move {
            let names: Vec<Vec<u8>> = pool.shared.temp_tables.lock().iter().cloned().collect();
            let stats = &pool.shared.stats;
            match conn.verify(&names).await {
                Ok(Ok(())) => {
                    stats.checkins_verified.fetch_add(1, Ordering::Relaxed);
                    pool.checkin(conn);
                }
                Ok(Err(why)) => {
                    stats.checkin_violations.fetch_add(1, Ordering::Relaxed);
                    stats.closed.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(group = %pool.shared.name, thread_id = conn.thread_id, "check-in verification failed: {why}");
                }
                Err(e) => {
                    stats.closed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(group = %pool.shared.name, thread_id = conn.thread_id, "check-in verification could not run: {e}");
                }
            }
        });
    }

    /// Takes a connection back from a client that left something behind (a transaction,
    /// locks, temporary tables, user variables): reset in the background, then handed to
    /// a waiter or kept idle.
    pub fn release(self: &Rc<Self>, mut conn: Pooled<D::Stream>) {
        self.returned(&mut conn);
        let pool = self.clone();
        crate::rt::spawn(async move {
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

    /// Drops a connection whose state is unknown (broken, or abandoned mid-response). A
    /// statement may still run there (the server does not notice a closed socket while it
    /// sleeps or waits on a lock): the server thread is killed from a connection of its
    /// own, so nothing the client started outlives it.
    pub fn discard(&self, mut conn: Pooled<D::Stream>, why: &str) {
        self.returned(&mut conn);
        tracing::debug!(group = %self.shared.name, thread_id = conn.thread_id, "closing a backend connection: {why}");
        self.shared.stats.closed.fetch_add(1, Ordering::Relaxed);
        let (creds, thread_id) = (conn.key.backend.clone(), conn.thread_id);
        let Some(addr) = self.shared.topology.load().addr(conn.target).cloned() else {
            return;
        };
        drop(conn);
        let group = self.shared.clone();
        crate::rt::spawn(async move { kill_thread::<D>(&group, &addr, creds, thread_id).await });
    }

    /// [`Self::discard`] for a connection that failed (reset, closed by the server): its
    /// target is checked at once, and borrows for it wait for that check.
    pub fn lost(&self, conn: Pooled<D::Stream>, why: &str) {
        self.shared.topology.suspect(conn.target);
        self.discard(conn, why);
    }

    /// Closes a connection with nothing running on it (COM_QUIT, budget given back).
    pub fn close(&self, mut conn: Pooled<D::Stream>, why: &str) {
        self.returned(&mut conn);
        tracing::debug!(group = %self.shared.name, thread_id = conn.thread_id, "closing a backend connection: {why}");
        self.shared.stats.closed.fetch_add(1, Ordering::Relaxed);
        crate::rt::spawn(conn.quit());
    }

    /// Climbs the check-in ladder ([`ladder`]) with a connection given back.
    fn checkin(&self, mut conn: Pooled<D::Stream>) {
        conn.idle_since = coarse_now();
        if !self.shared.still_valid(&self.shared.topology.load(), &conn) {
            self.close(conn, "its target no longer serves this route");
            return;
        }
        let max_lifetime = self.shared.settings().max_lifetime;
        let age = crate::rt::time::now().saturating_duration_since(conn.conn.created);
        if ladder::expired(age, max_lifetime) {
            self.close(conn, "max_connection_lifetime reached");
            return;
        }
        // The budget shrank below what is open (a reload, the fleet's share): this one
        // closes rather than go to the next borrower, or a pool kept busy would never
        // come down to it.
        if self.shared.over_budget() {
            self.close(conn, "over max_connections or the fleet's share");
            return;
        }
        let remote = self.shared.oldest_starving(&conn.key);
        let local = self.waiters.borrow().oldest(&conn.key);
        if ladder::remote_first(remote, local) {
            conn = match self.move_to_starving(conn) {
                Some(c) => c,
                None => return,
            };
        }
        loop {
            let Some(tx) = self.waiters.borrow_mut().pop(&conn.key) else {
                break;
            };
            match tx.send(conn) {
                Ok(()) => return,
                Err(back) => conn = back,
            }
        }
        let conn = match self.move_to_starving(conn) {
            Some(c) => c,
            None => return,
        };
        let sh = &self.shared;
        let claimed = sh.claim_starving(|k| *k != conn.key);
        let idle = sh.idle_total.load(Ordering::Acquire);
        match ladder::park(claimed, idle, sh.settings().max_idle, sh.over_budget()) {
            ladder::Park::Idle => {
                sh.idle_total.fetch_add(1, Ordering::AcqRel);
                self.idle.borrow_mut().push(conn.key.clone(), conn);
            }
            ladder::Park::Close(why) => {
                tracing::debug!(group = %sh.name, thread_id = conn.thread_id, "closing a returned connection: {why}");
                sh.stats.closed.fetch_add(1, Ordering::Relaxed);
                crate::rt::spawn(conn.quit());
            }
        }
    }

    /// Offers a connection to another core's starving borrower; `Some` gives it back.
    fn move_to_starving(&self, conn: Pooled<D::Stream>) -> Option<Pooled<D::Stream>> {
        if !self.shared.anyone_starving() || !self.shared.starving_queue().wants(&conn.key) {
            return Some(conn);
        }
        let detached = match conn.map_stream(D::detach) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!("cannot move a connection between cores: {e}");
                return None;
            }
        };
        let back = self.shared.offer_to_starving(detached)?;
        match back.map_stream(D::attach) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!("cannot take back a connection: {e}");
                None
            }
        }
    }

    /// Background duty of a core: serve other cores' starving borrowers from this core's
    /// idle connections, and drop idle connections the backend has closed.
    pub async fn maintain(self: Rc<Self>) {
        let mut dead_check = std::time::Instant::now();
        loop {
            let starving = self.shared.starving_notify.notified();
            let changed = self.shared.topology.changed();
            let _ = crate::rt::time::timeout(Duration::from_secs(1), async {
                tokio::select! {
                    _ = starving => {}
                    _ = changed => {}
                }
            })
            .await;
            let snap = self.shared.topology.load_full();
            if snap.generation != self.pruned.get() {
                self.prune_stale(&snap);
            }
            self.serve_starving();
            // max_connections shrank below what is open: idle connections go first.
            // (Each closed connection pays off one permit once it has said goodbye.)
            for _ in 0..self.shared.budget.owed() {
                if !self.evict_one_local(None) {
                    break;
                }
            }
            self.idle_now.store(self.idle_count(), Ordering::Relaxed);
            // Borrowers that gave up leave their entries behind until a connection of
            // their key comes back: forget them here.
            self.waiters.borrow_mut().prune();
            if dead_check.elapsed() >= Duration::from_secs(1) {
                dead_check = std::time::Instant::now();
                self.prune_dead();
            }
        }
    }

    fn serve_starving(&self) {
        let wanted: Vec<PoolKey> = self.shared.starving_queue().keys().cloned().collect();
        for key in wanted {
            let idle = self.idle.borrow_mut().take_any(&key);
            if let Some(c) = idle {
                self.shared.idle_total.fetch_sub(1, Ordering::AcqRel);
                if let Some(back) = self.move_to_starving(c) {
                    self.shared.idle_total.fetch_add(1, Ordering::AcqRel);
                    self.idle.borrow_mut().push(back.key.clone(), back);
                }
            } else if self.idle.borrow().has_other_than(&key)
                && self.shared.claim_starving(|k| *k == key)
            {
                self.evict_one_local(Some(&key));
            }
        }
    }

    /// Drops idle connections the backend closed (or that received bytes unasked).
    fn prune_dead(&self) {
        let gone = self
            .idle
            .borrow_mut()
            .remove_unless(|c| c.stream.idle_healthy())
            .len();
        if gone > 0 {
            self.shared.idle_total.fetch_sub(gone, Ordering::AcqRel);
            self.shared
                .stats
                .closed
                .fetch_add(gone as u64, Ordering::Relaxed);
        }
    }

    /// Closes every idle connection on this core (shutdown).
    pub async fn close_idle(&self) {
        let all = self.idle.borrow_mut().drain();
        self.shared
            .idle_total
            .fetch_sub(all.len(), Ordering::AcqRel);
        for c in all {
            c.quit().await;
        }
    }

    /// Idle connections on this core.
    pub fn idle_count(&self) -> usize {
        self.idle.borrow().len()
    }
}

enum Got<S> {
    Local(Pooled<S>),
    Moved(Detached),
    Budget(Permit),
}
