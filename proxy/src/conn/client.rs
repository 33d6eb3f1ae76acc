//! Reading from and answering the client: the rest of a command, refusals, KILL and
//! COM_CHANGE_USER.

use super::*;

/// The clients a KILL may name: every client of dbproxy by greeting id, and by database
/// thread id the clients of this pool's group.
pub(super) struct KillScope<'a> {
    pub(super) sessions: &'a crate::clients::Clients,
    pub(super) group: &'a str,
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

impl<D: Driver> Conn<D> {
    /// Reads the next packet of something the client has begun (the rest of a command, a
    /// file for LOAD DATA, an authentication answer): a client silent for
    /// `net_read_timeout` there is given up (`TimedOut`), as MariaDB does.
    pub(super) async fn read_more(&mut self, limit: usize) -> io::Result<Header> {
        let wait = self.shared.config().proxy.net_read_timeout;
        let deadline = crate::rt::time::now() + wait;
        read_packet_by(&mut self.client, &mut self.cbuf, limit, Some(deadline)).await
    }

    /// Tells the client the server is going away (dbproxy drains), as MariaDB's shutdown
    /// error; the session then ends. Sent with sequence id 1, so that a client that sends
    /// its next command reads it as that command's answer.
    pub(super) async fn going_away(&mut self) {
        let e = command::going_away();
        let _ = write_packet(&mut self.client, 1, &e.encode()).await;
    }

    pub(super) async fn reply_err(&mut self, seq: u8, e: ErrPacket) -> Result<(), SessionEnd> {
        write_packet(&mut self.client, seq.wrapping_add(1), &e.encode())
            .await
            .map(drop)
            .map_err(SessionEnd::Client)
    }

    pub(super) async fn reply_ok(&mut self, seq: u8) -> Result<(), SessionEnd> {
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
    pub(super) async fn discard_command(&mut self, mut h: Header) -> Result<(), SessionEnd> {
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
    pub(super) async fn take_command(&mut self, mut h: Header) -> Result<Vec<u8>, SessionEnd> {
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

    pub(super) async fn too_large(&mut self, seq: u8, total: usize) -> SessionEnd {
        let e = command::too_large();
        self.drop_backend();
        let _ = self.reply_err(seq, e).await;
        SessionEnd::Client(io::Error::new(
            io::ErrorKind::InvalidData,
            PacketTooLarge(total),
        ))
    }

    /// A command that failed before reaching the server: the error goes to the client.
    pub(super) async fn refuse(&mut self, seq: u8, e: ErrPacket) -> Result<(), SessionEnd> {
        let c = self.s.command_refused();
        self.count(c);
        self.reply_err(seq, e).await
    }

    /// `KILL [QUERY | CONNECTION] id` and COM_PROCESS_KILL, with the id of a client's
    /// greeting: the statement running for that client is killed where it runs (the
    /// backend connection stays and serves others), and for a connection kill the client
    /// is closed. Only the same dbproxy user's clients may be killed.
    pub(super) async fn kill(&mut self, seq: u8, k: Kill) -> Result<(), SessionEnd> {
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
    pub(super) async fn kill_statement_of(&self, target: &ClientSlot) {
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

    /// COM_CHANGE_USER: authenticated by dbproxy as a login is (see
    /// [`ConnectionPhase::change_user`]); the session then starts afresh. `Ok(false)`:
    /// authentication failed and the client was told; close the session.
    pub(super) async fn change_user(&mut self, h: Header) -> Result<bool, SessionEnd> {
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
            crate::rt::time::now(),
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
        match self.drive(&mut Connect::new(seq), None).await {
            Ok(()) => Ok(true),
            Err(SessionEnd::Ended) => Ok(false),
            Err(e) => Err(e),
        }
    }
}
