//! sysbench through dbproxy.

use proxy_tests::*;

fn sysbench(port: u16, password: &str, args: &[&str]) -> std::process::Output {
    sysbench_command(port, password)
        .args(args)
        .output()
        .expect("sysbench (apt-get install sysbench)")
}

/// oltp_read_write with prepared statements through dbproxy on both drivers: sysbench
/// must finish without errors (deadlocks between its own threads it retries itself, as
/// "ignored errors"), with at most `max_connections` backend connections.
fn read_write(threads: u32, max_connections: u32, default_secs: &str) {
    raise_fd_limit();
    let db = MariaDb::start();
    sysbench_prepare(db.port, DB_PASSWORD, "oltp_read_write");
    let secs = std::env::var("DBPROXY_SYSBENCH_SECONDS").unwrap_or_else(|_| default_secs.into());
    for io in DRIVERS {
        let pool = format!(
            "max_connections = {max_connections}\nmax_idle_connections = {max_connections}"
        );
        let proxy = Proxy::start(&db, io, &pool);
        let out = sysbench(
            proxy.port,
            APP_PASSWORD,
            &[
                "oltp_read_write",
                "run",
                &format!("--threads={threads}"),
                &format!("--time={secs}"),
                "--db-ps-mode=auto",
            ],
        );
        let opened =
            proxy.metric("dbproxy_database_connections_setup_succeeded_total{target_group=\"default\",target_role=\"read_write\"}");
        let text = sysbench_report(
            &format!("[{io}] {threads} threads on {opened} backend connections:"),
            &out,
        );
        assert!(
            opened <= i64::from(max_connections),
            "[{io}] {opened} backend connections"
        );
        let tx: u64 = sysbench_field(&text, "transactions:")
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!(tx > 0, "[{io}] no transactions ran: {text}");
    }
}

#[test]
fn oltp_read_write_prepared_16_threads_no_errors() {
    read_write(16, 32, "30");
}

#[test]
fn oltp_read_write_prepared_256_threads_on_16_connections() {
    read_write(256, 16, "20");
}
