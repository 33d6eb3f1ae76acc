//! Which target serves a statement on a split endpoint (`read_write_split = true`): the
//! writer, or a reader, and whether the read first waits there for the client's causal
//! position. Plain code: the statement's class, the session's state, the readers' lag and
//! the time in; a decision out. The driver carries it out (conn/).

pub mod causal;
pub mod classify;

use crate::config::CausalReads;
use crate::topology::{Lag, Snapshot, TargetRole};
use causal::Position;
use classify::{Class, Hint};
use std::time::Duration;

/// A split endpoint's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Split {
    pub causal: CausalReads,
    pub timeout: Duration,
    /// The group's `max_replication_lag` (readers beyond it serve nothing).
    pub max_lag: Option<Duration>,
    /// The group's `health_check_interval`: how old a measured lag may be.
    pub check_every: Duration,
}

/// Why a statement went to the writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriterWhy {
    /// Not a read (or a read dbproxy cannot prove free of side effects).
    NotRead,
    /// A transaction is open, or autocommit is off.
    Transaction,
    /// `/* dbproxy:writer */`.
    Hint,
    /// No reader is up within `max_replication_lag`.
    NoReader,
    /// Read-your-writes: no reader is known to have the client's last write yet (lag mode,
    /// a write without a GTID, or a reader further behind than `causal_reads_timeout`).
    Causal,
    /// A causal wait on a reader timed out: the read is served again on the writer.
    WaitTimedOut,
    /// Too long to keep for a second try: it cannot wait on a reader first.
    NotRetryable,
    /// The session's writes do not replicate (`sql_log_bin = 0`, `skip_replication = 1`):
    /// no reader will ever have them.
    Unreplicated,
    /// The reader failed the read before any of its answer reached the client: its
    /// connection was lost, it could not prepare the statement (a table it has not got
    /// yet), or it refused the statement as read-only (it writes after all).
    ReaderFailed,
}

impl WriterWhy {
    /// The `reason` label of metrics.
    pub fn name(self) -> &'static str {
        match self {
            WriterWhy::NotRead => "not_read",
            WriterWhy::Transaction => "transaction",
            WriterWhy::Hint => "hint",
            WriterWhy::NoReader => "no_reader",
            WriterWhy::Causal => "causal",
            WriterWhy::WaitTimedOut => "wait_timed_out",
            WriterWhy::NotRetryable => "not_retryable",
            WriterWhy::Unreplicated => "unreplicated",
            WriterWhy::ReaderFailed => "reader_failed",
        }
    }

    /// Its place in [`WriterWhy::ALL`] (and in `stats::SplitStats::to_writer`).
    pub fn index(self) -> usize {
        self as usize
    }

    pub const ALL: [WriterWhy; crate::stats::SPLIT_WRITER_REASONS] = [
        WriterWhy::NotRead,
        WriterWhy::Transaction,
        WriterWhy::Hint,
        WriterWhy::NoReader,
        WriterWhy::Causal,
        WriterWhy::WaitTimedOut,
        WriterWhy::NotRetryable,
        WriterWhy::Unreplicated,
        WriterWhy::ReaderFailed,
    ];
}

/// Where a statement goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Writer(WriterWhy),
    /// A reader; with `wait`, the read is preceded (in the same round trip) by this query,
    /// which answers 0 once the reader has the client's position.
    Reader {
        wait: Option<Vec<u8>>,
    },
}

/// What the decision looks at besides the statement.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    pub class: Class,
    pub hint: Option<Hint>,
    /// The client is in a transaction or has autocommit off.
    pub transaction: bool,
    /// The command is kept to be served again (a read that waits may go to the writer
    /// after all).
    pub retryable: bool,
    /// This command was served on a reader already and goes again, to the writer: why
    /// ([`WriterWhy::WaitTimedOut`] or [`WriterWhy::ReaderFailed`]).
    pub rerouted: Option<WriterWhy>,
    /// The session's writes skip the binary log or are marked not to replicate.
    pub unreplicated: bool,
    pub position: &'a Position,
    /// Milliseconds since the Unix epoch.
    pub now_ms: u64,
}

/// The worst replication lag among the readers a read may go to (None: no reader is up
/// within `max_lag`).
pub fn worst_reader_lag(topology: &Snapshot, max_lag: Option<Duration>) -> Option<Lag> {
    topology
        .targets
        .iter()
        .filter(|t| t.role == TargetRole::Reader && t.up && t.lag.within(max_lag))
        .map(|t| t.lag)
        .max_by_key(|l| match l {
            Lag::Seconds(s) => *s,
            _ => u64::MAX,
        })
}

/// How far behind a reader with this measured lag may be now: the lag is read in whole
/// seconds (rounded down) every `check_every`. None: not known.
pub fn lag_bound(lag: Lag, check_every: Duration) -> Option<Duration> {
    match lag {
        Lag::Seconds(s) => Some(Duration::from_secs(s.saturating_add(1)) + check_every),
        Lag::None | Lag::Stopped | Lag::Unknown => None,
    }
}

impl Split {
    /// Where the statement of `ask` goes, with `reader_lag` from [`worst_reader_lag`].
    pub fn decide(&self, ask: &Ask<'_>, reader_lag: Option<Lag>) -> Decision {
        let read = match (ask.class, ask.hint) {
            (_, Some(Hint::Writer)) => return Decision::Writer(WriterWhy::Hint),
            (Class::Read { .. }, Some(Hint::Reader)) => Some(true),
            (Class::Read { pure: true } | Class::ReadOnlyTransaction, _) => Some(false),
            (Class::Read { pure: false } | Class::Session | Class::Write, _) => None,
        };
        let Some(unwaited) = read else {
            return Decision::Writer(WriterWhy::NotRead);
        };
        if ask.transaction {
            return Decision::Writer(WriterWhy::Transaction);
        }
        if let Some(why) = ask.rerouted {
            return Decision::Writer(why);
        }
        if ask.unreplicated && !unwaited {
            return Decision::Writer(WriterWhy::Unreplicated);
        }
        let Some(lag) = reader_lag else {
            return Decision::Writer(WriterWhy::NoReader);
        };
        if unwaited || self.causal == CausalReads::None || ask.position.is_empty() {
            return Decision::Reader { wait: None };
        }
        // A write whose GTID is not known (and every write in lag mode): the readers must
        // be known to be less behind than the time since.
        if let Some(at) = ask.position.unconfirmed_at_ms() {
            let since = Duration::from_millis(ask.now_ms.saturating_sub(at));
            if lag_bound(lag, self.check_every).is_none_or(|b| b >= since) {
                return Decision::Writer(WriterWhy::Causal);
            }
        }
        if self.causal == CausalReads::Lag || ask.position.gtids().is_empty() {
            return Decision::Reader { wait: None };
        }
        // A reader at least a whole second behind would not catch up within a shorter
        // timeout: the writer, at once.
        if let Lag::Seconds(s) = lag {
            if Duration::from_secs(s) >= self.timeout && s > 0 {
                return Decision::Writer(WriterWhy::Causal);
            }
        }
        if !ask.retryable {
            return Decision::Writer(WriterWhy::NotRetryable);
        }
        let ms = u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX);
        Decision::Reader {
            wait: ask.position.wait_sql(ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::causal::Gtid;
    use super::*;

    fn split(causal: CausalReads) -> Split {
        Split {
            causal,
            timeout: Duration::from_millis(250),
            max_lag: None,
            check_every: Duration::from_secs(1),
        }
    }

    fn ask<'a>(class: Class, position: &'a Position) -> Ask<'a> {
        Ask {
            class,
            hint: None,
            transaction: false,
            retryable: true,
            rerouted: None,
            unreplicated: false,
            position,
            now_ms: 100_000,
        }
    }

    const READ: Class = Class::Read { pure: true };
    const UP: Option<Lag> = Some(Lag::Seconds(0));

    #[test]
    fn reads_go_to_readers_and_the_rest_to_the_writer() {
        let none = Position::default();
        let s = split(CausalReads::Gtid);
        assert_eq!(
            s.decide(&ask(READ, &none), UP),
            Decision::Reader { wait: None }
        );
        for class in [Class::Write, Class::Session, Class::Read { pure: false }] {
            assert_eq!(
                s.decide(&ask(class, &none), UP),
                Decision::Writer(WriterWhy::NotRead),
                "{class:?}"
            );
        }
        let mut a = ask(READ, &none);
        a.transaction = true;
        assert_eq!(s.decide(&a, UP), Decision::Writer(WriterWhy::Transaction));
        assert_eq!(
            s.decide(&ask(READ, &none), None),
            Decision::Writer(WriterWhy::NoReader)
        );
        assert_eq!(
            s.decide(&ask(Class::ReadOnlyTransaction, &none), UP),
            Decision::Reader { wait: None }
        );
        // Writes that never reach a reader keep the session's reads on the writer, in
        // every mode, unless a read is hinted to a reader.
        for mode in [CausalReads::None, CausalReads::Gtid, CausalReads::Lag] {
            let mut a = ask(READ, &none);
            a.unreplicated = true;
            assert_eq!(
                split(mode).decide(&a, UP),
                Decision::Writer(WriterWhy::Unreplicated)
            );
            a.hint = Some(Hint::Reader);
            assert_eq!(split(mode).decide(&a, UP), Decision::Reader { wait: None });
        }
    }

    #[test]
    fn hints() {
        let none = Position::default();
        let s = split(CausalReads::Gtid);
        let mut a = ask(READ, &none);
        a.hint = Some(Hint::Writer);
        assert_eq!(s.decide(&a, UP), Decision::Writer(WriterWhy::Hint));
        let mut p = Position::default();
        p.committed(Gtid::parse(b"0-1-5").unwrap());
        let mut a = ask(Class::Read { pure: false }, &p);
        a.hint = Some(Hint::Reader);
        assert_eq!(s.decide(&a, UP), Decision::Reader { wait: None });
        let mut a = ask(Class::Write, &p);
        a.hint = Some(Hint::Reader);
        assert_eq!(s.decide(&a, UP), Decision::Writer(WriterWhy::NotRead));
    }

    #[test]
    fn gtid_mode_waits_for_the_clients_last_write() {
        let mut p = Position::default();
        p.committed(Gtid::parse(b"0-1-5").unwrap());
        let s = split(CausalReads::Gtid);
        let Decision::Reader { wait: Some(w) } = s.decide(&ask(READ, &p), UP) else {
            panic!("a wait");
        };
        assert_eq!(w, b"SELECT MASTER_GTID_WAIT('0-1-5', 0.250)");
        // Too far behind to catch up within the timeout: the writer at once.
        assert_eq!(
            s.decide(&ask(READ, &p), Some(Lag::Seconds(1))),
            Decision::Writer(WriterWhy::Causal)
        );
        let mut a = ask(READ, &p);
        a.retryable = false;
        assert_eq!(s.decide(&a, UP), Decision::Writer(WriterWhy::NotRetryable));
        let mut a = ask(READ, &p);
        a.rerouted = Some(WriterWhy::WaitTimedOut);
        assert_eq!(s.decide(&a, UP), Decision::Writer(WriterWhy::WaitTimedOut));
        // None: no waits.
        assert_eq!(
            split(CausalReads::None).decide(&ask(READ, &p), UP),
            Decision::Reader { wait: None }
        );
    }

    #[test]
    fn a_write_without_a_gtid_and_lag_mode_keep_reads_on_the_writer_for_the_lag_bound() {
        for mode in [CausalReads::Gtid, CausalReads::Lag] {
            let s = split(mode);
            let mut p = Position::default();
            p.wrote_at(100_000 - 1_500);
            // Lag 0 s measured: up to 1 s behind, measured up to 1 s ago.
            assert_eq!(
                s.decide(&ask(READ, &p), UP),
                Decision::Writer(WriterWhy::Causal),
                "{mode:?}"
            );
            let mut p = Position::default();
            p.wrote_at(100_000 - 2_500);
            assert_eq!(
                s.decide(&ask(READ, &p), UP),
                Decision::Reader { wait: None }
            );
            // Lag not known: the writer.
            assert_eq!(
                s.decide(&ask(READ, &p), Some(Lag::Unknown)),
                Decision::Writer(WriterWhy::Causal)
            );
        }
    }
}
