//! Sans-IO MySQL/MariaDB protocol core: bytes in, decisions and bytes out.
//!
//! Nothing in here touches a socket or an async runtime; every type is driven by the
//! session loop in `conn/` and unit-tested on byte sequences.

pub mod auth;
pub mod backend;
pub mod command;
pub mod consts;
pub mod handshake;
pub mod packet;
pub mod response;
pub mod resultset;
pub mod session;
pub mod stmt;
pub mod wire;

pub use packet::{Header, MAX_PAYLOAD};

/// A malformed or unexpected packet.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("packet truncated while reading {0}")]
    Truncated(&'static str),
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    #[error("unsupported: {0}")]
    Unsupported(String),
}

#[cfg(test)]
mod robustness {
    //! Every parser meets random and mutated bytes: errors, never panics.

    use super::backend::{Credentials, Login};
    use super::command::ResponseKind;
    use super::consts::cap;
    use super::handshake::{ChangeUser, HandshakeResponse, ServerHandshake};
    use super::packet::Header;
    use super::response::ResponseTracker;
    use super::wire::{terminator_status, ErrPacket};

    use crate::test_rng::Rng;

    fn seeds() -> Vec<Vec<u8>> {
        let hs = ServerHandshake {
            version: "5.5.5-10.11.6-MariaDB".into(),
            connection_id: 1,
            nonce: b"01234567890123456789".to_vec(),
            capabilities: cap::PROXY_OFFERS,
            ext_capabilities: 0,
            collation: 45,
            status: 2,
            auth_plugin: "mysql_native_password".into(),
        };
        let resp = HandshakeResponse {
            capabilities: cap::PROXY_OFFERS,
            ext_capabilities: 0,
            user: b"app".to_vec(),
            auth_response: vec![1; 20],
            database: Some(b"db".to_vec()),
            auth_plugin: Some(b"mysql_native_password".to_vec()),
            attrs: vec![(b"k".to_vec(), b"v".to_vec())],
            ..Default::default()
        };
        vec![
            hs.encode(),
            resp.encode(),
            ChangeUser::default().encode(cap::PROXY_OFFERS),
        ]
    }

    #[test]
    fn random_and_mutated_input_never_panics() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let seeds = seeds();
        let creds = Credentials {
            user: "u".into(),
            password: "p".into(),
        };
        for i in 0..20_000 {
            let data = if i % 2 == 0 {
                rng.bytes(200)
            } else {
                let mut d = seeds[i % seeds.len()].clone();
                for _ in 0..(rng.next() % 4 + 1) {
                    let at = rng.next() as usize % d.len().max(1);
                    match rng.next() % 3 {
                        0 if !d.is_empty() => d[at] = rng.next() as u8,
                        1 => d.truncate(at),
                        _ => d.insert(at.min(d.len()), rng.next() as u8),
                    }
                }
                d
            };
            let _ = HandshakeResponse::parse(&data);
            let _ = ServerHandshake::parse(&data);
            let _ = ChangeUser::parse(&data, cap::PROXY_OFFERS);
            let _ = ChangeUser::parse(&data, 0);
            let _ = ErrPacket::parse(&data);
            let _ = terminator_status(&data, cap::DEPRECATE_EOF);
            let _ = terminator_status(&data, 0);
            let hs = ServerHandshake::parse(&seeds[0]).unwrap();
            let (mut login, _, _, _) = Login::start(&hs, &creds, cap::BACKEND_BASE, 0, 45, false);
            let _ = login.on_packet(&data);
            for kind in [
                ResponseKind::Query,
                ResponseKind::Execute,
                ResponseKind::Prepare,
                ResponseKind::Fetch,
            ] {
                for caps in [0, cap::DEPRECATE_EOF] {
                    let mut t = ResponseTracker::new(kind, caps);
                    for chunk in data.chunks(1 + rng.next() as usize % 9) {
                        if t.feed(
                            Header {
                                len: chunk.len(),
                                seq: 1,
                            },
                            chunk,
                        )
                        .is_err()
                            || t.is_done()
                        {
                            break;
                        }
                    }
                }
            }
        }
    }
}
