//! The fleet budget: three dbproxy instances share one MariaDB's `max_connections_total`
//! through a three-member etcd cluster of the test's own, under sysbench, while etcd
//! members and a dbproxy die.

use proxy_tests::etcd::EtcdCluster;
use proxy_tests::*;
use serde_json::Value;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TOTAL: u64 = 30;
const FLOOR: u64 = 10;
/// The default lease: an etcd leader election on a loaded 2-core machine (CI runs other
/// suites beside this one) stays within the `lease_ttl / 2` an instance rides out.
const TTL: Duration = Duration::from_secs(10);

fn status(p: &Proxy) -> Value {
    let (_, _, body) = http_get(p.admin, "/status");
    serde_json::from_str(&body).unwrap_or(Value::Null)
}

/// This instance's view of the shared pool: `(contact, cap, held)`.
fn share(p: &Proxy) -> (String, u64, Option<u64>) {
    let s = status(p);
    let pool = &s["fleet"]["pools"][0];
    (
        pool["contact"].as_str().unwrap_or_default().to_string(),
        pool["cap"].as_u64().unwrap_or(0),
        pool["held"].as_u64(),
    )
}

/// The grant table as instance `p` last read it: instance → held.
fn table(p: &Proxy) -> Vec<(String, u64)> {
    let s = status(p);
    s["fleet"]["pools"][0]["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| Some((i["instance"].as_str()?.to_string(), i["held"].as_u64()?)))
        .collect()
}

/// Samples the server's connections from dbproxy (user `app`; the monitors log in as
/// `fleetmon`) every 100 ms; the highest count seen.
struct Sampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    t: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(db: &MariaDb) -> Sampler {
        use mysql::prelude::Queryable;
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let (s, p) = (stop.clone(), peak.clone());
        let mut m = monitor(db);
        let t = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let n: Option<u64> = m
                    .query_first(
                        "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = 'app'",
                    )
                    .unwrap();
                p.fetch_max(n.unwrap_or(0), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Sampler {
            stop,
            peak,
            t: Some(t),
        }
    }

    /// The highest count since the last call.
    fn take_peak(&self) -> u64 {
        self.peak.swap(0, Ordering::Relaxed)
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.t.take() {
            let _ = t.join();
        }
    }
}

/// sysbench oltp_point_select through `p` for `secs` with `threads`, in the background.
fn sysbench(p: &Proxy, threads: u32, secs: u32) -> Child {
    let mut c = sysbench_command(p.port, APP_PASSWORD);
    c.args(["oltp_point_select", "run", "--report-interval=0"])
        .arg(format!("--threads={threads}"))
        .arg(format!("--time={secs}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c.spawn().expect("sysbench")
}

/// Waits for a sysbench run; its transactions per second (panics on any error).
fn finish(what: &str, c: Child) -> f64 {
    let out = c.wait_with_output().unwrap();
    let text = sysbench_report(what, &out);
    let errors = sysbench_field(&text, "ignored errors:");
    assert!(
        errors.is_empty() || errors.contains(" 0 "),
        "{what}: {errors}"
    );
    let tx = sysbench_field(&text, "transactions:");
    tx.split('(')
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn start_instance(db: &MariaDb, etcd: &EtcdCluster, io: &str, name: &str) -> Proxy {
    Proxy::start_custom(
        db,
        io,
        "",
        &format!(
            "max_connections = 30\nmax_connections_total = {TOTAL}\n\
             monitor_user = \"fleetmon\"\nmonitor_password = \"fleetmon-pw\""
        ),
        &format!(
            "[fleet]\nname = \"t\"\n{}\nmax_instances = 3\ninstance_id = \"{name}\"\n\
             lease_ttl = \"{}s\"\nreturn_after = \"2s\"\n",
            etcd.endpoints_toml(),
            TTL.as_secs()
        ),
    )
}

#[test]
fn three_instances_share_one_budget_through_etcd() {
    for io in std::env::var("FLEET_IO")
        .map(|v| vec![v])
        .unwrap_or_else(|_| vec!["uring".into(), "epoll".into()])
    {
        let io = io.as_str();
        fleet_run(io);
    }
}

fn fleet_run(io: &str) {
    let db = MariaDb::start_with(&["--max-connections=500"]);
    db.root_sql(
        "CREATE USER fleetmon@'%' IDENTIFIED BY 'fleetmon-pw'; \
         CREATE DATABASE IF NOT EXISTS shop;",
    );
    sysbench_prepare(db.port, DB_PASSWORD, "oltp_point_select");
    let mut etcd = EtcdCluster::start(3);
    let mut ps: Vec<Proxy> = ["a", "b", "c"]
        .iter()
        .map(|n| start_instance(&db, &etcd, io, n))
        .collect();
    for p in &ps {
        wait_until("every instance registered", Duration::from_secs(20), || {
            share(p).0 == "connected"
        });
    }
    let sampler = Sampler::start(&db);

    // All three busy: the server never sees more than the budget, and each instance
    // gets about a third.
    let runs: Vec<Child> = ps.iter().map(|p| sysbench(p, 64, 12)).collect();
    let even = poll_until(Duration::from_secs(10), || {
        ps.iter().all(|p| share(p).1 >= FLOOR - 1)
    });
    let caps: Vec<u64> = ps.iter().map(|p| share(p).1).collect();
    assert!(
        even,
        "[{io}] shares {caps:?}: {}",
        ps.iter()
            .map(|p| status(p)["fleet"].to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
    let tps: Vec<f64> = runs
        .into_iter()
        .zip(["a", "b", "c"])
        .map(|(r, n)| finish(&format!("[{io}] all busy, {n}:"), r))
        .collect();
    let peak = sampler.take_peak();
    println!("[{io}] all busy: caps {caps:?}, tps {tps:?}, server peak {peak}");
    assert!(peak <= TOTAL, "[{io}] {peak} connections from dbproxy");
    assert!(caps.iter().sum::<u64>() <= TOTAL, "{caps:?}");
    assert!(caps.iter().all(|c| *c >= FLOOR - 1), "{caps:?}");
    // The status page shows the fleet.
    let (dom, _) = chromium(
        &format!("http://127.0.0.1:{}/", ps[0].admin),
        &["--dump-dom"],
    );
    assert!(
        dom.contains("fleet t, this instance a") && dom.contains("<td>b</td>"),
        "[{io}] the status page: {dom}"
    );

    // Only a is busy: b and c give back what they do not use, and a grows into it.
    let run = sysbench(&ps[0], 64, 14);
    wait_until(
        "a's share to grow past its floor",
        Duration::from_secs(12),
        || share(&ps[0]).1 >= 20,
    );
    let grown = share(&ps[0]).1;
    let alone = finish(&format!("[{io}] a alone:"), run);
    let peak = sampler.take_peak();
    println!(
        "[{io}] a alone: cap {grown}, tps {alone:.0} (with all three busy: {:.0}), server peak {peak}",
        tps[0]
    );
    assert!(peak <= TOTAL);
    assert!(
        alone > tps[0],
        "[{io}] a's throughput did not grow with its share"
    );

    // One etcd member dies: nothing changes.
    // Long enough to run through both kills and the outage.
    let runs: Vec<Child> = ps
        .iter()
        .map(|p| sysbench(p, 64, 3 * TTL.as_secs() as u32 + 6))
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    etcd.kill(0);
    let until = Instant::now() + 2 * TTL;
    while Instant::now() < until {
        for p in &ps {
            assert_eq!(
                share(p).0,
                "connected",
                "[{io}] one etcd member down: {}",
                status(p)["fleet"]
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // A second dies: no quorum. Each instance is at most at its floor within its lease
    // time, and keeps serving.
    etcd.kill(1);
    let lost = Instant::now();
    for p in &ps {
        wait_until("adrift at the floor", TTL + Duration::from_secs(1), || {
            let (contact, cap, _) = share(p);
            contact == "adrift" && cap <= FLOOR
        });
    }
    println!(
        "[{io}] no quorum: all adrift at their floor {:?} after losing it",
        lost.elapsed()
    );
    for (r, n) in runs.into_iter().zip(["a", "b", "c"]) {
        finish(&format!("[{io}] through the etcd outage, {n}:"), r);
    }
    let peak = sampler.take_peak();
    println!("[{io}] outage: server peak {peak}");
    assert!(peak <= TOTAL);

    // The quorum comes back: shared again.
    etcd.restart(0);
    etcd.restart(1);
    etcd.wait_healthy();
    for p in &ps {
        wait_until("registered again", Duration::from_secs(30), || {
            share(p).0 == "connected"
        });
    }
    let run = sysbench(&ps[2], 64, 12);
    wait_until("c's share to grow again", Duration::from_secs(12), || {
        share(&ps[2]).1 >= 20
    });
    let c_grown = share(&ps[2]).1;
    finish(&format!("[{io}] c alone after the outage:"), run);
    println!("[{io}] after the outage: c's cap {c_grown}");

    // kill -9 c while it holds most of the budget: once its entry is collected, what it
    // held above its floor goes to a (its floor stays reserved: a crash and a partition
    // look the same from here).
    let run = sysbench(&ps[0], 64, 8 + 3 * TTL.as_secs() as u32);
    ps[2].kill9();
    let killed = Instant::now();
    wait_until("c's entry to leave the grant table", 3 * TTL, || {
        !table(&ps[0]).iter().any(|(i, _)| i == "c")
    });
    let gone = killed.elapsed();
    wait_until("a to take what c gave up", 2 * TTL, || {
        share(&ps[0]).1 >= 18
    });
    println!(
        "[{io}] kill -9 c: its entry gone after {gone:?}; a's cap {}",
        share(&ps[0]).1
    );
    finish(&format!("[{io}] a after c died:"), run);
    assert!(sampler.take_peak() <= TOTAL);
    // SHOW FLEET names the survivors and their shares.
    let keys = etcd.get_prefix("/dbproxy/fleet/t/grants/");
    assert!(keys.contains("\"a\""), "{keys}");
    drop(sampler);
}
