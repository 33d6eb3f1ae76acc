//! A client logging in to dbproxy: the startup phase as a server sees it, from the first
//! byte to AuthenticationOk. Bytes in, bytes out (to `out`), and what the caller must
//! decide comes out as a [`Need`]: whether to offer TLS, who the user is and how it
//! authenticates, whether a clear-text password (or token) is right.
//!
//! What the caller sends after AuthenticationOk (ParameterStatus, BackendKeyData,
//! ReadyForQuery) is its own: it knows the server's parameters and the client's key.

use super::frame::{header, FrameError};
use super::messages::{
    authentication_cleartext, authentication_md5, authentication_ok, authentication_sasl,
    authentication_sasl_continue, authentication_sasl_final, negotiate_protocol_version,
    parse_password, parse_sasl_initial, parse_sasl_response, sqlstate, ErrorResponse,
};
use super::scram::{ServerLogin, Verifier, MECHANISM, NONCE_BYTES};
use super::startup::{parse_startup, Startup, PROTOCOL_3_0};

/// The largest authentication message (password, SASL) taken from a client.
const MAX_AUTH_MESSAGE: usize = 8 * 1024;

/// How the user found by [`Need::Identify`] proves who it is.
#[derive(Debug, Clone)]
pub enum Credential {
    /// SCRAM-SHA-256 against this verifier.
    Scram(Verifier),
    /// md5 against this stored hash (`md5` + hex(md5(password + user))).
    Md5(String),
    /// A password in clear text, checked by the caller ([`Need::CheckPassword`]): a
    /// token, or a secret the caller holds. Only under TLS.
    ClearText,
}

/// What the caller must decide before the login goes on.
#[derive(Debug, PartialEq, Eq)]
pub enum Need<'a> {
    /// Nothing yet: more bytes.
    More,
    /// The client asks for TLS: [`Login::answer_tls`].
    Tls,
    /// A CancelRequest (the connection carries nothing else): cancel what the session
    /// with this key runs, and close.
    Cancel { pid: i32, key: i32 },
    /// Who logs in: [`Login::identified`] with the user's credential, or
    /// [`Login::refuse`].
    Identify {
        user: &'a str,
        database: &'a str,
        params: &'a [(String, String)],
    },
    /// Check this clear-text password: [`Login::password_checked`].
    CheckPassword(&'a [u8]),
    /// AuthenticationOk was written: the client is logged in.
    LoggedIn,
    /// An ErrorResponse was written (or the client owes none): close the connection.
    Close,
}

#[derive(Debug)]
enum State {
    /// Waiting for the startup message (or a request in its place).
    Startup,
    /// `Need::Tls` was given; waiting for the caller's answer.
    TlsAsked,
    /// `Need::Identify` was given.
    Identifying,
    /// Waiting for a password message (clear text).
    ClearText,
    /// Waiting for an md5 answer.
    Md5 {
        stored: String,
        salt: [u8; 4],
    },
    /// Waiting for SASLInitialResponse; the server's nonce bytes, drawn by the caller.
    SaslInitial(Verifier, [u8; NONCE_BYTES]),
    /// Waiting for the client-final message.
    SaslFinal(ServerLogin),
    /// `Need::CheckPassword` was given.
    Checking,
    Done,
}

/// One client's login.
#[derive(Debug)]
pub struct Login {
    state: State,
    /// TLS is on (or the connection is local and counts as secure).
    secure: bool,
    /// TLS was offered and taken: a second SSLRequest is refused.
    tls_done: bool,
    pending: Vec<u8>,
    user: String,
    database: String,
    params: Vec<(String, String)>,
    /// The bytes of the password being checked.
    password: Vec<u8>,
}

impl Login {
    /// A login on a connection that is `secure` from the start (a Unix socket), or not.
    pub fn new(secure: bool) -> Login {
        Login {
            state: State::Startup,
            secure,
            tls_done: false,
            pending: Vec::new(),
            user: String::new(),
            database: String::new(),
            params: Vec::new(),
            password: Vec::new(),
        }
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    pub fn database(&self) -> &str {
        &self.database
    }

    /// The startup parameters other than `user` and `database`.
    pub fn params(&self) -> &[(String, String)] {
        &self.params
    }

    /// Bytes the client sent after its login's last message (a first query sent without
    /// waiting), for the session to serve.
    pub fn take_pending(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.pending)
    }

    /// Takes the client's bytes.
    pub fn on_bytes(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Need<'_> {
        self.pending.extend_from_slice(bytes);
        self.step(out)
    }

    fn step(&mut self, out: &mut Vec<u8>) -> Need<'_> {
        match self.state {
            State::Startup => self.startup(out),
            State::ClearText | State::Md5 { .. } | State::SaslInitial(..) | State::SaslFinal(_) => {
                self.auth_message(out)
            }
            // The caller's answer is due; a client that sends meanwhile waits.
            State::TlsAsked | State::Identifying | State::Checking | State::Done => Need::More,
        }
    }

    fn startup(&mut self, out: &mut Vec<u8>) -> Need<'_> {
        let (msg, used) = match parse_startup(&self.pending) {
            Ok(Some(m)) => m,
            Ok(None) => return Need::More,
            Err(e) => return self.fail(out, sqlstate::PROTOCOL_VIOLATION, e.to_string()),
        };
        match msg {
            Startup::Ssl if self.tls_done => {
                self.fail(out, sqlstate::PROTOCOL_VIOLATION, "SSLRequest after TLS")
            }
            Startup::Ssl => {
                // Bytes sent behind the SSLRequest would be taken as if they came over
                // TLS (CVE-2021-3935): refused.
                if self.pending.len() > used {
                    return self.fail(
                        out,
                        sqlstate::PROTOCOL_VIOLATION,
                        "received unencrypted data after SSL request",
                    );
                }
                self.pending.clear();
                self.state = State::TlsAsked;
                Need::Tls
            }
            Startup::GssEnc => {
                self.pending.drain(..used);
                out.push(b'N');
                self.step(out)
            }
            Startup::Cancel { pid, key } => {
                self.state = State::Done;
                Need::Cancel { pid, key }
            }
            Startup::Start(s) => {
                if s.is_replication() {
                    return self.fail(
                        out,
                        sqlstate::FEATURE_NOT_SUPPORTED,
                        "dbproxy does not serve replication connections",
                    );
                }
                let Some(user) = s.user() else {
                    return self.fail(
                        out,
                        sqlstate::INVALID_AUTHORIZATION,
                        "no PostgreSQL user name specified in startup packet",
                    );
                };
                if s.version > PROTOCOL_3_0 || s.protocol_options().next().is_some() {
                    let unknown: Vec<&str> = s.protocol_options().collect();
                    negotiate_protocol_version(out, PROTOCOL_3_0.minor, unknown.into_iter());
                }
                self.user = user.to_string();
                self.database = s.database().unwrap_or(user).to_string();
                self.params = s
                    .params()
                    .iter()
                    .filter(|(k, _)| !matches!(*k, "user" | "database") && !k.starts_with("_pq_."))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                self.pending.drain(..used);
                self.state = State::Identifying;
                Need::Identify {
                    user: &self.user,
                    database: &self.database,
                    params: &self.params,
                }
            }
        }
    }

    /// The caller's answer to [`Need::Tls`]: `true` writes `S` (the caller then runs the
    /// TLS handshake and feeds what comes through it), `false` writes `N`.
    pub fn answer_tls(&mut self, accept: bool, out: &mut Vec<u8>) {
        if matches!(self.state, State::TlsAsked) {
            out.push(if accept { b'S' } else { b'N' });
            if accept {
                self.secure = true;
                self.tls_done = true;
            }
            self.state = State::Startup;
        }
    }

    /// The caller found the user: the authentication request goes out. `random` (fresh
    /// from a CSPRNG) makes the md5 salt or the server's part of the SCRAM nonce.
    pub fn identified(
        &mut self,
        credential: Credential,
        random: [u8; NONCE_BYTES],
        out: &mut Vec<u8>,
    ) -> Need<'_> {
        if !matches!(self.state, State::Identifying) {
            return Need::More;
        }
        self.state = match credential {
            Credential::Scram(v) => {
                authentication_sasl(out, &[MECHANISM]);
                State::SaslInitial(v, random)
            }
            Credential::Md5(stored) => {
                let salt = [random[0], random[1], random[2], random[3]];
                authentication_md5(out, salt);
                State::Md5 { stored, salt }
            }
            Credential::ClearText if !self.secure => {
                return self.fail(
                    out,
                    sqlstate::INVALID_AUTHORIZATION,
                    "this user logs in with a password in clear text, which needs TLS",
                )
            }
            Credential::ClearText => {
                authentication_cleartext(out);
                State::ClearText
            }
        };
        // A client that sent its answer early (pipelined) is served now.
        self.step(out)
    }

    /// The caller's verdict on [`Need::CheckPassword`].
    pub fn password_checked(&mut self, ok: bool, out: &mut Vec<u8>) -> Need<'_> {
        if !matches!(self.state, State::Checking) {
            return Need::More;
        }
        self.password.clear();
        match ok {
            true => self.logged_in(out),
            false => self.refuse_password(out),
        }
    }

    /// Refuses the login: an unknown user, a database that is not served, too many
    /// clients.
    pub fn refuse(&mut self, code: &'static str, message: impl Into<String>, out: &mut Vec<u8>) {
        self.fail(out, code, message.into());
    }

    fn auth_message(&mut self, out: &mut Vec<u8>) -> Need<'_> {
        let total = match header(&self.pending) {
            Ok(Some(h)) if h.tag != b'p' => {
                return self.fail(
                    out,
                    sqlstate::PROTOCOL_VIOLATION,
                    "expected a password message",
                )
            }
            Ok(Some(h)) if h.body > MAX_AUTH_MESSAGE => {
                return self.fail(
                    out,
                    sqlstate::PROTOCOL_VIOLATION,
                    "password message too long",
                )
            }
            Ok(Some(h)) => h.total(),
            Ok(None) => return Need::More,
            Err(e) => return self.fail(out, sqlstate::PROTOCOL_VIOLATION, e.to_string()),
        };
        if self.pending.len() < total {
            return Need::More;
        }
        let msg: Vec<u8> = self.pending.drain(..total).collect();
        match std::mem::replace(&mut self.state, State::Done) {
            State::ClearText => match parse_password(&msg) {
                Ok(pw) => {
                    self.password = pw.to_vec();
                    self.state = State::Checking;
                    Need::CheckPassword(&self.password)
                }
                Err(e) => self.malformed(out, e),
            },
            State::Md5 { stored, salt } => match parse_password(&msg) {
                Ok(answer) if super::md5::verify(&stored, salt, answer) => self.logged_in(out),
                Ok(_) => self.refuse_password(out),
                Err(e) => self.malformed(out, e),
            },
            State::SaslInitial(v, random) => match parse_sasl_initial(&msg) {
                Ok((m, _)) if m != MECHANISM.as_bytes() => self.fail(
                    out,
                    sqlstate::PROTOCOL_VIOLATION,
                    "client selected an invalid SASL authentication mechanism",
                ),
                Ok((_, first)) => match ServerLogin::start(&v, first, random) {
                    Ok((login, server_first)) => {
                        authentication_sasl_continue(out, &server_first);
                        self.state = State::SaslFinal(login);
                        self.step(out)
                    }
                    Err(e) => self.fail(out, sqlstate::PROTOCOL_VIOLATION, e.to_string()),
                },
                Err(e) => self.malformed(out, e),
            },
            State::SaslFinal(mut login) => match parse_sasl_response(&msg) {
                Ok(fin) => match login.finish(fin) {
                    Ok(server_final) => {
                        authentication_sasl_final(out, &server_final);
                        self.logged_in(out)
                    }
                    Err(super::scram::ScramError::Proof) => self.refuse_password(out),
                    Err(e) => self.fail(out, sqlstate::PROTOCOL_VIOLATION, e.to_string()),
                },
                Err(e) => self.malformed(out, e),
            },
            other => {
                self.state = other;
                Need::More
            }
        }
    }

    fn logged_in(&mut self, out: &mut Vec<u8>) -> Need<'_> {
        authentication_ok(out);
        self.state = State::Done;
        Need::LoggedIn
    }

    fn refuse_password(&mut self, out: &mut Vec<u8>) -> Need<'_> {
        let m = format!("password authentication failed for user \"{}\"", self.user);
        self.fail(out, sqlstate::INVALID_PASSWORD, m)
    }

    fn malformed(&mut self, out: &mut Vec<u8>, e: FrameError) -> Need<'_> {
        self.fail(out, sqlstate::PROTOCOL_VIOLATION, e.to_string())
    }

    fn fail(
        &mut self,
        out: &mut Vec<u8>,
        code: &'static str,
        message: impl Into<String>,
    ) -> Need<'_> {
        ErrorResponse::fatal(code, message).write(out);
        self.state = State::Done;
        self.pending.clear();
        Need::Close
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres::frame::message;
    use crate::postgres::messages::{write_password_message, write_sasl_initial};
    use crate::postgres::scram::ClientLogin;
    use crate::postgres::startup::{tests::startup_bytes, write_ssl_request};

    fn start(l: &mut Login, out: &mut Vec<u8>) {
        let m = startup_bytes(&[("user", "app"), ("database", "shop"), ("TimeZone", "UTC")]);
        match l.on_bytes(&m, out) {
            Need::Identify {
                user,
                database,
                params,
            } => {
                assert_eq!((user, database), ("app", "shop"));
                assert_eq!(params, [("TimeZone".to_string(), "UTC".to_string())]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_scram_client_logs_in() {
        let v = Verifier::from_password(b"pw", b"sixteen-byte-slt", 4096);
        let mut l = Login::new(false);
        let mut out = Vec::new();
        start(&mut l, &mut out);
        assert_eq!(
            l.identified(Credential::Scram(v), [3; 18], &mut out),
            Need::More
        );
        let mut c = ClientLogin::new(b"pw", [4; 18]);
        let mut m = Vec::new();
        write_sasl_initial(&mut m, MECHANISM, &c.client_first());
        out.clear();
        assert_eq!(l.on_bytes(&m, &mut out), Need::More);
        let (_, body) = message(&out).unwrap().unwrap();
        let fin = c.server_first(body.get(4..).unwrap()).unwrap();
        let mut m = Vec::new();
        write_password_message(&mut m, &fin, false);
        out.clear();
        assert_eq!(l.on_bytes(&m, &mut out), Need::LoggedIn);
        let (h, body) = message(&out).unwrap().unwrap();
        assert_eq!(h.tag, b'R');
        assert_eq!(c.server_final(body.get(4..).unwrap()), Ok(()));
        assert_eq!(out.get(h.total()..), Some(&b"R\0\0\0\x08\0\0\0\0"[..]));
    }

    #[test]
    fn a_wrong_md5_answer_is_refused_and_a_right_one_taken() {
        let stored = crate::postgres::md5::stored(b"pw", b"app");
        for (answer_pw, want) in [(&b"pw"[..], Need::LoggedIn), (&b"nope"[..], Need::Close)] {
            let mut l = Login::new(false);
            let mut out = Vec::new();
            start(&mut l, &mut out);
            out.clear();
            l.identified(
                Credential::Md5(stored.clone()),
                [1, 2, 3, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                &mut out,
            );
            assert_eq!(out, b"R\0\0\0\x0c\0\0\0\x05\x01\x02\x03\x04");
            let answer = crate::postgres::md5::answer(
                &crate::postgres::md5::stored(answer_pw, b"app"),
                [1, 2, 3, 4],
            )
            .unwrap();
            let mut m = Vec::new();
            write_password_message(&mut m, answer.as_bytes(), true);
            out.clear();
            assert_eq!(l.on_bytes(&m, &mut out), want);
            if want == Need::Close {
                assert!(out.windows(5).any(|w| w == b"28P01"));
            }
        }
    }

    #[test]
    fn clear_text_needs_tls_and_the_callers_verdict() {
        let mut l = Login::new(false);
        let mut out = Vec::new();
        start(&mut l, &mut out);
        assert_eq!(
            l.identified(Credential::ClearText, [0; 18], &mut out),
            Need::Close
        );

        // TLS first: SSLRequest, `S`, then the startup message over TLS.
        let mut l = Login::new(false);
        let mut ssl = Vec::new();
        write_ssl_request(&mut ssl);
        let mut out = Vec::new();
        assert_eq!(l.on_bytes(&ssl, &mut out), Need::Tls);
        l.answer_tls(true, &mut out);
        assert_eq!(out, b"S");
        start(&mut l, &mut out);
        out.clear();
        assert_eq!(
            l.identified(Credential::ClearText, [0; 18], &mut out),
            Need::More
        );
        let mut m = Vec::new();
        write_password_message(&mut m, b"token", true);
        assert_eq!(l.on_bytes(&m, &mut out), Need::CheckPassword(b"token"));
        out.clear();
        assert_eq!(l.password_checked(true, &mut out), Need::LoggedIn);
        assert_eq!(out, b"R\0\0\0\x08\0\0\0\0");
    }

    #[test]
    fn hostile_starts_are_refused() {
        // Bytes behind the SSLRequest (CVE-2021-3935).
        let mut ssl = Vec::new();
        write_ssl_request(&mut ssl);
        ssl.extend(startup_bytes(&[("user", "app")]));
        let mut out = Vec::new();
        assert_eq!(Login::new(false).on_bytes(&ssl, &mut out), Need::Close);
        assert!(out.windows(5).any(|w| w == b"08P01"));
        // Replication, no user, a cancel request, GSSENC answered N.
        let mut out = Vec::new();
        let m = startup_bytes(&[("user", "app"), ("replication", "true")]);
        assert_eq!(Login::new(false).on_bytes(&m, &mut out), Need::Close);
        let m = startup_bytes(&[("database", "x")]);
        assert_eq!(Login::new(false).on_bytes(&m, &mut Vec::new()), Need::Close);
        let mut cancel = vec![0, 0, 0, 16];
        cancel.extend_from_slice(&crate::postgres::startup::CANCEL_REQUEST.to_be_bytes());
        cancel.extend_from_slice(&1i32.to_be_bytes());
        cancel.extend_from_slice(&2i32.to_be_bytes());
        assert_eq!(
            Login::new(false).on_bytes(&cancel, &mut Vec::new()),
            Need::Cancel { pid: 1, key: 2 }
        );
        let mut gss = vec![0, 0, 0, 8];
        gss.extend_from_slice(&crate::postgres::startup::GSSENC_REQUEST.to_be_bytes());
        gss.extend(startup_bytes(&[("user", "app")]));
        let mut out = Vec::new();
        let mut l = Login::new(false);
        assert!(matches!(l.on_bytes(&gss, &mut out), Need::Identify { .. }));
        assert_eq!(out, b"N");
        // A message other than a password where one is due.
        let mut out = Vec::new();
        let mut l = Login::new(false);
        start(&mut l, &mut out);
        l.identified(Credential::Md5("md5".into()), [0; 18], &mut out);
        assert_eq!(l.on_bytes(b"Q\0\0\0\x05\0", &mut out), Need::Close);
    }
}
