//! The connection phase as a state machine: the driver writes the greeting, feeds every
//! packet the client sends, and writes what the machine says. Authentication (a first
//! answer, perhaps an auth switch, a verdict) is shared with COM_CHANGE_USER. A TLS upgrade
//! (SSLRequest) slots in between the greeting and the handshake response: the machine says
//! [`Step::StartTls`], the driver runs the TLS handshake and calls [`Login::secured`].

use super::command::malformed;
use crate::auth::{self, Decision, Token, User, Users};
use crate::mysql::auth::{Plugin, SHA2_FAST_AUTH_OK, SHA2_FULL_AUTH};
use crate::mysql::consts::{cap, errcode, ext, status};
use crate::mysql::handshake::{
    encode_auth_switch, is_ssl_request, ChangeUser, HandshakeResponse, ServerHandshake,
};
use crate::mysql::wire::ErrPacket;
use std::sync::Arc;

/// What the driver does next.
#[derive(Debug)]
pub enum Step {
    /// Write `payload` with sequence id `seq`, then feed the client's next packet.
    Send { seq: u8, payload: Vec<u8> },
    /// The client sent an SSLRequest: run the TLS handshake as the server, call
    /// [`Login::secured`], then feed the client's next packet (its handshake response).
    StartTls,
    /// The client sent a token for `user`: verify it, then call [`Login::token_verified`].
    VerifyToken { user: Arc<User>, token: Token },
    /// Authenticated; see [`Accepted`].
    Accepted(Accepted),
    /// Write `err` with sequence id `seq`, then close. `log` says why, for the log.
    Refused {
        seq: u8,
        err: ErrPacket,
        log: String,
    },
}

/// A client that proved who it is.
#[derive(Debug)]
pub struct Accepted {
    pub user: Arc<User>,
    /// Capabilities agreed (what the client asked, limited to what dbproxy offered).
    pub caps: u32,
    /// MariaDB's extended capabilities agreed.
    pub ext_caps: u32,
    pub collation: u8,
    pub database: Option<Vec<u8>>,
    /// With caching_sha2_password the client first gets "fast auth OK" at `seq`, and the
    /// final OK (or error) follows at `seq + 1`; otherwise it comes at `seq`.
    pub fast_auth_ok: bool,
    pub seq: u8,
}

impl Accepted {
    /// The packets to send before the final OK, and the OK's sequence id.
    pub fn preamble(&self) -> (Option<(u8, Vec<u8>)>, u8) {
        if self.fast_auth_ok {
            (
                Some((self.seq, vec![0x01, SHA2_FAST_AUTH_OK])),
                self.seq.wrapping_add(1),
            )
        } else {
            (None, self.seq)
        }
    }
}

/// Proof of identity: a first answer, perhaps an auth switch, the verdict.
#[derive(Debug)]
pub struct Authentication {
    user_name: Vec<u8>,
    user: Option<Arc<User>>,
    nonce: [u8; 20],
    used_password: bool,
    /// Waiting for the answer to an AuthSwitchRequest for this plugin.
    switched: Option<Plugin>,
    /// The connection is TLS.
    secure: bool,
}

/// An authentication's outcome so far.
#[derive(Debug)]
pub enum AuthStep {
    /// Send this AuthSwitchRequest and feed the answer to [`Authentication::answer`].
    Switch(Vec<u8>),
    Accept {
        user: Arc<User>,
        plugin: Plugin,
    },
    /// Verify this token for `user`, then call [`Authentication::token_verified`].
    VerifyToken {
        user: Arc<User>,
        token: Token,
    },
    /// Access denied, worded as MariaDB words it.
    Deny(ErrPacket),
}

impl Authentication {
    /// Starts with the client's first answer. `can_switch`: the client speaks PLUGIN_AUTH;
    /// `secure`: the connection is TLS.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        users: &Users,
        user_name: &[u8],
        plugin: Option<&[u8]>,
        answer: &[u8],
        nonce: [u8; 20],
        can_switch: bool,
        secure: bool,
        peer_ip: &str,
    ) -> (Authentication, AuthStep) {
        let user = users.get(user_name);
        let mut a = Authentication {
            user_name: user_name.to_vec(),
            user,
            nonce,
            used_password: !answer.is_empty(),
            switched: None,
            secure,
        };
        let d = auth::first_answer(
            a.user.as_deref(),
            plugin,
            can_switch,
            &nonce,
            answer,
            secure,
        );
        let step = a.decide(d, peer_ip);
        (a, step)
    }

    /// The answer to the AuthSwitchRequest.
    pub fn answer(&mut self, answer: &[u8], peer_ip: &str) -> AuthStep {
        self.used_password = !answer.is_empty();
        let Some(plugin) = self.switched.take() else {
            return AuthStep::Deny(self.denied(peer_ip));
        };
        if plugin == Plugin::Clear && !self.secure {
            return AuthStep::Deny(self.denied(peer_ip));
        }
        let d = auth::verify(self.user.as_deref(), plugin, &self.nonce, answer);
        self.decide(d, peer_ip)
    }

    /// The verdict on the token [`AuthStep::VerifyToken`] asked about.
    pub fn token_verified(&mut self, ok: bool, peer_ip: &str) -> AuthStep {
        match (&self.user, ok && self.secure) {
            (Some(u), true) => AuthStep::Accept {
                user: u.clone(),
                plugin: Plugin::Clear,
            },
            _ => AuthStep::Deny(self.denied(peer_ip)),
        }
    }

    fn decide(&mut self, d: Decision, peer_ip: &str) -> AuthStep {
        match (d, &self.user) {
            (Decision::Token(token), Some(u)) if self.secure => AuthStep::VerifyToken {
                user: u.clone(),
                token,
            },
            (Decision::Switch(p), _) if self.switched.is_none() => {
                self.switched = Some(p);
                AuthStep::Switch(encode_auth_switch(p.name(), &self.nonce))
            }
            (Decision::FullAuth, _) if self.switched.is_none() => {
                self.switched = Some(Plugin::Clear);
                AuthStep::Switch(vec![0x01, SHA2_FULL_AUTH])
            }
            (Decision::NeedsTls, _) => AuthStep::Deny(insecure_transport()),
            (Decision::Accept(plugin), Some(u)) => AuthStep::Accept {
                user: u.clone(),
                plugin,
            },
            _ => AuthStep::Deny(self.denied(peer_ip)),
        }
    }

    /// Whether the connection is TLS.
    pub fn secure(&self) -> bool {
        self.secure
    }

    fn denied(&self, peer_ip: &str) -> ErrPacket {
        auth::access_denied(&self.user_name, peer_ip, self.used_password)
    }

    pub fn user_name(&self) -> &[u8] {
        &self.user_name
    }
}

/// ER_SECURE_TRANSPORT_REQUIRED, as `require_secure_transport` words it.
pub fn insecure_transport() -> ErrPacket {
    ErrPacket::new(
        errcode::ER_SECURE_TRANSPORT_REQUIRED,
        "HY000",
        "Connections using insecure transport are prohibited while --require_secure_transport=ON.",
    )
}

/// TLS towards the client, as the endpoint allows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientTls {
    /// CLIENT_SSL is not offered.
    Off,
    /// Offered; the client chooses.
    Offered,
    /// Offered, and a login without it is refused.
    Required,
}

/// The connection phase.
#[derive(Debug)]
pub struct Login {
    nonce: [u8; 20],
    offered: u32,
    offered_ext: u32,
    peer_ip: String,
    tls: ClientTls,
    /// The TLS handshake is done.
    secure: bool,
    state: LoginState,
}

#[derive(Debug)]
enum LoginState {
    /// Waiting for the HandshakeResponse.
    Response,
    /// Waiting for the answer to an auth switch.
    Switched {
        auth: Authentication,
        resp: HandshakeResponse,
        caps: u32,
    },
    /// Waiting for the verdict on a token; the reply goes out at `seq`.
    Token {
        auth: Authentication,
        resp: HandshakeResponse,
        caps: u32,
        seq: u8,
    },
    Over,
}

/// What a session agreed at login, which COM_CHANGE_USER keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreed {
    pub caps: u32,
    pub ext_caps: u32,
    /// Kept unless COM_CHANGE_USER names another.
    pub collation: u8,
}

/// What dbproxy tells clients about itself in the greeting.
#[derive(Debug, Clone)]
pub struct Profile {
    pub version: String,
    /// What the backend offers (dbproxy offers the part of it it supports).
    pub capabilities: u32,
    /// MariaDB's extended capabilities the backend offers.
    pub ext_capabilities: u32,
    pub collation: u8,
}

impl Login {
    /// Starts a login; the greeting to write at sequence id 0 comes with it.
    pub fn start(
        profile: &Profile,
        connection_id: u32,
        nonce: [u8; 20],
        peer_ip: String,
        tls: ClientTls,
    ) -> (Login, Vec<u8>) {
        let mut offered = cap::PROXY_OFFERS & (profile.capabilities | cap::LONG_PASSWORD);
        if tls != ClientTls::Off {
            offered |= cap::SSL;
        }
        // In front of MariaDB, dbproxy presents itself as MariaDB (CLIENT_MYSQL cleared) and
        // offers the extended capabilities it relays.
        let offered_ext = ext::PROXY_OFFERS & profile.ext_capabilities;
        if offered_ext != 0 {
            offered &= !cap::LONG_PASSWORD;
        }
        let greeting = ServerHandshake {
            version: profile.version.clone(),
            connection_id,
            nonce: nonce.to_vec(),
            capabilities: offered,
            ext_capabilities: offered_ext,
            collation: profile.collation,
            status: status::AUTOCOMMIT,
            auth_plugin: Plugin::Native.name().into(),
        };
        (
            Login {
                nonce,
                offered,
                offered_ext,
                peer_ip,
                tls,
                secure: false,
                state: LoginState::Response,
            },
            greeting.encode(),
        )
    }

    /// COM_CHANGE_USER (its `payload`, sent at `seq`) on a session that agreed `agreed`
    /// at login: authenticated as a login is, answering the greeting's `nonce`; `secure`:
    /// the session is TLS. What the client sends next (an auth switch's answer) goes to
    /// [`Login::on_packet`].
    pub fn change_user(
        users: &Users,
        payload: &[u8],
        seq: u8,
        agreed: Agreed,
        nonce: [u8; 20],
        peer_ip: String,
        secure: bool,
    ) -> (Login, Step) {
        let mut login = Login {
            nonce,
            offered: agreed.caps,
            offered_ext: agreed.ext_caps,
            peer_ip,
            tls: ClientTls::Off,
            secure,
            state: LoginState::Over,
        };
        let reply_seq = seq.wrapping_add(1);
        let cu = match ChangeUser::parse(payload, agreed.caps) {
            Ok(cu) => cu,
            Err(e) => {
                let step = Step::Refused {
                    seq: reply_seq,
                    err: malformed(&e.to_string()),
                    log: format!("malformed COM_CHANGE_USER: {e}"),
                };
                return (login, step);
            }
        };
        let resp = HandshakeResponse {
            capabilities: agreed.caps,
            ext_capabilities: agreed.ext_caps,
            collation: cu.collation.map_or(agreed.collation, |c| c as u8),
            user: cu.user,
            auth_response: cu.auth_response,
            database: cu.database,
            auth_plugin: cu.auth_plugin,
            attrs: cu.attrs,
            ..Default::default()
        };
        let (auth, step) = Authentication::start(
            users,
            &resp.user,
            resp.auth_plugin.as_deref(),
            &resp.auth_response,
            nonce,
            agreed.caps & cap::PLUGIN_AUTH != 0,
            secure,
            &login.peer_ip,
        );
        let step = login.after_auth(step, auth, resp, agreed.caps, reply_seq);
        (login, step)
    }

    /// The nonce of the greeting (COM_CHANGE_USER reuses it).
    pub fn nonce(&self) -> [u8; 20] {
        self.nonce
    }

    /// The TLS handshake the machine asked for is done.
    pub fn secured(&mut self) {
        self.secure = true;
    }

    /// The verdict on the token [`Step::VerifyToken`] asked about.
    pub fn token_verified(&mut self, ok: bool) -> Step {
        match std::mem::replace(&mut self.state, LoginState::Over) {
            LoginState::Token {
                mut auth,
                resp,
                caps,
                seq,
            } => {
                let step = auth.token_verified(ok, &self.peer_ip);
                self.after_auth(step, auth, resp, caps, seq)
            }
            _ => Step::Refused {
                seq: 0,
                err: ErrPacket::new(errcode::ER_HANDSHAKE_ERROR, "08S01", "Bad handshake"),
                log: "a token verdict without a token".into(),
            },
        }
    }

    /// Feeds one packet from the client (`seq`: its sequence id).
    pub fn on_packet(&mut self, users: &Users, seq: u8, payload: &[u8]) -> Step {
        let reply_seq = seq.wrapping_add(1);
        match std::mem::replace(&mut self.state, LoginState::Over) {
            LoginState::Response if is_ssl_request(payload) => {
                if self.tls == ClientTls::Off || self.secure {
                    return Step::Refused {
                        seq: reply_seq,
                        err: ErrPacket::new(
                            errcode::ER_HANDSHAKE_ERROR,
                            "08S01",
                            "Bad handshake: TLS is not offered on this endpoint",
                        ),
                        log: "client asked for TLS, which this endpoint does not offer".into(),
                    };
                }
                self.state = LoginState::Response;
                Step::StartTls
            }
            LoginState::Response => {
                if self.tls == ClientTls::Required && !self.secure {
                    return Step::Refused {
                        seq: reply_seq,
                        err: insecure_transport(),
                        log: "client logged in without TLS on an endpoint that requires it".into(),
                    };
                }
                let resp = match HandshakeResponse::parse(payload) {
                    Ok(r) => r,
                    Err(e) => {
                        return Step::Refused {
                            seq: reply_seq,
                            err: ErrPacket::new(
                                errcode::ER_HANDSHAKE_ERROR,
                                "08S01",
                                format!("Bad handshake: {e}"),
                            ),
                            log: format!("bad handshake from client: {e}"),
                        }
                    }
                };
                if resp.capabilities & cap::COMPRESS != 0 {
                    return Step::Refused {
                        seq: reply_seq,
                        err: ErrPacket::new(
                            errcode::ER_HANDSHAKE_ERROR,
                            "08S01",
                            "Bad handshake: dbproxy does not support compression",
                        ),
                        log: "client asked for compression".into(),
                    };
                }
                let caps = resp.capabilities & self.offered;
                let (auth, step) = Authentication::start(
                    users,
                    &resp.user,
                    resp.auth_plugin.as_deref(),
                    &resp.auth_response,
                    self.nonce,
                    caps & cap::PLUGIN_AUTH != 0,
                    self.secure,
                    &self.peer_ip,
                );
                self.after_auth(step, auth, resp, caps, reply_seq)
            }
            LoginState::Switched {
                mut auth,
                resp,
                caps,
            } => {
                let step = auth.answer(payload, &self.peer_ip);
                self.after_auth(step, auth, resp, caps, reply_seq)
            }
            LoginState::Token { .. } | LoginState::Over => Step::Refused {
                seq: reply_seq,
                err: ErrPacket::new(errcode::ER_HANDSHAKE_ERROR, "08S01", "Bad handshake"),
                log: "packet after the login ended".into(),
            },
        }
    }

    fn after_auth(
        &mut self,
        step: AuthStep,
        auth: Authentication,
        resp: HandshakeResponse,
        caps: u32,
        seq: u8,
    ) -> Step {
        match step {
            AuthStep::Switch(payload) => {
                self.state = LoginState::Switched { auth, resp, caps };
                Step::Send { seq, payload }
            }
            AuthStep::VerifyToken { user, token } => {
                self.state = LoginState::Token {
                    auth,
                    resp,
                    caps,
                    seq,
                };
                Step::VerifyToken { user, token }
            }
            AuthStep::Accept { user, plugin } => Step::Accepted(Accepted {
                user,
                caps,
                ext_caps: resp.ext_capabilities & self.offered_ext,
                collation: resp.collation,
                database: resp.database,
                fast_auth_ok: plugin == Plugin::CachingSha2,
                seq,
            }),
            AuthStep::Deny(err) => Step::Refused {
                seq,
                log: if err.code == errcode::ER_SECURE_TRANSPORT_REQUIRED {
                    format!(
                        "{} logs in with a clear-text password, which needs TLS",
                        String::from_utf8_lossy(auth.user_name())
                    )
                } else {
                    format!(
                        "access denied for {}",
                        String::from_utf8_lossy(auth.user_name())
                    )
                },
                err,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{UserAuthPlugin, UserConfig};

    fn users() -> Users {
        Users::new(&[UserConfig {
            name: "app".into(),
            password: "pw".into(),
            password_hash: None,
            backend_user: None,
            backend_password: "db".into(),
            auth_plugin: UserAuthPlugin::CachingSha2Password,
            postgres_auth: Default::default(),
            aws_iam_arns: Vec::new(),
            jwt_subjects: Vec::new(),
            max_database_connections: None,
            weight: 1,
        }])
    }

    use crate::session::testing::profile;

    fn response(plugin: Plugin, nonce: &[u8], password: &str) -> Vec<u8> {
        HandshakeResponse {
            capabilities: cap::PROXY_OFFERS,
            ext_capabilities: 0,
            user: b"app".to_vec(),
            auth_response: plugin.scramble(password.as_bytes(), nonce),
            database: Some(b"shop".to_vec()),
            auth_plugin: Some(plugin.name().as_bytes().to_vec()),
            collation: 33,
            ..Default::default()
        }
        .encode()
    }

    #[test]
    fn switch_then_accept_with_fast_auth() {
        let nonce = [7u8; 20];
        let (mut l, greeting) =
            Login::start(&profile(), 5, nonce, "127.0.0.1".into(), ClientTls::Off);
        assert!(ServerHandshake::parse(&greeting).is_ok());
        // The client answers for mysql_native_password; the user requires caching_sha2.
        let step = l.on_packet(&users(), 1, &response(Plugin::Native, &nonce, "pw"));
        let Step::Send { seq, payload } = step else {
            panic!("{step:?}")
        };
        assert_eq!((seq, payload[0]), (2, 0xfe));
        let answer = Plugin::CachingSha2.scramble(b"pw", &nonce);
        match l.on_packet(&users(), 3, &answer) {
            Step::Accepted(a) => {
                assert_eq!(a.database.as_deref(), Some(&b"shop"[..]));
                assert_eq!(a.collation, 33);
                assert_eq!(a.preamble(), (Some((4, vec![1, 3])), 5));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn mariadb_extended_capabilities_are_offered_and_agreed() {
        let nonce = [3u8; 20];
        let mut p = profile();
        p.capabilities &= !cap::LONG_PASSWORD;
        p.ext_capabilities = ext::PROGRESS | ext::CACHE_METADATA | ext::EXTENDED_METADATA;
        let (mut l, greeting) = Login::start(&p, 5, nonce, "127.0.0.1".into(), ClientTls::Off);
        let hs = ServerHandshake::parse(&greeting).unwrap();
        // dbproxy presents itself as MariaDB, and never offers metadata caching.
        assert_eq!(hs.capabilities & cap::LONG_PASSWORD, 0);
        assert_eq!(hs.ext_capabilities, ext::PROGRESS | ext::EXTENDED_METADATA);
        let mut r = HandshakeResponse::parse(&response(Plugin::CachingSha2, &nonce, "pw")).unwrap();
        r.capabilities &= !cap::LONG_PASSWORD;
        r.ext_capabilities =
            ext::EXTENDED_METADATA | ext::CACHE_METADATA | ext::STMT_BULK_OPERATIONS;
        match l.on_packet(&users(), 1, &r.encode()) {
            Step::Accepted(a) => assert_eq!(a.ext_caps, ext::EXTENDED_METADATA),
            other => panic!("{other:?}"),
        }
        // A client that says CLIENT_MYSQL gets none.
        let (mut l, _) = Login::start(&p, 5, nonce, "127.0.0.1".into(), ClientTls::Off);
        match l.on_packet(&users(), 1, &response(Plugin::CachingSha2, &nonce, "pw")) {
            Step::Accepted(a) => assert_eq!(a.ext_caps, 0),
            other => panic!("{other:?}"),
        }
    }

    fn ssl_request() -> Vec<u8> {
        crate::mysql::handshake::encode_ssl_request(cap::PROXY_OFFERS, 0, 33)
    }

    #[test]
    fn ssl_request_starts_tls_then_the_response_follows() {
        let nonce = [5u8; 20];
        let (mut l, greeting) = Login::start(
            &profile(),
            5,
            nonce,
            "127.0.0.1".into(),
            ClientTls::Required,
        );
        let hs = ServerHandshake::parse(&greeting).unwrap();
        assert!(hs.capabilities & cap::SSL != 0, "CLIENT_SSL offered");
        assert!(matches!(
            l.on_packet(&users(), 1, &ssl_request()),
            Step::StartTls
        ));
        l.secured();
        match l.on_packet(&users(), 2, &response(Plugin::CachingSha2, &nonce, "pw")) {
            Step::Accepted(a) => assert_eq!(a.preamble(), (Some((3, vec![1, 3])), 4)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tls_required_refuses_a_plain_login_with_3159() {
        let nonce = [5u8; 20];
        let (mut l, _) = Login::start(
            &profile(),
            5,
            nonce,
            "127.0.0.1".into(),
            ClientTls::Required,
        );
        match l.on_packet(&users(), 1, &response(Plugin::CachingSha2, &nonce, "pw")) {
            Step::Refused { seq, err, .. } => {
                assert_eq!((seq, err.code), (2, 3159));
                assert!(err.message.contains("insecure transport"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ssl_request_without_tls_or_twice_is_refused() {
        let nonce = [5u8; 20];
        let (mut l, greeting) =
            Login::start(&profile(), 5, nonce, "127.0.0.1".into(), ClientTls::Off);
        assert_eq!(
            ServerHandshake::parse(&greeting).unwrap().capabilities & cap::SSL,
            0
        );
        assert!(matches!(
            l.on_packet(&users(), 1, &ssl_request()),
            Step::Refused { err, .. } if err.code == 1043
        ));
        let (mut l, _) = Login::start(&profile(), 5, nonce, "127.0.0.1".into(), ClientTls::Offered);
        assert!(matches!(
            l.on_packet(&users(), 1, &ssl_request()),
            Step::StartTls
        ));
        l.secured();
        assert!(matches!(
            l.on_packet(&users(), 2, &ssl_request()),
            Step::Refused { .. }
        ));
        // Optional: a plain login is fine.
        let (mut l, _) = Login::start(&profile(), 5, nonce, "127.0.0.1".into(), ClientTls::Offered);
        assert!(matches!(
            l.on_packet(&users(), 1, &response(Plugin::CachingSha2, &nonce, "pw")),
            Step::Accepted(_)
        ));
    }

    #[test]
    fn clear_text_users_get_full_authentication_over_tls_only() {
        let clear = Users::new(&[UserConfig {
            name: "app".into(),
            password: "pw".into(),
            password_hash: None,
            backend_user: None,
            backend_password: "db".into(),
            auth_plugin: UserAuthPlugin::MysqlClearPassword,
            postgres_auth: Default::default(),
            aws_iam_arns: Vec::new(),
            jwt_subjects: Vec::new(),
            max_database_connections: None,
            weight: 1,
        }]);
        let nonce = [6u8; 20];
        let (mut l, _) = Login::start(&profile(), 5, nonce, "127.0.0.1".into(), ClientTls::Offered);
        assert!(matches!(
            l.on_packet(&clear, 1, &ssl_request()),
            Step::StartTls
        ));
        l.secured();
        let Step::Send { seq, payload } =
            l.on_packet(&clear, 2, &response(Plugin::CachingSha2, &nonce, "pw"))
        else {
            panic!("no full authentication request")
        };
        assert_eq!((seq, payload), (3, vec![0x01, 0x04]));
        match l.on_packet(&clear, 4, b"pw\0") {
            Step::Accepted(a) => assert_eq!(a.preamble(), (None, 5)),
            other => panic!("{other:?}"),
        }
        // Without TLS: refused before any password is asked for.
        let (mut l, _) = Login::start(&profile(), 5, nonce, "127.0.0.1".into(), ClientTls::Offered);
        assert!(matches!(
            l.on_packet(&clear, 1, &response(Plugin::CachingSha2, &nonce, "pw")),
            Step::Refused { err, .. } if err.code == 3159
        ));
    }

    #[test]
    fn wrong_password_and_garbage_are_refused() {
        let nonce = [9u8; 20];
        let (mut l, _) = Login::start(&profile(), 5, nonce, "10.0.0.1".into(), ClientTls::Off);
        let step = l.on_packet(&users(), 1, &response(Plugin::CachingSha2, &nonce, "nope"));
        match step {
            Step::Refused { seq, err, .. } => {
                assert_eq!(seq, 2);
                assert_eq!(err.code, 1045);
                assert!(err
                    .message
                    .contains("'app'@'10.0.0.1' (using password: YES)"));
            }
            other => panic!("{other:?}"),
        }
        let (mut l, _) = Login::start(&profile(), 5, nonce, "10.0.0.1".into(), ClientTls::Off);
        assert!(matches!(
            l.on_packet(&users(), 1, b"\x01\x02"),
            Step::Refused { .. }
        ));
        assert!(matches!(
            l.on_packet(&users(), 3, b"again"),
            Step::Refused { .. }
        ));
    }
}
