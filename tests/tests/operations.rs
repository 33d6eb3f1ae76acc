//! Running dbproxy: SIGTERM drains (listeners close, idle clients are told the server is
//! going away, transactions in flight finish up to `shutdown_timeout`, exit 0).

use proxy_tests::*;
use std::net::TcpStream;
use std::time::Duration;

fn rows(db: &MariaDb, table: &str) -> String {
    db.root_sql(&format!("SELECT COUNT(*) FROM shop.{table}"))
        .trim()
        .to_string()
}

#[test]
fn sigterm_drains_idle_clients_at_once_and_transactions_at_their_end() {
    let db = MariaDb::start();
    for io in DRIVERS {
        let table = format!("drain_{io}");
        db.root_sql(&format!("CREATE TABLE shop.{table} (id INT)"));
        let mut proxy = Proxy::start_full(&db, io, "shutdown_timeout = \"30s\"", "");
        let raw = || proxy_tests::raw::RawClient::login(proxy.port, "app", APP_PASSWORD).unwrap();
        let mut idle = raw();
        idle.query("DO 1");
        let mut tx = raw();
        tx.query("USE shop");
        tx.query("BEGIN");
        tx.query(&format!("INSERT INTO {table} VALUES (1)"));
        proxy.sigterm();
        wait_until("the listeners to close", Duration::from_secs(5), || {
            TcpStream::connect(("127.0.0.1", proxy.port)).is_err()
        });
        // The idle client is told (1053, unasked) and closed at once. (Read as it comes:
        // a client that wrote to the closed socket instead could lose it to the reset.)
        let told = |c: &mut proxy_tests::raw::RawClient, what: &str| {
            let (bytes, closed) = read_some(&mut c.s, Duration::from_secs(10));
            assert!(closed, "[{io}] {what}: closed: {bytes:?}");
            let err = bytes.get(4..).unwrap_or_default().to_vec();
            assert_eq!(err.first(), Some(&0xff), "[{io}] {what}: {bytes:?}");
            assert_eq!(
                err.get(1..3),
                Some(&1053u16.to_le_bytes()[..]),
                "[{io}] {what}"
            );
            assert!(
                String::from_utf8_lossy(&err).contains("shutdown"),
                "[{io}] {what}: {}",
                String::from_utf8_lossy(&err)
            );
        };
        told(&mut idle, "the idle client");
        // The transaction goes on to its end...
        tx.query(&format!("INSERT INTO {table} VALUES (2)"));
        tx.query("COMMIT");
        // ...and the session ends after it, told why.
        told(&mut tx, "after its transaction");
        let status = proxy.wait_exit(Duration::from_secs(15));
        assert!(
            status.is_some_and(|s| s.success()),
            "[{io}] dbproxy did not exit cleanly: {status:?}"
        );
        assert_eq!(rows(&db, &table), "2", "[{io}] the transaction committed");
        // Not at shutdown_timeout: every client was gone.
        assert!(proxy.log().contains("drained: no client left"), "[{io}]");
    }
}

#[test]
fn a_transaction_still_open_at_shutdown_timeout_is_closed_and_rolled_back() {
    let db = MariaDb::start();
    for io in DRIVERS {
        let table = format!("late_{io}");
        db.root_sql(&format!("CREATE TABLE shop.{table} (id INT)"));
        let mut proxy = Proxy::start_full(&db, io, "shutdown_timeout = \"2s\"", "");
        let mut tx = proxy_tests::raw::RawClient::login(proxy.port, "app", APP_PASSWORD).unwrap();
        tx.query("USE shop");
        tx.query("BEGIN");
        tx.query(&format!("INSERT INTO {table} VALUES (1)"));
        proxy.sigterm();
        // At the deadline the client is told (1053, unasked) and closed. (Read as it
        // comes: a client that wrote to the closed socket instead could lose it to the
        // reset.)
        let (told, closed) = read_some(&mut tx.s, Duration::from_secs(15));
        assert!(closed, "[{io}] closed at shutdown_timeout: {told:?}");
        let err = told.get(4..).unwrap_or_default();
        assert_eq!(err.first(), Some(&0xff), "[{io}] an error packet: {told:?}");
        assert_eq!(
            err.get(1..3),
            Some(&1053u16.to_le_bytes()[..]),
            "[{io}] {told:?}"
        );
        let status = proxy.wait_exit(Duration::from_secs(15));
        assert!(status.is_some_and(|s| s.success()), "[{io}] {status:?}");
        wait_until("the rollback", Duration::from_secs(10), || {
            rows(&db, &table) == "0"
        });
        assert!(proxy.log().contains("shutdown_timeout"), "[{io}]");
    }
}
