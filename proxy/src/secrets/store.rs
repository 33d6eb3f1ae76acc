//! The secrets dbproxy holds while it runs: read once at start (a problem stops the start,
//! naming the key), read again every `refresh`, and at once when the database refuses a
//! login made with one ([`LiveSecret::refetch`], at most once a second however many
//! logins fail together). Reads run on a small runtime of their own, so a slow provider
//! never holds a worker.

use super::{aws_sm, fetch_local, resolve_with, SecretError, Versions};
use crate::config::{Config, SecretConfig, SecretProvider};
use arc_swap::ArcSwapOption;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// However many logins the database refuses together, a secret is read again at most this
/// often.
pub const REFETCH_MIN_INTERVAL: Duration = Duration::from_secs(1);

/// The named secrets, and the runtime their reads run on.
pub struct SecretStore {
    handle: tokio::runtime::Handle,
    by_name: HashMap<String, Arc<LiveSecret>>,
}

/// One secret as dbproxy knows it now.
pub struct LiveSecret {
    pub spec: SecretConfig,
    value: ArcSwapOption<Versions>,
    /// Bumped whenever the value changes.
    generation: AtomicU64,
    /// Serialises reads after a refusal; when the last one ended.
    refetched: tokio::sync::Mutex<Option<Instant>>,
    aws: tokio::sync::OnceCell<aws_sdk_secretsmanager::Client>,
    handle: tokio::runtime::Handle,
}

impl std::fmt::Debug for LiveSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LiveSecret({:?})", self.spec.name)
    }
}

impl SecretStore {
    /// Starts the secrets runtime and resolves every reference in `cfg` (see
    /// [`super::resolve_with`]); the errors name the keys.
    pub fn open(cfg: &mut Config) -> Result<SecretStore, Vec<String>> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(4)
            .thread_name("dbproxy-secrets")
            .enable_all()
            .build()
            .map_err(|e| vec![format!("cannot start the secrets runtime: {e}")])?;
        let handle = rt.handle().clone();
        // It lives as long as the process: reads, refreshes and token checks run on it.
        std::mem::forget(rt);
        let by_name: HashMap<String, Arc<LiveSecret>> = cfg
            .secrets
            .iter()
            .map(|s| {
                let live = LiveSecret {
                    spec: s.clone(),
                    value: ArcSwapOption::empty(),
                    generation: AtomicU64::new(0),
                    refetched: tokio::sync::Mutex::new(None),
                    aws: tokio::sync::OnceCell::new(),
                    handle: handle.clone(),
                };
                (s.name.clone(), Arc::new(live))
            })
            .collect();
        resolve_with(cfg, |spec| {
            let live = by_name
                .get(&spec.name)
                .ok_or_else(|| SecretError::Format("not configured".into()))?;
            let v = handle.block_on(live.read(false))?;
            let current = v.current.clone();
            live.value.store(Some(Arc::new(v)));
            Ok(current)
        })?;
        Ok(SecretStore { handle, by_name })
    }

    /// Resolves the references of a reloaded configuration with the values held now
    /// (a secret referred to for the first time is read now). Blocks: not on a runtime.
    pub fn resolve(&self, cfg: &mut Config) -> Result<(), Vec<String>> {
        resolve_with(cfg, |spec| {
            let live = self.by_name.get(&spec.name).ok_or_else(|| {
                SecretError::Format("a new [[secrets]] entry: restart dbproxy to use it".into())
            })?;
            if let Some(v) = live.versions() {
                return Ok(v.current.clone());
            }
            let v = self.handle.block_on(live.read(false))?;
            let current = v.current.clone();
            live.value.store(Some(Arc::new(v)));
            Ok(current)
        })
    }

    /// The runtime reads (and token checks) run on.
    pub fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }

    /// A secret that was resolved.
    pub fn get(&self, name: &str) -> Option<Arc<LiveSecret>> {
        self.by_name
            .get(name)
            .filter(|s| s.versions().is_some())
            .cloned()
    }

    /// Reads every resolved secret again every `refresh`, for as long as the process runs.
    pub fn start_refresh(&self) {
        for s in self.by_name.values().filter(|s| s.versions().is_some()) {
            let s = s.clone();
            self.handle.spawn(async move {
                loop {
                    tokio::time::sleep(s.spec.refresh).await;
                    match s.read(false).await {
                        Ok(v) => {
                            tracing::debug!(secret = %s.spec.name, "secret refreshed");
                            s.update(v)
                        }
                        Err(e) => tracing::warn!(
                            secret = %s.spec.name,
                            "secret not refreshed, the value read before stays in use: {e}"
                        ),
                    }
                }
            });
        }
    }
}

impl LiveSecret {
    /// What was read last (`None` before the first read).
    pub fn versions(&self) -> Option<Arc<Versions>> {
        self.value.load_full()
    }

    /// Changes whenever the value does.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Reads the secret again now (a login made with it was refused), unless a read ended
    /// less than [`REFETCH_MIN_INTERVAL`] ago, and gives every version known: the pending
    /// and previous ones too, where the provider keeps them, and the value read before
    /// the last change.
    pub fn refetch(
        self: &Arc<Self>,
    ) -> impl Future<Output = Option<Arc<Versions>>> + Send + 'static {
        let me = self.clone();
        let task = self.handle.spawn(async move {
            let mut last = me.refetched.lock().await;
            if last.is_some_and(|t| t.elapsed() < REFETCH_MIN_INTERVAL) {
                return;
            }
            match me.read(true).await {
                Ok(v) => me.update(v),
                Err(e) => tracing::warn!(
                    secret = %me.spec.name,
                    "secret not read again after a refused login: {e}"
                ),
            }
            *last = Some(Instant::now());
        });
        let me = self.clone();
        async move {
            let _ = task.await;
            me.versions()
        }
    }

    /// Reads from the provider.
    async fn read(&self, all: bool) -> Result<Versions, SecretError> {
        match self.spec.provider {
            SecretProvider::AwsSecretsManager => {
                let client = self.aws.get_or_init(|| aws_sm::client(&self.spec)).await;
                aws_sm::fetch(client, &self.spec, all).await
            }
            _ => {
                let spec = self.spec.clone();
                tokio::task::spawn_blocking(move || fetch_local(&spec))
                    .await
                    .map_err(|e| SecretError::Format(format!("the read failed: {e}")))?
                    .map(Versions::only)
            }
        }
    }

    /// Keeps `v`; when the current value changed, the one before stays known as the
    /// previous (where the provider has none), so a database not yet changed still works.
    fn update(&self, mut v: Versions) {
        let old = self.value.load_full();
        if let Some(old) = &old {
            if old.current != v.current && v.previous.is_none() {
                v.previous = Some(old.current.clone());
            } else if old.current == v.current && v.pending.is_none() && v.previous.is_none() {
                // A plain refresh that found nothing new keeps what a full read learnt.
                return;
            }
            if **old == v {
                return;
            }
        }
        let changed = old.as_ref().is_some_and(|o| o.current != v.current);
        self.value.store(Some(Arc::new(v)));
        self.generation.fetch_add(1, Ordering::AcqRel);
        if changed {
            tracing::info!(secret = %self.spec.name, "secret changed: new database logins use the new value");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secrets::Secret;

    fn secret(p: &str) -> Secret {
        Secret {
            username: None,
            password: p.into(),
        }
    }

    #[test]
    fn a_changed_value_keeps_the_one_before_as_previous() {
        let mut cfg = crate::secrets::tests::config_with(
            r#"
[[users]]
name = "app"
password = "x"
backend_password = { secret = "db" }
[[secrets]]
name = "db"
provider = "exec"
command = ["printf", "%s", "one"]
"#,
        );
        let store = SecretStore::open(&mut cfg).unwrap();
        assert_eq!(cfg.users[0].backend_password.text(), "one");
        let s = store.get("db").unwrap();
        let g0 = s.generation();
        s.update(Versions::only(secret("one")));
        assert_eq!(s.generation(), g0, "an unchanged value is no change");
        s.update(Versions::only(secret("two")));
        let v = s.versions().unwrap();
        assert_eq!(v.current.password, "two");
        assert_eq!(v.previous.as_ref().unwrap().password, "one");
        assert!(s.generation() > g0);
        // A refetch reads the provider (printf still says "one").
        let v = store.handle().block_on(s.refetch()).unwrap();
        assert_eq!(v.current.password, "one");
        assert_eq!(v.previous.as_ref().unwrap().password, "two");
    }
}
