//! The driver of one client connection: it owns the client socket and the backend lease,
//! feeds the sans-IO login machine and session (`crate::session`), and relays responses.
//!
//! A client holds a backend connection only while it needs one: from a command to the end of
//! the response that leaves it outside a transaction with nothing pinned. Before a borrowed
//! connection serves the client, the session's replay plan gives it the client's state; after
//! a statement, what session tracking does not report is read back in the same round trip
//! (a query pipelined after the statement); before the connection goes back, the client's
//! warning list is read and one-shots meant for it alone are cleared.

mod backend;
mod client;
mod phase;
mod relay;
mod split;
mod steps;

use phase::{drive_phase, login, Via};

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
use crate::rt::pooled;
use crate::serving::connect::Connect;
use crate::serving::execute::Execute as ServeExecute;
use crate::serving::forward::{Forward, Pong, Refuse, ResetConnection};
use crate::serving::prepare::Prepare;
use crate::serving::query::Query;
use crate::serving::stmt_command::{CloseStatement, StatementCommand};
use crate::serving::{Cx, Flow, Got, Step, NO_STATEMENT};
use crate::session::answer::{patch_row, splice_rows, PrepareCapture};
use crate::session::borrowing::Replayed;
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
use crate::session::statement_watch::StatementWatch;
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
    /// The session ends here: the client was told why (a login to a database that does
    /// not exist).
    #[error("ended, the client told why")]
    Ended,
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
    /// The user's share of the connections (looked up at the first borrow).
    tenant: Option<Arc<crate::tenants::Tenant>>,
    /// A split endpoint's routing (`read_write_split`).
    split: Option<Box<split::SplitRoute<D>>>,
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
    split: Option<(crate::routing::Split, Rc<CorePool<D>>)>,
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
    let via = Via { tls, endpoint };
    serve_in_span::<D>(shared, pool, client, peer, via, conn_id, split)
        .instrument(span)
        .await
}

async fn serve_in_span<D: Driver>(
    shared: Arc<ProxyShared>,
    pool: Rc<CorePool<D>>,
    mut client: D::Stream,
    peer: SocketAddr,
    via: Via,
    conn_id: u32,
    split: Option<(crate::routing::Split, Rc<CorePool<D>>)>,
) {
    let endpoint = via.endpoint.clone();
    let (in_use, _count) = shared.count_client();
    let _open = endpoint.connected();
    if in_use > shared.config().proxy.max_client_connections {
        let e = ErrPacket::new(errcode::ER_CON_COUNT_ERROR, "08004", "Too many connections");
        let _ = write_packet(&mut client, 0, &e.encode()).await;
        tracing::warn!(%peer, "refused a client: max_client_connections reached");
        return;
    }
    // Each stage's future lives in a pooled block only while it runs (see `rt::pooled`):
    // the session's task stays the size of its idle state.
    let Some((mut conn, seq)) = pooled(login::<D>(
        shared.clone(),
        pool,
        client,
        peer,
        conn_id,
        via,
        split,
    ))
    .await
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
    if !pooled(conn.connected(seq)).await {
        return;
    }
    endpoint.setup_succeeded.fetch_add(1, Ordering::Relaxed);
    conn.run().await;
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

impl<D: Driver> Conn<D> {
    /// Ends the connection phase: OK, or the error that refuses the client's database.
    async fn connected(&mut self, seq: u8) -> bool {
        // Like MariaDB, a login to a database that does not exist is refused.
        if self.drive(&mut Connect::new(seq), None).await.is_err() {
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

    /// The command loop. It borrows the session (taking it by value would keep two copies
    /// of `Conn` in the task, the argument and the moved local).
    async fn run(&mut self) {
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
            let timed = command::is_statement(byte).then(crate::rt::time::now);
            self.timing = timed.is_some();
            // Enhanced query logging: the statement's text, read before it is consumed.
            let logged = match (timed, self.shared.query_log.until()) {
                (Some(_), Some(_)) => self.statement_text(byte, h),
                _ => None,
            };
            // A statement that will run on a connection borrowed for it alone is kept, to be
            // sent again if it does not run (see `SessionEnd::Retry`).
            let writer = self.pool.shared.route == Route::Writer || self.split.is_some();
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
                    pooled(self.drive(&mut Refuse::new(h.seq, e), Some(h))).await
                }
                (None, Command::ChangeUser) => match self.change_user_on_writer(h).await {
                    Ok(true) => Ok(()),
                    Ok(false) => {
                        // Refused (and told) before anything reached the backend.
                        self.busy = false;
                        break;
                    }
                    Err(e) => Err(e),
                },
                (None, cmd) => pooled(self.serve_command(cmd, h)).await,
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
            self.routed_done(succeeded);
            if let Some(t) = timed {
                self.statement_done(
                    crate::rt::time::now().saturating_duration_since(t),
                    succeeded,
                    logged,
                );
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
        let mut idle = Idle::new(wait, rest, MAX_PAYLOAD, holds, crate::rt::time::now());
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
                        _ = crate::rt::time::sleep_until(d) => return,
                        _ = slot.woken() => continue,
                    }
                }
                slot.woken().await;
            }
        };
        tokio::pin!(stop);
        let end = loop {
            let h = match idle.on_bytes(self.cbuf.filled(), crate::rt::time::now()) {
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
            let by = deadline;
            match read_by(&mut self.client, &mut self.cbuf, by, stop.as_mut()).await {
                Ok(0) => break idle.on_closed(),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    let now = crate::rt::time::now();
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
        if !matches!(cmd, Command::Query | Command::Execute) {
            self.use_writer();
        }
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
}
