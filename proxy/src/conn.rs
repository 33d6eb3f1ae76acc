//! The client session loop: glue between the client socket, the protocol core, the users
//! and this core's pool.
//!
//! A client holds a backend connection only while it needs one: from a command to the end
//! of the response that leaves it outside a transaction with nothing pinned. Its session
//! state (default database, system variables) is kept here, learnt from the server's
//! session tracking, and replayed on whichever backend connection serves it next; its
//! prepared statements are kept here too and prepared lazily on each backend.

use crate::auth::{self, Decision, User};
use crate::io::{read_packet, read_packet_by, write_packet, Buf, Driver, PacketTooLarge, Stream};
use crate::mysql::auth::{new_nonce, Plugin, SHA2_FAST_AUTH_OK};
use crate::mysql::command::{classify, Disposition, ResponseKind};
use crate::mysql::consts::{cap, com, errcode, status};
use crate::mysql::handshake::{encode_auth_switch, ChangeUser, HandshakeResponse, ServerHandshake};
use crate::mysql::packet::{complete_packet, seal, write_packet as frame, Header, HEADER_LEN};
use crate::mysql::pins::{classify_sql, PinReason, Pins, SqlEffects};
use crate::mysql::response::{ResponseTracker, Step};
use crate::mysql::session::{
    changes, parse_ok, plan_replay, replayable, strip_session_track, Change,
};
use crate::mysql::stmt::{
    self, execute_opens_cursor, parse_prepare_ok, rewrite_execute, ClientStmts,
};
use crate::mysql::wire::{ok_packet, ErrPacket};
use crate::mysql::MAX_PAYLOAD;
use crate::pool::{BorrowError, CorePool, PoolKey, Pooled};
use crate::runtime::ProxyShared;
use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Largest packet accepted before a client has logged in.
const HANDSHAKE_LIMIT: usize = 64 * 1024;
/// Receive buffer a client session keeps between commands.
const CLIENT_BUF: usize = 16 * 1024;

/// Why a session ended early.
#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    /// The client went away or broke the protocol; it has been told if it could be.
    #[error("client: {0}")]
    Client(io::Error),
    /// The backend broke mid-command; the client got an error packet and is closed.
    #[error("backend: {0}")]
    Backend(String),
}

/// What a relayed response showed.
#[derive(Debug, Default)]
struct Outcome {
    /// The response ended with an ERR packet.
    failed: bool,
    /// The server reported a session state change that no tracked variable or schema
    /// explains.
    unexplained_change: bool,
    /// The insert id of the last OK packet.
    last_insert_id: u64,
    /// The client set a variable that cannot follow it to another connection.
    not_replayable: bool,
}

/// A COM_STMT_PREPARE in flight: its SQL, and the id dbproxy gives the client.
struct PrepareCapture {
    sql: Arc<[u8]>,
    client_id: Option<u32>,
    /// A backend statement to close once the response is through (duplicate or evicted).
    close: Option<u32>,
}

/// One client connection.
struct Session<D: Driver> {
    shared: Arc<ProxyShared>,
    pool: Rc<CorePool<D>>,
    client: D::Stream,
    cbuf: Buf,
    /// Reused for the payload of commands dbproxy reads whole and for the packets it
    /// builds for the backend, so that no statement allocates.
    cmd: Vec<u8>,
    built: Vec<u8>,
    peer: SocketAddr,
    /// Capabilities agreed with the client.
    caps: u32,
    collation: u8,
    nonce: [u8; 20],
    user: Arc<User>,
    /// The pool key of `user`, `caps` and `collation`.
    key: PoolKey,
    /// The client's default database.
    db: Option<Vec<u8>>,
    /// System variables the client changed, as the server reported them.
    vars: BTreeMap<Vec<u8>, Vec<u8>>,
    backend: Option<Pooled<D::Stream>>,
    status: u16,
    pins: Pins,
    stmts: ClientStmts,
    /// The client statement with an open cursor, and one with long data sent.
    cursor: Option<u32>,
    long_data: Option<u32>,
}

/// Serves one accepted client connection to its end.
pub async fn serve<D: Driver>(
    shared: Arc<ProxyShared>,
    pool: Rc<CorePool<D>>,
    mut client: D::Stream,
    peer: SocketAddr,
) {
    let conn_id = shared.next_connection_id();
    let in_use = shared.clients.fetch_add(1, Ordering::AcqRel) + 1;
    let _count = ClientCount(&shared);
    if in_use > shared.config.proxy.max_client_connections {
        let e = ErrPacket::new(errcode::ER_CON_COUNT_ERROR, "08004", "Too many connections");
        let _ = write_packet(&mut client, 0, &e.encode()).await;
        tracing::warn!(%peer, "refused a client: max_client_connections reached");
        return;
    }
    let deadline = tokio::time::Instant::now() + shared.config.proxy.handshake_timeout;
    let Some((mut session, seq)) =
        login::<D>(shared.clone(), pool, client, peer, conn_id, deadline).await
    else {
        return;
    };
    // Waiting for a backend connection is bounded by connection_borrow_timeout, not by
    // the handshake timeout.
    if !session.connected(seq).await {
        return;
    }
    session.run().await;
}

struct ClientCount<'a>(&'a ProxyShared);
impl Drop for ClientCount<'_> {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A client's proof of identity: first answer, possibly an auth switch, and the verdict.
/// `Ok(Ok((user, seq)))`: accepted, `seq` is the next sequence id. `Ok(Err(seq))`: denied
/// (the caller sends the error at `seq`).
#[allow(clippy::too_many_arguments)]
async fn authenticate<S: Stream>(
    client: &mut S,
    cbuf: &mut Buf,
    mut seq: u8,
    user: Option<Arc<User>>,
    plugin: Option<&[u8]>,
    answer: &[u8],
    nonce: &[u8; 20],
    can_switch: bool,
    deadline: Option<tokio::time::Instant>,
) -> io::Result<Result<(Arc<User>, u8), (u8, bool)>> {
    let mut decision = auth::first_answer(user.as_deref(), plugin, can_switch, nonce, answer);
    let mut used_password = !answer.is_empty();
    if let Decision::Switch(plugin) = decision {
        write_packet(client, seq, &encode_auth_switch(plugin.name(), nonce)).await?;
        let h = read_packet_by(client, cbuf, HANDSHAKE_LIMIT, deadline).await?;
        let answer = &cbuf.filled()[4..h.total()];
        used_password = !answer.is_empty();
        decision = auth::verify(user.as_deref(), plugin, nonce, answer);
        cbuf.consume(h.total());
        seq = h.seq.wrapping_add(1);
    }
    match (decision, user) {
        (Decision::Accept(plugin), Some(u)) => {
            if plugin == Plugin::CachingSha2 {
                seq = write_packet(client, seq, &[0x01, SHA2_FAST_AUTH_OK]).await?;
            }
            Ok(Ok((u, seq)))
        }
        _ => Ok(Err((seq, used_password))),
    }
}

/// The pool key of a login: its backend credentials and what it negotiated.
fn pool_key(user: &User, caps: u32, collation: u8) -> PoolKey {
    PoolKey::new(
        user.backend.clone(),
        caps & cap::BEHAVIOUR & !cap::SESSION_TRACK,
        collation,
    )
}

/// The connection phase: greeting, authentication, optional default database.
async fn login<D: Driver>(
    shared: Arc<ProxyShared>,
    pool: Rc<CorePool<D>>,
    mut client: D::Stream,
    peer: SocketAddr,
    conn_id: u32,
    deadline: tokio::time::Instant,
) -> Option<(Session<D>, u8)> {
    let nonce = new_nonce();
    let profile = pool.shared.profile.read().clone();
    let offered = cap::PROXY_OFFERS & (profile.capabilities | cap::LONG_PASSWORD);
    let greeting = ServerHandshake {
        version: profile.version,
        connection_id: conn_id,
        nonce: nonce.to_vec(),
        capabilities: offered,
        collation: profile.collation,
        status: status::AUTOCOMMIT,
        auth_plugin: Plugin::Native.name().into(),
    };
    write_packet(&mut client, 0, &greeting.encode())
        .await
        .ok()?;
    let mut cbuf = Buf::with_capacity(CLIENT_BUF);
    let h = match read_packet_by(&mut client, &mut cbuf, HANDSHAKE_LIMIT, Some(deadline)).await {
        Ok(h) => h,
        Err(e) if e.kind() == io::ErrorKind::TimedOut => {
            let t = shared.config.proxy.handshake_timeout;
            tracing::info!(%peer, "client did not log in within handshake_timeout ({t:?})");
            return None;
        }
        Err(e) => {
            tracing::debug!(%peer, "client left during the handshake: {e}");
            if e.kind() == io::ErrorKind::InvalidData {
                let err = ErrPacket::new(errcode::ER_HANDSHAKE_ERROR, "08S01", "Bad handshake");
                let _ = write_packet(&mut client, 2, &err.encode()).await;
            }
            return None;
        }
    };
    let parsed = HandshakeResponse::parse(&cbuf.filled()[4..h.total()]);
    cbuf.consume(h.total());
    let seq = h.seq.wrapping_add(1);
    let resp = match parsed {
        Ok(r) if r.capabilities & cap::COMPRESS != 0 => {
            let e = ErrPacket::new(
                errcode::ER_HANDSHAKE_ERROR,
                "08S01",
                "Bad handshake: dbproxy does not support compression",
            );
            let _ = write_packet(&mut client, seq, &e.encode()).await;
            return None;
        }
        Ok(r) => r,
        Err(e) => {
            tracing::info!(%peer, "bad handshake from client: {e}");
            let err = ErrPacket::new(
                errcode::ER_HANDSHAKE_ERROR,
                "08S01",
                format!("Bad handshake: {e}"),
            );
            let _ = write_packet(&mut client, seq, &err.encode()).await;
            return None;
        }
    };
    let caps = resp.capabilities & offered;
    let user = shared.users.get(&resp.user);
    let verdict = authenticate(
        &mut client,
        &mut cbuf,
        seq,
        user,
        resp.auth_plugin.as_deref(),
        &resp.auth_response,
        &nonce,
        caps & cap::PLUGIN_AUTH != 0,
        Some(deadline),
    )
    .await
    .ok()?;
    let (user, seq) = match verdict {
        Ok(ok) => ok,
        Err((seq, used_password)) => {
            tracing::info!(%peer, user = %String::from_utf8_lossy(&resp.user), "access denied");
            let e = auth::access_denied(&resp.user, &peer.ip().to_string(), used_password);
            let _ = write_packet(&mut client, seq, &e.encode()).await;
            return None;
        }
    };
    let s = Session {
        key: pool_key(&user, caps, resp.collation),
        shared,
        pool,
        client,
        cbuf,
        cmd: Vec::new(),
        built: Vec::new(),
        peer,
        caps,
        collation: resp.collation,
        nonce,
        user,
        db: resp.database,
        vars: BTreeMap::new(),
        backend: None,
        status: status::AUTOCOMMIT,
        pins: Pins::default(),
        stmts: ClientStmts::default(),
        cursor: None,
        long_data: None,
    };
    Some((s, seq))
}

impl<D: Driver> Session<D> {
    /// Ends the connection phase: OK, or the error that refuses the client's database.
    async fn connected(&mut self, seq: u8) -> bool {
        if self.db.is_some() {
            // Like MariaDB, refuse the login when the database does not exist.
            if let Err(e) = self.ensure_backend(true).await {
                let _ = write_packet(&mut self.client, seq, &e.encode()).await;
                self.finish();
                return false;
            }
            self.maybe_release();
        }
        if write_packet(&mut self.client, seq, &ok_packet(self.status))
            .await
            .is_err()
        {
            self.finish();
            return false;
        }
        tracing::debug!(peer = %self.peer, user = %self.user.name, "client logged in");
        true
    }

    /// Makes sure this session holds a backend connection; with `replay`, one whose session
    /// state is the client's. The error is the packet to send to the client.
    async fn ensure_backend(&mut self, replay: bool) -> Result<(), ErrPacket> {
        if self.backend.is_some() {
            return Ok(());
        }
        let mut conn = self
            .pool
            .borrow(&self.key, self.db.as_deref())
            .await
            .map_err(|e| {
                tracing::warn!(peer = %self.peer, "{e}");
                match e {
                    BorrowError::Timeout(..) => ErrPacket::new(
                        errcode::PROXY_BORROW_TIMEOUT,
                        "HY000",
                        format!("(dbproxy) {e}"),
                    ),
                    BorrowError::Connect { .. } => ErrPacket::new(
                        errcode::PROXY_BACKEND_UNAVAILABLE,
                        "08S01",
                        format!("(dbproxy) {e}"),
                    ),
                }
            })?;
        if replay {
            let plan = plan_replay(self.db.as_deref(), &self.vars, &conn.state, &conn.baseline);
            tracing::trace!(thread_id = conn.thread_id, backend = ?conn.state, client_db = ?self.db, ?plan, "borrowed");
            if !plan.is_empty() {
                let init = self.pool.shared.init_query.clone();
                match conn
                    .replay(&plan, &self.vars, self.db.as_deref(), &init)
                    .await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(server_err)) => {
                        self.pool.checkin_clean(conn);
                        return Err(server_err);
                    }
                    Err(e) => {
                        self.pool.discard(conn, "failed while restoring a session");
                        return Err(ErrPacket::new(
                            errcode::PROXY_BACKEND_UNAVAILABLE,
                            "08S01",
                            format!("(dbproxy) database connection failed: {e}"),
                        ));
                    }
                }
            }
        }
        self.backend = Some(conn);
        Ok(())
    }

    /// Whether the client may give its backend connection back now.
    fn releasable(&self) -> bool {
        self.status & status::IN_TRANS == 0
            && self.status & status::AUTOCOMMIT != 0
            && !self.pins.is_pinned()
    }

    /// Returns the backend connection at a transaction boundary with nothing pinned.
    fn maybe_release(&mut self) {
        if self.releasable() {
            if let Some(conn) = self.backend.take() {
                self.pool.checkin_clean(conn);
            }
        }
    }

    async fn run(mut self) {
        let idle = self.shared.config.proxy.idle_client_timeout;
        loop {
            let deadline = tokio::time::Instant::now() + idle;
            let h = match read_packet_by(
                &mut self.client,
                &mut self.cbuf,
                MAX_PAYLOAD,
                Some(deadline),
            )
            .await
            {
                Ok(h) => h,
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    let e = ErrPacket::new(
                        errcode::ER_CLIENT_INTERACTION_TIMEOUT,
                        "HY000",
                        "The client was disconnected by the server because of inactivity (dbproxy idle_client_timeout)",
                    );
                    let _ = write_packet(&mut self.client, 0, &e.encode()).await;
                    break;
                }
                Err(e) => {
                    if e.kind() != io::ErrorKind::UnexpectedEof {
                        tracing::debug!(peer = %self.peer, "client read failed: {e}");
                    }
                    break;
                }
            };
            let _active = crate::io::Active::enter();
            let command = self.cbuf.filled().get(4).copied();
            let outcome = match (command, command.map(classify)) {
                (None, _) | (_, None) => match self.discard_command(h).await {
                    Ok(()) => {
                        self.reply_err(h.seq, malformed("empty command packet"))
                            .await
                    }
                    Err(e) => Err(e),
                },
                (_, Some(Disposition::Quit)) => break,
                (_, Some(Disposition::ChangeUser)) => match self.change_user(h).await {
                    Ok(true) => Ok(()),
                    Ok(false) => break,
                    Err(e) => Err(e),
                },
                (Some(c), Some(Disposition::Refuse)) => {
                    let msg = format!("Unknown command {c:#04x} (not served through dbproxy)");
                    let e = ErrPacket::new(errcode::ER_UNKNOWN_COM_ERROR, "08S01", msg);
                    match self.discard_command(h).await {
                        Ok(()) => self.reply_err(h.seq, e).await,
                        Err(e) => Err(e),
                    }
                }
                (Some(com::RESET_CONNECTION), _) => self.reset_connection(h).await,
                (Some(com::STMT_PREPARE), _) => self.prepare(h).await,
                (Some(com::STMT_EXECUTE), _) => self.execute(h).await,
                (Some(com::STMT_SEND_LONG_DATA | com::STMT_FETCH | com::STMT_RESET), _) => {
                    self.statement_command(h).await
                }
                (Some(com::STMT_CLOSE), _) => self.close_statement(h).await,
                (Some(com::PING | com::STATISTICS), Some(Disposition::Forward(kind))) => {
                    self.forward(h, kind, false).await
                }
                (_, Some(Disposition::Forward(kind))) => self.forward(h, kind, true).await,
            };
            if let Err(e) = outcome {
                tracing::debug!(peer = %self.peer, "session ends: {e}");
                break;
            }
            self.cbuf.shrink(CLIENT_BUF);
            for v in [&mut self.cmd, &mut self.built] {
                if v.capacity() > CLIENT_BUF {
                    *v = Vec::new();
                }
            }
        }
        self.finish();
    }

    /// The session is over: its backend connection goes back, reset if the client left
    /// anything behind.
    fn finish(&mut self) {
        let clean = self.releasable();
        for r in self.pins.active().to_vec() {
            self.pins.end(r);
            self.pool.shared.stats.pin_ended(r);
        }
        if let Some(conn) = self.backend.take() {
            if clean {
                self.pool.checkin_clean(conn);
            } else {
                self.pool.release(conn);
            }
        }
    }

    async fn reply_err(&mut self, seq: u8, e: ErrPacket) -> Result<(), SessionEnd> {
        write_packet(&mut self.client, seq.wrapping_add(1), &e.encode())
            .await
            .map(drop)
            .map_err(SessionEnd::Client)
    }

    async fn reply_ok(&mut self, seq: u8) -> Result<(), SessionEnd> {
        write_packet(
            &mut self.client,
            seq.wrapping_add(1),
            &ok_packet(self.status),
        )
        .await
        .map(drop)
        .map_err(SessionEnd::Client)
    }

    /// Reads and drops a command the client sent (with its continuation packets).
    async fn discard_command(&mut self, mut h: Header) -> Result<(), SessionEnd> {
        loop {
            self.cbuf.consume(h.total());
            if !h.continues() {
                return Ok(());
            }
            h = read_packet(&mut self.client, &mut self.cbuf, MAX_PAYLOAD)
                .await
                .map_err(SessionEnd::Client)?;
        }
    }

    /// The whole payload of a command (all its packets), consumed from the client buffer.
    /// Give the vector back to `self.cmd` once done with it.
    async fn take_command(&mut self, mut h: Header) -> Result<Vec<u8>, SessionEnd> {
        let mut payload = std::mem::take(&mut self.cmd);
        payload.clear();
        loop {
            payload.extend_from_slice(&self.cbuf.filled()[4..h.total()]);
            self.cbuf.consume(h.total());
            if payload.len() as u64 > self.shared.config.proxy.max_allowed_packet {
                return Err(self.too_large(h.seq, payload.len()).await);
            }
            if !h.continues() {
                return Ok(payload);
            }
            h = read_packet(&mut self.client, &mut self.cbuf, MAX_PAYLOAD)
                .await
                .map_err(SessionEnd::Client)?;
        }
    }

    async fn too_large(&mut self, seq: u8, total: usize) -> SessionEnd {
        let e = ErrPacket::new(
            errcode::ER_NET_PACKET_TOO_LARGE,
            "08S01",
            "Got a packet bigger than 'max_allowed_packet' bytes",
        );
        self.drop_backend();
        let _ = self.reply_err(seq, e).await;
        SessionEnd::Client(io::Error::new(
            io::ErrorKind::InvalidData,
            PacketTooLarge(total),
        ))
    }

    /// Forwards one command and relays its response; `replay`: the command depends on the
    /// session state (all but COM_PING and COM_STATISTICS).
    async fn forward(
        &mut self,
        h: Header,
        kind: ResponseKind,
        replay: bool,
    ) -> Result<(), SessionEnd> {
        if let Err(e) = self.ensure_backend(replay).await {
            self.discard_command(h).await?;
            return self.reply_err(h.seq, e).await;
        }
        let payload = &self.cbuf.filled()[4..h.total()];
        let effects = match payload[0] {
            com::QUERY => classify_sql(&payload[1..]),
            // COM_SET_OPTION changes the connection's multi-statement option, which
            // session tracking does not report.
            com::SET_OPTION => SqlEffects {
                starts: vec![PinReason::Unclassified],
                ..Default::default()
            },
            _ => SqlEffects::default(),
        };
        self.send_command(h).await?;
        if kind == ResponseKind::None {
            return Ok(());
        }
        let outcome = self.relay_response(kind, None).await?;
        self.after_command(&effects, &outcome);
        Ok(())
    }

    /// Updates pins and the transaction state after a response, and gives the backend
    /// connection back when nothing holds the client to it.
    fn after_command(&mut self, effects: &SqlEffects, outcome: &Outcome) {
        let stats = &self.pool.shared.stats;
        let mut e = effects.clone();
        if self.pool.shared.exclude_variable_sets {
            e.starts
                .retain(|r| !matches!(r, PinReason::UserVariable | PinReason::NextTransaction));
        }
        if effects.touches_tracking
            || outcome.not_replayable
            || (outcome.unexplained_change && effects.starts.is_empty())
        {
            e.starts.push(PinReason::Unclassified);
        }
        let (started, ended) = self.pins.after_statement(&e, !outcome.failed);
        for r in started {
            stats.pin_started(r);
        }
        for r in ended {
            stats.pin_ended(r);
        }
        if outcome.last_insert_id != 0 && self.pins.start(PinReason::LastInsertId) {
            stats.pin_started(PinReason::LastInsertId);
        }
        let in_transaction =
            self.status & status::IN_TRANS != 0 || self.status & status::AUTOCOMMIT == 0;
        if in_transaction {
            if self.pins.start(PinReason::Transaction) {
                stats.pin_started(PinReason::Transaction);
            }
        } else if self.pins.end(PinReason::Transaction) {
            stats.pin_ended(PinReason::Transaction);
        }
        self.maybe_release();
    }

    fn start_pin(&mut self, r: PinReason) {
        if self.pins.start(r) {
            self.pool.shared.stats.pin_started(r);
        }
    }

    fn end_pin(&mut self, r: PinReason) {
        if self.pins.end(r) {
            self.pool.shared.stats.pin_ended(r);
        }
    }

    /// Sends the command packet(s) in `cbuf` to the backend, enforcing max_allowed_packet.
    async fn send_command(&mut self, mut h: Header) -> Result<(), SessionEnd> {
        let limit = self.shared.config.proxy.max_allowed_packet;
        let mut total = 0u64;
        loop {
            total += h.len as u64;
            if total > limit {
                return Err(self.too_large(h.seq, total as usize).await);
            }
            let Some(b) = self.backend.as_mut() else {
                return Err(SessionEnd::Backend("no backend connection".into()));
            };
            if let Err(e) = b.conn.stream.write(&mut self.cbuf, h.total()).await {
                return Err(self.backend_lost(h.seq, &e.to_string()).await);
            }
            if !h.continues() {
                return Ok(());
            }
            h = match read_packet(&mut self.client, &mut self.cbuf, MAX_PAYLOAD).await {
                Ok(h) => h,
                Err(e) => {
                    // Half a command went to the backend: it cannot be reused.
                    self.drop_backend();
                    return Err(SessionEnd::Client(e));
                }
            };
        }
    }

    /// An empty vector to build a command in, [`HEADER_LEN`] bytes reserved for its header;
    /// hand it to [`Self::send_built`].
    fn start_built(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.built);
        out.clear();
        out.resize(HEADER_LEN, 0);
        out
    }

    /// Sends a command dbproxy built (a rewritten one, from [`Self::start_built`]) to the
    /// backend; `seq` is the client's sequence id, for the error it may get.
    async fn send_built(&mut self, mut out: Vec<u8>, seq: u8) -> Result<(), SessionEnd> {
        let Some(b) = self.backend.as_mut() else {
            return Err(SessionEnd::Backend("no backend connection".into()));
        };
        seal(&mut out, 0);
        let mut buf = Buf::from_vec(out);
        let n = buf.len();
        let res = b.conn.stream.write(&mut buf, n).await;
        self.built = buf.into_vec();
        if let Err(e) = res {
            return Err(self.backend_lost(seq, &e.to_string()).await);
        }
        Ok(())
    }

    /// Relays the backend's response to the client: bytes unchanged except OK packets for
    /// clients without session tracking and the statement id of OK_stmt, complete packets
    /// written in batches.
    async fn relay_response(
        &mut self,
        kind: ResponseKind,
        mut prepare: Option<&mut PrepareCapture>,
    ) -> Result<Outcome, SessionEnd> {
        let Some(mut b) = self.backend.take() else {
            return Err(SessionEnd::Backend("no backend connection".into()));
        };
        let mut tracker = ResponseTracker::new(kind, b.caps);
        let mut outcome = Outcome::default();
        let res = self
            .relay_with(&mut b, &mut tracker, &mut outcome, prepare.as_deref_mut())
            .await;
        match res {
            Ok(()) => {
                b.conn.buf.shrink(crate::pool::backend::BACKEND_BUF);
                if let Some(flags) = tracker.status() {
                    self.status = flags;
                }
                if let Some(id) = prepare.and_then(|p| p.close.take()) {
                    if let Err(e) = b.close_statement(id).await {
                        self.pool
                            .discard(b, &format!("closing a statement failed: {e}"));
                        return Ok(outcome);
                    }
                }
                self.backend = Some(b);
                Ok(outcome)
            }
            Err(RelayError::Client(e)) => {
                self.pool
                    .discard(b, &format!("the client left mid-response: {e}"));
                Err(SessionEnd::Client(e))
            }
            Err(RelayError::Backend(why)) => {
                tracing::warn!(peer = %self.peer, thread_id = b.thread_id, "backend connection lost: {why}");
                self.pool.discard(b, "state unknown after an error");
                let e = ErrPacket::new(
                    errcode::PROXY_BACKEND_LOST,
                    "08S01",
                    format!("(dbproxy) lost the database connection during the query: {why}"),
                );
                let _ = write_packet(
                    &mut self.client,
                    tracker.last_seq().wrapping_add(1),
                    &e.encode(),
                )
                .await;
                Err(SessionEnd::Backend(why))
            }
        }
    }

    async fn relay_with(
        &mut self,
        b: &mut Pooled<D::Stream>,
        tracker: &mut ResponseTracker,
        outcome: &mut Outcome,
        mut prepare: Option<&mut PrepareCapture>,
    ) -> Result<(), RelayError> {
        let strip = self.caps & cap::SESSION_TRACK == 0;
        loop {
            // Walk the complete packets already buffered; `out` holds a rewritten copy once
            // a packet had to change size.
            let mut scanned = 0;
            let mut out: Option<Vec<u8>> = None;
            let mut step = Step::More;
            while step == Step::More {
                let Some(h) = complete_packet(&b.conn.buf.filled()[scanned..]) else {
                    break;
                };
                let (start, p0, end) = (scanned, scanned + 4, scanned + h.total());
                step = tracker
                    .feed(h, &b.conn.buf.filled()[p0..end])
                    .map_err(|e| RelayError::Backend(e.to_string()))?;
                outcome.failed = b.conn.buf.filled().get(p0) == Some(&0xff);
                scanned = end;
                if let Some(cap) = prepare.as_deref_mut() {
                    if cap.client_id.is_none() && b.conn.buf.filled().get(p0) == Some(&0) {
                        let (id, columns, params) = parse_prepare_ok(&b.conn.buf.filled()[p0..end])
                            .map_err(|e| RelayError::Backend(e.to_string()))?;
                        let cid = self.stmts.add(cap.sql.clone(), params, columns);
                        cap.client_id = Some(cid);
                        cap.close = b.conn.stmts.insert(cap.sql.clone(), id, params);
                        stmt::patch_stmt_id(&mut b.conn.buf.filled_mut()[p0..end], cid);
                    }
                }
                if tracker.last_ok() {
                    let payload = &b.conn.buf.filled()[p0..end];
                    let ok = parse_ok(payload, b.caps)
                        .map_err(|e| RelayError::Backend(e.to_string()))?;
                    outcome.last_insert_id = ok.last_insert_id;
                    if let Some(range) = ok.state.clone() {
                        let list = changes(&payload[range])
                            .map_err(|e| RelayError::Backend(e.to_string()))?;
                        let mut explained = false;
                        let mut changed = false;
                        for c in &list {
                            match c {
                                Change::StateChanged => changed = true,
                                Change::SystemVariable(n, v) if replayable(n) => {
                                    self.vars.insert(n.to_ascii_lowercase(), v.to_vec());
                                    explained = true;
                                }
                                Change::SystemVariable(..) => outcome.not_replayable = true,
                                Change::Schema(s) => {
                                    self.db = Some(s.to_vec()).filter(|s| !s.is_empty());
                                    explained = true;
                                }
                                Change::Other(_) => {}
                            }
                            b.conn.state.apply(c);
                        }
                        outcome.unexplained_change |= changed && !explained;
                    }
                    if strip && payload.len() > ok.tail {
                        let plain = strip_session_track(payload, &ok);
                        let o = out.get_or_insert_with(|| b.conn.buf.filled()[..start].to_vec());
                        frame(o, h.seq, &plain);
                        continue;
                    }
                }
                if let Some(o) = out.as_mut() {
                    o.extend_from_slice(&b.conn.buf.filled()[start..end]);
                }
            }
            if scanned > 0 {
                match out {
                    Some(o) => {
                        let mut ob = Buf::from_vec(o);
                        let n = ob.len();
                        self.client
                            .write(&mut ob, n)
                            .await
                            .map_err(RelayError::Client)?;
                        b.conn.buf.consume(scanned);
                    }
                    None => self
                        .client
                        .write(&mut b.conn.buf, scanned)
                        .await
                        .map_err(RelayError::Client)?,
                }
            }
            match step {
                Step::Done => return Ok(()),
                Step::LocalInfile => {
                    // The command holds its backend connection anyway; counted for the record.
                    let shared = self.pool.shared.clone();
                    shared.stats.pin_started(PinReason::LoadData);
                    let r = self.relay_infile(b).await;
                    shared.stats.pin_ended(PinReason::LoadData);
                    r?;
                    tracker.resume_after_infile();
                    continue;
                }
                Step::More => {}
            }
            let want = Header::parse(b.conn.buf.filled()).map_or(4096, |h| {
                h.total().saturating_sub(b.conn.buf.len()).max(4096)
            });
            b.conn.buf.reserve(want.clamp(4096, MAX_PAYLOAD + 4));
            match b.conn.stream.read(&mut b.conn.buf).await {
                Ok(0) => {
                    return Err(RelayError::Backend(
                        "the database closed the connection".into(),
                    ))
                }
                Ok(_) => {}
                Err(e) => return Err(RelayError::Backend(e.to_string())),
            }
        }
    }

    /// LOAD DATA LOCAL INFILE: the client streams the file as packets ended by an empty one.
    async fn relay_infile(&mut self, b: &mut Pooled<D::Stream>) -> Result<(), RelayError> {
        loop {
            let h = read_packet(&mut self.client, &mut self.cbuf, MAX_PAYLOAD)
                .await
                .map_err(RelayError::Client)?;
            b.conn
                .stream
                .write(&mut self.cbuf, h.total())
                .await
                .map_err(|e| RelayError::Backend(e.to_string()))?;
            if h.len == 0 {
                return Ok(());
            }
        }
    }

    fn drop_backend(&mut self) {
        if let Some(b) = self.backend.take() {
            self.pool.discard(b, "state unknown after an error");
        }
    }

    async fn backend_lost(&mut self, seq: u8, why: &str) -> SessionEnd {
        self.drop_backend();
        let e = ErrPacket::new(
            errcode::PROXY_BACKEND_LOST,
            "08S01",
            format!("(dbproxy) lost the database connection: {why}"),
        );
        let _ = write_packet(&mut self.client, seq.wrapping_add(1), &e.encode()).await;
        SessionEnd::Backend(why.to_string())
    }

    /// Drops the session state dbproxy keeps for the client (variables, statements).
    fn forget_session(&mut self) {
        self.vars.clear();
        self.stmts = ClientStmts::default();
        self.cursor = None;
        self.long_data = None;
    }

    /// COM_RESET_CONNECTION: the client's session starts afresh (its default database
    /// stays, as with MariaDB); a backend connection it held is reset in the background.
    async fn reset_connection(&mut self, h: Header) -> Result<(), SessionEnd> {
        self.discard_command(h).await?;
        self.forget_session();
        for r in self.pins.active().to_vec() {
            self.end_pin(r);
        }
        if let Some(conn) = self.backend.take() {
            self.pool.release(conn);
        }
        self.status = status::AUTOCOMMIT;
        self.reply_ok(h.seq).await
    }

    /// COM_STMT_PREPARE: prepared on the backend serving it; the client gets an id of
    /// dbproxy's, valid on every backend.
    async fn prepare(&mut self, h: Header) -> Result<(), SessionEnd> {
        if let Err(e) = self.ensure_backend(true).await {
            self.discard_command(h).await?;
            return self.reply_err(h.seq, e).await;
        }
        let payload = self.take_command(h).await?;
        let sql: Arc<[u8]> = Arc::from(&payload[1..]);
        let mut out = self.start_built();
        out.extend_from_slice(&payload);
        self.cmd = payload;
        self.send_built(out, h.seq).await?;
        let mut capture = PrepareCapture {
            sql,
            client_id: None,
            close: None,
        };
        let outcome = self
            .relay_response(ResponseKind::Prepare, Some(&mut capture))
            .await?;
        self.after_command(&SqlEffects::default(), &outcome);
        Ok(())
    }

    /// The client's statement a COM_STMT_* payload names, or the error for an unknown id.
    fn client_statement(&self, payload: &[u8], what: &str) -> Result<u32, ErrPacket> {
        let id = stmt::stmt_id(payload).unwrap_or(0);
        self.stmts.resolve(id).ok_or_else(|| {
            ErrPacket::new(
                1243,
                "HY000",
                format!("Unknown prepared statement handler ({id}) given to {what}"),
            )
        })
    }

    /// Makes sure the backend has the client's statement `cid` prepared; its backend id.
    async fn backend_statement(
        &mut self,
        cid: u32,
        seq: u8,
    ) -> Result<Result<u32, ErrPacket>, SessionEnd> {
        let Some(sql) = self.stmts.get(cid).map(|s| s.sql.clone()) else {
            return Ok(Err(ErrPacket::new(
                1243,
                "HY000",
                "Unknown prepared statement handler",
            )));
        };
        let Some(b) = self.backend.as_mut() else {
            return Err(SessionEnd::Backend("no backend connection".into()));
        };
        match b.prepare(&sql).await {
            Ok(r) => Ok(r),
            Err(e) => Err(self.backend_lost(seq, &e.to_string()).await),
        }
    }

    /// COM_STMT_EXECUTE: on whichever backend serves it, the statement prepared there if
    /// needed, the id (and parameter types if needed) rewritten.
    async fn execute(&mut self, h: Header) -> Result<(), SessionEnd> {
        let payload = self.take_command(h).await?;
        let cid = match self.client_statement(&payload, "mysqld_stmt_execute") {
            Ok(c) => c,
            Err(e) => return self.reply_err(h.seq, e).await,
        };
        if let Err(e) = self.ensure_backend(true).await {
            return self.reply_err(h.seq, e).await;
        }
        if let Err(e) = self.backend_statement(cid, h.seq).await? {
            self.after_command(
                &SqlEffects::default(),
                &Outcome {
                    failed: true,
                    ..Default::default()
                },
            );
            return self.reply_err(h.seq, e).await;
        }
        let mut out = self.start_built();
        let rewritten = {
            let (Some(b), Some(cs)) = (self.backend.as_mut(), self.stmts.get_mut(cid)) else {
                return Err(SessionEnd::Backend("no backend connection".into()));
            };
            let Some(bs) = b.conn.stmts.get_mut(&cs.sql) else {
                return Err(SessionEnd::Backend(
                    "statement vanished from the backend cache".into(),
                ));
            };
            rewrite_execute(&payload, cs, bs, &mut out)
        };
        if let Err(e) = rewritten {
            return self.reply_err(h.seq, malformed(&e.to_string())).await;
        }
        let cursor = execute_opens_cursor(&payload);
        self.cmd = payload;
        self.send_built(out, h.seq).await?;
        let outcome = self.relay_response(ResponseKind::Execute, None).await?;
        if self.long_data == Some(cid) {
            self.long_data = None;
            self.end_pin(PinReason::LongData);
        }
        if cursor && !outcome.failed && self.status & status::CURSOR_EXISTS != 0 {
            self.cursor = Some(cid);
            self.start_pin(PinReason::Cursor);
        }
        self.after_command(&SqlEffects::default(), &outcome);
        Ok(())
    }

    /// COM_STMT_SEND_LONG_DATA, COM_STMT_FETCH and COM_STMT_RESET: the id rewritten for
    /// the backend that holds the statement's long data or cursor.
    async fn statement_command(&mut self, h: Header) -> Result<(), SessionEnd> {
        let command = self.cbuf.filled()[4];
        let cid =
            match self.client_statement(&self.cbuf.filled()[4..h.total()], "mysqld_stmt_fetch") {
                Ok(c) => c,
                Err(e) => {
                    return self.refuse_statement_command(h, command, e).await;
                }
            };
        if command == com::STMT_RESET {
            if self.cursor == Some(cid) {
                self.cursor = None;
                self.end_pin(PinReason::Cursor);
            }
            if self.long_data == Some(cid) {
                self.long_data = None;
                self.end_pin(PinReason::LongData);
            }
            let on_backend = match (self.backend.as_mut(), self.stmts.get(cid)) {
                (Some(b), Some(cs)) => b.conn.stmts.get_mut(&cs.sql).map(|s| s.id),
                _ => None,
            };
            let Some(bid) = on_backend else {
                // Nothing of it lives on a backend: nothing to reset.
                self.discard_command(h).await?;
                return self.reply_ok(h.seq).await;
            };
            stmt::patch_stmt_id(&mut self.cbuf.filled_mut()[4..h.total()], bid);
            self.send_command(h).await?;
            let outcome = self.relay_response(ResponseKind::Single, None).await?;
            self.after_command(&SqlEffects::default(), &outcome);
            return Ok(());
        }
        if command == com::STMT_FETCH && self.cursor != Some(cid) {
            self.discard_command(h).await?;
            let e = ErrPacket::new(1421, "HY000", "The statement has no open cursor");
            return self.reply_err(h.seq, e).await;
        }
        if let Err(e) = self.ensure_backend(true).await {
            return self.refuse_statement_command(h, command, e).await;
        }
        let bid = match self.backend_statement(cid, h.seq).await? {
            Ok(id) => id,
            Err(e) => {
                return self.refuse_statement_command(h, command, e).await;
            }
        };
        stmt::patch_stmt_id(&mut self.cbuf.filled_mut()[4..h.total()], bid);
        if command == com::STMT_SEND_LONG_DATA {
            self.long_data = Some(cid);
            self.start_pin(PinReason::LongData);
            return self.send_command(h).await;
        }
        self.send_command(h).await?;
        let outcome = self.relay_response(ResponseKind::Fetch, None).await?;
        if outcome.failed
            || self.status & status::LAST_ROW_SENT != 0
            || self.status & status::CURSOR_EXISTS == 0
        {
            self.cursor = None;
            self.end_pin(PinReason::Cursor);
        }
        self.after_command(&SqlEffects::default(), &outcome);
        Ok(())
    }

    /// Refuses a statement command: COM_STMT_SEND_LONG_DATA has no reply in the protocol
    /// (the execute that follows fails instead), the others get the error.
    async fn refuse_statement_command(
        &mut self,
        h: Header,
        command: u8,
        e: ErrPacket,
    ) -> Result<(), SessionEnd> {
        self.discard_command(h).await?;
        if command == com::STMT_SEND_LONG_DATA {
            Ok(())
        } else {
            self.reply_err(h.seq, e).await
        }
    }

    /// COM_STMT_CLOSE: the client's statement goes; the backends keep theirs cached.
    async fn close_statement(&mut self, h: Header) -> Result<(), SessionEnd> {
        let id = stmt::stmt_id(&self.cbuf.filled()[4..h.total()])
            .ok()
            .and_then(|i| self.stmts.resolve(i));
        self.discard_command(h).await?;
        let Some(cid) = id else { return Ok(()) };
        if self.long_data == Some(cid) {
            self.long_data = None;
            self.end_pin(PinReason::LongData);
        }
        if self.cursor == Some(cid) {
            // Close the server-side cursor with a reset of the backend statement.
            let sql = self.stmts.get(cid).map(|s| s.sql.clone());
            if let (Some(b), Some(sql)) = (self.backend.as_mut(), sql) {
                if let Some(bid) = b.conn.stmts.get_mut(&sql).map(|s| s.id) {
                    let mut p = vec![com::STMT_RESET];
                    p.extend_from_slice(&bid.to_le_bytes());
                    if b.command(&p, ResponseKind::Single).await.is_err() {
                        self.drop_backend();
                    }
                }
            }
            self.cursor = None;
            self.end_pin(PinReason::Cursor);
            self.maybe_release();
        }
        self.stmts.remove(cid);
        Ok(())
    }

    /// COM_CHANGE_USER: authenticated by dbproxy; the session then starts afresh.
    /// `Ok(false)`: authentication failed and the client was told; close the session.
    async fn change_user(&mut self, h: Header) -> Result<bool, SessionEnd> {
        if h.continues() {
            self.discard_command(h).await?;
            self.reply_err(h.seq, malformed("COM_CHANGE_USER too large"))
                .await?;
            return Ok(false);
        }
        let parsed = ChangeUser::parse(&self.cbuf.filled()[4..h.total()], self.caps);
        self.cbuf.consume(h.total());
        let cu = match parsed {
            Ok(cu) => cu,
            Err(e) => {
                self.reply_err(h.seq, malformed(&e.to_string())).await?;
                return Ok(false);
            }
        };
        let user = self.shared.users.get(&cu.user);
        let nonce = self.nonce;
        let verdict = authenticate(
            &mut self.client,
            &mut self.cbuf,
            h.seq.wrapping_add(1),
            user,
            cu.auth_plugin.as_deref(),
            &cu.auth_response,
            &nonce,
            self.caps & cap::PLUGIN_AUTH != 0,
            None,
        )
        .await
        .map_err(SessionEnd::Client)?;
        let (user, seq) = match verdict {
            Ok(ok) => ok,
            Err((seq, used_password)) => {
                let e = auth::access_denied(&cu.user, &self.peer.ip().to_string(), used_password);
                let _ = write_packet(&mut self.client, seq, &e.encode()).await;
                return Ok(false);
            }
        };
        // A new session: whatever the old one held is reset and returned.
        self.finish();
        self.user = user;
        self.db = cu.database;
        self.forget_session();
        if let Some(c) = cu.collation {
            self.collation = c as u8;
        }
        self.key = pool_key(&self.user, self.caps, self.collation);
        self.status = status::AUTOCOMMIT;
        if self.db.is_some() {
            if let Err(e) = self.ensure_backend(true).await {
                let _ = write_packet(&mut self.client, seq, &e.encode()).await;
                return Ok(false);
            }
            self.maybe_release();
        }
        write_packet(&mut self.client, seq, &ok_packet(self.status))
            .await
            .map_err(SessionEnd::Client)?;
        Ok(true)
    }
}

enum RelayError {
    Client(io::Error),
    Backend(String),
}

fn malformed(what: &str) -> ErrPacket {
    ErrPacket::new(
        errcode::ER_HANDSHAKE_ERROR,
        "08S01",
        format!("Malformed packet: {what}"),
    )
}
