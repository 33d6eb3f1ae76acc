//! A split endpoint's part of the driver (`read_write_split = true`): the pool that serves
//! the next statement (routing:: decides, from the statement's class, the session's state,
//! the readers' lag and the client's causal position), the causal wait's answer, the
//! client's position learnt from its writes, and `@@dbproxy_causal_position`.
//!
//! The session holds one pool at a time (`Conn::pool`) and keeps the other here: they are
//! swapped only while the client holds no connection, so that every connection goes back
//! to the pool it came from.

use super::{Conn, SessionEnd};
use crate::io::Driver;
use crate::mysql::command::ResponseKind;
use crate::mysql::consts::{errcode, status};
use crate::mysql::packet::Header;
use crate::mysql::wire::ErrPacket;
use crate::pool::CorePool;
use crate::routing::causal::{Gtid, Position, PositionStatement};
use crate::routing::classify::{self, Class};
use crate::routing::{self, Ask, Decision, Split, WriterWhy};
use crate::serving::forward::{Pong, Refuse};
use crate::serving::Got;
use std::rc::Rc;
use std::sync::atomic::Ordering;

/// The split state of one client session.
pub(crate) struct SplitRoute<D: Driver> {
    split: Split,
    /// The pool `Conn::pool` is not: the reader's while the writer's serves, and the other
    /// way round.
    other: Rc<CorePool<D>>,
    on_reader: bool,
    position: Position,
    /// The `@@last_gtid` last taken into the position.
    last_gtid: Vec<u8>,
    /// The command being served: its class, and where it went.
    class: Option<Class>,
    routed: Option<Decision>,
    /// A causal wait (or the reader) failed the command being served: it goes again, to
    /// the writer, for this reason.
    to_writer: Option<WriterWhy>,
    wait_started: Option<std::time::Instant>,
    /// The reader (target and epoch) a wait last succeeded on, and the GTIDs it had
    /// then: a later read there needs no wait for what they cover. A reader that went
    /// down comes back in another epoch, so a server rebuilt behind its old position is
    /// not taken for what it was.
    reached: Option<(usize, u64)>,
    reached_gtids: Vec<Gtid>,
}

impl<D: Driver> SplitRoute<D> {
    pub(crate) fn new(split: Split, reader: Rc<CorePool<D>>) -> SplitRoute<D> {
        SplitRoute {
            split,
            other: reader,
            on_reader: false,
            position: Position::default(),
            last_gtid: Vec::new(),
            class: None,
            routed: None,
            to_writer: None,
            wait_started: None,
            reached: None,
            reached_gtids: Vec::new(),
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl<D: Driver> Conn<D> {
    /// The writer's pool (its group's counters).
    fn writer_pool(&self) -> &Rc<CorePool<D>> {
        match &self.split {
            Some(sp) if sp.on_reader => &sp.other,
            _ => &self.pool,
        }
    }

    /// Decides where the COM_QUERY `sql` goes and puts that pool in place; returns the
    /// causal wait to send ahead of it. Nothing changes while the client holds a
    /// connection (a transaction, a pin): its statements go there. A statement of more
    /// than one packet (only the first was read) goes to the writer.
    pub(super) fn route_statement(&mut self, h: Header) -> Option<Vec<u8>> {
        let (class, hint) = {
            let sql = self.cbuf.filled().get(5..h.total()).unwrap_or_default();
            let class = if h.continues() {
                Class::Write
            } else {
                classify::classify(sql)
            };
            (class, classify::hint(sql))
        };
        self.route(class, hint)
    }

    /// [`Self::route_statement`] for an execute of the prepared statement `sql`.
    pub(super) fn route_execute(&mut self, sql: &[u8]) -> Option<Vec<u8>> {
        self.route(classify::classify(sql), classify::hint(sql))
    }

    fn route(&mut self, class: Class, hint: Option<classify::Hint>) -> Option<Vec<u8>> {
        // Unqualified tables of the server's own schemas (`USE information_schema`).
        let class = match &self.s.state.schema {
            Some(schema) if classify::server_local_schema(schema) => Class::Write,
            _ => class,
        };
        let held = self.backend.is_some();
        let transaction =
            self.s.status & status::IN_TRANS != 0 || self.s.status & status::AUTOCOMMIT == 0;
        let retryable = self.retryable;
        let unreplicated = self.split.is_some() && self.s.state.writes_unreplicated();
        let sp = self.split.as_deref_mut()?;
        sp.class = Some(class);
        if held {
            // In a transaction or pinned: where the client is (a read-only transaction's
            // statements stay on its reader).
            sp.routed = Some(match sp.on_reader {
                true => Decision::Reader { wait: None },
                false => Decision::Writer(WriterWhy::Transaction),
            });
            return None;
        }
        let now = now_ms();
        let ask = Ask {
            class,
            hint,
            transaction,
            retryable,
            rerouted: sp.to_writer,
            unreplicated,
            position: &sp.position,
            now_ms: now,
        };
        let pool = if sp.on_reader { &self.pool } else { &sp.other };
        let lag = routing::worst_reader_lag(&pool.shared.topology.load(), sp.split.max_lag);
        let (wait, routed) = match sp.split.decide(&ask, lag) {
            Decision::Reader { wait } => (wait, Decision::Reader { wait: None }),
            writer => (None, writer),
        };
        let reader = matches!(routed, Decision::Reader { .. });
        sp.routed = Some(routed);
        // The wait's time runs from here (the borrow is at once, as a rule).
        sp.wait_started = wait.is_some().then(crate::rt::time::now);
        if reader != sp.on_reader {
            sp.on_reader = reader;
            std::mem::swap(&mut self.pool, &mut sp.other);
        }
        wait
    }

    /// A command was served: the client's causal position takes in what it wrote (the
    /// GTID its commit reported, or the time of a write without one), and the route is
    /// counted.
    pub(super) fn routed_done(&mut self, succeeded: bool) {
        let Some(sp) = self.split.as_deref_mut() else {
            return;
        };
        let class = sp.class.take();
        let routed = sp.routed.take();
        sp.to_writer = None;
        if !sp.on_reader && class == Some(Class::Write) {
            // In gtid mode a write that changed rows and reported no GTID (a transaction
            // not committed yet, a server without GTIDs) is known only by its time; one
            // that reported a GTID is replaced by it below. In lag mode every write is.
            let wrote = match sp.split.causal {
                crate::config::CausalReads::Lag => true,
                _ => self.s.diag.row_count > 0,
            };
            if wrote {
                sp.position.wrote_at(now_ms());
            }
        }
        if sp.split.causal != crate::config::CausalReads::Lag
            && self.s.diag.last_gtid != sp.last_gtid
        {
            if let Some(g) = Gtid::parse(&self.s.diag.last_gtid) {
                sp.position.committed(g);
            }
            sp.last_gtid.clear();
            sp.last_gtid.extend_from_slice(&self.s.diag.last_gtid);
        }
        if !succeeded {
            return;
        }
        let stats = &self.writer_pool().shared.stats.split;
        match routed {
            Some(Decision::Reader { .. }) => stats.to_reader.add(1),
            Some(Decision::Writer(why)) => {
                if let Some(c) = stats.to_writer.get(why.index()) {
                    c.fetch_add(1, Ordering::Relaxed);
                }
            }
            None => {}
        }
    }

    /// The causal wait's answer (sent ahead of the read): whether the reader has the
    /// client's position. A connection that fails it is given up, and the read goes to
    /// the writer (nothing reached the client).
    pub(super) async fn causal_wait(&mut self) -> Result<Got, SessionEnd> {
        let Some(mut b) = self.backend.take() else {
            return Err(SessionEnd::Backend("no backend connection".into()));
        };
        let started = self
            .split
            .as_deref_mut()
            .and_then(|sp| sp.wait_started.take());
        let down = self.target_down(b.target);
        let answer = b.conn.read_text_result_until(down).await;
        let stats = &self.writer_pool().shared.stats.split;
        stats.causal_waits.fetch_add(1, Ordering::Relaxed);
        if let Some(t) = started {
            stats
                .causal_wait
                .observe(crate::rt::time::now().saturating_duration_since(t));
        }
        let caught_up = match answer {
            Ok(Ok(r)) => {
                r.rows
                    .first()
                    .and_then(|row| crate::mysql::resultset::parse_text_row(row, 1).ok())
                    .and_then(|v| v.first().copied().flatten())
                    == Some(&b"0"[..])
            }
            Ok(Err(e)) => {
                tracing::warn!(peer = %self.peer, thread_id = b.thread_id, "a causal wait failed on a reader: {e}");
                false
            }
            Err(e) => {
                tracing::info!(peer = %self.peer, thread_id = b.thread_id, "a reader failed during a causal wait ({e}): the read goes to the writer");
                self.pool.lost(b, "failed during a causal wait");
                self.reroute_to_writer(WriterWhy::ReaderFailed);
                return Err(SessionEnd::Retry);
            }
        };
        if !caught_up {
            stats.causal_timeouts.fetch_add(1, Ordering::Relaxed);
            self.reroute_to_writer(WriterWhy::WaitTimedOut);
        } else if let Some(sp) = self.split.as_deref_mut() {
            // The wait was for the position as it is now (nothing wrote since).
            sp.reached = Some((b.target, b.epoch));
            sp.reached_gtids.clear();
            sp.reached_gtids.extend_from_slice(sp.position.gtids());
        }
        self.backend = Some(b);
        Ok(Got::Waited(caught_up))
    }

    /// Whether the held (reader's) connection's server is known to have the client's
    /// position: a wait succeeded there, in this epoch, for GTIDs at least as new in every
    /// domain. It is then not sent (and counted).
    pub(super) fn reader_has_position(&self) -> bool {
        let (Some(sp), Some(b)) = (self.split.as_deref(), self.backend.as_ref()) else {
            return false;
        };
        let known =
            sp.reached == Some((b.target, b.epoch)) && sp.position.covered_by(&sp.reached_gtids);
        if known {
            self.writer_pool()
                .shared
                .stats
                .split
                .causal_known
                .fetch_add(1, Ordering::Relaxed);
        }
        known
    }

    /// Commands other than statements (a prepare, COM_INIT_DB, COM_FIELD_LIST, ...) go to
    /// the writer, which has every table and schema the client may have just created.
    pub(super) fn use_writer(&mut self) {
        if self.backend.is_some() {
            return;
        }
        if let Some(sp) = self.split.as_deref_mut().filter(|sp| sp.on_reader) {
            sp.on_reader = false;
            std::mem::swap(&mut self.pool, &mut sp.other);
        }
    }

    /// COM_CHANGE_USER, on the writer's pool (see [`Self::use_writer`]).
    pub(super) async fn change_user_on_writer(&mut self, h: Header) -> Result<bool, SessionEnd> {
        self.use_writer();
        crate::rt::pooled(self.change_user(h)).await
    }

    /// The command goes again, to the writer, for this reason (the first one given).
    pub(super) fn reroute_to_writer(&mut self, why: WriterWhy) {
        if let Some(sp) = self.split.as_deref_mut() {
            sp.to_writer.get_or_insert(why);
        }
    }

    /// Whether the held connection is a reader's (a read there that failed before any of
    /// its answer reached the client goes again, to the writer).
    pub(super) fn on_reader(&self) -> bool {
        self.split.as_deref().is_some_and(|sp| sp.on_reader)
    }

    /// Reads the answer to a command of `kind` to its end and drops it (a read whose wait
    /// timed out). A connection that fails here is given up; the read goes to the writer
    /// all the same.
    pub(super) async fn discard_answer(&mut self, kind: ResponseKind) -> Result<Got, SessionEnd> {
        let Some(mut b) = self.backend.take() else {
            return Err(SessionEnd::Backend("no backend connection".into()));
        };
        let down = self.target_down(b.target);
        match b.conn.skip_response_until(kind, down).await {
            Ok(_) => {
                self.backend = Some(b);
                Ok(Got::Discarded)
            }
            Err(e) => {
                self.pool
                    .lost(b, &format!("failed while a stale read was dropped: {e}"));
                Err(SessionEnd::Retry)
            }
        }
    }

    /// Answers `SELECT @@dbproxy_causal_position` (through the writer, as a one-row result
    /// of the server's) and `SET @@dbproxy_causal_position = '...'` (here).
    pub(super) async fn position_statement(
        &mut self,
        h: Header,
        p: PositionStatement,
    ) -> Result<(), SessionEnd> {
        let Some(sp) = self.split.as_deref_mut() else {
            return Ok(());
        };
        match p {
            PositionStatement::Read => {
                let text = sp.position.to_text();
                sp.class = Some(Class::Session);
                sp.routed = None;
                self.use_writer();
                let sql = format!("SELECT '{text}' AS `@@dbproxy_causal_position`");
                let mut flow = crate::serving::query::Query::instead(h.seq, sql.into_bytes());
                self.drive(&mut flow, Some(h)).await
            }
            PositionStatement::Set(value) => {
                sp.class = Some(Class::Session);
                sp.routed = None;
                match sp.position.merge_text(&value) {
                    Ok(()) => self.drive(&mut Pong::new(h.seq), Some(h)).await,
                    Err(e) => {
                        let e = ErrPacket::new(
                            errcode::ER_WRONG_VALUE_FOR_VAR,
                            "42000",
                            format!("Variable 'dbproxy_causal_position' can't be set: {e}"),
                        );
                        self.drive(&mut Refuse::new(h.seq, e), Some(h)).await
                    }
                }
            }
        }
    }
}
