//! Packet framing: 3-byte little-endian payload length, 1-byte sequence id, payload.
//! A payload of exactly `MAX_PAYLOAD` bytes is continued by the next packet; the last
//! piece is shorter (possibly empty).

/// Largest payload one physical packet carries.
pub const MAX_PAYLOAD: usize = 0xff_ffff;
/// Bytes in a packet header.
pub const HEADER_LEN: usize = 4;

/// A physical packet header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub len: usize,
    pub seq: u8,
}

impl Header {
    /// Parses a header from the first four bytes, if present.
    pub fn parse(buf: &[u8]) -> Option<Header> {
        let b = buf.get(..HEADER_LEN)?;
        Some(Header {
            len: usize::from(b[0]) | usize::from(b[1]) << 8 | usize::from(b[2]) << 16,
            seq: b[3],
        })
    }

    /// Whether another physical packet continues this one's payload.
    pub fn continues(&self) -> bool {
        self.len == MAX_PAYLOAD
    }

    /// Header plus payload.
    pub fn total(&self) -> usize {
        HEADER_LEN + self.len
    }
}

/// If `buf` starts with a complete physical packet, its header.
pub fn complete_packet(buf: &[u8]) -> Option<Header> {
    let h = Header::parse(buf)?;
    (buf.len() >= h.total()).then_some(h)
}

/// Appends `payload` as one logical packet (split into continuation packets when large),
/// starting at sequence id `seq`. Returns the next sequence id.
pub fn write_packet(out: &mut Vec<u8>, mut seq: u8, payload: &[u8]) -> u8 {
    let mut rest = payload;
    loop {
        let n = rest.len().min(MAX_PAYLOAD);
        out.reserve(HEADER_LEN + n);
        out.extend_from_slice(&(n as u32).to_le_bytes()[..3]);
        out.push(seq);
        out.extend_from_slice(&rest[..n]);
        seq = seq.wrapping_add(1);
        rest = &rest[n..];
        if n < MAX_PAYLOAD {
            return seq;
        }
    }
}

/// Frames a payload built in place: `out` holds [`HEADER_LEN`] reserved bytes and then the
/// payload; they become the packet(s) of sequence id `seq` (split, rarely, when the
/// payload is too large for one packet).
pub fn seal(out: &mut Vec<u8>, seq: u8) {
    let n = out.len().saturating_sub(HEADER_LEN);
    if out.len() >= HEADER_LEN && n < MAX_PAYLOAD {
        out[..3].copy_from_slice(&(n as u32).to_le_bytes()[..3]);
        out[3] = seq;
        return;
    }
    let payload = out.split_off(HEADER_LEN.min(out.len()));
    out.clear();
    write_packet(out, seq, &payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_frames_like_write_packet() {
        for len in [0, 5, MAX_PAYLOAD - 1, MAX_PAYLOAD, MAX_PAYLOAD + 7] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut built = vec![0u8; HEADER_LEN];
            built.extend_from_slice(&payload);
            seal(&mut built, 3);
            let mut framed = Vec::new();
            write_packet(&mut framed, 3, &payload);
            assert!(built == framed, "length {len}");
        }
    }

    #[test]
    fn header_round_trip() {
        let mut out = Vec::new();
        let next = write_packet(&mut out, 7, b"hello");
        assert_eq!(next, 8);
        assert_eq!(Header::parse(&out), Some(Header { len: 5, seq: 7 }));
        assert_eq!(complete_packet(&out).map(|h| h.total()), Some(9));
        assert_eq!(complete_packet(&out[..8]), None);
        assert_eq!(Header::parse(&out[..3]), None);
    }

    #[test]
    fn large_payload_is_split_with_trailing_empty_packet() {
        let payload = vec![0xab; MAX_PAYLOAD];
        let mut out = Vec::new();
        let next = write_packet(&mut out, 0, &payload);
        assert_eq!(next, 2);
        let h1 = Header::parse(&out).unwrap();
        assert!(h1.continues());
        let h2 = Header::parse(&out[h1.total()..]).unwrap();
        assert_eq!(h2, Header { len: 0, seq: 1 });
        assert_eq!(out.len(), h1.total() + 4);
    }

    #[test]
    fn payload_over_two_packets() {
        let payload = vec![1u8; MAX_PAYLOAD + 10];
        let mut out = Vec::new();
        assert_eq!(write_packet(&mut out, 250, &payload), 252);
        let h1 = Header::parse(&out).unwrap();
        let h2 = Header::parse(&out[h1.total()..]).unwrap();
        assert_eq!((h1.seq, h2.seq, h2.len), (250, 251, 10));
    }
}
