//! Running dbproxy: SIGTERM drains (listeners close, idle clients are told the server is
//! going away, transactions in flight finish up to `shutdown_timeout`, exit 0).

use mysql::prelude::Queryable;
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
        let mut idle = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        idle.query_drop("SELECT 1").unwrap();
        let mut tx = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        tx.query_drop("BEGIN").unwrap();
        tx.query_drop(format!("INSERT INTO {table} VALUES (1)"))
            .unwrap();
        proxy.sigterm();
        wait_until("the listeners to close", Duration::from_secs(5), || {
            TcpStream::connect(("127.0.0.1", proxy.port)).is_err()
        });
        // The idle client was told and closed.
        let e = idle.query_drop("SELECT 1").unwrap_err().to_string();
        assert!(
            e.contains("1053") && e.contains("shutdown"),
            "[{io}] the idle client got: {e}"
        );
        // The transaction goes on to its end...
        tx.query_drop(format!("INSERT INTO {table} VALUES (2)"))
            .unwrap();
        tx.query_drop("COMMIT").unwrap();
        // ...and the session ends after it, told why.
        let e = tx.query_drop("SELECT 1").unwrap_err().to_string();
        assert!(e.contains("1053"), "[{io}] after its transaction: {e}");
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
        let mut tx = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        tx.query_drop("BEGIN").unwrap();
        tx.query_drop(format!("INSERT INTO {table} VALUES (1)"))
            .unwrap();
        proxy.sigterm();
        let status = proxy.wait_exit(Duration::from_secs(15));
        assert!(status.is_some_and(|s| s.success()), "[{io}] {status:?}");
        // Told at the deadline (1053), before dbproxy went; the COMMIT reads that.
        let e = tx.query_drop("COMMIT").unwrap_err().to_string();
        assert!(
            e.contains("1053"),
            "[{io}] the COMMIT after shutdown_timeout: {e}"
        );
        wait_until("the rollback", Duration::from_secs(10), || {
            rows(&db, &table) == "0"
        });
        assert!(proxy.log().contains("shutdown_timeout"), "[{io}]");
    }
}
