//! Where the fleet keeps its grant tables and member records: a small interface, with etcd
//! v3 first (its JSON gateway, `/v3/...`, which every etcd since 3.4 serves on its client
//! port: no gRPC stack or protobuf compiler in the build).
//!
//! What the allocator needs of a store: a lease that keys live on, a put on it, a read of
//! everything under a prefix at one revision, and a compare-and-swap of one key on its
//! revision (with a second put in the same transaction). DynamoDB conditional writes or
//! Consul's sessions and check-and-set fit the same shape.

use base64::Engine as _;
use serde_json::{json, Value};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no etcd endpoint answered: {0}")]
    Unreachable(String),
    #[error("etcd refused the request: {0}")]
    Refused(String),
    #[error("etcd sent an answer dbproxy cannot read: {0}")]
    BadAnswer(String),
    #[error("fleet store setup: {0}")]
    Setup(String),
}

/// One key as read.
#[derive(Debug, Clone, PartialEq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: i64,
}

/// A put in a transaction.
#[derive(Debug, Clone)]
pub struct Put {
    pub key: String,
    pub value: Vec<u8>,
    /// The lease the key lives on (0: none).
    pub lease: i64,
}

/// The store the fleet shares.
#[allow(async_fn_in_trait)]
pub trait Store {
    /// A new lease of `ttl`.
    async fn grant(&self, ttl: Duration) -> Result<i64, StoreError>;
    /// Renews `lease`; `false` when it is gone (expired or revoked).
    async fn keep_alive(&self, lease: i64) -> Result<bool, StoreError>;
    /// Ends `lease` and the keys on it.
    async fn revoke(&self, lease: i64) -> Result<(), StoreError>;
    async fn put(&self, put: Put) -> Result<(), StoreError>;
    /// Every key under `prefix`.
    async fn read_prefix(&self, prefix: &str) -> Result<Vec<Kv>, StoreError>;
    /// Writes `put` (and `also`, in the same transaction) if `put.key`'s revision is still
    /// `rev` (0: the key does not exist). `Some(revision)` when written, `None` when the key
    /// had moved on.
    async fn swap(&self, rev: i64, put: Put, also: Option<Put>) -> Result<Option<i64>, StoreError>;
}

/// How dbproxy reaches etcd.
#[derive(Debug, Clone, Default)]
pub struct EtcdSettings {
    /// `http://host:port` or `https://host:port`, tried in turn.
    pub endpoints: Vec<String>,
    /// etcd's own users (`etcdctl user add`): name and password, when auth is on.
    pub user: Option<(String, String)>,
    /// PEM: the CA that signed etcd's certificate, and dbproxy's client certificate and key.
    pub ca_pem: Option<Vec<u8>>,
    pub client_pem: Option<Vec<u8>>,
    /// One request, all endpoints tried, takes at most this long.
    pub timeout: Duration,
}

/// etcd v3 through its JSON gateway.
pub struct Etcd {
    http: reqwest::Client,
    settings: EtcdSettings,
    /// The endpoint that answered last (tried first).
    current: std::sync::atomic::AtomicUsize,
    /// The auth token, when auth is on.
    token: parking_lot::Mutex<Option<String>>,
}

fn b64(s: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn unb64(v: &Value) -> Result<Vec<u8>, StoreError> {
    let s = v.as_str().unwrap_or_default();
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| StoreError::BadAnswer(format!("base64: {e}")))
}

/// The gateway writes 64-bit numbers as strings.
fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

/// The end of the range of keys that start with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl Etcd {
    pub fn new(settings: EtcdSettings) -> Result<Etcd, StoreError> {
        if settings.endpoints.is_empty() {
            return Err(StoreError::Setup("[fleet] endpoints is empty".into()));
        }
        let mut b = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .pool_idle_timeout(Duration::from_secs(30));
        if let Some(ca) = &settings.ca_pem {
            let cert = reqwest::Certificate::from_pem(ca)
                .map_err(|e| StoreError::Setup(format!("fleet ca_file: {e}")))?;
            b = b.add_root_certificate(cert).tls_built_in_root_certs(false);
        }
        if let Some(pem) = &settings.client_pem {
            let id = reqwest::Identity::from_pem(pem)
                .map_err(|e| StoreError::Setup(format!("fleet cert_file/key_file: {e}")))?;
            b = b.identity(id);
        }
        let http = b
            .build()
            .map_err(|e| StoreError::Setup(format!("HTTP client: {e}")))?;
        Ok(Etcd {
            http,
            settings,
            current: Default::default(),
            token: Default::default(),
        })
    }

    async fn authenticate(&self, base: &str) -> Result<Option<String>, StoreError> {
        let Some((name, password)) = &self.settings.user else {
            return Ok(None);
        };
        let r = self
            .http
            .post(format!("{base}/v3/auth/authenticate"))
            .body(json!({"name": name, "password": password}).to_string())
            .send()
            .await
            .map_err(|e| StoreError::Unreachable(e.to_string()))?;
        let status = r.status();
        let body: Value = r
            .json_value()
            .await
            .map_err(|e| StoreError::BadAnswer(e.to_string()))?;
        if !status.is_success() {
            return Err(StoreError::Refused(format!("authenticate: {body}")));
        }
        let token = body
            .get("token")
            .and_then(Value::as_str)
            .ok_or_else(|| StoreError::BadAnswer("authenticate: no token".into()))?;
        *self.token.lock() = Some(token.to_string());
        Ok(Some(token.to_string()))
    }

    /// POSTs `body` to `path` on the endpoint that answered last, then the others.
    async fn call(&self, path: &str, body: Value) -> Result<Value, StoreError> {
        let n = self.settings.endpoints.len();
        let first = self.current.load(std::sync::atomic::Ordering::Relaxed) % n;
        let mut errors = Vec::new();
        for k in 0..n {
            let i = (first + k) % n;
            let Some(base) = self.settings.endpoints.get(i) else {
                continue;
            };
            let base = base.trim_end_matches('/');
            match self.call_one(base, path, &body).await {
                Ok(v) => {
                    self.current.store(i, std::sync::atomic::Ordering::Relaxed);
                    return Ok(v);
                }
                Err(StoreError::Unreachable(e)) => errors.push(format!("{base}: {e}")),
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Unreachable(errors.join("; ")))
    }

    async fn call_one(&self, base: &str, path: &str, body: &Value) -> Result<Value, StoreError> {
        let mut token = self.token.lock().clone();
        if token.is_none() {
            token = self.authenticate(base).await?;
        }
        for attempt in 0..2 {
            let mut req = self
                .http
                .post(format!("{base}{path}"))
                .body(body.to_string());
            if let Some(t) = &token {
                req = req.header("Authorization", t);
            }
            let r = req
                .send()
                .await
                .map_err(|e| StoreError::Unreachable(e.to_string()))?;
            let status = r.status();
            let v: Value = r
                .json_value()
                .await
                .map_err(|e| StoreError::Unreachable(e.to_string()))?;
            if status.is_success() {
                return Ok(v);
            }
            let msg = v
                .get("message")
                .or_else(|| v.get("error"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            if attempt == 0 && self.settings.user.is_some() && msg.contains("token") {
                token = self.authenticate(base).await?;
                continue;
            }
            // A member without quorum, or shutting down: the next one may do.
            if status.is_server_error() || msg.contains("leader") || msg.contains("timed out") {
                return Err(StoreError::Unreachable(format!("{status}: {msg}")));
            }
            return Err(StoreError::Refused(format!("{status}: {msg}")));
        }
        Err(StoreError::Refused("authentication keeps failing".into()))
    }
}

/// `reqwest::Response` to JSON without its `json` feature.
trait JsonValue {
    async fn json_value(self) -> Result<Value, reqwest::Error>;
}

impl JsonValue for reqwest::Response {
    async fn json_value(self) -> Result<Value, reqwest::Error> {
        let bytes = self.bytes().await?;
        Ok(serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }
}

fn put_json(p: &Put) -> Value {
    let mut v = json!({"key": b64(p.key.as_bytes()), "value": b64(&p.value)});
    if p.lease != 0 {
        v["lease"] = Value::String(p.lease.to_string());
    }
    v
}

impl Store for Etcd {
    async fn grant(&self, ttl: Duration) -> Result<i64, StoreError> {
        let v = self
            .call("/v3/lease/grant", json!({"TTL": ttl.as_secs().max(1)}))
            .await?;
        match v.get("ID").map(int) {
            Some(id) if id != 0 => Ok(id),
            _ => Err(StoreError::BadAnswer(format!("lease grant: {v}"))),
        }
    }

    async fn keep_alive(&self, lease: i64) -> Result<bool, StoreError> {
        let v = self
            .call("/v3/lease/keepalive", json!({"ID": lease.to_string()}))
            .await?;
        let ttl = v
            .get("result")
            .and_then(|r| r.get("TTL"))
            .map(int)
            .unwrap_or(0);
        Ok(ttl > 0)
    }

    async fn revoke(&self, lease: i64) -> Result<(), StoreError> {
        match self
            .call("/v3/lease/revoke", json!({"ID": lease.to_string()}))
            .await
        {
            Ok(_) => Ok(()),
            // Gone already.
            Err(StoreError::Refused(m)) if m.contains("not found") => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn put(&self, put: Put) -> Result<(), StoreError> {
        self.call("/v3/kv/put", put_json(&put)).await.map(drop)
    }

    async fn read_prefix(&self, prefix: &str) -> Result<Vec<Kv>, StoreError> {
        let v = self
            .call(
                "/v3/kv/range",
                json!({"key": b64(prefix.as_bytes()), "range_end": b64(&prefix_end(prefix))}),
            )
            .await?;
        let mut out = Vec::new();
        for kv in v.get("kvs").and_then(Value::as_array).into_iter().flatten() {
            let key = unb64(kv.get("key").unwrap_or(&Value::Null))?;
            out.push(Kv {
                key: String::from_utf8_lossy(&key).into_owned(),
                value: unb64(kv.get("value").unwrap_or(&Value::Null))?,
                mod_revision: kv.get("mod_revision").map(int).unwrap_or(0),
            });
        }
        Ok(out)
    }

    async fn swap(&self, rev: i64, put: Put, also: Option<Put>) -> Result<Option<i64>, StoreError> {
        let mut success = vec![json!({"request_put": put_json(&put)})];
        if let Some(a) = &also {
            success.push(json!({"request_put": put_json(a)}));
        }
        let body = json!({
            "compare": [{
                "key": b64(put.key.as_bytes()),
                "target": "MOD",
                "result": "EQUAL",
                "mod_revision": rev.to_string(),
            }],
            "success": success,
        });
        let v = self.call("/v3/kv/txn", body).await?;
        if v.get("succeeded").and_then(Value::as_bool) == Some(true) {
            let r = v
                .get("header")
                .and_then(|h| h.get("revision"))
                .map(int)
                .unwrap_or(0);
            Ok(Some(r))
        } else {
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_range_ends_after_the_prefix() {
        assert_eq!(prefix_end("/a/"), b"/a0".to_vec());
        assert_eq!(int(&json!("42")), 42);
        assert_eq!(int(&json!(7)), 7);
        assert_eq!(int(&json!(null)), 0);
    }
}
