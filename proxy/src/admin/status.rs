//! `GET /status`: what dbproxy serves and how, as JSON (the status page, the SQL console
//! and `dbproxy status` read the same).

use crate::runtime::ProxyShared;
use crate::session::pins::PinReason;
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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointStatus {
    pub name: String,
    pub listen: String,
    pub target_group: String,
    pub role: String,
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
    pub max_connections: usize,
    pub open: usize,
    pub idle: usize,
    pub borrowed: usize,
    pub in_transaction: i64,
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
    pub recent_denials: Vec<crate::guard::Denial>,
}

/// How many clients `/status` lists (the counts cover all).
pub const CLIENTS_LISTED: usize = 1000;

/// Reads everything now.
pub fn collect(sh: &ProxyShared) -> Status {
    let now_unix = crate::stats::unix_now();
    let endpoints = sh
        .endpoints
        .iter()
        .map(|e| EndpointStatus {
            name: e.name.clone(),
            listen: e.listen.clone(),
            target_group: e.target_group.clone(),
            role: e.role.to_string(),
            client_connections: e.clients.load(Ordering::Relaxed),
            tls_connections: e.tls_clients.load(Ordering::Relaxed),
            received: e.received.load(Ordering::Relaxed),
            setup_succeeded: e.setup_succeeded.load(Ordering::Relaxed),
            setup_failed_auth: e.setup_failed_auth.load(Ordering::Relaxed),
            queries: e.queries.load(Ordering::Relaxed),
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
                max_connections: g.max_connections(),
                open,
                idle,
                borrowed: open.saturating_sub(idle),
                in_transaction: g.stats.in_transaction.load(Ordering::Relaxed).max(0),
                pinned: g.stats.pinned_now(),
                pinned_by_reason: PinReason::ALL
                    .iter()
                    .map(|r| {
                        let n = g.stats.pins_active[r.index()].load(Ordering::Relaxed);
                        (r.name().to_string(), n.max(0))
                    })
                    .collect(),
                requests: g.stats.borrowed.load(Ordering::Relaxed),
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
            recent_denials: g.recent.list(),
        }),
    }
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

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// `dbproxy status`: the status as readable tables.
pub fn render_tables(s: &Status) -> String {
    let mut out = format!(
        "dbproxy {}  up {:.0}s  clients {}{}{}\n\nENDPOINTS\n",
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
    out += &table(
        &[
            "endpoint",
            "listen",
            "group",
            "role",
            "clients",
            "tls",
            "received",
            "auth_failed",
            "queries",
        ],
        &s.endpoints
            .iter()
            .map(|e| {
                vec![
                    e.name.clone(),
                    e.listen.clone(),
                    e.target_group.clone(),
                    e.role.clone(),
                    e.client_connections.to_string(),
                    e.tls_connections.to_string(),
                    e.received.to_string(),
                    e.setup_failed_auth.to_string(),
                    e.queries.to_string(),
                ]
            })
            .collect::<Vec<_>>(),
    );
    out += "\nTARGETS\n";
    out += &table(
        &[
            "group", "target", "address", "role", "up", "lag_s", "avail_%", "why",
        ],
        &s.target_groups
            .iter()
            .flat_map(|g| {
                g.targets.iter().map(|t| {
                    vec![
                        g.name.clone(),
                        t.name.clone(),
                        opt(t.address.clone()),
                        t.role.clone(),
                        if t.up { "yes" } else { "no" }.to_string(),
                        opt(t.lag_seconds),
                        opt(t.availability_percentage.map(|p| format!("{p:.1}"))),
                        t.why.clone(),
                    ]
                })
            })
            .collect::<Vec<_>>(),
    );
    out += "\nPOOLS\n";
    out += &table(
        &[
            "pool",
            "max",
            "open",
            "idle",
            "borrowed",
            "in_tx",
            "pinned",
            "requests",
            "timeouts",
            "idle_per_core",
        ],
        &s.pools
            .iter()
            .map(|p| {
                vec![
                    p.pool.clone(),
                    p.max_connections.to_string(),
                    p.open.to_string(),
                    p.idle.to_string(),
                    p.borrowed.to_string(),
                    p.in_transaction.to_string(),
                    p.pinned.to_string(),
                    p.requests.to_string(),
                    p.borrow_timeouts.to_string(),
                    p.idle_per_core
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                ]
            })
            .collect::<Vec<_>>(),
    );
    let pins: Vec<Vec<String>> = s
        .pools
        .iter()
        .flat_map(|p| {
            p.pinned_by_reason
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(r, n)| vec![p.pool.clone(), r.clone(), n.to_string()])
        })
        .collect();
    if !pins.is_empty() {
        out += "\nPINS\n";
        out += &table(&["pool", "reason", "clients"], &pins);
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
            "\nGUARD\nprotected destinations {}  denials {}\n",
            g.protected_destinations, g.denials
        );
        for d in g.recent_denials.iter().rev().take(5) {
            let _ = writeln!(out, "  pid {} ({}) -> {}", d.pid, d.comm, d.destination);
        }
    }
    out
}
