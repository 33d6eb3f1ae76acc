//! One PostgreSQL server connection: connected, under TLS when the group asks for it,
//! logged in (the sans-IO [`Opening`]), and dbproxy's own simple queries on it (a replay
//! of a client's settings, their read-back, the monitor's probe). The pool and the
//! monitor use it; the client session relays its bytes.

use crate::backend_conn::TlsTo;
use crate::io::{BackendAddr, Buf, Stream};
use crate::mysql::backend::Credentials;
use crate::postgres::backend::{ssl_answer, OpenError, Opening};
use crate::postgres::frame::{message, FrameError, Reader};
use crate::postgres::messages::{error_field, TxStatus};
use crate::postgres::scram::NONCE_BYTES;
use crate::postgres::startup::write_ssl_request;
use crate::secrets::BackendLogin;
use crate::session::pg_statements::ServerStatements;
use crate::session::postgres::Settings;
use std::io;
use std::sync::Arc;
use std::time::Instant;

/// Why a server connection failed, or an own query on it.
#[derive(Debug, thiserror::Error)]
pub enum PgServerError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Open(#[from] OpenError),
    #[error("protocol error from the server: {0}")]
    Protocol(#[from] FrameError),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("the server did not answer in time")]
    Overdue,
    #[error("the server closed the connection")]
    Closed,
    #[error("unexpected message {0:?} in the answer to dbproxy's own query")]
    Unexpected(char),
}

impl PgServerError {
    /// The server refused the login's credentials (a rotated secret may fix it).
    pub fn refused_password(&self) -> bool {
        matches!(self, PgServerError::Open(OpenError::Refused { code, .. }) if code == "28P01" || code == "28000")
    }
}

/// An error the server answered a query of dbproxy's with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    pub code: String,
    pub message: String,
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

/// The answer to one of dbproxy's simple queries.
#[derive(Debug, Default)]
pub struct Answer {
    /// Every DataRow, as text (`None` for NULL).
    pub rows: Vec<Vec<Option<String>>>,
    /// The first error, if any statement failed.
    pub error: Option<ServerError>,
}

/// A logged-in server connection.
pub struct PgServer<S> {
    pub stream: S,
    /// Bytes read from the server and not yet handled.
    pub buf: Buf,
    pub addr: BackendAddr,
    /// The server process and its cancel key (BackendKeyData).
    pub pid: i32,
    pub key: i32,
    /// What the server reported with ParameterStatus, as it stands.
    pub reported: Vec<(String, String)>,
    /// The session settings dbproxy left on it.
    pub settings: Settings,
    /// The clients' prepared statements it holds (dbproxy's names).
    pub statements: ServerStatements,
    pub created: Instant,
    pub database: String,
    /// The login it was opened with, and the user name that login used.
    pub login: Arc<BackendLogin>,
    pub user: String,
}

/// Random bytes for a SCRAM nonce.
pub fn nonce() -> [u8; NONCE_BYTES] {
    let mut r = [0u8; NONCE_BYTES];
    if !crate::mysql::auth::random_bytes(&mut r) {
        let n = crate::mysql::auth::new_nonce();
        r.copy_from_slice(&n[..NONCE_BYTES]);
    }
    r
}

/// Reads once by `deadline`; a read that is cut off leaves the stream unusable, and
/// the caller drops it with the error.
async fn read_by<S: Stream>(
    stream: &mut S,
    buf: &mut Buf,
    deadline: Instant,
) -> Result<(), PgServerError> {
    buf.reserve(8192);
    match crate::rt::time::timeout_at(deadline, stream.read(buf)).await {
        Ok(Ok(0)) => Err(PgServerError::Closed),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(PgServerError::Overdue),
    }
}

/// Writes `bytes` whole (a message of dbproxy's own).
pub async fn write_all<S: Stream>(stream: &mut S, bytes: &[u8]) -> io::Result<()> {
    let mut b = Buf::from_vec(bytes.to_vec());
    let n = b.len();
    stream.write(&mut b, n).await
}

/// Opens a server connection as `login` on streams `connect` makes: with the login's
/// current credentials, and when the server refuses them and a secret is behind them,
/// with the secret read again and every other version of it (a rotation in either order
/// fails no client); the version that works is kept for the next connections.
pub async fn connect_login<S, F, Fut>(
    connect: F,
    addr: &BackendAddr,
    login: &Arc<BackendLogin>,
    database: &str,
    tls: Option<TlsTo<'_>>,
    deadline: Instant,
) -> Result<PgServer<S>, PgServerError>
where
    S: Stream,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = io::Result<S>>,
{
    let connect = &connect;
    login
        .log_in(
            move |creds| async move {
                let stream = connect().await?;
                open(stream, addr.clone(), login, &creds, database, tls, deadline).await
            },
            PgServerError::refused_password,
        )
        .await
}

/// Logs in to `database` as `creds` (a version of `login`) on a freshly connected stream
/// (TLS first when `tls` says so).
pub async fn open<S: Stream>(
    mut stream: S,
    addr: BackendAddr,
    login: &Arc<BackendLogin>,
    creds: &Arc<Credentials>,
    database: &str,
    tls: Option<TlsTo<'_>>,
    deadline: Instant,
) -> Result<PgServer<S>, PgServerError> {
    let mut buf = Buf::with_capacity(8192);
    if let Some(t) = tls {
        let mut req = Vec::new();
        write_ssl_request(&mut req);
        write_all(&mut stream, &req).await?;
        read_by(&mut stream, &mut buf, deadline).await?;
        let answer = buf.filled().first().copied().unwrap_or(b'N');
        if buf.len() > 1 {
            // Bytes behind the answer would be taken as if they came under TLS.
            return Err(PgServerError::Tls(
                "the server sent bytes after its answer to SSLRequest".into(),
            ));
        }
        buf.consume(1);
        if ssl_answer(answer)? {
            crate::backend_conn::secure(&mut stream, t, deadline)
                .await
                .map_err(|e| PgServerError::Tls(e.to_string()))?;
        } else if t.tls.required() {
            return Err(PgServerError::Tls(format!(
                "the server does not offer TLS (backend_tls = \"{}\")",
                t.tls.mode.name()
            )));
        }
    }
    let (mut opening, first) = Opening::start(
        &creds.user,
        database,
        creds.password.as_bytes(),
        &[],
        stream.is_tls(),
        nonce(),
    );
    write_all(&mut stream, &first).await?;
    let mut out = Vec::new();
    let opened = loop {
        read_by(&mut stream, &mut buf, deadline).await?;
        let got = opening.on_bytes(buf.filled(), &mut out);
        let n = buf.len();
        buf.consume(n);
        if !out.is_empty() {
            write_all(&mut stream, &out).await?;
            out.clear();
        }
        if let Some(o) = got? {
            break o;
        }
    };
    Ok(PgServer {
        stream,
        buf,
        addr,
        pid: opened.pid,
        key: opened.key,
        reported: opened.params,
        settings: Settings::default(),
        statements: ServerStatements::default(),
        created: crate::rt::time::now(),
        database: database.to_string(),
        login: login.clone(),
        user: creds.user.clone(),
    })
}

impl<S> PgServer<S> {
    /// The same connection over another form of its stream (to move it between cores).
    pub fn map_stream<T>(self, f: impl FnOnce(S) -> io::Result<T>) -> io::Result<PgServer<T>> {
        Ok(PgServer {
            stream: f(self.stream)?,
            buf: self.buf,
            addr: self.addr,
            pid: self.pid,
            key: self.key,
            reported: self.reported,
            settings: self.settings,
            statements: self.statements,
            created: self.created,
            database: self.database,
            login: self.login,
            user: self.user,
        })
    }
}

impl<S: Stream> PgServer<S> {
    /// Records a ParameterStatus the server sent.
    pub fn reported(&mut self, name: &str, value: &str) {
        record(&mut self.reported, name, value);
    }

    /// Runs one simple query of dbproxy's (several statements may be in it) and reads its
    /// answer up to ReadyForQuery, by `deadline`. The connection must be idle; the
    /// answer's ParameterStatus messages are recorded.
    pub async fn query(&mut self, sql: &str, deadline: Instant) -> Result<Answer, PgServerError> {
        let mut q = Vec::with_capacity(sql.len() + 6);
        crate::postgres::frame::write(&mut q, b'Q', |o| {
            crate::postgres::frame::put_cstr(o, sql.as_bytes())
        });
        write_all(&mut self.stream, &q).await?;
        self.read_answer(deadline).await
    }

    /// Reads the answer to a query up to its ReadyForQuery.
    async fn read_answer(&mut self, deadline: Instant) -> Result<Answer, PgServerError> {
        let mut answer = Answer::default();
        loop {
            while let Some((h, body)) = message(self.buf.filled())? {
                let total = h.total();
                let done = on_message(&mut self.reported, h.tag, body, &mut answer)?;
                self.buf.consume(total);
                if done {
                    return Ok(answer);
                }
            }
            read_by(&mut self.stream, &mut self.buf, deadline).await?;
        }
    }

    /// Ends the connection politely (Terminate).
    pub async fn quit(mut self) {
        let _ = write_all(&mut self.stream, &[b'X', 0, 0, 0, 4]).await;
    }
}

/// Records a ParameterStatus in `reported`.
fn record(reported: &mut Vec<(String, String)>, name: &str, value: &str) {
    match reported.iter_mut().find(|(k, _)| k == name) {
        Some(p) => value.clone_into(&mut p.1),
        None => reported.push((name.to_string(), value.to_string())),
    }
}

/// One message of an answer; true at its ReadyForQuery.
fn on_message(
    reported: &mut Vec<(String, String)>,
    tag: u8,
    body: &[u8],
    answer: &mut Answer,
) -> Result<bool, PgServerError> {
    let mut r = Reader::new(body);
    match tag {
        b'D' => {
            let n = r.i16("the column count")?;
            let mut row = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
            for _ in 0..n {
                let len = r.i32("a column's length")?;
                let value = match usize::try_from(len) {
                    Ok(l) => {
                        Some(String::from_utf8_lossy(r.take(l, "a column's value")?).into_owned())
                    }
                    Err(_) => None,
                };
                row.push(value);
            }
            answer.rows.push(row);
        }
        b'E' => {
            if answer.error.is_none() {
                let field = |f| {
                    error_field(body, f)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                        .unwrap_or_default()
                };
                answer.error = Some(ServerError {
                    code: field(b'C'),
                    message: field(b'M'),
                });
            }
        }
        b'S' => {
            let name = String::from_utf8_lossy(r.cstr("a parameter name")?).into_owned();
            let value = String::from_utf8_lossy(r.cstr("a parameter value")?).into_owned();
            record(reported, &name, &value);
        }
        b'Z' => {
            let s = r.u8("the transaction status")?;
            TxStatus::from_byte(s).ok_or(FrameError::Malformed("ReadyForQuery status"))?;
            return Ok(true);
        }
        // RowDescription, CommandComplete, EmptyQueryResponse, NoticeResponse,
        // NotificationResponse.
        b'T' | b'C' | b'I' | b'N' | b'A' => {}
        other => return Err(PgServerError::Unexpected(char::from(other))),
    }
    Ok(false)
}
