//! A throwaway PostgreSQL server per test: `initdb` into a temporary directory (run as
//! the `postgres` system user when the tests run as root, as PostgreSQL refuses root), its
//! own port and socket directory, SCRAM logins. The superuser `postgres` and the role
//! `app` both have the password [`DB_PASSWORD`]; `app` owns the database `shop`.

use crate::{free_port, spawn, wait_until, DB_PASSWORD};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Where Debian's PostgreSQL programs are (`pg_config --bindir`).
pub fn bindir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let out = Command::new("pg_config")
            .arg("--bindir")
            .output()
            .expect("pg_config (apt-get install postgresql-15)");
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
    .clone()
}

/// A PostgreSQL program by name (psql, pgbench, initdb, ...).
pub fn program(name: &str) -> Command {
    Command::new(bindir().join(name))
}

/// The system user PostgreSQL's programs run as when the tests run as root (`initdb`,
/// `postgres` and PgBouncer refuse root): its user and group ids.
pub fn run_as() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let name = std::ffi::CString::new("postgres").ok()?;
    // SAFETY: getpwnam returns a pointer into static storage or null; read at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        panic!("running as root needs the postgres system user (apt-get install postgresql-15)");
    }
    // SAFETY: non-null, as checked.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    Some((uid, gid))
}

/// `cmd` runs as [`run_as`]'s user, when there is one.
fn as_postgres(cmd: &mut Command) -> &mut Command {
    if let Some((uid, gid)) = run_as() {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

/// A PostgreSQL server of the test's own.
pub struct PgDb {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
}

impl PgDb {
    /// Initialises and starts a server; `extra` are `-c name=value` settings.
    pub fn start(extra: &[&str]) -> PgDb {
        let dir = tempfile::Builder::new()
            .prefix("dbproxy-pg-")
            .tempdir()
            .unwrap();
        let owner = run_as();
        let chown = |p: &std::path::Path| {
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
            }
        };
        chown(dir.path());
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, DB_PASSWORD).unwrap();
        chown(&pwfile);
        let mut init = program("initdb");
        init.arg("-D")
            .arg(dir.path().join("data"))
            .args(["-U", "postgres", "-A", "scram-sha-256", "-E", "UTF8"])
            .args(["--locale=C.UTF-8", "--no-sync"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some((uid, gid)) = owner {
            init.uid(uid).gid(gid);
        }
        let out = init
            .output()
            .expect("initdb (apt-get install postgresql-15)");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut db = PgDb {
            port: free_port(),
            dir,
            child: None,
        };
        db.run_server(extra);
        db.sql(&format!(
            "CREATE ROLE app LOGIN CREATEROLE PASSWORD '{DB_PASSWORD}'"
        ));
        db.sql("CREATE DATABASE shop OWNER app");
        db
    }

    fn run_server(&mut self, extra: &[&str]) {
        let d = self.dir.path();
        let mut cmd = program("postgres");
        cmd.arg("-D")
            .arg(d.join("data"))
            .args(["-p", &self.port.to_string()])
            .arg("-k")
            .arg(d)
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=300"])
            .args(["-c", "shared_buffers=64MB"]);
        for e in extra {
            cmd.args(["-c", e]);
        }
        cmd.stdout(Stdio::null()).stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(d.join("server.log"))
                .unwrap(),
        );
        as_postgres(&mut cmd);
        self.child = Some(spawn(cmd));
        let port = self.port;
        wait_until(
            "postgres to accept connections",
            Duration::from_secs(60),
            || {
                program("pg_isready")
                    .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q"])
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false)
            },
        );
    }

    /// A streaming standby of this server (`pg_basebackup -R`), started, with the same
    /// `extra` settings.
    pub fn standby(&self, extra: &[&str]) -> PgDb {
        let dir = tempfile::Builder::new()
            .prefix("dbproxy-pg-standby-")
            .tempdir()
            .unwrap();
        let owner = run_as();
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let mut base = program("pg_basebackup");
        base.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
        ])
        .arg("-D")
        .arg(dir.path().join("data"))
        .args(["-R", "-X", "stream", "--no-sync", "-c", "fast"])
        .env("PGPASSWORD", DB_PASSWORD)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let out = as_postgres(&mut base).output().expect("pg_basebackup");
        assert!(
            out.status.success(),
            "pg_basebackup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut db = PgDb {
            port: free_port(),
            dir,
            child: None,
        };
        db.run_server(extra);
        db
    }

    /// Makes a standby the primary (`pg_promote()`, waiting for it).
    pub fn promote(&self) {
        assert_eq!(self.sql("SELECT pg_promote(true, 30)").trim(), "t");
    }

    /// Kills the server at once (SIGKILL to the postmaster), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
            let _ = c.wait();
        }
    }

    /// Puts `line` first in the server's pg_hba.conf, and reloads it.
    pub fn hba_first(&self, line: &str) {
        let path = self.dir.path().join("data/pg_hba.conf");
        let old = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("{line}\n{old}")).unwrap();
        self.sql("SELECT pg_reload_conf()");
    }

    /// Runs SQL as the superuser on `shop` (or `postgres` before it exists) and returns
    /// the rows, `|`-separated.
    pub fn sql(&self, sql: &str) -> String {
        self.sql_in("postgres", sql)
    }

    /// [`Self::sql`] in `database`.
    pub fn sql_in(&self, database: &str, sql: &str) -> String {
        let out = program("psql")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args([
                "-U",
                "postgres",
                "-d",
                database,
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
            ])
            .args(["-c", sql])
            .env("PGPASSWORD", DB_PASSWORD)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "SQL failed: {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Server processes serving client connections of `user` now (the monitor's
    /// included when it logs in as `user`).
    pub fn backends(&self, user: &str) -> u64 {
        self.sql(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = '{user}' AND backend_type = 'client backend'"
        ))
        .trim()
        .parse()
        .unwrap_or(0)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGINT: fast shutdown (clients disconnected at once).
            // SAFETY: kill on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            let _ = c.wait();
        }
    }
}

/// The target group lines for a PostgreSQL group in front of `db`.
pub fn group(db: &PgDb, extra: &str) -> String {
    format!(
        "engine = \"postgresql\"\ntargets = [\"127.0.0.1:{}\"]\n{extra}",
        db.port
    )
}

/// A libpq connection string to dbproxy (or a server) on `port`.
pub fn conninfo(port: u16, user: &str, password: &str, db: &str) -> String {
    format!(
        "host=127.0.0.1 port={port} user={user} password={password} dbname={db} sslmode=disable"
    )
}
