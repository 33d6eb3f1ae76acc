//! Worker threads: one runtime per core, SO_REUSEPORT listeners on every worker, per-core
//! pools; the io backend is chosen here (io_uring, or epoll as the fallback).

use crate::auth::Users;
use crate::config::{Config, IoMode};
use crate::guard::{Guard, GuardStats};
use crate::io::epoll::Epoll;
use crate::io::uring::{self, Uring};
use crate::io::{reuseport_listener, Driver};
use crate::mysql::consts::cap;
use crate::pool::{CorePool, GroupShared};
use crate::session::login::ClientTls;
use crate::tls::{BackendTls, ServerTls, TlsStats};
use crate::topology::monitor::{GroupMonitor, SystemResolver};
use crate::topology::{Route, Topology};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Why dbproxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} (endpoint '{endpoint}'): {source}")]
    Listen {
        endpoint: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("io = \"uring\" but io_uring cannot be set up here: {0}")]
    UringUnavailable(std::io::Error),
    #[error("cannot start worker thread: {0}")]
    Thread(std::io::Error),
    #[error("{0}")]
    Config(String),
    #[error("guard: {0}")]
    Guard(#[from] crate::guard::GuardError),
}

/// State every worker shares: configuration, users, target groups, counters.
pub struct ProxyShared {
    /// The configuration in force (a reload swaps it; see [`crate::reload`]).
    config: arc_swap::ArcSwap<Config>,
    users: arc_swap::ArcSwap<Users>,
    /// The file the configuration came from (reloads read it again).
    config_path: parking_lot::Mutex<Option<std::path::PathBuf>>,
    /// One reload at a time.
    reloading: parking_lot::Mutex<()>,
    /// Pools by [`GroupShared::id`]: each target group's writer pool, and its reader pool
    /// when a read-only endpoint uses the group.
    pub groups: HashMap<String, Arc<GroupShared>>,
    /// Each target group's topology, by group name.
    pub topologies: HashMap<String, Arc<Topology>>,
    /// The kernel guard's counters, when it runs.
    pub guard: Option<Arc<GuardStats>>,
    /// Client connections open now.
    pub clients: AtomicUsize,
    /// Each endpoint's client counters, in the configuration's order.
    pub endpoints: Vec<Arc<crate::stats::EndpointStats>>,
    /// When dbproxy started (status).
    pub started: std::time::Instant,
    /// Client sessions by greeting id (KILL).
    pub sessions: Arc<crate::clients::Clients>,
    /// dbproxy's certificate for clients, when one is configured.
    pub tls: Option<Arc<ServerTls>>,
    pub tls_stats: Arc<TlsStats>,
    /// Failed logins per source address.
    pub throttle: crate::auth::throttle::LoginThrottle,
    /// The secrets the configuration refers to (followed as they rotate).
    pub secrets: Option<crate::secrets::SecretStore>,
    /// Verifies IAM and JWT logins (when configured).
    pub tokens: Option<Arc<crate::auth::tokens::TokenVerifier>>,
    next_id: AtomicU32,
    shutdown: AtomicBool,
    shutdown_notify: tokio::sync::Notify,
    /// Draining (SIGTERM): accept nothing more, end sessions at their transaction's end,
    /// every one by `drain_until`.
    draining: AtomicBool,
    drain_notify: tokio::sync::Notify,
    /// `PAUSE`: statements of sessions that hold no database connection wait.
    paused: AtomicBool,
    resume_notify: tokio::sync::Notify,
    /// Statements waiting for `RESUME` now.
    pub held: std::sync::atomic::AtomicI64,
    /// Enhanced query logging (switched on from the admin console).
    pub query_log: crate::session::querylog::QueryLog,
    drain_until: parking_lot::Mutex<Option<std::time::Instant>>,
}

impl ProxyShared {
    pub fn new(
        config: Config,
        secrets: Option<crate::secrets::SecretStore>,
        guard: Option<Arc<GuardStats>>,
    ) -> Result<Arc<Self>, StartError> {
        let mut groups = HashMap::new();
        let mut topologies = HashMap::new();
        let tls_stats = Arc::new(TlsStats::default());
        let tls = if config.proxy.has_tls() {
            let t = ServerTls::load(
                std::path::Path::new(&config.proxy.tls_cert),
                std::path::Path::new(&config.proxy.tls_key),
            )
            .map_err(|e| StartError::Config(format!("proxy.tls_cert / proxy.tls_key: {e}")))?;
            Some(Arc::new(t))
        } else {
            None
        };
        for g in &config.target_groups {
            let backend_tls = BackendTls::new(g.backend_tls, &g.backend_tls_ca, tls_stats.clone())
                .map_err(|e| {
                    StartError::Config(format!("target group '{}': backend_tls_ca: {e}", g.name))
                })?;
            if g.targets.is_empty() {
                return Err(StartError::Config(format!(
                    "target group '{}' has no targets",
                    g.name
                )));
            }
            let topology = Topology::new(&g.name, &g.targets);
            let mut routes = vec![Route::Writer];
            if config
                .endpoints
                .iter()
                .any(|e| e.target_group == g.name && e.role == crate::config::Role::ReadOnly)
            {
                routes.push(Route::Reader {
                    max_lag: g.max_replication_lag,
                    fallback: g.reader_fallback,
                });
            }
            for route in routes {
                let pool = GroupShared::new(
                    g,
                    topology.clone(),
                    route,
                    config.proxy.verify_checkin,
                    backend_tls.clone(),
                );
                groups.insert(pool.id.clone(), pool);
            }
            topologies.insert(g.name.clone(), topology);
        }
        let tokens = match &secrets {
            Some(s) => crate::auth::tokens::TokenVerifier::start(&config, s.handle())
                .map_err(StartError::Config)?,
            None => None,
        };
        let throttle = crate::auth::throttle::LoginThrottle::new(
            config.proxy.login_failure_threshold,
            config.proxy.login_max_delay,
        );
        let endpoints = config
            .endpoints
            .iter()
            .map(|e| {
                let role = match e.role {
                    crate::config::Role::ReadWrite => "read_write",
                    crate::config::Role::ReadOnly => "read_only",
                };
                Arc::new(crate::stats::EndpointStats::new(
                    &e.name,
                    &e.listen,
                    &e.target_group,
                    role,
                ))
            })
            .collect();
        let users = Users::with_secrets(&config.users, secrets.as_ref());
        Ok(Arc::new(ProxyShared {
            endpoints,
            started: std::time::Instant::now(),
            users: arc_swap::ArcSwap::from_pointee(users),
            tokens,
            secrets,
            config: arc_swap::ArcSwap::from_pointee(config),
            config_path: parking_lot::Mutex::new(None),
            reloading: parking_lot::Mutex::new(()),
            throttle,
            groups,
            topologies,
            guard,
            clients: AtomicUsize::new(0),
            sessions: Arc::default(),
            tls,
            tls_stats,
            // Far from the backend's own thread ids, so that a KILL with a proxy id sent
            // straight to the backend cannot hit another client's connection.
            next_id: AtomicU32::new(crate::clients::FIRST_ID),
            shutdown: AtomicBool::new(false),
            shutdown_notify: tokio::sync::Notify::new(),
            draining: AtomicBool::new(false),
            drain_notify: tokio::sync::Notify::new(),
            paused: AtomicBool::new(false),
            resume_notify: tokio::sync::Notify::new(),
            held: std::sync::atomic::AtomicI64::new(0),
            query_log: Default::default(),
            drain_until: parking_lot::Mutex::new(None),
        }))
    }

    /// Reads dbproxy's certificate and key again (SIGHUP): new TLS handshakes use them,
    /// connected clients keep theirs; a pair that does not load leaves the old one in use.
    pub fn reload_tls(&self) {
        let Some(t) = &self.tls else {
            tracing::info!("SIGHUP: no proxy.tls_cert configured, nothing to reload");
            return;
        };
        match t.reload() {
            Ok(()) => {
                tracing::info!(cert = %self.config().proxy.tls_cert, "TLS certificate reloaded")
            }
            Err(e) => {
                tracing::error!("TLS certificate not reloaded, the previous one stays in use: {e}")
            }
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> arc_swap::Guard<Arc<Config>> {
        self.config.load()
    }

    /// The users in force.
    pub fn users(&self) -> arc_swap::Guard<Arc<Users>> {
        self.users.load()
    }

    /// Where the configuration was read from (`RELOAD` and SIGHUP read it again).
    pub fn set_config_path(&self, path: &std::path::Path) {
        *self.config_path.lock() = Some(path.to_path_buf());
    }

    /// Reads the configuration file again and applies what can change while clients stay
    /// connected: users and passwords, pool sizes and timeouts, `[proxy]` limits, the TLS
    /// certificate. An invalid file changes nothing. Returns what changed (and what needs a
    /// restart); blocks (secrets may be read), so call it off the data path.
    pub fn reload(&self) -> Result<String, String> {
        let _one = self.reloading.lock();
        let path = self
            .config_path
            .lock()
            .clone()
            .ok_or("dbproxy was not started from a configuration file")?;
        let mut new = Config::load(&path).map_err(|e| e.to_string())?;
        if let Some(store) = &self.secrets {
            store.resolve(&mut new).map_err(|e| e.join("; "))?;
        } else if !new.secrets.is_empty() {
            return Err("[[secrets]] were added: restart dbproxy to use them".into());
        }
        let old = self.config.load_full();
        let mut plan = crate::reload::plan(&old, new);
        // Targets added or removed: the monitors check the new ones and retire the others.
        for (o, n) in old
            .target_groups
            .iter()
            .zip(plan.config.target_groups.iter_mut())
        {
            if o.targets == n.targets {
                continue;
            }
            let add: Vec<String> = n
                .targets
                .iter()
                .filter(|t| !o.targets.contains(t))
                .cloned()
                .collect();
            let remove: Vec<String> = o
                .targets
                .iter()
                .filter(|t| !n.targets.contains(t))
                .cloned()
                .collect();
            let changed = match self.topologies.get(&n.name) {
                Some(t) => t.change_targets(&add, &remove),
                None => Err("no such target group running".into()),
            };
            if let Err(e) = changed {
                tracing::warn!(group = %n.name, "reload: targets not changed ({e})");
                plan.restart_needed
                    .push(format!("target_groups[{}].targets ({e})", n.name));
                n.targets = o.targets.clone();
            }
        }
        let users = Users::reloaded(&plan.config.users, self.secrets.as_ref(), &self.users());
        for g in &plan.config.target_groups {
            for pool in self.groups.values().filter(|p| p.name == g.name) {
                pool.reconfigure(g);
            }
        }
        self.users.store(Arc::new(users));
        let report = plan.report();
        for r in &plan.restart_needed {
            tracing::warn!("reload: {r} changed; it takes effect at the next restart");
        }
        self.config.store(Arc::new(plan.config));
        if self.tls.is_some() {
            self.reload_tls();
        }
        tracing::info!("configuration reloaded from {}: {report}", path.display());
        Ok(report)
    }

    /// A connection id for a client's greeting.
    pub fn next_connection_id(&self) -> u32 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Asks every worker to stop accepting and close its idle backend connections.
    pub fn shut_down(&self) {
        self.shutdown.store(true, Ordering::Release);
        self.shutdown_notify.notify_waiters();
    }

    /// Starts draining: listeners close, idle sessions are told the server is going away and
    /// closed, the others when their transaction ends or at `timeout` from now.
    pub fn start_drain(&self, timeout: Duration) {
        *self.drain_until.lock() = Some(std::time::Instant::now() + timeout);
        self.draining.store(true, Ordering::Release);
        self.drain_notify.notify_waiters();
        // Sessions waiting on their next command wait on their own slot, not on the shared
        // notification (which every command would register with, from every core).
        for s in self.sessions.list() {
            s.wake();
        }
    }

    /// `PAUSE` (`true`) or `RESUME` (`false`); whether it changed anything.
    pub fn set_paused(&self, paused: bool) -> bool {
        let was = self.paused.swap(paused, Ordering::AcqRel);
        if !paused {
            self.resume_notify.notify_waiters();
        }
        was != paused
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    /// Resolves once not paused (or draining or stopping: the session then ends).
    pub async fn resumed(&self) {
        loop {
            let n = self.resume_notify.notified();
            if !self.is_paused() || self.is_draining() || self.shutdown.load(Ordering::Acquire) {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(500), n).await;
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// When the drain ends sessions whatever they hold.
    pub fn drain_deadline(&self) -> Option<tokio::time::Instant> {
        (*self.drain_until.lock()).map(tokio::time::Instant::from_std)
    }

    /// Resolves once draining starts.
    pub async fn draining(&self) {
        loop {
            let n = self.drain_notify.notified();
            if self.is_draining() {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(500), n).await;
        }
    }

    /// Draining or stopping: accept nothing more.
    pub fn is_stopping(&self) -> bool {
        self.is_draining() || self.shutdown.load(Ordering::Acquire)
    }

    async fn wait_shutdown(&self) {
        loop {
            let n = self.shutdown_notify.notified();
            if self.shutdown.load(Ordering::Acquire) {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(500), n).await;
        }
    }
}

/// The io backend chosen for this run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoBackend {
    Uring,
    Epoll,
}

/// Resolves `io = auto|uring|epoll` against what this host allows.
pub fn choose_io(mode: IoMode) -> Result<IoBackend, StartError> {
    match mode {
        IoMode::Epoll => Ok(IoBackend::Epoll),
        IoMode::Uring => uring::available()
            .map(|_| IoBackend::Uring)
            .map_err(StartError::UringUnavailable),
        IoMode::Auto => match uring::available() {
            Ok(()) => Ok(IoBackend::Uring),
            Err(e) => {
                tracing::warn!("io_uring cannot be set up here ({e}); using epoll");
                Ok(IoBackend::Epoll)
            }
        },
    }
}

/// A running proxy: its worker threads.
pub struct Running {
    pub shared: Arc<ProxyShared>,
    pub io: IoBackend,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Detaches on drop (unless pinned).
    _guard: Option<Guard>,
}

impl Running {
    /// SIGTERM: stops accepting, tells idle clients the server is going away, lets
    /// transactions in flight finish for up to `timeout`, then stops (see [`Self::stop`]).
    pub fn drain(self, timeout: Duration) {
        let clients = self.shared.clients.load(Ordering::Acquire);
        tracing::info!(clients, "draining: new connections refused, clients closed at their transaction's end (shutdown_timeout {timeout:?})");
        self.shared.start_drain(timeout);
        let deadline = std::time::Instant::now() + timeout;
        while self.shared.clients.load(Ordering::Acquire) > 0
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        match self.shared.clients.load(Ordering::Acquire) {
            0 => tracing::info!("drained: no client left"),
            n => tracing::warn!(
                clients = n,
                "shutdown_timeout reached: closing the clients still in a transaction (it is rolled back)"
            ),
        }
        self.stop(Duration::from_secs(2));
    }

    /// Stops accepting, closes idle backend connections (COM_QUIT), waits for workers.
    pub fn stop(self, grace: Duration) {
        self.shared.shut_down();
        let deadline = std::time::Instant::now() + grace;
        for t in self.threads {
            while !t.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Starts the workers. Listeners are bound here so that bind errors stop the start.
/// `secrets`: the store `config`'s references were resolved from (they are then followed
/// as they rotate).
pub fn start(
    config: Config,
    secrets: Option<crate::secrets::SecretStore>,
) -> Result<Running, StartError> {
    let io = choose_io(config.proxy.io)?;
    let workers = match config.proxy.workers {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        n => n,
    };
    raise_fd_limit();
    // The guard first: dbproxy moves into its own cgroup before it opens any connection.
    let guard = if config.guard.enabled {
        let mut targets = Vec::new();
        for g in &config.target_groups {
            for t in &g.targets {
                // A name that does not resolve yet is protected once the monitor finds it.
                match crate::config::parse_target(t) {
                    Ok(a) => targets.extend(a),
                    Err(e) => {
                        tracing::warn!(target = %t, "guard: not protected until it resolves: {e}")
                    }
                }
            }
        }
        Some(Guard::start(&config.guard, &targets)?)
    } else {
        None
    };
    let shared = ProxyShared::new(config, secrets, guard.as_ref().map(|g| g.stats.clone()))?;
    if let Some(s) = &shared.secrets {
        s.start_refresh();
    }
    start_monitor(&shared, guard.as_ref().map(|g| g.protected.clone()))?;
    learn_server_profiles(&shared);
    let cfg = shared.config();
    let admin_addr = |key: &str, v: &str| -> Result<Option<SocketAddr>, StartError> {
        if v.is_empty() {
            return Ok(None);
        }
        v.parse()
            .map(Some)
            .map_err(|_| StartError::Config(format!("bad {key} {v}")))
    };
    let http = admin_addr("admin.listen", &cfg.admin.listen)?;
    let sql = admin_addr("admin.sql_listen", &cfg.admin.sql_listen)?;
    if http.is_some() || sql.is_some() {
        crate::admin::start(http, sql, shared.clone()).map_err(|source| StartError::Listen {
            endpoint: "admin".into(),
            addr: http
                .or(sql)
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
            source,
        })?;
    }
    // A Unix socket endpoint is one socket (SO_REUSEPORT is for IP): a thread accepts on it
    // and hands the connections to the workers in turn.
    let mut unix: HashMap<String, Vec<UnixInbox>> = HashMap::new();
    let mut threads = Vec::with_capacity(workers + 1);
    for e in &cfg.endpoints {
        if let Some(path) = e.unix_path() {
            let (inboxes, acceptor) = crate::io::unix_listen::start(path, workers, shared.clone())
                .map_err(|source| StartError::Listen {
                    endpoint: e.name.clone(),
                    addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                    source,
                })?;
            unix.insert(e.name.clone(), inboxes);
            threads.push(acceptor);
        }
    }
    let mut per_worker = Vec::with_capacity(workers);
    for _ in 0..workers {
        let mut ls = Vec::new();
        for (e, stats) in cfg.endpoints.iter().zip(&shared.endpoints) {
            let socket = match unix.get_mut(&e.name).and_then(Vec::pop) {
                Some(inbox) => ListenSocket::Unix(inbox),
                None => {
                    let addr: SocketAddr = e.listen.parse().map_err(|_| {
                        StartError::Config(format!("bad listen address {}", e.listen))
                    })?;
                    let l = reuseport_listener(addr).map_err(|source| StartError::Listen {
                        endpoint: e.name.clone(),
                        addr,
                        source,
                    })?;
                    ListenSocket::Tcp(l)
                }
            };
            let pool = match e.role {
                crate::config::Role::ReadWrite => e.target_group.clone(),
                crate::config::Role::ReadOnly => format!("{}/read_only", e.target_group),
            };
            let tls = match e.tls_mode(&cfg.proxy) {
                crate::config::ClientTls::Disabled => ClientTls::Off,
                crate::config::ClientTls::Optional => ClientTls::Offered,
                crate::config::ClientTls::Required => ClientTls::Required,
            };
            ls.push(Listener {
                pool,
                tls,
                socket,
                stats: stats.clone(),
            });
        }
        per_worker.push(ls);
    }
    for (i, ls) in per_worker.into_iter().enumerate() {
        let sh = shared.clone();
        let t = std::thread::Builder::new()
            .name(format!("dbproxy-w{i}"))
            .spawn(move || {
                crate::stats::set_stripe(i);
                match io {
                    IoBackend::Uring => run_uring(sh, ls),
                    IoBackend::Epoll => run_epoll(sh, ls),
                }
            })
            .map_err(StartError::Thread)?;
        threads.push(t);
    }
    for e in &cfg.endpoints {
        tracing::info!(endpoint = %e.name, listen = %e.listen, io = ?io, workers, "dbproxy listening");
    }
    Ok(Running {
        shared,
        io,
        threads,
        _guard: guard,
    })
}

/// One endpoint's listening socket on one worker.
struct Listener {
    /// The pool it serves ([`GroupShared::id`]).
    pool: String,
    tls: ClientTls,
    socket: ListenSocket,
    stats: Arc<crate::stats::EndpointStats>,
}

type UnixInbox = tokio::sync::mpsc::UnboundedReceiver<crate::io::Detached>;

/// Where a worker's clients of one endpoint come from.
enum ListenSocket {
    /// Its own SO_REUSEPORT socket.
    Tcp(std::net::TcpListener),
    /// Its share of a Unix socket endpoint's connections.
    Unix(UnixInbox),
}

fn run_uring(shared: Arc<ProxyShared>, listeners: Vec<Listener>) {
    let mut b = tokio_uring::builder();
    b.entries(uring::RING_ENTRIES);
    match tokio_uring::Runtime::new(&b) {
        Ok(rt) => rt.block_on(worker::<Uring>(shared, listeners)),
        Err(e) => tracing::error!("worker cannot start its io_uring runtime: {e}"),
    }
}

fn run_epoll(shared: Arc<ProxyShared>, listeners: Vec<Listener>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("worker cannot start its runtime: {e}");
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, worker::<Epoll>(shared, listeners));
}

/// One worker: its pools, its accept loops, until shutdown.
async fn worker<D: Driver>(shared: Arc<ProxyShared>, listeners: Vec<Listener>) {
    let mut pools: HashMap<String, Rc<CorePool<D>>> = HashMap::new();
    for (name, g) in &shared.groups {
        let pool = CorePool::<D>::new(g.clone());
        tokio::task::spawn_local(pool.clone().maintain());
        pools.insert(name.clone(), pool);
    }
    let mut accepts = Vec::new();
    for Listener {
        pool,
        tls,
        socket,
        stats,
    } in listeners
    {
        let group = pool;
        let Some(pool) = pools.get(&group).cloned() else {
            continue;
        };
        let sh = shared.clone();
        let socket = match socket {
            ListenSocket::Tcp(s) => s,
            ListenSocket::Unix(mut inbox) => {
                accepts.push(tokio::task::spawn_local(async move {
                    // Unix clients have no address: they are "local" (127.0.0.1:0) to the
                    // login throttle and in logs.
                    let local = SocketAddr::from(([127, 0, 0, 1], 0));
                    while let Some(d) = inbox.recv().await {
                        match D::attach(d) {
                            Ok(stream) => {
                                tokio::task::spawn_local(crate::conn::serve::<D>(
                                    sh.clone(),
                                    pool.clone(),
                                    stream,
                                    local,
                                    tls,
                                    stats.clone(),
                                ));
                            }
                            Err(e) => tracing::warn!("cannot adopt a Unix socket client: {e}"),
                        }
                    }
                }));
                continue;
            }
        };
        let listener = match D::listener(socket) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("cannot register listener: {e}");
                continue;
            }
        };
        accepts.push(tokio::task::spawn_local(async move {
            loop {
                match D::accept(&listener).await {
                    Ok((stream, peer)) => {
                        tokio::task::spawn_local(crate::conn::serve::<D>(
                            sh.clone(),
                            pool.clone(),
                            stream,
                            peer,
                            tls,
                            stats.clone(),
                        ));
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }));
    }
    // Draining or stopping: the listeners close (new connections are refused).
    tokio::select! {
        _ = shared.draining() => {}
        _ = shared.wait_shutdown() => {}
    }
    for a in accepts {
        a.abort();
    }
    shared.wait_shutdown().await;
    for pool in pools.values() {
        pool.close_idle().await;
    }
}

/// Starts the health-check monitor of every target group, and waits (up to each group's
/// `connect_timeout`) for its first decision, so that the first clients find the roles
/// known.
fn start_monitor(
    shared: &Arc<ProxyShared>,
    guard: Option<Arc<crate::guard::Protected>>,
) -> Result<(), StartError> {
    let mut monitors = Vec::new();
    for g in &shared.config().target_groups {
        let Some(topology) = shared.topologies.get(&g.name) else {
            continue;
        };
        let login = match (&g.monitor_user, &g.monitor_password) {
            (Some(user), Some(password)) => {
                crate::secrets::BackendLogin::from_values(user, password, shared.secrets.as_ref())
            }
            _ => match first_login(shared) {
                Some(l) => l,
                None => return Err(StartError::Config("no users".into())),
            },
        };
        monitors.push(GroupMonitor {
            topology: topology.clone(),
            targets: g.targets.clone(),
            interval: g.health_check_interval,
            // A check gives up after the interval (at least 200 ms, at most connect_timeout).
            timeout: g
                .health_check_interval
                .max(Duration::from_millis(200))
                .min(g.connect_timeout),
            failure_threshold: g.failure_threshold,
            login,
            tls: shared
                .groups
                .get(&g.name)
                .map(|p| p.backend_tls.clone())
                .unwrap_or_else(BackendTls::disabled),
        });
    }
    let protect: crate::topology::monitor::Protector =
        guard.map(|p| p as Arc<dyn crate::topology::monitor::Protect>);
    crate::topology::monitor::start(monitors, Arc::new(SystemResolver), protect)
        .map_err(StartError::Thread)?;
    for g in &shared.config().target_groups {
        let Some(t) = shared.topologies.get(&g.name) else {
            continue;
        };
        let until = std::time::Instant::now() + g.connect_timeout;
        while t.stats.checks.load(Ordering::Relaxed) < g.targets.len() as u64
            && std::time::Instant::now() < until
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        let snap = t.load();
        match snap.writer.and_then(|w| snap.targets.get(w)) {
            Some(w) => tracing::info!(group = %g.name, writer = %w.name, "target group ready"),
            None => tracing::warn!(group = %g.name, "no writer found yet: statements wait for one"),
        }
    }
    Ok(())
}

/// Logs in once to each target group's writer (or any target that is up) to learn the
/// version and capabilities clients are greeted with. A backend that is down now is
/// learned at its first use.
fn learn_server_profiles(shared: &Arc<ProxyShared>) {
    let Some(login) = first_login(shared) else {
        return;
    };
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    for g in shared.groups.values() {
        let target = {
            let snap = g.topology.load();
            let up = snap.targets.iter().position(|t| t.up);
            snap.writer
                .or(up)
                .and_then(|i| snap.targets.get(i))
                .and_then(|t| Some((t.addr.clone()?, t.name.clone())))
        };
        let Some((addr, name)) = target else {
            tracing::warn!(group = %g.name, "no target is up yet");
            continue;
        };
        let res = rt.block_on(async {
            let connect_timeout = g.settings().connect_timeout;
            tokio::time::timeout(connect_timeout, async {
                let deadline = tokio::time::Instant::now() + connect_timeout;
                let tls = crate::backend_conn::TlsTo::for_addr(&g.backend_tls, &name, &addr);
                let (conn, profile) = crate::backend_conn::connect_login(
                    || Epoll::connect(&addr),
                    &login,
                    cap::BACKEND_BASE,
                    0,
                    45,
                    deadline,
                    tls,
                )
                .await?;
                conn.quit().await;
                Ok::<_, crate::backend_conn::BackendError>(profile)
            })
            .await
        });
        match res {
            Ok(Ok(p)) => {
                tracing::info!(group = %g.name, version = %p.version, "backend reached");
                *g.profile.write() = p;
            }
            Ok(Err(e)) => {
                tracing::warn!(group = %g.name, "backend {addr} not usable yet: {e}")
            }
            Err(_) => {
                tracing::warn!(group = %g.name, "backend {addr} did not answer within connect_timeout")
            }
        }
    }
}

/// The first user's database login (the monitor's and the profile probe's when no
/// monitor user is set).
fn first_login(shared: &ProxyShared) -> Option<Arc<crate::secrets::BackendLogin>> {
    let u = shared.config().users.first()?.name.clone();
    shared.users().get(u.as_bytes()).map(|u| u.backend.clone())
}

/// Raises the open-files limit to its hard maximum: every client and backend connection
/// is a descriptor, and the usual soft limit of 1024 is far below what a proxy needs.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                tracing::debug!(
                    from = lim.rlim_cur,
                    to = lim.rlim_max,
                    "raised the open-files limit"
                );
            }
        }
    }
}
