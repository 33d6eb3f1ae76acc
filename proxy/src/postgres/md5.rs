//! The `md5` password method: the client answers `md5` + hex(md5(hex(md5(password +
//! user)) + salt)). What a server stores (`pg_authid`, or dbproxy's `password_hash`) is the
//! inner hash, `md5` + hex(md5(password + user)), so either side can be computed from it.

use ::md5::{Digest, Md5};

/// The inner hash PostgreSQL stores for a role: `md5` + hex(md5(password + user)).
pub fn stored(password: &[u8], user: &[u8]) -> String {
    let mut h = Md5::new();
    h.update(password);
    h.update(user);
    format!("md5{}", hex::encode(h.finalize()))
}

/// The answer to an md5 request with `salt`, from the stored inner hash.
pub fn answer(stored: &str, salt: [u8; 4]) -> Option<String> {
    let inner = stored.strip_prefix("md5").filter(|h| h.len() == 32)?;
    let mut h = Md5::new();
    h.update(inner.as_bytes());
    h.update(salt);
    Some(format!("md5{}", hex::encode(h.finalize())))
}

/// Whether a client's answer to an md5 request with `salt` matches the stored hash (in
/// constant time).
pub fn verify(stored: &str, salt: [u8; 4], client: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    match answer(stored, salt) {
        Some(want) => want.as_bytes().ct_eq(client).into(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_is_postgresqls() {
        // As libpq computes it for user "postgres", password "postgres" and this salt
        // (pg_md5_encrypt twice).
        let s = stored(b"postgres", b"postgres");
        assert_eq!(s, "md53175bce1d3201d16594cebf9d7eb3f9d");
        let a = answer(&s, [0x01, 0x02, 0x03, 0x04]).unwrap();
        assert_eq!(a.len(), 35);
        assert!(verify(&s, [1, 2, 3, 4], a.as_bytes()));
        assert!(!verify(&s, [1, 2, 3, 5], a.as_bytes()));
        assert!(!verify("md5short", [1, 2, 3, 4], a.as_bytes()));
    }
}
