//! dbproxy as a client: logging in to a backend (HandshakeResponse41 or COM_CHANGE_USER),
//! following auth switches and `caching_sha2_password` (fast authentication; full
//! authentication with the password over TLS, or RSA-encrypted with the server's public
//! key without TLS). `mysql_clear_password` only over TLS.

use super::auth::{self, Plugin};
use super::consts::cap;
use super::handshake::{
    encode_ssl_request, parse_auth_switch, ChangeUser, HandshakeResponse, ServerHandshake,
};
use super::wire::ErrPacket;
use super::ProtocolError;

/// Why a backend login failed.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("backend refused the login: {0}")]
    Refused(ErrPacket),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

/// What to do after a server packet during login.
#[derive(Debug, PartialEq, Eq)]
pub enum LoginStep {
    /// Send this payload (next sequence id) and wait for the server's answer.
    Send(Vec<u8>),
    /// Wait for the next server packet.
    Wait,
    /// Logged in (the server sent OK).
    Done,
}

/// The backend credentials dbproxy logs in with.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

/// One login exchange in progress.
#[derive(Debug)]
pub struct Login {
    password: Vec<u8>,
    nonce: Vec<u8>,
    plugin: Plugin,
    /// The connection is TLS.
    secure: bool,
    /// caching_sha2_password full authentication asked the server for its RSA key.
    awaiting_key: bool,
}

/// caching_sha2_password: "send me your public key".
const SHA2_REQUEST_KEY: u8 = 0x02;

fn connect_attrs() -> crate::mysql::handshake::Attrs {
    vec![
        (b"_client_name".to_vec(), b"dbproxy".to_vec()),
        (
            b"_client_version".to_vec(),
            env!("CARGO_PKG_VERSION").as_bytes().to_vec(),
        ),
        (b"program_name".to_vec(), b"dbproxy".to_vec()),
    ]
}

impl Login {
    /// Answers a server greeting. `wanted` and `wanted_ext` (MariaDB's extended ones) are
    /// the capabilities asked for; the result holds the login, the HandshakeResponse41
    /// payload and the capabilities actually negotiated (both kinds).
    /// `secure`: the response goes over TLS (after an SSLRequest with the same
    /// capabilities, `CLIENT_SSL` among them).
    pub fn start(
        hs: &ServerHandshake,
        creds: &Credentials,
        wanted: u32,
        wanted_ext: u32,
        collation: u8,
        secure: bool,
    ) -> (Login, Vec<u8>, u32, u32) {
        let mut caps = wanted & (hs.capabilities | cap::LONG_PASSWORD);
        if secure {
            caps |= cap::SSL;
        }
        // Extended capabilities need a MariaDB server and CLIENT_MYSQL (bit 0) cleared.
        let ext = if hs.capabilities & cap::LONG_PASSWORD == 0 {
            wanted_ext & hs.ext_capabilities
        } else {
            0
        };
        if ext != 0 {
            caps &= !cap::LONG_PASSWORD;
        }
        let plugin = Plugin::from_name(hs.auth_plugin.as_bytes())
            .filter(|p| *p != Plugin::Clear || secure)
            .unwrap_or(Plugin::Native);
        let login = Login {
            password: creds.password.as_bytes().to_vec(),
            nonce: hs.nonce.clone(),
            plugin,
            secure,
            awaiting_key: false,
        };
        let response = HandshakeResponse {
            capabilities: caps,
            ext_capabilities: ext,
            max_packet: 1 << 30,
            collation,
            user: creds.user.as_bytes().to_vec(),
            auth_response: plugin.scramble(&login.password, &login.nonce),
            database: None,
            auth_plugin: Some(plugin.name().as_bytes().to_vec()),
            attrs: connect_attrs(),
        };
        (login, response.encode(), caps, ext)
    }

    /// A COM_CHANGE_USER back to `creds` with no default database, answering the nonce of
    /// the connection's original greeting: resets the whole session.
    pub fn change_user(
        nonce: &[u8],
        creds: &Credentials,
        caps: u32,
        collation: u8,
    ) -> (Login, Vec<u8>) {
        let plugin = Plugin::Native;
        let login = Login {
            password: creds.password.as_bytes().to_vec(),
            nonce: nonce.to_vec(),
            plugin,
            secure: caps & cap::SSL != 0,
            awaiting_key: false,
        };
        let cu = ChangeUser {
            user: creds.user.as_bytes().to_vec(),
            auth_response: plugin.scramble(&login.password, &login.nonce),
            database: None,
            collation: Some(u16::from(collation)),
            auth_plugin: Some(plugin.name().as_bytes().to_vec()),
            attrs: connect_attrs(),
        };
        (login, cu.encode(caps))
    }

    /// Feeds a server packet of the login exchange.
    pub fn on_packet(&mut self, payload: &[u8]) -> Result<LoginStep, LoginError> {
        match payload.first() {
            Some(0x00) => Ok(LoginStep::Done),
            Some(0xff) => Err(LoginError::Refused(ErrPacket::parse(payload)?)),
            Some(0xfe) => {
                let (name, data) = parse_auth_switch(payload)?;
                let plugin = Plugin::from_name(&name)
                    .filter(|p| *p != Plugin::Clear || self.secure)
                    .ok_or_else(|| {
                    let name = String::from_utf8_lossy(&name).into_owned();
                    let why = if name == auth::CLEAR {
                        "mysql_clear_password (it would send the password in clear text without TLS)".to_string()
                    } else {
                        format!("the backend authentication plugin {name}")
                    };
                    ProtocolError::Unsupported(why)
                })?;
                self.plugin = plugin;
                self.nonce = data;
                Ok(LoginStep::Send(
                    plugin.scramble(&self.password, &self.nonce),
                ))
            }
            Some(0x01) if self.awaiting_key => {
                self.awaiting_key = false;
                let pem = payload.get(1..).unwrap_or_default();
                Ok(LoginStep::Send(rsa_encrypt_password(
                    pem,
                    &self.password,
                    auth::nonce_bytes(&self.nonce),
                )?))
            }
            Some(0x01) if self.plugin == Plugin::CachingSha2 => match payload.get(1) {
                Some(&auth::SHA2_FAST_AUTH_OK) => Ok(LoginStep::Wait),
                // Full authentication: the password itself over TLS; without TLS,
                // encrypted with the server's RSA public key, which is asked for first.
                Some(&auth::SHA2_FULL_AUTH) if self.secure => {
                    Ok(LoginStep::Send(auth::clear_answer(&self.password)))
                }
                Some(&auth::SHA2_FULL_AUTH) => {
                    self.awaiting_key = true;
                    Ok(LoginStep::Send(vec![SHA2_REQUEST_KEY]))
                }
                _ => Err(ProtocolError::Malformed("unexpected caching_sha2_password data").into()),
            },
            _ => Err(ProtocolError::Malformed("unexpected packet during backend login").into()),
        }
    }
}

/// caching_sha2_password's full authentication without TLS: the password (with its NUL)
/// XORed with the nonce, encrypted with the server's RSA public key (PEM, SubjectPublicKeyInfo
/// or PKCS#1) under OAEP with SHA-1, as MySQL does it.
pub fn rsa_encrypt_password(
    pem: &[u8],
    password: &[u8],
    nonce: &[u8],
) -> Result<Vec<u8>, ProtocolError> {
    use rsa::pkcs1::DecodeRsaPublicKey;
    use rsa::pkcs8::DecodePublicKey;
    let pem = std::str::from_utf8(pem)
        .map_err(|_| ProtocolError::Malformed("the server's public key is not PEM text"))?
        .trim_end_matches('\0')
        .trim();
    let key = rsa::RsaPublicKey::from_public_key_pem(pem)
        .or_else(|_| rsa::RsaPublicKey::from_pkcs1_pem(pem))
        .map_err(|_| ProtocolError::Malformed("the server's public key cannot be read"))?;
    if nonce.is_empty() {
        return Err(ProtocolError::Malformed(
            "no nonce to mix the password with",
        ));
    }
    let mut data = auth::clear_answer(password);
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= nonce[i % nonce.len()];
    }
    key.encrypt(&mut rand_core::OsRng, rsa::Oaep::new::<sha1::Sha1>(), &data)
        .map_err(|_| {
            ProtocolError::Unsupported(
                "the password is too long for the server's RSA key; use TLS to the backend".into(),
            )
        })
}

/// TLS as the connection's settings want it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsWant {
    /// Plain text.
    Off,
    /// TLS when the server offers it.
    Preferred,
    /// TLS or no connection (the setting's name, for the error).
    Required(&'static str),
}

/// What a server's greeting leads to.
#[derive(Debug)]
pub struct Greeted {
    pub handshake: ServerHandshake,
    /// Sent first, then TLS is set up, when the connection is to be secured.
    pub ssl_request: Option<Vec<u8>>,
    /// The handshake response (after TLS, if any).
    pub response: Vec<u8>,
    /// The rest of the login.
    pub login: Login,
    /// What was agreed.
    pub caps: u32,
    pub ext_caps: u32,
}

/// Why a greeting ends the attempt.
#[derive(Debug, thiserror::Error)]
pub enum GreetError {
    /// The server refused the connection instead of greeting (too many connections, a
    /// blocked host).
    #[error("backend answered: {0}")]
    Server(ErrPacket),
    #[error("the server does not offer TLS, and backend_tls = \"{0}\" requires it")]
    NoTls(&'static str),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

/// Answers a server's first packet: its greeting parsed, TLS decided (`tls`), and the
/// login to `creds` started with the capabilities both sides have.
pub fn greeted(
    payload: &[u8],
    creds: &Credentials,
    wanted_caps: u32,
    wanted_ext: u32,
    collation: u8,
    tls: TlsWant,
) -> Result<Greeted, GreetError> {
    if payload.first() == Some(&0xff) {
        return Err(GreetError::Server(ErrPacket::parse(payload)?));
    }
    let hs = ServerHandshake::parse(payload)?;
    let offered = hs.capabilities & cap::SSL != 0;
    let secure = match tls {
        TlsWant::Off => false,
        TlsWant::Preferred => offered,
        TlsWant::Required(_) if offered => true,
        TlsWant::Required(mode) => return Err(GreetError::NoTls(mode)),
    };
    let (login, response, caps, ext_caps) =
        Login::start(&hs, creds, wanted_caps, wanted_ext, collation, secure);
    let ssl_request = secure.then(|| encode_ssl_request(caps, ext_caps, collation));
    Ok(Greeted {
        handshake: hs,
        ssl_request,
        response,
        login,
        caps,
        ext_caps,
    })
}

/// Opening a connection, dbproxy being the client: the greeting answered (an SSLRequest
/// first when TLS is to be used, the handshake response once it is up), then the login
/// exchange. Whole packets in ([`Opening::on_packet`]), packets to send out
/// ([`Opening::poll_send`]).
#[derive(Debug)]
pub struct Opening {
    creds: Credentials,
    wanted_caps: u32,
    wanted_ext: u32,
    collation: u8,
    tls: TlsWant,
    state: OpeningState,
    out: std::collections::VecDeque<(u8, Vec<u8>)>,
}

#[derive(Debug)]
enum OpeningState {
    Greeting,
    /// The TLS handshake runs; the handshake response goes out at `seq` once it is done.
    Securing {
        greeted: Box<Greeted>,
        seq: u8,
    },
    LoggingIn(Box<Greeted>),
    Over,
}

/// Where an opening is.
#[derive(Debug)]
pub enum OpenStep {
    /// Waiting for the server's next packet.
    Wait,
    /// Send what [`Opening::poll_send`] gives (the SSLRequest), run the TLS handshake as the
    /// client, then call [`Opening::secured`].
    StartTls,
    /// Logged in.
    Open(Opened),
}

/// A connection logged in.
#[derive(Debug)]
pub struct Opened {
    /// The server's greeting (its version, connection id, nonce, what it offers).
    pub handshake: ServerHandshake,
    /// What was agreed.
    pub caps: u32,
    pub ext_caps: u32,
}

/// Why an opening failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Greet(#[from] GreetError),
    #[error(transparent)]
    Login(#[from] LoginError),
}

impl Opening {
    /// Opens as `creds`, asking for `wanted_caps` and `wanted_ext`, with TLS as `tls` says.
    pub fn new(
        creds: &Credentials,
        wanted_caps: u32,
        wanted_ext: u32,
        collation: u8,
        tls: TlsWant,
    ) -> Opening {
        Opening {
            creds: creds.clone(),
            wanted_caps,
            wanted_ext,
            collation,
            tls,
            state: OpeningState::Greeting,
            out: std::collections::VecDeque::new(),
        }
    }

    /// The next packet to send: its sequence id and payload.
    pub fn poll_send(&mut self) -> Option<(u8, Vec<u8>)> {
        self.out.pop_front()
    }

    /// Takes one whole packet from the server, sent at sequence id `seq`.
    pub fn on_packet(&mut self, seq: u8, payload: &[u8]) -> Result<OpenStep, OpenError> {
        let next = seq.wrapping_add(1);
        match std::mem::replace(&mut self.state, OpeningState::Over) {
            OpeningState::Greeting => {
                let mut g = Box::new(greeted(
                    payload,
                    &self.creds,
                    self.wanted_caps,
                    self.wanted_ext,
                    self.collation,
                    self.tls,
                )?);
                match g.ssl_request.take() {
                    Some(request) => {
                        self.out.push_back((next, request));
                        self.state = OpeningState::Securing {
                            greeted: g,
                            seq: next.wrapping_add(1),
                        };
                        Ok(OpenStep::StartTls)
                    }
                    None => {
                        self.out.push_back((next, std::mem::take(&mut g.response)));
                        self.state = OpeningState::LoggingIn(g);
                        Ok(OpenStep::Wait)
                    }
                }
            }
            OpeningState::LoggingIn(mut g) => match g.login.on_packet(payload)? {
                LoginStep::Done => Ok(OpenStep::Open(Opened {
                    handshake: g.handshake,
                    caps: g.caps,
                    ext_caps: g.ext_caps,
                })),
                LoginStep::Wait => {
                    self.state = OpeningState::LoggingIn(g);
                    Ok(OpenStep::Wait)
                }
                LoginStep::Send(p) => {
                    self.out.push_back((next, p));
                    self.state = OpeningState::LoggingIn(g);
                    Ok(OpenStep::Wait)
                }
            },
            OpeningState::Securing { .. } | OpeningState::Over => Err(GreetError::Protocol(
                ProtocolError::Malformed("a packet from the server while none was expected"),
            )
            .into()),
        }
    }

    /// The TLS handshake [`OpenStep::StartTls`] asked for is done: the handshake response
    /// goes out.
    pub fn secured(&mut self) {
        match std::mem::replace(&mut self.state, OpeningState::Over) {
            OpeningState::Securing { mut greeted, seq } => {
                self.out
                    .push_back((seq, std::mem::take(&mut greeted.response)));
                self.state = OpeningState::LoggingIn(greeted);
            }
            other => self.state = other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn greeting(plugin: &str) -> ServerHandshake {
        ServerHandshake {
            version: "5.5.5-10.11.6-MariaDB".into(),
            connection_id: 1,
            nonce: b"01234567890123456789".to_vec(),
            capabilities: cap::PROXY_OFFERS & !cap::LONG_PASSWORD,
            ext_capabilities: 0,
            collation: 45,
            status: 2,
            auth_plugin: plugin.into(),
        }
    }

    /// A login answering a greeting for `plugin` with the base capabilities.
    fn start(plugin: &str, secure: bool) -> (Login, Vec<u8>, u32, u32) {
        Login::start(
            &greeting(plugin),
            &creds(),
            cap::BACKEND_BASE,
            0,
            45,
            secure,
        )
    }

    fn creds() -> Credentials {
        Credentials {
            user: "app".into(),
            password: "pw".into(),
        }
    }

    #[test]
    fn native_login() {
        let hs = greeting(auth::NATIVE);
        let (mut l, payload, caps, _) = Login::start(
            &hs,
            &creds(),
            cap::BACKEND_BASE | cap::DEPRECATE_EOF,
            0,
            45,
            false,
        );
        let r = HandshakeResponse::parse(&payload).unwrap();
        assert_eq!(r.user, b"app");
        assert!(Plugin::Native.verify(b"pw", &hs.nonce, &r.auth_response));
        assert!(caps & cap::DEPRECATE_EOF != 0);
        assert!(
            caps & cap::LONG_PASSWORD != 0,
            "no MariaDB extended capabilities"
        );
        assert_eq!(
            l.on_packet(&crate::mysql::wire::ok_packet(2)).unwrap(),
            LoginStep::Done
        );
    }

    #[test]
    fn switch_to_sha2_then_fast_auth() {
        let (mut l, _, _, _) = start(auth::NATIVE, false);
        let switch = crate::mysql::handshake::encode_auth_switch(
            auth::CACHING_SHA2,
            b"abcdefghijabcdefghij",
        );
        match l.on_packet(&switch).unwrap() {
            LoginStep::Send(a) => {
                assert!(Plugin::CachingSha2.verify(b"pw", b"abcdefghijabcdefghij", &a))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(l.on_packet(&[0x01, 0x03]).unwrap(), LoginStep::Wait);
    }

    #[test]
    fn sha2_full_authentication_over_tls_sends_the_password() {
        let hs = greeting(auth::CACHING_SHA2);
        let (mut l, payload, caps, _) = Login::start(&hs, &creds(), cap::BACKEND_BASE, 0, 45, true);
        assert!(caps & cap::SSL != 0);
        let r = HandshakeResponse::parse(&payload).unwrap();
        assert!(r.capabilities & cap::SSL != 0);
        assert_eq!(
            l.on_packet(&[0x01, 0x04]).unwrap(),
            LoginStep::Send(b"pw\0".to_vec())
        );
        assert_eq!(
            l.on_packet(&crate::mysql::wire::ok_packet(2)).unwrap(),
            LoginStep::Done
        );
    }

    #[test]
    fn sha2_full_authentication_without_tls_uses_the_servers_rsa_key() {
        use rsa::pkcs8::EncodePublicKey;
        let private = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 1024).unwrap();
        let pem = private
            .to_public_key()
            .to_public_key_pem(rsa::pkcs8::LineEnding::LF)
            .unwrap();
        let hs = greeting(auth::CACHING_SHA2);
        let (mut l, _, caps, _) = Login::start(&hs, &creds(), cap::BACKEND_BASE, 0, 45, false);
        assert_eq!(caps & cap::SSL, 0);
        assert_eq!(
            l.on_packet(&[0x01, 0x04]).unwrap(),
            LoginStep::Send(vec![0x02])
        );
        let mut more = vec![0x01];
        more.extend_from_slice(pem.as_bytes());
        let LoginStep::Send(sealed) = l.on_packet(&more).unwrap() else {
            panic!("no answer to the key")
        };
        let opened = private
            .decrypt(rsa::Oaep::new::<sha1::Sha1>(), &sealed)
            .unwrap();
        let unmixed: Vec<u8> = opened
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ hs.nonce[i % 20])
            .collect();
        assert_eq!(unmixed, b"pw\0");
        assert!(rsa_encrypt_password(b"not a key", b"pw", b"n").is_err());
    }

    #[test]
    fn clear_text_only_over_tls() {
        let clear = crate::mysql::handshake::encode_auth_switch(auth::CLEAR, b"");
        let (mut plain, _, _, _) = start(auth::NATIVE, false);
        assert!(plain.on_packet(&clear).is_err());
        let (mut tls, _, _, _) = start(auth::NATIVE, true);
        assert_eq!(
            tls.on_packet(&clear).unwrap(),
            LoginStep::Send(b"pw\0".to_vec())
        );
    }

    #[test]
    fn refusals_and_unsupported_plugins() {
        let (mut l, _, _, _) = start(auth::NATIVE, false);
        let err = ErrPacket::new(1045, "28000", "Access denied").encode();
        assert!(matches!(l.on_packet(&err), Err(LoginError::Refused(e)) if e.code == 1045));
        let clear = crate::mysql::handshake::encode_auth_switch(auth::CLEAR, b"");
        assert!(l.on_packet(&clear).is_err());
        assert!(l.on_packet(&[]).is_err());
    }

    #[test]
    fn change_user_packet() {
        let caps = cap::BACKEND_BASE;
        let (_, p) = Login::change_user(b"01234567890123456789", &creds(), caps, 33);
        let cu = ChangeUser::parse(&p, caps).unwrap();
        assert_eq!(cu.user, b"app");
        assert_eq!(cu.database, None);
        assert_eq!(cu.collation, Some(33));
        assert!(Plugin::Native.verify(b"pw", b"01234567890123456789", &cu.auth_response));
    }

    #[test]
    fn a_greeting_decides_tls_and_starts_the_login() {
        let mut hs = greeting("mysql_native_password");
        hs.capabilities |= cap::SSL;
        let payload = hs.encode();
        let g = greeted(
            &payload,
            &creds(),
            cap::BACKEND_BASE,
            0,
            45,
            TlsWant::Preferred,
        )
        .unwrap();
        let req = g.ssl_request.expect("TLS offered and preferred");
        assert_ne!(g.caps & cap::SSL, 0);
        assert_eq!(req.len(), 32);
        assert_eq!(g.handshake.connection_id, 1);
        let g = greeted(&payload, &creds(), cap::BACKEND_BASE, 0, 45, TlsWant::Off).unwrap();
        assert!(g.ssl_request.is_none());
        assert_eq!(g.caps & cap::SSL, 0);
        // Not offered: plain when preferred, refused when required.
        let plain = greeting("mysql_native_password").encode();
        let g = greeted(
            &plain,
            &creds(),
            cap::BACKEND_BASE,
            0,
            45,
            TlsWant::Preferred,
        )
        .unwrap();
        assert!(g.ssl_request.is_none());
        let e = greeted(
            &plain,
            &creds(),
            cap::BACKEND_BASE,
            0,
            45,
            TlsWant::Required("verify_ca"),
        );
        assert!(matches!(e, Err(GreetError::NoTls("verify_ca"))), "{e:?}");
    }

    #[test]
    fn a_server_that_refuses_instead_of_greeting_is_told_apart() {
        let err = ErrPacket::new(1040, "08004", "Too many connections").encode();
        match greeted(&err, &creds(), cap::BACKEND_BASE, 0, 45, TlsWant::Off) {
            Err(GreetError::Server(e)) => assert_eq!(e.code, 1040),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            greeted(&[9, 1, 2], &creds(), cap::BACKEND_BASE, 0, 45, TlsWant::Off),
            Err(GreetError::Protocol(_))
        ));
        assert!(greeted(&[], &creds(), cap::BACKEND_BASE, 0, 45, TlsWant::Off).is_err());
    }

    fn opening(tls: TlsWant) -> Opening {
        Opening::new(&creds(), cap::BACKEND_BASE, 0, 45, tls)
    }

    #[test]
    fn opening_answers_the_greeting_then_follows_the_login() {
        let mut o = opening(TlsWant::Preferred);
        let hs = greeting(auth::CACHING_SHA2);
        let step = o.on_packet(0, &hs.encode()).unwrap();
        assert!(matches!(step, OpenStep::Wait), "no TLS offered: {step:?}");
        let (seq, response) = o.poll_send().unwrap();
        assert_eq!(seq, 1);
        let r = HandshakeResponse::parse(&response).unwrap();
        assert_eq!(r.user, b"app");
        // An auth switch is answered at the next sequence id; fast auth, then OK.
        let mut switch = b"\xfemysql_native_password\0".to_vec();
        switch.extend_from_slice(b"abcdefghijabcdefghij\0");
        assert!(matches!(o.on_packet(2, &switch).unwrap(), OpenStep::Wait));
        assert_eq!(o.poll_send().map(|(s, p)| (s, p.len())), Some((3, 20)));
        match o.on_packet(4, &[0, 0, 0, 2, 0, 0, 0]).unwrap() {
            OpenStep::Open(opened) => {
                assert_eq!(opened.handshake.connection_id, 1);
                assert_eq!(opened.caps & cap::SSL, 0);
            }
            other => panic!("{other:?}"),
        }
        assert!(o.on_packet(5, &[0]).is_err(), "over");
    }

    #[test]
    fn opening_with_tls_sends_the_request_then_the_response_after_the_handshake() {
        let mut o = opening(TlsWant::Required("verify_full"));
        let mut hs = greeting(auth::NATIVE);
        hs.capabilities |= cap::SSL;
        assert!(matches!(
            o.on_packet(0, &hs.encode()).unwrap(),
            OpenStep::StartTls
        ));
        let (seq, request) = o.poll_send().unwrap();
        assert_eq!((seq, request.len()), (1, 32), "an SSLRequest");
        assert!(o.poll_send().is_none(), "the response waits for TLS");
        assert!(
            o.on_packet(2, &[0]).is_err(),
            "nothing comes during the handshake"
        );
        let mut o = opening(TlsWant::Required("verify_full"));
        o.on_packet(0, &hs.encode()).unwrap();
        o.poll_send();
        o.secured();
        let (seq, response) = o.poll_send().unwrap();
        assert_eq!(seq, 2);
        let r = HandshakeResponse::parse(&response).unwrap();
        assert_ne!(r.capabilities & cap::SSL, 0);
        // Required, and not offered: no connection.
        let mut o = opening(TlsWant::Required("verify_ca"));
        let e = o.on_packet(0, &greeting(auth::NATIVE).encode());
        assert!(
            matches!(e, Err(OpenError::Greet(GreetError::NoTls("verify_ca")))),
            "{e:?}"
        );
    }

    #[test]
    fn opening_refused_by_the_server_says_so() {
        let mut o = opening(TlsWant::Off);
        let too_many = ErrPacket::new(1040, "HY000", "Too many connections").encode();
        let e = o.on_packet(0, &too_many);
        assert!(
            matches!(e, Err(OpenError::Greet(GreetError::Server(ref p))) if p.code == 1040),
            "{e:?}"
        );
        let mut o = opening(TlsWant::Off);
        o.on_packet(0, &greeting(auth::NATIVE).encode()).unwrap();
        let denied = ErrPacket::new(1045, "28000", "Access denied").encode();
        let e = o.on_packet(2, &denied);
        assert!(
            matches!(e, Err(OpenError::Login(LoginError::Refused(_)))),
            "{e:?}"
        );
    }
}
