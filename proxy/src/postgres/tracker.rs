//! What is outstanding between a client and the server connection it holds, read from the
//! bytes relayed both ways (forwarded unchanged; only message headers and the few bodies
//! that decide something are looked at). It says when the connection may go back to the
//! pool: every request answered (a ReadyForQuery for each Query, Sync and FunctionCall),
//! the last ReadyForQuery `I` (no transaction), no COPY running, and no extended-protocol
//! messages sent since the last Sync (a Flush without a Sync keeps the link).

use super::frame::{body_len, FrameError, HEADER_LEN};
use super::messages::{error_field, TxStatus};

/// Bodies kept whole for the tracker to read (ParameterStatus, ErrorResponse,
/// ReadyForQuery) up to this size; a longer one is passed without being kept.
const KEEP_LIMIT: usize = 8 * 1024;

/// The client's Query and Parse bodies are kept up to this size for the session to read
/// ([`Tracker::from_client_seeing`]); a longer one is seen with an empty body.
pub const CLIENT_KEEP_LIMIT: usize = 64 * 1024;

/// Walks a stream of typed messages fed in arbitrary pieces, without copying what it does
/// not keep.
#[derive(Debug)]
pub struct Walker {
    /// Bodies longer than this are not kept.
    limit: usize,
    head: [u8; HEADER_LEN],
    have: usize,
    /// The message whose body is being passed: its tag and bytes left.
    body: Option<(u8, usize)>,
    kept: Vec<u8>,
    keeping: bool,
}

impl Default for Walker {
    fn default() -> Self {
        Walker::with_limit(KEEP_LIMIT)
    }
}

impl Walker {
    /// A walker that keeps bodies of up to `limit` bytes.
    pub fn with_limit(limit: usize) -> Walker {
        Walker {
            limit,
            head: [0; HEADER_LEN],
            have: 0,
            body: None,
            kept: Vec::new(),
            keeping: false,
        }
    }

    /// Feeds `bytes`; `keep(tag)` says which bodies to gather, and `done(tag, body)` hears
    /// of each message once its last byte is in (`body` empty when not kept).
    pub fn feed(
        &mut self,
        mut bytes: &[u8],
        keep: impl Fn(u8) -> bool,
        mut done: impl FnMut(u8, &[u8]),
    ) -> Result<(), FrameError> {
        while !bytes.is_empty() || self.body.is_some_and(|(_, left)| left == 0) {
            match self.body {
                None => {
                    let want = HEADER_LEN - self.have;
                    let n = want.min(bytes.len());
                    let (take, rest) = bytes.split_at(n);
                    if let Some(slot) = self.head.get_mut(self.have..self.have + n) {
                        slot.copy_from_slice(take);
                    }
                    self.have += n;
                    bytes = rest;
                    if self.have == HEADER_LEN {
                        let [tag, a, b, c, d] = self.head;
                        let len = body_len([a, b, c, d])?;
                        self.have = 0;
                        self.keeping = len <= self.limit && keep(tag);
                        self.kept.clear();
                        self.body = Some((tag, len));
                    }
                }
                Some((tag, 0)) => {
                    self.body = None;
                    done(tag, if self.keeping { &self.kept } else { &[] });
                }
                Some((tag, left)) => {
                    let n = left.min(bytes.len());
                    let (take, rest) = bytes.split_at(n);
                    if self.keeping {
                        self.kept.extend_from_slice(take);
                    }
                    bytes = rest;
                    self.body = Some((tag, left - n));
                }
            }
        }
        Ok(())
    }

    /// Starts over at a message boundary, keeping its buffer.
    pub fn reset(&mut self) {
        self.have = 0;
        self.body = None;
        self.kept.clear();
        self.keeping = false;
    }

    /// Between messages (nothing of one half-read).
    pub fn at_boundary(&self) -> bool {
        self.have == 0 && self.body.is_none()
    }
}

/// A COPY in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyState {
    None,
    /// CopyInResponse: the client streams CopyData until CopyDone or CopyFail.
    In,
    /// CopyOutResponse: the server streams until its CopyDone.
    Out,
    /// CopyBothResponse (replication): never ends while the connection lives.
    Both,
}

/// What the server said that the session acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerEvent<'a> {
    /// ReadyForQuery: one request fully answered.
    Ready(TxStatus),
    /// ParameterStatus: a reported setting changed (or was reported at login).
    Parameter { name: &'a str, value: &'a str },
    /// ErrorResponse, by its SQLSTATE.
    Error { code: &'a str },
}

/// The exchange on one server connection: requests the client sent and answers the server
/// gave.
#[derive(Debug)]
pub struct Tracker {
    client: Walker,
    server: Walker,
    /// ReadyForQuery messages still due.
    expected: u32,
    /// Extended-protocol messages sent since the last Sync.
    unsynced: bool,
    status: TxStatus,
    copy: CopyState,
    /// Syncs the client sent right behind its last Execute (nothing else between). When
    /// that Execute starts a COPY FROM STDIN, the server ignores them (it ignores Sync in
    /// copy-in mode), so they are due no ReadyForQuery: tokio-postgres sends Bind,
    /// Execute, Sync, then the data, CopyDone and another Sync.
    syncs_after_execute: u32,
    /// The client sent Terminate.
    terminated: bool,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            client: Walker::with_limit(CLIENT_KEEP_LIMIT),
            server: Walker::default(),
            expected: 0,
            unsynced: false,
            status: TxStatus::Idle,
            copy: CopyState::None,
            syncs_after_execute: 0,
            terminated: false,
        }
    }
}

impl Tracker {
    /// Starts over for a new exchange, keeping its buffers.
    pub fn reset(&mut self) {
        self.client.reset();
        self.server.reset();
        self.expected = 0;
        self.unsynced = false;
        self.status = TxStatus::Idle;
        self.copy = CopyState::None;
        self.syncs_after_execute = 0;
        self.terminated = false;
    }

    /// Bytes the client sent, on their way to the server.
    pub fn from_client(&mut self, bytes: &[u8]) -> Result<(), FrameError> {
        self.from_client_seeing(bytes, |_, _| {})
    }

    /// [`Self::from_client`], and `seen` hears of each whole Query (`Q`) and Parse (`P`)
    /// with its body (empty when it is longer than [`CLIENT_KEEP_LIMIT`]).
    pub fn from_client_seeing(
        &mut self,
        bytes: &[u8],
        mut seen: impl FnMut(u8, &[u8]),
    ) -> Result<(), FrameError> {
        let (expected, unsynced, copy, after_execute, terminated) = (
            &mut self.expected,
            &mut self.unsynced,
            &mut self.copy,
            &mut self.syncs_after_execute,
            &mut self.terminated,
        );
        self.client.feed(
            bytes,
            |tag| matches!(tag, b'Q' | b'P'),
            |tag, body| {
                if !matches!(tag, b'S' | b'H') {
                    *after_execute = 0;
                }
                match tag {
                    b'Q' => {
                        *expected += 1;
                        seen(tag, body);
                    }
                    b'F' => *expected += 1,
                    // In copy-in mode the server ignores a Sync.
                    b'S' if *copy == CopyState::In => {}
                    b'S' => {
                        *expected += 1;
                        *after_execute += 1;
                        *unsynced = false;
                    }
                    b'P' => {
                        *unsynced = true;
                        seen(tag, body);
                    }
                    b'B' | b'D' | b'E' | b'C' | b'H' => *unsynced = true,
                    b'c' | b'f' if *copy == CopyState::In => *copy = CopyState::None,
                    b'X' => *terminated = true,
                    _ => {}
                }
            },
        )
    }

    /// Bytes the server sent, on their way to the client; `event` hears what the session
    /// acts on.
    pub fn from_server(
        &mut self,
        bytes: &[u8],
        mut event: impl FnMut(ServerEvent<'_>),
    ) -> Result<(), FrameError> {
        let (expected, status, copy, after_execute) = (
            &mut self.expected,
            &mut self.status,
            &mut self.copy,
            &mut self.syncs_after_execute,
        );
        let mut bad = None;
        self.server.feed(
            bytes,
            |tag| matches!(tag, b'Z' | b'S' | b'E'),
            |tag, body| match tag {
                b'Z' => match body.first().copied().and_then(TxStatus::from_byte) {
                    Some(s) => {
                        *expected = expected.saturating_sub(1);
                        *status = s;
                        *copy = CopyState::None;
                        event(ServerEvent::Ready(s));
                    }
                    None => bad = Some(FrameError::Malformed("ReadyForQuery status")),
                },
                b'S' => {
                    let mut parts = body.split(|&b| b == 0);
                    match (parts.next(), parts.next()) {
                        (Some(n), Some(v)) => {
                            match (std::str::from_utf8(n), std::str::from_utf8(v)) {
                                (Ok(name), Ok(value)) => {
                                    event(ServerEvent::Parameter { name, value })
                                }
                                _ => bad = Some(FrameError::Malformed("ParameterStatus not UTF-8")),
                            }
                        }
                        _ => bad = Some(FrameError::Malformed("ParameterStatus")),
                    }
                }
                b'E' => {
                    if let Some(code) =
                        error_field(body, b'C').and_then(|c| std::str::from_utf8(c).ok())
                    {
                        event(ServerEvent::Error { code });
                    }
                }
                b'G' => {
                    *copy = CopyState::In;
                    // The Syncs behind the Execute that started it are ignored.
                    *expected = expected.saturating_sub(std::mem::take(after_execute));
                }
                b'H' => *copy = CopyState::Out,
                b'W' => *copy = CopyState::Both,
                b'c' if *copy == CopyState::Out => *copy = CopyState::None,
                _ => {}
            },
        )?;
        bad.map_or(Ok(()), Err)
    }

    /// Whether the server connection may go back to the pool now.
    pub fn releasable(&self) -> bool {
        self.expected == 0
            && !self.unsynced
            && self.status == TxStatus::Idle
            && self.copy == CopyState::None
            && self.client.at_boundary()
            && self.server.at_boundary()
    }

    /// Between the client's messages (none half-passed).
    pub fn client_at_boundary(&self) -> bool {
        self.client.at_boundary()
    }

    /// The transaction status the server last reported.
    pub fn status(&self) -> TxStatus {
        self.status
    }

    pub fn copy(&self) -> CopyState {
        self.copy
    }

    /// Extended-protocol messages were sent since the last Sync.
    pub fn unsynced(&self) -> bool {
        self.unsynced
    }

    /// ReadyForQuery messages still due.
    pub fn expected(&self) -> u32 {
        self.expected
    }

    pub fn terminated(&self) -> bool {
        self.terminated
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres::frame::{msg, put_cstr, write};
    use crate::postgres::messages::{parameter_status, ready_for_query, ErrorResponse};

    fn query(sql: &str) -> Vec<u8> {
        let mut out = Vec::new();
        write(&mut out, b'Q', |b| put_cstr(b, sql.as_bytes()));
        out
    }

    fn ready(s: TxStatus) -> Vec<u8> {
        let mut out = Vec::new();
        ready_for_query(&mut out, s);
        out
    }

    /// Feeds `bytes` one byte at a time, collecting the events.
    fn server_bytewise(t: &mut Tracker, bytes: &[u8]) -> Vec<String> {
        let mut seen = Vec::new();
        for b in bytes {
            t.from_server(std::slice::from_ref(b), |e| seen.push(format!("{e:?}")))
                .unwrap();
        }
        seen
    }

    #[test]
    fn a_simple_query_is_released_at_ready_for_query_idle_even_in_pieces() {
        let mut t = Tracker::default();
        t.from_client(&query("SELECT 1")).unwrap();
        assert!(!t.releasable());
        let mut answer = msg(
            b'T',
            b"\0\x01a\0\0\0\0\0\0\0\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0",
        );
        answer.extend(msg(b'D', b"\0\x01\0\0\0\x011"));
        answer.extend(msg(b'C', b"SELECT 1\0"));
        answer.extend(ready(TxStatus::Idle));
        let (head, last) = answer.split_at(answer.len() - 1);
        assert!(server_bytewise(&mut t, head).is_empty());
        assert!(!t.releasable(), "the last byte is not in yet");
        assert_eq!(server_bytewise(&mut t, last), ["Ready(Idle)"]);
        assert!(t.releasable());
    }

    #[test]
    fn a_transaction_or_a_failed_one_keeps_the_link() {
        let mut t = Tracker::default();
        t.from_client(&query("BEGIN")).unwrap();
        t.from_server(&ready(TxStatus::InTransaction), |_| {})
            .unwrap();
        assert!(!t.releasable());
        t.from_client(&query("SELECT x")).unwrap();
        let mut answer = Vec::new();
        ErrorResponse::fatal("42703", "column \"x\" does not exist").write(&mut answer);
        answer.extend(ready(TxStatus::Failed));
        let mut codes = Vec::new();
        t.from_server(&answer, |e| {
            if let ServerEvent::Error { code } = e {
                codes.push(code.to_string());
            }
        })
        .unwrap();
        assert_eq!(codes, ["42703"]);
        assert_eq!(t.status(), TxStatus::Failed);
        assert!(!t.releasable());
        t.from_client(&query("ROLLBACK")).unwrap();
        t.from_server(&ready(TxStatus::Idle), |_| {}).unwrap();
        assert!(t.releasable());
    }

    #[test]
    fn a_pipeline_is_released_after_its_last_sync_and_a_flush_keeps_the_link() {
        let mut t = Tracker::default();
        let mut pipeline = Vec::new();
        for _ in 0..2 {
            pipeline.extend(msg(b'P', b"\0SELECT 1\0\0\0"));
            pipeline.extend(msg(b'B', b"\0\0\0\0\0\0\0\0"));
            pipeline.extend(msg(b'E', b"\0\0\0\0\0"));
            pipeline.extend(msg(b'S', b""));
        }
        t.from_client(&pipeline).unwrap();
        assert_eq!(t.expected(), 2);
        t.from_server(&ready(TxStatus::Idle), |_| {}).unwrap();
        assert!(!t.releasable(), "one Sync is still to be answered");
        t.from_server(&ready(TxStatus::Idle), |_| {}).unwrap();
        assert!(t.releasable());
        // Parse and Flush, no Sync: the unnamed statement lives on this connection.
        t.from_client(&msg(b'P', b"\0SELECT 2\0\0\0")).unwrap();
        t.from_client(&msg(b'H', b"")).unwrap();
        t.from_server(&msg(b'1', b""), |_| {}).unwrap();
        assert!(!t.releasable());
        t.from_client(&msg(b'S', b"")).unwrap();
        t.from_server(&ready(TxStatus::Idle), |_| {}).unwrap();
        assert!(t.releasable());
    }

    #[test]
    fn copy_in_and_out_keep_the_link_until_they_end() {
        let mut t = Tracker::default();
        t.from_client(&query("COPY t FROM STDIN")).unwrap();
        t.from_server(&msg(b'G', b"\0\0\0"), |_| {}).unwrap();
        assert_eq!(t.copy(), CopyState::In);
        t.from_client(&msg(b'd', b"1\n")).unwrap();
        t.from_client(&msg(b'c', b"")).unwrap();
        assert_eq!(t.copy(), CopyState::None);
        t.from_server(&msg(b'C', b"COPY 1\0"), |_| {}).unwrap();
        assert!(!t.releasable());
        t.from_server(&ready(TxStatus::Idle), |_| {}).unwrap();
        assert!(t.releasable());

        // Extended protocol, as tokio-postgres sends it: the Sync behind the Execute is
        // ignored by the server in copy-in mode, and so is one sent during the copy.
        for (during, late) in [(false, false), (true, false), (false, true)] {
            t.from_client(&[msg(b'B', b"x"), msg(b'E', b"x"), msg(b'S', b"")].concat())
                .unwrap();
            t.from_server(&[msg(b'2', b""), msg(b'G', b"\0\0\0")].concat(), |_| {})
                .unwrap();
            t.from_client(&msg(b'd', b"1\n")).unwrap();
            if during {
                t.from_client(&msg(b'S', b"")).unwrap();
            }
            if late {
                // A client that waited for CopyInResponse before its Sync.
                t.from_client(&msg(b'H', b"")).unwrap();
            }
            t.from_client(&[msg(b'c', b""), msg(b'S', b"")].concat())
                .unwrap();
            t.from_server(&msg(b'C', b"COPY 1\0"), |_| {}).unwrap();
            assert!(!t.releasable());
            t.from_server(&ready(TxStatus::Idle), |_| {}).unwrap();
            assert!(t.releasable(), "{during} {late}");
        }
        // An Execute whose Sync is answered (no copy) leaves nothing to discount.
        t.from_client(&[msg(b'B', b"x"), msg(b'E', b"x"), msg(b'S', b"")].concat())
            .unwrap();
        t.from_server(&ready(TxStatus::Idle), |_| {}).unwrap();
        t.from_client(&query("COPY t FROM STDIN")).unwrap();
        t.from_server(&msg(b'G', b"\0\0\0"), |_| {}).unwrap();
        t.from_client(&msg(b'c', b"")).unwrap();
        assert!(!t.releasable(), "the Query's ReadyForQuery is due");
        t.from_server(&ready(TxStatus::Idle), |_| {}).unwrap();
        assert!(t.releasable());

        t.from_client(&query("COPY t TO STDOUT")).unwrap();
        t.from_server(&msg(b'H', b"\0\0\0"), |_| {}).unwrap();
        t.from_server(&msg(b'd', b"1\n"), |_| {}).unwrap();
        assert_eq!(t.copy(), CopyState::Out);
        t.from_server(&msg(b'c', b""), |_| {}).unwrap();
        assert_eq!(t.copy(), CopyState::None);
        t.from_server(&msg(b'C', b"COPY 1\0"), |_| {}).unwrap();
        t.from_server(&ready(TxStatus::Idle), |_| {}).unwrap();
        assert!(t.releasable());
    }

    #[test]
    fn parameter_changes_are_heard_and_bad_bytes_refused() {
        let mut t = Tracker::default();
        t.from_client(&query("SET application_name = 'x'")).unwrap();
        let mut answer = Vec::new();
        parameter_status(&mut answer, "application_name", "x");
        answer.extend(msg(b'C', b"SET\0"));
        answer.extend(ready(TxStatus::Idle));
        assert_eq!(
            server_bytewise(&mut t, &answer),
            [
                "Parameter { name: \"application_name\", value: \"x\" }",
                "Ready(Idle)"
            ]
        );
        assert!(Tracker::default()
            .from_server(b"Z\0\0\0\x05?", |_| {})
            .is_err());
        assert!(Tracker::default()
            .from_server(b"Z\0\0\0\x02", |_| {})
            .is_err());
        let mut t = Tracker::default();
        t.from_client(&msg(b'X', b"")).unwrap();
        assert!(t.terminated());
    }
}
