//! Protocol completeness: KILL with the ids of the greetings (the mariadb CLI's Ctrl-C, KILL
//! QUERY / CONNECTION, COM_PROCESS_KILL), statements of clients that hang up killed, pings
//! answered without a backend connection, and random malformed input that never takes a
//! session down uncleanly.

use mysql::prelude::*;
use mysql::Conn;
use proxy_tests::raw::RawClient;
use proxy_tests::*;
use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn open(port: u16) -> Conn {
    connect(port, "app", APP_PASSWORD, "shop").unwrap()
}

/// Statements running on the database whose text starts with `prefix`.
fn running(db: &MariaDb, prefix: &str) -> usize {
    let mut m = monitor(db);
    let n: Option<i64> = m
        .exec_first(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE CONCAT(?, '%') \
             AND ID <> CONNECTION_ID()",
            (prefix,),
        )
        .unwrap();
    n.unwrap_or(0) as usize
}

/// The mariadb CLI running `sql` through dbproxy, in the background.
fn cli(port: u16, sql: &str) -> Child {
    Command::new("mariadb")
        .arg("--no-defaults")
        .args(["-h", "127.0.0.1", "-P", &port.to_string(), "-u", "app"])
        .arg(format!("-p{APP_PASSWORD}"))
        .args(["-e", sql])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: plain kill(2) on a child this test spawned and has not reaped.
    unsafe { libc::kill(child.id() as i32, sig) };
}

fn server_error(r: mysql::Result<()>) -> u16 {
    match r {
        Err(mysql::Error::MySqlError(e)) => e.code,
        other => panic!("expected a server error, got {other:?}"),
    }
}

#[test]
fn ctrl_c_and_kill_with_the_greeting_id_stop_the_statement() {
    let db = MariaDb::start();
    for io in DRIVERS {
        let proxy = Proxy::start(&db, io, "max_connections = 4\nmax_idle_connections = 4");

        // The mariadb CLI's Ctrl-C: it opens a second connection and sends KILL QUERY with
        // the id of its greeting.
        let mut sleeper = cli(proxy.port, "SELECT SLEEP(60)");
        wait_until("the CLI's SLEEP to run", Duration::from_secs(20), || {
            running(&db, "SELECT SLEEP(60)") == 1
        });
        let t0 = Instant::now();
        signal(&sleeper, libc::SIGINT);
        let mut err = String::new();
        sleeper
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        sleeper.wait().unwrap();
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "[{io}] the statement ran on"
        );
        assert!(err.contains("1317"), "[{io}] the CLI says: {err}");
        // The server clears the thread's statement a moment after the client hears of the
        // kill.
        assert!(
            poll_until(Duration::from_secs(5), || running(&db, "SELECT SLEEP(60)")
                == 0),
            "[{io}] the statement still runs"
        );

        // KILL QUERY <greeting id> from another client: the statement stops, the session
        // goes on.
        let mut a = open(proxy.port);
        let id = a.connection_id();
        let worker = std::thread::spawn(move || {
            let r = a.query_drop("SELECT SLEEP(60)");
            (a, r)
        });
        wait_until("SLEEP to run", Duration::from_secs(20), || {
            running(&db, "SELECT SLEEP(60)") == 1
        });
        let mut b = open(proxy.port);
        b.query_drop(format!("KILL QUERY {id}")).unwrap();
        let (mut a, _) = worker.join().unwrap();
        // The server clears the thread's statement a moment after the client hears of the
        // kill.
        assert!(
            poll_until(Duration::from_secs(5), || running(&db, "SELECT SLEEP(60)")
                == 0),
            "[{io}] the statement still runs"
        );
        let v: Option<i64> = a.query_first("SELECT 5").unwrap();
        assert_eq!(v, Some(5), "[{io}] KILL QUERY keeps the connection");

        // KILL QUERY with what CONNECTION_ID() answered: the database thread id of the
        // connection serving the client (here, for its whole transaction).
        a.query_drop("BEGIN").unwrap();
        let thread: u64 = a.query_first("SELECT CONNECTION_ID()").unwrap().unwrap();
        let worker = std::thread::spawn(move || {
            let r = a.query_drop("SELECT SLEEP(60)");
            (a, r)
        });
        wait_until("SLEEP to run", Duration::from_secs(20), || {
            running(&db, "SELECT SLEEP(60)") == 1
        });
        b.query_drop(format!("KILL QUERY {thread}")).unwrap();
        let (mut a, _) = worker.join().unwrap();
        // The server clears the thread's statement a moment after the client hears of the
        // kill.
        assert!(
            poll_until(Duration::from_secs(5), || running(&db, "SELECT SLEEP(60)")
                == 0),
            "[{io}] the statement still runs"
        );
        a.query_drop("ROLLBACK").unwrap();

        // KILL CONNECTION: the client is closed, even while idle.
        b.query_drop(format!("KILL CONNECTION {id}")).unwrap();
        assert!(
            poll_until(Duration::from_secs(10), || a
                .query_drop("SELECT 1")
                .is_err()),
            "[{io}] the killed client is closed"
        );

        // Only the same dbproxy user's clients; unknown ids as MariaDB says them.
        let c = open(proxy.port);
        let mut other = connect(proxy.port, "nativeuser", "native-secret", "shop").unwrap();
        let denied = other.query_drop(format!("KILL {}", c.connection_id()));
        assert_eq!(server_error(denied), 1095, "[{io}] another user's client");
        assert_eq!(server_error(b.query_drop("KILL 12345")), 1094, "[{io}]");
        assert_eq!(
            server_error(b.query_drop("KILL QUERY ID 7")),
            1957,
            "[{io}]"
        );
        assert_eq!(
            server_error(b.query_drop("KILL QUERY CONNECTION_ID()")),
            1317,
            "[{io}] a KILL of its own statement"
        );

        // COM_PROCESS_KILL, as older clients send it.
        let mut raw = RawClient::login(proxy.port, "app", APP_PASSWORD).unwrap();
        let mut payload = vec![0x0c];
        payload.extend_from_slice(&c.connection_id().to_le_bytes());
        raw.try_write(0, &payload).unwrap();
        let (_, ok) = raw.try_read().unwrap();
        assert_eq!(ok.first(), Some(&0), "[{io}] COM_PROCESS_KILL: {ok:?}");
        let mut c = c;
        assert!(
            poll_until(Duration::from_secs(10), || c
                .query_drop("SELECT 1")
                .is_err()),
            "[{io}] closed by COM_PROCESS_KILL"
        );
        assert!(
            b.query_drop("SELECT 1").is_ok(),
            "[{io}] the killer goes on"
        );
    }
}

#[test]
fn connector_j_query_timeout_stops_the_statement() {
    let db = MariaDb::start();
    for io in DRIVERS {
        let proxy = Proxy::start(&db, io, "max_connections = 2\nmax_idle_connections = 2");
        let out = run_java(
            "QueryTimeout",
            &[proxy.port.to_string(), APP_PASSWORD.into()],
        );
        let ms: u64 = out
            .trim()
            .strip_prefix("OK ")
            .and_then(|m| m.parse().ok())
            .unwrap_or_else(|| panic!("[{io}] Connector/J: {out}"));
        assert!(ms < 30_000, "[{io}] the statement ran on ({ms} ms)");
        // The server clears the thread's statement a moment after the client hears of the
        // kill.
        assert!(
            poll_until(Duration::from_secs(5), || running(&db, "SELECT SLEEP(60)")
                == 0),
            "[{io}] the statement still runs"
        );
    }
}

#[test]
fn a_client_that_hangs_up_mid_statement_leaves_nothing_running() {
    let db = MariaDb::start();
    for io in DRIVERS {
        let proxy = Proxy::start(&db, io, "max_connections = 2\nmax_idle_connections = 2");
        let mut sleeper = cli(proxy.port, "SELECT SLEEP(61)");
        wait_until("the CLI's SLEEP to run", Duration::from_secs(20), || {
            running(&db, "SELECT SLEEP(61)") == 1
        });
        signal(&sleeper, libc::SIGKILL);
        sleeper.wait().unwrap();
        wait_until(
            "the statement of the client that left to be killed",
            Duration::from_secs(10),
            || running(&db, "SELECT SLEEP(61)") == 0,
        );
        // The pool serves on, with its budget whole.
        let mut a = open(proxy.port);
        let mut b = open(proxy.port);
        a.query_drop("BEGIN").unwrap();
        b.query_drop("BEGIN").unwrap();
        a.query_drop("SELECT 1").unwrap();
        b.query_drop("SELECT 1").unwrap();
        a.query_drop("COMMIT").unwrap();
        b.query_drop("COMMIT").unwrap();
    }
}

#[test]
fn pings_are_answered_without_a_backend_connection() {
    let db = MariaDb::start();
    for io in DRIVERS {
        let proxy = Proxy::start(
            &db,
            io,
            "max_connections = 2\nmax_idle_connections = 2\nconnection_borrow_timeout = \"60s\"",
        );
        // (A login with a default database checks it on a backend connection: before.)
        let mut pinger = open(proxy.port);
        let mut holders: Vec<Conn> = (0..2).map(|_| open(proxy.port)).collect();
        for h in &mut holders {
            h.query_drop("BEGIN").unwrap();
            h.query_drop("SELECT 1").unwrap();
        }
        // Every backend connection is inside a transaction: a ping that borrowed one would
        // wait for connection_borrow_timeout.
        let borrows = proxy.metric("dbproxy_database_connection_requests_total{target_group=\"default\",target_role=\"read_write\"}");
        let t0 = Instant::now();
        for _ in 0..20 {
            pinger.ping().unwrap();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "[{io}] pings waited"
        );
        assert_eq!(
            proxy.metric("dbproxy_database_connection_requests_total{target_group=\"default\",target_role=\"read_write\"}"),
            borrows,
            "[{io}] pings borrowed"
        );
        // A client inside a transaction pings its own connection.
        holders[0].ping().unwrap();
        for h in &mut holders {
            h.query_drop("COMMIT").unwrap();
        }
        let v: Option<i64> = pinger.query_first("SELECT 2").unwrap();
        assert_eq!(v, Some(2));
    }
}

/// One random packet after login: a command, maybe malformed, maybe with a wrong sequence
/// id or a header that lies about its length.
fn random_packet(rng: &mut Rng) -> Vec<u8> {
    const COMMANDS: [u8; 20] = [
        0x00, 0x02, 0x03, 0x04, 0x05, 0x06, 0x08, 0x09, 0x0a, 0x0c, 0x0d, 0x0e, 0x11, 0x16, 0x17,
        0x18, 0x19, 0x1a, 0x1b, 0x1c,
    ];
    let payload = match rng.below(8) {
        0 => Vec::new(),
        1 => vec![COMMANDS[rng.below(COMMANDS.len() as u64) as usize]],
        2 => {
            let mut p = vec![COMMANDS[rng.below(COMMANDS.len() as u64) as usize]];
            let n = rng.below(12) as usize;
            p.extend(rng.bytes(n));
            p
        }
        3 => b"\x03SELECT 1".to_vec(),
        4 => {
            let n = rng.below(40) as usize;
            rng.bytes(n)
        }
        5 => b"\x16SELECT ?".to_vec(),
        6 => {
            // COM_STMT_EXECUTE of a small id, with a random tail.
            let mut p = vec![0x17, rng.below(3) as u8, 0, 0, 0, 0, 1, 0, 0, 0];
            let n = rng.below(8) as usize;
            p.extend(rng.bytes(n));
            p
        }
        _ => b"\x0e".to_vec(),
    };
    let seq = if rng.below(10) == 0 {
        rng.next_u64() as u8
    } else {
        0
    };
    let mut len = payload.len() as u32;
    if rng.below(20) == 0 {
        // A header announcing more than follows (the rest never comes).
        len += 1 + rng.below(100) as u32;
    }
    let mut out = len.to_le_bytes()[..3].to_vec();
    out.push(seq);
    out.extend_from_slice(&payload);
    out
}

#[test]
fn random_malformed_packets_never_take_a_session_down_uncleanly() {
    let backend = proxy_tests::standin::StandIn::start(proxy_tests::standin::Auth::Any).port;
    for io in DRIVERS {
        let mut proxy = Proxy::start_at(
            backend,
            io,
            "verify_checkin = false\nidle_client_timeout = \"2s\"",
            "max_connections = 4\nmax_idle_connections = 4\nconnection_borrow_timeout = \"2s\"",
            "",
        );
        let mut bystander = RawClient::login(proxy.port, "app", APP_PASSWORD).unwrap();
        // An empty packet and a command in one write: MariaDB's "Unknown command" for the
        // first, the answer for the second.
        let mut c = RawClient::login(proxy.port, "app", APP_PASSWORD).unwrap();
        c.s.write_all(b"\x00\x00\x00\x00\x09\x00\x00\x00\x03SELECT 1")
            .unwrap();
        let (_, e) = c.try_read().unwrap();
        assert_eq!(e.get(..3), Some(&[0xff, 0x17, 0x04][..]), "[{io}] {e:?}");
        let (_, ok) = c.try_read().unwrap();
        assert_eq!(ok.first(), Some(&0), "[{io}] the next command: {ok:?}");
        drop(c);
        for seed in 1..=150u64 {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ seed.wrapping_mul(0x2545_f491_4f6c_dd1d));
            let Ok(mut c) = RawClient::login(proxy.port, "app", APP_PASSWORD) else {
                panic!("[{io}] seed {seed}: login refused");
            };
            // Several packets in one write (pipelined), several writes.
            for _ in 0..1 + rng.below(4) {
                let mut out = Vec::new();
                for _ in 0..1 + rng.below(6) {
                    out.extend(random_packet(&mut rng));
                }
                if c.s.write_all(&out).is_err() {
                    break;
                }
                let (_, closed) = read_some(&mut c.s, Duration::from_millis(30));
                if closed {
                    break;
                }
            }
            drop(c);
            if seed % 10 == 0 {
                // Whoever else is connected is served all along (often enough to stay within
                // the 2 s idle_client_timeout: sessions a broken backend connection used to
                // end now go on, so a seed takes up to its reads' timeouts).
                bystander.try_write(0, b"\x03SELECT 1").unwrap();
                let (_, reply) = bystander.try_read().unwrap();
                assert_eq!(reply.first(), Some(&0), "[{io}] seed {seed}: {reply:?}");
            }
        }
        drop(bystander);
        assert!(proxy.is_running(), "[{io}] dbproxy exited");
        let log = proxy.log();
        assert!(
            !log.contains("panicked"),
            "[{io}] a session panicked:\n{log}"
        );
        // Every session ran its cleanup: no client, no pin, no borrowed connection left.
        wait_until("every session to end", Duration::from_secs(15), || {
            proxy.metric("dbproxy_client_connections") == 0
        });
        let metrics = proxy.metrics();
        let left: Vec<&str> = metrics
            .lines()
            .filter(|l| l.starts_with("dbproxy_pinned_clients{") && !l.ends_with(" 0"))
            .collect();
        assert!(left.is_empty(), "[{io}] pins left: {left:?}");
        wait_until(
            "every backend connection back",
            Duration::from_secs(15),
            || {
                proxy.metric("dbproxy_database_connections{target_group=\"default\",target_role=\"read_write\"}")
                    == proxy.metric("dbproxy_database_connections_idle{target_group=\"default\",target_role=\"read_write\"}")
            },
        );
    }
}

/// `Com_stmt_execute` of the server, read directly.
fn executes(db: &MariaDb) -> u64 {
    global_status(&mut monitor(db), "Com_stmt_execute")
}

#[test]
fn mariadb_extended_capabilities_pass_through() {
    let db = MariaDb::start();
    db.root_sql(
        "CREATE TABLE shop.js (j JSON, p POINT); \
         INSERT INTO shop.js VALUES ('{\"a\": 1}', POINT(1, 2)); \
         CREATE TABLE shop.bulk (id INT PRIMARY KEY, v VARCHAR(40)) ENGINE=InnoDB",
    );
    let metadata = |port: u16, password: &str| {
        let out = mariadb_cli(
            port,
            "app",
            password,
            &["--column-type-info", "-t"],
            "SELECT j, p FROM shop.js",
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .filter(|l| l.starts_with("Type:") || l.starts_with("Field"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let direct = metadata(db.port, DB_PASSWORD);
    assert!(
        direct.iter().any(|l| l.contains("format=json")),
        "MariaDB's own answer: {direct:?}"
    );
    for io in DRIVERS {
        let proxy = Proxy::start(&db, io, "max_connections = 4\nmax_idle_connections = 4");
        // Extended column metadata (JSON's format, a geometry's type) reaches the client.
        assert_eq!(metadata(proxy.port, APP_PASSWORD), direct, "[{io}]");

        // A Connector/J batch goes to the server as one COM_STMT_BULK_EXECUTE (MariaDB
        // counts it as a single execute), as it does direct.
        db.root_sql("DELETE FROM shop.bulk");
        let before = executes(&db);
        let args = [proxy.port.to_string(), "10000".into(), APP_PASSWORD.into()];
        let out = run_java("BulkBatch", &args);
        assert_eq!(out.trim(), "OK 10000", "[{io}]");
        assert_eq!(executes(&db) - before, 1, "[{io}] executes for one batch");
    }
    // The same batch direct, for comparison.
    db.root_sql("DELETE FROM shop.bulk");
    let before = executes(&db);
    let args = [db.port.to_string(), "10000".into(), DB_PASSWORD.into()];
    assert_eq!(run_java("BulkBatch", &args).trim(), "OK 10000");
    assert_eq!(executes(&db) - before, 1, "direct");
}
