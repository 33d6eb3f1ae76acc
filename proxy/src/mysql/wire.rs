//! Primitive encodings: a bounds-checked reader, length-encoded integers and strings,
//! and the generic OK / ERR / EOF packets.

use super::consts::{cap, status};
use super::ProtocolError;

/// A bounds-checked cursor over a packet payload. Never panics on short input.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// Bytes not read yet.
    pub fn rest(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }

    pub fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    pub fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ProtocolError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(ProtocolError::Truncated(what))?;
        let s = self
            .buf
            .get(self.pos..end)
            .ok_or(ProtocolError::Truncated(what))?;
        self.pos = end;
        Ok(s)
    }

    pub fn u8(&mut self, what: &'static str) -> Result<u8, ProtocolError> {
        Ok(self.take(1, what)?[0])
    }

    pub fn u16(&mut self, what: &'static str) -> Result<u16, ProtocolError> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self, what: &'static str) -> Result<u32, ProtocolError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A length-encoded integer. `None` for the NULL marker 0xFB.
    pub fn lenenc(&mut self, what: &'static str) -> Result<Option<u64>, ProtocolError> {
        let first = self.u8(what)?;
        let v = match first {
            0xfb => return Ok(None),
            0xfc => u64::from(self.u16(what)?),
            0xfd => {
                let b = self.take(3, what)?;
                u64::from(b[0]) | u64::from(b[1]) << 8 | u64::from(b[2]) << 16
            }
            0xfe => {
                let b = self.take(8, what)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                u64::from_le_bytes(a)
            }
            0xff => {
                return Err(ProtocolError::Malformed(
                    "0xff is not a length-encoded integer",
                ))
            }
            n => u64::from(n),
        };
        Ok(Some(v))
    }

    /// A length-encoded integer that must not be NULL.
    pub fn lenenc_int(&mut self, what: &'static str) -> Result<u64, ProtocolError> {
        self.lenenc(what)?.ok_or(ProtocolError::Malformed(what))
    }

    pub fn lenenc_bytes(&mut self, what: &'static str) -> Result<&'a [u8], ProtocolError> {
        let n = self.lenenc_int(what)?;
        let n = usize::try_from(n).map_err(|_| ProtocolError::Truncated(what))?;
        self.take(n, what)
    }

    /// Bytes up to a NUL (consumed, not returned).
    pub fn nul_terminated(&mut self, what: &'static str) -> Result<&'a [u8], ProtocolError> {
        let rest = self.rest();
        let n = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(ProtocolError::Truncated(what))?;
        self.pos += n + 1;
        Ok(&rest[..n])
    }

    /// Bytes up to a NUL, or to the end when there is none (a lenient server quirk).
    pub fn nul_terminated_or_rest(&mut self) -> &'a [u8] {
        let rest = self.rest();
        match rest.iter().position(|&b| b == 0) {
            Some(n) => {
                self.pos += n + 1;
                &rest[..n]
            }
            None => {
                self.pos = self.buf.len();
                rest
            }
        }
    }
}

/// Appends a length-encoded integer.
pub fn put_lenenc(out: &mut Vec<u8>, v: u64) {
    match v {
        0..=250 => out.push(v as u8),
        251..=0xffff => {
            out.push(0xfc);
            out.extend_from_slice(&(v as u16).to_le_bytes());
        }
        0x1_0000..=0xff_ffff => {
            out.push(0xfd);
            out.extend_from_slice(&(v as u32).to_le_bytes()[..3]);
        }
        _ => {
            out.push(0xfe);
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

/// Appends a length-encoded string.
pub fn put_lenenc_bytes(out: &mut Vec<u8>, s: &[u8]) {
    put_lenenc(out, s.len() as u64);
    out.extend_from_slice(s);
}

/// Appends a NUL-terminated string.
pub fn put_nul(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(s);
    out.push(0);
}

/// An ERR packet's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrPacket {
    pub code: u16,
    pub sql_state: [u8; 5],
    pub message: String,
}

impl ErrPacket {
    pub fn new(code: u16, sql_state: &str, message: impl Into<String>) -> Self {
        let mut s = [b'H', b'Y', b'0', b'0', b'0'];
        if sql_state.len() == 5 {
            s.copy_from_slice(sql_state.as_bytes());
        }
        ErrPacket {
            code,
            sql_state: s,
            message: message.into(),
        }
    }

    /// The payload (with PROTOCOL_41: `#` and SQLSTATE).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(9 + self.message.len());
        out.push(0xff);
        out.extend_from_slice(&self.code.to_le_bytes());
        out.push(b'#');
        out.extend_from_slice(&self.sql_state);
        out.extend_from_slice(self.message.as_bytes());
        out
    }

    /// Parses an ERR payload (first byte 0xFF).
    pub fn parse(payload: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(payload);
        if r.u8("err header")? != 0xff {
            return Err(ProtocolError::Malformed("not an ERR packet"));
        }
        let code = r.u16("error code")?;
        let mut sql_state = *b"HY000";
        if r.rest().first() == Some(&b'#') && r.rest().len() >= 6 {
            r.take(1, "#")?;
            sql_state.copy_from_slice(r.take(5, "sqlstate")?);
        }
        let message = String::from_utf8_lossy(r.rest()).into_owned();
        Ok(ErrPacket {
            code,
            sql_state,
            message,
        })
    }
}

impl std::fmt::Display for ErrPacket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ERROR {} ({}): {}",
            self.code,
            String::from_utf8_lossy(&self.sql_state),
            self.message
        )
    }
}

/// A minimal OK packet payload: no rows, no insert id, the given status, no warnings.
pub fn ok_packet(status_flags: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(7);
    out.push(0x00);
    out.push(0); // affected rows
    out.push(0); // last insert id
    out.extend_from_slice(&status_flags.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes()); // warnings
    out
}

/// Status flags from an OK packet (header 0x00 or 0xFE), or an old-style EOF packet.
/// `caps` decides between the two layouts of a 0xFE packet.
pub fn terminator_status(payload: &[u8], caps: u32) -> Option<u16> {
    match payload.first()? {
        0xfe if caps & cap::DEPRECATE_EOF == 0 || payload.len() < 7 => {
            // EOF: 0xFE, warnings(2), status(2)
            let b = payload.get(3..5)?;
            Some(u16::from_le_bytes([b[0], b[1]]))
        }
        0x00 | 0xfe => {
            let mut r = Reader::new(&payload[1..]);
            r.lenenc("affected rows").ok()?;
            r.lenenc("last insert id").ok()?;
            r.u16("status").ok()
        }
        _ => None,
    }
}

/// True when a status word says more result sets follow.
pub fn more_results(flags: u16) -> bool {
    flags & status::MORE_RESULTS_EXISTS != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lenenc_round_trip() {
        for v in [
            0u64,
            250,
            251,
            0xffff,
            0x1_0000,
            0xff_ffff,
            0x100_0000,
            u64::MAX,
        ] {
            let mut out = Vec::new();
            put_lenenc(&mut out, v);
            assert_eq!(Reader::new(&out).lenenc_int("x").unwrap(), v);
        }
    }

    #[test]
    fn reader_never_panics_on_short_input() {
        let mut r = Reader::new(&[0xfe, 1, 2]);
        assert_eq!(r.lenenc("x"), Err(ProtocolError::Truncated("x")));
        assert!(Reader::new(&[]).u32("y").is_err());
        assert!(Reader::new(b"abc").nul_terminated("z").is_err());
        assert_eq!(Reader::new(&[0xfb]).lenenc("n").unwrap(), None);
    }

    #[test]
    fn err_packet_round_trip() {
        let e = ErrPacket::new(1045, "28000", "Access denied");
        let p = ErrPacket::parse(&e.encode()).unwrap();
        assert_eq!(p, e);
        assert_eq!(p.to_string(), "ERROR 1045 (28000): Access denied");
    }

    #[test]
    fn status_from_ok_and_eof() {
        let ok = ok_packet(status::AUTOCOMMIT | status::MORE_RESULTS_EXISTS);
        assert_eq!(terminator_status(&ok, 0), Some(10));
        let eof = [0xfe, 0, 0, 0x22, 0];
        assert_eq!(terminator_status(&eof, 0), Some(0x22));
        assert_eq!(terminator_status(&eof, cap::DEPRECATE_EOF), Some(0x22));
        let mut ok_fe = ok_packet(status::IN_TRANS);
        ok_fe[0] = 0xfe;
        assert_eq!(terminator_status(&ok_fe, cap::DEPRECATE_EOF), Some(1));
    }
}
