//! Sans-IO PostgreSQL protocol core (protocol 3.0): bytes in, decisions and bytes out.
//!
//! The same rules as `mysql/`: nothing in here touches a socket, a clock or an async
//! runtime, nothing imports the rest of the crate, and every parser meets random and
//! mutated bytes in the tests below (errors, never panics).
//!
//! - [`frame`]: message framing (a type byte and a length), a bounds-checked reader.
//! - [`startup`]: the untyped first message (StartupMessage, SSLRequest, GSSENCRequest,
//!   CancelRequest) and its parameters; protocol versions and their negotiation.
//! - [`messages`]: what dbproxy says as a server (authentication requests,
//!   ParameterStatus, BackendKeyData, ReadyForQuery, ErrorResponse, ...) and the client's
//!   authentication answers.
//! - [`login`]: a client logging in to dbproxy, up to AuthenticationOk: TLS asked for, the
//!   user identified by the caller, SCRAM, md5 or clear text (under TLS, checked by the
//!   caller: tokens).
//! - [`scram`]: SCRAM-SHA-256 (RFC 5802, RFC 7677) on both sides: dbproxy verifying a
//!   client against a stored verifier, and dbproxy logging in to the database.
//! - [`md5`]: the `md5` password method, both sides.
//! - [`backend`]: dbproxy opening a server connection (startup, md5, SCRAM, clear text
//!   under TLS only) up to the first ReadyForQuery.
//! - [`tracker`]: what is outstanding on a server connection, read from the bytes relayed
//!   both ways: when it may go back to the pool (ReadyForQuery `I`, nothing due, no COPY,
//!   nothing unsynced).

pub mod backend;
pub mod frame;
pub mod login;
pub mod md5;
pub mod messages;
pub mod scram;
pub mod startup;
pub mod tracker;

#[cfg(test)]
mod robustness {
    //! Every parser meets random and mutated bytes: errors, never panics.

    use super::frame::{message, Reader};
    use super::messages::{parse_password, parse_sasl_initial};
    use super::scram::{ClientLogin, ServerLogin, Verifier};
    use super::startup::parse_startup;
    use super::tracker::Tracker;

    use crate::test_rng::Rng;

    static SCRAM: std::sync::LazyLock<Verifier> =
        std::sync::LazyLock::new(|| Verifier::from_password(b"pw", b"salt", 16));

    fn feed_all(b: &[u8]) {
        let _ = message(b);
        let _ = parse_startup(b);
        let _ = parse_password(b);
        let _ = parse_sasl_initial(b);
        for secure in [false, true] {
            use super::login::{Credential, Login, Need};
            let mut l = Login::new(secure);
            let mut out = Vec::new();
            let (head, tail) = b.split_at(b.len() / 2);
            if matches!(l.on_bytes(head, &mut out), Need::Identify { .. }) {
                let c = match b.len() % 3 {
                    0 => Credential::ClearText,
                    1 => Credential::Md5(super::md5::stored(b"pw", b"u")),
                    _ => Credential::Scram(SCRAM.clone()),
                };
                let _ = l.identified(c, [1; 18], &mut out);
            }
            let _ = l.on_bytes(tail, &mut out);
            let _ = l.password_checked(false, &mut out);
        }
        let (mut o, _) = super::backend::Opening::start("u", "d", b"pw", &[], true, [0; 18]);
        let _ = o.on_bytes(b, &mut Vec::new());
        let mut t = Tracker::default();
        let _ = t.from_client(b);
        let _ = t.from_server(b, |_| {});
        let _ = t.releasable();
        let mut r = Reader::new(b);
        let _ = r.cstr("x");
        let _ = r.i32("x");
        let _ = r.i16("x");
        if let Ok(v) = Verifier::parse(std::str::from_utf8(b).unwrap_or("")) {
            let (mut login, _) = match ServerLogin::start(&v, b, *b"0123456789abcdef01") {
                Ok(x) => x,
                Err(_) => return,
            };
            let _ = login.finish(b);
        }
        let mut c = ClientLogin::new(b"pw", *b"client-nonce-01234");
        let _ = c.server_first(b);
        let _ = c.server_final(b);
    }

    #[test]
    fn random_and_mutated_bytes_never_panic() {
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        let valid: Vec<Vec<u8>> = vec![
            super::startup::tests::startup_bytes(&[("user", "app"), ("database", "db")]),
            vec![0, 0, 0, 8, 4, 210, 22, 47],
            b"p\0\0\0\x0bsecret\0".to_vec(),
            b"SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=".to_vec(),
            b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO".to_vec(),
        ];
        for _ in 0..20_000 {
            let b = rng.bytes(96);
            feed_all(&b);
        }
        for v in &valid {
            for _ in 0..2_000 {
                let mut b = v.clone();
                let flips = 1 + (rng.next() % 4) as usize;
                for _ in 0..flips {
                    if b.is_empty() {
                        break;
                    }
                    let i = (rng.next() as usize) % b.len();
                    b[i] = rng.next() as u8;
                }
                if matches!(rng.next() % 3, 0) {
                    let cut = (rng.next() as usize) % (b.len() + 1);
                    b.truncate(cut);
                }
                feed_all(&b);
            }
        }
    }
}
