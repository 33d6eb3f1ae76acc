//! Writer and readers: failover that keeps every client, never two writers, a planned
//! switchover without errors, and read-only endpoints (a MariaDB primary and a GTID
//! replica the harness starts).

use mysql::prelude::*;
use proxy_tests::*;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The scenarios here time a failover: one at a time, so that they do not share the CPU.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const WRITERS: usize = 50;
const IN_TRANSACTIONS: usize = 10;
const IDLE: usize = 140;
/// Writes each client has acknowledged on the new primary before the drill ends.
const KEEP_WRITING: u32 = 20;

/// What one writing client saw.
#[derive(Default)]
struct Seen {
    /// Acknowledged (seq, when).
    acked: Vec<(u32, Instant)>,
    errors: Vec<(Instant, String)>,
    /// Acknowledged since the promotion.
    after: u32,
}

/// Where the drill is, shared with the writing clients.
#[derive(Default)]
struct Progress {
    stop: AtomicBool,
    promoted: AtomicBool,
    /// Clients with a write acknowledged, and with [`KEEP_WRITING`] acknowledged since the
    /// promotion.
    writing: AtomicUsize,
    resumed: AtomicUsize,
}

impl Progress {
    /// A client's write `seq` was acknowledged now.
    fn acked(&self, seen: &mut Seen, seq: u32) {
        let promoted = self.promoted.load(Ordering::Acquire);
        if seen.acked.is_empty() {
            self.writing.fetch_add(1, Ordering::AcqRel);
        }
        if promoted {
            seen.after += 1;
            if seen.after == KEEP_WRITING {
                self.resumed.fetch_add(1, Ordering::AcqRel);
            }
        }
        seen.acked.push((seq, Instant::now()));
    }
}

fn start_proxy(pair: &Pair, io: &str, group_extra: &str, sections: &str) -> Proxy {
    Proxy::start_at(
        pair.primary.port,
        io,
        "",
        &format!("{}\n{group_extra}", pair.targets()),
        sections,
    )
}

/// "HH:MM:SS.ffffff" (a log line's UTC time) as seconds since midnight.
fn seconds_of_day(t: &str) -> Option<f64> {
    let mut p = t.split(':');
    let h: f64 = p.next()?.parse().ok()?;
    let m: f64 = p.next()?.parse().ok()?;
    let s: f64 = p.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

fn server_id(c: &mut mysql::Conn) -> u32 {
    c.query_first("SELECT @@server_id").unwrap().unwrap()
}

/// SIGKILL the primary under 200 clients, promote the replica a second later: every
/// client keeps its connection and its session, each loses at most the statement it had
/// in flight, writes resume on the new primary within a second of the promotion, and the
/// old primary restarted writable is not used.
#[test]
fn failover_drill_keeps_every_client() {
    let _serial = serial();
    raise_fd_limit();
    for io in DRIVERS {
        drill(io);
    }
}

fn drill(io: &str) {
    let mut pair = Pair::start();
    pair.primary.root_sql(
        "CREATE TABLE shop.drill (client INT, seq INT, PRIMARY KEY (client, seq)); \
         CREATE TABLE shop.drill_tx (client INT, seq INT, part INT, PRIMARY KEY (client, seq, part))",
    );
    pair.sync();
    let proxy = start_proxy(&pair, io, "max_connections = 100", "");
    let port = proxy.port;
    let progress = Arc::new(Progress::default());

    // Idle clients, each with a time zone and a schema of its own.
    let mut idle = Vec::new();
    for i in 0..IDLE {
        let db = if i % 2 == 0 { "shop" } else { "shop2" };
        let mut c = connect(port, "app", APP_PASSWORD, db).unwrap();
        // Offsets in quarter hours: MariaDB 10.11 mixes up some odd-minute offsets across
        // sessions by itself (seen without dbproxy in between).
        let tz = format!("+{:02}:{:02}", i % 13, (i % 4) * 15);
        c.query_drop(format!("SET time_zone = '{tz}'")).unwrap();
        idle.push((c, tz, db));
    }

    // Writers in autocommit: half with text queries, half with prepared statements.
    let mut writers = Vec::new();
    for id in 0..WRITERS {
        let progress = progress.clone();
        let mut c = connect(port, "app", APP_PASSWORD, "shop").unwrap();
        writers.push(std::thread::spawn(move || {
            let mut seen = Seen::default();
            let mut seq = 0u32;
            while !progress.stop.load(Ordering::Acquire) {
                seq += 1;
                let r = if id % 2 == 0 {
                    c.query_drop(format!("INSERT INTO drill VALUES ({id}, {seq})"))
                } else {
                    c.exec_drop("INSERT INTO drill VALUES (?, ?)", (id, seq))
                };
                match r {
                    Ok(()) => progress.acked(&mut seen, seq),
                    Err(e) => seen.errors.push((Instant::now(), e.to_string())),
                }
            }
            (c, seen)
        }));
    }

    // Clients inside transactions: two inserts and a commit; after an error, a rollback.
    let mut transactions = Vec::new();
    for n in 0..IN_TRANSACTIONS {
        let id = 1000 + n;
        let progress = progress.clone();
        let mut c = connect(port, "app", APP_PASSWORD, "shop").unwrap();
        transactions.push(std::thread::spawn(move || {
            let mut seen = Seen::default();
            let mut seq = 0u32;
            while !progress.stop.load(Ordering::Acquire) {
                seq += 1;
                let r = (|| {
                    c.query_drop("BEGIN")?;
                    c.query_drop(format!("INSERT INTO drill_tx VALUES ({id}, {seq}, 1)"))?;
                    std::thread::sleep(Duration::from_millis(5));
                    c.query_drop(format!("INSERT INTO drill_tx VALUES ({id}, {seq}, 2)"))?;
                    c.query_drop("COMMIT")
                })();
                match r {
                    Ok(()) => progress.acked(&mut seen, seq),
                    Err(e) => {
                        seen.errors.push((Instant::now(), e.to_string()));
                        if let Err(e) = c.query_drop("ROLLBACK") {
                            seen.errors
                                .push((Instant::now(), format!("ROLLBACK failed: {e}")));
                        }
                    }
                }
            }
            (c, seen)
        }));
    }

    let clients = WRITERS + IN_TRANSACTIONS;
    wait_until(
        "every writing client to write",
        Duration::from_secs(30),
        || progress.writing.load(Ordering::Acquire) == clients,
    );
    let killed_at = Instant::now();
    let killed_wall = std::time::SystemTime::now();
    pair.primary.kill();
    // The failover script's delay, as the drill has it.
    std::thread::sleep(Duration::from_secs(1));
    pair.promote_replica();
    let promoted_at = Instant::now();
    progress.promoted.store(true, Ordering::Release);
    // Until every writing client has written a while on the new primary (or the deadline,
    // which the assertions below then explain).
    poll_until(Duration::from_secs(10), || {
        progress.resumed.load(Ordering::Acquire) == clients
    });
    progress.stop.store(true, Ordering::Release);

    let writers: Vec<_> = writers.into_iter().map(|t| t.join().unwrap()).collect();
    let transactions: Vec<_> = transactions
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();

    // At most one error each: the statement (or transaction) in flight.
    for (i, (_, seen)) in writers.iter().chain(transactions.iter()).enumerate() {
        assert!(
            seen.errors.len() <= 1,
            "[{io}] client {i} got {} errors, the first: {:?}",
            seen.errors.len(),
            &seen.errors[..3.min(seen.errors.len())]
        );
        for (at, e) in &seen.errors {
            assert!(
                *at >= killed_at && *at < promoted_at + Duration::from_secs(1),
                "[{io}] client {i}: an error outside the failover: {e}"
            );
        }
    }
    // Every writer's first insert after the promotion, and how long after it.
    let mut resumed: Vec<Duration> = writers
        .iter()
        .map(|(_, seen)| {
            seen.acked
                .iter()
                .find(|(_, at)| *at >= promoted_at)
                .map(|(_, at)| *at - promoted_at)
                .unwrap_or(Duration::MAX)
        })
        .collect();
    resumed.sort();
    let pct = |p: usize| resumed[(resumed.len() - 1) * p / 100];
    let errors: usize = writers.iter().map(|(_, s)| s.errors.len()).sum();
    let tx_errors: usize = transactions.iter().map(|(_, s)| s.errors.len()).sum();
    println!(
        "[{io}] writers resumed after the promotion: min {:?}, median {:?}, p90 {:?}, max {:?}; errors: {errors} of {WRITERS} writers, {tx_errors} of {IN_TRANSACTIONS} in transactions",
        pct(0),
        pct(50),
        pct(90),
        pct(100)
    );
    assert!(
        pct(100) <= Duration::from_secs(1),
        "[{io}] a writer waited {:?} after the promotion",
        pct(100)
    );

    // Every insert acknowledged after the promotion is on the new primary.
    let mut on_new = monitor(&pair.replica);
    let rows: BTreeSet<(u32, u32)> = on_new
        .query("SELECT client, seq FROM shop.drill")
        .unwrap()
        .into_iter()
        .collect();
    let mut after = 0;
    let mut lost_before = 0;
    for (id, (_, seen)) in writers.iter().enumerate() {
        for (seq, at) in &seen.acked {
            let there = rows.contains(&(id as u32, *seq));
            if *at >= promoted_at {
                after += 1;
                assert!(
                    there,
                    "[{io}] ({id}, {seq}) acknowledged after the promotion is missing"
                );
            } else if !there {
                lost_before += 1;
            }
        }
    }
    let tx_rows: BTreeSet<(u32, u32)> = on_new
        .query("SELECT client, seq FROM shop.drill_tx WHERE part = 2")
        .unwrap()
        .into_iter()
        .collect();
    for (n, (_, seen)) in transactions.iter().enumerate() {
        for (seq, at) in &seen.acked {
            if *at >= promoted_at {
                assert!(
                    tx_rows.contains(&((1000 + n) as u32, *seq)),
                    "[{io}] a transaction committed after the promotion is missing"
                );
            }
        }
    }
    println!("[{io}] {after} inserts acknowledged after the promotion, all on the new primary; {lost_before} acknowledged by the old primary before it died did not reach the replica (asynchronous replication)");

    // Every client's connection is still up; the idle ones kept their sessions, now served
    // by the new writer.
    for (c, tz, db) in &mut idle {
        let (got_tz, got_db, id): (String, String, u32) = c
            .query_first("SELECT @@time_zone, DATABASE(), @@server_id")
            .unwrap()
            .unwrap();
        assert_eq!((&got_tz[..], &got_db[..], id), (&tz[..], *db, 2), "[{io}]");
    }
    for (c, _) in writers.into_iter().chain(transactions) {
        let mut c = c;
        assert_eq!(server_id(&mut c), 2, "[{io}]");
    }
    let m = proxy.metrics();
    let get = |name: &str| {
        m.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
            .unwrap_or_default()
    };
    println!(
        "[{io}] dbproxy: failovers {}, detection {} s, recovery {} s",
        get("dbproxy_failovers_total{target_group=\"default\"}"),
        get("dbproxy_last_failover_detection_seconds{target_group=\"default\"}"),
        get("dbproxy_last_failover_recovery_seconds{target_group=\"default\"}")
    );
    assert_eq!(
        get("dbproxy_failovers_total{target_group=\"default\"}"),
        "1",
        "[{io}]"
    );
    // Kill to writer marked down, on the log's clock.
    let log = proxy.log();
    let lost = log
        .lines()
        .find(|l| l.contains("writer lost"))
        .and_then(|l| seconds_of_day(l.get(11..26)?))
        .expect("a writer-lost line");
    let killed = killed_wall
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        % 86_400.0;
    println!(
        "[{io}] detection: the kill to the writer marked down took {:.1} ms",
        (lost - killed) * 1000.0
    );
    assert_eq!(
        get(&format!(
            "dbproxy_target_role{{target_group=\"default\",target=\"127.0.0.1:{}\",role=\"writer\"}}",
            pair.replica.port
        )),
        "1",
        "[{io}]"
    );

    // The old primary comes back writable: never two writers.
    pair.primary.restart();
    let old = format!("127.0.0.1:{}", pair.primary.port);
    wait_until(
        "dbproxy to notice the old primary",
        Duration::from_secs(10),
        || proxy.log().contains("never two writers"),
    );
    let log = proxy.log();
    let line = log
        .lines()
        .find(|l| l.contains("never two writers"))
        .unwrap();
    assert!(
        line.contains(&old),
        "[{io}] the warning names the old primary: {line}"
    );
    let mut c = connect(port, "app", APP_PASSWORD, "shop").unwrap();
    c.query_drop("INSERT INTO drill VALUES (9999, 1)").unwrap();
    assert_eq!(server_id(&mut c), 2, "[{io}]");
    let on_old = pair
        .primary
        .root_sql("SELECT COUNT(*) FROM shop.drill WHERE client = 9999");
    assert_eq!(on_old.trim(), "0", "[{io}] a write reached the old primary");
    assert_eq!(
        get(&format!(
            "dbproxy_target_role{{target_group=\"default\",target=\"{old}\",role=\"writer\"}}"
        )),
        "0"
    );
    drop(idle);
}

/// The read-only endpoint reads from the replica while the primary takes writes; with
/// replication stopped it follows `reader_fallback`, and it comes back to the replica.
#[test]
fn read_only_endpoint_follows_the_replica_and_the_fallback() {
    let _serial = serial();
    let pair = Pair::start();
    for io in DRIVERS {
        let ports: HashMap<&str, u16> = ["writer", "wait", "error"]
            .iter()
            .map(|f| (*f, free_port()))
            .collect();
        // Three groups over the same two servers, one per fallback.
        let mut sections = String::new();
        for fallback in ["writer", "wait", "error"] {
            if fallback != "writer" {
                sections += &format!(
                    "[[target_groups]]\nname = \"{fallback}\"\n{}\nhealth_check_interval = \"200ms\"\nmax_replication_lag = \"5s\"\nreader_fallback = \"{fallback}\"\nconnection_borrow_timeout = \"10s\"\n\n",
                    pair.targets()
                );
            }
            let group = if fallback == "writer" {
                "default"
            } else {
                fallback
            };
            sections += &format!(
                "[[endpoints]]\nname = \"reader-{fallback}\"\nlisten = \"127.0.0.1:{}\"\ntarget_group = \"{group}\"\nrole = \"read_only\"\n\n",
                ports[fallback]
            );
        }
        let proxy = start_proxy(
            &pair,
            io,
            "health_check_interval = \"200ms\"\nmax_replication_lag = \"5s\"\nreader_fallback = \"writer\"",
            &sections,
        );
        let mut writer = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        let mut readers: HashMap<&str, mysql::Conn> = ports
            .iter()
            .map(|(f, p)| (*f, connect(*p, "app", APP_PASSWORD, "shop").unwrap()))
            .collect();
        assert_eq!(server_id(&mut writer), 1, "[{io}]");
        writer
            .query_drop("CREATE TABLE IF NOT EXISTS ro (n INT)")
            .unwrap();
        writer.query_drop("INSERT INTO ro VALUES (1)").unwrap();
        for (f, r) in &mut readers {
            assert_eq!(server_id(r), 2, "[{io}] reader-{f} reads from the replica");
            // Writes through a read-only endpoint are refused by the replica.
            let e = r.query_drop("INSERT INTO ro VALUES (2)").unwrap_err();
            assert!(e.to_string().contains("read-only"), "[{io}] {e}");
        }

        pair.replica.root_sql("STOP SLAVE");
        let r = readers.get_mut("writer").unwrap();
        wait_until("the fallback to the writer", Duration::from_secs(5), || {
            server_id(r) == 1
        });
        let r = readers.get_mut("error").unwrap();
        wait_until(
            "reader_fallback = error to refuse",
            Duration::from_secs(5),
            || {
                let started = Instant::now();
                match r.query_drop("SELECT 1") {
                    Ok(()) => false,
                    Err(e) => {
                        assert!(
                            e.to_string().contains("no reader")
                                && started.elapsed() < Duration::from_secs(2),
                            "[{io}] reader_fallback = error fails at once: {e}"
                        );
                        true
                    }
                }
            },
        );
        let stopped = format!(
            "dbproxy_target_replication_lag_seconds{{target_group=\"wait\",target=\"127.0.0.1:{}\"}}",
            pair.replica.port
        );
        wait_until(
            "the wait group to see replication stopped",
            Duration::from_secs(5),
            || proxy.metric(&stopped) == -1,
        );
        // "wait": a read waits for the replica to be fit again.
        let mut waiting = readers.remove("wait").unwrap();
        let waiter = std::thread::spawn(move || {
            let id = server_id(&mut waiting);
            (id, Instant::now(), waiting)
        });
        wait_until(
            "the read to wait for a fit reader",
            Duration::from_secs(10),
            || {
                proxy.metric(
                    "dbproxy_database_connection_requests_waiting{target_group=\"wait\",target_role=\"read_only\"}",
                ) == 1
            },
        );
        let restarted = Instant::now();
        pair.replica.root_sql("START SLAVE");
        let (id, answered, waiting) = waiter.join().unwrap();
        assert_eq!(id, 2, "[{io}]");
        assert!(
            answered > restarted,
            "[{io}] the read was answered before the replica was fit again"
        );
        readers.insert("wait", waiting);
        for f in ["writer", "error"] {
            let r = readers.get_mut(f).unwrap();
            wait_until(
                "the replica to serve reads again",
                Duration::from_secs(5),
                || r.query_first::<u32, _>("SELECT @@server_id").ok().flatten() == Some(2),
            );
        }
        let lag = proxy.metric(&format!(
            "dbproxy_target_replication_lag_seconds{{target_group=\"default\",target=\"127.0.0.1:{}\"}}",
            pair.replica.port
        ));
        assert!(lag >= 0, "[{io}] the replica's lag is reported: {lag}");
    }
}

/// A planned switchover under 16 sysbench threads in autocommit mode: the writer turns
/// read-only, the replica catches up and is promoted; not one statement fails.
#[test]
fn planned_switchover_under_sysbench_has_no_errors() {
    let _serial = serial();
    for io in DRIVERS {
        let pair = Pair::start();
        let proxy = start_proxy(&pair, io, "", "");
        sysbench_prepare(proxy.port, APP_PASSWORD, "oltp_read_write");
        pair.sync();
        let run = sysbench_command(proxy.port, APP_PASSWORD)
            .args([
                "oltp_read_write",
                "run",
                "--threads=16",
                "--time=12",
                "--skip_trx=on",
                // Without transactions, two threads may delete and re-insert one row at
                // once (a duplicate key, with or without dbproxy): updates and reads only.
                "--delete_inserts=0",
                "--report-interval=1",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Switch once the load runs.
        wait_until("sysbench to write", Duration::from_secs(30), || {
            pair.primary.status("Com_update") > 2000
        });
        let switch = Instant::now();
        pair.primary.root_sql("SET GLOBAL read_only = 1");
        pair.sync();
        pair.promote_replica();
        println!("[{io}] switchover done in {:?}", switch.elapsed());
        let out = run.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let errors = text
            .lines()
            .find(|l| l.trim_start().starts_with("ignored errors:"))
            .unwrap_or("");
        println!("[{io}] sysbench: {errors}");
        assert!(
            out.status.success(),
            "[{io}] sysbench failed:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(errors.contains(" 0 "), "[{io}] {errors}");
        let log = proxy.log();
        assert!(
            log.contains("writer lost: it reports read_only"),
            "[{io}] the monitor did not see the switchover"
        );
        println!(
            "[{io}] statements the old writer refused as read-only, sent again to the new one: {}",
            log.matches("refused a statement as read-only").count()
        );
        // Writes after the switchover are on the new primary.
        let mut c = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        assert_eq!(server_id(&mut c), 2, "[{io}]");
        let wrote: u64 = pair
            .replica
            .root_sql("SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS WHERE VARIABLE_NAME = 'COM_UPDATE'")
            .trim()
            .parse()
            .unwrap();
        assert!(wrote > 0, "[{io}] no update reached the new primary");
    }
}

/// A primary that hangs (SIGSTOP: connections stay open, nothing is refused) is marked down
/// after `failure_threshold` checks time out; the statement waiting on it gets its error
/// then, not never; the replica promoted meanwhile takes the writes; the old primary, thawed
/// and still writable, is not used.
#[test]
fn a_hung_primary_is_marked_down_by_timeouts_and_fenced_when_it_wakes() {
    let _serial = serial();
    for io in DRIVERS {
        let pair = Pair::start();
        pair.primary
            .root_sql("CREATE TABLE shop.hung (n INT PRIMARY KEY)");
        pair.sync();
        let proxy = start_proxy(
            &pair,
            io,
            "health_check_interval = \"500ms\"\nfailure_threshold = 2",
            "",
        );
        let port = proxy.port;
        let mut c = connect(port, "app", APP_PASSWORD, "shop").unwrap();
        c.query_drop("INSERT INTO hung VALUES (1)").unwrap();
        // A transaction on the primary, then a statement that will hang with it.
        c.query_drop("BEGIN").unwrap();
        c.query_drop("INSERT INTO hung VALUES (2)").unwrap();
        pair.primary.freeze(true);
        let frozen_at = Instant::now();
        let hung = std::thread::spawn(move || {
            let r = c.query_drop("INSERT INTO hung VALUES (3)");
            (r, c)
        });
        wait_until(
            "the hung primary to be marked down",
            Duration::from_secs(10),
            || proxy.log().contains("writer lost"),
        );
        let (r, mut c) = hung.join().unwrap();
        let waited = frozen_at.elapsed();
        let e = r.expect_err("the statement on the hung primary cannot succeed");
        println!("[{io}] the statement on the hung primary failed after {waited:?}: {e}");
        assert!(e.to_string().contains("rolled back"), "[{io}] {e}");
        assert!(waited < Duration::from_secs(10), "[{io}] {waited:?}");
        // The client's next statement waits for a writer; the replica is promoted meanwhile.
        let writes = std::thread::spawn(move || {
            c.query_drop("INSERT INTO hung VALUES (4)").unwrap();
            (Instant::now(), c)
        });
        wait_until(
            "the insert to wait for a writer",
            Duration::from_secs(10),
            || {
                proxy.metric(
                    "dbproxy_database_connection_requests_waiting{target_group=\"default\",target_role=\"read_write\"}",
                ) == 1
            },
        );
        let promoted = Instant::now();
        pair.promote_replica();
        let (answered, mut c) = writes.join().unwrap();
        println!(
            "[{io}] the insert waiting for a writer was answered {:?} after the promotion began",
            answered - promoted
        );
        assert!(
            answered > promoted,
            "[{io}] answered before there was a writer"
        );
        assert_eq!(server_id(&mut c), 2, "[{io}]");
        // The old primary wakes up writable: not used, and the log says why.
        pair.primary.freeze(false);
        wait_until(
            "the old primary to be fenced",
            Duration::from_secs(10),
            || proxy.log().contains("never two writers"),
        );
        c.query_drop("INSERT INTO hung VALUES (5)").unwrap();
        assert_eq!(server_id(&mut c), 2, "[{io}]");
        let on_new = pair
            .replica
            .root_sql("SELECT GROUP_CONCAT(n ORDER BY n) FROM shop.hung");
        assert_eq!(
            on_new.trim(),
            "1,4,5",
            "[{io}] the rolled-back transaction left nothing"
        );
        let on_old = pair
            .primary
            .root_sql("SELECT COUNT(*) FROM shop.hung WHERE n >= 4");
        assert_eq!(on_old.trim(), "0", "[{io}] a write reached the old primary");
    }
}

/// MariaDB Connector/J through the same failover: its two connections (an autocommit writer
/// with a server-side prepared statement, and one in transactions) are never reopened, each
/// sees at most one error, and both end on the new primary.
#[test]
fn connector_j_keeps_its_connections_through_a_failover() {
    let _serial = serial();
    for io in DRIVERS {
        let mut pair = Pair::start();
        pair.primary
            .root_sql("CREATE TABLE shop.jdrill (client INT, seq INT, PRIMARY KEY (client, seq))");
        pair.sync();
        let proxy = start_proxy(&pair, io, "", "");
        let port = proxy.port;
        let java = std::thread::spawn(move || {
            run_java(
                "FailoverClient",
                &[port.to_string(), APP_PASSWORD.into(), "8".into()],
            )
        });
        // Once both of its connections are writing, kill and promote.
        wait_until("Connector/J to write", Duration::from_secs(30), || {
            pair.primary
                .root_sql("SELECT COUNT(DISTINCT client) FROM shop.jdrill")
                .trim()
                == "2"
        });
        pair.primary.kill();
        std::thread::sleep(Duration::from_secs(1));
        pair.promote_replica();
        let out = java.join().unwrap();
        println!("[{io}] Connector/J: {}", out.trim());
        let f: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(f.first(), Some(&"OK"), "[{io}] {out}");
        let n = |i: usize| {
            f.get(i)
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(u32::MAX)
        };
        assert!(n(1) <= 1 && n(2) <= 1, "[{io}] errors: {out}");
        assert_eq!(n(3), 2, "[{io}] not on the new primary: {out}");
        assert_eq!(f.get(4), Some(&"true"), "[{io}] {out}");
    }
}
