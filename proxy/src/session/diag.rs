//! Per-statement state a client reads about its own previous statements: ROW_COUNT(),
//! FOUND_ROWS(), the warning list (SHOW WARNINGS, SHOW ERRORS, GET DIAGNOSTICS) and its
//! counts (`@@warning_count`, `@@error_count`).
//!
//! MariaDB keeps these per connection; a multiplexed client moves between connections, and a
//! connection serves many clients. dbproxy keeps them per client instead, learnt from the wire
//! as each response goes by (MariaDB 10.11's rules, checked against the server):
//! - ROW_COUNT() is the affected rows of an OK, -1 after a result set or an error;
//! - FOUND_ROWS() is the number of rows a SELECT, SHOW or DESCRIBE sent (0 for
//!   `SELECT ... INTO`); other statements and failed ones leave it; SQL_CALC_FOUND_ROWS is
//!   read back;
//! - the warning list holds the conditions of the last statement that raised any, and is
//!   cleared by a statement that names a table and raises none; it is read back
//!   (`SHOW WARNINGS`) when the client gives its connection up.
//!
//! While the connection a client holds still has the client's own values, readers go to the
//! server unchanged; otherwise dbproxy answers them from what it kept ([`Diag::answer`]).

use super::sql::{self, Kind, SqlInfo, Tok, Tokens};
use super::uservars::UserVars;
use crate::mysql::resultset::{encode_text_row, parse_text_row, TextResult};

/// One condition of a warning list, as `SHOW WARNINGS` returned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub level: Vec<u8>,
    pub code: Vec<u8>,
    pub message: Vec<u8>,
    /// The row as the server sent it.
    pub raw: Vec<u8>,
}

impl Condition {
    fn is_error(&self) -> bool {
        self.level.eq_ignore_ascii_case(b"Error")
    }
}

/// Where the client's warning list is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum List {
    #[default]
    Empty,
    /// On the backend connection the client holds (its last statement raised conditions
    /// there); read back before the connection goes.
    OnBackend { count: u64 },
    /// Read back from the connection the client gave up.
    Captured {
        conditions: Vec<Condition>,
        count: u64,
    },
}

/// How the client's last statement ended, as the relay saw it.
pub use crate::mysql::response::End as Ending;

/// The per-statement state dbproxy keeps for a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diag {
    pub row_count: i64,
    pub found_rows: u64,
    pub list: List,
    /// The connection the client holds has the client's ROW_COUNT() (every statement sets
    /// it) and FOUND_ROWS() (only SELECT, SHOW and DESCRIBE set it).
    row_count_fresh: bool,
    found_rows_fresh: bool,
    /// The connection the client holds has the client's warning list.
    list_fresh: bool,
    /// `@@last_gtid`: the GTID of the client's last commit, as the server reported it.
    pub last_gtid: Vec<u8>,
    /// The connection the client holds has the client's `@@last_gtid`.
    last_gtid_fresh: bool,
}

impl Default for Diag {
    fn default() -> Self {
        // A new session: ROW_COUNT() 0 (MariaDB 10.11, also after COM_RESET_CONNECTION and
        // COM_CHANGE_USER), FOUND_ROWS() 0 (MariaDB shows whatever the thread it reuses
        // from its cache last counted: another client's, never copied).
        Diag {
            row_count: 0,
            found_rows: 0,
            list: List::Empty,
            row_count_fresh: false,
            found_rows_fresh: false,
            list_fresh: false,
            last_gtid: Vec::new(),
            last_gtid_fresh: false,
        }
    }
}

/// What to do with a statement that reads per-statement state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The connection has the client's own values: forward it unchanged.
    Forward,
    /// Forward this statement text instead (reader calls replaced by the client's values).
    Rewrite(Vec<u8>),
    /// Forward the statement unchanged, then replace the values of its single row.
    PatchRow(Vec<Vec<u8>>),
    /// Send `query` (its column definitions are the ones the client must see) and put
    /// these rows before its terminator.
    Splice {
        query: &'static str,
        rows: Vec<Vec<u8>>,
    },
    /// The answer needs the conditions, which are still on the connection: read them
    /// (`SHOW WARNINGS`, [`Diag::captured`]) and ask again.
    Capture,
}

impl Diag {
    /// The client's statement ran on the connection it holds and ended so.
    pub fn after_statement(&mut self, info: &SqlInfo, ending: Ending) {
        if info.readers.diagnostics && ending != Ending::Err {
            // GET DIAGNOSTICS reads the diagnostics area and leaves it, ROW_COUNT() included.
            return;
        }
        self.row_count = match ending {
            Ending::Ok { affected, .. } => i64::try_from(affected).unwrap_or(i64::MAX),
            Ending::Rows { .. } | Ending::Err => -1,
        };
        if info.found_rows == sql::FoundRows::Sent {
            match ending {
                Ending::Rows { rows, .. } => self.found_rows = rows,
                Ending::Ok { .. } => self.found_rows = 0,
                Ending::Err => {}
            }
        }
        let raised = match ending {
            Ending::Ok { warnings, .. } | Ending::Rows { warnings, .. } => u64::from(warnings),
            Ending::Err => 1,
        };
        if raised > 0 {
            self.list = List::OnBackend { count: raised };
            self.list_fresh = true;
        } else if info.uses_tables {
            self.list = List::Empty;
            self.list_fresh = true;
        }
        self.row_count_fresh = true;
        if info.found_rows != sql::FoundRows::Unchanged && ending != Ending::Err {
            self.found_rows_fresh = true;
        }
    }

    /// After COM_STMT_PREPARE on the client's connection: a failure or warnings become the
    /// warning list; a failure sets ROW_COUNT() to -1 there, a success leaves it, and
    /// FOUND_ROWS() stays either way (checked: MariaDB 10.11).
    /// `uses_tables`: the statement prepared names a table (preparing it opens the table,
    /// which clears the list like a statement would; checked: MariaDB 10.11).
    pub fn after_prepare(&mut self, failed: bool, warnings: u16, uses_tables: bool) {
        let raised = if failed { 1 } else { u64::from(warnings) };
        if raised > 0 {
            self.list = List::OnBackend { count: raised };
            self.list_fresh = true;
        } else if uses_tables {
            self.list = List::Empty;
            self.list_fresh = true;
        }
        if failed {
            self.row_count = -1;
            self.row_count_fresh = true;
        }
    }

    /// FOUND_ROWS() read back after the statement (SQL_CALC_FOUND_ROWS and the like).
    pub fn set_found_rows(&mut self, n: u64) {
        self.found_rows = n;
    }

    /// dbproxy ran a statement of its own on the connection (a read-back or a replay): the
    /// connection's ROW_COUNT() and FOUND_ROWS() are no longer the client's. (dbproxy's own
    /// statements raise nothing and name no table, so the warning list stays; the one
    /// read-back that reads information_schema runs after the list was captured.)
    pub fn backend_used(&mut self) {
        self.row_count_fresh = false;
        self.found_rows_fresh = false;
    }

    /// dbproxy ran a query that names a table (after capturing the list): the connection's
    /// warning list is empty, no longer the client's.
    pub fn list_cleared(&mut self) {
        self.list_fresh = false;
    }

    /// dbproxy answered a statement in a way whose ROW_COUNT()/FOUND_ROWS() differ from
    /// what the client's statement would have left.
    pub fn counts_stale(&mut self) {
        self.row_count_fresh = false;
        self.found_rows_fresh = false;
    }

    /// The server reported the GTID of the client's commit on the connection it holds.
    pub fn set_last_gtid(&mut self, v: &[u8]) {
        self.last_gtid = v.to_vec();
        self.last_gtid_fresh = true;
    }

    /// The client now holds another connection.
    pub fn moved(&mut self) {
        self.last_gtid_fresh = false;
        self.row_count_fresh = false;
        self.found_rows_fresh = false;
        self.list_fresh = false;
        if let List::OnBackend { .. } = self.list {
            // Not captured (the connection broke): nothing left to show.
            self.list = List::Empty;
        }
    }

    /// The client's statement failed with its connection and got error `code`: that is
    /// its warning list now.
    pub fn lost(&mut self, code: u16, message: &str) {
        self.moved();
        self.row_count = -1;
        let code = code.to_string().into_bytes();
        let raw = crate::mysql::resultset::encode_text_row([
            Some(&b"Error"[..]),
            Some(&code[..]),
            Some(message.as_bytes()),
        ]);
        self.list = List::Captured {
            conditions: vec![Condition {
                level: b"Error".to_vec(),
                code,
                message: message.as_bytes().to_vec(),
                raw,
            }],
            count: 1,
        };
    }

    /// The warning list lives on the connection the client is about to give up.
    pub fn needs_capture(&self) -> bool {
        matches!(self.list, List::OnBackend { .. })
    }

    /// The list as `SHOW WARNINGS` returned it (on the connection being given up, or on
    /// the one the client holds, for an answer that needs the conditions).
    pub fn captured(&mut self, result: &TextResult) {
        let count = match self.list {
            List::OnBackend { count } => count,
            _ => 0,
        };
        let mut conditions = Vec::with_capacity(result.rows.len());
        for raw in &result.rows {
            if let Ok(v) = parse_text_row(raw, 3) {
                conditions.push(Condition {
                    level: v[0].unwrap_or_default().to_vec(),
                    code: v[1].unwrap_or_default().to_vec(),
                    message: v[2].unwrap_or_default().to_vec(),
                    raw: raw.clone(),
                });
            }
        }
        let count = count.max(conditions.len() as u64);
        self.list = List::Captured { conditions, count };
    }

    /// `@@warning_count` as the client would read it.
    pub fn warning_count(&self) -> u64 {
        match &self.list {
            List::Empty => 0,
            List::OnBackend { count } | List::Captured { count, .. } => *count,
        }
    }

    /// `@@error_count` as the client would read it.
    pub fn error_count(&self) -> u64 {
        match &self.list {
            List::Empty => 0,
            List::OnBackend { .. } => 1,
            List::Captured { conditions, .. } => {
                conditions.iter().filter(|c| c.is_error()).count() as u64
            }
        }
    }

    fn conditions(&self) -> &[Condition] {
        match &self.list {
            List::Captured { conditions, .. } => conditions,
            _ => &[],
        }
    }

    /// Decides how to serve a COM_QUERY `sql` that reads per-statement state.
    /// `user_vars`: the client's, for a `GET DIAGNOSTICS CONDITION @n`.
    pub fn answer(&self, sql: &[u8], info: &SqlInfo, user_vars: &UserVars) -> Answer {
        let r = info.readers;
        // GET DIAGNOSTICS reads the conditions, and ROW_COUNT when it asks for that item.
        let diagnostics_row_count = r.diagnostics
            && Tokens::new(sql).any(|t| {
                t.kind == Kind::Word && sql[t.start..t.end].eq_ignore_ascii_case(b"ROW_COUNT")
            });
        let counts_ok = (!(r.row_count || diagnostics_row_count) || self.row_count_fresh)
            && (!r.found_rows || self.found_rows_fresh);
        let list_ok = !(r.counts || r.list || r.diagnostics) || self.list_fresh;
        let gtid_ok = !r.last_gtid || self.last_gtid_fresh;
        if counts_ok && list_ok && gtid_ok {
            return Answer::Forward;
        }
        let toks: Vec<Tok> = Tokens::new(sql)
            .filter(|t| t.kind != Kind::Punct(b';'))
            .collect();
        if let Some(cols) = pure_readers(sql, &toks) {
            return Answer::PatchRow(cols.iter().map(|c| self.value(*c)).collect());
        }
        if let Some(a) = self.show_list(sql, &toks) {
            return a;
        }
        if let Some(a) = self.show_count(sql, &toks) {
            return a;
        }
        if let Some(a) = self.get_diagnostics(sql, &toks, user_vars) {
            return a;
        }
        Answer::Rewrite(self.rewrite(sql))
    }

    fn value(&self, r: ReaderKind) -> Vec<u8> {
        match r {
            ReaderKind::RowCount => self.row_count.to_string(),
            ReaderKind::FoundRows => self.found_rows.to_string(),
            ReaderKind::WarningCount => self.warning_count().to_string(),
            ReaderKind::ErrorCount => self.error_count().to_string(),
            ReaderKind::LastGtid => return self.last_gtid.clone(),
        }
        .into_bytes()
    }

    /// `SHOW WARNINGS|ERRORS [LIMIT [offset,] count | LIMIT count OFFSET offset]`.
    fn show_list(&self, sql: &[u8], t: &[Tok]) -> Option<Answer> {
        let w = |i: usize, s: &str| word(sql, t.get(i), s);
        if !w(0, "SHOW") {
            return None;
        }
        let errors = if w(1, "WARNINGS") {
            false
        } else if w(1, "ERRORS") {
            true
        } else {
            return None;
        };
        let num = |i: usize| -> Option<usize> {
            let x = t.get(i).filter(|x| x.kind == Kind::Word)?;
            std::str::from_utf8(&sql[x.start..x.end]).ok()?.parse().ok()
        };
        let (offset, count) = match t.len() {
            2 => (0, usize::MAX),
            4 if w(2, "LIMIT") => (0, num(3)?),
            6 if w(2, "LIMIT") && t.get(4).is_some_and(|x| x.kind == Kind::Punct(b',')) => {
                (num(3)?, num(5)?)
            }
            6 if w(2, "LIMIT") && w(4, "OFFSET") => (num(5)?, num(3)?),
            _ => return None,
        };
        let rows = self
            .conditions()
            .iter()
            .filter(|c| !errors || c.is_error())
            .skip(offset)
            .take(count)
            .map(|c| c.raw.clone())
            .collect();
        Some(Answer::Splice {
            query: if errors {
                "SHOW ERRORS LIMIT 0"
            } else {
                "SHOW WARNINGS LIMIT 0"
            },
            rows,
        })
    }

    /// `SHOW COUNT(*) WARNINGS|ERRORS`: forwarded for its column definition (the server names
    /// it `@@session.warning_count`), its one value the client's.
    fn show_count(&self, sql: &[u8], t: &[Tok]) -> Option<Answer> {
        let w = |i: usize, s: &str| word(sql, t.get(i), s);
        if !(w(0, "SHOW") && w(1, "COUNT") && t.len() == 6) {
            return None;
        }
        let n = if w(5, "WARNINGS") {
            self.warning_count()
        } else if w(5, "ERRORS") {
            self.error_count()
        } else {
            return None;
        };
        Some(Answer::PatchRow(vec![n.to_string().into_bytes()]))
    }

    /// `GET [CURRENT] DIAGNOSTICS @v = NUMBER | ROW_COUNT, ...` and
    /// `GET [CURRENT] DIAGNOSTICS CONDITION n @v = MYSQL_ERRNO | MESSAGE_TEXT, ...`, as a `SET`
    /// of the values. Other condition items are NULL (dbproxy does not keep them).
    fn get_diagnostics(&self, sql: &[u8], t: &[Tok], user_vars: &UserVars) -> Option<Answer> {
        let w = |i: usize, s: &str| word(sql, t.get(i), s);
        if !w(0, "GET") {
            return None;
        }
        let mut i = if w(1, "DIAGNOSTICS") {
            2
        } else if w(1, "CURRENT") && w(2, "DIAGNOSTICS") {
            3
        } else {
            return None;
        };
        let mut condition = None;
        if w(i, "CONDITION") {
            if let List::OnBackend { .. } = self.list {
                return Some(Answer::Capture);
            }
            // The number runs up to the first `@target =`.
            let end = (i + 1..t.len()).find(|&k| {
                t[k].kind == Kind::UserVar
                    && t.get(k + 1).is_some_and(|x| x.kind == Kind::Punct(b'='))
            })?;
            let (first, last) = (t.get(i + 1)?, t.get(end.checked_sub(1)?)?);
            if end == i + 1 {
                return None;
            }
            let number = &t[i + 1..end];
            let text = &sql[first.start..last.end];
            // MariaDB takes a literal (integer, decimal, string) or a user variable here; a
            // bare name is evaluated as a column (an error); anything else is a syntax error.
            // Errors go to the server as written: they read nothing.
            let as_number =
                |s: &[u8]| -> Option<f64> { std::str::from_utf8(s).ok()?.trim().parse().ok() };
            let n: Option<f64> = match number {
                [x] if x.kind == Kind::Str => as_number(&text[1..text.len().saturating_sub(1)]),
                [x] if x.kind == Kind::UserVar => {
                    // The client's own variable (NULL, or never set: no condition).
                    let name = sql::user_var_name(sql, *x);
                    user_vars
                        .get(&name)
                        .and_then(|v| v.value.as_deref())
                        .map(|v| as_number(v).unwrap_or(0.0))
                }
                [x] if x.kind == Kind::Word && text.eq_ignore_ascii_case(b"NULL") => None,
                [x] if x.kind == Kind::Word && text[0].is_ascii_digit() => {
                    std::str::from_utf8(text).ok()?.parse().ok()
                }
                [a, dot, b]
                    if a.kind == Kind::Word
                        && dot.kind == Kind::Punct(b'.')
                        && b.kind == Kind::Word =>
                {
                    std::str::from_utf8(text).ok()?.parse().ok()
                }
                _ => return None,
            };
            let n = n
                .map(|n| n.round())
                .filter(|n| *n >= 1.0 && *n <= u32::MAX as f64);
            condition = Some(n.and_then(|n| self.conditions().get(n as usize - 1)));
            i = end;
        }
        // A condition the client does not have: the server would assign nothing (and append
        // an "Invalid condition number" condition, which dbproxy does not reproduce).
        let no_condition = condition == Some(None);
        let mut sets = Vec::new();
        while i < t.len() {
            // Outside stored programs only user variables can be assigned; anything else goes
            // to the server as written, for its own error.
            let target = t.get(i).filter(|x| x.kind == Kind::UserVar)?;
            if !matches!(t.get(i + 1)?.kind, Kind::Punct(b'=')) {
                return None;
            }
            let item = t.get(i + 2)?;
            let item = &sql[item.start..item.end];
            let known = |names: &[&str]| {
                names
                    .iter()
                    .any(|n| item.eq_ignore_ascii_case(n.as_bytes()))
            };
            // Unknown item names are the server's syntax error: sent as written.
            if condition.is_some() && !known(&CONDITION_ITEMS)
                || condition.is_none() && !known(&["NUMBER", "ROW_COUNT"])
            {
                return None;
            }
            let value = match condition {
                None if item.eq_ignore_ascii_case(b"NUMBER") => self.warning_count().to_string(),
                None if item.eq_ignore_ascii_case(b"ROW_COUNT") => self.row_count.to_string(),
                None => return None,
                Some(Some(c)) if item.eq_ignore_ascii_case(b"MYSQL_ERRNO") => {
                    String::from_utf8_lossy(&c.code).into_owned()
                }
                Some(Some(c)) if item.eq_ignore_ascii_case(b"MESSAGE_TEXT") => {
                    format!("X'{}'", hex::encode(&c.message))
                }
                Some(_) => "NULL".into(),
            };
            sets.push(format!(
                "{} = {value}",
                String::from_utf8_lossy(&sql[target.start..target.end])
            ));
            i += 3;
            if i < t.len() {
                if t[i].kind != Kind::Punct(b',') {
                    return None;
                }
                i += 1;
            }
        }
        if no_condition {
            return Some(Answer::Rewrite(b"DO 0".to_vec()));
        }
        (!sets.is_empty()).then(|| Answer::Rewrite(format!("SET {}", sets.join(", ")).into_bytes()))
    }

    /// The statement with every reader replaced by the client's value; a select item that
    /// contained one and had no alias gets its original text as alias, so that the column
    /// keeps the name the server would have given it.
    fn rewrite(&self, sql: &[u8]) -> Vec<u8> {
        let toks: Vec<Tok> = Tokens::new(sql).collect();
        let mut replace: Vec<(usize, usize, Vec<u8>)> = Vec::new();
        let mut i = 0;
        while i < toks.len() {
            if let Some((kind, len)) = reader_at(sql, &toks, i) {
                let v = self.value(kind);
                let mut lit = Vec::with_capacity(v.len() + 4);
                lit.push(b'(');
                if kind == ReaderKind::LastGtid {
                    // A GTID list is digits, '-' and ',' only: quoted as it is.
                    lit.push(b'\'');
                    lit.extend(
                        v.iter()
                            .filter(|b| b.is_ascii_digit() || matches!(b, b'-' | b',')),
                    );
                    lit.push(b'\'');
                } else {
                    lit.extend_from_slice(&v);
                }
                lit.push(b')');
                replace.push((toks[i].start, toks[i + len - 1].end, lit));
                i += len;
            } else {
                i += 1;
            }
        }
        let aliases = unaliased_items_with_readers(sql, &toks);
        let mut out = Vec::with_capacity(sql.len() + 32);
        let mut at = 0;
        let mut edits: Vec<(usize, usize, Vec<u8>)> = replace;
        for (start, end) in aliases {
            let mut alias = b" AS `".to_vec();
            alias.extend(sql[start..end].iter().flat_map(|&b| {
                if b == b'`' {
                    vec![b'`', b'`']
                } else {
                    vec![b]
                }
            }));
            alias.push(b'`');
            edits.push((end, end, alias));
        }
        edits.sort_by_key(|e| (e.0, e.1));
        for (start, end, text) in edits {
            if start < at {
                continue;
            }
            out.extend_from_slice(&sql[at..start]);
            out.extend_from_slice(&text);
            at = end;
        }
        out.extend_from_slice(&sql[at..]);
        out
    }
}

/// Condition information items of `GET DIAGNOSTICS CONDITION n` (MariaDB 10.11).
const CONDITION_ITEMS: [&str; 14] = [
    "CLASS_ORIGIN",
    "SUBCLASS_ORIGIN",
    "CONSTRAINT_CATALOG",
    "CONSTRAINT_SCHEMA",
    "CONSTRAINT_NAME",
    "CATALOG_NAME",
    "SCHEMA_NAME",
    "TABLE_NAME",
    "COLUMN_NAME",
    "CURSOR_NAME",
    "MESSAGE_TEXT",
    "MYSQL_ERRNO",
    "RETURNED_SQLSTATE",
    "ROW_NUMBER",
];

/// The values of a row for [`Answer::PatchRow`].
pub fn patched_row(values: &[Vec<u8>]) -> Vec<u8> {
    encode_text_row(values.iter().map(|v| Some(v.as_slice())))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReaderKind {
    RowCount,
    FoundRows,
    WarningCount,
    ErrorCount,
    LastGtid,
}

fn word(sql: &[u8], t: Option<&Tok>, w: &str) -> bool {
    t.is_some_and(|t| {
        t.kind == Kind::Word && sql[t.start..t.end].eq_ignore_ascii_case(w.as_bytes())
    })
}

/// A reader starting at token `i`: its kind and how many tokens it spans.
fn reader_at(sql: &[u8], t: &[Tok], i: usize) -> Option<(ReaderKind, usize)> {
    let x = t.get(i)?;
    match x.kind {
        Kind::Word => {
            let call =
                t.get(i + 1)?.kind == Kind::Punct(b'(') && t.get(i + 2)?.kind == Kind::Punct(b')');
            if !call {
                return None;
            }
            let w = &sql[x.start..x.end];
            if w.eq_ignore_ascii_case(b"ROW_COUNT") {
                Some((ReaderKind::RowCount, 3))
            } else if w.eq_ignore_ascii_case(b"FOUND_ROWS") {
                Some((ReaderKind::FoundRows, 3))
            } else {
                None
            }
        }
        Kind::SysVar => {
            let n = sql::sys_var_name(sql, *x);
            if n.eq_ignore_ascii_case(b"warning_count") {
                Some((ReaderKind::WarningCount, 1))
            } else if n.eq_ignore_ascii_case(b"error_count") {
                Some((ReaderKind::ErrorCount, 1))
            } else if n.eq_ignore_ascii_case(b"last_gtid") {
                Some((ReaderKind::LastGtid, 1))
            } else {
                None
            }
        }
        _ => None,
    }
}

/// `SELECT reader [[AS] alias], ... [FROM DUAL]`: the reader of each column.
fn pure_readers(sql: &[u8], t: &[Tok]) -> Option<Vec<ReaderKind>> {
    if !word(sql, t.first(), "SELECT") {
        return None;
    }
    let mut end = t.len();
    if end >= 3 && word(sql, t.get(end - 2), "FROM") && word(sql, t.get(end - 1), "DUAL") {
        end -= 2;
    }
    let mut out = Vec::new();
    let mut i = 1;
    loop {
        let (kind, len) = reader_at(sql, t, i)?;
        out.push(kind);
        i += len;
        if word(sql, t.get(i), "AS") {
            i += 1;
        }
        if i < end && matches!(t[i].kind, Kind::Word | Kind::Ident | Kind::Str) {
            i += 1;
        }
        if i == end {
            return Some(out);
        }
        if t.get(i)?.kind != Kind::Punct(b',') {
            return None;
        }
        i += 1;
    }
}

/// Spans of the top-level select items (of any SELECT at nesting depth 0) that contain a
/// reader and have no alias.
fn unaliased_items_with_readers(sql: &[u8], t: &[Tok]) -> Vec<(usize, usize)> {
    const ENDS: [&str; 12] = [
        "FROM",
        "INTO",
        "WHERE",
        "GROUP",
        "HAVING",
        "ORDER",
        "LIMIT",
        "UNION",
        "WINDOW",
        "FOR",
        "LOCK",
        "PROCEDURE",
    ];
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut in_list = false;
    let mut item_start: Option<usize> = None;
    let mut has_reader = false;
    let close = |from: usize, to: usize, has_reader: bool, out: &mut Vec<(usize, usize)>| {
        if !has_reader || to <= from {
            return;
        }
        let items = &t[from..to];
        let aliased = match items {
            [.., a, _] if word(sql, Some(a), "AS") => true,
            [.., prev, last] => {
                matches!(last.kind, Kind::Word | Kind::Ident | Kind::Str)
                    && matches!(
                        prev.kind,
                        Kind::Punct(b')') | Kind::SysVar | Kind::Word | Kind::Ident | Kind::Str
                    )
            }
            _ => false,
        };
        if !aliased {
            out.push((items[0].start, items[items.len() - 1].end));
        }
    };
    let mut i = 0;
    while i < t.len() {
        let x = t[i];
        match x.kind {
            Kind::Punct(b'(') => depth += 1,
            Kind::Punct(b')') => depth -= 1,
            _ => {}
        }
        if depth == 0 && word(sql, Some(&x), "SELECT") {
            in_list = true;
            item_start = Some(i + 1);
            has_reader = false;
            i += 1;
            continue;
        }
        if in_list && depth == 0 {
            let ends_list =
                x.kind == Kind::Punct(b';') || ENDS.iter().any(|e| word(sql, Some(&x), e));
            if x.kind == Kind::Punct(b',') || ends_list {
                if let Some(s) = item_start {
                    close(s, i, has_reader, &mut out);
                }
                item_start = Some(i + 1);
                has_reader = false;
                if ends_list {
                    in_list = false;
                    item_start = None;
                }
                i += 1;
                continue;
            }
        }
        if in_list && reader_at(sql, t, i).is_some() {
            has_reader = true;
        }
        i += 1;
    }
    if in_list {
        if let Some(s) = item_start {
            close(s, t.len(), has_reader, &mut out);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mysql::resultset::ColumnDef;
    use crate::session::sql::analyze;

    fn after(d: &mut Diag, sql: &str, e: Ending) {
        d.after_statement(&analyze(sql.as_bytes()), e);
    }

    fn ok(affected: u64, warnings: u16) -> Ending {
        Ending::Ok { affected, warnings }
    }

    fn rows(rows: u64, warnings: u16) -> Ending {
        Ending::Rows { rows, warnings }
    }

    fn warnings_result(rows: &[(&str, &str, &str)]) -> TextResult {
        let def = |n: &str| ColumnDef {
            schema: vec![],
            table: vec![],
            org_table: vec![],
            name: n.as_bytes().to_vec(),
            org_name: vec![],
            charset: 45,
            length: 28,
            column_type: 253,
            flags: 1,
            decimals: 39,
        };
        let cols = vec![def("Level"), def("Code"), def("Message")];
        TextResult {
            raw_columns: cols.iter().map(ColumnDef::encode).collect(),
            columns: cols,
            rows: rows
                .iter()
                .map(|(l, c, m)| {
                    encode_text_row([Some(l.as_bytes()), Some(c.as_bytes()), Some(m.as_bytes())])
                })
                .collect(),
            terminator: vec![0xfe, 0, 0, 2, 0],
        }
    }

    #[test]
    fn follows_mariadb_rules() {
        let mut d = Diag::default();
        after(&mut d, "INSERT INTO t VALUES (1),(2)", ok(2, 0));
        assert_eq!(d.row_count, 2);
        after(&mut d, "SELECT * FROM t LIMIT 2", rows(2, 0));
        assert_eq!((d.row_count, d.found_rows), (-1, 2));
        after(&mut d, "SET @a = 1", ok(0, 0));
        assert_eq!((d.row_count, d.found_rows), (0, 2));
        after(&mut d, "SELECT 1 INTO @k", ok(1, 0));
        assert_eq!((d.row_count, d.found_rows), (1, 0));
        after(&mut d, "SELECT bad", Ending::Err);
        assert_eq!((d.row_count, d.found_rows), (-1, 0));
        assert_eq!(d.list, List::OnBackend { count: 1 });
        assert!(d.needs_capture());
        d.captured(&warnings_result(&[(
            "Error",
            "1054",
            "Unknown column 'bad'",
        )]));
        assert_eq!((d.warning_count(), d.error_count()), (1, 1));
        // A table-less statement without conditions keeps the list; one naming a table
        // clears it.
        after(&mut d, "SELECT 1", rows(1, 0));
        assert_eq!(d.warning_count(), 1);
        after(&mut d, "SELECT * FROM t", rows(3, 0));
        assert_eq!(d.list, List::Empty);
        after(&mut d, "SELECT CAST('x' AS INT)", rows(1, 1));
        assert_eq!(d.list, List::OnBackend { count: 1 });
        d.moved();
        assert_eq!(
            d.list,
            List::Empty,
            "an uncaptured list does not survive a move"
        );
    }

    #[test]
    fn fresh_connections_forward_readers() {
        let mut d = Diag::default();
        after(&mut d, "SELECT CAST('x' AS INT)", rows(1, 1));
        let q = b"SHOW WARNINGS";
        assert_eq!(d.answer(q, &analyze(q), &UserVars::new()), Answer::Forward);
        let q = b"SELECT ROW_COUNT()";
        assert_eq!(d.answer(q, &analyze(q), &UserVars::new()), Answer::Forward);
        // A read-back SELECT changes FOUND_ROWS() on the connection; a SET of the client's
        // afterwards sets ROW_COUNT() again but leaves FOUND_ROWS() as the read-back did.
        d.backend_used();
        d.after_statement(
            &analyze(b"SET @a = 1"),
            Ending::Ok {
                affected: 0,
                warnings: 0,
            },
        );
        assert_eq!(d.answer(q, &analyze(q), &UserVars::new()), Answer::Forward);
        let f = b"SELECT FOUND_ROWS()";
        assert_eq!(
            d.answer(f, &analyze(f), &UserVars::new()),
            Answer::PatchRow(vec![b"1".to_vec()])
        );
        d.backend_used();
        assert_eq!(
            d.answer(q, &analyze(q), &UserVars::new()),
            Answer::PatchRow(vec![b"0".to_vec()]),
            "the SET's ROW_COUNT()"
        );
        let q = b"SHOW WARNINGS";
        assert_eq!(
            d.answer(q, &analyze(q), &UserVars::new()),
            Answer::Forward,
            "the list is still there"
        );
    }

    /// COM_STMT_PREPARE: a success leaves ROW_COUNT() and FOUND_ROWS() as they were on the
    /// connection; a failure sets ROW_COUNT() to -1 there, also when it was not the
    /// client's before.
    #[test]
    fn a_prepare_sets_row_count_only_when_it_fails() {
        let mut d = Diag::default();
        after(&mut d, "INSERT INTO t VALUES (1),(2)", ok(2, 0));
        d.after_prepare(false, 0, true);
        let q = b"SELECT ROW_COUNT()";
        assert_eq!(d.row_count, 2);
        assert_eq!(d.answer(q, &analyze(q), &UserVars::new()), Answer::Forward);
        d.backend_used();
        d.after_prepare(true, 0, true);
        assert_eq!(d.row_count, -1);
        assert_eq!(d.answer(q, &analyze(q), &UserVars::new()), Answer::Forward);
    }

    /// With the binary log on, MariaDB reports `last_gtid` after every commit: the
    /// client's own is kept and shown wherever it is served, and nothing pins.
    #[test]
    fn last_gtid_is_the_clients_own() {
        let mut d = Diag::default();
        let vars = UserVars::new();
        let a = |d: &Diag, q: &str| d.answer(q.as_bytes(), &analyze(q.as_bytes()), &vars);
        d.set_last_gtid(b"0-1-42");
        assert_eq!(a(&d, "SELECT @@last_gtid"), Answer::Forward);
        d.moved();
        assert_eq!(
            a(&d, "SELECT @@session.last_gtid AS g"),
            Answer::PatchRow(vec![b"0-1-42".to_vec()])
        );
        assert_eq!(
            a(&d, "SELECT MASTER_GTID_WAIT(@@last_gtid, 1) FROM t"),
            Answer::Rewrite(b"SELECT MASTER_GTID_WAIT(('0-1-42'), 1) AS `MASTER_GTID_WAIT(@@last_gtid, 1)` FROM t".to_vec())
        );
    }

    #[test]
    fn answers_after_a_move() {
        let mut d = Diag::default();
        after(
            &mut d,
            "SELECT CAST('x' AS INT), CAST('y' AS INT)",
            rows(1, 2),
        );
        d.captured(&warnings_result(&[
            ("Warning", "1292", "Truncated 'x'"),
            ("Error", "1", "e"),
        ]));
        d.moved();
        let mut vars = UserVars::new();
        vars.insert(
            b"two".to_vec(),
            crate::session::uservars::UserValue::int("2"),
        );
        vars.insert(
            b"none".to_vec(),
            crate::session::uservars::UserValue::unset(),
        );
        let a = |q: &str| d.answer(q.as_bytes(), &analyze(q.as_bytes()), &vars);
        assert_eq!(
            a("select @@warning_count, @@ERROR_COUNT AS e, ROW_COUNT() rc, FOUND_ROWS() FROM DUAL"),
            Answer::PatchRow(vec![b"2".to_vec(), b"1".to_vec(), b"-1".to_vec(), b"1".to_vec()])
        );
        match a("SHOW WARNINGS LIMIT 1, 5") {
            Answer::Splice { query, rows } => {
                assert_eq!(query, "SHOW WARNINGS LIMIT 0");
                assert_eq!(rows.len(), 1);
            }
            other => panic!("{other:?}"),
        }
        match a("show errors") {
            Answer::Splice { query, rows } => {
                assert_eq!(query, "SHOW ERRORS LIMIT 0");
                assert_eq!(rows.len(), 1);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            a("SHOW COUNT(*) WARNINGS"),
            Answer::PatchRow(vec![b"2".to_vec()])
        );
        assert_eq!(
            a("GET DIAGNOSTICS @n = NUMBER, @r = ROW_COUNT"),
            Answer::Rewrite(b"SET @n = 2, @r = -1".to_vec())
        );
        assert_eq!(
            a("GET DIAGNOSTICS CONDITION 1 @c = MYSQL_ERRNO, @m = MESSAGE_TEXT, @s = RETURNED_SQLSTATE"),
            Answer::Rewrite(b"SET @c = 1292, @m = X'5472756e636174656420277827', @s = NULL".to_vec())
        );
        assert_eq!(
            a("GET DIAGNOSTICS CONDITION 1 @x = INVALID"),
            Answer::Rewrite(b"GET DIAGNOSTICS CONDITION 1 @x = INVALID".to_vec()),
            "an unknown item: the server's syntax error"
        );
        assert_eq!(
            a("GET DIAGNOSTICS CONDITION 9 @x = MYSQL_ERRNO"),
            Answer::Rewrite(b"DO 0".to_vec())
        );
        // The condition number in the client's own user variable.
        assert_eq!(
            a("GET DIAGNOSTICS CONDITION @two @x = MYSQL_ERRNO"),
            Answer::Rewrite(b"SET @x = 1".to_vec())
        );
        for unset in ["@none", "@never_set", "'7'"] {
            assert_eq!(
                a(&format!(
                    "GET DIAGNOSTICS CONDITION {unset} @x = MYSQL_ERRNO"
                )),
                Answer::Rewrite(b"DO 0".to_vec()),
                "{unset}"
            );
        }
        assert_eq!(
            a("GET DIAGNOSTICS @@v = NUMBER"),
            Answer::Rewrite(b"GET DIAGNOSTICS @@v = NUMBER".to_vec()),
            "not a user variable: the server's syntax error"
        );
        assert_eq!(
            a("SELECT ROW_COUNT() + 1, FOUND_ROWS() AS f, @@warning_count w FROM t"),
            Answer::Rewrite(
                b"SELECT (-1) + 1 AS `ROW_COUNT() + 1`, (1) AS f, (2) w FROM t".to_vec()
            )
        );
        assert_eq!(
            a("INSERT INTO log VALUES (ROW_COUNT())"),
            Answer::Rewrite(b"INSERT INTO log VALUES ((-1))".to_vec())
        );
    }
}
