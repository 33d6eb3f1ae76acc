//! Differential test of session isolation: two identical MariaDB servers, one reached
//! directly and one through dbproxy with 8 backend connections. Sixteen clients run random
//! session statements (system and user variables, schema, SET NAMES, temporary tables,
//! transactions, named locks, warnings, ROW_COUNT(), FOUND_ROWS(), LAST_INSERT_ID(),
//! prepared statements bound to a schema, one-shots), interleaved at random, each statement
//! sent to both; every answer (rows, error code, affected rows, insert id, warning count)
//! must be equal. dbproxy runs with its check-in verification on.

use mysql::prelude::*;
use mysql::{Conn, Statement, Value};
use proxy_tests::*;

/// Steps per seed and the seeds, per io driver.
const STEPS: usize = 10_000;
const SEEDS: [u64; 3] = [0x5eed_0001, 0xdead_beef, 0x0123_4567_89ab];
const CLIENTS: usize = 16;
/// Clients that may be pinned at once (a transaction or a named lock); two more hold
/// temporary tables for good. The proxy has 8 backend connections.
const MAX_PINNED: usize = 3;

/// What the test knows of a client, to keep the number of pinned clients bounded.
#[derive(Default)]
struct Client {
    in_tx: bool,
    lock: bool,
    temp: bool,
}

/// One side of a client: its connection and the statements it prepared.
struct Side {
    conn: Conn,
    stmts: Vec<Statement>,
}

/// What a client sees of one statement.
#[derive(Debug, PartialEq)]
enum Answer {
    Rows {
        rows: Vec<Vec<String>>,
        affected: u64,
        insert_id: u64,
        warnings: u16,
    },
    Error(u16),
}

fn show(v: &Value) -> String {
    match v {
        Value::Bytes(b) => format!("'{}'", String::from_utf8_lossy(b)),
        other => format!("{other:?}"),
    }
}

fn answer<T: Into<mysql::Result<Vec<mysql::Row>>>>(conn: &Conn, r: T) -> Answer {
    match r.into() {
        Ok(rows) => Answer::Rows {
            rows: rows
                .into_iter()
                .map(|r| r.unwrap().iter().map(show).collect())
                .collect(),
            affected: conn.affected_rows(),
            insert_id: conn.last_insert_id(),
            warnings: conn.warnings(),
        },
        Err(mysql::Error::MySqlError(e)) => Answer::Error(e.code),
        Err(e) => panic!("not a server error: {e}"),
    }
}

/// A step: a text statement, or preparing / executing a statement.
enum Step {
    Query(String),
    Prepare(String),
    Execute(usize, Vec<Value>),
    /// COM_RESET_CONNECTION (the mysql crate's `reset`): the session starts over.
    Reset,
}

fn run(side: &mut Side, step: &Step) -> Answer {
    match step {
        Step::Query(sql) => {
            let r = side.conn.query::<mysql::Row, _>(sql.as_str());
            answer(&side.conn, r)
        }
        Step::Prepare(sql) => match side.conn.prep(sql.as_str()) {
            Ok(s) => {
                side.stmts.push(s);
                Answer::Rows {
                    rows: vec![],
                    affected: 0,
                    insert_id: 0,
                    warnings: 0,
                }
            }
            Err(mysql::Error::MySqlError(e)) => Answer::Error(e.code),
            Err(e) => panic!("prepare: {e}"),
        },
        Step::Execute(k, params) => {
            let s = side.stmts[*k].clone();
            let params: Vec<Value> = params
                .iter()
                .take(usize::from(s.num_params()))
                .cloned()
                .collect();
            let r = side.conn.exec::<mysql::Row, _, _>(&s, params);
            answer(&side.conn, r)
        }
        Step::Reset => {
            side.conn.reset().expect("COM_RESET_CONNECTION");
            side.stmts.clear();
            Answer::Rows {
                rows: vec![],
                affected: side.conn.affected_rows(),
                insert_id: side.conn.last_insert_id(),
                warnings: side.conn.warnings(),
            }
        }
    }
}

/// The next statement for client `i`.
fn generate(
    rng: &mut Rng,
    i: usize,
    c: &mut Client,
    pinned: usize,
    prepared: usize,
    n: u64,
) -> Step {
    let q = |s: String| Step::Query(s);
    loop {
        let step = match rng.below(41) {
            // Every way to name a session variable; MariaDB tracks some of them only.
            0 => q(format!(
                "SET {}sql_mode = '{}'",
                rng.pick(&["SESSION ", "", "@@", "@@session.", "LOCAL "]),
                rng.pick(&[
                    "",
                    "ANSI_QUOTES",
                    "STRICT_TRANS_TABLES,ERROR_FOR_DIVISION_BY_ZERO",
                    "PIPES_AS_CONCAT,NO_BACKSLASH_ESCAPES",
                ])
            )),
            1 => q(format!(
                "SET {}time_zone = '+0{}:00'",
                rng.pick(&["", "@@", "@@local."]),
                rng.below(9)
            )),
            2 => q(rng
                .pick(&[
                    "SET NAMES latin1",
                    "SET NAMES utf8mb4",
                    "SET NAMES utf8mb4 COLLATE utf8mb4_unicode_ci",
                    // Variables that change others the server does not report.
                    "SET collation_connection = latin1_bin",
                    "SET character_set_connection = utf8mb3",
                    "SET storage_engine = MEMORY",
                    "SET default_storage_engine = Aria",
                    "SET max_join_size = 1000000",
                    "SET sql_big_selects = 1",
                ])
                .into()),
            3 => q(
                "SELECT @@sql_mode, @@time_zone, @@character_set_client, @@collation_connection, \
                    @@character_set_connection, @@character_set_results, @@storage_engine, \
                    @@default_storage_engine, @@max_join_size, @@sql_big_selects"
                    .into(),
            ),
            4 => q(format!("USE {}", rng.pick(&["d1", "d2"]))),
            5 => q("SELECT DATABASE()".into()),
            6 => q(format!("SET @a = {}", rng.below(1000) as i64 - 500)),
            7 => q(format!("SET @b = {}.{:02}", rng.below(100), rng.below(100))),
            8 => q(format!("SET @c = _utf8mb4'grüße-{i}-{n}', @d = NULL")),
            9 => q(format!("SELECT @e := {} + {i}", rng.below(100))),
            10 => q(format!("SELECT {} INTO @f", rng.below(100))),
            11 => q("SELECT @a, @b, @c, @d, @e, @f, @p, @a + 1, CHARSET(@c)".into()),
            12 if i < 2 => {
                c.temp = true;
                q(format!(
                    "CREATE TEMPORARY TABLE IF NOT EXISTS d1.tmp{i} (x INT)"
                ))
            }
            13 if c.temp => q(format!("INSERT INTO d1.tmp{i} VALUES ({n})")),
            14 if c.temp => q(format!("SELECT COUNT(*), SUM(x) FROM d1.tmp{i}")),
            15 if !c.in_tx && !c.lock && pinned < MAX_PINNED => {
                c.in_tx = true;
                q("BEGIN".into())
            }
            16 if c.in_tx => {
                c.in_tx = false;
                q(rng.pick(&["COMMIT", "ROLLBACK"]).into())
            }
            17 => q(format!(
                "INSERT INTO d1.t{i} (v) VALUES ({})",
                rng.below(50)
            )),
            18 => q(format!(
                "UPDATE d1.t{i} SET v = v + 1 WHERE v < {}",
                rng.below(60)
            )),
            19 => q(format!(
                "SELECT v FROM d1.t{i} ORDER BY id LIMIT {}",
                rng.pick(&["2", "1, 2", "1 OFFSET 3", "50, 1"])
            )),
            20 => q(format!(
                "SELECT SQL_CALC_FOUND_ROWS v FROM d1.t{i} ORDER BY id LIMIT 1"
            )),
            21 => q(rng
                .pick(&[
                    "SELECT FOUND_ROWS()",
                    "SELECT ROW_COUNT()",
                    "SELECT ROW_COUNT(), FOUND_ROWS() AS f",
                ])
                .into()),
            22 if !c.lock && !c.in_tx && pinned < MAX_PINNED => {
                c.lock = true;
                q(format!("SELECT GET_LOCK('lk{i}', 0)"))
            }
            23 if c.lock => {
                c.lock = false;
                q(format!("SELECT RELEASE_LOCK('lk{i}')"))
            }
            24 => q(format!("SELECT IS_FREE_LOCK('lk{i}')")),
            25 => q(format!("SELECT CAST('w{i}-{n}' AS INT)")),
            26 => q(rng
                .pick(&[
                    "SELECT 1/0",
                    "SELECT nosuchcolumn",
                    "DROP TABLE IF EXISTS d1.nosuch",
                ])
                .into()),
            27 => q(rng
                .pick(&[
                    "SHOW WARNINGS",
                    "SHOW ERRORS",
                    "SELECT @@warning_count, @@error_count",
                    "SHOW COUNT(*) WARNINGS",
                    "SHOW WARNINGS LIMIT 1",
                ])
                .into()),
            28 => q(rng
                .pick(&["SELECT 1", "SELECT * FROM d1.orders WHERE 0", "DO 1"])
                .into()),
            29 => q(format!("INSERT INTO d1.ai (client) VALUES ({i})")),
            30 => q(format!(
                "INSERT INTO d1.ai (id, client) VALUES ({}, {i})",
                1_000_000 + n * 20 + i as u64
            )),
            31 => q(rng
                .pick(&[
                    "SELECT LAST_INSERT_ID()",
                    "SELECT LAST_INSERT_ID(7)",
                    "SELECT @@identity",
                ])
                .into()),
            32 => Step::Prepare(match rng.below(8) {
                0 => "SELECT owner FROM orders WHERE id = ?".into(),
                1 => "SET @p = ?".into(),
                2 => "SELECT @p, @a, DATABASE()".into(),
                // Readers of per-statement state, answered in the binary protocol.
                3 => "SELECT ROW_COUNT(), FOUND_ROWS() AS f".into(),
                4 => "SHOW WARNINGS".into(),
                5 => "SHOW COUNT(*) WARNINGS".into(),
                6 => "SELECT @@warning_count, @@error_count".into(),
                _ => format!("INSERT INTO d1.t{i} (v) VALUES (?)"),
            }),

            33 | 34 if prepared > 0 => {
                let k = rng.below(prepared as u64) as usize;
                // Every prepared statement takes at most one parameter.
                Step::Execute(k, vec![Value::Int((rng.below(3) + 1) as i64)])
            }
            35 if !c.in_tx => q(rng
                .pick(&[
                    "SET TRANSACTION READ ONLY",
                    "SET TRANSACTION ISOLATION LEVEL READ COMMITTED",
                    // MariaDB 10.11: the next transaction only, like SET TRANSACTION.
                    "SET @@tx_read_only = 1",
                    "SET @@tx_isolation = 'READ-COMMITTED'",
                ])
                .into()),
            36 if !c.in_tx && pinned < MAX_PINNED => {
                // A transaction whose write shows whether it is read only.
                c.in_tx = true;
                q("START TRANSACTION".into())
            }
            37 => q(format!("SET insert_id = {}", 2_000_000 + n * 20 + i as u64)),
            38 => q("GET DIAGNOSTICS @dn = NUMBER, @dr = ROW_COUNT".into()),
            39 => q("SELECT @dn, @dr".into()),
            // Rarely: everything the client had is gone, on both sides.
            40 if rng.below(4) == 0 => {
                *c = Client::default();
                Step::Reset
            }
            _ => continue,
        };
        return step;
    }
}

fn setup(db: &MariaDb) {
    db.root_sql(
        "CREATE DATABASE IF NOT EXISTS d1; CREATE DATABASE IF NOT EXISTS d2; \
         CREATE TABLE d1.orders (id INT PRIMARY KEY, owner VARCHAR(20)) ENGINE=InnoDB; \
         CREATE TABLE d2.orders (id INT PRIMARY KEY, owner VARCHAR(20)) ENGINE=InnoDB; \
         INSERT INTO d1.orders VALUES (1, 'd1-one'), (2, 'd1-two'), (3, 'd1-three'); \
         INSERT INTO d2.orders VALUES (1, 'd2-one'), (2, 'd2-two'), (3, 'd2-three'); \
         CREATE TABLE d1.ai (id BIGINT AUTO_INCREMENT PRIMARY KEY, client INT) ENGINE=InnoDB;",
    );
    // A table per client: clients in transactions never wait on each other's row locks.
    let tables: Vec<String> = (0..CLIENTS)
        .map(|i| {
            format!("CREATE TABLE d1.t{i} (id INT AUTO_INCREMENT PRIMARY KEY, v INT) ENGINE=InnoDB")
        })
        .collect();
    db.root_sql(&tables.join("; "));
}

fn opts(port: u16, password: &str) -> mysql::Opts {
    mysql::OptsBuilder::new()
        .ip_or_hostname(Some("127.0.0.1"))
        .tcp_port(port)
        .user(Some("app"))
        .pass(Some(password))
        .db_name(Some("d1"))
        .prefer_socket(false)
        .stmt_cache_size(Some(0))
        .into()
}

#[test]
fn sixteen_clients_answer_as_if_each_had_its_own_connection() {
    // A lock wait is a bug in this test (clients touch disjoint rows): fail fast if one
    // happens rather than wait 50 s.
    let direct = MariaDb::start_with(&["--innodb-lock-wait-timeout=3"]);
    let proxied = MariaDb::start_with(&["--innodb-lock-wait-timeout=3"]);
    setup(&direct);
    setup(&proxied);
    for io in DRIVERS {
        let proxy = Proxy::start(
            &proxied,
            io,
            "max_connections = 8\nmax_idle_connections = 8\nconnection_borrow_timeout = \"10s\"",
        );
        for seed in SEEDS {
            let mut rng = Rng(seed);
            let mut sides: Vec<(Side, Side)> = (0..CLIENTS)
                .map(|_| {
                    (
                        Side {
                            conn: Conn::new(opts(direct.port, DB_PASSWORD)).unwrap(),
                            stmts: Vec::new(),
                        },
                        Side {
                            conn: Conn::new(opts(proxy.port, APP_PASSWORD)).unwrap(),
                            stmts: Vec::new(),
                        },
                    )
                })
                .collect();
            let mut clients: Vec<Client> = (0..CLIENTS).map(|_| Client::default()).collect();
            let mut history: Vec<(usize, String)> = Vec::new();
            for n in 0..STEPS {
                let i = rng.below(CLIENTS as u64) as usize;
                let pinned = clients.iter().filter(|c| c.in_tx || c.lock).count();
                let prepared = sides[i].0.stmts.len();
                let step = generate(&mut rng, i, &mut clients[i], pinned, prepared, n as u64);
                let text = match &step {
                    Step::Query(s) => s.clone(),
                    Step::Prepare(s) => format!("PREPARE {s}"),
                    Step::Execute(k, p) => format!("EXECUTE #{k} {p:?}"),
                    Step::Reset => "COM_RESET_CONNECTION".into(),
                };
                history.push((i, text.clone()));
                let (d, p) = &mut sides[i];
                let want = run(d, &step);
                let got = run(p, &step);
                if want != got {
                    let pinned: Vec<String> = proxy
                        .metrics()
                        .lines()
                        .filter(|l| {
                            (l.starts_with("dbproxy_pinned_clients")
                                || l.starts_with("dbproxy_backend_conn"))
                                && !l.ends_with(" 0")
                        })
                        .map(String::from)
                        .collect();
                    panic!(
                        "[{io}] seed {seed:#x} step {n}, client {i}: {text}\n  direct: {want:?}\n  dbproxy: {got:?}\n{}\npinned now:\n{}",
                        divergence_report(&history, i, "dbproxy-differential-failure.tsv"),
                        pinned.join("\n")
                    );
                }
            }
            // Close every client in a clean state (their connections are checked in then).
            for (i, c) in clients.iter().enumerate() {
                if c.in_tx {
                    sides[i].1.conn.query_drop("ROLLBACK").unwrap();
                }
                if c.lock {
                    sides[i]
                        .1
                        .conn
                        .query_drop("DO RELEASE_ALL_LOCKS()")
                        .unwrap();
                }
            }
            drop(sides);
            println!("[{io}] seed {seed:#x}: {STEPS} steps, every answer equal");
        }
        let (verified, violations) = proxy.checkin_verification();
        println!("[{io}] check-ins verified {verified}, dirty {violations}");
        assert!(verified > 1000, "[{io}] the verification ran ({verified})");
        assert_eq!(violations, 0, "[{io}]");
        let metrics = proxy.metrics();
        for reason in ["user_variable", "unclassified"] {
            assert_eq!(
                proxy.pins_started(reason),
                0,
                "[{io}] {reason} pins:\n{metrics}"
            );
        }
    }
}

/// A new client's first look at its per-statement state, and again after
/// COM_RESET_CONNECTION, is what a new connection of its own to the server shows, even
/// on a backend connection another client just used: ROW_COUNT() 0 (not -1), and no
/// warnings or insert id of the other client. (A new server connection's FOUND_ROWS() is
/// whatever its cached thread last counted, another client's: dbproxy gives 0 instead.)
#[test]
fn a_new_and_a_reset_session_read_their_counts_as_on_the_server() {
    let db = MariaDb::start();
    db.root_sql("CREATE TABLE shop.r (id INT AUTO_INCREMENT PRIMARY KEY, n INT)");
    const COUNTS: &str =
        "SELECT ROW_COUNT(), LAST_INSERT_ID(), @@warning_count, @@error_count, FOUND_ROWS()";
    for io in DRIVERS {
        let proxy = Proxy::start(&db, io, "max_connections = 1");
        let mut other = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        let mut seen = Vec::new();
        for (port, password) in [(db.port, DB_PASSWORD), (proxy.port, APP_PASSWORD)] {
            // Another client leaves counts, an insert id and warnings on the connection.
            other
                .query_drop("INSERT INTO r (n) VALUES (1), (2), (3)")
                .unwrap();
            other.query_drop("SELECT 1/0, 2/0").unwrap();
            let mut c = proxy_tests::raw::RawClient::login(port, "app", password).unwrap();
            let fresh = c.select_row(COUNTS);
            c.query("USE shop");
            c.select_row("SELECT COUNT(*) FROM r WHERE n < 3");
            c.query("UPDATE r SET n = n WHERE id < 0");
            c.select_row("SELECT 1/0");
            c.reset_connection();
            let reset = c.select_row(COUNTS);
            seen.push((fresh, reset));
        }
        let (direct, proxied) = (&seen[0], &seen[1]);
        let first = |v: &[Option<String>]| v[..4].to_vec();
        assert_eq!(first(&proxied.0), first(&direct.0), "[{io}] a new session");
        assert_eq!(
            proxied.0[4].as_deref(),
            Some("0"),
            "[{io}] FOUND_ROWS() of a new session"
        );
        assert_eq!(proxied.1, direct.1, "[{io}] after COM_RESET_CONNECTION");
        assert_eq!(
            proxied.0[0].as_deref(),
            Some("0"),
            "[{io}] ROW_COUNT() of a new session"
        );
    }
}
