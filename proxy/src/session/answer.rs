//! A database's answer to a client's command as it streams through, one pass over the
//! complete packets buffered so far: each fed to the response tracker; OK packets'
//! session tracking learnt by the session (and stripped for a client that did not ask
//! for it); a prepare's OK_stmt given the client's own statement id; a kept statement's
//! first packet checked for a writer that turned read-only. Bytes in; what goes to the
//! client and how far the answer got out. The driver reads and writes.

use crate::mysql::consts::{errcode, status};
use crate::mysql::packet::{complete_packet, write_packet, HEADER_LEN};
use crate::mysql::response::{ResponseTracker, Step};
use crate::mysql::resultset::{encode_binary_row, parse_text_row, Packets, TextResult};
use crate::mysql::session::{changes, parse_ok, strip_session_track, Change};
use crate::mysql::stmt::{parse_prepare_ok, patch_stmt_id};
use crate::mysql::wire::ErrPacket;
use crate::mysql::ProtocolError;
use crate::session::diag::patched_row;
use crate::session::sql::SqlInfo;
use crate::session::state::BackendSession;
use crate::session::stmts::{BackendStmts, StmtKey};
use crate::session::{ClientSession, Tracked};
use std::sync::Arc;

/// A COM_STMT_PREPARE in flight: the statement's key and analysis, and what its OK_stmt
/// said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrepareCapture {
    pub key: Arc<StmtKey>,
    pub info: Arc<SqlInfo>,
    /// The id the client was given.
    pub client_id: Option<u32>,
    /// A backend statement to close once the answer is through (duplicate or evicted).
    pub close: Option<u32>,
    pub warnings: u16,
}

impl PrepareCapture {
    pub fn new(key: Arc<StmtKey>, info: Arc<SqlInfo>) -> PrepareCapture {
        PrepareCapture {
            key,
            info,
            client_id: None,
            close: None,
            warnings: 0,
        }
    }
}

/// Why an answer cannot be relayed.
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    /// The kept statement's first packet is the writer refusing it as read-only: nothing
    /// went to the client, and the statement can be sent again once a writer is found.
    #[error("the database refused the statement as read-only")]
    ReadOnly,
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
}

/// What one pass found.
#[derive(Debug)]
pub struct Scan {
    /// Bytes of the buffer the pass went through (whole packets).
    pub bytes: usize,
    /// What the client gets for those bytes when a packet had to change size (tracking
    /// stripped); otherwise the bytes themselves (patched in place) go.
    pub rewritten: Option<Vec<u8>>,
    /// Where the answer stands after the last packet passed.
    pub step: Step,
}

/// The session and connection state a pass reads and changes.
pub struct Relay<'a> {
    pub tracker: &'a mut ResponseTracker,
    pub session: &'a mut ClientSession,
    pub backend: &'a mut BackendSession,
    pub backend_stmts: &'a mut BackendStmts,
    /// The capabilities the connection negotiated.
    pub caps: u32,
    /// The statement's analysis (what tracked changes mean).
    pub info: &'a SqlInfo,
    pub tracked: &'a mut Tracked,
    pub prepare: Option<&'a mut PrepareCapture>,
    /// Session tracking goes out of OK packets (the client did not ask for it).
    pub strip: bool,
    /// The next packet is the answer's first, of a statement kept to be sent again: a
    /// read-only refusal there is [`AnswerError::ReadOnly`]. Cleared by the first packet.
    pub check_read_only: bool,
}

impl Relay<'_> {
    /// Goes through the complete packets at the start of `buf`, up to the answer's end
    /// (the bytes after it are not looked at) or a LOCAL INFILE request.
    pub fn scan(&mut self, buf: &mut [u8]) -> Result<Scan, AnswerError> {
        let mut scanned = 0;
        let mut out: Option<Vec<u8>> = None;
        let mut step = Step::More;
        while step == Step::More {
            let Some(h) = buf.get(scanned..).and_then(complete_packet) else {
                break;
            };
            let (start, end) = (scanned, scanned + h.total());
            let Some(payload) = buf.get_mut(start + HEADER_LEN..end) else {
                break;
            };
            if std::mem::take(&mut self.check_read_only) && read_only_refusal(payload) {
                return Err(AnswerError::ReadOnly);
            }
            step = self.tracker.feed(h, payload)?;
            scanned = end;
            self.prepared(payload)?;
            if self.tracker.last_ok() {
                if let Some(plain) = self.learn_ok(payload)? {
                    let o =
                        out.get_or_insert_with(|| buf.get(..start).unwrap_or_default().to_vec());
                    write_packet(o, h.seq, &plain);
                    continue;
                }
            }
            if let Some(o) = out.as_mut() {
                o.extend_from_slice(buf.get(start..end).unwrap_or_default());
            }
        }
        Ok(Scan {
            bytes: scanned,
            rewritten: out,
            step,
        })
    }

    /// A prepare's OK_stmt: the statement is recorded for the client and the connection,
    /// and the packet given the client's id.
    fn prepared(&mut self, payload: &mut [u8]) -> Result<(), ProtocolError> {
        let Some(cap) = self.prepare.as_deref_mut() else {
            return Ok(());
        };
        if cap.client_id.is_some() || payload.first() != Some(&0) {
            return Ok(());
        }
        let (id, columns, params) = parse_prepare_ok(payload)?;
        cap.warnings = payload
            .get(10..12)
            .map_or(0, |w| u16::from_le_bytes([w[0], w[1]]));
        let cid = self
            .session
            .stmts
            .add(cap.key.clone(), cap.info.clone(), params, columns);
        cap.client_id = Some(cid);
        cap.close = self.backend_stmts.insert(cap.key.clone(), id, params);
        patch_stmt_id(payload, cid);
        Ok(())
    }

    /// An OK packet: its session tracking learnt; the packet without it when it is to be
    /// stripped.
    fn learn_ok(&mut self, payload: &[u8]) -> Result<Option<Vec<u8>>, ProtocolError> {
        let ok = parse_ok(payload, self.caps)?;
        if ok.status & status::SESSION_STATE_CHANGED != 0 {
            let list = ok
                .state
                .clone()
                .and_then(|range| payload.get(range))
                .map(changes)
                .transpose()?
                .unwrap_or_default();
            // A change flagged but not described counts as unexplained.
            let told = [Change::StateChanged];
            let list = if list.is_empty() {
                &told[..]
            } else {
                &list[..]
            };
            let t = self.session.learn_tracking(self.info, list, self.backend);
            self.tracked.unexplained |= t.unexplained;
            self.tracked.not_replayable |= t.not_replayable;
        }
        Ok((self.strip && payload.len() > ok.tail).then(|| strip_session_track(payload, &ok)))
    }
}

/// Whether an answer's first packet is the server refusing a write because it is
/// read-only (a writer demoted under the client).
pub fn read_only_refusal(payload: &[u8]) -> bool {
    if payload.first() != Some(&0xff) {
        return false;
    }
    match ErrPacket::parse(payload) {
        Ok(e) => {
            (e.code == errcode::ER_OPTION_PREVENTS_STATEMENT && e.message.contains("read-only"))
                || e.code == errcode::ER_READ_ONLY_MODE
        }
        Err(_) => false,
    }
}

/// A reader's one-row result with the client's own values in its row (text or binary).
pub fn patch_row(r: &TextResult, values: &[Vec<u8>], binary: bool, caps: u32) -> Packets {
    let row = if binary {
        let vals: Vec<Option<&[u8]>> = values.iter().map(|v| Some(v.as_slice())).collect();
        encode_binary_row(&r.columns, &vals).ok()
    } else {
        Some(patched_row(values))
    };
    match (r.rows.len(), row) {
        (1, Some(row)) => r.with_rows(vec![row], caps),
        _ => r.with_rows(r.rows.clone(), caps),
    }
}

/// The result with the client's own conditions as rows (text rows as `SHOW WARNINGS` gave
/// them, converted for the binary protocol).
pub fn splice_rows(r: &TextResult, rows: &[Vec<u8>], binary: bool, caps: u32) -> Packets {
    let rows = if binary {
        rows.iter()
            .filter_map(|t| {
                let v = parse_text_row(t, r.columns.len()).ok()?;
                encode_binary_row(&r.columns, &v).ok()
            })
            .collect()
    } else {
        rows.to_vec()
    };
    r.with_rows(rows, caps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mysql::command::ResponseKind;
    use crate::mysql::consts::cap;
    use crate::session::sql::analyze;
    use crate::session::stmts::StmtContext;

    const CAPS: u32 = cap::PROTOCOL_41 | cap::SESSION_TRACK;
    // MariaDB 10.11's OK after `USE shop` with session tracking on.
    const USE_OK: &[u8] = b"\x00\x00\x00\x02\x40\x00\x00\x00\x0a\x01\x05\x04shop\x02\x01\x31";

    fn session() -> ClientSession {
        crate::session::testing::session(None)
    }

    fn packets(list: &[(u8, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (seq, p) in list {
            write_packet(&mut out, *seq, p);
        }
        out
    }

    /// Everything a pass needs, owned.
    struct World {
        tracker: ResponseTracker,
        session: ClientSession,
        backend: BackendSession,
        stmts: BackendStmts,
        tracked: Tracked,
        info: SqlInfo,
    }

    impl World {
        fn new(kind: ResponseKind, sql: &[u8]) -> World {
            World {
                tracker: ResponseTracker::new(kind, CAPS),
                session: session(),
                backend: BackendSession::default(),
                stmts: BackendStmts::new(8),
                tracked: Tracked::default(),
                info: analyze(sql),
            }
        }

        fn relay<'a>(
            &'a mut self,
            strip: bool,
            check_read_only: bool,
            prepare: Option<&'a mut PrepareCapture>,
        ) -> Relay<'a> {
            Relay {
                tracker: &mut self.tracker,
                session: &mut self.session,
                backend: &mut self.backend,
                backend_stmts: &mut self.stmts,
                caps: CAPS,
                info: &self.info,
                tracked: &mut self.tracked,
                prepare,
                strip,
                check_read_only,
            }
        }
    }

    #[test]
    fn tracking_is_learnt_and_stripped_for_a_client_without_it() {
        let mut w = World::new(ResponseKind::Query, b"USE shop");
        let mut buf = packets(&[(1, USE_OK)]);
        let scan = w.relay(true, false, None).scan(&mut buf).unwrap();
        assert_eq!((scan.bytes, scan.step), (buf.len(), Step::Done));
        let out = scan.rewritten.expect("the OK changed size");
        assert_eq!(out, packets(&[(1, b"\x00\x00\x00\x02\x00\x00\x00")]));
        assert_eq!(w.session.state.schema.as_deref(), Some(&b"shop"[..]));
        assert_eq!(w.backend.schema.as_deref(), Some(&b"shop"[..]));
        assert!(!w.tracked.unexplained);
    }

    #[test]
    fn a_client_with_tracking_gets_the_bytes_as_they_came() {
        let mut w = World::new(ResponseKind::Query, b"USE shop");
        let mut buf = packets(&[(1, USE_OK)]);
        let before = buf.clone();
        let scan = w.relay(false, false, None).scan(&mut buf).unwrap();
        assert!(scan.rewritten.is_none());
        assert_eq!((scan.bytes, buf), (before.len(), before));
        assert_eq!(w.session.state.schema.as_deref(), Some(&b"shop"[..]));
    }

    #[test]
    fn a_pass_stops_at_a_partial_packet_and_at_the_answer_end() {
        let mut w = World::new(ResponseKind::Query, b"SELECT 1");
        let cols = packets(&[(1, b"\x01")]);
        let mut buf = cols.clone();
        buf.extend_from_slice(&[9, 0, 0, 2, 3]); // half a column definition
        let scan = w.relay(true, false, None).scan(&mut buf).unwrap();
        assert_eq!((scan.bytes, scan.step), (cols.len(), Step::More));
        // An answer that ends (an ERR) is not read past.
        let mut w = World::new(ResponseKind::Query, b"SELECT 1");
        let err = ErrPacket::new(1146, "42S02", "no such table").encode();
        let mut buf = packets(&[(1, &err), (1, b"\x00\x00\x00\x02\x00\x00\x00")]);
        let scan = w.relay(true, false, None).scan(&mut buf).unwrap();
        assert_eq!(scan.step, Step::Done);
        assert_eq!(scan.bytes, 4 + err.len());
    }

    #[test]
    fn a_prepare_gets_the_clients_own_statement_id() {
        let sql: &[u8] = b"SELECT 1";
        let mut w = World::new(ResponseKind::Prepare, sql);
        let key = StmtKey::new(StmtContext::default(), Arc::from(sql));
        let mut cap = PrepareCapture::new(key, Arc::new(analyze(sql)));
        // OK_stmt: backend id 77, no columns, no parameters, 1 warning.
        let ok_stmt = b"\x00\x4d\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00";
        let mut buf = packets(&[(1, ok_stmt)]);
        let scan = w.relay(true, false, Some(&mut cap)).scan(&mut buf).unwrap();
        assert_eq!(scan.step, Step::Done);
        let cid = cap.client_id.expect("a client id");
        assert_eq!(cap.warnings, 1);
        assert_eq!(
            buf.get(5..9),
            Some(&cid.to_le_bytes()[..]),
            "patched in place"
        );
        assert_eq!(w.session.stmts.len(), 1);
        assert_eq!(w.stmts.len(), 1);
        assert!(cap.close.is_none());
    }

    #[test]
    fn a_read_only_refusal_counts_only_as_the_first_packet() {
        let e = ErrPacket::new(
            errcode::ER_OPTION_PREVENTS_STATEMENT,
            "HY000",
            "The MariaDB server is running with the --read-only option so it cannot execute this statement",
        )
        .encode();
        let mut w = World::new(ResponseKind::Query, b"INSERT INTO t VALUES (1)");
        let mut buf = packets(&[(1, &e)]);
        assert!(matches!(
            w.relay(true, true, None).scan(&mut buf),
            Err(AnswerError::ReadOnly)
        ));
        let mut w = World::new(ResponseKind::Query, b"INSERT INTO t VALUES (1)");
        let scan = w.relay(true, false, None).scan(&mut buf).unwrap();
        assert_eq!(scan.step, Step::Done, "not kept: the client gets the error");
        assert!(read_only_refusal(
            &ErrPacket::new(errcode::ER_READ_ONLY_MODE, "HY000", "x").encode()
        ));
        assert!(!read_only_refusal(
            &ErrPacket::new(1146, "42S02", "read-only").encode()
        ));
        assert!(!read_only_refusal(b"\x00\x00\x00\x02\x00\x00\x00"));
    }

    #[test]
    fn a_broken_answer_is_a_protocol_error() {
        let mut w = World::new(ResponseKind::Query, b"SELECT 1");
        // An OK packet cut short after its header byte.
        let mut buf = packets(&[(1, b"\x00")]);
        assert!(matches!(
            w.relay(true, false, None).scan(&mut buf),
            Err(AnswerError::Protocol(_))
        ));
    }
}
