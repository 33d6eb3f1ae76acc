//! moto's server (`moto[server]` from PyPI, installed by `cargo xtask test` into
//! `target/pyenv`) on 127.0.0.1, standing in for AWS Secrets Manager and STS.

use crate::{free_port, run_python, spawn, wait_until, workspace};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The credentials every test signs with (moto accepts any).
pub const ACCESS_KEY: &str = "AKIATESTDBPROXY00001";
pub const SECRET_KEY: &str = "testing-secret-key-dbproxy";

/// A moto server of the test's own.
pub struct Moto {
    pub port: u16,
    child: Child,
}

impl Moto {
    pub fn start() -> Moto {
        let bin = workspace().join("target/pyenv/bin/moto_server");
        assert!(
            bin.exists(),
            "{} is missing: `cargo xtask test` installs moto[server]",
            bin.display()
        );
        let port = free_port();
        let mut cmd = Command::new(bin);
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = spawn(cmd);
        wait_until("moto to listen", Duration::from_secs(30), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Moto { port, child }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `tests/python/aws.py` against this server; its output.
    fn run(&self, args: &[&str]) -> String {
        let mut all = vec![self.endpoint()];
        all.extend(args.iter().map(|s| s.to_string()));
        run_python("aws.py", &all)
    }

    /// Secrets Manager: `create NAME TEXT`, `put NAME TEXT [pending]`, `promote NAME`.
    pub fn secrets(&self, args: &[&str]) {
        self.run(args);
    }

    /// Makes an IAM user with an access key; the key (id, secret).
    pub fn iam_user(&self, name: &str) -> (String, String) {
        let out = self.run(&["iam-user", name]);
        let mut parts = out.split_whitespace().map(str::to_string);
        match (parts.next(), parts.next()) {
            (Some(id), Some(secret)) => (id, secret),
            _ => panic!("aws.py iam-user printed {out:?}"),
        }
    }

    /// The environment dbproxy (and `dbproxy token`) take AWS credentials from.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ]
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
