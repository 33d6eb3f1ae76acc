//! dbproxy's own users and how a client proves it is one of them.
//!
//! dbproxy keeps each user's password hashes (from `password`, or `password_hash` so that
//! the password itself appears nowhere), so it can verify `mysql_native_password` and
//! `caching_sha2_password` answers itself (the fast path of the latter) and switch a client
//! to the plugin a user requires. A user whose password is checked in clear text gets it
//! over TLS only: through `mysql_clear_password`, or caching_sha2_password's full
//! authentication.

pub mod iam;
pub mod jwt;
pub mod throttle;
pub mod tokens;

use crate::config::{PgAuthMethod, UserAuthPlugin, UserConfig, Value};
use crate::mysql::auth::{PasswordHash, Plugin};
use crate::mysql::consts::errcode;
use crate::mysql::wire::ErrPacket;
use crate::postgres::login::Credential;
use crate::postgres::scram::Verifier;
use crate::secrets::{BackendLogin, LiveSecret, SecretStore};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

/// A proxy user.
#[derive(Debug)]
pub struct User {
    pub name: String,
    password: Password,
    plugin: UserAuthPlugin,
    /// Whom dbproxy logs in as on this user's behalf.
    pub backend: Arc<BackendLogin>,
    /// Identities that may log in as this user with a token.
    pub aws_iam_arns: Vec<String>,
    pub jwt_subjects: Vec<String>,
    /// What PostgreSQL clients' SCRAM logins are checked against.
    scram: Scram,
    /// How PostgreSQL clients log in.
    pg_auth: PgAuthMethod,
    /// `max_database_connections` and `weight`.
    pub max_database_connections: Option<usize>,
    pub weight: u32,
}

/// A user's SCRAM-SHA-256 verifier: from `password_hash`, from the password (derived at
/// first use, with a salt of its own), or following a secret.
#[derive(Debug)]
enum Scram {
    Stored(Verifier),
    Password(String, std::sync::OnceLock<Verifier>),
    Secret {
        secret: Arc<LiveSecret>,
        derived: Mutex<Option<(u64, Verifier)>>,
    },
    /// A MySQL `password_hash` only: PostgreSQL clients cannot log in.
    None,
}

/// A verifier for `password` with a fresh salt.
fn derive(password: &str) -> Verifier {
    let salt = crate::mysql::auth::new_nonce();
    Verifier::from_password(
        password.as_bytes(),
        &salt[..16],
        crate::postgres::scram::DEFAULT_ITERATIONS,
    )
}

/// A token a client sent as its password (never printed).
#[derive(PartialEq, Eq)]
pub struct Token(pub String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token({} bytes)", self.0.len())
    }
}

/// A user's password hashes: fixed, or following a secret as it changes.
#[derive(Debug)]
enum Password {
    Fixed(PasswordHash),
    Secret {
        secret: Arc<LiveSecret>,
        /// The hashes of the secret's value at a generation.
        hashed: Mutex<(u64, PasswordHash)>,
    },
}

impl User {
    /// The SCRAM-SHA-256 verifier a PostgreSQL client's login is checked against (none
    /// for a user configured with a MySQL `password_hash` only).
    pub fn scram_verifier(&self) -> Option<Verifier> {
        match &self.scram {
            Scram::Stored(v) => Some(v.clone()),
            Scram::Password(p, v) => Some(v.get_or_init(|| derive(p)).clone()),
            Scram::Secret { secret, derived } => {
                let gen = secret.generation();
                let mut d = derived.lock();
                match &*d {
                    Some((g, v)) if *g == gen => Some(v.clone()),
                    _ => {
                        let v = derive(&secret.versions()?.current.password);
                        *d = Some((gen, v.clone()));
                        Some(v)
                    }
                }
            }
            Scram::None => None,
        }
    }

    /// What a PostgreSQL client's login as this user is checked against: clear text for
    /// token users and `postgres_auth = "password"`, else an md5 hash or a SCRAM verifier
    /// (`None`: this user has no password PostgreSQL clients can prove, such as a MySQL
    /// `password_hash` with SCRAM).
    pub fn pg_credential(&self) -> Option<Credential> {
        if self.accepts_tokens() || self.pg_auth == PgAuthMethod::Password {
            return Some(Credential::ClearText);
        }
        match self.pg_auth {
            PgAuthMethod::Md5 => {
                let password = match &self.scram {
                    Scram::Password(p, _) => p.clone(),
                    Scram::Secret { secret, .. } => secret.versions()?.current.password.clone(),
                    Scram::Stored(_) | Scram::None => return None,
                };
                let stored =
                    crate::postgres::md5::stored(password.as_bytes(), self.name.as_bytes());
                Some(Credential::Md5(stored))
            }
            _ => self.scram_verifier().map(Credential::Scram),
        }
    }

    /// Whether `password`, sent in clear text, is this user's (a stored SCRAM verifier,
    /// or the password's hashes).
    pub fn password_matches(&self, password: &[u8]) -> bool {
        match &self.scram {
            Scram::Stored(v) => v.matches_password(password),
            _ => self.hash().verify(Plugin::Clear, &[], password),
        }
    }

    /// Whether identities proven by tokens may log in as this user.
    pub fn accepts_tokens(&self) -> bool {
        !self.aws_iam_arns.is_empty() || !self.jwt_subjects.is_empty()
    }

    /// The hashes a login is checked against now.
    fn hash(&self) -> PasswordHash {
        match &self.password {
            Password::Fixed(h) => h.clone(),
            Password::Secret { secret, hashed } => {
                let gen = secret.generation();
                let mut h = hashed.lock();
                if h.0 != gen {
                    if let Some(v) = secret.versions() {
                        *h = (gen, PasswordHash::of(v.current.password.as_bytes()));
                    }
                }
                h.1.clone()
            }
        }
    }
}

/// The user list, by name.
#[derive(Debug, Default)]
pub struct Users {
    by_name: HashMap<Vec<u8>, Arc<User>>,
    /// The database logins, by what they are configured as (a reload keeps those that
    /// stay the same, and so their pooled connections).
    logins: HashMap<(LoginKey, LoginKey), Arc<BackendLogin>>,
}

impl Users {
    /// Users whose values are fixed (references as resolved).
    pub fn new(cfg: &[UserConfig]) -> Self {
        Self::with_secrets(cfg, None)
    }

    /// Users whose passwords and database logins follow their secrets in `store`. Users
    /// with the same database login share it (and so its pooled connections).
    pub fn with_secrets(cfg: &[UserConfig], store: Option<&SecretStore>) -> Self {
        Self::build(cfg, store, None)
    }

    /// The users of a reloaded configuration: database logins configured as before are
    /// the same ones (their pooled connections keep serving).
    pub fn reloaded(cfg: &[UserConfig], store: Option<&SecretStore>, previous: &Users) -> Self {
        Self::build(cfg, store, Some(previous))
    }

    fn build(cfg: &[UserConfig], store: Option<&SecretStore>, previous: Option<&Users>) -> Self {
        let mut logins: HashMap<(LoginKey, LoginKey), Arc<BackendLogin>> = HashMap::new();
        let by_name = cfg
            .iter()
            .map(|u| {
                let backend_user = u
                    .backend_user
                    .clone()
                    .unwrap_or_else(|| Value::Text(u.name.clone()));
                let key = (
                    LoginKey::of(&backend_user),
                    LoginKey::of(&u.backend_password),
                );
                let before = previous.and_then(|p| p.logins.get(&key)).cloned();
                let backend = logins
                    .entry(key)
                    .or_insert_with(|| {
                        before.unwrap_or_else(|| {
                            BackendLogin::from_values(&backend_user, &u.backend_password, store)
                        })
                    })
                    .clone();
                let live = match (u.password_hash.is_none(), u.password.secret(), store) {
                    (true, Some(name), Some(store)) => store.get(name),
                    _ => None,
                };
                let scram = match (&u.password_hash, &live) {
                    (Some(h), _) => Verifier::parse(h).map_or(Scram::None, Scram::Stored),
                    (None, Some(secret)) => Scram::Secret {
                        secret: secret.clone(),
                        derived: Mutex::new(None),
                    },
                    (None, None) => {
                        Scram::Password(u.password.text().to_string(), Default::default())
                    }
                };
                let password = match live {
                    Some(secret) => Password::Secret {
                        hashed: Mutex::new((secret.generation(), u.hash())),
                        secret,
                    },
                    None => Password::Fixed(u.hash()),
                };
                let tokens = !u.aws_iam_arns.is_empty() || !u.jwt_subjects.is_empty();
                let user = User {
                    name: u.name.clone(),
                    password,
                    // A token travels as a clear-text password.
                    plugin: if tokens {
                        UserAuthPlugin::MysqlClearPassword
                    } else {
                        u.auth_plugin
                    },
                    backend,
                    aws_iam_arns: u.aws_iam_arns.clone(),
                    jwt_subjects: u.jwt_subjects.clone(),
                    scram,
                    pg_auth: u.postgres_auth,
                    max_database_connections: u.max_database_connections,
                    weight: u.weight,
                };
                (u.name.as_bytes().to_vec(), Arc::new(user))
            })
            .collect();
        Users { by_name, logins }
    }

    pub fn get(&self, name: &[u8]) -> Option<Arc<User>> {
        self.by_name.get(name).cloned()
    }
}

/// What makes two configured database logins the same one.
#[derive(Clone, PartialEq, Eq, Hash)]
enum LoginKey {
    Text(String),
    Secret(String),
}

/// Never the text: it may be a password.
impl std::fmt::Debug for LoginKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoginKey::Text(_) => f.write_str("Text(..)"),
            LoginKey::Secret(s) => write!(f, "Secret({s:?})"),
        }
    }
}

impl LoginKey {
    fn of(v: &Value) -> Self {
        match v.secret() {
            Some(name) => LoginKey::Secret(name.to_string()),
            None => LoginKey::Text(v.text().to_string()),
        }
    }
}

/// The next move in a client's authentication.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Send an AuthSwitchRequest for this plugin and verify the answer with [`verify`].
    Switch(Plugin),
    /// Authenticated. With `caching_sha2_password` the client first gets "fast auth ok".
    Accept(Plugin),
    /// caching_sha2_password's full authentication: ask the client for its password in
    /// clear text ("perform full authentication"), then [`verify`] it as [`Plugin::Clear`].
    FullAuth,
    Deny,
    /// The user's password travels in clear text, and this connection is not TLS.
    NeedsTls,
    /// Not the user's password, but perhaps a token proving an identity the user accepts:
    /// verify it ([`tokens::TokenVerifier`]).
    Token(Token),
}

/// Decides on a client's first answer: verify it, or switch the client to the plugin the
/// user requires. An unknown user goes through the same steps (no user enumeration).
/// `secure`: the connection is TLS (a clear-text password is taken only then).
pub fn first_answer(
    user: Option<&User>,
    client_plugin: Option<&[u8]>,
    can_switch: bool,
    nonce: &[u8],
    answer: &[u8],
    secure: bool,
) -> Decision {
    let offered = match client_plugin {
        Some(name) => Plugin::from_name(name),
        None => Some(Plugin::Native),
    }
    .filter(|p| *p != Plugin::Clear || secure);
    let required = match user.map(|u| u.plugin) {
        Some(UserAuthPlugin::MysqlNativePassword) => Plugin::Native,
        Some(UserAuthPlugin::CachingSha2Password) => Plugin::CachingSha2,
        Some(UserAuthPlugin::MysqlClearPassword) => {
            if !secure {
                return Decision::NeedsTls;
            }
            if offered == Some(Plugin::CachingSha2) {
                return Decision::FullAuth;
            }
            Plugin::Clear
        }
        _ => offered
            .filter(|p| user.is_none_or(|u| u.hash().supports(*p)))
            .unwrap_or(Plugin::Native),
    };
    // Clients whose plugin differs from the one announced send an empty first answer and
    // expect a switch that hands them the nonce for their plugin.
    let empty_needs_switch =
        answer.is_empty() && user.is_none_or(|u| !u.hash().is_empty_password());
    if !can_switch || (offered == Some(required) && !empty_needs_switch) {
        return verify(user, required, nonce, answer);
    }
    Decision::Switch(required)
}

/// Verifies an answer computed with `plugin`.
pub fn verify(user: Option<&User>, plugin: Plugin, nonce: &[u8], answer: &[u8]) -> Decision {
    match user {
        Some(u) if u.hash().verify(plugin, nonce, answer) => Decision::Accept(plugin),
        Some(u) if plugin == Plugin::Clear && u.accepts_tokens() => {
            let token = answer.strip_suffix(&[0]).unwrap_or(answer);
            match std::str::from_utf8(token) {
                Ok(t) if !t.is_empty() => Decision::Token(Token(t.to_string())),
                _ => Decision::Deny,
            }
        }
        Some(_) => Decision::Deny,
        None => {
            // An unknown user costs what a known one does.
            let _ = unknown_user_hash().verify(plugin, nonce, answer);
            Decision::Deny
        }
    }
}

/// Hashes no password matches, checked for unknown users.
fn unknown_user_hash() -> &'static PasswordHash {
    static H: std::sync::OnceLock<PasswordHash> = std::sync::OnceLock::new();
    H.get_or_init(|| PasswordHash::of(&crate::mysql::auth::new_nonce()))
}

/// ER_ACCESS_DENIED_ERROR, worded as MariaDB words it.
pub fn access_denied(user: &[u8], host: &str, used_password: bool) -> ErrPacket {
    ErrPacket::new(
        errcode::ER_ACCESS_DENIED_ERROR,
        "28000",
        format!(
            "Access denied for user '{}'@'{}' (using password: {})",
            String::from_utf8_lossy(user),
            host,
            if used_password { "YES" } else { "NO" }
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users(plugin: UserAuthPlugin) -> Users {
        Users::new(&[UserConfig {
            name: "app".into(),
            password: "s3cret".into(),
            password_hash: None,
            backend_user: None,
            backend_password: "db".into(),
            auth_plugin: plugin,
            postgres_auth: Default::default(),
            aws_iam_arns: Vec::new(),
            jwt_subjects: Vec::new(),
            max_database_connections: None,
            weight: 1,
        }])
    }

    const NONCE: &[u8] = b"abcdefghij0123456789";

    /// [`first_answer`] with the test nonce.
    fn ask(
        u: Option<&User>,
        plugin: &[u8],
        can_switch: bool,
        answer: &[u8],
        secure: bool,
    ) -> Decision {
        first_answer(u, Some(plugin), can_switch, NONCE, answer, secure)
    }

    #[test]
    fn accepts_either_plugin_by_default() {
        let us = users(UserAuthPlugin::Any);
        let u = us.get(b"app").unwrap();
        assert_eq!(u.backend.current().user, "app");
        for p in [Plugin::Native, Plugin::CachingSha2] {
            let a = p.scramble(b"s3cret", NONCE);
            assert_eq!(
                ask(Some(&u), p.name().as_bytes(), true, &a, false),
                Decision::Accept(p)
            );
            let bad = p.scramble(b"wrong", NONCE);
            assert_eq!(
                ask(Some(&u), p.name().as_bytes(), true, &bad, false),
                Decision::Deny
            );
        }
    }

    #[test]
    fn switches_to_the_required_or_a_known_plugin() {
        let us = users(UserAuthPlugin::CachingSha2Password);
        let u = us.get(b"app").unwrap();
        let a = Plugin::Native.scramble(b"s3cret", NONCE);
        assert_eq!(
            ask(Some(&u), b"mysql_native_password", true, &a, false),
            Decision::Switch(Plugin::CachingSha2)
        );
        let any = users(UserAuthPlugin::Any);
        let u = any.get(b"app").unwrap();
        assert_eq!(
            ask(Some(&u), b"client_ed25519", true, b"x", false),
            Decision::Switch(Plugin::Native)
        );
    }

    #[test]
    fn empty_first_answer_gets_a_switch() {
        let us = users(UserAuthPlugin::Any);
        let u = us.get(b"app").unwrap();
        assert_eq!(
            ask(Some(&u), b"caching_sha2_password", true, b"", false),
            Decision::Switch(Plugin::CachingSha2)
        );
        assert_eq!(
            ask(None, b"caching_sha2_password", true, b"", false),
            Decision::Switch(Plugin::CachingSha2)
        );
        assert_eq!(
            ask(Some(&u), b"caching_sha2_password", false, b"", false),
            Decision::Deny
        );
    }

    #[test]
    fn clear_text_passwords_only_over_tls() {
        let us = users(UserAuthPlugin::MysqlClearPassword);
        let u = us.get(b"app").unwrap();
        let sha2 = Plugin::CachingSha2.scramble(b"s3cret", NONCE);
        // caching_sha2_password clients are asked for full authentication, others switched.
        assert_eq!(
            ask(Some(&u), b"caching_sha2_password", true, &sha2, true),
            Decision::FullAuth
        );
        let native = Plugin::Native.scramble(b"s3cret", NONCE);
        assert_eq!(
            ask(Some(&u), b"mysql_native_password", true, &native, true),
            Decision::Switch(Plugin::Clear)
        );
        assert_eq!(
            ask(Some(&u), b"mysql_clear_password", true, b"s3cret\0", true),
            Decision::Accept(Plugin::Clear)
        );
        assert_eq!(
            verify(Some(&u), Plugin::Clear, NONCE, b"s3cret\0"),
            Decision::Accept(Plugin::Clear)
        );
        assert_eq!(
            verify(Some(&u), Plugin::Clear, NONCE, b"wrong\0"),
            Decision::Deny
        );
        // Without TLS: refused, whatever the client offers.
        for p in ["mysql_clear_password", "caching_sha2_password"] {
            assert_eq!(
                first_answer(
                    Some(&u),
                    Some(p.as_bytes()),
                    true,
                    NONCE,
                    b"s3cret\0",
                    false
                ),
                Decision::NeedsTls
            );
        }
        // An ordinary user is never taken in clear text without TLS: the client is switched.
        let any = users(UserAuthPlugin::Any);
        let u = any.get(b"app").unwrap();
        assert_eq!(
            ask(Some(&u), b"mysql_clear_password", true, b"s3cret\0", false),
            Decision::Switch(Plugin::Native)
        );
        assert_eq!(
            ask(Some(&u), b"mysql_clear_password", true, b"s3cret\0", true),
            Decision::Accept(Plugin::Clear)
        );
    }

    #[test]
    fn a_hash_without_its_sha256_part_switches_sha2_clients_to_native() {
        let us = Users::new(&[UserConfig {
            name: "app".into(),
            password: Default::default(),
            password_hash: Some(
                PasswordHash::of(b"s3cret")
                    .encode()
                    .split(' ')
                    .next()
                    .unwrap()
                    .into(),
            ),
            backend_user: None,
            backend_password: "db".into(),
            auth_plugin: UserAuthPlugin::Any,
            postgres_auth: Default::default(),
            aws_iam_arns: Vec::new(),
            jwt_subjects: Vec::new(),
            max_database_connections: None,
            weight: 1,
        }]);
        let u = us.get(b"app").unwrap();
        let sha2 = Plugin::CachingSha2.scramble(b"s3cret", NONCE);
        assert_eq!(
            ask(Some(&u), b"caching_sha2_password", true, &sha2, false),
            Decision::Switch(Plugin::Native)
        );
        let native = Plugin::Native.scramble(b"s3cret", NONCE);
        assert_eq!(
            verify(Some(&u), Plugin::Native, NONCE, &native),
            Decision::Accept(Plugin::Native)
        );
    }

    #[test]
    fn unknown_user_is_denied_like_a_wrong_password() {
        let us = users(UserAuthPlugin::Any);
        assert!(us.get(b"nobody").is_none());
        let a = Plugin::Native.scramble(b"s3cret", NONCE);
        assert_eq!(
            ask(None, b"mysql_native_password", true, &a, false),
            Decision::Deny
        );
        let e = access_denied(b"nobody", "127.0.0.1", true);
        assert_eq!(
            e.message,
            "Access denied for user 'nobody'@'127.0.0.1' (using password: YES)"
        );
        assert_eq!(e.code, 1045);
    }
}
