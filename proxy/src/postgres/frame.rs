//! Message framing. After the startup phase every message, either way, is a type byte, a
//! big-endian `i32` length that counts itself but not the type byte, and the body. A
//! bounds-checked reader for what is inside.

/// The largest message dbproxy takes from a client or a server before it has decided
/// what the message is: PostgreSQL's own limit on a field (1 GiB), which bounds what a
/// buffer may be asked to grow to.
pub const MAX_MESSAGE: usize = 1 << 30;

/// The type byte and the 4-byte length in front of every typed message.
pub const HEADER_LEN: usize = 5;

/// A malformed message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("message truncated while reading {0}")]
    Truncated(&'static str),
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    #[error("message length {0} is out of range")]
    BadLength(i64),
}

/// A typed message's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The type byte (`Q`, `P`, `Z`, ...).
    pub tag: u8,
    /// The body's length (the declared length less its own 4 bytes).
    pub body: usize,
}

impl Header {
    /// The whole message's length: type byte, length and body.
    pub fn total(self) -> usize {
        HEADER_LEN + self.body
    }
}

/// The header at the start of `buf`, once its 5 bytes are there (`Ok(None)` before).
pub fn header(buf: &[u8]) -> Result<Option<Header>, FrameError> {
    let Some(&[tag, a, b, c, d]) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    Ok(Some(Header {
        tag,
        body: body_len([a, b, c, d])?,
    }))
}

/// The body length a message's 4 length bytes declare (they count themselves), within
/// [`MAX_MESSAGE`].
pub fn body_len(length: [u8; 4]) -> Result<usize, FrameError> {
    let declared = i32::from_be_bytes(length);
    usize::try_from(declared)
        .ok()
        .and_then(|n| n.checked_sub(4))
        .filter(|&n| n <= MAX_MESSAGE)
        .ok_or(FrameError::BadLength(i64::from(declared)))
}

/// The first whole message in `buf`: its header and body (`Ok(None)` until all of it is
/// there).
pub fn message(buf: &[u8]) -> Result<Option<(Header, &[u8])>, FrameError> {
    let Some(h) = header(buf)? else {
        return Ok(None);
    };
    Ok(buf.get(HEADER_LEN..h.total()).map(|body| (h, body)))
}

/// Appends a typed message: `tag`, then a length patched in once `body` has written the
/// body into `out`.
/// A whole message of `tag` with `body` (for tests).
#[cfg(test)]
pub fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    write(&mut out, tag, |b| b.extend_from_slice(body));
    out
}

pub fn write(out: &mut Vec<u8>, tag: u8, body: impl FnOnce(&mut Vec<u8>)) {
    out.push(tag);
    write_untyped(out, body);
}

/// Appends a message without a type byte (the startup phase's): a length patched in once
/// `body` has written the body.
pub fn write_untyped(out: &mut Vec<u8>, body: impl FnOnce(&mut Vec<u8>)) {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    body(out);
    let len = i32::try_from(out.len() - at).unwrap_or(i32::MAX);
    if let Some(slot) = out.get_mut(at..at + 4) {
        slot.copy_from_slice(&len.to_be_bytes());
    }
}

/// Appends a NUL-terminated string.
pub fn put_cstr(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(s);
    out.push(0);
}

/// A bounds-checked cursor over a message body. Never panics on short input.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    /// Bytes not read yet.
    pub fn rest(&self) -> &'a [u8] {
        self.buf
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], FrameError> {
        if n > self.buf.len() {
            return Err(FrameError::Truncated(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub fn u8(&mut self, what: &'static str) -> Result<u8, FrameError> {
        match self.take(1, what)? {
            &[b] => Ok(b),
            _ => Err(FrameError::Truncated(what)),
        }
    }

    pub fn i16(&mut self, what: &'static str) -> Result<i16, FrameError> {
        match self.take(2, what)? {
            &[a, b] => Ok(i16::from_be_bytes([a, b])),
            _ => Err(FrameError::Truncated(what)),
        }
    }

    pub fn i32(&mut self, what: &'static str) -> Result<i32, FrameError> {
        match self.take(4, what)? {
            &[a, b, c, d] => Ok(i32::from_be_bytes([a, b, c, d])),
            _ => Err(FrameError::Truncated(what)),
        }
    }

    /// A NUL-terminated string, without its NUL.
    pub fn cstr(&mut self, what: &'static str) -> Result<&'a [u8], FrameError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or(FrameError::Truncated(what))?;
        let s = self.take(end, what)?;
        self.take(1, what)?;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_whole_only_when_its_last_byte_is_there() {
        let mut m = Vec::new();
        write(&mut m, b'Q', |b| put_cstr(b, b"SELECT 1"));
        assert_eq!(m.len(), 14);
        assert_eq!(&m[..5], &[b'Q', 0, 0, 0, 13]);
        for cut in 0..m.len() {
            assert_eq!(message(&m[..cut]), Ok(None), "{cut}");
        }
        let (h, body) = message(&m).unwrap().unwrap();
        assert_eq!(h, Header { tag: b'Q', body: 9 });
        assert_eq!(body, b"SELECT 1\0");
        // What follows stays for the next message.
        m.extend_from_slice(b"X\0\0\0\x04");
        assert_eq!(message(&m).unwrap().unwrap().0.total(), 14);
    }

    #[test]
    fn lengths_below_four_or_above_the_limit_are_refused() {
        assert_eq!(header(b"Q\0\0\0\x03"), Err(FrameError::BadLength(3)));
        assert_eq!(header(b"Q\xff\xff\xff\xff"), Err(FrameError::BadLength(-1)));
        assert_eq!(
            header(b"Q\x7f\xff\xff\xff"),
            Err(FrameError::BadLength(i64::from(i32::MAX)))
        );
        assert_eq!(
            header(b"Q\0\0\0\x04"),
            Ok(Some(Header { tag: b'Q', body: 0 }))
        );
    }

    #[test]
    fn the_reader_stops_at_the_end() {
        let mut r = Reader::new(b"ab\0\x00\x01\x00\x00\x02");
        assert_eq!(r.cstr("s"), Ok(&b"ab"[..]));
        assert_eq!(r.i16("n"), Ok(1));
        assert_eq!(r.i32("m"), Err(FrameError::Truncated("m")));
        let mut r = Reader::new(b"no terminator");
        assert_eq!(r.cstr("s"), Err(FrameError::Truncated("s")));
    }
}
