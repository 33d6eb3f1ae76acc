//! The driver of one PostgreSQL client on the worker runtime (rt/).
//!
//! First the login: the sans-IO [`Login`] machine over the socket, with TLS, and
//! CancelRequests sent on to the server process their client holds. Then the session:
//! between transactions the client holds no server connection; from its next message to
//! the ReadyForQuery that leaves nothing outstanding (no transaction, no COPY, nothing
//! unsynced), it holds one, which first takes the client's settings
//! ([`Settings::replay_sql`]). Bytes pass both ways unchanged; the [`Tracker`] reads
//! their headers, and the session ([`PgSession`]) the Query and Parse texts, to know when
//! the connection may go back, whether the settings must be read back first, and what
//! pins the client.

use crate::io::{read_watching_peer, Buf, Driver, Stream};
use crate::pg_cancel::{self, HeldServer, Registration};
use crate::pg_pool::{BorrowError, Lease, PgPool};
use crate::pg_server::{nonce, write_all, Answer, PgServer, PgServerError};
use crate::pool::Class;
use crate::postgres::backend::OpenError;
use crate::postgres::login::{Credential, Login, Need};
use crate::postgres::messages::{
    backend_key_data, parameter_status, ready_for_query, sqlstate, ErrorResponse, TxStatus,
};
use crate::postgres::scram::Verifier;
use crate::postgres::tracker::{CopyState, ServerEvent, Tracker};
use crate::session::command::{idle_wait, IdleLimit};
use crate::session::login::ClientTls;
use crate::session::pg_lost_tx::LostTransaction;
use crate::session::pg_sql_statements::READ_BACK_SQL;
use crate::session::pg_statements::{
    answer_parses, ClientStatements, Edit, Exchange, Forward, MAX_SERVER_STATEMENTS,
};
use crate::session::pin_reason::PinReason;
use crate::session::postgres::{AtRest, PgSession, Settings};
use crate::shared::ProxyShared;
use crate::stats::EndpointStats;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Receive buffer a client keeps between transactions.
const CLIENT_BUF: usize = 16 * 1024;

/// How long a cancel request may take to reach a server.
const CANCEL_LIMIT: Duration = Duration::from_secs(2);

/// Why a linked exchange ended.
enum Unlinked {
    /// Settled: the connection may serve others.
    Settled,
    /// The client left (or sent Terminate); `busy`: with a request still running.
    ClientGone { busy: bool },
    /// The server connection failed; the client is told.
    ServerLost(String),
    /// The connection failed before the client's request went to it: another serves it.
    Unused(String),
    /// dbproxy could not give the server the client's settings; the client is told.
    Refused(String),
    /// The client broke the protocol; it is told.
    Protocol(String),
    /// The client sat idle in its transaction past `idle_transaction_timeout` (or
    /// `idle_client_timeout`): it is told and closed, its transaction rolled back.
    Idle(IdleLimit),
    /// The client began a message and sent nothing more within `net_read_timeout`: it is
    /// told and closed (the server connection, waiting for the rest, with it).
    ReadTimeout,
}

/// Why dbproxy's own query on a server connection failed.
enum OwnQueryError {
    /// The connection failed (the client's request was not sent: another may serve it).
    Connection(String),
    /// The server answered with an error.
    Refused(String),
}

impl OwnQueryError {
    fn text(self) -> String {
        match self {
            OwnQueryError::Connection(t) | OwnQueryError::Refused(t) => t,
        }
    }
}

/// A logged-in client.
struct PgClient<D: Driver> {
    shared: Arc<ProxyShared>,
    pool: Rc<PgPool<D>>,
    stream: D::Stream,
    peer: SocketAddr,
    /// The client's bytes not yet sent to a server.
    buf: Buf,
    /// The server's bytes on their way to the client.
    sbuf: Buf,
    user: Arc<crate::auth::User>,
    database: String,
    session: PgSession,
    /// The client's named prepared statements.
    stmts: ClientStatements,
    /// Bytes rewritten on their way (reused).
    out: Vec<u8>,
    /// The exchange on the held connection: what is outstanding, and the requests whose
    /// answers are matched (kept between exchanges for their buffers).
    tracker: Tracker,
    exchange: Exchange,
    cancel: Registration,
    /// Its transaction was lost with its server connection: answered here until it ends.
    lost: Option<LostTransaction>,
    /// Its entry among the process's client sessions (status, `SHOW CLIENTS`, `KILL`,
    /// the drain's wake).
    reg: crate::clients::Registration,
    endpoint: Arc<EndpointStats>,
    /// The user's share of the connections (looked up at the first borrow).
    tenant: Option<Arc<crate::tenants::Tenant>>,
}

/// Serves one client connection to a PostgreSQL endpoint until it ends.
pub async fn serve<D: Driver>(
    shared: Arc<ProxyShared>,
    pool: Rc<PgPool<D>>,
    mut stream: D::Stream,
    peer: SocketAddr,
    tls: ClientTls,
    endpoint: Arc<EndpointStats>,
) {
    let counted = shared.clone();
    let (in_use, _count) = counted.count_client();
    let _open = endpoint.connected();
    if in_use > shared.config().proxy.max_client_connections {
        let mut out = Vec::new();
        ErrorResponse::fatal(
            sqlstate::TOO_MANY_CONNECTIONS,
            "sorry, too many clients already",
        )
        .write(&mut out);
        let _ = write_all(&mut stream, &out).await;
        tracing::warn!(%peer, "refused a client: max_client_connections reached");
        return;
    }
    let Some(logged) = login::<D>(&shared, &mut stream, peer, tls).await else {
        return;
    };
    let pid = i32::try_from(shared.next_connection_id() & 0x7fff_ffff).unwrap_or(1);
    let key = i32::from_be_bytes(nonce()[..4].try_into().unwrap_or([0; 4]));
    let cancel = shared.pg_cancels.register(pid, key);
    let mut buf = Buf::with_capacity(CLIENT_BUF);
    buf.extend(&logged.pending);
    let origin = crate::clients::Origin {
        peer: Some(peer),
        endpoint: Some(endpoint.clone()),
        tls: stream.is_tls(),
        since: crate::stats::unix_now(),
    };
    let slot = crate::clients::ClientSlot::with_origin(
        pid.unsigned_abs(),
        &logged.user.name,
        &pool.shared.id,
        origin,
    );
    let reg = shared.sessions.register(slot);
    let mut c = PgClient {
        shared,
        pool,
        stream,
        peer,
        buf,
        sbuf: Buf::with_capacity(CLIENT_BUF),
        session: PgSession::new(&logged.params),
        stmts: ClientStatements::new(pid),
        out: Vec::new(),
        tracker: Tracker::default(),
        exchange: Exchange::default(),
        user: logged.user,
        database: logged.database,
        cancel,
        lost: None,
        reg,
        endpoint: endpoint.clone(),
        tenant: None,
    };
    if !c.welcome(pid, key).await {
        return;
    }
    endpoint.setup_succeeded.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(peer = %c.peer, user = %c.user.name, "PostgreSQL client logged in");
    c.run().await;
    if let Some(p) = c.session.pinned() {
        c.pool.shared.stats.pin_ended(p);
    }
}

/// Who logged in.
struct LoggedIn {
    user: Arc<crate::auth::User>,
    database: String,
    params: Vec<(String, String)>,
    /// Bytes the client sent after its last login message.
    pending: Vec<u8>,
}

/// What the login machine asks, owned (so the machine can be called again).
enum Asked {
    More,
    Tls,
    Cancel(i32, i32),
    Identify(String),
    CheckPassword(Vec<u8>),
    LoggedIn,
    Close,
}

impl From<Need<'_>> for Asked {
    fn from(n: Need<'_>) -> Self {
        match n {
            Need::More => Asked::More,
            Need::Tls => Asked::Tls,
            Need::Cancel { pid, key } => Asked::Cancel(pid, key),
            Need::Identify { user, .. } => Asked::Identify(user.to_string()),
            Need::CheckPassword(p) => Asked::CheckPassword(p.to_vec()),
            Need::LoggedIn => Asked::LoggedIn,
            Need::Close => Asked::Close,
        }
    }
}

/// A verifier for a user that does not exist: its salt is the same at every attempt
/// for the same name, as a real user's is, so the answer does not tell them apart.
fn unknown_user(name: &str) -> Verifier {
    use sha2::{Digest, Sha256};
    static SECRET: std::sync::OnceLock<[u8; 20]> = std::sync::OnceLock::new();
    let secret = SECRET.get_or_init(crate::mysql::auth::new_nonce);
    let salt = Sha256::new()
        .chain_update(secret)
        .chain_update(name.as_bytes())
        .finalize();
    let mut keys = [0u8; 32];
    keys[..18].copy_from_slice(&nonce());
    Verifier::unmatchable(salt.get(..16).unwrap_or_default(), keys)
}

/// The login, up to AuthenticationOk; `None` when the connection ends (refused, a
/// cancel request, gone, too slow).
async fn login<D: Driver>(
    shared: &Arc<ProxyShared>,
    stream: &mut D::Stream,
    peer: SocketAddr,
    tls: ClientTls,
) -> Option<LoggedIn> {
    let deadline = crate::rt::time::now() + shared.config().proxy.handshake_timeout;
    let mut login = Login::new(false);
    let mut buf = Buf::with_capacity(1024);
    let mut out = Vec::new();
    let mut user = None;
    loop {
        buf.reserve(1024);
        match crate::rt::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return None,
        }
        let bytes = buf.filled().to_vec();
        buf.consume(bytes.len());
        let mut asked = Asked::from(login.on_bytes(&bytes, &mut out));
        loop {
            asked = match asked {
                Asked::More => break,
                Asked::Tls => {
                    let server = shared.tls.as_ref().filter(|_| tls != ClientTls::Off);
                    login.answer_tls(server.is_some(), &mut out);
                    write_all(stream, &out).await.ok()?;
                    out.clear();
                    if let Some(server) = server {
                        let handshake = Box::pin(stream.accept_tls(server.config(), &[], deadline));
                        if let Err(e) = handshake.await {
                            tracing::debug!(%peer, "TLS handshake failed: {e}");
                            return None;
                        }
                    }
                    break;
                }
                Asked::Cancel(pid, key) => {
                    if let Some(server) = shared.pg_cancels.cancel(pid, key) {
                        send_cancel::<D>(&server).await;
                    }
                    return None;
                }
                Asked::Identify(name) => {
                    if tls == ClientTls::Required && !stream.is_tls() {
                        login.refuse(
                            sqlstate::INVALID_AUTHORIZATION,
                            "this endpoint requires TLS (sslmode=require)",
                            &mut out,
                        );
                        Asked::Close
                    } else {
                        let found = shared.users().get(name.as_bytes());
                        let credential = found
                            .as_ref()
                            .and_then(|u| u.pg_credential())
                            .unwrap_or_else(|| Credential::Scram(unknown_user(&name)));
                        user = found;
                        Asked::from(login.identified(credential, nonce(), &mut out))
                    }
                }
                Asked::CheckPassword(password) => {
                    let ok = match &user {
                        Some(u) => check_clear_text(shared, u, &password, peer).await,
                        None => false,
                    };
                    Asked::from(login.password_checked(ok, &mut out))
                }
                Asked::LoggedIn => {
                    write_all(stream, &out).await.ok()?;
                    shared.throttle.succeeded(peer.ip());
                    return Some(LoggedIn {
                        user: user?,
                        database: login.database().to_string(),
                        params: login.params().to_vec(),
                        pending: login.take_pending(),
                    });
                }
                Asked::Close => {
                    if user.is_some() || !out.is_empty() {
                        shared.throttle.failed(peer.ip(), crate::rt::time::now());
                    }
                    let _ = write_all(stream, &out).await;
                    return None;
                }
            };
        }
        if !out.is_empty() {
            write_all(stream, &out).await.ok()?;
            out.clear();
        }
    }
}

/// Whether a clear-text password (over TLS: the login machine asks for one only then) is
/// `user`'s, or a token proving an identity `user` accepts.
async fn check_clear_text(
    shared: &ProxyShared,
    user: &Arc<crate::auth::User>,
    password: &[u8],
    peer: SocketAddr,
) -> bool {
    if user.password_matches(password) {
        return true;
    }
    if !user.accepts_tokens() {
        return false;
    }
    let Some(verifier) = &shared.tokens else {
        tracing::info!(%peer, user = %user.name, "a token was sent, and no token login is configured");
        return false;
    };
    let Ok(token) = std::str::from_utf8(password) else {
        return false;
    };
    // Boxed: token logins are rare, and the login future stays small.
    match Box::pin(verifier.verify(user.clone(), token.to_string())).await {
        Ok(who) => {
            tracing::info!(%peer, user = %user.name, identity = %who, "token login");
            true
        }
        Err(why) => {
            tracing::info!(%peer, user = %user.name, "token login refused: {why}");
            false
        }
    }
}

/// Sends a CancelRequest to `server` and waits until the server has read it (it closes
/// the connection then), within [`CANCEL_LIMIT`].
async fn send_cancel<D: Driver>(server: &HeldServer) {
    let work = async {
        let mut s = D::connect(&server.addr).await?;
        write_all(&mut s, &pg_cancel::request(server)).await?;
        let mut b = Buf::with_capacity(64);
        while s.read(&mut b).await? > 0 {
            let n = b.len();
            b.consume(n);
        }
        Ok::<_, std::io::Error>(())
    };
    if let Ok(Err(e)) = crate::rt::time::timeout(CANCEL_LIMIT, work).await {
        tracing::debug!("cancel request to the server failed: {e}");
    }
}

/// Resolves when the session is killed (`KILL` in the console) or dbproxy drains or stops.
async fn told_to_stop(slot: &crate::clients::ClientSlot, shared: &ProxyShared) {
    while !slot.is_killed() && !shared.is_stopping() {
        slot.woken().await;
    }
}

/// Sleeps for `limit`, or for ever.
async fn sleep_for(limit: Option<std::time::Duration>) {
    match limit {
        Some(d) => crate::rt::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// What a client idle past a limit is told (PostgreSQL's words for its own
/// `idle_session_timeout` and `idle_in_transaction_session_timeout`).
/// Runs one of dbproxy's own queries on a server connection: a failure of the connection
/// and an error answer are told apart, each named by `what`.
async fn own_query<S: crate::io::Stream>(
    server: &mut PgServer<S>,
    sql: &str,
    deadline: Instant,
    what: &str,
) -> Result<Answer, OwnQueryError> {
    let a = server
        .query(sql, deadline)
        .await
        .map_err(|e| OwnQueryError::Connection(format!("{what} failed: {e}")))?;
    match a.error {
        Some(e) => Err(OwnQueryError::Refused(format!("{what} failed: {e}"))),
        None => Ok(a),
    }
}

fn idle_fatal(why: IdleLimit) -> Vec<u8> {
    let (code, what) = match why {
        IdleLimit::Client => ("57P05", "idle-session"),
        IdleLimit::Transaction => ("25P03", "idle-in-transaction"),
    };
    fatal(
        code,
        format!(
            "terminating connection due to {what} timeout (dbproxy {})",
            why.setting()
        ),
    )
}

/// An error for the client, then it is closed.
fn fatal(code: &'static str, message: impl Into<String>) -> Vec<u8> {
    let mut out = Vec::new();
    ErrorResponse::fatal(code, message).write(&mut out);
    out
}

/// What a failed borrow tells the client.
fn borrow_failure(e: &BorrowError) -> Vec<u8> {
    match e {
        BorrowError::Connect(PgServerError::Open(OpenError::Refused { code, message })) => {
            // The server's own refusal (no such database, ...), as the server put it.
            let mut out = Vec::new();
            crate::postgres::frame::write(&mut out, b'E', |o| {
                for (f, v) in [
                    (b'S', "FATAL"),
                    (b'V', "FATAL"),
                    (b'C', code.as_str()),
                    (b'M', message.as_str()),
                ] {
                    o.push(f);
                    crate::postgres::frame::put_cstr(o, v.as_bytes());
                }
                o.push(0);
            });
            out
        }
        BorrowError::Timeout => fatal(sqlstate::TOO_MANY_CONNECTIONS, e.to_string()),
        _ => fatal(sqlstate::CONNECTION_FAILURE, e.to_string()),
    }
}

/// The length of the whole messages at the front of `bytes` up to and including the first
/// Sync, if it has arrived.
fn through_sync(bytes: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Ok(Some((h, _))) = crate::postgres::frame::message(bytes.get(i..)?) {
        i += h.total();
        if h.tag == b'S' {
            return Some(i);
        }
    }
    None
}

/// The length of the whole messages at the front of `bytes`.
fn whole_messages(bytes: &[u8]) -> usize {
    let mut i = 0;
    while let Ok(Some((h, _))) = crate::postgres::frame::message(bytes.get(i..).unwrap_or_default())
    {
        i += h.total();
    }
    i
}

/// Whether `bytes` start with a Terminate message.
fn starts_with_terminate(bytes: &[u8]) -> bool {
    bytes.first() == Some(&b'X')
}

impl<D: Driver> PgClient<D> {
    fn deadline(&self) -> Instant {
        crate::rt::time::now() + self.pool.shared.settings().limits.own
    }

    /// Sends the client what a server says after AuthenticationOk: the parameters, the
    /// client's cancel key, ReadyForQuery. The parameters are what a new server connection
    /// of the client's database login reported, with the client's startup settings over
    /// them; only the first login of a database login borrows a connection to learn them
    /// (a login never waits for a connection other clients hold). False when the client
    /// is gone or refused.
    async fn welcome(&mut self, pid: i32, key: i32) -> bool {
        let known = self
            .pool
            .shared
            .pg_params
            .lock()
            .get(&self.user.backend.id)
            .cloned();
        let params = match known {
            Some(p) => self.session.settings.over_reported(p),
            None => match self.learn_params().await {
                Some(p) => p,
                None => return false,
            },
        };
        let mut out = Vec::new();
        for (name, value) in &params {
            parameter_status(&mut out, name, value);
        }
        backend_key_data(&mut out, pid, key);
        ready_for_query(&mut out, TxStatus::Idle);
        write_all(&mut self.stream, &out).await.is_ok()
    }

    /// The parameters a server connection reports once it carries the client's startup
    /// settings (the first login of a database login).
    async fn learn_params(&mut self) -> Option<Vec<(String, String)>> {
        let mut lease = match self.borrow().await {
            Ok(l) => l,
            Err(e) => {
                self.refuse(&e).await;
                return None;
            }
        };
        if let Err(why) = self
            .take_settings(&mut lease)
            .await
            .map_err(OwnQueryError::text)
        {
            let _ = write_all(&mut self.stream, &fatal(sqlstate::CONNECTION_FAILURE, why)).await;
            self.pool.discard(lease);
            return None;
        }
        let params = lease.server.reported.clone();
        self.pool.release(lease);
        Some(params)
    }

    /// Tells the client why no connection could serve it (it is closed then).
    /// A server connection for the client, once its user has a place under its
    /// `max_database_connections` (the place goes with the connection), served in its
    /// user's turn among the waiting.
    async fn borrow(&mut self) -> Result<Lease<D::Stream>, BorrowError> {
        let (sh, user) = (&self.shared, &self.user);
        let tenant = self
            .tenant
            .get_or_insert_with(|| sh.tenant_of(user))
            .clone();
        let place = match tenant.try_take() {
            Some(p) => p,
            None => {
                let begun = crate::rt::time::now();
                let _waiting = crate::stats::GaugeGuard::new(&tenant.waiting);
                let deadline = begun + self.pool.shared.settings().borrow_timeout;
                let Some(p) = tenant.take(deadline).await else {
                    tracing::info!(peer = %self.peer, user = %tenant.name, "the user holds its max_database_connections");
                    return Err(BorrowError::Timeout);
                };
                tenant.waited(crate::rt::time::now().saturating_duration_since(begun));
                p
            }
        };
        let mut lease = self
            .pool
            .borrow(&self.user.backend, &self.database, Class::of(&tenant))
            .await?;
        tenant.borrows.fetch_add(1, Ordering::Relaxed);
        let mut place = place;
        place.holds();
        lease.tenant = Some(place);
        Ok(lease)
    }

    async fn refuse(&mut self, e: &BorrowError) {
        tracing::info!(peer = %self.peer, user = %self.user.name, "cannot serve the client: {e}");
        let _ = write_all(&mut self.stream, &borrow_failure(e)).await;
    }

    /// Gives a borrowed connection the client's settings, and reads them back when the
    /// client may have changed them (its startup settings, before its first query).
    async fn take_settings(&mut self, lease: &mut Lease<D::Stream>) -> Result<(), OwnQueryError> {
        let deadline = self.deadline();
        // Startup settings another client started with are taken as the server spelled
        // them then; new ones are read back once and remembered.
        let login = lease.server.login.id;
        let startup = self.session.fresh_startup().cloned();
        if let Some(startup) = &startup {
            let known = self
                .pool
                .spellings
                .borrow()
                .get(login, &self.database, startup)
                .cloned();
            if let Some(spelled) = known {
                self.session.read_back(spelled);
            }
        }
        let server = &mut lease.server;
        if let Some(sql) = self.session.settings.replay_sql(&server.settings) {
            let what = "giving the server connection the client's settings";
            own_query(server, &sql, deadline, what).await?;
            server.settings = self.session.settings.clone();
        }
        if let AtRest::ReadBack(sql) = self.session.at_rest() {
            self.read_back(lease, &sql).await?;
            if let Some(startup) = startup.filter(|_| self.session.fresh_startup().is_none()) {
                self.pool.spellings.borrow_mut().remember(
                    login,
                    &self.database,
                    startup,
                    self.session.settings.clone(),
                );
            }
        }
        Ok(())
    }

    /// Reads the session's settings back from the server connection.
    async fn read_back(
        &mut self,
        lease: &mut Lease<D::Stream>,
        sql: &str,
    ) -> Result<(), OwnQueryError> {
        let deadline = self.deadline();
        let server = &mut lease.server;
        let what = "reading the session's settings back";
        let a = own_query(server, sql, deadline, what).await?;
        let rows = a.rows.iter().filter_map(|r| match r.as_slice() {
            [Some(n), v] => Some((n.as_str(), v.as_deref())),
            _ => None,
        });
        let settings = Settings::from_rows(rows, &server.user);
        server.settings = settings.clone();
        self.session.read_back(settings);
        Ok(())
    }

    /// Reads the SQL-level prepared statements back from the server connection, after
    /// the client defined or removed some there. One whose defining text cannot be found
    /// pins the client to the connection.
    async fn read_back_statements(
        &mut self,
        lease: &mut Lease<D::Stream>,
    ) -> Result<(), OwnQueryError> {
        let deadline = self.deadline();
        let server = &mut lease.server;
        let what = "reading the session's prepared statements back";
        let a = own_query(server, READ_BACK_SQL, deadline, what).await?;
        let rows = a.rows.iter().filter_map(|r| match r.as_slice() {
            [Some(n), Some(s)] => Some((n.as_bytes(), s.as_bytes())),
            _ => None,
        });
        if let Err(e) = self.stmts.sql.read_back(&mut server.statements.sql, rows) {
            tracing::info!(peer = %self.peer, "{e}: the client is pinned to its server connection");
            if let Some(p) = self.session.pin_for(PinReason::TextPrepare) {
                self.pool.shared.stats.pin_started(p);
            }
        }
        Ok(())
    }

    /// How long the client may stay idle now, and under which setting
    /// (`in_transaction`: it holds a connection in a transaction or pinned session).
    fn idle_limit(&self, in_transaction: bool) -> (Option<std::time::Duration>, IdleLimit) {
        let p = &self.shared.config().proxy;
        idle_wait(
            p.idle_client_timeout,
            p.idle_transaction_timeout,
            in_transaction,
        )
    }

    /// The session: an exchange on a borrowed connection per transaction, until the
    /// client leaves.
    async fn run(&mut self) {
        loop {
            if self.buf.is_empty() {
                self.buf.shrink(CLIENT_BUF);
                self.sbuf.shrink(CLIENT_BUF);
                self.buf.reserve(4096);
                let (limit, _) = self.idle_limit(false);
                let slot = self.reg.slot.clone();
                let shared = self.shared.clone();
                let read = tokio::select! {
                    r = self.stream.read(&mut self.buf) => r,
                    _ = told_to_stop(&slot, &shared) => {
                        let bye = fatal(sqlstate::ADMIN_SHUTDOWN, "terminating connection due to administrator command");
                        let _ = write_all(&mut self.stream, &bye).await;
                        return;
                    }
                    _ = sleep_for(limit) => {
                        tracing::info!(peer = %self.peer, user = %self.user.name, "idle_client_timeout: closing an idle client");
                        let _ = write_all(&mut self.stream, &idle_fatal(IdleLimit::Client)).await;
                        return;
                    }
                };
                match read {
                    Ok(n) if n > 0 => {}
                    _ => return,
                }
            }
            if starts_with_terminate(self.buf.filled()) {
                return;
            }
            self.out.clear();
            if let Some(lost) = &mut self.lost {
                let a = lost.answer(&mut self.stmts, self.buf.filled(), &mut self.out);
                self.buf.consume(a.consumed);
                if a.over {
                    self.lost = None;
                }
                let answer = std::mem::take(&mut self.out);
                let written = write_all(&mut self.stream, &answer).await;
                self.out = answer;
                if written.is_err() {
                    return;
                }
                if self.lost.is_some() && !self.buf.is_empty() {
                    // A message not whole yet: its rest.
                    self.buf.reserve(4096);
                    match self.stream.read(&mut self.buf).await {
                        Ok(n) if n > 0 => {}
                        _ => return,
                    }
                }
                continue;
            }
            if let Some(n) = answer_parses(&mut self.stmts, self.buf.filled(), &mut self.out) {
                self.buf.consume(n);
                let answer = std::mem::take(&mut self.out);
                let written = write_all(&mut self.stream, &answer).await;
                self.out = answer;
                if written.is_err() {
                    return;
                }
                continue;
            }
            let mut lease = match self.borrow().await {
                Ok(l) => l,
                Err(e) => {
                    self.refuse(&e).await;
                    return;
                }
            };
            self.cancel.hold(HeldServer {
                addr: lease.server.addr.clone(),
                pid: lease.server.pid,
                key: lease.server.key,
            });
            self.reg
                .slot
                .serve(lease.server.pid.unsigned_abs(), lease.target);
            let end = self.linked(&mut lease).await;
            self.reg.slot.unserve();
            let clean = self.cancel.let_go();
            match end {
                Unlinked::Settled if clean => self.pool.release(lease),
                Unlinked::Settled => self.pool.discard(lease),
                Unlinked::ClientGone { busy } => {
                    if busy {
                        // Its query would run on for nobody.
                        let server = HeldServer {
                            addr: lease.server.addr.clone(),
                            pid: lease.server.pid,
                            key: lease.server.key,
                        };
                        crate::rt::spawn(async move { send_cancel::<D>(&server).await });
                    }
                    self.pool.discard(lease);
                    return;
                }
                Unlinked::Unused(why) => {
                    // Nothing of the client's reached it: the next borrow serves it.
                    tracing::info!(peer = %self.peer, "a server connection failed before use: {why}");
                    self.pool.discard(lease);
                }
                Unlinked::ServerLost(why)
                    if self.tracker.copy() == CopyState::None
                        && self.session.pinned().is_none() =>
                {
                    // The client is kept: its requests in flight fail, and it goes on with
                    // the next connection; a transaction it had open is lost, and it is
                    // answered here as in a failed transaction until it ends it.
                    let in_transaction = self.tracker.status() != TxStatus::Idle;
                    tracing::info!(peer = %self.peer, in_transaction, "the client's server connection was lost: {why}");
                    self.pool.discard(lease);
                    if !self.fail_in_flight(&why, in_transaction).await {
                        return;
                    }
                }
                Unlinked::ServerLost(why) | Unlinked::Refused(why) => {
                    tracing::info!(peer = %self.peer, "session ends: {why}");
                    let _ = write_all(&mut self.stream, &fatal(sqlstate::CONNECTION_FAILURE, why))
                        .await;
                    self.pool.discard(lease);
                    return;
                }
                Unlinked::ReadTimeout => {
                    tracing::info!(peer = %self.peer, user = %self.user.name, "net_read_timeout: closing a client that went silent in the middle of a message");
                    let bye = fatal(
                        sqlstate::PROTOCOL_VIOLATION,
                        "terminating connection: the client sent part of a message and then nothing (dbproxy net_read_timeout)",
                    );
                    let _ = write_all(&mut self.stream, &bye).await;
                    self.pool.discard(lease);
                    return;
                }
                Unlinked::Idle(why) => {
                    tracing::info!(peer = %self.peer, user = %self.user.name, "{}: closing a client idle in its transaction or pinned session", why.setting());
                    let _ = write_all(&mut self.stream, &idle_fatal(why)).await;
                    self.pool.discard(lease);
                    return;
                }
                Unlinked::Protocol(why) => {
                    tracing::info!(peer = %self.peer, "protocol violation: {why}");
                    let _ = write_all(&mut self.stream, &fatal(sqlstate::PROTOCOL_VIOLATION, why))
                        .await;
                    self.pool.discard(lease);
                    return;
                }
            }
        }
    }

    /// One exchange on a borrowed connection: the client's settings first, then bytes
    /// both ways until it is settled (and the client not pinned).
    async fn linked(&mut self, lease: &mut Lease<D::Stream>) -> Unlinked {
        match self.take_settings(lease).await {
            Ok(()) => {}
            Err(OwnQueryError::Connection(why)) => return Unlinked::Unused(why),
            Err(OwnQueryError::Refused(why)) => return Unlinked::Refused(why),
        }
        let mut tracker = std::mem::take(&mut self.tracker);
        let mut exchange = std::mem::take(&mut self.exchange);
        tracker.reset();
        exchange.reset();
        let end = self.exchange_on(lease, &mut tracker, &mut exchange).await;
        self.tracker = tracker;
        self.exchange = exchange;
        end
    }

    /// The bytes both ways until the exchange settles (and the client is not pinned).
    /// While the server owes answers and no COPY waits for the client's data, the
    /// server's socket is read directly (the client checked for a hang-up meanwhile);
    /// otherwise (a Flush, a pinned client, COPY FROM STDIN) both sockets are watched.
    async fn exchange_on(
        &mut self,
        lease: &mut Lease<D::Stream>,
        tracker: &mut Tracker,
        exchange: &mut Exchange,
    ) -> Unlinked {
        if let Some(end) = self.forward_client(tracker, exchange, lease).await {
            return end;
        }
        loop {
            if tracker.releasable() && self.buf.is_empty() {
                match self.session.at_rest() {
                    AtRest::Keep(_) => {}
                    rest => {
                        if let AtRest::ReadBack(sql) = rest {
                            if let Err(why) = self.read_back(lease, &sql).await {
                                return Unlinked::ServerLost(why.text());
                            }
                        }
                        if self.stmts.sql.needs_read_back() {
                            if let Err(why) = self.read_back_statements(lease).await {
                                return Unlinked::ServerLost(why.text());
                            }
                        }
                        if self.session.pinned().is_none() {
                            return self.tidy(lease).await;
                        }
                    }
                }
            }
            if tracker.expected() > 0 && tracker.copy() != CopyState::In {
                if let Some(end) = self.forward_server(tracker, exchange, lease, true).await {
                    return end;
                }
                continue;
            }
            // Waiting for the rest of a message the client began (`net_read_timeout`), or
            // for the client with nothing owed: idle (in its transaction, or pinned).
            let partial = !self.buf.is_empty() || !tracker.client_at_boundary();
            let (limit, why) = if partial {
                let t = self.shared.config().proxy.net_read_timeout;
                (Some(t).filter(|t| !t.is_zero()), None)
            } else if tracker.expected() == 0 {
                let (limit, why) = self.idle_limit(tracker.status() != TxStatus::Idle);
                (limit, Some(why))
            } else {
                (None, None)
            };
            let server_ready = tokio::select! {
                biased;
                r = lease.server.stream.readable() => r.map(|()| true),
                r = self.stream.readable() => r.map(|()| false),
                _ = sleep_for(limit) => return why.map_or(Unlinked::ReadTimeout, Unlinked::Idle),
            };
            match server_ready {
                Ok(true) => {
                    if let Some(end) = self.forward_server(tracker, exchange, lease, false).await {
                        return end;
                    }
                }
                Ok(false) => {
                    self.buf.reserve(4096);
                    match self.stream.read(&mut self.buf).await {
                        Ok(n) if n > 0 => {}
                        _ => {
                            return Unlinked::ClientGone {
                                busy: !tracker.releasable(),
                            }
                        }
                    }
                    if let Some(end) = self.forward_client(tracker, exchange, lease).await {
                        return end;
                    }
                }
                Err(e) => return Unlinked::ServerLost(e.to_string()),
            }
        }
    }

    /// The server connection failed under requests of a client outside a transaction:
    /// each request still owed an answer gets an error and ReadyForQuery, and messages
    /// sent since the last Sync are skipped up to the client's next Sync (as a server
    /// skips after an error). False when the client is gone.
    async fn fail_in_flight(&mut self, why: &str, in_transaction: bool) -> bool {
        let message = if in_transaction {
            format!("the server connection was lost: the open transaction is rolled back (a COMMIT in flight: its outcome is unknown) ({why})")
        } else {
            format!(
                "the server connection was lost while the statement ran; its outcome is unknown ({why})"
            )
        };
        let status = if in_transaction {
            TxStatus::Failed
        } else {
            TxStatus::Idle
        };
        let mut out = Vec::new();
        let error = |out: &mut Vec<u8>| {
            ErrorResponse {
                severity: "ERROR",
                code: sqlstate::CONNECTION_FAILURE,
                message: message.as_str().into(),
            }
            .write(out)
        };
        let due = self.tracker.expected();
        for _ in 0..due {
            error(&mut out);
            ready_for_query(&mut out, status);
        }
        let mut skipping = self.tracker.unsynced();
        if skipping {
            error(&mut out);
        }
        if in_transaction {
            // Nothing was due: the client learns of the loss at its next statement.
            let told = due > 0 || skipping;
            self.lost = Some(LostTransaction::new((!told).then_some(message.clone())));
        }
        if write_all(&mut self.stream, &out).await.is_err() {
            return false;
        }
        while skipping {
            if let Some(n) = through_sync(self.buf.filled()) {
                self.buf.consume(n);
                let mut z = Vec::new();
                ready_for_query(&mut z, status);
                return write_all(&mut self.stream, &z).await.is_ok();
            }
            // Whole messages before the Sync go; a partial one waits for the rest.
            let whole = whole_messages(self.buf.filled());
            self.buf.consume(whole);
            self.buf.reserve(4096);
            match self.stream.read(&mut self.buf).await {
                Ok(n) if n > 0 => {}
                _ => return false,
            }
            skipping = true;
        }
        true
    }

    /// Before a settled connection goes back: a connection that holds too many of the
    /// clients' statements closes the least recently used of them (down to three quarters
    /// of the limit), or all of them when the clients' SQL-level ones are too many alone.
    async fn tidy(&mut self, lease: &mut Lease<D::Stream>) -> Unlinked {
        let statements = &lease.server.statements;
        if statements.total() <= MAX_SERVER_STATEMENTS {
            return Unlinked::Settled;
        }
        let keep = (MAX_SERVER_STATEMENTS * 3 / 4).saturating_sub(statements.sql.len());
        let evict = statements.least_used(keep);
        let sql = if evict.is_empty() {
            "DEALLOCATE ALL".to_string()
        } else {
            // dbproxy's names (`__dbp<pid>_<n>`) need no quoting beyond the quotes.
            evict
                .iter()
                .map(|n| format!("DEALLOCATE \"{}\";", String::from_utf8_lossy(n)))
                .collect()
        };
        let deadline = self.deadline();
        let what = "closing the server's prepared statements";
        match own_query(&mut lease.server, &sql, deadline, what).await {
            Ok(_) => {
                if evict.is_empty() {
                    lease.server.statements.clear();
                } else {
                    lease.server.statements.forget(&evict);
                }
                Unlinked::Settled
            }
            Err(e) => Unlinked::ServerLost(e.text()),
        }
    }

    /// Sends the client's buffered bytes to the server (statements renamed, missing ones
    /// prepared first), read on their way.
    async fn forward_client(
        &mut self,
        tracker: &mut Tracker,
        exchange: &mut Exchange,
        lease: &mut Lease<D::Stream>,
    ) -> Option<Unlinked> {
        if self.buf.is_empty() {
            return None;
        }
        if tracker.client_at_boundary() && starts_with_terminate(self.buf.filled()) {
            return Some(Unlinked::ClientGone {
                busy: !tracker.releasable(),
            });
        }
        let session = &mut self.session;
        let stats = &self.pool.shared.stats;
        let generation = (
            self.stmts.generation(),
            lease.server.statements.generation(),
        );
        let forward = match exchange.from_client(
            &mut self.stmts,
            &mut lease.server.statements,
            self.buf.filled(),
            &mut self.out,
            |seen| {
                if let Some(p) = session.apply(seen) {
                    stats.pin_started(p);
                }
            },
        ) {
            Ok(f) => f,
            Err(e) => return Some(Unlinked::Protocol(e.to_string())),
        };
        let (bytes, consumed) = match forward {
            Forward::AsIs(n) => (self.buf.filled().get(..n).unwrap_or_default(), n),
            Forward::Rewritten(n) => (self.out.as_slice(), n),
        };
        let session = &mut self.session;
        let due = tracker.expected();
        let fed = tracker.from_client_seeing(bytes, |tag, body| {
            if let Some(p) = session.client_sent(tag, body) {
                tracing::debug!(reason = p.name(), "client pinned");
                stats.pin_started(p);
            }
        });
        if let Err(e) = fed {
            return Some(Unlinked::Protocol(e.to_string()));
        }
        // Requests (a Query, a Sync, a FunctionCall): the endpoint's and the client's.
        let requests = u64::from(tracker.expected().saturating_sub(due));
        if requests > 0 {
            self.endpoint.queries.add(requests);
            self.reg
                .slot
                .queries
                .fetch_add(requests, std::sync::atomic::Ordering::Relaxed);
        }
        // `DEALLOCATE ALL` / `DISCARD ALL` remove what was prepared before them, once
        // the server answers them without an error (`DEALLOCATE name` cannot name a
        // statement of dbproxy's naming: the server's set stays as it is).
        if self.session.take_deallocated() == Some(true) {
            exchange.deallocates(generation);
        }
        let sent = match forward {
            Forward::AsIs(n) => lease.server.stream.write(&mut self.buf, n).await,
            Forward::Rewritten(_) => {
                self.buf.consume(consumed);
                let mut b = Buf::from_vec(std::mem::take(&mut self.out));
                let n = b.len();
                let r = lease.server.stream.write(&mut b, n).await;
                self.out = b.into_vec();
                self.out.clear();
                r
            }
        };
        if let Err(e) = sent {
            return Some(Unlinked::ServerLost(e.to_string()));
        }
        if tracker.terminated() {
            // A Terminate behind other messages went to the server, which closes.
            return Some(Unlinked::ClientGone { busy: false });
        }
        None
    }

    /// Reads what the server sent and passes it to the client.
    /// `watching`: the read waits with the client checked for a hang-up every
    /// [`crate::io::PEER_CHECK`] (its query is cancelled then).
    async fn forward_server(
        &mut self,
        tracker: &mut Tracker,
        exchange: &mut Exchange,
        lease: &mut Lease<D::Stream>,
        watching: bool,
    ) -> Option<Unlinked> {
        self.sbuf.reserve(8192);
        let read = if watching {
            let client = self.stream.raw_fd();
            match read_watching_peer(lease.server.stream.read(&mut self.sbuf), client, || None)
                .await
            {
                Ok(r) => r,
                Err(_) => return Some(Unlinked::ClientGone { busy: true }),
            }
        } else {
            lease.server.stream.read(&mut self.sbuf).await
        };
        match read {
            Ok(n) if n > 0 => {}
            Ok(_) => {
                return Some(Unlinked::ServerLost(
                    "the server closed the connection".into(),
                ))
            }
            Err(e) => return Some(Unlinked::ServerLost(e.to_string())),
        }
        let server = &mut lease.server;
        let fed = tracker.from_server(self.sbuf.filled(), |ev| {
            if let ServerEvent::Parameter { name, value } = ev {
                server.reported(name, value);
            }
        });
        if let Err(e) = fed {
            return Some(Unlinked::ServerLost(format!(
                "protocol error from the server: {e}"
            )));
        }
        // Answers to Parses dbproxy sent are dropped; a FATAL error is held back.
        let out = &mut self.out;
        out.clear();
        let mut kept_from = 0;
        let mut dropped = false;
        let input = self.sbuf.filled();
        let walked = exchange.from_server(&mut self.stmts, &mut server.statements, input, |e| {
            dropped = true;
            match e {
                Edit::Drop(a, b) => {
                    out.extend_from_slice(input.get(kept_from..a).unwrap_or_default());
                    kept_from = b;
                }
                Edit::Insert(at, bytes) => {
                    out.extend_from_slice(input.get(kept_from..at).unwrap_or_default());
                    kept_from = at;
                    out.extend_from_slice(bytes);
                }
            }
        });
        if let Err(e) = walked {
            return Some(Unlinked::ServerLost(format!(
                "protocol error from the server: {e}"
            )));
        }
        // A client that stops reading is closed after `net_write_timeout` (its query
        // cancelled), as for MySQL: the server connection is not held for it for ever.
        let limit = self.shared.config().proxy.net_write_timeout;
        let written = if dropped {
            out.extend_from_slice(input.get(kept_from..).unwrap_or_default());
            let n = self.sbuf.len();
            self.sbuf.consume(n);
            let mut b = Buf::from_vec(std::mem::take(&mut self.out));
            let n = b.len();
            let r = crate::rt::time::timeout(limit, self.stream.write(&mut b, n)).await;
            self.out = b.into_vec();
            self.out.clear();
            r
        } else {
            let n = self.sbuf.len();
            crate::rt::time::timeout(limit, self.stream.write(&mut self.sbuf, n)).await
        };
        match written {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => {
                return Some(Unlinked::ClientGone {
                    busy: !tracker.releasable(),
                })
            }
            Err(_) => {
                tracing::info!(peer = %self.peer, user = %self.user.name, "net_write_timeout: closing a client that stopped reading its results");
                return Some(Unlinked::ClientGone {
                    busy: !tracker.releasable(),
                });
            }
        }
        // The server ends the connection after a FATAL error: its client may go on.
        exchange.take_fatal().map(Unlinked::ServerLost)
    }
}
