//! A target group whose database is reached through its Unix socket (`unix:/path`).

use mysql::prelude::*;
use proxy_tests::*;

#[test]
fn unix_socket_target_serves_transactions_statements_and_moves_between_cores() {
    let db = MariaDb::start();
    db.root_sql("CREATE TABLE shop.u (id INT AUTO_INCREMENT PRIMARY KEY, client INT, n INT)");
    for io in DRIVERS {
        db.root_sql("TRUNCATE shop.u");
        // One connection for two workers: clients on the core that does not hold it can
        // only be served by moving it across (a Unix socket this time).
        let proxy = Proxy::start_full(
            &db,
            io,
            "workers = 2",
            &format!(
                "targets = [\"unix:{}\"]\nmax_connections = 1\nmax_idle_connections = 1",
                db.socket().display()
            ),
        );
        let port = proxy.port;
        let clients: Vec<_> = (0..40)
            .map(|i| {
                std::thread::spawn(move || {
                    let mut c = connect(port, "app", APP_PASSWORD, "shop").unwrap();
                    let stmt = c.prep("SELECT ? * 2").unwrap();
                    for n in 0..25 {
                        let mut tx = c.start_transaction(Default::default()).unwrap();
                        tx.exec_drop("INSERT INTO u (client, n) VALUES (?, ?)", (i, n))
                            .unwrap();
                        tx.commit().unwrap();
                        let v: Option<i64> = c.exec_first(&stmt, (i * 100 + n,)).unwrap();
                        assert_eq!(v, Some(2 * (i * 100 + n)));
                        let s: Option<String> = c.query_first("SELECT DATABASE()").unwrap();
                        assert_eq!(s.as_deref(), Some("shop"));
                    }
                })
            })
            .collect();
        for t in clients {
            t.join().unwrap();
        }
        let rows = db.root_sql("SELECT COUNT(*), COUNT(DISTINCT client), SUM(n) FROM shop.u");
        assert_eq!(
            rows.split_whitespace().collect::<Vec<_>>(),
            ["1000", "40", "12000"],
            "[{io}]"
        );
        // dbproxy's backend connection and its health check's came in through the socket
        // (host 'localhost'), not over TCP.
        let hosts =
            db.root_sql("SELECT host FROM information_schema.processlist WHERE user = 'app'");
        assert_eq!(
            hosts.lines().collect::<Vec<_>>(),
            ["localhost", "localhost"],
            "[{io}] backend connections: {hosts}"
        );
        assert_eq!(
            proxy.metric("dbproxy_database_connections_setup_succeeded_total{target_group=\"default\",target_role=\"read_write\"}"),
            1,
            "[{io}]"
        );
        let moved =
            proxy.metric("dbproxy_connections_moved_between_cores_total{target_group=\"default\",target_role=\"read_write\"}");
        println!("[{io}] 1000 transactions over one Unix socket connection, moved between cores {moved} times");
        assert!(
            moved >= 1,
            "[{io}] the connection never moved to the other core"
        );
    }
}
