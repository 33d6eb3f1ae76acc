//! Isolation between clients that share backend connections: prepared statements bound to
//! their own schema and sql_mode, warnings that belong to the client that raised them, and
//! LAST_INSERT_ID() for an autocommit insert loop that never holds a connection while idle,
//! and session changes the server does not describe.

use mysql::prelude::*;
use mysql::{Conn, Row};
use proxy_tests::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

fn open(port: u16, db: &str) -> Conn {
    connect(port, "app", APP_PASSWORD, db).unwrap()
}

#[test]
fn two_tenants_read_only_their_own_rows_with_the_binary_protocol() {
    let db = MariaDb::start();
    create_tenants(&db);
    for io in DRIVERS {
        let proxy = Proxy::start(&db, io, "max_connections = 2\nmax_idle_connections = 2");
        let mut t1 = open(proxy.port, "tenant1");
        let mut t2 = open(proxy.port, "tenant2");
        let mut holder = open(proxy.port, "tenant1");
        let sql = "SELECT owner FROM orders WHERE id = ?";
        let s1 = t1.prep(sql).unwrap();
        let s2 = t2.prep(sql).unwrap();
        // The same text prepared under another sql_mode means something else: with
        // ANSI_QUOTES "owner" is the column, without it a string.
        let mut ansi = open(proxy.port, "tenant2");
        ansi.query_drop("SET sql_mode = 'ANSI_QUOTES'").unwrap();
        let quoted = "SELECT \"owner\" FROM orders WHERE id = ?";
        let sa = ansi.prep(quoted).unwrap();
        let sp = t1.prep(quoted).unwrap();
        for r in 0..1000u32 {
            let hold = r % 3 == 0;
            if hold {
                holder.query_drop("BEGIN").unwrap();
                holder.query_drop("SELECT 1").unwrap();
            }
            let id = 1 + r % 3;
            let a: Option<String> = t1.exec_first(&s1, (id,)).unwrap();
            let b: Option<String> = t2.exec_first(&s2, (id,)).unwrap();
            assert!(
                a.as_deref().is_some_and(|o| o.ends_with("-t1")),
                "[{io}] round {r}: tenant1 read {a:?}"
            );
            assert!(
                b.as_deref().is_some_and(|o| o.ends_with("-t2")),
                "[{io}] round {r}: tenant2 read {b:?}"
            );
            if r % 10 == 0 {
                let c: Option<String> = ansi.exec_first(&sa, (id,)).unwrap();
                let d: Option<String> = t1.exec_first(&sp, (id,)).unwrap();
                assert!(
                    c.as_deref().is_some_and(|o| o.ends_with("-t2")),
                    "[{io}] ANSI_QUOTES client read {c:?}"
                );
                assert_eq!(
                    d.as_deref(),
                    Some("owner"),
                    "[{io}] without ANSI_QUOTES it is a string"
                );
            }
            if hold {
                holder.query_drop("COMMIT").unwrap();
            }
        }
        // MariaDB binds a statement to the schema it was prepared in: after USE, executing
        // it still reads tenant1 (as it would directly).
        t1.query_drop("USE tenant2").unwrap();
        holder.query_drop("BEGIN").unwrap();
        holder.query_drop("SELECT 1").unwrap();
        let a: Option<String> = t1.exec_first(&s1, (1,)).unwrap();
        assert_eq!(
            a.as_deref(),
            Some("alice-t1"),
            "[{io}] bound at prepare time"
        );
        holder.query_drop("COMMIT").unwrap();
        let prepares: i64 =
            proxy.metric("dbproxy_database_connections_setup_succeeded_total{target_group=\"default\",target_role=\"read_write\"}");
        assert!(prepares <= 2, "[{io}] {prepares} connections");
    }
}

#[test]
fn warnings_belong_to_the_client_that_raised_them() {
    let db = MariaDb::start();
    db.root_sql("CREATE TABLE shop.w (x INT) ENGINE=InnoDB; INSERT INTO shop.w VALUES (1)");
    for io in DRIVERS {
        let proxy = Proxy::start(&db, io, "max_connections = 4\nmax_idle_connections = 4");
        let clients = 50;
        let start = Arc::new(Barrier::new(clients));
        let port = proxy.port;
        let threads: Vec<_> = (0..clients)
            .map(|i| {
                let start = start.clone();
                std::thread::spawn(move || {
                    let mut c = open(port, "shop");
                    start.wait();
                    for r in 0..20 {
                        let secret = format!("secret-{i}-{r}");
                        c.query_drop(format!("SELECT CAST('{secret}' AS INT)"))
                            .unwrap();
                        // Statements that name no table and raise nothing leave the list.
                        match r % 4 {
                            1 => c.query_drop("SELECT 1").unwrap(),
                            2 => c.query_drop("SET @x = 1").unwrap(),
                            3 => c.query_drop("DO 1").unwrap(),
                            _ => {}
                        }
                        let w: Vec<(String, u32, String)> = c.query("SHOW WARNINGS").unwrap();
                        assert_eq!(w.len(), 1, "client {i} round {r}: {w:?}");
                        assert!(
                            w[0].2.contains(&format!("'{secret}'")),
                            "client {i} round {r} sees {:?}",
                            w[0].2
                        );
                        let counts: Option<(u64, u64)> = c
                            .query_first("SELECT @@warning_count, @@error_count")
                            .unwrap();
                        assert_eq!(counts, Some((1, 0)), "client {i} round {r}");
                        let n: Option<u64> = c.query_first("SHOW COUNT(*) WARNINGS").unwrap();
                        assert_eq!(n, Some(1), "client {i} round {r}");
                        c.query_drop(
                            "GET DIAGNOSTICS CONDITION 1 @code = MYSQL_ERRNO, @msg = MESSAGE_TEXT",
                        )
                        .unwrap();
                        let (code, msg): (u32, String) =
                            c.query_first("SELECT @code, @msg").unwrap().unwrap();
                        assert_eq!(code, 1292, "client {i}");
                        assert!(
                            msg.contains(&secret),
                            "client {i} GET DIAGNOSTICS saw {msg:?}"
                        );
                        // A statement that names a table clears the list.
                        c.query_drop("SELECT x FROM w").unwrap();
                        let w: Vec<(String, u32, String)> = c.query("SHOW WARNINGS").unwrap();
                        assert!(w.is_empty(), "client {i} round {r}: {w:?}");
                        // Errors too belong to their client.
                        assert!(c.query_drop(format!("SELECT no_such_column_{i}")).is_err());
                        let e: Vec<(String, u32, String)> = c.query("SHOW ERRORS").unwrap();
                        assert_eq!(e.len(), 1, "client {i}");
                        assert!(
                            e[0].2.contains(&format!("no_such_column_{i}")),
                            "client {i}: {e:?}"
                        );
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(proxy.pins_started("unclassified"), 0, "[{io}]");
        let (verified, _) = proxy.checkin_verification();
        assert!(verified > 0, "[{io}] check-ins verified");
    }
}

#[test]
fn an_autocommit_insert_loop_never_holds_a_connection_while_idle() {
    let db = MariaDb::start();
    db.root_sql(
        "CREATE TABLE shop.ins (id BIGINT AUTO_INCREMENT PRIMARY KEY, client INT, n INT) ENGINE=InnoDB; \
         CREATE TABLE shop.acct (id INT PRIMARY KEY, v BIGINT) ENGINE=InnoDB; \
         INSERT INTO shop.acct SELECT seq, 0 FROM shop.seq_1_to_10",
    );
    for io in DRIVERS {
        let proxy = Proxy::start_full(
            &db,
            io,
            "",
            "max_connections = 8\nmax_idle_connections = 8\nconnection_borrow_timeout = \"30s\"",
        );
        let stop = Arc::new(AtomicBool::new(false));
        let inserts = Arc::new(AtomicU64::new(0));
        let port = proxy.port;
        let writers: Vec<_> = (0..50)
            .map(|i| {
                let (stop, inserts) = (stop.clone(), inserts.clone());
                std::thread::spawn(move || {
                    let mut c = open(port, "shop");
                    let mut n = 0;
                    let mut mine = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        c.exec_drop("INSERT INTO ins (client, n) VALUES (?, ?)", (i, n))
                            .unwrap();
                        let id = c.last_insert_id();
                        mine.push(id);
                        let lid: Option<u64> = c.query_first("SELECT LAST_INSERT_ID()").unwrap();
                        assert_eq!(lid, Some(id), "client {i} insert {n}");
                        if n % 5 == 4 {
                            // Later, after other statements, it is still this client's.
                            c.query_drop("SELECT 1").unwrap();
                            let lid: Option<u64> =
                                c.query_first("SELECT LAST_INSERT_ID()").unwrap();
                            assert_eq!(lid, Some(id), "client {i} later");
                        }
                        inserts.fetch_add(1, Ordering::Relaxed);
                        n += 1;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    // Every row this client inserted is its own.
                    for id in mine {
                        let who: Option<i64> = c
                            .exec_first("SELECT client FROM ins WHERE id = ?", (id,))
                            .unwrap();
                        assert_eq!(who, Some(i), "row {id}");
                    }
                })
            })
            .collect();
        let movers: Vec<_> = (0..10)
            .map(|i| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut c = open(port, "shop");
                    while !stop.load(Ordering::Relaxed) {
                        c.query_drop("BEGIN").unwrap();
                        c.exec_drop("UPDATE acct SET v = v + 1 WHERE id = ?", (i + 1,))
                            .unwrap();
                        c.exec_drop("UPDATE acct SET v = v - 1 WHERE id = ?", (i + 1,))
                            .unwrap();
                        c.query_drop("COMMIT").unwrap();
                        std::thread::sleep(Duration::from_millis(20));
                    }
                })
            })
            .collect();
        let began = Instant::now();
        wait_until("5,000 inserts", Duration::from_secs(120), || {
            inserts.load(Ordering::Relaxed) >= 5000
        });
        stop.store(true, Ordering::Relaxed);
        for t in writers.into_iter().chain(movers) {
            t.join().unwrap();
        }
        let waited_over_1s = proxy
            .metric("dbproxy_database_connections_borrow_latency_seconds_count{target_group=\"default\",target_role=\"read_write\"}")
            - proxy.metric("dbproxy_database_connections_borrow_latency_seconds_bucket{le=\"1.0\",target_group=\"default\",target_role=\"read_write\"}");
        println!(
            "[{io}] {} inserts by 50 clients in {:?} with 10 transactional clients on 8 connections; borrows that waited over 1 s: {waited_over_1s}",
            inserts.load(Ordering::Relaxed),
            began.elapsed()
        );
        assert_eq!(waited_over_1s, 0, "[{io}] borrows waited over 1 s");
        let sum = db.root_sql("SELECT SUM(v) FROM shop.acct");
        assert_eq!(sum.trim(), "0", "[{io}]");
        let text = proxy.metrics();
        let pins: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("dbproxy_pins_total") && !l.ends_with(" 0"))
            .filter(|l| !l.contains("reason=\"transaction\""))
            .collect();
        assert!(
            pins.is_empty(),
            "[{io}] pins besides transactions: {pins:?}"
        );
    }
}

#[test]
fn procedures_statement_variables_and_the_clock_follow_mariadb() {
    let db = MariaDb::start();
    db.root_sql(
        "CREATE PROCEDURE shop.p_out(OUT o INT) SET o = 7; \
         CREATE PROCEDURE shop.p_var() SET @inside = 42; \
         CREATE PROCEDURE shop.p_tmp() CREATE TEMPORARY TABLE IF NOT EXISTS ptmp (x INT); \
         CREATE PROCEDURE shop.p_none() DO 1",
    );
    for io in DRIVERS {
        let proxy = Proxy::start(&db, io, "max_connections = 2\nmax_idle_connections = 2");
        let mut a = open(proxy.port, "shop");
        let mut holder = open(proxy.port, "shop");
        let moved = |holder: &mut Conn, f: &mut dyn FnMut()| {
            holder.query_drop("BEGIN").unwrap();
            holder.query_drop("SELECT 1").unwrap();
            f();
            holder.query_drop("COMMIT").unwrap();
        };
        // An OUT argument is a user variable the server does not report: read back, no pin.
        a.query_drop("CALL p_out(@o)").unwrap();
        a.query_drop("CALL p_none()").unwrap();
        moved(&mut holder, &mut || {
            let o: Option<i64> = a.query_first("SELECT @o").unwrap();
            assert_eq!(o, Some(7), "[{io}] OUT argument after moving");
        });
        assert_eq!(proxy.pins_started("unclassified"), 0, "[{io}]");
        // SET STATEMENT changes a variable for one statement only: nothing to carry, no pin.
        let mode: Option<String> = a
            .query_first("SET STATEMENT sql_mode = 'ANSI_QUOTES' FOR SELECT @@sql_mode")
            .unwrap();
        assert_eq!(mode.as_deref(), Some("ANSI_QUOTES"), "[{io}]");
        moved(&mut holder, &mut || {
            let mode: Option<String> = a.query_first("SELECT @@sql_mode").unwrap();
            assert_ne!(
                mode.as_deref(),
                Some("ANSI_QUOTES"),
                "[{io}] the statement's mode stayed"
            );
        });
        // A frozen clock follows its client; DEFAULT lets it run again everywhere.
        a.query_drop("SET timestamp = 1000000000").unwrap();
        moved(&mut holder, &mut || {
            let t: Option<i64> = a.query_first("SELECT UNIX_TIMESTAMP()").unwrap();
            assert_eq!(t, Some(1_000_000_000), "[{io}] frozen clock after moving");
        });
        let other: Option<i64> = holder.query_first("SELECT UNIX_TIMESTAMP()").unwrap();
        assert!(
            other.unwrap_or(0) > 1_700_000_000,
            "[{io}] the holder's clock runs"
        );
        a.query_drop("SET timestamp = DEFAULT").unwrap();
        moved(&mut holder, &mut || {
            let t: Option<i64> = a.query_first("SELECT UNIX_TIMESTAMP()").unwrap();
            assert!(
                t.unwrap_or(0) > 1_700_000_000,
                "[{io}] the clock runs again: {t:?}"
            );
        });
        assert_eq!(proxy.pins_started("unclassified"), 0, "[{io}]");
        // A procedure that changes session state the server only says "changed" about (a
        // variable set inside, a temporary table) pins: dbproxy cannot tell what to carry.
        for (call, check) in [
            ("CALL p_var()", "SELECT @inside"),
            ("CALL p_tmp()", "SELECT COUNT(*) FROM ptmp"),
        ] {
            let mut c = open(proxy.port, "shop");
            let before = proxy.pins_started("unclassified");
            c.query_drop(call).unwrap();
            // dbproxy counts after relaying the answer; the next command waits for that.
            c.query_drop("DO 1").unwrap();
            assert_eq!(
                proxy.pins_started("unclassified"),
                before + 1,
                "[{io}] {call}"
            );
            moved(&mut holder, &mut || {
                let v: Option<i64> = c.query_first(check).unwrap();
                assert!(v.is_some(), "[{io}] {check} after {call}");
            });
        }
    }
}

#[test]
fn variables_the_server_does_not_report_still_follow_their_client() {
    let db = MariaDb::start();
    db.root_sql("CREATE DATABASE other; CREATE TABLE shop.w (x INT) ENGINE=InnoDB");
    connect(db.port, "app", DB_PASSWORD, "other")
        .unwrap()
        .query_drop(
            "CREATE FUNCTION set_tz() RETURNS INT \
             BEGIN SET SESSION time_zone = '+07:00'; RETURN 1; END",
        )
        .unwrap();
    for io in DRIVERS {
        let proxy = Proxy::start(&db, io, "max_connections = 2\nmax_idle_connections = 2");
        let mut holder = open(proxy.port, "shop");
        let mut a = open(proxy.port, "shop");
        let mut b = open(proxy.port, "shop");
        let vars = |c: &mut Conn| -> (String, String) {
            c.query_first("SELECT @@sql_mode, @@time_zone")
                .unwrap()
                .unwrap()
        };
        let defaults = vars(&mut b);
        // `SET @@name` (no scope): MariaDB 10.11 applies it but leaves it out of session
        // tracking. Whichever connection serves `a` next has it; no other client sees it.
        a.query_drop("SET @@sql_mode = 'ANSI_QUOTES', time_zone = '+03:00'")
            .unwrap();
        a.query_drop("SET @@time_zone = '+04:00'").unwrap();
        holder.query_drop("BEGIN").unwrap();
        holder.query_drop("SELECT 1").unwrap();
        assert_eq!(vars(&mut b), defaults, "[{io}] on the connection `a` left");
        holder.query_drop("COMMIT").unwrap();
        b.query_drop("BEGIN").unwrap();
        b.query_drop("SELECT 1").unwrap();
        assert_eq!(
            vars(&mut a),
            ("ANSI_QUOTES".to_string(), "+04:00".to_string()),
            "[{io}] after moving"
        );
        b.query_drop("COMMIT").unwrap();
        assert_eq!(proxy.pins_started("unclassified"), 0, "[{io}]");
        a.query_drop("SET SESSION sql_mode = DEFAULT, time_zone = DEFAULT")
            .unwrap();

        // `SET @@tx_read_only = 1` is for the next transaction only, like SET TRANSACTION:
        // it must reach `a`'s next transaction and nobody else's.
        holder.query_drop("BEGIN").unwrap();
        holder.query_drop("SELECT 1").unwrap();
        a.query_drop("SET @@tx_read_only = 1").unwrap();
        b.query_drop("BEGIN").unwrap();
        b.query_drop("INSERT INTO w VALUES (1)")
            .unwrap_or_else(|e| panic!("[{io}] `a`'s read-only transaction leaked: {e}"));
        b.query_drop("COMMIT").unwrap();
        holder.query_drop("COMMIT").unwrap();
        a.query_drop("BEGIN").unwrap();
        let e = a.query_drop("INSERT INTO w VALUES (2)").unwrap_err();
        assert!(e.to_string().contains("1792"), "[{io}] {e}");
        a.query_drop("ROLLBACK").unwrap();
        a.query_drop("BEGIN").unwrap();
        a.query_drop("INSERT INTO w VALUES (3)").unwrap();
        a.query_drop("COMMIT").unwrap();

        // Two names of one variable, and variables that change others silently: the server
        // reports only the one assigned. `a` finds them all as it left them, on either
        // connection, and no check-in differs from dbproxy's record.
        let coupled = "SELECT @@storage_engine, @@default_storage_engine, @@sql_big_selects, \
             @@max_join_size, @@character_set_connection, @@collation_connection, \
             @@long_query_time, @@log_slow_query_time";
        let seen = |c: &mut Conn| -> String {
            let r: Row = c.query_first(coupled).unwrap().unwrap();
            (0..r.len())
                .map(|i| r.get::<String, _>(i).unwrap_or_default())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let fresh = seen(&mut b);
        for sql in [
            "SET storage_engine = MEMORY",
            "SET default_storage_engine = Aria",
            "SET max_join_size = 1000",
            "SET sql_big_selects = 1",
            "SET max_join_size = 2000",
            "SET collation_connection = latin1_bin",
            "SET character_set_connection = utf8mb3",
            "SET long_query_time = 3",
            "SET log_slow_query_time = 5",
        ] {
            a.query_drop(sql).unwrap();
        }
        let want = "Aria Aria 0 2000 utf8mb3 utf8mb3_general_ci 5.000000 5.000000";
        for holding in [&mut holder, &mut b] {
            holding.query_drop("BEGIN").unwrap();
            holding.query_drop("SELECT 1").unwrap();
            assert_eq!(
                seen(&mut a),
                want,
                "[{io}] while another client holds a connection"
            );
            holding.query_drop("COMMIT").unwrap();
        }
        assert_eq!(seen(&mut b), fresh, "[{io}] another client");
        assert_eq!(seen(&mut holder), fresh, "[{io}] another client");
        proxy.assert_clean_checkins();

        // A stored function in another schema changing the session during a SELECT: the
        // result's EOF only says "changed" (the routine switched schemas), so the client
        // keeps its connection, and nobody else sees the change.
        let before = proxy.pins_started("unclassified");
        let one: Option<i64> = a.query_first("SELECT other.set_tz()").unwrap();
        assert_eq!(one, Some(1));
        assert_eq!(vars(&mut a).1, "+07:00", "[{io}]");
        assert_eq!(proxy.pins_started("unclassified"), before + 1, "[{io}]");
        assert_eq!(vars(&mut b), defaults, "[{io}]");
        assert_eq!(vars(&mut holder), defaults, "[{io}]");
    }
}
