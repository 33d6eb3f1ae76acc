//! `cargo xtask bench --engine postgresql` (and the PostgreSQL part of a full bench):
//! pgbench side by side against direct PostgreSQL, dbproxy and PgBouncer (Debian's, in
//! transaction mode, the same pool size), interleaved in one run, with the CPU the proxy
//! process used per transaction. Writes `target/bench/postgres.md`.

use crate::bench::{cpu_seconds, wait_listening};
use crate::{cargo, ensure_apt, root, run, Result};
use proxy_tests::pg::{program, run_as, PgDb};
use proxy_tests::{free_port, spawn, APP_PASSWORD, DB_PASSWORD};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Server connections each proxy may open.
const POOL: usize = 20;

/// The user of the md5 row of `-C`, on the server and on both proxies: a connection's
/// cost without libpq's SCRAM key derivation (about 5 ms of pgbench's CPU per SCRAM login
/// here, the same towards every target), which bounds the SCRAM row.
const MD5_USER: &str = "app_md5";

/// One proxy or the server itself.
struct Target {
    name: &'static str,
    port: u16,
    user: &'static str,
    password: &'static str,
    /// The proxy's process (its CPU is measured).
    pid: Option<u32>,
    /// Whether it serves `-M prepared` with its pool shared between clients.
    prepared: bool,
}

/// A child process stopped and reaped when dropped, on every path.
pub(crate) struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The release dbproxy with the configuration `cfg`, once it listens on `port`.
pub(crate) fn start_dbproxy(cfg: &Path, port: u16) -> std::result::Result<Reaped, String> {
    let mut cmd = Command::new(root().join("target/release/dbproxy"));
    cmd.args(["run", "--config"])
        .arg(cfg)
        .env("DBPROXY_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let dbproxy = Reaped(spawn(cmd));
    wait_listening(port, "dbproxy")?;
    Ok(dbproxy)
}

/// One row: per target, its rate and the proxy's CPU µs per transaction (`None`: n/a).
type Cells = Vec<Option<(f64, Option<f64>)>>;

fn start_pgbouncer(dir: &Path, db_port: u16, port: u16) -> std::result::Result<Reaped, String> {
    let owner = run_as();
    let write = |name: &str, text: String| -> std::result::Result<std::path::PathBuf, String> {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|e| e.to_string())?;
        if let Some((u, g)) = owner {
            std::os::unix::fs::chown(&p, Some(u), Some(g)).map_err(|e| e.to_string())?;
        }
        Ok(p)
    };
    let users = write(
        "userlist.txt",
        format!("\"app\" \"{DB_PASSWORD}\"\n\"{MD5_USER}\" \"{DB_PASSWORD}\"\n"),
    )?;
    // SCRAM for everybody but the md5 user of the md5 row.
    let hba = write(
        "hba.conf",
        format!("host all {MD5_USER} 127.0.0.1/32 md5\nhost all all 127.0.0.1/32 scram-sha-256\n"),
    )?;
    let ini = write(
        "pgbouncer.ini",
        format!(
            "[databases]\nshop = host=127.0.0.1 port={db_port} dbname=shop\n\n[pgbouncer]\n\
             listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = hba\nauth_hba_file = {}\nauth_file = {}\npool_mode = transaction\n\
             default_pool_size = {POOL}\nmax_client_conn = 2000\nlogfile = {}\n",
            hba.display(),
            users.display(),
            dir.join("pgbouncer.log").display()
        ),
    )?;
    let mut cmd = Command::new("pgbouncer");
    cmd.arg(&ini).stdout(Stdio::null()).stderr(Stdio::null());
    if let Some((u, g)) = owner {
        cmd.uid(u).gid(g);
    }
    Ok(Reaped(spawn(cmd)))
}

/// `tps = N` from pgbench's output.
fn tps(out: &str) -> Option<f64> {
    out.lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse().ok())
}

/// The PostgreSQL rows, as a markdown section.
pub fn bench(quick: bool) -> Result<String> {
    ensure_apt(&[
        ("/usr/lib/postgresql/15/bin/pgbench", "postgresql-15"),
        ("pgbouncer", "pgbouncer"),
    ])?;
    run(
        "build dbproxy (release)",
        cargo().args(["build", "--release", "-p", "proxy", "--bin", "dbproxy"]),
    )?;
    let secs = if quick { 5 } else { 10 };
    let rounds = 2;
    eprintln!("xtask: starting PostgreSQL");
    let db = PgDb::start(&["max_connections=400"]);
    let init = program("pgbench")
        .args(["-h", "127.0.0.1", "-p", &db.port.to_string(), "-U", "app"])
        .args(["-i", "-s", "10", "-q", "shop"])
        .env("PGPASSWORD", DB_PASSWORD)
        .output()
        .map_err(|e| e.to_string())?;
    if !init.status.success() {
        return Err(format!(
            "pgbench -i failed: {}",
            String::from_utf8_lossy(&init.stderr)
        ));
    }
    // The md5 row's user: a member of app (the tables' owner), its password kept as md5.
    db.hba_first(&format!("host all {MD5_USER} 127.0.0.1/32 md5"));
    db.sql(&format!(
        "SET password_encryption = 'md5'; \
         CREATE ROLE {MD5_USER} LOGIN PASSWORD '{DB_PASSWORD}' IN ROLE app"
    ));
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    if let Some((u, g)) = run_as() {
        std::os::unix::fs::chown(work.path(), Some(u), Some(g)).map_err(|e| e.to_string())?;
    }
    let (px_port, pb_port) = (free_port(), free_port());
    let config = format!(
        "[proxy]\nworkers = 0\nio = \"auto\"\nmax_client_connections = 20000\n\n\
         [[endpoints]]\nname = \"bench\"\nlisten = \"127.0.0.1:{px_port}\"\ntarget_group = \"pg\"\n\n\
         [[target_groups]]\nname = \"pg\"\nengine = \"postgresql\"\ntargets = [\"127.0.0.1:{}\"]\n\
         max_connections = {POOL}\nmax_idle_connections = {POOL}\n\n\
         [[users]]\nname = \"app\"\npassword = \"{APP_PASSWORD}\"\nbackend_password = \"{DB_PASSWORD}\"\n\n\
         [[users]]\nname = \"{MD5_USER}\"\npassword = \"{APP_PASSWORD}\"\npostgres_auth = \"md5\"\n\
         backend_user = \"app\"\nbackend_password = \"{DB_PASSWORD}\"\n",
        db.port
    );
    let cfg = work.path().join("dbproxy.toml");
    std::fs::write(&cfg, config).map_err(|e| e.to_string())?;
    let dbproxy = start_dbproxy(&cfg, px_port)?;
    let pgbouncer = start_pgbouncer(work.path(), db.port, pb_port)?;
    wait_listening(pb_port, "pgbouncer")?;
    let targets = [
        Target {
            name: "direct",
            port: db.port,
            user: "app",
            password: DB_PASSWORD,
            pid: None,
            prepared: true,
        },
        Target {
            name: "dbproxy",
            port: px_port,
            user: "app",
            password: APP_PASSWORD,
            pid: Some(dbproxy.0.id()),
            prepared: true,
        },
        Target {
            name: "PgBouncer 1.18",
            port: pb_port,
            user: "app",
            password: DB_PASSWORD,
            pid: Some(pgbouncer.0.id()),
            prepared: false,
        },
    ];
    let mut rows: Vec<(String, Cells)> = Vec::new();
    // (name, pgbench's arguments, `-M prepared`, as the md5 user)
    let mut plans: Vec<(String, Vec<String>, bool, bool)> = Vec::new();
    for clients in [1, 8, 64] {
        for mode in ["simple", "prepared"] {
            plans.push((
                format!("-S -M {mode}, {clients} clients"),
                vec![
                    "-S".into(),
                    "-M".into(),
                    mode.into(),
                    "-c".into(),
                    clients.to_string(),
                    "-j".into(),
                    clients.min(4).to_string(),
                ],
                mode == "prepared",
                false,
            ));
        }
    }
    for (login, md5) in [("SCRAM", false), ("md5", true)] {
        plans.push((
            format!("-S -C (a new connection per transaction, {login}), 8 clients"),
            ["-S", "-C", "-c", "8", "-j", "4"]
                .map(String::from)
                .to_vec(),
            false,
            md5,
        ));
    }
    for (name, args, prepared, md5) in plans {
        eprintln!("xtask: pgbench {name}");
        let mut sums: Vec<Option<(f64, f64, f64)>> = vec![Some((0.0, 0.0, 0.0)); targets.len()];
        for _ in 0..rounds {
            for (i, t) in targets.iter().enumerate() {
                if prepared && !t.prepared {
                    sums[i] = None;
                    continue;
                }
                let cpu0 = t.pid.map(cpu_seconds);
                let out = program("pgbench")
                    .args(["-h", "127.0.0.1", "-p", &t.port.to_string()])
                    .args(["-U", if md5 { MD5_USER } else { t.user }])
                    .args(["-n", "-T", &secs.to_string()])
                    .args(&args)
                    .arg("shop")
                    .env("PGPASSWORD", t.password)
                    .output()
                    .map_err(|e| e.to_string())?;
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                let Some(rate) = tps(&text).filter(|_| out.status.success()) else {
                    return Err(format!("pgbench {name} against {} failed: {text}", t.name));
                };
                let cpu = match (t.pid, cpu0) {
                    (Some(p), Some(c0)) => cpu_seconds(p) - c0,
                    _ => 0.0,
                };
                if let Some(s) = sums[i].as_mut() {
                    s.0 += rate;
                    s.1 += cpu;
                    s.2 += rate * secs as f64;
                }
            }
        }
        let cells = sums
            .into_iter()
            .zip(&targets)
            .map(|(s, t)| {
                s.map(|(rate, cpu, tx)| {
                    (rate / rounds as f64, t.pid.map(|_| cpu / tx.max(1.0) * 1e6))
                })
            })
            .collect();
        rows.push((name, cells));
    }
    drop(pgbouncer);
    drop(dbproxy);

    let mut o = format!(
        "## PostgreSQL ({})\n\npgbench against PostgreSQL 15 (scale 10), {secs} s per run, {rounds} interleaved rounds. Each figure: transactions per second (ratio to direct) and the proxy process's CPU per transaction. dbproxy and PgBouncer each have {POOL} server connections; PgBouncer is Debian's 1.18 in transaction mode, which has no prepared statements there (n/a). The `-C` rows log in with SCRAM (where libpq's key derivation, about 5 ms of pgbench's own CPU per login on every target, bounds the rate) and with md5 (a member of app; the proxies' and the server's own cost of a connection).\n\n|  |",
        if quick { "quick" } else { "full" }
    );
    for t in &targets {
        o.push_str(&format!(" {} |", t.name));
    }
    o.push_str("\n|---|");
    o.push_str(&"---|".repeat(targets.len()));
    o.push('\n');
    for (name, cells) in &rows {
        o.push_str(&format!("| {name} |"));
        let direct = cells.first().cloned().flatten().map(|c| c.0);
        for c in cells {
            match c {
                None => o.push_str(" n/a |"),
                Some((rate, cpu)) => {
                    let ratio = direct.map(|d| rate / d.max(1e-9)).unwrap_or(0.0);
                    match cpu {
                        Some(us) => o.push_str(&format!(" {rate:.0} ({ratio:.2}), {us:.0} µs |")),
                        None => o.push_str(&format!(" {rate:.0} |")),
                    }
                }
            }
        }
        o.push('\n');
    }
    let out_dir = root().join("target/bench");
    std::fs::create_dir_all(&out_dir).map_err(|e| e.to_string())?;
    std::fs::write(out_dir.join("postgres.md"), &o).map_err(|e| e.to_string())?;
    println!("{o}");
    eprintln!("xtask: wrote {}/postgres.md", out_dir.display());
    drop(db);
    Ok(o)
}
