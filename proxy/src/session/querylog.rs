//! Enhanced query logging (RDS Proxy's "enhanced logging"): every client statement, its
//! user and its duration, switched on at runtime from the admin console, off again by
//! itself after [`MAX_ON`] at most. Statements are logged with their string literals
//! blanked out (`'?'`): passwords in `CREATE USER ... IDENTIFIED BY '...'` or in data never
//! reach the log.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The longest query logging stays on.
pub const MAX_ON: Duration = Duration::from_secs(24 * 3600);

/// The longest statement text logged (the rest is cut, and said to be).
pub const MAX_LOGGED: usize = 2048;

/// Whether statements are logged, and until when.
#[derive(Debug, Default)]
pub struct QueryLog {
    /// Seconds since the Unix epoch when it turns itself off; 0: off.
    until: AtomicU64,
}

impl QueryLog {
    /// On for `for_` (at most [`MAX_ON`]); returns when it turns itself off.
    pub fn enable(&self, for_: Duration, now_unix: u64) -> u64 {
        let until = now_unix + for_.min(MAX_ON).as_secs().max(1);
        self.until.store(until, Ordering::Release);
        until
    }

    pub fn disable(&self) {
        self.until.store(0, Ordering::Release);
    }

    /// When it turns itself off, if on.
    pub fn until(&self) -> Option<u64> {
        Some(self.until.load(Ordering::Acquire)).filter(|u| *u != 0)
    }

    /// Whether a statement finished at `now_unix` is logged (the first one past the end
    /// turns logging off and says so). Cheap when off: one atomic load.
    pub fn active(&self, now_unix: impl FnOnce() -> u64) -> bool {
        let until = self.until.load(Ordering::Relaxed);
        if until == 0 {
            return false;
        }
        if now_unix() < until {
            return true;
        }
        if self
            .until
            .compare_exchange(until, 0, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            tracing::warn!("enhanced query logging turned itself off (it stays on 24 h at most)");
        }
        false
    }
}

/// `sql` for the log: string literals blanked (`'?'`, `"?"`), control characters as
/// spaces, cut at [`MAX_LOGGED`] bytes.
pub fn redacted(sql: &[u8]) -> String {
    let mut out = String::with_capacity(sql.len().min(MAX_LOGGED) + 16);
    let mut quote: Option<u8> = None;
    let mut i = 0;
    while let Some(&b) = sql.get(i) {
        if out.len() >= MAX_LOGGED {
            out.push_str("... (cut)");
            return out;
        }
        match quote {
            Some(q) => {
                if b == b'\\' {
                    i += 1;
                } else if b == q {
                    // A doubled quote stays inside the literal.
                    if sql.get(i + 1) == Some(&q) {
                        i += 1;
                    } else {
                        quote = None;
                        out.push('?');
                        out.push(char::from(q));
                    }
                }
            }
            None => {
                if b == b'\'' || b == b'"' {
                    quote = Some(b);
                    out.push(char::from(b));
                } else if b.is_ascii_control() {
                    out.push(' ');
                } else if b.is_ascii() {
                    out.push(char::from(b));
                } else {
                    // Non-ASCII outside literals (identifiers): kept whole.
                    let end = (i + 1..sql.len().min(i + 4) + 1)
                        .find(|&e| std::str::from_utf8(sql.get(i..e).unwrap_or(&[])).is_ok())
                        .unwrap_or(i + 1);
                    out.push_str(&String::from_utf8_lossy(sql.get(i..end).unwrap_or(&[])));
                    i = end;
                    continue;
                }
            }
        }
        i += 1;
    }
    if let Some(q) = quote {
        // An unterminated literal: nothing of it is shown either.
        out.push('?');
        out.push(char::from(q));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_are_blanked() {
        assert_eq!(
            redacted(b"CREATE USER u IDENTIFIED BY 'hunter2'"),
            "CREATE USER u IDENTIFIED BY '?'"
        );
        assert_eq!(
            redacted(br#"SELECT * FROM t WHERE a = 'it''s' AND b = "x\"y" AND c = 5"#),
            r#"SELECT * FROM t WHERE a = '?' AND b = "?" AND c = 5"#
        );
        assert_eq!(redacted(b"SELECT 'open"), "SELECT '?'");
        assert_eq!(redacted(b"SELECT\n1\t2"), "SELECT 1 2");
        assert_eq!(redacted("SELECT é FROM t".as_bytes()), "SELECT é FROM t");
    }

    #[test]
    fn long_statements_are_cut() {
        let long = vec![b'x'; MAX_LOGGED * 2];
        let r = redacted(&long);
        assert!(r.ends_with("... (cut)") && r.len() < MAX_LOGGED + 20);
    }

    #[test]
    fn logging_turns_itself_off() {
        let q = QueryLog::default();
        assert!(!q.active(|| 0));
        let until = q.enable(Duration::from_secs(48 * 3600), 1000);
        assert_eq!(until, 1000 + 24 * 3600, "capped at 24 h");
        assert!(q.active(|| 2000));
        assert!(!q.active(|| until));
        assert_eq!(q.until(), None);
    }
}
