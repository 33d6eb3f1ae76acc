//! `cargo xtask <command>`: the project's own commands (`cargo xtask --help`).

mod bench;
mod fuzz;
mod pg_bench;
mod split_bench;

use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// dbproxy's project commands.
#[derive(Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run dbproxy in front of a throwaway MariaDB (or the given one) until Ctrl-C.
    Demo(DemoArgs),
    /// Install what the tests need (idempotent), then fmt, clippy, unit and integration
    /// tests (every scenario on both io drivers).
    Test,
    /// Build the kernel guard's eBPF object (installs its toolchain if missing).
    BuildEbpf,
    /// Build what runs in production: the eBPF object, then the release binary that
    /// embeds it (target/release/dbproxy).
    Build,
    /// Build the Debian package (cargo-deb, installed if missing): the binary, the systemd
    /// unit and an example configuration, in target/debian/.
    Deb {
        /// Package the debug build instead of building a release (for tests).
        #[arg(long)]
        debug: bool,
    },
    /// sysbench and connection benchmarks: direct MariaDB, dbproxy, HAProxy in the same run.
    Bench {
        /// Shorter runs (about a quarter of the time).
        #[arg(long)]
        quick: bool,
        /// Another dbproxy binary (e.g. the previous commit's) measured in the same run.
        #[arg(long, value_name = "DBPROXY_BINARY")]
        baseline: Option<PathBuf>,
        /// Which rows: mysql (sysbench; HAProxy as the peer), postgresql (pgbench;
        /// PgBouncer as the peer), split (a split endpoint against the writer alone, over
        /// a primary and a replica), or all.
        #[arg(long, default_value = "all", value_parser = ["all", "mysql", "postgresql", "split"])]
        engine: String,
    },
    /// Run every fuzz target in fuzz/ (cargo-fuzz, installed if missing; stable Rust).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        time: u64,
        /// Only this target (a file name in fuzz/fuzz_targets, without .rs).
        #[arg(long)]
        target: Option<String>,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Cmd::Test => test(),
        Cmd::Demo(d) => demo(d),
        Cmd::BuildEbpf => build_ebpf(),
        Cmd::Build => build_release(),
        Cmd::Deb { debug } => deb(debug),
        Cmd::Bench {
            quick,
            baseline,
            engine,
        } => match engine.as_str() {
            "mysql" => bench::bench(quick, baseline),
            "postgresql" => pg_bench::bench(quick).map(drop),
            "split" => split_bench::bench(quick).map(drop),
            _ => bench::bench(quick, baseline)
                .and_then(|()| pg_bench::bench(quick).map(drop))
                .and_then(|()| split_bench::bench(quick).map(drop)),
        },
        Cmd::Fuzz { time, target } => fuzz::fuzz(time, target),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

type Result<T = ()> = std::result::Result<T, String>;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

/// The test `tests/tests/pg_differential.rs` holds (skipped in the main run).
const DIFFERENTIAL_TEST: &str =
    "sixteen_postgresql_clients_answer_as_if_each_had_its_own_connection";

/// Builds the integration test `name` and returns its executable.
fn test_executable(name: &str) -> std::result::Result<std::path::PathBuf, String> {
    let out = cargo()
        .args(["test", "-p", "proxy-tests", "--test", name, "--no-run"])
        .args(["--message-format=json"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("building the test {name}: {e}"))?;
    if !out.status.success() {
        return Err(format!("building the test {name} failed"));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter(|l| l.contains(&format!("\"name\":\"{name}\"")))
        .find_map(|l| {
            let at = l.find("\"executable\":\"")? + "\"executable\":\"".len();
            let end = l[at..].find('"')?;
            Some(std::path::PathBuf::from(&l[at..at + end]))
        })
        .ok_or_else(|| format!("no executable for the test {name}"))
}

fn run(what: &str, cmd: &mut Command) -> Result {
    eprintln!("xtask: {what}");
    let st = cmd
        .status()
        .map_err(|e| format!("{what}: cannot run: {e}"))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("{what}: failed ({st})"))
    }
}

/// Whether a command is on PATH (or, for an absolute path, whether the file exists).
fn have(cmd: &str) -> bool {
    if cmd.starts_with('/') {
        return std::path::Path::new(cmd).exists();
    }
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Installs Debian packages that provide the missing commands (idempotent).
fn ensure_apt(needed: &[(&str, &str)]) -> Result {
    let missing: Vec<&str> = needed
        .iter()
        .filter(|(cmd, _)| !have(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {} with apt-get", missing.join(" "));
    let sudo: &[&str] = if is_root() { &[] } else { &["sudo", "-n"] };
    let apt = |args: &[&str]| {
        let mut all: Vec<&str> = sudo.to_vec();
        all.push("apt-get");
        all.extend_from_slice(args);
        let mut c = Command::new(all[0]);
        c.args(&all[1..]).env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    run("apt-get update", &mut apt(&["update", "-qq"]))?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(missing.iter().copied());
    run("apt-get install", &mut apt(&args))
}

fn ensure_rust_components() -> Result {
    for (probe, component) in [("fmt", "rustfmt"), ("clippy", "clippy")] {
        let ok = cargo()
            .args([probe, "--version"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            run(
                &format!("rustup component add {component}"),
                Command::new("rustup").args(["component", "add", component]),
            )?;
        }
    }
    Ok(())
}

const DB_TOOLS: [(&str, &str); 3] = [
    ("mariadbd", "mariadb-server"),
    ("mariadb-install-db", "mariadb-server"),
    ("mariadb", "mariadb-client"),
];

/// What the tests drive dbproxy with besides the mariadb CLI: sysbench, bpftool, ip and
/// unshare (guard tests), nft (a black-holed database in a namespace), PyMySQL and a venv for mysql-connector-python, Connector/J and a
/// JDK, Chromium (the status page), curl (the admin side's login), PostgreSQL 15 (its
/// server, psql and pgbench; the tests start their own clusters), pgjdbc, Node.js and npm
/// (node-postgres comes from the npm registry), etcd (the fleet tests start their own
/// clusters).
const CLIENT_TOOLS: [(&str, &str); 17] = [
    ("sysbench", "sysbench"),
    ("curl", "curl"),
    ("chromium", "chromium"),
    ("bpftool", "bpftool"),
    ("ip", "iproute2"),
    ("unshare", "util-linux"),
    ("nft", "nftables"),
    (
        "/usr/lib/python3/dist-packages/pymysql/__init__.py",
        "python3-pymysql",
    ),
    ("/usr/share/doc/python3-venv", "python3-venv"),
    ("/usr/share/java/mariadb-java-client.jar", "libmariadb-java"),
    ("javac", "default-jdk-headless"),
    ("/usr/lib/postgresql/15/bin/pgbench", "postgresql-15"),
    ("/usr/share/java/postgresql.jar", "libpostgresql-jdbc-java"),
    ("node", "nodejs"),
    ("npm", "npm"),
    ("etcd", "etcd-server"),
    ("etcdctl", "etcd-client"),
];

/// mysql-connector-python for the tests, moto's server standing in for AWS Secrets
/// Manager and STS (with boto3, which drives it), and the PostgreSQL drivers asyncpg and
/// psycopg 3, from PyPI (pinned).
const PYPI_PACKAGES: [&str; 4] = [
    "mysql-connector-python==26.10.0",
    "moto[server]==5.2.5",
    "asyncpg==0.30.0",
    "psycopg[binary]==3.2.3",
];

/// Makes `target/pyenv`: a venv of Debian's python3 that also sees python3-pymysql, with
/// mysql-connector-python and moto installed (idempotent).
/// node-postgres for the tests, from the npm registry (pinned), in `target/node`.
const NPM_PACKAGES: [&str; 1] = ["pg@8.13.1"];

/// Makes `target/node/node_modules` with [`NPM_PACKAGES`] (idempotent).
fn ensure_node_clients() -> Result {
    let dir = root().join("target/node");
    if dir.join("node_modules/pg/package.json").exists() {
        return Ok(());
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    run(
        &format!("npm install {}", NPM_PACKAGES.join(" ")),
        Command::new("npm")
            .current_dir(&dir)
            .args(["install", "--no-audit", "--no-fund", "--silent"])
            .args(NPM_PACKAGES),
    )
}

fn ensure_python_clients() -> Result {
    let venv = root().join("target/pyenv");
    let python = venv.join("bin/python");
    let ready = || {
        Command::new(&python)
            .args([
                "-c",
                "import mysql.connector, pymysql, boto3, moto.server, asyncpg, psycopg",
            ])
            .output()
            .is_ok_and(|o| o.status.success())
            && venv.join("bin/moto_server").exists()
    };
    if ready() {
        return Ok(());
    }
    if !python.exists() {
        run(
            "python3 -m venv target/pyenv",
            Command::new("/usr/bin/python3")
                .args(["-m", "venv", "--system-site-packages"])
                .arg(&venv),
        )?;
    }
    run(
        &format!("pip install {}", PYPI_PACKAGES.join(" ")),
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet"])
            .args(PYPI_PACKAGES),
    )?;
    if ready() {
        Ok(())
    } else {
        Err(format!(
            "{} cannot import mysql.connector, pymysql, boto3, moto, asyncpg and psycopg",
            python.display()
        ))
    }
}

/// LLVM major version rustc uses here; bpf-linker must link the same.
const LLVM: &str = "22";
const BPF_LINKER: &str = "0.13.0";

/// Installs what building the eBPF object needs (idempotent): LLVM, rust-src, bpf-linker.
fn ensure_ebpf_toolchain() -> Result {
    let llvm_config = format!("/usr/lib/llvm-{LLVM}/bin/llvm-config");
    let llvm_dev = format!("llvm-{LLVM}-dev");
    ensure_apt(&[
        (llvm_config.as_str(), llvm_dev.as_str()),
        ("/usr/include/zlib.h", "zlib1g-dev"),
        ("/usr/include/zstd.h", "libzstd-dev"),
    ])?;
    let sysroot = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .map_err(|e| format!("rustc: {e}"))?;
    let src = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim())
        .join("lib/rustlib/src/rust/library");
    if !src.exists() {
        run(
            "rustup component add rust-src",
            Command::new("rustup").args(["component", "add", "rust-src"]),
        )?;
    }
    let linker = Command::new("bpf-linker").arg("--version").output();
    if !linker.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER)) {
        run(
            &format!("cargo install bpf-linker@{BPF_LINKER} (LLVM {LLVM})"),
            Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .args([
                    "install",
                    &format!("bpf-linker@{BPF_LINKER}"),
                    "--locked",
                    "--no-default-features",
                ])
                .args(["--features", &format!("llvm-{LLVM}")])
                .env("LLVM_PREFIX", format!("/usr/lib/llvm-{LLVM}")),
        )?;
    }
    Ok(())
}

/// Builds proxy-ebpf for bpfel-unknown-none (stable toolchain, RUSTC_BOOTSTRAP for
/// build-std); dbproxy's build embeds the object.
fn build_ebpf() -> Result {
    ensure_ebpf_toolchain()?;
    let mut c = cargo();
    c.current_dir(root().join("proxy-ebpf"))
        .args(["build", "--release"])
        .env("RUSTC_BOOTSTRAP", "1");
    run("build the eBPF object (proxy-ebpf)", &mut c)
}

fn ebpf_cargo() -> Command {
    let mut c = cargo();
    c.current_dir(root().join("proxy-ebpf"))
        .env("RUSTC_BOOTSTRAP", "1");
    c
}

/// The eBPF object, then the release binary that embeds it.
fn build_release() -> Result {
    build_ebpf()?;
    run(
        "build dbproxy (release)",
        cargo().args(["build", "--release", "-p", "proxy", "--bin", "dbproxy"]),
    )?;
    eprintln!(
        "xtask: {} (with the kernel guard)",
        root().join("target/release/dbproxy").display()
    );
    Ok(())
}

const CARGO_DEB: &str = "3.8.0";

/// Installs the cargo subcommand `cargo <sub>` (crate `cargo-<sub>`, at `version`) from
/// crates.io unless it runs already.
fn ensure_cargo_tool(sub: &str, version: &str) -> Result {
    let has = cargo()
        .args([sub, "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if has {
        return Ok(());
    }
    let spec = format!("cargo-{sub}@{version}");
    run(
        &format!("cargo install {spec}"),
        cargo().args(["install", &spec, "--locked"]),
    )
}

/// `cargo deb` (installed from crates.io if missing): target/debian/dbproxy_*.deb.
fn deb(debug: bool) -> Result {
    ensure_cargo_tool("deb", CARGO_DEB)?;
    if debug {
        // The debug binary as it is (the tests build it with the eBPF object).
        run(
            "cargo deb (debug build)",
            cargo().args([
                "deb",
                "-p",
                "proxy",
                "--no-build",
                "--profile",
                "dev",
                "--fast",
            ]),
        )
    } else {
        build_release()?;
        // The binary stripped; its debug symbols in a -dbgsym package beside it.
        run(
            "cargo deb",
            cargo().args(["deb", "-p", "proxy", "--no-build", "--dbgsym"]),
        )
    }
}

fn test() -> Result {
    let mut needed = DB_TOOLS.to_vec();
    needed.extend(CLIENT_TOOLS);
    ensure_apt(&needed)?;
    ensure_rust_components()?;
    ensure_python_clients()?;
    ensure_node_clients()?;
    build_ebpf()?;
    run(
        "cargo fmt --check (proxy-ebpf)",
        ebpf_cargo().args(["fmt", "--", "--check"]),
    )?;
    run(
        "cargo clippy -D warnings (proxy-ebpf)",
        ebpf_cargo().args(["clippy", "--release", "--", "-D", "warnings"]),
    )?;
    run(
        "cargo fmt --check",
        cargo().args(["fmt", "--all", "--", "--check"]),
    )?;
    run(
        "cargo clippy -D warnings",
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    run(
        "build dbproxy",
        cargo().args(["build", "-p", "proxy", "--bin", "dbproxy"]),
    )?;
    // The package test installs this (the debug build, packaged as a release would be).
    deb(true)?;
    // The fleet simulation with 1,000 instances needs the optimized build: it builds and
    // runs (in target/release, a lock of its own) beside everything below.
    eprintln!("xtask: the fleet simulation (release build), beside the others");
    let mut simulation = cargo()
        .args(["test", "--release", "-p", "proxy", "--lib", "fleet::sim"])
        .spawn()
        .map_err(|e| format!("cargo test --release (fleet::sim): {e}"))?;
    run(
        "unit tests",
        cargo().args(["test", "--workspace", "--lib", "--bins"]),
    )?;
    run(
        "no allocation per proxied statement (benches/statement.rs, once)",
        cargo().args(["test", "-p", "proxy-benches", "--bench", "statement"]),
    )?;
    // The PostgreSQL differential test (minutes of round trips to servers of its own, no
    // server shared with the others) runs beside the other integration tests.
    let differential = test_executable("pg_differential")?;
    eprintln!("xtask: the PostgreSQL differential test, beside the others");
    let mut beside = Command::new(&differential)
        .current_dir(root().join("tests"))
        .spawn()
        .map_err(|e| format!("{}: cannot run: {e}", differential.display()))?;
    let rest = run(
        "integration tests (uring and epoll)",
        cargo().args([
            "test",
            "-p",
            "proxy-tests",
            "--tests",
            "--",
            "--skip",
            DIFFERENTIAL_TEST,
        ]),
    );
    let beside = beside
        .wait()
        .map_err(|e| format!("the PostgreSQL differential test: {e}"))?;
    rest?;
    if !beside.success() {
        return Err(format!(
            "the PostgreSQL differential test failed ({beside})"
        ));
    }
    let simulation = simulation
        .wait()
        .map_err(|e| format!("the fleet simulation: {e}"))?;
    if !simulation.success() {
        return Err(format!("the fleet simulation failed ({simulation})"));
    }
    eprintln!("xtask: all tests passed");
    Ok(())
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

#[derive(clap::Args)]
struct DemoArgs {
    /// An existing MariaDB/MySQL (HOST:PORT) instead of a throwaway one.
    #[arg(long, value_name = "HOST:PORT")]
    target: Option<String>,
    /// The database user dbproxy logs in as.
    #[arg(long, default_value = "app")]
    backend_user: String,
    /// Its password.
    #[arg(long, default_value = proxy_tests::DB_PASSWORD)]
    backend_password: String,
    /// Where dbproxy listens.
    #[arg(long, default_value = "127.0.0.1:6033")]
    listen: String,
    /// Where the status page, /metrics and /status are served.
    #[arg(long, default_value = "127.0.0.1:9090")]
    admin_listen: String,
    /// Where the SQL admin console listens.
    #[arg(long, default_value = "127.0.0.1:6032")]
    console_listen: String,
    /// Run this dbproxy binary instead of building the release one (the demo's own test
    /// runs the debug build).
    #[arg(long, value_name = "PATH")]
    dbproxy: Option<PathBuf>,
}

/// The SQL console's login in the demo.
const DEMO_ADMIN: (&str, &str) = ("admin", "admin-secret");

/// A small table for the demo's first queries (the throwaway MariaDB only: a database the
/// user brings is never written to).
const DEMO_SEED: &str = "CREATE TABLE shop.products (id INT PRIMARY KEY, name VARCHAR(40), \
    price DECIMAL(8,2), stock INT) ENGINE=InnoDB; \
    INSERT INTO shop.products VALUES (1, 'espresso cup', 4.50, 120), (2, 'moka pot', 29.90, 14), \
    (3, 'grinder', 89.00, 6), (4, 'beans, 1 kg', 18.75, 40), (5, 'tamper', 12.00, 25);";

fn demo(opts: DemoArgs) -> Result {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let mut throwaway = None;
    let target = match &opts.target {
        Some(t) => t.clone(),
        None => {
            if !have("mariadbd") {
                eprintln!("xtask: no mariadbd found; installing MariaDB from Debian's packages");
            }
            ensure_apt(&DB_TOOLS)?;
            eprintln!("xtask: starting a throwaway MariaDB in a temporary directory");
            let db = proxy_tests::MariaDb::start();
            db.root_sql(DEMO_SEED);
            let t = format!("127.0.0.1:{}", db.port);
            throwaway = Some(db);
            t
        }
    };
    let bin = match &opts.dbproxy {
        Some(b) => b.clone(),
        None => {
            build_ebpf()?;
            run(
                "build dbproxy (release)",
                cargo().args(["build", "--release", "-p", "proxy", "--bin", "dbproxy"]),
            )?;
            std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| root().join("target"))
                .join("release/dbproxy")
        }
    };
    let dir = std::env::temp_dir().join(format!("dbproxy-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let config = dir.join("dbproxy.toml");
    let text = format!(
        r#"[proxy]
workers = 0
io = "auto"

[[endpoints]]
name = "default"
listen = "{listen}"
target_group = "default"

[[target_groups]]
name = "default"
targets = ["{target}"]
max_connections = 20
max_idle_connections = 20

[[users]]
name = "app"
password = "app-secret"
backend_user = "{user}"
backend_password = "{password}"

[admin]
listen = "{admin}"
sql_listen = "{console}"
admin_user = "{admin_user}"
admin_password = "{admin_password}"
"#,
        listen = opts.listen,
        user = opts.backend_user,
        password = opts.backend_password,
        admin = opts.admin_listen,
        console = opts.console_listen,
        admin_user = DEMO_ADMIN.0,
        admin_password = DEMO_ADMIN.1,
    );
    std::fs::write(&config, text).map_err(|e| format!("{}: {e}", config.display()))?;
    let mut proxy = Command::new(&bin)
        .args(["run", "--config"])
        .arg(&config)
        .spawn()
        .map_err(|e| format!("cannot start dbproxy: {e}"))?;
    // Tell the user to connect only once dbproxy listens.
    proxy_tests::poll_until(Duration::from_secs(10), || {
        [&opts.listen, &opts.admin_listen, &opts.console_listen]
            .iter()
            .all(|a| std::net::TcpStream::connect(a.as_str()).is_ok())
            || proxy.try_wait().ok().flatten().is_some()
    });
    if let Ok(Some(st)) = proxy.try_wait() {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(format!(
            "dbproxy exited at start ({st}): is one of {}, {}, {} taken? (--listen, \
             --admin-listen, --console-listen choose others)",
            opts.listen, opts.admin_listen, opts.console_listen
        ));
    }
    let host_port = |a: &str| {
        a.rsplit_once(':')
            .map(|(h, p)| (h.to_string(), p.to_string()))
            .unwrap_or_else(|| (a.to_string(), String::new()))
    };
    let (host, port) = host_port(&opts.listen);
    let (chost, cport) = host_port(&opts.console_listen);
    let admin = &opts.admin_listen;
    let (user, password) = DEMO_ADMIN;
    eprintln!(
        "\nxtask: dbproxy is running in front of {target}; config in {}",
        config.display()
    );
    if throwaway.is_some() {
        eprintln!(
            "xtask: the throwaway MariaDB has databases shop (with a table, products) and shop2"
        );
    }
    eprintln!(
        "\n    connect        mariadb -h {host} -P {port} -u app -papp-secret shop\n\
         \x20                  then: SELECT * FROM products;\n\
         \x20   status page    http://{admin}/\n\
         \x20   metrics        http://{admin}/metrics\n\
         \x20   status (JSON)  http://{admin}/status   or: dbproxy status --admin {admin}\n\
         \x20   SQL console    mariadb -h {chost} -P {cport} -u {user} -p{password}\n\
         \x20                  then: SHOW POOLS; SHOW CLIENTS; SHOW HELP;\n"
    );
    eprintln!("xtask: press Ctrl-C to stop and clean up");
    let status = loop {
        if STOP.load(Ordering::SeqCst) {
            break None;
        }
        if let Ok(Some(st)) = proxy.try_wait() {
            break Some(st);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if status.is_none() {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(proxy.id() as i32, libc::SIGTERM) };
        let _ = proxy.wait();
    }
    drop(throwaway);
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("xtask: stopped and cleaned up");
    match status {
        Some(st) if !st.success() => Err(format!("dbproxy exited with {st}")),
        _ => Ok(()),
    }
}
