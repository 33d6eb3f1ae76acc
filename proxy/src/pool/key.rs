//! What a pooled connection was negotiated for, as the key of the maps that hold
//! connections and waiters.

use crate::secrets::BackendLogin;
use std::sync::Arc;

/// What a pooled connection was negotiated for: only clients that match may use it.
#[derive(Debug, Clone)]
pub struct PoolKey {
    /// The database login (its password may rotate; connections opened with any version
    /// of it serve).
    pub backend: Arc<BackendLogin>,
    /// The client's `cap::BEHAVIOUR` bits.
    pub behaviour: u32,
    /// MariaDB's extended capabilities the client negotiated (each changes what the
    /// server sends or accepts).
    pub ext: u32,
    pub collation: u8,
    /// Hash of the fields above, computed once: a key is looked up several times per
    /// statement, and hashing the credentials each time showed in profiles.
    hash: u64,
}

impl PoolKey {
    pub fn new(backend: Arc<BackendLogin>, behaviour: u32, ext: u32, collation: u8) -> Self {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        backend.id.hash(&mut h);
        behaviour.hash(&mut h);
        ext.hash(&mut h);
        collation.hash(&mut h);
        PoolKey {
            backend,
            behaviour,
            ext,
            collation,
            hash: h.finish(),
        }
    }
}

impl std::hash::Hash for PoolKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        h.write_u64(self.hash);
    }
}

impl PartialEq for PoolKey {
    fn eq(&self, o: &Self) -> bool {
        self.hash == o.hash
            && self.behaviour == o.behaviour
            && self.ext == o.ext
            && self.collation == o.collation
            && Arc::ptr_eq(&self.backend, &o.backend)
    }
}

impl Eq for PoolKey {}

/// Hasher of maps keyed by [`PoolKey`]: the key carries its hash already.
#[derive(Default, Clone, Copy)]
pub struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }
}
