//! Hostile and careless clients: each gets a defined answer (an error packet, or being
//! disconnected at a named timeout), and a bystander in the middle of its own session
//! goes on unaffected.

use mysql::prelude::*;
use proxy_tests::raw::RawClient;
use proxy_tests::*;
use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

/// Short timeouts, so that each case ends quickly; `idle_client_timeout = 0`: never.
const HOSTILE: &str = "handshake_timeout = \"1s\"\nnet_read_timeout = \"1s\"\n\
    idle_client_timeout = \"0\"\nidle_transaction_timeout = \"2s\"\n\
    max_prepared_statements_per_client = 5";

/// The error code of an ERR payload.
fn err_code(p: &[u8]) -> Option<u16> {
    match p {
        [0xff, a, b, ..] => Some(u16::from_le_bytes([*a, *b])),
        _ => None,
    }
}

/// The error code of the first packet in raw bytes read from a socket.
fn first_err(bytes: &[u8]) -> Option<u16> {
    err_code(bytes.get(4..).unwrap_or_default())
}

fn bystander_is_fine(c: &mut mysql::Conn, io: &str, after: &str) {
    let v: Option<i64> = c
        .query_first("SELECT COUNT(*) FROM shop.hostile")
        .unwrap_or_else(|e| panic!("[{io}] the bystander failed after {after}: {e}"));
    assert!(v.is_some(), "[{io}] after {after}");
}

/// Garbage after login: unknown and empty commands, a packet announcing 16 MiB - 1 with a
/// few bytes behind it, sequence ids out of order, pipelined commands.
#[test]
fn malformed_commands_get_errors_and_half_packets_a_timeout() {
    let db = MariaDb::start();
    db.root_sql("CREATE TABLE shop.hostile (n INT PRIMARY KEY)");
    for io in DRIVERS {
        let proxy = Proxy::start_full(&db, io, HOSTILE, "");
        // (Outside a transaction: idle_transaction_timeout would end it meanwhile.)
        let mut bystander = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        bystander
            .query_drop("INSERT INTO hostile VALUES (1)")
            .unwrap();

        // Command bytes nobody defined, and a packet with no command byte at all: 1047
        // each, and the session goes on.
        let mut c = RawClient::login(proxy.port, "app", APP_PASSWORD).unwrap();
        for payload in [&[0x99u8, 1, 2, 3][..], &[0xff], &[0x20, 0], &[]] {
            c.write(0, payload);
            let (seq, r) = c.read();
            assert_eq!(err_code(&r), Some(1047), "[{io}] {payload:?}: {r:?}");
            assert_eq!(seq, 1, "[{io}] {payload:?}");
        }
        c.query("DO 1");

        // A command numbered other than 0: 1156 and closed, as MariaDB does, before
        // anything reaches a database connection.
        let mut w = RawClient::login(proxy.port, "app", APP_PASSWORD).unwrap();
        w.write(7, b"\x03DO 2");
        let (reply, closed) = read_some(&mut w.s, Duration::from_secs(5));
        assert_eq!(first_err(&reply), Some(1156), "[{io}] {reply:?}");
        assert!(closed, "[{io}] out of order ends the session");

        // Pipelined: three commands in one write, three answers in order.
        let mut burst = Vec::new();
        for sql in ["DO 3", "SELECT 1 FROM shop.nowhere_at_all", "DO 4"] {
            let mut p = vec![0x03];
            p.extend_from_slice(sql.as_bytes());
            burst.extend_from_slice(&(p.len() as u32).to_le_bytes()[..3]);
            burst.push(0);
            burst.extend_from_slice(&p);
        }
        c.s.write_all(&burst).unwrap();
        assert_eq!(c.read().1.first(), Some(&0), "[{io}] first of the burst");
        assert_eq!(
            err_code(&c.read().1),
            Some(1146),
            "[{io}] second of the burst"
        );
        assert_eq!(c.read().1.first(), Some(&0), "[{io}] third of the burst");

        // A header announcing 16 MiB - 1 bytes with three behind it, then silence: after
        // net_read_timeout, 1159 and closed (not waited for like an idle client, whose
        // idle_client_timeout is off here).
        c.s.write_all(&[0xff, 0xff, 0xff, 0x00, 0x03, b'S', b'E'])
            .unwrap();
        let (reply, closed) = read_some(&mut c.s, Duration::from_secs(10));
        assert!(closed, "[{io}] a half packet must end the session");
        assert_eq!(first_err(&reply), Some(1159), "[{io}] {reply:?}");
        assert!(proxy.log().contains("net_read_timeout"), "[{io}]");

        // Half a packet before login: closed at handshake_timeout.
        let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
        read_some(&mut s, Duration::from_millis(500));
        s.write_all(&[0x50, 0x00, 0x00, 0x01, 0x0d]).unwrap();
        let (_, closed) = read_some(&mut s, Duration::from_secs(10));
        assert!(closed, "[{io}] a silent login must be closed");

        bystander_is_fine(&mut bystander, io, "malformed commands");
        db.root_sql("DELETE FROM shop.hostile");
    }
}

/// Handshake responses whose auth data has every wrong length for mysql_native_password
/// (0..=64 bytes but 20): refused with 1045, never a crash; then a storm of connections
/// from one address that log in and leave at once.
#[test]
fn broken_logins_and_connect_storms_leave_others_alone() {
    let db = MariaDb::start();
    db.root_sql("CREATE TABLE shop.hostile (n INT PRIMARY KEY)");
    for io in DRIVERS {
        // The login throttle would slow the storm of refusals down (that is its job).
        let proxy = Proxy::start_full(&db, io, &format!("{HOSTILE}\nlogin_max_delay = \"0\""), "");
        let mut bystander = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        for len in (0..=64usize).filter(|&n| n != 20) {
            let mut c = RawClient {
                s: TcpStream::connect(("127.0.0.1", proxy.port)).unwrap(),
            };
            c.s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let (_, greeting) = c.read();
            assert_eq!(greeting.first(), Some(&10), "[{io}] no greeting");
            let caps: u32 = 0x200 | 0x8000 | 0x80000 | 1;
            let mut p = caps.to_le_bytes().to_vec();
            p.extend_from_slice(&(1u32 << 24).to_le_bytes());
            p.push(45);
            p.extend_from_slice(&[0; 23]);
            p.extend_from_slice(b"app\0");
            p.push(len as u8);
            p.extend(std::iter::repeat_n(0x5a, len));
            p.extend_from_slice(b"mysql_native_password\0");
            c.write(1, &p);
            let (seq, mut reply) = c.read();
            if len == 0 {
                // No scramble at all: asked again with a fresh one (an auth switch), as
                // MariaDB does; a wrong answer to that is refused as any.
                assert_eq!(reply.first(), Some(&0xfe), "[{io}] {reply:?}");
                c.write(seq.wrapping_add(1), &[0x33; 20]);
                reply = c.read().1;
            }
            assert_eq!(
                err_code(&reply),
                Some(1045),
                "[{io}] {len} bytes: {reply:?}"
            );
        }
        bystander_is_fine(&mut bystander, io, "broken logins");

        // Many connections from one address in a burst, each logging in and leaving.
        let storm: Vec<_> = (0..4)
            .map(|_| {
                let port = proxy.port;
                std::thread::spawn(move || {
                    for _ in 0..250 {
                        let mut c = RawClient::login(port, "app", APP_PASSWORD).unwrap();
                        c.write(0, &[0x01]);
                    }
                })
            })
            .collect();
        for t in storm {
            t.join().unwrap();
        }
        // And as many that connect and vanish before logging in.
        for _ in 0..1000 {
            drop(TcpStream::connect(("127.0.0.1", proxy.port)).unwrap());
        }
        bystander_is_fine(&mut bystander, io, "a connect storm");
        // Connections that vanished before being accepted may still wait in the listen
        // queue after the last connect returned: every one is accepted and counted.
        wait_until(
            "every connection of the storm to be accepted and to end",
            Duration::from_secs(10),
            || {
                proxy.metric("dbproxy_client_connections_received_total") >= 2000 + 64
                    && proxy.metric("dbproxy_client_connections") == 1
            },
        );
    }
}

/// A client that selects a 2 GiB result and reads none of it: dbproxy takes from the
/// database only what the client takes (the server's thread ends up blocked writing to
/// dbproxy, and dbproxy's memory stays within 64 MiB of where it was); once the client is
/// gone, its database connection is closed and the pool is whole again.
#[test]
fn a_client_that_stops_reading_costs_no_memory() {
    let db = MariaDb::start();
    for io in DRIVERS {
        let proxy = Proxy::start_full(&db, io, "net_write_timeout = \"5m\"", "");
        let mut c = RawClient::login(proxy.port, "app", APP_PASSWORD).unwrap();
        c.query("USE shop");
        let before = proxy.rss();
        // 2,048 rows of 1 MiB each, from MariaDB's sequence engine.
        c.write(0, b"\x03SELECT REPEAT('x', 1048576) FROM seq_1_to_2048");
        // The answer starts to flow, then nobody reads. Backpressure reaches the server:
        // its thread waits to write (dbproxy reads no more), and dbproxy's memory settles.
        let (_, first) = c.read();
        assert_eq!(first, [1], "[{io}] one column");
        let mut last = (0, std::time::Instant::now());
        wait_until(
            "the server to be held back and dbproxy's memory to settle for a second",
            Duration::from_secs(60),
            || {
                let state = db.root_sql(
                    "SELECT STATE FROM information_schema.PROCESSLIST \
                     WHERE INFO LIKE 'SELECT REPEAT%'",
                );
                let rss = proxy.rss();
                if rss.abs_diff(last.0) >= 1 << 20 {
                    last = (rss, std::time::Instant::now());
                }
                state.trim() == "Writing to net" && last.1.elapsed() > Duration::from_secs(1)
            },
        );
        let after = proxy.rss();
        let grown = after.saturating_sub(before);
        println!("[{io}] dbproxy RSS {before} -> {after} bytes with a client not reading");
        assert!(grown < 64 << 20, "[{io}] grew by {grown} bytes");
        drop(c);
        wait_until(
            "the database connection to be closed",
            Duration::from_secs(30),
            || proxy.metric("dbproxy_database_connections_currently_borrowed") == 0,
        );
        let mut other = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        let v: Option<i32> = other.query_first("SELECT 3").unwrap();
        assert_eq!(v, Some(3), "[{io}]");

        // With a short net_write_timeout, dbproxy gives such a client up by itself (and
        // its database connection with it) while the client still holds its socket.
        let proxy = Proxy::start_full(&db, io, "net_write_timeout = \"2s\"", "");
        let mut c = RawClient::login(proxy.port, "app", APP_PASSWORD).unwrap();
        c.query("USE shop");
        c.write(0, b"\x03SELECT REPEAT('x', 1048576) FROM seq_1_to_2048");
        assert_eq!(c.read().1, [1], "[{io}] one column");
        wait_until(
            "the stalled client to be given up",
            Duration::from_secs(30),
            || {
                proxy.metric("dbproxy_client_connections") == 0
                    && proxy.metric("dbproxy_database_connections_currently_borrowed") == 0
            },
        );
    }
}

/// 10,000 clients connect, log in, run a statement and leave, ten times over: dbproxy's
/// memory comes back to what it was after the first round (nothing kept per client that
/// has gone).
#[test]
fn ten_rounds_of_ten_thousand_clients_leave_no_memory_behind() {
    let db = MariaDb::start();
    for io in DRIVERS {
        let proxy = Proxy::start_full(&db, io, "login_max_delay = \"0\"", "");
        let round = || {
            let workers: Vec<_> = (0..8)
                .map(|_| {
                    let port = proxy.port;
                    std::thread::spawn(move || {
                        for _ in 0..1250 {
                            let mut c = RawClient::login(port, "app", APP_PASSWORD).unwrap();
                            c.query("DO 1");
                            c.write(0, &[0x01]);
                        }
                    })
                })
                .collect();
            for w in workers {
                w.join().unwrap();
            }
            wait_until("every client to be gone", Duration::from_secs(30), || {
                proxy.metric("dbproxy_client_connections") == 0
            });
        };
        round();
        let first = proxy.rss();
        let mut rss = vec![first];
        for _ in 1..10 {
            round();
            rss.push(proxy.rss());
        }
        println!(
            "[{io}] RSS after each round of 10,000 clients (MiB): {:?}",
            rss.iter().map(|r| r >> 20).collect::<Vec<_>>()
        );
        let last = rss.last().copied().unwrap_or(0);
        assert!(
            last <= first + (8 << 20),
            "[{io}] memory grew from {first} to {last} bytes over ten rounds"
        );
        assert!(proxy.metric("dbproxy_client_connections_received_total") >= 100_000);
    }
}

/// `idle_transaction_timeout`: a client idle inside a transaction is disconnected (4031)
/// and its transaction rolled back, freeing the database connection; with
/// `idle_client_timeout = 0` a client idle outside one stays. Prepared statements per
/// client are bounded (1461), and closing one makes room.
#[test]
fn idle_transactions_end_and_prepared_statements_are_bounded() {
    let db = MariaDb::start();
    db.root_sql("CREATE TABLE shop.hostile (n INT PRIMARY KEY)");
    for io in DRIVERS {
        let proxy = Proxy::start_full(&db, io, HOSTILE, "");
        let mut idle = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        idle.query_drop("SELECT 1").unwrap();
        let mut c = RawClient::login(proxy.port, "app", APP_PASSWORD).unwrap();
        c.query("USE shop");
        c.query("BEGIN");
        c.query("INSERT INTO hostile VALUES (7)");
        let (told, closed) = read_some(&mut c.s, Duration::from_secs(10));
        assert!(
            closed,
            "[{io}] the idle transaction's client must be closed"
        );
        assert_eq!(first_err(&told), Some(4031), "[{io}] {told:?}");
        assert!(
            String::from_utf8_lossy(&told).contains("idle_transaction_timeout"),
            "[{io}] {told:?}"
        );
        wait_until(
            "the database connection to be free",
            Duration::from_secs(5),
            || proxy.metric("dbproxy_database_connections_currently_borrowed") == 0,
        );
        assert_eq!(
            db.root_sql("SELECT COUNT(*) FROM shop.hostile").trim(),
            "0",
            "[{io}] the idle transaction was rolled back"
        );
        // The client idle outside a transaction all this while is still there.
        let v: Option<i32> = idle.query_first("SELECT 5").unwrap();
        assert_eq!(v, Some(5), "[{io}] idle_client_timeout = 0 is off");

        let mut p = RawClient::login(proxy.port, "app", APP_PASSWORD).unwrap();
        let ids: Vec<u32> = (0..5)
            .map(|i| p.prepare(&format!("SELECT {i}")).0)
            .collect();
        p.write(0, b"\x16SELECT 6");
        let (_, r) = p.read();
        assert_eq!(
            err_code(&r),
            Some(1461),
            "[{io}] {}",
            String::from_utf8_lossy(&r)
        );
        let mut close = vec![0x19];
        close.extend_from_slice(&ids[0].to_le_bytes());
        p.write(0, &close);
        p.prepare("SELECT 6");
        p.write(0, b"\x16SELECT 7");
        assert_eq!(
            err_code(&p.read().1),
            Some(1461),
            "[{io}] the bound holds again"
        );
    }
}
