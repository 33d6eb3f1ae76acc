//! A client's causal position: what a reader must have applied before it may serve that
//! client's reads. The GTIDs of its writes (MariaDB reports `last_gtid` in session
//! tracking at every commit), one per replication domain, and the time of a write whose GTID
//! is not known (servers without GTIDs, such as Aurora, and `causal_reads = "lag"`).
//!
//! As text (`@@dbproxy_causal_position`, handed from one connection to another, or to a
//! client of another dbproxy): the GTIDs as MariaDB writes a GTID list, and the time of an
//! unconfirmed write as `@` and milliseconds since the Unix epoch, all comma-separated,
//! e.g. `0-1-57,1-3-9,@1765100000123`. Empty: nothing to wait for. Clients read and set it
//! with `SELECT @@dbproxy_causal_position` and `SET @@dbproxy_causal_position = '...'`,
//! which dbproxy answers itself ([`position_statement`]).

use crate::session::sql::{Kind, Tok, Tokens};
use std::fmt::Write as _;

/// One GTID: domain, server, sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gtid {
    pub domain: u32,
    pub server: u32,
    pub seq: u64,
}

impl Gtid {
    /// `domain-server-seq`.
    pub fn parse(s: &[u8]) -> Option<Gtid> {
        let s = std::str::from_utf8(s).ok()?.trim();
        let mut parts = s.splitn(3, '-');
        let domain = parts.next()?.parse().ok()?;
        let server = parts.next()?.parse().ok()?;
        let seq = parts.next()?.parse().ok()?;
        Some(Gtid {
            domain,
            server,
            seq,
        })
    }
}

/// Why a position could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PositionError {
    #[error("not a causal position: {0:?} (expected GTIDs such as 0-1-57 and @<milliseconds>, comma-separated)")]
    Malformed(String),
    #[error("a causal position names at most {MAX_DOMAINS} replication domains")]
    TooManyDomains,
}

/// At most this many replication domains are kept (more than any real topology has).
pub const MAX_DOMAINS: usize = 64;

/// A client's causal position.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Position {
    /// The newest GTID of each domain the client wrote to (or was handed), by domain.
    gtids: Vec<Gtid>,
    /// A write whose GTID is not known: milliseconds since the Unix epoch.
    unconfirmed_at_ms: Option<u64>,
}

impl Position {
    /// Nothing to wait for.
    pub fn is_empty(&self) -> bool {
        self.gtids.is_empty() && self.unconfirmed_at_ms.is_none()
    }

    pub fn gtids(&self) -> &[Gtid] {
        &self.gtids
    }

    /// Whether a server known to have applied `applied` has every GTID of this position
    /// (the same or a newer sequence number in each of its domains).
    pub fn covered_by(&self, applied: &[Gtid]) -> bool {
        self.gtids.iter().all(|g| {
            applied
                .iter()
                .any(|a| a.domain == g.domain && a.seq >= g.seq)
        })
    }

    /// When the newest write whose GTID is not known happened (ms since the epoch).
    pub fn unconfirmed_at_ms(&self) -> Option<u64> {
        self.unconfirmed_at_ms
    }

    /// A write committed with `gtid` (from `last_gtid`): it covers the writes before it.
    /// No allocation once the domain is known.
    pub fn committed(&mut self, gtid: Gtid) {
        self.unconfirmed_at_ms = None;
        self.merge_gtid(gtid);
    }

    /// A statement that may have written ran at `now_ms`, and no GTID for it is known (yet).
    pub fn wrote_at(&mut self, now_ms: u64) {
        self.unconfirmed_at_ms = Some(self.unconfirmed_at_ms.map_or(now_ms, |t| t.max(now_ms)));
    }

    fn merge_gtid(&mut self, gtid: Gtid) {
        let full = self.gtids.len() >= MAX_DOMAINS;
        match self.gtids.iter_mut().find(|g| g.domain == gtid.domain) {
            Some(g) if g.seq < gtid.seq => *g = gtid,
            Some(_) => {}
            None if !full => {
                self.gtids.push(gtid);
                self.gtids.sort_by_key(|g| g.domain);
            }
            None => {}
        }
    }

    /// Takes in a position handed over as text: the newer of the two in each part.
    pub fn merge_text(&mut self, text: &[u8]) -> Result<(), PositionError> {
        let other = Position::parse(text)?;
        for g in other.gtids {
            if self.gtids.len() >= MAX_DOMAINS && !self.gtids.iter().any(|h| h.domain == g.domain) {
                return Err(PositionError::TooManyDomains);
            }
            self.merge_gtid(g);
        }
        if let Some(t) = other.unconfirmed_at_ms {
            self.wrote_at(t);
        }
        Ok(())
    }

    /// Reads the text form (see the module's documentation).
    pub fn parse(text: &[u8]) -> Result<Position, PositionError> {
        let bad = || PositionError::Malformed(String::from_utf8_lossy(text).into_owned());
        let s = std::str::from_utf8(text).map_err(|_| bad())?.trim();
        let mut p = Position::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if let Some(ms) = part.strip_prefix('@') {
                p.wrote_at(ms.parse().map_err(|_| bad())?);
            } else {
                let g = Gtid::parse(part.as_bytes()).ok_or_else(bad)?;
                if p.gtids.len() >= MAX_DOMAINS && !p.gtids.iter().any(|h| h.domain == g.domain) {
                    return Err(PositionError::TooManyDomains);
                }
                p.merge_gtid(g);
            }
        }
        Ok(p)
    }

    /// The text form.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        self.write_gtids(&mut s);
        if let Some(t) = self.unconfirmed_at_ms {
            if !s.is_empty() {
                s.push(',');
            }
            let _ = write!(s, "@{t}");
        }
        s
    }

    /// The GTIDs as a GTID list (`0-1-57,1-3-9`).
    fn write_gtids(&self, s: &mut String) {
        for (i, g) in self.gtids.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            let _ = write!(s, "{}-{}-{}", g.domain, g.server, g.seq);
        }
    }

    /// The query that waits up to `timeout_ms` on a MariaDB replica for the GTIDs, and
    /// answers one row: 0 when they are applied, -1 on timeout (None: no GTIDs).
    pub fn wait_sql(&self, timeout_ms: u64) -> Option<Vec<u8>> {
        if self.gtids.is_empty() {
            return None;
        }
        let mut s = String::with_capacity(48);
        s.push_str("SELECT MASTER_GTID_WAIT('");
        self.write_gtids(&mut s);
        let _ = write!(s, "', {}.{:03})", timeout_ms / 1000, timeout_ms % 1000);
        Some(s.into_bytes())
    }
}

/// `SELECT @@dbproxy_causal_position` or `SET @@dbproxy_causal_position = '...'`.
#[derive(Debug, PartialEq, Eq)]
pub enum PositionStatement {
    Read,
    Set(Vec<u8>),
}

const POSITION_VAR: &[u8] = b"dbproxy_causal_position";

/// Recognises the statements that read and set the causal position (dbproxy answers them).
pub fn position_statement(sql: &[u8]) -> Option<PositionStatement> {
    let mut toks = Tokens::new(sql).filter(|t| t.kind != Kind::Punct(b';'));
    let text = |t: &Tok| sql.get(t.start..t.end).unwrap_or_default();
    let first = toks.next()?;
    let var = toks.next()?;
    let names_position = var.kind == Kind::SysVar && {
        let name = text(&var).get(2..).unwrap_or_default();
        let name = name
            .strip_prefix(b"session.")
            .or_else(|| name.strip_prefix(b"SESSION."))
            .unwrap_or(name);
        name.eq_ignore_ascii_case(POSITION_VAR)
    };
    if !names_position || first.kind != Kind::Word {
        return None;
    }
    if text(&first).eq_ignore_ascii_case(b"SELECT") {
        return toks.next().is_none().then_some(PositionStatement::Read);
    }
    if !text(&first).eq_ignore_ascii_case(b"SET") {
        return None;
    }
    let eq = toks.next()?;
    if !matches!(eq.kind, Kind::Punct(b'=') | Kind::Assign) {
        return None;
    }
    let value = toks.next()?;
    if value.kind != Kind::Str || toks.next().is_some() {
        return None;
    }
    let quoted = text(&value);
    Some(PositionStatement::Set(
        quoted.get(1..quoted.len().saturating_sub(1))?.to_vec(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_keep_the_newest_gtid_per_domain() {
        let mut p = Position::default();
        assert!(p.is_empty());
        p.wrote_at(1_000);
        assert_eq!(p.to_text(), "@1000");
        p.committed(Gtid::parse(b"0-1-5").unwrap());
        assert_eq!(p.to_text(), "0-1-5");
        p.committed(Gtid::parse(b"0-1-4").unwrap());
        p.committed(Gtid::parse(b"2-7-1").unwrap());
        p.committed(Gtid::parse(b"0-2-9").unwrap());
        assert_eq!(p.to_text(), "0-2-9,2-7-1");
        p.wrote_at(2_000);
        assert_eq!(p.to_text(), "0-2-9,2-7-1,@2000");
        assert_eq!(
            String::from_utf8(p.wait_sql(250).unwrap()).unwrap(),
            "SELECT MASTER_GTID_WAIT('0-2-9,2-7-1', 0.250)"
        );
    }

    #[test]
    fn text_round_trips_and_merges() {
        let p = Position::parse(b" 0-1-57, 1-3-9 ,@1765100000123").unwrap();
        assert_eq!(p.to_text(), "0-1-57,1-3-9,@1765100000123");
        let mut q = Position::parse(b"0-1-60").unwrap();
        q.merge_text(p.to_text().as_bytes()).unwrap();
        assert_eq!(q.to_text(), "0-1-60,1-3-9,@1765100000123");
        assert_eq!(Position::parse(b"").unwrap(), Position::default());
        for bad in [
            &b"x"[..],
            b"0-1",
            b"0-1-x",
            b"@",
            b"@-5",
            b"0-1-2-3",
            b"\xff",
            b"1'; DROP",
        ] {
            assert!(Position::parse(bad).is_err(), "{bad:?}");
        }
        let many: Vec<String> = (0..65).map(|d| format!("{d}-1-1")).collect();
        assert_eq!(
            Position::parse(many.join(",").as_bytes()),
            Err(PositionError::TooManyDomains)
        );
    }

    #[test]
    fn a_position_is_covered_by_what_a_server_applied_in_each_of_its_domains() {
        let p = Position::parse(b"0-1-5,2-1-9").unwrap();
        let g = |s: &[u8]| Gtid::parse(s).unwrap();
        assert!(p.covered_by(&[g(b"0-1-5"), g(b"2-3-10")]));
        assert!(!p.covered_by(&[g(b"0-1-5"), g(b"2-1-8")]));
        assert!(!p.covered_by(&[g(b"0-1-7")]), "domain 2 not applied");
        assert!(Position::default().covered_by(&[]));
    }

    #[test]
    fn position_statements_are_recognised() {
        assert_eq!(
            position_statement(b"SELECT @@dbproxy_causal_position"),
            Some(PositionStatement::Read)
        );
        assert_eq!(
            position_statement(b"select @@session.DBPROXY_CAUSAL_POSITION;"),
            Some(PositionStatement::Read)
        );
        assert_eq!(
            position_statement(b"SET @@dbproxy_causal_position = '0-1-5,@17'"),
            Some(PositionStatement::Set(b"0-1-5,@17".to_vec()))
        );
        for other in [
            &b"SELECT @@dbproxy_causal_position, 1"[..],
            b"SELECT @@server_id",
            b"SET @@dbproxy_causal_position = 5",
            b"SET @@dbproxy_causal_position = 'a', @x = 1",
            b"SET",
            b"",
        ] {
            assert_eq!(position_statement(other), None, "{other:?}");
        }
    }
}
