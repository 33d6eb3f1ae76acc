//! The health-check monitor: a thread of its own, a task per target that checks it every
//! `health_check_interval` (at once when the data path suspects it) on a connection of its
//! own outside `max_connections`, and a task per group that decides roles from the results.

use super::decide::{Check, Decider, Event, Probe};
use super::probe::{self, REPLICAS_SQL, REPLICAS_SQL_MYSQL};
use super::{Lag, Topology};
use crate::backend_conn::{BackendConn, BackendError};
use crate::io::tokio_net::TokioNet;
use crate::io::{Driver, Stream};
use crate::mysql::consts::cap;
use crate::pg_server::{PgServer, PgServerError};
use crate::secrets::BackendLogin;
use crate::target::BackendAddr;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Checks never follow each other closer than this, however often the data path asks.
const MIN_GAP: Duration = Duration::from_millis(10);

/// How often targets are checked while their group has no writer.
const OUTAGE_INTERVAL: Duration = Duration::from_millis(100);

// ER_PARSE_ERROR: MySQL does not know `SHOW ALL SLAVES STATUS`.
use crate::mysql::consts::errcode::ER_PARSE_ERROR;

/// Turns a configured target into the address to reach it at now.
pub trait Resolve: Send + Sync + 'static {
    fn resolve(&self, target: &str) -> Result<BackendAddr, String>;
}

/// The system resolver (`getaddrinfo`), asked again at every check: an RDS endpoint's
/// address moves at failover.
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(&self, target: &str) -> Result<BackendAddr, String> {
        crate::target::parse_target(target)?
            .into_iter()
            .next()
            .ok_or_else(|| format!("{target:?} resolves to no address"))
    }
}

/// What the monitor tells the kernel guard about the targets it finds.
pub trait Protect: Send + Sync {
    /// A TCP address a target is found at.
    fn address(&self, addr: SocketAddr);
    /// The Unix socket the server at `target` reports (`@@socket`; PostgreSQL's
    /// `unix_socket_directories` and `port`).
    fn socket(&self, target: &BackendAddr, path: &str);
}

/// The guard, when it runs.
pub type Protector = Option<Arc<dyn Protect>>;

/// What one group's monitor needs.
pub struct GroupMonitor {
    pub topology: Arc<Topology>,
    pub targets: Vec<String>,
    pub interval: Duration,
    pub timeout: Duration,
    pub failure_threshold: u32,
    /// The monitor's database login (a rotated secret is followed as by the pools).
    pub login: Arc<BackendLogin>,
    /// TLS to the targets, as the pool uses it.
    pub tls: crate::tls::BackendTls,
    /// The protocol the targets speak.
    pub engine: crate::config::Engine,
    /// PostgreSQL: the database the checks log in to.
    pub database: String,
}

/// One check's result on its way to the group's decider.
struct Report {
    target: usize,
    addr: Option<BackendAddr>,
    check: Check,
    /// The suspicion count the check answers.
    upto: u64,
    at: Instant,
}

/// A reload's change to a group's targets.
#[derive(Debug)]
pub enum Control {
    Add(String),
    Remove(String),
}

/// Tells a target's task to stop (its target was removed).
type StopFlag = std::rc::Rc<std::cell::Cell<bool>>;

/// Starts the monitor thread for every group.
pub fn start(
    groups: Vec<GroupMonitor>,
    resolver: Arc<dyn Resolve>,
    protect: Protector,
) -> io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("dbproxy-monitor".into())
        .spawn(move || {
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                for g in groups {
                    let (control_tx, control_rx) = mpsc::unbounded_channel();
                    let _ = g.topology.control.set(control_tx);
                    tokio::task::spawn_local(decide(
                        Arc::new(g),
                        control_rx,
                        resolver.clone(),
                        protect.clone(),
                    ));
                }
                std::future::pending::<()>().await;
            });
        })?;
    Ok(())
}

/// Runs a group: a task per target checking it, the roles decided from their reports and
/// published; targets added and removed by reloads.
async fn decide(
    g: Arc<GroupMonitor>,
    mut control: mpsc::UnboundedReceiver<Control>,
    resolver: Arc<dyn Resolve>,
    protect: Protector,
) {
    let topo = &g.topology;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut d = Decider::new(&g.targets, g.failure_threshold);
    let mut stops: Vec<StopFlag> = Vec::new();
    let watch = |i: usize, name: String| {
        let stop = StopFlag::default();
        tokio::task::spawn_local(watch_target(
            g.clone(),
            i,
            name,
            tx.clone(),
            resolver.clone(),
            stop.clone(),
            protect.clone(),
        ));
        stop
    };
    for (i, name) in g.targets.iter().enumerate() {
        stops.push(watch(i, name.clone()));
    }
    let mut last = d.snapshot();
    loop {
        let r = tokio::select! {
            r = rx.recv() => match r {
                Some(r) => r,
                None => return,
            },
            c = control.recv() => {
                let Some(c) = c else { continue };
                let events = match c {
                    Control::Add(name) => {
                        if d.index_of(&name).is_some() {
                            continue;
                        }
                        let i = d.add(&name);
                        tracing::info!(group = %topo.group, target = %name, "target added (reload)");
                        topo.note("target_added", &name, "reload");
                        let stop = watch(i, name);
                        match stops.get_mut(i) {
                            Some(s) => *s = stop,
                            None => stops.push(stop),
                        }
                        Vec::new()
                    }
                    Control::Remove(name) => {
                        let Some(i) = d.index_of(&name) else { continue };
                        if let Some(s) = stops.get(i) {
                            s.set(true);
                        }
                        tracing::info!(group = %topo.group, target = %name, "target removed (reload)");
                        topo.note("target_removed", &name, "reload");
                        d.retire(i, Instant::now())
                    }
                };
                for e in events {
                    log_event(topo, &e);
                }
                let snap = d.snapshot();
                if snap != last {
                    last = snap.clone();
                    topo.publish(Some(snap), None);
                }
                continue;
            }
        };
        if let Check::Down { why, .. } = &r.check {
            topo.stats
                .failed_checks
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let name = last.targets.get(r.target).map_or("", |t| t.name.as_str());
            tracing::debug!(group = %topo.group, target = %name, "health check failed: {why}");
        }
        if let (Some(BackendAddr::Tcp(a)), Some(p)) = (&r.addr, &protect) {
            if last.addr(r.target) != r.addr.as_ref() {
                p.address(*a);
            }
        }
        for e in d.observe(r.target, r.addr, r.check, r.at) {
            log_event(topo, &e);
        }
        let snap = d.snapshot();
        let publish = (snap != last).then(|| {
            last = snap.clone();
            snap
        });
        topo.publish(publish, Some((r.target, r.upto)));
        // Counted once published: startup waits for every target's first check this way.
        topo.stats
            .checks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

fn log_event(topo: &Topology, e: &Event) {
    let group = &topo.group;
    topo.record(e);
    match e {
        Event::TargetDown { target, why } => {
            tracing::warn!(group = %group, target = %target, "target down: {why}")
        }
        Event::TargetUp { target } => tracing::info!(group = %group, target = %target, "target up"),
        Event::WriterLost {
            target,
            why,
            detection,
        } => {
            topo.writer_lost(*detection);
            tracing::warn!(group = %group, target = %target, detection_ms = detection.as_millis() as u64, "writer lost: {why}; statements wait for a new writer")
        }
        Event::WriterChosen {
            target,
            previous: Some(p),
        } => {
            topo.failed_over();
            tracing::warn!(group = %group, target = %target, previous = %p, "failover: {target} is the writer now")
        }
        Event::WriterChosen {
            target,
            previous: None,
        } => tracing::info!(group = %group, target = %target, "writer chosen"),
        Event::SecondWriter { target, writer } => tracing::warn!(
            group = %group, target = %target, writer = %writer,
            "{target} reports read_only = 0 while {writer} is the writer: {target} is not used (never two writers); make it read-only or remove it"
        ),
        Event::AddressChanged { target, from, to } => {
            tracing::warn!(group = %group, target = %target, "{target} now resolves to {to} (was {from})")
        }
    }
}

/// Checks one target, every interval or at once when suspected.
async fn watch_target(
    g: Arc<GroupMonitor>,
    i: usize,
    name: String,
    tx: mpsc::UnboundedSender<Report>,
    resolver: Arc<dyn Resolve>,
    stop: StopFlag,
    protect: Protector,
) {
    let topo = &g.topology;
    let mut checker = Checker {
        tls: g.tls.clone(),
        login: g.login.clone(),
        timeout: g.timeout,
        conn: None,
        replicas_sql: REPLICAS_SQL,
        warned: false,
        name: name.clone(),
        ask_socket: protect.is_some(),
        socket: Vec::new(),
        engine: g.engine,
        database: g.database.clone(),
        pg: None,
    };
    while !stop.get() {
        let nudged = topo.nudge.notified();
        let upto = topo.suspicion(i);
        let addr = resolve(&resolver, &name).await;
        let check = match &addr {
            Ok(a) => checker.check(a).await,
            Err(e) => Check::Down {
                hard: false,
                why: e.clone(),
            },
        };
        if let (Some(p), Ok(a)) = (&protect, &addr) {
            for path in checker.socket.drain(..) {
                p.socket(a, &path);
            }
        }
        let report = Report {
            target: i,
            addr: addr.ok(),
            check,
            upto,
            at: Instant::now(),
        };
        // Removed meanwhile: its slot may already be another target's.
        if stop.get() || tx.send(report).is_err() {
            return;
        }
        if topo.suspicion(i) == upto {
            // While the group has no writer, clients wait: look more often.
            let wait = if topo.load().writer.is_none() {
                g.interval.min(OUTAGE_INTERVAL)
            } else {
                g.interval
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = nudged => {}
            }
        }
        tokio::time::sleep(MIN_GAP).await;
    }
}

/// Resolves off the monitor's thread unless the target is an address already.
async fn resolve(resolver: &Arc<dyn Resolve>, name: &str) -> Result<BackendAddr, String> {
    if name.starts_with("unix:") || name.parse::<SocketAddr>().is_ok() {
        return resolver.resolve(name);
    }
    let (r, n) = (resolver.clone(), name.to_string());
    tokio::task::spawn_blocking(move || r.resolve(&n))
        .await
        .unwrap_or_else(|e| Err(format!("resolver failed: {e}")))
}

/// One target's monitor connection and what it learnt about the server.
struct Checker {
    tls: crate::tls::BackendTls,
    login: Arc<BackendLogin>,
    timeout: Duration,
    conn: Option<(BackendAddr, BackendConn<<TokioNet as Driver>::Stream>)>,
    replicas_sql: &'static str,
    /// The replica-status warning was given.
    warned: bool,
    name: String,
    /// Ask each new connection's server for its Unix socket (for the guard).
    ask_socket: bool,
    /// The sockets a new connection's server reported, not yet handed on.
    socket: Vec<String>,
    engine: crate::config::Engine,
    database: String,
    /// PostgreSQL: the kept connection.
    pg: Option<(BackendAddr, PgServer<<TokioNet as Driver>::Stream>)>,
}

impl Checker {
    /// Probes over the kept connection; when that fails, over a new one (whose outcome
    /// decides: the old one may just have timed out on the server's side).
    async fn check(&mut self, addr: &BackendAddr) -> Check {
        if self.engine == crate::config::Engine::Postgresql {
            return self.check_pg(addr).await;
        }
        if let Some((a, mut c)) = self.conn.take() {
            if a == *addr {
                if let Ok(Ok(p)) = tokio::time::timeout(self.timeout, self.probe(&mut c)).await {
                    self.conn = Some((a, c));
                    return Check::Up(p);
                }
            }
        }
        let deadline = std::time::Instant::now() + self.timeout;
        let opened = crate::rt::time::timeout_at(deadline, async {
            let (c, _) = crate::backend_conn::connect_login(
                || TokioNet::connect(addr),
                &self.login,
                cap::BACKEND_BASE,
                0,
                DEFAULT_COLLATION,
                deadline,
                crate::backend_conn::TlsTo::for_addr(&self.tls, &self.name, addr),
            )
            .await?;
            Ok::<_, BackendError>(c)
        })
        .await;
        let mut c = match opened {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return down(&e),
            Err(_) => return timed_out(self.timeout),
        };
        match crate::rt::time::timeout_at(deadline, self.probe(&mut c)).await {
            Ok(Ok(p)) => {
                if self.ask_socket {
                    if let Ok(Ok(Ok(r))) =
                        crate::rt::time::timeout_at(deadline, c.query_result(probe::SOCKET_SQL))
                            .await
                    {
                        self.socket.extend(probe::socket(&r));
                    }
                }
                self.conn = Some((addr.clone(), c));
                Check::Up(p)
            }
            Ok(Err(e)) => down(&e),
            Err(_) => timed_out(self.timeout),
        }
    }

    async fn probe<S: Stream>(&mut self, c: &mut BackendConn<S>) -> Result<Probe, BackendError> {
        let read_only = match c.query_result(probe::READ_ONLY_SQL).await? {
            Ok(r) => probe::read_only(&r).map_err(|e| io::Error::other(e.to_string()))?,
            Err(e) => return Err(BackendError::Server(e)),
        };
        let lag = loop {
            match c.query_result(self.replicas_sql).await? {
                Ok(r) => match probe::replication_lag(&r) {
                    Ok(l) => break l,
                    Err(e) => {
                        self.warn_once(&e.to_string());
                        break Lag::Unknown;
                    }
                },
                Err(e) if e.code == ER_PARSE_ERROR && self.replicas_sql == REPLICAS_SQL => {
                    self.replicas_sql = REPLICAS_SQL_MYSQL;
                }
                Err(e) => {
                    self.warn_once(&format!(
                        "cannot read its replication state ({e}); grant the monitor user SLAVE MONITOR (REPLICATION CLIENT on MySQL): max_replication_lag is not enforced for it"
                    ));
                    break Lag::Unknown;
                }
            }
        };
        Ok(Probe { read_only, lag })
    }

    /// A PostgreSQL target: its role from `pg_is_in_recovery()`, a standby's lag from
    /// its replay position and time.
    async fn check_pg(&mut self, addr: &BackendAddr) -> Check {
        let deadline = std::time::Instant::now() + self.timeout;
        let kept = match self.pg.take() {
            Some((a, c)) if a == *addr => Some(c),
            _ => None,
        };
        let mut c = match kept {
            Some(c) => c,
            None => {
                let opened = crate::rt::time::timeout_at(deadline, async {
                    let tls = crate::backend_conn::TlsTo::for_addr(&self.tls, &self.name, addr);
                    crate::pg_server::connect_login(
                        || TokioNet::connect(addr),
                        addr,
                        &self.login,
                        &self.database,
                        tls,
                        deadline,
                    )
                    .await
                })
                .await;
                let mut c = match opened {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => return pg_down(&e),
                    Err(_) => return timed_out(self.timeout),
                };
                if self.ask_socket {
                    // The directories need pg_read_all_settings; without it, the port in
                    // the directories PostgreSQL's packages use.
                    match c.query(probe::PG_SOCKET_SQL, deadline).await {
                        Ok(a) if a.error.is_none() => self.socket.extend(probe::pg_socket(&a.rows)),
                        Ok(_) => match c.query(probe::PG_PORT_SQL, deadline).await {
                            Ok(a) => self.socket.extend(probe::pg_default_sockets(&a.rows)),
                            Err(e) => return pg_down(&e),
                        },
                        Err(e) => return pg_down(&e),
                    }
                }
                c
            }
        };
        let answer = match c.query(probe::PG_ROLE_SQL, deadline).await {
            Ok(a) => a,
            Err(e) => return pg_down(&e),
        };
        if let Some(e) = answer.error {
            return Check::Down {
                hard: false,
                why: format!("the health check's query failed: {e}"),
            };
        }
        match probe::pg_role(&answer.rows) {
            Ok(p) => {
                self.pg = Some((addr.clone(), c));
                Check::Up(p)
            }
            Err(e) => Check::Down {
                hard: false,
                why: e.to_string(),
            },
        }
    }

    fn warn_once(&mut self, why: &str) {
        if !self.warned {
            self.warned = true;
            tracing::warn!(target = %self.name, "health check: {why}");
        }
    }
}

/// utf8mb4_general_ci: the checks send ASCII only.
const DEFAULT_COLLATION: u8 = 45;

/// A PostgreSQL target that could not be checked: a refused or reset connection is a
/// hard failure.
fn pg_down(e: &PgServerError) -> Check {
    let hard = matches!(e, PgServerError::Io(io) if matches!(io.kind(), io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset))
        || matches!(e, PgServerError::Closed);
    Check::Down {
        hard,
        why: e.to_string(),
    }
}

/// A refused or reset connection is a hard failure: the server is gone.
fn down(e: &BackendError) -> Check {
    if let BackendError::Tls(why) = e {
        return Check::Refused { why: why.clone() };
    }
    let hard = matches!(e, BackendError::Io(io) if matches!(
        io.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::NotConnected
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::NotFound
    ));
    Check::Down {
        hard,
        why: e.to_string(),
    }
}

fn timed_out(t: Duration) -> Check {
    Check::Down {
        hard: false,
        why: format!("no answer within {} ms", t.as_millis()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;

    /// A resolver whose answer the test changes.
    /// Resolves every name to one address; each resolution (one per check) is logged
    /// with the address the topology showed when it was asked.
    struct Stub {
        addr: Mutex<BackendAddr>,
        topo: Arc<Topology>,
        log: Mutex<Vec<(BackendAddr, Option<BackendAddr>)>>,
    }

    /// What the monitor told the guard.
    #[derive(Default)]
    struct Told(Mutex<Vec<SocketAddr>>);

    impl Protect for Told {
        fn address(&self, addr: SocketAddr) {
            self.0.lock().push(addr);
        }
        fn socket(&self, _: &BackendAddr, _: &str) {}
    }

    impl Resolve for Stub {
        fn resolve(&self, _: &str) -> Result<BackendAddr, String> {
            let a = self.addr.lock().clone();
            let shown = self.topo.load().addr(0).cloned();
            self.log.lock().push((a.clone(), shown));
            Ok(a)
        }
    }

    /// A host name that resolves to another address is followed at the next check: the
    /// monitor connects there, the snapshot carries the new address in a new epoch (so
    /// pooled connections to the old one are not used again) and the guard is told.
    #[test]
    fn a_target_whose_name_moves_is_followed_within_one_interval() {
        // Two stand-ins that refuse logins politely are enough: the address is what counts.
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (aa, ba) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        let topo = Topology::new("g", &["db.internal:3306".into()]);
        let stub = Arc::new(Stub {
            addr: Mutex::new(BackendAddr::Tcp(aa)),
            topo: topo.clone(),
            log: Mutex::default(),
        });
        let seen: Arc<Told> = Arc::default();
        start(
            vec![GroupMonitor {
                topology: topo.clone(),
                targets: vec!["db.internal:3306".into()],
                interval: Duration::from_millis(100),
                timeout: Duration::from_millis(200),
                failure_threshold: 2,
                login: BackendLogin::fixed("m", "p"),
                tls: crate::tls::BackendTls::disabled(),
                engine: crate::config::Engine::Mysql,
                database: String::new(),
            }],
            stub.clone(),
            Some(seen.clone()),
        )
        .unwrap();
        let wait = |want: SocketAddr| {
            let until = Instant::now() + Duration::from_secs(5);
            while Instant::now() < until {
                if topo.load().addr(0) == Some(&BackendAddr::Tcp(want)) {
                    return topo.load().targets[0].epoch;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            panic!("not followed to {want}: {:?}", topo.load());
        };
        let e1 = wait(aa);
        *stub.addr.lock() = BackendAddr::Tcp(ba);
        let e2 = wait(ba);
        // Counted in checks, not in time: when the check after the first one that
        // resolved the new address starts, the topology already shows it.
        let new = BackendAddr::Tcp(ba);
        let until = Instant::now() + Duration::from_secs(5);
        let second = loop {
            let log = stub.log.lock();
            let mut moved = log.iter().filter(|(a, _)| *a == new);
            if let (Some(_), Some((_, shown))) = (moved.next(), moved.next()) {
                break shown.clone();
            }
            drop(log);
            assert!(Instant::now() < until, "no second check after the move");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(
            second,
            Some(new),
            "followed at the first check after the move"
        );
        assert!(e2 > e1, "a new epoch for the new address");
        assert_eq!(*seen.0.lock(), vec![aa, ba], "the guard follows");
        drop((a, b));
    }
}
