//! What every worker and the control side share: the configuration and users in force
//! (swapped whole by a reload), the target groups' pools and topologies, counters, and the
//! process's drain, pause and shutdown state. `runtime` builds it and wires the threads;
//! everything else only reads it, so nothing here imports the modules that use it.

use crate::auth::Users;
use crate::config::Config;
use crate::guard::GuardStats;
use crate::pool::GroupShared;
use crate::tls::{BackendTls, ServerTls, TlsStats};
use crate::topology::{Route, Topology};
use std::collections::HashMap;
use std::net::SocketAddr;
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
    /// PostgreSQL clients' cancel keys.
    pub pg_cancels: Arc<crate::pg_cancel::CancelKeys>,
    /// Each user's share of the connections (`max_database_connections`, `weight`).
    pub tenants: crate::tenants::Tenants,
    /// The fleet this instance shares budgets with (`[fleet]`), once started.
    pub fleet: std::sync::OnceLock<Arc<crate::fleet::Fleet>>,
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
    /// `user`'s share of the connections, with its settings as configured now.
    pub fn tenant_of(&self, user: &crate::auth::User) -> Arc<crate::tenants::Tenant> {
        self.tenants.get(
            &user.name,
            user.max_database_connections,
            user.weight,
            self.config().proxy.tenant_dry_run,
        )
    }

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
            if config.endpoints.iter().any(|e| {
                e.target_group == g.name
                    && (e.role == crate::config::Role::ReadOnly || e.read_write_split)
            }) {
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
            pg_cancels: Arc::default(),
            fleet: std::sync::OnceLock::new(),
            tenants: Default::default(),
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
        // Limits and weights apply at once to the sessions already logged in.
        for u in &plan.config.users {
            self.tenants.get(
                &u.name,
                u.max_database_connections,
                u.weight,
                plan.config.proxy.tenant_dry_run,
            );
        }
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
    /// Counts a new client in `clients` for as long as the guard lives; returns how many
    /// are connected with it.
    pub fn count_client(&self) -> (usize, ClientCount<'_>) {
        let in_use = self.clients.fetch_add(1, Ordering::AcqRel) + 1;
        (in_use, ClientCount(self))
    }

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
            let _ = crate::rt::time::timeout(Duration::from_millis(500), n).await;
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// When the drain ends sessions whatever they hold.
    pub fn drain_deadline(&self) -> Option<std::time::Instant> {
        *self.drain_until.lock()
    }

    /// Resolves once draining starts.
    pub async fn draining(&self) {
        loop {
            let n = self.drain_notify.notified();
            if self.is_draining() {
                return;
            }
            let _ = crate::rt::time::timeout(Duration::from_millis(500), n).await;
        }
    }

    /// Draining or stopping: accept nothing more.
    pub fn is_stopping(&self) -> bool {
        self.is_draining() || self.shutdown.load(Ordering::Acquire)
    }

    pub(crate) async fn wait_shutdown(&self) {
        loop {
            let n = self.shutdown_notify.notified();
            if self.shutdown.load(Ordering::Acquire) {
                return;
            }
            let _ = crate::rt::time::timeout(Duration::from_millis(500), n).await;
        }
    }
}

/// A client counted in [`ProxyShared::clients`]; uncounted when dropped.
pub struct ClientCount<'a>(&'a ProxyShared);

impl Drop for ClientCount<'_> {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::AcqRel);
    }
}
