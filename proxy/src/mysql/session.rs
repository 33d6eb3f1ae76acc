//! Session state that moves with a client: OK packets' session-tracking information
//! (schema, system variables, "state changed"), the state a client expects, what a backend
//! connection currently has, and the statements that bring one to the other.

use super::consts::{cap, status};
use super::wire::{put_lenenc, Reader};
use super::ProtocolError;
use std::collections::BTreeMap;
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

/// Variables that act once (on the next statement) or cannot be set back: a client that
/// sets one is pinned instead of having it replayed elsewhere.
pub fn replayable(name: &[u8]) -> bool {
    !matches!(
        name.to_ascii_lowercase().as_slice(),
        b"insert_id" | b"rand_seed1" | b"rand_seed2" | b"last_gtid" | b"pseudo_thread_id"
    ) && !name.to_ascii_lowercase().starts_with(b"session_track_")
}

/// Session state as the server reports it: the default schema and every system variable
/// reported changed, by name, with the value as the server printed it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionState {
    pub schema: Option<Vec<u8>>,
    pub vars: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl SessionState {
    /// Applies one entry; returns true for entries that describe a change dbproxy can replay.
    pub fn apply(&mut self, c: &Change<'_>) -> bool {
        match c {
            Change::SystemVariable(n, v) => {
                self.vars.insert(n.to_ascii_lowercase(), v.to_vec());
                true
            }
            Change::Schema(s) => {
                self.schema = Some(s.to_vec()).filter(|s| !s.is_empty());
                true
            }
            Change::StateChanged | Change::Other(_) => false,
        }
    }
}

/// What it takes to give a backend connection a client's session state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replay {
    /// One `SET SESSION ...` statement, when variables differ.
    pub set: Option<String>,
    /// A default database to select.
    pub init_db: Option<Vec<u8>>,
    /// The client has no default database but the connection has one: only a reset clears it.
    pub reset: bool,
}

impl Replay {
    pub fn is_empty(&self) -> bool {
        self.set.is_none() && self.init_db.is_none() && !self.reset
    }
}

/// Plans the statements that turn a backend session (`backend`, whose values after a reset
/// are `baseline`) into what the client expects: `client_vars` are the variables the client
/// changed itself, `client_schema` its default database.
pub fn plan_replay(
    client_schema: Option<&[u8]>,
    client_vars: &BTreeMap<Vec<u8>, Vec<u8>>,
    backend: &SessionState,
    baseline: &BTreeMap<Vec<u8>, Vec<u8>>,
) -> Replay {
    // The common case: nothing to do (same schema, no variable differs).
    if client_schema == backend.schema.as_deref()
        && client_vars
            .iter()
            .all(|(k, v)| backend.vars.get(k) == Some(v))
        && backend
            .vars
            .iter()
            .all(|(k, v)| client_vars.get(k).or_else(|| baseline.get(k)) == Some(v))
        && baseline.keys().all(|k| backend.vars.contains_key(k))
    {
        return Replay::default();
    }
    let mut sets: Vec<String> = Vec::new();
    let names = client_vars
        .keys()
        .chain(backend.vars.keys())
        .chain(baseline.keys());
    let mut seen = std::collections::BTreeSet::new();
    for name in names {
        if !seen.insert(name) {
            continue;
        }
        let want = client_vars.get(name).or_else(|| baseline.get(name));
        if want != backend.vars.get(name) {
            let value = match want {
                // The server reports a NULL character set as an empty value.
                Some(v) if v.is_empty() && name.starts_with(b"character_set_") => {
                    "NULL".to_string()
                }
                Some(v) => sql_value(v),
                None => "DEFAULT".to_string(),
            };
            sets.push(format!("{} = {}", sql_ident(name), value));
        }
    }
    // Setting character_set_connection also resets collation_connection to that character
    // set's default; put the collation the client expects back after it.
    let want_collation = client_vars
        .get(&b"collation_connection"[..])
        .or_else(|| baseline.get(&b"collation_connection"[..]));
    if let Some(c) = want_collation {
        if sets
            .iter()
            .any(|s| s.starts_with("character_set_connection "))
            && !sets.iter().any(|s| s.starts_with("collation_connection "))
        {
            sets.push(format!("collation_connection = {}", sql_value(c)));
        }
    }
    let reset = client_schema.is_none() && backend.schema.is_some();
    let init_db = match client_schema {
        Some(s) if backend.schema.as_deref() != Some(s) => Some(s.to_vec()),
        _ => None,
    };
    Replay {
        set: (!sets.is_empty()).then(|| format!("SET SESSION {}", sets.join(", "))),
        init_db,
        reset,
    }
}

/// A variable name for SQL: only names made of identifier characters are written bare.
fn sql_ident(name: &[u8]) -> String {
    let s = String::from_utf8_lossy(name);
    if s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
    {
        s.into_owned()
    } else {
        format!("`{}`", s.replace('`', "``"))
    }
}

/// A value as the server printed it, written back so that the server reads the same value
/// whatever the session's sql_mode (ANSI_QUOTES, NO_BACKSLASH_ESCAPES): numbers bare, NULL
/// as NULL, plain text in single quotes, anything else as a hex string literal.
fn sql_value(v: &[u8]) -> String {
    let numeric = !v.is_empty()
        && v.iter()
            .enumerate()
            .all(|(i, &b)| b.is_ascii_digit() || (b == b'-' && i == 0) || b == b'.')
        && v.iter().any(u8::is_ascii_digit);
    if numeric || v == b"NULL" {
        return String::from_utf8_lossy(v).into_owned();
    }
    if v.iter()
        .all(|&b| (0x20..0x7f).contains(&b) && b != b'\'' && b != b'\\')
    {
        return format!("'{}'", String::from_utf8_lossy(v));
    }
    let mut hex = String::with_capacity(3 + 2 * v.len());
    hex.push_str("X'");
    for b in v {
        hex.push_str(&format!("{b:02x}"));
    }
    hex.push('\'');
    hex
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

    #[test]
    fn replay_sets_restores_and_selects() {
        let mut backend = SessionState::default();
        backend
            .vars
            .insert(b"time_zone".to_vec(), b"+01:00".to_vec());
        backend
            .vars
            .insert(b"wait_timeout".to_vec(), b"100".to_vec());
        backend.schema = Some(b"a".to_vec());
        let mut baseline = BTreeMap::new();
        baseline.insert(b"wait_timeout".to_vec(), b"4321".to_vec());
        let mut client = BTreeMap::new();
        client.insert(b"sql_mode".to_vec(), b"ANSI_QUOTES,O'K".to_vec());
        let r = plan_replay(Some(b"b"), &client, &backend, &baseline);
        assert_eq!(
            r.set.as_deref(),
            Some("SET SESSION sql_mode = X'414e53495f51554f5445532c4f274b', time_zone = DEFAULT, wait_timeout = 4321")
        );
        assert_eq!(r.init_db.as_deref(), Some(&b"b"[..]));
        assert!(!r.reset);
        let same = plan_replay(
            Some(b"a"),
            &BTreeMap::new(),
            &SessionState {
                schema: Some(b"a".to_vec()),
                vars: baseline.clone(),
            },
            &baseline,
        );
        assert!(same.is_empty());
        assert!(plan_replay(None, &BTreeMap::new(), &backend, &baseline).reset);
    }

    #[test]
    fn connection_collation_follows_its_character_set() {
        let mut baseline = BTreeMap::new();
        baseline.insert(b"character_set_connection".to_vec(), b"utf8mb4".to_vec());
        baseline.insert(
            b"collation_connection".to_vec(),
            b"utf8mb4_unicode_ci".to_vec(),
        );
        let mut backend = SessionState {
            schema: None,
            vars: baseline.clone(),
        };
        backend
            .vars
            .insert(b"character_set_connection".to_vec(), b"latin1".to_vec());
        let r = plan_replay(None, &BTreeMap::new(), &backend, &baseline);
        assert_eq!(
            r.set.as_deref(),
            Some("SET SESSION character_set_connection = 'utf8mb4', collation_connection = 'utf8mb4_unicode_ci'")
        );
    }

    #[test]
    fn null_character_sets_and_one_shot_variables() {
        let mut client = BTreeMap::new();
        client.insert(b"character_set_results".to_vec(), Vec::new());
        client.insert(b"sql_mode".to_vec(), Vec::new());
        let r = plan_replay(None, &client, &SessionState::default(), &BTreeMap::new());
        assert_eq!(
            r.set.as_deref(),
            Some("SET SESSION character_set_results = NULL, sql_mode = ''")
        );
        assert!(!replayable(b"insert_id"));
        assert!(!replayable(b"SESSION_TRACK_SCHEMA"));
        assert!(replayable(b"time_zone"));
    }

    #[test]
    fn values_are_written_back_faithfully() {
        assert_eq!(sql_value(b"4321"), "4321");
        assert_eq!(sql_value(b"-1.5"), "-1.5");
        assert_eq!(sql_value(b"OFF"), "'OFF'");
        assert_eq!(sql_value(b"+01:00"), "'+01:00'");
        assert_eq!(sql_value(b"a\\b"), "X'615c62'");
        assert_eq!(sql_value(b""), "''");
        assert_eq!(sql_ident(b"weird`name"), "`weird``name`");
    }
}
