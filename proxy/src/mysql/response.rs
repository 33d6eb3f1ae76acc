//! Follows a backend's response to one command, packet by packet, to its end.
//!
//! The tracker never changes bytes; it tells the session loop when the response is
//! complete, when the server asks for a LOAD DATA LOCAL file, and the final status flags.

use super::command::ResponseKind;
use super::consts::{cap, status};
use super::packet::{Header, MAX_PAYLOAD};
use super::wire::{more_results, terminator_status, Reader};
use super::ProtocolError;

/// What the session loop should do after a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The response goes on.
    More,
    /// The server asked for a local file: relay the client's packets (up to an empty one),
    /// then keep feeding the server's reply.
    LocalInfile,
    /// That packet ended the response.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Start of a result: OK, ERR, LOCAL INFILE request or a column count.
    First,
    Columns(u64),
    ColumnsEof,
    Rows,
    PrepareOk,
    Params {
        left: u16,
        columns: u16,
    },
    ParamsEof {
        columns: u16,
    },
    PrepareColumns(u16),
    PrepareColumnsEof,
    FieldList,
    Single,
    Done,
}

/// How a response ended: what ROW_COUNT(), FOUND_ROWS() and the warning count follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// An OK packet: affected rows and warnings.
    Ok { affected: u64, warnings: u16 },
    /// A result set's terminator: rows in that (last) result set, warnings.
    Rows { rows: u64, warnings: u16 },
    /// An ERR packet.
    Err,
}

/// Tracks one response.
#[derive(Debug, Clone)]
pub struct ResponseTracker {
    kind: ResponseKind,
    deprecate_eof: bool,
    caps: u32,
    state: State,
    /// The previous physical packet was exactly `MAX_PAYLOAD` long: this one continues it.
    continuing: bool,
    /// The logical packet being continued ends the response.
    done_after_continuation: bool,
    status: Option<u16>,
    last_seq: u8,
    /// The packet fed last was an OK packet (command OK, or an OK-style terminator).
    last_ok: bool,
    /// Rows of the result set being read.
    rows: u64,
    end: Option<End>,
    /// A terminator flagged a session state change it cannot describe (a classic EOF).
    untold_change: bool,
}

impl ResponseTracker {
    /// Starts tracking the response to a command of `kind`, on a connection negotiated with
    /// `caps`.
    pub fn new(kind: ResponseKind, caps: u32) -> Self {
        let state = match kind {
            ResponseKind::None => State::Done,
            ResponseKind::Single => State::Single,
            ResponseKind::Query | ResponseKind::Execute => State::First,
            ResponseKind::Prepare => State::PrepareOk,
            ResponseKind::Fetch => State::Rows,
            ResponseKind::FieldList => State::FieldList,
        };
        ResponseTracker {
            kind,
            deprecate_eof: caps & cap::DEPRECATE_EOF != 0,
            caps,
            state,
            continuing: false,
            done_after_continuation: false,
            status: None,
            last_seq: 0,
            last_ok: false,
            rows: 0,
            end: None,
            untold_change: false,
        }
    }

    /// Whether an EOF terminator flagged SESSION_STATE_CHANGED (a stored function changed
    /// the session during a SELECT): without DEPRECATE_EOF, EOF packets cannot say what.
    pub fn untold_change(&self) -> bool {
        self.untold_change
    }

    /// How the response (or, while it goes on, its last result) ended.
    pub fn end(&self) -> Option<End> {
        self.end
    }

    /// Notes an OK packet (0x00, or 0xFE with DEPRECATE_EOF) or an EOF that ends a result.
    fn note_end(&mut self, payload: &[u8], rows: bool) {
        let warnings =
            if payload.first() == Some(&0xfe) && (!self.deprecate_eof || payload.len() < 7) {
                // EOF: 0xFE, warnings(2), status(2)
                payload
                    .get(1..3)
                    .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]))
            } else {
                let mut r = Reader::new(payload.get(1..).unwrap_or_default());
                let affected = r.lenenc("affected rows").ok().flatten().unwrap_or(0);
                let _ = r.lenenc("last insert id");
                let _ = r.u16("status");
                let warnings = r.u16("warnings").unwrap_or(0);
                if !rows {
                    self.end = Some(End::Ok { affected, warnings });
                    return;
                }
                warnings
            };
        self.end = Some(if rows {
            End::Rows {
                rows: self.rows,
                warnings,
            }
        } else {
            End::Ok {
                affected: 0,
                warnings,
            }
        });
    }

    /// Status flags of the last OK/EOF seen (ERR packets carry none).
    pub fn status(&self) -> Option<u16> {
        self.status
    }

    /// Whether the packet fed last was an OK packet (with the OK layout that carries
    /// affected rows, insert id, status, info and session state).
    pub fn last_ok(&self) -> bool {
        self.last_ok
    }

    /// Sequence id of the last packet fed.
    pub fn last_seq(&self) -> u8 {
        self.last_seq
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done && !self.continuing
    }

    /// After a LOAD DATA LOCAL exchange the server answers with OK or ERR.
    pub fn resume_after_infile(&mut self) {
        self.state = State::First;
    }

    /// Feeds one physical packet (header and its whole payload).
    pub fn feed(&mut self, header: Header, payload: &[u8]) -> Result<Step, ProtocolError> {
        self.last_seq = header.seq;
        self.last_ok = false;
        if self.continuing {
            self.continuing = header.continues();
            if !self.continuing && self.done_after_continuation {
                self.state = State::Done;
                return Ok(Step::Done);
            }
            return Ok(Step::More);
        }
        if payload.starts_with(&[0xff, 0xff, 0xff]) {
            // A MariaDB progress report (MARIADB_CLIENT_PROGRESS): error code 0xFFFF in the
            // middle of a response, which goes on after it.
            return Ok(Step::More);
        }
        let step = self.interpret(header.len, payload)?;
        if header.continues() {
            self.continuing = true;
            if step == Step::Done {
                // A logical packet that ends the response spans more physical packets.
                self.done_after_continuation = true;
                return Ok(Step::More);
            }
        }
        Ok(step)
    }

    fn is_terminator(&self, len: usize, payload: &[u8]) -> bool {
        payload.first() == Some(&0xfe)
            && if self.deprecate_eof {
                len < MAX_PAYLOAD
            } else {
                len < 9
            }
    }

    /// An OK/EOF that ends a result: more results follow, or the response is over.
    fn end_of_result(&mut self, payload: &[u8]) -> Step {
        let flags = terminator_status(payload, self.caps);
        if let Some(f) = flags {
            self.status = Some(f);
            if !self.last_ok && f & status::SESSION_STATE_CHANGED != 0 {
                self.untold_change = true;
            }
        }
        if flags.is_some_and(more_results) {
            self.state = State::First;
            Step::More
        } else {
            self.state = State::Done;
            Step::Done
        }
    }

    fn done(&mut self) -> Step {
        self.state = State::Done;
        Step::Done
    }

    fn interpret(&mut self, len: usize, payload: &[u8]) -> Result<Step, ProtocolError> {
        let first = payload.first().copied();
        Ok(match self.state {
            State::Done => {
                return Err(ProtocolError::Malformed(
                    "packet after the end of a response",
                ))
            }
            State::Single => {
                if let Some(f) = terminator_status(payload, self.caps).filter(|_| len < MAX_PAYLOAD)
                {
                    if matches!(first, Some(0x00 | 0xfe)) {
                        self.status = Some(f);
                    }
                }
                self.last_ok = first == Some(0x00) && len >= 7;
                match first {
                    Some(0x00) => self.note_end(payload, false),
                    Some(0xff) => self.end = Some(End::Err),
                    _ => {}
                }
                self.done()
            }
            State::First => self.first_packet(first, payload)?,
            State::Columns(left) => {
                if first == Some(0xff) {
                    self.end = Some(End::Err);
                    return Ok(self.done());
                }
                self.state = match left - 1 {
                    0 if self.deprecate_eof => State::Rows,
                    0 => State::ColumnsEof,
                    n => State::Columns(n),
                };
                Step::More
            }
            State::ColumnsEof => match first {
                Some(0xfe) => {
                    let flags = terminator_status(payload, self.caps).unwrap_or(0);
                    self.status = Some(flags);
                    if self.kind == ResponseKind::Execute && flags & status::CURSOR_EXISTS != 0 {
                        self.note_end(payload, true);
                        self.done()
                    } else {
                        self.state = State::Rows;
                        Step::More
                    }
                }
                Some(0xff) => {
                    self.end = Some(End::Err);
                    self.done()
                }
                _ => {
                    return Err(ProtocolError::Malformed(
                        "expected EOF after column definitions",
                    ))
                }
            },
            State::Rows => {
                if first == Some(0xff) {
                    self.end = Some(End::Err);
                    self.done()
                } else if self.is_terminator(len, payload) {
                    self.last_ok = self.deprecate_eof;
                    self.note_end(payload, true);
                    self.end_of_result(payload)
                } else {
                    self.rows += 1;
                    Step::More
                }
            }
            State::PrepareOk
            | State::Params { .. }
            | State::ParamsEof { .. }
            | State::PrepareColumns(_)
            | State::PrepareColumnsEof => self.prepare_packet(first, payload)?,
            State::FieldList => {
                if first == Some(0xff) || self.is_terminator(len, payload) {
                    if first == Some(0xfe) {
                        if let Some(f) = terminator_status(payload, self.caps) {
                            self.status = Some(f);
                        }
                    }
                    self.done()
                } else {
                    Step::More
                }
            }
        })
    }

    /// The first packet of a result: OK, ERR, a LOCAL INFILE request or a column count.
    fn first_packet(&mut self, first: Option<u8>, payload: &[u8]) -> Result<Step, ProtocolError> {
        Ok(match first {
            Some(0x00) | Some(0xfe) => {
                self.last_ok = first == Some(0x00) || self.deprecate_eof;
                self.note_end(payload, false);
                self.end_of_result(payload)
            }
            Some(0xff) => {
                self.end = Some(End::Err);
                self.done()
            }
            Some(0xfb) if self.kind == ResponseKind::Query => {
                self.state = State::Done;
                Step::LocalInfile
            }
            Some(_) => {
                let n = Reader::new(payload).lenenc_int("column count")?;
                if n == 0 {
                    return Err(ProtocolError::Malformed("result set with zero columns"));
                }
                self.rows = 0;
                self.state = State::Columns(n);
                Step::More
            }
            None => return Err(ProtocolError::Malformed("empty packet at start of result")),
        })
    }

    /// A packet of COM_STMT_PREPARE's answer: OK_stmt, then parameter and column
    /// definitions, each list ended by an EOF unless DEPRECATE_EOF.
    fn prepare_packet(&mut self, first: Option<u8>, payload: &[u8]) -> Result<Step, ProtocolError> {
        Ok(match self.state {
            State::PrepareOk => match first {
                Some(0x00) => {
                    let mut r = Reader::new(payload);
                    r.take(5, "statement id")?;
                    let columns = r.u16("column count")?;
                    let params = r.u16("parameter count")?;
                    self.after_params_or_columns(params, columns)
                }
                Some(0xff) => {
                    self.end = Some(End::Err);
                    self.done()
                }
                _ => {
                    return Err(ProtocolError::Malformed(
                        "expected OK or ERR to COM_STMT_PREPARE",
                    ))
                }
            },
            State::Params { left, columns } => {
                self.state = if left > 1 {
                    State::Params {
                        left: left - 1,
                        columns,
                    }
                } else if self.deprecate_eof {
                    return Ok(self.after_params_or_columns(0, columns));
                } else {
                    State::ParamsEof { columns }
                };
                Step::More
            }
            State::ParamsEof { columns } => self.after_params_or_columns(0, columns),
            State::PrepareColumns(left) => {
                if left > 1 {
                    self.state = State::PrepareColumns(left - 1);
                    Step::More
                } else if self.deprecate_eof {
                    self.done()
                } else {
                    self.state = State::PrepareColumnsEof;
                    Step::More
                }
            }
            State::PrepareColumnsEof => self.done(),
            _ => return Err(ProtocolError::Malformed("not a prepare's answer")),
        })
    }

    fn after_params_or_columns(&mut self, params: u16, columns: u16) -> Step {
        if params > 0 {
            self.state = State::Params {
                left: params,
                columns,
            };
            Step::More
        } else if columns > 0 {
            self.state = State::PrepareColumns(columns);
            Step::More
        } else {
            self.done()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mysql::wire::ok_packet;

    const EOF_CAPS: u32 = cap::PROTOCOL_41;
    const DEP_CAPS: u32 = cap::PROTOCOL_41 | cap::DEPRECATE_EOF;

    fn feed_all(t: &mut ResponseTracker, packets: &[Vec<u8>]) -> Vec<Step> {
        packets
            .iter()
            .enumerate()
            .map(|(i, p)| {
                t.feed(
                    Header {
                        len: p.len(),
                        seq: i as u8 + 1,
                    },
                    p,
                )
                .unwrap()
            })
            .collect()
    }

    fn eof(status: u16) -> Vec<u8> {
        let mut p = vec![0xfe, 0, 0];
        p.extend_from_slice(&status.to_le_bytes());
        p
    }

    fn ok_fe(status: u16) -> Vec<u8> {
        let mut p = ok_packet(status);
        p[0] = 0xfe;
        p
    }

    fn coldef() -> Vec<u8> {
        b"\x03def\x00\x00\x00\x01a\x00\x0c\x3f\x00\x0b\x00\x00\x00\x03\x00\x00\x00\x00\x00".to_vec()
    }

    #[test]
    fn progress_reports_do_not_end_a_response() {
        let mut t = ResponseTracker::new(ResponseKind::Query, DEP_CAPS);
        // 0xFF, error code 0xFFFF, then stage, max stage, progress, and the stage's name.
        let progress = b"\xff\xff\xff\x01\x01\x02\x10\x27\x00\x04copy".to_vec();
        let steps = feed_all(&mut t, &[progress.clone(), progress, ok_packet(2)]);
        assert_eq!(steps, vec![Step::More, Step::More, Step::Done]);
        assert!(matches!(t.end(), Some(End::Ok { .. })));
    }

    #[test]
    fn text_result_set_with_eof() {
        let mut t = ResponseTracker::new(ResponseKind::Query, EOF_CAPS);
        let steps = feed_all(
            &mut t,
            &[
                vec![2],
                coldef(),
                coldef(),
                eof(2),
                b"\x011\x012".to_vec(),
                b"\xfb\x013".to_vec(),
                eof(2),
            ],
        );
        assert_eq!(steps.last(), Some(&Step::Done));
        assert!(steps[..steps.len() - 1].iter().all(|s| *s == Step::More));
        assert_eq!(t.status(), Some(2));
        assert_eq!(
            t.end(),
            Some(End::Rows {
                rows: 2,
                warnings: 0
            })
        );
    }

    #[test]
    fn endings_carry_rows_affected_and_warnings() {
        let mut t = ResponseTracker::new(ResponseKind::Query, EOF_CAPS);
        // OK: 3 affected rows, insert id 0, status 2, 1 warning.
        feed_all(&mut t, &[vec![0, 3, 0, 2, 0, 1, 0]]);
        assert_eq!(
            t.end(),
            Some(End::Ok {
                affected: 3,
                warnings: 1
            })
        );
        let mut t = ResponseTracker::new(ResponseKind::Query, DEP_CAPS);
        let mut term = ok_fe(2);
        term[5] = 2; // two warnings
        feed_all(&mut t, &[vec![1], coldef(), b"\x011".to_vec(), term]);
        assert_eq!(
            t.end(),
            Some(End::Rows {
                rows: 1,
                warnings: 2
            })
        );
        let mut t = ResponseTracker::new(ResponseKind::Query, EOF_CAPS);
        let mut e = eof(2);
        e[1] = 4;
        feed_all(&mut t, &[vec![1], coldef(), eof(2), e]);
        assert_eq!(
            t.end(),
            Some(End::Rows {
                rows: 0,
                warnings: 4
            })
        );
        let mut t = ResponseTracker::new(ResponseKind::Query, EOF_CAPS);
        let err = crate::mysql::wire::ErrPacket::new(1064, "42000", "syntax").encode();
        feed_all(&mut t, &[err]);
        assert_eq!(t.end(), Some(End::Err));
    }

    #[test]
    fn an_eof_flagging_a_state_change_is_an_untold_change() {
        let changed = status::AUTOCOMMIT | status::SESSION_STATE_CHANGED;
        let mut t = ResponseTracker::new(ResponseKind::Query, EOF_CAPS);
        feed_all(
            &mut t,
            &[vec![1], coldef(), eof(2), b"\x011".to_vec(), eof(2)],
        );
        assert!(!t.untold_change());
        let mut t = ResponseTracker::new(ResponseKind::Query, EOF_CAPS);
        feed_all(
            &mut t,
            &[vec![1], coldef(), eof(2), b"\x011".to_vec(), eof(changed)],
        );
        assert!(t.untold_change());
        // An OK-style terminator describes its changes itself.
        let mut t = ResponseTracker::new(ResponseKind::Query, DEP_CAPS);
        feed_all(
            &mut t,
            &[vec![1], coldef(), b"\x011".to_vec(), ok_fe(changed)],
        );
        assert!(!t.untold_change());
    }

    #[test]
    fn text_result_set_deprecate_eof() {
        let mut t = ResponseTracker::new(ResponseKind::Query, DEP_CAPS);
        let steps = feed_all(&mut t, &[vec![1], coldef(), b"\x011".to_vec(), ok_fe(3)]);
        assert_eq!(steps, vec![Step::More, Step::More, Step::More, Step::Done]);
        assert_eq!(t.status(), Some(3));
    }

    #[test]
    fn multi_results_end_only_at_the_last() {
        let mut t = ResponseTracker::new(ResponseKind::Query, DEP_CAPS);
        let more = status::AUTOCOMMIT | status::MORE_RESULTS_EXISTS;
        let steps = feed_all(
            &mut t,
            &[
                vec![1],
                coldef(),
                b"\x011".to_vec(),
                ok_fe(more),
                ok_packet(more),
                vec![1],
                coldef(),
                ok_fe(2),
            ],
        );
        assert_eq!(steps.iter().filter(|s| **s == Step::Done).count(), 1);
        assert_eq!(steps.last(), Some(&Step::Done));
    }

    #[test]
    fn error_in_the_middle_of_multi_results_ends_it() {
        let mut t = ResponseTracker::new(ResponseKind::Query, EOF_CAPS);
        let more = status::MORE_RESULTS_EXISTS;
        let err = crate::mysql::wire::ErrPacket::new(1064, "42000", "syntax").encode();
        let steps = feed_all(&mut t, &[ok_packet(more), err]);
        assert_eq!(steps, vec![Step::More, Step::Done]);
    }

    #[test]
    fn local_infile_then_ok() {
        let mut t = ResponseTracker::new(ResponseKind::Query, EOF_CAPS);
        assert_eq!(
            feed_all(&mut t, &[b"\xfb/tmp/x.csv".to_vec()]),
            vec![Step::LocalInfile]
        );
        t.resume_after_infile();
        let ok = ok_packet(2);
        assert_eq!(
            t.feed(
                Header {
                    len: ok.len(),
                    seq: 3
                },
                &ok
            )
            .unwrap(),
            Step::Done
        );
    }

    #[test]
    fn execute_with_cursor_ends_after_metadata() {
        let mut t = ResponseTracker::new(ResponseKind::Execute, EOF_CAPS);
        let steps = feed_all(&mut t, &[vec![1], coldef(), eof(status::CURSOR_EXISTS | 2)]);
        assert_eq!(steps.last(), Some(&Step::Done));
        let mut f = ResponseTracker::new(ResponseKind::Fetch, EOF_CAPS);
        let steps = feed_all(
            &mut f,
            &[
                vec![0, 0, 1],
                eof(status::CURSOR_EXISTS | status::LAST_ROW_SENT),
            ],
        );
        assert_eq!(steps, vec![Step::More, Step::Done]);
    }

    #[test]
    fn binary_row_starting_with_zero_is_not_ok() {
        let mut t = ResponseTracker::new(ResponseKind::Execute, DEP_CAPS);
        let steps = feed_all(
            &mut t,
            &[vec![1], coldef(), vec![0, 0, 7, 0, 0, 0], ok_fe(2)],
        );
        assert_eq!(steps, vec![Step::More, Step::More, Step::More, Step::Done]);
    }

    #[test]
    fn prepare_with_params_and_columns() {
        let mut ok = vec![0x00, 1, 0, 0, 0];
        ok.extend_from_slice(&2u16.to_le_bytes()); // columns
        ok.extend_from_slice(&3u16.to_le_bytes()); // params
        ok.extend_from_slice(&[0, 0, 0]);
        let mut t = ResponseTracker::new(ResponseKind::Prepare, EOF_CAPS);
        let steps = feed_all(
            &mut t,
            &[
                ok.clone(),
                coldef(),
                coldef(),
                coldef(),
                eof(2),
                coldef(),
                coldef(),
                eof(2),
            ],
        );
        assert_eq!(steps.iter().filter(|s| **s == Step::Done).count(), 1);
        assert_eq!(steps.last(), Some(&Step::Done));
        let mut t = ResponseTracker::new(ResponseKind::Prepare, DEP_CAPS);
        let steps = feed_all(
            &mut t,
            &[ok, coldef(), coldef(), coldef(), coldef(), coldef()],
        );
        assert_eq!(steps.last(), Some(&Step::Done));
        assert_eq!(steps.iter().filter(|s| **s == Step::Done).count(), 1);
    }

    #[test]
    fn prepare_without_params_or_columns() {
        let ok = vec![0x00, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let mut t = ResponseTracker::new(ResponseKind::Prepare, EOF_CAPS);
        assert_eq!(feed_all(&mut t, &[ok]), vec![Step::Done]);
    }

    #[test]
    fn large_row_spans_continuation_packets() {
        let mut t = ResponseTracker::new(ResponseKind::Query, DEP_CAPS);
        feed_all(&mut t, &[vec![1], coldef()]);
        // A row whose first byte looks like a terminator but is a 16 MiB packet.
        let big = vec![0xfe; 16];
        assert_eq!(
            t.feed(
                Header {
                    len: MAX_PAYLOAD,
                    seq: 3
                },
                &big
            )
            .unwrap(),
            Step::More
        );
        // Its continuation starts with 0xfe too and is short: still not a terminator.
        assert_eq!(
            t.feed(Header { len: 5, seq: 4 }, &[0xfe, 0, 0, 2, 0])
                .unwrap(),
            Step::More
        );
        let ok = ok_fe(2);
        assert_eq!(
            t.feed(
                Header {
                    len: ok.len(),
                    seq: 5
                },
                &ok
            )
            .unwrap(),
            Step::Done
        );
    }

    #[test]
    fn single_packet_replies() {
        for p in [ok_packet(2), eof(2), b"Uptime: 5  Threads: 1".to_vec()] {
            let mut t = ResponseTracker::new(ResponseKind::Single, EOF_CAPS);
            assert_eq!(feed_all(&mut t, &[p]), vec![Step::Done]);
            assert!(t.is_done());
        }
    }

    #[test]
    fn ok_packets_are_recognised() {
        let mut t = ResponseTracker::new(ResponseKind::Query, EOF_CAPS);
        let ok = ok_packet(2);
        t.feed(
            Header {
                len: ok.len(),
                seq: 1,
            },
            &ok,
        )
        .unwrap();
        assert!(t.last_ok());
        let mut t = ResponseTracker::new(ResponseKind::Single, EOF_CAPS);
        t.feed(
            Header {
                len: ok.len(),
                seq: 1,
            },
            &ok,
        )
        .unwrap();
        assert!(t.last_ok());
        // An EOF terminator is not an OK packet; an OK-style terminator is.
        let mut t = ResponseTracker::new(ResponseKind::Query, EOF_CAPS);
        let steps = feed_all(&mut t, &[vec![1], coldef(), eof(2), vec![1, b'x'], eof(2)]);
        assert_eq!(steps.last(), Some(&Step::Done));
        assert!(!t.last_ok());
        let mut t = ResponseTracker::new(ResponseKind::Query, DEP_CAPS);
        feed_all(&mut t, &[vec![1], coldef(), vec![1, b'x'], ok_fe(2)]);
        assert!(t.last_ok());
        // The OK_stmt of a prepare is not an OK packet.
        let mut t = ResponseTracker::new(ResponseKind::Prepare, DEP_CAPS);
        feed_all(&mut t, &[vec![0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]]);
        assert!(!t.last_ok());
    }

    #[test]
    fn field_list_until_eof() {
        let mut t = ResponseTracker::new(ResponseKind::FieldList, EOF_CAPS);
        assert_eq!(
            feed_all(&mut t, &[coldef(), coldef(), eof(2)]),
            vec![Step::More, Step::More, Step::Done]
        );
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let mut t = ResponseTracker::new(ResponseKind::Query, EOF_CAPS);
        assert!(t.feed(Header { len: 0, seq: 1 }, &[]).is_err());
        let mut t = ResponseTracker::new(ResponseKind::Query, EOF_CAPS);
        assert!(t.feed(Header { len: 1, seq: 1 }, &[0xfc]).is_err());
        let mut t = ResponseTracker::new(ResponseKind::Prepare, EOF_CAPS);
        assert!(t.feed(Header { len: 2, seq: 1 }, &[0, 1]).is_err());
        let mut t = ResponseTracker::new(ResponseKind::None, EOF_CAPS);
        assert!(t.feed(Header { len: 1, seq: 1 }, &[0]).is_err());
    }
}
