//! The TOML configuration: schema, defaults, and validation whose messages name the key.

use serde::{Deserialize, Deserializer};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// A configuration that could not be loaded; the message names the file and key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub proxy: ProxyConfig,
    #[serde(default)]
    pub endpoints: Vec<EndpointConfig>,
    #[serde(default)]
    pub target_groups: Vec<TargetGroupConfig>,
    #[serde(default)]
    pub users: Vec<UserConfig>,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub guard: GuardConfig,
    /// Where passwords (and user names) given as `{ secret = "name" }` come from.
    #[serde(default)]
    pub secrets: Vec<SecretConfig>,
    /// AWS IAM logins (users' `aws_iam_arns`).
    #[serde(default)]
    pub aws_iam: Option<AwsIamConfig>,
    /// OIDC JWT logins (users' `jwt_subjects`).
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
    /// Many dbproxy instances sharing each target group's `max_connections_total`.
    #[serde(default)]
    pub fleet: Option<FleetConfig>,
}

/// `[fleet]`: the instances that share one database's connections, coordinated through
/// etcd. A target group with `max_connections_total` is shared; `max_connections` still
/// caps this instance.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// The fleet's name: its keys live under `/dbproxy/fleet/<name>/`.
    pub name: String,
    /// Only `etcd` so far.
    #[serde(default = "d_fleet_store")]
    pub store: String,
    /// etcd's client URLs (`http://` or `https://`), tried in turn.
    pub endpoints: Vec<String>,
    /// The most instances that run at once, counting one that crashed until twice the
    /// lease time has passed. Each may use `max_connections_total / max_instances`
    /// without the store.
    pub max_instances: u32,
    /// This instance's name in the fleet; stable across restarts, so that a restart takes
    /// over its own entry. Default: the host name and the first endpoint's port.
    #[serde(default)]
    pub instance_id: String,
    /// An instance cut off from etcd is at its floor within this time; a dead one's share
    /// returns to the others within about twice it.
    #[serde(default = "d_fleet_lease", deserialize_with = "de_duration")]
    pub lease_ttl: Duration,
    /// What an instance asks for is its peak use over this window: connections it has not
    /// needed for this long go back to the fleet.
    #[serde(default = "d_fleet_return_after", deserialize_with = "de_duration")]
    pub return_after: Duration,
    /// etcd auth (`etcdctl user add`).
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub password: String,
    /// PEM: the CA of etcd's certificate; dbproxy's client certificate and key.
    #[serde(default)]
    pub ca_file: String,
    #[serde(default)]
    pub cert_file: String,
    #[serde(default)]
    pub key_file: String,
}

fn d_fleet_store() -> String {
    "etcd".into()
}
fn d_fleet_lease() -> Duration {
    Duration::from_secs(10)
}
fn d_fleet_return_after() -> Duration {
    Duration::from_secs(30)
}

/// `[aws_iam]`: logins with a presigned STS GetCallerIdentity request as the password
/// (`dbproxy token --user NAME` makes one).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AwsIamConfig {
    /// Where tokens are verified (and what they must be signed for); default the
    /// region's `https://sts.REGION.amazonaws.com`.
    pub sts_endpoint: String,
    /// Default: AWS_REGION, else us-east-1.
    pub region: String,
    /// When set, tokens must sign the header `x-dbproxy-server-id` with this value (a
    /// token made for another service, or another dbproxy, does not verify).
    pub server_id: String,
}

/// `[jwt]`: logins with an OIDC JWT as the password.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// The issuer's keys: a JWKS file, or a URL (read at start and every `refresh`).
    #[serde(default)]
    pub jwks_file: String,
    #[serde(default)]
    pub jwks_url: String,
    /// `iss` must be this.
    pub issuer: String,
    /// `aud` must contain this.
    pub audience: String,
    /// The claim users' `jwt_subjects` match (default `sub`).
    #[serde(default = "d_user_claim")]
    pub user_claim: String,
    #[serde(default = "d_secret_refresh", deserialize_with = "de_duration")]
    pub refresh: Duration,
}

fn d_user_claim() -> String {
    "sub".into()
}

/// `[[secrets]]`: a named secret. Its text is a JSON object with `username` and `password`
/// (the shape RDS writes), or the password alone.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretConfig {
    pub name: String,
    pub provider: SecretProvider,
    /// `file`: the file (refused when group or others may read it).
    #[serde(default)]
    pub path: String,
    /// `env`: the environment variable.
    #[serde(default)]
    pub var: String,
    /// `exec`: the program and its arguments; its standard output is the secret.
    #[serde(default)]
    pub command: Vec<String>,
    /// `aws_secrets_manager`: the secret's name or ARN.
    #[serde(default)]
    pub secret_id: String,
    /// `aws_secrets_manager`: the region (else the credential chain's: AWS_REGION, the
    /// shared config, the instance's).
    #[serde(default)]
    pub region: String,
    /// `aws_secrets_manager`: another endpoint (a VPC endpoint, a test server).
    #[serde(default)]
    pub endpoint_url: String,
    /// How often the secret is read again (it is also read at once when the database
    /// refuses a login made with it).
    #[serde(default = "d_secret_refresh", deserialize_with = "de_duration")]
    pub refresh: Duration,
}

fn d_secret_refresh() -> Duration {
    Duration::from_secs(5 * 60)
}

/// Where a secret is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecretProvider {
    File,
    Env,
    Exec,
    AwsSecretsManager,
}

/// A password or user name: given as text, or `{ secret = "name" }` (resolved at start and
/// by `check-config` from the `[[secrets]]` entry of that name, and followed as it rotates).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Value {
    Text(String),
    Secret(SecretRef),
}

/// `{ secret = "name" }`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretRef {
    pub secret: String,
    /// The text the secret had when resolved.
    #[serde(skip)]
    pub resolved: String,
}

impl Value {
    /// The text (for a reference: what it was resolved to; empty before).
    pub fn text(&self) -> &str {
        match self {
            Value::Text(t) => t,
            Value::Secret(r) => &r.resolved,
        }
    }

    /// Records what a reference resolved to (text stays as it is).
    pub fn set_resolved(&mut self, text: &str) {
        if let Value::Secret(r) = self {
            r.resolved = text.to_string();
        }
    }

    /// The secret it refers to, if any.
    pub fn secret(&self) -> Option<&str> {
        match self {
            Value::Secret(r) => Some(&r.secret),
            Value::Text(_) => None,
        }
    }
}

impl Default for Value {
    fn default() -> Self {
        Value::Text(String::new())
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Text(s.to_string())
    }
}

/// Never prints a password.
impl std::fmt::Debug for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Text(_) => f.write_str("Text(..)"),
            Value::Secret(r) => write!(f, "Secret({:?})", r.secret),
        }
    }
}

/// `[guard]`: the kernel guard (eBPF) that lets only dbproxy reach the database.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct GuardConfig {
    pub enabled: bool,
    /// Where to enforce: every process in this cgroup (and below) is covered. Empty: the
    /// cgroup2 root, i.e. the whole host.
    pub attach_cgroup: String,
    /// dbproxy moves itself here at start. Empty: `<cgroup2 root>/dbproxy`.
    pub proxy_cgroup: String,
    /// Further cgroups (paths) whose processes may reach the database (break-glass).
    pub allowed_cgroups: Vec<String>,
    /// bpffs directory where links and maps are pinned; empty = none (the guard detaches
    /// when dbproxy exits).
    pub pin_path: String,
    /// Ports protected on every address, in addition to the targets' own addresses.
    pub protect_ports: Vec<u16>,
}

/// `[admin]`: the HTTP endpoint (status page, metrics, status JSON) and the SQL console.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// ip:port for HTTP: `GET /` (status page), `/metrics`, `/status`, `/healthz`; empty = off.
    pub listen: String,
    /// ip:port of the SQL admin console (`SHOW POOLS`, `RELOAD`, ...); empty = off.
    pub sql_listen: String,
    /// Who may log in to the SQL console.
    pub admin_user: String,
    /// Its password (text or `{ secret = "name" }`); or give `admin_password_hash`.
    pub admin_password: Value,
    /// `dbproxy hash-password` output, instead of `admin_password`.
    pub admin_password_hash: Option<String>,
    /// Who may use the HTTP side: `none` (anyone who reaches `listen`), or `basic` (HTTP
    /// Basic with `admin_user` and its password) for every path but `/healthz`.
    pub http_auth: HttpAuth,
    /// With `http_auth = "basic"`: `/metrics` too is served without a login (for a scraper
    /// that cannot send one).
    pub public_metrics: bool,
}

/// `[admin] http_auth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum HttpAuth {
    #[default]
    None,
    Basic,
}

/// I/O backend of the data path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum IoMode {
    /// io_uring when it can be set up, else epoll (one log line says so).
    #[default]
    Auto,
    Uring,
    Epoll,
}

/// `[proxy]`: process-wide settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Worker threads, each with its own runtime, listeners and pools; 0 = one per core.
    pub workers: usize,
    pub io: IoMode,
    /// A client idle this long between commands is disconnected; 0 = never.
    #[serde(deserialize_with = "de_duration")]
    pub idle_client_timeout: Duration,
    /// A client idle this long inside a transaction (holding a database connection) is
    /// disconnected and its transaction rolled back; 0 = off (only idle_client_timeout).
    #[serde(deserialize_with = "de_duration")]
    pub idle_transaction_timeout: Duration,
    /// A client must finish logging in within this time.
    #[serde(deserialize_with = "de_duration")]
    pub handshake_timeout: Duration,
    /// A client that began sending something (a command in several packets, a file for
    /// LOAD DATA LOCAL) and goes silent this long is disconnected (MariaDB's
    /// `net_read_timeout`).
    #[serde(deserialize_with = "de_duration")]
    pub net_read_timeout: Duration,
    /// A client that takes none of an answer for this long is disconnected and its
    /// database connection closed (MariaDB's `net_write_timeout`).
    #[serde(deserialize_with = "de_duration")]
    pub net_write_timeout: Duration,
    pub max_client_connections: usize,
    /// Largest command a client may send (all continuation packets together).
    #[serde(deserialize_with = "de_size")]
    pub max_allowed_packet: u64,
    /// Prepared statements one client may hold open; error 1461 beyond (as MariaDB's
    /// `max_prepared_stmt_count`, whose default this is).
    pub max_prepared_statements_per_client: usize,
    /// For tests: at every check-in without a reset, check that the backend session is what
    /// dbproxy recorded of it (variables, user variables, schema, locks, temporary tables);
    /// a connection that differs is logged and closed. Costs several queries per check-in.
    pub verify_checkin: bool,
    /// Users' `max_database_connections` only count what would have waited
    /// (`dbproxy_user_over_limit_total`); nobody waits for them.
    pub tenant_dry_run: bool,
    /// PEM file with dbproxy's certificate chain, leaf first; with `tls_key`, clients may
    /// use TLS (reloaded on SIGHUP).
    pub tls_cert: String,
    /// PEM file with the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub tls_key: String,
    /// Failed logins from one address before its logins wait before their verdict.
    pub login_failure_threshold: u32,
    /// The longest such wait (it doubles from 100 ms); 0 = no throttling.
    #[serde(deserialize_with = "de_duration")]
    pub login_max_delay: Duration,
    /// SIGTERM drains: new connections are refused, idle clients are told the server is
    /// going away, transactions in flight may finish for this long; then dbproxy exits.
    #[serde(deserialize_with = "de_duration")]
    pub shutdown_timeout: Duration,
    /// `text` (default) or `json` (one object per line, for log shippers).
    pub log_format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl ProxyConfig {
    /// Whether a certificate is configured for clients.
    pub fn has_tls(&self) -> bool {
        !self.tls_cert.is_empty()
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            workers: 0,
            io: IoMode::Auto,
            tenant_dry_run: false,
            idle_client_timeout: Duration::from_secs(30 * 60),
            idle_transaction_timeout: Duration::ZERO,
            handshake_timeout: Duration::from_secs(10),
            net_read_timeout: Duration::from_secs(30),
            net_write_timeout: Duration::from_secs(60),
            max_client_connections: 10_000,
            max_allowed_packet: 1 << 30,
            max_prepared_statements_per_client: 16_382,
            verify_checkin: false,
            tls_cert: String::new(),
            tls_key: String::new(),
            login_failure_threshold: 3,
            login_max_delay: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(30),
            log_format: LogFormat::Text,
        }
    }
}

/// Endpoint role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    #[default]
    ReadWrite,
    ReadOnly,
}

impl EndpointConfig {
    /// The socket file of a `listen = "unix:/path"` endpoint.
    pub fn unix_path(&self) -> Option<&Path> {
        self.listen.strip_prefix("unix:").map(Path::new)
    }
}

/// `[[endpoints]]`: an address clients connect to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    pub name: String,
    pub listen: String,
    pub target_group: String,
    #[serde(default)]
    pub role: Role,
    /// TLS from clients; default `optional` when `proxy.tls_cert` is set, else `disabled`.
    #[serde(default)]
    pub tls: Option<ClientTls>,
    /// A `read_write` endpoint that sends autocommit reads to readers (within the group's
    /// `max_replication_lag`) and everything else to the writer.
    #[serde(default)]
    pub read_write_split: bool,
    /// With `read_write_split`: how a client's reads see its own writes.
    #[serde(default)]
    pub causal_reads: CausalReads,
    /// How long a read waits on a reader for the client's last write before it goes to the
    /// writer instead (`causal_reads = "gtid"`).
    #[serde(default = "d_causal_reads_timeout", deserialize_with = "de_duration")]
    pub causal_reads_timeout: Duration,
}

/// Read-your-writes on a split endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CausalReads {
    /// Reads go to a reader within `max_replication_lag`, whatever the client wrote.
    None,
    /// After a write, the client's reads wait on the reader for the write's GTID
    /// (`MASTER_GTID_WAIT`, in the same round trip as the read).
    #[default]
    Gtid,
    /// After a write, the client's reads stay on the writer until a reader's measured lag
    /// is below the time since that write (servers without GTIDs, such as Aurora).
    Lag,
}

impl CausalReads {
    /// As configured.
    pub fn name(self) -> &'static str {
        match self {
            CausalReads::None => "none",
            CausalReads::Gtid => "gtid",
            CausalReads::Lag => "lag",
        }
    }
}

fn d_causal_reads_timeout() -> Duration {
    Duration::from_millis(250)
}

/// TLS between clients and an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientTls {
    /// CLIENT_SSL is not offered.
    Disabled,
    /// Offered; clients choose.
    Optional,
    /// A login without TLS is refused (3159, as with `require_secure_transport`).
    Required,
}

impl EndpointConfig {
    /// The endpoint's TLS mode, its default resolved.
    pub fn tls_mode(&self, proxy: &ProxyConfig) -> ClientTls {
        match self.tls {
            Some(t) => t,
            None if proxy.has_tls() => ClientTls::Optional,
            None => ClientTls::Disabled,
        }
    }
}

/// A target group's database engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    /// MySQL and MariaDB.
    #[default]
    #[serde(alias = "mariadb")]
    Mysql,
    /// PostgreSQL (protocol 3.0).
    #[serde(alias = "postgres")]
    Postgresql,
}

impl Engine {
    /// The name as configured, and the `engine` label of metrics.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Mysql => "mysql",
            Engine::Postgresql => "postgresql",
        }
    }
}

/// TLS from dbproxy to the databases of a target group (the `--ssl-mode` of MySQL clients).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BackendTlsMode {
    /// Plain text.
    #[default]
    Disabled,
    /// TLS when the server offers it, its certificate not checked (encryption only).
    Preferred,
    /// TLS required; the certificate must chain to `backend_tls_ca`.
    VerifyCa,
    /// As `verify_ca`, and the certificate must name the target's host (SNI sent).
    VerifyFull,
}

impl BackendTlsMode {
    /// The name as configured.
    pub fn name(self) -> &'static str {
        match self {
            BackendTlsMode::Disabled => "disabled",
            BackendTlsMode::Preferred => "preferred",
            BackendTlsMode::VerifyCa => "verify_ca",
            BackendTlsMode::VerifyFull => "verify_full",
        }
    }
}

/// `[[target_groups]]`: the databases behind an endpoint and their pool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetGroupConfig {
    pub name: String,
    /// The protocol its databases and its endpoints speak.
    #[serde(default)]
    pub engine: Engine,
    pub targets: Vec<String>,
    /// Backend connections, all cores together.
    #[serde(default = "d_max_connections")]
    pub max_connections: usize,
    /// With `[fleet]`: the connections of all instances together (health checks apart).
    #[serde(default)]
    pub max_connections_total: Option<u32>,
    /// Idle connections kept open; unset: half of `max_connections`, rounded up (RDS
    /// Proxy's `MaxIdleConnectionsPercent` default), so that it follows the budget.
    #[serde(default)]
    pub max_idle_connections: Option<usize>,
    /// A database connection older than this is closed when it is next returned (and a
    /// new one, with the login's current credentials, opened when needed); 0 = no limit.
    #[serde(default, deserialize_with = "de_duration")]
    pub max_connection_lifetime: Duration,
    #[serde(default = "d_borrow_timeout", deserialize_with = "de_duration")]
    pub connection_borrow_timeout: Duration,
    #[serde(default = "d_connect_timeout", deserialize_with = "de_duration")]
    pub connect_timeout: Duration,
    /// The longest a client's statement may wait for the database's next packet (its
    /// answer, or the next part of it); then it is killed (KILL QUERY) and the client gets
    /// the server's error. 0 = no limit (a target the monitor finds down still ends it).
    #[serde(default, deserialize_with = "de_duration")]
    pub query_timeout: Duration,
    /// The longest dbproxy waits for an answer to a statement of its own (reset, replay of
    /// a client's session, read-back, re-login); the connection is closed then.
    #[serde(default = "d_internal_query_timeout", deserialize_with = "de_duration")]
    pub internal_query_timeout: Duration,
    /// Runs on every new backend connection, and again after each reset.
    #[serde(default)]
    pub init_query: String,
    /// RDS Proxy's session pinning filters.
    #[serde(default)]
    pub session_pinning_filters: Vec<PinningFilter>,
    /// How often the monitor checks each target (sub-second allowed).
    #[serde(default = "d_health_interval", deserialize_with = "de_duration")]
    pub health_check_interval: Duration,
    /// Failed checks in a row that mark a target down (a refused or reset connection
    /// marks it down at once).
    #[serde(default = "d_failure_threshold")]
    pub failure_threshold: u32,
    /// Readers further behind are skipped by read-only endpoints (a stopped replica counts
    /// as too far behind); empty = no limit.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub max_replication_lag: Option<Duration>,
    /// Where a read-only endpoint goes when no reader is fit.
    #[serde(default)]
    pub reader_fallback: crate::target::ReaderFallback,
    /// The monitor's login; defaults to the first user's backend credentials.
    #[serde(default)]
    pub monitor_user: Option<Value>,
    #[serde(default)]
    pub monitor_password: Option<Value>,
    /// PostgreSQL: the database the monitor's checks log in to.
    #[serde(default = "d_monitor_database")]
    pub monitor_database: String,
    /// TLS to the databases: disabled | preferred | verify_ca | verify_full.
    #[serde(default)]
    pub backend_tls: BackendTlsMode,
    /// PEM file of the CA certificates trusted for `verify_ca` / `verify_full`; empty = the
    /// system's roots.
    #[serde(default)]
    pub backend_tls_ca: String,
}

/// A session pinning filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PinningFilter {
    /// SET statements (user variables, `SET TRANSACTION`) do not pin; the client accepts
    /// that their effect may not follow it to the next backend connection.
    ExcludeVariableSets,
}

impl TargetGroupConfig {
    /// `max_idle_connections`, or its default: half of `max_connections`, rounded up.
    pub fn max_idle(&self) -> usize {
        self.max_idle_connections
            .unwrap_or_else(|| self.max_connections.div_ceil(2))
    }
}

fn d_max_connections() -> usize {
    100
}
fn d_borrow_timeout() -> Duration {
    Duration::from_secs(120)
}
fn d_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn d_internal_query_timeout() -> Duration {
    Duration::from_secs(10)
}
fn d_health_interval() -> Duration {
    Duration::from_secs(1)
}
fn d_failure_threshold() -> u32 {
    2
}

/// Client authentication plugin a user must log in with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum UserAuthPlugin {
    /// Whichever of mysql_native_password and caching_sha2_password the client offers.
    #[default]
    Any,
    MysqlNativePassword,
    CachingSha2Password,
    /// The password is checked in clear text, over TLS only: clients are switched to
    /// mysql_clear_password, or (caching_sha2_password clients) asked for full
    /// authentication. Without TLS the login is refused.
    MysqlClearPassword,
}

/// How a PostgreSQL client proves it is a user (`postgres_auth`). Users with token
/// logins (`aws_iam_arns`, `jwt_subjects`) always take a clear-text password, over TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum PgAuthMethod {
    #[default]
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    /// md5 (needs `password`, not `password_hash`: the stored hash involves the name).
    #[serde(rename = "md5")]
    Md5,
    /// The password in clear text, over TLS only.
    #[serde(rename = "password")]
    Password,
}

/// `[[users]]`: who may log in to dbproxy, and as whom dbproxy logs in to the database.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// The client's password; or give `password_hash`.
    #[serde(default)]
    pub password: Value,
    /// `*<40 hex> sha256:<64 hex>` (from `dbproxy hash-password`), instead of `password`;
    /// the first part alone (MariaDB's `PASSWORD()`) serves mysql_native_password only.
    #[serde(default)]
    pub password_hash: Option<String>,
    #[serde(default)]
    pub backend_user: Option<Value>,
    pub backend_password: Value,
    #[serde(default)]
    pub auth_plugin: UserAuthPlugin,
    /// How PostgreSQL clients log in as this user.
    #[serde(default)]
    pub postgres_auth: PgAuthMethod,
    /// AWS identities (ARNs, `*` matches anything) that may log in as this user with an
    /// IAM token (over TLS, mysql_clear_password).
    #[serde(default)]
    pub aws_iam_arns: Vec<String>,
    /// Values of the JWT's `[jwt] user_claim` (`*` matches anything) that may log in as
    /// this user with a JWT (over TLS, mysql_clear_password).
    #[serde(default)]
    pub jwt_subjects: Vec<String>,
    /// Database connections this user's sessions may hold at once (all pools); unset: no
    /// limit. Users logging in to the database as the same login count apart.
    #[serde(default)]
    pub max_database_connections: Option<usize>,
    /// This user's share among the users waiting for a saturated pool (weighted fair
    /// queueing); default 1.
    #[serde(default = "d_weight")]
    pub weight: u32,
}

fn d_weight() -> u32 {
    1
}

impl UserConfig {
    /// The hashes logins are checked against (an invalid `password_hash` is refused by
    /// validation; here it checks nothing).
    pub fn hash(&self) -> crate::mysql::auth::PasswordHash {
        match &self.password_hash {
            Some(h) => crate::mysql::auth::PasswordHash::parse(h).unwrap_or_else(|_| {
                crate::mysql::auth::PasswordHash::of(&crate::mysql::auth::new_nonce())
            }),
            None => crate::mysql::auth::PasswordHash::of(self.password.text().as_bytes()),
        }
    }

    /// The database user (defaults to the proxy user's name).
    pub fn backend_user(&self) -> &str {
        self.backend_user.as_ref().map_or(&self.name, |v| v.text())
    }
}

fn d_monitor_database() -> String {
    "postgres".into()
}

const MAX_DURATION_MS: u64 = 365 * 86_400_000;

/// Parses "30m", "120s", "500ms", "1h", "2d" or a bare number of seconds (at most a year).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (use e.g. \"30s\", \"5m\")"))?;
    let ms = match unit.trim() {
        "ms" => n,
        "" | "s" => n.saturating_mul(1000),
        "m" => n.saturating_mul(60_000),
        "h" => n.saturating_mul(3_600_000),
        "d" => n.saturating_mul(86_400_000),
        u => {
            return Err(format!(
                "invalid duration unit {u:?} in {s:?} (ms, s, m, h, d)"
            ))
        }
    };
    // Deadlines are instants computed from now: a year is more than any timeout needs,
    // and far from where adding it could overflow.
    if ms > MAX_DURATION_MS {
        return Err(format!("duration {s:?} is longer than a year"));
    }
    Ok(Duration::from_millis(ms))
}

/// Parses "64M", "1G", "512K" or a bare number of bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?} (use e.g. \"64M\")"))?;
    let mul = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        u => return Err(format!("invalid size unit {u:?} in {s:?} (K, M, G)")),
    };
    Ok(n.saturating_mul(mul))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumOrStr {
    Num(u64),
    Str(String),
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    match NumOrStr::deserialize(d)? {
        NumOrStr::Num(n) => parse_duration(&n.to_string()).map_err(serde::de::Error::custom),
        NumOrStr::Str(s) => parse_duration(&s).map_err(serde::de::Error::custom),
    }
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    match NumOrStr::deserialize(d)? {
        NumOrStr::Num(n) => parse_duration(&n.to_string())
            .map(Some)
            .map_err(serde::de::Error::custom),
        NumOrStr::Str(s) if s.trim().is_empty() => Ok(None),
        NumOrStr::Str(s) => parse_duration(&s)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match NumOrStr::deserialize(d)? {
        NumOrStr::Num(n) => Ok(n),
        NumOrStr::Str(s) => parse_size(&s).map_err(serde::de::Error::custom),
    }
}

impl Config {
    /// Reads, parses and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: p.clone(),
            source,
        })?;
        let cfg = Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: p.clone(),
                message,
            },
            other => other,
        })?;
        Ok(cfg)
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "config".into(),
            message: e.to_string(),
        })?;
        let errors = cfg.validate();
        if errors.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }

    /// What is valid but risky, each prefixed with its key (`run` logs them at start,
    /// `check-config` prints them).
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        let beyond_loopback = self
            .admin
            .listen
            .parse::<SocketAddr>()
            .is_ok_and(|a| !a.ip().is_loopback());
        if beyond_loopback && self.admin.http_auth == HttpAuth::None {
            out.push(format!(
                "admin.listen: {} is reachable from other hosts and admin.http_auth is \"none\": \
                 anyone who reaches it sees every client's address and user (/status, the \
                 status page); set http_auth = \"basic\" or listen on 127.0.0.1",
                self.admin.listen
            ));
        }
        out
    }

    /// Every problem, each prefixed with its key.
    pub fn validate(&self) -> Vec<String> {
        let mut errs = Vec::new();
        if let Some(j) = &self.jwt {
            if j.jwks_file.is_empty() == j.jwks_url.is_empty() {
                errs.push("jwt.jwks_file: give jwks_file or jwks_url (one of them)".into());
            }
            if j.issuer.is_empty() || j.audience.is_empty() {
                errs.push("jwt.issuer: issuer and audience must be set".into());
            }
        }
        if let Some(f) = &self.fleet {
            if f.store != "etcd" {
                errs.push(format!("fleet.store: {:?}: only \"etcd\" so far", f.store));
            }
            if f.endpoints.is_empty() {
                errs.push("fleet.endpoints: give etcd's client URLs".into());
            }
            if f.max_instances == 0 {
                errs.push("fleet.max_instances: must be at least 1".into());
            }
            if f.lease_ttl < Duration::from_secs(2) {
                errs.push("fleet.lease_ttl: at least 2s".into());
            }
            if f.cert_file.is_empty() != f.key_file.is_empty() {
                errs.push("fleet.cert_file: give both cert_file and key_file, or neither".into());
            }
            if f.name.is_empty() || f.name.contains('/') {
                errs.push("fleet.name: a name without '/'".into());
            }
        }
        for g in &self.target_groups {
            match (g.max_connections_total, &self.fleet) {
                (Some(_), None) => errs.push(format!(
                    "target_groups.{}.max_connections_total: needs a [fleet] section",
                    g.name
                )),
                (Some(t), Some(f)) if t < f.max_instances => errs.push(format!(
                    "target_groups.{}.max_connections_total: less than fleet.max_instances leaves no instance a connection",
                    g.name
                )),
                _ => {}
            }
        }
        if self.proxy.max_client_connections == 0 {
            errs.push("proxy.max_client_connections: must be at least 1".into());
        }
        if self.proxy.max_allowed_packet < 1024 {
            errs.push("proxy.max_allowed_packet: must be at least 1K".into());
        }
        if self.proxy.max_allowed_packet > 1 << 30 {
            errs.push("proxy.max_allowed_packet: at most 1G (as MariaDB's)".into());
        }
        if self.proxy.max_prepared_statements_per_client == 0 {
            errs.push("proxy.max_prepared_statements_per_client: must be at least 1".into());
        }
        if self.proxy.net_read_timeout.is_zero() {
            errs.push("proxy.net_read_timeout: must be more than 0".into());
        }
        if self.proxy.net_write_timeout.is_zero() {
            errs.push("proxy.net_write_timeout: must be more than 0".into());
        }
        if self.proxy.shutdown_timeout.is_zero() {
            errs.push("proxy.shutdown_timeout: must be more than 0".into());
        }
        if self.proxy.handshake_timeout.is_zero() {
            errs.push("proxy.handshake_timeout: must be more than 0".into());
        }
        if self.proxy.tls_cert.is_empty() != self.proxy.tls_key.is_empty() {
            errs.push("proxy.tls_cert: give both tls_cert and tls_key, or neither".into());
        }
        if !self.admin.listen.is_empty() && self.admin.listen.parse::<SocketAddr>().is_err() {
            errs.push(format!(
                "admin.listen: {:?} is not an ip:port address",
                self.admin.listen
            ));
        }
        if !self.admin.sql_listen.is_empty() && self.admin.sql_listen.parse::<SocketAddr>().is_err()
        {
            errs.push(format!(
                "admin.sql_listen: {:?} is not an ip:port address",
                self.admin.sql_listen
            ));
        }
        let needs_login = match (self.admin.sql_listen.is_empty(), self.admin.http_auth) {
            (false, _) => Some("sql_listen"),
            (true, HttpAuth::Basic) => Some("http_auth = \"basic\""),
            (true, HttpAuth::None) => None,
        };
        if let Some(why) = needs_login {
            if self.admin.admin_user.is_empty() {
                errs.push(format!("admin.admin_user: needed with {why}"));
            }
            let no_password = self.admin.admin_password == Value::default()
                && self.admin.admin_password_hash.is_none();
            if no_password {
                errs.push(format!(
                    "admin.admin_password: needed with {why} (or admin_password_hash)"
                ));
            }
            if let Some(h) = &self.admin.admin_password_hash {
                if crate::mysql::auth::PasswordHash::parse(h).is_err() {
                    errs.push(
                        "admin.admin_password_hash: not a dbproxy hash-password output".into(),
                    );
                }
            }
        }
        if self.endpoints.is_empty() {
            errs.push("endpoints: at least one [[endpoints]] is needed".into());
        }
        if self.target_groups.is_empty() {
            errs.push("target_groups: at least one [[target_groups]] is needed".into());
        }
        if self.users.is_empty() {
            errs.push("users: at least one [[users]] is needed".into());
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            let k = format!("endpoints[{i}]");
            if self.endpoints[..i].iter().any(|o| o.name == e.name) {
                errs.push(format!("{k}.name: {:?} is used twice", e.name));
            }
            match e.unix_path() {
                Some(p) if !p.is_absolute() => errs.push(format!(
                    "{k}.listen: {:?}: a Unix socket endpoint needs an absolute path",
                    e.listen
                )),
                Some(_) => {}
                None if e.listen.parse::<SocketAddr>().is_err() => errs.push(format!(
                    "{k}.listen: {:?} is not an ip:port address or unix:/path",
                    e.listen
                )),
                None => {}
            }
            if e.tls_mode(&self.proxy) != ClientTls::Disabled && !self.proxy.has_tls() {
                errs.push(format!(
                    "{k}.tls: TLS for clients needs proxy.tls_cert and proxy.tls_key"
                ));
            }
            if !self.target_groups.iter().any(|g| g.name == e.target_group) {
                errs.push(format!(
                    "{k}.target_group: no target group named {:?}",
                    e.target_group
                ));
            }
            if e.read_write_split {
                if e.role != Role::ReadWrite {
                    errs.push(format!(
                        "{k}.read_write_split: only a read_write endpoint splits (a read_only one sends everything to readers)"
                    ));
                }
                let engine = self.target_groups.iter().find(|g| g.name == e.target_group);
                if engine.is_some_and(|g| g.engine != Engine::Mysql) {
                    errs.push(format!(
                        "{k}.read_write_split: MySQL/MariaDB target groups only (PostgreSQL endpoints do not split yet)"
                    ));
                }
                if e.causal_reads_timeout.is_zero() {
                    errs.push(format!("{k}.causal_reads_timeout: must be more than 0"));
                }
            }
        }
        for (i, g) in self.target_groups.iter().enumerate() {
            let k = format!("target_groups[{i}]");
            if self.target_groups[..i].iter().any(|o| o.name == g.name) {
                errs.push(format!("{k}.name: {:?} is used twice", g.name));
            }
            if g.targets.is_empty() {
                errs.push(format!(
                    "{k}.targets: at least one host:port (or unix:/path) is needed"
                ));
            }
            if g.targets.len() > crate::target::MAX_TARGETS {
                errs.push(format!(
                    "{k}.targets: at most {} targets",
                    crate::target::MAX_TARGETS
                ));
            }
            for (j, t) in g.targets.iter().enumerate() {
                if let Err(e) = crate::target::check_target(t) {
                    errs.push(format!("{k}.targets[{j}]: {e}"));
                }
                if g.targets[..j].contains(t) {
                    errs.push(format!("{k}.targets[{j}]: {t:?} is listed twice"));
                }
            }
            if g.max_connections == 0 {
                errs.push(format!("{k}.max_connections: must be at least 1"));
            }
            if g.engine == Engine::Postgresql {
                if !g.session_pinning_filters.is_empty() {
                    errs.push(format!(
                        "{k}.session_pinning_filters: MySQL only (a PostgreSQL group's session state moves with its clients)"
                    ));
                }
                if g.targets.iter().any(|t| t.starts_with("unix:")) {
                    errs.push(format!(
                        "{k}.targets: a PostgreSQL target is host:port (Unix sockets are not served yet)"
                    ));
                }
            }
            if g.max_idle() > g.max_connections {
                errs.push(format!(
                    "{k}.max_idle_connections: must not exceed max_connections ({})",
                    g.max_connections
                ));
            }
            if g.connect_timeout.is_zero() {
                errs.push(format!("{k}.connect_timeout: must be more than 0"));
            }
            if g.connection_borrow_timeout.is_zero() {
                errs.push(format!(
                    "{k}.connection_borrow_timeout: must be more than 0"
                ));
            }
            if g.internal_query_timeout < Duration::from_millis(100) {
                errs.push(format!(
                    "{k}.internal_query_timeout: must be at least 100ms"
                ));
            }
            if g.max_replication_lag.is_some_and(|l| l.is_zero()) {
                errs.push(format!(
                    "{k}.max_replication_lag: must be more than 0 (empty for no limit)"
                ));
            }
            if g.health_check_interval < Duration::from_millis(50) {
                errs.push(format!("{k}.health_check_interval: must be at least 50ms"));
            }
            if g.failure_threshold == 0 {
                errs.push(format!("{k}.failure_threshold: must be at least 1"));
            }
            if g.monitor_user.is_some() != g.monitor_password.is_some() {
                errs.push(format!(
                    "{k}.monitor_user: give both monitor_user and monitor_password, or neither"
                ));
            }
        }
        for (i, s) in self.secrets.iter().enumerate() {
            let k = format!("secrets[{i}]");
            if self.secrets[..i].iter().any(|o| o.name == s.name) {
                errs.push(format!("{k}.name: {:?} is used twice", s.name));
            }
            let missing = match s.provider {
                SecretProvider::File => s.path.is_empty().then_some("path"),
                SecretProvider::Env => s.var.is_empty().then_some("var"),
                SecretProvider::Exec => s.command.is_empty().then_some("command"),
                SecretProvider::AwsSecretsManager => s.secret_id.is_empty().then_some("secret_id"),
            };
            if let Some(key) = missing {
                errs.push(format!("{k}.{key}: needed by this provider"));
            }
        }
        let mut refs: Vec<(String, &Value)> = Vec::new();
        for (i, u) in self.users.iter().enumerate() {
            refs.push((format!("users[{i}].password"), &u.password));
            refs.push((format!("users[{i}].backend_password"), &u.backend_password));
            if let Some(v) = &u.backend_user {
                refs.push((format!("users[{i}].backend_user"), v));
            }
        }
        for (i, g) in self.target_groups.iter().enumerate() {
            for (key, v) in [
                ("monitor_user", &g.monitor_user),
                ("monitor_password", &g.monitor_password),
            ] {
                if let Some(v) = v {
                    refs.push((format!("target_groups[{i}].{key}"), v));
                }
            }
        }
        for (key, v) in refs {
            if let Some(name) = v.secret() {
                if !self.secrets.iter().any(|s| s.name == name) {
                    errs.push(format!("{key}: no [[secrets]] entry named {name:?}"));
                }
            }
        }
        for (i, u) in self.users.iter().enumerate() {
            let k = format!("users[{i}]");
            if u.name.is_empty() {
                errs.push(format!("{k}.name: must not be empty"));
            }
            if !u.aws_iam_arns.is_empty() && self.aws_iam.is_none() {
                errs.push(format!("{k}.aws_iam_arns: needs an [aws_iam] section"));
            }
            if !u.jwt_subjects.is_empty() && self.jwt.is_none() {
                errs.push(format!("{k}.jwt_subjects: needs a [jwt] section"));
            }
            if (!u.aws_iam_arns.is_empty() || !u.jwt_subjects.is_empty())
                && !matches!(
                    u.auth_plugin,
                    UserAuthPlugin::Any | UserAuthPlugin::MysqlClearPassword
                )
            {
                errs.push(format!(
                    "{k}.auth_plugin: token logins use mysql_clear_password (over TLS)"
                ));
            }
            if u.postgres_auth == PgAuthMethod::Md5 && u.password_hash.is_some() {
                errs.push(format!(
                    "{k}.postgres_auth: md5 needs `password` (text or secret), not password_hash"
                ));
            }
            if self.users[..i].iter().any(|o| o.name == u.name) {
                errs.push(format!("{k}.name: {:?} is used twice", u.name));
            }
            if let Some(h) = &u.password_hash {
                if u.password != Value::default() {
                    errs.push(format!(
                        "{k}.password_hash: give password or password_hash, not both"
                    ));
                }
                let scram = h.starts_with("SCRAM-SHA-256$");
                if scram {
                    if let Err(e) = crate::postgres::scram::Verifier::parse(h) {
                        errs.push(format!("{k}.password_hash: {e}"));
                    }
                }
                match crate::mysql::auth::PasswordHash::parse(h) {
                    // A SCRAM verifier serves PostgreSQL clients only.
                    Err(_) if scram => {}
                    Err(e) => errs.push(format!("{k}.password_hash: {e}")),
                    Ok(h)
                        if u.auth_plugin == UserAuthPlugin::CachingSha2Password
                            && !h.supports(crate::mysql::auth::Plugin::CachingSha2) =>
                    {
                        errs.push(format!(
                            "{k}.password_hash: caching_sha2_password needs its sha256: part"
                        ))
                    }
                    Ok(_) => {}
                }
            }
        }
        errs
    }

    /// The target group named `name`.
    pub fn target_group(&self, name: &str) -> Option<&TargetGroupConfig> {
        self.target_groups.iter().find(|g| g.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::{parse_target, BackendAddr};

    const CONTRACT: &str = r#"
[proxy]
workers = 0
io = "auto"
idle_client_timeout = "30m"
max_client_connections = 10000

[[endpoints]]
name = "default"
listen = "127.0.0.1:6033"
target_group = "default"
role = "read_write"

[[target_groups]]
name = "default"
targets = ["127.0.0.1:3306"]
max_connections = 100
max_idle_connections = 50
connection_borrow_timeout = "120s"
init_query = ""

[[users]]
name = "app"
password = "app-secret"
backend_user = "app"
backend_password = "db-secret"
"#;

    #[test]
    fn the_documented_contract_parses() {
        let c = Config::parse(CONTRACT).unwrap();
        assert_eq!(c.proxy.idle_client_timeout, Duration::from_secs(1800));
        assert_eq!(
            c.target_groups[0].connection_borrow_timeout,
            Duration::from_secs(120)
        );
        assert_eq!(c.users[0].backend_user(), "app");
    }

    /// The configuration the README shows is a valid one, key for key.
    #[test]
    fn the_readme_configuration_parses() {
        let readme = include_str!("../../README.md");
        let block = readme
            .split("```toml\n")
            .nth(1)
            .and_then(|b| b.split("```").next())
            .expect("a toml block in the README");
        let c = Config::parse(block).unwrap_or_else(|e| panic!("README configuration: {e}"));
        let g = &c.target_groups[0];
        assert_eq!(g.health_check_interval, Duration::from_secs(1));
        assert_eq!(g.failure_threshold, 2);
        assert_eq!(g.max_replication_lag, None);
        assert_eq!(g.reader_fallback, crate::target::ReaderFallback::Writer);
        assert_eq!(g.engine, Engine::Mysql);
        // The PostgreSQL section's block is a whole configuration of its own.
        let pg = readme
            .split("```toml\n")
            .skip(2)
            .filter_map(|b| b.split("```").next())
            .find(|b| b.contains("engine = \"postgresql\""))
            .expect("the PostgreSQL section's toml block");
        let c =
            Config::parse(pg).unwrap_or_else(|e| panic!("README PostgreSQL configuration: {e}"));
        assert_eq!(c.target_groups[0].engine, Engine::Postgresql);
        assert_eq!(c.validate(), Vec::<String>::new());
    }

    /// The README's commented `[fleet]` block and `max_connections_total`, uncommented, make
    /// a valid configuration; a total without `[fleet]`, or below `max_instances`, does not.
    #[test]
    fn the_readme_fleet_keys_parse_and_are_checked() {
        let readme = include_str!("../../README.md");
        let uncomment = |l: &str| -> String {
            let l = l.trim_start_matches("# ");
            l.split("  #").next().unwrap_or(l).trim_end().to_string()
        };
        let fleet: Vec<String> = readme
            .lines()
            .skip_while(|l| !l.starts_with("# [fleet]"))
            .take_while(|l| l.trim_start().starts_with('#'))
            // Its own lines, not the comments continued below them.
            .filter(|l| l.starts_with("# "))
            .map(uncomment)
            .collect();
        let total = readme
            .lines()
            .find(|l| l.starts_with("# max_connections_total"))
            .map(uncomment)
            .expect("max_connections_total in the README");
        let base = |group_extra: &str, sections: &str| {
            format!(
                "[[endpoints]]\nname = \"e\"\nlisten = \"127.0.0.1:3307\"\ntarget_group = \"g\"\n\
                 [[target_groups]]\nname = \"g\"\ntargets = [\"127.0.0.1:3306\"]\n{group_extra}\n\
                 [[users]]\nname = \"app\"\npassword = \"x\"\nbackend_password = \"y\"\n{sections}"
            )
        };
        let c = Config::parse(&base(&total, &fleet.join("\n")))
            .unwrap_or_else(|e| panic!("{e}: {fleet:?}"));
        let f = c.fleet.as_ref().unwrap();
        assert_eq!(
            (f.max_instances, f.lease_ttl),
            (10, Duration::from_secs(10))
        );
        assert_eq!(c.target_groups[0].max_connections_total, Some(300));
        assert_eq!(c.validate(), Vec::<String>::new());
        let refused = |text: String| {
            Config::parse(&text)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        let e = refused(base(&total, ""));
        assert!(e.contains("needs a [fleet] section"), "{e}");
        let e = refused(base("max_connections_total = 5", &fleet.join("\n")));
        assert!(e.contains("less than fleet.max_instances"), "{e}");
    }

    /// The example the Debian package installs is valid as it ships.
    #[test]
    fn the_packaged_example_configuration_is_valid() {
        let c = Config::parse(include_str!("../../packaging/dbproxy.toml"))
            .unwrap_or_else(|e| panic!("packaging/dbproxy.toml: {e}"));
        assert!(c.guard.enabled && !c.admin.sql_listen.is_empty());
        assert_eq!(c.endpoints.len(), 2);
    }

    #[test]
    fn topology_keys_are_checked() {
        let c = Config::parse(&CONTRACT.replace(
            "init_query = \"\"",
            "init_query = \"\"\nmax_replication_lag = \"10s\"\nreader_fallback = \"wait\"\nhealth_check_interval = \"250ms\"",
        ))
        .unwrap();
        let g = &c.target_groups[0];
        assert_eq!(g.max_replication_lag, Some(Duration::from_secs(10)));
        assert_eq!(g.health_check_interval, Duration::from_millis(250));
        let err = Config::parse(&CONTRACT.replace(
            "init_query = \"\"",
            "init_query = \"\"\nhealth_check_interval = \"10ms\"\nfailure_threshold = 0\nmonitor_user = \"m\"",
        ))
        .unwrap_err()
        .to_string();
        for key in ["health_check_interval", "failure_threshold", "monitor_user"] {
            assert!(err.contains(key), "{err}");
        }
        let err = Config::parse(&CONTRACT.replace("127.0.0.1:3306", "db.internal"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("targets[0]"), "{err}");
        // A name that does not resolve now is checked again at every health check.
        assert!(Config::parse(&CONTRACT.replace("127.0.0.1:3306", "db.invalid:3306")).is_ok());
    }

    /// A group that sets only `max_connections` is valid whatever its size: the idle limit
    /// follows it (half, rounded up) unless it is given.
    #[test]
    fn max_idle_connections_follows_max_connections() {
        let only = |n: usize| {
            CONTRACT
                .replace("max_idle_connections = 50\n", "")
                .replace("max_connections = 100", &format!("max_connections = {n}"))
        };
        for (max, idle) in [(1, 1), (2, 1), (3, 2), (100, 50)] {
            let c = Config::parse(&only(max)).unwrap_or_else(|e| panic!("{max}: {e}"));
            assert_eq!(
                c.target_groups[0].max_idle(),
                idle,
                "max_connections = {max}"
            );
        }
        let c = Config::parse(
            &CONTRACT.replace("max_idle_connections = 50", "max_idle_connections = 100"),
        )
        .unwrap();
        assert_eq!(c.target_groups[0].max_idle(), 100, "given: kept");
    }

    #[test]
    fn errors_name_the_key() {
        let bad = CONTRACT
            .replace("target_group = \"default\"", "target_group = \"nope\"")
            .replace("max_idle_connections = 50", "max_idle_connections = 500")
            .replace("127.0.0.1:6033", "localhost");
        let err = Config::parse(&bad).unwrap_err().to_string();
        assert!(err.contains("endpoints[0].target_group"), "{err}");
        assert!(
            err.contains("target_groups[0].max_idle_connections"),
            "{err}"
        );
        assert!(err.contains("endpoints[0].listen"), "{err}");
    }

    #[test]
    fn unknown_keys_and_bad_durations_are_refused() {
        let err = Config::parse(&CONTRACT.replace("workers = 0", "wrokers = 0"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("wrokers"), "{err}");
        let err = Config::parse(&CONTRACT.replace("\"30m\"", "\"30 parsecs\""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("idle_client_timeout") || err.contains("duration"),
            "{err}"
        );
    }

    #[test]
    fn targets_are_host_port_or_unix_paths() {
        assert_eq!(
            parse_target("unix:/run/mysqld/mysqld.sock").unwrap(),
            [BackendAddr::Unix("/run/mysqld/mysqld.sock".into())]
        );
        assert_eq!(
            parse_target("127.0.0.1:3306").unwrap(),
            [BackendAddr::Tcp("127.0.0.1:3306".parse().unwrap())]
        );
        assert!(parse_target("unix:mysqld.sock")
            .unwrap_err()
            .contains("absolute path"));
        let err = Config::parse(&CONTRACT.replace(
            "targets = [\"127.0.0.1:3306\"]",
            "targets = [\"unix:relative.sock\"]",
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("targets[0]"), "{err}");
    }

    #[test]
    fn password_hashes_are_checked() {
        let h = crate::mysql::auth::PasswordHash::of(b"app-secret").encode();
        let ok = CONTRACT.replace(
            "password = \"app-secret\"",
            &format!("password_hash = \"{h}\""),
        );
        let c = Config::parse(&ok).unwrap();
        assert_eq!(
            c.users[0].hash(),
            crate::mysql::auth::PasswordHash::of(b"app-secret")
        );
        let both = CONTRACT.replace(
            "password = \"app-secret\"",
            &format!("password = \"x\"\npassword_hash = \"{h}\""),
        );
        let err = Config::parse(&both).unwrap_err().to_string();
        assert!(
            err.contains("users[0].password_hash: give password or password_hash"),
            "{err}"
        );
        let bad = CONTRACT.replace("password = \"app-secret\"", "password_hash = \"nope\"");
        let err = Config::parse(&bad).unwrap_err().to_string();
        assert!(err.contains("users[0].password_hash"), "{err}");
        let native_only = h.split(' ').next().unwrap_or_default();
        let sha2 = CONTRACT.replace(
            "password = \"app-secret\"",
            &format!("password_hash = \"{native_only}\"\nauth_plugin = \"caching_sha2_password\""),
        );
        let err = Config::parse(&sha2).unwrap_err().to_string();
        assert!(err.contains("sha256: part"), "{err}");
        let md5 = ok.replace(
            "password_hash =",
            "postgres_auth = \"md5\"\npassword_hash =",
        );
        let err = Config::parse(&md5).unwrap_err().to_string();
        assert!(err.contains("users[0].postgres_auth: md5 needs"), "{err}");
        let c = Config::parse(&ok.replace(
            "password_hash =",
            "postgres_auth = \"password\"\npassword_hash =",
        ))
        .unwrap();
        assert_eq!(c.users[0].postgres_auth, PgAuthMethod::Password);
        assert!(Config::parse(&ok.replace(
            "password_hash =",
            "postgres_auth = \"trust\"\npassword_hash ="
        ))
        .is_err());
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration("15").unwrap(), Duration::from_secs(15));
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("-1s").is_err());
        assert_eq!(
            parse_duration("365d").unwrap(),
            Duration::from_secs(365 * 86_400)
        );
        assert!(parse_duration("366d")
            .unwrap_err()
            .contains("longer than a year"));
        assert!(parse_duration("99999999999999999999").is_err());
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert!(parse_size("1T").is_err());
    }

    /// A split endpoint: its defaults, and the settings that cannot work refused by name.
    #[test]
    fn read_write_split_settings() {
        let (_, rest) = CONTRACT.split_once("[[endpoints]]").unwrap();
        let base = format!("[[endpoints]]{rest}");
        let with =
            |lines: &str| base.replacen("[[endpoints]]\n", &format!("[[endpoints]]\n{lines}\n"), 1);
        let c = Config::parse(&with("read_write_split = true")).unwrap();
        let e = &c.endpoints[0];
        assert!(e.read_write_split);
        assert_eq!(e.causal_reads, CausalReads::Gtid);
        assert_eq!(e.causal_reads_timeout, Duration::from_millis(250));
        let c = Config::parse(&with("read_write_split = true\ncausal_reads = \"lag\"")).unwrap();
        assert_eq!(c.endpoints[0].causal_reads.name(), "lag");
        let read_only = base.replacen("role = \"read_write\"", "role = \"read_only\"", 1);
        assert_ne!(read_only, base);
        let err = Config::parse(&read_only.replacen(
            "[[endpoints]]\n",
            "[[endpoints]]\nread_write_split = true\n",
            1,
        ))
        .map(|_| ())
        .unwrap_err()
        .to_string();
        assert!(err.contains("only a read_write endpoint"), "{err}");
        for (lines, complaint) in [
            (
                "read_write_split = true\ncausal_reads_timeout = \"0\"",
                "causal_reads_timeout",
            ),
            ("causal_reads = \"sometimes\"", "causal_reads"),
        ] {
            let err = Config::parse(&with(lines))
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert!(err.contains(complaint), "{lines}: {err}");
        }
    }

    /// Zero means off where the README says so, and every other duration and size is
    /// checked: a bare number too, and values that make no sense are refused by name.
    #[test]
    fn durations_are_validated() {
        let (_, rest) = CONTRACT.split_once("[[endpoints]]").unwrap();
        let base =
            format!("[[endpoints]]{rest}").replace("connection_borrow_timeout = \"120s\"\n", "");
        let c = Config::parse(&format!("[proxy]\nidle_client_timeout = \"0\"\n{base}")).unwrap();
        assert_eq!(c.proxy.idle_client_timeout, Duration::ZERO);
        assert_eq!(c.proxy.idle_transaction_timeout, Duration::ZERO);
        assert_eq!(c.target_groups[0].query_timeout, Duration::ZERO);
        assert_eq!(
            c.target_groups[0].internal_query_timeout,
            Duration::from_secs(10)
        );
        assert_eq!(c.proxy.max_prepared_statements_per_client, 16_382);
        for (section, line, complaint) in [
            (
                "proxy",
                "idle_client_timeout = 99999999999",
                "longer than a year",
            ),
            ("proxy", "shutdown_timeout = \"0\"", "shutdown_timeout"),
            ("proxy", "max_allowed_packet = \"2G\"", "max_allowed_packet"),
            (
                "proxy",
                "max_prepared_statements_per_client = 0",
                "max_prepared_statements",
            ),
            (
                "group",
                "internal_query_timeout = \"0\"",
                "internal_query_timeout",
            ),
            (
                "group",
                "connection_borrow_timeout = \"0\"",
                "connection_borrow_timeout",
            ),
            (
                "group",
                "max_replication_lag = \"0\"",
                "max_replication_lag",
            ),
            ("group", "query_timeout = \"5x\"", "duration unit"),
        ] {
            let text = match section {
                "proxy" => format!("[proxy]\n{line}\n{base}"),
                _ => base.replacen(
                    "[[target_groups]]\n",
                    &format!("[[target_groups]]\n{line}\n"),
                    1,
                ),
            };
            let err = Config::parse(&text).map(|_| ()).unwrap_err().to_string();
            assert!(err.contains(complaint), "{line}: {err}");
        }
    }
}
