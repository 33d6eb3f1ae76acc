//! Stock connectors through dbproxy: mysql-connector-python's binary protocol, PyMySQL with
//! hundreds of sessions of their own, MariaDB Connector/J with server-side prepared
//! statements. The programs live in `tests/python` and `tests/java`.

use proxy_tests::*;

#[test]
fn mysql_connector_python_tenants_read_only_their_own_rows() {
    let db = MariaDb::start();
    create_tenants(&db);
    for io in DRIVERS {
        let proxy = Proxy::start(&db, io, "max_connections = 2\nmax_idle_connections = 2");
        let out = run_python("tenants.py", &[proxy.port.to_string(), "1000".into()]);
        assert_eq!(out.trim(), "OK 1000", "[{io}]");
    }
}

#[test]
fn four_hundred_pymysql_clients_keep_their_own_sessions_on_twenty_connections() {
    let db = MariaDb::start();
    for io in DRIVERS {
        let proxy = Proxy::start(&db, io, "max_connections = 20\nmax_idle_connections = 20");
        let peak = ThreadsPeak::start(&db);
        let out = run_python(
            "uservars.py",
            &[proxy.port.to_string(), "400".into(), "5".into()],
        );
        let peak = peak.finish();
        println!("[{io}] {} ; peak Threads_connected {peak}", out.trim());
        assert_eq!(out.trim(), "OK 4000", "[{io}]");
        // 20 backend connections, the sampler's own, and the harness' root connections.
        assert!(peak <= 23, "[{io}] Threads_connected peaked at {peak}");
        assert_eq!(proxy.pins_started("user_variable"), 0, "[{io}]");
        assert_eq!(proxy.pins_started("unclassified"), 0, "[{io}]");
    }
}

#[test]
fn connector_j_with_server_prepared_statements_and_user_variables() {
    let db = MariaDb::start();
    db.root_sql(
        "CREATE TABLE shop.cj (id BIGINT AUTO_INCREMENT PRIMARY KEY, thread INT, round INT, v INT, \
         who VARCHAR(40) CHARACTER SET utf8mb4, KEY (thread, round)) ENGINE=InnoDB; \
         CREATE TABLE shop.cjb (thread INT, round INT, k INT, KEY (thread, round)) ENGINE=InnoDB",
    );
    for io in DRIVERS {
        db.root_sql("DELETE FROM shop.cj; DELETE FROM shop.cjb");
        let proxy = Proxy::start(&db, io, "max_connections = 8\nmax_idle_connections = 8");
        let out = run_java(
            "ConnectorJ",
            &[proxy.port.to_string(), "64".into(), "5".into()],
        );
        println!("[{io}] Connector/J: {}", out.trim());
        assert_eq!(out.trim(), "OK 1920", "[{io}]");
        let rows = db.root_sql("SELECT COUNT(*), COUNT(DISTINCT thread) FROM shop.cj");
        assert_eq!(rows.trim(), "320\t64", "[{io}]");
        assert_eq!(proxy.pins_started("user_variable"), 0, "[{io}]");
        assert_eq!(proxy.pins_started("unclassified"), 0, "[{io}]");
    }
}
