//! A client's statement watched while dbproxy waits on the database for it:
//! `query_timeout` (a database silent that long gets the statement killed; the server's
//! error then reaches the client as any other), then `internal_query_timeout` for the kill
//! to take effect (else the connection is given up). Time in, verdicts out.

use std::time::{Duration, Instant};

/// What to do about the statement now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Go on waiting.
    Wait,
    /// Kill the statement (KILL QUERY, from another connection), and go on waiting for its
    /// answer.
    Kill,
    /// Give the connection up: why.
    GiveUp(String),
}

/// One statement's watch.
#[derive(Debug)]
pub struct StatementWatch {
    /// `query_timeout`.
    limit: Duration,
    /// `internal_query_timeout`: how long the kill may take.
    own: Duration,
    /// When the database last sent something.
    heard: Instant,
    /// When the statement was killed.
    killed: Option<Instant>,
}

impl StatementWatch {
    /// Starts watching at `now`.
    pub fn new(limit: Duration, own: Duration, now: Instant) -> StatementWatch {
        StatementWatch {
            limit,
            own,
            heard: now,
            killed: None,
        }
    }

    /// The database sent part of the answer at `now`: the silence starts again.
    pub fn heard(&mut self, now: Instant) {
        self.heard = now;
    }

    /// The verdict at `now`.
    pub fn check(&mut self, now: Instant) -> Verdict {
        let limit = self.limit;
        match self.killed {
            Some(at) if now.saturating_duration_since(at) >= self.own => Verdict::GiveUp(format!(
                "no answer within query_timeout ({limit:?}), nor to KILL QUERY after it"
            )),
            Some(_) => Verdict::Wait,
            None if now.saturating_duration_since(self.heard) >= limit => {
                self.killed = Some(now);
                Verdict::Kill
            }
            None => Verdict::Wait,
        }
    }

    /// When the verdict may change next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.killed {
            Some(at) => at.checked_add(self.own),
            None => self.heard.checked_add(self.limit),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_silent_database_gets_the_statement_killed_then_the_connection_given_up() {
        let t0 = Instant::now();
        let mut w = StatementWatch::new(5 * S, 10 * S, t0);
        assert_eq!(w.poll_timeout(), Some(t0 + 5 * S));
        assert_eq!(w.check(t0 + 4 * S), Verdict::Wait);
        // Part of the answer came: the silence counts from there.
        w.heard(t0 + 4 * S);
        assert_eq!(w.check(t0 + 8 * S), Verdict::Wait);
        assert_eq!(w.check(t0 + 9 * S), Verdict::Kill);
        assert_eq!(w.poll_timeout(), Some(t0 + 19 * S));
        // Killed once; the kill has internal_query_timeout to take effect.
        assert_eq!(w.check(t0 + 12 * S), Verdict::Wait);
        w.heard(t0 + 12 * S);
        assert_eq!(w.check(t0 + 18 * S), Verdict::Wait);
        assert!(matches!(w.check(t0 + 19 * S), Verdict::GiveUp(why) if why.contains("KILL QUERY")));
    }
}
