//! The session's `Relaying` state: the database's answer to one command on its way to the
//! client, and the file a LOAD DATA LOCAL INFILE asks for on its way the other way.
//!
//! Bytes, completions and time in; out: how much of the database's buffer goes to the
//! client (as it is, or rewritten), how much more to read, when to kill the statement
//! (`query_timeout`) or give the connection up, and what the client is told when the
//! connection fails under its answer. The driver reads, writes and keeps the clock.

use crate::mysql::command::ResponseKind;
use crate::mysql::consts::cap;
use crate::mysql::packet::{write_packet, Header, MAX_PAYLOAD};
use crate::mysql::response::{End, ResponseTracker, Step};
use crate::mysql::resultset::{Packets, TextResult};
use crate::mysql::session::Change;
use crate::mysql::wire::{terminator_status, ErrPacket};
use crate::session::answer::{AnswerError, PrepareCapture, Relay};
use crate::session::sql::SqlInfo;
use crate::session::state::BackendSession;
use crate::session::statement_watch::{StatementWatch, Verdict};
use crate::session::stmts::BackendStmts;
use crate::session::{ClientSession, Outcome, Tracked};
use std::time::Instant;

/// The smallest read the driver is asked for while an answer streams.
const MIN_READ: usize = 4096;

/// What the answer's passes read and change: the client's session, the connection's, and
/// the statement being answered.
pub struct Context<'a> {
    pub session: &'a mut ClientSession,
    pub backend: &'a mut BackendSession,
    pub backend_stmts: &'a mut BackendStmts,
    /// The capabilities the connection negotiated.
    pub caps: u32,
    pub info: &'a SqlInfo,
    pub prepare: Option<&'a mut PrepareCapture>,
}

/// Why an answer could not be relayed to its end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// The connection failed, broke the protocol, or was given up (the text says why): it
    /// is lost, and the client is told so ([`Relaying::told`]).
    #[error("{0}")]
    Backend(String),
    /// A kept statement's first packet is the writer refusing it as read-only: nothing
    /// went to the client; the statement goes again once a writer is found.
    #[error("the database refused the statement as read-only")]
    ReadOnly,
}

/// What one pass over the database's buffered bytes found.
#[derive(Debug, PartialEq, Eq)]
pub struct Pass {
    /// Bytes at the start of the buffer that are through: they go to the client (unless
    /// `rewritten` replaces them) and leave the buffer.
    pub bytes: usize,
    /// What the client gets instead of those bytes, when a packet changed size (session
    /// tracking stripped). Otherwise the bytes go as they are (patched in place).
    pub rewritten: Option<Vec<u8>>,
    pub next: Next,
}

/// What the driver does once the pass's bytes are out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Read from the database: at least `want` bytes of room (the rest of a large packet).
    Read { want: usize },
    /// The server asked for the client's file: read the client's packets and hand each
    /// to [`Relaying::infile_packet`].
    Infile,
    /// The answer is complete: [`Relaying::finish`].
    Done,
}

/// What to do with one packet of the client's file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Infile {
    /// Send it to the database. Otherwise drop it: the database is gone, and the file is
    /// read to its end all the same, so that the error lands where the client expects an
    /// answer.
    pub forward: bool,
    /// It is the file's end: [`Relaying::infile_done`] says how the answer goes on (back
    /// to [`Next::Read`] for the database's answer, or failed).
    pub last: bool,
}

/// What the watch over a statement asks for when its timer fires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Alarm {
    /// `query_timeout` passed in silence: kill the statement (KILL QUERY from a side
    /// connection) and go on waiting for its answer.
    Kill,
    /// Neither the answer nor the kill came in time: give the connection up.
    GiveUp(Failure),
}

/// One command's answer.
#[derive(Debug)]
pub struct Relaying {
    kind: ResponseKind,
    tracker: ResponseTracker,
    tracked: Tracked,
    /// Session tracking goes out of OK packets (the client did not ask for it).
    strip: bool,
    /// The next packet is the first of a statement kept to be sent again.
    check_read_only: bool,
    watch: Option<StatementWatch>,
    /// While the client's file streams: why the database cannot take it, once known.
    infile: Option<Option<String>>,
    /// The sequence id of the last packet through, either way: an error the client is
    /// told follows it.
    last_seq: u8,
}

impl Relaying {
    /// The answer to a command of `kind` on a connection with `caps`. `retryable`: the
    /// command is kept to be sent again, so a read-only refusal as its first packet is
    /// [`Failure::ReadOnly`]. `watch`: the statement's watch (`query_timeout`), when it has
    /// one (an unwatched statement reads no clock).
    pub fn new(
        kind: ResponseKind,
        caps: u32,
        strip: bool,
        retryable: bool,
        watch: Option<StatementWatch>,
    ) -> Relaying {
        Relaying {
            kind,
            tracker: ResponseTracker::new(kind, caps),
            tracked: Tracked::default(),
            strip,
            check_read_only: retryable,
            watch,
            infile: None,
            last_seq: 0,
        }
    }

    /// One pass over the bytes the database sent so far (`buf`, from its start).
    pub fn on_backend(&mut self, cx: Context<'_>, buf: &mut [u8]) -> Result<Pass, Failure> {
        let mut relay = Relay {
            tracker: &mut self.tracker,
            session: cx.session,
            backend: cx.backend,
            backend_stmts: cx.backend_stmts,
            caps: cx.caps,
            info: cx.info,
            tracked: &mut self.tracked,
            prepare: cx.prepare,
            strip: self.strip,
            check_read_only: self.check_read_only,
        };
        let scan = relay.scan(buf);
        self.check_read_only = relay.check_read_only;
        let scan = scan.map_err(|e| match e {
            AnswerError::ReadOnly => Failure::ReadOnly,
            AnswerError::Protocol(e) => Failure::Backend(e.to_string()),
        })?;
        if scan.bytes > 0 {
            self.last_seq = self.tracker.last_seq();
        }
        let next = match scan.step {
            Step::Done => Next::Done,
            Step::LocalInfile => {
                self.infile = Some(None);
                Next::Infile
            }
            Step::More => Next::Read {
                want: want(buf.get(scan.bytes..).unwrap_or_default()),
            },
        };
        Ok(Pass {
            bytes: scan.bytes,
            rewritten: scan.rewritten,
            next,
        })
    }

    /// Whether the statement is watched: only then does [`Relaying::waiting`] want the
    /// time.
    pub fn watched(&self) -> bool {
        self.watch.is_some()
    }

    /// What the last pass found is out (the client took it): from `now` dbproxy waits on the
    /// database, and its silence counts from there, not from when the bytes came (a slow
    /// client is `net_write_timeout`'s to judge, not `query_timeout`'s).
    pub fn waiting(&mut self, now: Instant) {
        if let Some(w) = self.watch.as_mut() {
            w.heard(now);
        }
    }

    /// The database closed the connection, or reading from it failed.
    pub fn backend_closed(&mut self, error: Option<String>) -> Failure {
        Failure::Backend(error.unwrap_or_else(|| "the database closed the connection".into()))
    }

    /// One packet of the client's file (its header) was read.
    pub fn infile_packet(&mut self, h: Header) -> Infile {
        self.last_seq = h.seq;
        Infile {
            forward: !matches!(self.infile, Some(Some(_))),
            last: h.len == 0,
        }
    }

    /// Sending the client's file to the database failed: the rest of the file is dropped.
    pub fn infile_send_failed(&mut self, why: String) {
        if let Some(failed @ None) = self.infile.as_mut() {
            *failed = Some(why);
        }
    }

    /// Where the file stands once its last packet is read: `Err` when the database could
    /// not take it (the connection is lost).
    pub fn infile_done(&mut self) -> Result<(), Failure> {
        match self.infile.take() {
            Some(Some(why)) => Err(Failure::Backend(why)),
            _ => {
                self.tracker.resume_after_infile();
                Ok(())
            }
        }
    }

    /// The watch's timer fired at `now`.
    pub fn on_timer(&mut self, now: Instant) -> Option<Alarm> {
        match self.watch.as_mut()?.check(now) {
            Verdict::Wait => None,
            Verdict::Kill => Some(Alarm::Kill),
            Verdict::GiveUp(why) => Some(Alarm::GiveUp(Failure::Backend(why))),
        }
    }

    /// When [`Relaying::on_timer`] may have something to say next (never, unwatched).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.watch.as_ref()?.poll_timeout()
    }

    /// Nothing of the answer has gone to the client yet.
    pub fn relayed_nothing(&self) -> bool {
        self.last_seq == 0
    }

    /// What the client is told when the connection failed under its answer (after what
    /// reached it already), and with which sequence id.
    pub fn told(&self, session: &ClientSession, why: &str) -> (u8, ErrPacket) {
        (self.last_seq.wrapping_add(1), session.lost_error(why))
    }

    /// The answer is complete: how it ended, and what its session tracking left
    /// unexplained.
    pub fn finish(self, cx: Context<'_>) -> (Outcome, Tracked) {
        let mut tracked = self.tracked;
        // Only for text queries: executing a prepared statement outside the schema it was
        // prepared in flags the switch there and back on every execute.
        if self.tracker.untold_change() && self.kind == ResponseKind::Query {
            let t = cx
                .session
                .learn_tracking(cx.info, &[Change::StateChanged], cx.backend);
            tracked.unexplained |= t.unexplained;
        }
        let outcome = Outcome {
            ending: self.tracker.end().unwrap_or(End::Ok {
                affected: 0,
                warnings: 0,
            }),
            status: self.tracker.status(),
        };
        (outcome, tracked)
    }
}

/// A small answer read whole (`packets`, or the server's error), changed by `transform`
/// (a reader's row patched, the client's own warnings spliced in): the bytes the client
/// gets, framed from sequence id 1, and how the answer ended.
pub fn rewritten_answer(
    packets: Result<Packets, ErrPacket>,
    caps: u32,
    transform: impl FnOnce(&TextResult, u32) -> Packets,
) -> (Vec<u8>, Outcome) {
    let (out, outcome) = match packets {
        Ok(p) => match TextResult::parse(&p.0, caps) {
            Ok(r) => {
                let out = transform(&r, caps);
                let status = out.0.last().and_then(|t| terminator_status(t, caps));
                // Every packet but the column count, the columns, their EOF (without
                // DEPRECATE_EOF) and the terminator is a row.
                let framing =
                    r.raw_columns.len() as u64 + 2 + u64::from(caps & cap::DEPRECATE_EOF == 0);
                let rows = (out.0.len() as u64).saturating_sub(framing);
                let ending = End::Rows { rows, warnings: 0 };
                (out.0, Outcome { ending, status })
            }
            // Not a result set (an OK): as it came.
            Err(_) => {
                let status = p.0.last().and_then(|t| terminator_status(t, caps));
                let ending = End::Ok {
                    affected: 0,
                    warnings: 0,
                };
                (p.0, Outcome { ending, status })
            }
        },
        Err(e) => {
            let ending = End::Err;
            (
                vec![e.encode()],
                Outcome {
                    ending,
                    status: None,
                },
            )
        }
    };
    let mut bytes = Vec::new();
    let mut seq = 1u8;
    for p in &out {
        seq = write_packet(&mut bytes, seq, p);
    }
    (bytes, outcome)
}

/// Room to read into after a pass left `rest` (the start of a packet) in the buffer: the
/// rest of that packet, at least [`MIN_READ`].
fn want(rest: &[u8]) -> usize {
    Header::parse(rest)
        .map_or(MIN_READ, |h| h.total().saturating_sub(rest.len()))
        .clamp(MIN_READ, MAX_PAYLOAD + 4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mysql::consts::{errcode, status};
    use crate::session::sql::analyze;

    const CAPS: u32 = cap::PROTOCOL_41 | cap::SESSION_TRACK | cap::DEPRECATE_EOF;
    use std::time::Duration;

    const S: Duration = Duration::from_secs(1);

    /// A client, a connection and a statement, owned; the database's bytes as they came
    /// and the client's as they left, on virtual time.
    struct World {
        session: ClientSession,
        backend: BackendSession,
        stmts: BackendStmts,
        info: SqlInfo,
        /// Received from the database, not yet through.
        buf: Vec<u8>,
        /// What the client got.
        client: Vec<u8>,
        now: Instant,
    }

    impl World {
        fn new(sql: &[u8]) -> World {
            World {
                session: crate::session::testing::session(None),
                backend: BackendSession::default(),
                stmts: BackendStmts::new(8),
                info: analyze(sql),
                buf: Vec::new(),
                client: Vec::new(),
                now: Instant::now(),
            }
        }

        fn cx(&mut self) -> Context<'_> {
            Context {
                session: &mut self.session,
                backend: &mut self.backend,
                backend_stmts: &mut self.stmts,
                caps: CAPS,
                info: &self.info,
                prepare: None,
            }
        }

        /// `bytes` arrive from the database `after` the last; the pass's bytes go to the
        /// client as the driver would send them.
        fn arrive(
            &mut self,
            r: &mut Relaying,
            bytes: &[u8],
            after: Duration,
        ) -> Result<Next, Failure> {
            self.now += after;
            self.buf.extend_from_slice(bytes);
            let mut buf = std::mem::take(&mut self.buf);
            let now = self.now;
            let pass = r.on_backend(self.cx(), &mut buf);
            let pass = match pass {
                Ok(pass) => pass,
                Err(f) => {
                    self.buf = buf;
                    return Err(f);
                }
            };
            match pass.rewritten {
                Some(out) => self.client.extend_from_slice(&out),
                None => self
                    .client
                    .extend_from_slice(buf.get(..pass.bytes).unwrap_or_default()),
            }
            buf.drain(..pass.bytes);
            self.buf = buf;
            // The client took it at once: the database is waited on from now.
            r.waiting(now);
            Ok(pass.next)
        }
    }

    fn packets(list: &[(u8, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (seq, p) in list {
            write_packet(&mut out, *seq, p);
        }
        out
    }

    /// The column definition of `SELECT 1`.
    const COLUMN: &[u8] =
        b"\x03def\x00\x00\x00\x011\x00\x0c\x3f\x00\x01\x00\x00\x00\x08\x81\x00\x00\x00\x00";

    /// `SELECT 1` as MariaDB answers it with DEPRECATE_EOF: a column count, a column, a
    /// row, the OK-as-EOF terminator.
    fn select_one() -> Vec<u8> {
        packets(&[
            (1, b"\x01"),
            (2, COLUMN),
            (3, b"\x011"),
            (4, b"\xfe\x00\x00\x02\x00\x00\x00"),
        ])
    }

    fn relaying(retryable: bool, watch: Option<(Duration, Duration)>, now: Instant) -> Relaying {
        let watch = watch.map(|(limit, own)| StatementWatch::new(limit, own, now));
        Relaying::new(ResponseKind::Query, CAPS, true, retryable, watch)
    }

    #[test]
    fn an_answer_in_pieces_reaches_the_client_whole_and_unchanged() {
        let mut w = World::new(b"SELECT 1");
        let mut r = relaying(false, None, w.now);
        let answer = select_one();
        // A byte at a time: nothing goes out before a packet is whole.
        let mut next = Next::Read { want: MIN_READ };
        for (i, b) in answer.iter().enumerate() {
            assert_ne!(next, Next::Done, "done before byte {i}");
            next = w.arrive(&mut r, &[*b], Duration::ZERO).unwrap();
            assert!(answer.starts_with(&w.client));
        }
        assert_eq!(next, Next::Done);
        assert_eq!(w.client, answer);
        let (outcome, tracked) = r.finish(w.cx());
        assert_eq!(
            outcome.ending,
            End::Rows {
                rows: 1,
                warnings: 0
            }
        );
        assert_eq!(outcome.status, Some(status::AUTOCOMMIT));
        assert!(!tracked.unexplained);
    }

    #[test]
    fn a_large_packet_is_read_whole_with_room_for_its_rest() {
        let mut w = World::new(b"SELECT 1");
        let mut r = relaying(false, None, w.now);
        // A row of 100,000 bytes, of which the header and 10 bytes arrived.
        let mut head = vec![0xa0, 0x86, 0x01, 3];
        head.extend_from_slice(&[b'x'; 10]);
        let first = packets(&[(1, b"\x01")]);
        let mut bytes = first.clone();
        bytes.extend_from_slice(&head);
        assert_eq!(
            w.arrive(&mut r, &bytes, Duration::ZERO),
            Ok(Next::Read {
                want: 100_000 + 4 - head.len()
            })
        );
        assert_eq!(w.client, first);
    }

    #[test]
    fn a_connection_lost_mid_answer_tells_the_client_after_what_it_got() {
        let mut w = World::new(b"SELECT 1");
        let mut r = relaying(false, None, w.now);
        let answer = select_one();
        // The column count and the column arrived; then the connection died.
        let through = 5 + 4 + COLUMN.len();
        w.arrive(&mut r, &answer[..through + 2], Duration::ZERO)
            .unwrap();
        assert_eq!(w.client.len(), through);
        let f = r.backend_closed(None);
        assert_eq!(
            f,
            Failure::Backend("the database closed the connection".into())
        );
        let (seq, e) = r.told(&w.session, &f.to_string());
        assert_eq!(seq, 3, "after the column, sequence 2");
        assert_eq!(
            (e.code, &e.sql_state),
            (errcode::PROXY_BACKEND_LOST, b"HY000")
        );
        assert!(e
            .message
            .contains("outcome is unknown; the session stays open"));
        // In a transaction, the client is told it was rolled back (40001).
        w.session.status |= status::IN_TRANS;
        let (_, e) = r.told(&w.session, "reset by peer");
        assert_eq!(&e.sql_state, b"40001");
        assert!(e.message.contains("rolled back") && e.message.ends_with("reset by peer"));
    }

    #[test]
    fn a_silent_database_gets_the_statement_killed_then_the_connection_given_up() {
        let mut w = World::new(b"SELECT SLEEP(100)");
        let t0 = w.now;
        let mut r = relaying(false, Some((5 * S, 2 * S)), t0);
        assert_eq!(r.poll_timeout(), Some(t0 + 5 * S));
        assert_eq!(r.on_timer(t0 + 4 * S), None);
        // The column count arrives at 4 s: the silence counts from there.
        w.arrive(&mut r, &packets(&[(1, b"\x01")]), 4 * S).unwrap();
        assert_eq!(r.poll_timeout(), Some(t0 + 9 * S));
        assert_eq!(r.on_timer(t0 + 9 * S), Some(Alarm::Kill));
        // The kill has internal_query_timeout to take effect, bytes or not.
        assert_eq!(r.poll_timeout(), Some(t0 + 11 * S));
        w.arrive(&mut r, &[9, 0, 0], 1 * S).unwrap();
        match r.on_timer(t0 + 11 * S) {
            Some(Alarm::GiveUp(Failure::Backend(why))) => assert!(why.contains("KILL QUERY")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_slow_client_does_not_count_as_the_databases_silence() {
        let mut w = World::new(b"SELECT * FROM big");
        let t0 = w.now;
        let mut r = relaying(false, Some((5 * S, 2 * S)), t0);
        w.arrive(&mut r, &packets(&[(1, b"\x01")]), 1 * S).unwrap();
        // The client took 10 s to take that; the database is waited on from then.
        r.waiting(t0 + 11 * S);
        assert_eq!(r.on_timer(t0 + 15 * S), None);
        assert_eq!(r.poll_timeout(), Some(t0 + 16 * S));
        assert_eq!(r.on_timer(t0 + 16 * S), Some(Alarm::Kill));
    }

    #[test]
    fn a_killed_statement_answers_with_the_servers_error() {
        let mut w = World::new(b"SELECT SLEEP(100)");
        let t0 = w.now;
        let mut r = relaying(false, Some((5 * S, 2 * S)), t0);
        assert_eq!(r.on_timer(t0 + 5 * S), Some(Alarm::Kill));
        let e = ErrPacket::new(1317, "70100", "Query execution was interrupted").encode();
        assert_eq!(
            w.arrive(&mut r, &packets(&[(1, &e)]), 6 * S),
            Ok(Next::Done)
        );
        assert_eq!(w.client, packets(&[(1, &e)]));
        assert_eq!(r.finish(w.cx()).0.ending, End::Err);
    }

    #[test]
    fn an_unwatched_statement_has_no_timer() {
        let w = World::new(b"SELECT 1");
        let mut r = relaying(false, None, w.now);
        assert_eq!(r.poll_timeout(), None);
        assert_eq!(r.on_timer(w.now + 3600 * S), None);
    }

    #[test]
    fn a_local_infile_streams_the_clients_file_then_the_answer() {
        let mut w = World::new(b"LOAD DATA LOCAL INFILE 'x' INTO TABLE t");
        let mut r = relaying(false, None, w.now);
        assert_eq!(
            w.arrive(&mut r, &packets(&[(1, b"\xfbx")]), Duration::ZERO),
            Ok(Next::Infile)
        );
        let data = Header { len: 10, seq: 2 };
        let end = Header { len: 0, seq: 3 };
        let (more, last) = (
            Infile {
                forward: true,
                last: false,
            },
            Infile {
                forward: true,
                last: true,
            },
        );
        assert_eq!(r.infile_packet(data), more);
        assert_eq!(r.infile_packet(end), last);
        assert_eq!(r.infile_done(), Ok(()));
        let ok = b"\x00\x01\x00\x02\x00\x00\x00";
        assert_eq!(
            w.arrive(&mut r, &packets(&[(4, ok)]), Duration::ZERO),
            Ok(Next::Done)
        );
        assert_eq!(
            r.finish(w.cx()).0.ending,
            End::Ok {
                affected: 1,
                warnings: 0
            }
        );
    }

    #[test]
    fn a_database_gone_during_the_file_drops_the_rest_then_fails() {
        let mut w = World::new(b"LOAD DATA LOCAL INFILE 'x' INTO TABLE t");
        let mut r = relaying(false, None, w.now);
        w.arrive(&mut r, &packets(&[(1, b"\xfbx")]), Duration::ZERO)
            .unwrap();
        let forward = |last| Infile {
            forward: true,
            last,
        };
        let drop = |last| Infile {
            forward: false,
            last,
        };
        assert_eq!(r.infile_packet(Header { len: 10, seq: 2 }), forward(false));
        r.infile_send_failed("broken pipe".into());
        // A second failure does not replace the first reason.
        r.infile_send_failed("again".into());
        assert_eq!(r.infile_packet(Header { len: 10, seq: 3 }), drop(false));
        assert_eq!(r.infile_packet(Header { len: 0, seq: 4 }), drop(true));
        assert_eq!(r.infile_done(), Err(Failure::Backend("broken pipe".into())));
        // The client is told with the sequence id after its file's end.
        let (seq, _) = r.told(&w.session, "broken pipe");
        assert_eq!(seq, 5);
    }

    #[test]
    fn a_kept_statement_refused_as_read_only_sends_nothing_to_the_client() {
        let mut w = World::new(b"INSERT INTO t VALUES (1)");
        let mut r = relaying(true, None, w.now);
        let e = ErrPacket::new(errcode::ER_READ_ONLY_MODE, "HY000", "read-only").encode();
        assert_eq!(
            w.arrive(&mut r, &packets(&[(1, &e)]), Duration::ZERO),
            Err(Failure::ReadOnly)
        );
        assert!(w.client.is_empty());
        // Past the first packet, the same error is the client's.
        let mut w = World::new(b"SELECT 1");
        let mut r = relaying(true, None, w.now);
        w.arrive(&mut r, &packets(&[(1, b"\x01")]), Duration::ZERO)
            .unwrap();
        assert!(!r.check_read_only);
    }

    #[test]
    fn tracking_is_stripped_for_a_client_without_it_and_learnt() {
        let mut w = World::new(b"USE shop");
        let mut r = relaying(false, None, w.now);
        let ok = b"\x00\x00\x00\x02\x40\x00\x00\x00\x0a\x01\x05\x04shop\x02\x01\x31";
        assert_eq!(
            w.arrive(&mut r, &packets(&[(1, ok)]), Duration::ZERO),
            Ok(Next::Done)
        );
        assert_eq!(w.client, packets(&[(1, b"\x00\x00\x00\x02\x00\x00\x00")]));
        assert_eq!(w.session.state.schema.as_deref(), Some(&b"shop"[..]));
    }

    #[test]
    fn a_small_answer_read_whole_is_rewritten_and_its_rows_counted() {
        let payloads = |list: &[&[u8]]| Packets(list.iter().map(|p| p.to_vec()).collect());
        let result = payloads(&[b"\x01", COLUMN, b"\x011", b"\xfe\x00\x00\x02\x00\x00\x00"]);
        // The row replaced by two (as a splice of the client's own warnings would).
        let (bytes, outcome) = rewritten_answer(Ok(result), CAPS, |r, caps| {
            r.with_rows(vec![b"\x012".to_vec(), b"\x013".to_vec()], caps)
        });
        assert_eq!(
            outcome.ending,
            End::Rows {
                rows: 2,
                warnings: 0
            }
        );
        assert_eq!(outcome.status, Some(status::AUTOCOMMIT));
        let mut want = packets(&[(1, b"\x01"), (2, COLUMN), (3, b"\x012"), (4, b"\x013")]);
        want.extend_from_slice(&packets(&[(5, b"\xfe\x00\x00\x02\x00\x00\x00")]));
        assert_eq!(bytes, want);
        // An OK is no result: it goes as it came.
        let ok = payloads(&[b"\x00\x00\x00\x02\x00\x00\x00"]);
        let (bytes, outcome) = rewritten_answer(Ok(ok), CAPS, |_, _| unreachable!());
        assert_eq!(bytes, packets(&[(1, b"\x00\x00\x00\x02\x00\x00\x00")]));
        assert_eq!(
            outcome.ending,
            End::Ok {
                affected: 0,
                warnings: 0
            }
        );
        // The server's error, framed for the client.
        let e = ErrPacket::new(1146, "42S02", "no such table");
        let (bytes, outcome) = rewritten_answer(Err(e.clone()), CAPS, |_, _| unreachable!());
        assert_eq!(bytes, packets(&[(1, &e.encode())]));
        assert_eq!((outcome.ending, outcome.status), (End::Err, None));
    }

    #[test]
    fn a_broken_answer_loses_the_connection() {
        let mut w = World::new(b"SELECT 1");
        let mut r = relaying(false, None, w.now);
        assert!(matches!(
            w.arrive(&mut r, &packets(&[(1, b"\x00")]), Duration::ZERO),
            Err(Failure::Backend(_))
        ));
    }
}
