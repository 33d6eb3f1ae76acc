//! What a target is, before anything is done with it: where it listens, how its name is
//! written and checked, how many a group may have had, and where reads go when no reader
//! is fit. A leaf: it imports nothing of the crate, so that `config`, `topology` and `io`
//! can all use it without importing each other.

use std::net::{SocketAddr, ToSocketAddrs};

/// Where a backend listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendAddr {
    Tcp(SocketAddr),
    /// A database on this host, through its Unix socket: no TCP stack on that leg.
    Unix(std::path::PathBuf),
}

impl std::fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendAddr::Tcp(a) => a.fmt(f),
            BackendAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// `reader_fallback`: where a read-only endpoint goes when no reader is fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReaderFallback {
    /// Reads go to the writer.
    #[default]
    Writer,
    /// Reads wait (up to `connection_borrow_timeout`) for a fit reader.
    Wait,
    /// Reads fail at once.
    Error,
}

/// Targets a group may have had (in use and removed by reloads together): per-target
/// counters are allocated for this many, so that a target added later needs no resize.
pub const MAX_TARGETS: usize = 64;

/// Where a target is reached: `"host:port"` (each address it resolves to) or
/// `"unix:/path/to/mysqld.sock"` (a database on this host, through its Unix socket).
pub fn parse_target(target: &str) -> Result<Vec<BackendAddr>, String> {
    if let Some(path) = target.strip_prefix("unix:") {
        if !path.starts_with('/') {
            return Err(format!(
                "{target:?}: a Unix socket target needs an absolute path (unix:/run/mysqld/mysqld.sock)"
            ));
        }
        return Ok(vec![BackendAddr::Unix(path.into())]);
    }
    Ok(resolve(target)?.into_iter().map(BackendAddr::Tcp).collect())
}

/// Checks a target's form without resolving it: a name that does not resolve now is
/// checked again at every health check (DNS may be back, or point elsewhere, later).
pub fn check_target(target: &str) -> Result<(), String> {
    if target.starts_with("unix:") {
        return parse_target(target).map(drop);
    }
    match target.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
        _ => Err(format!("{target:?} is not host:port (or unix:/path)")),
    }
}

/// Resolves "host:port" to its addresses.
pub fn resolve(target: &str) -> Result<Vec<SocketAddr>, String> {
    let addrs: Vec<SocketAddr> = target
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {target:?} (want host:port): {e}"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("{target:?} resolves to no address"));
    }
    Ok(addrs)
}
