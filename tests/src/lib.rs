//! Test harness: a throwaway MariaDB per test (mariadb-install-db into a temp dir, its own
//! port and socket), dbproxy started from its binary in front of it, and real clients.
//!
//! Every child process is spawned from one long-lived thread with PR_SET_PDEATHSIG, so a
//! test binary that dies takes its servers with it; `Drop` stops them on the normal path.

pub mod aws;
pub mod etcd;
pub mod pg;
pub mod raw;
pub mod standin;
pub mod tls;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The io drivers every integration test runs against.
pub const DRIVERS: [&str; 2] = ["uring", "epoll"];

/// A small deterministic generator (xorshift) for the randomised tests: a seed replays a
/// failure exactly.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform enough below `n` (> 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.below(xs.len() as u64) as usize]
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// What a differential test tells when the two sides' answers differ: `client`'s last
/// steps and everyone's, newest first, and where the whole run was written (`file` in the
/// temporary directory, a client and its step per line, to replay it by hand).
pub fn divergence_report(history: &[(usize, String)], client: usize, file: &str) -> String {
    let recent: Vec<String> = history
        .iter()
        .rev()
        .take(25)
        .map(|(c, s)| format!("  client {c}: {s}"))
        .collect();
    let own: Vec<String> = history
        .iter()
        .rev()
        .filter(|(c, _)| *c == client)
        .take(20)
        .map(|(_, s)| format!("  {s}"))
        .collect();
    let all: Vec<String> = history.iter().map(|(c, s)| format!("{c}\t{s}")).collect();
    let path = std::env::temp_dir().join(file);
    let _ = std::fs::write(&path, all.join("\n"));
    format!(
        "client {client}'s last steps, newest first:\n{}\nlast steps, newest first:\n{}\nthe whole run: {}",
        own.join("\n"),
        recent.join("\n"),
        path.display()
    )
}

/// Password of the proxy user `app`.
pub const APP_PASSWORD: &str = "app-secret";
/// Password of the database user `app` (only dbproxy knows it).
pub const DB_PASSWORD: &str = "db-secret";

type SpawnReq = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns `cmd` from a thread that lives as long as the process.
pub fn spawn(cmd: Command) -> Child {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnReq>>> = OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnReq>();
        std::thread::spawn(move || {
            for (mut cmd, reply) in rx {
                use std::os::unix::process::CommandExt;
                // SAFETY: prctl is async-signal-safe; it only sets this child's death signal.
                unsafe {
                    cmd.pre_exec(|| {
                        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                        Ok(())
                    });
                }
                let _ = reply.send(cmd.spawn());
            }
        });
        Mutex::new(tx)
    });
    let (rtx, rrx) = mpsc::channel();
    let desc = format!("{cmd:?}");
    tx.lock().unwrap().send((cmd, rtx)).unwrap();
    rrx.recv()
        .unwrap()
        .unwrap_or_else(|e| panic!("cannot start {desc}: {e}"))
}

/// Raises this process's open-files limit to the hard limit (tests open thousands of
/// client connections).
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain rlimit calls with a valid pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// A free TCP port on 127.0.0.1.
/// A port free now that this test process has not handed out before (the kernel may give
/// the same ephemeral port to two binds in a row once the first is closed: a proxy's
/// admin and client ports once collided that way).
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Polls `f` every 20 ms until it holds or `timeout` passes; whether it held.
pub fn poll_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `f` until it holds; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, f: impl FnMut() -> bool) {
    assert!(poll_until(timeout, f), "timed out waiting for {what}");
}

/// The scheduler state (`R`, `S`, `T`, ...) of each thread of process `pid`.
fn thread_states(pid: u32) -> Vec<char> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        // The state follows the command name, which is in parentheses and may hold any.
        .filter_map(|stat| stat.rsplit_once(')')?.1.trim_start().chars().next())
        .collect()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A MariaDB server of the test's own.
pub struct MariaDb {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    extra_args: Vec<String>,
    /// The network namespace it runs in (None: the test's own).
    netns: Option<String>,
}

impl MariaDb {
    /// Installs and starts a server with user `app` (password [`DB_PASSWORD`]).
    pub fn start() -> MariaDb {
        Self::start_with(&[])
    }

    /// Same, with extra mariadbd options.
    pub fn start_with(extra: &[&str]) -> MariaDb {
        Self::start_in(None, extra)
    }

    /// A server inside the network namespace `ns` (its Unix socket, which the test's root
    /// SQL uses, is reachable from anywhere: a file, not a network address).
    pub fn start_in_netns(ns: &Netns, extra: &[&str]) -> MariaDb {
        Self::start_in(Some(ns.name.clone()), extra)
    }

    fn start_in(netns: Option<String>, extra: &[&str]) -> MariaDb {
        let dir = tempfile::Builder::new()
            .prefix("dbproxy-test-")
            .tempdir()
            .unwrap();
        // Each server gets its own tmpdir rather than a shared /tmp.
        let tmp = dir.path().join("tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        let mut install = Command::new("mariadb-install-db");
        install
            .env("TMPDIR", &tmp)
            .arg("--no-defaults")
            .arg(format!("--datadir={}", dir.path().join("data").display()))
            .arg("--auth-root-authentication-method=normal")
            .arg("--skip-test-db")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if is_root() {
            install.arg("--user=root");
        }
        let out = install
            .output()
            .expect("mariadb-install-db (apt-get install mariadb-server)");
        assert!(
            out.status.success(),
            "mariadb-install-db failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut db = MariaDb {
            port: free_port(),
            dir,
            child: None,
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            netns,
        };
        db.run_server();
        db.root_sql(&format!(
            "DELETE FROM mysql.global_priv WHERE User=''; FLUSH PRIVILEGES; \
             CREATE USER app@'%' IDENTIFIED BY '{DB_PASSWORD}'; GRANT ALL ON *.* TO app@'%'; \
             CREATE DATABASE shop; CREATE DATABASE shop2;"
        ));
        db
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("mysqld.sock")
    }

    fn run_server(&mut self) {
        let d = self.dir.path();
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "mariadbd"]);
                c
            }
            None => Command::new("mariadbd"),
        };
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", d.join("data").display()))
            .arg(format!("--socket={}", self.socket().display()))
            .arg(format!("--port={}", self.port))
            .arg(format!("--pid-file={}", d.join("mysqld.pid").display()))
            .arg(format!("--log-error={}", d.join("error.log").display()))
            .arg(format!("--tmpdir={}", d.join("tmp").display()))
            .arg("--bind-address=127.0.0.1")
            .arg("--skip-name-resolve")
            .arg("--max-allowed-packet=64M")
            .arg("--innodb-buffer-pool-size=64M")
            .arg("--innodb-log-file-size=48M")
            .arg("--max-connections=1000")
            .arg("--local-infile=1")
            // dbproxy's test-only check-in verification lists a connection's locks here.
            .arg("--plugin-load-add=metadata_lock_info")
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if is_root() {
            cmd.arg("--user=root");
        }
        self.child = Some(spawn(cmd));
        let sock = self.socket();
        wait_until(
            "mariadbd to accept connections",
            Duration::from_secs(60),
            || {
                Command::new("mariadb")
                    .arg("--no-defaults")
                    .arg(format!("--socket={}", sock.display()))
                    .args(["-uroot", "-e", "SELECT 1"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false)
            },
        );
    }

    /// Runs SQL as root over the Unix socket and returns tab-separated output.
    pub fn root_sql(&self, sql: &str) -> String {
        let out = Command::new("mariadb")
            .arg("--no-defaults")
            .arg(format!("--socket={}", self.socket().display()))
            .args(["-uroot", "-N", "-B", "-e", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "root SQL failed: {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// A global status counter (e.g. `Connections`, `Threads_connected`).
    pub fn status(&self, name: &str) -> u64 {
        let out = self.root_sql(&format!("SHOW GLOBAL STATUS LIKE '{name}'"));
        out.split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no status {name}: {out}"))
    }

    /// The server's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP (`true`) or SIGCONT: a server that hangs with its connections open, as behind
    /// a network partition (no reset, no refusal: only timeouts tell).
    /// Returns once every thread of the server has stopped (or none is stopped): `kill`
    /// returns before the group stop reaches them, and a thread still running could answer
    /// a statement sent right after.
    pub fn freeze(&self, frozen: bool) {
        let Some(pid) = self.pid() else { return };
        let sig = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: a signal to our own child's pid.
        unsafe { libc::kill(pid as i32, sig) };
        let what = if frozen { "stop" } else { "continue" };
        wait_until(
            &format!("every thread of mariadbd to {what}"),
            Duration::from_secs(10),
            || thread_states(pid).iter().all(|&s| (s == 'T') == frozen),
        );
    }

    /// Starts the server again on the same data directory and port.
    pub fn restart(&mut self) {
        self.kill();
        self.run_server();
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A network namespace of the test's own, joined to the test's by a veth pair with
/// link-local addresses (`outside` here, `inside` there); deleted on drop, veth and all.
pub struct Netns {
    pub name: String,
    pub outside: String,
    pub inside: String,
}

impl Netns {
    pub fn create(tag: &str) -> Netns {
        let id = std::process::id() % 100_000;
        let name = format!("dbproxy-{tag}-{id}");
        let (host_if, ns_if) = (format!("dbp{tag}{id}h"), format!("dbp{tag}{id}n"));
        let net = 1 + id % 250;
        let (outside, inside) = (format!("169.254.{net}.1"), format!("169.254.{net}.2"));
        let ns = Netns {
            name: name.clone(),
            outside: outside.clone(),
            inside: inside.clone(),
        };
        for cmd in [
            format!("ip netns add {name}"),
            format!("ip link add {host_if} type veth peer name {ns_if}"),
            format!("ip link set {ns_if} netns {name}"),
            format!("ip addr add {outside}/30 dev {host_if}"),
            format!("ip link set {host_if} up"),
            format!("ip netns exec {name} ip addr add {inside}/30 dev {ns_if}"),
            format!("ip netns exec {name} ip link set {ns_if} up"),
            format!("ip netns exec {name} ip link set lo up"),
        ] {
            let st = Command::new("sh").args(["-c", &cmd]).status().unwrap();
            assert!(st.success(), "{cmd}");
        }
        ns
    }

    /// Drops every packet that arrives in the namespace (nftables inside it: the host's
    /// own tables are not touched): its servers vanish without a reset.
    pub fn black_hole(&self) {
        let rules = "add table inet blackhole
             add chain inet blackhole input { type filter hook input priority 0; policy drop; }
";
        let mut c = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(mut i) = c.stdin.take() {
            i.write_all(rules.as_bytes()).unwrap();
        }
        assert!(c.wait().unwrap().success(), "nft in {}", self.name);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A primary and a GTID replica of it, each a [`MariaDb`] of its own. The database user
/// `app` has every privilege but READ_ONLY ADMIN, so that `read_only` holds for it (as for
/// an application's user).
pub struct Pair {
    pub primary: MariaDb,
    pub replica: MariaDb,
}

impl Pair {
    pub fn start() -> Pair {
        let args = |id: &str| {
            vec![
                format!("--server-id={id}"),
                "--log-bin=mysql-bin".to_string(),
                "--log-slave-updates".to_string(),
                "--binlog-format=ROW".to_string(),
            ]
        };
        let (p, r) = (args("1"), args("2"));
        let p: Vec<&str> = p.iter().map(String::as_str).collect();
        let mut r: Vec<&str> = r.iter().map(String::as_str).collect();
        r.push("--read-only=1");
        let primary = MariaDb::start_with(&p);
        let replica = MariaDb::start_with(&r);
        for db in [&primary, &replica] {
            db.root_sql("REVOKE READ_ONLY ADMIN ON *.* FROM app@'%'");
        }
        primary.root_sql(
            "CREATE USER repl@'127.0.0.1' IDENTIFIED BY 'repl'; \
             GRANT REPLICATION SLAVE ON *.* TO repl@'127.0.0.1'",
        );
        // Both servers were set up alike: the replica starts from the primary's position now.
        let pos = primary.root_sql("SELECT @@gtid_binlog_pos");
        replica.root_sql(&format!(
            "SET GLOBAL gtid_slave_pos = '{}'; \
             CHANGE MASTER TO MASTER_HOST = '127.0.0.1', MASTER_PORT = {}, MASTER_USER = 'repl', \
             MASTER_PASSWORD = 'repl', MASTER_USE_GTID = slave_pos, MASTER_CONNECT_RETRY = 1; \
             START SLAVE",
            pos.trim(),
            primary.port
        ));
        let pair = Pair { primary, replica };
        pair.sync();
        pair
    }

    /// Waits until the replica has applied everything the primary has written.
    pub fn sync(&self) {
        let pos = self.primary.root_sql("SELECT @@gtid_binlog_pos");
        let got = self
            .replica
            .root_sql(&format!("SELECT MASTER_GTID_WAIT('{}', 30)", pos.trim()));
        assert_eq!(got.trim(), "0", "the replica did not catch up with {pos}");
    }

    /// Promotes the replica (as an operator or a failover script would).
    pub fn promote_replica(&self) {
        self.replica
            .root_sql("STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only = 0");
    }

    /// `targets = [...]` for a target group with both servers.
    pub fn targets(&self) -> String {
        format!(
            "targets = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]",
            self.primary.port, self.replica.port
        )
    }
}

/// dbproxy running from its binary in front of a [`MariaDb`].
pub struct Proxy {
    pub port: u16,
    /// The admin endpoint's port (`GET /metrics`).
    pub admin: u16,
    /// The configuration file it runs with.
    pub config: PathBuf,
    pub io: String,
    /// Extra environment of the process.
    env: Vec<(String, String)>,
    child: Option<Child>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// Passwords and tokens of the suite that no dbproxy log may contain: the fixtures' own, and
/// whatever a test adds with [`never_logged`]. Every [`Proxy`] checks its log when dropped.
pub fn secrets() -> Vec<String> {
    let mut all: Vec<String> = [APP_PASSWORD, DB_PASSWORD, "sha2-secret", "native-secret"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    all.extend(extra_secrets().lock().unwrap().iter().cloned());
    all
}

fn extra_secrets() -> &'static Mutex<Vec<String>> {
    static EXTRA: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    EXTRA.get_or_init(Mutex::default)
}

/// Adds `secret` to what no dbproxy log of this test process may contain; returns it.
pub fn never_logged(secret: &str) -> String {
    extra_secrets().lock().unwrap().push(secret.to_string());
    secret.to_string()
}

/// The dbproxy binary (built by `cargo xtask test`; `DBPROXY_BIN` overrides).
pub fn dbproxy_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("DBPROXY_BIN") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let bin = target.join("debug").join("dbproxy");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p proxy` first (cargo xtask test does)",
        bin.display()
    );
    let built = bin.metadata().and_then(|m| m.modified()).unwrap();
    let newest = newest_mtime(&root.join("proxy/src"));
    assert!(
        built >= newest,
        "{} is older than proxy/src: run `cargo build -p proxy` (cargo xtask test does)",
        bin.display()
    );
    bin
}

fn newest_mtime(dir: &Path) -> std::time::SystemTime {
    let mut newest = std::time::UNIX_EPOCH;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let t = if p.is_dir() {
            newest_mtime(&p)
        } else {
            e.metadata().and_then(|m| m.modified()).unwrap()
        };
        newest = newest.max(t);
    }
    newest
}

impl Proxy {
    /// Starts dbproxy with the `io` driver; `group_extra` lines go into the target group.
    pub fn start(db: &MariaDb, io: &str, group_extra: &str) -> Proxy {
        Self::start_full(db, io, "", group_extra)
    }

    /// Same, with extra `[proxy]` lines too.
    pub fn start_full(db: &MariaDb, io: &str, proxy_extra: &str, group_extra: &str) -> Proxy {
        Self::start_custom(db, io, proxy_extra, group_extra, "")
    }

    /// Same, with `sections` (e.g. a `[guard]` table) appended to the configuration.
    pub fn start_custom(
        db: &MariaDb,
        io: &str,
        proxy_extra: &str,
        group_extra: &str,
        sections: &str,
    ) -> Proxy {
        Self::start_at(db.port, io, proxy_extra, group_extra, sections)
    }

    /// Same, in front of whatever listens on `target_port` (a stand-in server).
    pub fn start_at(
        target_port: u16,
        io: &str,
        proxy_extra: &str,
        group_extra: &str,
        sections: &str,
    ) -> Proxy {
        Self::start_env(target_port, io, proxy_extra, group_extra, sections, &[])
    }

    /// [`Self::start_at`] with extra environment variables for the process.
    pub fn start_env(
        target_port: u16,
        io: &str,
        proxy_extra: &str,
        group_extra: &str,
        sections: &str,
        env: &[(&str, String)],
    ) -> Proxy {
        Self::start_admin(target_port, io, proxy_extra, group_extra, "", sections, env)
    }

    /// [`Self::start_env`] with extra `[admin]` lines (the SQL console).
    pub fn start_admin(
        target_port: u16,
        io: &str,
        proxy_extra: &str,
        group_extra: &str,
        admin_extra: &str,
        sections: &str,
        env: &[(&str, String)],
    ) -> Proxy {
        let dir = tempfile::Builder::new()
            .prefix("dbproxy-conf-")
            .tempdir()
            .unwrap();
        let port = free_port();
        let admin = free_port();
        let config = format!(
            r#"[proxy]
{workers}
{verify}
io = "{io}"
{proxy_extra}

[admin]
listen = "127.0.0.1:{admin}"
{admin_extra}

[[endpoints]]
name = "default"
listen = "127.0.0.1:{port}"
target_group = "default"

[[target_groups]]
name = "default"
{targets}
{group_extra}

[[users]]
name = "app"
password = "{APP_PASSWORD}"
backend_password = "{DB_PASSWORD}"

[[users]]
name = "sha2user"
password = "sha2-secret"
backend_user = "app"
backend_password = "{DB_PASSWORD}"
auth_plugin = "caching_sha2_password"

[[users]]
name = "nativeuser"
password = "native-secret"
backend_user = "app"
backend_password = "{DB_PASSWORD}"
auth_plugin = "mysql_native_password"

{sections}
"#,
            targets = if group_extra.contains("targets =") {
                String::new()
            } else {
                format!("targets = [\"127.0.0.1:{target_port}\"]")
            },
            workers = if proxy_extra.contains("workers") {
                ""
            } else {
                "workers = 2"
            },
            verify = if proxy_extra.contains("verify_checkin") {
                ""
            } else {
                "verify_checkin = true"
            },
        );
        let path = dir.path().join("dbproxy.toml");
        std::fs::write(&path, config).unwrap();
        let log = dir.path().join("dbproxy.log");
        let mut p = Proxy {
            port,
            admin,
            config: path.clone(),
            io: io.to_string(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            child: None,
            log,
            _dir: dir,
        };
        p.launch();
        p
    }

    /// Starts the process (again) with the same configuration and waits until it listens.
    pub fn launch(&mut self) {
        let mut cmd = Command::new(dbproxy_bin());
        cmd.args(["run", "--config"])
            .arg(&self.config)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env(
                "DBPROXY_LOG",
                std::env::var("DBPROXY_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.log)
                    .unwrap(),
            );
        self.child = Some(spawn(cmd));
        let port = self.port;
        wait_until("dbproxy to listen", Duration::from_secs(30), || {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!(
                        "dbproxy exited with {st}: {}",
                        std::fs::read_to_string(&self.log).unwrap_or_default()
                    );
                }
            }
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    /// The metrics text from the admin endpoint, each pool's series without its
    /// `engine` label (which [`Self::metrics_raw`] keeps), so that tests name a series by
    /// its group and role.
    pub fn metrics(&self) -> String {
        self.metrics_raw()
            .replace(",engine=\"mysql\"", "")
            .replace(",engine=\"postgresql\"", "")
    }

    /// The metrics text from the admin endpoint, as it is.
    pub fn metrics_raw(&self) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.admin)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default()
    }

    /// One metric's value: `name` with its labels, e.g.
    /// `dbproxy_pins_total{target_group="default",reason="cursor"}`.
    /// Without labels, `series` is the sum over all of its label sets (e.g.
    /// `dbproxy_client_connections` of every endpoint).
    pub fn metric(&self, series: &str) -> i64 {
        let text = self.metrics();
        let value = |v: &str| v.trim().parse::<f64>().ok().map(|f| f as i64);
        let found: Vec<i64> = if series.contains('{') {
            text.lines()
                .filter_map(|l| l.strip_prefix(series).and_then(value))
                .collect()
        } else {
            text.lines()
                .filter_map(|l| {
                    let rest = l.strip_prefix(series)?;
                    let v = match rest.strip_prefix('{') {
                        Some(r) => r.split_once("} ")?.1,
                        None => rest.strip_prefix(' ')?,
                    };
                    value(v)
                })
                .collect()
        };
        if found.is_empty() {
            panic!("no metric {series} in:\n{text}");
        }
        found.iter().sum()
    }

    /// `dbproxy_pins_total` for `reason` in the default target group.
    pub fn pins_started(&self, reason: &str) -> i64 {
        self.metric(&format!(
            "dbproxy_pins_total{{target_group=\"default\",target_role=\"read_write\",reason=\"{reason}\"}}"
        ))
    }

    /// `dbproxy_pinned_clients` for `reason` in the default target group.
    pub fn pinned_now(&self, reason: &str) -> i64 {
        self.metric(&format!(
            "dbproxy_pinned_clients{{target_group=\"default\",target_role=\"read_write\",reason=\"{reason}\"}}"
        ))
    }

    /// Check-ins verified and check-ins whose backend session differed from dbproxy's
    /// record (`verify_checkin`, on for every dbproxy the tests start).
    pub fn checkin_verification(&self) -> (i64, i64) {
        (
            self.metric("dbproxy_checkins_verified_total{target_group=\"default\",target_role=\"read_write\"}"),
            self.metric("dbproxy_checkin_violations_total{target_group=\"default\",target_role=\"read_write\"}"),
        )
    }

    /// Panics when a check-in was found different from dbproxy's record of it.
    pub fn assert_clean_checkins(&self) {
        let log = self.log();
        let bad: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("check-in verification failed"))
            .collect();
        assert!(
            bad.is_empty(),
            "[{}] {} dirty check-in(s):\n{}",
            self.io,
            bad.len(),
            bad.join("\n")
        );
    }

    /// What dbproxy logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process's resident memory in bytes (VmRSS), 0 when it is not running.
    pub fn rss(&self) -> u64 {
        let Some(pid) = self.child.as_ref().map(Child::id) else {
            return 0;
        };
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGKILL, as a crash would.
    /// Sends SIGHUP (dbproxy reloads its TLS certificate).
    pub fn sighup(&self) {
        if let Some(c) = self.child.as_ref() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGHUP) };
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM (dbproxy drains) without waiting.
    pub fn sigterm(&self) {
        if let Some(c) = self.child.as_ref() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
    }

    /// Waits up to `timeout` for the process to exit; its status (`None`: still running).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut status = None;
        poll_until(timeout, || {
            status = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            status.is_some()
        });
        if status.is_some() {
            self.child = None;
        }
        status
    }

    /// Stops with SIGTERM (a clean shutdown) and returns the exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let mut status = None;
        if !poll_until(Duration::from_secs(10), || {
            status = c.try_wait().ok().flatten();
            status.is_some()
        }) {
            let _ = c.kill();
            return c.wait().ok();
        }
        status
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!(
                "--- dbproxy ({}) log, newest first ---\n{}",
                self.io,
                tail.join("\n")
            );
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if !std::thread::panicking() {
            // Every test checks, on its way out, that no check-in was dirty and that no
            // password of the suite's reached dbproxy's log.
            self.assert_clean_checkins();
            let log = self.log();
            for s in secrets() {
                assert!(
                    !log.contains(s.as_str()),
                    "[{}] a password of the test suite is in dbproxy's log",
                    self.io
                );
            }
        }
    }
}

/// Runs the `mariadb` command-line client against 127.0.0.1:`port`.
pub fn mariadb_cli(port: u16, user: &str, password: &str, args: &[&str], sql: &str) -> Output {
    Command::new("mariadb")
        .arg("--no-defaults")
        .args(["-h", "127.0.0.1", "-P", &port.to_string(), "-u", user])
        .arg(format!("-p{password}"))
        .args(args)
        .args(["-e", sql])
        .output()
        .unwrap()
}

/// Same, feeding `input` on standard input instead of `-e`.
pub fn mariadb_cli_stdin(
    port: u16,
    user: &str,
    password: &str,
    args: &[&str],
    input: &[u8],
) -> Output {
    let mut child = Command::new("mariadb")
        .arg("--no-defaults")
        .args(["-h", "127.0.0.1", "-P", &port.to_string(), "-u", user])
        .arg(format!("-p{password}"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

#[cfg(feature = "client")]
/// A mysql-crate connection URL. `prefer_socket` is off: with it the crate asks the
/// server for `@@socket` and reconnects there, which would bypass dbproxy on this host.
pub fn url(port: u16, user: &str, password: &str, db: &str) -> String {
    format!("mysql://{user}:{password}@127.0.0.1:{port}/{db}?prefer_socket=false")
}

#[cfg(feature = "client")]
/// Connects with the mysql crate's default settings.
pub fn connect(port: u16, user: &str, password: &str, db: &str) -> mysql::Result<mysql::Conn> {
    let opts = mysql::Opts::from_url(&url(port, user, password, db)).unwrap();
    mysql::Conn::new(opts)
}

#[cfg(feature = "client")]
/// A root connection over the server's Unix socket, for status counters.
pub fn monitor(db: &MariaDb) -> mysql::Conn {
    let opts = mysql::OptsBuilder::new()
        .user(Some("root"))
        .socket(Some(db.socket().to_str().unwrap()));
    mysql::Conn::new(opts).unwrap()
}

#[cfg(feature = "client")]
/// A global status counter read over a monitoring connection.
pub fn global_status(c: &mut mysql::Conn, name: &str) -> u64 {
    use mysql::prelude::Queryable;
    let row: Option<(String, u64)> = c
        .query_first(format!("SHOW GLOBAL STATUS LIKE '{name}'"))
        .unwrap();
    row.unwrap().1
}

/// Runs headless Chromium (Debian's `chromium`) on `url` with `args`; its stdout and stderr.
pub fn chromium(url: &str, args: &[&str]) -> (String, String) {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--hide-scrollbars",
            "--enable-logging=stderr",
            "--v=0",
            // Enough of the page's own (virtual) time for several refreshes.
            "--virtual-time-budget=6000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .output()
        .expect("chromium (apt-get install chromium)");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// GET `path` from 127.0.0.1:`port`: the status line, the headers and the body.
pub fn http_get(port: u16, path: &str) -> (String, String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_lowercase(), body.to_string())
}

/// Polls `f` for up to 5 s; panics with `what` if it never holds. (Counters dbproxy updates
/// right after a reply goes out are read this way.)
pub fn wait_for(f: impl FnMut() -> bool, what: &str) {
    wait_until(what, Duration::from_secs(5), f);
}

#[cfg(feature = "client")]
/// Samples MariaDB's `Threads_connected` on a thread of its own until [`ThreadsPeak::finish`].
pub struct ThreadsPeak {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    t: Option<std::thread::JoinHandle<u64>>,
}

#[cfg(feature = "client")]
impl ThreadsPeak {
    pub fn start(db: &MariaDb) -> ThreadsPeak {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let mut m = monitor(db);
        let t = std::thread::spawn(move || {
            let mut peak = 0;
            while !s.load(Ordering::Relaxed) {
                peak = peak.max(global_status(&mut m, "Threads_connected"));
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        });
        ThreadsPeak { stop, t: Some(t) }
    }

    /// The highest value seen (the sampler's own connection included).
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.t.take().map(|t| t.join().unwrap()).unwrap_or(0)
    }
}

/// sysbench with the mysql driver against 127.0.0.1:`port` as `app`, on the `shop` tables
/// the tests and benchmarks prepare (4 × 10,000 rows); add the test's own arguments.
pub fn sysbench_command(port: u16, password: &str) -> Command {
    let mut c = Command::new("sysbench");
    c.args([
        "--db-driver=mysql",
        "--mysql-host=127.0.0.1",
        "--mysql-user=app",
        "--mysql-db=shop",
    ])
    .arg(format!("--mysql-port={port}"))
    .arg(format!("--mysql-password={password}"))
    .args(["--tables=4", "--table-size=10000"]);
    c
}

/// `sysbench <test> prepare` against 127.0.0.1:`port` (see [`sysbench_command`]); panics
/// with its error output when it fails.
pub fn sysbench_prepare(port: u16, password: &str, test: &str) {
    let out = sysbench_command(port, password)
        .args([test, "prepare"])
        .output()
        .expect("sysbench (apt-get install sysbench)");
    assert!(
        out.status.success(),
        "sysbench prepare: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A line of sysbench's report, e.g. `transactions:` (empty when missing).
pub fn sysbench_field(report: &str, name: &str) -> String {
    report
        .lines()
        .find(|l| l.trim_start().starts_with(name))
        .map(|l| l.trim().to_string())
        .unwrap_or_default()
}

/// sysbench's report, once it is known to have run without a fatal error; prints
/// `what` and the transactions, queries and ignored errors.
pub fn sysbench_report(what: &str, out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    println!(
        "{what} {} | {} | {}",
        sysbench_field(&text, "transactions:"),
        sysbench_field(&text, "queries:"),
        sysbench_field(&text, "ignored errors:")
    );
    assert!(
        out.status.success(),
        "{what} sysbench failed: {err}\n{text}"
    );
    assert!(
        !text.contains("FATAL") && !err.contains("FATAL"),
        "{what} {err}"
    );
    text
}

/// Reads whatever arrives on a raw socket until EOF, error or `timeout`.
pub fn read_some(s: &mut TcpStream, timeout: Duration) -> (Vec<u8>, bool) {
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return (out, false)
            }
            Err(_) => return (out, true),
        }
    }
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The Python the client tests run: a venv in `target/pyenv` made by `cargo xtask test`
/// (Debian's python3 with its python3-pymysql, and mysql-connector-python from PyPI);
/// `DBPROXY_TEST_PYTHON` overrides.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("DBPROXY_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let p = workspace().join("target/pyenv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: `cargo xtask test` makes it (python3-venv, python3-pymysql, mysql-connector-python)",
        p.display()
    );
    p
}

/// Runs `tests/node/<script>` with Node.js and `args`, its modules from `target/node` (npm
/// packages `cargo xtask test` installs); its standard output, or a panic with both streams.
pub fn run_node(script: &str, args: &[String]) -> String {
    let modules = workspace().join("target/node/node_modules");
    assert!(
        modules.join("pg").exists(),
        "{} is missing: `cargo xtask test` installs node-postgres there",
        modules.display()
    );
    let out = Command::new("node")
        .arg(workspace().join("tests/node").join(script))
        .args(args)
        .env("NODE_PATH", &modules)
        .output()
        .expect("node (Debian's nodejs)");
    stdout_of(script, out)
}

/// Runs `tests/python/<script>` with `args`; its standard output, or a panic with both
/// streams when it fails.
pub fn run_python(script: &str, args: &[String]) -> String {
    let out = Command::new(python())
        .arg(workspace().join("tests/python").join(script))
        .args(args)
        .output()
        .unwrap();
    stdout_of(script, out)
}

/// A program's standard output; a panic with both streams when it failed.
fn stdout_of(what: &str, out: Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Debian's MariaDB Connector/J (`libmariadb-java`).
pub const CONNECTOR_J: &str = "/usr/share/java/mariadb-java-client.jar";

/// Compiles `tests/java/<class>.java` against Connector/J and runs it with `args`; its
/// standard output, or a panic with both streams when it fails.
pub fn run_java(class: &str, args: &[String]) -> String {
    run_java_with(CONNECTOR_J, class, args)
}

/// pgjdbc, from Debian's libpostgresql-jdbc-java.
pub const PGJDBC: &str = "/usr/share/java/postgresql.jar";

/// [`run_java`] with another driver's jar on the class path.
pub fn run_java_with(jar: &str, class: &str, args: &[String]) -> String {
    assert!(
        Path::new(jar).exists(),
        "{jar} is missing: `cargo xtask test` installs it"
    );
    let dir = tempfile::tempdir().unwrap();
    let src = workspace().join("tests/java").join(format!("{class}.java"));
    let javac = Command::new("javac")
        .args(["-cp", jar, "-d"])
        .arg(dir.path())
        .arg(&src)
        .output()
        .expect("javac (default-jdk-headless; `cargo xtask test` installs it)");
    assert!(
        javac.status.success(),
        "javac {}: {}",
        src.display(),
        String::from_utf8_lossy(&javac.stderr)
    );
    let cp = format!("{}:{jar}", dir.path().display());
    let out = Command::new("java")
        .args(["-cp", &cp, class])
        .args(args)
        .output()
        .unwrap();
    stdout_of(class, out)
}

/// Two tenants, each with a database `tenant1`/`tenant2` holding `orders` rows with the same
/// ids and owners of their own (`...-t1`, `...-t2`).
pub fn create_tenants(db: &MariaDb) {
    db.root_sql(
        "CREATE DATABASE tenant1; CREATE DATABASE tenant2; \
         CREATE TABLE tenant1.orders (id INT PRIMARY KEY, owner VARCHAR(20)) ENGINE=InnoDB; \
         CREATE TABLE tenant2.orders (id INT PRIMARY KEY, owner VARCHAR(20)) ENGINE=InnoDB; \
         INSERT INTO tenant1.orders VALUES (1, 'alice-t1'), (2, 'bob-t1'), (3, 'eve-t1'); \
         INSERT INTO tenant2.orders VALUES (1, 'carol-t2'), (2, 'dave-t2'), (3, 'frank-t2');",
    );
}
