//! OK packets and their session-tracking information (schema, system variables, "state
//! changed"); what dbproxy does with them is the session's business (`crate::session`).

use super::consts::{cap, status};
use super::wire::{put_lenenc, Reader};
use super::ProtocolError;
use std::ops::Range;

/// The parts of an OK packet dbproxy reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OkPacket {
    pub affected_rows: u64,
    pub last_insert_id: u64,
    pub status: u16,
    pub warnings: u16,
    /// Where the bytes after the warnings begin (a packet that ends there needs no
    /// rewriting for clients without session tracking).
    pub tail: usize,
    /// Where the human-readable info string lies in the payload.
    pub info: Range<usize>,
    /// Where the session state information lies (present with SESSION_STATE_CHANGED).
    pub state: Option<Range<usize>>,
}

/// Parses an OK packet (header 0x00, or 0xFE as a result set terminator with
/// DEPRECATE_EOF) received on a connection negotiated with `caps`.
pub fn parse_ok(payload: &[u8], caps: u32) -> Result<OkPacket, ProtocolError> {
    let mut r = Reader::new(payload);
    r.u8("OK header")?;
    let affected_rows = r.lenenc_int("affected rows")?;
    let last_insert_id = r.lenenc_int("last insert id")?;
    let status = r.u16("status flags")?;
    let warnings = r.u16("warnings")?;
    let at = payload.len() - r.rest().len();
    if caps & cap::SESSION_TRACK == 0 || r.is_empty() {
        return Ok(OkPacket {
            affected_rows,
            last_insert_id,
            status,
            warnings,
            tail: at,
            info: at..payload.len(),
            state: None,
        });
    }
    let info = r.lenenc_bytes("info")?;
    let info_end = payload.len() - r.rest().len();
    let info = info_end - info.len()..info_end;
    let state = if status & status::SESSION_STATE_CHANGED != 0 && !r.is_empty() {
        let s = r.lenenc_bytes("session state")?;
        let end = payload.len() - r.rest().len();
        Some(end - s.len()..end)
    } else {
        None
    };
    Ok(OkPacket {
        affected_rows,
        last_insert_id,
        status,
        warnings,
        tail: at,
        info,
        state,
    })
}

/// One session-tracking entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change<'a> {
    SystemVariable(&'a [u8], &'a [u8]),
    Schema(&'a [u8]),
    /// Something in the session changed (also for changes of the kinds above).
    StateChanged,
    Other(u8),
}

/// Parses the session state information of an OK packet.
pub fn changes(mut data: &[u8]) -> Result<Vec<Change<'_>>, ProtocolError> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let mut r = Reader::new(data);
        let kind = r.u8("session state type")?;
        let body = r.lenenc_bytes("session state entry")?;
        let mut b = Reader::new(body);
        out.push(match kind {
            0 => {
                let name = b.lenenc_bytes("variable name")?;
                let value = b.lenenc_bytes("variable value")?;
                Change::SystemVariable(name, value)
            }
            1 => Change::Schema(b.lenenc_bytes("schema")?),
            2 => Change::StateChanged,
            k => Change::Other(k),
        });
        data = r.rest();
    }
    Ok(out)
}

/// The OK packet as MariaDB sends it to a client without CLIENT_SESSION_TRACK: no session
/// state, SESSION_STATE_CHANGED cleared, the info (length-encoded, as MariaDB writes it
/// either way) only when there is one.
pub fn strip_session_track(payload: &[u8], ok: &OkPacket) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len());
    out.push(payload[0]);
    put_lenenc(&mut out, ok.affected_rows);
    put_lenenc(&mut out, ok.last_insert_id);
    out.extend_from_slice(&(ok.status & !status::SESSION_STATE_CHANGED).to_le_bytes());
    out.extend_from_slice(&ok.warnings.to_le_bytes());
    let info = &payload[ok.info.clone()];
    if !info.is_empty() {
        super::wire::put_lenenc_bytes(&mut out, info);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPS: u32 = cap::PROTOCOL_41 | cap::SESSION_TRACK;

    // Captured from MariaDB 10.11 after `SET NAMES latin1` with session tracking on.
    const SET_NAMES_OK: &[u8] = b"\x00\x00\x00\x02\x40\x00\x00\x00\x62\x00\x20\x18character_set_connection\x06latin1\x00\x1c\x14character_set_client\x06latin1\x00\x1d\x15character_set_results\x06latin1\x02\x01\x31";
    // After `USE shop`.
    const USE_OK: &[u8] = b"\x00\x00\x00\x02\x40\x00\x00\x00\x0a\x01\x05\x04shop\x02\x01\x31";
    // After an UPDATE: info, no state.
    const UPDATE_OK: &[u8] =
        b"\x00\x00\x00\x01\x80\x00\x00\x28Rows matched: 4  Changed: 0  Warnings: 0";

    #[test]
    fn parses_real_ok_packets() {
        let ok = parse_ok(SET_NAMES_OK, CAPS).unwrap();
        let ch = changes(&SET_NAMES_OK[ok.state.clone().unwrap()]).unwrap();
        assert_eq!(
            ch[0],
            Change::SystemVariable(b"character_set_connection", b"latin1")
        );
        assert_eq!(ch.len(), 4);
        assert_eq!(ch[3], Change::StateChanged);
        let ok = parse_ok(USE_OK, CAPS).unwrap();
        assert_eq!(
            changes(&USE_OK[ok.state.unwrap()]).unwrap()[0],
            Change::Schema(b"shop")
        );
        let ok = parse_ok(UPDATE_OK, CAPS).unwrap();
        assert_eq!(
            &UPDATE_OK[ok.info.clone()],
            b"Rows matched: 4  Changed: 0  Warnings: 0"
        );
        assert_eq!(ok.status, 0x8001);
        assert!(ok.state.is_none());
    }

    #[test]
    fn stripping_gives_the_plain_layout() {
        // Without session tracking MariaDB still length-encodes the info: the same bytes.
        let ok = parse_ok(UPDATE_OK, CAPS).unwrap();
        assert_eq!(strip_session_track(UPDATE_OK, &ok), UPDATE_OK.to_vec());
        let ok = parse_ok(SET_NAMES_OK, CAPS).unwrap();
        let plain = strip_session_track(SET_NAMES_OK, &ok);
        assert_eq!(plain, b"\x00\x00\x00\x02\x00\x00\x00");
        // A minimal OK stays as it is.
        let min = b"\x00\x00\x00\x02\x00\x00\x00";
        let ok = parse_ok(min, CAPS).unwrap();
        assert_eq!(strip_session_track(min, &ok), min.to_vec());
    }
}
