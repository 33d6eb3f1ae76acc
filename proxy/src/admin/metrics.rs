//! `GET /metrics`: RDS Proxy's metric set (snake_case, `dbproxy_` prefix) and what it
//! lacks, in the OpenMetrics text format through prometheus-client. Values are read from
//! the atomics the data path keeps, at scrape time: nothing is registered per client.
//!
//! Dimensions follow RDS Proxy's: client metrics by `endpoint`, database connection
//! metrics by `target_group` and `target_role` (`read_write`, `read_only`), per-target
//! ones by `target_group` and `target`.

use crate::session::pins::PinReason;
use crate::shared::ProxyShared;
use crate::stats::HistogramSnapshot;
use crate::topology::TargetRole;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(&'static str, String)>;

/// Renders every metric.
pub fn render(shared: &Arc<ProxyShared>) -> Result<String, fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ProxyCollector(shared.clone())));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

struct ProxyCollector(Arc<ProxyShared>);

impl fmt::Debug for ProxyCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProxyCollector")
    }
}

/// One metric family: a value per label set.
fn family<M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: impl IntoIterator<Item = (Labels, M)>,
) -> fmt::Result {
    let mut d = enc.encode_descriptor(name, help, None, kind)?;
    for (l, m) in rows {
        m.encode(d.encode_family(&l)?)?;
    }
    Ok(())
}

/// Counters (the encoder adds `_total`).
fn counters(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, u64)>,
) -> fmt::Result {
    let rows = rows.into_iter().map(|(l, v)| (l, ConstCounter::new(v)));
    family(enc, name, help, MetricType::Counter, rows)
}

/// Gauges, integer or floating.
fn gauges<N: prometheus_client::encoding::EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, N)>,
) -> fmt::Result {
    let rows = rows.into_iter().map(|(l, v)| (l, ConstGauge::new(v)));
    family(enc, name, help, MetricType::Gauge, rows)
}

fn histograms(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, HistogramSnapshot)>,
) -> fmt::Result {
    let mut d = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (l, h) in rows {
        // The encoder wants each bucket's own count; the snapshot is cumulative.
        let mut prev = 0;
        let own: Vec<(f64, u64)> = h
            .buckets
            .iter()
            .map(|&(le, c)| {
                let n = c.saturating_sub(prev);
                prev = c;
                (le, n)
            })
            .collect();
        d.encode_family(&l)?
            .encode_histogram::<NoLabelSet>(h.sum_seconds, h.count, &own, None)?;
    }
    Ok(())
}

impl Collector for ProxyCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let sh = &*self.0;
        clients(&mut enc, sh)?;
        database(&mut enc, sh)?;
        targets(&mut enc, sh)?;
        security(&mut enc, sh)?;
        fleet(&mut enc, sh)?;
        tenants(&mut enc, sh)?;
        Ok(())
    }
}

/// Each user's share of the connections (`max_database_connections`, `weight`).
fn tenants(enc: &mut DescriptorEncoder, sh: &ProxyShared) -> fmt::Result {
    let ts = sh.tenants.all();
    let user = |t: &crate::tenants::Tenant| -> Labels { vec![("user", t.name.clone())] };
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    gauges(
        enc,
        "dbproxy_user_borrowed",
        "Database connections the user's sessions hold now.",
        ts.iter().map(|t| (user(t), t.holding() as i64)),
    )?;
    gauges(
        enc,
        "dbproxy_user_waiting",
        "The user's sessions waiting for a database connection now.",
        ts.iter()
            .map(|t| (user(t), t.waiting.load(Ordering::Relaxed).max(0))),
    )?;
    counters(
        enc,
        "dbproxy_user_borrows",
        "Database connections lent to the user's sessions.",
        ts.iter().map(|t| (user(t), load(&t.borrows))),
    )?;
    counters(
        enc,
        "dbproxy_user_refusals",
        "Borrows that timed out while the user held its max_database_connections.",
        ts.iter().map(|t| (user(t), load(&t.refusals))),
    )?;
    counters(
        enc,
        "dbproxy_user_over_limit",
        "tenant_dry_run: borrows that went over max_database_connections (would have waited).",
        ts.iter().map(|t| (user(t), load(&t.over_limit))),
    )?;
    histograms(
        enc,
        "dbproxy_user_borrow_wait_seconds",
        "How long the user's borrows waited (for its limit and the pool); immediate ones as 0.",
        ts.iter().map(|t| {
            let waited = t.wait.snapshot().count;
            let immediate = load(&t.borrows).saturating_sub(waited);
            (user(t), t.wait.snapshot_with_zeros(immediate))
        }),
    )
}

/// The fleet budget: this instance's share of each shared pool, and the fleet's total.
fn fleet(enc: &mut DescriptorEncoder, sh: &ProxyShared) -> fmt::Result {
    let Some(f) = sh.fleet.get() else {
        return Ok(());
    };
    let st = f.status();
    let pool =
        |p: &crate::fleet::driver::PoolFleetStatus| -> Labels { vec![("pool", p.pool.clone())] };
    gauges(
        enc,
        "dbproxy_fleet_share",
        "Connections this instance may have open now (its grant; its floor when cut off from the store).",
        st.pools.iter().map(|p| (pool(p), i64::from(p.cap))),
    )?;
    gauges(
        enc,
        "dbproxy_fleet_held",
        "This instance's entry in the fleet's grant table.",
        st.pools
            .iter()
            .map(|p| (pool(p), i64::from(p.held.unwrap_or(0)))),
    )?;
    gauges(
        enc,
        "dbproxy_fleet_total_held",
        "The grant table's sum over all instances.",
        st.pools.iter().map(|p| (pool(p), i64::from(p.total_held))),
    )?;
    gauges(
        enc,
        "dbproxy_fleet_max_connections_total",
        "The fleet's budget.",
        st.pools
            .iter()
            .map(|p| (pool(p), i64::from(p.max_connections_total))),
    )?;
    gauges(
        enc,
        "dbproxy_fleet_instances",
        "Instances in the fleet's grant table.",
        st.pools.iter().map(|p| {
            let n = p.instances.iter().filter(|i| i.held.is_some()).count();
            (pool(p), n as i64)
        }),
    )?;
    gauges(
        enc,
        "dbproxy_fleet_connected",
        "1 while this instance is registered and in contact with the store.",
        st.pools
            .iter()
            .map(|p| (pool(p), i64::from(p.contact == "connected"))),
    )?;
    counters(
        enc,
        "dbproxy_fleet_store_errors",
        "Requests to the fleet's store that failed or timed out.",
        [(Vec::new(), f.store_errors.load(Ordering::Relaxed))],
    )?;
    counters(
        enc,
        "dbproxy_fleet_grant_writes",
        "Writes of the grant table that landed.",
        [(Vec::new(), f.grant_writes.load(Ordering::Relaxed))],
    )
}

fn endpoint_labels(e: &crate::stats::EndpointStats) -> Labels {
    vec![("endpoint", e.name.clone())]
}

/// RDS Proxy's client and query metrics, by endpoint.
fn clients(enc: &mut DescriptorEncoder, sh: &ProxyShared) -> fmt::Result {
    let eps = &sh.endpoints;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    gauges(
        enc,
        "dbproxy_client_connections",
        "Client connections open now (logging in included).",
        eps.iter()
            .map(|e| (endpoint_labels(e), e.clients.load(Ordering::Relaxed))),
    )?;
    counters(
        enc,
        "dbproxy_client_connections_received",
        "Client connection requests received.",
        eps.iter().map(|e| (endpoint_labels(e), load(&e.received))),
    )?;
    counters(
        enc,
        "dbproxy_client_connections_closed",
        "Client connections closed.",
        eps.iter().map(|e| (endpoint_labels(e), load(&e.closed))),
    )?;
    counters(
        enc,
        "dbproxy_client_connections_setup_succeeded",
        "Client connections set up (logged in).",
        eps.iter()
            .map(|e| (endpoint_labels(e), load(&e.setup_succeeded))),
    )?;
    counters(
        enc,
        "dbproxy_client_connections_setup_failed_auth",
        "Client logins refused: wrong password, unknown user, bad token.",
        eps.iter()
            .map(|e| (endpoint_labels(e), load(&e.setup_failed_auth))),
    )?;
    gauges(
        enc,
        "dbproxy_client_connections_tls",
        "Logged-in client connections using TLS.",
        eps.iter()
            .map(|e| (endpoint_labels(e), e.tls_clients.load(Ordering::Relaxed))),
    )?;
    gauges(
        enc,
        "dbproxy_client_connections_no_tls",
        "Client connections not using TLS (logging in included).",
        eps.iter().map(|e| {
            let n = e.clients.load(Ordering::Relaxed) - e.tls_clients.load(Ordering::Relaxed);
            (endpoint_labels(e), n.max(0))
        }),
    )?;
    counters(
        enc,
        "dbproxy_query_requests",
        "Statements received from clients (COM_QUERY, COM_STMT_EXECUTE, COM_STMT_BULK_EXECUTE).",
        eps.iter().map(|e| (endpoint_labels(e), e.queries.get())),
    )?;
    histograms(
        enc,
        "dbproxy_query_response_latency_seconds",
        "Statement received from the client to its response sent.",
        eps.iter()
            .map(|e| (endpoint_labels(e), e.query_latency.snapshot())),
    )?;
    Ok(())
}

/// RDS Proxy's database connection metrics, by target group and target role; pins and
/// the statement cache.
fn database(enc: &mut DescriptorEncoder, sh: &ProxyShared) -> fmt::Result {
    let mut pools: Vec<_> = sh.groups.values().collect();
    pools.sort_by(|a, b| a.id.cmp(&b.id));
    let labels = |g: &crate::pool::GroupShared| -> Labels {
        vec![
            ("target_group", g.name.clone()),
            ("target_role", g.role.to_string()),
            ("engine", g.engine.name().to_string()),
        ]
    };
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let int = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    gauges(
        enc,
        "dbproxy_database_connections",
        "Database connections open now (idle and in use).",
        pools.iter().map(|g| (labels(g), int(g.open_connections()))),
    )?;
    gauges(
        enc,
        "dbproxy_database_connections_currently_borrowed",
        "Database connections in use by clients (or being opened for them) now.",
        pools.iter().map(|g| {
            let idle = g.idle_total.load(Ordering::Relaxed);
            (labels(g), int(g.open_connections().saturating_sub(idle)))
        }),
    )?;
    gauges(
        enc,
        "dbproxy_database_connections_idle",
        "Idle database connections in the pools.",
        pools
            .iter()
            .map(|g| (labels(g), int(g.idle_total.load(Ordering::Relaxed)))),
    )?;
    gauges(
        enc,
        "dbproxy_database_connections_currently_in_transaction",
        "Database connections held by a client in an open transaction.",
        pools.iter().map(|g| {
            (
                labels(g),
                g.stats.in_transaction.load(Ordering::Relaxed).max(0),
            )
        }),
    )?;
    gauges(
        enc,
        "dbproxy_database_connections_currently_session_pinned",
        "Database connections pinned to a client's session (any reason).",
        pools.iter().map(|g| (labels(g), g.stats.pinned_now())),
    )?;
    gauges(
        enc,
        "dbproxy_max_database_connections_allowed",
        "The pool's max_connections.",
        pools.iter().map(|g| (labels(g), int(g.max_connections()))),
    )?;
    gauges(
        enc,
        "dbproxy_database_connection_requests_waiting",
        "Borrowers waiting now: for a free connection, a new one, or a writer or fit reader.",
        pools
            .iter()
            .map(|g| (labels(g), g.stats.waiting.load(Ordering::Relaxed).max(0))),
    )?;
    counters(
        enc,
        "dbproxy_database_connection_requests",
        "Database connections handed to clients (borrows).",
        pools.iter().map(|g| (labels(g), g.stats.borrowed.get())),
    )?;
    counters(
        enc,
        "dbproxy_database_connections_setup_succeeded",
        "Database connections opened.",
        pools.iter().map(|g| (labels(g), load(&g.stats.opened))),
    )?;
    counters(
        enc,
        "dbproxy_database_connections_setup_failed",
        "Failed attempts to open a database connection.",
        pools
            .iter()
            .map(|g| (labels(g), load(&g.stats.connect_errors))),
    )?;
    counters(
        enc,
        "dbproxy_database_connections_closed",
        "Database connections closed.",
        pools.iter().map(|g| (labels(g), load(&g.stats.closed))),
    )?;
    counters(
        enc,
        "dbproxy_database_connection_borrow_timeouts",
        "Borrows that waited connection_borrow_timeout in vain.",
        pools
            .iter()
            .map(|g| (labels(g), load(&g.stats.borrow_timeouts))),
    )?;
    histograms(
        enc,
        "dbproxy_database_connections_borrow_latency_seconds",
        "Time a client waited for a database connection (0 when an idle one was at hand).",
        pools.iter().map(|g| (labels(g), g.stats.borrow_latency())),
    )?;
    histograms(
        enc,
        "dbproxy_query_database_response_latency_seconds",
        "Client statement sent to the database to the first packet of its response.",
        pools
            .iter()
            .map(|g| (labels(g), g.stats.db_latency.snapshot())),
    )?;
    counters(
        enc,
        "dbproxy_database_connection_reset_errors",
        "Database connections closed because resetting them failed.",
        pools
            .iter()
            .map(|g| (labels(g), load(&g.stats.reset_errors))),
    )?;
    counters(
        enc,
        "dbproxy_connections_moved_between_cores",
        "Idle database connections handed from one core to another.",
        pools
            .iter()
            .map(|g| (labels(g), load(&g.stats.moved_between_cores))),
    )?;
    counters(
        enc,
        "dbproxy_statement_cache_hits",
        "Prepared statement executions the database connection had prepared already.",
        pools
            .iter()
            .map(|g| (labels(g), g.stats.stmt_cache_hits.get())),
    )?;
    counters(
        enc,
        "dbproxy_statement_reprepares",
        "Client statements prepared again on a database connection that did not have them.",
        pools
            .iter()
            .map(|g| (labels(g), load(&g.stats.stmt_reprepares))),
    )?;
    // Split endpoints' routing: kept on the writer's pool of each group.
    let writers: Vec<_> = pools
        .iter()
        .filter(|g| g.route == crate::topology::Route::Writer)
        .collect();
    let routed = |g: &crate::pool::GroupShared, to: &str, reason: &str| {
        let mut l = labels(g);
        l.push(("to", to.to_string()));
        l.push(("reason", reason.to_string()));
        l
    };
    counters(
        enc,
        "dbproxy_split_statements",
        "Statements a read_write_split endpoint sent to a reader, or to the writer and why.",
        writers.iter().flat_map(|g| {
            let split = &g.stats.split;
            std::iter::once((routed(g, "reader", "read"), split.to_reader.get())).chain(
                crate::routing::WriterWhy::ALL.iter().map(move |w| {
                    let n = split.to_writer.get(w.index()).map_or(0, load);
                    (routed(g, "writer", w.name()), n)
                }),
            )
        }),
    )?;
    counters(
        enc,
        "dbproxy_causal_waits",
        "Reads that first waited on a reader for the client's causal position.",
        writers
            .iter()
            .map(|g| (labels(g), load(&g.stats.split.causal_waits))),
    )?;
    counters(
        enc,
        "dbproxy_causal_wait_timeouts",
        "Causal waits that timed out (causal_reads_timeout): the read went to the writer.",
        writers
            .iter()
            .map(|g| (labels(g), load(&g.stats.split.causal_timeouts))),
    )?;
    counters(
        enc,
        "dbproxy_causal_waits_skipped",
        "Reads sent to a reader without a wait: a wait there had already seen the client's position.",
        writers
            .iter()
            .map(|g| (labels(g), load(&g.stats.split.causal_known))),
    )?;
    histograms(
        enc,
        "dbproxy_causal_wait_seconds",
        "How long reads waited on a reader for the client's causal position.",
        writers
            .iter()
            .map(|g| (labels(g), g.stats.split.causal_wait.snapshot())),
    )?;
    let by_reason = |g: &crate::pool::GroupShared, r: PinReason| {
        let mut l = labels(g);
        l.push(("reason", r.name().to_string()));
        l
    };
    counters(
        enc,
        "dbproxy_pins",
        "Session pins started, by reason.",
        pools.iter().flat_map(|g| {
            PinReason::ALL
                .iter()
                .map(move |&r| (by_reason(g, r), load(&g.stats.pins_started[r.index()])))
        }),
    )?;
    gauges(
        enc,
        "dbproxy_pinned_clients",
        "Clients pinned now, by reason.",
        pools.iter().flat_map(|g| {
            PinReason::ALL.iter().map(move |&r| {
                let n = g.stats.pins_active[r.index()].load(Ordering::Relaxed);
                (by_reason(g, r), n.max(0))
            })
        }),
    )?;
    counters(
        enc,
        "dbproxy_checkins_verified",
        "Check-ins whose backend session was verified against dbproxy's record (verify_checkin).",
        pools
            .iter()
            .map(|g| (labels(g), load(&g.stats.checkins_verified))),
    )?;
    counters(
        enc,
        "dbproxy_checkin_violations",
        "Check-ins whose backend session differed from dbproxy's record (verify_checkin).",
        pools
            .iter()
            .map(|g| (labels(g), load(&g.stats.checkin_violations))),
    )?;
    Ok(())
}

/// Targets and failovers: availability, role, health, lag.
fn targets(enc: &mut DescriptorEncoder, sh: &ProxyShared) -> fmt::Result {
    let mut topologies: Vec<_> = sh.topologies.values().collect();
    topologies.sort_by(|a, b| a.group.cmp(&b.group));
    let now = Instant::now();
    let per_target = |f: &dyn Fn(
        &crate::topology::Topology,
        usize,
        &crate::topology::TargetView,
    ) -> Option<f64>| {
        let mut rows = Vec::new();
        for t in &topologies {
            for (i, v) in t.load().targets.iter().enumerate() {
                if v.retired {
                    continue;
                }
                if let Some(x) = f(t, i, v) {
                    rows.push((
                        vec![
                            ("target_group", t.group.clone()),
                            ("target", v.name.clone()),
                        ],
                        x,
                    ));
                }
            }
        }
        rows
    };
    gauges(
        enc,
        "dbproxy_availability_percentage",
        "Percentage of the last minute the target passed its health checks.",
        per_target(&|t, i, _| t.availability.get(i).and_then(|a| a.percentage(now))),
    )?;
    gauges(
        enc,
        "dbproxy_target_up",
        "1 when the target's last health checks passed.",
        per_target(&|_, _, v| Some(f64::from(u8::from(v.up))))
            .into_iter()
            .map(|(l, v)| (l, v as i64)),
    )?;
    gauges(
        enc,
        "dbproxy_target_replication_lag_seconds",
        "Seconds behind its primary (-1: not replicating, stopped or unknown).",
        per_target(&|_, _, v| Some(v.lag.seconds() as f64))
            .into_iter()
            .map(|(l, v)| (l, v as i64)),
    )?;
    let mut roles = Vec::new();
    for t in &topologies {
        for v in t.load().targets.iter().filter(|v| !v.retired) {
            for r in [
                TargetRole::Writer,
                TargetRole::Reader,
                TargetRole::Unavailable,
            ] {
                roles.push((
                    vec![
                        ("target_group", t.group.clone()),
                        ("target", v.name.clone()),
                        ("role", r.name().to_string()),
                    ],
                    i64::from(u8::from(v.role == r)),
                ));
            }
        }
    }
    gauges(
        enc,
        "dbproxy_target_role",
        "1 for each target's current role (writer, reader, unavailable).",
        roles,
    )?;
    let group =
        |t: &crate::topology::Topology| -> Labels { vec![("target_group", t.group.clone())] };
    let st = |f: fn(&crate::topology::TopologyStats) -> &std::sync::atomic::AtomicU64| {
        topologies
            .iter()
            .map(move |t| (group(t), f(&t.stats).load(Ordering::Relaxed)))
    };
    counters(
        enc,
        "dbproxy_failovers",
        "New writers chosen after the writer was lost.",
        st(|s| &s.failovers),
    )?;
    counters(
        enc,
        "dbproxy_writer_lost",
        "Times the writer failed or turned read-only.",
        st(|s| &s.writer_lost),
    )?;
    gauges(
        enc,
        "dbproxy_last_failover_detection_seconds",
        "Last writer loss: first failed check to the writer marked down.",
        st(|s| &s.last_detection_us).map(|(l, v)| (l, v as f64 / 1e6)),
    )?;
    gauges(
        enc,
        "dbproxy_last_failover_recovery_seconds",
        "Last writer loss: writer marked down to the first statement served on the new writer.",
        st(|s| &s.last_recovery_us).map(|(l, v)| (l, v as f64 / 1e6)),
    )?;
    counters(
        enc,
        "dbproxy_health_checks",
        "Health checks run.",
        st(|s| &s.checks),
    )?;
    counters(
        enc,
        "dbproxy_health_check_failures",
        "Health checks that failed.",
        st(|s| &s.failed_checks),
    )?;
    Ok(())
}

/// TLS on both legs, login throttling, the kernel guard.
fn security(enc: &mut DescriptorEncoder, sh: &ProxyShared) -> fmt::Result {
    let t = &sh.tls_stats;
    let one = |v: u64| [(Labels::new(), v)];
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    counters(
        enc,
        "dbproxy_client_tls_handshakes",
        "TLS handshakes with clients that succeeded.",
        one(load(&t.client_handshakes)),
    )?;
    counters(
        enc,
        "dbproxy_client_tls_handshake_failures",
        "TLS handshakes with clients that failed.",
        one(load(&t.client_handshake_failures)),
    )?;
    gauges(
        enc,
        "dbproxy_database_connections_tls",
        "Database connections using TLS (pools and health checks).",
        [(
            Labels::new(),
            i64::try_from(t.backend_connections.load(Ordering::Relaxed)).unwrap_or(i64::MAX),
        )],
    )?;
    counters(
        enc,
        "dbproxy_database_tls_handshakes",
        "TLS handshakes with databases that succeeded.",
        one(load(&t.backend_handshakes)),
    )?;
    counters(
        enc,
        "dbproxy_database_tls_handshake_failures",
        "TLS handshakes with databases that failed (certificate, network).",
        one(load(&t.backend_handshake_failures)),
    )?;
    counters(
        enc,
        "dbproxy_tls_certificate_loads",
        "Times dbproxy's client certificate was loaded (start and successful reloads).",
        one(sh.tls.as_ref().map_or(0, |s| load(&s.loads))),
    )?;
    let th = &sh.throttle;
    counters(
        enc,
        "dbproxy_client_login_failures",
        "Client logins refused for a wrong password or an unknown user.",
        one(load(&th.failed)),
    )?;
    counters(
        enc,
        "dbproxy_client_logins_delayed",
        "Logins made to wait before their verdict (repeated failures from their address).",
        one(load(&th.delayed)),
    )?;
    gauges(
        enc,
        "dbproxy_client_login_delay_seconds",
        "Time delayed logins waited in all.",
        [(Labels::new(), load(&th.delayed_us) as f64 / 1e6)],
    )?;
    if let Some(g) = &sh.guard {
        counters(
            enc,
            "dbproxy_guard_denials",
            "connect() calls to the database the kernel refused.",
            one(load(&g.denials)),
        )?;
        gauges(
            enc,
            "dbproxy_guard_protected_destinations",
            "Destinations the kernel guard protects.",
            [(
                Labels::new(),
                i64::try_from(load(&g.protected)).unwrap_or(i64::MAX),
            )],
        )?;
    }
    Ok(())
}
