//! `GET /status`: what dbproxy serves and how, as JSON (the status page, the SQL console
//! and `dbproxy status` read the same).

use crate::session::pins::PinReason;
use crate::shared::ProxyShared;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::time::Instant;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub uptime_seconds: f64,
    pub draining: bool,
    /// New statements are held (`PAUSE`).
    pub paused: bool,
    /// Statements waiting for `RESUME` now.
    pub held_statements: i64,
    /// Enhanced query logging is on until then (seconds since the Unix epoch).
    pub query_logging_until: Option<u64>,
    pub client_connections: i64,
    pub endpoints: Vec<EndpointStatus>,
    pub target_groups: Vec<GroupStatus>,
    pub pools: Vec<PoolStatus>,
    pub clients: Vec<ClientStatus>,
    /// The monitors' recent decisions (failovers among them), newest first.
    pub events: Vec<crate::topology::TopologyEvent>,
    pub guard: Option<GuardStatus>,
    /// The fleet this instance shares budgets with, when `[fleet]` is set.
    #[serde(default)]
    pub fleet: Option<crate::fleet::FleetStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointStatus {
    pub name: String,
    pub listen: String,
    pub target_group: String,
    pub role: String,
    /// `mysql` or `postgresql`: the protocol it speaks.
    #[serde(default)]
    pub engine: String,
    pub client_connections: i64,
    pub tls_connections: i64,
    pub received: u64,
    pub setup_succeeded: u64,
    pub setup_failed_auth: u64,
    pub queries: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupStatus {
    pub name: String,
    #[serde(default)]
    pub engine: String,
    pub writer: Option<String>,
    pub failovers: u64,
    pub writer_lost: u64,
    pub last_failover_detection_seconds: f64,
    pub last_failover_recovery_seconds: f64,
    pub targets: Vec<TargetStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetStatus {
    pub name: String,
    pub address: Option<String>,
    pub role: String,
    pub up: bool,
    /// Seconds behind the primary; `None` when not replicating or unknown.
    pub lag_seconds: Option<i64>,
    pub availability_percentage: Option<f64>,
    /// Why it is unavailable.
    pub why: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolStatus {
    /// `group` or `group/read_only`.
    pub pool: String,
    pub target_group: String,
    pub target_role: String,
    #[serde(default)]
    pub engine: String,
    pub max_connections: usize,
    pub open: usize,
    pub idle: usize,
    pub borrowed: usize,
    pub in_transaction: i64,
    /// Borrowers waiting for a connection now.
    #[serde(default)]
    pub waiting: i64,
    pub pinned: i64,
    pub pinned_by_reason: BTreeMap<String, i64>,
    pub requests: u64,
    pub borrow_timeouts: u64,
    /// Idle connections on each core (as of its last maintenance round).
    pub idle_per_core: Vec<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientStatus {
    pub id: u32,
    pub user: String,
    pub endpoint: String,
    pub pool: String,
    pub peer: String,
    pub tls: bool,
    pub connected_seconds: f64,
    pub queries: u64,
    /// The database connection it holds now (its thread id), if any.
    pub backend_thread: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GuardStatus {
    pub denials: u64,
    pub protected_destinations: u64,
    /// Whether the database's Unix socket is guarded (and why not).
    #[serde(default)]
    pub unix_sockets: String,
    pub recent_denials: Vec<crate::guard::Denial>,
}

/// How many clients `/status` lists (the counts cover all).
pub const CLIENTS_LISTED: usize = 1000;

/// Reads everything now.
pub fn collect(sh: &ProxyShared) -> Status {
    let now_unix = crate::stats::unix_now();
    let config = sh.config();
    let engine = |group: &str| {
        config
            .target_group(group)
            .map_or("", |g| g.engine.name())
            .to_string()
    };
    let endpoints = sh
        .endpoints
        .iter()
        .map(|e| EndpointStatus {
            name: e.name.clone(),
            listen: e.listen.clone(),
            target_group: e.target_group.clone(),
            role: e.role.to_string(),
            engine: engine(&e.target_group),
            client_connections: e.clients.load(Ordering::Relaxed),
            tls_connections: e.tls_clients.load(Ordering::Relaxed),
            received: e.received.load(Ordering::Relaxed),
            setup_succeeded: e.setup_succeeded.load(Ordering::Relaxed),
            setup_failed_auth: e.setup_failed_auth.load(Ordering::Relaxed),
            queries: e.queries.get(),
        })
        .collect();
    let mut topologies: Vec<_> = sh.topologies.values().collect();
    topologies.sort_by(|a, b| a.group.cmp(&b.group));
    let now = Instant::now();
    let mut events = Vec::new();
    let target_groups = topologies
        .iter()
        .map(|t| {
            let snap = t.load();
            events.extend(t.events.list());
            let st = &t.stats;
            GroupStatus {
                name: t.group.clone(),
                engine: engine(&t.group),
                writer: snap
                    .writer
                    .and_then(|w| snap.targets.get(w))
                    .map(|w| w.name.clone()),
                failovers: st.failovers.load(Ordering::Relaxed),
                writer_lost: st.writer_lost.load(Ordering::Relaxed),
                last_failover_detection_seconds: st.last_detection_us.load(Ordering::Relaxed)
                    as f64
                    / 1e6,
                last_failover_recovery_seconds: st.last_recovery_us.load(Ordering::Relaxed) as f64
                    / 1e6,
                targets: snap
                    .targets
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| !v.retired)
                    .map(|(i, v)| TargetStatus {
                        name: v.name.clone(),
                        address: v.addr.as_ref().map(|a| a.to_string()),
                        role: v.role.name().to_string(),
                        up: v.up,
                        lag_seconds: Some(v.lag.seconds()).filter(|s| *s >= 0),
                        availability_percentage: t
                            .availability
                            .get(i)
                            .and_then(|a| a.percentage(now)),
                        why: v.why.clone(),
                    })
                    .collect(),
            }
        })
        .collect();
    events.sort_by(|a, b| b.at.total_cmp(&a.at));
    let mut groups: Vec<_> = sh.groups.values().collect();
    groups.sort_by(|a, b| a.id.cmp(&b.id));
    let pools = groups
        .iter()
        .map(|g| {
            let open = g.open_connections();
            let idle = g.idle_total.load(Ordering::Relaxed);
            PoolStatus {
                pool: g.id.clone(),
                target_group: g.name.clone(),
                target_role: g.role.to_string(),
                engine: g.engine.name().to_string(),
                max_connections: g.max_connections(),
                open,
                idle,
                borrowed: open.saturating_sub(idle),
                in_transaction: g.stats.in_transaction.load(Ordering::Relaxed).max(0),
                waiting: g.stats.waiting.load(Ordering::Relaxed).max(0),
                pinned: g.stats.pinned_now(),
                pinned_by_reason: PinReason::ALL
                    .iter()
                    .map(|r| {
                        let n = g.stats.pins_active[r.index()].load(Ordering::Relaxed);
                        (r.name().to_string(), n.max(0))
                    })
                    .collect(),
                requests: g.stats.borrowed.get(),
                borrow_timeouts: g.stats.borrow_timeouts.load(Ordering::Relaxed),
                idle_per_core: g.idle_per_core(),
            }
        })
        .collect();
    let clients = sh
        .sessions
        .list()
        .iter()
        .take(CLIENTS_LISTED)
        .map(|c| ClientStatus {
            id: c.id,
            user: c.user(),
            endpoint: c.origin.endpoint_name().to_string(),
            pool: c.group.clone(),
            peer: c.origin.peer_label(),
            tls: c.origin.tls,
            connected_seconds: (now_unix - c.origin.since).max(0.0),
            queries: c.queries.load(Ordering::Relaxed),
            backend_thread: c.serving().thread_id,
        })
        .collect();
    Status {
        version: env!("CARGO_PKG_VERSION").to_string(),
        uptime_seconds: sh.started.elapsed().as_secs_f64(),
        draining: sh.is_draining(),
        paused: sh.is_paused(),
        held_statements: sh.held.load(Ordering::Relaxed),
        query_logging_until: sh.query_log.until(),
        client_connections: i64::try_from(sh.clients.load(Ordering::Relaxed)).unwrap_or(0),
        endpoints,
        target_groups,
        pools,
        clients,
        events,
        guard: sh.guard.as_ref().map(|g| GuardStatus {
            denials: g.denials.load(Ordering::Relaxed),
            protected_destinations: g.protected.load(Ordering::Relaxed),
            unix_sockets: g.unix_sockets.lock().clone(),
            recent_denials: g.recent.list(),
        }),
        fleet: sh.fleet.get().map(|f| f.status()),
    }
}

/// A row of [`rows`]: its cells, `None` for NULL.
pub type Row = Vec<Option<String>>;

/// A cell of [`rows`].
fn s<T: ToString>(v: T) -> Option<String> {
    Some(v.to_string())
}

/// One of the document's tables (`POOLS`, `CLIENTS`, `TARGETS`, `PINS`, `ENDPOINTS`,
/// `EVENTS`, `FLEET`): its columns and rows, `None` for NULL. The SQL console's `SHOW` and
/// `dbproxy status` print these.
pub fn rows(status: &Status, what: &str) -> Option<(Vec<&'static str>, Vec<Row>)> {
    let (columns, rows): (Vec<&'static str>, Vec<Row>) = match what {
        "POOLS" => (
            vec![
                "pool",
                "target_group",
                "target_role",
                "max_connections",
                "open",
                "idle",
                "borrowed",
                "in_transaction",
                "waiting",
                "pinned",
                "requests",
                "borrow_timeouts",
                "engine",
            ],
            status
                .pools
                .iter()
                .map(|p| {
                    vec![
                        s(&p.pool),
                        s(&p.target_group),
                        s(&p.target_role),
                        s(p.max_connections),
                        s(p.open),
                        s(p.idle),
                        s(p.borrowed),
                        s(p.in_transaction),
                        s(p.waiting),
                        s(p.pinned),
                        s(p.requests),
                        s(p.borrow_timeouts),
                        s(&p.engine),
                    ]
                })
                .collect(),
        ),
        "CLIENTS" => (
            vec![
                "id",
                "user",
                "endpoint",
                "pool",
                "peer",
                "tls",
                "connected_seconds",
                "queries",
                "backend_thread",
            ],
            status
                .clients
                .iter()
                .map(|c| {
                    vec![
                        s(c.id),
                        s(&c.user),
                        s(&c.endpoint),
                        s(&c.pool),
                        s(&c.peer),
                        s(if c.tls { "yes" } else { "no" }),
                        s(format!("{:.0}", c.connected_seconds)),
                        s(c.queries),
                        c.backend_thread.map(|t| t.to_string()),
                    ]
                })
                .collect(),
        ),
        "TARGETS" => (
            vec![
                "target_group",
                "target",
                "address",
                "role",
                "up",
                "lag_seconds",
                "availability_percentage",
                "why",
            ],
            status
                .target_groups
                .iter()
                .flat_map(|g| {
                    g.targets.iter().map(|t| {
                        vec![
                            s(&g.name),
                            s(&t.name),
                            t.address.clone(),
                            s(&t.role),
                            s(if t.up { "yes" } else { "no" }),
                            t.lag_seconds.map(|l| l.to_string()),
                            t.availability_percentage.map(|p| format!("{p:.1}")),
                            s(&t.why),
                        ]
                    })
                })
                .collect(),
        ),
        "PINS" => (
            vec!["pool", "reason", "clients"],
            status
                .pools
                .iter()
                .flat_map(|p| {
                    p.pinned_by_reason
                        .iter()
                        .map(|(r, n)| vec![s(&p.pool), s(r), s(n)])
                })
                .collect(),
        ),
        "ENDPOINTS" => (
            vec![
                "endpoint",
                "listen",
                "target_group",
                "role",
                "client_connections",
                "tls_connections",
                "received",
                "setup_succeeded",
                "setup_failed_auth",
                "queries",
            ],
            status
                .endpoints
                .iter()
                .map(|e| {
                    vec![
                        s(&e.name),
                        s(&e.listen),
                        s(&e.target_group),
                        s(&e.role),
                        s(e.client_connections),
                        s(e.tls_connections),
                        s(e.received),
                        s(e.setup_succeeded),
                        s(e.setup_failed_auth),
                        s(e.queries),
                    ]
                })
                .collect(),
        ),
        "FLEET" => (
            vec![
                "pool",
                "instance",
                "host",
                "held",
                "want",
                "open",
                "this",
                "contact",
                "max_connections_total",
                "total_held",
                "floor",
            ],
            status
                .fleet
                .iter()
                .flat_map(|f| &f.pools)
                .flat_map(|p| {
                    p.instances.iter().map(move |i| {
                        vec![
                            s(&p.pool),
                            s(&i.instance),
                            s(&i.host),
                            i.held.map(|h| h.to_string()),
                            s(i.want),
                            s(i.open),
                            s(if i.this { "yes" } else { "" }),
                            s(if i.this { p.contact.as_str() } else { "" }),
                            s(p.max_connections_total),
                            s(p.total_held),
                            s(p.floor),
                        ]
                    })
                })
                .collect(),
        ),
        "EVENTS" => (
            vec!["at", "event", "target", "detail"],
            status
                .events
                .iter()
                .map(|e| {
                    vec![
                        s(format!("{:.3}", e.at)),
                        s(&e.kind),
                        s(&e.target),
                        s(&e.detail),
                    ]
                })
                .collect(),
        ),
        _ => return None,
    };
    Some((columns, rows))
}

/// A table of `rows` under `head`, columns padded to their widest cell.
pub fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        let mut first = true;
        for (c, w) in cells.zip(&widths) {
            if !first {
                out.push_str("  ");
            }
            first = false;
            let _ = write!(out, "{c:<w$}");
        }
        while out.ends_with(' ') {
            out.pop();
        }
        out.push('\n');
    };
    line(&mut out, &mut head.iter().copied());
    for r in rows {
        line(&mut out, &mut r.iter().map(String::as_str));
    }
    out
}

/// `dbproxy status`: the status as readable tables.
pub fn render_tables(s: &Status) -> String {
    let mut out = format!(
        "dbproxy {}  up {:.0}s  clients {}{}{}\n",
        s.version,
        s.uptime_seconds,
        s.client_connections,
        if s.draining { "  DRAINING" } else { "" },
        if s.paused {
            format!("  PAUSED ({} statements held)", s.held_statements)
        } else {
            String::new()
        },
    );
    for what in ["ENDPOINTS", "TARGETS", "POOLS", "PINS"] {
        let Some((columns, rows)) = rows(s, what) else {
            continue;
        };
        let cells: Vec<Vec<String>> = rows
            .into_iter()
            // Pins: only the reasons that pin someone now.
            .filter(|r| what != "PINS" || r.last().is_some_and(|n| n.as_deref() != Some("0")))
            .map(|r| {
                r.into_iter()
                    .map(|c| c.unwrap_or_else(|| "-".into()))
                    .collect()
            })
            .collect();
        if what == "PINS" && cells.is_empty() {
            continue;
        }
        let _ = write!(out, "\n{what}\n");
        out += &table(&columns, &cells);
    }
    if !s.events.is_empty() {
        out += "\nRECENT EVENTS\n";
        out += &table(
            &["age_s", "event", "target", "detail"],
            &s.events
                .iter()
                .take(10)
                .map(|e| {
                    vec![
                        format!("{:.0}", (crate::stats::unix_now() - e.at).max(0.0)),
                        e.kind.to_string(),
                        e.target.clone(),
                        e.detail.clone(),
                    ]
                })
                .collect::<Vec<_>>(),
        );
    }
    if let Some(g) = &s.guard {
        let _ = write!(
            out,
            "\nGUARD\nprotected destinations {}  denials {}\nunix sockets: {}\n",
            g.protected_destinations, g.denials, g.unix_sockets
        );
        for d in g.recent_denials.iter().rev().take(5) {
            let _ = writeln!(out, "  pid {} ({}) -> {}", d.pid, d.comm, d.destination);
        }
    }
    out
}
