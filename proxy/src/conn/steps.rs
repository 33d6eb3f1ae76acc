//! Carrying out the steps of a command's flow (`serving`): borrowing, replays, the
//! statement's round trip, read-backs, the check-in.

use super::*;

/// The client's command a flow's step is about.
pub(super) fn client_command(h: Option<Header>) -> Result<Header, SessionEnd> {
    h.ok_or_else(|| SessionEnd::Backend("a step about the client's command without one".into()))
}

impl<D: Driver> Conn<D> {
    /// Reads the answer to a replay sent ahead and records what it set.
    pub(super) async fn finish_ahead(&mut self, plan: Replay, seq: u8) -> Result<(), SessionEnd> {
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
    pub(super) async fn run_replay(&mut self, plan: Replay, needs: Needs) -> Replayed {
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

    /// Drives a command's flow (`serving`): carries out each step it asks for and tells it
    /// how the step went. `h`: the client's command, in `cbuf`.
    pub(super) async fn drive(
        &mut self,
        flow: &mut dyn Flow,
        h: Option<Header>,
    ) -> Result<(), SessionEnd> {
        let mut got = Got::Start;
        // The command was read whole (into `cmd`).
        let mut read = false;
        loop {
            let mut cx = self.cx(h, read);
            let step = flow.next(&mut cx, got);
            let pins = std::mem::take(&mut cx.pins);
            self.count(pins);
            match step {
                Step::Done => return Ok(()),
                Step::EndSession => return Err(SessionEnd::Ended),
                _ => {}
            }
            read |= step == Step::ReadCommand;
            // Most steps of a statement wait for nothing: no future is made for those.
            got = match self.carry_out_now(&step) {
                Some(done) => done?,
                None => self.carry_out(step, h).await?,
            };
        }
    }

    /// Carries out a step that waits for nothing (a check-in, the execute built, a
    /// statement the held connection has prepared already); `None` when it must wait (the
    /// sockets, the pool, a script).
    fn carry_out_now(&mut self, step: &Step<'_>) -> Option<Result<Got, SessionEnd>> {
        Some(Ok(match step {
            Step::Borrow => {
                let place = self.tenant().try_take()?;
                let conn = self
                    .pool
                    .borrow_now(&self.key, self.s.state.schema.as_deref())?;
                place.tenant().borrows.fetch_add(1, Ordering::Relaxed);
                self.lent(conn, place)
            }
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
            Step::BuildExecute { ex } => return Some(self.build_execute(ex)),
            Step::PrepareStatement { cid, .. } => Got::Prepared(Ok(self.prepared_here(*cid)?)),
            _ => return None,
        }))
    }

    /// The held connection's id for the client's statement `cid`, if it has it prepared
    /// (the common case: no round trip).
    fn prepared_here(&mut self, cid: u32) -> Option<u32> {
        let key = &self.s.stmts.get(cid)?.key;
        let id = self.backend.as_mut()?.conn.stmts.get_mut(key)?.id;
        self.pool.shared.stats.stmt_cache_hits.add(1);
        self.s.backend_used();
        Some(id)
    }

    /// What a flow sees: the session, the held connection's, and the client's command
    /// (`h`, in `cbuf`; in `cmd` once `read` whole).
    pub(super) fn cx(&mut self, h: Option<Header>, read: bool) -> Cx<'_> {
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
    pub(super) async fn carry_out(
        &mut self,
        step: Step<'_>,
        h: Option<Header>,
    ) -> Result<Got, SessionEnd> {
        Ok(match step {
            // Carried out at once (see `carry_out_now`), or ends the flow (see `drive`).
            step @ (Step::Done
            | Step::EndSession
            | Step::CheckIn
            | Step::CheckInReset
            | Step::BuildExecute { .. }) => match self.carry_out_now(&step) {
                Some(done) => done?,
                None => Got::Start,
            },
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
            Step::SendWait { sql, seq } => {
                if self.reader_has_position() {
                    Got::WaitNeedless
                } else {
                    self.send_query(&sql, seq).await?;
                    Got::Sent
                }
            }
            Step::CausalWait { .. } => Box::pin(self.causal_wait()).await?,
            Step::DiscardAnswer { kind, .. } => Box::pin(self.discard_answer(kind)).await?,
            Step::Tell { seq, payload } => {
                write_packet(&mut self.client, seq, &payload)
                    .await
                    .map_err(SessionEnd::Client)?;
                Got::Told
            }
            Step::Release(steps) => Got::Released(Box::pin(self.release_steps(steps)).await),
        })
    }

    /// A replay on its own on the held connection.
    pub(super) async fn replay_step(&mut self, plan: Replay, needs: Needs) -> Got {
        let r = self.run_replay(plan, needs).await;
        if let Replayed::Broken(why) = &r {
            tracing::debug!(peer = %self.peer, "a connection failed while the session was restored: {why}");
        }
        Got::Replayed(r)
    }

    /// The client's command (one packet, `h`) with the held connection's statement `id`.
    pub(super) async fn send_command_as(&mut self, h: Header, id: u32) -> Result<Got, SessionEnd> {
        if let Some(payload) = self.cbuf.filled_mut().get_mut(HEADER_LEN..h.total()) {
            stmt::patch_stmt_id(payload, id);
        }
        self.send_command(h).await?;
        Ok(Got::Sent)
    }

    /// A command of dbproxy's on the held connection; one that fails is discarded.
    pub(super) async fn own_command(&mut self, payload: &[u8], kind: ResponseKind) -> Got {
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
    pub(super) fn build_execute(
        &mut self,
        ex: &crate::session::execute::Execute,
    ) -> Result<Got, SessionEnd> {
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
    pub(super) async fn relay_rewritten(
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

    /// Borrows a connection for the client, which then holds it, when no idle one could
    /// be lent at once (`carry_out_now` tried).
    pub(super) async fn borrow(&mut self) -> Got {
        let tenant = self.tenant().clone();
        let begun = crate::rt::time::now();
        let _waiting = crate::stats::GaugeGuard::new(&tenant.waiting);
        let place = match tenant.try_take() {
            Some(p) => p,
            None => {
                let timeout = self.pool.shared.settings().borrow_timeout;
                match tenant.take(begun + timeout).await {
                    Some(p) => p,
                    None => {
                        let e = crate::pool::BorrowError::Timeout(
                            timeout,
                            format!(
                                "{}: user '{}' holds its max_database_connections",
                                self.pool.shared.name, tenant.name
                            ),
                        );
                        tracing::warn!(peer = %self.peer, "{e}");
                        return Got::Refused(e.told());
                    }
                }
            }
        };
        let class = crate::pool::Class::of(&tenant);
        let lent = self
            .pool
            .borrow_waiting(&self.key, self.s.state.schema.as_deref(), class)
            .await;
        tenant.waited(crate::rt::time::now().saturating_duration_since(begun));
        tenant.borrows.fetch_add(1, Ordering::Relaxed);
        match lent {
            Ok(conn) => self.lent(conn, place),
            Err(e) => {
                tracing::warn!(peer = %self.peer, "{e}");
                Got::Refused(e.told())
            }
        }
    }

    /// The user's share of the connections.
    fn tenant(&mut self) -> &Arc<crate::tenants::Tenant> {
        let (shared, user) = (&self.shared, &self.s.user);
        self.tenant.get_or_insert_with(|| shared.tenant_of(user))
    }

    /// The pool lent `conn`: the client holds it, in `place` under its user's limit.
    fn lent(&mut self, mut conn: Pooled<D::Stream>, place: crate::tenants::TenantPermit) -> Got {
        let mut place = place;
        place.holds();
        conn.tenant = Some(place);
        conn.hold(&self.reg.slot);
        tracing::trace!(thread_id = conn.thread_id, "borrowed");
        self.backend = Some(conn);
        Got::Lent
    }

    /// Runs the steps before the held connection goes back; a connection they fail on is
    /// discarded.
    pub(super) async fn release_steps(
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

    /// COM_QUERY: a KILL is served here; any other statement by its flow (`serving::query`).
    pub(super) async fn query(&mut self, h: Header) -> Result<(), SessionEnd> {
        let sql = self.cbuf.filled().get(5..h.total()).unwrap_or_default();
        if let Some(k) = kill::parse(sql) {
            self.discard_command(h).await?;
            // Boxed, as the rare steps of a statement are.
            return Box::pin(self.kill(h.seq, k)).await;
        }
        let mut wait = None;
        if self.split.is_some() {
            if let Some(p) = crate::routing::causal::position_statement(sql) {
                return Box::pin(self.position_statement(h, p)).await;
            }
            wait = self.route_statement(h);
        }
        let sql = self.cbuf.filled().get(5..h.total()).unwrap_or_default();
        let mut flow = Query::new(h.seq, sql, h.continues());
        if let Some(w) = wait {
            flow.wait_first(w);
        }
        self.drive(&mut flow, Some(h)).await?;
        if flow.rerouted() {
            // The reader had not caught up: nothing reached the client, and the statement
            // goes again, to the writer.
            return Err(SessionEnd::Retry);
        }
        self.note_temp_tables(flow.info());
        Ok(())
    }

    /// Sends a read-back on its own (not pipelined) and learns from it, keeping the
    /// client's warnings if the read-back would clear them.
    pub(super) async fn read_back_now(&mut self, rb: &ReadBack, seq: u8) -> Result<(), SessionEnd> {
        if rb.names_tables() && self.s.diag.needs_capture() {
            self.capture_warnings(seq).await?;
        }
        self.send_read_back(Some(rb), seq).await?;
        self.learn_read_back(rb).await
    }

    /// Reads the client's warning list from the connection it holds (`SHOW WARNINGS` leaves
    /// the list and the counts as they are).
    pub(super) async fn capture_warnings(&mut self, seq: u8) -> Result<(), SessionEnd> {
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
    pub(super) async fn send_read_back(
        &mut self,
        rb: Option<&ReadBack>,
        seq: u8,
    ) -> Result<(), SessionEnd> {
        match rb {
            Some(rb) => self.send_query(rb.sql.as_bytes(), seq).await,
            None => Ok(()),
        }
    }

    /// Reads the answer to a read-back sent earlier and learns from it.
    pub(super) async fn learn_read_back(&mut self, rb: &ReadBack) -> Result<(), SessionEnd> {
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
    pub(super) fn note_temp_tables(&self, info: &SqlInfo) {
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

    /// Makes sure the backend has the client's statement `cid` prepared; its backend id.
    pub(super) async fn backend_statement(
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
        // Reached when the connection lacks it (`prepared_here` answers the rest).
        let stats = &self.pool.shared.stats;
        stats.stmt_reprepares.fetch_add(1, Ordering::Relaxed);
        match b.conn.prepare(&key).await {
            Ok(r) => {
                self.s.backend_used();
                Ok(r)
            }
            Err(e) => Err(self.backend_lost(seq, &e.to_string()).await),
        }
    }

    /// COM_STMT_EXECUTE: read whole, then served by its flow (`serving::execute`).
    pub(super) async fn execute(&mut self, h: Header) -> Result<(), SessionEnd> {
        let payload = self.take_command(h).await?;
        let read = execute::read(&self.s, &payload);
        self.cmd = payload;
        match read {
            Ok(ex) => {
                let wait = match self.split.is_some() {
                    true => self.route_execute(&ex.key.sql),
                    false => None,
                };
                let mut flow = ServeExecute::new(h.seq, ex);
                if let Some(w) = wait {
                    flow.wait_first(w);
                }
                if self.on_reader() && self.backend.is_none() && self.retryable {
                    flow.on_reader();
                }
                self.drive(&mut flow, None).await?;
                if flow.rerouted() {
                    self.reroute_to_writer(crate::routing::WriterWhy::ReaderFailed);
                    return Err(SessionEnd::Retry);
                }
                Ok(())
            }
            Err(e) => self.refuse(h.seq, e).await,
        }
    }
}
