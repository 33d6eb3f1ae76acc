//! `cargo xtask bench --engine split` (and the split part of a full bench): sysbench
//! oltp_read_only and oltp_read_write over a primary and a GTID replica, through one
//! dbproxy's writer-only endpoint and its `read_write_split` endpoint, and directly against
//! the primary, interleaved in one run. For each: the rate, the share of SELECTs each
//! server ran (its `Com_select`, which counts the causal waits too), and the CPU each
//! server's process used. Writes `target/bench/split.md`.

use crate::bench::cpu_seconds;
use crate::{cargo, ensure_apt, root, run, Result, DB_TOOLS};
use proxy_tests::{free_port, Pair, APP_PASSWORD, DB_PASSWORD};

fn com_select(db: &proxy_tests::MariaDb) -> f64 {
    db.root_sql("SHOW GLOBAL STATUS LIKE 'Com_select'")
        .split_whitespace()
        .last()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// One measurement: events per second, Com_select on each server, CPU seconds of each.
struct Cell {
    rate: f64,
    selects: (f64, f64),
    cpu: (f64, f64),
}

fn sysbench(port: u16, password: &str, test: &str, secs: u32) -> std::result::Result<f64, String> {
    let mut args = vec![
        test.to_string(),
        "--threads=16".into(),
        format!("--time={secs}"),
        "--skip_trx=on".into(),
        "run".into(),
    ];
    if test == "oltp_read_write" {
        // Outside transactions, two threads' DELETE and INSERT of one id collide.
        args.insert(1, "--delete_inserts=0".into());
    }
    let out = proxy_tests::sysbench_command(port, password)
        .args(&args)
        .output()
        .map_err(|e| format!("sysbench: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "sysbench {test} on {port}: {}{text}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    text.lines()
        .find(|l| l.trim_start().starts_with("transactions:"))
        .and_then(|l| l.split('(').nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("sysbench {test}: no rate in {text}"))
}

/// Reads one answer of a raw EOF-style client: an OK, an ERR, or a whole result set.
fn read_answer(c: &mut proxy_tests::raw::RawClient) -> std::io::Result<()> {
    let (_, first) = c.try_read()?;
    if matches!(first.first(), Some(0x00 | 0xff)) {
        return Ok(());
    }
    // Column definitions, then rows, each run up to an EOF.
    for _ in 0..2 {
        loop {
            let (_, p) = c.try_read()?;
            if p.first() == Some(&0xff) {
                return Ok(());
            }
            if p.first() == Some(&0xfe) && p.len() < 9 {
                break;
            }
        }
    }
    Ok(())
}

/// The causal wait's two forms, straight against the replica (caught up, so every wait
/// answers at once): the wait pipelined ahead of the read as a statement of its own (what
/// dbproxy sends), the two as one multi-statement COM_QUERY, and the read alone. Microseconds
/// per read on one connection, and the replica's CPU per read.
fn wait_forms(pair: &Pair, n: u32) -> std::result::Result<String, String> {
    use proxy_tests::raw::RawClient;
    let pos = pair.primary.root_sql("SELECT @@gtid_binlog_pos");
    let wait = format!("SELECT MASTER_GTID_WAIT('{}', 0.25)", pos.trim());
    let read = "SELECT c FROM shop.sbtest1 WHERE id = 42";
    let query = |sql: &str| {
        let mut p = vec![0x03];
        p.extend_from_slice(sql.as_bytes());
        p
    };
    let pid = pair.replica.pid().ok_or("the replica has no pid")?;
    let mut out = String::from(
        "\nThe causal wait's two forms against the replica (caught up: each wait answers at once), \
         one connection, one read at a time:\n\n| form | µs per read | replica CPU µs per read |\n|---|---|---|\n",
    );
    let io = |e: std::io::Error| e.to_string();
    for form in [
        "read alone",
        "wait pipelined ahead (dbproxy)",
        "wait; read as one multi-statement",
    ] {
        let mut c = RawClient::login(pair.replica.port, "app", DB_PASSWORD).map_err(io)?;
        // As dbproxy's connections: no Nagle delay on the second of two small writes.
        c.s.set_nodelay(true).map_err(io)?;
        if form.starts_with("wait;") {
            // COM_SET_OPTION: multi-statements on.
            c.try_write(0, &[0x1b, 0x00, 0x00]).map_err(io)?;
            c.try_read().map_err(io)?;
        }
        let (wait_q, read_q, both) = (query(&wait), query(read), query(&format!("{wait}; {read}")));
        let cpu0 = cpu_seconds(pid);
        let t0 = std::time::Instant::now();
        for _ in 0..n {
            match form {
                "read alone" => {
                    c.try_write(0, &read_q).map_err(io)?;
                    read_answer(&mut c).map_err(io)?;
                }
                "wait pipelined ahead (dbproxy)" => {
                    c.try_write(0, &wait_q).map_err(io)?;
                    c.try_write(0, &read_q).map_err(io)?;
                    read_answer(&mut c).map_err(io)?;
                    read_answer(&mut c).map_err(io)?;
                }
                _ => {
                    c.try_write(0, &both).map_err(io)?;
                    read_answer(&mut c).map_err(io)?;
                    read_answer(&mut c).map_err(io)?;
                }
            }
        }
        let per = |d: f64| d * 1e6 / f64::from(n);
        out += &format!(
            "| {form} | {:.1} | {:.1} |\n",
            per(t0.elapsed().as_secs_f64()),
            per(cpu_seconds(pid) - cpu0)
        );
    }
    Ok(out)
}

pub fn bench(quick: bool) -> Result<String> {
    let mut needed = DB_TOOLS.to_vec();
    needed.push(("sysbench", "sysbench"));
    ensure_apt(&needed)?;
    run(
        "build dbproxy (release)",
        cargo().args(["build", "--release", "-p", "proxy", "--bin", "dbproxy"]),
    )?;
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    eprintln!("xtask: starting a primary and a GTID replica");
    let pair = Pair::start();
    let (port, split_port, admin) = (free_port(), free_port(), free_port());
    let config = format!(
        "[proxy]\nworkers = 0\nio = \"auto\"\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
         [[endpoints]]\nname = \"writer\"\nlisten = \"127.0.0.1:{port}\"\ntarget_group = \"db\"\n\n\
         [[endpoints]]\nname = \"split\"\nlisten = \"127.0.0.1:{split_port}\"\ntarget_group = \"db\"\n\
         read_write_split = true\ncausal_reads = \"gtid\"\n\n\
         [[target_groups]]\nname = \"db\"\n{}\nmax_connections = 32\nmax_idle_connections = 32\n\
         health_check_interval = \"500ms\"\nmax_replication_lag = \"10s\"\n\n\
         [[users]]\nname = \"app\"\npassword = \"{APP_PASSWORD}\"\nbackend_password = \"{DB_PASSWORD}\"\n",
        pair.targets()
    );
    let cfg = work.path().join("split.toml");
    std::fs::write(&cfg, config).map_err(|e| e.to_string())?;
    let _proxy = crate::pg_bench::start_dbproxy(&cfg, split_port)?;
    let prep = proxy_tests::sysbench_command(pair.primary.port, DB_PASSWORD)
        .args(["oltp_read_write", "prepare"])
        .output()
        .map_err(|e| format!("sysbench prepare: {e}"))?;
    if !prep.status.success() {
        return Err(format!(
            "sysbench prepare: {}",
            String::from_utf8_lossy(&prep.stderr)
        ));
    }
    pair.sync();
    let pids = (
        pair.primary.pid().ok_or("the primary has no pid")?,
        pair.replica.pid().ok_or("the replica has no pid")?,
    );
    let targets = [
        ("primary, direct", pair.primary.port, DB_PASSWORD),
        ("dbproxy, writer endpoint", port, APP_PASSWORD),
        ("dbproxy, split endpoint", split_port, APP_PASSWORD),
    ];
    let (rounds, secs) = if quick { (1, 5) } else { (3, 10) };
    let tests = ["oltp_read_only", "oltp_read_write"];
    // cells[test][target]: summed over rounds, interleaved so that drift hits all alike.
    let mut cells: Vec<Vec<Cell>> = tests
        .iter()
        .map(|_| {
            targets
                .iter()
                .map(|_| Cell {
                    rate: 0.0,
                    selects: (0.0, 0.0),
                    cpu: (0.0, 0.0),
                })
                .collect()
        })
        .collect();
    for _ in 0..rounds {
        for (ti, test) in tests.iter().enumerate() {
            for (i, (name, p, pw)) in targets.iter().enumerate() {
                eprintln!("xtask: {test} through {name}");
                let s0 = (com_select(&pair.primary), com_select(&pair.replica));
                let c0 = (cpu_seconds(pids.0), cpu_seconds(pids.1));
                let rate = sysbench(*p, pw, test, secs)?;
                let s1 = (com_select(&pair.primary), com_select(&pair.replica));
                let c1 = (cpu_seconds(pids.0), cpu_seconds(pids.1));
                let cell = &mut cells[ti][i];
                cell.rate += rate / rounds as f64;
                cell.selects.0 += s1.0 - s0.0;
                cell.selects.1 += s1.1 - s0.1;
                cell.cpu.0 += c1.0 - c0.0;
                cell.cpu.1 += c1.1 - c0.1;
            }
        }
    }
    let mut report = format!(
        "## Read/write split\n\nsysbench, 16 threads, statements outside transactions (`--skip_trx`; \
         oltp_read_write with `--delete_inserts=0`), {rounds} × {secs} s per cell, interleaved; \
         a primary and a GTID replica on this host, `causal_reads = \"gtid\"`. SELECTs: each \
         server's `Com_select` (the causal waits are SELECTs too). CPU: seconds of each \
         server's process per 1,000 events.\n\n\
         | test | target | events/s | SELECTs on the primary | on the replica | primary CPU s/1k | replica CPU s/1k |\n\
         |---|---|---|---|---|---|---|\n"
    );
    for (ti, test) in tests.iter().enumerate() {
        for (i, (name, _, _)) in targets.iter().enumerate() {
            let c = &cells[ti][i];
            let events = (c.rate * secs as f64 * rounds as f64).max(1.0);
            let all = (c.selects.0 + c.selects.1).max(1.0);
            report += &format!(
                "| {test} | {name} | {:.0} | {:.0} % | {:.0} % | {:.2} | {:.2} |\n",
                c.rate,
                100.0 * c.selects.0 / all,
                100.0 * c.selects.1 / all,
                1000.0 * c.cpu.0 / events,
                1000.0 * c.cpu.1 / events,
            );
        }
    }
    report += &wait_forms(&pair, if quick { 2_000 } else { 10_000 })?;
    println!("{report}");
    let out_dir = root().join("target/bench");
    std::fs::create_dir_all(&out_dir).map_err(|e| e.to_string())?;
    std::fs::write(out_dir.join("split.md"), &report).map_err(|e| e.to_string())?;
    eprintln!("xtask: wrote {}/split.md", out_dir.display());
    Ok(report)
}
