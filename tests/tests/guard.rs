//! The kernel guard, attached only to cgroups these tests create under the cgroup2 mount
//! (never the root), removed afterwards.

use proxy_tests::*;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// A cgroup of the test's own, with `proxy` and `client` children; removed on drop.
struct TestCgroup {
    root: PathBuf,
}

impl TestCgroup {
    fn new(tag: &str) -> TestCgroup {
        assert!(
            is_root(),
            "the guard tests need root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)"
        );
        let mount = cgroup2_mount().expect("a cgroup2 mount (see /proc/mounts)");
        let root = mount.join(format!("dbproxy-test-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(root.join("client")).unwrap();
        TestCgroup { root }
    }

    fn proxy(&self) -> PathBuf {
        self.root.join("proxy")
    }

    fn client(&self) -> PathBuf {
        self.root.join("client")
    }

    /// Program names attached to this cgroup, as bpftool lists them.
    fn attached(&self) -> String {
        let out = Command::new("bpftool")
            .args(["cgroup", "show"])
            .arg(&self.root)
            .output()
            .expect("bpftool (apt-get install bpftool)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // A cgroup is removable once its last process has been reaped.
        let removed = poll_until(Duration::from_secs(5), || {
            let _ = std::fs::remove_dir(self.root.join("client"));
            let _ = std::fs::remove_dir(self.root.join("proxy"));
            std::fs::remove_dir(&self.root).is_ok() || !self.root.exists()
        });
        if !removed {
            eprintln!("could not remove {}", self.root.display());
        }
    }
}

fn is_root() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
    })
}

/// Runs `cmd` inside `cgroup`; returns its pid and output.
fn run_in(cgroup: &Path, mut cmd: Command) -> (u32, Output) {
    let procs = cgroup.join("cgroup.procs");
    // SAFETY: only async-signal-safe calls (open/write/close through std on a raw path) in
    // the child before exec.
    unsafe {
        cmd.pre_exec(move || {
            std::fs::write(&procs, std::process::id().to_string())?;
            Ok(())
        });
    }
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    (pid, child.wait_with_output().unwrap())
}

fn cli(port: u16, host: &str, user: &str, pw: &str) -> Command {
    let mut c = Command::new("mariadb");
    c.args([
        "--no-defaults",
        "-h",
        host,
        "-P",
        &port.to_string(),
        "-u",
        user,
        &format!("-p{pw}"),
        "-N",
        "-e",
        "SELECT 42",
    ]);
    c
}

/// A raw connect() from Python: prints "ok" or the OS error.
fn py_connect(host: &str, port: u16) -> Command {
    let mut c = Command::new("python3");
    c.args([
        "-c",
        "import socket,sys\ntry:\n socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close(); print('ok')\nexcept OSError as e: print(e)",
        host,
        &port.to_string(),
    ]);
    c
}

/// A raw connect from the client cgroup to `host:port` is refused by the guard (EPERM).
fn assert_refused(cg: &TestCgroup, host: &str, port: u16, io: &str) {
    let (_, out) = run_in(&cg.client(), py_connect(host, port));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("Operation not permitted"),
        "[{io}] {host}: {said}"
    );
}

/// The mariadb CLI in the client cgroup gets its answer through dbproxy.
fn assert_served_through(cg: &TestCgroup, proxy_port: u16, io: &str) {
    let (_, out) = run_in(
        &cg.client(),
        cli(proxy_port, "127.0.0.1", "app", APP_PASSWORD),
    );
    assert!(
        out.status.success(),
        "[{io}] through dbproxy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
}

fn guard_section(cg: &TestCgroup, db_port: u16, extra: &str) -> String {
    format!(
        "[guard]\nenabled = true\nattach_cgroup = \"{}\"\nproxy_cgroup = \"{}\"\nprotect_ports = [{db_port}]\n{extra}\n",
        cg.root.display(),
        cg.proxy().display()
    )
}

#[test]
fn only_dbproxy_reaches_the_database() {
    let db = MariaDb::start_with(&["--bind-address=127.0.0.1,::1"]);
    for io in DRIVERS {
        let cg = TestCgroup::new(io);
        let mut proxy = Proxy::start_custom(&db, io, "", "", &guard_section(&cg, db.port, ""));
        let attached = cg.attached();
        assert!(
            attached.contains("connect4") && attached.contains("connect6"),
            "[{io}] {attached}"
        );

        // Straight to MariaDB from the client cgroup: refused by connect() itself, over
        // IPv4, IPv6 and an IPv4-mapped IPv6 address.
        let (pid, out) = run_in(&cg.client(), cli(db.port, "127.0.0.1", "app", DB_PASSWORD));
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("Can't connect") && err.contains("(1)"),
            "[{io}] EPERM expected: {err}"
        );
        for host in ["127.0.0.1", "::1", "::ffff:127.0.0.1"] {
            assert_refused(&cg, host, db.port, io);
        }
        // The same client through dbproxy works (and so do dbproxy's own io_uring or epoll
        // connects to the database, from its cgroup).
        assert_served_through(&cg, proxy.port, io);
        // An unprotected port is untouched.
        let (_, out) = run_in(&cg.client(), py_connect("127.0.0.1", proxy.admin));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "ok",
            "[{io}] unprotected port"
        );
        // A process in dbproxy's cgroup (as a forked child of dbproxy would be) may connect.
        let (_, out) = run_in(&cg.proxy(), cli(db.port, "127.0.0.1", "app", DB_PASSWORD));
        assert!(
            out.status.success(),
            "[{io}] dbproxy's cgroup: {}",
            String::from_utf8_lossy(&out.stderr)
        );

        // The denial was logged with the right pid and comm, and counted.
        wait_for(
            || proxy.log().contains(&format!("pid={pid} comm=mariadb")),
            &format!("[{io}] denial of pid {pid} logged:\n{}", proxy.log()),
        );
        wait_for(
            || proxy.metric("dbproxy_guard_denials_total") >= 4,
            &format!("[{io}] denials counted"),
        );

        // A clean exit detaches; so does kill -9 (the links die with the process).
        proxy.stop();
        wait_for(
            || !cg.attached().contains("connect4"),
            &format!("[{io}] detached after exit"),
        );
        proxy.launch();
        assert!(cg.attached().contains("connect4"));
        proxy.kill9();
        wait_for(
            || !cg.attached().contains("connect4"),
            &format!("[{io}] detached after kill -9"),
        );
        let (_, out) = run_in(&cg.client(), py_connect("127.0.0.1", db.port));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "ok",
            "[{io}] open again once detached"
        );
    }
}

/// The default guard (no `protect_ports`) in front of a MariaDB listening on every
/// address: the port is refused on every local address a process could reach it by (the
/// loopback range, IPv4-mapped, ::1, the unspecified address), dbproxy still reaches it;
/// a process in a network namespace of its own (a container) reaches its own server on
/// the same port, unjudged.
#[test]
fn a_local_database_is_guarded_on_every_local_address_but_not_in_other_namespaces() {
    let db = MariaDb::start_with(&["--bind-address=*"]);
    // An interface address of this host's own, made for the test: the host end of a veth
    // pair into a namespace the test creates (a connect to it stays on this host).
    let ns = Netns::create("ga");
    for io in DRIVERS {
        let cg = TestCgroup::new(&format!("local-{io}"));
        let section = format!(
            "[guard]\nenabled = true\nattach_cgroup = \"{}\"\nproxy_cgroup = \"{}\"\n",
            cg.root.display(),
            cg.proxy().display()
        );
        let proxy = Proxy::start_custom(&db, io, "", "", &section);
        for host in [
            "127.0.0.1",
            "127.0.0.2",
            "127.3.4.5",
            "::ffff:127.0.0.2",
            "::1",
            "0.0.0.0",
            "::",
            &ns.outside,
        ] {
            assert_refused(&cg, host, db.port, io);
        }
        // Another port on the same addresses is untouched.
        let (_, out) = run_in(&cg.client(), py_connect("127.0.0.1", proxy.admin));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "ok",
            "[{io}] other port"
        );
        assert_served_through(&cg, proxy.port, io);
        // A network namespace of its own: a server and a client on 127.0.0.1 and the
        // database's port, both inside it.
        let inside = format!(
            "ip link set lo up && python3 -c \"\
import socket\n\
l = socket.socket(); l.bind(('127.0.0.1', {port})); l.listen()\n\
c = socket.create_connection(('127.0.0.1', {port}), timeout=3); print('ok')\n\
\"",
            port = db.port
        );
        let mut ns = Command::new("unshare");
        ns.args(["--net", "sh", "-c", &inside]);
        let (_, out) = run_in(&cg.client(), ns);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "ok",
            "[{io}] a namespace's own server: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // A flood of refused connects: every one counted, the log rate-limited.
        let mut flood = Command::new("python3");
        flood.args([
            "-c",
            "import socket,sys\nfor _ in range(200):\n try: socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=3)\n except OSError: pass",
            &db.port.to_string(),
        ]);
        run_in(&cg.client(), flood);
        wait_for(
            || proxy.metric("dbproxy_guard_denials_total") >= 208,
            &format!("[{io}] every refusal counted"),
        );
        wait_for(
            || {
                proxy
                    .log()
                    .contains("more connects to the database refused than logged")
            },
            &format!("[{io}] the rest summed up"),
        );
        let lines = proxy.log().matches("guard: refused a connect()").count();
        assert!(lines < 208, "[{io}] {lines} lines for 208 refusals");
    }
}

/// A connect() to the Unix socket `path` from Python (after `cd dir` when given): prints
/// "ok" or the OS error.
fn py_unix(path: &str, dir: Option<&Path>) -> Command {
    let mut c = Command::new("python3");
    c.args([
        "-c",
        "import socket,sys,os\nif len(sys.argv) > 2: os.chdir(sys.argv[2])\ns = socket.socket(socket.AF_UNIX)\ns.settimeout(3)\ntry:\n s.connect(sys.argv[1]); print('ok')\nexcept OSError as e: print(e)",
        path,
    ]);
    if let Some(d) = dir {
        c.arg(d);
    }
    c
}

/// The database's Unix socket is refused to the client cgroup, dbproxy itself still goes
/// through it (a `unix:` target), and with a TCP target dbproxy learns the socket from the
/// server (`@@socket`). Which program guards it depends on the kernel: the cgroup LSM
/// program (it judges the listening socket: every name for the file is refused, and a
/// namespace's own server at the same path is not) where the kernel loads LSM programs,
/// else the cgroup connect_unix program (the path as the client gives it, in every
/// network namespace). `/status` says which.
#[test]
fn the_databases_unix_socket_is_refused_to_others() {
    let db = MariaDb::start();
    let sock = db.socket();
    let dir = db.dir.path().to_path_buf();
    let path = sock.display().to_string();
    let symlink = dir.join("symlink.sock");
    std::os::unix::fs::symlink(&sock, &symlink).unwrap();
    let hard = dir.join("hard.sock");
    std::fs::hard_link(&sock, &hard).unwrap();
    let said = |cg: &TestCgroup, mut cmd: Command| {
        cmd.stdin(Stdio::null());
        let (_, out) = run_in(&cg.client(), cmd);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )
    };
    let refused = |cg: &TestCgroup, cmd: Command, io: &str, how: &str| {
        let out = said(cg, cmd);
        assert!(
            out.contains("Operation not permitted"),
            "[{io}] {how}: {out}"
        );
    };
    for io in DRIVERS {
        let cg = TestCgroup::new(&format!("unix-{io}"));
        let proxy = Proxy::start_custom(&db, io, "", "", &guard_section(&cg, db.port, ""));
        wait_for(
            || {
                proxy
                    .log()
                    .contains("protecting the database's Unix socket")
            },
            &format!("[{io}] the socket learnt from the server"),
        );
        let (_, _, status) = http_get(proxy.admin, "/status");
        assert!(
            status.contains("\"unix_sockets\":\"guarded"),
            "[{io}] {status}"
        );
        let lsm = status.contains("cgroup LSM");
        eprintln!(
            "[{io}] Unix socket guarded by the {}",
            if lsm {
                "cgroup LSM program"
            } else {
                "cgroup connect_unix program"
            }
        );
        refused(&cg, py_unix(&path, None), io, "its path");
        let mut other_netns = Command::new("unshare");
        other_netns
            .arg("--net")
            .arg("python3")
            .args(py_unix(&path, None).get_args());
        refused(&cg, other_netns, io, "from another network namespace");
        // The mariadb CLI gets the kernel's refusal (errno 1).
        let mut cli_sock = Command::new("mariadb");
        cli_sock.args(["--no-defaults", "-u", "app", &format!("-p{DB_PASSWORD}")]);
        cli_sock
            .arg(format!("--socket={path}"))
            .args(["-e", "SELECT 1"]);
        let out = said(&cg, cli_sock);
        assert!(
            out.contains("(1)") && !out.contains("1\n"),
            "[{io}] mariadb --socket: {out}"
        );
        if lsm {
            refused(
                &cg,
                py_unix("mysqld.sock", Some(&dir)),
                io,
                "a relative path",
            );
            refused(
                &cg,
                py_unix(&symlink.display().to_string(), None),
                io,
                "a symlink",
            );
            refused(
                &cg,
                py_unix(&hard.display().to_string(), None),
                io,
                "a hard link",
            );
            refused(
                &cg,
                py_unix(&format!("/proc/self/root{path}"), None),
                io,
                "/proc/self/root",
            );
        }
        // A server of the client's own is its business.
        let own = format!(
            "import socket\nl = socket.socket(socket.AF_UNIX); l.bind('{p}'); l.listen()\nc = socket.socket(socket.AF_UNIX); c.connect('{p}'); print('ok')",
            p = dir.join(format!("own-{io}.sock")).display()
        );
        let mut c = Command::new("python3");
        c.args(["-c", &own]);
        assert_eq!(said(&cg, c), "ok", "[{io}] its own socket");
        // A namespace's own server bound to the very same path (a container's database):
        // its business with the LSM program; refused by connect_unix, which sees only the
        // path.
        let container = format!(
            "mount -t tmpfs tmpfs {d} && python3 -c \"import socket\nl = socket.socket(socket.AF_UNIX); l.bind('{path}'); l.listen()\nc = socket.socket(socket.AF_UNIX)\ntry:\n c.connect('{path}'); print('ok')\nexcept OSError as e: print(e)\"",
            d = dir.display()
        );
        let mut ns = Command::new("unshare");
        ns.args(["--net", "--mount", "sh", "-c", &container]);
        let out = said(&cg, ns);
        if lsm {
            assert_eq!(
                out, "ok",
                "[{io}] a namespace's own server at the same path"
            );
        } else {
            assert!(
                out.contains("Operation not permitted"),
                "[{io}] same path: {out}"
            );
        }
        assert_served_through(&cg, proxy.port, io);
        wait_for(
            || proxy.metric("dbproxy_guard_denials_total") >= 3,
            &format!("[{io}] the refusals counted"),
        );
        let (_, _, status) = http_get(proxy.admin, "/status");
        assert!(
            status.contains(&format!("unix:{path}")),
            "[{io}] /status: {status}"
        );
        drop(proxy);

        // A `unix:` target: dbproxy reaches the database through the guarded socket.
        let proxy = Proxy::start_custom(
            &db,
            io,
            "",
            &format!("targets = [\"unix:{path}\"]"),
            &guard_section(&cg, db.port, ""),
        );
        assert_served_through(&cg, proxy.port, io);
        refused(
            &cg,
            py_unix(&path, None),
            io,
            "its path, with a unix: target",
        );
    }
}

/// `dbproxy guard detach` with `proxy`'s config: the pinned links leave `cg`.
fn guard_detach(proxy: &Proxy, cg: &TestCgroup) {
    let out = Command::new(dbproxy_bin())
        .args(["guard", "detach", "--config"])
        .arg(&proxy.config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(
        || !cg.attached().contains("connect4"),
        "detached by `dbproxy guard detach`",
    );
}

/// A bpffs of the test's own.
struct Bpffs(PathBuf);

impl Bpffs {
    fn mount(tag: &str) -> Bpffs {
        let dir = std::env::temp_dir().join(format!("dbproxy-bpffs-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(st.success(), "mount -t bpf");
        Bpffs(dir)
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn pinned_guard_survives_a_restart_without_an_open_window() {
    let db = MariaDb::start();
    let fs = Bpffs::mount("pinned");
    let cg = TestCgroup::new("pinned");
    let pin = fs.0.join("dbproxy");
    let section = guard_section(&cg, db.port, &format!("pin_path = \"{}\"", pin.display()));
    let mut proxy = Proxy::start_custom(&db, "uring", "", "", &section);
    proxy.kill9();
    // dbproxy is gone, the guard is not: no window in which the database is open.
    assert!(cg.attached().contains("connect4"), "pinned links survive");
    let (_, out) = run_in(&cg.client(), py_connect("127.0.0.1", db.port));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Operation not permitted"));
    // A restarted dbproxy takes the pinned links over and serves clients.
    proxy.launch();
    wait_for(
        || proxy.log().contains("took over the pinned link"),
        "took over",
    );
    // The same programs at the same cgroup: every link taken over, none replaced.
    assert!(
        !proxy.log().contains("replaced the pinned link"),
        "{}",
        proxy.log()
    );
    let (_, out) = run_in(
        &cg.client(),
        cli(proxy.port, "127.0.0.1", "app", APP_PASSWORD),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = Command::new(dbproxy_bin())
        .args(["guard", "status", "--config"])
        .arg(&proxy.config)
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains("connect4: attached (pinned)") && status.contains(&format!(":{}", db.port)),
        "{status}"
    );
    proxy.stop();
    assert!(
        cg.attached().contains("connect4"),
        "a clean exit keeps pinned links"
    );
    // `dbproxy guard detach` removes them.
    guard_detach(&proxy, &cg);
    let (_, out) = run_in(&cg.client(), py_connect("127.0.0.1", db.port));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}

/// A pinned guard attached where the config no longer says: a restarted dbproxy attaches
/// at the configured cgroup first, then removes the old links (never a moment without a
/// guard where the config wants one).
#[test]
fn a_pinned_guard_at_another_cgroup_is_replaced() {
    let db = MariaDb::start();
    let fs = Bpffs::mount("replaced");
    let (old, new) = (TestCgroup::new("pin-old"), TestCgroup::new("pin-new"));
    let pin = fs.0.join("dbproxy");
    let extra = format!("pin_path = \"{}\"", pin.display());
    let mut proxy =
        Proxy::start_custom(&db, "epoll", "", "", &guard_section(&old, db.port, &extra));
    proxy.kill9();
    assert!(old.attached().contains("connect4"), "pinned");
    let config = std::fs::read_to_string(&proxy.config).unwrap().replace(
        &old.root.display().to_string(),
        &new.root.display().to_string(),
    );
    std::fs::write(&proxy.config, config).unwrap();
    proxy.launch();
    wait_for(
        || proxy.log().contains("replaced the pinned link"),
        "the pinned links replaced",
    );
    assert!(
        !proxy.log().contains("took over the pinned link"),
        "links at another cgroup are not taken over"
    );
    assert!(
        !old.attached().contains("connect4"),
        "the old links are gone"
    );
    assert!(
        new.attached().contains("connect4"),
        "attached where configured"
    );
    let (_, out) = run_in(&old.client(), py_connect("127.0.0.1", db.port));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "ok",
        "no longer guarded"
    );
    assert_refused(&new, "127.0.0.1", db.port, "epoll");
    assert_served_through(&new, proxy.port, "epoll");
    proxy.stop();
    guard_detach(&proxy, &new);
}

#[test]
fn guard_without_privileges_refuses_to_start() {
    // As an unprivileged user (nobody), dbproxy must refuse rather than run unguarded.
    let db = MariaDb::start();
    let cg = TestCgroup::new("unpriv");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("g.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[endpoints]]\nname = \"e\"\nlisten = \"127.0.0.1:{}\"\ntarget_group = \"g\"\n\n[[target_groups]]\nname = \"g\"\ntargets = [\"127.0.0.1:{}\"]\n\n[[users]]\nname = \"u\"\npassword = \"p\"\nbackend_password = \"p\"\n\n{}",
            free_port(),
            db.port,
            guard_section(&cg, db.port, "")
        ),
    )
    .unwrap();
    let mut perms = std::fs::metadata(dir.path()).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(dir.path(), perms).unwrap();
    let mut cmd = Command::new(dbproxy_bin());
    cmd.args(["run", "--config"])
        .arg(&cfg)
        .uid(65534)
        .gid(65534);
    let out = cmd.output().unwrap();
    assert!(
        !out.status.success(),
        "an unprivileged dbproxy must not run with the guard enabled"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("CAP_BPF") || err.contains("CAP_SYS_ADMIN"),
        "names the capability: {err}"
    );
    assert!(!cg.attached().contains("connect4"));
}

/// The capabilities packaging/dbproxy.service keeps (its CapabilityBoundingSet).
fn unit_capabilities() -> Vec<String> {
    let unit = std::fs::read_to_string(workspace().join("packaging/dbproxy.service")).unwrap();
    unit.lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("CapabilityBoundingSet in the unit")
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// dbproxy (root) with only `caps` in its bounding set, as systemd runs the unit.
fn run_with_caps(caps: &[String], config: &Path, log: &Path) -> std::process::Child {
    let set: Vec<String> = caps
        .iter()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    Command::new("setpriv")
        .arg(format!("--bounding-set=-all,{}", set.join(",")))
        .args(["--inh-caps=-all", "--"])
        .arg(dbproxy_bin())
        .args(["run", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("setpriv (util-linux)")
}

#[test]
fn the_units_capabilities_are_exactly_what_the_guard_needs() {
    let db = MariaDb::start();
    let caps = unit_capabilities();
    assert!(!caps.is_empty());
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("dbproxy.log");
    let config = |cg: &TestCgroup, port: u16| {
        let cfg = dir.path().join("g.toml");
        std::fs::write(
            &cfg,
            format!(
                "[[endpoints]]\nname = \"e\"\nlisten = \"127.0.0.1:{port}\"\ntarget_group = \"g\"\n\n[[target_groups]]\nname = \"g\"\ntargets = [\"127.0.0.1:{}\"]\n\n[[users]]\nname = \"app\"\npassword = \"{APP_PASSWORD}\"\nbackend_password = \"{DB_PASSWORD}\"\n\n{}",
                db.port,
                guard_section(cg, db.port, "")
            ),
        )
        .unwrap();
        cfg
    };
    // With exactly the unit's set: the guard attaches, other processes are refused and
    // clients go through dbproxy.
    let cg = TestCgroup::new("unitcaps");
    let port = free_port();
    let mut child = run_with_caps(&caps, &config(&cg, port), &log);
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let up = poll_until(Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            || child.try_wait().ok().flatten().is_some()
    });
    assert!(
        up && child.try_wait().ok().flatten().is_none(),
        "{caps:?}: {}",
        read_log()
    );
    assert!(cg.attached().contains("connect4"), "{}", read_log());
    let (_, out) = run_in(&cg.client(), cli(db.port, "127.0.0.1", "app", DB_PASSWORD));
    assert!(!out.status.success(), "a direct connect was allowed");
    // The Unix socket too, with the same capabilities.
    assert!(
        !read_log().contains("Unix socket is NOT guarded"),
        "{}",
        read_log()
    );
    wait_for(
        || read_log().contains("protecting the database's Unix socket"),
        "the socket learnt under the unit's capabilities",
    );
    let mut sock = Command::new("mariadb");
    sock.args(["--no-defaults", "-u", "app", &format!("-p{DB_PASSWORD}")])
        .arg(format!("--socket={}", db.socket().display()))
        .args(["-e", "SELECT 1"]);
    let (_, out) = run_in(&cg.client(), sock);
    assert!(
        !out.status.success(),
        "a direct connect through the socket was allowed"
    );
    let (_, out) = run_in(&cg.client(), cli(port, "127.0.0.1", "app", APP_PASSWORD));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "42",
        "{}",
        read_log()
    );
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = child.wait().unwrap();
    assert!(st.success(), "{st}: {}", read_log());
    drop(cg);
    // Without any one of them, dbproxy refuses to start (never runs unguarded).
    for missing in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let cg = TestCgroup::new("fewercaps");
        let mut child = run_with_caps(&fewer, &config(&cg, free_port()), &log);
        let exited = poll_until(Duration::from_secs(20), || {
            child.try_wait().ok().flatten().is_some()
        });
        if !exited {
            let _ = child.kill();
        }
        let st = child.wait().unwrap();
        assert!(
            exited && !st.success(),
            "without {missing}: {st}: {}",
            read_log()
        );
        assert!(
            read_log().contains(missing.as_str()),
            "names {missing}: {}",
            read_log()
        );
        assert!(!cg.attached().contains("connect4"));
    }
}

/// The same guard in front of PostgreSQL: its TCP port and its Unix socket (learnt from
/// the server's `unix_socket_directories` and `port`) are refused to the client cgroup,
/// psql goes through dbproxy.
#[test]
fn postgresql_is_guarded_on_its_port_and_its_socket() {
    let db = proxy_tests::pg::PgDb::start(&[]);
    // The socket's directory is readable with pg_read_all_settings (without it, dbproxy
    // protects the port in the packages' directories).
    db.sql("GRANT pg_read_all_settings TO app");
    let socket = db.dir.path().join(format!(".s.PGSQL.{}", db.port));
    assert!(socket.exists(), "{}", socket.display());
    let psql = |host: &str, port: u16, password: &str| {
        let mut c = proxy_tests::pg::program("psql");
        c.arg(format!(
            "host={host} port={port} user=app dbname=shop sslmode=disable connect_timeout=5"
        ))
        .args(["-At", "-c", "SELECT 40 + 2"])
        .env("PGPASSWORD", password)
        .stdin(Stdio::null());
        c
    };
    for io in DRIVERS {
        let cg = TestCgroup::new(&format!("pg-{io}"));
        let proxy = Proxy::start_at(
            db.port,
            io,
            "",
            &proxy_tests::pg::group(&db, ""),
            &guard_section(&cg, db.port, ""),
        );
        wait_for(
            || {
                proxy.log().contains(&format!(
                    "protecting the database's Unix socket socket={}",
                    socket.display()
                ))
            },
            &format!("[{io}] the socket learnt from the server:\n{}", proxy.log()),
        );
        let (_, out) = run_in(&cg.client(), psql("127.0.0.1", db.port, DB_PASSWORD));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("Operation not permitted"),
            "[{io}] psql straight to the port: {err}"
        );
        assert_refused(&cg, "127.0.0.1", db.port, io);
        let dir = db.dir.path().display().to_string();
        let (_, out) = run_in(&cg.client(), psql(&dir, db.port, DB_PASSWORD));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("Operation not permitted"),
            "[{io}] psql to the socket: {err}"
        );
        let (_, out) = run_in(&cg.client(), psql("127.0.0.1", proxy.port, APP_PASSWORD));
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "42",
            "[{io}] psql through dbproxy: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // dbproxy's own cgroup reaches the socket.
        let (_, out) = run_in(&cg.proxy(), psql(&dir, db.port, DB_PASSWORD));
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"),
            "[{io}] dbproxy's cgroup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
