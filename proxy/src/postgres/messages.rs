//! What dbproxy says as a server during a client's login and at its end (authentication
//! requests, ParameterStatus, BackendKeyData, ReadyForQuery, ErrorResponse,
//! NegotiateProtocolVersion), and the client's answers to authentication requests.

use super::frame::{put_cstr, write, FrameError, Reader};

/// The `Authentication*` message codes.
pub mod auth {
    pub const OK: i32 = 0;
    pub const CLEARTEXT: i32 = 3;
    pub const MD5: i32 = 5;
    pub const SASL: i32 = 10;
    pub const SASL_CONTINUE: i32 = 11;
    pub const SASL_FINAL: i32 = 12;
}

/// The session's transaction status, as ReadyForQuery reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatus {
    /// `I`: no transaction: a pooled server connection may go back here.
    Idle,
    /// `T`: in a transaction block.
    InTransaction,
    /// `E`: in a failed transaction block (until ROLLBACK).
    Failed,
}

impl TxStatus {
    pub fn byte(self) -> u8 {
        match self {
            TxStatus::Idle => b'I',
            TxStatus::InTransaction => b'T',
            TxStatus::Failed => b'E',
        }
    }

    pub fn from_byte(b: u8) -> Option<TxStatus> {
        match b {
            b'I' => Some(TxStatus::Idle),
            b'T' => Some(TxStatus::InTransaction),
            b'E' => Some(TxStatus::Failed),
            _ => None,
        }
    }
}

fn authentication(out: &mut Vec<u8>, code: i32, extra: &[u8]) {
    write(out, b'R', |b| {
        b.extend_from_slice(&code.to_be_bytes());
        b.extend_from_slice(extra);
    });
}

pub fn authentication_ok(out: &mut Vec<u8>) {
    authentication(out, auth::OK, &[]);
}

pub fn authentication_cleartext(out: &mut Vec<u8>) {
    authentication(out, auth::CLEARTEXT, &[]);
}

pub fn authentication_md5(out: &mut Vec<u8>, salt: [u8; 4]) {
    authentication(out, auth::MD5, &salt);
}

/// AuthenticationSASL offering these mechanisms.
pub fn authentication_sasl(out: &mut Vec<u8>, mechanisms: &[&str]) {
    write(out, b'R', |b| {
        b.extend_from_slice(&auth::SASL.to_be_bytes());
        for m in mechanisms {
            put_cstr(b, m.as_bytes());
        }
        b.push(0);
    });
}

pub fn authentication_sasl_continue(out: &mut Vec<u8>, data: &[u8]) {
    authentication(out, auth::SASL_CONTINUE, data);
}

pub fn authentication_sasl_final(out: &mut Vec<u8>, data: &[u8]) {
    authentication(out, auth::SASL_FINAL, data);
}

pub fn parameter_status(out: &mut Vec<u8>, name: &str, value: &str) {
    write(out, b'S', |b| {
        put_cstr(b, name.as_bytes());
        put_cstr(b, value.as_bytes());
    });
}

pub fn backend_key_data(out: &mut Vec<u8>, pid: i32, key: i32) {
    write(out, b'K', |b| {
        b.extend_from_slice(&pid.to_be_bytes());
        b.extend_from_slice(&key.to_be_bytes());
    });
}

pub fn ready_for_query(out: &mut Vec<u8>, status: TxStatus) {
    write(out, b'Z', |b| b.push(status.byte()));
}

/// NegotiateProtocolVersion: the newest minor version dbproxy speaks, and the protocol
/// options (`_pq_.*`) it does not know.
pub fn negotiate_protocol_version<'a>(
    out: &mut Vec<u8>,
    minor: u16,
    unknown: impl ExactSizeIterator<Item = &'a str>,
) {
    write(out, b'v', |b| {
        b.extend_from_slice(&i32::from(minor).to_be_bytes());
        b.extend_from_slice(&i32::try_from(unknown.len()).unwrap_or(0).to_be_bytes());
        for o in unknown {
            put_cstr(b, o.as_bytes());
        }
    });
}

/// An ErrorResponse (`FATAL` ends the session, `ERROR` the statement) with its SQLSTATE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorResponse<'a> {
    pub severity: &'static str,
    pub code: &'static str,
    pub message: std::borrow::Cow<'a, str>,
}

impl ErrorResponse<'_> {
    pub fn fatal(code: &'static str, message: impl Into<String>) -> ErrorResponse<'static> {
        ErrorResponse {
            severity: "FATAL",
            code,
            message: std::borrow::Cow::Owned(message.into()),
        }
    }

    pub fn write(&self, out: &mut Vec<u8>) {
        write(out, b'E', |b| {
            for (field, value) in [
                (b'S', self.severity),
                (b'V', self.severity),
                (b'C', self.code),
                (b'M', self.message.as_ref()),
            ] {
                b.push(field);
                put_cstr(b, value.as_bytes());
            }
            b.push(0);
        });
    }
}

/// A field of an ErrorResponse or NoticeResponse body (`C`: the SQLSTATE, `M`: the
/// message, ...).
pub fn error_field(body: &[u8], field: u8) -> Option<&[u8]> {
    body.split(|&b| b == 0).find_map(|f| {
        f.split_first()
            .filter(|(k, _)| **k == field)
            .map(|(_, v)| v)
    })
}

/// SQLSTATEs dbproxy says itself.
pub mod sqlstate {
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const QUERY_CANCELED: &str = "57014";
    pub const CONNECTION_FAILURE: &str = "08006";
}

/// A PasswordMessage (`p`) answering a clear-text or md5 request: the password or
/// `md5...` hash, without its NUL. `msg` is the whole message, type byte included.
pub fn parse_password(msg: &[u8]) -> Result<&[u8], FrameError> {
    let mut r = body_of(msg, b'p')?;
    let pw = r.cstr("the password")?;
    if !r.is_empty() {
        return Err(FrameError::Malformed("bytes after the password"));
    }
    Ok(pw)
}

/// A SASLInitialResponse (`p`): the mechanism chosen and its first message.
pub fn parse_sasl_initial(msg: &[u8]) -> Result<(&[u8], &[u8]), FrameError> {
    let mut r = body_of(msg, b'p')?;
    let mechanism = r.cstr("the SASL mechanism")?;
    let n = r.i32("the SASL data length")?;
    let data = match usize::try_from(n) {
        Ok(n) => r.take(n, "the SASL data")?,
        Err(_) => &[],
    };
    if !r.is_empty() {
        return Err(FrameError::Malformed("bytes after the SASL data"));
    }
    Ok((mechanism, data))
}

/// A SASLResponse (`p`): its data.
pub fn parse_sasl_response(msg: &[u8]) -> Result<&[u8], FrameError> {
    Ok(body_of(msg, b'p')?.rest())
}

/// The body of `msg` if it is one whole message of type `tag`.
fn body_of(msg: &[u8], tag: u8) -> Result<Reader<'_>, FrameError> {
    match super::frame::message(msg)? {
        Some((h, body)) if h.tag == tag && h.total() == msg.len() => Ok(Reader::new(body)),
        Some((h, _)) if h.tag != tag => Err(FrameError::Malformed("unexpected message type")),
        Some(_) => Err(FrameError::Malformed("bytes after the message")),
        None => Err(FrameError::Truncated("the message")),
    }
}

/// A SASLInitialResponse, as dbproxy sends it to a database.
pub fn write_sasl_initial(out: &mut Vec<u8>, mechanism: &str, data: &[u8]) {
    write(out, b'p', |b| {
        put_cstr(b, mechanism.as_bytes());
        b.extend_from_slice(&i32::try_from(data.len()).unwrap_or(i32::MAX).to_be_bytes());
        b.extend_from_slice(data);
    });
}

/// A SASLResponse or a PasswordMessage's raw body, as dbproxy sends it to a database.
pub fn write_password_message(out: &mut Vec<u8>, data: &[u8], nul: bool) {
    write(out, b'p', |b| {
        b.extend_from_slice(data);
        if nul {
            b.push(0);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres::frame::message;

    #[test]
    fn login_messages_are_laid_out_as_postgresql_sends_them() {
        let mut out = Vec::new();
        authentication_ok(&mut out);
        assert_eq!(out, b"R\0\0\0\x08\0\0\0\0");
        out.clear();
        authentication_sasl(&mut out, &["SCRAM-SHA-256"]);
        assert_eq!(out, b"R\0\0\0\x17\0\0\0\x0aSCRAM-SHA-256\0\0");
        out.clear();
        ready_for_query(&mut out, TxStatus::Idle);
        assert_eq!(out, b"Z\0\0\0\x05I");
        out.clear();
        backend_key_data(&mut out, 1, 2);
        assert_eq!(out, b"K\0\0\0\x0c\0\0\0\x01\0\0\0\x02");
        out.clear();
        negotiate_protocol_version(&mut out, 0, ["_pq_.x"].into_iter());
        assert_eq!(out, b"v\0\0\0\x13\0\0\0\0\0\0\0\x01_pq_.x\0");
        out.clear();
        ErrorResponse::fatal(sqlstate::INVALID_PASSWORD, "password authentication failed")
            .write(&mut out);
        let (h, body) = message(&out).unwrap().unwrap();
        assert_eq!(h.tag, b'E');
        assert!(body.starts_with(b"SFATAL\0VFATAL\0C28P01\0Mpassword"));
        assert!(body.ends_with(b"\0\0"));
    }

    #[test]
    fn the_clients_answers_are_read_and_bad_ones_refused() {
        let mut m = Vec::new();
        write_password_message(&mut m, b"secret", true);
        assert_eq!(parse_password(&m), Ok(&b"secret"[..]));
        m.push(b'x');
        assert!(parse_password(&m).is_err());

        let mut m = Vec::new();
        write_sasl_initial(&mut m, "SCRAM-SHA-256", b"n,,n=,r=abc");
        assert_eq!(
            parse_sasl_initial(&m),
            Ok((&b"SCRAM-SHA-256"[..], &b"n,,n=,r=abc"[..]))
        );
        // A length past the message's end.
        let at = m.len() - 11 - 4;
        m[at..at + 4].copy_from_slice(&99i32.to_be_bytes());
        assert!(parse_sasl_initial(&m).is_err());

        let mut m = Vec::new();
        write_password_message(&mut m, b"c=biws,r=x,p=y", false);
        assert_eq!(parse_sasl_response(&m), Ok(&b"c=biws,r=x,p=y"[..]));
        // Another message type where an answer was due.
        assert!(parse_sasl_response(b"Q\0\0\0\x05\0").is_err());
    }
}
