//! `cargo xtask bench [--quick]`: sysbench and connection benchmarks of dbproxy side by side
//! with direct MariaDB (and HAProxy in TCP mode when installed), interleaved in one run, with
//! the CPU each server used; a table with ratios to direct, `target/bench/report.{json,md,png}`.

use crate::{cargo, ensure_apt, have, root, run, Result, DB_TOOLS};
use proxy_tests::raw::RawClient;
use proxy_tests::{
    free_port, poll_until, spawn, sysbench_command, MariaDb, APP_PASSWORD, DB_PASSWORD,
};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One server clients can be pointed at.
struct Target {
    name: &'static str,
    port: u16,
    password: &'static str,
    /// Clients use TLS (sysbench's `--mysql-ssl=on`).
    tls: bool,
}

/// One measured figure of one target.
struct Cell {
    /// Mean rate over the rounds.
    value: f64,
    /// Rate of each round.
    rounds: Vec<f64>,
    /// Operations done (queries, or connects) during the run.
    ops: f64,
    /// Connections MariaDB accepted during the run.
    db_connections: u64,
    /// CPU seconds used by mariadbd and by the target's own process during the run.
    db_cpu: f64,
    proxy_cpu: Option<f64>,
    /// The proxy's CPU seconds split into user and kernel time, and the system calls it
    /// made (counted by `perf stat`, when perf runs here).
    proxy_split: Option<(f64, f64)>,
    proxy_syscalls: Option<f64>,
}

/// One benchmark, all targets.
struct Row {
    name: String,
    unit: &'static str,
    cells: Vec<Option<Cell>>,
}

enum Kind {
    Sysbench {
        script: &'static str,
        threads: u32,
        ps: bool,
    },
    /// A sysbench Lua script (a file written to the work directory), `workers` threads.
    Lua {
        file: &'static str,
        workers: u32,
        unit: &'static str,
    },
}

/// CPU seconds in user and in kernel mode a process has used so far.
fn cpu_split(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (field(11) / hz, field(12) / hz)
}

/// Counts the system calls of a process while it runs (`perf stat` on
/// `raw_syscalls:sys_enter`, every thread); None where perf cannot count here.
struct SyscallCount {
    perf: Child,
    out: PathBuf,
}

impl SyscallCount {
    fn start(pid: u32, work: &Path) -> Option<SyscallCount> {
        let out = work.join(format!("perf-{pid}.csv"));
        let perf = Command::new("perf")
            .args(["stat", "-x,", "-e", "raw_syscalls:sys_enter", "-p"])
            .arg(pid.to_string())
            .arg("-o")
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        Some(SyscallCount { perf, out })
    }

    /// Stops counting; the count.
    fn stop(mut self) -> Option<f64> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.perf.id() as i32, libc::SIGINT) };
        self.perf.wait().ok()?;
        let text = std::fs::read_to_string(&self.out).ok()?;
        text.lines()
            .find(|l| l.contains("raw_syscalls:sys_enter"))
            .and_then(|l| l.split(',').next())
            .and_then(|v| v.trim().parse().ok())
    }
}

/// CPU seconds (user + system) a process has used so far.
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz.max(1.0)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// Runs sysbench; with `tls`, over TLS: sysbench 1.0 reads `cacert.pem`,
/// `client-cert.pem` and `client-key.pem` from its working directory, which is `tls`.
fn sysbench(port: u16, password: &str, args: &[String], tls: Option<&Path>) -> String {
    let mut cmd = sysbench_command(port, password);
    if let Some(dir) = tls {
        cmd.current_dir(dir).arg("--mysql-ssl=on");
    }
    match cmd.args(args).output() {
        Ok(o) => {
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
        }
        Err(e) => format!("sysbench: {e}"),
    }
}

/// MariaDB's `Connections` counter (read over its socket; the reading connects too).
fn db_connections(db: &MariaDb) -> u64 {
    db.root_sql("SHOW GLOBAL STATUS LIKE 'Connections'")
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The count at the start of the sysbench line starting with `name`.
fn total(out: &str, name: &str) -> Option<f64> {
    let line = out.lines().find(|l| l.trim_start().starts_with(name))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// "(X per sec.)" of the sysbench line starting with `name`.
fn per_sec(out: &str, name: &str) -> Option<f64> {
    let line = out.lines().find(|l| l.trim_start().starts_with(name))?;
    let inner = line.split('(').nth(1)?;
    inner.split_whitespace().next()?.parse().ok()
}

/// The row of [`SELECT1_LUA`].
const SELECT1_ROW: &str = "SELECT 1 on an open connection, 8 workers";

/// The same query on connections that stay open: what a connect storm's query costs the
/// database without the connect.
const SELECT1_LUA: &str = r#"
function thread_init()
  drv = sysbench.sql.driver()
  con = drv:connect()
end
function event()
  con:query("SELECT 1")
end
function thread_done()
  con:disconnect()
end
"#;

const STORM_LUA: &str = r#"
function thread_init()
  drv = sysbench.sql.driver()
end
function event()
  local con = drv:connect()
  con:query("SELECT 1")
  con:disconnect()
end
"#;

pub(crate) fn wait_listening(port: u16, what: &str) -> Result {
    if poll_until(Duration::from_secs(15), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    }) {
        Ok(())
    } else {
        Err(format!("{what} did not start listening on {port}"))
    }
}

/// Logs in on a raw socket and pings once; the connection stays open.
fn idle_client(port: u16, user: &str, password: &str) -> std::io::Result<RawClient> {
    let mut c = RawClient::login(port, user, password)?;
    c.try_write(0, &[0x0e])?; // COM_PING
    match c.try_read()?.1.first() {
        Some(0) => Ok(c),
        _ => Err(std::io::Error::other("ping failed")),
    }
}

fn spawn_quiet(mut cmd: Command, log: &Path) -> std::result::Result<Child, String> {
    let f = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    cmd.stdout(Stdio::null()).stderr(f);
    Ok(spawn(cmd))
}

fn raise_fd_limit() {
    proxy_tests::raise_fd_limit();
}

pub fn bench(quick: bool, baseline: Option<PathBuf>) -> Result {
    if let Some(p) = &baseline {
        if !p.exists() {
            return Err(format!("--baseline {}: no such file", p.display()));
        }
    }
    let mut needed = DB_TOOLS.to_vec();
    needed.push(("sysbench", "sysbench"));
    // The peer every row is compared with, in the same run; perf counts system calls.
    needed.push(("haproxy", "haproxy"));
    needed.push(("perf", "linux-perf"));
    needed.push((
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "fonts-dejavu-core",
    ));
    ensure_apt(&needed)?;
    run(
        "build dbproxy (release)",
        cargo().args(["build", "--release", "-p", "proxy", "--bin", "dbproxy"]),
    )?;
    raise_fd_limit();
    let out_dir = root().join("target/bench");
    std::fs::create_dir_all(&out_dir).map_err(|e| e.to_string())?;
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;

    // One CA for the TLS rows: MariaDB's certificate, dbproxy's, and sysbench's files.
    let ca = proxy_tests::tls::TestCa::new("bench");
    let (db_cert, db_key) = ca.issue("mariadb", &["localhost", "127.0.0.1"]);
    let (px_cert, px_key) = ca.issue("dbproxy", &["localhost", "127.0.0.1"]);
    let (cl_cert, cl_key) = ca.issue("client", &["sysbench"]);
    let tls_dir = ca.dir.path().to_path_buf();
    for (from, to) in [
        (&ca.ca, "cacert.pem"),
        (&cl_cert, "client-cert.pem"),
        (&cl_key, "client-key.pem"),
    ] {
        std::fs::copy(from, tls_dir.join(to)).map_err(|e| e.to_string())?;
    }

    eprintln!("xtask: starting MariaDB");
    let db = MariaDb::start_with(&[
        "--innodb-buffer-pool-size=256M",
        "--max-connections=4000",
        &format!("--ssl-cert={}", db_cert.display()),
        &format!("--ssl-key={}", db_key.display()),
        &format!("--ssl-ca={}", ca.ca.display()),
    ]);
    let db_pid = db.pid().ok_or("mariadbd has no pid")?;
    let prep = sysbench(
        db.port,
        DB_PASSWORD,
        &["oltp_read_write".into(), "prepare".into()],
        None,
    );
    if !prep.contains("Creating table") {
        return Err(format!("sysbench prepare failed: {prep}"));
    }

    // One dbproxy over TCP to MariaDB, one through its Unix socket (as when dbproxy runs on
    // the database host); only the first serves the admin endpoint.
    let release = root().join("target/release/dbproxy");
    // `tls`: dbproxy's certificate for clients (the endpoint is `optional`, so plain rows
    // use the same process), and `db_tls`: TLS to MariaDB, verified against the CA.
    let tls_lines = format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
        px_cert.display(),
        px_key.display()
    );
    let db_tls_lines = format!(
        "backend_tls = \"verify_full\"\nbackend_tls_ca = \"{}\"\n",
        ca.ca.display()
    );
    let start_dbproxy = |bin: &Path,
                         name: &str,
                         port: u16,
                         admin: Option<u16>,
                         target: String,
                         (tls, db_tls): (bool, bool)| {
        let admin = admin
            .map(|a| format!("[admin]\nlisten = \"127.0.0.1:{a}\"\n\n"))
            .unwrap_or_default();
        let tls = if tls { tls_lines.as_str() } else { "" };
        let db_tls = if db_tls { db_tls_lines.as_str() } else { "" };
        let config = format!(
            "[proxy]\nworkers = 0\nio = \"auto\"\nmax_client_connections = 20000\n{tls}\n{admin}\
             [[endpoints]]\nname = \"bench\"\nlisten = \"127.0.0.1:{port}\"\ntarget_group = \"db\"\n\n\
             [[target_groups]]\nname = \"db\"\ntargets = [\"{target}\"]\nmax_connections = 64\nmax_idle_connections = 64\n{db_tls}\n\
             [[users]]\nname = \"app\"\npassword = \"{APP_PASSWORD}\"\nbackend_password = \"{DB_PASSWORD}\"\n"
        );
        let cfg = work.path().join(format!("{name}.toml"));
        std::fs::write(&cfg, config).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(bin);
        cmd.args(["run", "--config"])
            .arg(&cfg)
            .env("DBPROXY_LOG", "warn");
        let child = spawn_quiet(cmd, &work.path().join(format!("{name}.log")))?;
        wait_listening(port, name)?;
        Ok::<_, String>(child)
    };
    let (proxy_port, admin_port, unix_port) = (free_port(), free_port(), free_port());
    let proxy = start_dbproxy(
        &release,
        "dbproxy",
        proxy_port,
        Some(admin_port),
        format!("127.0.0.1:{}", db.port),
        (true, false),
    )?;
    let unix_proxy = start_dbproxy(
        &release,
        "dbproxy-unix",
        unix_port,
        None,
        format!("unix:{}", db.socket().display()),
        (false, false),
    )?;
    let both_port = free_port();
    let both_proxy = start_dbproxy(
        &release,
        "dbproxy-tls-both",
        both_port,
        None,
        format!("127.0.0.1:{}", db.port),
        (true, true),
    )?;

    let mut targets = vec![
        Target {
            name: "direct",
            port: db.port,
            password: DB_PASSWORD,
            tls: false,
        },
        Target {
            name: "dbproxy",
            port: proxy_port,
            password: APP_PASSWORD,
            tls: false,
        },
        Target {
            name: "dbproxy, unix socket to db",
            port: unix_port,
            password: APP_PASSWORD,
            tls: false,
        },
    ];
    let mut tls_targets = vec![
        Target {
            name: "direct, TLS",
            port: db.port,
            password: DB_PASSWORD,
            tls: true,
        },
        Target {
            name: "dbproxy, client TLS",
            port: proxy_port,
            password: APP_PASSWORD,
            tls: true,
        },
        Target {
            name: "dbproxy, client + db TLS",
            port: both_port,
            password: APP_PASSWORD,
            tls: true,
        },
    ];
    let mut tls_pids: Vec<Option<u32>> = vec![None, Some(proxy.id()), Some(both_proxy.id())];
    let mut pids: Vec<Option<u32>> = vec![None, Some(proxy.id()), Some(unix_proxy.id())];
    // Another build of dbproxy (e.g. the previous commit's) measured in the same run.
    let baseline_proxy = match &baseline {
        Some(bin) => {
            let port = free_port();
            let p = start_dbproxy(
                bin,
                "dbproxy-baseline",
                port,
                None,
                format!("127.0.0.1:{}", db.port),
                (false, false),
            )?;
            pids.push(Some(p.id()));
            targets.push(Target {
                name: "dbproxy, baseline build",
                port,
                password: APP_PASSWORD,
                tls: false,
            });
            Some(p)
        }
        None => None,
    };
    // The floor: dbproxy's own event loop forwarding bytes to MariaDB with no protocol
    // work (`dbproxy relay`), on io_uring and on epoll.
    let mut relays = Vec::new();
    for io in if quick {
        &["uring"][..]
    } else {
        &["uring", "epoll"][..]
    } {
        let port = free_port();
        let mut cmd = Command::new(&release);
        cmd.args(["relay", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--target", &format!("127.0.0.1:{}", db.port)])
            .args(["--io", io])
            .env("DBPROXY_LOG", "warn");
        let r = spawn_quiet(cmd, &work.path().join(format!("relay-{io}.log")))?;
        wait_listening(port, "dbproxy relay")?;
        pids.push(Some(r.id()));
        targets.push(Target {
            name: if *io == "uring" {
                "null relay (dbproxy's loop, io_uring)"
            } else {
                "null relay (dbproxy's loop, epoll)"
            },
            port,
            password: DB_PASSWORD,
            tls: false,
        });
        relays.push(r);
    }
    let mut haproxy = None;
    if have("haproxy") {
        let port = free_port();
        let hcfg = work.path().join("haproxy.cfg");
        let text = format!(
            "global\n  maxconn 8000\n  nbthread 2\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n\
             frontend fe\n  bind 127.0.0.1:{port}\n  default_backend be\nbackend be\n  server db 127.0.0.1:{} maxconn 8000\n",
            db.port
        );
        std::fs::write(&hcfg, text).map_err(|e| e.to_string())?;
        let mut hcmd = Command::new("haproxy");
        hcmd.args(["-db", "-f"]).arg(&hcfg);
        let h = spawn_quiet(hcmd, &work.path().join("haproxy.log"))?;
        wait_listening(port, "haproxy")?;
        pids.push(Some(h.id()));
        targets.push(Target {
            name: "haproxy",
            port,
            password: DB_PASSWORD,
            tls: false,
        });
        // HAProxy in TCP mode relays the client's TLS session to MariaDB untouched.
        tls_pids.push(Some(h.id()));
        tls_targets.push(Target {
            name: "haproxy, TLS passed through",
            port,
            password: DB_PASSWORD,
            tls: true,
        });
        haproxy = Some(h);
    } else {
        eprintln!("xtask: haproxy is not installed; comparing with direct MariaDB only");
    }

    // Full: three interleaved rounds of 10 s per figure; quick: one of 8 s.
    let (rounds, secs) = if quick { (1, 8) } else { (3, 10) };
    let mut kinds: Vec<(String, Kind)> = Vec::new();
    let threads: &[u32] = if quick { &[1, 64] } else { &[1, 8, 64] };
    for &t in threads {
        kinds.push((
            format!("oltp_point_select {t} thr, prepared"),
            Kind::Sysbench {
                script: "oltp_point_select",
                threads: t,
                ps: true,
            },
        ));
        if !quick {
            kinds.push((
                format!("oltp_point_select {t} thr, not prepared"),
                Kind::Sysbench {
                    script: "oltp_point_select",
                    threads: t,
                    ps: false,
                },
            ));
        }
    }
    for &t in if quick { &[8u32][..] } else { &[1, 8, 64][..] } {
        kinds.push((
            format!("oltp_read_only {t} thr, prepared"),
            Kind::Sysbench {
                script: "oltp_read_only",
                threads: t,
                ps: true,
            },
        ));
        if !quick {
            kinds.push((
                format!("oltp_read_only {t} thr, not prepared"),
                Kind::Sysbench {
                    script: "oltp_read_only",
                    threads: t,
                    ps: false,
                },
            ));
        }
    }
    kinds.push((
        "oltp_read_write 16 thr, prepared".into(),
        Kind::Sysbench {
            script: "oltp_read_write",
            threads: 16,
            ps: true,
        },
    ));
    for w in [1, 8] {
        kinds.push((
            format!("connect storm, {w} workers"),
            Kind::Lua {
                file: "storm.lua",
                workers: w,
                unit: "connects/s",
            },
        ));
    }
    kinds.push((
        SELECT1_ROW.into(),
        Kind::Lua {
            file: "select1.lua",
            workers: 8,
            unit: "qps",
        },
    ));
    for (file, text) in [("storm.lua", STORM_LUA), ("select1.lua", SELECT1_LUA)] {
        std::fs::write(work.path().join(file), text).map_err(|e| e.to_string())?;
    }

    let ctx = Measure {
        db: &db,
        db_pid,
        rounds,
        secs,
        work: work.path(),
        tls_dir: &tls_dir,
    };
    let rows = measure(&ctx, &kinds, &targets, &pids);
    // TLS: the same clients with --mysql-ssl=on, against MariaDB's own TLS.
    let mut tls_kinds: Vec<(String, Kind)> = Vec::new();
    for &t in if quick { &[64u32][..] } else { &[1, 64][..] } {
        tls_kinds.push((
            format!("TLS: oltp_point_select {t} thr, prepared"),
            Kind::Sysbench {
                script: "oltp_point_select",
                threads: t,
                ps: true,
            },
        ));
    }
    tls_kinds.push((
        "TLS: oltp_read_only 8 thr, prepared".into(),
        Kind::Sysbench {
            script: "oltp_read_only",
            threads: 8,
            ps: true,
        },
    ));
    tls_kinds.push((
        "TLS: connect storm, 8 workers".into(),
        Kind::Lua {
            file: "storm.lua",
            workers: 8,
            unit: "connects/s",
        },
    ));
    let tls_rows = measure(&ctx, &tls_kinds, &tls_targets, &tls_pids);

    // Mostly idle clients: backend connections used and dbproxy memory per client.
    let idle_n = if quick { 2000 } else { 10_000 };
    eprintln!("xtask: {idle_n} mostly idle clients through dbproxy");
    let rss0 = rss_kib(proxy.id());
    let mut idle = Vec::with_capacity(idle_n);
    let t0 = Instant::now();
    for _ in 0..idle_n {
        match idle_client(proxy_port, "app", APP_PASSWORD) {
            Ok(s) => idle.push(s),
            Err(e) => {
                eprintln!("xtask: idle client {} failed: {e}", idle.len());
                break;
            }
        }
    }
    let login_secs = t0.elapsed().as_secs_f64();
    // Every client dbproxy accepted is counted before its memory is read.
    let settled = poll_until(Duration::from_secs(10), || {
        metric(admin_port, "dbproxy_client_connections{endpoint=\"bench\"}")
            == Some(idle.len() as f64)
    });
    if !settled {
        eprintln!("xtask: dbproxy did not report {} clients", idle.len());
    }
    let rss1 = rss_kib(proxy.id());
    let backends = metric(
        admin_port,
        "dbproxy_database_connections{target_group=\"db\",target_role=\"read_write\",engine=\"mysql\"}",
    )
    .unwrap_or(-1.0);
    let per_client = (rss1.saturating_sub(rss0)) as f64 * 1024.0 / idle.len().max(1) as f64;
    let idle_line = format!(
        "{} idle clients (each logged in and pinged once): dbproxy RSS {} KiB -> {} KiB = {:.0} bytes per client; backend connections open {}; logins took {:.1} s",
        idle.len(),
        rss0,
        rss1,
        per_client,
        backends,
        login_secs
    );
    drop(idle);

    let report = render(&rows, &targets, &idle_line, quick)
        + &tls_section(&rows, &targets, &tls_rows, &tls_targets)
        + &goals(&rows, &targets, per_client);
    println!("{report}");
    std::fs::write(out_dir.join("report.md"), &report).map_err(|e| e.to_string())?;
    std::fs::write(
        out_dir.join("report.json"),
        json(
            (&rows, &targets),
            (&tls_rows, &tls_targets),
            &idle_line,
            per_client,
            backends,
        ),
    )
    .map_err(|e| e.to_string())?;
    if let Err(e) = chart(&rows, &targets, &out_dir.join("report.png")) {
        eprintln!("xtask: chart not drawn: {e}");
    }
    eprintln!("xtask: wrote {}/report.{{md,json,png}}", out_dir.display());
    drop(haproxy);
    drop(relays);
    drop(baseline_proxy);
    drop(unix_proxy);
    drop(both_proxy);
    drop(proxy);
    drop(db);
    Ok(())
}

/// What every measurement shares.
struct Measure<'a> {
    db: &'a MariaDb,
    db_pid: u32,
    rounds: usize,
    secs: u32,
    work: &'a Path,
    /// sysbench's working directory for TLS targets (its certificate files).
    tls_dir: &'a Path,
}

/// Runs each benchmark on every target, in interleaved rounds.
fn measure(
    m: &Measure,
    kinds: &[(String, Kind)],
    targets: &[Target],
    pids: &[Option<u32>],
) -> Vec<Row> {
    let (db, db_pid, rounds, secs) = (m.db, m.db_pid, m.rounds, m.secs);
    let mut rows = Vec::new();
    for (name, kind) in kinds {
        eprintln!("xtask: {name}");
        let (unit, field, mut args) = match kind {
            Kind::Sysbench {
                script,
                threads,
                ps,
            } => (
                "qps",
                "queries:",
                vec![
                    format!("--threads={threads}"),
                    format!("--db-ps-mode={}", if *ps { "auto" } else { "disable" }),
                    (*script).to_string(),
                ],
            ),
            Kind::Lua {
                file,
                workers,
                unit,
            } => (
                *unit,
                "transactions:",
                vec![
                    format!("--threads={workers}"),
                    m.work.join(file).display().to_string(),
                ],
            ),
        };
        args.insert(0, format!("--time={secs}"));
        args.push("run".into());
        // Rounds interleave the targets, so that a drift of the machine's speed (it is
        // shared) spreads over all of them; a cell sums its rounds.
        let mut cells: Vec<Option<Cell>> = targets.iter().map(|_| None).collect();
        let mut failed = vec![false; targets.len()];
        for _ in 0..rounds {
            for (i, (t, pid)) in targets.iter().zip(pids).enumerate() {
                if failed[i] {
                    continue;
                }
                let conns0 = db_connections(db);
                let counting = pid.and_then(|p| SyscallCount::start(p, m.work));
                let (db0, p0) = (cpu_seconds(db_pid), pid.map(cpu_seconds));
                let s0 = pid.map(cpu_split);
                let out = sysbench(t.port, t.password, &args, t.tls.then_some(m.tls_dir));
                let (db1, p1) = (cpu_seconds(db_pid), pid.map(cpu_seconds));
                let s1 = pid.map(cpu_split);
                let syscalls = counting.and_then(SyscallCount::stop);
                // The second reading's own connection is counted too.
                let conns = db_connections(db).saturating_sub(conns0 + 1);
                let Some(value) = per_sec(&out, field) else {
                    eprintln!(
                        "xtask: {name} on {} failed:\n{}",
                        t.name,
                        out.lines().rev().take(5).collect::<Vec<_>>().join("\n")
                    );
                    failed[i] = true;
                    cells[i] = None;
                    continue;
                };
                let c = cells[i].get_or_insert(Cell {
                    value: 0.0,
                    rounds: Vec::new(),
                    ops: 0.0,
                    db_connections: 0,
                    db_cpu: 0.0,
                    proxy_cpu: pid.map(|_| 0.0),
                    proxy_split: pid.map(|_| (0.0, 0.0)),
                    proxy_syscalls: Some(0.0),
                });
                c.rounds.push(value);
                c.value = c.rounds.iter().sum::<f64>() / c.rounds.len() as f64;
                c.ops += total(&out, field).unwrap_or(0.0);
                c.db_connections += conns;
                c.db_cpu += db1 - db0;
                if let (Some(acc), Some(a), Some(b)) = (c.proxy_cpu.as_mut(), p0, p1) {
                    *acc += b - a;
                }
                if let (Some(acc), Some(a), Some(b)) = (c.proxy_split.as_mut(), s0, s1) {
                    acc.0 += b.0 - a.0;
                    acc.1 += b.1 - a.1;
                }
                // A round perf could not count leaves the row without a count.
                c.proxy_syscalls = match (c.proxy_syscalls, syscalls) {
                    (Some(acc), Some(n)) => Some(acc + n),
                    _ => None,
                };
            }
        }
        rows.push(Row {
            name: name.clone(),
            unit,
            cells,
        });
    }

    rows
}

fn metric(admin: u16, series: &str) -> Option<f64> {
    let mut s = TcpStream::connect(("127.0.0.1", admin)).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
}

fn render(rows: &[Row], targets: &[Target], idle: &str, quick: bool) -> String {
    let mut o = format!(
        "# dbproxy benchmark ({})\n\nEach figure: the target's rate (its ratio to direct); CPU time mariadbd and the proxy process used per operation (query or connect) during that run; connections MariaDB accepted during that run.\n\n",
        if quick { "quick" } else { "full" }
    );
    o.push_str(&table(rows, targets));
    o.push_str(&format!("\n{idle}\n"));
    o
}

/// The rows as a table, one column per target; ratios to the first target.
fn table(rows: &[Row], targets: &[Target]) -> String {
    let mut o = String::from("| benchmark |");
    for t in targets {
        o.push_str(&format!(" {} |", t.name));
    }
    o.push_str("\n|---|");
    for _ in targets {
        o.push_str("---|");
    }
    o.push('\n');
    for r in rows {
        o.push_str(&format!("| {} ({}) |", r.name, r.unit));
        let direct = r.cells.first().and_then(|c| c.as_ref()).map(|c| c.value);
        for c in &r.cells {
            match c {
                Some(c) => {
                    let ratio = direct.map(|d| c.value / d).unwrap_or(f64::NAN);
                    let us = |cpu: f64| 1e6 * cpu / c.ops.max(1.0);
                    let cpu = match c.proxy_cpu {
                        Some(p) => {
                            let split = c.proxy_split.map_or(String::new(), |(u, k)| {
                                format!(" (user {:.1}, kernel {:.1})", us(u), us(k))
                            });
                            let calls = c.proxy_syscalls.map_or(String::new(), |n| {
                                format!(", {:.2} syscalls", n / c.ops.max(1.0))
                            });
                            format!(
                                "db {:.0} µs, proxy {:.1} µs{split}{calls}",
                                us(c.db_cpu),
                                us(p)
                            )
                        }
                        None => format!("db {:.0} µs", us(c.db_cpu)),
                    };
                    let spread = if c.rounds.len() > 1 {
                        let (lo, hi) = c
                            .rounds
                            .iter()
                            .fold((f64::MAX, f64::MIN), |(l, h), v| (l.min(*v), h.max(*v)));
                        format!(" ±{:.0}%", 50.0 * (hi - lo) / c.value.max(1.0))
                    } else {
                        String::new()
                    };
                    o.push_str(&format!(
                        " {:.0}{spread} ({ratio:.2}); {cpu}; {} db conn. |",
                        c.value, c.db_connections
                    ));
                }
                None => o.push_str(" failed |"),
            }
        }
        o.push('\n');
    }
    o
}

/// The TLS rows (ratios to direct MariaDB with TLS), and what TLS costs each target
/// against the same benchmark without it.
fn tls_section(
    rows: &[Row],
    targets: &[Target],
    tls_rows: &[Row],
    tls_targets: &[Target],
) -> String {
    let mut o = String::from(
        "\n## TLS\n\nClients with TLS (sysbench --mysql-ssl=on); ratios to direct MariaDB with TLS. \"client TLS\": TLS from the client to dbproxy, plain to MariaDB; \"client + db TLS\": TLS on both legs (backend_tls = verify_full); HAProxy relays the client's TLS session to MariaDB.\n\n",
    );
    o.push_str(&table(tls_rows, tls_targets));
    o.push_str("\nWhat TLS costs (the TLS row against the same row without TLS): throughput ratio, and the proxy's CPU per operation without -> with TLS.\n\n| benchmark | direct | dbproxy, client TLS | dbproxy, client + db TLS |\n|---|---|---|---|\n");
    let cell = |rs: &[Row], ts: &[Target], row: &str, target: &str| -> Option<(f64, Option<f64>)> {
        let r = rs.iter().find(|r| r.name == row)?;
        let i = ts.iter().position(|t| t.name == target)?;
        let c = r.cells.get(i)?.as_ref()?;
        Some((c.value, c.proxy_cpu.map(|p| 1e6 * p / c.ops.max(1.0))))
    };
    for r in tls_rows {
        let plain = r.name.trim_start_matches("TLS: ");
        let mut line = format!("| {} |", r.name);
        for (plain_target, tls_target) in [
            ("direct", "direct, TLS"),
            ("dbproxy", "dbproxy, client TLS"),
            ("dbproxy", "dbproxy, client + db TLS"),
        ] {
            match (
                cell(rows, targets, plain, plain_target),
                cell(tls_rows, tls_targets, &r.name, tls_target),
            ) {
                (Some((a, pa)), Some((b, pb))) => {
                    let cpu = match (pa, pb) {
                        (Some(x), Some(y)) => format!("; proxy {x:.0} -> {y:.0} µs"),
                        _ => String::new(),
                    };
                    line.push_str(&format!(" {:.2}{cpu} |", b / a.max(1e-9)));
                }
                _ => line.push_str(" not measured |"),
            }
        }
        o.push_str(&line);
        o.push('\n');
    }
    o
}

/// The issue's goals, each with what this run measured (dbproxy against direct).
fn goals(rows: &[Row], targets: &[Target], per_client: f64) -> String {
    let ratio = |row: &str, f: &dyn Fn(&Cell) -> f64| -> Option<f64> {
        let r = rows.iter().find(|r| r.name == row)?;
        let d = r.cells.first()?.as_ref()?;
        let p = r.cells.get(1)?.as_ref()?;
        Some(f(p) / f(d))
    };
    let rate = |c: &Cell| c.value;
    let db_per_op = |c: &Cell| c.db_cpu / c.ops.max(1.0);
    let mut lines = vec![
        (
            "oltp_point_select 64 thr, prepared: at least 0.85 of direct".to_string(),
            ratio("oltp_point_select 64 thr, prepared", &rate),
            0.85,
            true,
        ),
        (
            "oltp_point_select 1 thr, prepared: at least 0.8 of direct".to_string(),
            ratio("oltp_point_select 1 thr, prepared", &rate),
            0.8,
            true,
        ),
    ];
    for w in [1, 8] {
        let row = format!("connect storm, {w} workers");
        lines.push((
            format!("{row}: at least 1.5x direct connects/s"),
            ratio(&row, &rate),
            1.5,
            true,
        ));
        lines.push((
            format!("{row}: database CPU per connect at most 0.1 of direct"),
            ratio(&row, &db_per_op),
            0.1,
            false,
        ));
    }
    let mut o = String::from("\n## Goals (dbproxy against direct, this run)\n\n| goal | measured | met |\n|---|---|---|\n");
    for (goal, v, bound, at_least) in lines {
        match v {
            Some(v) => {
                let met = if at_least { v >= bound } else { v <= bound };
                o.push_str(&format!(
                    "| {goal} | {v:.2} | {} |\n",
                    if met { "yes" } else { "no" }
                ));
            }
            None => o.push_str(&format!("| {goal} | not measured | no |\n")),
        }
    }
    o.push_str(&format!(
        "| at most 10 KiB of RSS per idle client | {:.1} KiB | {} |\n",
        per_client / 1024.0,
        if per_client <= 10240.0 { "yes" } else { "no" }
    ));
    o + &against_haproxy(rows, targets)
}

/// Issue 16's goals against HAProxy in the same run: on every sysbench row dbproxy's ratio
/// to direct at least HAProxy's, and at 8 and 64 threads its CPU per query at most 0.8 of
/// HAProxy's.
fn against_haproxy(rows: &[Row], targets: &[Target]) -> String {
    let Some(h) = targets.iter().position(|t| t.name == "haproxy") else {
        return String::new();
    };
    let per_op = |c: &Cell| c.proxy_cpu.map(|p| p / c.ops.max(1.0));
    let mut o = String::from(
        "\n## Goals against HAProxy (this run)\n\n| row | ratio to direct: dbproxy / HAProxy | met | proxy CPU per query: dbproxy / HAProxy | at most 0.8 |\n|---|---|---|---|---|\n",
    );
    for r in rows.iter().filter(|r| r.name.starts_with("oltp_")) {
        let cell = |i: usize| r.cells.get(i).and_then(|c| c.as_ref());
        let (Some(d), Some(p), Some(x)) = (cell(0), cell(1), cell(h)) else {
            o.push_str(&format!("| {} | not measured | no | | |\n", r.name));
            continue;
        };
        let (rp, rx) = (p.value / d.value, x.value / d.value);
        let cpu = match (per_op(p), per_op(x)) {
            (Some(a), Some(b)) if b > 0.0 => {
                let judged = r.name.contains(" 8 thr") || r.name.contains(" 64 thr");
                let verdict = match (judged, a / b <= 0.8) {
                    (false, _) => "",
                    (true, true) => "yes",
                    (true, false) => "no",
                };
                format!(
                    "{:.0} / {:.0} µs ({:.2}) | {verdict}",
                    a * 1e6,
                    b * 1e6,
                    a / b
                )
            }
            _ => "not measured | no".into(),
        };
        o.push_str(&format!(
            "| {} | {rp:.2} / {rx:.2} | {} | {cpu} |\n",
            r.name,
            if rp >= rx { "yes" } else { "no" }
        ));
    }
    o
}

fn json(
    (rows, targets): (&[Row], &[Target]),
    (tls_rows, tls_targets): (&[Row], &[Target]),
    idle: &str,
    per_client: f64,
    backends: f64,
) -> String {
    let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    let mut o = String::from("{\n  \"benchmarks\": [\n");
    o.push_str(&json_rows(rows, targets));
    o.push_str("  ],\n  \"tls_benchmarks\": [\n");
    o.push_str(&json_rows(tls_rows, tls_targets));
    o.push_str(&format!(
        "  ],\n  \"idle_clients\": {{\"summary\": \"{}\", \"rss_bytes_per_client\": {per_client:.0}, \"backend_connections\": {backends}}}\n}}\n",
        esc(idle)
    ));
    o
}

/// Benchmarks as JSON objects, one per line.
fn json_rows(rows: &[Row], targets: &[Target]) -> String {
    let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    let mut o = String::new();
    for (i, r) in rows.iter().enumerate() {
        o.push_str(&format!(
            "    {{\"name\": \"{}\", \"unit\": \"{}\", \"results\": {{",
            esc(&r.name),
            r.unit
        ));
        let parts: Vec<String> = targets
            .iter()
            .zip(&r.cells)
            .map(|(t, c)| match c {
                Some(c) => format!(
                    "\"{}\": {{\"value\": {:.1}, \"rounds\": [{}], \"ops\": {:.0}, \"db_connections\": {}, \"db_cpu_s\": {:.2}, \"proxy_cpu_s\": {}, \"proxy_user_s\": {}, \"proxy_kernel_s\": {}, \"proxy_syscalls\": {}}}",
                    t.name,
                    c.value,
                    c.rounds
                        .iter()
                        .map(|v| format!("{v:.1}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    c.ops,
                    c.db_connections,
                    c.db_cpu,
                    c.proxy_cpu.map_or("null".into(), |p| format!("{p:.2}")),
                    c.proxy_split.map_or("null".into(), |(u, _)| format!("{u:.3}")),
                    c.proxy_split.map_or("null".into(), |(_, k)| format!("{k:.3}")),
                    c.proxy_syscalls.map_or("null".into(), |n| format!("{n:.0}"))
                ),
                None => format!("\"{}\": null", t.name),
            })
            .collect();
        o.push_str(&parts.join(", "));
        o.push_str(if i + 1 < rows.len() { "}},\n" } else { "}}\n" });
    }
    o
}

/// Bars of each benchmark's ratio to direct, one colour per target.
fn chart(rows: &[Row], targets: &[Target], path: &PathBuf) -> std::result::Result<(), String> {
    use plotters::prelude::*;
    let font = std::fs::read("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
        .map_err(|e| e.to_string())?;
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| "cannot load the font".to_string())?;
    let root = BitMapBackend::new(path, (1400, 120 + 60 * rows.len() as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let max = rows
        .iter()
        .flat_map(|r| {
            let d = r.cells.first().and_then(|c| c.as_ref()).map(|c| c.value);
            r.cells
                .iter()
                .filter_map(move |c| Some(c.as_ref()?.value / d?))
        })
        .fold(1.0f64, f64::max)
        * 1.1;
    let n = rows.len() as f64;
    let mut ch = ChartBuilder::on(&root)
        .caption(
            "dbproxy: ratio to direct MariaDB (higher is better)",
            ("sans-serif", 26),
        )
        .margin(20)
        .x_label_area_size(40)
        .y_label_area_size(420)
        .build_cartesian_2d(0.0..max, -0.5..n - 0.5)
        .map_err(|e| e.to_string())?;
    let names: Vec<String> = rows.iter().map(|r| r.name.clone()).collect();
    ch.configure_mesh()
        .y_labels(rows.len())
        .y_label_formatter(&|y| {
            // Row i is centred on y = n - 1 - i.
            let i = n - 1.0 - y.round();
            if (y - y.round()).abs() < 0.01 && i >= 0.0 && (i as usize) < names.len() {
                names[i as usize].clone()
            } else {
                String::new()
            }
        })
        .x_desc("ratio to direct")
        .draw()
        .map_err(|e| e.to_string())?;
    let colors = [
        RGBColor(120, 120, 120),
        RGBColor(31, 119, 180),
        RGBColor(44, 160, 44),
        RGBColor(255, 127, 14),
    ];
    let h = 0.8 / targets.len() as f64;
    for (ti, t) in targets.iter().enumerate() {
        let color = colors[ti % colors.len()];
        let bars: Vec<Rectangle<(f64, f64)>> = rows
            .iter()
            .enumerate()
            .filter_map(|(ri, r)| {
                let d = r.cells.first()?.as_ref()?.value;
                let v = r.cells.get(ti)?.as_ref()?.value / d;
                let y0 = n - 1.0 - ri as f64 - 0.4 + ti as f64 * h;
                Some(Rectangle::new(
                    [(0.0, y0), (v, y0 + h * 0.9)],
                    color.filled(),
                ))
            })
            .collect();
        ch.draw_series(bars)
            .map_err(|e| e.to_string())?
            .label(t.name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], color.filled()));
    }
    ch.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(name: &'static str) -> Target {
        Target {
            name,
            port: 0,
            password: "",
            tls: false,
        }
    }

    fn cell(value: f64, cpu: Option<f64>) -> Option<Cell> {
        Some(Cell {
            value,
            rounds: vec![value],
            ops: value * 10.0,
            db_connections: 0,
            db_cpu: 0.0,
            proxy_cpu: cpu,
            proxy_split: None,
            proxy_syscalls: None,
        })
    }

    /// The table shows the proxy's CPU per query split into user and kernel time, and its
    /// system calls per query, next to the total.
    #[test]
    fn the_table_shows_user_and_kernel_time_and_system_calls_per_query() {
        let targets = [target("direct"), target("dbproxy")];
        let mut proxied = cell(500.0, Some(0.15)).unwrap();
        proxied.proxy_split = Some((0.05, 0.10));
        proxied.proxy_syscalls = Some(10_000.0);
        let rows = [Row {
            name: "oltp_point_select 8 thr, prepared".into(),
            unit: "qps",
            cells: vec![cell(1000.0, None), Some(proxied)],
        }];
        let t = table(&rows, &targets);
        assert!(
            t.contains("proxy 30.0 µs (user 10.0, kernel 20.0), 2.00 syscalls"),
            "{t}"
        );
        let j = json_rows(&rows, &targets);
        assert!(j.contains("\"proxy_user_s\": 0.050"), "{j}");
        assert!(j.contains("\"proxy_syscalls\": 10000"), "{j}");
    }

    #[test]
    fn goals_against_haproxy_compare_ratios_and_cpu_per_query() {
        let targets = [target("direct"), target("dbproxy"), target("haproxy")];
        // Direct's rate, then dbproxy's and HAProxy's with the CPU seconds they used.
        let row = |name: &str, direct: f64, (p, pc): (f64, f64), (h, hc): (f64, f64)| Row {
            name: name.into(),
            unit: "qps",
            cells: vec![cell(direct, None), cell(p, Some(pc)), cell(h, Some(hc))],
        };
        let rows = vec![
            // dbproxy 700 qps with 0.21 s of CPU (30 µs per query); HAProxy 600 with 0.24 s.
            row(
                "oltp_point_select 64 thr, prepared",
                1000.0,
                (700.0, 0.21),
                (600.0, 0.24),
            ),
            row(
                "oltp_read_only 1 thr, prepared",
                1000.0,
                (500.0, 0.4),
                (600.0, 0.3),
            ),
            row("connect storm, 8 workers", 1.0, (2.0, 0.0), (1.0, 0.0)),
        ];
        let o = against_haproxy(&rows, &targets);
        assert!(
            o.contains("| oltp_point_select 64 thr, prepared | 0.70 / 0.60 | yes | 30 / 40 µs (0.75) | yes |"),
            "{o}"
        );
        // 1 thread: the ratio is judged, CPU per query is shown but not judged.
        assert!(
            o.contains(
                "| oltp_read_only 1 thr, prepared | 0.50 / 0.60 | no | 80 / 50 µs (1.60) |  |"
            ),
            "{o}"
        );
        assert!(!o.contains("connect storm"), "{o}");
        assert_eq!(against_haproxy(&rows, &targets[..2]), "");
    }
}
