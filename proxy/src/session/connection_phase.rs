//! A client's connection phase as the session runs it: the login machine
//! ([`super::login::Login`]) with what surrounds it: the greeting, the handshake deadline,
//! a malformed or oversized packet, the TLS upgrade, a token's verdict, and the login
//! throttle's wait before any verdict is told. Packets, verdicts and time in; actions out
//! ([`ConnectionPhase::poll_action`]) and the next deadline
//! ([`ConnectionPhase::poll_timeout`]). No socket, no clock: tests run it on virtual time.

use super::login::{Accepted, Agreed, ClientTls, Login, Profile, Step};
use crate::auth::throttle::LoginThrottle;
use crate::auth::{Token, User, Users};
use crate::mysql::consts::errcode;
use crate::mysql::wire::ErrPacket;
use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest packet accepted before a client has logged in.
pub const HANDSHAKE_LIMIT: usize = 64 * 1024;

/// Something that happened in the connection phase.
#[derive(Debug)]
pub enum Input<'a> {
    /// A whole packet from the client.
    Packet { seq: u8, payload: &'a [u8] },
    /// The client sent a packet over [`HANDSHAKE_LIMIT`] or one that cannot be framed.
    Malformed,
    /// The TLS handshake [`Action::StartTls`] asked for is done, or failed (why).
    Secured(Result<(), String>),
    /// The verdict on [`Action::VerifyToken`].
    TokenVerdict(bool),
    /// The deadline [`ConnectionPhase::poll_timeout`] gave passed.
    Timer,
}

/// What the driver does.
#[derive(Debug)]
pub enum Action {
    /// Write this packet to the client.
    Send { seq: u8, payload: Vec<u8> },
    /// Run the TLS handshake as the server (bytes already received after the SSLRequest
    /// are its start), then [`Input::Secured`].
    StartTls,
    /// Verify a token login (off the data path), then [`Input::TokenVerdict`].
    VerifyToken { user: Arc<User>, token: Token },
    /// Logged in: the session begins. Its final OK, at `ok_seq`, is the driver's to send
    /// once the client's database is known to exist.
    Accepted { accepted: Accepted, ok_seq: u8 },
    /// The phase ended without a session. The driver records why (`end`) first, then
    /// writes `reply` (the error that tells the client, if any) and closes: whoever sees
    /// the client's error can already read the log line.
    Close { end: End, reply: Option<Reply> },
}

/// The last packet a refused client is sent.
#[derive(Debug)]
pub struct Reply {
    pub seq: u8,
    pub payload: Vec<u8>,
}

/// Why a connection phase ended without a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// No login within `handshake_timeout`.
    Timeout,
    /// The credentials were refused (counted against the address: the throttle).
    Denied(String),
    /// Refused for another reason (TLS required, a bad handshake response, ...).
    Refused(String),
    /// A packet too large or malformed: told `Bad handshake`.
    BadHandshake,
    /// The TLS handshake failed.
    TlsFailed(String),
}

/// A verdict held while the throttle makes the address wait.
#[derive(Debug)]
enum Held {
    Accepted(Accepted),
    Refused { seq: u8, err: ErrPacket, end: End },
}

#[derive(Debug)]
enum State {
    /// Waiting for the client's next packet.
    Reading,
    /// The TLS handshake runs.
    Tls,
    /// A token is being verified.
    Token,
    /// The throttle holds the verdict until `until`.
    Throttled {
        until: Instant,
        waited: Duration,
        verdict: Held,
    },
    Over,
}

/// One client's connection phase.
#[derive(Debug)]
pub struct ConnectionPhase {
    login: Login,
    peer: IpAddr,
    deadline: Instant,
    state: State,
    actions: VecDeque<Action>,
}

impl ConnectionPhase {
    /// Starts the phase at `now`: the greeting is the first action.
    pub fn start(
        profile: &Profile,
        connection_id: u32,
        nonce: [u8; 20],
        peer: IpAddr,
        tls: ClientTls,
        handshake_timeout: Duration,
        now: Instant,
    ) -> ConnectionPhase {
        let (login, greeting) = Login::start(profile, connection_id, nonce, peer.to_string(), tls);
        let mut actions = VecDeque::with_capacity(2);
        actions.push_back(Action::Send {
            seq: 0,
            payload: greeting,
        });
        ConnectionPhase {
            login,
            peer,
            deadline: now.checked_add(handshake_timeout).unwrap_or(now),
            state: State::Reading,
            actions,
        }
    }

    /// COM_CHANGE_USER (its `payload`, sent at `seq`) on a logged-in session, at `now`:
    /// the same authentication, token verification, throttle and deadline as a login,
    /// without the greeting or TLS. `secure`: the session is TLS.
    #[allow(clippy::too_many_arguments)]
    pub fn change_user(
        payload: &[u8],
        seq: u8,
        agreed: Agreed,
        nonce: [u8; 20],
        peer: IpAddr,
        secure: bool,
        timeout: Duration,
        now: Instant,
        users: &Users,
        throttle: &LoginThrottle,
    ) -> ConnectionPhase {
        let (login, step) =
            Login::change_user(users, payload, seq, agreed, nonce, peer.to_string(), secure);
        let mut phase = ConnectionPhase {
            login,
            peer,
            deadline: now.checked_add(timeout).unwrap_or(now),
            state: State::Reading,
            actions: VecDeque::with_capacity(2),
        };
        phase.step(step, now, throttle);
        phase
    }

    /// The greeting's nonce (COM_CHANGE_USER reuses it).
    pub fn nonce(&self) -> [u8; 20] {
        self.login.nonce()
    }

    /// When the phase gives up on the client (`handshake_timeout` after it began).
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The next action to take.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Input::Timer`] is due: the end of a throttle wait, else the handshake
    /// deadline; none once the phase is over.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.state {
            State::Throttled { until, .. } => Some(*until),
            State::Over => None,
            _ => Some(self.deadline),
        }
    }

    /// Whether the phase waits for the client's next packet (not for TLS, a verdict or
    /// the throttle).
    pub fn wants_packet(&self) -> bool {
        matches!(self.state, State::Reading)
    }

    /// Handles one input at `now`.
    pub fn handle(
        &mut self,
        input: Input<'_>,
        now: Instant,
        users: &Users,
        throttle: &LoginThrottle,
    ) {
        match (std::mem::replace(&mut self.state, State::Over), input) {
            (State::Over, _) => {}
            (State::Reading, Input::Packet { seq, payload }) => {
                let step = self.login.on_packet(users, seq, payload);
                self.step(step, now, throttle);
            }
            (State::Reading | State::Tls, Input::Malformed) => {
                let err = ErrPacket::new(errcode::ER_HANDSHAKE_ERROR, "08S01", "Bad handshake");
                self.close(
                    End::BadHandshake,
                    Some(Reply {
                        seq: 2,
                        payload: err.encode(),
                    }),
                );
            }
            (State::Tls, Input::Secured(Ok(()))) => {
                self.login.secured();
                self.state = State::Reading;
            }
            (State::Tls, Input::Secured(Err(why))) => self.close(End::TlsFailed(why), None),
            (State::Token, Input::TokenVerdict(ok)) => {
                let step = self.login.token_verified(ok);
                self.step(step, now, throttle);
            }
            (State::Token, Input::Timer) if now >= self.deadline => {
                // A verdict that did not come in time is a refusal.
                let step = self.login.token_verified(false);
                self.step(step, now, throttle);
            }
            (
                State::Throttled {
                    until,
                    waited,
                    verdict,
                },
                Input::Timer,
            ) if now >= until => {
                throttle.waited(waited);
                self.tell(verdict, now, throttle);
            }
            (State::Reading | State::Tls, Input::Timer) if now >= self.deadline => {
                self.close(End::Timeout, None);
            }
            (state, input) => {
                // Early timers, and inputs for a step the phase is not at: nothing changes.
                tracing::trace!(?input, "connection phase: input ignored");
                self.state = state;
            }
        }
    }

    /// Acts on what the login machine said.
    fn step(&mut self, step: Step, now: Instant, throttle: &LoginThrottle) {
        match step {
            Step::Send { seq, payload } => {
                self.actions.push_back(Action::Send { seq, payload });
                self.state = State::Reading;
            }
            Step::StartTls => {
                self.actions.push_back(Action::StartTls);
                self.state = State::Tls;
            }
            Step::VerifyToken { user, token } => {
                self.actions.push_back(Action::VerifyToken { user, token });
                self.state = State::Token;
            }
            Step::Accepted(a) => self.verdict(Held::Accepted(a), now, throttle),
            Step::Refused { seq, err, log } => {
                let end = if err.code == errcode::ER_ACCESS_DENIED_ERROR {
                    End::Denied(log)
                } else {
                    End::Refused(log)
                };
                self.verdict(Held::Refused { seq, err, end }, now, throttle);
            }
        }
    }

    /// A verdict: told now, or after the wait the throttle puts on the address.
    fn verdict(&mut self, verdict: Held, now: Instant, throttle: &LoginThrottle) {
        // Only a refused password and a success wait (as before the verdict was known,
        // the client cannot tell them apart by time); other refusals are told at once.
        let counted = matches!(
            verdict,
            Held::Accepted(_)
                | Held::Refused {
                    end: End::Denied(_),
                    ..
                }
        );
        let wait = if counted {
            throttle.delay(self.peer, now)
        } else {
            Duration::ZERO
        };
        if wait.is_zero() {
            return self.tell(verdict, now, throttle);
        }
        tracing::info!(peer = %self.peer, "login from an address with repeated failures waits {wait:?}");
        self.state = State::Throttled {
            until: now.checked_add(wait).unwrap_or(now),
            waited: wait,
            verdict,
        };
    }

    /// Tells the client its verdict.
    fn tell(&mut self, verdict: Held, now: Instant, throttle: &LoginThrottle) {
        match verdict {
            Held::Accepted(accepted) => {
                throttle.succeeded(self.peer);
                let (preamble, ok_seq) = accepted.preamble();
                if let Some((seq, payload)) = preamble {
                    self.actions.push_back(Action::Send { seq, payload });
                }
                self.actions
                    .push_back(Action::Accepted { accepted, ok_seq });
                self.state = State::Over;
            }
            Held::Refused { seq, err, end } => {
                if matches!(end, End::Denied(_)) {
                    throttle.failed(self.peer, now);
                }
                let reply = Reply {
                    seq,
                    payload: err.encode(),
                };
                self.close(end, Some(reply));
            }
        }
    }

    fn close(&mut self, end: End, reply: Option<Reply>) {
        self.actions.push_back(Action::Close { end, reply });
        self.state = State::Over;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mysql::auth::Plugin;
    use crate::mysql::consts::cap;
    use crate::mysql::handshake::{encode_ssl_request, HandshakeResponse};

    const NONCE: [u8; 20] = [7; 20];

    /// `app` logs in with a password, `iam` with a token.
    fn users() -> Users {
        use crate::session::testing::user_config;
        let arn = "arn:aws:iam::123456789012:role/app".to_string();
        Users::new(&[
            user_config("app", Vec::new()),
            user_config("iam", vec![arn]),
        ])
    }

    use crate::session::testing::profile;

    fn response(plugin: Plugin, password: &str, caps: u32) -> Vec<u8> {
        let user = if plugin == Plugin::Clear {
            "iam"
        } else {
            "app"
        };
        HandshakeResponse {
            capabilities: caps,
            user: user.as_bytes().to_vec(),
            auth_response: plugin.scramble(password.as_bytes(), &NONCE),
            auth_plugin: Some(plugin.name().as_bytes().to_vec()),
            collation: 45,
            ..Default::default()
        }
        .encode()
    }

    /// A phase on virtual time, with its own throttle (2 failures, then waits).
    struct Client {
        phase: ConnectionPhase,
        users: Users,
        throttle: LoginThrottle,
        now: Instant,
    }

    impl Client {
        fn new(tls: ClientTls) -> Client {
            Client::with_throttle(tls, LoginThrottle::new(2, Duration::from_secs(8)))
        }

        fn with_throttle(tls: ClientTls, throttle: LoginThrottle) -> Client {
            let now = Instant::now();
            let ip: IpAddr = "10.0.0.9".parse().unwrap();
            let phase =
                ConnectionPhase::start(&profile(), 9, NONCE, ip, tls, Duration::from_secs(10), now);
            let mut c = Client {
                phase,
                users: users(),
                throttle,
                now,
            };
            match c.actions().as_slice() {
                [Action::Send { seq: 0, payload }] => assert_eq!(payload.first(), Some(&10)),
                other => panic!("the greeting first: {other:?}"),
            }
            c
        }

        /// A logged-in session's COM_CHANGE_USER (sent at sequence id 0) as `user`.
        fn change_user(
            user: &str,
            password: &str,
            throttle: LoginThrottle,
        ) -> (Client, Vec<Action>) {
            let payload = crate::mysql::handshake::ChangeUser {
                user: user.as_bytes().to_vec(),
                auth_response: Plugin::Native.scramble(password.as_bytes(), &NONCE),
                database: Some(b"shop".to_vec()),
                collation: Some(8),
                auth_plugin: Some(Plugin::Native.name().as_bytes().to_vec()),
                attrs: Vec::new(),
            }
            .encode(cap::PROXY_OFFERS);
            Client::changing_user(&payload, throttle)
        }

        /// A logged-in session's COM_CHANGE_USER with this payload; the first actions.
        fn changing_user(payload: &[u8], throttle: LoginThrottle) -> (Client, Vec<Action>) {
            let now = Instant::now();
            let agreed = Agreed {
                caps: cap::PROXY_OFFERS,
                ext_caps: 0,
                collation: 45,
            };
            let users = users();
            let phase = ConnectionPhase::change_user(
                payload,
                0,
                agreed,
                NONCE,
                "10.0.0.9".parse().unwrap(),
                false,
                Duration::from_secs(10),
                now,
                &users,
                &throttle,
            );
            let mut c = Client {
                phase,
                users,
                throttle,
                now,
            };
            let first = c.actions();
            (c, first)
        }

        fn actions(&mut self) -> Vec<Action> {
            std::iter::from_fn(|| self.phase.poll_action()).collect()
        }

        fn feed(&mut self, input: Input<'_>) -> Vec<Action> {
            self.phase
                .handle(input, self.now, &self.users, &self.throttle);
            self.actions()
        }

        fn packet(&mut self, seq: u8, payload: &[u8]) -> Vec<Action> {
            self.feed(Input::Packet { seq, payload })
        }

        fn advance(&mut self, d: Duration) -> Vec<Action> {
            self.now += d;
            self.feed(Input::Timer)
        }
    }

    fn sent_error(actions: &[Action]) -> Option<u16> {
        actions.iter().find_map(|a| match a {
            Action::Close {
                reply: Some(Reply { payload, .. }),
                ..
            } if payload.first() == Some(&0xff) => {
                Some(u16::from_le_bytes([payload[1], payload[2]]))
            }
            _ => None,
        })
    }

    #[test]
    fn a_good_password_logs_in_at_once() {
        let mut c = Client::new(ClientTls::Off);
        let a = c.packet(1, &response(Plugin::Native, "pw", cap::PROXY_OFFERS));
        match a.as_slice() {
            [Action::Accepted { accepted, ok_seq }] => {
                assert_eq!((accepted.user.name.as_str(), *ok_seq), ("app", 2));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(c.phase.poll_timeout(), None, "the phase is over");
    }

    #[test]
    fn repeated_failures_make_the_address_wait_for_every_verdict() {
        let mut c = Client::new(ClientTls::Off);
        let a = c.packet(1, &response(Plugin::Native, "wrong", cap::PROXY_OFFERS));
        assert_eq!(sent_error(&a), Some(errcode::ER_ACCESS_DENIED_ERROR));
        assert!(matches!(
            a.last(),
            Some(Action::Close {
                end: End::Denied(_),
                ..
            })
        ));
        // Two failures from the address: its next verdicts wait.
        let throttle = std::mem::replace(&mut c.throttle, LoginThrottle::new(0, Duration::ZERO));
        throttle.failed("10.0.0.9".parse().unwrap(), c.now);
        let mut c = Client::with_throttle(ClientTls::Off, throttle);
        let wait = c.throttle.delay("10.0.0.9".parse().unwrap(), c.now);
        assert!(!wait.is_zero(), "the throttle applies");
        let a = c.packet(1, &response(Plugin::Native, "wrong", cap::PROXY_OFFERS));
        assert!(a.is_empty(), "nothing is told yet: {a:?}");
        assert_eq!(c.phase.poll_timeout(), Some(c.now + wait));
        assert!(!c.phase.wants_packet());
        assert!(c.advance(wait / 2).is_empty(), "not before the wait ends");
        let a = c.advance(wait);
        assert_eq!(sent_error(&a), Some(errcode::ER_ACCESS_DENIED_ERROR));
        assert_eq!(
            c.throttle
                .delayed
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        // A good password from there waits too, then clears the address.
        let throttle = std::mem::replace(&mut c.throttle, LoginThrottle::new(0, Duration::ZERO));
        let mut c = Client::with_throttle(ClientTls::Off, throttle);
        let wait = c.throttle.delay("10.0.0.9".parse().unwrap(), c.now);
        assert!(c
            .packet(1, &response(Plugin::Native, "pw", cap::PROXY_OFFERS))
            .is_empty());
        let a = c.advance(wait);
        assert!(matches!(a.as_slice(), [Action::Accepted { .. }]), "{a:?}");
        assert!(c
            .throttle
            .delay("10.0.0.9".parse().unwrap(), c.now)
            .is_zero());
    }

    #[test]
    fn a_client_that_does_not_log_in_in_time_is_closed_untold() {
        let mut c = Client::new(ClientTls::Off);
        assert!(c.advance(Duration::from_secs(9)).is_empty());
        let a = c.advance(Duration::from_secs(1));
        assert!(
            matches!(
                a.as_slice(),
                [Action::Close {
                    end: End::Timeout,
                    reply: None
                }]
            ),
            "{a:?}"
        );
        assert!(c.packet(1, b"late").is_empty(), "over");
    }

    #[test]
    fn a_malformed_packet_is_a_bad_handshake() {
        let mut c = Client::new(ClientTls::Off);
        let a = c.feed(Input::Malformed);
        assert_eq!(sent_error(&a), Some(errcode::ER_HANDSHAKE_ERROR));
        assert!(matches!(
            a.last(),
            Some(Action::Close {
                end: End::BadHandshake,
                ..
            })
        ));
    }

    #[test]
    fn tls_then_a_token_verified_off_the_data_path() {
        let mut c = Client::new(ClientTls::Offered);
        let caps = cap::PROXY_OFFERS | cap::SSL;
        let a = c.packet(1, &encode_ssl_request(caps, 0, 45));
        assert!(matches!(a.as_slice(), [Action::StartTls]), "{a:?}");
        assert!(!c.phase.wants_packet());
        assert!(c.feed(Input::Secured(Ok(()))).is_empty());
        assert!(c.phase.wants_packet());
        let a = c.packet(2, &response(Plugin::Clear, "a.token.value", caps));
        assert!(
            matches!(a.as_slice(), [Action::VerifyToken { .. }]),
            "{a:?}"
        );
        let a = c.feed(Input::TokenVerdict(true));
        assert!(matches!(a.as_slice(), [Action::Accepted { .. }]), "{a:?}");
    }

    #[test]
    fn a_token_without_a_verdict_by_the_deadline_is_refused() {
        let mut c = Client::new(ClientTls::Offered);
        let caps = cap::PROXY_OFFERS | cap::SSL;
        c.packet(1, &encode_ssl_request(caps, 0, 45));
        c.feed(Input::Secured(Ok(())));
        c.packet(2, &response(Plugin::Clear, "a.token.value", caps));
        let a = c.advance(Duration::from_secs(10));
        assert_eq!(sent_error(&a), Some(errcode::ER_ACCESS_DENIED_ERROR));
        assert!(matches!(
            a.last(),
            Some(Action::Close {
                end: End::Denied(_),
                ..
            })
        ));
        assert!(c.feed(Input::TokenVerdict(true)).is_empty(), "too late");
    }

    #[test]
    fn a_failed_tls_handshake_ends_the_phase() {
        let mut c = Client::new(ClientTls::Required);
        let caps = cap::PROXY_OFFERS | cap::SSL;
        c.packet(1, &encode_ssl_request(caps, 0, 45));
        let a = c.feed(Input::Secured(Err("bad record".into())));
        assert!(
            matches!(
                a.as_slice(),
                [Action::Close {
                    end: End::TlsFailed(_),
                    reply: None
                }]
            ),
            "{a:?}"
        );
    }

    #[test]
    fn without_tls_where_it_is_required_the_client_is_refused_at_once() {
        let throttle = LoginThrottle::new(0, Duration::from_secs(8));
        let mut c = Client::with_throttle(ClientTls::Required, throttle);
        let a = c.packet(1, &response(Plugin::Native, "pw", cap::PROXY_OFFERS));
        assert!(sent_error(&a).is_some(), "{a:?}");
        assert!(
            matches!(
                a.last(),
                Some(Action::Close {
                    end: End::Refused(_),
                    ..
                })
            ),
            "{a:?}"
        );
    }

    #[test]
    fn change_user_is_authenticated_like_a_login() {
        let throttle = || LoginThrottle::new(2, Duration::from_secs(8));
        let (c, a) = Client::change_user("app", "pw", throttle());
        match a.as_slice() {
            [Action::Accepted { accepted, ok_seq }] => {
                assert_eq!(accepted.user.name, "app");
                assert_eq!(accepted.database.as_deref(), Some(&b"shop"[..]));
                assert_eq!((accepted.collation, *ok_seq), (8, 1), "no greeting: seq 1");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(c.phase.poll_timeout(), None);
        // A wrong password: refused at the next sequence id, counted against the address.
        let (c, a) = Client::change_user("app", "wrong", throttle());
        assert_eq!(sent_error(&a), Some(errcode::ER_ACCESS_DENIED_ERROR));
        assert!(
            matches!(
                a.as_slice(),
                [Action::Close {
                    end: End::Denied(_),
                    reply: Some(Reply { seq: 1, .. })
                }]
            ),
            "{a:?}"
        );
        // After two failures from the address, the next verdict waits, a success included
        // (time does not tell them apart).
        let throttle = c.throttle;
        throttle.failed("10.0.0.9".parse().unwrap(), c.now);
        let (mut c, a) = Client::change_user("app", "pw", throttle);
        assert!(a.is_empty(), "held: {a:?}");
        let until = c.phase.poll_timeout().expect("a wait");
        let a = c.advance(until - c.now);
        assert!(matches!(a.as_slice(), [Action::Accepted { .. }]), "{a:?}");
    }

    #[test]
    fn a_malformed_change_user_is_refused() {
        let throttle = LoginThrottle::new(2, Duration::from_secs(8));
        let payload = [crate::mysql::consts::com::CHANGE_USER, b'a'];
        let (_, a) = Client::changing_user(&payload, throttle);
        assert_eq!(sent_error(&a), Some(errcode::ER_MALFORMED_PACKET));
        assert!(
            matches!(
                a.as_slice(),
                [Action::Close {
                    end: End::Refused(_),
                    ..
                }]
            ),
            "{a:?}"
        );
    }
}
