//! dbproxy as a client of PostgreSQL: opening a server connection, from the startup
//! message to the first ReadyForQuery. Bytes in, bytes out; the caller does TLS first if
//! it wants it (SSLRequest, then [`ssl_answer`]).

use super::frame::{message, FrameError, Reader};
use super::messages::{auth, error_field, write_password_message, write_sasl_initial, TxStatus};
use super::scram::{ClientLogin, ScramError, MECHANISM, NONCE_BYTES};
use super::startup::write_startup;

/// Why a server connection could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The server refused: its SQLSTATE and message.
    #[error("the server refused ({code}): {message}")]
    Refused { code: String, message: String },
    #[error("the server asks for authentication method {0}, which dbproxy does not speak")]
    Method(i32),
    #[error("the server asks for the password in clear text without TLS")]
    ClearText,
    #[error("the server offers no SASL mechanism dbproxy speaks")]
    Mechanism,
    #[error(transparent)]
    Scram(#[from] ScramError),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("unexpected message {0:?} while logging in")]
    Unexpected(char),
    #[error("the server's answer to SSLRequest is {0:?}")]
    SslAnswer(char),
}

/// What an opened connection is: what the server reported at login (server_version,
/// client_encoding, TimeZone, ...), its cancel key and its transaction status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub params: Vec<(String, String)>,
    pub pid: i32,
    pub key: i32,
    pub status: TxStatus,
}

/// The server's one-byte answer to an SSLRequest: true for TLS (`S`), false for none
/// (`N`); anything else (an old server's ErrorResponse) is refused.
pub fn ssl_answer(b: u8) -> Result<bool, OpenError> {
    match b {
        b'S' => Ok(true),
        b'N' => Ok(false),
        other => Err(OpenError::SslAnswer(char::from(other))),
    }
}

/// Where the login stands.
#[derive(Debug)]
enum Auth {
    /// Waiting for the server's first authentication request.
    Asked,
    /// SCRAM in progress: the client-first was sent (`finished`: and the client-final).
    Scram { login: ClientLogin, finished: bool },
    /// SCRAM done and the server's signature checked: AuthenticationOk comes next.
    ScramVerified,
    /// Authenticated: parameters and the key come, then ReadyForQuery.
    Done,
}

/// Opening one server connection.
#[derive(Debug)]
pub struct Opening {
    user: String,
    password: Vec<u8>,
    /// The connection is under TLS (clear text may be sent).
    tls: bool,
    random: [u8; NONCE_BYTES],
    auth: Auth,
    /// Server bytes not yet a whole message.
    pending: Vec<u8>,
    params: Vec<(String, String)>,
    key: Option<(i32, i32)>,
}

impl Opening {
    /// Starts a login as `user` to `database` with `password`, other startup parameters
    /// in `extra`; `random` makes the SCRAM nonce. Returns the startup message to send.
    pub fn start(
        user: &str,
        database: &str,
        password: &[u8],
        extra: &[(&str, &str)],
        tls: bool,
        random: [u8; NONCE_BYTES],
    ) -> (Opening, Vec<u8>) {
        let mut params = vec![("user", user), ("database", database)];
        params.extend(
            extra
                .iter()
                .filter(|(k, _)| *k != "user" && *k != "database"),
        );
        let mut out = Vec::new();
        write_startup(&mut out, &params);
        let o = Opening {
            user: user.to_string(),
            password: password.to_vec(),
            tls,
            random,
            auth: Auth::Asked,
            pending: Vec::new(),
            params: Vec::new(),
            key: None,
        };
        (o, out)
    }

    /// Takes the server's bytes; what to send back goes to `out`. `Some` once the server
    /// is ready for queries.
    pub fn on_bytes(
        &mut self,
        bytes: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Option<Opened>, OpenError> {
        let mut pending = std::mem::take(&mut self.pending);
        pending.extend_from_slice(bytes);
        let mut used = 0;
        let result = loop {
            match message(pending.get(used..).unwrap_or(&[])) {
                Ok(Some((h, body))) => {
                    used += h.total();
                    match self.on_message(h.tag, body, out) {
                        Ok(None) => {}
                        done => break done,
                    }
                }
                Ok(None) => break Ok(None),
                Err(e) => break Err(e.into()),
            }
        };
        pending.drain(..used.min(pending.len()));
        self.pending = pending;
        result
    }

    fn on_message(
        &mut self,
        tag: u8,
        body: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Option<Opened>, OpenError> {
        let mut r = Reader::new(body);
        match tag {
            b'R' => {
                let code = r.i32("the authentication code")?;
                self.on_auth(code, r, out)?;
            }
            b'S' => {
                let name = utf8(r.cstr("a parameter name")?)?;
                let value = utf8(r.cstr("a parameter value")?)?;
                match self.params.iter_mut().find(|(k, _)| *k == name) {
                    Some(p) => p.1 = value,
                    None => self.params.push((name, value)),
                }
            }
            b'K' => {
                let pid = r.i32("the process id")?;
                let key = r.i32("the cancel key")?;
                self.key = Some((pid, key));
            }
            b'Z' if matches!(self.auth, Auth::Done) => {
                let status = TxStatus::from_byte(r.u8("the transaction status")?)
                    .ok_or(FrameError::Malformed("ReadyForQuery status"))?;
                let (pid, key) = self.key.unwrap_or((0, 0));
                return Ok(Some(Opened {
                    params: std::mem::take(&mut self.params),
                    pid,
                    key,
                    status,
                }));
            }
            b'E' => return Err(refused(body)),
            // NoticeResponse; NegotiateProtocolVersion (dbproxy asks for 3.0 and no
            // options, so there is nothing to give up).
            b'N' | b'v' => {}
            other => return Err(OpenError::Unexpected(char::from(other))),
        }
        Ok(None)
    }

    fn on_auth(
        &mut self,
        code: i32,
        mut r: Reader<'_>,
        out: &mut Vec<u8>,
    ) -> Result<(), OpenError> {
        let next = match (code, &mut self.auth) {
            (auth::OK, Auth::Asked | Auth::ScramVerified) => Auth::Done,
            // The server skipped its own proof (SASLFinal).
            (auth::OK, Auth::Scram { .. }) => return Err(ScramError::ServerSignature.into()),
            (auth::CLEARTEXT, Auth::Asked) => {
                if !self.tls {
                    return Err(OpenError::ClearText);
                }
                write_password_message(out, &self.password, true);
                return Ok(());
            }
            (auth::MD5, Auth::Asked) => {
                let salt: [u8; 4] = r
                    .take(4, "the md5 salt")?
                    .try_into()
                    .map_err(|_| FrameError::Truncated("the md5 salt"))?;
                let stored = super::md5::stored(&self.password, self.user.as_bytes());
                let answer = super::md5::answer(&stored, salt).unwrap_or_default();
                write_password_message(out, answer.as_bytes(), true);
                return Ok(());
            }
            (auth::SASL, Auth::Asked) => {
                let mut offered = false;
                while let Ok(m) = r.cstr("a SASL mechanism") {
                    if m.is_empty() {
                        break;
                    }
                    offered |= m == MECHANISM.as_bytes();
                }
                if !offered {
                    return Err(OpenError::Mechanism);
                }
                let login = ClientLogin::new(&self.password, self.random);
                write_sasl_initial(out, MECHANISM, &login.client_first());
                Auth::Scram {
                    login,
                    finished: false,
                }
            }
            (auth::SASL_CONTINUE, Auth::Scram { login, finished }) if !*finished => {
                let fin = login.server_first(r.rest())?;
                write_password_message(out, &fin, false);
                *finished = true;
                return Ok(());
            }
            (
                auth::SASL_FINAL,
                Auth::Scram {
                    login,
                    finished: true,
                },
            ) => {
                login.server_final(r.rest())?;
                Auth::ScramVerified
            }
            (code, _) => return Err(OpenError::Method(code)),
        };
        self.auth = next;
        Ok(())
    }
}

fn utf8(b: &[u8]) -> Result<String, OpenError> {
    std::str::from_utf8(b)
        .map(str::to_string)
        .map_err(|_| OpenError::Frame(FrameError::Malformed("not UTF-8")))
}

/// An ErrorResponse's SQLSTATE and message.
fn refused(body: &[u8]) -> OpenError {
    let field = |f| String::from_utf8_lossy(error_field(body, f).unwrap_or_default()).into_owned();
    OpenError::Refused {
        code: field(b'C'),
        message: field(b'M'),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres::frame::write;
    use crate::postgres::messages::{
        authentication_md5, authentication_ok, authentication_sasl, authentication_sasl_continue,
        authentication_sasl_final, backend_key_data, parameter_status, parse_password,
        parse_sasl_initial, parse_sasl_response, ready_for_query, sqlstate, ErrorResponse,
    };
    use crate::postgres::scram::{ServerLogin, Verifier};
    use crate::postgres::startup::{parse_startup, Startup};

    fn after_login() -> Vec<u8> {
        let mut m = Vec::new();
        authentication_ok(&mut m);
        parameter_status(&mut m, "server_version", "15.8");
        parameter_status(&mut m, "TimeZone", "UTC");
        backend_key_data(&mut m, 4242, -17);
        ready_for_query(&mut m, TxStatus::Idle);
        m
    }

    /// A server that asks for SCRAM, fed to the login one byte at a time.
    #[test]
    fn a_scram_login_opens_the_connection_byte_by_byte() {
        let v = Verifier::from_password(b"db-secret", b"sixteen-byte-slt", 4096);
        let (mut o, startup) = Opening::start(
            "app",
            "shop",
            b"db-secret",
            &[("application_name", "dbproxy")],
            false,
            [9; 18],
        );
        let Some((Startup::Start(s), _)) = parse_startup(&startup).unwrap() else {
            panic!("no startup message");
        };
        assert_eq!(
            (s.user(), s.database(), s.get("application_name")),
            (Some("app"), Some("shop"), Some("dbproxy"))
        );

        let feed = |o: &mut Opening, bytes: &[u8]| -> (Vec<u8>, Option<Opened>) {
            let mut out = Vec::new();
            let mut done = None;
            for b in bytes {
                if let Some(d) = o.on_bytes(std::slice::from_ref(b), &mut out).unwrap() {
                    done = Some(d);
                }
            }
            (out, done)
        };
        let mut ask = Vec::new();
        authentication_sasl(&mut ask, &["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]);
        let (first, _) = feed(&mut o, &ask);
        let (mechanism, client_first) = parse_sasl_initial(&first).unwrap();
        assert_eq!(mechanism, b"SCRAM-SHA-256");
        let (mut server, server_first) = ServerLogin::start(&v, client_first, [5; 18]).unwrap();
        let mut cont = Vec::new();
        authentication_sasl_continue(&mut cont, &server_first);
        let (fin, _) = feed(&mut o, &cont);
        let server_final = server.finish(parse_sasl_response(&fin).unwrap()).unwrap();
        let mut last = Vec::new();
        authentication_sasl_final(&mut last, &server_final);
        last.extend(after_login());
        let (nothing, opened) = feed(&mut o, &last);
        assert!(nothing.is_empty());
        let opened = opened.unwrap();
        assert_eq!(
            (opened.pid, opened.key, opened.status),
            (4242, -17, TxStatus::Idle)
        );
        assert_eq!(
            opened.params[0],
            ("server_version".to_string(), "15.8".to_string())
        );
    }

    #[test]
    fn md5_and_clear_text_answers() {
        let (mut o, _) = Opening::start("postgres", "postgres", b"postgres", &[], false, [0; 18]);
        let mut ask = Vec::new();
        authentication_md5(&mut ask, [1, 2, 3, 4]);
        let mut out = Vec::new();
        assert_eq!(o.on_bytes(&ask, &mut out), Ok(None));
        let answer = parse_password(&out).unwrap();
        assert!(crate::postgres::md5::verify(
            "md53175bce1d3201d16594cebf9d7eb3f9d",
            [1, 2, 3, 4],
            answer
        ));
        // Clear text only under TLS.
        let mut ask = Vec::new();
        write(&mut ask, b'R', |b| {
            b.extend_from_slice(&auth::CLEARTEXT.to_be_bytes())
        });
        let (mut plain, _) = Opening::start("app", "db", b"pw", &[], false, [0; 18]);
        assert_eq!(
            plain.on_bytes(&ask, &mut Vec::new()),
            Err(OpenError::ClearText)
        );
        let (mut tls, _) = Opening::start("app", "db", b"pw", &[], true, [0; 18]);
        let mut out = Vec::new();
        assert_eq!(tls.on_bytes(&ask, &mut out), Ok(None));
        assert_eq!(parse_password(&out), Ok(&b"pw"[..]));
    }

    #[test]
    fn refusals_and_strange_servers_fail_the_login() {
        let (mut o, _) = Opening::start("app", "db", b"pw", &[], false, [0; 18]);
        let mut m = Vec::new();
        ErrorResponse::fatal(
            sqlstate::INVALID_PASSWORD,
            "password authentication failed for user \"app\"",
        )
        .write(&mut m);
        assert_eq!(
            o.on_bytes(&m, &mut Vec::new()),
            Err(OpenError::Refused {
                code: "28P01".into(),
                message: "password authentication failed for user \"app\"".into()
            })
        );
        // GSSAPI, and a SASL offer without SCRAM-SHA-256.
        let mut m = Vec::new();
        write(&mut m, b'R', |b| b.extend_from_slice(&7i32.to_be_bytes()));
        let (mut o, _) = Opening::start("app", "db", b"pw", &[], false, [0; 18]);
        assert_eq!(o.on_bytes(&m, &mut Vec::new()), Err(OpenError::Method(7)));
        let mut m = Vec::new();
        authentication_sasl(&mut m, &["SCRAM-SHA-256-PLUS"]);
        let (mut o, _) = Opening::start("app", "db", b"pw", &[], false, [0; 18]);
        assert_eq!(o.on_bytes(&m, &mut Vec::new()), Err(OpenError::Mechanism));
        // ReadyForQuery before authentication.
        let mut m = Vec::new();
        ready_for_query(&mut m, TxStatus::Idle);
        let (mut o, _) = Opening::start("app", "db", b"pw", &[], false, [0; 18]);
        assert_eq!(
            o.on_bytes(&m, &mut Vec::new()),
            Err(OpenError::Unexpected('Z'))
        );
        // A server that takes the client's proof but gives none of its own.
        let (mut o, _) = Opening::start("app", "db", b"pw", &[], false, [0; 18]);
        let mut m = Vec::new();
        authentication_sasl(&mut m, &["SCRAM-SHA-256"]);
        let mut first = Vec::new();
        o.on_bytes(&m, &mut first).unwrap();
        let (_, client_first) = parse_sasl_initial(&first).unwrap();
        let v = Verifier::from_password(b"pw", b"salt", 16);
        let (_, server_first) = ServerLogin::start(&v, client_first, [1; 18]).unwrap();
        let mut m = Vec::new();
        authentication_sasl_continue(&mut m, &server_first);
        o.on_bytes(&m, &mut Vec::new()).unwrap();
        let mut m = Vec::new();
        authentication_ok(&mut m);
        assert_eq!(
            o.on_bytes(&m, &mut Vec::new()),
            Err(OpenError::Scram(ScramError::ServerSignature))
        );
        assert_eq!(ssl_answer(b'S'), Ok(true));
        assert_eq!(ssl_answer(b'E'), Err(OpenError::SslAnswer('E')));
    }
}
