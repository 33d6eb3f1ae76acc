//! Read/write split inside one endpoint (`read_write_split = true`) over a primary and a
//! GTID replica: which server answers each kind of statement (`@@server_id`), read-your-
//! writes with the replica a second behind (`causal_reads` gtid, lag and none), how much of
//! the reading the replica takes, the causal position handed to a client of another
//! dbproxy, and sysbench through the split endpoint against the writer alone.

use mysql::prelude::*;
use proxy_tests::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The scenarios share servers' CPU and measure shares: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// dbproxy over `pair` with a split endpoint (returned port) beside its writer-only
/// `default` endpoint.
fn split_proxy(pair: &Pair, io: &str, causal: &str, endpoint_extra: &str) -> (Proxy, u16) {
    let port = free_port();
    let sections = format!(
        "[[endpoints]]\nname = \"split\"\nlisten = \"127.0.0.1:{port}\"\ntarget_group = \"default\"\nread_write_split = true\ncausal_reads = \"{causal}\"\n{endpoint_extra}\n"
    );
    let proxy = Proxy::start_at(
        pair.primary.port,
        io,
        "",
        &format!(
            "{}\nhealth_check_interval = \"200ms\"\nmax_replication_lag = \"10s\"\nmax_connections = 40",
            pair.targets()
        ),
        &sections,
    );
    // The replica is known as a reader before anything is routed.
    let mut c = connect(port, "app", APP_PASSWORD, "shop").unwrap();
    wait_until(
        "the replica to serve reads",
        Duration::from_secs(20),
        || c.query_first::<u32, _>("SELECT @@server_id").unwrap() == Some(2),
    );
    (proxy, port)
}

fn server_of(c: &mut mysql::Conn, sql: &str) -> u32 {
    let row: mysql::Row = c
        .query_first(sql)
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .unwrap_or_else(|| panic!("{sql}: no row"));
    row.get(0).unwrap()
}

/// The routing counters that are not zero (for failure messages).
fn routing(proxy: &Proxy) -> String {
    proxy
        .metrics()
        .lines()
        .filter(|l| {
            (l.starts_with("dbproxy_split")
                || l.starts_with("dbproxy_causal")
                || l.starts_with("dbproxy_pin"))
                && !l.ends_with(" 0")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn statements(proxy: &Proxy, to: &str, reason: &str) -> i64 {
    proxy.metric(&format!(
        "dbproxy_split_statements_total{{target_group=\"default\",target_role=\"read_write\",to=\"{to}\",reason=\"{reason}\"}}"
    ))
}

/// Every classifier rule, sent through the split endpoint: the server that answered says
/// where it went (1: the primary, 2: the replica).
#[test]
fn each_kind_of_statement_goes_where_it_must() {
    let _serial = serial();
    let pair = Pair::start();
    pair.primary.root_sql(
        "CREATE TABLE shop.t (id INT PRIMARY KEY AUTO_INCREMENT, v INT) ENGINE=InnoDB; \
         INSERT INTO shop.t (v) VALUES (1), (2), (3); \
         CREATE FUNCTION shop.f() RETURNS INT DETERMINISTIC RETURN 7; \
         CREATE SEQUENCE shop.s",
    );
    // A stored function that writes, behind a view (a compound body: not through the CLI).
    let mut p = connect(pair.primary.port, "app", DB_PASSWORD, "shop").unwrap();
    p.query_drop("CREATE TABLE bumps (n INT)").unwrap();
    p.query_drop(
        "CREATE FUNCTION bump() RETURNS INT DETERMINISTIC MODIFIES SQL DATA \
         BEGIN INSERT INTO bumps VALUES (1); RETURN 1; END",
    )
    .unwrap();
    p.query_drop("CREATE VIEW v_bump AS SELECT bump() AS b")
        .unwrap();
    drop(p);
    pair.sync();
    for io in DRIVERS {
        // A timeout long enough that a lag read as a whole second under load (the checks
        // run every 200 ms) makes a read wait rather than go to the writer at once.
        let (proxy, port) = split_proxy(&pair, io, "gtid", "causal_reads_timeout = \"5s\"");
        let mut c = connect(port, "app", APP_PASSWORD, "shop").unwrap();
        let writer = [
            "SELECT @@server_id FROM t WHERE id = 1 FOR UPDATE",
            "SELECT @@server_id FROM t WHERE id = 1 LOCK IN SHARE MODE",
            "SELECT @@server_id, LAST_INSERT_ID()",
            "SELECT @@server_id, FOUND_ROWS()",
            "SELECT SQL_CALC_FOUND_ROWS @@server_id FROM t LIMIT 1",
            "SELECT @@server_id, IS_FREE_LOCK('split-test')",
            "SELECT @@server_id, @assigned := 1",
            "SELECT @@server_id, f()",
            "SELECT @@server_id, shop.f()",
            "SELECT @@server_id, NEXT VALUE FOR s",
            "/* dbproxy:writer */ SELECT @@server_id",
            "SELECT @@server_id; SELECT 1",
            "SELECT @@server_id, GET_LOCK('split-test', 0)",
            // The writer's role and its own global values: a split endpoint is a writer.
            "SELECT @@server_id, @@read_only",
            "SELECT @@server_id, @@global.max_connections",
            // The server's own state: its connections, status, locks.
            "SELECT @@server_id, COUNT(*) FROM information_schema.PROCESSLIST",
            "SELECT @@server_id, COUNT(*) FROM performance_schema.threads",
        ];
        for sql in writer {
            // A client of its own each: some of these pin it to the writer for good.
            let mut c = connect(port, "app", APP_PASSWORD, "shop").unwrap();
            let id = if sql.contains("; ") {
                let mut r = c.query_iter(sql).unwrap();
                let mut values: Vec<String> = Vec::new();
                while let Some(set) = r.iter() {
                    for row in set {
                        let v: String = row.unwrap().get(0).unwrap();
                        values.push(v);
                    }
                }
                values[0].parse().unwrap()
            } else {
                server_of(&mut c, sql)
            };
            assert_eq!(id, 1, "[{io}] {sql}: the writer");
        }
        let reader = [
            "SELECT @@server_id",
            "SELECT @@server_id, COUNT(*) FROM t WHERE v IN (1, 2)",
            "WITH x AS (SELECT v FROM t) SELECT @@server_id, SUM(v) FROM x",
            "(SELECT @@server_id FROM t LIMIT 1)",
            "SELECT @@server_id, UPPER('a'), NOW()",
            "SELECT /* dbproxy:reader */ @@server_id, f()",
        ];
        for sql in reader {
            let got = server_of(&mut c, sql);
            assert_eq!(got, 2, "[{io}] {sql}: a reader\n{}", routing(&proxy));
        }
        // Reads that write after all (a stored function behind a view, a writing function
        // hinted to a reader): the replica refuses them as read-only, and they run on the
        // writer instead of failing.
        let before = statements(&proxy, "writer", "reader_failed");
        for sql in [
            "SELECT @@server_id, b FROM v_bump",
            "/* dbproxy:reader */ SELECT @@server_id, bump()",
        ] {
            // A client each: the write inside leaves a state change that pins its client.
            let mut r = connect(port, "app", APP_PASSWORD, "shop").unwrap();
            assert_eq!(
                server_of(&mut r, sql),
                1,
                "[{io}] {sql}\n{}",
                routing(&proxy)
            );
        }
        assert_eq!(
            statements(&proxy, "writer", "reader_failed"),
            before + 2,
            "[{io}]\n{}",
            routing(&proxy)
        );
        // Anything inside a transaction: the writer; a read-only transaction: a reader.
        c.query_drop("BEGIN").unwrap();
        assert_eq!(
            server_of(&mut c, "SELECT @@server_id"),
            1,
            "[{io}] in BEGIN"
        );
        c.query_drop("COMMIT").unwrap();
        c.query_drop("START TRANSACTION READ ONLY").unwrap();
        assert_eq!(
            server_of(&mut c, "SELECT @@server_id, COUNT(*) FROM t"),
            2,
            "[{io}] READ ONLY"
        );
        c.query_drop("COMMIT").unwrap();
        // Temporary tables live on the connection that made them (the client is pinned
        // there for the rest of its session, as with RDS Proxy).
        let mut t = connect(port, "app", APP_PASSWORD, "shop").unwrap();
        t.query_drop("CREATE TEMPORARY TABLE tmp (a INT)").unwrap();
        assert_eq!(
            server_of(
                &mut t,
                "SELECT @@server_id FROM (SELECT 1) x LEFT JOIN tmp ON 1"
            ),
            1,
            "[{io}] temp"
        );
        // The Spring case: autocommit off, and the transaction reads first.
        c.query_drop("SET autocommit = 0").unwrap();
        assert_eq!(
            server_of(&mut c, "SELECT @@server_id, v FROM t WHERE id = 2"),
            1,
            "[{io}] autocommit = 0 reads on the writer"
        );
        c.query_drop("UPDATE t SET v = v + 1 WHERE id = 2")
            .unwrap_or_else(|e| panic!("[{io}] the write after a read: {e}"));
        c.query_drop("COMMIT").unwrap();
        c.query_drop("SET autocommit = 1").unwrap();
        // Writes that skip the binary log never reach the replica: while they are off, the
        // session reads on the writer (the replica has no such table at all).
        let mut u = connect(port, "app", APP_PASSWORD, "shop").unwrap();
        u.query_drop("SET sql_log_bin = 0").unwrap();
        u.query_drop(format!(
            "CREATE TABLE primary_only_{io} (a INT); INSERT INTO primary_only_{io} VALUES (1)"
        ))
        .unwrap();
        assert_eq!(
            server_of(
                &mut u,
                &format!("SELECT @@server_id, COUNT(*) FROM primary_only_{io}")
            ),
            1,
            "[{io}] sql_log_bin = 0\n{}",
            routing(&proxy)
        );
        let mut i = connect(port, "app", APP_PASSWORD, "information_schema").unwrap();
        assert_eq!(
            server_of(&mut i, "SELECT @@server_id, COUNT(*) FROM PROCESSLIST"),
            1,
            "[{io}] USE information_schema"
        );
        // Only while they are off (a client that has not written, so that no write of
        // its own holds it on the writer).
        let mut v = connect(port, "app", APP_PASSWORD, "shop").unwrap();
        v.query_drop("SET sql_log_bin = 0").unwrap();
        assert_eq!(server_of(&mut v, "SELECT @@server_id"), 1, "[{io}] off");
        v.query_drop("SET sql_log_bin = 1").unwrap();
        assert_eq!(server_of(&mut v, "SELECT @@server_id"), 2, "[{io}] on");
        assert!(statements(&proxy, "writer", "unreplicated") >= 1);
        // A long read on the replica is killed there: KILL QUERY with the client's id,
        // from another client (what the mariadb CLI sends on Ctrl-C).
        let mut long = connect(port, "app", APP_PASSWORD, "shop").unwrap();
        let long_id = long.connection_id();
        // Bounded all the same: a kill that misses ends it with 1969 after 60 s.
        long.query_drop("SET max_statement_time = 60").unwrap();
        let running = std::thread::spawn(move || {
            // query_first: the error comes after the column definitions, and a dropped
            // result set does not report it.
            long.query_first::<mysql::Row, _>(
                "SELECT @@server_id, COUNT(*) FROM seq_1_to_1000000 a, seq_1_to_1000000 b \
                 WHERE a.seq * b.seq = 7",
            )
        });
        wait_until(
            "the long read to run on the replica",
            Duration::from_secs(20),
            || {
                pair.replica
                    .root_sql(
                        "SELECT COUNT(*) FROM information_schema.PROCESSLIST \
                     WHERE INFO LIKE '%a.seq * b.seq%' AND INFO NOT LIKE '%PROCESSLIST%'",
                    )
                    .trim()
                    == "1"
            },
        );
        c.query_drop(format!("KILL QUERY {long_id}")).unwrap();
        match running.join().unwrap() {
            Err(mysql::Error::MySqlError(e)) => assert_eq!(e.code, 1317, "[{io}] {e}"),
            other => panic!("[{io}] the long read was not killed: {other:?}"),
        }
        // Session state moves with the client to the reader's connection.
        c.query_drop("SET @mine = 42, time_zone = '+03:00'")
            .unwrap();
        let (id, mine, tz): (u32, i64, String) = c
            .query_first("SELECT @@server_id, @mine, @@time_zone")
            .unwrap()
            .unwrap();
        assert_eq!(
            (id, mine, tz.as_str()),
            (2, 42, "+03:00"),
            "[{io}] state replayed\n{}",
            routing(&proxy)
        );
        // After a write, the first read waits on the replica; the reads after it find the
        // replica known to have the position and are not waited on; a new write waits again.
        let mut w = connect(port, "app", APP_PASSWORD, "shop").unwrap();
        let counts = || {
            (
                proxy.metric("dbproxy_causal_waits_total"),
                proxy.metric("dbproxy_causal_waits_skipped_total"),
            )
        };
        // A value of this loop's own (the table is shared by both loops' runs).
        let mark = 990 + u32::from(io == "epoll");
        for round in 0..2 {
            w.query_drop(format!("INSERT INTO t (v) VALUES ({mark})"))
                .unwrap();
            let (waits, skipped) = counts();
            for _ in 0..10 {
                let (id, n): (u32, u32) = w
                    .query_first(format!(
                        "SELECT @@server_id, COUNT(*) FROM t WHERE v = {mark}"
                    ))
                    .unwrap()
                    .unwrap();
                assert_eq!((id, n), (2, round + 1), "[{io}] read after a write");
            }
            let (w2, s2) = counts();
            assert_eq!(
                (w2 - waits, s2 - skipped),
                (1, 9),
                "[{io}] waits and skipped waits\n{}",
                routing(&proxy)
            );
        }
        assert!(statements(&proxy, "reader", "read") >= reader.len() as i64);
        assert!(statements(&proxy, "writer", "hint") >= 1);
        assert_eq!(proxy.checkin_verification().1, 0, "[{io}] check-ins clean");
    }
}

/// What one run of the read-your-writes workload saw.
#[derive(Debug, Default)]
struct Run {
    reads: u64,
    misses: u64,
    errors: u64,
}

/// `clients` clients, each `rounds` times: INSERT its own row (numbered from `first`: a
/// run never reads a row an earlier run wrote), then at once SELECT it. `connected` runs
/// once every client has logged in, before the first round.
fn insert_then_read(
    port: u16,
    table: &str,
    clients: u64,
    (first, rounds): (u64, u64),
    connected: impl FnOnce(),
) -> Run {
    let ready = Arc::new(std::sync::Barrier::new(clients as usize + 1));
    let go = Arc::new(std::sync::Barrier::new(clients as usize + 1));
    let reads = Arc::new(AtomicU64::new(0));
    let misses = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..clients)
        .map(|client| {
            let (reads, misses, errors) = (reads.clone(), misses.clone(), errors.clone());
            let (ready, go) = (ready.clone(), go.clone());
            let table = table.to_string();
            std::thread::spawn(move || {
                let mut c = connect(port, "app", APP_PASSWORD, "shop").unwrap();
                ready.wait();
                go.wait();
                for i in first..first + rounds {
                    if let Err(e) = c.query_drop(format!(
                        "INSERT INTO {table} (client, i) VALUES ({client}, {i})"
                    )) {
                        eprintln!("insert: {e}");
                        errors.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    match c.query_first::<u64, _>(format!(
                        "SELECT COUNT(*) FROM {table} WHERE client = {client} AND i = {i}"
                    )) {
                        Ok(Some(1)) => {}
                        Ok(_) => {
                            misses.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            eprintln!("select: {e}");
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    ready.wait();
    connected();
    go.wait();
    for t in threads {
        t.join().unwrap();
    }
    Run {
        reads: reads.load(Ordering::Relaxed),
        misses: misses.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
    }
}

fn com_select(db: &MariaDb) -> u64 {
    let out = db.root_sql("SHOW GLOBAL STATUS LIKE 'Com_select'");
    out.split_whitespace()
        .last()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// 32 clients each INSERT a row and at once SELECT it, with the replica a second behind
/// (MASTER_DELAY = 1): in gtid and lag modes every read finds its row (10,000 and more);
/// in none mode reads miss, which shows the delay is real. With no delay, the share of
/// reads the replica answers in each mode.
#[test]
fn read_your_writes_holds_with_the_replica_a_second_behind() {
    let _serial = serial();
    let pair = Pair::start();
    pair.primary.root_sql(
        "CREATE TABLE shop.ryw (client INT, i INT, PRIMARY KEY (client, i)) ENGINE=InnoDB",
    );
    pair.sync();
    let io_modes: Vec<&str> = match std::env::var("SPLIT_IO") {
        Ok(io) => DRIVERS.iter().copied().filter(|d| *d == io).collect(),
        Err(_) => DRIVERS.to_vec(),
    };
    pair.replica
        .root_sql("STOP SLAVE; CHANGE MASTER TO MASTER_DELAY = 1; START SLAVE");
    let mut first = 0;
    for io in &io_modes {
        for mode in ["gtid", "lag", "none"] {
            // A short wait: a read that would wait the whole second goes to the writer.
            let (proxy, port) = split_proxy(&pair, io, mode, "causal_reads_timeout = \"20ms\"");
            let rounds = if mode == "none" { 20 } else { 320 };
            let mut before = (0, 0);
            let run = insert_then_read(port, "ryw", 32, (first, rounds), || {
                before = (
                    com_select(&pair.replica),
                    statements(&proxy, "reader", "read"),
                );
            });
            let replica_selects = com_select(&pair.replica) - before.0;
            let to_reader = statements(&proxy, "reader", "read") - before.1;
            first += rounds;
            let causal = statements(&proxy, "writer", "causal");
            let timed_out = statements(&proxy, "writer", "wait_timed_out");
            println!(
                "[{io}] MASTER_DELAY=1, causal_reads={mode}: {} reads, {} misses, {} errors; \
                 to the replica {to_reader}, to the writer for causality {causal} at once and \
                 {timed_out} after a wait timed out; replica Com_select +{replica_selects}",
                run.reads, run.misses, run.errors
            );
            assert_eq!(run.errors, 0, "[{io}] {mode}: client errors");
            if mode == "none" {
                assert!(run.misses > 0, "[{io}] none: the delay shows as misses");
            } else {
                assert!(run.reads >= 10_000, "[{io}] {mode}: {} reads", run.reads);
                assert_eq!(run.misses, 0, "[{io}] {mode}: a read missed its own write");
            }
        }
    }
    pair.replica
        .root_sql("STOP SLAVE; CHANGE MASTER TO MASTER_DELAY = 0; START SLAVE");
    pair.sync();
    for io in &io_modes {
        for mode in ["gtid", "lag"] {
            let (proxy, port) = split_proxy(&pair, io, mode, "");
            let mut before = (0, 0);
            let run = insert_then_read(port, "ryw", 32, (first, 100), || {
                before = (
                    com_select(&pair.replica),
                    statements(&proxy, "reader", "read"),
                );
            });
            let replica_selects = com_select(&pair.replica) - before.0;
            let to_reader = statements(&proxy, "reader", "read") - before.1;
            first += 100;
            let share = to_reader as f64 / run.reads as f64;
            println!(
                "[{io}] no delay, causal_reads={mode}: {} reads, {} misses; {:.0} % to the \
                 replica (Com_select +{replica_selects}), waits {}, timeouts {}",
                run.reads,
                run.misses,
                share * 100.0,
                proxy.metric("dbproxy_causal_waits_total"),
                proxy.metric("dbproxy_causal_wait_timeouts_total"),
            );
            assert_eq!((run.errors, run.misses), (0, 0), "[{io}] {mode}");
            if mode == "gtid" {
                assert!(
                    share >= 0.8,
                    "[{io}] gtid: {:.2} of reads on the replica",
                    share
                );
                assert!(
                    replica_selects >= to_reader as u64,
                    "[{io}] the replica answered them"
                );
            }
        }
    }
}

/// Client A writes through one dbproxy and hands its causal position to client B of
/// another dbproxy, whose next read finds A's row though the replica is a second behind.
#[test]
fn a_causal_position_handed_to_another_dbproxy_is_waited_for() {
    let _serial = serial();
    let pair = Pair::start();
    pair.primary
        .root_sql("CREATE TABLE shop.handed (n INT PRIMARY KEY) ENGINE=InnoDB");
    pair.sync();
    pair.replica
        .root_sql("STOP SLAVE; CHANGE MASTER TO MASTER_DELAY = 1; START SLAVE");
    for (k, io) in DRIVERS.iter().enumerate() {
        // Rows of their own per loop (a TRUNCATE would reach the replica a second late).
        let (_a_proxy, a_port) = split_proxy(&pair, io, "gtid", "causal_reads_timeout = \"3s\"");
        let (b_proxy, b_port) = split_proxy(&pair, io, "gtid", "causal_reads_timeout = \"3s\"");
        let mut a = connect(a_port, "app", APP_PASSWORD, "shop").unwrap();
        let mut b = connect(b_port, "app", APP_PASSWORD, "shop").unwrap();
        for n in k * 100..k * 100 + 5 {
            a.query_drop(format!("INSERT INTO handed VALUES ({n})"))
                .unwrap();
            let pos: String = a
                .query_first("SELECT @@dbproxy_causal_position")
                .unwrap()
                .unwrap();
            assert!(pos.contains('-'), "[{io}] a GTID: {pos}");
            // Without the position, B reads from the replica a second behind.
            let stale: Option<(u32, u64)> = b
                .query_first(format!(
                    "SELECT @@server_id, COUNT(*) FROM handed WHERE n = {n}"
                ))
                .unwrap();
            b.query_drop(format!("SET @@dbproxy_causal_position = '{pos}'"))
                .unwrap();
            let (id, found): (u32, u64) = b
                .query_first(format!(
                    "SELECT @@server_id, COUNT(*) FROM handed WHERE n = {n}"
                ))
                .unwrap()
                .unwrap();
            println!("[{io}] round {n}: position {pos}; B without it saw (server, rows) {stale:?}, with it {found} (server {id})");
            assert_eq!(found, 1, "[{io}] B reads A's row");
            assert_eq!(id, 2, "[{io}] on the replica, after waiting for it");
        }
        assert!(b_proxy.metric("dbproxy_causal_waits_total") >= 5);
        // A table made just now, a read (on the replica, not waiting), then a prepared insert into the
        // table and a prepared read of it: the prepare goes to the writer, which has the
        // table (the replica, a second behind, has not), and the read waits for the insert.
        a.query_drop(format!("CREATE TABLE fresh_{io} (n INT)"))
            .unwrap();
        // (The hint: no wait for the table's GTID, so the replica has not got it yet.)
        assert_eq!(
            server_of(&mut a, "SELECT /* dbproxy:reader */ @@server_id"),
            2,
            "[{io}]"
        );
        a.exec_drop(format!("INSERT INTO fresh_{io} VALUES (?)"), (1,))
            .unwrap_or_else(|e| panic!("[{io}] a prepared insert into a new table: {e}"));
        let (id, n): (u32, u64) = a
            .exec_first(
                format!("SELECT @@server_id, COUNT(*) FROM fresh_{io} WHERE n = ?"),
                (1,),
            )
            .unwrap()
            .unwrap();
        // The replica cannot prepare it before it has the table: then the writer answers.
        println!("[{io}] a prepared read of one's own insert in a new table: server {id}");
        assert_eq!(
            n, 1,
            "[{io}] a prepared read of one's own insert (server {id})"
        );
        let e = b
            .query_drop("SET @@dbproxy_causal_position = 'not a position'")
            .unwrap_err();
        assert!(e.to_string().contains("1231"), "[{io}] {e}");
    }
    pair.replica
        .root_sql("STOP SLAVE; CHANGE MASTER TO MASTER_DELAY = 0; START SLAVE");
}

/// sysbench oltp_read_write, 16 threads, through the split endpoint and through the
/// writer-only endpoint of the same dbproxy: no errors, the replica's Com_select shows the
/// reads going there, and the throughput of both is printed. Each event's statements run
/// outside a transaction (`--skip_trx`), as autocommit applications send them (in a
/// transaction everything would stay on the writer), with prepared statements (sysbench's
/// default).
#[test]
fn sysbench_read_write_through_the_split_endpoint() {
    let _serial = serial();
    let pair = Pair::start();
    for io in DRIVERS {
        let (proxy, port) = split_proxy(&pair, io, "gtid", "");
        if io == DRIVERS[0] {
            sysbench_prepare(proxy.port, APP_PASSWORD, "oltp_read_write");
            pair.sync();
        }
        let mut tps = Vec::new();
        for (name, p) in [("writer alone", proxy.port), ("split", port)] {
            let (primary, replica) = (com_select(&pair.primary), com_select(&pair.replica));
            let out = sysbench_command(p, APP_PASSWORD)
                .args([
                    "oltp_read_write",
                    "--threads=16",
                    "--time=8",
                    "--skip_trx=on",
                    // Outside transactions two threads' DELETE and INSERT of one id collide
                    // (1062), with or without a proxy: updates and reads only.
                    "--delete_inserts=0",
                    "--mysql-ignore-errors=none",
                    "run",
                ])
                .output()
                .expect("sysbench");
            let report = sysbench_report(&format!("[{io}] oltp_read_write, {name}:"), &out);
            let (on_primary, on_replica) = (
                com_select(&pair.primary) - primary,
                com_select(&pair.replica) - replica,
            );
            println!(
                "[{io}] {name}: Com_select +{on_primary} on the primary, +{on_replica} on the replica"
            );
            assert!(
                sysbench_field(&report, "ignored errors:").contains(" 0 "),
                "[{io}] {name}: {report}"
            );
            if name == "split" {
                assert!(
                    on_replica > on_primary,
                    "[{io}] the reads went to the replica: {on_replica} against {on_primary}\n{}",
                    routing(&proxy)
                );
            } else {
                assert!(on_primary > on_replica, "[{io}] {name}");
            }
            tps.push(sysbench_field(&report, "transactions:"));
        }
        println!("[{io}] writer alone {} | split {}", tps[0], tps[1]);
        assert_eq!(proxy.checkin_verification().1, 0, "[{io}] check-ins clean");
    }
}

/// The failover drill through a split endpoint. 16 clients each INSERT a row and at once
/// read it back (with `@@server_id`). The replica is killed: reads go to the writer. It
/// comes back: reads return to it. Then, with the replica caught up, the primary is killed
/// and the replica promoted: writes and reads go on there. No read misses its own row, no
/// client loses its connection, and only the primary's death may fail a statement (the
/// ones in flight).
#[test]
fn failover_drill_through_the_split_endpoint() {
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    let _serial = serial();
    for io in DRIVERS {
        let mut pair = Pair::start();
        pair.primary.root_sql(
            "CREATE TABLE shop.drill (client INT, i INT, PRIMARY KEY (client, i)) ENGINE=InnoDB",
        );
        pair.sync();
        let (proxy, port) = split_proxy(&pair, io, "gtid", "");
        const CLIENTS: usize = 16;
        const PHASES: usize = 4;
        let phase = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        // While set, clients only read the last row they wrote (the primary is killed with
        // nothing unreplicated: a row lost with it would be replication's loss, not a stale
        // read).
        let quiet = Arc::new(AtomicBool::new(false));
        // Clients that have seen `quiet` (their last insert is answered).
        let quiesced = Arc::new(AtomicUsize::new(0));
        // Per phase: reads answered by server 1 and by server 2, misses, errors.
        let seen = Arc::new(Mutex::new([[0u64; 4]; PHASES]));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|client| {
                let (phase, stop, quiet, seen) =
                    (phase.clone(), stop.clone(), quiet.clone(), seen.clone());
                let quiesced = quiesced.clone();
                std::thread::spawn(move || {
                    let mut c = connect(port, "app", APP_PASSWORD, "shop").unwrap();
                    let mut written: Option<u64> = None;
                    let mut i = 0u64;
                    let mut acked = false;
                    while !stop.load(Ordering::Relaxed) {
                        let p = phase.load(Ordering::Relaxed);
                        let count = |k: usize| seen.lock().unwrap()[p][k] += 1;
                        let q = quiet.load(Ordering::Relaxed);
                        if q && !acked {
                            acked = true;
                            quiesced.fetch_add(1, Ordering::Relaxed);
                        }
                        if !q {
                            i += 1;
                            match c.query_drop(format!(
                                "INSERT INTO drill VALUES ({client}, {i})"
                            )) {
                                Ok(()) => written = Some(i),
                                Err(e) => {
                                    eprintln!("[{client}] phase {p}: insert: {e}");
                                    count(3);
                                    continue;
                                }
                            }
                        }
                        let Some(w) = written else {
                            std::thread::sleep(Duration::from_millis(10));
                            continue;
                        };
                        match c.query_first::<(u32, u64), _>(format!(
                            "SELECT @@server_id, COUNT(*) FROM drill WHERE client = {client} AND i = {w}"
                        )) {
                            Ok(Some((server, 1))) => count(if server == 1 { 0 } else { 1 }),
                            Ok(_) => count(2),
                            Err(e) => {
                                eprintln!("[{client}] phase {p}: select: {e}");
                                count(3);
                            }
                        }
                    }
                    // Still the same connection: it answers.
                    c.query_first::<u32, _>("SELECT 1").unwrap().is_some()
                })
            })
            .collect();
        let reads = |p: usize, server: usize| seen.lock().unwrap()[p][server];
        let long = Duration::from_secs(30);
        wait_until("reads on the replica", long, || reads(0, 1) > 200);
        phase.store(1, Ordering::Relaxed);
        pair.replica.kill();
        wait_until("reads on the writer", long, || reads(1, 0) > 300);
        phase.store(2, Ordering::Relaxed);
        pair.replica.restart();
        wait_until("the replica to serve reads again", long, || {
            reads(2, 1) > 50
        });
        quiet.store(true, Ordering::Relaxed);
        wait_until("every client's last insert answered", long, || {
            quiesced.load(Ordering::Relaxed) == CLIENTS
        });
        pair.sync();
        phase.store(3, Ordering::Relaxed);
        pair.primary.kill();
        pair.promote_replica();
        wait_until("reads on the promoted server", long, || reads(3, 1) > 100);
        let before = reads(3, 1);
        quiet.store(false, Ordering::Relaxed);
        wait_until("writes on the promoted server", long, || {
            reads(3, 1) > before + 200
        });
        stop.store(true, Ordering::Relaxed);
        let alive = clients
            .into_iter()
            .map(|t| t.join().unwrap())
            .filter(|a| *a)
            .count();
        let seen = *seen.lock().unwrap();
        for (p, what) in [
            "both up",
            "replica killed",
            "replica back",
            "primary killed, replica promoted",
        ]
        .iter()
        .enumerate()
        {
            let [one, two, misses, errors] = seen[p];
            println!(
                "[{io}] {what}: reads answered by the primary {one}, by the replica {two}; misses {misses}; errors {errors}"
            );
        }
        assert_eq!(alive, CLIENTS, "[{io}] every client kept its connection");
        assert!(
            seen.iter().all(|s| s[2] == 0),
            "[{io}] a stale read: {seen:?}"
        );
        assert!(seen[0][1] > 0, "[{io}] reads on the replica first");
        assert!(seen[1][0] > 0, "[{io}] then on the writer");
        assert_eq!(
            (seen[0][3], seen[1][3], seen[2][3]),
            (0, 0, 0),
            "[{io}] no errors while the primary lives"
        );
        assert!(
            seen[3][3] <= CLIENTS as u64,
            "[{io}] at most the statements in flight fail with the primary"
        );
        drop(proxy);
    }
}
