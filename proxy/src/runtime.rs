//! Worker threads: one runtime per core, SO_REUSEPORT listeners on every worker, per-core
//! pools; the io backend is chosen here (io_uring, or epoll as the fallback).

use crate::config::{Config, Engine, IoMode};
use crate::guard::Guard;
use crate::io::epoll::Epoll;
use crate::io::ring::Ring;
use crate::io::{reuseport_listener, Driver};
use crate::mysql::consts::cap;
use crate::pg_pool::PgPool;
use crate::pool::CorePool;
use crate::session::login::ClientTls;
pub use crate::shared::{ProxyShared, StartError};
use crate::tls::BackendTls;
use crate::topology::monitor::{GroupMonitor, SystemResolver};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

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
        IoMode::Uring => crate::rt::available()
            .map(|_| IoBackend::Uring)
            .map_err(StartError::UringUnavailable),
        IoMode::Auto => match crate::rt::available() {
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
                match crate::target::parse_target(t) {
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
    start_fleet(&shared)?;
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
            let sh = shared.clone();
            let stopping = Arc::new(move || sh.is_stopping());
            let (inboxes, acceptor) = crate::io::unix_listen::start(path, workers, stopping)
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
            let split = e.read_write_split.then(|| {
                let g = cfg.target_groups.iter().find(|g| g.name == e.target_group);
                let split = crate::routing::Split {
                    causal: e.causal_reads,
                    timeout: e.causal_reads_timeout,
                    max_lag: g.and_then(|g| g.max_replication_lag),
                    check_every: g.map_or(Duration::from_secs(1), |g| g.health_check_interval),
                };
                (split, format!("{}/read_only", e.target_group))
            });
            ls.push(Listener {
                pool,
                split,
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
    /// A split endpoint's settings and the pool of its readers.
    split: Option<(crate::routing::Split, String)>,
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
    if let Err(e) = crate::rt::block_on(crate::rt::Flavor::Ring, worker::<Ring>(shared, listeners))
    {
        tracing::error!("worker's io_uring runtime failed: {e}");
    }
}

fn run_epoll(shared: Arc<ProxyShared>, listeners: Vec<Listener>) {
    if let Err(e) =
        crate::rt::block_on(crate::rt::Flavor::Epoll, worker::<Epoll>(shared, listeners))
    {
        tracing::error!("worker's epoll runtime failed: {e}");
    }
}

/// One worker: its pools, its accept loops, until shutdown.
async fn worker<D: Driver>(shared: Arc<ProxyShared>, listeners: Vec<Listener>) {
    let mut pools: HashMap<String, CorePools<D>> = HashMap::new();
    for (name, g) in &shared.groups {
        let pool = match g.engine {
            Engine::Mysql => {
                let pool = CorePool::<D>::new(g.clone());
                crate::rt::spawn(pool.clone().maintain());
                CorePools::Mysql(pool)
            }
            Engine::Postgresql => {
                let pool = PgPool::<D>::new(g.clone());
                crate::rt::spawn(pool.clone().maintain());
                CorePools::Postgres(pool)
            }
        };
        pools.insert(name.clone(), pool);
    }
    let mut accepts = Vec::new();
    for Listener {
        pool,
        split,
        tls,
        socket,
        stats,
    } in listeners
    {
        let group = pool;
        let Some(pool) = pools.get(&group).cloned() else {
            continue;
        };
        let split = split.and_then(|(s, readers)| match pools.get(&readers) {
            Some(CorePools::Mysql(r)) => Some((s, r.clone())),
            _ => None,
        });
        let sh = shared.clone();
        let socket = match socket {
            ListenSocket::Tcp(s) => s,
            ListenSocket::Unix(mut inbox) => {
                accepts.push(crate::rt::spawn(async move {
                    // Unix clients have no address: they are "local" (127.0.0.1:0) to the
                    // login throttle and in logs.
                    let local = SocketAddr::from(([127, 0, 0, 1], 0));
                    while let Some(d) = inbox.recv().await {
                        match D::attach(d) {
                            Ok(stream) => pool.serve(&sh, stream, local, tls, &stats, &split),
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
        accepts.push(crate::rt::spawn(async move {
            loop {
                match D::accept(&listener).await {
                    Ok((stream, peer)) => pool.serve(&sh, stream, peer, tls, &stats, &split),
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        crate::rt::time::sleep(Duration::from_millis(50)).await;
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
        match pool {
            CorePools::Mysql(p) => p.close_idle().await,
            CorePools::Postgres(p) => p.close_idle().await,
        }
    }
}

/// A core's pool for one group route, of the group's engine.
enum CorePools<D: Driver> {
    Mysql(Rc<CorePool<D>>),
    Postgres(Rc<PgPool<D>>),
}

impl<D: Driver> Clone for CorePools<D> {
    fn clone(&self) -> Self {
        match self {
            CorePools::Mysql(p) => CorePools::Mysql(p.clone()),
            CorePools::Postgres(p) => CorePools::Postgres(p.clone()),
        }
    }
}

impl<D: Driver> CorePools<D> {
    /// Starts serving a new client of an endpoint on this pool.
    fn serve(
        &self,
        shared: &Arc<ProxyShared>,
        stream: D::Stream,
        peer: SocketAddr,
        tls: ClientTls,
        stats: &Arc<crate::stats::EndpointStats>,
        split: &Option<(crate::routing::Split, Rc<CorePool<D>>)>,
    ) {
        match self {
            CorePools::Mysql(pool) => {
                crate::rt::spawn(crate::conn::serve::<D>(
                    shared.clone(),
                    pool.clone(),
                    stream,
                    peer,
                    tls,
                    stats.clone(),
                    split.clone(),
                ));
            }
            CorePools::Postgres(pool) => {
                crate::rt::spawn(crate::pg_conn::serve::<D>(
                    shared.clone(),
                    pool.clone(),
                    stream,
                    peer,
                    tls,
                    stats.clone(),
                ));
            }
        }
    }
}

/// Starts sharing the budgets of the target groups with `max_connections_total` with the
/// rest of the fleet (`[fleet]`).
fn start_fleet(shared: &Arc<ProxyShared>) -> Result<(), StartError> {
    let cfg = shared.config();
    let Some(fleet) = &cfg.fleet else {
        return Ok(());
    };
    let mut pools = Vec::new();
    for g in &cfg.target_groups {
        let Some(total) = g.max_connections_total else {
            continue;
        };
        for (id, pool) in &shared.groups {
            if pool.name == g.name {
                pools.push(crate::fleet::SharedPool {
                    id: id.clone(),
                    budget: total,
                    pool: pool.clone(),
                });
            }
        }
    }
    let instance = if fleet.instance_id.is_empty() {
        crate::fleet::driver::default_instance_id(cfg.endpoints.first().map(|e| e.listen.as_str()))
    } else {
        fleet.instance_id.clone()
    };
    tracing::info!(fleet = %fleet.name, %instance, pools = pools.len(), "joining the fleet");
    let f = crate::fleet::driver::start(fleet, instance, pools)
        .map_err(|e| StartError::Config(e.to_string()))?;
    let _ = shared.fleet.set(f);
    Ok(())
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
            engine: g.engine,
            database: g.monitor_database.clone(),
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
        if g.engine == crate::config::Engine::Postgresql {
            // Clients are told the parameters of the connection they are served by.
            continue;
        }
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
            crate::rt::time::timeout(connect_timeout, async {
                let deadline = std::time::Instant::now() + connect_timeout;
                let tls = crate::backend_conn::TlsTo::for_addr(&g.backend_tls, &name, &addr);
                let (conn, profile) = crate::backend_conn::connect_login(
                    || crate::io::tokio_net::TokioNet::connect(&addr),
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
