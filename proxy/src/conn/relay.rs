//! The database's answer on its way to the client (`session::relaying` decides; this
//! reads, writes and keeps the clock), and a small answer rewritten whole.

use super::*;

/// Why an answer stopped on its way to the client.
pub(super) enum RelayError {
    Client(io::Error),
    /// The answer could not go on (`session::relaying` says why).
    Failed(Failure),
}

impl From<Failure> for RelayError {
    fn from(f: Failure) -> RelayError {
        RelayError::Failed(f)
    }
}

impl<D: Driver> Conn<D> {
    /// Resolves once the monitor marks `target` down (checked every [`crate::io::PEER_CHECK`]).
    pub(super) fn target_down(
        &self,
        target: usize,
    ) -> impl std::future::Future<Output = ()> + 'static {
        let topology = self.pool.shared.topology.clone();
        async move {
            while !topology.load().is_down(target) {
                crate::rt::time::sleep(crate::io::PEER_CHECK).await;
            }
        }
    }

    /// The first response packet to a timed statement arrived.
    pub(super) fn first_response(&mut self) {
        if let Some(t) = self.db_sent.take() {
            self.timing = false;
            self.pool
                .shared
                .stats
                .db_latency
                .observe(crate::rt::time::now().saturating_duration_since(t));
        }
    }

    /// Reads a small response whole, changes it with `transform`, and sends it to the client.
    pub(super) async fn relay_buffered(
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
        let deadline = limit.map(|t| crate::rt::time::now() + t);
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
    pub(super) async fn relay_response(
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
            limits
                .statement
                .map(|limit| StatementWatch::new(limit, limits.own, crate::rt::time::now())),
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
            Err(RelayError::Failed(Failure::Backend(why)))
                if self.on_reader() && self.retryable && answer.relayed_nothing() =>
            {
                // A read on a reader that failed before any of its answer went out: it goes
                // again, to the writer.
                tracing::info!(peer = %self.peer, thread_id = b.thread_id, "a reader failed under a read ({why}): the read goes to the writer");
                self.pool.lost(b, "failed during a read");
                self.reroute_to_writer(crate::routing::WriterWhy::ReaderFailed);
                Err(SessionEnd::Retry)
            }
            Err(RelayError::Failed(Failure::ReadOnly)) if self.on_reader() => {
                // A statement taken for a read wrote after all (a stored function behind a
                // view, a read hinted to a reader): the reader refused it, and it goes to
                // the writer. The reader is as it should be. A read-back sent behind it is
                // still on the way: the connection is closed, not reused.
                tracing::info!(peer = %self.peer, thread_id = b.thread_id, "a reader refused a read as read-only (it writes): it goes to the writer");
                self.pool.close(b, "a read wrote");
                self.reroute_to_writer(crate::routing::WriterWhy::ReaderFailed);
                Err(SessionEnd::Retry)
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
    pub(super) async fn relay_with(
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
            let pass = answer.on_backend(cx, conn.buf.filled_mut())?;
            if pass.bytes > 0 {
                if self.db_sent.is_some() {
                    self.first_response();
                }
                let by = crate::rt::time::now() + net_write;
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
                    if answer.watched() {
                        answer.waiting(crate::rt::time::now());
                    }
                    self.read_answer(b, answer).await?;
                }
            }
        }
    }

    /// One read of the answer from the database, watched (see [`Conn::relay_with`]).
    pub(super) async fn read_answer(
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
            match answer.on_timer(crate::rt::time::now())? {
                Alarm::GiveUp(f) => {
                    let why = f.to_string();
                    gave_up = Some(f);
                    Some(GaveUp::Overdue(why))
                }
                Alarm::Kill => {
                    tracing::warn!(%peer, thread_id, "query_timeout ({limit:?}) passed: killing the statement");
                    let addr = group.topology.load().addr(target).cloned()?;
                    let (group, login) = (group.clone(), login.clone());
                    crate::rt::spawn(async move {
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
    pub(super) async fn relay_infile(
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
}
