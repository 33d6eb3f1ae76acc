//! Authentication plugins' arithmetic: `mysql_native_password`, `caching_sha2_password`
//! and `mysql_clear_password` (the password itself, over TLS only). dbproxy knows each
//! password, so it can both compute and verify any scramble.

use sha1::{Digest, Sha1};
use sha2::Sha256;

pub const NATIVE: &str = "mysql_native_password";
pub const CACHING_SHA2: &str = "caching_sha2_password";
pub const CLEAR: &str = "mysql_clear_password";

/// `caching_sha2_password` "more data" byte: the server accepted the scramble from its cache.
pub const SHA2_FAST_AUTH_OK: u8 = 0x03;
/// `caching_sha2_password` "more data" byte: the server wants the full password (TLS or RSA).
pub const SHA2_FULL_AUTH: u8 = 0x04;

/// The authentication plugins dbproxy speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plugin {
    Native,
    CachingSha2,
    /// The password in clear text, NUL-terminated; only ever sent or accepted over TLS.
    Clear,
}

impl Plugin {
    pub fn from_name(name: &[u8]) -> Option<Plugin> {
        match name {
            b"mysql_native_password" => Some(Plugin::Native),
            b"caching_sha2_password" => Some(Plugin::CachingSha2),
            b"mysql_clear_password" => Some(Plugin::Clear),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Plugin::Native => NATIVE,
            Plugin::CachingSha2 => CACHING_SHA2,
            Plugin::Clear => CLEAR,
        }
    }

    /// The client's answer to `nonce` for `password` (empty password: empty answer, except
    /// for the clear-text plugin, which sends a lone NUL).
    pub fn scramble(self, password: &[u8], nonce: &[u8]) -> Vec<u8> {
        if self == Plugin::Clear {
            return clear_answer(password);
        }
        if password.is_empty() {
            return Vec::new();
        }
        match self {
            Plugin::Native => native_scramble(password, nonce).to_vec(),
            Plugin::CachingSha2 => sha2_scramble(password, nonce).to_vec(),
            Plugin::Clear => clear_answer(password),
        }
    }

    /// Whether `answer` proves knowledge of `password` for `nonce`.
    pub fn verify(self, password: &[u8], nonce: &[u8], answer: &[u8]) -> bool {
        if self == Plugin::Clear {
            return constant_time_eq(password, clear_password(answer));
        }
        let expected = self.scramble(password, nonce);
        constant_time_eq(&expected, answer)
    }
}

/// The password as `mysql_clear_password` (and caching_sha2_password's full
/// authentication over TLS) sends it: followed by a NUL.
pub fn clear_answer(password: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(password.len() + 1);
    v.extend_from_slice(password);
    v.push(0);
    v
}

/// The password in a clear-text answer (its terminating NUL, if any, removed).
pub fn clear_password(answer: &[u8]) -> &[u8] {
    answer.strip_suffix(&[0]).unwrap_or(answer)
}

/// The server's 20-byte nonce: only the bytes part 1 and part 2 carry, without the NUL.
pub fn nonce_bytes(data: &[u8]) -> &[u8] {
    let end = data.len().min(20);
    &data[..end]
}

/// SHA1(password) XOR SHA1(nonce + SHA1(SHA1(password))).
pub fn native_scramble(password: &[u8], nonce: &[u8]) -> [u8; 20] {
    let stage1: [u8; 20] = Sha1::digest(password).into();
    let stage2: [u8; 20] = Sha1::digest(stage1).into();
    let mut h = Sha1::new();
    h.update(nonce_bytes(nonce));
    h.update(stage2);
    let mix: [u8; 20] = h.finalize().into();
    let mut out = [0u8; 20];
    for i in 0..20 {
        out[i] = stage1[i] ^ mix[i];
    }
    out
}

/// SHA256(password) XOR SHA256(SHA256(SHA256(password)) + nonce).
pub fn sha2_scramble(password: &[u8], nonce: &[u8]) -> [u8; 32] {
    let stage1: [u8; 32] = Sha256::digest(password).into();
    let stage2: [u8; 32] = Sha256::digest(stage1).into();
    let mut h = Sha256::new();
    h.update(stage2);
    h.update(nonce_bytes(nonce));
    let mix: [u8; 32] = h.finalize().into();
    let mut out = [0u8; 32];
    for i in 0..32 {
        out[i] = stage1[i] ^ mix[i];
    }
    out
}

/// What checking a password needs, without the password: `SHA1(SHA1(password))` (what
/// MariaDB's `PASSWORD()` shows, and all mysql_native_password needs) and, optionally,
/// `SHA256(SHA256(password))` (caching_sha2_password's fast path). Written
/// `*<40 hex> sha256:<64 hex>`; the first part alone is accepted (then caching_sha2_password
/// answers cannot be checked).
#[derive(Clone, PartialEq, Eq)]
pub struct PasswordHash {
    native: [u8; 20],
    sha2: Option<[u8; 32]>,
}

impl std::fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PasswordHash(..)")
    }
}

impl PasswordHash {
    /// The hashes of `password`.
    pub fn of(password: &[u8]) -> PasswordHash {
        let s1: [u8; 20] = Sha1::digest(password).into();
        let s2: [u8; 32] = Sha256::digest(password).into();
        PasswordHash {
            native: Sha1::digest(s1).into(),
            sha2: Some(Sha256::digest(s2).into()),
        }
    }

    /// Reads `*<40 hex>` or `*<40 hex> sha256:<64 hex>`.
    pub fn parse(text: &str) -> Result<PasswordHash, String> {
        let mut parts = text.split_whitespace();
        let native = parts
            .next()
            .and_then(|p| p.strip_prefix('*'))
            .and_then(unhex::<20>)
            .ok_or("password_hash must start with * and 40 hex digits (MariaDB's PASSWORD())")?;
        let sha2 = match parts.next() {
            None => None,
            Some(p) => Some(
                p.strip_prefix("sha256:")
                    .and_then(unhex::<32>)
                    .ok_or("the second part of password_hash must be sha256: and 64 hex digits")?,
            ),
        };
        if parts.next().is_some() {
            return Err("password_hash has more than two parts".into());
        }
        Ok(PasswordHash { native, sha2 })
    }

    /// The text [`Self::parse`] reads.
    pub fn encode(&self) -> String {
        let mut s = format!("*{}", hex::encode_upper(self.native));
        if let Some(h) = &self.sha2 {
            s.push_str(" sha256:");
            s.push_str(&hex::encode(h));
        }
        s
    }

    /// Whether answers computed with `plugin` can be checked.
    pub fn supports(&self, plugin: Plugin) -> bool {
        plugin != Plugin::CachingSha2 || self.sha2.is_some()
    }

    /// Whether this is the hash of an empty password.
    pub fn is_empty_password(&self) -> bool {
        self.native == PasswordHash::of(b"").native
    }

    /// Whether `answer` proves knowledge of the password for `nonce`.
    pub fn verify(&self, plugin: Plugin, nonce: &[u8], answer: &[u8]) -> bool {
        if answer.is_empty() && plugin != Plugin::Clear {
            return self.is_empty_password();
        }
        match plugin {
            Plugin::Native => {
                // answer = SHA1(pw) XOR SHA1(nonce + stage2): recover SHA1(pw), hash it.
                let mut h = Sha1::new();
                h.update(nonce_bytes(nonce));
                h.update(self.native);
                let mix: [u8; 20] = h.finalize().into();
                let stage1: Vec<u8> = answer.iter().zip(mix).map(|(a, m)| a ^ m).collect();
                answer.len() == 20 && constant_time_eq(&Sha1::digest(&stage1), &self.native)
            }
            Plugin::CachingSha2 => {
                let Some(stage2) = self.sha2 else {
                    return false;
                };
                let mut h = Sha256::new();
                h.update(stage2);
                h.update(nonce_bytes(nonce));
                let mix: [u8; 32] = h.finalize().into();
                let stage1: Vec<u8> = answer.iter().zip(mix).map(|(a, m)| a ^ m).collect();
                answer.len() == 32 && constant_time_eq(&Sha256::digest(&stage1), &stage2)
            }
            Plugin::Clear => {
                let other = PasswordHash::of(clear_password(answer));
                let sha2_ok = match (self.sha2, other.sha2) {
                    (Some(a), Some(b)) => constant_time_eq(&a, &b),
                    _ => true,
                };
                constant_time_eq(&self.native, &other.native) & sha2_ok
            }
        }
    }
}

fn unhex<const N: usize>(h: &str) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    hex::decode_to_slice(h, &mut out).ok()?;
    Some(out)
}

/// Equal bytes, compared in time that does not depend on where they differ (`subtle`).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

/// Bytes from the kernel's CSPRNG, drawn a block at a time: one `getrandom` serves 51
/// logins instead of one. Each byte is handed out once, and wiped from the block as it
/// goes. False when the kernel has none to give.
pub fn random_bytes(out: &mut [u8]) -> bool {
    const BLOCK: usize = 1024;
    thread_local! {
        static DRAWN: std::cell::RefCell<([u8; BLOCK], usize)> =
            const { std::cell::RefCell::new(([0; BLOCK], BLOCK)) };
    }
    DRAWN.with(|d| {
        let mut d = d.borrow_mut();
        let (block, used) = &mut *d;
        if BLOCK - *used < out.len() {
            if getrandom::getrandom(block).is_err() {
                return false;
            }
            *used = 0;
        }
        match block.get_mut(*used..*used + out.len()) {
            Some(take) => {
                out.copy_from_slice(take);
                take.fill(0);
                *used += out.len();
                true
            }
            None => getrandom::getrandom(out).is_ok(),
        }
    })
}

/// A fresh 20-byte nonce of printable-safe bytes (no NUL, no '$'), as MySQL makes them.
pub fn new_nonce() -> [u8; 20] {
    let mut n = [0u8; 20];
    if !random_bytes(&mut n) {
        // getrandom only fails without any entropy source; fall back to the clock, which
        // still makes every nonce differ (replay protection, not secrecy, is at stake).
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        for (i, b) in n.iter_mut().enumerate() {
            *b = (t >> ((i % 16) * 8)) as u8 ^ (i as u8).wrapping_mul(31);
        }
    }
    for b in n.iter_mut() {
        *b &= 0x7f;
        if *b == 0 || *b == b'$' {
            *b += 1;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn native_matches_the_server_formula() {
        // PASSWORD('secret') in MariaDB is '*' + hex(SHA1(SHA1('secret'))).
        let stage2: [u8; 20] = Sha1::digest(Sha1::digest(b"secret")).into();
        assert_eq!(
            stage2.to_vec(),
            hex("14e65567abdb5135d0cfd9a70b3032c179a49ee7")
        );
        // The server checks SHA1(nonce + stage2) XOR answer == stage1.
        let nonce = b"abcdefghijklmnopqrst";
        let answer = native_scramble(b"secret", nonce);
        let mut h = Sha1::new();
        h.update(nonce);
        h.update(stage2);
        let mix: [u8; 20] = h.finalize().into();
        let stage1: Vec<u8> = answer.iter().zip(mix).map(|(a, m)| a ^ m).collect();
        assert_eq!(Sha1::digest(&stage1).to_vec(), stage2.to_vec());
    }

    #[test]
    fn verify_accepts_right_and_rejects_wrong() {
        let nonce = new_nonce();
        for p in [Plugin::Native, Plugin::CachingSha2, Plugin::Clear] {
            let a = p.scramble(b"pw", &nonce);
            assert!(p.verify(b"pw", &nonce, &a));
            assert!(!p.verify(b"other", &nonce, &a));
            assert!(!p.verify(b"pw", &nonce, &[]));
            assert!(p.verify(b"", &nonce, &p.scramble(b"", &nonce)));
        }
        assert_eq!(Plugin::Clear.scramble(b"pw", &nonce), b"pw\0");
        assert!(Plugin::Clear.verify(b"pw", &nonce, b"pw"));
        assert!(!Plugin::Clear.verify(b"pw", &nonce, b"pw\0\0"));
    }

    #[test]
    fn password_hashes_check_every_plugin_and_round_trip() {
        let h = PasswordHash::of(b"secret");
        // MariaDB: PASSWORD('secret') = *14E65567ABDB5135D0CFD9A70B3032C179A49EE7.
        assert!(h
            .encode()
            .starts_with("*14E65567ABDB5135D0CFD9A70B3032C179A49EE7 sha256:"));
        assert_eq!(PasswordHash::parse(&h.encode()).unwrap(), h);
        let nonce = new_nonce();
        for p in [Plugin::Native, Plugin::CachingSha2, Plugin::Clear] {
            assert!(h.verify(p, &nonce, &p.scramble(b"secret", &nonce)), "{p:?}");
            assert!(
                !h.verify(p, &nonce, &p.scramble(b"secreT", &nonce)),
                "{p:?}"
            );
            assert!(!h.verify(p, &nonce, &[]), "{p:?}");
        }
        // The native part alone, as copied from mysql.user.
        let native = PasswordHash::parse("*14E65567ABDB5135D0CFD9A70B3032C179A49EE7").unwrap();
        assert!(native.verify(
            Plugin::Native,
            &nonce,
            &Plugin::Native.scramble(b"secret", &nonce)
        ));
        assert!(!native.supports(Plugin::CachingSha2));
        assert!(native.verify(Plugin::Clear, &nonce, b"secret\0"));
        // An empty password: the empty answer.
        assert!(PasswordHash::of(b"").verify(Plugin::Native, &nonce, &[]));
        for bad in [
            "14E6",
            "*XYZ",
            "*14E65567ABDB5135D0CFD9A70B3032C179A49EE7 md5:00",
            "* a b c",
        ] {
            assert!(PasswordHash::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(format!("{h:?}"), "PasswordHash(..)");
    }

    #[test]
    fn nonce_has_no_nul() {
        for _ in 0..100 {
            assert!(new_nonce().iter().all(|&b| b != 0 && b != b'$' && b < 0x80));
        }
    }

    /// Nonces drawn from the same block and across refills never repeat.
    #[test]
    fn nonces_are_never_handed_out_twice() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..500 {
            assert!(seen.insert(new_nonce()));
        }
    }
}
