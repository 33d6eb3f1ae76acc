//! The session's `Idle` state: waiting for the client's next command. Its first packet
//! must come within the idle limit that applies (`idle_client_timeout`, or in a
//! transaction `idle_transaction_timeout`); once part of it is here, the rest within
//! `net_read_timeout` (a client that sends half a command and goes silent is not waited
//! for like an idle one). A kill ends the wait; so does a drain, at once for a session that
//! holds nothing, at the drain's deadline for one in a transaction. Bytes, time and those
//! events in; the command's header, or why there is none ([`NoCommand`]), out.

use super::command::{IdleLimit, NoCommand};
use crate::mysql::packet::Header;
use std::time::{Duration, Instant};

/// What the client's bytes so far amount to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heard {
    /// Not a whole packet yet.
    Partial,
    /// The command's first packet is whole at the start of the buffer.
    Command(Header),
    /// The packet announces a payload longer than the limit (its length).
    TooLarge(usize),
}

/// One wait for a command.
#[derive(Debug)]
pub struct Idle {
    /// When the idle limit that applies runs out, and which one it is.
    idle_by: Option<Instant>,
    why: IdleLimit,
    /// `net_read_timeout`.
    rest: Duration,
    /// When the rest of a command begun must be here.
    rest_by: Option<Instant>,
    /// The session holds a connection (a transaction, a pin).
    holds: bool,
    /// A drain started: when a session that holds a connection is closed.
    drain_by: Option<Instant>,
    /// The longest payload accepted.
    limit: usize,
}

impl Idle {
    /// Starts waiting at `now`: `wait` is the idle limit and the setting it comes from
    /// ([`super::command::idle_wait`]), `rest` is `net_read_timeout`, `limit` the longest
    /// payload accepted; `holds`: the session holds a connection.
    pub fn new(
        wait: (Option<Duration>, IdleLimit),
        rest: Duration,
        limit: usize,
        holds: bool,
        now: Instant,
    ) -> Idle {
        let (idle, why) = wait;
        Idle {
            idle_by: idle.and_then(|d| now.checked_add(d)),
            why,
            rest,
            rest_by: None,
            holds,
            drain_by: None,
            limit,
        }
    }

    /// The client's bytes buffered so far (`buf`, from its start), the last of them
    /// received at `now`.
    pub fn on_bytes(&mut self, buf: &[u8], now: Instant) -> Heard {
        if buf.is_empty() {
            return Heard::Partial;
        }
        if self.rest_by.is_none() {
            self.rest_by = now.checked_add(self.rest);
        }
        match Header::parse(buf) {
            Some(h) if h.len > self.limit => Heard::TooLarge(h.len),
            Some(h) if buf.len() >= h.total() => Heard::Command(h),
            _ => Heard::Partial,
        }
    }

    /// The session was killed.
    pub fn on_killed(&self) -> NoCommand {
        NoCommand::Killed
    }

    /// The client closed the connection, or reading from it failed.
    pub fn on_closed(&self) -> NoCommand {
        NoCommand::Left
    }

    /// dbproxy started to drain; `deadline`: when sessions still in a transaction are
    /// closed (none: at once). A session that holds nothing ends now.
    pub fn on_drain(&mut self, deadline: Option<Instant>) -> Option<NoCommand> {
        let end = NoCommand::Draining {
            in_transaction: self.holds,
        };
        match deadline {
            Some(d) if self.holds => {
                self.drain_by = Some(d);
                None
            }
            _ => Some(end),
        }
    }

    /// The timer fired at `now`: why the wait ends, if it does.
    pub fn on_timer(&mut self, now: Instant) -> Option<NoCommand> {
        let passed = |t: Option<Instant>| t.is_some_and(|t| now >= t);
        if passed(self.drain_by) {
            return Some(NoCommand::Draining {
                in_transaction: true,
            });
        }
        if self.rest_by.is_some() && (passed(self.rest_by) || passed(self.idle_by)) {
            return Some(NoCommand::Stalled);
        }
        passed(self.idle_by).then_some(NoCommand::Idle(self.why))
    }

    /// When [`Idle::on_timer`] has something to say next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [self.idle_by, self.rest_by, self.drain_by]
            .into_iter()
            .flatten()
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mysql::packet::write_packet;

    const S: Duration = Duration::from_secs(1);

    fn idle(limit: Option<Duration>, why: IdleLimit, holds: bool, t0: Instant) -> Idle {
        Idle::new((limit, why), 30 * S, 1 << 20, holds, t0)
    }

    fn ping() -> Vec<u8> {
        let mut p = Vec::new();
        write_packet(&mut p, 0, &[0x0e]);
        p
    }

    #[test]
    fn a_command_in_pieces_is_whole_when_its_last_byte_comes() {
        let t0 = Instant::now();
        let mut w = idle(None, IdleLimit::Client, false, t0);
        assert_eq!(w.poll_timeout(), None, "no idle limit: no timer");
        let p = ping();
        for n in 1..p.len() {
            assert_eq!(w.on_bytes(&p[..n], t0), Heard::Partial);
        }
        assert_eq!(
            w.on_bytes(&p, t0),
            Heard::Command(Header { len: 1, seq: 0 })
        );
    }

    #[test]
    fn half_a_command_then_silence_is_stalled_after_net_read_timeout() {
        let t0 = Instant::now();
        let mut w = idle(Some(3600 * S), IdleLimit::Client, false, t0);
        assert_eq!(w.poll_timeout(), Some(t0 + 3600 * S));
        // Two bytes of a header at 10 s: the rest is due within 30 s of them.
        assert_eq!(w.on_bytes(&[5, 0], t0 + 10 * S), Heard::Partial);
        assert_eq!(w.poll_timeout(), Some(t0 + 40 * S));
        assert_eq!(w.on_timer(t0 + 39 * S), None);
        // More of it does not move the deadline.
        assert_eq!(w.on_bytes(&[5, 0, 0], t0 + 39 * S), Heard::Partial);
        assert_eq!(w.on_timer(t0 + 40 * S), Some(NoCommand::Stalled));
    }

    #[test]
    fn a_client_idle_past_its_limit_is_told_which() {
        let t0 = Instant::now();
        let mut w = idle(Some(60 * S), IdleLimit::Transaction, true, t0);
        assert_eq!(w.on_timer(t0 + 59 * S), None);
        assert_eq!(
            w.on_timer(t0 + 60 * S),
            Some(NoCommand::Idle(IdleLimit::Transaction))
        );
        // Part of a command when the idle limit comes: stalled, not idle.
        let mut w = idle(Some(60 * S), IdleLimit::Client, false, t0);
        w.on_bytes(&[1], t0 + 50 * S);
        assert_eq!(w.on_timer(t0 + 60 * S), Some(NoCommand::Stalled));
    }

    #[test]
    fn a_drain_ends_an_idle_session_at_once_and_one_in_a_transaction_at_its_deadline() {
        let t0 = Instant::now();
        let mut w = idle(None, IdleLimit::Client, false, t0);
        assert_eq!(
            w.on_drain(Some(t0 + 10 * S)),
            Some(NoCommand::Draining {
                in_transaction: false
            })
        );
        let mut w = idle(None, IdleLimit::Client, true, t0);
        assert_eq!(w.on_drain(Some(t0 + 10 * S)), None);
        assert_eq!(w.poll_timeout(), Some(t0 + 10 * S));
        assert_eq!(w.on_timer(t0 + 9 * S), None);
        assert_eq!(
            w.on_timer(t0 + 10 * S),
            Some(NoCommand::Draining {
                in_transaction: true
            })
        );
        // A drain with no deadline closes it at once.
        let mut w = idle(None, IdleLimit::Client, true, t0);
        assert!(w.on_drain(None).is_some());
    }

    #[test]
    fn a_packet_over_the_limit_is_refused_from_its_header() {
        let t0 = Instant::now();
        let mut w = Idle::new((None, IdleLimit::Client), 30 * S, 1000, false, t0);
        assert_eq!(w.on_bytes(&[0xe9, 0x03, 0, 0], t0), Heard::TooLarge(1001));
        assert_eq!(w.on_killed(), NoCommand::Killed);
        assert_eq!(w.on_closed(), NoCommand::Left);
    }
}
