//! The database misbehaving under dbproxy: a statement that never ends, pooled
//! connections killed from the server, the server refusing new connections. Each gives the client a clean error or nothing at
//! all, and the pool heals by itself.

use mysql::prelude::*;
use proxy_tests::*;
use std::time::Duration;

fn code(e: &mysql::Error) -> Option<u16> {
    match e {
        mysql::Error::MySqlError(e) => Some(e.code),
        _ => None,
    }
}

/// The pool's liveness window (a connection idle longer is checked before it is lent),
/// and a margin for the coarse clock it is read with.
const LIVENESS_WINDOW: Duration = Duration::from_millis(150);

/// The ids `sql` (a query on the server) lists.
fn ids(db: &MariaDb, sql: &str) -> Vec<u64> {
    db.root_sql(sql)
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// Kills the server threads `killed` and waits until each has ended (KILL is
/// asynchronous), then until the pool's liveness window has passed, so that no killed
/// connection is lent unchecked.
fn kill_and_let_the_pool_notice(db: &MariaDb, killed: &[u64]) {
    for id in killed {
        db.root_sql(&format!("KILL CONNECTION {id}"));
    }
    let list: Vec<String> = killed.iter().map(u64::to_string).collect();
    let listed = format!(
        "SELECT ID FROM information_schema.PROCESSLIST WHERE ID IN ({})",
        list.join(",")
    );
    wait_for(|| ids(db, &listed).is_empty(), "the killed threads to end");
    let ended = std::time::Instant::now();
    wait_for(
        || ended.elapsed() > LIVENESS_WINDOW,
        "the liveness window to pass",
    );
}

/// `query_timeout`: a statement waiting on a lock is killed (KILL QUERY) once the
/// database has been silent that long; the client gets the server's 1317, its
/// transaction and connection stay, and what it did before the statement commits.
#[test]
fn query_timeout_kills_the_statement_and_keeps_the_transaction() {
    let db = MariaDb::start();
    db.root_sql("CREATE TABLE shop.faults (n INT PRIMARY KEY, v INT) ENGINE=InnoDB");
    db.root_sql("INSERT INTO shop.faults VALUES (1, 0)");
    for (k, io) in DRIVERS.into_iter().enumerate() {
        let proxy = Proxy::start(&db, io, "query_timeout = \"1s\"");
        // A lock holder straight on the database, so that the statement through dbproxy
        // waits (innodb_lock_wait_timeout is 50 s).
        let mut holder = connect(db.port, "app", DB_PASSWORD, "shop").unwrap();
        holder.query_drop("BEGIN").unwrap();
        holder
            .query_drop("UPDATE faults SET v = v + 1 WHERE n = 1")
            .unwrap();

        let mut c = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        c.query_drop("BEGIN").unwrap();
        c.query_drop(format!("INSERT INTO faults VALUES (2{k}, 0)"))
            .unwrap();
        let e = c
            .query_drop("SELECT v FROM faults WHERE n = 1 FOR UPDATE")
            .expect_err("the locked row cannot be read before the holder ends");
        assert_eq!(code(&e), Some(1317), "[{io}] {e}");
        assert!(proxy.log().contains("query_timeout"), "[{io}]");
        // The same transaction goes on and commits what it did before.
        c.query_drop("COMMIT").unwrap();
        holder.query_drop("ROLLBACK").unwrap();
        let n = db.root_sql(&format!("SELECT COUNT(*) FROM shop.faults WHERE n = 2{k}"));
        assert_eq!(
            n.trim(),
            "1",
            "[{io}] the insert before the killed statement stays"
        );
        // A statement that answers in time is not touched: a slow one that streams.
        let v: Option<i64> = c.query_first("SELECT SLEEP(0.3) + 7").unwrap();
        assert_eq!(v, Some(7), "[{io}]");
    }
}

/// Every pooled connection killed from the server while idle (KILL CONNECTION, as a DBA
/// or `wait_timeout` would): the next statements of idle clients run on new connections
/// without an error. (A connection idle for less than the pool's 100 ms liveness window
/// is lent without the check, as measured for throughput: a kill within that window
/// reaches the client as 9503, as a crash during its statement would.)
#[test]
fn pooled_connections_killed_by_the_server_are_replaced_unseen() {
    let db = MariaDb::start();
    for io in DRIVERS {
        let proxy = Proxy::start(&db, io, "");
        let mut clients: Vec<mysql::Conn> = (0..4)
            .map(|_| connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap())
            .collect();
        let mut pooled = Vec::new();
        for c in &mut clients {
            let id: u64 = c.query_first("SELECT CONNECTION_ID()").unwrap().unwrap();
            pooled.push(id);
        }
        let opened = proxy.metric("dbproxy_database_connections_setup_succeeded_total");
        // Every connection of the database user: the pool's, and the monitor's.
        let killed = ids(
            &db,
            "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = 'app'",
        );
        for id in &pooled {
            assert!(
                killed.contains(id),
                "[{io}] pooled connection {id} not listed: {killed:?}"
            );
        }
        kill_and_let_the_pool_notice(&db, &killed);
        for (i, c) in clients.iter_mut().enumerate() {
            let (v, id): (usize, u64) = c
                .query_first(format!("SELECT {i}, CONNECTION_ID()"))
                .unwrap()
                .unwrap();
            assert_eq!(v, i, "[{io}]");
            assert!(
                !killed.contains(&id),
                "[{io}] served on killed connection {id}"
            );
        }
        let now = proxy.metric("dbproxy_database_connections_setup_succeeded_total");
        assert!(
            now > opened,
            "[{io}] no connection was opened in place of the killed ones"
        );
    }
}

/// The server refusing new connections (its connection limit for the user reached by
/// others, `MAX_USER_CONNECTIONS`: the application's user here holds CONNECTION ADMIN,
/// which lets it past `max_connections`): a client that needs a new database connection
/// gets a clear error naming the cause, and once connections are free again the same
/// client goes on.
#[test]
fn the_servers_connection_limit_gives_a_clear_error_then_heals() {
    let db = MariaDb::start();
    for io in DRIVERS {
        let proxy = Proxy::start(&db, io, "connection_borrow_timeout = \"2s\"");
        let mut c = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        c.query_drop("SELECT 1").unwrap();
        db.root_sql("ALTER USER app WITH MAX_USER_CONNECTIONS 6");
        // Others take every connection the user may have (the monitor holds some).
        let mut hogs = Vec::new();
        for _ in 0..8 {
            match connect(db.port, "app", DB_PASSWORD, "") {
                Ok(o) => hogs.push(o),
                Err(_) => break,
            }
        }
        // The pool's idle connections go (killed), so that a new one is needed.
        let keep: Vec<String> = hogs
            .iter_mut()
            .map(|h| h.connection_id().to_string())
            .collect();
        let pooled = ids(
            &db,
            &format!(
                "SELECT ID FROM information_schema.PROCESSLIST \
                 WHERE USER = 'app' AND ID NOT IN ({}) AND COMMAND <> 'Query'",
                keep.join(",")
            ),
        );
        assert!(!pooled.is_empty(), "[{io}] the pool holds a connection");
        kill_and_let_the_pool_notice(&db, &pooled);
        let e = c
            .query_drop("SELECT 1")
            .expect_err("no database connection can be opened");
        println!("[{io}] at the server's limit: {e}");
        assert!(
            e.to_string().contains("max_user_connections"),
            "[{io}] the error names the cause: {e}"
        );
        drop(hogs);
        db.root_sql("ALTER USER app WITH MAX_USER_CONNECTIONS 0");
        wait_until("the same client to go on", Duration::from_secs(10), || {
            c.query_drop("SELECT 1").is_ok()
        });
    }
}

/// A database that vanishes without a reset (every packet into its network namespace
/// dropped, as a black-holed address during a failover): with the monitor slowed down so
/// that only the connection itself can tell, the statement running there ends with
/// dbproxy's 9503 once TCP keepalive gives up (about 25 s), not after the kernel's 15
/// minutes of retransmissions; the client stays connected.
#[test]
fn a_black_holed_database_is_noticed_by_keepalive() {
    let ns = Netns::create("bh");
    let db = MariaDb::start_in_netns(&ns, &[&format!("--bind-address={}", ns.inside)]);
    for (k, io) in DRIVERS.into_iter().enumerate() {
        // Each driver's statement its own text (the first one may still run on the server).
        let sleep = format!("SELECT SLEEP({})", 600 + k);
        let group = format!(
            "targets = [\"{}:{}\"]\nhealth_check_interval = \"1h\"",
            ns.inside, db.port
        );
        let proxy = Proxy::start_at(db.port, io, "", &group, "");
        let opts = mysql::OptsBuilder::from_opts(
            mysql::Opts::from_url(&url(proxy.port, "app", APP_PASSWORD, "shop")).unwrap(),
        )
        // Only so that a failure here cannot hang the suite.
        .read_timeout(Some(Duration::from_secs(300)));
        let mut c = mysql::Conn::new(opts).unwrap();
        c.query_drop("SELECT 1").unwrap();
        let sql = sleep.clone();
        let running = std::thread::spawn(move || {
            let r = c.query_drop(sql);
            (r, c)
        });
        wait_until("the statement to run", Duration::from_secs(10), || {
            db.root_sql(&format!(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO = '{sleep}'"
            ))
            .trim()
                == "1"
        });
        ns.black_hole();
        let (r, _c) = running.join().unwrap();
        let e = r.expect_err("the vanished database cannot answer");
        println!("[{io}] black-holed: {e}");
        assert_eq!(code(&e), Some(9503), "[{io}] dbproxy's own error: {e}");
        // Lift the black hole for the next driver: a new namespace would need a new server.
        let st = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                "nft",
                "delete",
                "table",
                "inet",
                "blackhole",
            ])
            .status()
            .unwrap();
        assert!(st.success());
    }
}

/// The database resets new connections in the middle of their login, then never answers
/// dbproxy's own statement on new connections (`init_query`): the client gets a clean
/// error each time (no hang, no crash), and once the database behaves again the same
/// session is served.
#[test]
fn a_reset_login_and_a_silent_own_statement_give_clean_errors_then_heal() {
    use proxy_tests::raw::RawClient;
    use proxy_tests::standin::{Auth, Faults, StandIn};
    use std::sync::atomic::Ordering::Relaxed;
    let standin = StandIn::with_faults(
        Auth::Any,
        Faults {
            stall_on: b"SET @dbproxy_init".to_vec(),
            ..Faults::default()
        },
    );
    for io in DRIVERS {
        // No idle connections kept: every statement opens a new one.
        let proxy = Proxy::start_at(
            standin.port,
            io,
            "verify_checkin = false",
            "max_connections = 2\nmax_idle_connections = 0\ninternal_query_timeout = \"1s\"\nconnection_borrow_timeout = \"3s\"\ninit_query = \"SET @dbproxy_init = 1\"",
            "",
        );
        let mut c = RawClient::login(proxy.port, "app", APP_PASSWORD).unwrap();
        c.s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        c.query("DO 1");
        let faults = [
            (
                &standin.faults.reset_login,
                "a reset during the login",
                "reset",
            ),
            (
                &standin.faults.stall,
                "no answer to init_query",
                "internal_query_timeout",
            ),
        ];
        for (fault, what, says) in faults {
            fault.store(true, Relaxed);
            c.write(0, b"\x03DO 1");
            let (_, e) = c
                .try_read()
                .unwrap_or_else(|e| panic!("[{io}] {what}: no answer ({e})"));
            let text = String::from_utf8_lossy(&e);
            assert_eq!(e.first(), Some(&0xff), "[{io}] {what}: {text}");
            assert!(
                text.contains("cannot open a database connection") && text.contains(says),
                "[{io}] {what}: {text}"
            );
            fault.store(false, Relaxed);
            c.query("DO 1");
        }
        assert!(
            proxy.metric("dbproxy_database_connections_setup_failed_total") >= 2,
            "[{io}] failed setups counted"
        );
    }
}
