//! Operating dbproxy: RDS Proxy's metrics under a sysbench run, `/status` and the SQL
//! console agreeing, PAUSE/RESUME, reload under load, the status page in a real browser.

use proxy_tests::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

fn status_json(admin: u16) -> Value {
    let (status, _, body) = http_get(admin, "/status");
    assert!(status.contains(" 200 "), "{status}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// Every sample of the scrape, by series (name and labels as printed).
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            Some((series.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn sum_of(s: &BTreeMap<String, f64>, name: &str, label: &str) -> f64 {
    s.iter()
        .filter(|(k, _)| (k.starts_with(&format!("{name}{{")) || *k == name) && k.contains(label))
        .map(|(_, v)| v)
        .sum()
}

/// RDS Proxy's metric set, as the issue lists it.
const RDS_METRICS: [&str; 18] = [
    "dbproxy_client_connections",
    "dbproxy_client_connections_received_total",
    "dbproxy_client_connections_closed_total",
    "dbproxy_client_connections_setup_succeeded_total",
    "dbproxy_client_connections_setup_failed_auth_total",
    "dbproxy_client_connections_tls",
    "dbproxy_database_connections",
    "dbproxy_database_connections_currently_borrowed",
    "dbproxy_database_connections_currently_in_transaction",
    "dbproxy_database_connections_currently_session_pinned",
    "dbproxy_database_connection_requests_total",
    "dbproxy_database_connections_setup_failed_total",
    "dbproxy_database_connections_borrow_latency_seconds_bucket",
    "dbproxy_query_requests_total",
    "dbproxy_query_response_latency_seconds_bucket",
    "dbproxy_query_database_response_latency_seconds_bucket",
    "dbproxy_max_database_connections_allowed",
    "dbproxy_availability_percentage",
];

/// The endpoint whose name needs escaping in label values.
const ODD_NAME: &str = r#"odd "name" \ here"#;
const ODD_LABEL: &str = r#"endpoint="odd \"name\" \\ here""#;

#[test]
fn metrics_follow_a_sysbench_run() {
    raise_fd_limit();
    let db = MariaDb::start();
    sysbench_prepare(db.port, DB_PASSWORD, "oltp_read_write");
    for io in DRIVERS {
        let odd_port = free_port();
        let sections = format!(
            "[[endpoints]]\nname = '{ODD_NAME}'\nlisten = \"127.0.0.1:{odd_port}\"\ntarget_group = \"default\"\n"
        );
        let proxy = Proxy::start_custom(
            &db,
            io,
            "",
            "max_connections = 8\nmax_idle_connections = 8",
            &sections,
        );
        let (status, headers, _) = http_get(proxy.admin, "/metrics");
        assert!(status.contains(" 200 "), "[{io}] {status}");
        assert!(headers.contains("openmetrics-text"), "[{io}] {headers}");
        let before = samples(&proxy.metrics());
        // One refused login on the odd endpoint.
        let refused = mariadb_cli(odd_port, "app", "wrong", &[], "SELECT 1");
        assert!(!refused.status.success(), "[{io}]");
        let threads = 4;
        let out = sysbench_command(odd_port, APP_PASSWORD)
            .args([
                "oltp_read_write",
                "run",
                &format!("--threads={threads}"),
                "--time=5",
                "--db-ps-mode=auto",
            ])
            .output()
            .expect("sysbench");
        let report = sysbench_report(&format!("[{io}] metrics run:"), &out);
        let queries: f64 = sysbench_field(&report, "queries:")
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        assert!(queries > 0.0, "[{io}] {report}");
        // Every sysbench connection has closed (counted as it ends).
        wait_until(
            "the clients to be counted closed",
            Duration::from_secs(10),
            || proxy.metric(&format!("dbproxy_client_connections{{{ODD_LABEL}}}")) == 0,
        );
        let text = proxy.metrics();
        let after = samples(&text);
        for m in RDS_METRICS {
            assert!(
                after
                    .keys()
                    .any(|k| k == m || k.starts_with(&format!("{m}{{"))),
                "[{io}] {m} missing from:\n{text}"
            );
        }
        let delta =
            |name: &str, label: &str| sum_of(&after, name, label) - sum_of(&before, name, label);
        // Statements: sysbench's own count, and at most a few more per connection
        // (what sysbench sends when it connects).
        let counted = delta("dbproxy_query_requests_total", ODD_LABEL);
        println!("[{io}] sysbench queries {queries}, dbproxy_query_requests_total +{counted}");
        assert!(
            counted >= queries && counted <= queries + 4.0 * f64::from(threads),
            "[{io}] sysbench ran {queries} statements, dbproxy counted {counted}"
        );
        assert_eq!(
            delta("dbproxy_query_response_latency_seconds_count", ODD_LABEL),
            counted,
            "[{io}] every statement timed"
        );
        let rw = "target_role=\"read_write\"";
        let db_timed = delta("dbproxy_query_database_response_latency_seconds_count", rw);
        assert!(
            db_timed > 0.0 && db_timed <= counted,
            "[{io}] {db_timed} of {counted}"
        );
        let borrows = delta("dbproxy_database_connection_requests_total", rw);
        assert!(borrows > 0.0, "[{io}]");
        assert_eq!(
            delta(
                "dbproxy_database_connections_borrow_latency_seconds_count",
                rw
            ),
            borrows,
            "[{io}] every borrow's latency counted"
        );
        assert!(
            delta(
                "dbproxy_client_connections_setup_succeeded_total",
                ODD_LABEL
            ) >= f64::from(threads),
            "[{io}]"
        );
        assert_eq!(
            delta(
                "dbproxy_client_connections_setup_failed_auth_total",
                ODD_LABEL
            ),
            1.0,
            "[{io}]"
        );
        assert_eq!(
            delta("dbproxy_client_connections_received_total", ODD_LABEL),
            delta("dbproxy_client_connections_closed_total", ODD_LABEL),
            "[{io}] every connection received was closed"
        );
        assert!(
            sum_of(&after, "dbproxy_database_connections", rw) <= 8.0
                && sum_of(&after, "dbproxy_max_database_connections_allowed", rw) == 8.0,
            "[{io}]"
        );
        assert_eq!(
            sum_of(
                &after,
                "dbproxy_availability_percentage",
                "target_group=\"default\""
            ),
            100.0,
            "[{io}]"
        );
        // Histogram buckets are cumulative.
        let buckets: Vec<f64> = text
            .lines()
            .filter(|l| {
                l.starts_with("dbproxy_query_response_latency_seconds_bucket")
                    && l.contains(ODD_LABEL)
            })
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse().ok()))
            .collect();
        assert!(
            buckets.len() > 5 && buckets.windows(2).all(|w| w[0] <= w[1]),
            "[{io}] {buckets:?}"
        );
        assert_eq!(buckets.last().copied(), Some(counted), "[{io}] +Inf bucket");
        // Label values are escaped as the text format says (the raw name never appears).
        assert!(text.contains(ODD_LABEL), "[{io}]");
        assert!(!text.contains(&format!("\"{ODD_NAME}\"")), "[{io}]");
    }
}

/// The `[admin]` lines of a SQL console on `sql_port` (user admin, password admin-secret).
fn console_section(sql_port: u16) -> String {
    format!(
        "sql_listen = \"127.0.0.1:{sql_port}\"\nadmin_user = \"admin\"\nadmin_password = \"admin-secret\""
    )
}

/// The console's `SHOW ...` as rows of tab-separated cells (header first).
fn console(port: u16, sql: &str) -> Vec<Vec<String>> {
    let out = mariadb_cli(port, "admin", "admin-secret", &["--batch"], sql);
    assert!(
        out.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect()
}

#[test]
fn the_sql_console_and_status_agree_and_pause_holds_statements() {
    let db = MariaDb::start();
    for io in DRIVERS {
        let sql_port = free_port();
        let proxy = Proxy::start_admin(
            db.port,
            io,
            "",
            "max_connections = 6\nmax_idle_connections = 6",
            &console_section(sql_port),
            "",
            &[],
        );
        // A client in a transaction, one idle.
        let mut tx = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        mysql::prelude::Queryable::query_drop(&mut tx, "BEGIN").unwrap();
        mysql::prelude::Queryable::query_drop(&mut tx, "SELECT 1").unwrap();
        let mut idle = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        mysql::prelude::Queryable::query_drop(&mut idle, "SELECT 1").unwrap();

        let pools = console(sql_port, "SHOW POOLS");
        let status = status_json(proxy.admin);
        let head = &pools[0];
        let col = |name: &str| head.iter().position(|h| h == name).unwrap();
        let row = pools
            .iter()
            .find(|r| r[0] == "default")
            .unwrap_or_else(|| panic!("[{io}] {pools:?}"));
        let json = status["pools"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["pool"] == "default")
            .unwrap();
        for field in [
            "target_group",
            "target_role",
            "max_connections",
            "open",
            "idle",
            "borrowed",
            "in_transaction",
            "pinned",
            "requests",
        ] {
            let j = match &json[field] {
                Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            assert_eq!(row[col(field)], j, "[{io}] SHOW POOLS {field} vs /status");
        }
        assert_eq!(row[col("max_connections")], "6", "[{io}]");
        assert_eq!(row[col("in_transaction")], "1", "[{io}]");
        let clients = console(sql_port, "SHOW CLIENTS");
        assert_eq!(clients.len(), 3, "[{io}] two clients: {clients:?}");
        assert_eq!(status["clients"].as_array().unwrap().len(), 2, "[{io}]");
        let targets = console(sql_port, "SHOW TARGETS");
        assert!(
            targets
                .iter()
                .any(|r| r.contains(&"writer".to_string()) && r.contains(&"yes".to_string())),
            "[{io}] {targets:?}"
        );
        let pins = console(sql_port, "SHOW PINS");
        assert!(
            pins.iter()
                .any(|r| r[0] == "default" && r[1] == "transaction" && r[2] == "1"),
            "[{io}] {pins:?}"
        );
        // `dbproxy status` prints the same as tables.
        let out = Command::new(dbproxy_bin())
            .args(["status", "--admin", &format!("127.0.0.1:{}", proxy.admin)])
            .output()
            .unwrap();
        let tables = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && tables.contains("POOLS"),
            "[{io}] {tables}"
        );
        assert!(
            tables.contains("TARGETS") && tables.contains(&format!("127.0.0.1:{}", db.port)),
            "[{io}] {tables}"
        );
        // A wrong admin password is refused.
        let bad = mariadb_cli(sql_port, "admin", "nope", &[], "SHOW POOLS");
        assert!(
            String::from_utf8_lossy(&bad.stderr).contains("1045"),
            "[{io}]"
        );
        let (h, _, body) = http_get(proxy.admin, "/healthz");
        assert!(
            h.contains(" 200 ") && body.trim() == "ok",
            "[{io}] {h} {body}"
        );

        // PAUSE: the idle client's next statement waits; the one in a transaction goes on.
        console(sql_port, "PAUSE");
        let waiter = std::thread::spawn(move || {
            mysql::prelude::Queryable::query_first::<u64, _>(&mut idle, "SELECT 42").unwrap()
        });
        wait_until("the statement to be held", Duration::from_secs(10), || {
            status_json(proxy.admin)["held_statements"] == 1
        });
        mysql::prelude::Queryable::query_drop(&mut tx, "SELECT 2").unwrap();
        mysql::prelude::Queryable::query_drop(&mut tx, "COMMIT").unwrap();
        assert!(
            !waiter.is_finished(),
            "[{io}] the held statement ran while paused"
        );
        assert_eq!(status_json(proxy.admin)["paused"], true, "[{io}]");
        console(sql_port, "RESUME");
        assert_eq!(waiter.join().unwrap(), Some(42), "[{io}]");
        assert_eq!(status_json(proxy.admin)["held_statements"], 0, "[{io}]");
    }
}

/// `path`'s text with `from` replaced (which must be there).
fn edit_config(path: &std::path::Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{from} not in {text}");
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}

fn login_error(port: u16, password: &str) -> Option<String> {
    let out = mariadb_cli(port, "app", password, &[], "SELECT 1");
    (!out.status.success()).then(|| String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn reload_under_load_changes_the_pool_and_a_password_and_refuses_a_broken_file() {
    raise_fd_limit();
    let db = MariaDb::start();
    sysbench_prepare(db.port, DB_PASSWORD, "oltp_read_only");
    for io in DRIVERS {
        let sql_port = free_port();
        let proxy = Proxy::start_admin(
            db.port,
            io,
            "",
            "max_connections = 8\nmax_idle_connections = 8",
            &console_section(sql_port),
            "",
            &[],
        );
        let port = proxy.port;
        let bench = std::thread::spawn(move || {
            sysbench_command(port, APP_PASSWORD)
                .args([
                    "oltp_read_only",
                    "run",
                    "--threads=16",
                    "--time=12",
                    "--db-ps-mode=auto",
                ])
                .output()
                .expect("sysbench")
        });
        let rw = "{target_group=\"default\",target_role=\"read_write\"}";
        // Every sysbench thread logged in (with the password about to change).
        wait_until("sysbench's 16 clients", Duration::from_secs(20), || {
            proxy.metric("dbproxy_client_connections") >= 16
                && proxy.metric(&format!("dbproxy_database_connection_requests_total{rw}")) > 100
        });
        // The pool shrinks and app's password changes, while 16 clients run.
        edit_config(
            &proxy.config,
            "max_connections = 8\nmax_idle_connections = 8",
            "max_connections = 4\nmax_idle_connections = 4",
        );
        edit_config(
            &proxy.config,
            &format!("name = \"app\"\npassword = \"{APP_PASSWORD}\""),
            "name = \"app\"\npassword = \"app-secret-2\"",
        );
        proxy.sighup();
        wait_until("the reload", Duration::from_secs(10), || {
            proxy.log().contains("configuration reloaded")
        });
        assert_eq!(
            proxy.metric(&format!("dbproxy_max_database_connections_allowed{rw}")),
            4,
            "[{io}]"
        );
        wait_until("the pool to shrink to 4", Duration::from_secs(20), || {
            proxy.metric(&format!("dbproxy_database_connections{rw}")) <= 4
        });
        let old = login_error(port, APP_PASSWORD);
        assert!(
            old.as_deref().is_some_and(|e| e.contains("1045")),
            "[{io}] the old password: {old:?}"
        );
        assert_eq!(
            login_error(port, "app-secret-2"),
            None,
            "[{io}] the new password"
        );
        // A broken file is refused, through the console too; the running one stays.
        edit_config(
            &proxy.config,
            "max_connections = 4",
            "max_connections = \"many\"",
        );
        proxy.sighup();
        wait_until("the refusal", Duration::from_secs(10), || {
            proxy.log().contains("configuration not reloaded")
        });
        let out = mariadb_cli(sql_port, "admin", "admin-secret", &[], "RELOAD");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success()
                && err.contains("not reloaded")
                && err.contains("max_connections"),
            "[{io}] {err}"
        );
        assert_eq!(
            login_error(port, "app-secret-2"),
            None,
            "[{io}] still serving"
        );
        assert_eq!(
            proxy.metric(&format!("dbproxy_max_database_connections_allowed{rw}")),
            4,
            "[{io}]"
        );
        let out = bench.join().unwrap();
        let report = sysbench_report(&format!("[{io}] 16 threads through two reloads:"), &out);
        let errors = sysbench_field(&report, "ignored errors:");
        assert!(errors.contains(" 0 "), "[{io}] {errors}");
        assert!(proxy.log().contains("user app changed"), "[{io}]");
    }
}

/// The value of `attr="..."` on the element that has `marker` in its tag.
fn attr(dom: &str, marker: &str, attr: &str) -> Option<u64> {
    let at = dom.find(marker)?;
    let tag_start = dom[..at].rfind('<')?;
    let tag = &dom[tag_start..at + dom[at..].find('>')?];
    let v = tag.split(&format!("{attr}=\"")).nth(1)?;
    v.split('"').next()?.parse().ok()
}

#[test]
fn the_status_page_loads_in_a_browser_and_its_charts_move() {
    let db = MariaDb::start();
    let artifacts = workspace().join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    for io in DRIVERS {
        let proxy = Proxy::start(&db, io, "");
        let port = proxy.port;
        // Some traffic while the page watches.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let load = std::thread::spawn(move || {
            let mut c = connect(port, "app", APP_PASSWORD, "shop").unwrap();
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                mysql::prelude::Queryable::query_drop(&mut c, "SELECT 1").unwrap();
            }
        });
        let url = format!("http://127.0.0.1:{}/", proxy.admin);
        let (dom, log) = chromium(&url, &["--dump-dom"]);
        let shot = artifacts.join(format!("status-page-{io}.png"));
        let _ = std::fs::remove_file(&shot);
        chromium(
            &url,
            &[
                "--window-size=1280,1700",
                &format!("--screenshot={}", shot.display()),
            ],
        );
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        load.join().unwrap();
        // No script error, no console message (a CSP violation or a failed fetch says so).
        assert_eq!(
            attr(&dom, "<html", "data-js-errors"),
            Some(0),
            "[{io}] {dom}"
        );
        let console: Vec<&str> = log.lines().filter(|l| l.contains("CONSOLE")).collect();
        assert!(console.is_empty(), "[{io}] console: {console:?}");
        // Its error line stayed empty (every /status fetch worked).
        assert!(dom.contains("<span id=\"error\"></span>"), "[{io}] {dom}");
        // It refreshed, and each chart gained points.
        let refreshes = attr(&dom, "<html", "data-refreshes").unwrap_or(0);
        assert!(refreshes >= 3, "[{io}] {refreshes} refreshes");
        for chart in ["chart-clients", "chart-db", "chart-qps"] {
            let points = attr(&dom, &format!("id=\"{chart}\""), "data-points").unwrap_or(0);
            assert_eq!(points, refreshes, "[{io}] {chart}");
        }
        // The endpoint, the target and its role, the pool.
        assert!(
            dom.contains("127.0.0.1:") && dom.contains(&format!("127.0.0.1:{}", db.port)),
            "[{io}]"
        );
        assert!(dom.contains(">writer<") && dom.contains(">up<"), "[{io}]");
        assert!(
            dom.contains(">default<") && dom.contains(">read_write<"),
            "[{io}]"
        );
        let png = std::fs::read(&shot).unwrap_or_default();
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 10_000,
            "[{io}] screenshot {}",
            shot.display()
        );
        println!(
            "[{io}] status page: {refreshes} refreshes, screenshot {}",
            shot.display()
        );
    }
}

#[test]
fn json_logs_carry_each_clients_span_and_query_logging_blanks_literals() {
    let db = MariaDb::start();
    never_logged("hunter2-in-a-literal");
    for io in DRIVERS {
        let sql_port = free_port();
        let proxy = Proxy::start_admin(
            db.port,
            io,
            "log_format = \"json\"",
            "",
            &console_section(sql_port),
            "",
            &[],
        );
        let mut c = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        let q = "SELECT 'hunter2-in-a-literal' AS secret_column";
        mysql::prelude::Queryable::query_drop(&mut c, q).unwrap();
        assert!(
            !proxy.log().contains("secret_column"),
            "[{io}] logged while off"
        );
        console(sql_port, "QUERY LOGGING ON");
        assert!(
            status_json(proxy.admin)["query_logging_until"].is_u64(),
            "[{io}]"
        );
        mysql::prelude::Queryable::query_drop(&mut c, q).unwrap();
        let stmt =
            mysql::prelude::Queryable::prep(&mut c, "SELECT ? + 1 AS prepared_column").unwrap();
        let two: Option<i64> = mysql::prelude::Queryable::exec_first(&mut c, &stmt, (1,)).unwrap();
        assert_eq!(two, Some(2));
        console(sql_port, "QUERY LOGGING OFF");
        mysql::prelude::Queryable::query_drop(&mut c, "SELECT 'after' AS after_off").unwrap();
        let bad = mariadb_cli(proxy.port, "app", "wrong-password", &[], "SELECT 1");
        assert!(!bad.status.success());
        let log = proxy.log();
        // Every line is a JSON object.
        let lines: Vec<Value> = log
            .lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("[{io}] not JSON ({e}): {l}"))
            })
            .collect();
        let queries: Vec<&Value> = lines
            .iter()
            .filter(|l| l["target"] == "dbproxy::query")
            .collect();
        assert_eq!(queries.len(), 2, "[{io}] {queries:?}");
        let text = |v: &Value| {
            v["fields"]["statement"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        };
        assert_eq!(text(queries[0]), "SELECT '?' AS secret_column", "[{io}]");
        assert_eq!(
            text(queries[1]),
            "EXECUTE SELECT ? + 1 AS prepared_column",
            "[{io}]"
        );
        for q in &queries {
            assert_eq!(q["fields"]["user"], "app", "[{io}]");
            assert!(q["fields"]["duration_us"].is_u64(), "[{io}]");
            // The client's span: its id, address and user.
            assert_eq!(q["span"]["name"], "client", "[{io}] {q}");
            assert_eq!(q["span"]["user"], "app", "[{io}] {q}");
            assert!(
                q["span"]["peer"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("127.0.0.1:"),
                "[{io}]"
            );
            assert!(q["span"]["id"].is_u64(), "[{io}]");
        }
        assert!(!log.contains("after_off"), "[{io}] logged after OFF");
        // A refused login is logged in its client's span too.
        assert!(
            lines.iter().any(|l| l["span"]["name"] == "client"
                && l["fields"]["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("access denied")),
            "[{io}] {log}"
        );
    }
}

#[test]
fn clients_on_the_same_host_connect_through_a_unix_socket() {
    let db = MariaDb::start();
    for io in DRIVERS {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("run/mysql.sock");
        let sections = format!(
            "[[endpoints]]\nname = \"local\"\nlisten = \"unix:{}\"\ntarget_group = \"default\"\n",
            sock.display()
        );
        let mut proxy = Proxy::start_custom(&db, io, "", "", &sections);
        let cli = |password: &str, sql: &str| {
            Command::new("mariadb")
                .arg("--no-defaults")
                .arg(format!("--socket={}", sock.display()))
                .args([
                    "-u",
                    "app",
                    &format!("-p{password}"),
                    "--batch",
                    "--skip-column-names",
                    "-e",
                    sql,
                ])
                .output()
                .unwrap()
        };
        // Several clients, spread over the workers, each through the socket.
        for i in 0..6 {
            let out = cli(APP_PASSWORD, &format!("SELECT {i} + 1"));
            assert!(
                out.status.success(),
                "[{io}] {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                (i + 1).to_string(),
                "[{io}]"
            );
        }
        let bad = cli("wrong", "SELECT 1");
        assert!(
            String::from_utf8_lossy(&bad.stderr).contains("1045"),
            "[{io}]"
        );
        assert_eq!(
            proxy.metric("dbproxy_client_connections_setup_succeeded_total{endpoint=\"local\"}"),
            6,
            "[{io}]"
        );
        // The socket is dbproxy's: it goes away when dbproxy stops.
        assert!(sock.exists(), "[{io}]");
        proxy.stop();
        wait_until("the socket file to go", Duration::from_secs(5), || {
            !sock.exists()
        });
    }
}

#[test]
fn a_reload_moves_the_group_to_another_server_without_dropping_a_client() {
    let old = MariaDb::start();
    let new = MariaDb::start();
    for io in DRIVERS {
        let mut proxy = Proxy::start(&old, io, "");
        let port_of = |c: &mut mysql::Conn| -> u16 {
            mysql::prelude::Queryable::query_first(c, "SELECT @@port")
                .unwrap()
                .unwrap()
        };
        let mut tx = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        let mut idle = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        assert_eq!(port_of(&mut idle), old.port, "[{io}]");
        mysql::prelude::Queryable::query_drop(&mut tx, "BEGIN").unwrap();
        assert_eq!(port_of(&mut tx), old.port, "[{io}]");
        // The group's only target is replaced.
        edit_config(
            &proxy.config,
            &format!("targets = [\"127.0.0.1:{}\"]", old.port),
            &format!("targets = [\"127.0.0.1:{}\"]", new.port),
        );
        proxy.sighup();
        wait_until("the new writer", Duration::from_secs(20), || {
            let s = status_json(proxy.admin);
            let g = &s["target_groups"][0];
            g["writer"] == format!("127.0.0.1:{}", new.port)
                && g["targets"].as_array().is_some_and(|t| t.len() == 1)
        });
        // The transaction stays where it began, to its end.
        assert_eq!(port_of(&mut tx), old.port, "[{io}] mid-transaction");
        mysql::prelude::Queryable::query_drop(&mut tx, "COMMIT").unwrap();
        // Then every client, old and new, is served by the new server.
        assert_eq!(port_of(&mut tx), new.port, "[{io}]");
        assert_eq!(port_of(&mut idle), new.port, "[{io}]");
        let mut fresh = connect(proxy.port, "app", APP_PASSWORD, "shop").unwrap();
        assert_eq!(port_of(&mut fresh), new.port, "[{io}]");
        assert!(proxy.log().contains("target removed (reload)"), "[{io}]");
        let metrics = proxy.metrics();
        assert!(
            !metrics.contains(&format!("target=\"127.0.0.1:{}\"", old.port)),
            "[{io}] the removed target is still reported"
        );
        proxy.stop();
    }
}

/// curl against the admin side: (status code, headers lowercased, body).
fn curl(port: u16, path: &str, login: Option<&str>) -> (u16, String, String) {
    let mut c = Command::new("curl");
    c.args(["-s", "-D", "-", "--max-time", "10"])
        .arg(format!("http://127.0.0.1:{port}{path}"));
    if let Some(l) = login {
        c.args(["-u", l]);
    }
    let out = c.output().expect("curl (apt-get install curl)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, head.to_lowercase(), body.to_string())
}

/// A configuration of its own for `dbproxy check-config` and `run`: one endpoint on
/// `port`, one group in front of `db_port` with `group` lines, `[admin]` lines `admin`.
fn own_config(port: u16, db_port: u16, group: &str, admin: &str) -> tempfile::NamedTempFile {
    let text = format!(
        "[[endpoints]]\nname = \"e\"\nlisten = \"127.0.0.1:{port}\"\ntarget_group = \"g\"\n\n\
         [[target_groups]]\nname = \"g\"\ntargets = [\"127.0.0.1:{db_port}\"]\n{group}\n\n\
         [[users]]\nname = \"app\"\npassword = \"{APP_PASSWORD}\"\nbackend_password = \"{DB_PASSWORD}\"\n\n\
         [admin]\n{admin}\n"
    );
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), text).unwrap();
    f
}

fn check_config(f: &tempfile::NamedTempFile) -> (bool, String) {
    let out = Command::new(dbproxy_bin())
        .args(["check-config", "--config"])
        .arg(f.path())
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `[admin] http_auth = "basic"`, tried with curl: every path asks for the admin login (401
/// with a Basic challenge, which a browser answers with its login dialog) and is served
/// with it; a wrong password is refused; `/healthz` stays open; `/metrics` is open only
/// with `public_metrics` (applied by a reload); `dbproxy status` logs in with `--user`.
/// (The HTTP side is not on the data path: one io driver.)
#[test]
fn the_admin_http_side_asks_for_the_admin_login() {
    let db = MariaDb::start();
    let admin = "admin_user = \"admin\"\nadmin_password = \"admin-secret\"\nhttp_auth = \"basic\"";
    let proxy = Proxy::start_admin(db.port, "epoll", "", "", admin, "", &[]);
    let good = Some("admin:admin-secret");
    for path in ["/", "/status", "/metrics", "/nosuchpage"] {
        let (code, head, _) = curl(proxy.admin, path, None);
        assert_eq!(code, 401, "{path} without a login: {head}");
        assert!(
            head.contains("www-authenticate: basic realm=\"dbproxy\""),
            "{path}: {head}"
        );
        let (code, _, _) = curl(proxy.admin, path, Some("admin:wrong"));
        assert_eq!(code, 401, "{path} with a wrong password");
        let (code, _, _) = curl(proxy.admin, path, Some("nobody:admin-secret"));
        assert_eq!(code, 401, "{path} as another user");
    }
    let (code, head, page) = curl(proxy.admin, "/", good);
    assert_eq!(code, 200, "{head}");
    assert!(page.contains("<html"), "the status page: {page}");
    let (code, _, status) = curl(proxy.admin, "/status", good);
    assert_eq!(code, 200);
    let status: Value = serde_json::from_str(&status).unwrap();
    assert!(status["pools"].is_array(), "{status}");
    let (code, _, metrics) = curl(proxy.admin, "/metrics", good);
    assert_eq!(code, 200);
    assert!(metrics.contains("dbproxy_client_connections"), "{metrics}");
    let (code, _, body) = curl(proxy.admin, "/healthz", None);
    assert_eq!((code, body.trim()), (200, "ok"), "/healthz needs no login");
    assert!(proxy.log().contains("admin HTTP login refused"));

    // dbproxy status logs in; without a login it says what is missing.
    let status_cmd = |user: Option<&str>| {
        let mut c = Command::new(dbproxy_bin());
        c.args(["status", "--admin", &format!("127.0.0.1:{}", proxy.admin)])
            .env("DBPROXY_ADMIN_PASSWORD", "admin-secret");
        if let Some(u) = user {
            c.args(["--user", u]);
        }
        c.output().unwrap()
    };
    let out = status_cmd(Some("admin"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("default"));
    let out = status_cmd(None);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("asks for a login"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // public_metrics: a scraper without credentials; the rest still asks.
    edit_config(
        &proxy.config,
        "http_auth = \"basic\"",
        "http_auth = \"basic\"\npublic_metrics = true",
    );
    proxy.sighup();
    wait_until(
        "the reload to open /metrics",
        Duration::from_secs(10),
        || curl(proxy.admin, "/metrics", None).0 == 200,
    );
    assert_eq!(curl(proxy.admin, "/status", None).0, 401);
}

/// An admin side reachable from other hosts without a login is accepted, with a warning
/// naming the key, by `check-config` and at start; with `http_auth = "basic"` there is no
/// warning. A group that sets only `max_connections = 2` is valid (the idle limit follows
/// it).
#[test]
fn an_open_admin_side_is_warned_about_and_a_small_group_is_valid() {
    let db = MariaDb::start();
    let (port, admin) = (free_port(), free_port());
    let open = own_config(
        port,
        db.port,
        "max_connections = 2",
        &format!("listen = \"0.0.0.0:{admin}\""),
    );
    let (ok, text) = check_config(&open);
    assert!(ok, "{text}");
    assert!(
        text.contains("warning: admin.listen") && text.contains("http_auth"),
        "{text}"
    );
    let guarded = own_config(
        port,
        db.port,
        "max_connections = 2",
        &format!(
            "listen = \"0.0.0.0:{admin}\"\nhttp_auth = \"basic\"\nadmin_user = \"admin\"\nadmin_password = \"admin-secret\""
        ),
    );
    let (ok, text) = check_config(&guarded);
    assert!(ok && !text.contains("warning"), "{text}");
    let local = own_config(
        port,
        db.port,
        "max_connections = 2",
        &format!("listen = \"127.0.0.1:{admin}\""),
    );
    let (ok, text) = check_config(&local);
    assert!(ok && !text.contains("warning"), "{text}");

    // At start, in the log; and the small group serves.
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut run = Command::new(dbproxy_bin());
    run.args(["run", "--config"])
        .arg(open.path())
        .stderr(std::fs::File::create(log.path()).unwrap());
    let mut child = spawn(run);
    wait_until("dbproxy to listen", Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let out = mariadb_cli(port, "app", APP_PASSWORD, &["-N"], "SELECT 40 + 2");
    let logged = std::fs::read_to_string(log.path()).unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "42",
        "{logged}"
    );
    assert!(
        logged.contains("WARN") && logged.contains("admin.listen"),
        "{logged}"
    );
}

/// `cargo xtask demo`, as a newcomer runs it (with the debug build and free ports): a
/// throwaway MariaDB with a seeded table, dbproxy in front of it, and the addresses of
/// the status page, the metrics and the SQL console printed; each of them answers; Ctrl-C
/// stops everything and removes what it made.
#[test]
fn the_demo_seeds_a_table_and_shows_where_everything_is() {
    let xtask = dbproxy_bin().with_file_name("xtask");
    assert!(
        xtask.exists(),
        "{} is missing: run the tests with `cargo xtask test`",
        xtask.display()
    );
    let (port, admin, console_port) = (free_port(), free_port(), free_port());
    let mut cmd = Command::new(&xtask);
    cmd.arg("demo")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .args(["--console-listen", &format!("127.0.0.1:{console_port}")])
        .arg("--dbproxy")
        .arg(dbproxy_bin())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut demo = spawn(cmd);
    let stderr = demo.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut printed = String::new();
    while !printed.contains("press Ctrl-C") {
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(l) => {
                printed.push_str(&l);
                printed.push('\n');
            }
            Err(_) => panic!("the demo did not come up:\n{printed}"),
        }
    }
    for shown in [
        format!("mariadb -h 127.0.0.1 -P {port} -u app -papp-secret shop"),
        format!("http://127.0.0.1:{admin}/"),
        format!("http://127.0.0.1:{admin}/metrics"),
        format!("mariadb -h 127.0.0.1 -P {console_port} -u admin -padmin-secret"),
        "SELECT * FROM products".to_string(),
    ] {
        assert!(printed.contains(&shown), "{shown} not in:\n{printed}");
    }
    let out = mariadb_cli(
        port,
        "app",
        APP_PASSWORD,
        &["-N", "shop"],
        "SELECT COUNT(*), MAX(name) FROM products",
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "5\ttamper",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, _, page) = curl(admin, "/", None);
    assert!(code == 200 && page.contains("<html"), "{code}");
    let (code, _, metrics) = curl(admin, "/metrics", None);
    assert!(
        code == 200 && metrics.contains("dbproxy_query_requests_total"),
        "{code}"
    );
    let pools = mariadb_cli(
        console_port,
        "admin",
        "admin-secret",
        &["--batch"],
        "SHOW POOLS",
    );
    assert!(
        String::from_utf8_lossy(&pools.stdout).contains("default"),
        "{}",
        String::from_utf8_lossy(&pools.stderr)
    );
    // Ctrl-C: a clean stop, nothing left behind.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(demo.id() as i32, libc::SIGINT) };
    let st = demo.wait().unwrap();
    assert!(st.success(), "{st}");
    let mut rest = String::new();
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(5)) {
        rest.push_str(&l);
    }
    assert!(rest.contains("stopped and cleaned up"), "{rest}");
    let dir = std::env::temp_dir().join(format!("dbproxy-demo-{}", demo.id()));
    assert!(!dir.exists(), "{} is left behind", dir.display());
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}
