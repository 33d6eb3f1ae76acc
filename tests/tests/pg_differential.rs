//! Differential test of PostgreSQL session isolation: two identical PostgreSQL servers,
//! one reached directly and one through dbproxy with 8 server connections. Sixteen
//! clients (tokio-postgres) run random session statements, interleaved at random, each
//! sent to both: SET / RESET / SET LOCAL / set_config / SET ROLE / DISCARD ALL, protocol
//! prepared statements (closed at random, and pipelined, errors included), SQL
//! PREPARE / EXECUTE / DEALLOCATE, transactions with savepoints, multi-statement queries
//! failing halfway, session and transaction advisory locks, temporary tables,
//! LISTEN / NOTIFY, cursors (WITH HOLD too), and COPY in and out. Every answer (rows,
//! row counts, error codes and messages, notices, notifications) must be equal. dbproxy
//! runs with its check-in verifier on.

use futures_util::{SinkExt, StreamExt};
use proxy_tests::pg::{conninfo, group, PgDb};
use proxy_tests::{divergence_report, Proxy, Rng, APP_PASSWORD, DB_PASSWORD, DRIVERS};
use std::fmt::Write;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio_postgres::{AsyncMessage, Client, NoTls, SimpleQueryMessage, Statement};

const STEPS: usize = 10_000;
const SEEDS: [u64; 3] = [0x5eed_0026, 0xfeed_f00d, 0x0123_4567_89ab];
const CLIENTS: usize = 16;
/// Clients 0..PINNERS may do what pins (LISTEN, session advisory locks, temporary
/// tables, cursors WITH HOLD): each holds a server connection to its end.
const PINNERS: usize = 3;
/// Other clients' transactions open at once (with the pinners, fewer than the 8 server
/// connections: a client that waits for one would wait for ever in this sequential test).
const MAX_TX: usize = 3;

/// One side of a client: its connection, the statements it prepared, and what the
/// server sent it unasked.
struct Side {
    client: Client,
    stmts: Vec<Statement>,
    notices: UnboundedReceiver<String>,
    notifications: UnboundedReceiver<String>,
}

async fn connect(port: u16, password: &str) -> Side {
    let (client, mut connection) =
        tokio_postgres::connect(&conninfo(port, "app", password, "shop"), NoTls)
            .await
            .unwrap();
    let (notice_tx, notices) = unbounded_channel();
    let (notify_tx, notifications) = unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(m) = messages.next().await {
            let m = match m {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("connection to port {port} ends: {e}");
                    break;
                }
            };
            match m {
                AsyncMessage::Notice(n) => {
                    let _ = notice_tx.send(format!(
                        "notice {} {}: {}",
                        n.severity(),
                        n.code().code(),
                        n.message()
                    ));
                }
                AsyncMessage::Notification(n) => {
                    let _ = notify_tx.send(format!("{}: {}", n.channel(), n.payload()));
                }
                _ => {}
            }
        }
    });
    Side {
        client,
        stmts: Vec::new(),
        notices,
        notifications,
    }
}

/// What the test knows of a client, to keep the number of held connections bounded.
#[derive(Default, Clone, Copy)]
struct Model {
    in_tx: bool,
    /// In a read-only transaction: no COPY FROM (tokio-postgres loses its connection when
    /// a COPY FROM fails before the data, directly as through dbproxy).
    read_only: bool,
}

/// A step of a client.
#[derive(Debug, Clone)]
enum Step {
    /// A simple-protocol query (one or more statements).
    Simple(String),
    /// A protocol prepared statement (Parse, Describe, Sync).
    Prepare(String),
    /// Bind and Execute of prepared statement `k` with this parameter, for each of its
    /// parameters.
    Execute(usize, i32),
    /// Drops statement `k` (tokio-postgres sends Close with the next request).
    Close(usize),
    /// Several executions written before any answer is read.
    Pipeline(Vec<(usize, i32)>),
    /// `COPY ... TO STDOUT`.
    CopyOut(String),
    /// `COPY ... FROM STDIN` with these bytes.
    CopyIn(String, String),
    /// A round trip, then the notifications that came.
    Notifications,
}

fn error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!(
            "error {} {}: {}",
            d.severity(),
            d.code().code(),
            statement_names_alike(d.message())
        ),
        None => format!("not a server error: {e}"),
    }
}

/// tokio-postgres names statements `s<n>` from one counter for the whole process, so the
/// two sides' names differ: `"s12"` reads `"s#"`.
fn statement_names_alike(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("\"s") {
        let (head, tail) = rest.split_at(at + 2);
        out.push_str(head);
        let digits = tail.bytes().take_while(u8::is_ascii_digit).count();
        if digits > 0 && tail[digits..].starts_with('"') {
            out.push('#');
            rest = &tail[digits..];
        } else {
            rest = tail;
        }
    }
    out.push_str(rest);
    out
}

/// What a client sees of a step, line by line.
async fn run(side: &mut Side, step: &Step) -> Vec<String> {
    let mut out = Vec::new();
    match step {
        Step::Simple(sql) => match side.client.simple_query(sql).await {
            Ok(msgs) => {
                for m in msgs {
                    match m {
                        SimpleQueryMessage::Row(r) => {
                            let mut line = String::from("row");
                            for k in 0..r.len() {
                                let _ = write!(line, " {:?}", r.get(k));
                            }
                            out.push(line);
                        }
                        SimpleQueryMessage::CommandComplete(n) => out.push(format!("done {n}")),
                        _ => {}
                    }
                }
            }
            Err(e) => out.push(error_text(&e)),
        },
        Step::Prepare(sql) => match side.client.prepare(sql).await {
            Ok(s) => {
                out.push(format!("prepared {:?} {}", s.params(), s.columns().len()));
                side.stmts.push(s);
            }
            Err(e) => out.push(error_text(&e)),
        },
        Step::Execute(k, p) => out.extend(execute(side, *k, *p).await),
        Step::Close(k) => {
            side.stmts.remove(*k);
            out.push("closed".into());
        }
        Step::Pipeline(runs) => {
            let futures = runs.iter().map(|&(k, p)| {
                let s = side.stmts[k].clone();
                let client = &side.client;
                async move {
                    let text = p.to_string();
                    rows(client.query(&s, &bind(&s, &p, &text)).await)
                }
            });
            for answer in futures_util::future::join_all(futures).await {
                out.extend(answer);
            }
        }
        Step::CopyOut(sql) => match side.client.copy_out(sql.as_str()).await {
            Ok(stream) => {
                let chunks: Vec<Result<bytes::Bytes, _>> = stream.collect().await;
                let mut data = Vec::new();
                for c in chunks {
                    match c {
                        Ok(b) => data.extend_from_slice(&b),
                        Err(e) => out.push(error_text(&e)),
                    }
                }
                out.push(format!("copied out {:?}", String::from_utf8_lossy(&data)));
            }
            Err(e) => out.push(error_text(&e)),
        },
        Step::CopyIn(sql, data) => match side.client.copy_in(sql.as_str()).await {
            Ok(sink) => {
                let mut sink = Box::pin(sink);
                let sent = sink
                    .send(bytes::Bytes::copy_from_slice(data.as_bytes()))
                    .await;
                match sent {
                    Ok(()) => match sink.as_mut().finish().await {
                        Ok(n) => out.push(format!("copied in {n}")),
                        Err(e) => out.push(error_text(&e)),
                    },
                    Err(e) => out.push(error_text(&e)),
                }
            }
            Err(e) => out.push(error_text(&e)),
        },
        Step::Notifications => {
            // A round trip (in a failed transaction, its error).
            if let Err(e) = side.client.simple_query("SELECT 1").await {
                out.push(error_text(&e));
            }
            while let Ok(n) = side.notifications.try_recv() {
                out.push(format!("notification {n}"));
            }
        }
    }
    while let Ok(n) = side.notices.try_recv() {
        out.push(n);
    }
    out
}

async fn execute(side: &Side, k: usize, p: i32) -> Vec<String> {
    let s = &side.stmts[k];
    let text = p.to_string();
    rows(side.client.query(s, &bind(s, &p, &text)).await)
}

/// `p` for each of a statement's parameters, as an int4 or as text.
fn bind<'a>(
    s: &Statement,
    p: &'a i32,
    text: &'a String,
) -> Vec<&'a (dyn tokio_postgres::types::ToSql + Sync)> {
    s.params()
        .iter()
        .map(|t| {
            if *t == tokio_postgres::types::Type::TEXT {
                text as _
            } else {
                p as _
            }
        })
        .collect()
}

fn rows(r: Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>) -> Vec<String> {
    match r {
        Ok(rows) => rows
            .iter()
            .map(|r| {
                let mut line = String::from("row");
                for k in 0..r.len() {
                    let v: Option<String> = r.get(k);
                    let _ = write!(line, " {v:?}");
                }
                line
            })
            .chain(std::iter::once(format!("{} rows", rows.len())))
            .collect(),
        Err(e) => vec![error_text(&e)],
    }
}

/// The settings a client reads back. A custom setting's placeholder, once defined on a
/// server connection, stays defined there (PostgreSQL cannot drop it): a client that never
/// set `myapp.tenant` may read '' where a connection of its own gives NULL (see the
/// README's known limits), so it reads the two alike.
const READ_SETTINGS: &str = "SELECT current_setting('search_path'), current_setting('TimeZone'), \
     current_setting('statement_timeout'), current_setting('application_name'), \
     coalesce(current_setting('myapp.tenant', true), ''), current_setting('work_mem'), \
     current_setting('DateStyle'), current_user, session_user, \
     current_setting('transaction_isolation'), current_setting('lock_timeout')";

/// The next step of client `i`. `in_tx`: clients other than the pinners in a
/// transaction now.
fn generate(rng: &mut Rng, i: usize, m: &mut Model, in_tx: usize, prepared: usize, n: u64) -> Step {
    let q = |s: String| Step::Simple(s);
    let pinner = i < PINNERS;
    let other_pinner = rng.below(PINNERS as u64);
    loop {
        let step = match rng.below(46) {
            0 => q(format!(
                "SET {}search_path = {}",
                rng.pick(&["", "SESSION "]),
                rng.pick(&["d1", "d2", "d1, public", "\"$user\", public", "d2, d1"])
            )),
            1 => q(format!(
                "SET TimeZone = '{}'",
                rng.pick(&["UTC", "Europe/Paris", "Asia/Tokyo", "America/New_York"])
            )),
            2 => q(format!("SET statement_timeout = {}", 10_000 + rng.below(5) * 1_007)),
            3 => q(format!("SET application_name = 'c{i}-{}'", rng.below(3))),
            4 => q(format!("SET myapp.tenant = 't{i}-{n}'")),
            5 => q(format!(
                "SELECT set_config('{}', '{}', {})",
                rng.pick(&["myapp.tenant", "work_mem", "search_path", "lock_timeout"]),
                rng.pick(&["d2", "8MB", "12345", "d1, public"]),
                rng.pick(&["false", "true"])
            )),
            6 => q(rng
                .pick(&[
                    "SET work_mem = '6MB'",
                    "SET DateStyle = 'SQL, DMY'",
                    "SET DateStyle = ISO",
                    "SET lock_timeout = '3s'",
                    "SET LOCAL work_mem = '9MB'",
                    "SET LOCAL search_path = d2",
                    "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ",
                ])
                .into()),
            7 => q(rng
                .pick(&["SET ROLE r0", "SET ROLE r1", "RESET ROLE", "SET ROLE NONE"])
                .into()),
            8 => q(rng
                .pick(&[
                    "RESET search_path",
                    "RESET ALL",
                    "RESET myapp.tenant",
                    "RESET TimeZone",
                    "RESET SESSION AUTHORIZATION",
                ])
                .into()),
            9 | 10 => q(READ_SETTINGS.into()),
            11 if !m.in_tx && rng.below(3) == 0 => q("DISCARD ALL".into()),
            12 if !m.in_tx && (pinner || in_tx < MAX_TX) => {
                m.in_tx = true;
                let begin = rng.pick(&[
                    "BEGIN",
                    "BEGIN ISOLATION LEVEL REPEATABLE READ",
                    "START TRANSACTION READ ONLY",
                ]);
                m.read_only = begin.ends_with("ONLY");
                q(begin.into())
            }
            13 if m.in_tx => {
                m.in_tx = false;
                m.read_only = false;
                q(rng.pick(&["COMMIT", "ROLLBACK", "END", "ABORT"]).into())
            }
            14 => q(rng
                .pick(&[
                    "SAVEPOINT sp",
                    "ROLLBACK TO SAVEPOINT sp",
                    "RELEASE SAVEPOINT sp",
                    "SAVEPOINT sp2",
                    "ROLLBACK TO sp2",
                ])
                .into()),
            15 => q(format!("INSERT INTO public.t{i} (v) VALUES ({})", rng.below(50))),
            16 => q(format!(
                "UPDATE public.t{i} SET v = v + 1 WHERE v < {}",
                rng.below(60)
            )),
            17 => q(format!(
                "SELECT count(*), coalesce(sum(v), 0) FROM public.t{i}"
            )),
            18 => q("SELECT owner FROM orders WHERE id = 2".into()),
            19 => q(rng
                .pick(&[
                    "SELECT 1/0",
                    "SELECT nosuchcolumn",
                    "SELEC 1",
                    "DROP TABLE IF EXISTS nosuch",
                    "COMMIT",
                    "SELECT 1; SELECT 1/0; SELECT 2",
                    "SELECT 1; SELECT 2",
                    "DO $$ BEGIN RAISE NOTICE 'hello %', current_setting('search_path'); END $$",
                    "SELECT pg_sleep(0)",
                ])
                .into()),
            20 | 21 => Step::Prepare(match rng.below(7) {
                0 => "SELECT owner FROM orders WHERE id = $1::int".into(),
                1 => "SELECT current_setting('search_path') || $1::text".into(),
                2 => "SELECT ($1::int / (3 - $1::int))::text".into(),
                3 => format!("INSERT INTO public.t{i} (v) VALUES ($1::int)"),
                4 => format!("SELECT count(*)::text FROM public.t{i} WHERE v > $1::int"),
                5 => "SELECT coalesce(current_setting('myapp.tenant', true), '') || $1::text".into(),
                _ => "SELECT nosuch FROM orders WHERE id = $1::int".into(),
            }),
            22..=24 if prepared > 0 => {
                Step::Execute(rng.below(prepared as u64) as usize, 1 + rng.below(3) as i32)
            }
            25 if prepared > 0 && rng.below(2) == 0 => {
                Step::Close(rng.below(prepared as u64) as usize)
            }
            26 if prepared > 0 => Step::Pipeline(
                (0..2 + rng.below(4))
                    .map(|_| (rng.below(prepared as u64) as usize, 1 + rng.below(3) as i32))
                    .collect(),
            ),
            27 => q(format!(
                "SELECT pg_try_advisory_xact_lock({})",
                100 + other_pinner
            )),
            28 if m.in_tx => q(format!("SELECT pg_advisory_xact_lock({})", 200 + i)),
            29 if pinner => q(rng
                .pick(&[
                    "SELECT pg_advisory_lock(100 + $i)",
                    "SELECT pg_advisory_unlock(100 + $i)",
                    "SELECT pg_advisory_unlock_all()",
                ])
                .replace("$i", &i.to_string())),
            30 if pinner => q(rng
                .pick(&[
                    "CREATE TEMP TABLE IF NOT EXISTS tmp (x int)",
                    "INSERT INTO tmp VALUES (7)",
                    "SELECT count(*), sum(x) FROM tmp",
                    "DROP TABLE IF EXISTS tmp",
                    "CREATE TEMP TABLE tx (y int) ON COMMIT DROP",
                ])
                .into()),
            31 if pinner => q(format!(
                "{} ch{i}",
                rng.pick(&["LISTEN", "LISTEN", "UNLISTEN"])
            )),
            32 => q(format!("NOTIFY ch{other_pinner}, 'from {i} at {n}'")),
            33 => q(format!(
                "SELECT pg_notify('ch{other_pinner}', 'via function from {i}')"
            )),
            34 if pinner => Step::Notifications,
            // SQL PREPARE is followed, not pinned: every client, the same names with
            // texts of their own (another client's q1 must never answer).
            35 => q(match rng.below(8) {
                0 => format!("PREPARE q1 AS SELECT $1::int + {i}"),
                1 => "EXECUTE q1(41)".into(),
                2 => "DEALLOCATE q1".into(),
                3 => rng.pick(&["DEALLOCATE ALL", "DEALLOCATE PREPARE q2"]).into(),
                4 => "PREPARE q2 AS SELECT current_setting('search_path')".into(),
                5 => "EXECUTE q2".into(),
                6 => format!("PREPARE q3(text) AS SELECT $1 || ' {i}'; EXECUTE q3('x')"),
                _ => "EXPLAIN (COSTS OFF) EXECUTE q1(1)".into(),
            }),
            36 => q("EXECUTE q1(1)".into()),
            37 if m.in_tx => q(rng
                .pick(&[
                    "DECLARE cur CURSOR FOR SELECT generate_series(1, 20)",
                    "FETCH 3 FROM cur",
                    "MOVE 2 IN cur",
                    "CLOSE cur",
                    "FETCH ALL FROM cur",
                ])
                .into()),
            38 if pinner => q(rng
                .pick(&[
                    "DECLARE held CURSOR WITH HOLD FOR SELECT generate_series(1, 9)",
                    "FETCH 2 FROM held",
                    "CLOSE held",
                ])
                .into()),
            39 => Step::CopyOut(
                rng.pick(&[
                    "COPY (SELECT v FROM public.t$i ORDER BY id) TO STDOUT",
                    "COPY (SELECT owner FROM orders ORDER BY id) TO STDOUT WITH (FORMAT csv, HEADER)",
                    "COPY (SELECT 1/0) TO STDOUT",
                ])
                .replace("$i", &i.to_string()),
            ),
            40 if !m.read_only => Step::CopyIn(
                format!("COPY public.t{i} (v) FROM STDIN"),
                rng.pick(&["1\n2\n3\n", "4\n", "x\n", "5\n6\n"]).into(),
            ),
            41 => q(format!(
                "SELECT pg_try_advisory_xact_lock({}), pg_advisory_xact_lock_shared(300)",
                100 + other_pinner
            )),
            // Protocol statements show under dbproxy's names, with other clients' (README):
            // the SQL-level ones are the client's own.
            // A statement dbproxy prepared again shows its own PREPARE as its source, where the
            // first showed the whole query string (README): the first statement of it is
            // the same.
            42 => q("SELECT name, split_part(statement, ';', 1) FROM pg_prepared_statements WHERE name LIKE 'q%' ORDER BY 1".into()),
            43 => q("SELECT count(*) FROM pg_cursors".into()),
            44 if m.in_tx => q(format!(
                "SELECT set_config('myapp.tenant', 'local-{i}', true), current_setting('myapp.tenant')"
            )),
            45 => q("SHOW search_path; SHOW TimeZone; SHOW transaction_isolation".into()),
            _ => continue,
        };
        return step;
    }
}

/// Longer than any step takes (a hang is reported as the step's answer).
const STEP_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

async fn within(
    limit: std::time::Duration,
    f: impl std::future::Future<Output = Vec<String>>,
) -> Vec<String> {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| vec!["no answer within the step limit".into()])
}

fn setup(db: &PgDb) {
    let mut sql = String::from(
        "CREATE ROLE r0; CREATE ROLE r1; GRANT r0, r1 TO app; \
         CREATE SCHEMA d1; CREATE SCHEMA d2; \
         CREATE TABLE d1.orders (id int PRIMARY KEY, owner text); \
         CREATE TABLE d2.orders (id int PRIMARY KEY, owner text); \
         INSERT INTO d1.orders VALUES (1, 'd1-one'), (2, 'd1-two'), (3, 'd1-three'); \
         INSERT INTO d2.orders VALUES (1, 'd2-one'), (2, 'd2-two'), (3, 'd2-three'); \
         GRANT USAGE ON SCHEMA d1, d2 TO PUBLIC; \
         GRANT SELECT ON d1.orders, d2.orders TO PUBLIC; ",
    );
    // A table per client: clients in transactions never wait on each other's rows.
    for i in 0..CLIENTS {
        let _ = write!(
            sql,
            "CREATE TABLE public.t{i} (id serial PRIMARY KEY, v int); \
             GRANT ALL ON public.t{i} TO PUBLIC; GRANT ALL ON SEQUENCE public.t{i}_id_seq TO PUBLIC; "
        );
    }
    db.sql_in("shop", &sql);
}

#[test]
fn sixteen_postgresql_clients_answer_as_if_each_had_its_own_connection() {
    // A lock wait is a bug in this test (clients touch disjoint rows): fail fast.
    let direct = PgDb::start(&["lock_timeout=5s"]);
    let proxied = PgDb::start(&["lock_timeout=5s"]);
    setup(&direct);
    setup(&proxied);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for io in DRIVERS {
        let proxy = Proxy::start_at(
            proxied.port,
            io,
            "verify_checkin = true",
            &group(
                &proxied,
                "max_connections = 8\nmax_idle_connections = 8\nconnection_borrow_timeout = \"10s\"",
            ),
            "",
        );
        for seed in SEEDS {
            let mut rng = Rng(seed);
            let mut sides: Vec<(Side, Side)> = rt.block_on(async {
                let mut v = Vec::new();
                for _ in 0..CLIENTS {
                    v.push((
                        connect(direct.port, DB_PASSWORD).await,
                        connect(proxy.port, APP_PASSWORD).await,
                    ));
                }
                v
            });
            let mut models = [Model::default(); CLIENTS];
            let mut history: Vec<(usize, String)> = Vec::new();
            for n in 0..STEPS {
                let i = rng.below(CLIENTS as u64) as usize;
                let in_tx = models[PINNERS..].iter().filter(|m| m.in_tx).count();
                let prepared = sides[i].0.stmts.len();
                let step = generate(&mut rng, i, &mut models[i], in_tx, prepared, n as u64);
                history.push((i, format!("{step:?}")));
                let (d, p) = &mut sides[i];
                let (want, got) = rt.block_on(async {
                    (
                        within(STEP_LIMIT, run(d, &step)).await,
                        within(STEP_LIMIT, run(p, &step)).await,
                    )
                });
                assert!(
                    !d.client.is_closed() && !p.client.is_closed(),
                    "[{io}] seed {seed:#x} step {n}, client {i}: {step:?} closed a connection (direct {}, dbproxy {})\n  direct: {want:?}\n  dbproxy: {got:?}",
                    d.client.is_closed(),
                    p.client.is_closed()
                );
                if want != got {
                    let held: Vec<String> = proxy
                        .metrics()
                        .lines()
                        .filter(|l| {
                            (l.starts_with("dbproxy_pin")
                                || l.starts_with("dbproxy_database_connections"))
                                && !l.ends_with(" 0")
                        })
                        .map(String::from)
                        .collect();
                    panic!(
                        "[{io}] seed {seed:#x} step {n}, client {i}: {step:?}\n  direct: {want:?}\n  dbproxy: {got:?}\n{}\npins and connections now:\n{}",
                        divergence_report(&history, i, "dbproxy-pg-differential-failure.tsv"),
                        held.join("\n")
                    );
                }
            }
            // Every client ends outside a transaction: its connection is checked in.
            rt.block_on(async {
                for (i, m) in models.iter().enumerate() {
                    if m.in_tx {
                        if let Err(e) = sides[i].1.client.simple_query("ROLLBACK").await {
                            let own: Vec<&String> = history
                                .iter()
                                .rev()
                                .filter(|(c, _)| *c == i)
                                .take(10)
                                .map(|(_, s)| s)
                                .collect();
                            panic!("[{io}] client {i}'s ROLLBACK at the end: {e}; its last steps: {own:#?}");
                        }
                    }
                }
            });
            drop(sides);
            println!("[{io}] seed {seed:#x}: {STEPS} steps, every answer equal");
        }
        let (verified, dirty) = proxy.checkin_verification();
        println!("[{io}] check-ins verified {verified}, dirty {dirty}");
        assert!(verified > 1000, "[{io}] the verification ran ({verified})");
        assert_eq!(dirty, 0, "[{io}] {}", proxy.log());
        // Only the pinners pinned (each at most once per seed), and for what pins.
        let pins: Vec<(&str, i64)> = [
            "listen",
            "advisory_lock",
            "hold_cursor",
            "temporary_table",
            "text_prepare",
            "unclassified",
        ]
        .into_iter()
        .map(|r| (r, proxy.pins_started(r)))
        .collect();
        println!("[{io}] pins started: {pins:?}");
        let total: i64 = pins.iter().map(|p| p.1).sum();
        assert!(
            total > 0 && total <= (PINNERS * SEEDS.len()) as i64,
            "[{io}] {pins:?}"
        );
        assert_eq!(proxy.pins_started("unclassified"), 0, "[{io}]");
        assert_eq!(
            proxy.pins_started("text_prepare"),
            0,
            "[{io}] SQL PREPARE pins nothing"
        );
    }
}
