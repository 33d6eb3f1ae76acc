//! The driver of one client connection: it owns the client socket and the backend lease,
//! feeds the sans-IO login machine and session (`crate::session`), and relays responses.
//!
//! A client holds a backend connection only while it needs one: from a command to the end of
//! the response that leaves it outside a transaction with nothing pinned. Before a borrowed
//! connection serves the client, the session's replay plan gives it the client's state; after
//! a statement, what session tracking does not report is read back in the same round trip
//! (a query pipelined after the statement); before the connection goes back, the client's
//! warning list is read and one-shots meant for it alone are cleared.

use crate::backend_script as script;
use crate::clients::{ClientSlot, Registration};
use crate::io::{
    read_by, read_packet_by, read_watching_peer, write_by, write_packet, Buf, Driver, GaveUp,
    PacketTooLarge, Stream,
};
use crate::mysql::auth::new_nonce;
use crate::mysql::command::ResponseKind;
use crate::mysql::consts::{cap, com, errcode, status};
use crate::mysql::packet::{seal, Header, HEADER_LEN};
use crate::mysql::response::End;
use crate::mysql::resultset::{Packets, TextResult};
use crate::mysql::stmt;
use crate::mysql::wire::{ok_packet, ErrPacket};
use crate::mysql::MAX_PAYLOAD;
use crate::pool::{kill_running_query, CorePool, PoolKey, Pooled};
use crate::serving::execute::Execute as ServeExecute;
use crate::serving::forward::{Forward, Pong, Refuse, ReleaseOnly, ResetConnection};
use crate::serving::prepare::Prepare;
use crate::serving::query::Query;
use crate::serving::stmt_command::{CloseStatement, StatementCommand};
use crate::serving::{Cx, Flow, Got, Readiness, Ready, Step, NO_STATEMENT};
use crate::session::answer::{patch_row, splice_rows, PrepareCapture};
use crate::session::borrowing::{unavailable, Borrowing, Replayed};
use crate::session::command::{self, malformed, Command, IdleLimit, NoCommand};
use crate::session::connection_phase::{
    Action, ConnectionPhase, End as LoginEnd, Input, HANDSHAKE_LIMIT,
};
use crate::session::execute;
use crate::session::idle::{Heard, Idle};
use crate::session::kill::{self, Kill, Target as KillTarget, Verdict};
use crate::session::login::{Accepted, Agreed, ClientTls, Profile};
use crate::session::pins::PinReason;
use crate::session::plan::Relay as PlanRelay;
use crate::session::relaying::{
    rewritten_answer, Alarm, Context as AnswerContext, Failure, Next, Relaying,
};
use crate::session::sql::SqlInfo;
use crate::session::state::{Needs, Replay};
use crate::session::{ClientSession, Outcome, PinChanges, ReadBack, Tracked};
use crate::shared::ProxyShared;
use crate::stats::{EndpointStats, GaugeGuard};
use crate::topology::Route;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

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
    /// The backend connection failed during a command; the client got an error packet for
    /// it and the session goes on (its state replayed on the next connection).
    #[error("backend connection lost: {0}")]
    Lost(String),
    /// The backend connection failed after the client got its answer (while dbproxy read
    /// the session state back): the session goes on; a transaction or pins it had are
    /// gone, which its next command is told.
    #[error("backend connection lost after a statement: {0}")]
    LostAfter(String),
    /// The command never ran (its connection failed before it was sent, or the writer
    /// refused it as read-only): it is served again once the topology allows.
    #[error("command to be sent again")]
    Retry,
}

/// The clients a KILL may name: every client of dbproxy by greeting id, and by database
/// thread id the clients of this pool's group.
struct KillScope<'a> {
    sessions: &'a crate::clients::Clients,
    group: &'a str,
}

impl kill::Clients for KillScope<'_> {
    type Client = Arc<ClientSlot>;
    fn by_greeting(&self, id: u64) -> Option<Arc<ClientSlot>> {
        self.sessions.get(id)
    }
    fn holding_thread(&self, thread_id: u64) -> Option<Arc<ClientSlot>> {
        self.sessions.holding(self.group, thread_id)
    }
    fn user(&self, c: &Arc<ClientSlot>) -> String {
        c.user()
    }
    fn id(&self, c: &Arc<ClientSlot>) -> u32 {
        c.id
    }
}

/// One client connection.
struct Conn<D: Driver> {
    shared: Arc<ProxyShared>,
    pool: Rc<CorePool<D>>,
    client: D::Stream,
    cbuf: Buf,
    /// Reused for the payload of commands dbproxy reads whole and for the packets it
    /// builds for the backend, so that no statement allocates.
    cmd: Vec<u8>,
    built: Vec<u8>,
    /// A command dbproxy built for the client's, waiting for its flow to send it.
    to_send: Option<Vec<u8>>,
    peer: SocketAddr,
    nonce: [u8; 20],
    /// The pool key of the client's user, capabilities and collation.
    key: PoolKey,
    s: ClientSession,
    backend: Option<Pooled<D::Stream>>,
    /// This session in the process-wide registry (KILL finds it there).
    reg: Registration,
    /// A command is being served: if the session ends now, its backend connection is in
    /// an unknown state (maybe mid-statement) and is discarded, its thread killed.
    busy: bool,
    /// The command being served, kept while it may be sent again (see [`SessionEnd::Retry`]);
    /// `retryable` says whether it was kept.
    retry: Vec<u8>,
    retryable: bool,
    /// An error the client's next command gets instead of running: its transaction was
    /// lost after its previous statement was answered.
    pending: Option<ErrPacket>,
    /// The endpoint the client came through (its counters).
    endpoint: Arc<EndpointStats>,
    /// Counted in its pool's `in_transaction` gauge.
    in_tx: bool,
    /// A client statement is being served: the database's response time is measured.
    timing: bool,
    /// When the statement went to the database (until its first response packet).
    db_sent: Option<std::time::Instant>,
}

/// Every exit path, a panic included, gives the backend connection back and ends the
/// client's pins.
impl<D: Driver> Drop for Conn<D> {
    fn drop(&mut self) {
        if self.busy {
            if let Some(b) = self.backend.take() {
                self.pool
                    .discard(b, "the session ended in the middle of a command");
            }
        }
        self.finish();
    }
}

/// Serves one accepted client connection to its end; `tls` is what its endpoint allows.
/// Everything it logs carries a `client` span: its connection id, address, endpoint and
/// (once logged in) user.
pub async fn serve<D: Driver>(
    shared: Arc<ProxyShared>,
    pool: Rc<CorePool<D>>,
    client: D::Stream,
    peer: SocketAddr,
    tls: ClientTls,
    endpoint: Arc<EndpointStats>,
) {
    use tracing::Instrument;
    let conn_id = shared.next_connection_id();
    let span = tracing::info_span!(
        "client",
        id = conn_id,
        %peer,
        endpoint = %endpoint.name,
        user = tracing::field::Empty
    );
    serve_in_span::<D>(shared, pool, client, peer, tls, endpoint, conn_id)
        .instrument(span)
        .await
}

async fn serve_in_span<D: Driver>(
    shared: Arc<ProxyShared>,
    pool: Rc<CorePool<D>>,
    mut client: D::Stream,
    peer: SocketAddr,
    tls: ClientTls,
    endpoint: Arc<EndpointStats>,
    conn_id: u32,
) {
    let in_use = shared.clients.fetch_add(1, Ordering::AcqRel) + 1;
    let _count = ClientCount(&shared);
    let _open = endpoint.connected();
    if in_use > shared.config().proxy.max_client_connections {
        let e = ErrPacket::new(errcode::ER_CON_COUNT_ERROR, "08004", "Too many connections");
        let _ = write_packet(&mut client, 0, &e.encode()).await;
        tracing::warn!(%peer, "refused a client: max_client_connections reached");
        return;
    }
    let via = Via {
        tls,
        endpoint: endpoint.clone(),
    };
    let Some((mut conn, seq)) = login::<D>(shared.clone(), pool, client, peer, conn_id, via).await
    else {
        return;
    };
    tracing::Span::current().record("user", conn.s.user.name.as_str());
    let _tls_count = conn
        .client
        .is_tls()
        .then(|| GaugeGuard::new(&endpoint.tls_clients));
    // Waiting for a backend connection is bounded by connection_borrow_timeout, not by
    // the handshake timeout.
    if !conn.connected(seq).await {
        return;
    }
    endpoint.setup_succeeded.fetch_add(1, Ordering::Relaxed);
    conn.run().await;
}

struct ClientCount<'a>(&'a ProxyShared);
impl Drop for ClientCount<'_> {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The pool key of a login: its backend credentials and what it negotiated.
fn pool_key(s: &ClientSession) -> PoolKey {
    PoolKey::new(
        s.user.backend.clone(),
        s.caps & cap::BEHAVIOUR & !cap::SESSION_TRACK,
        s.ext_caps,
        s.collation,
    )
}

/// The endpoint a client came through: what TLS it allows, its counters.
struct Via {
    tls: ClientTls,
    endpoint: Arc<EndpointStats>,
}

/// The connection phase, driving [`ConnectionPhase`]: reads, writes, the TLS handshake,
/// token verification and the waits it asks for. Returns the connection and the sequence
/// id of the final OK.
async fn login<D: Driver>(
    shared: Arc<ProxyShared>,
    pool: Rc<CorePool<D>>,
    mut client: D::Stream,
    peer: SocketAddr,
    conn_id: u32,
    Via { tls, endpoint }: Via,
) -> Option<(Conn<D>, u8)> {
    let tls = if shared.tls.is_some() {
        tls
    } else {
        ClientTls::Off
    };
    let profile = {
        let p = pool.shared.profile.read();
        Profile {
            version: p.version.clone(),
            capabilities: p.capabilities,
            ext_capabilities: p.ext_capabilities,
            collation: p.collation,
        }
    };
    let handshake_timeout = shared.config().proxy.handshake_timeout;
    let now = std::time::Instant::now();
    let mut phase = ConnectionPhase::start(
        &profile,
        conn_id,
        new_nonce(),
        peer.ip(),
        tls,
        handshake_timeout,
        now,
    );
    let mut cbuf = Buf::with_capacity(CLIENT_BUF);
    let (a, ok_seq) = drive_phase::<D>(
        &mut phase,
        &mut client,
        &mut cbuf,
        &shared,
        peer,
        Some(&endpoint),
    )
    .await?;
    let mut s = ClientSession::new(a.user, a.caps, a.collation, a.database);
    s.ext_caps = a.ext_caps;
    s.exclude_variable_sets = pool.shared.settings().exclude_variable_sets;
    let origin = crate::clients::Origin {
        // A Unix socket client is known by the socket it came through.
        peer: (!endpoint.listen.starts_with("unix:")).then_some(peer),
        endpoint: Some(endpoint.clone()),
        tls: client.is_tls(),
        since: crate::stats::unix_now(),
    };
    let slot = ClientSlot::with_origin(conn_id, &s.user.name, &pool.shared.id, origin);
    let conn = Conn {
        reg: shared.sessions.register(slot),
        busy: false,
        key: pool_key(&s),
        shared,
        pool,
        client,
        cbuf,
        cmd: Vec::new(),
        built: Vec::new(),
        to_send: None,
        peer,
        nonce: phase.nonce(),
        s,
        backend: None,
        retry: Vec::new(),
        retryable: false,
        pending: None,
        endpoint,
        in_tx: false,
        timing: false,
        db_sent: None,
    };
    Some((conn, ok_seq))
}

/// Drives a [`ConnectionPhase`] over `client`: reads, writes, the TLS handshake, token
/// verification and the waits it asks for. `Some`: the client proved who it is; the final
/// OK, at the sequence id given, is the caller's to send. `None`: the phase ended without
/// that, the client was told and the reason logged. `endpoint` counts refused credentials
/// (a login's; a COM_CHANGE_USER's are not a connection's setup).
async fn drive_phase<D: Driver>(
    phase: &mut ConnectionPhase,
    client: &mut D::Stream,
    cbuf: &mut Buf,
    shared: &ProxyShared,
    peer: SocketAddr,
    endpoint: Option<&EndpointStats>,
) -> Option<(Accepted, u8)> {
    let deadline = tokio::time::Instant::from_std(phase.deadline());
    loop {
        let Some(action) = phase.poll_action() else {
            // No deadline: the phase is over (its last action was taken).
            let input_at = phase.poll_timeout().map(tokio::time::Instant::from_std)?;
            if !phase.wants_packet() {
                // The throttle holds the verdict.
                tokio::time::sleep_until(input_at).await;
                phase.handle(
                    Input::Timer,
                    std::time::Instant::now(),
                    &shared.users(),
                    &shared.throttle,
                );
                continue;
            }
            let read = read_packet_by(client, cbuf, HANDSHAKE_LIMIT, Some(input_at)).await;
            let input = match read {
                Ok(h) => Input::Packet {
                    seq: h.seq,
                    payload: &cbuf.filled()[4..h.total()],
                },
                Err(e) if e.kind() == io::ErrorKind::TimedOut => Input::Timer,
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    tracing::debug!(%peer, "client left during the handshake: {e}");
                    Input::Malformed
                }
                Err(e) => {
                    tracing::debug!(%peer, "client left during the handshake: {e}");
                    return None;
                }
            };
            let consumed = match &input {
                Input::Packet { payload, .. } => payload.len() + 4,
                _ => 0,
            };
            phase.handle(
                input,
                std::time::Instant::now(),
                &shared.users(),
                &shared.throttle,
            );
            cbuf.consume(consumed);
            continue;
        };
        match action {
            Action::Send { seq, payload } => {
                write_packet(client, seq, &payload).await.ok()?;
            }
            Action::StartTls => {
                // Whatever came after the SSLRequest is the start of the TLS handshake.
                let early = cbuf.filled().to_vec();
                cbuf.consume(early.len());
                let result = match shared.tls.as_ref() {
                    // Boxed: the handshake's state (rustls's connection among it) lives on
                    // the heap while it runs, not in every session's future.
                    Some(server) => Box::pin(client.accept_tls(server.config(), &early, deadline))
                        .await
                        .map(|agreed| {
                            tracing::debug!(%peer, version = agreed.version, cipher = %agreed.cipher, "client TLS handshake done");
                        })
                        .map_err(|e| e.to_string()),
                    None => Err("no TLS configured".into()),
                };
                let counter = match result {
                    Ok(()) => &shared.tls_stats.client_handshakes,
                    Err(_) => &shared.tls_stats.client_handshake_failures,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                let now = std::time::Instant::now();
                phase.handle(
                    Input::Secured(result),
                    now,
                    &shared.users(),
                    &shared.throttle,
                );
            }
            Action::VerifyToken { user, token } => {
                let verdict =
                    tokio::time::timeout_at(deadline, verify_token(shared, peer, user, token));
                let ok = verdict.await.unwrap_or(false);
                let now = std::time::Instant::now();
                phase.handle(
                    Input::TokenVerdict(ok),
                    now,
                    &shared.users(),
                    &shared.throttle,
                );
            }
            Action::Close { end, reply } => {
                // The reason is logged before the client is told, so that the line is
                // there for whoever reads the log once the client has its error.
                match end {
                    LoginEnd::Timeout => {
                        let limit = shared.config().proxy.handshake_timeout;
                        tracing::info!(%peer, "client did not log in within handshake_timeout ({limit:?})");
                    }
                    LoginEnd::Denied(log) => {
                        if let Some(endpoint) = endpoint {
                            endpoint.setup_failed_auth.fetch_add(1, Ordering::Relaxed);
                        }
                        tracing::info!(%peer, "{log}");
                    }
                    LoginEnd::Refused(log) => tracing::info!(%peer, "{log}"),
                    LoginEnd::TlsFailed(e) => {
                        tracing::info!(%peer, "TLS handshake with a client failed: {e}");
                    }
                    LoginEnd::BadHandshake => {}
                }
                if let Some(r) = reply {
                    write_packet(client, r.seq, &r.payload).await.ok()?;
                }
                return None;
            }
            Action::Accepted { accepted, ok_seq } => return Some((accepted, ok_seq)),
        }
    }
}

/// Verifies a token a client logs in with; the verdict (a refusal is logged with its
/// reason, never the token).
async fn verify_token(
    shared: &ProxyShared,
    peer: SocketAddr,
    user: Arc<crate::auth::User>,
    token: crate::auth::Token,
) -> bool {
    let name = user.name.clone();
    let Some(v) = shared.tokens.as_ref() else {
        tracing::info!(%peer, user = %name, "a token was sent, and no token login is configured");
        return false;
    };
    // Boxed: token logins are rare, and idle sessions' futures stay small.
    match Box::pin(v.verify(user, token.0)).await {
        Ok(who) => {
            tracing::info!(%peer, user = %name, identity = %who, "token login");
            true
        }
        Err(why) => {
            tracing::info!(%peer, user = %name, "token refused: {why}");
            false
        }
    }
}

impl<D: Driver> Conn<D> {
    /// Ends the connection phase: OK, or the error that refuses the client's database.
    async fn connected(&mut self, seq: u8) -> bool {
        if self.s.state.schema.is_some() {
            // Like MariaDB, refuse the login when the database does not exist.
            if let Err(e) = self.ensure_backend(Needs::default(), true).await {
                let _ = write_packet(&mut self.client, seq, &e.encode()).await;
                return false;
            }
            if self.maybe_release().await.is_err() {
                return false;
            }
        }
        if write_packet(&mut self.client, seq, &ok_packet(self.s.status))
            .await
            .is_err()
        {
            return false;
        }
        tracing::debug!(peer = %self.peer, user = %self.s.user.name, "client logged in");
        true
    }

    fn count(&self, c: PinChanges) {
        let stats = &self.pool.shared.stats;
        for r in c.started {
            tracing::debug!(peer = %self.peer, reason = r.name(), "client pinned");
            stats.pin_started(r);
        }
        for r in c.ended {
            stats.pin_ended(r);
        }
    }

    /// Makes sure this session holds a backend connection; with `replay`, one whose
    /// session state is the client's (for a statement that `needs`). The error is the
    /// packet to send to the client.
    async fn ensure_backend(&mut self, needs: Needs, replay: bool) -> Result<(), ErrPacket> {
        self.ready_backend(Borrowing::new(needs, replay, false))
            .await
            .map(drop)
    }

    /// Drives [`Ready`]: borrows, runs replays, and returns what it decided.
    async fn ready_backend(&mut self, m: Borrowing) -> Result<Option<Replay>, ErrPacket> {
        let mut ready = Ready::new(m);
        let mut got = Got::Start;
        loop {
            let held = self.backend.as_mut().map(|b| &mut b.conn.session);
            let mut cx = Cx::new(&mut self.s, held);
            let step = match ready.step(&mut cx, got) {
                Readiness::Step(step) => step,
                Readiness::Ready(ahead) => return Ok(ahead),
                Readiness::Failed(e) => return Err(e),
            };
            got = self
                .carry_out(step, None)
                .await
                .map_err(|e| unavailable(&e.to_string()))?;
        }
    }

    /// Reads the answer to a replay sent ahead and records what it set.
    async fn finish_ahead(&mut self, plan: Replay, seq: u8) -> Result<(), SessionEnd> {
        let Some(b) = self.backend.as_mut() else {
            return Err(SessionEnd::Backend("no backend connection".into()));
        };
        match b.conn.read_response(ResponseKind::Query).await {
            Ok(Ok(_)) => {
                plan.done(&mut b.conn.session);
                Ok(())
            }
            Ok(Err(e)) => {
                // Not expected (user variables, last_insert_id and insert_id are always
                // accepted); the connection's state is unknown now: reset before reuse.
                tracing::error!(peer = %self.peer, thread_id = b.thread_id, "a replay sent ahead was refused: {e}");
                self.start_pin(PinReason::Unclassified);
                Ok(())
            }
            Err(e) => Err(self.backend_lost(seq, &e.to_string()).await),
        }
    }

    /// Runs a replay on its own on the held connection.
    async fn run_replay(&mut self, plan: Replay, needs: Needs) -> Replayed {
        let Some(mut b) = self.backend.take() else {
            return Replayed::Broken("no database connection".into());
        };
        let init = self.pool.shared.init_query.clone();
        let s = &self.s;
        match b
            .conn
            .replay(plan, |bs| s.replay(bs, needs, true), &init)
            .await
        {
            Ok(Ok(())) => {
                self.backend = Some(b);
                Replayed::Done
            }
            Ok(Err(server_err)) => {
                // Half a replay may have run: the connection is reset before anyone reuses it.
                self.pool.release(b);
                Replayed::Refused(server_err)
            }
            Err(e) => {
                self.pool.lost(b, "failed while restoring a session");
                Replayed::Broken(e.to_string())
            }
        }
    }

    /// Gives the backend connection back at a transaction boundary with nothing pinned,
    /// after reading the client's warning list and clearing one-shots meant for it alone.
    async fn maybe_release(&mut self) -> Result<(), SessionEnd> {
        self.drive(&mut ReleaseOnly::default(), None).await
    }

    /// Drives a command's flow (`serving`): carries out each step it asks for and tells it
    /// how the step went. `h`: the client's command, in `cbuf`.
    async fn drive(&mut self, flow: &mut dyn Flow, h: Option<Header>) -> Result<(), SessionEnd> {
        let mut got = Got::Start;
        // The command was read whole (into `cmd`).
        let mut read = false;
        loop {
            let mut cx = self.cx(h, read);
            let step = flow.next(&mut cx, got);
            let pins = std::mem::take(&mut cx.pins);
            self.count(pins);
            if step == Step::Done {
                return Ok(());
            }
            read |= step == Step::ReadCommand;
            got = self.carry_out(step, h).await?;
        }
    }

    /// What a flow sees: the session, the held connection's, and the client's command
    /// (`h`, in `cbuf`; in `cmd` once `read` whole).
    fn cx(&mut self, h: Option<Header>, read: bool) -> Cx<'_> {
        let (held, stmts) = match self.backend.as_mut() {
            Some(b) => {
                let c = &mut *b.conn;
                (Some(&mut c.session), Some(&mut c.stmts))
            }
            None => (None, None),
        };
        let mut cx = Cx::new(&mut self.s, held);
        cx.held_stmts = stmts;
        cx.command = match h {
            _ if read => &self.cmd,
            Some(h) => self
                .cbuf
                .filled()
                .get(HEADER_LEN..h.total())
                .unwrap_or_default(),
            None => &[],
        };
        cx
    }

    /// Carries out one step of a flow; `h`: the client's command, in `cbuf`.
    async fn carry_out(&mut self, step: Step<'_>, h: Option<Header>) -> Result<Got, SessionEnd> {
        Ok(match step {
            Step::Done => Got::Start,
            Step::Borrow => self.borrow().await,
            // Boxed, as the other rare steps: a replay on its own or sent ahead, the
            // warnings captured, a rewritten answer, a read-back, the release steps.
            Step::Replay { plan, needs } => Box::pin(self.replay_step(plan, needs)).await,
            Step::SendCommand => {
                self.send_command(client_command(h)?).await?;
                Got::Sent
            }
            Step::DropCommand => {
                self.discard_command(client_command(h)?).await?;
                Got::Dropped
            }
            Step::ReadCommand => {
                self.cmd = self.take_command(client_command(h)?).await?;
                Got::Read
            }
            Step::SendRead { seq } => {
                let mut out = self.start_built();
                out.extend_from_slice(&self.cmd);
                self.send_built(out, seq).await?;
                Got::Sent
            }
            Step::SendCommandAs { id } => self.send_command_as(client_command(h)?, id).await?,
            Step::Command { payload, kind } => self.own_command(&payload, kind).await,
            Step::SendQuery { sql, seq } => {
                self.send_query(&sql, seq).await?;
                Got::Sent
            }
            Step::PrepareStatement { cid, seq } => {
                Got::Prepared(self.backend_statement(cid, seq).await?)
            }
            Step::BuildExecute { ex } => self.build_execute(&ex)?,
            Step::SendBuilt { seq } => {
                let Some(out) = self.to_send.take() else {
                    return Err(SessionEnd::Backend("no command built to send".into()));
                };
                self.send_built(out, seq).await?;
                Got::Sent
            }
            Step::FinishAhead { plan, seq } => {
                Box::pin(self.finish_ahead(plan, seq)).await?;
                Got::AheadDone
            }
            Step::CaptureWarnings { seq, drop_command } => {
                if let Err(e) = Box::pin(self.capture_warnings(seq)).await {
                    if drop_command {
                        self.discard_command(client_command(h)?).await?;
                    }
                    return Err(e);
                }
                Got::Captured
            }
            Step::Relay { kind, info } => {
                let (outcome, tracked) = self.relay_response(kind, &info, None).await?;
                Got::Relayed(outcome, tracked)
            }
            Step::RelayRewritten { kind, rewrite, seq } => {
                Box::pin(self.relay_rewritten(kind, rewrite, seq)).await?
            }
            Step::RelayPrepare(mut capture) => {
                let relayed = self
                    .relay_response(ResponseKind::Prepare, &NO_STATEMENT, Some(&mut capture))
                    .await?;
                Got::PrepareRelayed(relayed.0, capture)
            }
            Step::ReadBack { rb, sent, seq } => {
                if sent {
                    Box::pin(self.learn_read_back(&rb)).await?;
                } else {
                    Box::pin(self.read_back_now(&rb, seq)).await?;
                }
                Got::ReadBack
            }
            Step::Tell { seq, payload } => {
                write_packet(&mut self.client, seq, &payload)
                    .await
                    .map_err(SessionEnd::Client)?;
                Got::Told
            }
            Step::Release(steps) => Got::Released(Box::pin(self.release_steps(steps)).await),
            Step::CheckIn => {
                if let Some(b) = self.backend.take() {
                    self.pool.checkin_clean(b);
                }
                Got::CheckedIn
            }
            Step::CheckInReset => {
                if let Some(conn) = self.backend.take() {
                    self.pool.release(conn);
                }
                Got::CheckedIn
            }
        })
    }

    /// A replay on its own on the held connection.
    async fn replay_step(&mut self, plan: Replay, needs: Needs) -> Got {
        let r = self.run_replay(plan, needs).await;
        if let Replayed::Broken(why) = &r {
            tracing::debug!(peer = %self.peer, "a connection failed while the session was restored: {why}");
        }
        Got::Replayed(r)
    }

    /// The client's command (one packet, `h`) with the held connection's statement `id`.
    async fn send_command_as(&mut self, h: Header, id: u32) -> Result<Got, SessionEnd> {
        if let Some(payload) = self.cbuf.filled_mut().get_mut(HEADER_LEN..h.total()) {
            stmt::patch_stmt_id(payload, id);
        }
        self.send_command(h).await?;
        Ok(Got::Sent)
    }

    /// A command of dbproxy's on the held connection; one that fails is discarded.
    async fn own_command(&mut self, payload: &[u8], kind: ResponseKind) -> Got {
        let Some(b) = self.backend.as_mut() else {
            return Got::Answered(false);
        };
        let fine = b.conn.command(payload, kind).await.is_ok();
        if !fine {
            self.drop_backend();
        }
        Got::Answered(fine)
    }

    /// The client's execute built for the held connection, kept for [`Step::SendBuilt`].
    fn build_execute(&mut self, ex: &crate::session::execute::Execute) -> Result<Got, SessionEnd> {
        let mut out = self.start_built();
        let Some(b) = self.backend.as_mut() else {
            return Err(SessionEnd::Backend("no backend connection".into()));
        };
        match execute::build(&mut self.s, ex, &self.cmd, &mut b.conn.stmts, &mut out) {
            Ok(()) => {
                self.to_send = Some(out);
                Ok(Got::Built(Ok(())))
            }
            Err(execute::BuildError::NotPrepared) => Err(SessionEnd::Backend(
                "statement vanished from the backend cache".into(),
            )),
            Err(execute::BuildError::Malformed(e)) => {
                self.built = out;
                Ok(Got::Built(Err(malformed(&e))))
            }
        }
    }

    /// A small answer collected and changed as `rewrite` says.
    async fn relay_rewritten(
        &mut self,
        kind: ResponseKind,
        rewrite: PlanRelay,
        seq: u8,
    ) -> Result<Got, SessionEnd> {
        let binary = kind == ResponseKind::Execute;
        let (outcome, tracked) = match rewrite {
            PlanRelay::PatchRow(values) => {
                self.relay_buffered(kind, seq, |r, caps| patch_row(r, &values, binary, caps))
                    .await?
            }
            PlanRelay::Splice(rows) => {
                self.relay_buffered(kind, seq, |r, caps| splice_rows(r, &rows, binary, caps))
                    .await?
            }
            PlanRelay::Stream => self.relay_response(kind, &NO_STATEMENT, None).await?,
        };
        Ok(Got::Relayed(outcome, tracked))
    }

    /// Borrows a connection for the client, which then holds it.
    async fn borrow(&mut self) -> Got {
        let lent = self
            .pool
            .borrow(&self.key, self.s.state.schema.as_deref())
            .await;
        match lent {
            Ok(mut conn) => {
                conn.hold(&self.reg.slot);
                tracing::trace!(thread_id = conn.thread_id, "borrowed");
                self.backend = Some(conn);
                Got::Lent
            }
            Err(e) => {
                tracing::warn!(peer = %self.peer, "{e}");
                Got::Refused(e.told())
            }
        }
    }

    /// Runs the steps before the held connection goes back; a connection they fail on is
    /// discarded.
    async fn release_steps(
        &mut self,
        steps: crate::session::Release,
    ) -> Result<Option<crate::mysql::resultset::TextResult>, String> {
        let Some(b) = self.backend.as_mut() else {
            return Err("no database connection".into());
        };
        match b.conn.run(script::Release::new(steps)).await {
            Ok(warnings) => {
                if let Some(w) = &warnings {
                    tracing::debug!(
                        thread_id = b.thread_id,
                        rows = w.rows.len(),
                        "warnings captured"
                    );
                }
                Ok(warnings)
            }
            Err(e) => {
                tracing::debug!(peer = %self.peer, "giving a connection back failed: {e}");
                if let Some(b) = self.backend.take() {
                    self.pool.discard(b, "failed while giving it back");
                }
                Err(e.to_string())
            }
        }
    }

    /// Reads the next packet of something the client has begun (the rest of a command, a
    /// file for LOAD DATA, an authentication answer): a client silent for
    /// `net_read_timeout` there is given up (`TimedOut`), as MariaDB does.
    async fn read_more(&mut self, limit: usize) -> io::Result<Header> {
        let wait = self.shared.config().proxy.net_read_timeout;
        let deadline = tokio::time::Instant::now() + wait;
        read_packet_by(&mut self.client, &mut self.cbuf, limit, Some(deadline)).await
    }

    /// Tells the client the server is going away (dbproxy drains), as MariaDB's shutdown
    /// error; the session then ends. Sent with sequence id 1, so that a client that sends
    /// its next command reads it as that command's answer.
    async fn going_away(&mut self) {
        let e = command::going_away();
        let _ = write_packet(&mut self.client, 1, &e.encode()).await;
    }

    async fn run(mut self) {
        let slot = self.reg.slot.clone();
        let mut retries = 0;
        while !slot.is_killed() {
            let Some(h) = self.next_command(&slot).await else {
                break;
            };
            if let Some(e) = command::out_of_order(h) {
                tracing::info!(peer = %self.peer, seq = h.seq, "a command not numbered 0: closing the client");
                let _ = write_packet(&mut self.client, h.seq.wrapping_add(1), &e.encode()).await;
                break;
            }
            let _active = crate::io::Active::enter();
            self.busy = true;
            let byte = command::command_byte(self.cbuf.filled(), h);
            let timed = command::is_statement(byte).then(std::time::Instant::now);
            self.timing = timed.is_some();
            // Enhanced query logging: the statement's text, read before it is consumed.
            let logged = match (timed, self.shared.query_log.until()) {
                (Some(_), Some(_)) => self.statement_text(byte, h),
                _ => None,
            };
            // A statement that will run on a connection borrowed for it alone is kept, to be
            // sent again if it does not run (see `SessionEnd::Retry`).
            let writer = self.pool.shared.route == Route::Writer;
            let held = self.backend.is_some();
            self.retryable = command::retryable(self.cbuf.filled(), h, held, writer, retries);
            if self.retryable {
                self.retry.clear();
                self.retry
                    .extend_from_slice(&self.cbuf.filled()[..h.total()]);
            }
            let cmd = command::dispatch(self.cbuf.filled(), h, held);
            let outcome = match (self.pending.take(), cmd) {
                (_, Command::Quit) => {
                    // Nothing in flight: the connection goes back as the session left it.
                    self.busy = false;
                    break;
                }
                // A connection lost after an answer: the next command is told, and dropped.
                (Some(e), _) | (None, Command::Refuse(e)) => {
                    self.drive(&mut Refuse::new(h.seq, e), Some(h)).await
                }
                (None, Command::ChangeUser) => match self.change_user(h).await {
                    Ok(true) => Ok(()),
                    Ok(false) => {
                        // Refused (and told) before anything reached the backend.
                        self.busy = false;
                        break;
                    }
                    Err(e) => Err(e),
                },
                (None, cmd) => self.serve_command(cmd, h).await,
            };
            let succeeded = outcome.is_ok();
            match outcome {
                Ok(()) => retries = 0,
                Err(SessionEnd::Retry) if self.retryable => {
                    // Nothing reached the client: the command goes again, as it came.
                    retries += 1;
                    tracing::debug!(peer = %self.peer, retries, "sending a command again");
                    self.cbuf.unread(&self.retry);
                    self.busy = false;
                    continue;
                }
                Err(SessionEnd::LostAfter(why)) => {
                    retries = 0;
                    tracing::warn!(peer = %self.peer, "database connection lost after a statement was answered ({why}); the client stays");
                    let held = !self.s.releasable();
                    let told = self.connection_lost(&why);
                    if held {
                        self.pending = Some(told);
                    }
                }
                Err(SessionEnd::Lost(why)) => {
                    retries = 0;
                    tracing::info!(peer = %self.peer, "statement failed with its database connection ({why}); the client stays");
                    self.connection_lost(&why);
                }
                Err(e) => {
                    tracing::debug!(peer = %self.peer, "session ends: {e}");
                    break;
                }
            }
            if let Some(t) = timed {
                self.statement_done(t.elapsed(), succeeded, logged);
            }
            self.command_done();
        }
    }

    /// Waits for the client's next command (its first packet whole in `cbuf`): None when
    /// the session ends instead (the client left, went idle past its limit or half-sent a
    /// command, the session was killed, dbproxy drains), the client told why if it can be.
    /// While dbproxy is PAUSEd, a session holding no connection waits here with its
    /// command.
    async fn next_command(&mut self, slot: &ClientSlot) -> Option<Header> {
        // Draining: a session that holds nothing (no transaction, no pin) ends now.
        if self.shared.is_draining() && self.backend.is_none() {
            self.going_away().await;
            return None;
        }
        // Read each time: a reload may change them.
        let (wait, rest) = {
            let cfg = self.shared.config();
            let p = &cfg.proxy;
            let wait = command::idle_wait(
                p.idle_client_timeout,
                p.idle_transaction_timeout,
                self.in_tx,
            );
            (wait, p.net_read_timeout)
        };
        let holds = self.backend.is_some();
        let mut idle = Idle::new(wait, rest, MAX_PAYLOAD, holds, std::time::Instant::now());
        let shared = self.shared.clone();
        // The read also ends when the session is killed, or when a drain starts (for a
        // session in a transaction: at the drain's deadline). Both wake the slot.
        let stop = async {
            loop {
                if slot.is_killed() {
                    return;
                }
                if shared.is_draining() {
                    let Some(d) = shared.drain_deadline().filter(|_| holds) else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::time::sleep_until(d) => return,
                        _ = slot.woken() => continue,
                    }
                }
                slot.woken().await;
            }
        };
        tokio::pin!(stop);
        let end = loop {
            let h = match idle.on_bytes(self.cbuf.filled(), std::time::Instant::now()) {
                Heard::Command(h) => return self.unless_paused(h, slot).await,
                Heard::TooLarge(n) => {
                    tracing::debug!(peer = %self.peer, "client read failed: {}", PacketTooLarge(n));
                    break idle.on_closed();
                }
                Heard::Partial => Header::parse(self.cbuf.filled()),
            };
            let room = h.map_or(4096, |h| h.total().saturating_sub(self.cbuf.len()));
            self.cbuf.reserve(room.max(1));
            let deadline = idle.poll_timeout();
            let by = deadline.map(tokio::time::Instant::from_std);
            match read_by(&mut self.client, &mut self.cbuf, by, stop.as_mut()).await {
                Ok(0) => break idle.on_closed(),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    let now = std::time::Instant::now();
                    let now = deadline.map_or(now, |d| now.max(d));
                    break idle.on_timer(now).unwrap_or(NoCommand::Stalled);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    break match slot.is_killed() {
                        true => idle.on_killed(),
                        false => NoCommand::Draining {
                            in_transaction: holds,
                        },
                    };
                }
                Err(e) => {
                    tracing::debug!(peer = %self.peer, "client read failed: {e}");
                    break idle.on_closed();
                }
            }
        };
        match end {
            NoCommand::Killed => tracing::debug!(peer = %self.peer, "session killed"),
            NoCommand::Draining {
                in_transaction: true,
            } => {
                tracing::info!(peer = %self.peer, user = %self.s.user.name, "shutdown_timeout: closing a client still in a transaction");
            }
            NoCommand::Stalled => {
                tracing::info!(peer = %self.peer, "net_read_timeout: the client sent part of a command and went silent");
            }
            NoCommand::Idle(IdleLimit::Transaction) => {
                tracing::info!(peer = %self.peer, user = %self.s.user.name, "idle_transaction_timeout: closing a client idle in a transaction (rolled back)");
            }
            NoCommand::Draining { .. } | NoCommand::Idle(IdleLimit::Client) | NoCommand::Left => {}
        }
        if let Some((seq, told)) = end.told() {
            let _ = write_packet(&mut self.client, seq, &told.encode()).await;
        }
        None
    }

    /// PAUSE: a session between transactions waits with its command (KILL and the drain
    /// still end it).
    async fn unless_paused(&mut self, h: Header, slot: &ClientSlot) -> Option<Header> {
        if self.backend.is_none() && self.shared.is_paused() {
            let _held = GaugeGuard::new(&self.shared.held);
            tokio::select! {
                _ = self.shared.resumed() => {}
                _ = slot.killed() => return None,
            }
        }
        Some(h)
    }

    /// Serves a command [`command::dispatch`] chose (QUIT, CHANGE_USER and refusals are
    /// the caller's).
    async fn serve_command(&mut self, cmd: Command, h: Header) -> Result<(), SessionEnd> {
        match cmd {
            Command::Query => self.query(h).await,
            Command::ProcessKill(id) => {
                self.discard_command(h).await?;
                let target = KillTarget::Thread(u64::from(id));
                let k = Kill {
                    query_only: false,
                    target,
                };
                self.kill(h.seq, k).await
            }
            Command::ResetConnection => self.drive(&mut ResetConnection::new(h.seq), Some(h)).await,
            Command::Prepare => {
                let most = self
                    .shared
                    .config()
                    .proxy
                    .max_prepared_statements_per_client;
                let mut flow = Prepare::new(h.seq, most, self.s.stmts.len());
                self.drive(&mut flow, Some(h)).await
            }
            Command::Execute => self.execute(h).await,
            Command::StatementCommand => {
                let cx = self.cx(Some(h), false);
                match StatementCommand::new(h.seq, &cx) {
                    Ok(mut flow) => self.drive(&mut flow, Some(h)).await,
                    Err(mut refused) => self.drive(&mut refused, Some(h)).await,
                }
            }
            Command::CloseStatement => {
                let mut flow = CloseStatement::new(&self.cx(Some(h), false));
                self.drive(&mut flow, Some(h)).await
            }
            Command::Pong => self.drive(&mut Pong::new(h.seq), Some(h)).await,
            Command::Forward { kind, track } => {
                let set_option = self.cbuf.filled().get(4) == Some(&com::SET_OPTION);
                let mut flow = Forward::new(h.seq, kind, track, set_option);
                self.drive(&mut flow, Some(h)).await
            }
            Command::Refuse(e) => self.drive(&mut Refuse::new(h.seq, e), Some(h)).await,
            Command::Quit | Command::ChangeUser => Ok(()),
        }
    }

    /// A statement was served in `took`: counted, timed, and logged when the query log is
    /// on.
    fn statement_done(&mut self, took: std::time::Duration, ok: bool, text: Option<String>) {
        self.reg.slot.queries.fetch_add(1, Ordering::Relaxed);
        self.endpoint.queries.add(1);
        self.endpoint.query_latency.observe(took);
        let now = || crate::stats::unix_now() as u64;
        if let Some(text) = text.filter(|_| self.shared.query_log.active(now)) {
            tracing::info!(
                target: "dbproxy::query",
                user = %self.s.user.name,
                duration_us = took.as_micros() as u64,
                ok,
                statement = %text,
                "statement"
            );
        }
    }

    /// Between commands: the transaction gauge kept, per-command flags cleared, large
    /// buffers given back.
    fn command_done(&mut self) {
        self.timing = false;
        self.db_sent = None;
        self.note_transaction();
        self.retryable = false;
        self.busy = false;
        self.cbuf.shrink(CLIENT_BUF);
        for v in [&mut self.cmd, &mut self.built] {
            if v.capacity() > CLIENT_BUF {
                *v = Vec::new();
            }
        }
    }

    /// The text of the statement in `cbuf` (header `h`) for the query log, literals
    /// blanked: a COM_QUERY's own, or the prepared statement a COM_STMT_EXECUTE runs.
    fn statement_text(&self, command: Option<u8>, h: Header) -> Option<String> {
        let payload = self.cbuf.filled().get(5..h.total())?;
        match command? {
            com::QUERY => Some(crate::session::querylog::redacted(payload)),
            com::STMT_EXECUTE | com::STMT_BULK_EXECUTE => {
                let id = payload.get(..4)?;
                let id = u32::from_le_bytes([id[0], id[1], id[2], id[3]]);
                let cid = self.s.stmts.resolve(id)?;
                let sql = &self.s.stmts.get(cid)?.key.sql;
                Some(format!(
                    "EXECUTE {}",
                    crate::session::querylog::redacted(sql)
                ))
            }
            _ => None,
        }
    }

    /// Keeps the pool's `in_transaction` gauge: this session holds a connection in an
    /// open transaction.
    fn note_transaction(&mut self) {
        let now = self.backend.is_some() && self.s.status & status::IN_TRANS != 0;
        if now != self.in_tx {
            self.in_tx = now;
            let d = if now { 1 } else { -1 };
            self.pool
                .shared
                .stats
                .in_transaction
                .fetch_add(d, Ordering::Relaxed);
        }
    }

    /// The session is over: its backend connection goes back, reset if the client left
    /// anything behind (a transaction, pins, one-shots meant for it).
    fn finish(&mut self) {
        if std::mem::take(&mut self.in_tx) {
            self.pool
                .shared
                .stats
                .in_transaction
                .fetch_sub(1, Ordering::Relaxed);
        }
        let clean = self
            .backend
            .as_ref()
            .is_some_and(|b| self.s.clean_at_end(&b.conn.session));
        let ended = self.s.pins.clear();
        self.count(PinChanges {
            started: Vec::new(),
            ended,
        });
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
            &ok_packet(self.s.status),
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
            h = self
                .read_more(MAX_PAYLOAD)
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
            if payload.len() as u64 > self.shared.config().proxy.max_allowed_packet {
                return Err(self.too_large(h.seq, payload.len()).await);
            }
            if !h.continues() {
                return Ok(payload);
            }
            h = self
                .read_more(MAX_PAYLOAD)
                .await
                .map_err(SessionEnd::Client)?;
        }
    }

    async fn too_large(&mut self, seq: u8, total: usize) -> SessionEnd {
        let e = command::too_large();
        self.drop_backend();
        let _ = self.reply_err(seq, e).await;
        SessionEnd::Client(io::Error::new(
            io::ErrorKind::InvalidData,
            PacketTooLarge(total),
        ))
    }

    /// A command that failed before reaching the server: the error goes to the client.
    async fn refuse(&mut self, seq: u8, e: ErrPacket) -> Result<(), SessionEnd> {
        let c = self.s.command_refused();
        self.count(c);
        self.reply_err(seq, e).await
    }

    /// COM_QUERY: a KILL is served here; any other statement by its flow (`serving::query`).
    async fn query(&mut self, h: Header) -> Result<(), SessionEnd> {
        let sql = self.cbuf.filled().get(5..h.total()).unwrap_or_default();
        if let Some(k) = kill::parse(sql) {
            self.discard_command(h).await?;
            // Boxed, as the rare steps of a statement are.
            return Box::pin(self.kill(h.seq, k)).await;
        }
        let mut flow = Query::new(h.seq, sql, h.continues());
        self.drive(&mut flow, Some(h)).await?;
        self.note_temp_tables(flow.info());
        Ok(())
    }

    /// `KILL [QUERY | CONNECTION] id` and COM_PROCESS_KILL, with the id of a client's
    /// greeting: the statement running for that client is killed where it runs (the
    /// backend connection stays and serves others), and for a connection kill the client
    /// is closed. Only the same dbproxy user's clients may be killed.
    async fn kill(&mut self, seq: u8, k: Kill) -> Result<(), SessionEnd> {
        let clients = KillScope {
            sessions: &self.shared.sessions,
            group: &self.pool.shared.id,
        };
        let verdict = kill::decide(&k, self.reg.slot.id, &self.s.user.name, &clients);
        let (target, id, query_only) = match verdict {
            Verdict::Refuse(e) => return self.reply_err(seq, e).await,
            Verdict::Own { connection, told } => {
                self.s.diag.after_statement(
                    &SqlInfo::default(),
                    End::Ok {
                        affected: 0,
                        warnings: 0,
                    },
                );
                if connection {
                    self.reg.slot.kill();
                }
                return self.reply_err(seq, told).await;
            }
            Verdict::Other {
                client,
                id,
                query_only,
            } => (client, id, query_only),
        };
        self.s.diag.after_statement(
            &SqlInfo::default(),
            End::Ok {
                affected: 0,
                warnings: 0,
            },
        );
        self.kill_statement_of(&target).await;
        if !query_only {
            target.kill();
        }
        tracing::info!(peer = %self.peer, target = id, query_only, "KILL");
        self.reply_ok(seq).await
    }

    /// Kills the statement running for `target` now, if any, from a connection of its own
    /// (the pool may be saturated by the very statement to kill). The query id is read
    /// while the lease is unchanged, so only that statement can be hit: once it ended, its
    /// id names nothing.
    async fn kill_statement_of(&self, target: &ClientSlot) {
        let before = target.serving();
        let Some(thread) = before.thread_id else {
            return;
        };
        let Some(group) = self.shared.groups.get(&target.group) else {
            return;
        };
        let Some(addr) = group.topology.load().addr(before.target).cloned() else {
            return;
        };
        let login = self.s.user.backend.clone();
        let still = || target.serving() == before;
        if let Err(e) = kill_running_query::<D>(group, &addr, login, thread, still).await {
            tracing::warn!(peer = %self.peer, "KILL: cannot reach the database: {e}");
        }
    }

    /// Resolves once the monitor marks `target` down (checked every [`crate::io::PEER_CHECK`]).
    fn target_down(&self, target: usize) -> impl std::future::Future<Output = ()> + 'static {
        let topology = self.pool.shared.topology.clone();
        async move {
            while !topology.load().is_down(target) {
                tokio::time::sleep(crate::io::PEER_CHECK).await;
            }
        }
    }

    /// Sends a read-back on its own (not pipelined) and learns from it, keeping the
    /// client's warnings if the read-back would clear them.
    async fn read_back_now(&mut self, rb: &ReadBack, seq: u8) -> Result<(), SessionEnd> {
        if rb.names_tables() && self.s.diag.needs_capture() {
            self.capture_warnings(seq).await?;
        }
        self.send_read_back(Some(rb), seq).await?;
        self.learn_read_back(rb).await
    }

    /// Reads the client's warning list from the connection it holds (`SHOW WARNINGS` leaves
    /// the list and the counts as they are).
    async fn capture_warnings(&mut self, seq: u8) -> Result<(), SessionEnd> {
        let Some(b) = self.backend.as_mut() else {
            return Err(SessionEnd::Backend("no backend connection".into()));
        };
        match b.conn.query_result("SHOW WARNINGS").await {
            Ok(Ok(w)) => {
                self.s.diag.captured(&w);
                Ok(())
            }
            Ok(Err(e)) => {
                tracing::warn!(peer = %self.peer, "SHOW WARNINGS failed: {e}");
                Ok(())
            }
            Err(e) => Err(self.backend_lost(seq, &e.to_string()).await),
        }
    }

    /// Writes a pipelined read-back query to the backend.
    async fn send_read_back(&mut self, rb: Option<&ReadBack>, seq: u8) -> Result<(), SessionEnd> {
        match rb {
            Some(rb) => self.send_query(rb.sql.as_bytes(), seq).await,
            None => Ok(()),
        }
    }

    /// Reads the answer to a read-back sent earlier and learns from it.
    async fn learn_read_back(&mut self, rb: &ReadBack) -> Result<(), SessionEnd> {
        let Some(mut b) = self.backend.take() else {
            return Err(SessionEnd::Backend("no backend connection".into()));
        };
        // A target that hangs after answering the statement (frozen, black-holed) would hold
        // this read until internal_query_timeout: it ends sooner when the monitor finds the
        // target down.
        let down = self.target_down(b.target);
        match b.conn.read_text_result_until(down).await {
            Ok(answer) => {
                let c = self
                    .s
                    .learn_read_back(rb, answer.as_ref(), &mut b.conn.session);
                self.count(c);
                self.backend = Some(b);
                Ok(())
            }
            Err(e) => {
                // The client has its answer; what its statement left in the session that
                // only this read would have told is lost with the connection.
                self.pool.lost(b, "lost while reading session state back");
                Err(SessionEnd::LostAfter(e.to_string()))
            }
        }
    }

    /// Remembers the temporary tables a statement creates (the test-only check-in
    /// verification looks for them on connections checked in clean).
    fn note_temp_tables(&self, info: &SqlInfo) {
        if !self.pool.shared.verify_checkin || info.temp_tables.is_empty() {
            return;
        }
        let mut names = self.pool.shared.temp_tables.lock();
        for t in &info.temp_tables {
            if t.contains(&b'.') {
                names.insert(t.clone());
            } else if let Some(db) = &self.s.state.schema {
                let mut n =
                    format!("`{}`.", String::from_utf8_lossy(db).replace('`', "``")).into_bytes();
                n.extend_from_slice(t);
                names.insert(n);
            }
        }
    }

    /// Sends the command packet(s) in `cbuf` to the backend, enforcing max_allowed_packet.
    async fn send_command(&mut self, mut h: Header) -> Result<(), SessionEnd> {
        let limit = self.shared.config().proxy.max_allowed_packet;
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
                if let Some(again) = self.unsent() {
                    return Err(again);
                }
                if h.continues() {
                    // The rest of the command is on its way: read it before answering.
                    self.drop_backend();
                    loop {
                        let next = self
                            .read_more(MAX_PAYLOAD)
                            .await
                            .map_err(SessionEnd::Client)?;
                        self.cbuf.consume(next.total());
                        if !next.continues() {
                            break;
                        }
                    }
                }
                return Err(self.backend_lost(h.seq, &e.to_string()).await);
            }
            if !h.continues() {
                self.sent_statement();
                return Ok(());
            }
            h = match self.read_more(MAX_PAYLOAD).await {
                Ok(h) => h,
                Err(e) => {
                    // Half a command went to the backend: it cannot be reused.
                    self.drop_backend();
                    return Err(SessionEnd::Client(e));
                }
            };
        }
    }

    /// Sends a COM_QUERY dbproxy wrote (a rewritten statement or a read-back).
    async fn send_query(&mut self, sql: &[u8], seq: u8) -> Result<(), SessionEnd> {
        let mut out = self.start_built();
        out.push(com::QUERY);
        out.extend_from_slice(sql);
        self.send_built(out, seq).await
    }

    /// An empty vector to build a command in, [`HEADER_LEN`] bytes reserved for its header;
    /// hand it to [`Self::send_built`].
    fn start_built(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.built);
        out.clear();
        out.resize(HEADER_LEN, 0);
        out
    }

    /// Sends a command dbproxy built (from [`Self::start_built`]) to the backend; `seq` is
    /// the client's sequence id, for the error it may get.
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
            if let Some(again) = self.unsent() {
                return Err(again);
            }
            return Err(self.backend_lost(seq, &e.to_string()).await);
        }
        self.sent_statement();
        Ok(())
    }

    /// A client statement (or what dbproxy sends for it) went to the database: its
    /// response time runs from now to the first packet back.
    fn sent_statement(&mut self) {
        if self.timing && self.db_sent.is_none() {
            self.db_sent = Some(std::time::Instant::now());
        }
    }

    /// The first response packet to a timed statement arrived.
    fn first_response(&mut self) {
        if let Some(t) = self.db_sent.take() {
            self.timing = false;
            self.pool.shared.stats.db_latency.observe(t.elapsed());
        }
    }

    /// Reads a small response whole, changes it with `transform`, and sends it to the client.
    async fn relay_buffered(
        &mut self,
        kind: ResponseKind,
        seq: u8,
        transform: impl FnOnce(&TextResult, u32) -> Packets,
    ) -> Result<(Outcome, Tracked), SessionEnd> {
        let Some(mut b) = self.backend.take() else {
            return Err(SessionEnd::Backend("no backend connection".into()));
        };
        // The client's statement: query_timeout (closing the connection ends the
        // statement: these answers are small), or the target found down.
        let limit = b.conn.limits.statement;
        let deadline = limit.map(|t| tokio::time::Instant::now() + t);
        let down = self.target_down(b.target);
        let packets = match b.conn.read_response_by(kind, deadline, down).await {
            Ok(p) => p,
            Err(e) => {
                let e = match (e, limit) {
                    (crate::backend_conn::BackendError::Io(e), Some(t))
                        if e.kind() == io::ErrorKind::TimedOut =>
                    {
                        crate::backend_conn::overdue("query_timeout", t).into()
                    }
                    (e, _) => e,
                };
                self.pool.lost(b, "failed during a statement");
                return Err(self.client_told_backend_lost(seq, &e.to_string()).await);
            }
        };
        let caps = b.caps;
        self.backend = Some(b);
        self.first_response();
        let (bytes, outcome) = rewritten_answer(packets, caps, transform);
        let mut buf = Buf::from_vec(bytes);
        let n = buf.len();
        self.client
            .write(&mut buf, n)
            .await
            .map_err(SessionEnd::Client)?;
        Ok((outcome, Tracked::default()))
    }

    /// Relays the backend's response to the client: bytes unchanged except OK packets for
    /// clients without session tracking and the statement id of OK_stmt, complete packets
    /// written in batches. Session tracking is learnt on the way (`session::relaying`
    /// decides; this reads, writes and keeps the clock).
    async fn relay_response(
        &mut self,
        kind: ResponseKind,
        info: &SqlInfo,
        mut prepare: Option<&mut PrepareCapture>,
    ) -> Result<(Outcome, Tracked), SessionEnd> {
        let Some(mut b) = self.backend.take() else {
            return Err(SessionEnd::Backend("no backend connection".into()));
        };
        let limits = b.conn.limits;
        let mut answer = Relaying::new(
            kind,
            b.caps,
            !self.s.wants_tracking(),
            self.retryable,
            limits.statement.map(|limit| (limit, limits.own)),
            std::time::Instant::now(),
        );
        let res = self
            .relay_with(&mut b, &mut answer, info, prepare.as_deref_mut())
            .await;
        match res {
            Ok(()) => {
                b.conn.buf.shrink(crate::backend_conn::BACKEND_BUF);
                if let Some(id) = prepare.and_then(|p| p.close.take()) {
                    if let Err(e) = b.conn.close_statement(id).await {
                        self.pool
                            .discard(b, &format!("closing a statement failed: {e}"));
                        return Err(SessionEnd::Backend(e.to_string()));
                    }
                }
                let conn = &mut *b.conn;
                let done = answer.finish(AnswerContext {
                    session: &mut self.s,
                    backend: &mut conn.session,
                    backend_stmts: &mut conn.stmts,
                    caps: conn.caps,
                    info,
                    prepare: None,
                });
                self.backend = Some(b);
                Ok(done)
            }
            Err(RelayError::Client(e)) => {
                self.pool
                    .discard(b, &format!("the client left mid-response: {e}"));
                Err(SessionEnd::Client(e))
            }
            Err(RelayError::Failed(Failure::Backend(why))) => {
                tracing::warn!(peer = %self.peer, thread_id = b.thread_id, "backend connection lost: {why}");
                self.pool.lost(b, "failed during a statement");
                let (seq, e) = answer.told(&self.s, &why);
                write_packet(&mut self.client, seq, &e.encode())
                    .await
                    .map_err(SessionEnd::Client)?;
                Err(SessionEnd::Lost(why))
            }
            Err(RelayError::Failed(Failure::ReadOnly)) => {
                // The writer turned read-only before the monitor saw it (a switchover): the
                // statement did not run; it waits for the new writer. A read-back sent
                // behind it is still on the way: the connection is closed, not reused.
                tracing::info!(peer = %self.peer, thread_id = b.thread_id, "the writer refused a statement as read-only: waiting for a writer");
                self.pool.shared.topology.suspect(b.target);
                self.pool.close(b, "the writer turned read-only");
                Err(SessionEnd::Retry)
            }
        }
    }

    /// Drives `answer` to its end: each pass's bytes to the client (a client that takes
    /// nothing of them within net_write_timeout is given up, its database connection with
    /// it: the answer waits in no buffer of dbproxy's meanwhile), then a read from the
    /// database watched for the statement's timer, the target marked down and a client
    /// that hung up (the statement is then killed with the connection).
    async fn relay_with(
        &mut self,
        b: &mut Pooled<D::Stream>,
        answer: &mut Relaying,
        info: &SqlInfo,
        mut prepare: Option<&mut PrepareCapture>,
    ) -> Result<(), RelayError> {
        let net_write = self.shared.config().proxy.net_write_timeout;
        loop {
            let conn = &mut *b.conn;
            let cx = AnswerContext {
                session: &mut self.s,
                backend: &mut conn.session,
                backend_stmts: &mut conn.stmts,
                caps: conn.caps,
                info,
                prepare: prepare.as_deref_mut(),
            };
            let pass = answer.on_backend(cx, conn.buf.filled_mut(), std::time::Instant::now())?;
            if pass.bytes > 0 {
                if self.db_sent.is_some() {
                    self.first_response();
                }
                let by = tokio::time::Instant::now() + net_write;
                match pass.rewritten {
                    Some(o) => {
                        let mut ob = Buf::from_vec(o);
                        let n = ob.len();
                        write_by(&mut self.client, &mut ob, n, by)
                            .await
                            .map_err(RelayError::Client)?;
                        b.conn.buf.consume(pass.bytes);
                    }
                    None => write_by(&mut self.client, &mut b.conn.buf, pass.bytes, by)
                        .await
                        .map_err(RelayError::Client)?,
                }
            }
            match pass.next {
                Next::Done => return Ok(()),
                Next::Infile => {
                    // The command holds its backend connection anyway; counted for the record.
                    let shared = self.pool.shared.clone();
                    shared.stats.pin_started(PinReason::LoadData);
                    let r = self.relay_infile(b, answer).await;
                    shared.stats.pin_ended(PinReason::LoadData);
                    r?;
                }
                Next::Read { want } => {
                    b.conn.buf.reserve(want);
                    self.read_answer(b, answer).await?;
                }
            }
        }
    }

    /// One read of the answer from the database, watched (see [`Conn::relay_with`]).
    async fn read_answer(
        &mut self,
        b: &mut Pooled<D::Stream>,
        answer: &mut Relaying,
    ) -> Result<(), RelayError> {
        let conn = &mut *b.conn;
        let group = &self.pool.shared;
        let target = b.target;
        let (thread_id, login) = (conn.thread_id, &b.key.backend);
        let (peer, limit) = (self.peer, conn.limits.statement.unwrap_or_default());
        let mut gave_up = None;
        let watch = || {
            if group.topology.load().is_down(target) {
                return Some(GaveUp::TargetDown);
            }
            match answer.on_timer(std::time::Instant::now())? {
                Alarm::GiveUp(f) => {
                    let why = f.to_string();
                    gave_up = Some(f);
                    Some(GaveUp::Overdue(why))
                }
                Alarm::Kill => {
                    tracing::warn!(%peer, thread_id, "query_timeout ({limit:?}) passed: killing the statement");
                    let addr = group.topology.load().addr(target).cloned()?;
                    let (group, login) = (group.clone(), login.clone());
                    tokio::task::spawn_local(async move {
                        let r = kill_running_query::<D>(&group, &addr, login, thread_id, || true);
                        if let Err(e) = r.await {
                            tracing::warn!(%peer, "query_timeout: cannot reach the database to kill the statement: {e}");
                        }
                    });
                    None
                }
            }
        };
        let read = read_watching_peer(conn.stream.read(&mut conn.buf), self.client.raw_fd(), watch);
        let why = match read.await {
            Ok(Ok(0)) => None,
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => Some(e.to_string()),
            Err(GaveUp::PeerGone) => {
                return Err(RelayError::Client(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    GaveUp::PeerGone,
                )))
            }
            Err(why @ (GaveUp::TargetDown | GaveUp::Overdue(_))) => Some(why.to_string()),
        };
        Err(RelayError::Failed(
            gave_up.unwrap_or_else(|| answer.backend_closed(why)),
        ))
    }

    /// LOAD DATA LOCAL INFILE: the client streams the file as packets ended by an empty one.
    async fn relay_infile(
        &mut self,
        b: &mut Pooled<D::Stream>,
        answer: &mut Relaying,
    ) -> Result<(), RelayError> {
        loop {
            let h = self
                .read_more(MAX_PAYLOAD)
                .await
                .map_err(RelayError::Client)?;
            let step = answer.infile_packet(h);
            if !step.forward {
                self.cbuf.consume(h.total());
            } else if let Err(e) = b.conn.stream.write(&mut self.cbuf, h.total()).await {
                answer.infile_send_failed(e.to_string());
            }
            if step.last {
                return answer.infile_done().map_err(RelayError::Failed);
            }
        }
    }

    fn drop_backend(&mut self) {
        if let Some(b) = self.backend.take() {
            self.pool.discard(b, "state unknown after an error");
        }
    }

    /// The connection borrowed for a kept command failed before the command was sent:
    /// the command goes again (on another connection) instead of failing.
    fn unsent(&mut self) -> Option<SessionEnd> {
        if !self.retryable {
            return None;
        }
        if let Some(b) = self.backend.take() {
            self.pool.lost(b, "failed before a statement was sent");
        }
        Some(SessionEnd::Retry)
    }

    async fn backend_lost(&mut self, seq: u8, why: &str) -> SessionEnd {
        self.drop_backend();
        self.client_told_backend_lost(seq, why).await
    }

    async fn client_told_backend_lost(&mut self, seq: u8, why: &str) -> SessionEnd {
        let e = self.s.lost_error(why);
        if let Err(e) = write_packet(&mut self.client, seq.wrapping_add(1), &e.encode()).await {
            return SessionEnd::Client(e);
        }
        SessionEnd::Lost(why.to_string())
    }

    /// The session goes on without its failed connection and what lived only there; returns
    /// what the client is (or was) told.
    fn connection_lost(&mut self, why: &str) -> ErrPacket {
        self.drop_backend();
        let told = self.s.lost_error(why);
        let ended = self.s.connection_lost(told.code, &told.message);
        self.count(PinChanges {
            started: Vec::new(),
            ended,
        });
        told
    }

    /// Makes sure the backend has the client's statement `cid` prepared; its backend id.
    async fn backend_statement(
        &mut self,
        cid: u32,
        seq: u8,
    ) -> Result<Result<u32, ErrPacket>, SessionEnd> {
        let Some(key) = self.s.stmts.get(cid).map(|s| s.key.clone()) else {
            return Ok(Err(ErrPacket::new(
                1243,
                "HY000",
                "Unknown prepared statement handler",
            )));
        };
        let Some(b) = self.backend.as_mut() else {
            return Err(SessionEnd::Backend("no backend connection".into()));
        };
        let stats = &self.pool.shared.stats;
        if b.conn.stmts.get_mut(&key).is_some() {
            stats.stmt_cache_hits.add(1);
        } else {
            stats.stmt_reprepares.fetch_add(1, Ordering::Relaxed);
        }
        match b.conn.prepare(&key).await {
            Ok(r) => {
                self.s.backend_used();
                Ok(r)
            }
            Err(e) => Err(self.backend_lost(seq, &e.to_string()).await),
        }
    }

    /// COM_STMT_EXECUTE: read whole, then served by its flow (`serving::execute`).
    async fn execute(&mut self, h: Header) -> Result<(), SessionEnd> {
        let payload = self.take_command(h).await?;
        let read = execute::read(&self.s, &payload);
        self.cmd = payload;
        match read {
            Ok(ex) => self.drive(&mut ServeExecute::new(h.seq, ex), None).await,
            Err(e) => self.refuse(h.seq, e).await,
        }
    }

    fn start_pin(&mut self, r: PinReason) {
        if self.s.pins.start(r) {
            self.pool.shared.stats.pin_started(r);
        }
    }

    /// COM_CHANGE_USER: authenticated by dbproxy as a login is (see
    /// [`ConnectionPhase::change_user`]); the session then starts afresh. `Ok(false)`:
    /// authentication failed and the client was told; close the session.
    async fn change_user(&mut self, h: Header) -> Result<bool, SessionEnd> {
        if h.continues() {
            self.discard_command(h).await?;
            self.reply_err(h.seq, malformed("COM_CHANGE_USER too large"))
                .await?;
            return Ok(false);
        }
        let agreed = Agreed {
            caps: self.s.caps,
            ext_caps: self.s.ext_caps,
            collation: self.s.collation,
        };
        let mut phase = ConnectionPhase::change_user(
            &self.cbuf.filled()[4..h.total()],
            h.seq,
            agreed,
            self.nonce,
            self.peer.ip(),
            self.client.is_tls(),
            self.shared.config().proxy.handshake_timeout,
            std::time::Instant::now(),
            &self.shared.users(),
            &self.shared.throttle,
        );
        self.cbuf.consume(h.total());
        // Boxed: a change of user is rare, and the phase's driver would otherwise size
        // every session's future.
        let driven = Box::pin(drive_phase::<D>(
            &mut phase,
            &mut self.client,
            &mut self.cbuf,
            &self.shared,
            self.peer,
            None,
        ));
        let Some((a, seq)) = driven.await else {
            return Ok(false);
        };
        // A new session: whatever the old one held is reset and returned.
        self.finish();
        self.s.reset(a.database);
        self.reg.slot.set_user(&a.user.name);
        self.s.user = a.user;
        self.s.collation = a.collation;
        self.key = pool_key(&self.s);
        if self.s.state.schema.is_some() {
            if let Err(e) = self.ensure_backend(Needs::default(), true).await {
                let _ = write_packet(&mut self.client, seq, &e.encode()).await;
                return Ok(false);
            }
            self.maybe_release().await?;
        }
        write_packet(&mut self.client, seq, &ok_packet(self.s.status))
            .await
            .map_err(SessionEnd::Client)?;
        Ok(true)
    }
}

enum RelayError {
    Client(io::Error),
    /// The answer could not go on (`session::relaying` says why).
    Failed(Failure),
}

impl From<Failure> for RelayError {
    fn from(f: Failure) -> RelayError {
        RelayError::Failed(f)
    }
}

/// The client's command a flow's step is about.
fn client_command(h: Option<Header>) -> Result<Header, SessionEnd> {
    h.ok_or_else(|| SessionEnd::Backend("a step about the client's command without one".into()))
}
