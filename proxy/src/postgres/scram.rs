//! SCRAM-SHA-256 (RFC 5802, RFC 7677), as PostgreSQL speaks it, on both sides, without
//! channel binding (`SCRAM-SHA-256-PLUS` is not offered):
//! - [`ServerLogin`]: dbproxy checks a client against a stored [`Verifier`] (what
//!   `pg_authid` holds: salt, iterations, StoredKey, ServerKey; never the password). The
//!   client's proof is checked without any key derivation, so a login costs two HMACs
//!   and a hash.
//! - [`ClientLogin`]: dbproxy logs in to a database with the password from its secrets.
//!
//! Randomness comes in (the nonces' bytes); nothing here reads a clock or a socket.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The mechanism's name in AuthenticationSASL and SASLInitialResponse.
pub const MECHANISM: &str = "SCRAM-SHA-256";

/// PostgreSQL's default iteration count (`scram_iterations`).
pub const DEFAULT_ITERATIONS: u32 = 4096;

/// A server asking for more iterations than this is refused rather than let it spend
/// seconds of a worker's CPU on one login.
pub const MAX_ITERATIONS: u32 = 1_000_000;

/// Random bytes in a nonce (base64: 24 characters), as PostgreSQL makes them.
pub const NONCE_BYTES: usize = 18;

/// Why a SCRAM exchange failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("channel binding is not supported")]
    ChannelBinding,
    #[error("the nonce does not match")]
    Nonce,
    #[error("the proof does not match")]
    Proof,
    #[error("the server's signature does not match")]
    ServerSignature,
    #[error("the server asks for {0} iterations")]
    Iterations(u32),
    #[error("invalid SCRAM verifier: {0}")]
    Verifier(&'static str),
}

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // An HMAC takes a key of any length: new_from_slice cannot fail.
    let mut m = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => return [0; 32],
    };
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// `Hi(Normalize(password), salt, i)`: PBKDF2-HMAC-SHA-256. The password is SASLprep'd
/// where it can be, and used as it is where not, as PostgreSQL does.
fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let prepped = std::str::from_utf8(password)
        .ok()
        .and_then(|p| stringprep::saslprep(p).ok());
    let pw = prepped.as_deref().map_or(password, str::as_bytes);
    let mut out = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(pw, salt, iterations, &mut out);
    out
}

/// A password's ClientKey, StoredKey (H(ClientKey)) and ServerKey (RFC 5802).
struct Keys {
    client: [u8; 32],
    stored: [u8; 32],
    server: [u8; 32],
}

fn keys(password: &[u8], salt: &[u8], iterations: u32) -> Keys {
    let salted = salted_password(password, salt, iterations);
    let client = hmac(&salted, &[b"Client Key".as_slice()]);
    Keys {
        client,
        stored: Sha256::digest(client).into(),
        server: hmac(&salted, &[b"Server Key".as_slice()]),
    }
}

/// A proof and a signature give the key, a key and a signature give the proof.
fn xor(mut a: [u8; 32], b: [u8; 32]) -> [u8; 32] {
    for (x, y) in a.iter_mut().zip(b) {
        *x ^= y;
    }
    a
}

/// What a server keeps to check a role's SCRAM logins.
#[derive(Clone, PartialEq, Eq)]
pub struct Verifier {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Verifier(..)")
    }
}

impl std::fmt::Display for Verifier {
    /// PostgreSQL's form: `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{MECHANISM}${}:{}${}:{}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(self.stored_key),
            B64.encode(self.server_key)
        )
    }
}

impl Verifier {
    /// From PostgreSQL's form (`rolpassword` in `pg_authid`).
    pub fn parse(s: &str) -> Result<Verifier, ScramError> {
        let rest = s
            .strip_prefix(MECHANISM)
            .and_then(|r| r.strip_prefix('$'))
            .ok_or(ScramError::Verifier("not SCRAM-SHA-256$..."))?;
        let (params, keys) = rest
            .split_once('$')
            .ok_or(ScramError::Verifier("no keys"))?;
        let (iterations, salt) = params
            .split_once(':')
            .ok_or(ScramError::Verifier("no salt"))?;
        let (stored, server) = keys
            .split_once(':')
            .ok_or(ScramError::Verifier("no server key"))?;
        let iterations = iterations
            .parse::<u32>()
            .ok()
            .filter(|&i| i > 0)
            .ok_or(ScramError::Verifier("bad iteration count"))?;
        let salt = B64
            .decode(salt)
            .map_err(|_| ScramError::Verifier("salt not base64"))?;
        let key = |k: &str| -> Result<[u8; 32], ScramError> {
            B64.decode(k)
                .ok()
                .and_then(|v| <[u8; 32]>::try_from(v).ok())
                .ok_or(ScramError::Verifier("key not 32 bytes of base64"))
        };
        Ok(Verifier {
            iterations,
            salt,
            stored_key: key(stored)?,
            server_key: key(server)?,
        })
    }

    /// A verifier that no password matches (its keys are `random`), for a user that
    /// does not exist: the login then runs the same exchange and fails as a wrong
    /// password does.
    pub fn unmatchable(salt: &[u8], random: [u8; 32]) -> Verifier {
        let mut server_key = random;
        server_key.reverse();
        Verifier {
            iterations: DEFAULT_ITERATIONS,
            salt: salt.to_vec(),
            stored_key: random,
            server_key,
        }
    }

    /// A verifier for `password`, as `CREATE ROLE ... PASSWORD` makes it.
    pub fn from_password(password: &[u8], salt: &[u8], iterations: u32) -> Verifier {
        let k = keys(password, salt, iterations);
        Verifier {
            iterations,
            salt: salt.to_vec(),
            stored_key: k.stored,
            server_key: k.server,
        }
    }

    /// Whether `password` (sent in clear text) is the one this verifier was made from
    /// (compared in constant time).
    pub fn matches_password(&self, password: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        let k = keys(password, &self.salt, self.iterations);
        k.stored.ct_eq(&self.stored_key).into()
    }
}

/// The comma-separated `k=value` attributes of a SCRAM message.
fn attributes(msg: &str) -> impl Iterator<Item = (u8, &str)> {
    msg.split(',').map(|a| match a.as_bytes() {
        [k, b'=', ..] => (*k, a.get(2..).unwrap_or("")),
        _ => (0, a),
    })
}

/// A nonce of printable characters other than `,` (RFC 5802's `printable`).
fn valid_nonce(n: &str) -> bool {
    !n.is_empty() && n.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',')
}

/// dbproxy checking a client's SCRAM login.
#[derive(Debug)]
pub struct ServerLogin {
    /// `c=` the client must send back: its GS2 header, base64.
    binding: String,
    nonce: String,
    /// client-first-bare + "," + server-first, the start of the AuthMessage.
    auth_start: String,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl ServerLogin {
    /// Takes the client-first message (the SASLInitialResponse's data): the exchange and
    /// the server-first message to send (AuthenticationSASLContinue).
    pub fn start(
        v: &Verifier,
        client_first: &[u8],
        random: [u8; NONCE_BYTES],
    ) -> Result<(ServerLogin, Vec<u8>), ScramError> {
        let msg = std::str::from_utf8(client_first)
            .map_err(|_| ScramError::Malformed("client-first not UTF-8"))?;
        // gs2-header: a channel-binding flag, an (empty) authzid, then the bare message.
        let (flag, rest) = msg
            .split_once(',')
            .ok_or(ScramError::Malformed("no GS2 header"))?;
        match flag {
            "n" | "y" => {}
            f if f.starts_with("p=") => return Err(ScramError::ChannelBinding),
            _ => return Err(ScramError::Malformed("bad channel-binding flag")),
        }
        let (authzid, bare) = rest
            .split_once(',')
            .ok_or(ScramError::Malformed("no GS2 header"))?;
        if !authzid.is_empty() {
            return Err(ScramError::Malformed("an authorization identity"));
        }
        let mut attrs = attributes(bare);
        match attrs.next() {
            Some((b'n', _)) => {}
            Some((b'm', _)) => return Err(ScramError::Malformed("a mandatory extension")),
            _ => return Err(ScramError::Malformed("no user name attribute")),
        }
        let client_nonce = match attrs.next() {
            Some((b'r', n)) if valid_nonce(n) => n,
            _ => return Err(ScramError::Malformed("no valid nonce")),
        };
        if attrs.any(|(k, _)| k == 0) {
            return Err(ScramError::Malformed("a malformed attribute"));
        }
        let nonce = format!("{client_nonce}{}", B64.encode(random));
        let server_first = format!("r={nonce},s={},i={}", B64.encode(&v.salt), v.iterations);
        let login = ServerLogin {
            binding: B64.encode(format!("{flag},,")),
            nonce,
            auth_start: format!("{bare},{server_first}"),
            stored_key: v.stored_key,
            server_key: v.server_key,
        };
        Ok((login, server_first.into_bytes()))
    }

    /// Takes the client-final message (SASLResponse): the server-final message to send
    /// (AuthenticationSASLFinal) if the proof is right.
    pub fn finish(&mut self, client_final: &[u8]) -> Result<Vec<u8>, ScramError> {
        let msg = std::str::from_utf8(client_final)
            .map_err(|_| ScramError::Malformed("client-final not UTF-8"))?;
        let (without_proof, proof) = msg
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("no proof"))?;
        let mut attrs = attributes(without_proof);
        match attrs.next() {
            Some((b'c', c)) if c == self.binding => {}
            Some((b'c', _)) => return Err(ScramError::ChannelBinding),
            _ => return Err(ScramError::Malformed("no channel binding attribute")),
        }
        match attrs.next() {
            Some((b'r', n)) if n == self.nonce => {}
            Some((b'r', _)) => return Err(ScramError::Nonce),
            _ => return Err(ScramError::Malformed("no nonce")),
        }
        let proof: [u8; 32] = B64
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(ScramError::Malformed("proof not 32 bytes of base64"))?;
        let auth: [&[u8]; 3] = [self.auth_start.as_bytes(), b",", without_proof.as_bytes()];
        let client_key = xor(proof, hmac(&self.stored_key, &auth));
        let check: [u8; 32] = Sha256::digest(client_key).into();
        if !bool::from(check.as_slice().ct_eq(self.stored_key.as_slice())) {
            return Err(ScramError::Proof);
        }
        let server_signature = hmac(&self.server_key, &auth);
        Ok(format!("v={}", B64.encode(server_signature)).into_bytes())
    }
}

/// dbproxy logging in to a database with SCRAM-SHA-256.
#[derive(Debug)]
pub struct ClientLogin {
    password: Vec<u8>,
    nonce: String,
    /// The server's signature to expect, once the client-final is made.
    expect: Option<[u8; 32]>,
}

impl ClientLogin {
    pub fn new(password: &[u8], random: [u8; NONCE_BYTES]) -> ClientLogin {
        ClientLogin {
            password: password.to_vec(),
            nonce: B64.encode(random),
            expect: None,
        }
    }

    /// The client-first message (SASLInitialResponse's data). The user name is left
    /// empty: PostgreSQL takes the startup message's.
    pub fn client_first(&self) -> Vec<u8> {
        format!("n,,n=,r={}", self.nonce).into_bytes()
    }

    /// Takes the server-first message (AuthenticationSASLContinue's data): the
    /// client-final message to send.
    pub fn server_first(&mut self, msg: &[u8]) -> Result<Vec<u8>, ScramError> {
        let msg = std::str::from_utf8(msg)
            .map_err(|_| ScramError::Malformed("server-first not UTF-8"))?;
        let mut attrs = attributes(msg);
        let nonce = match attrs.next() {
            Some((b'r', n)) if n.starts_with(&self.nonce) && n.len() > self.nonce.len() => n,
            Some((b'r', _)) => return Err(ScramError::Nonce),
            _ => return Err(ScramError::Malformed("no nonce")),
        };
        if !valid_nonce(nonce) {
            return Err(ScramError::Nonce);
        }
        let salt = match attrs.next() {
            Some((b's', s)) => B64
                .decode(s)
                .map_err(|_| ScramError::Malformed("salt not base64"))?,
            _ => return Err(ScramError::Malformed("no salt")),
        };
        let iterations = match attrs.next() {
            Some((b'i', i)) => i
                .parse::<u32>()
                .ok()
                .filter(|&i| i > 0)
                .ok_or(ScramError::Malformed("bad iteration count"))?,
            _ => return Err(ScramError::Malformed("no iteration count")),
        };
        if iterations > MAX_ITERATIONS {
            return Err(ScramError::Iterations(iterations));
        }
        let k = keys(&self.password, &salt, iterations);
        let without_proof = format!("c=biws,r={nonce}");
        let bare = format!("n=,r={}", self.nonce);
        let auth: [&[u8]; 5] = [
            bare.as_bytes(),
            b",",
            msg.as_bytes(),
            b",",
            without_proof.as_bytes(),
        ];
        let proof = xor(k.client, hmac(&k.stored, &auth));
        self.expect = Some(hmac(&k.server, &auth));
        Ok(format!("{without_proof},p={}", B64.encode(proof)).into_bytes())
    }

    /// Takes the server-final message (AuthenticationSASLFinal's data): Ok if the server
    /// proved it knows the password too.
    pub fn server_final(&self, msg: &[u8]) -> Result<(), ScramError> {
        let expect = self.expect.ok_or(ScramError::Malformed("out of order"))?;
        let msg = std::str::from_utf8(msg)
            .map_err(|_| ScramError::Malformed("server-final not UTF-8"))?;
        match attributes(msg).next() {
            Some((b'v', v)) => {
                let got = B64
                    .decode(v)
                    .map_err(|_| ScramError::Malformed("signature not base64"))?;
                match bool::from(got.as_slice().ct_eq(expect.as_slice())) {
                    true => Ok(()),
                    false => Err(ScramError::ServerSignature),
                }
            }
            Some((b'e', _)) => Err(ScramError::Proof),
            _ => Err(ScramError::Malformed("no verifier")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677's example: user "user", password "pencil".
    const SALT: &str = "W22ZaJ0SNY7soEsUEjb6gQ==";
    const CLIENT_FIRST: &str = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    const NONCE: &str = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
    const CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    fn rfc_verifier() -> Verifier {
        Verifier::from_password(b"pencil", &B64.decode(SALT).unwrap(), 4096)
    }

    /// The RFC's exchange, checked by the server side. The server's nonce part is the
    /// RFC's, not ours: the login is rebuilt around it.
    #[test]
    fn the_rfc_7677_exchange_is_accepted_and_answered_with_its_signature() {
        let v = rfc_verifier();
        let (mut login, first) = ServerLogin::start(&v, CLIENT_FIRST.as_bytes(), [7; 18]).unwrap();
        assert!(String::from_utf8(first)
            .unwrap()
            .ends_with(&format!(",s={SALT},i=4096")));
        login.nonce = NONCE.into();
        login.auth_start = format!("n=user,r=rOprNGfwEbeRWgbNEkqO,r={NONCE},s={SALT},i=4096");
        let fin = login.finish(CLIENT_FINAL.as_bytes()).unwrap();
        assert_eq!(fin, SERVER_FINAL.as_bytes());
    }

    #[test]
    fn a_clear_text_password_is_checked_against_a_verifier() {
        let v = rfc_verifier();
        assert!(v.matches_password(b"pencil"));
        assert!(!v.matches_password(b"pencil "));
        assert!(!v.matches_password(b""));
    }

    #[test]
    fn a_verifier_round_trips_through_postgresqls_form() {
        let v = rfc_verifier();
        let s = v.to_string();
        assert!(s.starts_with("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$"));
        assert_eq!(Verifier::parse(&s), Ok(v));
        for bad in [
            "md5abc",
            "SCRAM-SHA-256$0:AAAA$AAAA:AAAA",
            "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$short:short",
            "SCRAM-SHA-256$4096",
        ] {
            assert!(Verifier::parse(bad).is_err(), "{bad}");
        }
    }

    /// Our client against our server, and a wrong password refused by both.
    #[test]
    fn client_and_server_agree_and_a_wrong_password_fails() {
        let v = Verifier::from_password(b"s3cret", b"salt-of-sixteen!", 4096);
        for (pw, ok) in [(&b"s3cret"[..], true), (&b"wrong"[..], false)] {
            let mut c = ClientLogin::new(pw, [1; 18]);
            let (mut s, first) = ServerLogin::start(&v, &c.client_first(), [2; 18]).unwrap();
            let fin = c.server_first(&first).unwrap();
            match s.finish(&fin) {
                Ok(server_final) => {
                    assert!(ok);
                    assert_eq!(c.server_final(&server_final), Ok(()));
                    assert_eq!(
                        c.server_final(b"v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
                        Err(ScramError::ServerSignature)
                    );
                }
                Err(e) => {
                    assert!(!ok);
                    assert_eq!(e, ScramError::Proof);
                }
            }
        }
    }

    #[test]
    fn bad_exchanges_are_refused() {
        let v = rfc_verifier();
        for bad in [
            "p=tls-server-end-point,,n=,r=abc",
            "n,a=admin,n=,r=abc",
            "n,,m=ext,n=,r=abc",
            "n,,n=,r=",
            "n,,n=,r=a,b",
            "x,,n=,r=abc",
            "n,,",
        ] {
            assert!(
                ServerLogin::start(&v, bad.as_bytes(), [0; 18]).is_err(),
                "{bad}"
            );
        }
        let (mut s, _) = ServerLogin::start(&v, b"n,,n=,r=abc", [0; 18]).unwrap();
        assert_eq!(
            s.finish(b"c=biws,r=abcOTHER,p=AAAA"),
            Err(ScramError::Nonce)
        );
        assert_eq!(
            s.finish(format!("c=eSws,r={},p=AAAA", s.nonce).as_bytes()),
            Err(ScramError::ChannelBinding)
        );
        // A server that asks for too much work, or changes the client's nonce.
        let mut c = ClientLogin::new(b"pw", [3; 18]);
        let first = format!("r={}x,s=AAAA,i=99999999", c.nonce);
        assert_eq!(
            c.server_first(first.as_bytes()),
            Err(ScramError::Iterations(99_999_999))
        );
        assert_eq!(
            c.server_first(b"r=someone-else,s=AAAA,i=4096"),
            Err(ScramError::Nonce)
        );
    }
}
