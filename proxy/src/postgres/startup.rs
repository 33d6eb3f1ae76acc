//! The first message a client sends, which has no type byte: a StartupMessage (protocol
//! version and parameters), or one of the requests that take its place (SSLRequest,
//! GSSENCRequest, CancelRequest).

use super::frame::{put_cstr, write_untyped, FrameError, Reader};

/// PostgreSQL refuses a longer startup packet (`MAX_STARTUP_PACKET_LENGTH`); so does
/// dbproxy, before buffering it.
pub const MAX_STARTUP: usize = 10_000;

/// SSLRequest's code in the version field.
pub const SSL_REQUEST: i32 = 80_877_103;
/// GSSENCRequest's.
pub const GSSENC_REQUEST: i32 = 80_877_104;
/// CancelRequest's.
pub const CANCEL_REQUEST: i32 = 80_877_102;

/// Protocol 3.0, the one dbproxy speaks.
pub const PROTOCOL_3_0: Version = Version { major: 3, minor: 0 };

/// A protocol version: major in the high 16 bits of the field, minor in the low.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u16,
    pub minor: u16,
}

impl Version {
    fn from_code(code: i32) -> Version {
        let c = code as u32;
        Version {
            major: (c >> 16) as u16,
            minor: (c & 0xffff) as u16,
        }
    }

    pub fn code(self) -> i32 {
        ((u32::from(self.major) << 16) | u32::from(self.minor)) as i32
    }
}

/// The startup phase's first message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Startup<'a> {
    /// The client asks for TLS: answer `S` and hand the socket to TLS, or `N`.
    Ssl,
    /// The client asks for GSSAPI encryption: dbproxy answers `N`.
    GssEnc,
    /// Cancel the query running for the session with this key (sent on a connection of
    /// its own).
    Cancel { pid: i32, key: i32 },
    /// A session starts.
    Start(StartupMessage<'a>),
}

/// A StartupMessage: the version asked for and the parameters (`user`, `database`,
/// `application_name`, `options`, `client_encoding`, ...), in the order sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage<'a> {
    pub version: Version,
    params: Vec<(&'a str, &'a str)>,
}

impl<'a> StartupMessage<'a> {
    /// A parameter's value.
    pub fn get(&self, name: &str) -> Option<&'a str> {
        self.params
            .iter()
            .find_map(|&(k, v)| (k == name).then_some(v))
    }

    pub fn params(&self) -> &[(&'a str, &'a str)] {
        &self.params
    }

    /// The role to log in as.
    pub fn user(&self) -> Option<&'a str> {
        self.get("user").filter(|u| !u.is_empty())
    }

    /// The database: the user's name when not given, as PostgreSQL does.
    pub fn database(&self) -> Option<&'a str> {
        self.get("database")
            .filter(|d| !d.is_empty())
            .or_else(|| self.user())
    }

    /// A replication connection (`replication=true|database|on|yes|1`): not pooled, and
    /// refused.
    pub fn is_replication(&self) -> bool {
        self.get("replication").is_some_and(|v| {
            matches!(
                v.to_ascii_lowercase().as_str(),
                "true" | "on" | "yes" | "1" | "database"
            )
        })
    }

    /// Options dbproxy does not know (`_pq_.` protocol extensions): named back to the
    /// client in NegotiateProtocolVersion.
    pub fn protocol_options(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.params
            .iter()
            .filter(|(k, _)| k.starts_with("_pq_."))
            .map(|&(k, _)| k)
    }
}

/// Why a startup message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartupError {
    #[error("invalid length of startup packet ({0})")]
    BadLength(i64),
    #[error("unsupported frontend protocol {}.{}: server supports 3.0 to 3.0", .0.major, .0.minor)]
    Unsupported(Version),
    #[error("invalid startup packet layout: {0}")]
    Layout(&'static str),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// The first message in `buf`, and its length, once all of it is there (`Ok(None)`
/// before). Checks the length before anything is buffered for it.
pub fn parse_startup(buf: &[u8]) -> Result<Option<(Startup<'_>, usize)>, StartupError> {
    let Some(&[a, b, c, d]) = buf.get(..4) else {
        return Ok(None);
    };
    let declared = i32::from_be_bytes([a, b, c, d]);
    let len = usize::try_from(declared)
        .ok()
        .filter(|n| (8..=MAX_STARTUP).contains(n))
        .ok_or(StartupError::BadLength(i64::from(declared)))?;
    let Some(body) = buf.get(4..len) else {
        return Ok(None);
    };
    let mut r = Reader::new(body);
    let code = r.i32("the protocol version")?;
    let msg = match code {
        SSL_REQUEST | GSSENC_REQUEST if !r.is_empty() => {
            return Err(StartupError::Layout("a request with a body"))
        }
        SSL_REQUEST => Startup::Ssl,
        GSSENC_REQUEST => Startup::GssEnc,
        CANCEL_REQUEST => {
            let pid = r.i32("the cancel request's process id")?;
            let key = r.i32("the cancel request's key")?;
            if !r.is_empty() {
                return Err(StartupError::Layout("a cancel request with more"));
            }
            Startup::Cancel { pid, key }
        }
        _ => {
            let version = Version::from_code(code);
            if version.major != 3 {
                return Err(StartupError::Unsupported(version));
            }
            Startup::Start(StartupMessage {
                version,
                params: params(r)?,
            })
        }
    };
    Ok(Some((msg, len)))
}

/// `name\0value\0` pairs, ended by a lone NUL.
fn params(mut r: Reader<'_>) -> Result<Vec<(&str, &str)>, StartupError> {
    let mut out = Vec::new();
    loop {
        let k = r.cstr("a parameter name")?;
        if k.is_empty() {
            break;
        }
        let v = r.cstr("a parameter value")?;
        let k = std::str::from_utf8(k).map_err(|_| StartupError::Layout("a name not in UTF-8"))?;
        let v = std::str::from_utf8(v).map_err(|_| StartupError::Layout("a value not in UTF-8"))?;
        out.push((k, v));
    }
    if !r.is_empty() {
        return Err(StartupError::Layout("bytes after the parameters"));
    }
    Ok(out)
}

/// A StartupMessage dbproxy sends to a database: protocol 3.0 and these parameters.
pub fn write_startup(out: &mut Vec<u8>, params: &[(&str, &str)]) {
    write_untyped(out, |b| {
        b.extend_from_slice(&PROTOCOL_3_0.code().to_be_bytes());
        for (k, v) in params {
            put_cstr(b, k.as_bytes());
            put_cstr(b, v.as_bytes());
        }
        b.push(0);
    });
}

/// An SSLRequest, as dbproxy sends it to a database.
pub fn write_ssl_request(out: &mut Vec<u8>) {
    write_untyped(out, |b| b.extend_from_slice(&SSL_REQUEST.to_be_bytes()));
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn startup_bytes(params: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        write_startup(&mut out, params);
        out
    }

    #[test]
    fn a_startup_message_gives_its_parameters_once_whole() {
        let m = startup_bytes(&[("user", "app"), ("application_name", "psql")]);
        for cut in 0..m.len() {
            assert_eq!(parse_startup(&m[..cut]), Ok(None), "{cut}");
        }
        let Some((Startup::Start(s), n)) = parse_startup(&m).unwrap() else {
            panic!("not a startup message");
        };
        assert_eq!(n, m.len());
        assert_eq!(s.version, PROTOCOL_3_0);
        assert_eq!(s.user(), Some("app"));
        assert_eq!(s.database(), Some("app"));
        assert_eq!(s.get("application_name"), Some("psql"));
        assert!(!s.is_replication());
    }

    #[test]
    fn requests_in_place_of_a_startup_message() {
        let mut m = Vec::new();
        write_ssl_request(&mut m);
        assert_eq!(parse_startup(&m), Ok(Some((Startup::Ssl, 8))));
        let gss = [0, 0, 0, 8, 4, 210, 22, 48];
        assert_eq!(parse_startup(&gss), Ok(Some((Startup::GssEnc, 8))));
        let mut cancel = vec![0, 0, 0, 16];
        cancel.extend_from_slice(&CANCEL_REQUEST.to_be_bytes());
        cancel.extend_from_slice(&7i32.to_be_bytes());
        cancel.extend_from_slice(&(-9i32).to_be_bytes());
        assert_eq!(
            parse_startup(&cancel),
            Ok(Some((Startup::Cancel { pid: 7, key: -9 }, 16)))
        );
    }

    #[test]
    fn a_newer_minor_version_is_taken_and_its_options_named() {
        let mut m = startup_bytes(&[("user", "app"), ("_pq_.compression", "on")]);
        // Protocol 3.2 (PostgreSQL 18): the version field sits after the length.
        m[6..8].copy_from_slice(&2u16.to_be_bytes());
        let Some((Startup::Start(s), _)) = parse_startup(&m).unwrap() else {
            panic!("not a startup message");
        };
        assert_eq!(s.version, Version { major: 3, minor: 2 });
        assert_eq!(
            s.protocol_options().collect::<Vec<_>>(),
            ["_pq_.compression"]
        );
    }

    #[test]
    fn bad_startup_messages_are_refused() {
        // Protocol 2.0.
        let mut m = startup_bytes(&[("user", "app")]);
        m[4..6].copy_from_slice(&2u16.to_be_bytes());
        assert!(matches!(
            parse_startup(&m),
            Err(StartupError::Unsupported(Version { major: 2, minor: 0 }))
        ));
        // Too long, refused from the length alone.
        assert_eq!(
            parse_startup(&[0, 1, 0, 0]),
            Err(StartupError::BadLength(65_536))
        );
        assert_eq!(
            parse_startup(&[0, 0, 0, 4]),
            Err(StartupError::BadLength(4))
        );
        // No terminating NUL.
        let mut m = startup_bytes(&[("user", "app")]);
        m.pop();
        let n = m.len() as u32;
        m[..4].copy_from_slice(&n.to_be_bytes());
        assert!(parse_startup(&m).is_err());
        // An SSLRequest with a body.
        let mut m = vec![0, 0, 0, 9];
        m.extend_from_slice(&SSL_REQUEST.to_be_bytes());
        m.push(0);
        assert!(parse_startup(&m).is_err());
        // A replication connection is recognised.
        let m = startup_bytes(&[("user", "app"), ("replication", "database")]);
        let Some((Startup::Start(s), _)) = parse_startup(&m).unwrap() else {
            panic!("not a startup message");
        };
        assert!(s.is_replication());
    }
}
