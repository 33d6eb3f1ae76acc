//! One backend connection: opening and logging in, simple commands, and the reset that
//! makes it fit for the next client.

use crate::io::{read_packet_by, write_packet, Buf, Stream};
use crate::mysql::backend::{Credentials, Login, LoginError, LoginStep};
use crate::mysql::command::ResponseKind;
use crate::mysql::consts::com;
use crate::mysql::handshake::ServerHandshake;
use crate::mysql::response::{ResponseTracker, Step};
use crate::mysql::session::{changes, parse_ok, Change, Replay, SessionState};
use crate::mysql::stmt::{parse_prepare_ok, BackendStmts};
use crate::mysql::wire::ErrPacket;
use crate::mysql::{ProtocolError, MAX_PAYLOAD};
use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::time::Instant;
use tokio::time::Instant as Deadline;

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
}

/// What a backend announced in its greeting; clients are offered the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerProfile {
    pub version: String,
    pub capabilities: u32,
    pub collation: u8,
}

impl Default for ServerProfile {
    fn default() -> Self {
        ServerProfile {
            version: "5.5.5-10.11.0-MariaDB-dbproxy".into(),
            capabilities: crate::mysql::consts::cap::PROXY_OFFERS,
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
    /// Collation sent at login; resets return to it.
    pub collation: u8,
    /// The backend's connection (thread) id.
    pub thread_id: u32,
    /// The session as the server reported it through session tracking.
    pub state: SessionState,
    /// Variable values right after a reset (tracking switched on, `init_query` run).
    pub baseline: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Binary-protocol statements prepared on this connection.
    pub stmts: BackendStmts,
    pub creds: Arc<Credentials>,
    nonce: Vec<u8>,
    pub created: Instant,
}

/// Receive buffer kept by an idle backend connection.
pub const BACKEND_BUF: usize = 16 * 1024;

/// Prepared statements kept per backend connection.
pub const STMT_CACHE: usize = 256;

/// The character set variables come from the handshake, not from the global defaults that
/// `SET ... = DEFAULT` restores: assigning them their own values makes session tracking
/// report them, so they enter the baseline.
pub const CHARSET_BASELINE_SQL: &str =
    "SET SESSION character_set_client = @@session.character_set_client, \
     character_set_connection = @@session.character_set_connection, \
     character_set_results = @@session.character_set_results, \
     collation_connection = @@session.collation_connection";

/// Run first on every backend session: the server then reports in its OK packets every
/// change of a system variable, of the default schema, and of other session state.
pub const TRACKING_SQL: &str =
    "SET SESSION session_track_schema = ON, session_track_state_change = ON, \
     session_track_system_variables = '*'";

impl<S> BackendConn<S> {
    /// The same connection over another stream type (moving it between workers).
    pub fn map_stream<T>(self, f: impl FnOnce(S) -> io::Result<T>) -> io::Result<BackendConn<T>> {
        Ok(BackendConn {
            stream: f(self.stream)?,
            buf: self.buf,
            caps: self.caps,
            collation: self.collation,
            thread_id: self.thread_id,
            state: self.state,
            baseline: self.baseline,
            stmts: self.stmts,
            creds: self.creds,
            nonce: self.nonce,
            created: self.created,
        })
    }
}

impl<S: Stream> BackendConn<S> {
    /// Logs in on a freshly connected stream.
    pub async fn login(
        mut stream: S,
        creds: Arc<Credentials>,
        wanted_caps: u32,
        collation: u8,
        deadline: Deadline,
    ) -> Result<(Self, ServerProfile), BackendError> {
        let mut buf = Buf::with_capacity(BACKEND_BUF);
        let h = read_packet_by(&mut stream, &mut buf, MAX_PAYLOAD, Some(deadline)).await?;
        let payload = &buf.filled()[4..h.total()];
        if payload.first() == Some(&0xff) {
            let e = ErrPacket::parse(payload)?;
            return Err(BackendError::Server(e));
        }
        let hs = ServerHandshake::parse(payload)?;
        buf.consume(h.total());
        let profile = ServerProfile {
            version: hs.version.clone(),
            capabilities: hs.capabilities,
            collation: hs.collation,
        };
        let (mut login, response, caps) = Login::start(&hs, &creds, wanted_caps, collation);
        let seq = h.seq.wrapping_add(1);
        write_packet(&mut stream, seq, &response).await?;
        let mut conn = BackendConn {
            stream,
            buf,
            caps,
            collation,
            thread_id: hs.connection_id,
            state: SessionState::default(),
            baseline: BTreeMap::new(),
            stmts: BackendStmts::new(STMT_CACHE),
            creds,
            nonce: hs.nonce,
            created: Instant::now(),
        };
        conn.finish_login(&mut login, Some(deadline)).await?;
        Ok((conn, profile))
    }

    async fn finish_login(
        &mut self,
        login: &mut Login,
        deadline: Option<Deadline>,
    ) -> Result<(), BackendError> {
        loop {
            let h = read_packet_by(&mut self.stream, &mut self.buf, MAX_PAYLOAD, deadline).await?;
            let step = login.on_packet(&self.buf.filled()[4..h.total()]);
            self.buf.consume(h.total());
            match step? {
                LoginStep::Done => return Ok(()),
                LoginStep::Wait => {}
                LoginStep::Send(p) => {
                    write_packet(&mut self.stream, h.seq.wrapping_add(1), &p).await?;
                }
            }
        }
    }

    /// Sends a one-packet command and reads its whole response, discarding result rows.
    /// `Ok(Err(e))` is the server's ERR: the connection itself is fine.
    pub async fn command(
        &mut self,
        payload: &[u8],
        kind: ResponseKind,
    ) -> Result<Result<(), ErrPacket>, BackendError> {
        write_packet(&mut self.stream, 0, payload).await?;
        let mut tracker = ResponseTracker::new(kind, self.caps);
        let mut err = None;
        loop {
            let h = read_packet_by(&mut self.stream, &mut self.buf, MAX_PAYLOAD, None).await?;
            let p = &self.buf.filled()[4..h.total()];
            if p.first() == Some(&0xff) && err.is_none() {
                err = Some(ErrPacket::parse(p)?);
            }
            let step = tracker.feed(h, p)?;
            if tracker.last_ok() {
                apply_ok(&mut self.state, p, self.caps)?;
            }
            self.buf.consume(h.total());
            match step {
                Step::Done => break,
                Step::More => {}
                Step::LocalInfile => {
                    // dbproxy never sends LOAD DATA itself; answer with an empty file.
                    write_packet(&mut self.stream, h.seq.wrapping_add(1), &[]).await?;
                    tracker.resume_after_infile();
                }
            }
        }
        self.buf.shrink(BACKEND_BUF);
        Ok(err.map_or(Ok(()), Err))
    }

    /// Runs a query; an ERR reply is an error.
    pub async fn query(&mut self, sql: &str) -> Result<(), BackendError> {
        let mut p = Vec::with_capacity(sql.len() + 1);
        p.push(com::QUERY);
        p.extend_from_slice(sql.as_bytes());
        self.command(&p, ResponseKind::Query)
            .await?
            .map_err(BackendError::Server)
    }

    /// Makes `db` the default database. `Ok(Err(e))`: the server refused (e.g. unknown
    /// database); nothing changed.
    pub async fn use_database(
        &mut self,
        name: &[u8],
    ) -> Result<Result<(), ErrPacket>, BackendError> {
        if self.state.schema.as_deref() == Some(name) {
            return Ok(Ok(()));
        }
        let mut p = Vec::with_capacity(name.len() + 1);
        p.push(com::INIT_DB);
        p.extend_from_slice(name);
        let r = self.command(&p, ResponseKind::Single).await?;
        if r.is_ok() {
            self.state.schema = Some(name.to_vec());
        }
        Ok(r)
    }

    /// Switches session tracking on and runs `init_query`; what they set is the baseline.
    pub async fn init_session(&mut self, init_query: &str) -> Result<(), BackendError> {
        self.query(TRACKING_SQL).await?;
        self.query(CHARSET_BASELINE_SQL).await?;
        if !init_query.is_empty() {
            self.query(init_query).await?;
        }
        self.baseline = self.state.vars.clone();
        Ok(())
    }

    /// COM_CHANGE_USER to the same backend user with no database: a full session reset.
    pub async fn change_user(&mut self, init_query: &str) -> Result<(), BackendError> {
        let (mut login, p) =
            Login::change_user(&self.nonce, &self.creds, self.caps, self.collation);
        write_packet(&mut self.stream, 0, &p).await?;
        self.finish_login(&mut login, None).await?;
        self.state = SessionState::default();
        self.stmts.clear();
        self.init_session(init_query).await
    }

    /// Clears everything a client left behind (transaction, locks, variables, temporary
    /// tables, prepared statements), then sets the session up again. The default database
    /// stays (MariaDB keeps it across COM_RESET_CONNECTION).
    pub async fn reset(&mut self, init_query: &str) -> Result<(), BackendError> {
        self.command(&[com::RESET_CONNECTION], ResponseKind::Single)
            .await?
            .map_err(BackendError::Server)?;
        self.state.vars.clear();
        self.stmts.clear();
        self.init_session(init_query).await
    }

    /// Brings this session to a client's state. `Ok(Err(e))`: the server refused a step
    /// (e.g. the client's database was dropped meanwhile).
    pub async fn replay(
        &mut self,
        plan: &Replay,
        client_vars: &BTreeMap<Vec<u8>, Vec<u8>>,
        client_schema: Option<&[u8]>,
        init_query: &str,
    ) -> Result<Result<(), ErrPacket>, BackendError> {
        let mut plan = plan.clone();
        tracing::debug!(
            thread_id = self.thread_id,
            ?plan,
            "replaying a client's session state"
        );
        if plan.reset {
            self.change_user(init_query).await?;
            plan = crate::mysql::session::plan_replay(
                client_schema,
                client_vars,
                &self.state,
                &self.baseline,
            );
        }
        if let Some(set) = &plan.set {
            let mut p = Vec::with_capacity(set.len() + 1);
            p.push(com::QUERY);
            p.extend_from_slice(set.as_bytes());
            if let Err(e) = self.command(&p, ResponseKind::Query).await? {
                return Ok(Err(e));
            }
        }
        if let Some(db) = &plan.init_db {
            return self.use_database(db).await;
        }
        Ok(Ok(()))
    }

    /// Prepares `sql` on this connection (binary protocol) and caches it; returns the
    /// backend statement id. `Ok(Err(e))`: the server refused the statement.
    pub async fn prepare(
        &mut self,
        sql: &Arc<[u8]>,
    ) -> Result<Result<u32, ErrPacket>, BackendError> {
        if let Some(s) = self.stmts.get_mut(sql) {
            return Ok(Ok(s.id));
        }
        let mut p = Vec::with_capacity(sql.len() + 1);
        p.push(com::STMT_PREPARE);
        p.extend_from_slice(sql);
        write_packet(&mut self.stream, 0, &p).await?;
        let mut tracker = ResponseTracker::new(ResponseKind::Prepare, self.caps);
        let mut result = None;
        loop {
            let h = read_packet_by(&mut self.stream, &mut self.buf, MAX_PAYLOAD, None).await?;
            let p = &self.buf.filled()[4..h.total()];
            if result.is_none() {
                result = Some(match p.first() {
                    Some(0xff) => Err(ErrPacket::parse(p)?),
                    _ => Ok(parse_prepare_ok(p)?),
                });
            }
            let step = tracker.feed(h, p)?;
            self.buf.consume(h.total());
            if step == Step::Done {
                break;
            }
        }
        match result {
            Some(Ok((id, _columns, params))) => {
                if let Some(close) = self.stmts.insert(sql.clone(), id, params) {
                    self.close_statement(close).await?;
                }
                Ok(Ok(id))
            }
            Some(Err(e)) => Ok(Err(e)),
            None => Err(ProtocolError::Malformed("empty reply to COM_STMT_PREPARE").into()),
        }
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
}

/// Applies the session-tracking information of an OK packet to `state`. Returns whether
/// the server reported a state change that no tracked schema or variable explains.
pub fn apply_ok(
    state: &mut SessionState,
    payload: &[u8],
    caps: u32,
) -> Result<bool, ProtocolError> {
    let ok = parse_ok(payload, caps)?;
    let Some(range) = ok.state else {
        return Ok(false);
    };
    let mut explained = false;
    let mut changed = false;
    for c in changes(&payload[range])? {
        match c {
            Change::StateChanged => changed = true,
            other => explained |= state.apply(&other),
        }
    }
    Ok(changed && !explained)
}
