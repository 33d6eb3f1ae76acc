//! One backend connection, dbproxy being the database's client: opening and logging in,
//! simple commands, replaying a client's session, preparing statements in their context,
//! the reset that makes it fit for any client, and (for tests) checking that dbproxy's
//! record of its session is the truth. The pool and the health-check monitor both use it.

use crate::backend_script::{
    self as script, Collect, Collected, Conn as ScriptConn, Progress, Runner, Script, ScriptError,
    Snapshot, SESSION_VARIABLES_SQL,
};
use crate::io::{read_packet_by, write_packet, Buf, Stream};
use crate::mysql::backend::{
    Credentials, GreetError, LoginError, OpenError, OpenStep, Opened, Opening, TlsWant,
};
use crate::mysql::command::ResponseKind;
use crate::mysql::consts::com;
use crate::mysql::consts::errcode;
use crate::mysql::resultset::{Packets, TextResult};
use crate::mysql::wire::ErrPacket;
use crate::mysql::{ProtocolError, MAX_PAYLOAD};
use crate::secrets::BackendLogin;
use crate::session::state::{BackendSession, Replay};
use crate::session::stmts::{BackendStmts, StmtKey};
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use std::time::Instant as Deadline;

/// Why a backend connection failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Login(#[from] LoginError),
    #[error("protocol error from backend: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("backend answered: {0}")]
    Server(ErrPacket),
    /// TLS could not be set up as `backend_tls` demands (no TLS offered, certificate not
    /// trusted or not for this host): waiting will not help.
    #[error("TLS: {0}")]
    Tls(String),
}

/// TLS towards one target: the group's settings and the target's name as configured
/// (`host:port`; the host is what `verify_full` checks and sends as SNI).
#[derive(Clone, Copy)]
pub struct TlsTo<'a> {
    pub tls: &'a crate::tls::BackendTls,
    pub target: &'a str,
}

impl<'a> TlsTo<'a> {
    /// TLS settings for a connection to `addr` (a Unix socket is local: no TLS).
    pub fn for_addr(
        tls: &'a crate::tls::BackendTls,
        target: &'a str,
        addr: &crate::target::BackendAddr,
    ) -> Option<TlsTo<'a>> {
        match addr {
            crate::target::BackendAddr::Tcp(_) if tls.config().is_some() => {
                Some(TlsTo { tls, target })
            }
            _ => None,
        }
    }
}

/// What a backend announced in its greeting; clients are offered the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerProfile {
    pub version: String,
    pub capabilities: u32,
    /// MariaDB's extended capabilities (none from a MySQL server).
    pub ext_capabilities: u32,
    pub collation: u8,
}

impl Default for ServerProfile {
    fn default() -> Self {
        ServerProfile {
            version: "5.5.5-10.11.0-MariaDB-dbproxy".into(),
            capabilities: crate::mysql::consts::cap::PROXY_OFFERS,
            ext_capabilities: 0,
            collation: 45,
        }
    }
}

/// An authenticated backend connection.
pub struct BackendConn<S> {
    pub stream: S,
    pub buf: Buf,
    /// Capabilities negotiated with the backend.
    pub caps: u32,
    /// MariaDB's extended capabilities negotiated with the backend.
    pub ext_caps: u32,
    /// Collation sent at login; resets return to it.
    pub collation: u8,
    /// The backend's connection (thread) id.
    pub thread_id: u32,
    /// What the session holds, as dbproxy knows it.
    pub session: BackendSession,
    /// Binary-protocol statements prepared on this connection.
    pub stmts: BackendStmts,
    /// The login it was opened for (resets log in again with its current credentials).
    pub login: Arc<BackendLogin>,
    nonce: Vec<u8>,
    pub created: Instant,
    /// Every session variable right after the connection was set up (only kept when the
    /// check-in verification is on).
    pub snapshot: Option<Snapshot>,
    /// The record's fingerprint at the last full comparison of the session variables that
    /// passed, and the check-ins verified since (check-in verification).
    verified: Option<(u64, u32)>,
    /// How long reads on this connection may wait (set from the group at each lending).
    pub limits: ReadLimits,
    /// Counts this connection among the TLS ones while it lives.
    _tls_count: Option<crate::tls::TlsConnCount>,
}

/// How long dbproxy waits for a database's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLimits {
    /// dbproxy's own statements: resets, replays, read-backs, re-prepares, re-logins
    /// (`internal_query_timeout`).
    pub own: std::time::Duration,
    /// A client's statement, for each packet of its answer (`query_timeout`; None: no
    /// limit).
    pub statement: Option<std::time::Duration>,
}

impl Default for ReadLimits {
    fn default() -> Self {
        ReadLimits {
            own: std::time::Duration::from_secs(10),
            statement: None,
        }
    }
}

impl ReadLimits {
    /// The limits a target group's configuration sets.
    pub fn of(cfg: &crate::config::TargetGroupConfig) -> Self {
        ReadLimits {
            own: cfg.internal_query_timeout,
            statement: Some(cfg.query_timeout).filter(|t| !t.is_zero()),
        }
    }

    /// When an answer to one of dbproxy's own statements sent now is overdue.
    pub fn own_deadline(&self) -> Deadline {
        Deadline::now() + self.own
    }
}

/// The error of a read that waited past its limit.
pub fn overdue(what: &str, limit: std::time::Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("the database did not answer within {what} ({limit:?})"),
    )
}

/// Receive buffer kept by an idle backend connection.
pub const BACKEND_BUF: usize = 16 * 1024;

/// The check-in verification compares every session variable at least this often.
pub const FULL_CHECK_EVERY: u32 = 16;

/// Prepared statements kept per backend connection.
pub const STMT_CACHE: usize = 256;

impl<S> BackendConn<S> {
    /// The same connection over another stream type (moving it between workers).
    pub fn map_stream<T>(self, f: impl FnOnce(S) -> io::Result<T>) -> io::Result<BackendConn<T>> {
        Ok(BackendConn {
            stream: f(self.stream)?,
            buf: self.buf,
            caps: self.caps,
            ext_caps: self.ext_caps,
            collation: self.collation,
            thread_id: self.thread_id,
            session: self.session,
            stmts: self.stmts,
            login: self.login,
            nonce: self.nonce,
            created: self.created,
            snapshot: self.snapshot,
            verified: self.verified,
            limits: self.limits,
            _tls_count: self._tls_count,
        })
    }
}

/// Connects (with `connect`) and logs in as `login`. When the database refuses the
/// credentials (1045) and they come from a secret, the secret is read again and each other
/// version of it tried on a new connection; the one that works is kept for the next ones.
#[allow(clippy::too_many_arguments)]
pub async fn connect_login<S, F, Fut>(
    connect: F,
    login: &Arc<BackendLogin>,
    wanted_caps: u32,
    wanted_ext: u32,
    collation: u8,
    deadline: Deadline,
    tls: Option<TlsTo<'_>>,
) -> Result<(BackendConn<S>, ServerProfile), BackendError>
where
    S: Stream,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = io::Result<S>>,
{
    let connect = &connect;
    login
        .log_in(
            move |creds| async move {
                let stream = connect().await?;
                BackendConn::login(
                    stream,
                    login.clone(),
                    &creds,
                    wanted_caps,
                    wanted_ext,
                    collation,
                    deadline,
                    tls,
                )
                .await
            },
            BackendError::access_denied,
        )
        .await
}

/// Runs the TLS handshake towards a backend as `t` asks, counting it.
pub(crate) async fn secure<S: Stream>(
    stream: &mut S,
    t: TlsTo<'_>,
    deadline: Deadline,
) -> Result<(), BackendError> {
    let config = t
        .tls
        .config()
        .ok_or_else(|| BackendError::Tls("no TLS configuration".into()))?;
    // Boxed, like the client side's: the handshake's state is not carried by every future
    // that may open a connection.
    let handshake =
        Box::pin(stream.connect_tls(config, crate::tls::server_name(t.target), deadline));
    let stats = &t.tls.stats;
    let failed = || {
        stats
            .backend_handshake_failures
            .fetch_add(1, Ordering::Relaxed)
    };
    match handshake.await {
        Ok(_) => {
            stats.backend_handshakes.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        Err(e) if e.is_certificate() => {
            failed();
            Err(BackendError::Tls(format!(
                "{e} (backend_tls = \"{}\"; check backend_tls_ca and the server's certificate)",
                t.tls.mode.name()
            )))
        }
        Err(crate::io::tls_stream::HandshakeError::Io(e)) => {
            failed();
            Err(BackendError::Io(e))
        }
        Err(e) => {
            failed();
            Err(BackendError::Tls(e.to_string()))
        }
    }
}

impl From<OpenError> for BackendError {
    fn from(e: OpenError) -> Self {
        match e {
            OpenError::Greet(GreetError::Server(e)) => BackendError::Server(e),
            OpenError::Greet(e @ GreetError::NoTls(_)) => BackendError::Tls(e.to_string()),
            OpenError::Greet(GreetError::Protocol(e)) => BackendError::Protocol(e),
            OpenError::Login(e) => BackendError::Login(e),
        }
    }
}

impl From<ScriptError> for BackendError {
    fn from(e: ScriptError) -> Self {
        match e {
            ScriptError::Protocol(e) => BackendError::Protocol(e),
            ScriptError::Login(e) => BackendError::Login(e),
            ScriptError::Server(e) => BackendError::Server(e),
            ScriptError::Unasked => {
                BackendError::Protocol(ProtocolError::Malformed("a packet nobody asked for"))
            }
        }
    }
}

impl BackendError {
    /// The server refused the credentials (1045).
    pub fn access_denied(&self) -> bool {
        match self {
            BackendError::Server(e) | BackendError::Login(LoginError::Refused(e)) => {
                e.code == errcode::ER_ACCESS_DENIED_ERROR
            }
            _ => false,
        }
    }
}

impl<S: Stream> BackendConn<S> {
    /// Logs in as `creds` (a version of `login`) on a freshly connected stream, first
    /// switching to TLS when `tls` says so (see [`Opening`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn login(
        mut stream: S,
        backend_login: Arc<BackendLogin>,
        creds: &Credentials,
        wanted_caps: u32,
        wanted_ext: u32,
        collation: u8,
        deadline: Deadline,
        tls: Option<TlsTo<'_>>,
    ) -> Result<(Self, ServerProfile), BackendError> {
        let want = match tls {
            None => TlsWant::Off,
            Some(t) if t.tls.required() => TlsWant::Required(t.tls.mode.name()),
            Some(_) => TlsWant::Preferred,
        };
        let mut opening = Opening::new(creds, wanted_caps, wanted_ext, collation, want);
        let mut buf = Buf::with_capacity(BACKEND_BUF);
        let opened = loop {
            while let Some((seq, payload)) = opening.poll_send() {
                write_packet(&mut stream, seq, &payload).await?;
            }
            let h = read_packet_by(&mut stream, &mut buf, MAX_PAYLOAD, Some(deadline)).await?;
            let step = opening.on_packet(h.seq, &buf.filled()[4..h.total()]);
            buf.consume(h.total());
            match step? {
                OpenStep::Wait => {}
                OpenStep::StartTls => {
                    while let Some((seq, payload)) = opening.poll_send() {
                        write_packet(&mut stream, seq, &payload).await?;
                    }
                    let t = tls.ok_or_else(|| BackendError::Tls("no TLS configuration".into()))?;
                    secure(&mut stream, t, deadline).await?;
                    opening.secured();
                }
                OpenStep::Open(opened) => break opened,
            }
        };
        let Opened {
            handshake: hs,
            caps,
            ext_caps,
        } = opened;
        let profile = ServerProfile {
            version: hs.version,
            capabilities: hs.capabilities,
            ext_capabilities: hs.ext_capabilities,
            collation: hs.collation,
        };
        let tls_count = stream
            .is_tls()
            .then(|| tls.map(|t| crate::tls::TlsConnCount::new(t.tls.stats.clone())));
        let conn = BackendConn {
            _tls_count: tls_count.flatten(),
            stream,
            buf,
            caps,
            ext_caps,
            collation,
            thread_id: hs.connection_id,
            session: BackendSession::default(),
            stmts: BackendStmts::new(STMT_CACHE),
            login: backend_login,
            nonce: hs.nonce,
            created: Instant::now(),
            snapshot: None,
            verified: None,
            limits: ReadLimits::default(),
        };
        Ok((conn, profile))
    }

    /// Reads a whole response to a command of `kind` into memory (small responses only:
    /// dbproxy's own queries and the answers it rewrites), applying its session tracking
    /// to this connection's record. `Ok(Err(e))` is the server's ERR.
    pub async fn read_response(
        &mut self,
        kind: ResponseKind,
    ) -> Result<Result<Packets, ErrPacket>, BackendError> {
        self.read_response_until(kind, std::future::pending()).await
    }

    /// [`Self::read_response`] that gives up (an `Interrupted` I/O error) when `stop`
    /// resolves, e.g. when the target is found down. Either gives up (`TimedOut`) once
    /// `internal_query_timeout` passed: these are dbproxy's own statements.
    pub async fn read_response_until(
        &mut self,
        kind: ResponseKind,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<Result<Packets, ErrPacket>, BackendError> {
        let limit = self.limits.own;
        match self
            .read_response_by(kind, Some(Deadline::now() + limit), stop)
            .await
        {
            Err(BackendError::Io(e)) if e.kind() == io::ErrorKind::TimedOut => {
                Err(overdue("internal_query_timeout", limit).into())
            }
            other => other,
        }
    }

    /// [`Self::read_response_until`] with a deadline of the caller's (None: none).
    pub async fn read_response_by(
        &mut self,
        kind: ResponseKind,
        deadline: Option<Deadline>,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<Result<Packets, ErrPacket>, BackendError> {
        self.collect(Collect::new(kind, self.caps), deadline, stop)
            .await
    }

    /// Reads the answer to a command of `kind` already sent to its end and drops it (a
    /// read whose causal wait timed out): its rows are not kept. Gives up as
    /// [`Self::read_response_until`] does, when `stop` resolves.
    pub async fn skip_response_until(
        &mut self,
        kind: ResponseKind,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<Result<(), ErrPacket>, BackendError> {
        Ok(self
            .collect(Collect::dropping(kind, self.caps), None, stop)
            .await?
            .map(drop))
    }

    /// Feeds the answer's packets to `collect` until it is complete.
    async fn collect(
        &mut self,
        mut collect: Collect,
        deadline: Option<Deadline>,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<Result<Packets, ErrPacket>, BackendError> {
        tokio::pin!(stop);
        let reply = loop {
            let h = crate::io::read_packet_until(
                &mut self.stream,
                &mut self.buf,
                MAX_PAYLOAD,
                deadline,
                stop.as_mut(),
            )
            .await?;
            let fed = collect.feed(&mut self.session, h, &self.buf.filled()[4..h.total()]);
            self.buf.consume(h.total());
            match fed? {
                Collected::More => {}
                Collected::Infile => {
                    write_packet(&mut self.stream, h.seq.wrapping_add(1), &[]).await?;
                }
                Collected::Done(reply) => break reply,
            }
        };
        self.buf.shrink(BACKEND_BUF);
        Ok(reply)
    }

    /// Runs one of dbproxy's own conversations with the server (see [`backend_script`]).
    /// Each answer may take `internal_query_timeout`.
    pub async fn run<T>(&mut self, script: impl Script<Output = T>) -> Result<T, BackendError> {
        let limit = self.limits.own;
        let mut c = ScriptConn {
            caps: self.caps,
            collation: self.collation,
            nonce: &self.nonce,
            session: &mut self.session,
            stmts: &mut self.stmts,
            snapshot: &mut self.snapshot,
        };
        let (mut runner, mut progress) = Runner::start(script, &mut c)?;
        let mut deadline = Deadline::now() + limit;
        loop {
            let mut sent = false;
            while let Some((seq, payload)) = runner.poll_send() {
                write_packet(&mut self.stream, seq, &payload).await?;
                sent = true;
            }
            if let Progress::Done(t) = progress {
                self.buf.shrink(BACKEND_BUF);
                return Ok(t);
            }
            if sent {
                deadline = Deadline::now() + limit;
            }
            let h =
                match read_packet_by(&mut self.stream, &mut self.buf, MAX_PAYLOAD, Some(deadline))
                    .await
                {
                    Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                        return Err(overdue("internal_query_timeout", limit).into())
                    }
                    other => other?,
                };
            let step = runner.on_packet(&mut c, h, &self.buf.filled()[4..h.total()]);
            self.buf.consume(h.total());
            progress = step?;
        }
    }

    /// Sends a one-packet command and reads its whole response, discarding result rows.
    /// `Ok(Err(e))` is the server's ERR: the connection itself is fine.
    pub async fn command(
        &mut self,
        payload: &[u8],
        kind: ResponseKind,
    ) -> Result<Result<(), ErrPacket>, BackendError> {
        Ok(self
            .run(script::Command::new(payload.to_vec(), kind))
            .await?
            .map(drop))
    }

    /// Runs a query; an ERR reply is an error.
    pub async fn query(&mut self, sql: &str) -> Result<(), BackendError> {
        self.run(script::Command::query(sql))
            .await?
            .map(drop)
            .map_err(BackendError::Server)
    }

    /// Runs a query that returns one result set and takes it apart. `Ok(Err(e))`: the
    /// server's ERR.
    pub async fn query_result(
        &mut self,
        sql: &str,
    ) -> Result<Result<TextResult, ErrPacket>, BackendError> {
        Ok(match self.run(script::Command::query(sql)).await? {
            Ok(p) => Ok(TextResult::parse(&p.0, self.caps)?),
            Err(e) => Err(e),
        })
    }

    /// [`Self::read_response_until`] for a query already sent (a pipelined read-back), as
    /// one result set.
    pub async fn read_text_result_until(
        &mut self,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<Result<TextResult, ErrPacket>, BackendError> {
        Ok(
            match self.read_response_until(ResponseKind::Query, stop).await? {
                Ok(p) => Ok(TextResult::parse(&p.0, self.caps)?),
                Err(e) => Err(e),
            },
        )
    }

    /// Sets the session up: see [`script::InitSession`].
    pub async fn init_session(
        &mut self,
        init_query: &str,
        snapshot: bool,
    ) -> Result<(), BackendError> {
        self.run(script::InitSession::new(init_query.into(), snapshot))
            .await
    }

    /// Clears what a client left behind: see [`script::Renew`].
    pub async fn reset(&mut self, init_query: &str) -> Result<(), BackendError> {
        self.run(script::Renew::reset(init_query.into())).await
    }

    /// Runs a replay plan; `replan` plans again after a reset (which clears everything).
    /// `Ok(Err(e))`: the server refused a step (e.g. the client's database was dropped).
    pub async fn replay(
        &mut self,
        plan: Replay,
        replan: impl FnMut(&BackendSession) -> Replay,
        init_query: &str,
    ) -> Result<Result<(), ErrPacket>, BackendError> {
        tracing::debug!(
            thread_id = self.thread_id,
            ?plan,
            "replaying a client's session state"
        );
        let creds = self.login.current();
        self.run(script::ReplayScript::new(
            plan,
            replan,
            creds,
            init_query.into(),
        ))
        .await
    }

    /// Makes sure the statement `key` is prepared here: see [`script::Prepare`].
    /// `Ok(Err(e))`: the server refused.
    pub async fn prepare(
        &mut self,
        key: &Arc<StmtKey>,
    ) -> Result<Result<u32, ErrPacket>, BackendError> {
        // Prepared already: the common case, answered without a round trip or a clock read.
        if let Some(s) = self.stmts.get_mut(key) {
            return Ok(Ok(s.id));
        }
        self.run(script::Prepare::new(key.clone())).await
    }

    /// COM_STMT_CLOSE (the server sends no reply).
    pub async fn close_statement(&mut self, id: u32) -> Result<(), BackendError> {
        let mut p = vec![com::STMT_CLOSE];
        p.extend_from_slice(&id.to_le_bytes());
        write_packet(&mut self.stream, 0, &p).await?;
        Ok(())
    }

    /// Tells the backend goodbye (best effort) before the connection is dropped.
    pub async fn quit(mut self) {
        let _ = write_packet(&mut self.stream, 0, &[com::QUIT]).await;
    }

    /// Every session variable, lowercased name -> value (global-only ones, which any
    /// client may change, left out).
    async fn session_variables(&mut self) -> Result<Snapshot, BackendError> {
        let packets = self
            .run(script::Command::query(SESSION_VARIABLES_SQL))
            .await?
            .map_err(BackendError::Server)?;
        Ok(script::session_variables(&packets, self.caps)?)
    }

    /// Test-only: checks that the session is what dbproxy recorded of it. Every time: the
    /// schema, no transaction, LAST_INSERT_ID(), no pending insert_id, the user variables,
    /// no locks of any kind, none of `temp_tables`; every session variable (about 600, the
    /// costly part) whenever dbproxy's record of the connection changed since the last full
    /// comparison, and on every [`FULL_CHECK_EVERY`]th check-in otherwise. `Ok(Err(why))`:
    /// the session differs from the record.
    pub async fn verify(
        &mut self,
        temp_tables: &[Vec<u8>],
    ) -> Result<Result<(), String>, BackendError> {
        // Values that move on their own, mirror a global (the two replication ones), or
        // follow the schema (the database's character set and collation: USE sets them).
        const VOLATILE: [&str; 14] = [
            "max_relay_log_size",
            "sql_slave_skip_counter",
            "character_set_database",
            "collation_database",
            "timestamp",
            "last_insert_id",
            "identity",
            "warning_count",
            "error_count",
            "rand_seed1",
            "rand_seed2",
            "last_gtid",
            "in_transaction",
            "insert_id",
        ];
        let sql = "SELECT DATABASE(), @@in_transaction, LAST_INSERT_ID(), @@session.insert_id, \
             (SELECT COUNT(*) FROM information_schema.USER_VARIABLES), \
             (SELECT COUNT(*) FROM information_schema.METADATA_LOCK_INFO WHERE THREAD_ID = CONNECTION_ID())";
        let r = match self.query_result(sql).await? {
            Ok(r) => r,
            Err(e) => {
                return Ok(Err(format!(
                    "cannot verify (is the metadata_lock_info plugin loaded?): {e}"
                )))
            }
        };
        let row = r
            .rows
            .first()
            .ok_or(ProtocolError::Truncated("verification row"))?;
        let v = crate::mysql::resultset::parse_text_row(row, 6)?;
        let col = |i: usize| v.get(i).copied().flatten();
        let mut problems = Vec::new();
        if col(0) != self.session.schema.as_deref() {
            problems.push(format!(
                "schema is {:?}, recorded {:?}",
                col(0).map(String::from_utf8_lossy),
                self.session.schema.as_deref().map(String::from_utf8_lossy)
            ));
        }
        if col(1) != Some(b"0") {
            problems.push("a transaction is open".into());
        }
        let lid = col(2).unwrap_or(b"0");
        if lid != self.session.last_insert_id.to_string().as_bytes() {
            problems.push(format!(
                "LAST_INSERT_ID() is {}, recorded {}",
                String::from_utf8_lossy(lid),
                self.session.last_insert_id
            ));
        }
        if col(3).is_some_and(|v| v != b"0") {
            problems.push("an insert_id is pending".into());
        }
        if col(5).is_some_and(|v| v != b"0") {
            problems.push(format!(
                "{} metadata lock(s) held",
                String::from_utf8_lossy(col(5).unwrap_or_default())
            ));
        }
        if col(4).is_some_and(|v| v != b"0") || !self.session.user_vars.is_empty() {
            if let Err(p) = self.verify_user_variables().await? {
                problems.push(p);
            }
        }
        let fingerprint = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            self.session.vars.hash(&mut h);
            self.session.baseline.hash(&mut h);
            h.finish()
        };
        let (last, since) = self.verified.unwrap_or((0, u32::MAX));
        if last != fingerprint || since >= FULL_CHECK_EVERY {
            let before = problems.len();
            let now = self.session_variables().await?;
            if let Some(snapshot) = &self.snapshot {
                for (name, value) in &now {
                    if VOLATILE.iter().any(|v| v.as_bytes() == name.as_slice()) {
                        continue;
                    }
                    let want = self
                        .session
                        .vars
                        .get(name)
                        .or_else(|| self.session.baseline.get(name))
                        .or_else(|| snapshot.get(name));
                    if want.is_some_and(|w| !same_value(w, value)) {
                        problems.push(format!(
                            "@@{} is {:?}, recorded {:?}",
                            String::from_utf8_lossy(name),
                            String::from_utf8_lossy(value),
                            want.map(|w| String::from_utf8_lossy(w).into_owned())
                        ));
                    }
                }
            }
            if problems.len() == before {
                self.verified = Some((fingerprint, 0));
            }
        } else {
            self.verified = Some((fingerprint, since + 1));
        }
        for t in temp_tables {
            let sql = format!("SHOW CREATE TABLE {}", String::from_utf8_lossy(t));
            if let Ok(r) = self.query_result(&sql).await? {
                let temporary = r.rows.iter().any(|row| {
                    row.windows(22)
                        .any(|w| w.eq_ignore_ascii_case(b"CREATE TEMPORARY TABLE"))
                });
                if temporary {
                    problems.push(format!(
                        "temporary table {} exists",
                        String::from_utf8_lossy(t)
                    ));
                }
            }
        }
        Ok(if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        })
    }

    /// Test-only: the user variables the server has, read back with their types, against
    /// the record.
    async fn verify_user_variables(&mut self) -> Result<Result<(), String>, BackendError> {
        use crate::session::uservars::{
            parse_value, push_read_back, same, UserVars, COLUMNS_PER_VAR,
        };
        let names = self
            .query_result("SELECT VARIABLE_NAME FROM information_schema.USER_VARIABLES")
            .await?
            .map_err(BackendError::Server)?;
        let names: Vec<Vec<u8>> = names
            .rows
            .iter()
            .filter_map(|r| crate::mysql::resultset::parse_text_row(r, 1).ok())
            .filter_map(|v| v.first().copied().flatten().map(|n| n.to_ascii_lowercase()))
            .collect();
        let mut server = UserVars::new();
        if !names.is_empty() {
            let mut sql = String::from("SELECT ");
            for n in &names {
                push_read_back(&mut sql, n);
            }
            let r = self
                .query_result(&sql)
                .await?
                .map_err(BackendError::Server)?;
            let row = r
                .rows
                .first()
                .ok_or(ProtocolError::Truncated("user variables"))?;
            let values = crate::mysql::resultset::parse_text_row(row, r.columns.len())?;
            for (i, n) in names.iter().enumerate() {
                let at = i * COLUMNS_PER_VAR;
                let (Some(col), Some(cols)) =
                    (r.columns.get(at), values.get(at..at + COLUMNS_PER_VAR))
                else {
                    continue;
                };
                match parse_value(col, cols) {
                    Ok(v) => {
                        server.insert(n.clone(), v);
                    }
                    Err(e) => {
                        return Ok(Err(format!(
                            "user variable @{}: {e}",
                            String::from_utf8_lossy(n)
                        )))
                    }
                }
            }
        }
        Ok(if same(&server, &self.session.user_vars) {
            Ok(())
        } else {
            Err(format!(
                "user variables are {server:?}, recorded {:?}",
                self.session.user_vars
            ))
        })
    }
}

/// Two renderings of a variable's value that mean the same (session tracking prints some
/// values differently from `information_schema`).
fn same_value(a: &[u8], b: &[u8]) -> bool {
    if a.eq_ignore_ascii_case(b) {
        return true;
    }
    let boolish = |v: &[u8]| match v.to_ascii_uppercase().as_slice() {
        b"ON" | b"1" => Some(true),
        b"OFF" | b"0" => Some(false),
        _ => None,
    };
    matches!((boolish(a), boolish(b)), (Some(x), Some(y)) if x == y)
}
