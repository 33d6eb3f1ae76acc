//! Failures: the database dying mid-query, and clients that send garbage or nothing.

use mysql::prelude::*;
use proxy_tests::raw::RawClient;
use proxy_tests::*;
use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

#[test]
fn database_killed_mid_query_then_restarted() {
    let mut db = MariaDb::start();
    for io in DRIVERS {
        let proxy = Proxy::start(
            &db,
            io,
            "connect_timeout = \"2s\"\nconnection_borrow_timeout = \"2s\"",
        );
        let mut idle = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        idle.query_drop("SELECT 1").unwrap();
        let port = proxy.port;
        let running = std::thread::spawn(move || {
            let mut c = connect(port, "app", APP_PASSWORD, "shop").unwrap();
            let started = Instant::now();
            let r = c.query_drop("SELECT SLEEP(30)");
            (r, started.elapsed())
        });
        // Kill once the query is running on the server.
        wait_for(
            || {
                db.root_sql("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO = 'SELECT SLEEP(30)'").trim() == "1"
            },
            &format!("[{io}] the query to start"),
        );
        let killed_at = Instant::now();
        db.kill();
        let (r, _) = running.join().unwrap();
        let noticed = killed_at.elapsed();
        println!("[{io}] client saw the failure {noticed:?} after the kill: {r:?}");
        assert!(r.is_err(), "[{io}] the query cannot succeed");
        let told = r.unwrap_err().to_string();
        assert!(told.contains("outcome is unknown"), "[{io}] {told}");
        assert!(
            noticed < Duration::from_secs(5),
            "[{io}] the client hung ({noticed:?})"
        );
        // While the database is down, statements wait for it up to connection_borrow_timeout,
        // then get a clear error, not a hang. (The mysql crate runs queries while
        // connecting, so the error may come from either.)
        let err =
            connect(proxy.port, "app", APP_PASSWORD, "").and_then(|mut c| c.query_drop("SELECT 1"));
        match err {
            Err(mysql::Error::MySqlError(e)) => assert_eq!(e.code, 9502, "[{io}] {e:?}"),
            other => panic!("[{io}] expected 9502, got {:?}", other.map(|_| ())),
        }
        db.restart();
        // New clients work without restarting dbproxy.
        let mut c = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        let v: Option<i32> = c.query_first("SELECT 42").unwrap();
        assert_eq!(v, Some(42), "[{io}]");
        // A client that was idle (outside a transaction, so holding no backend connection)
        // goes on as if nothing happened: its next query gets a fresh connection.
        let v: Option<String> = idle.query_first("SELECT DATABASE()").unwrap();
        assert_eq!(
            v.as_deref(),
            Some("shop"),
            "[{io}] the idle client keeps its session"
        );
    }
}

fn read_greeting(s: &mut TcpStream) -> Vec<u8> {
    let (g, closed) = read_some(s, Duration::from_millis(500));
    assert!(!closed && g.len() > 4 && g[4] == 10, "no greeting: {g:?}");
    g
}

fn assert_healthy(port: u16) {
    let mut c = connect(port, "app", APP_PASSWORD, "shop").unwrap();
    let v: Option<i32> = c.query_first("SELECT 7").unwrap();
    assert_eq!(v, Some(7));
}

#[test]
fn bad_clients_get_errors_and_others_are_unaffected() {
    let db = MariaDb::start();
    for io in DRIVERS {
        let proxy = Proxy::start_full(
            &db,
            io,
            "handshake_timeout = \"1s\"\nmax_allowed_packet = \"1M\"",
            "",
        );
        // A client in the middle of a long session, to prove it is unaffected.
        let mut bystander = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        bystander.query_drop("SELECT 1").unwrap();

        // Garbage instead of a handshake response: an error packet, then closed.
        let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
        read_greeting(&mut s);
        s.write_all(b"\x10\x00\x00\x01GET / HTTP/1.1\r\n\r\n")
            .unwrap();
        let (reply, closed) = read_some(&mut s, Duration::from_secs(3));
        assert!(
            reply.len() > 5 && reply[4] == 0xff,
            "[{io}] garbage: {reply:?}"
        );
        assert_eq!(u16::from_le_bytes([reply[5], reply[6]]), 1043);
        assert!(closed, "[{io}] closed after garbage");

        // Pure noise (not even a packet header that fits).
        let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
        read_greeting(&mut s);
        s.write_all(&[0xff; 64]).unwrap();
        let (reply, closed) = read_some(&mut s, Duration::from_secs(3));
        assert!(closed, "[{io}] closed after noise: {reply:?}");

        // A truncated packet, and silence: closed at handshake_timeout.
        for partial in [&b"\x50\x00\x00\x01\x0d\xa2"[..], &b""[..]] {
            let t0 = Instant::now();
            let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
            read_greeting(&mut s);
            s.write_all(partial).unwrap();
            let (_, closed) = read_some(&mut s, Duration::from_secs(5));
            assert!(closed, "[{io}] a silent client must be closed");
            assert!(
                t0.elapsed() >= Duration::from_millis(900),
                "[{io}] closed before the timeout"
            );
        }

        // An oversized command after login: ER_NET_PACKET_TOO_LARGE, then closed.
        let mut c = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        let big = format!("SELECT '{}'", "x".repeat(2 << 20));
        match c.query_drop(big) {
            Err(mysql::Error::MySqlError(e)) => assert_eq!(e.code, 1153, "[{io}] {e:?}"),
            other => panic!("[{io}] expected 1153, got {other:?}"),
        }
        assert!(
            c.query_drop("SELECT 1").is_err(),
            "[{io}] closed after an oversized packet"
        );

        // A garbage command byte gets "unknown command" (1047) and the session goes on
        // (more malformed input in hostile.rs).
        let mut c = RawClient::login(proxy.port, "app", APP_PASSWORD).unwrap();
        c.write(0, &[0x99, 0xde, 0xad]);
        let (_, r) = c.read();
        assert_eq!(r.get(..3), Some(&[0xff, 0x17, 0x04][..]), "[{io}] {r:?}");
        c.query("DO 1");

        // Many half-open connections at once do not disturb the others.
        let idle: Vec<TcpStream> = (0..50)
            .map(|_| TcpStream::connect(("127.0.0.1", proxy.port)).unwrap())
            .collect();
        assert_healthy(proxy.port);
        drop(idle);

        let v: Option<i32> = bystander.query_first("SELECT 3").unwrap();
        assert_eq!(v, Some(3), "[{io}] the bystander is unaffected");
        assert!(
            proxy.log().contains("handshake_timeout"),
            "[{io}] silent clients are logged"
        );
    }
}

#[test]
fn idle_clients_are_disconnected_with_an_error() {
    let db = MariaDb::start();
    for io in DRIVERS {
        let proxy = Proxy::start_full(
            &db,
            io,
            "idle_client_timeout = \"1s\"",
            "max_connections = 1",
        );
        let mut c = RawClient::login(proxy.port, "app", APP_PASSWORD).unwrap();
        c.query("DO 1");
        // Once idle_client_timeout passes, dbproxy tells the client why (MariaDB's 4031,
        // unasked) and closes the connection.
        let (told, closed) = read_some(&mut c.s, Duration::from_secs(10));
        assert!(closed, "[{io}] an idle client is disconnected: {told:?}");
        let err = told.get(4..).unwrap_or_default();
        assert_eq!(err.first(), Some(&0xff), "[{io}] an error packet: {told:?}");
        assert_eq!(
            err.get(1..3),
            Some(&4031u16.to_le_bytes()[..]),
            "[{io}] ER_CLIENT_INTERACTION_TIMEOUT: {told:?}"
        );
        assert!(
            String::from_utf8_lossy(err).contains("inactivity (dbproxy idle_client_timeout)"),
            "[{io}] {}",
            String::from_utf8_lossy(err)
        );
        wait_for(
            || proxy.metric("dbproxy_client_connections") == 0,
            &format!("[{io}] idle client counted as closed"),
        );
        // Its backend connection went back to the pool: one connection serves the next one.
        let mut d = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        d.query_drop("SELECT 1").unwrap();
    }
}

#[test]
fn unknown_commands_are_refused_and_the_session_goes_on() {
    let db = MariaDb::start();
    for io in DRIVERS {
        let proxy = Proxy::start(&db, io, "");
        // Log in by hand, then send COM_BINLOG_DUMP and 0xee.
        let mut raw = RawClient::login(proxy.port, "app", APP_PASSWORD).unwrap();
        let s = &mut raw.s;
        for cmd in [0x12u8, 0xee] {
            send(s, 0, &[cmd, 0, 0, 0, 0]);
            let (reply, closed) = read_some(s, Duration::from_millis(500));
            assert!(!closed);
            assert_eq!(reply.get(4), Some(&0xff), "[{io}] {cmd:#x}: {reply:?}");
            assert_eq!(u16::from_le_bytes([reply[5], reply[6]]), 1047);
        }
        send(s, 0, b"\x03SELECT 1");
        let (reply, _) = read_some(s, Duration::from_millis(500));
        assert!(
            reply.len() > 20,
            "[{io}] a result set after the refusals: {reply:?}"
        );
    }
}

fn send(s: &mut TcpStream, seq: u8, payload: &[u8]) {
    let mut out = (payload.len() as u32).to_le_bytes()[..3].to_vec();
    out.push(seq);
    out.extend_from_slice(payload);
    s.write_all(&out).unwrap();
}
