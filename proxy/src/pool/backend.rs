//! One backend connection: opening and logging in, simple commands, and the reset that
//! makes it fit for the next client.

use crate::io::{read_packet_by, write_packet, Buf, Stream};
use crate::mysql::backend::{Credentials, Login, LoginError, LoginStep};
use crate::mysql::command::ResponseKind;
use crate::mysql::consts::com;
use crate::mysql::handshake::ServerHandshake;
use crate::mysql::response::{ResponseTracker, Step};
use crate::mysql::wire::ErrPacket;
use crate::mysql::{ProtocolError, MAX_PAYLOAD};
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

/// What dbproxy knows of the backend's current default database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    None,
    Known(Vec<u8>),
    /// A command may have changed it without dbproxy seeing the new name.
    Unknown,
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
    pub database: Database,
    pub creds: Arc<Credentials>,
    nonce: Vec<u8>,
    pub created: Instant,
}

/// Receive buffer kept by an idle backend connection.
pub const BACKEND_BUF: usize = 16 * 1024;

impl<S> BackendConn<S> {
    /// The same connection over another stream type (moving it between workers).
    pub fn map_stream<T>(self, f: impl FnOnce(S) -> io::Result<T>) -> io::Result<BackendConn<T>> {
        Ok(BackendConn {
            stream: f(self.stream)?,
            buf: self.buf,
            caps: self.caps,
            collation: self.collation,
            thread_id: self.thread_id,
            database: self.database,
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
            database: Database::None,
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

    /// Makes `db` the default database (`None`: no default database).
    /// `Ok(Err(e))`: the server refused (e.g. unknown database); nothing changed.
    pub async fn use_database(
        &mut self,
        db: Option<&[u8]>,
    ) -> Result<Result<(), ErrPacket>, BackendError> {
        match db {
            Some(name) => {
                if self.database == Database::Known(name.to_vec()) {
                    return Ok(Ok(()));
                }
                let mut p = Vec::with_capacity(name.len() + 1);
                p.push(com::INIT_DB);
                p.extend_from_slice(name);
                let r = self.command(&p, ResponseKind::Single).await?;
                if r.is_ok() {
                    self.database = Database::Known(name.to_vec());
                }
                Ok(r)
            }
            None if self.database == Database::None => Ok(Ok(())),
            None => self.change_user().await.map(Ok),
        }
    }

    /// COM_CHANGE_USER to the same backend user with no database: a full session reset.
    pub async fn change_user(&mut self) -> Result<(), BackendError> {
        let (mut login, p) =
            Login::change_user(&self.nonce, &self.creds, self.caps, self.collation);
        write_packet(&mut self.stream, 0, &p).await?;
        self.finish_login(&mut login, None).await?;
        self.database = Database::None;
        Ok(())
    }

    /// Clears everything a client left behind (transaction, locks, variables, temporary
    /// tables, prepared statements), then runs `init_query` again.
    pub async fn reset(&mut self, init_query: &str) -> Result<(), BackendError> {
        if self.database == Database::Unknown {
            self.change_user().await?;
        } else {
            self.command(&[com::RESET_CONNECTION], ResponseKind::Single)
                .await?
                .map_err(BackendError::Server)?;
        }
        if !init_query.is_empty() {
            self.query(init_query).await?;
        }
        Ok(())
    }

    /// Tells the backend goodbye (best effort) before the connection is dropped.
    pub async fn quit(mut self) {
        let _ = write_packet(&mut self.stream, 0, &[com::QUIT]).await;
    }
}
