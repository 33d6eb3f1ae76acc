//! Sending to the held connection, and what happens when it is lost.

use super::*;

impl<D: Driver> Conn<D> {
    /// Sends the command packet(s) in `cbuf` to the backend, enforcing max_allowed_packet.
    pub(super) async fn send_command(&mut self, mut h: Header) -> Result<(), SessionEnd> {
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
    pub(super) async fn send_query(&mut self, sql: &[u8], seq: u8) -> Result<(), SessionEnd> {
        let mut out = self.start_built();
        out.push(com::QUERY);
        out.extend_from_slice(sql);
        self.send_built(out, seq).await
    }

    /// An empty vector to build a command in, [`HEADER_LEN`] bytes reserved for its header;
    /// hand it to [`Self::send_built`].
    pub(super) fn start_built(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.built);
        out.clear();
        out.resize(HEADER_LEN, 0);
        out
    }

    /// Sends a command dbproxy built (from [`Self::start_built`]) to the backend; `seq` is
    /// the client's sequence id, for the error it may get.
    pub(super) async fn send_built(&mut self, mut out: Vec<u8>, seq: u8) -> Result<(), SessionEnd> {
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
    pub(super) fn sent_statement(&mut self) {
        if self.timing && self.db_sent.is_none() {
            self.db_sent = Some(crate::rt::time::now());
        }
    }

    pub(super) fn drop_backend(&mut self) {
        if let Some(b) = self.backend.take() {
            self.pool.discard(b, "state unknown after an error");
        }
    }

    /// The connection borrowed for a kept command failed before the command was sent:
    /// the command goes again (on another connection) instead of failing.
    pub(super) fn unsent(&mut self) -> Option<SessionEnd> {
        if !self.retryable {
            return None;
        }
        if let Some(b) = self.backend.take() {
            self.pool.lost(b, "failed before a statement was sent");
        }
        if self.on_reader() {
            // A reader that failed: the read goes to the writer rather than wait for the
            // monitor to see it.
            self.reroute_to_writer(crate::routing::WriterWhy::ReaderFailed);
        }
        Some(SessionEnd::Retry)
    }

    pub(super) async fn backend_lost(&mut self, seq: u8, why: &str) -> SessionEnd {
        self.drop_backend();
        self.client_told_backend_lost(seq, why).await
    }

    pub(super) async fn client_told_backend_lost(&mut self, seq: u8, why: &str) -> SessionEnd {
        let e = self.s.lost_error(why);
        if let Err(e) = write_packet(&mut self.client, seq.wrapping_add(1), &e.encode()).await {
            return SessionEnd::Client(e);
        }
        SessionEnd::Lost(why.to_string())
    }

    /// The session goes on without its failed connection and what lived only there; returns
    /// what the client is (or was) told.
    pub(super) fn connection_lost(&mut self, why: &str) -> ErrPacket {
        self.drop_backend();
        let told = self.s.lost_error(why);
        let ended = self.s.connection_lost(told.code, &told.message);
        self.count(PinChanges {
            started: Vec::new(),
            ended,
        });
        told
    }

    pub(super) fn start_pin(&mut self, r: PinReason) {
        if self.s.pins.start(r) {
            self.pool.shared.stats.pin_started(r);
        }
    }
}
