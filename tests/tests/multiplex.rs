//! Transaction-level multiplexing: many clients on few backend connections, session state
//! that follows each client, prepared statements that never pin, and pins that start,
//! hold and end when they should.

use mysql::prelude::*;
use mysql::Conn;
use proxy_tests::raw::RawClient;
use proxy_tests::*;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};

/// Runs `f` while, if `hold`, client `c` keeps a connection in a transaction, so that the
/// clients in `f` land on other connections.
fn holding_a_connection(c: &mut Conn, hold: bool, f: impl FnOnce()) {
    if hold {
        c.query_drop("BEGIN").unwrap();
        c.query_drop("SELECT 1").unwrap();
    }
    f();
    if hold {
        c.query_drop("COMMIT").unwrap();
    }
}

fn conn_id(c: &mut Conn) -> u64 {
    c.query_first("SELECT CONNECTION_ID()").unwrap().unwrap()
}

#[test]
fn two_thousand_clients_on_twenty_backend_connections() {
    raise_fd_limit();
    let db = MariaDb::start();
    db.root_sql("CREATE TABLE shop.mx (client INT, v INT, KEY (client)) ENGINE=InnoDB");
    let clients = 2000;
    for io in DRIVERS {
        db.root_sql("DELETE FROM shop.mx");
        let proxy = Proxy::start(&db, io, "max_connections = 20\nmax_idle_connections = 20");
        let peak = ThreadsPeak::start(&db);
        let all_connected = Arc::new(Barrier::new(clients));
        let port = proxy.port;
        let threads: Vec<_> = (0..clients)
            .map(|i| {
                let barrier = all_connected.clone();
                std::thread::Builder::new()
                    .stack_size(256 * 1024)
                    .spawn(move || {
                        let mut c = connect(port, "app", APP_PASSWORD, "shop")
                            .unwrap_or_else(|e| panic!("client {i}: {e}"));
                        barrier.wait(); // all 2000 are connected at once from here on
                        for r in 0..3u64 {
                            let v: Option<u64> =
                                c.query_first(format!("SELECT {i} * 10 + {r}")).unwrap();
                            assert_eq!(v, Some(i as u64 * 10 + r));
                        }
                        c.query_drop("BEGIN").unwrap();
                        c.exec_drop("INSERT INTO mx VALUES (?, ?)", (i, 1)).unwrap();
                        c.exec_drop("INSERT INTO mx VALUES (?, ?)", (i, 2)).unwrap();
                        let n: Option<u64> = c
                            .exec_first("SELECT SUM(v) FROM mx WHERE client = ?", (i,))
                            .unwrap();
                        assert_eq!(n, Some(3), "client {i} sees its own uncommitted rows");
                        c.query_drop("COMMIT").unwrap();
                    })
                    .unwrap()
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let peak = peak.finish();
        let rows = db.root_sql("SELECT COUNT(*), COUNT(DISTINCT client), SUM(v) FROM shop.mx");
        assert_eq!(
            rows.trim(),
            format!("{}\t{clients}\t{}", clients * 2, clients * 3),
            "[{io}]"
        );
        let opened =
            proxy.metric("dbproxy_database_connections_setup_succeeded_total{target_group=\"default\",target_role=\"read_write\"}");
        println!("[{io}] {clients} concurrent clients: backend connections opened {opened}, peak Threads_connected {peak}");
        assert!(opened <= 20, "[{io}] opened {opened} backend connections");
        // 20 pooled connections, the sampler's own, and dbproxy's health check (outside
        // max_connections, as RDS Proxy's own monitoring is).
        assert!(peak <= 20 + 2, "[{io}] Threads_connected peaked at {peak}");
    }
}

#[test]
fn session_state_follows_the_client_and_never_leaks() {
    let db = MariaDb::start();
    for io in DRIVERS {
        // One worker: one pool, so that the clients compete for the same connections.
        let proxy = Proxy::start_full(
            &db,
            io,
            "workers = 1",
            "max_connections = 3\nmax_idle_connections = 3",
        );
        let mut a = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        let mut b = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        // C works in A's database, so that it takes the connections A would prefer.
        let mut c = connect(proxy.port, "app", APP_PASSWORD, "shop2").unwrap();
        let defaults: (String, String, Option<String>, String) = b
            .query_first("SELECT @@sql_mode, @@time_zone, DATABASE(), @@character_set_client")
            .unwrap()
            .unwrap();
        a.query_drop("SET SESSION sql_mode = 'ANSI_QUOTES'")
            .unwrap();
        a.query_drop("SET time_zone = '+05:30'").unwrap();
        a.query_drop("USE shop2").unwrap();
        a.query_drop("SET NAMES latin1").unwrap();
        let mut ids = HashSet::new();
        for i in 0..40 {
            // Now and then another client holds a connection in a transaction, so that A
            // lands on a different one.
            holding_a_connection(&mut c, i % 3 == 0, || {
                let (id, mode, tz, dbname, cs): (u64, String, String, Option<String>, String) = a
                    .query_first("SELECT CONNECTION_ID(), @@sql_mode, @@time_zone, DATABASE(), @@character_set_client")
                    .unwrap()
                    .unwrap();
                ids.insert(id);
                assert_eq!(
                    (mode.as_str(), tz.as_str(), dbname.as_deref(), cs.as_str()),
                    ("ANSI_QUOTES", "+05:30", Some("shop2"), "latin1"),
                    "[{io}] A, round {i}"
                );
                let seen: (String, String, Option<String>, String) = b
                    .query_first(
                        "SELECT @@sql_mode, @@time_zone, DATABASE(), @@character_set_client",
                    )
                    .unwrap()
                    .unwrap();
                assert_eq!(
                    seen, defaults,
                    "[{io}] B sees nothing of A's state, round {i}"
                );
            });
        }
        println!("[{io}] A was served by {} backend connections", ids.len());
        assert!(ids.len() >= 2, "[{io}] A never changed backend connection");

        // A user variable moves with its client like the system variables, without a pin,
        // and is never visible to another client.
        let mut d = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        d.query_drop("SET @v = 1, @s = _utf8mb4'Grüße' COLLATE utf8mb4_unicode_ci")
            .unwrap();
        let mut d_ids = HashSet::new();
        for i in 0..12 {
            holding_a_connection(&mut c, i % 2 == 0, || {
                let (id, v, s, coll): (u64, Option<i64>, Option<String>, Option<String>) = d
                    .query_first("SELECT CONNECTION_ID(), @v, @s, COLLATION(@s)")
                    .unwrap()
                    .unwrap();
                d_ids.insert(id);
                assert_eq!(
                    (v, s.as_deref(), coll.as_deref()),
                    (Some(1), Some("Grüße"), Some("utf8mb4_unicode_ci")),
                    "[{io}] D, round {i}"
                );
                let other: (Option<i64>, Option<String>) =
                    b.query_first("SELECT @v, @s").unwrap().unwrap();
                assert_eq!(other, (None, None), "[{io}] B never sees D's variables");
            });
        }
        assert!(d_ids.len() >= 2, "[{io}] D never moved");
        assert_eq!(proxy.pins_started("user_variable"), 0, "[{io}]");
        assert_eq!(proxy.pinned_now("unclassified"), 0, "[{io}]");
    }
}

#[test]
fn prepared_statements_never_pin_and_are_not_re_prepared_in_a_storm() {
    let db = MariaDb::start();
    for io in DRIVERS {
        let proxy = Proxy::start(&db, io, "max_connections = 4\nmax_idle_connections = 4");
        let mut mon = monitor(&db);
        let prepares_before = global_status(&mut mon, "Com_stmt_prepare");
        let stop = Arc::new(AtomicBool::new(false));
        let others: Vec<_> = (0..4)
            .map(|k| {
                let stop = stop.clone();
                let port = proxy.port;
                std::thread::spawn(move || {
                    let mut c = connect(port, "app", APP_PASSWORD, "shop").unwrap();
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let v: Option<u64> = c.exec_first("SELECT ? * 2", (n,)).unwrap();
                        assert_eq!(v, Some(n * 2));
                        let w: Option<u64> = c.query_first(format!("SELECT {k} + {n}")).unwrap();
                        assert_eq!(w, Some(k + n));
                        n += 1;
                    }
                })
            })
            .collect();
        // The crate's own statement cache (32 by default) would close statements we keep.
        let opts = mysql::Opts::from_url(&format!(
            "{}&stmt_cache_size=64",
            url(proxy.port, "app", APP_PASSWORD, "shop")
        ))
        .unwrap();
        let mut c = Conn::new(opts).unwrap();
        let stmts: Vec<_> = (0..50)
            .map(|k| {
                c.prep(format!("SELECT ? + {k}, CONCAT(?, '-{k}')"))
                    .unwrap()
            })
            .collect();
        let mut ids = HashSet::new();
        for i in 0..10_000u64 {
            let k = (i * 7) % 50;
            let (sum, s): (u64, String) = c
                .exec_first(&stmts[k as usize], (i, format!("x{i}")))
                .unwrap()
                .unwrap();
            assert_eq!(
                (sum, s),
                (i + k, format!("x{i}-{k}")),
                "[{io}] execution {i}"
            );
            if i % 1000 == 0 {
                ids.insert(conn_id(&mut c));
            }
        }
        stop.store(true, Ordering::Relaxed);
        for t in others {
            t.join().unwrap();
        }
        let prepares = global_status(&mut mon, "Com_stmt_prepare") - prepares_before;
        println!("[{io}] 50 statements × 10,000 executions on {} backend connections; backend prepares {prepares}", ids.len());
        for reason in [
            "cursor",
            "long_data",
            "unclassified",
            "transaction",
            "user_variable",
        ] {
            assert_eq!(
                proxy.pins_started(reason),
                0,
                "[{io}] prepared statements pinned ({reason})"
            );
        }
        assert!(ids.len() >= 2, "[{io}] the client was never moved");
        // Each backend prepares each statement at most once (plus the others' one).
        assert!(
            prepares <= 4 * 51 + 4,
            "[{io}] re-prepare storm: {prepares} prepares"
        );
        // Closing and preparing again works; an unknown id is refused.
        for s in stmts {
            c.close(s).unwrap();
        }
        let v: Option<u64> = c.exec_first("SELECT ? + 1", (1,)).unwrap();
        assert_eq!(v, Some(2));
    }
}

#[test]
fn last_insert_id_is_right_for_100_clients_on_4_connections() {
    let db = MariaDb::start();
    db.root_sql("CREATE TABLE shop.ai (id BIGINT AUTO_INCREMENT PRIMARY KEY, marker VARCHAR(32)) ENGINE=InnoDB");
    for io in DRIVERS {
        let proxy = Proxy::start(&db, io, "max_connections = 4\nmax_idle_connections = 4");
        let port = proxy.port;
        let threads: Vec<_> = (0..100)
            .map(|i| {
                std::thread::spawn(move || {
                    let mut c = connect(port, "app", APP_PASSWORD, "shop").unwrap();
                    for r in 0..5 {
                        let marker = format!("{i}-{r}");
                        c.exec_drop("INSERT INTO ai (marker) VALUES (?)", (&marker,))
                            .unwrap();
                        let id: u64 = c.query_first("SELECT LAST_INSERT_ID()").unwrap().unwrap();
                        let m: Option<String> = c
                            .exec_first("SELECT marker FROM ai WHERE id = ?", (id,))
                            .unwrap();
                        assert_eq!(
                            m.as_deref(),
                            Some(marker.as_str()),
                            "LAST_INSERT_ID() of client {i}"
                        );
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // LAST_INSERT_ID() is read back with each insert and replayed where it is read:
        // nothing pins.
        let text = proxy.metrics();
        let pinned: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("dbproxy_pins_total") && !l.ends_with(" 0"))
            .collect();
        assert!(pinned.is_empty(), "[{io}] pins: {pinned:?}");
    }
}

/// Runs `hold` on a pinned client while another client works, checking the pinned client
/// keeps its connection; returns the pinned client's connection id.
fn holds(proxy: &Proxy, pinned: &mut Conn, other: &mut Conn, reason: &str, io: &str) -> u64 {
    let id = conn_id(pinned);
    // Pins are counted right after the reply goes out: wait for the count, not the reply.
    wait_for(
        || proxy.pinned_now(reason) == 1,
        &format!("[{io}] {reason} pin started"),
    );
    for _ in 0..5 {
        other.query_drop("SELECT 1").unwrap();
        assert_eq!(conn_id(pinned), id, "[{io}] {reason} pin holds");
    }
    id
}

#[test]
fn each_pin_starts_holds_and_ends() {
    let db = MariaDb::start();
    db.root_sql("CREATE TABLE shop.p (id INT PRIMARY KEY) ENGINE=InnoDB; INSERT INTO shop.p VALUES (1),(2),(3)");
    db.root_sql("CREATE TABLE shop.rcv (id INT PRIMARY KEY, v INT) ENGINE=InnoDB; INSERT INTO shop.rcv VALUES (1, 0)");
    for io in DRIVERS {
        db.root_sql("DELETE FROM shop.p WHERE id > 3");
        let proxy = Proxy::start(&db, io, "max_connections = 2\nmax_idle_connections = 2");
        let mut a = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        let mut other = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        let ended = |reason: &str| {
            wait_for(
                || proxy.pinned_now(reason) == 0,
                &format!("[{io}] {reason} pin ended"),
            );
        };

        a.query_drop("BEGIN").unwrap();
        holds(&proxy, &mut a, &mut other, "transaction", io);
        a.query_drop("COMMIT").unwrap();
        ended("transaction");

        // Autocommit off: a transaction opens with the next statement on a table and holds
        // until COMMIT; in between the client keeps no connection (autocommit is replayed).
        a.query_drop("SET autocommit = 0").unwrap();
        assert_eq!(proxy.pinned_now("transaction"), 0, "[{io}]");
        a.query_drop("INSERT INTO p VALUES (50)").unwrap();
        holds(&proxy, &mut a, &mut other, "transaction", io);
        let seen: Option<i64> = other
            .query_first("SELECT COUNT(*) FROM p WHERE id = 50")
            .unwrap();
        assert_eq!(seen, Some(0), "[{io}] uncommitted");
        a.query_drop("ROLLBACK").unwrap();
        ended("transaction");
        holding_a_connection(&mut other, true, || {
            let ac: Option<i64> = a.query_first("SELECT @@autocommit").unwrap();
            assert_eq!(
                ac,
                Some(0),
                "[{io}] autocommit stays off on another connection"
            );
            a.query_drop("INSERT INTO p VALUES (51)").unwrap();
        });
        holds(&proxy, &mut a, &mut other, "transaction", io);
        a.query_drop("COMMIT").unwrap();
        ended("transaction");
        a.query_drop("SET autocommit = 1").unwrap();

        a.query_drop("LOCK TABLES p READ").unwrap();
        holds(&proxy, &mut a, &mut other, "lock_tables", io);
        a.query_drop("UNLOCK TABLES").unwrap();
        ended("lock_tables");

        let got: Option<i64> = a.query_first("SELECT GET_LOCK('dbproxy-test', 5)").unwrap();
        assert_eq!(got, Some(1));
        holds(&proxy, &mut a, &mut other, "get_lock", io);
        let free: Option<i64> = other
            .query_first("SELECT IS_FREE_LOCK('dbproxy-test')")
            .unwrap();
        assert_eq!(free, Some(0), "[{io}] the lock is held by A's connection");
        a.query_drop("DO RELEASE_LOCK('dbproxy-test')").unwrap();
        ended("get_lock");

        // FOUND_ROWS() and SET TRANSACTION no longer pin; they follow the client. Another
        // client holds A's connection in between, so that A moves.
        let rows: Option<i64> = other.query_first("SELECT COUNT(*) FROM p").unwrap();
        a.query_drop("SELECT SQL_CALC_FOUND_ROWS id FROM p LIMIT 1")
            .unwrap();
        holding_a_connection(&mut other, true, || {
            let n: Option<i64> = a.query_first("SELECT FOUND_ROWS()").unwrap();
            assert_eq!(n, rows, "[{io}] FOUND_ROWS() after moving");
        });
        // The next transaction's characteristics: READ ONLY shows in a write that fails,
        // READ COMMITTED in a row another client changes mid-transaction.
        let read_only = |c: &mut Conn| -> bool {
            c.query_drop("BEGIN").unwrap();
            let failed = c.query_drop("INSERT INTO p VALUES (100)").is_err();
            c.query_drop("ROLLBACK").unwrap();
            failed
        };
        a.query_drop("SET TRANSACTION READ ONLY").unwrap();
        let mut x = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        holding_a_connection(&mut other, true, || {
            // The connection A set it on went back to the pool and serves X now.
            assert!(!read_only(&mut x), "[{io}] X got A's SET TRANSACTION");
        });
        a.query_drop("SELECT 1").unwrap(); // a statement without a table leaves it pending
        assert!(
            read_only(&mut a),
            "[{io}] A's next transaction is read only"
        );
        assert!(!read_only(&mut a), "[{io}] only the next one");
        let committed = |a: &mut Conn, other: &mut Conn| -> bool {
            a.query_drop("BEGIN").unwrap();
            let before: Option<i64> = a.query_first("SELECT v FROM rcv WHERE id = 1").unwrap();
            other
                .query_drop("UPDATE rcv SET v = v + 1 WHERE id = 1")
                .unwrap();
            let after: Option<i64> = a.query_first("SELECT v FROM rcv WHERE id = 1").unwrap();
            a.query_drop("COMMIT").unwrap();
            before != after
        };
        a.query_drop("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            .unwrap();
        holding_a_connection(&mut other, true, || {
            let _ = x.query_drop("SELECT 1");
        });
        assert!(
            committed(&mut a, &mut other),
            "[{io}] A's next transaction is READ COMMITTED"
        );
        assert!(
            !committed(&mut a, &mut other),
            "[{io}] the one after is REPEATABLE READ"
        );
        assert_eq!(proxy.pins_started("unclassified"), 0, "[{io}]");

        // Pins the server does not report: FLUSH TABLES WITH READ LOCK, HANDLER, BACKUP STAGE.
        a.query_drop("FLUSH TABLES WITH READ LOCK").unwrap();
        holds(&proxy, &mut a, &mut other, "lock_tables", io);
        a.query_drop("UNLOCK TABLES").unwrap();
        ended("lock_tables");
        a.query_drop("HANDLER p OPEN AS hp").unwrap();
        holds(&proxy, &mut a, &mut other, "handler", io);
        let first: Option<i64> = a.query_first("HANDLER hp READ FIRST").unwrap();
        assert!(first.is_some(), "[{io}] the handler is on A's connection");
        a.query_drop("HANDLER hp CLOSE").unwrap();
        ended("handler");
        a.query_drop("BACKUP STAGE START").unwrap();
        holds(&proxy, &mut a, &mut other, "backup_stage", io);
        a.query_drop("BACKUP STAGE END").unwrap();
        ended("backup_stage");

        let before = proxy.pins_started("load_data");
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("p.csv");
        std::fs::write(&csv, "10\n11\n").unwrap();
        let out = mariadb_cli(
            proxy.port,
            "app",
            APP_PASSWORD,
            &["--local-infile=1", "shop"],
            &format!("LOAD DATA LOCAL INFILE '{}' INTO TABLE p", csv.display()),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        wait_for(
            || proxy.pins_started("load_data") == before + 1,
            &format!("[{io}] load_data counted"),
        );
        ended("load_data");

        // Session-long pins end only with the session (and the connection is reset then).
        for (sql, reason) in [
            ("CREATE TEMPORARY TABLE tmp_pin (x INT)", "temporary_table"),
            (
                "CREATE OR REPLACE TEMPORARY TABLE tmp_pin (x INT)",
                "temporary_table",
            ),
            (
                "/*M!100000 CREATE TEMPORARY TABLE tmp_pin (x INT) */",
                "temporary_table",
            ),
            (
                "EXECUTE IMMEDIATE 'CREATE TEMPORARY TABLE tmp_pin (x INT)'",
                "temporary_table",
            ),
            ("PREPARE s1 FROM 'SELECT 1'", "text_prepare"),
            ("SET SESSION session_track_schema = OFF", "unclassified"),
        ] {
            let mut s = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
            s.query_drop(sql).unwrap();
            holds(&proxy, &mut s, &mut other, reason, io);
            drop(s);
            ended(reason);
        }
        // Whichever connection the pinned sessions used was reset: no temporary table.
        for _ in 0..3 {
            let mut s = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
            match s.query_drop("SELECT * FROM tmp_pin") {
                Err(mysql::Error::MySqlError(e)) => {
                    assert_eq!(e.code, 1146, "[{io}] temporary table left behind? {e}")
                }
                other => panic!("[{io}] temporary table left behind: {other:?}"),
            }
        }
    }
}

#[test]
fn cursor_and_long_data_pins_with_the_raw_protocol() {
    let db = MariaDb::start();
    for io in DRIVERS {
        let proxy = Proxy::start(&db, io, "max_connections = 2\nmax_idle_connections = 2");
        let mut raw = RawClient::login(proxy.port, "app", APP_PASSWORD).unwrap();
        let (sid, _) = raw.prepare("SELECT seq FROM shop.seq_1_to_10");
        raw.execute(sid, 1, &[]); // CURSOR_TYPE_READ_ONLY: no rows yet
        wait_for(
            || proxy.pinned_now("cursor") == 1,
            &format!("[{io}] cursor pin started"),
        );
        let mut rows = 0;
        loop {
            let (n, last) = raw.fetch(sid, 3);
            rows += n;
            if last {
                break;
            }
            assert_eq!(proxy.pinned_now("cursor"), 1, "[{io}] cursor pin holds");
        }
        assert_eq!(rows, 10, "[{io}] all rows came through the cursor");
        wait_for(
            || proxy.pinned_now("cursor") == 0,
            &format!("[{io}] cursor pin ended"),
        );

        let (sid2, params) = raw.prepare("SELECT CAST(LENGTH(?) AS CHAR)");
        assert_eq!(params, 1);
        raw.send_long_data(sid2, 0, &[b'x'; 1000]);
        raw.send_long_data(sid2, 0, &[b'y'; 500]);
        wait_for(
            || proxy.pinned_now("long_data") == 1,
            &format!("[{io}] long data pin started"),
        );
        let v = raw.execute_one_value(sid2, 0xfe); // MYSQL_TYPE_STRING, value from long data
        assert_eq!(
            v, b"1500",
            "[{io}] long data reached the backend that executes"
        );
        wait_for(
            || proxy.pinned_now("long_data") == 0,
            &format!("[{io}] long data pin ended"),
        );
    }
}

#[test]
fn a_client_that_vanishes_mid_transaction_is_rolled_back() {
    let db = MariaDb::start();
    db.root_sql("CREATE TABLE shop.v (id INT PRIMARY KEY) ENGINE=InnoDB");
    for io in DRIVERS {
        db.root_sql("DELETE FROM shop.v");
        let proxy = Proxy::start(&db, io, "max_connections = 1\nmax_idle_connections = 1");
        let mut raw = RawClient::login(proxy.port, "app", APP_PASSWORD).unwrap();
        raw.query("BEGIN");
        raw.query("INSERT INTO shop.v VALUES (1)");
        drop(raw); // TCP close, no COM_QUIT
        let mut b = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        let (n, in_tx): (i64, i64) = b
            .query_first("SELECT COUNT(*), @@in_transaction FROM v")
            .unwrap()
            .unwrap();
        assert_eq!(
            (n, in_tx),
            (0, 0),
            "[{io}] rolled back, and the connection is clean"
        );
    }
}

/// A user variable too big to replay (`SET @v = _utf8mb3 X'...'` would not fit in one packet
/// the server takes, though its hex digits alone would, so every MariaDB release sends them)
/// stays on the connection that has it:
/// without the filter the client is pinned there and keeps seeing its value; with
/// `session_pinning_filters = ["exclude_variable_sets"]` it is not pinned (RDS Proxy's
/// filter: the client accepts that such a value may not follow it) and the one
/// connection serves another client at once.
#[test]
fn exclude_variable_sets_filter() {
    // 1 MiB packets: 524,200 bytes give 1,048,400 hex digits, which HEX() returns (they fit
    // in 1,048,576), and a replay of them does not fit.
    let db = MariaDb::start_with(&["--max-allowed-packet=1M"]);
    const SET_BIG: &str = "SET @v = REPEAT('x', 524200)";
    let pool = "max_connections = 1\nconnection_borrow_timeout = \"3s\"";
    for io in DRIVERS {
        let proxy = Proxy::start(&db, io, pool);
        let mut a = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        a.query_drop(SET_BIG).unwrap();
        // The read-back is learnt right after the answer went out.
        wait_for(
            || proxy.pins_started("user_variable") == 1,
            &format!("[{io}] no filter: pinned"),
        );
        assert_eq!(proxy.pinned_now("user_variable"), 1, "[{io}]");
        let len: Option<u64> = a.query_first("SELECT LENGTH(@v)").unwrap();
        assert_eq!(
            len,
            Some(524_200),
            "[{io}] the pinned client keeps its value"
        );
        // The one connection is A's: another client waits for it in vain.
        // (The mysql crate reads a variable at connect: that already waits.)
        let e = connect(proxy.port, "app", APP_PASSWORD, "shop")
            .and_then(|mut b| b.query_drop("SELECT 1"))
            .expect_err("the only connection is pinned");
        assert!(e.to_string().contains("timed out"), "[{io}] {e}");
        drop(a);
        wait_for(
            || proxy.pinned_now("user_variable") == 0,
            &format!("[{io}] the pin to end with its client"),
        );
    }
    for io in DRIVERS {
        let proxy = Proxy::start(
            &db,
            io,
            &format!("{pool}\nsession_pinning_filters = [\"exclude_variable_sets\"]"),
        );
        let mut a = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        a.query_drop(SET_BIG).unwrap();
        assert_eq!(
            proxy.pins_started("user_variable"),
            0,
            "[{io}] the filter: no pin"
        );
        assert_eq!(proxy.pinned_now("user_variable"), 0, "[{io}]");
        let mut b = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        let v: Option<i32> = b.query_first("SELECT 7").unwrap();
        assert_eq!(v, Some(7), "[{io}] the connection serves another client");
        let seen: Option<Option<u64>> = b.query_first("SELECT LENGTH(@v)").unwrap();
        assert_eq!(
            seen,
            Some(None),
            "[{io}] another client never sees A's variable"
        );
    }
}

#[test]
fn awkward_session_variables_follow_or_pin_the_client() {
    let db = MariaDb::start();
    db.root_sql("CREATE TABLE shop.aw (id INT AUTO_INCREMENT PRIMARY KEY, v INT) ENGINE=InnoDB");
    for io in DRIVERS {
        let proxy = Proxy::start_full(
            &db,
            io,
            "workers = 1",
            "max_connections = 3\nmax_idle_connections = 3",
        );
        let mut e = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        let mut c = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        let mut b = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        // A NULL character set and an empty sql_mode survive being replayed elsewhere.
        e.query_drop("SET character_set_results = NULL, sql_mode = ''")
            .unwrap();
        let mut ids = HashSet::new();
        for i in 0..12 {
            holding_a_connection(&mut c, i % 2 == 0, || {
                let (id, cs, mode): (u64, Option<String>, String) = e
                    .query_first("SELECT CONNECTION_ID(), @@character_set_results, @@sql_mode")
                    .unwrap()
                    .unwrap();
                ids.insert(id);
                assert_eq!((cs, mode.as_str()), (None, ""), "[{io}] round {i}");
                let seen: (Option<String>, String) = b
                    .query_first("SELECT @@character_set_results, @@sql_mode")
                    .unwrap()
                    .unwrap();
                assert!(
                    seen.0.is_some() && !seen.1.is_empty(),
                    "[{io}] B keeps its own: {seen:?}"
                );
            });
        }
        assert!(ids.len() >= 2, "[{io}] E never moved");
        // A one-shot variable pins the client, so that its next INSERT uses it.
        let mut f = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        f.query_drop("SET insert_id = 4242").unwrap();
        c.query_drop("SELECT 1").unwrap();
        f.query_drop("INSERT INTO aw (v) VALUES (1)").unwrap();
        let id: Option<u64> = f.query_first("SELECT LAST_INSERT_ID()").unwrap();
        assert_eq!(id, Some(4242), "[{io}]");
        db.root_sql("DELETE FROM shop.aw");
    }
}
