//! The warm pool: reuse across client connections, the max_connections cap, the borrow
//! timeout.

use mysql::prelude::*;
use proxy_tests::*;
use std::time::{Duration, Instant};

/// `clients` threads, each connecting, querying and disconnecting `rounds` times.
fn storm(port: u16, clients: usize, rounds: usize) {
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            std::thread::spawn(move || {
                for r in 0..rounds {
                    let mut c = connect(port, "app", APP_PASSWORD, "shop")
                        .unwrap_or_else(|e| panic!("client {i}: {e}"));
                    let v: Option<u64> = c.query_first(format!("SELECT {i} * 1000 + {r}")).unwrap();
                    assert_eq!(v, Some((i * 1000 + r) as u64));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn connect_storm_makes_no_new_backend_connections_after_warm_up() {
    let db = MariaDb::start();
    let max = 20u64;
    for io in DRIVERS {
        let proxy = Proxy::start(
            &db,
            io,
            &format!("max_connections = {max}\nmax_idle_connections = {max}"),
        );
        let mut mon = monitor(&db);
        let peak = ThreadsPeak::start(&db);
        storm(proxy.port, 300, 1); // warm-up
        let before = global_status(&mut mon, "Connections");
        let t0 = Instant::now();
        storm(proxy.port, 300, 5);
        let after = global_status(&mut mon, "Connections");
        let peak = peak.finish();
        // The sampler's and this thread's own connections, and dbproxy's health check.
        let monitors = 3;
        println!(
            "[{io}] 1500 client connections in {:?}; backend Connections {before} -> {after}; peak Threads_connected {}",
            t0.elapsed(),
            peak
        );
        if after != before {
            let log = proxy.log();
            let _ = std::fs::write(
                std::env::temp_dir().join(format!("dbproxy-storm-{io}.log")),
                &log,
            );
            let tail: Vec<&str> = log
                .lines()
                .rev()
                .filter(|l| !l.contains("logged in"))
                .take(40)
                .collect();
            println!(
                "dbproxy log (last lines, newest first):\n{}",
                tail.join("\n")
            );
        }
        assert_eq!(
            after, before,
            "[{io}] the database saw new connections after warm-up"
        );
        assert!(
            peak <= max + monitors,
            "[{io}] Threads_connected exceeded max_connections"
        );
    }
}

#[test]
fn borrow_timeout_gives_a_clear_error() {
    let db = MariaDb::start();
    for io in DRIVERS {
        let proxy = Proxy::start(
            &db,
            io,
            "max_connections = 4\nmax_idle_connections = 4\nconnection_borrow_timeout = \"2s\"",
        );
        let mut holders: Vec<mysql::Conn> = (0..4)
            .map(|_| {
                let mut c = connect(proxy.port, "app", APP_PASSWORD, "").unwrap();
                c.query_drop("BEGIN").unwrap();
                c.query_drop("SELECT 1").unwrap();
                c
            })
            .collect();
        // The mysql crate runs queries while connecting: the error may come from either.
        let t0 = Instant::now();
        let err = connect(proxy.port, "app", APP_PASSWORD, "")
            .and_then(|mut c| c.query_drop("SELECT 1"))
            .unwrap_err();
        let waited = t0.elapsed();
        match err {
            mysql::Error::MySqlError(e) => {
                assert_eq!(e.code, 9501, "[{io}] {e:?}");
                assert!(
                    e.message.contains("timed out") && e.message.contains("default"),
                    "{}",
                    e.message
                );
            }
            other => panic!("[{io}] expected a borrow timeout error, got {other:?}"),
        }
        println!("[{io}] 5th client waited {waited:?} before the error");
        assert!(
            waited >= Duration::from_millis(1500),
            "[{io}] it must wait for the timeout first"
        );
        // A client gets served as soon as a connection frees up.
        holders.pop();
        let mut fifth = connect(proxy.port, "app", APP_PASSWORD, "").unwrap();
        let v: Option<i32> = fifth.query_first("SELECT 5").unwrap();
        assert_eq!(v, Some(5));
        for h in &mut holders {
            h.query_drop("COMMIT").unwrap();
        }
    }
}

#[test]
fn backend_sessions_are_reset_between_clients() {
    let db = MariaDb::start();
    for io in DRIVERS {
        // One backend connection: every client gets the same one, reset.
        let proxy = Proxy::start(&db, io, "max_connections = 1\nmax_idle_connections = 1\ninit_query = \"SET SESSION wait_timeout = 4321\"");
        let mut a = connect(proxy.port, "app", APP_PASSWORD, "").unwrap();
        let first_id: Option<u64> = a.query_first("SELECT CONNECTION_ID()").unwrap();
        a.query_drop("USE shop2").unwrap();
        a.query_drop("SET @leak = 1, SESSION sql_mode = 'ANSI'")
            .unwrap();
        a.query_drop("CREATE TEMPORARY TABLE shop.tmp_leak (x INT)")
            .unwrap();
        drop(a);
        let mut b = connect(proxy.port, "app", APP_PASSWORD, "").unwrap();
        let row: (Option<u64>, Option<String>, Option<i64>, String, u64) = b
            .query_first("SELECT CONNECTION_ID(), DATABASE(), @leak, @@sql_mode, @@wait_timeout")
            .unwrap()
            .unwrap();
        assert_eq!(
            row.0, first_id,
            "[{io}] the same backend connection was reused"
        );
        assert_eq!(row.1, None, "[{io}] default database reset");
        assert_eq!(row.2, None, "[{io}] user variable reset");
        assert_ne!(row.3, "ANSI", "[{io}] sql_mode reset");
        assert_eq!(row.4, 4321, "[{io}] init_query ran again after the reset");
        match b.query_drop("SELECT * FROM shop.tmp_leak") {
            Err(mysql::Error::MySqlError(e)) => {
                assert_eq!(e.code, 1146, "[{io}] temporary table dropped? {e}")
            }
            other => panic!("[{io}] temporary table left behind: {other:?}"),
        }
    }
}
