//! PostgreSQL through dbproxy: a real PostgreSQL 15 the tests start, real clients (psql,
//! pgbench, the Rust `postgres` crate), on both io loops, with far fewer server
//! connections than clients.

use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, NoTls};
use proxy_tests::pg::{conninfo, group, program, PgDb};
use proxy_tests::{poll_until, wait_until, Proxy, APP_PASSWORD, DRIVERS};
use std::process::Output;
use std::time::{Duration, Instant};

fn proxy(db: &PgDb, io: &str, group_extra: &str) -> Proxy {
    proxy_with(db, io, "", group_extra)
}

/// dbproxy in front of `db`, with `[proxy]` and target group settings of the test's.
fn proxy_with(db: &PgDb, io: &str, proxy_extra: &str, group_extra: &str) -> Proxy {
    Proxy::start_at(db.port, io, proxy_extra, &group(db, group_extra), "")
}

fn client(port: u16) -> Client {
    Client::connect(&conninfo(port, "app", APP_PASSWORD, "shop"), NoTls).unwrap()
}

fn pgbench(port: u16, args: &[&str]) -> Output {
    program("pgbench")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "app"])
        .args(args)
        .arg("shop")
        .env("PGPASSWORD", APP_PASSWORD)
        .output()
        .unwrap()
}

fn psql(port: u16, user: &str, password: &str, db: &str, sql: &str) -> Output {
    program("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            user,
            "-d",
            db,
        ])
        .args(["-At", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .env("PGPASSWORD", password)
        .env("PGSSLMODE", "disable")
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// pgbench's TPC-B-like books: every delta recorded once in each balance.
fn books_balance(db: &PgDb) {
    let sums = db.sql_in(
        "shop",
        "SELECT (SELECT sum(abalance) FROM pgbench_accounts), \
                (SELECT sum(bbalance) FROM pgbench_branches), \
                (SELECT sum(tbalance) FROM pgbench_tellers), \
                (SELECT coalesce(sum(delta), 0) FROM pgbench_history), \
                (SELECT count(*) FROM pgbench_history)",
    );
    let v: Vec<&str> = sums.trim().split('|').collect();
    assert_eq!(v.len(), 5, "{sums}");
    assert!(
        v[..4].iter().all(|x| *x == v[0]),
        "the books do not balance: {sums}"
    );
    assert_ne!(v[4], "0", "no transaction was recorded");
}

#[test]
fn psql_and_pgbench_share_two_server_connections_and_the_books_balance() {
    let db = PgDb::start(&[]);
    for io in DRIVERS {
        let p = proxy(&db, io, "max_connections = 2\nmax_idle_connections = 2");
        let o = psql(p.port, "app", APP_PASSWORD, "shop", "SELECT 40 + 2");
        assert_eq!(text(&o).trim(), "42", "[{io}]");

        let o = pgbench(p.port, &["-i", "-s", "1", "-q"]);
        assert!(o.status.success(), "[{io}] pgbench -i: {}", text(&o));
        for mode in ["simple", "extended"] {
            // -n: no vacuum and no truncation of the history between the runs, so that
            // the history keeps every delta the balances got.
            let o = pgbench(
                p.port,
                &["-n", "-M", mode, "-c", "8", "-j", "2", "-t", "150"],
            );
            let out = text(&o);
            assert!(o.status.success(), "[{io}] pgbench -M {mode}: {out}");
            assert!(
                out.contains("number of transactions actually processed: 1200/1200")
                    && out.contains("number of failed transactions: 0"),
                "[{io}] pgbench -M {mode}: {out}"
            );
            books_balance(&db);
            // Two for the clients, one for the health check.
            let n = db.backends("app");
            assert!(n <= 3, "[{io}] {n} server connections for app");
        }
        // Many more clients than connections: connections move between the cores' pools
        // as clients wait, and none is closed on the way (a borrower served meanwhile
        // leaves the moved one to the next, or to its core).
        let o = pgbench(p.port, &["-n", "-S", "-c", "64", "-j", "4", "-t", "200"]);
        assert!(
            o.status.success() && text(&o).contains("number of failed transactions: 0"),
            "[{io}] pgbench -S -c 64: {}",
            text(&o)
        );
        assert_eq!(
            p.metric("dbproxy_database_connections_closed_total{target_group=\"default\",target_role=\"read_write\"}"),
            0,
            "[{io}]"
        );
        // Startup settings: the second client with the same ones takes the server's
        // spelling the first read back.
        for _ in 0..3 {
            let o = program("psql")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &p.port.to_string(),
                    "-U",
                    "app",
                    "-d",
                    "shop",
                ])
                .args(["-At", "-c", "SHOW DateStyle", "-c", "SHOW search_path"])
                .env("PGPASSWORD", APP_PASSWORD)
                .env("PGSSLMODE", "disable")
                .env(
                    "PGOPTIONS",
                    "-c DateStyle=ISO -c search_path=pg_catalog,public",
                )
                .output()
                .unwrap();
            assert_eq!(text(&o), "ISO, MDY\npg_catalog,public\n", "[{io}]");
        }
        let o = pgbench(p.port, &["-S", "-C", "-c", "4", "-j", "2", "-t", "25"]);
        assert!(
            o.status.success() && text(&o).contains("number of failed transactions: 0"),
            "[{io}] pgbench -C: {}",
            text(&o)
        );
    }
}

#[test]
fn logins_are_checked_by_dbproxy_and_the_servers_refusals_pass_through() {
    let db = PgDb::start(&[]);
    for io in DRIVERS {
        let p = proxy(&db, io, "max_connections = 2");
        let o = psql(p.port, "app", "wrong", "shop", "SELECT 1");
        assert!(!o.status.success(), "[{io}]");
        assert!(
            text(&o).contains("password authentication failed for user \"app\""),
            "[{io}] {}",
            text(&o)
        );
        // A user dbproxy does not know fails the same way, after the same exchange.
        let o = psql(p.port, "nobody", "wrong", "shop", "SELECT 1");
        assert!(
            text(&o).contains("password authentication failed for user \"nobody\""),
            "[{io}] {}",
            text(&o)
        );
        let o = psql(p.port, "app", APP_PASSWORD, "nosuchdb", "SELECT 1");
        assert!(
            text(&o).contains("database \"nosuchdb\" does not exist"),
            "[{io}] {}",
            text(&o)
        );
        // The password is dbproxy's user's, not the database's.
        let o = psql(p.port, "app", proxy_tests::DB_PASSWORD, "shop", "SELECT 1");
        assert!(
            !o.status.success(),
            "[{io}] the database's password let a client in"
        );
    }
}

#[test]
fn four_hundred_clients_settings_follow_them_across_twenty_server_connections() {
    let db = PgDb::start(&[]);
    const CLIENTS: usize = 400;
    const ROUNDS: usize = 10;
    let mut setup = String::new();
    for r in 0..4 {
        setup.push_str(&format!("CREATE ROLE r{r}; GRANT r{r} TO app; "));
    }
    for i in 0..CLIENTS {
        setup.push_str(&format!(
            "CREATE SCHEMA s{i} AUTHORIZATION app; CREATE TABLE s{i}.t (v int); \
             INSERT INTO s{i}.t VALUES ({i}); GRANT USAGE ON SCHEMA s{i} TO PUBLIC; \
             GRANT SELECT ON s{i}.t TO PUBLIC; "
        ));
    }
    db.sql_in("shop", &setup);
    let zones = [
        "UTC",
        "Europe/Paris",
        "Asia/Tokyo",
        "America/New_York",
        "Australia/Sydney",
    ];
    for io in DRIVERS {
        let p = proxy_with(
            &db,
            io,
            "verify_checkin = true",
            "max_connections = 20\nmax_idle_connections = 20",
        );
        let port = p.port;
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let most = {
            // The server's backends for app, sampled every 50 ms while the clients run.
            let done = done.clone();
            let port = db.port;
            std::thread::spawn(move || {
                let mut c = Client::connect(
                    &conninfo(port, "postgres", proxy_tests::DB_PASSWORD, "postgres"),
                    NoTls,
                )
                .unwrap();
                let mut most = 0i64;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let n: i64 = c
                        .query_one(
                            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'",
                            &[],
                        )
                        .unwrap()
                        .get(0);
                    most = most.max(n);
                    std::thread::sleep(Duration::from_millis(50));
                }
                most
            })
        };
        let workers: Vec<_> = (0..CLIENTS)
            .map(|i| {
                std::thread::spawn(move || {
                    let mut c = client(port);
                    let zone = zones[i % zones.len()];
                    c.batch_execute(&format!(
                        "SET search_path = s{i}, public; SET TimeZone = '{zone}'; \
                         SET application_name = 'c{i}'; SET statement_timeout = {}; \
                         SET myapp.tenant = 't{i}'; SET ROLE r{}",
                        (i + 1) * 1000 + 7,
                        i % 4
                    ))
                    .unwrap();
                    for round in 0..ROUNDS {
                        if round % 5 == 0 {
                            // A transaction, and a setting changed inside one that rolls
                            // back (gone) and one that commits (kept).
                            c.batch_execute("BEGIN; SET work_mem = '7MB'; ROLLBACK").unwrap();
                            c.batch_execute(&format!("BEGIN; SET lock_timeout = {}; COMMIT", i + 1))
                                .unwrap();
                        }
                        let row = c
                            .query_one(
                                "SELECT current_setting('search_path'), current_setting('TimeZone'), \
                                 current_setting('application_name'), current_setting('statement_timeout'), \
                                 current_setting('myapp.tenant'), current_user::text, (SELECT v FROM t), \
                                 current_setting('work_mem'), current_setting('lock_timeout')",
                                &[],
                            )
                            .unwrap();
                        let got: Vec<String> = (0..7)
                            .map(|k| {
                                if k == 6 {
                                    row.get::<_, i32>(k).to_string()
                                } else {
                                    row.get::<_, String>(k)
                                }
                            })
                            .collect();
                        let want = [
                            format!("s{i}, public"),
                            zone.to_string(),
                            format!("c{i}"),
                            format!("{}ms", (i + 1) * 1000 + 7),
                            format!("t{i}"),
                            format!("r{}", i % 4),
                            i.to_string(),
                        ];
                        assert_eq!(got, want, "client {i}, round {round}");
                        if round >= 5 {
                            assert_eq!(row.get::<_, String>(7), "4MB", "client {i}: a rolled-back SET leaked");
                            assert_eq!(row.get::<_, String>(8), format!("{}ms", i + 1), "client {i}");
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let most = most.join().unwrap();
        println!("[{io}] at most {most} server backends for app");
        assert!(most <= 23, "[{io}] {most} server connections for app");
        let (verified, dirty) = p.checkin_verification();
        println!("[{io}] check-ins verified {verified}, dirty {dirty}");
        assert!(verified > 1000, "[{io}] the verification ran ({verified})");
        assert_eq!(dirty, 0, "[{io}] {}", p.log());
        // A new client starts clean: nothing of the others' settings.
        let mut c = client(p.port);
        let row = c
            .query_one(
                "SELECT current_setting('search_path'), current_setting('application_name'), current_user::text, current_setting('myapp.tenant', true)",
                &[],
            )
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "\"$user\", public", "[{io}]");
        assert_eq!(row.get::<_, String>(1), "", "[{io}]");
        assert_eq!(row.get::<_, String>(2), "app", "[{io}]");
        let tenant: Option<String> = row.get(3);
        assert!(
            tenant.as_deref().is_none_or(str::is_empty),
            "[{io}] {tenant:?}"
        );
    }
}

#[test]
fn a_cancel_stops_its_own_query_and_never_a_bystanders() {
    let db = PgDb::start(&[]);
    for io in DRIVERS {
        let p = proxy(&db, io, "max_connections = 3");
        let port = p.port;
        let running = |q: &str| -> u64 {
            db.sql(&format!(
                "SELECT count(*) FROM pg_stat_activity WHERE query = '{q}' AND state = 'active'"
            ))
            .trim()
            .parse()
            .unwrap_or(0)
        };

        // The client's own cancel (psql's Ctrl-C, libpq's PQcancel).
        let mut a = client(port);
        let token = a.cancel_token();
        let sleeper = std::thread::spawn(move || {
            let t = Instant::now();
            let r = a.batch_execute("SELECT pg_sleep(60)");
            (r, t.elapsed(), Instant::now())
        });
        wait_until("pg_sleep to run", Duration::from_secs(20), || {
            running("SELECT pg_sleep(60)") == 1
        });
        let sent = Instant::now();
        token.cancel_query(NoTls).unwrap();
        let (r, took, ended) = sleeper.join().unwrap();
        // Reported, not asserted (tests do not assert on timings): issue 26 asks for 1 s.
        println!(
            "[{io}] the cancelled query ended {:?} after the cancel request was sent",
            ended.saturating_duration_since(sent)
        );
        let e = r.expect_err("the query was not cancelled");
        assert_eq!(e.code().map(|c| c.code()), Some("57014"), "[{io}] {e}");
        assert!(
            took < Duration::from_secs(30),
            "[{io}] the cancel took {took:?}"
        );

        // A storm of cancels for finished queries while a bystander's query runs.
        let bystander = std::thread::spawn(move || {
            let mut b = client(port);
            b.batch_execute("SELECT pg_sleep(3)")
        });
        let mut c = client(port);
        let token = c.cancel_token();
        let until = Instant::now() + Duration::from_secs(2);
        let (mut n, mut own) = (0, 0);
        while Instant::now() < until {
            // tokio-postgres's cancel returns once the request is written, so a cancel may
            // still be on its way when the client's next query starts, and cancel that
            // one (as it would on a server of its own): the client's, never another's.
            if let Err(e) = c.batch_execute("SELECT 1") {
                assert_eq!(e.code().map(|c| c.code()), Some("57014"), "[{io}] {e}");
                own += 1;
            }
            token.cancel_query(NoTls).unwrap();
            n += 1;
        }
        println!(
            "[{io}] {n} cancels after finished queries; {own} reached the client's next query"
        );
        assert!(n > 10, "[{io}] only {n} rounds");
        bystander
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("[{io}] a bystander's query was hit: {e}"));

        // A client that vanishes mid-query has its query cancelled.
        let mut gone = program("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                "app",
                "-d",
                "shop",
            ])
            .args(["-c", "SELECT pg_sleep(61)"])
            .env("PGPASSWORD", APP_PASSWORD)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        wait_until("pg_sleep(61) to run", Duration::from_secs(20), || {
            running("SELECT pg_sleep(61)") == 1
        });
        gone.kill().unwrap();
        let _ = gone.wait();
        assert!(
            poll_until(Duration::from_secs(10), || running("SELECT pg_sleep(61)")
                == 0),
            "[{io}] the vanished client's query runs on"
        );
    }
}

#[test]
fn listen_pins_its_client_and_notifications_arrive() {
    let db = PgDb::start(&[]);
    for io in DRIVERS {
        let p = proxy(&db, io, "max_connections = 3");
        let mut l = client(p.port);
        l.batch_execute("LISTEN news").unwrap();
        let mut n = client(p.port);
        for _ in 0..3 {
            n.batch_execute("SELECT 1").unwrap();
        }
        n.batch_execute("NOTIFY news, 'hello'").unwrap();
        let got = poll_until(Duration::from_secs(10), || {
            l.batch_execute("SELECT 1").unwrap();
            l.notifications()
                .iter()
                .any(|m| Ok(m.payload() == "hello"))
                .unwrap_or(false)
        });
        assert!(got, "[{io}] the notification did not arrive");
        assert_eq!(p.pins_started("listen"), 1, "[{io}]");
        assert_eq!(p.pinned_now("listen"), 1, "[{io}]");
        drop(l);
        assert!(
            poll_until(Duration::from_secs(10), || p.pinned_now("listen") == 0),
            "[{io}] the pin outlived its client"
        );
    }
}

#[test]
fn prepared_statements_move_between_server_connections_without_pinning() {
    let db = PgDb::start(&[]);
    db.sql_in(
        "shop",
        "CREATE SCHEMA tenant_a AUTHORIZATION app; CREATE SCHEMA tenant_b AUTHORIZATION app; \
         CREATE TABLE tenant_a.t (v text); CREATE TABLE tenant_b.t (v text); \
         INSERT INTO tenant_a.t VALUES ('a'); INSERT INTO tenant_b.t VALUES ('b'); \
         GRANT ALL ON ALL TABLES IN SCHEMA tenant_a, tenant_b TO app",
    );
    for io in DRIVERS {
        let p = proxy(&db, io, "max_connections = 2\nmax_idle_connections = 2");

        // pgbench -M prepared: named statements, 8 clients on 2 server connections.
        let o = pgbench(p.port, &["-i", "-s", "1", "-q"]);
        assert!(o.status.success(), "[{io}] pgbench -i: {}", text(&o));
        let o = pgbench(
            p.port,
            &["-n", "-M", "prepared", "-c", "8", "-j", "2", "-t", "150"],
        );
        let out = text(&o);
        assert!(
            o.status.success()
                && out.contains("number of transactions actually processed: 1200/1200")
                && out.contains("number of failed transactions: 0"),
            "[{io}] pgbench -M prepared: {out}"
        );
        books_balance(&db);

        // Two tenants on their own search_path prepare the same text; each reads only its
        // own rows, whichever server connection serves it.
        let port = p.port;
        let tenants: Vec<_> = ["a", "b"]
            .into_iter()
            .map(|t| {
                std::thread::spawn(move || {
                    let mut c = client(port);
                    c.batch_execute(&format!("SET search_path = tenant_{t}"))
                        .unwrap();
                    let stmt = c.prepare("SELECT v FROM t").unwrap();
                    for round in 0..1000 {
                        let v: String = c.query_one(&stmt, &[]).unwrap().get(0);
                        assert_eq!(v, t, "tenant {t}, round {round}");
                        if round % 100 == 0 {
                            // A statement prepared anew under the same text, and closed.
                            let s2 = c.prepare("SELECT v FROM t").unwrap();
                            let v: String = c.query_one(&s2, &[]).unwrap().get(0);
                            assert_eq!(v, t, "tenant {t}, round {round}");
                        }
                    }
                })
            })
            .collect();
        // Others keep the two server connections changing hands meanwhile.
        let churn: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(move || {
                    let mut c = client(port);
                    for _ in 0..300 {
                        let n: i64 = c
                            .query_one("SELECT count(*) FROM pgbench_branches", &[])
                            .unwrap()
                            .get(0);
                        assert_eq!(n, 1);
                    }
                })
            })
            .collect();
        for t in tenants.into_iter().chain(churn) {
            t.join().unwrap();
        }
        assert!(db.backends("app") <= 3, "[{io}]");

        // An error inside a pipeline skips to Sync, and a failed Parse never existed.
        let mut c = client(port);
        let e = c.prepare("SELEC broken").unwrap_err();
        assert_eq!(e.code().map(|c| c.code()), Some("42601"), "[{io}] {e}");
        let v: i32 = c.query_one("SELECT 7", &[]).unwrap().get(0);
        assert_eq!(v, 7, "[{io}]");
        // DISCARD ALL removes the client's statements (and only its own).
        let stmt = c.prepare("SELECT 8").unwrap();
        c.batch_execute("DISCARD ALL").unwrap();
        let e = c.query_one(&stmt, &[]).unwrap_err();
        assert_eq!(e.code().map(|c| c.code()), Some("26000"), "[{io}] {e}");
        let v: i32 = client(port).query_one("SELECT 9", &[]).unwrap().get(0);
        assert_eq!(v, 9, "[{io}]");
    }
}

#[test]
fn asyncpg_and_psycopg_on_two_server_connections() {
    let db = PgDb::start(&[]);
    db.sql_in(
        "shop",
        "CREATE TABLE clients_log (client text, round int); GRANT ALL ON clients_log TO app",
    );
    for io in DRIVERS {
        db.sql_in("shop", "TRUNCATE clients_log");
        let p = proxy(&db, io, "max_connections = 2\nmax_idle_connections = 2");
        let out = proxy_tests::run_python(
            "pg_clients.py",
            &[p.port.to_string(), APP_PASSWORD.to_string()],
        );
        assert!(
            out.contains("asyncpg: 12 clients x 60 rounds ok"),
            "[{io}] {out}"
        );
        assert!(
            out.contains("psycopg: 12 clients x 60 rounds ok"),
            "[{io}] {out}"
        );
        assert!(db.backends("app") <= 3, "[{io}]");
    }
}

#[test]
fn tls_on_both_legs_with_verify_full() {
    let ca = proxy_tests::tls::TestCa::new("pg");
    let (db_cert, db_key) = ca.issue("postgres", &["localhost", "127.0.0.1"]);
    let (px_cert, px_key) = ca.issue("dbproxy", &["localhost", "127.0.0.1"]);
    // PostgreSQL reads its key only when the server's user owns it, mode 0600.
    let keys = tempfile::tempdir().unwrap();
    let own = |from: &std::path::Path, name: &str| {
        let to = keys.path().join(name);
        std::fs::copy(from, &to).unwrap();
        // As root the tests run PostgreSQL as `postgres`, which must own its key.
        let _ = std::process::Command::new("chown")
            .arg("postgres")
            .arg(&to)
            .status();
        std::fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        to
    };
    let (cert, key) = (own(&db_cert, "server.crt"), own(&db_key, "server.key"));
    std::fs::set_permissions(
        keys.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let db = PgDb::start(&[
        "ssl=on",
        &format!("ssl_cert_file={}", cert.display()),
        &format!("ssl_key_file={}", key.display()),
    ]);
    for io in DRIVERS {
        let p = Proxy::start_at(
            db.port,
            io,
            &format!(
                "tls_cert = \"{}\"\ntls_key = \"{}\"",
                px_cert.display(),
                px_key.display()
            ),
            &group(
                &db,
                &format!(
                    "max_connections = 2\nbackend_tls = \"verify_full\"\nbackend_tls_ca = \"{}\"",
                    ca.ca.display()
                ),
            ),
            "",
        );
        let o = program("psql")
            .arg(format!(
                "host=localhost port={} user=app dbname=shop sslmode=verify-full sslrootcert={}",
                p.port,
                ca.ca.display()
            ))
            .args([
                "-At",
                "-c",
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            ])
            .env("PGPASSWORD", APP_PASSWORD)
            .output()
            .unwrap();
        assert!(o.status.success(), "[{io}] psql verify-full: {}", text(&o));
        assert_eq!(
            text(&o).trim(),
            "t",
            "[{io}] the server connection is not under TLS"
        );
        // Every server connection dbproxy opened is under TLS.
        let plain = db.sql(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.usename = 'app' AND NOT s.ssl",
        );
        assert_eq!(plain.trim(), "0", "[{io}]");
        // A client that trusts another CA refuses dbproxy's certificate.
        let other = proxy_tests::tls::TestCa::new("other");
        let o = program("psql")
            .arg(format!(
                "host=localhost port={} user=app dbname=shop sslmode=verify-full sslrootcert={}",
                p.port,
                other.ca.display()
            ))
            .args(["-At", "-c", "SELECT 1"])
            .env("PGPASSWORD", APP_PASSWORD)
            .output()
            .unwrap();
        assert!(
            !o.status.success() && text(&o).contains("certificate verify failed"),
            "[{io}] another CA's client accepted dbproxy: {}",
            text(&o)
        );
    }
}

#[test]
fn a_secret_rotated_during_pgbench_c_fails_no_client() {
    use std::os::unix::fs::PermissionsExt;
    let db = PgDb::start(&[]);
    let o = pgbench_as(
        &db,
        db.port,
        proxy_tests::DB_PASSWORD,
        &["-i", "-s", "1", "-q"],
    );
    assert!(o.status.success(), "pgbench -i: {}", text(&o));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("db.json");
    let write_secret = |pw: &str| {
        std::fs::write(
            &file,
            format!("{{\"username\": \"app\", \"password\": \"{pw}\"}}\n"),
        )
        .unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    };
    for (n, io) in DRIVERS.iter().enumerate() {
        let (old, new) = (
            format!("pg-rot-old-{n}-5d1e"),
            format!("pg-rot-new-{n}-a93b"),
        );
        proxy_tests::never_logged(&old);
        proxy_tests::never_logged(&new);
        db.sql(&format!("ALTER ROLE app PASSWORD '{old}'"));
        write_secret(&old);
        let sections = format!(
            "[[secrets]]\nname = \"db\"\nprovider = \"file\"\npath = \"{}\"\nrefresh = \"1s\"\n\n\
             [[users]]\nname = \"rot\"\npassword = \"rot-client-pw\"\n\
             backend_user = {{ secret = \"db\" }}\nbackend_password = {{ secret = \"db\" }}\n",
            file.display()
        );
        // Connections live 100 ms, so that new logins to the database go on all along.
        let p = Proxy::start_at(
            db.port,
            io,
            "",
            &group(
                &db,
                "max_connections = 2\nmax_connection_lifetime = \"100ms\"\n\
                 monitor_user = { secret = \"db\" }\nmonitor_password = { secret = \"db\" }",
            ),
            &sections,
        );
        let port = p.port;
        let bench = std::thread::spawn(move || {
            program("pgbench")
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "rot"])
                .args(["-n", "-S", "-C", "-c", "4", "-j", "2", "-T", "10", "shop"])
                .env("PGPASSWORD", "rot-client-pw")
                .output()
                .unwrap()
        });
        // The secret first, then the database (the order a rotation with a file takes),
        // each once new database logins have gone on under the state before.
        let opened = || {
            p.metric(
                "dbproxy_database_connections_setup_succeeded_total{target_group=\"default\",target_role=\"read_write\"}",
            )
        };
        wait_until(
            "logins under the old secret",
            Duration::from_secs(20),
            || opened() >= 5,
        );
        write_secret(&new);
        wait_until(
            "dbproxy to read the new secret",
            Duration::from_secs(20),
            || {
                p.log()
                    .contains("secret changed: new database logins use the new value")
            },
        );
        let before = opened();
        wait_until(
            "logins after the secret changed",
            Duration::from_secs(20),
            || opened() >= before + 5,
        );
        db.sql(&format!("ALTER ROLE app PASSWORD '{new}'"));
        let before = opened();
        wait_until(
            "logins after the database changed",
            Duration::from_secs(20),
            || opened() >= before + 5,
        );
        let o = bench.join().unwrap();
        let out = text(&o);
        assert!(
            o.status.success() && out.contains("number of failed transactions: 0"),
            "[{io}] pgbench -C through the rotation: {out}"
        );
        let log = p.log();
        assert!(
            log.contains("the database refused the login: secret read again"),
            "[{io}] the rotation met no new login (the test proved nothing): {log}"
        );
        assert!(
            !log.contains(&old) && !log.contains(&new),
            "[{io}] a password in the log"
        );
        db.sql(&format!(
            "ALTER ROLE app PASSWORD '{}'",
            proxy_tests::DB_PASSWORD
        ));
    }
}

fn pgbench_as(_db: &PgDb, port: u16, password: &str, args: &[&str]) -> Output {
    program("pgbench")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "app"])
        .args(args)
        .arg("shop")
        .env("PGPASSWORD", password)
        .output()
        .unwrap()
}

#[test]
fn a_failover_to_a_promoted_standby_keeps_every_client() {
    let mut primary = PgDb::start(&[]);
    primary.sql_in(
        "shop",
        "CREATE TABLE writes (client int, seq int); GRANT ALL ON writes TO app",
    );
    let standby = primary.standby(&[]);
    wait_until("the standby to replay", Duration::from_secs(30), || {
        standby
            .sql_in(
                "shop",
                "SELECT count(*) FROM pg_class WHERE relname = 'writes'",
            )
            .trim()
            == "1"
    });
    // One loop is enough for the drill: the roles it leaves behind do not repeat.
    let io = DRIVERS[0];
    let targets = format!(
        "engine = \"postgresql\"\ntargets = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]\n\
         max_connections = 10\nhealth_check_interval = \"200ms\"",
        primary.port, standby.port
    );
    let p = Proxy::start_at(primary.port, io, "", &targets, "");
    // Even clients write one row at a time; odd ones in transactions of two rows, open
    // across round trips (so that the kill finds many of them open).
    const CLIENTS: i32 = 200;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Each client's statements (or transactions) that succeeded so far.
    let done: std::sync::Arc<Vec<std::sync::atomic::AtomicU64>> =
        std::sync::Arc::new((0..CLIENTS).map(|_| Default::default()).collect());
    let written = |i: usize| done[i].load(std::sync::atomic::Ordering::Relaxed);
    let port = p.port;
    let workers: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let stop = stop.clone();
            let done = done.clone();
            std::thread::spawn(move || {
                let mut c = client(port);
                let (mut errors, mut seq, mut last_ok) = (0, 0, Instant::now());
                let mut longest_gap = Duration::ZERO;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    seq += 1;
                    let insert = format!("INSERT INTO writes VALUES ({i}, {seq})");
                    let r = if i % 2 == 0 {
                        c.simple_query(&insert).map(drop)
                    } else {
                        (|| {
                            c.simple_query("BEGIN")?;
                            c.simple_query(&insert)?;
                            std::thread::sleep(Duration::from_millis(5));
                            c.simple_query(&insert)?;
                            c.simple_query("COMMIT").map(drop)
                        })()
                    };
                    match r {
                        Ok(()) => {
                            longest_gap = longest_gap.max(last_ok.elapsed());
                            last_ok = Instant::now();
                            done[i as usize].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Err(e) => {
                            assert!(!c.is_closed(), "client {i} was disconnected: {e}");
                            errors += 1;
                            if i % 2 == 1 {
                                // Its transaction is lost: ROLLBACK ends it, and it goes on.
                                if let Err(e) = c.simple_query("ROLLBACK") {
                                    panic!("client {i}: ROLLBACK after {errors} errors: {e}");
                                }
                            }
                        }
                    }
                    // A write every 50 ms per client: 4,000 a second in all.
                    std::thread::sleep(Duration::from_millis(50));
                }
                (errors, longest_gap)
            })
        })
        .collect();
    let all = CLIENTS as usize;
    wait_until("every client to write", Duration::from_secs(90), || {
        (0..all).all(|i| written(i) >= 3)
    });
    primary.kill();
    let killed = Instant::now();
    standby.promote();
    let promoted = killed.elapsed();
    // Every client writes on the new primary, several times.
    let at_promotion: Vec<u64> = (0..all).map(written).collect();
    wait_until(
        "every client to write on the new primary",
        Duration::from_secs(90),
        || (0..all).all(|i| written(i) >= at_promotion[i] + 5),
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut worst = (0, Duration::ZERO);
    for w in workers {
        let (errors, gap) = w.join().unwrap();
        worst = (worst.0.max(errors), worst.1.max(gap));
    }
    assert!(worst.0 <= 1, "a client had {} errors", worst.0);
    // Writes resume on the new primary: every client wrote after the promotion.
    let after = standby.sql_in(
        "shop",
        "SELECT count(DISTINCT client) FROM writes WHERE seq > 0",
    );
    assert_eq!(after.trim(), CLIENTS.to_string());
    // Reported, not asserted (tests do not assert on timings): issue 26 asks for writes
    // back within 1 s of the promotion.
    println!(
        "the longest gap between a client's writes: {:?} (the kill and the promotion took {promoted:?})",
        worst.1
    );
}

#[test]
fn pgjdbc_and_node_postgres_on_two_server_connections() {
    let db = PgDb::start(&[]);
    db.sql_in(
        "shop",
        "CREATE TABLE clients_log (client text, round int); GRANT ALL ON clients_log TO app",
    );
    for io in DRIVERS {
        db.sql_in("shop", "TRUNCATE clients_log");
        let p = proxy(&db, io, "max_connections = 2\nmax_idle_connections = 2");
        let args = [p.port.to_string(), APP_PASSWORD.to_string()];
        let out = proxy_tests::run_java_with(proxy_tests::PGJDBC, "PgJdbc", &args);
        assert!(
            out.contains("pgjdbc: 8 threads x 100 rounds ok"),
            "[{io}] {out}"
        );
        let out = proxy_tests::run_node("pg_client.js", &args);
        assert!(
            out.contains("node-postgres: 8 clients x 100 rounds ok"),
            "[{io}] {out}"
        );
        assert!(db.backends("app") <= 3, "[{io}]");
    }
}

#[test]
fn a_read_only_endpoint_reads_from_the_standby() {
    let primary = PgDb::start(&[]);
    let standby = primary.standby(&[]);
    for io in DRIVERS {
        let ro_port = proxy_tests::free_port();
        let targets = format!(
            "engine = \"postgresql\"\ntargets = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]\nmax_connections = 2",
            primary.port, standby.port
        );
        let sections = format!(
            "[[endpoints]]\nname = \"reads\"\nlisten = \"127.0.0.1:{ro_port}\"\ntarget_group = \"default\"\nrole = \"read_only\"\n"
        );
        let p = Proxy::start_at(primary.port, io, "", &targets, &sections);
        let ask = |port: u16, sql: &str| psql(port, "app", APP_PASSWORD, "shop", sql);
        assert_eq!(
            text(&ask(p.port, "SELECT pg_is_in_recovery()")).trim(),
            "f",
            "[{io}]"
        );
        assert_eq!(
            text(&ask(ro_port, "SELECT pg_is_in_recovery()")).trim(),
            "t",
            "[{io}]"
        );
        let o = ask(ro_port, "CREATE TABLE nope (a int)");
        assert!(
            !o.status.success() && text(&o).contains("read-only transaction"),
            "[{io}] a write through the read-only endpoint: {}",
            text(&o)
        );
    }
}

/// `/status`, the metrics and the SQL console show a PostgreSQL group as such.
#[test]
fn status_metrics_and_the_console_show_a_postgresql_group() {
    let db = PgDb::start(&[]);
    for io in DRIVERS {
        let console = proxy_tests::free_port();
        let p = Proxy::start_admin(
            db.port,
            io,
            "",
            &group(&db, "max_connections = 2"),
            &format!(
                "sql_listen = \"127.0.0.1:{console}\"\nadmin_user = \"admin\"\nadmin_password = \"admin-secret\""
            ),
            "",
            &[],
        );
        let mut c = client(p.port);
        assert_eq!(
            c.query_one("SELECT 41 + 1", &[]).unwrap().get::<_, i32>(0),
            42
        );
        let (_, _, status) = proxy_tests::http_get(p.admin, "/status");
        let v: serde_json::Value = serde_json::from_str(&status).unwrap();
        for part in ["pools", "target_groups", "endpoints"] {
            assert_eq!(v[part][0]["engine"], "postgresql", "[{io}] {part}: {v}");
        }
        assert_eq!(
            v["target_groups"][0]["writer"],
            format!("127.0.0.1:{}", db.port),
            "[{io}] {v}"
        );
        assert!(v["pools"][0]["open"].as_i64() >= Some(1), "[{io}] {v}");
        // The client is listed, with its requests counted (and the endpoint's).
        let clients = v["clients"].as_array().cloned().unwrap_or_default();
        assert_eq!(clients.len(), 1, "[{io}] {v}");
        assert_eq!(clients[0]["user"], "app", "[{io}] {v}");
        assert!(clients[0]["queries"].as_u64() >= Some(1), "[{io}] {v}");
        assert!(
            v["endpoints"][0]["queries"].as_u64() >= Some(1),
            "[{io}] {v}"
        );
        let raw = p.metrics_raw();
        assert!(
            raw.contains(
                "dbproxy_database_connections{target_group=\"default\",target_role=\"read_write\",engine=\"postgresql\"} "
            ),
            "[{io}] {raw}"
        );
        let pools =
            proxy_tests::mariadb_cli(console, "admin", "admin-secret", &["--batch"], "SHOW POOLS");
        let out = String::from_utf8_lossy(&pools.stdout);
        assert!(
            out.lines().next().is_some_and(|h| h.ends_with("engine"))
                && out
                    .lines()
                    .nth(1)
                    .is_some_and(|r| r.ends_with("postgresql")),
            "[{io}] {out}{}",
            String::from_utf8_lossy(&pools.stderr)
        );
    }
}

/// `idle_client_timeout` and `idle_transaction_timeout` close idle PostgreSQL clients
/// with PostgreSQL's own errors; a transaction left idle is rolled back and its server
/// connection goes.
#[test]
fn idle_clients_and_idle_transactions_are_closed() {
    let db = PgDb::start(&[]);
    db.sql_in(
        "shop",
        "CREATE TABLE idle_rows (v int); GRANT ALL ON idle_rows TO app",
    );
    for io in DRIVERS {
        let p = proxy_with(
            &db,
            io,
            "idle_client_timeout = \"3s\"\nidle_transaction_timeout = \"1s\"",
            "max_connections = 2",
        );
        let mut idle = client(p.port);
        let mut in_tx = client(p.port);
        in_tx
            .batch_execute("BEGIN; INSERT INTO idle_rows VALUES (1)")
            .unwrap();
        let open_transactions = || {
            db.sql(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND state LIKE 'idle in transaction%'",
            )
            .trim()
            .to_string()
        };
        assert_eq!(open_transactions(), "1", "[{io}]");
        // The client in its transaction goes first (after 1 s), its transaction with it.
        assert!(
            poll_until(Duration::from_secs(20), || open_transactions() == "0"),
            "[{io}] the transaction is still open: {}",
            p.log()
        );
        let e = in_tx.batch_execute("SELECT 1").unwrap_err();
        assert!(
            e.to_string().contains("idle-in-transaction timeout") || in_tx.is_closed(),
            "[{io}] {e}"
        );
        assert!(in_tx.is_closed(), "[{io}]");
        assert_eq!(
            idle.query_one("SELECT count(*) FROM idle_rows", &[])
                .unwrap()
                .get::<_, i64>(0),
            0,
            "[{io}] the idle transaction was rolled back"
        );
        // Then the idle one (3 s after its last query).
        assert!(
            poll_until(Duration::from_secs(20), || p
                .log()
                .contains("idle_client_timeout: closing")),
            "[{io}] {}",
            p.log()
        );
        let e = idle.batch_execute("SELECT 1").unwrap_err();
        assert!(idle.is_closed(), "[{io}] {e}");
        assert!(
            p.log().contains("idle_transaction_timeout: closing"),
            "[{io}] {}",
            p.log()
        );
        // The rolled-back transaction's connection is not kept.
        assert!(
            poll_until(Duration::from_secs(10), || {
                db.sql(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND state LIKE 'idle in transaction%'"
            )
            .trim()
                == "0"
            }),
            "[{io}]"
        );
    }
}

/// A client that stops reading a large result is closed after `net_write_timeout`, its
/// query cancelled, and the pool's one connection serves the next client.
#[test]
fn a_client_that_stops_reading_is_closed_after_net_write_timeout() {
    let db = PgDb::start(&[]);
    for io in DRIVERS {
        let p = proxy_with(&db, io, "net_write_timeout = \"2s\"", "max_connections = 1");
        const BIG: &str = "SELECT repeat('x', 1000) FROM generate_series(1, 5000000)";
        let mut reader = program("psql")
            .arg(conninfo(p.port, "app", APP_PASSWORD, "shop"))
            .args(["-At", "-c", BIG])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // psql stops reading: stopped, with its pipe left unread too.
        let running = || {
            db.sql(&format!(
                "SELECT count(*) FROM pg_stat_activity WHERE query = '{}' AND state = 'active'",
                BIG.replace('\'', "''")
            ))
            .trim()
            .to_string()
        };
        assert!(
            poll_until(Duration::from_secs(20), || running() == "1"),
            "[{io}] the big query never ran"
        );
        unsafe { libc::kill(reader.id() as i32, libc::SIGSTOP) };
        assert!(
            poll_until(Duration::from_secs(60), || p
                .log()
                .contains("net_write_timeout: closing")),
            "[{io}] {}",
            p.log()
        );
        assert!(
            poll_until(Duration::from_secs(20), || running() == "0"),
            "[{io}] the query runs on for nobody"
        );
        // The one server connection serves the next client.
        let mut c = client(p.port);
        assert_eq!(
            c.query_one("SELECT 7", &[]).unwrap().get::<_, i32>(0),
            7,
            "[{io}]"
        );
        unsafe { libc::kill(reader.id() as i32, libc::SIGKILL) };
        let _ = reader.wait();
    }
}

/// After a table changes under a prepared statement, PostgreSQL answers "cached plan must
/// not change result type" (0A000), and a client prepares the statement again: that new
/// definition is prepared afresh on every server connection it lands on, and sees the new
/// column there. The old statement is used on one server connection only: one that never
/// had it would prepare it after the change, with the new columns (a known limit, in the
/// README), where a connection of the client's own answers 0A000.
#[test]
fn a_statement_prepared_again_after_its_table_changed_sees_the_new_columns() {
    let db = PgDb::start(&[]);
    db.sql_in(
        "shop",
        "CREATE TABLE shape (a int); INSERT INTO shape VALUES (1); GRANT ALL ON shape TO app",
    );
    for io in DRIVERS {
        db.sql_in("shop", "ALTER TABLE shape DROP COLUMN IF EXISTS b");
        let p = proxy(&db, io, "max_connections = 2");
        let mut c = client(p.port);
        let mut other = client(p.port);
        // Prepared and used while the other client holds no connection.
        let old = c.prepare("SELECT * FROM shape").unwrap();
        for _ in 0..4 {
            assert_eq!(c.query(&old, &[]).unwrap()[0].len(), 1, "[{io}]");
        }
        db.sql_in("shop", "ALTER TABLE shape ADD COLUMN b int DEFAULT 2");
        let e = c.query(&old, &[]).unwrap_err();
        assert_eq!(e.code().map(|c| c.code()), Some("0A000"), "[{io}] {e}");
        // Prepared again, it sees the new column on both server connections (the other
        // client holds one of them at times).
        let new = c.prepare("SELECT * FROM shape").unwrap();
        for _ in 0..4 {
            let mut t = other.transaction().unwrap();
            t.query_one("SELECT 1", &[]).unwrap();
            let row = c.query_one(&new, &[]).unwrap();
            assert_eq!(
                (row.get::<_, i32>(0), row.get::<_, i32>(1)),
                (1, 2),
                "[{io}]"
            );
            t.commit().unwrap();
            let row = c.query_one(&new, &[]).unwrap();
            assert_eq!(
                (row.get::<_, i32>(0), row.get::<_, i32>(1)),
                (1, 2),
                "[{io}]"
            );
        }
    }
}

/// A client that sends part of a message and then nothing is closed after
/// `net_read_timeout`, and the server connection it held serves the next client.
#[test]
fn a_client_silent_in_the_middle_of_a_message_is_closed_after_net_read_timeout() {
    let db = PgDb::start(&[]);
    // A raw client: md5 login (Python computes it), then the first 12 bytes of a Parse.
    const RAW: &str = r#"
import hashlib, socket, struct, sys
port, user, pw = int(sys.argv[1]), sys.argv[2], sys.argv[3]
s = socket.create_connection(("127.0.0.1", port))
body = struct.pack("!i", 196608) + b"user\0" + user.encode() + b"\0database\0shop\0\0"
s.sendall(struct.pack("!i", len(body) + 4) + body)
def msg():
    head = b""
    while len(head) < 5:
        head += s.recv(5 - len(head))
    n = struct.unpack("!i", head[1:5])[0] - 4
    data = b""
    while len(data) < n:
        data += s.recv(n - len(data))
    return head[:1], data
tag, data = msg()
assert tag == b"R" and struct.unpack("!i", data[:4])[0] == 5, (tag, data)
inner = hashlib.md5(pw.encode() + user.encode()).hexdigest()
answer = b"md5" + hashlib.md5(inner.encode() + data[4:8]).hexdigest().encode() + b"\0"
s.sendall(b"p" + struct.pack("!i", len(answer) + 4) + answer)
while True:
    tag, data = msg()
    if tag == b"Z":
        break
sql = b"\0SELECT 1\0\0\0"
s.sendall(b"P" + struct.pack("!i", len(sql) + 4) + sql[:7])
s.settimeout(60)
got = b""
while True:
    chunk = s.recv(4096)
    if not chunk:
        break
    got += chunk
print("closed", got[:1].decode(errors="replace"), b"net_read_timeout" in got)
"#;
    for io in DRIVERS {
        let p = Proxy::start_at(
            db.port,
            io,
            "net_read_timeout = \"2s\"",
            &group(&db, "max_connections = 1"),
            "[[users]]\nname = \"raw\"\npassword = \"raw-secret\"\npostgres_auth = \"md5\"\nbackend_user = \"app\"\nbackend_password = \"db-secret\"\n",
        );
        let out = std::process::Command::new("python3")
            .args(["-c", RAW, &p.port.to_string(), "raw", "raw-secret"])
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            said.trim() == "closed E True",
            "[{io}] {said}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            p.log().contains("net_read_timeout: closing"),
            "[{io}] {}",
            p.log()
        );
        // The one server connection serves the next client.
        let mut c = client(p.port);
        assert_eq!(
            c.query_one("SELECT 8", &[]).unwrap().get::<_, i32>(0),
            8,
            "[{io}]"
        );
    }
}

/// The first value of the first row of a simple query, as text.
fn simple_value(c: &mut Client, sql: &str) -> Result<String, postgres::Error> {
    let rows = c.simple_query(sql)?;
    Ok(rows
        .iter()
        .find_map(|m| match m {
            postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .unwrap_or_default())
}

/// SQL-level PREPARE / EXECUTE / DEALLOCATE are followed instead of pinned: eight
/// clients hold statements of the same names with their own texts, on two server
/// connections, and each always executes its own; a client without one never reaches
/// another's. The check-in verifier finds every connection as recorded.
#[test]
fn sql_prepared_statements_follow_their_client_without_pinning() {
    let db = PgDb::start(&[]);
    for io in DRIVERS {
        let p = proxy_with(
            &db,
            io,
            "verify_checkin = true",
            "max_connections = 2\nmax_idle_connections = 2",
        );
        let port = p.port;
        let clients: Vec<_> = (1..=8i64)
            .map(|i| {
                std::thread::spawn(move || {
                    let mut c = client(port);
                    c.batch_execute(&format!(
                        "SET search_path = pg_catalog, public, s{i}; \
                         PREPARE q1(int) AS SELECT $1 + {i}; \
                         PREPARE q2 AS SELECT current_setting('search_path')"
                    ))
                    .unwrap();
                    let mut plus = i;
                    for round in 0..200i64 {
                        // Simple and extended protocol, in and out of transactions.
                        let v = simple_value(&mut c, &format!("EXECUTE q1({round})")).unwrap();
                        assert_eq!(v, (round + plus).to_string(), "client {i} round {round}");
                        let v: i32 = c
                            .query_one(&format!("EXECUTE q1({round})"), &[])
                            .unwrap()
                            .get(0);
                        assert_eq!(i64::from(v), round + plus, "client {i} round {round}");
                        let path = simple_value(&mut c, "EXECUTE q2").unwrap();
                        assert!(path.ends_with(&format!("s{i}")), "client {i}: {path}");
                        if round % 10 == 0 {
                            let mut t = c.transaction().unwrap();
                            let v = t.query_one("EXECUTE q1(1)", &[]).unwrap().get::<_, i32>(0);
                            assert_eq!(i64::from(v), 1 + plus, "client {i} round {round}");
                            t.commit().unwrap();
                            // A name in use is refused, as on a server of its own.
                            let e = c.batch_execute("PREPARE q1 AS SELECT 0").unwrap_err();
                            assert_eq!(e.code().map(|c| c.code()), Some("42P05"), "{e}");
                        }
                        if round % 50 == 49 {
                            c.batch_execute("DEALLOCATE q1").unwrap();
                            let e = simple_value(&mut c, "EXECUTE q1(1)").unwrap_err();
                            assert_eq!(e.code().map(|c| c.code()), Some("26000"), "{e}");
                            plus += 100;
                            c.batch_execute(&format!("PREPARE q1(int) AS SELECT $1 + {plus}"))
                                .unwrap();
                        }
                    }
                    // DEALLOCATE ALL removes its own statements, in a transaction too.
                    c.batch_execute("BEGIN; DEALLOCATE ALL; ROLLBACK").unwrap();
                    let e = simple_value(&mut c, "EXECUTE q2").unwrap_err();
                    assert_eq!(e.code().map(|c| c.code()), Some("26000"), "client {i}: {e}");
                })
            })
            .collect();
        // A client that never prepares: another client's q1 is never its own.
        let mut bystander = client(port);
        for _ in 0..300 {
            let e = simple_value(&mut bystander, "EXECUTE q1(1)").unwrap_err();
            assert_eq!(e.code().map(|c| c.code()), Some("26000"), "[{io}] {e}");
        }
        for c in clients {
            c.join().unwrap();
        }
        // psql: a PREPARE among other statements in one query string, then used in the
        // next queries of the session, wherever they land.
        let o = psql(
            port,
            "app",
            APP_PASSWORD,
            "shop",
            "SELECT 1; PREPARE multi(int) AS SELECT $1 * 2; SELECT 2",
        );
        assert!(o.status.success(), "[{io}] {}", text(&o));
        let o = program("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                "app",
                "-d",
                "shop",
            ])
            .args(["-At", "-v", "ON_ERROR_STOP=1"])
            .args([
                "-c",
                "SELECT 1; PREPARE multi(int) AS SELECT $1 * 2; SELECT 2",
            ])
            .args(["-c", "BEGIN", "-c", "SELECT 1", "-c", "COMMIT"])
            .args(["-c", "EXECUTE multi(21)"])
            .args([
                "-c",
                "SELECT name, statement FROM pg_prepared_statements WHERE name = 'multi'",
            ])
            .env("PGPASSWORD", APP_PASSWORD)
            .env("PGSSLMODE", "disable")
            .output()
            .unwrap();
        let out = text(&o);
        assert!(o.status.success(), "[{io}] {out}");
        assert!(out.contains("\n42\n"), "[{io}] {out}");
        // Its source as the server keeps it: the whole query string on the connection it
        // was prepared on, its own statement where dbproxy prepared it again (README).
        assert!(
            out.contains("multi|SELECT 1; PREPARE multi(int) AS SELECT $1 * 2; SELECT 2")
                || out.contains("multi|PREPARE multi(int) AS SELECT $1 * 2\n"),
            "[{io}] {out}"
        );

        assert_eq!(p.pins_started("text_prepare"), 0, "[{io}]");
        assert!(db.backends("app") <= 3, "[{io}]");
        let (verified, dirty) = p.checkin_verification();
        println!("[{io}] check-ins verified {verified}, dirty {dirty}");
        assert!(verified > 500, "[{io}] {verified}");
        assert_eq!(dirty, 0, "[{io}] {}", p.log());
    }
}

/// A server connection holds at most 1,000 of the clients' statements: past that, the least
/// recently used are closed as it goes back to the pool, and a client's closed statement is
/// prepared again where it is used next. The check-in verifier agrees with the record.
#[test]
fn a_connection_with_too_many_statements_closes_the_least_recently_used() {
    let db = PgDb::start(&[]);
    for io in DRIVERS {
        let p = proxy_with(
            &db,
            io,
            "verify_checkin = true",
            "max_connections = 1\nmax_idle_connections = 1",
        );
        let mut c = client(p.port);
        let stmts: Vec<_> = (0..1100)
            .map(|i| c.prepare(&format!("SELECT {i}::int")).unwrap())
            .collect();
        for (i, s) in stmts.iter().enumerate() {
            let v: i32 = c.query_one(s, &[]).unwrap().get(0);
            assert_eq!(v as usize, i, "[{io}]");
        }
        let held: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE '\\_\\_dbp%'",
                &[],
            )
            .unwrap()
            .get(0);
        assert!(
            (750..=1001).contains(&held),
            "[{io}] {held} statements on the server"
        );
        // The least recently used went first: the first ones, prepared again when used.
        for (i, s) in stmts.iter().enumerate().take(20) {
            let v: i32 = c.query_one(s, &[]).unwrap().get(0);
            assert_eq!(v as usize, i, "[{io}]");
        }
        let (verified, dirty) = p.checkin_verification();
        assert!(verified > 1000, "[{io}] {verified}");
        assert_eq!(dirty, 0, "[{io}] {}", p.log());
    }
}
