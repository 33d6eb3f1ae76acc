//! Secrets: passwords and user names kept out of the configuration file. A `[[secrets]]`
//! entry names a provider (a file only dbproxy's user may read, an environment variable, a
//! program whose output is the secret, AWS Secrets Manager); values written
//! `{ secret = "name" }` are resolved from it at start and by `check-config`, read again
//! every `refresh` and whenever the database refuses a login made with them
//! ([`store`], [`login`]). Errors name the secret and where it was looked for, never its
//! value.

mod aws_sm;
pub mod login;
pub mod store;

pub use login::BackendLogin;
pub use store::{LiveSecret, SecretStore};

use crate::config::{Config, SecretConfig, SecretProvider, Value};
use std::collections::HashMap;
use std::time::Duration;

/// How long an `exec` provider may take.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(10);

/// A secret's value: a password, and the user name when the secret has one.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    pub username: Option<String>,
    pub password: String,
}

/// Never prints the password.
impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Secret {{ username: {:?}, password: .. }}",
            self.username
        )
    }
}

/// Why a secret could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("{path}: {why}")]
    File { path: String, why: String },
    #[error("{path} may be read by group or others (mode {mode:o}): chmod 600 it")]
    Readable { path: String, mode: u32 },
    #[error("environment variable {0} is not set (or not UTF-8)")]
    Env(String),
    #[error("{command}: {why}")]
    Exec { command: String, why: String },
    #[error("{0}")]
    Format(String),
    #[error("AWS Secrets Manager, secret {secret_id}: {why}")]
    Aws { secret_id: String, why: String },
}

/// What a provider holds for a secret: the current value and, where the provider keeps
/// versions (Secrets Manager's AWSPENDING and AWSPREVIOUS stages), the others a rotation
/// may be between.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versions {
    pub current: Secret,
    pub pending: Option<Secret>,
    pub previous: Option<Secret>,
}

impl Versions {
    pub fn only(current: Secret) -> Self {
        Versions {
            current,
            pending: None,
            previous: None,
        }
    }

    /// Current first, then pending, then previous.
    pub fn all(&self) -> impl Iterator<Item = &Secret> {
        std::iter::once(&self.current)
            .chain(self.pending.as_ref())
            .chain(self.previous.as_ref())
    }
}

/// Reads a secret from a provider on this host (file, env, exec); blocks.
pub fn fetch_local(s: &SecretConfig) -> Result<Secret, SecretError> {
    let text = match s.provider {
        SecretProvider::File => read_private_file(&s.path)?,
        SecretProvider::Env => {
            std::env::var(&s.var).map_err(|_| SecretError::Env(s.var.clone()))?
        }
        SecretProvider::Exec => run(&s.command)?,
        SecretProvider::AwsSecretsManager => {
            return Err(SecretError::Format(
                "aws_secrets_manager is read through a SecretStore".into(),
            ))
        }
    };
    parse(&text)
}

fn read_private_file(path: &str) -> Result<String, SecretError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |why: std::io::Error| SecretError::File {
        path: path.to_string(),
        why: why.to_string(),
    };
    let meta = std::fs::metadata(path).map_err(err)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SecretError::Readable {
            path: path.to_string(),
            mode,
        });
    }
    std::fs::read_to_string(path).map_err(err)
}

/// Runs `command` (no shell) and returns its standard output; a failure or a run longer
/// than [`EXEC_TIMEOUT`] is an error (its standard error is not shown: it may hold the
/// secret).
fn run(command: &[String]) -> Result<String, SecretError> {
    let shown = command.first().cloned().unwrap_or_default();
    let err = |why: String| SecretError::Exec {
        command: shown.clone(),
        why,
    };
    let (program, args) = command
        .split_first()
        .ok_or_else(|| err("no program".into()))?;
    let child = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| err(e.to_string()))?;
    let pid = child.id();
    // Waited for on a thread of its own, so that a program that hangs is killed at the
    // deadline instead of holding dbproxy's start.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(EXEC_TIMEOUT) {
        Ok(r) => r.map_err(|e| err(e.to_string()))?,
        Err(_) => {
            // SAFETY: kill(2) takes any pid; this is our child's, still running when its
            // waiter did not answer in time (it reaps it once killed).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            return Err(err(format!("took longer than {EXEC_TIMEOUT:?}")));
        }
    };
    let status = out.status;
    let out = String::from_utf8(out.stdout).map_err(|_| err("its output is not UTF-8".into()))?;
    if !status.success() {
        return Err(err(format!("exited with {status}")));
    }
    Ok(out)
}

/// A JSON object with `password` (and `username`), or the password alone (one trailing
/// newline removed).
pub fn parse(text: &str) -> Result<Secret, SecretError> {
    let trimmed = text.strip_suffix('\n').unwrap_or(text);
    let trimmed = trimmed.strip_suffix('\r').unwrap_or(trimmed);
    if !trimmed.trim_start().starts_with('{') {
        return Ok(Secret {
            username: None,
            password: trimmed.to_string(),
        });
    }
    let v: serde_json::Value = serde_json::from_str(trimmed)
        .map_err(|e| SecretError::Format(format!("not valid JSON (line {})", e.line())))?;
    let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
    let password = field("password")
        .ok_or_else(|| SecretError::Format("a JSON secret needs a \"password\" string".into()))?;
    Ok(Secret {
        username: field("username"),
        password,
    })
}

/// Resolves every `{ secret = "name" }` in `cfg` to the secret's text (through `fetch`): its
/// user name for `backend_user` and `monitor_user`, its password elsewhere. Each problem
/// names the key.
pub fn resolve_with(
    cfg: &mut Config,
    fetch: impl Fn(&SecretConfig) -> Result<Secret, SecretError>,
) -> Result<(), Vec<String>> {
    let specs: HashMap<String, SecretConfig> = cfg
        .secrets
        .iter()
        .map(|s| (s.name.clone(), s.clone()))
        .collect();
    let mut cache: HashMap<String, Result<Secret, String>> = HashMap::new();
    let mut errs = Vec::new();
    let mut get = |key: &str, v: &mut Value, want_user: bool, errs: &mut Vec<String>| {
        let Some(name) = v.secret().map(str::to_string) else {
            return;
        };
        let got = cache
            .entry(name.clone())
            .or_insert_with(|| match specs.get(&name) {
                Some(s) => fetch(s).map_err(|e| format!("secret {name:?}: {e}")),
                None => Err(format!("no [[secrets]] entry named {name:?}")),
            });
        match got {
            Ok(s) if want_user => match &s.username {
                Some(u) => v.set_resolved(u),
                None => errs.push(format!("{key}: secret {name:?} has no username")),
            },
            Ok(s) => v.set_resolved(&s.password),
            Err(e) => errs.push(format!("{key}: {e}")),
        }
    };
    for (i, u) in cfg.users.iter_mut().enumerate() {
        get(
            &format!("users[{i}].password"),
            &mut u.password,
            false,
            &mut errs,
        );
        get(
            &format!("users[{i}].backend_password"),
            &mut u.backend_password,
            false,
            &mut errs,
        );
        if let Some(v) = u.backend_user.as_mut() {
            get(&format!("users[{i}].backend_user"), v, true, &mut errs);
        }
    }
    for (i, g) in cfg.target_groups.iter_mut().enumerate() {
        if let Some(v) = g.monitor_user.as_mut() {
            get(
                &format!("target_groups[{i}].monitor_user"),
                v,
                true,
                &mut errs,
            );
        }
        if let Some(v) = g.monitor_password.as_mut() {
            get(
                &format!("target_groups[{i}].monitor_password"),
                v,
                false,
                &mut errs,
            );
        }
    }
    get(
        "admin.admin_password",
        &mut cfg.admin.admin_password,
        false,
        &mut errs,
    );
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A configuration with one endpoint and target group, and `rest` (users, secrets).
    pub(crate) fn config_with(rest: &str) -> Config {
        Config::parse(&format!(
            "[[endpoints]]\nname = \"e\"\nlisten = \"127.0.0.1:6033\"\ntarget_group = \"g\"\n\
             [[target_groups]]\nname = \"g\"\ntargets = [\"127.0.0.1:3306\"]\n{rest}"
        ))
        .unwrap()
    }

    pub(crate) fn spec_of(provider: SecretProvider) -> SecretConfig {
        SecretConfig {
            name: "s".into(),
            provider,
            path: String::new(),
            var: String::new(),
            command: Vec::new(),
            secret_id: String::new(),
            region: String::new(),
            endpoint_url: String::new(),
            refresh: Duration::from_secs(300),
        }
    }

    #[test]
    fn json_and_plain_secrets() {
        let s = parse("{\"username\": \"app\", \"password\": \"p w\", \"engine\": \"mysql\"}\n")
            .unwrap();
        assert_eq!(
            (s.username.as_deref(), s.password.as_str()),
            (Some("app"), "p w")
        );
        let s = parse("only-a-password\n").unwrap();
        assert_eq!((s.username, s.password.as_str()), (None, "only-a-password"));
        let e = parse("{\"username\": \"app\"}").unwrap_err().to_string();
        assert!(e.contains("password"), "{e}");
        let e = parse("{\"password\": \"hunter2\"").unwrap_err().to_string();
        assert!(!e.contains("hunter2"), "{e}");
        assert!(!format!("{:?}", parse("hunter2").unwrap()).contains("hunter2"));
    }

    #[test]
    fn files_others_may_read_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("dbproxy-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        std::fs::write(&path, "pw\n").unwrap();
        let spec = SecretConfig {
            name: "s".into(),
            provider: SecretProvider::File,
            path: path.display().to_string(),
            ..spec_of(SecretProvider::File)
        };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = fetch_local(&spec).unwrap_err().to_string();
        assert!(e.contains(&spec.path) && e.contains("644"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(fetch_local(&spec).unwrap().password, "pw");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn programs_are_run_without_a_shell_and_timed() {
        let spec = |command: &[&str]| SecretConfig {
            name: "s".into(),
            provider: SecretProvider::Exec,
            command: command.iter().map(|s| s.to_string()).collect(),
            ..spec_of(SecretProvider::Exec)
        };
        assert_eq!(
            fetch_local(&spec(&["printf", "%s", "pw"]))
                .unwrap()
                .password,
            "pw"
        );
        let e = fetch_local(&spec(&["false"])).unwrap_err().to_string();
        assert!(e.contains("false") && e.contains("exited"), "{e}");
        let e = fetch_local(&spec(&["/nonexistent/program"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/program"), "{e}");
    }

    #[test]
    fn references_are_resolved_and_problems_name_the_key() {
        let text = r#"
[[endpoints]]
name = "e"
listen = "127.0.0.1:6033"
target_group = "g"

[[target_groups]]
name = "g"
targets = ["127.0.0.1:3306"]
monitor_user = { secret = "mon" }
monitor_password = { secret = "mon" }

[[users]]
name = "app"
password = { secret = "client" }
backend_user = { secret = "db" }
backend_password = { secret = "db" }

[[secrets]]
name = "db"
provider = "env"
var = "X"

[[secrets]]
name = "client"
provider = "env"
var = "Y"

[[secrets]]
name = "mon"
provider = "env"
var = "Z"
"#;
        let mut cfg = Config::parse(text).unwrap();
        let fake = |s: &SecretConfig| match s.name.as_str() {
            "db" => Ok(Secret {
                username: Some("dbuser".into()),
                password: "dbpw".into(),
            }),
            "client" => Ok(Secret {
                username: None,
                password: "clientpw".into(),
            }),
            _ => Err(SecretError::Env(s.var.clone())),
        };
        let errs = resolve_with(&mut cfg, fake).unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(
            errs[0].starts_with("target_groups[0].monitor_user: secret \"mon\""),
            "{errs:?}"
        );
        let u = &cfg.users[0];
        assert_eq!(
            (
                u.password.text(),
                u.backend_user(),
                u.backend_password.text()
            ),
            ("clientpw", "dbuser", "dbpw")
        );
        let unknown = text.replace(
            "password = { secret = \"client\" }",
            "password = { secret = \"nope\" }",
        );
        let err = Config::parse(&unknown).unwrap_err().to_string();
        assert!(
            err.contains("users[0].password: no [[secrets]] entry named \"nope\""),
            "{err}"
        );
    }
}
