//! Sans-IO MySQL/MariaDB protocol core: bytes in, decisions and bytes out.
//!
//! Nothing in here touches a socket or an async runtime; every type is driven by the
//! session loop in `conn.rs` and unit-tested on byte sequences.

pub mod auth;
pub mod backend;
pub mod command;
pub mod consts;
pub mod handshake;
pub mod packet;
pub mod response;
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
