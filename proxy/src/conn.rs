//! The client session loop: glue between the client socket, the protocol core, the users
//! and this core's pool.

use crate::auth::{self, Decision, User};
use crate::io::{read_packet, read_packet_by, write_packet, Buf, Driver, PacketTooLarge, Stream};
use crate::mysql::auth::{new_nonce, Plugin, SHA2_FAST_AUTH_OK};
use crate::mysql::command::{classify, may_change_database, Disposition, ResponseKind};
use crate::mysql::consts::{cap, com, errcode, status};
use crate::mysql::handshake::{encode_auth_switch, ChangeUser, HandshakeResponse, ServerHandshake};
use crate::mysql::packet::{complete_packet, Header};
use crate::mysql::response::{ResponseTracker, Step};
use crate::mysql::wire::{ok_packet, ErrPacket};
use crate::mysql::MAX_PAYLOAD;
use crate::pool::backend::Database;
use crate::pool::{BorrowError, CorePool, PoolKey, Pooled};
use crate::runtime::ProxyShared;
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

/// One client connection.
struct Session<D: Driver> {
    shared: Arc<ProxyShared>,
    pool: Rc<CorePool<D>>,
    client: D::Stream,
    cbuf: Buf,
    peer: SocketAddr,
    /// Capabilities agreed with the client.
    caps: u32,
    collation: u8,
    nonce: [u8; 20],
    user: Arc<User>,
    /// The client's default database (replayed when it gets a backend connection).
    db: Option<Vec<u8>>,
    backend: Option<Pooled<D::Stream>>,
    status: u16,
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
    let mut seq = h.seq.wrapping_add(1);
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
            let msg = format!("Bad handshake: {e}");
            let _ = write_packet(
                &mut client,
                seq,
                &ErrPacket::new(errcode::ER_HANDSHAKE_ERROR, "08S01", msg).encode(),
            )
            .await;
            return None;
        }
    };
    let caps = resp.capabilities & offered;
    let user = shared.users.get(&resp.user);
    let can_switch = caps & cap::PLUGIN_AUTH != 0;
    tracing::trace!(%peer, plugin = ?resp.auth_plugin.as_deref().map(String::from_utf8_lossy), answer_len = resp.auth_response.len(), "client login");
    let mut decision = auth::first_answer(
        user.as_deref(),
        resp.auth_plugin.as_deref(),
        can_switch,
        &nonce,
        &resp.auth_response,
    );
    let mut used_password = !resp.auth_response.is_empty();
    if let Decision::Switch(plugin) = decision {
        write_packet(&mut client, seq, &encode_auth_switch(plugin.name(), &nonce))
            .await
            .ok()?;
        let h = read_packet_by(&mut client, &mut cbuf, HANDSHAKE_LIMIT, Some(deadline))
            .await
            .ok()?;
        let answer = &cbuf.filled()[4..h.total()];
        used_password = !answer.is_empty();
        decision = auth::verify(user.as_deref(), plugin, &nonce, answer);
        cbuf.consume(h.total());
        seq = h.seq.wrapping_add(1);
    }
    let user = match (decision, user) {
        (Decision::Accept(plugin), Some(u)) => {
            if plugin == Plugin::CachingSha2 {
                seq = write_packet(&mut client, seq, &[0x01, SHA2_FAST_AUTH_OK])
                    .await
                    .ok()?;
            }
            u
        }
        _ => {
            let host = peer.ip().to_string();
            tracing::info!(%peer, user = %String::from_utf8_lossy(&resp.user), "access denied");
            let e = auth::access_denied(&resp.user, &host, used_password);
            let _ = write_packet(&mut client, seq, &e.encode()).await;
            return None;
        }
    };
    let s = Session {
        shared,
        pool,
        client,
        cbuf,
        peer,
        caps,
        collation: resp.collation,
        nonce,
        user,
        db: resp.database,
        backend: None,
        status: status::AUTOCOMMIT,
    };
    Some((s, seq))
}

impl<D: Driver> Session<D> {
    /// Ends the connection phase: OK, or the error that refuses the client's database.
    async fn connected(&mut self, seq: u8) -> bool {
        if self.db.is_some() {
            // Like MariaDB, refuse the login when the database does not exist.
            if let Err(e) = self.ensure_backend().await {
                let _ = write_packet(&mut self.client, seq, &e.encode()).await;
                self.finish();
                return false;
            }
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

    fn key(&self) -> PoolKey {
        PoolKey {
            backend: self.user.backend.clone(),
            behaviour: self.caps & cap::BEHAVIOUR,
            collation: self.collation,
        }
    }

    /// Makes sure this session holds a backend connection on its default database.
    /// The error is the packet to send to the client.
    async fn ensure_backend(&mut self) -> Result<(), ErrPacket> {
        if self.backend.is_some() {
            return Ok(());
        }
        let key = self.key();
        let mut conn = self
            .pool
            .borrow(&key, self.db.as_deref())
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
        if let Some(db) = self.db.clone() {
            match conn.use_database(Some(&db)).await {
                Ok(Ok(())) => {}
                Ok(Err(server_err)) => {
                    self.pool.release(conn);
                    return Err(server_err);
                }
                Err(e) => {
                    self.pool
                        .discard(conn, "failed while selecting the database");
                    return Err(ErrPacket::new(
                        errcode::PROXY_BACKEND_UNAVAILABLE,
                        "08S01",
                        format!("(dbproxy) database connection failed: {e}"),
                    ));
                }
            }
        }
        self.backend = Some(conn);
        Ok(())
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
            let command = self.cbuf.filled().get(4).copied();
            let outcome = match command.map(classify) {
                None => self.discard_command(h).await.and(
                    self.reply_err(h.seq, malformed("empty command packet"))
                        .await,
                ),
                Some(Disposition::Quit) => break,
                Some(Disposition::ChangeUser) => match self.change_user(h).await {
                    Ok(true) => Ok(()),
                    Ok(false) => break,
                    Err(e) => Err(e),
                },
                Some(Disposition::Refuse) => {
                    let msg = format!(
                        "Unknown command {:#04x} (not served through dbproxy)",
                        command.unwrap_or(0)
                    );
                    self.discard_command(h).await.and(
                        self.reply_err(
                            h.seq,
                            ErrPacket::new(errcode::ER_UNKNOWN_COM_ERROR, "08S01", msg),
                        )
                        .await,
                    )
                }
                Some(Disposition::Forward(kind)) => self.forward(h, kind).await,
            };
            if let Err(e) = outcome {
                tracing::debug!(peer = %self.peer, "session ends: {e}");
                break;
            }
            self.cbuf.shrink(CLIENT_BUF);
        }
        self.finish();
    }

    /// Gives the backend connection back (reset in the background) when it is at a
    /// command boundary; a connection mid-response was already discarded.
    fn finish(&mut self) {
        if let Some(conn) = self.backend.take() {
            self.pool.release(conn);
        }
    }

    async fn reply_err(&mut self, seq: u8, e: ErrPacket) -> Result<(), SessionEnd> {
        write_packet(&mut self.client, seq.wrapping_add(1), &e.encode())
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

    /// Forwards one command and relays its response.
    async fn forward(&mut self, h: Header, kind: ResponseKind) -> Result<(), SessionEnd> {
        if let Err(e) = self.ensure_backend().await {
            self.discard_command(h).await?;
            return self.reply_err(h.seq, e).await;
        }
        let payload = &self.cbuf.filled()[4..h.total()];
        let command = payload[0];
        let init_db = (command == com::INIT_DB).then(|| payload[1..].to_vec());
        if may_change_database(payload) {
            if let Some(b) = self.backend.as_mut() {
                b.database = Database::Unknown;
            }
        }
        self.send_command(h).await?;
        if kind == ResponseKind::None {
            return Ok(());
        }
        let tracker = self.relay_response(kind).await?;
        if let Some(flags) = tracker.status() {
            self.status = flags;
            if let (Some(db), Some(b)) = (init_db, self.backend.as_mut()) {
                b.database = Database::Known(db.clone());
                self.db = Some(db);
            }
        }
        Ok(())
    }

    /// Sends the command packet(s) in `cbuf` to the backend, enforcing max_allowed_packet.
    async fn send_command(&mut self, mut h: Header) -> Result<(), SessionEnd> {
        let limit = self.shared.config.proxy.max_allowed_packet;
        let mut total = 0u64;
        loop {
            total += h.len as u64;
            if total > limit {
                let e = ErrPacket::new(
                    errcode::ER_NET_PACKET_TOO_LARGE,
                    "08S01",
                    "Got a packet bigger than 'max_allowed_packet' bytes",
                );
                self.drop_backend();
                let _ = self.reply_err(h.seq, e).await;
                return Err(SessionEnd::Client(io::Error::new(
                    io::ErrorKind::InvalidData,
                    PacketTooLarge(total as usize),
                )));
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

    /// Relays the backend's response to the client, packet boundaries tracked, bytes
    /// unchanged, complete packets written in batches.
    async fn relay_response(&mut self, kind: ResponseKind) -> Result<ResponseTracker, SessionEnd> {
        let Some(mut b) = self.backend.take() else {
            return Err(SessionEnd::Backend("no backend connection".into()));
        };
        let mut tracker = ResponseTracker::new(kind, b.caps);
        let res = self.relay_with(&mut b, &mut tracker).await;
        match res {
            Ok(()) => {
                b.conn.buf.shrink(crate::pool::backend::BACKEND_BUF);
                self.backend = Some(b);
                Ok(tracker)
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
    ) -> Result<(), RelayError> {
        loop {
            // Walk the complete packets already buffered.
            let mut scanned = 0;
            let mut step = Step::More;
            while step == Step::More {
                let Some(h) = complete_packet(&b.conn.buf.filled()[scanned..]) else {
                    break;
                };
                let start = scanned + 4;
                step = tracker
                    .feed(h, &b.conn.buf.filled()[start..start + h.len])
                    .map_err(|e| RelayError::Backend(e.to_string()))?;
                scanned += h.total();
            }
            if scanned > 0 {
                self.client
                    .write(&mut b.conn.buf, scanned)
                    .await
                    .map_err(RelayError::Client)?;
            }
            match step {
                Step::Done => return Ok(()),
                Step::LocalInfile => {
                    self.relay_infile(b).await?;
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
        let can_switch = self.caps & cap::PLUGIN_AUTH != 0;
        let nonce = self.nonce;
        let mut decision = auth::first_answer(
            user.as_deref(),
            cu.auth_plugin.as_deref(),
            can_switch,
            &nonce,
            &cu.auth_response,
        );
        let mut used_password = !cu.auth_response.is_empty();
        let mut seq = h.seq.wrapping_add(1);
        if let Decision::Switch(plugin) = decision {
            write_packet(
                &mut self.client,
                seq,
                &encode_auth_switch(plugin.name(), &nonce),
            )
            .await
            .map_err(SessionEnd::Client)?;
            let h2 = read_packet(&mut self.client, &mut self.cbuf, HANDSHAKE_LIMIT)
                .await
                .map_err(SessionEnd::Client)?;
            let answer = &self.cbuf.filled()[4..h2.total()];
            used_password = !answer.is_empty();
            decision = auth::verify(user.as_deref(), plugin, &nonce, answer);
            self.cbuf.consume(h2.total());
            seq = h2.seq.wrapping_add(1);
        }
        let user = match (decision, user) {
            (Decision::Accept(plugin), Some(u)) => {
                if plugin == Plugin::CachingSha2 {
                    seq = write_packet(&mut self.client, seq, &[0x01, SHA2_FAST_AUTH_OK])
                        .await
                        .map_err(SessionEnd::Client)?;
                }
                u
            }
            _ => {
                let e = auth::access_denied(&cu.user, &self.peer.ip().to_string(), used_password);
                let _ = write_packet(&mut self.client, seq, &e.encode()).await;
                return Ok(false);
            }
        };
        // A new session: the old backend connection is reset and returned.
        self.finish();
        self.user = user;
        self.db = cu.database;
        if let Some(c) = cu.collation {
            self.collation = c as u8;
        }
        self.status = status::AUTOCOMMIT;
        if self.db.is_some() {
            if let Err(e) = self.ensure_backend().await {
                let _ = write_packet(&mut self.client, seq, &e.encode()).await;
                return Ok(false);
            }
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
