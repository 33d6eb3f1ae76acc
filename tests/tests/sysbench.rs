//! sysbench through dbproxy.

use proxy_tests::*;
use std::process::Command;

fn sysbench(port: u16, password: &str, args: &[&str]) -> std::process::Output {
    Command::new("sysbench")
        .args([
            "--db-driver=mysql",
            "--mysql-host=127.0.0.1",
            "--mysql-user=app",
            "--mysql-db=shop",
        ])
        .arg(format!("--mysql-port={port}"))
        .arg(format!("--mysql-password={password}"))
        .args(["--tables=4", "--table-size=10000"])
        .args(args)
        .output()
        .expect("sysbench (apt-get install sysbench)")
}

fn field(out: &str, name: &str) -> String {
    out.lines()
        .find(|l| l.trim_start().starts_with(name))
        .map(|l| l.trim().to_string())
        .unwrap_or_default()
}

#[test]
fn oltp_read_write_prepared_16_threads_no_errors() {
    let db = MariaDb::start();
    let prep = sysbench(db.port, DB_PASSWORD, &["oltp_read_write", "prepare"]);
    assert!(
        prep.status.success(),
        "{}",
        String::from_utf8_lossy(&prep.stderr)
    );
    let secs = std::env::var("DBPROXY_SYSBENCH_SECONDS").unwrap_or_else(|_| "30".into());
    for io in DRIVERS {
        let proxy = Proxy::start(&db, io, "max_connections = 32\nmax_idle_connections = 32");
        let out = sysbench(
            proxy.port,
            APP_PASSWORD,
            &[
                "oltp_read_write",
                "run",
                "--threads=16",
                &format!("--time={secs}"),
                "--db-ps-mode=auto",
            ],
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let err = String::from_utf8_lossy(&out.stderr);
        println!(
            "[{io}] {} | {} | {}",
            field(&text, "transactions:"),
            field(&text, "queries:"),
            field(&text, "ignored errors:")
        );
        assert!(
            out.status.success(),
            "[{io}] sysbench failed: {err}\n{text}"
        );
        assert!(
            !text.contains("FATAL") && !err.contains("FATAL"),
            "[{io}] {err}"
        );
        let tx: u64 = field(&text, "transactions:")
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!(tx > 0, "[{io}] no transactions ran: {text}");
        // Deadlocks between sysbench's own threads are retried by sysbench ("ignored
        // errors"); anything else makes it fail above.
    }
}

#[test]
fn oltp_read_write_prepared_256_threads_on_16_connections() {
    raise_fd_limit();
    let db = MariaDb::start();
    let prep = sysbench(db.port, DB_PASSWORD, &["oltp_read_write", "prepare"]);
    assert!(
        prep.status.success(),
        "{}",
        String::from_utf8_lossy(&prep.stderr)
    );
    let secs = std::env::var("DBPROXY_SYSBENCH_SECONDS").unwrap_or_else(|_| "20".into());
    for io in DRIVERS {
        let proxy = Proxy::start(&db, io, "max_connections = 16\nmax_idle_connections = 16");
        let out = sysbench(
            proxy.port,
            APP_PASSWORD,
            &[
                "oltp_read_write",
                "run",
                "--threads=256",
                &format!("--time={secs}"),
                "--db-ps-mode=auto",
            ],
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let err = String::from_utf8_lossy(&out.stderr);
        let opened =
            proxy.metric("dbproxy_backend_connections_opened_total{target_group=\"default\"}");
        println!(
            "[{io}] 256 threads on {opened} backend connections: {} | {} | {}",
            field(&text, "transactions:"),
            field(&text, "queries:"),
            field(&text, "ignored errors:")
        );
        assert!(
            out.status.success(),
            "[{io}] sysbench failed: {err}\n{text}"
        );
        assert!(
            !text.contains("FATAL") && !err.contains("FATAL"),
            "[{io}] {err}"
        );
        assert!(opened <= 16, "[{io}] {opened} backend connections");
        let tx: u64 = field(&text, "transactions:")
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!(tx > 0, "[{io}] no transactions ran: {text}");
    }
}
