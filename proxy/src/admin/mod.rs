//! The admin endpoint: Prometheus metrics over plain HTTP, off the data path (its own
//! thread, blocking std sockets, one short request at a time).

use crate::pool::BORROW_WAIT_BUCKETS;
use crate::runtime::ProxyShared;
use crate::session::pins::PinReason;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Listens on `addr` and serves `GET /metrics` until the process ends.
pub fn start(addr: SocketAddr, shared: Arc<ProxyShared>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    std::thread::Builder::new()
        .name("dbproxy-admin".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(s) => {
                        if let Err(e) = serve(s, &shared) {
                            tracing::debug!("admin request failed: {e}");
                        }
                    }
                    Err(e) => {
                        tracing::warn!("admin accept failed: {e}");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        })?;
    tracing::info!(listen = %local, "admin endpoint: GET /metrics");
    Ok(local)
}

fn serve(mut s: TcpStream, shared: &ProxyShared) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut line = String::new();
    BufReader::new((&s).take(8192)).read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = match (line.split_whitespace().next(), path) {
        (Some("GET"), "/metrics") => ("200 OK", render(shared)),
        (Some("GET"), _) => ("404 Not Found", "try GET /metrics\n".to_string()),
        _ => ("405 Method Not Allowed", "GET only\n".to_string()),
    };
    write!(
        s,
        "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    s.flush()
}

/// A per-target-group series: name, type, help, how to read it.
type Series = (
    &'static str,
    &'static str,
    &'static str,
    fn(&crate::pool::GroupShared) -> u64,
);

/// The metrics in Prometheus' text format.
pub fn render(shared: &ProxyShared) -> String {
    let mut o = String::new();
    let gauge = |o: &mut String, name: &str, help: &str| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge");
    };
    gauge(
        &mut o,
        "dbproxy_client_connections",
        "Client connections open now.",
    );
    let _ = writeln!(
        o,
        "dbproxy_client_connections {}",
        shared.clients.load(Ordering::Relaxed)
    );
    render_tls(&mut o, shared);
    let mut groups: Vec<_> = shared.groups.values().collect();
    groups.sort_by(|a, b| a.id.cmp(&b.id));
    let series: [Series; 11] = [
        (
            "dbproxy_backend_connections",
            "gauge",
            "Backend connections open now (idle and in use).",
            |g| g.open_connections() as u64,
        ),
        (
            "dbproxy_backend_connections_idle",
            "gauge",
            "Idle backend connections.",
            |g| g.idle_total.load(Ordering::Relaxed) as u64,
        ),
        (
            "dbproxy_backend_connections_opened_total",
            "counter",
            "Backend connections opened.",
            |g| g.stats.opened.load(Ordering::Relaxed),
        ),
        (
            "dbproxy_backend_connections_closed_total",
            "counter",
            "Backend connections closed.",
            |g| g.stats.closed.load(Ordering::Relaxed),
        ),
        (
            "dbproxy_borrows_total",
            "counter",
            "Backend connections handed to clients.",
            |g| g.stats.borrowed.load(Ordering::Relaxed),
        ),
        (
            "dbproxy_borrow_timeouts_total",
            "counter",
            "Clients that waited connection_borrow_timeout in vain.",
            |g| g.stats.borrow_timeouts.load(Ordering::Relaxed),
        ),
        (
            "dbproxy_backend_connect_errors_total",
            "counter",
            "Failed attempts to open a backend connection.",
            |g| g.stats.connect_errors.load(Ordering::Relaxed),
        ),
        (
            "dbproxy_backend_reset_errors_total",
            "counter",
            "Backend connections closed because a reset failed.",
            |g| g.stats.reset_errors.load(Ordering::Relaxed),
        ),
        (
            "dbproxy_connections_moved_between_cores_total",
            "counter",
            "Idle connections handed from one core to another.",
            |g| g.stats.moved_between_cores.load(Ordering::Relaxed),
        ),
        (
            "dbproxy_checkins_verified_total",
            "counter",
            "Check-ins whose backend session was verified against dbproxy's record (verify_checkin).",
            |g| g.stats.checkins_verified.load(Ordering::Relaxed),
        ),
        (
            "dbproxy_checkin_violations_total",
            "counter",
            "Check-ins whose backend session differed from dbproxy's record (verify_checkin).",
            |g| g.stats.checkin_violations.load(Ordering::Relaxed),
        ),
    ];
    for (name, kind, help, get) in series {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for g in &groups {
            let _ = writeln!(o, "{name}{{{}}} {}", g.labels, get(g));
        }
    }
    render_topology(&mut o, shared);
    if let Some(g) = &shared.guard {
        let _ = writeln!(o, "# HELP dbproxy_guard_denials_total connect() calls to the database the kernel refused.\n# TYPE dbproxy_guard_denials_total counter");
        let _ = writeln!(
            o,
            "dbproxy_guard_denials_total {}",
            g.denials.load(Ordering::Relaxed)
        );
        gauge(
            &mut o,
            "dbproxy_guard_protected_destinations",
            "Destinations the kernel guard protects.",
        );
        let _ = writeln!(
            o,
            "dbproxy_guard_protected_destinations {}",
            g.protected.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        o,
        "# HELP dbproxy_borrow_wait_seconds How long clients waited for a backend connection.\n# TYPE dbproxy_borrow_wait_seconds histogram"
    );
    for g in &groups {
        let mut cumulative = 0;
        for (i, n) in g.stats.borrow_waits.iter().enumerate() {
            cumulative += n.load(Ordering::Relaxed);
            let le = BORROW_WAIT_BUCKETS
                .get(i)
                .map_or("+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(
                o,
                "dbproxy_borrow_wait_seconds_bucket{{{},le=\"{le}\"}} {cumulative}",
                g.labels
            );
        }
        let _ = writeln!(
            o,
            "dbproxy_borrow_wait_seconds_sum{{{}}} {}\ndbproxy_borrow_wait_seconds_count{{{}}} {cumulative}",
            g.labels,
            g.stats.borrow_wait_us.load(Ordering::Relaxed) as f64 / 1e6,
            g.labels
        );
    }
    let _ = writeln!(
        o,
        "# HELP dbproxy_pins_total Pins started, by reason.\n# TYPE dbproxy_pins_total counter"
    );
    for g in &groups {
        for r in PinReason::ALL {
            let n = g.stats.pins_started[r.index()].load(Ordering::Relaxed);
            let _ = writeln!(
                o,
                "dbproxy_pins_total{{{},reason=\"{}\"}} {n}",
                g.labels,
                r.name()
            );
        }
    }
    gauge(
        &mut o,
        "dbproxy_pinned_clients",
        "Clients pinned now, by reason.",
    );
    for g in &groups {
        for r in PinReason::ALL {
            let n = g.stats.pins_active[r.index()]
                .load(Ordering::Relaxed)
                .max(0);
            let _ = writeln!(
                o,
                "dbproxy_pinned_clients{{{},reason=\"{}\"}} {n}",
                g.labels,
                r.name()
            );
        }
    }
    o
}

/// A per-target gauge: name, help, how to read it.
type TargetSeries = (
    &'static str,
    &'static str,
    fn(&crate::topology::TargetView) -> String,
);

/// A per-target-group topology series: name, type, help, how to read it.
type TopologySeries = (
    &'static str,
    &'static str,
    &'static str,
    fn(&crate::topology::Topology) -> String,
);

/// Each target's role, health and lag; failovers and their last times.
/// TLS on both legs (RDS Proxy's ClientConnectionsTLS / ClientConnectionsNoTLS and more).
fn render_tls(o: &mut String, shared: &ProxyShared) {
    let t = &shared.tls_stats;
    let tls_clients = t.clients.load(Ordering::Relaxed) as u64;
    let all = shared.clients.load(Ordering::Relaxed) as u64;
    let rows: [(&str, &str, &str, u64); 8] = [
        (
            "dbproxy_client_tls_handshakes_total",
            "counter",
            "TLS handshakes with clients that succeeded.",
            t.client_handshakes.load(Ordering::Relaxed),
        ),
        (
            "dbproxy_client_connections_tls",
            "gauge",
            "Logged-in client connections using TLS.",
            tls_clients,
        ),
        (
            "dbproxy_client_connections_no_tls",
            "gauge",
            "Client connections not using TLS (logging in included).",
            all.saturating_sub(tls_clients),
        ),
        (
            "dbproxy_client_tls_handshake_failures_total",
            "counter",
            "TLS handshakes with clients that failed.",
            t.client_handshake_failures.load(Ordering::Relaxed),
        ),
        (
            "dbproxy_database_connections_tls",
            "gauge",
            "Backend connections using TLS (pools and health checks).",
            t.backend_connections.load(Ordering::Relaxed) as u64,
        ),
        (
            "dbproxy_database_tls_handshakes_total",
            "counter",
            "TLS handshakes with databases that succeeded.",
            t.backend_handshakes.load(Ordering::Relaxed),
        ),
        (
            "dbproxy_database_tls_handshake_failures_total",
            "counter",
            "TLS handshakes with databases that failed (certificate, network).",
            t.backend_handshake_failures.load(Ordering::Relaxed),
        ),
        (
            "dbproxy_tls_certificate_loads_total",
            "counter",
            "Times dbproxy's client certificate was loaded (start and successful reloads).",
            shared
                .tls
                .as_ref()
                .map_or(0, |s| s.loads.load(Ordering::Relaxed)),
        ),
    ];
    for (name, kind, help, v) in rows {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    }
    let th = &shared.throttle;
    let counters: [(&str, &str, f64); 3] = [
        (
            "dbproxy_client_login_failures_total",
            "Client logins refused for a wrong password or an unknown user.",
            th.failed.load(Ordering::Relaxed) as f64,
        ),
        (
            "dbproxy_client_logins_delayed_total",
            "Logins made to wait before their verdict (repeated failures from their address).",
            th.delayed.load(Ordering::Relaxed) as f64,
        ),
        (
            "dbproxy_client_login_delay_seconds_total",
            "Time those logins waited.",
            th.delayed_us.load(Ordering::Relaxed) as f64 / 1e6,
        ),
    ];
    for (name, help, v) in counters {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
    }
}

fn render_topology(o: &mut String, shared: &ProxyShared) {
    use crate::topology::TargetRole;
    let mut topologies: Vec<_> = shared.topologies.values().collect();
    topologies.sort_by(|a, b| a.group.cmp(&b.group));
    let head = |o: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    let per_target: [TargetSeries; 2] = [
        (
            "dbproxy_target_up",
            "1 when the target's last health checks passed.",
            |v| u8::from(v.up).to_string(),
        ),
        (
            "dbproxy_target_replication_lag_seconds",
            "Seconds behind its primary (-1: not replicating, stopped or unknown).",
            |v| v.lag.seconds().to_string(),
        ),
    ];
    for (name, help, get) in per_target {
        head(o, name, "gauge", help);
        for t in &topologies {
            for v in &t.load().targets {
                let _ = writeln!(
                    o,
                    "{name}{{target_group=\"{}\",target=\"{}\"}} {}",
                    t.group,
                    v.name,
                    get(v)
                );
            }
        }
    }
    head(
        o,
        "dbproxy_target_role",
        "gauge",
        "1 for each target's current role (writer, reader, unavailable).",
    );
    for t in &topologies {
        for v in &t.load().targets {
            for r in [
                TargetRole::Writer,
                TargetRole::Reader,
                TargetRole::Unavailable,
            ] {
                let _ = writeln!(
                    o,
                    "dbproxy_target_role{{target_group=\"{}\",target=\"{}\",role=\"{}\"}} {}",
                    t.group,
                    v.name,
                    r.name(),
                    u8::from(v.role == r)
                );
            }
        }
    }
    let per_group: [TopologySeries; 6] = [
        (
            "dbproxy_failovers_total",
            "counter",
            "New writers chosen after the writer was lost.",
            |t| t.stats.failovers.load(Ordering::Relaxed).to_string(),
        ),
        (
            "dbproxy_writer_lost_total",
            "counter",
            "Times the writer failed or turned read-only.",
            |t| t.stats.writer_lost.load(Ordering::Relaxed).to_string(),
        ),
        (
            "dbproxy_last_failover_detection_seconds",
            "gauge",
            "Last writer loss: first failed check to the writer marked down.",
            |t| (t.stats.last_detection_us.load(Ordering::Relaxed) as f64 / 1e6).to_string(),
        ),
        (
            "dbproxy_last_failover_recovery_seconds",
            "gauge",
            "Last writer loss: writer marked down to the first statement served on the new writer.",
            |t| (t.stats.last_recovery_us.load(Ordering::Relaxed) as f64 / 1e6).to_string(),
        ),
        (
            "dbproxy_health_checks_total",
            "counter",
            "Health checks run.",
            |t| t.stats.checks.load(Ordering::Relaxed).to_string(),
        ),
        (
            "dbproxy_health_check_failures_total",
            "counter",
            "Health checks that failed.",
            |t| t.stats.failed_checks.load(Ordering::Relaxed).to_string(),
        ),
    ];
    for (name, kind, help, get) in per_group {
        head(o, name, kind, help);
        for t in &topologies {
            let _ = writeln!(o, "{name}{{target_group=\"{}\"}} {}", t.group, get(t));
        }
    }
}

/// Fetches `/metrics` from a running dbproxy's admin endpoint (`dbproxy status`).
pub fn fetch(addr: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    match resp.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.0 200") => Ok(body.to_string()),
        _ => Err(std::io::Error::other(format!(
            "unexpected answer from {addr}: {}",
            resp.lines().next().unwrap_or("")
        ))),
    }
}
