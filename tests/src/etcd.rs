//! An etcd cluster of the test's own on loopback (Debian's `etcd-server`): members started
//! and stopped one by one, each with its own data directory and ports.

use crate::{free_port, spawn, wait_until};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Member {
    name: String,
    client: u16,
    peer: u16,
    child: Option<Child>,
}

pub struct EtcdCluster {
    members: Vec<Member>,
    dir: tempfile::TempDir,
    initial: String,
}

impl EtcdCluster {
    /// Starts `n` members and waits until the cluster answers.
    pub fn start(n: usize) -> EtcdCluster {
        // On tmpfs where there is one: etcd's fsyncs on a disk the other suites load can
        // stall its heartbeats into needless leader elections.
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::Builder::new().prefix("etcd-").tempdir_in(shm)
        } else {
            tempfile::Builder::new().prefix("etcd-").tempdir()
        }
        .unwrap();
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("e{i}"),
                client: free_port(),
                peer: free_port(),
                child: None,
            })
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = EtcdCluster {
            members,
            dir,
            initial,
        };
        for i in 0..n {
            c.launch(i);
        }
        c.wait_healthy();
        c
    }

    fn launch(&mut self, i: usize) {
        let m = &self.members[i];
        let data = self.dir.path().join(&m.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", m.name)))
            .unwrap();
        let mut cmd = Command::new("etcd");
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen-client-urls")
            .arg(format!("http://127.0.0.1:{}", m.client))
            .arg("--advertise-client-urls")
            .arg(format!("http://127.0.0.1:{}", m.client))
            .arg("--listen-peer-urls")
            .arg(format!("http://127.0.0.1:{}", m.peer))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://127.0.0.1:{}", m.peer))
            .arg("--initial-cluster")
            .arg(&self.initial)
            .arg("--initial-cluster-token")
            .arg(self.dir.path().to_string_lossy().as_ref())
            .stdout(Stdio::null())
            .stderr(log);
        let child = spawn(cmd);
        self.members[i].child = Some(child);
    }

    /// The client URLs, for `[fleet] endpoints`.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client))
            .collect()
    }

    /// `endpoints = [...]` as TOML.
    pub fn endpoints_toml(&self) -> String {
        let list: Vec<String> = self
            .endpoints()
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect();
        format!("endpoints = [{}]", list.join(", "))
    }

    /// Whether a write through member `i` succeeds now (a quorum is there).
    fn writable_through(&self, i: usize) -> bool {
        let m = &self.members[i];
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(format!("http://127.0.0.1:{}", m.client))
            .args(["--command-timeout=1s", "put", "/health-probe", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn running(&self) -> Vec<usize> {
        (0..self.members.len())
            .filter(|i| self.members[*i].child.is_some())
            .collect()
    }

    /// Waits until a running member takes writes.
    pub fn wait_healthy(&self) {
        wait_until("etcd to take writes", Duration::from_secs(30), || {
            self.running().iter().any(|i| self.writable_through(*i))
        });
    }

    /// Kills member `i` (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again with its data.
    pub fn restart(&mut self, i: usize) {
        if self.members[i].child.is_none() {
            self.launch(i);
        }
    }

    /// Every key under `prefix`, as `etcdctl get --prefix` prints them.
    pub fn get_prefix(&self, prefix: &str) -> String {
        let i = self.running().first().copied().unwrap_or(0);
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(format!("http://127.0.0.1:{}", self.members[i].client))
            .args(["get", "--prefix", prefix])
            .output()
            .expect("etcdctl (apt-get install etcd-client)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
