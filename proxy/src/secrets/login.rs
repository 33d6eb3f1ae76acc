//! The database login dbproxy uses on a user's behalf. Its user name and password may come
//! from secrets, so they change while dbproxy runs: every new database connection logs in
//! with [`BackendLogin::current`]; when the database refuses it, the secret is read again
//! and every version of it tried ([`BackendLogin::alternatives`]) before the refusal counts,
//! so a rotation in either order (database first, or secret first) fails no client.
//! Connections opened before a rotation keep serving: a pool is keyed by the login, not by
//! the password it was opened with.

use super::{LiveSecret, SecretStore, Versions};
use crate::config::Value;
use crate::mysql::backend::Credentials;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Where a user name or password comes from.
#[derive(Debug)]
enum Part {
    Text(String),
    Secret(Arc<LiveSecret>),
}

/// One database login (pools are keyed by it).
#[derive(Debug)]
pub struct BackendLogin {
    /// Unique per login: pool keys hash it.
    pub id: u64,
    user: Part,
    password: Part,
    /// The credentials new connections use, and the secrets' generation they were chosen
    /// at (a change of a secret chooses again).
    chosen: Mutex<(u64, Arc<Credentials>)>,
}

fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl BackendLogin {
    /// A login that never changes.
    pub fn fixed(user: &str, password: &str) -> Arc<Self> {
        let creds = Credentials {
            user: user.to_string(),
            password: password.to_string(),
        };
        Arc::new(BackendLogin {
            id: next_id(),
            user: Part::Text(creds.user.clone()),
            password: Part::Text(creds.password.clone()),
            chosen: Mutex::new((0, Arc::new(creds))),
        })
    }

    /// The login `user` / `password` describe (resolved values; references followed
    /// through `store` when it has their secret).
    pub fn from_values(user: &Value, password: &Value, store: Option<&SecretStore>) -> Arc<Self> {
        let part = |v: &Value| match (v.secret(), store) {
            (Some(name), Some(store)) => match store.get(name) {
                Some(s) => Part::Secret(s),
                None => Part::Text(v.text().to_string()),
            },
            _ => Part::Text(v.text().to_string()),
        };
        let login = BackendLogin {
            id: next_id(),
            user: part(user),
            password: part(password),
            chosen: Mutex::new((
                0,
                Arc::new(Credentials {
                    user: user.text().to_string(),
                    password: password.text().to_string(),
                }),
            )),
        };
        login.chosen.lock().0 = login.generation();
        Arc::new(login)
    }

    /// Whether a secret is behind it (a refused login is then worth trying again).
    pub fn rotates(&self) -> bool {
        matches!(self.user, Part::Secret(_)) || matches!(self.password, Part::Secret(_))
    }

    /// What the log calls it (never a password).
    pub fn label(&self) -> String {
        match (&self.user, &self.password) {
            (_, Part::Secret(s)) | (Part::Secret(s), _) => format!("secret {:?}", s.spec.name),
            (Part::Text(u), _) => format!("user {u:?}"),
        }
    }

    fn generation(&self) -> u64 {
        let g = |p: &Part| match p {
            Part::Secret(s) => s.generation(),
            Part::Text(_) => 0,
        };
        g(&self.user).wrapping_add(g(&self.password))
    }

    /// The credentials a new connection logs in with.
    pub fn current(&self) -> Arc<Credentials> {
        let gen = self.generation();
        let mut chosen = self.chosen.lock();
        if chosen.0 != gen {
            if let Some(c) = self.candidates().into_iter().next() {
                *chosen = (gen, Arc::new(c));
            } else {
                chosen.0 = gen;
            }
        }
        chosen.1.clone()
    }

    /// After the database refused `refused`: the secrets read again, every other version
    /// they have, current first.
    pub async fn alternatives(&self, refused: &Credentials) -> Vec<Arc<Credentials>> {
        for p in [&self.password, &self.user] {
            if let Part::Secret(s) = p {
                s.refetch().await;
            }
        }
        let mut out: Vec<Arc<Credentials>> = Vec::new();
        for c in self.candidates() {
            if c != *refused && !out.iter().any(|o| **o == c) {
                out.push(Arc::new(c));
            }
        }
        out
    }

    /// Logs in with `attempt` (a new connection each time) as the current credentials;
    /// when the database refuses them (`refused`) and a secret is behind them, the secret
    /// is read again and every other version of it tried, so that a rotation in either
    /// order fails no client. The version that works is kept for the next connections.
    pub async fn log_in<T, E, F, Fut>(
        &self,
        attempt: F,
        refused: impl Fn(&E) -> bool,
    ) -> Result<T, E>
    where
        F: Fn(Arc<Credentials>) -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let first = self.current();
        let mut last = match attempt(first.clone()).await {
            Err(e) if self.rotates() && refused(&e) => e,
            other => return other,
        };
        let alternatives = self.alternatives(&first).await;
        tracing::info!(
            login = %self.label(),
            others = alternatives.len(),
            "the database refused the login: secret read again, its other versions tried"
        );
        for creds in alternatives {
            match attempt(creds.clone()).await {
                Ok(r) => {
                    self.worked(&creds);
                    return Ok(r);
                }
                Err(e) if refused(&e) => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// `creds` logged in: new connections use them until a secret changes again.
    pub fn worked(&self, creds: &Arc<Credentials>) {
        let gen = self.generation();
        let mut chosen = self.chosen.lock();
        if *chosen.1 != **creds {
            tracing::info!(login = %self.label(), user = %creds.user, "the database accepted another version of the secret: new connections use it");
        }
        *chosen = (gen, creds.clone());
    }

    /// Every combination the secrets' versions give, current first.
    fn candidates(&self) -> Vec<Credentials> {
        let versions = |p: &Part| match p {
            Part::Secret(s) => s.versions(),
            Part::Text(_) => None,
        };
        let text_of = |p: &Part, v: Option<&Arc<Versions>>, username: bool| match p {
            Part::Text(t) => Some(t.clone()),
            Part::Secret(_) => v.and_then(|v| {
                if username {
                    v.current.username.clone()
                } else {
                    Some(v.current.password.clone())
                }
            }),
        };
        let (uv, pv) = (versions(&self.user), versions(&self.password));
        let same = matches!((&self.user, &self.password), (Part::Secret(a), Part::Secret(b)) if Arc::ptr_eq(a, b));
        let mut out = Vec::new();
        match (&pv, same) {
            // One secret gives both: its versions pair them.
            (Some(v), true) => {
                for s in v.all() {
                    if let Some(u) = s.username.clone() {
                        out.push(Credentials {
                            user: u,
                            password: s.password.clone(),
                        });
                    }
                }
            }
            (Some(v), false) => {
                if let Some(user) = text_of(&self.user, uv.as_ref(), true) {
                    for s in v.all() {
                        out.push(Credentials {
                            user: user.clone(),
                            password: s.password.clone(),
                        });
                    }
                }
            }
            (None, _) => {
                let password = text_of(&self.password, None, false).unwrap_or_default();
                if let Some(v) = &uv {
                    for s in v.all() {
                        if let Some(u) = s.username.clone() {
                            out.push(Credentials {
                                user: u,
                                password: password.clone(),
                            });
                        }
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_login_tries_the_other_versions_and_keeps_what_worked() {
        let dir = std::env::temp_dir().join(format!("dbproxy-login-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("db.json");
        let write = |p: &str| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::write(
                &path,
                format!("{{\"username\":\"app\",\"password\":\"{p}\"}}"),
            )
            .unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        };
        write("old");
        let mut cfg = crate::secrets::tests::config_with(&format!(
            r#"
[[users]]
name = "app"
password = "x"
backend_user = {{ secret = "db" }}
backend_password = {{ secret = "db" }}
[[secrets]]
name = "db"
provider = "file"
path = "{}"
"#,
            path.display()
        ));
        let store = SecretStore::open(&mut cfg).unwrap();
        let u = &cfg.users[0];
        let login = BackendLogin::from_values(
            u.backend_user.as_ref().unwrap(),
            &u.backend_password,
            Some(&store),
        );
        assert!(login.rotates());
        let old = login.current();
        assert_eq!((old.user.as_str(), old.password.as_str()), ("app", "old"));
        // The secret changes first: "new" is refused (the database still has "old")...
        write("new");
        let alts = store.handle().block_on(login.alternatives(&old));
        assert_eq!(alts.len(), 1);
        assert_eq!(alts[0].password, "new");
        let now = login.current();
        assert_eq!(now.password, "new", "a changed secret is tried first");
        let alts = store.handle().block_on(login.alternatives(&now));
        // ...too soon to read again: the versions known are current and previous.
        assert_eq!(
            alts.iter().map(|c| c.password.as_str()).collect::<Vec<_>>(),
            ["old"]
        );
        login.worked(&alts[0]);
        assert_eq!(login.current().password, "old", "what worked stays");
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            BackendLogin::fixed("a", "b").label(),
            "user \"a\"",
            "labels never show a password"
        );
    }
}
