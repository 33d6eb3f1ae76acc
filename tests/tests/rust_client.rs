//! A Rust connector (the `mysql` crate, default settings) through dbproxy: text and
//! binary protocol, transactions, types and NULLs equal to a direct connection.

use mysql::prelude::*;
use mysql::{Conn, Value};
use proxy_tests::*;

const SETUP: &str = "CREATE TABLE shop.types (
    id INT PRIMARY KEY, ti TINYINT, si SMALLINT UNSIGNED, bi BIGINT, fl FLOAT, db DOUBLE,
    de DECIMAL(12,4), vc VARCHAR(50), tx TEXT, bl BLOB, dt DATE, ts DATETIME(6), tm TIME,
    yr YEAR, bt BIT(8), en ENUM('a','b'), js JSON);
  INSERT INTO shop.types VALUES
    (1, -128, 65535, -9223372036854775808, 1.5, 2.25, 12345678.1234, 'héllo', 'text', x'00ff10',
     '2024-02-29', '2024-02-29 12:34:56.123456', '-838:59:59', 2024, b'10101010', 'b', '{\"k\": [1, 2]}'),
    (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
    (3, 0, 0, 0, 0, 0, 0, '', '', '', '1000-01-01', '1000-01-01 00:00:00', '00:00:00', 1901, b'0', 'a', '[]');";

fn rows_text(c: &mut Conn, sql: &str) -> Vec<Vec<Value>> {
    c.query_iter(sql)
        .unwrap()
        .map(|r| r.unwrap().unwrap())
        .collect()
}

fn rows_binary(c: &mut Conn, sql: &str, params: Vec<Value>) -> Vec<Vec<Value>> {
    let stmt = c.prep(sql).unwrap();
    c.exec_iter(&stmt, params)
        .unwrap()
        .map(|r| r.unwrap().unwrap())
        .collect()
}

#[test]
fn text_and_binary_results_equal_direct() {
    let db = MariaDb::start();
    db.root_sql(SETUP);
    let mut direct = connect(db.port, "app", DB_PASSWORD, "shop").unwrap();
    for io in DRIVERS {
        let proxy = Proxy::start(&db, io, "");
        let mut c = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        let q = "SELECT * FROM types ORDER BY id";
        let t = rows_text(&mut c, q);
        assert_eq!(t.len(), 3);
        assert_eq!(t, rows_text(&mut direct, q), "[{io}] text protocol");
        assert!(t[1][1..].iter().all(|v| *v == Value::NULL));
        let pq =
            "SELECT * FROM types WHERE id >= ? AND (vc = ? OR vc IS NULL OR ? IS NULL) ORDER BY id";
        let params = vec![Value::Int(1), Value::Bytes("héllo".into()), Value::NULL];
        let b = rows_binary(&mut c, pq, params.clone());
        assert_eq!(b.len(), 3);
        assert_eq!(
            b,
            rows_binary(&mut direct, pq, params),
            "[{io}] binary protocol"
        );
        // Many executions of one statement, and a statement closed and re-prepared.
        let stmt = c.prep("SELECT ? + 1").unwrap();
        for i in 0..200i64 {
            let v: Option<i64> = c.exec_first(&stmt, (i,)).unwrap();
            assert_eq!(v, Some(i + 1));
        }
        c.close(stmt).unwrap();
        let v: Option<String> = c.exec_first("SELECT CONCAT(?, ?)", ("a", "b")).unwrap();
        assert_eq!(v.as_deref(), Some("ab"));
        // COM_PING, COM_INIT_DB and COM_RESET_CONNECTION are served.
        c.ping().unwrap();
        c.select_db("shop2").unwrap();
        let d: Option<String> = c.query_first("SELECT DATABASE()").unwrap();
        assert_eq!(d.as_deref(), Some("shop2"));
        c.reset().unwrap();
        let one: Option<i32> = c.query_first("SELECT 1").unwrap();
        assert_eq!(one, Some(1));
    }
}

#[test]
fn transactions_commit_and_rollback() {
    let db = MariaDb::start();
    db.root_sql("CREATE TABLE shop.tx (id INT PRIMARY KEY) ENGINE=InnoDB");
    for io in DRIVERS {
        db.root_sql("DELETE FROM shop.tx");
        let proxy = Proxy::start(&db, io, "");
        let mut c = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        let mut t = c.start_transaction(mysql::TxOpts::default()).unwrap();
        t.query_drop("INSERT INTO tx VALUES (1), (2)").unwrap();
        t.rollback().unwrap();
        assert_eq!(
            db.root_sql("SELECT COUNT(*) FROM shop.tx").trim(),
            "0",
            "[{io}] rolled back"
        );
        let mut t = c.start_transaction(mysql::TxOpts::default()).unwrap();
        t.exec_drop("INSERT INTO tx VALUES (?)", (3,)).unwrap();
        // Not visible to others before the commit.
        assert_eq!(db.root_sql("SELECT COUNT(*) FROM shop.tx").trim(), "0");
        t.commit().unwrap();
        assert_eq!(
            db.root_sql("SELECT COUNT(*) FROM shop.tx").trim(),
            "1",
            "[{io}] committed"
        );
        // A client that leaves with an open transaction has it rolled back.
        c.query_drop("BEGIN").unwrap();
        c.query_drop("INSERT INTO tx VALUES (4)").unwrap();
        drop(c);
        let mut c2 = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        let n: Option<i64> = c2.query_first("SELECT COUNT(*) FROM tx").unwrap();
        assert_eq!(n, Some(1), "[{io}] abandoned transaction rolled back");
    }
}

#[test]
fn login_plugins_and_wrong_password() {
    let db = MariaDb::start();
    for io in DRIVERS {
        let proxy = Proxy::start(&db, io, "");
        for (user, pw) in [
            ("app", APP_PASSWORD),
            ("sha2user", "sha2-secret"),
            ("nativeuser", "native-secret"),
        ] {
            let mut c = connect(proxy.port, user, pw, "shop")
                .unwrap_or_else(|e| panic!("[{io}] {user}: {e}"));
            let who: Option<String> = c.query_first("SELECT CURRENT_USER()").unwrap();
            assert_eq!(
                who.as_deref(),
                Some("app@%"),
                "[{io}] {user} uses the backend user"
            );
        }
        for (user, pw) in [("app", "nope"), ("sha2user", "nope"), ("ghost", "nope")] {
            match connect(proxy.port, user, pw, "") {
                Err(mysql::Error::MySqlError(e)) => {
                    assert_eq!(e.code, 1045, "[{io}] {user}");
                    assert_eq!(e.state, "28000");
                }
                other => panic!("[{io}] {user} expected 1045, got {:?}", other.map(|_| ())),
            }
        }
    }
}

#[test]
fn change_user_is_authenticated_by_the_proxy() {
    let db = MariaDb::start();
    for io in DRIVERS {
        let proxy = Proxy::start(&db, io, "");
        let mut c = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        c.query_drop("SET @marker = 42").unwrap();
        let opts = mysql::ChangeUserOpts::default()
            .with_user(Some("nativeuser".into()))
            .with_pass(Some("native-secret".into()))
            .with_db_name(Some("shop2".into()));
        c.change_user(opts).unwrap();
        let (d, m): (Option<String>, Option<i64>) = c
            .query_first("SELECT DATABASE(), @marker")
            .unwrap()
            .unwrap();
        assert_eq!(d.as_deref(), Some("shop2"), "[{io}]");
        assert_eq!(
            m, None,
            "[{io}] session state does not survive a change of user"
        );
        let bad = mysql::ChangeUserOpts::default()
            .with_user(Some("app".into()))
            .with_pass(Some("wrong".into()));
        match c.change_user(bad) {
            Err(mysql::Error::MySqlError(e)) => {
                assert_eq!(e.code, 1045, "[{io}] wrong password refused: {e}")
            }
            other => panic!("[{io}] a wrong password must get 1045: {other:?}"),
        }
    }
}
