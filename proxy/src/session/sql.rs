//! What a statement's text tells dbproxy: the pins it starts and ends, the user variables it
//! may assign, whether it reads per-statement state (ROW_COUNT(), FOUND_ROWS(), warnings,
//! LAST_INSERT_ID()), whether it names tables (which clears the warning list), and the
//! session-state quirks MariaDB does not report through session tracking.
//!
//! The tokenizer skips comments and literals and reads MariaDB's and MySQL's executable
//! comments (`/*!NNNNN ... */`, `/*M!NNNNNN ... */`) as code. Nothing here allocates per
//! token; only the findings that need it (variable names) own their bytes.

use super::pin_reason::PinReason;

/// A token's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Keyword, identifier or number.
    Word,
    /// A quoted string (`'...'` or `"..."`).
    Str,
    /// A back-quoted identifier.
    Ident,
    /// `@name`, `@'name'`, `` @`name` ``.
    UserVar,
    /// `@@name`, `@@session.name`, ...
    SysVar,
    /// `:=`
    Assign,
    /// Any other single byte.
    Punct(u8),
}

/// A token: its kind and where it lies in the statement text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tok {
    pub kind: Kind,
    pub start: usize,
    pub end: usize,
}

fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

/// Tokens of `sql`, comments skipped.
pub struct Tokens<'a> {
    sql: &'a [u8],
    i: usize,
    /// Inside an executable comment: its `*/` is not a token.
    in_exec_comment: bool,
}

impl<'a> Tokens<'a> {
    pub fn new(sql: &'a [u8]) -> Self {
        Tokens {
            sql,
            i: 0,
            in_exec_comment: false,
        }
    }

    fn at(&self, k: usize) -> Option<u8> {
        self.sql.get(self.i + k).copied()
    }

    /// Skips a quoted run starting at the quote; returns the index after the closing quote.
    fn skip_quoted(&self, from: usize, q: u8) -> usize {
        let s = self.sql;
        let mut i = from + 1;
        while i < s.len() {
            if s[i] == b'\\' && q != b'`' {
                i += 2;
                continue;
            }
            if s[i] == q {
                if s.get(i + 1) == Some(&q) {
                    i += 2;
                    continue;
                }
                return i + 1;
            }
            i += 1;
        }
        s.len()
    }
}

impl Iterator for Tokens<'_> {
    type Item = Tok;

    fn next(&mut self) -> Option<Tok> {
        let s = self.sql;
        loop {
            let c = *s.get(self.i)?;
            match c {
                b' ' | b'\t' | b'\r' | b'\n' | 0x0b | 0x0c => self.i += 1,
                b'#' => {
                    while self.i < s.len() && s[self.i] != b'\n' {
                        self.i += 1;
                    }
                }
                b'-' if self.at(1) == Some(b'-')
                    && self.at(2).is_none_or(|b| b.is_ascii_whitespace()) =>
                {
                    while self.i < s.len() && s[self.i] != b'\n' {
                        self.i += 1;
                    }
                }
                b'/' if self.at(1) == Some(b'*') => {
                    // `/*!` and `/*M!`: executable comments; their body is code.
                    let exec = if self.at(2) == Some(b'!') {
                        Some(3)
                    } else if matches!(self.at(2), Some(b'M' | b'm')) && self.at(3) == Some(b'!') {
                        Some(4)
                    } else {
                        None
                    };
                    match exec {
                        Some(skip) => {
                            self.i += skip;
                            while self.i < s.len() && s[self.i].is_ascii_digit() {
                                self.i += 1;
                            }
                            self.in_exec_comment = true;
                        }
                        None => {
                            self.i += 2;
                            while self.i + 1 < s.len()
                                && !(s[self.i] == b'*' && s[self.i + 1] == b'/')
                            {
                                self.i += 1;
                            }
                            self.i = (self.i + 2).min(s.len());
                        }
                    }
                }
                b'*' if self.in_exec_comment && self.at(1) == Some(b'/') => {
                    self.in_exec_comment = false;
                    self.i += 2;
                }
                b'\'' | b'"' | b'`' => {
                    let start = self.i;
                    self.i = self.skip_quoted(start, c);
                    let kind = if c == b'`' { Kind::Ident } else { Kind::Str };
                    return Some(Tok {
                        kind,
                        start,
                        end: self.i,
                    });
                }
                b'@' => {
                    let start = self.i;
                    if self.at(1) == Some(b'@') {
                        // @@[scope.]name
                        self.i += 2;
                        while self.i < s.len() && (is_word_byte(s[self.i]) || s[self.i] == b'.') {
                            self.i += 1;
                        }
                        return Some(Tok {
                            kind: Kind::SysVar,
                            start,
                            end: self.i,
                        });
                    }
                    match self.at(1) {
                        Some(q @ (b'\'' | b'"' | b'`')) => {
                            self.i = self.skip_quoted(start + 1, q);
                        }
                        _ => {
                            self.i += 1;
                            while self.i < s.len() && (is_word_byte(s[self.i]) || s[self.i] == b'.')
                            {
                                self.i += 1;
                            }
                        }
                    }
                    return Some(Tok {
                        kind: if self.i > start + 1 {
                            Kind::UserVar
                        } else {
                            Kind::Punct(b'@')
                        },
                        start,
                        end: self.i,
                    });
                }
                b':' if self.at(1) == Some(b'=') => {
                    self.i += 2;
                    return Some(Tok {
                        kind: Kind::Assign,
                        start: self.i - 2,
                        end: self.i,
                    });
                }
                c if is_word_byte(c) => {
                    let start = self.i;
                    while self.i < s.len() && is_word_byte(s[self.i]) {
                        self.i += 1;
                    }
                    return Some(Tok {
                        kind: Kind::Word,
                        start,
                        end: self.i,
                    });
                }
                _ => {
                    self.i += 1;
                    return Some(Tok {
                        kind: Kind::Punct(c),
                        start: self.i - 1,
                        end: self.i,
                    });
                }
            }
        }
    }
}

/// The name of a user variable token (`@Name`, `@'na''me'`): without `@` and quotes,
/// lowercased (MariaDB compares user variable names case-insensitively).
pub fn user_var_name(sql: &[u8], t: Tok) -> Vec<u8> {
    let raw = &sql[t.start + 1..t.end];
    let name = match raw.first() {
        Some(&q @ (b'\'' | b'"' | b'`')) if raw.len() >= 2 => unquote(&raw[1..raw.len() - 1], q),
        _ => raw.to_vec(),
    };
    name.to_ascii_lowercase()
}

/// The name of a system variable token (`@@SESSION.sql_mode` -> `sql_mode`), lowercased.
pub fn sys_var_name(sql: &[u8], t: Tok) -> &[u8] {
    let raw = &sql[t.start + 2..t.end];
    for scope in [&b"session."[..], b"global.", b"local."] {
        if raw.len() > scope.len() && raw[..scope.len()].eq_ignore_ascii_case(scope) {
            return &raw[scope.len()..];
        }
    }
    raw
}

/// The content of a quoted literal, doubled quotes and backslash escapes undone.
fn unquote(body: &[u8], q: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        let b = body[i];
        if b == b'\\' && q != b'`' && i + 1 < body.len() {
            out.push(match body[i + 1] {
                b'n' => b'\n',
                b't' => b'\t',
                b'r' => b'\r',
                b'0' => 0,
                b'Z' => 0x1a,
                other => other,
            });
            i += 2;
            continue;
        }
        if b == q && body.get(i + 1) == Some(&q) {
            out.push(q);
            i += 2;
            continue;
        }
        out.push(b);
        i += 1;
    }
    out
}

/// Per-statement state a statement reads.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Readers {
    pub row_count: bool,
    pub found_rows: bool,
    /// `@@warning_count`, `@@error_count`, `SHOW COUNT(*) WARNINGS|ERRORS`.
    pub counts: bool,
    /// `SHOW WARNINGS` / `SHOW ERRORS`.
    pub list: bool,
    /// `GET DIAGNOSTICS`.
    pub diagnostics: bool,
    /// `LAST_INSERT_ID()`, `@@last_insert_id`, `@@identity`.
    pub last_insert_id: bool,
    /// `@@last_gtid`.
    pub last_gtid: bool,
}

impl Readers {
    /// Reads per-statement diagnostics (all but LAST_INSERT_ID, which is replayed).
    pub fn diagnostics_any(&self) -> bool {
        self.row_count
            || self.found_rows
            || self.counts
            || self.list
            || self.diagnostics
            || self.last_gtid
    }
}

/// How a statement leaves FOUND_ROWS().
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum FoundRows {
    /// Unchanged (not a SELECT, SHOW or DESCRIBE).
    #[default]
    Unchanged,
    /// The number of rows the statement sent (0 for `SELECT ... INTO`).
    Sent,
    /// Only the server knows (SQL_CALC_FOUND_ROWS, several statements): read it back.
    ReadBack,
}

/// Everything dbproxy takes from a statement's text. Computed once per COM_QUERY, and once
/// per prepared statement at prepare time.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SqlInfo {
    /// Pins the statement starts.
    pub starts: Vec<PinReason>,
    pub unlock_tables: bool,
    pub get_locks: u32,
    pub release_locks: u32,
    pub release_all_locks: bool,
    pub handler_opens: u32,
    pub handler_closes: u32,
    pub backup_end: bool,
    /// The statement assigns user variables (`SET @v`, `:=`, `INTO @v`, `CALL p(@out)`,
    /// `GET DIAGNOSTICS @v`, `LOAD DATA ... @v`).
    pub assigns_user_vars: bool,
    /// Every user variable the statement names (lowercased, no duplicates).
    pub user_vars: Vec<Vec<u8>>,
    pub readers: Readers,
    /// The statement names a table (it then clears the warning list unless it raises
    /// conditions itself): MariaDB clears the list for statements that use tables.
    pub uses_tables: bool,
    pub found_rows: FoundRows,
    /// May change LAST_INSERT_ID() (inserts, `LAST_INSERT_ID(expr)`, `CALL`, setting
    /// `last_insert_id`/`insert_id`): read it back.
    pub changes_last_insert_id: bool,
    /// System variables set only for one statement (`SET STATEMENT ... FOR`): the server
    /// reports their temporary values, which must not be learnt.
    pub statement_vars: Vec<Vec<u8>>,
    /// Inserts rows (INSERT, REPLACE, LOAD DATA, or a procedure that may): consumes a
    /// pending `SET insert_id`.
    pub inserts: bool,
    /// `SET TRANSACTION ...` without a scope: characteristics of the next transaction.
    pub next_transaction: bool,
    /// Changes `character_set_connection` (`SET NAMES`, `SET CHARACTER SET`, ...): MariaDB
    /// changes `collation_connection` with it without reporting it, so it is read back.
    pub charset_change: bool,
    /// Session variables assigned as `@@name` (no scope): MariaDB applies them but leaves
    /// them out of session tracking (see MDEV-31751), so they are read back.
    pub untracked_vars: Vec<Vec<u8>>,
    /// `SET timestamp = DEFAULT | 0`: the clock runs again (the server reports a stale value).
    pub timestamp_default: bool,
    /// Sets `session_track_*` itself: dbproxy's view of the session would go blind.
    pub touches_tracking: bool,
    /// The statement may change session state in ways its text does not show (`CALL`,
    /// `EXECUTE IMMEDIATE` of a variable, `SET ROLE`): a reported state change pins.
    pub opaque: bool,
    /// `LOAD DATA`/`LOAD XML`: the server may ask for a local file, so nothing may be
    /// pipelined after the statement.
    pub load_data: bool,
    /// More than one statement.
    pub multi: bool,
    /// Temporary tables it creates (for the test-only check-in verification).
    pub temp_tables: Vec<Vec<u8>>,
    /// The statement explains a "session state changed" report that names no variable or
    /// schema (it assigns user variables, creates or drops a temporary table, prepares or
    /// deallocates a statement, or is a `SET STATEMENT`).
    pub explains_change: bool,
}

thread_local! {
    /// The tokens of the statement being analysed, kept between calls so that a statement
    /// costs no allocation once the worker has seen one as long.
    static TOKENS: std::cell::Cell<Vec<Tok>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Analyses the text of a COM_QUERY or COM_STMT_PREPARE (one or several statements).
pub fn analyze(sql: &[u8]) -> SqlInfo {
    let mut info = SqlInfo::default();
    // Taken, not borrowed: a nested analysis (EXECUTE IMMEDIATE) gets a vector of its own.
    let mut toks = TOKENS.with(|t| t.take());
    toks.clear();
    let mut statements = 0;
    // How the statements leave FOUND_ROWS(): the only one's way, unchanged if none
    // changes it, else only the server knows.
    let mut found = FoundRows::Unchanged;
    let mut fold = |f: FoundRows, statements: usize| {
        found = match (statements, f) {
            (1, f) => f,
            (_, FoundRows::Unchanged) if found == FoundRows::Unchanged => FoundRows::Unchanged,
            _ => FoundRows::ReadBack,
        };
    };
    for t in Tokens::new(sql) {
        if t.kind == Kind::Punct(b';') {
            if !toks.is_empty() {
                statements += 1;
                fold(statement(sql, &toks, &mut info, 0), statements);
                toks.clear();
            }
            continue;
        }
        toks.push(t);
    }
    if !toks.is_empty() {
        statements += 1;
        fold(statement(sql, &toks, &mut info, 0), statements);
    }
    // A very long statement's vector is not kept.
    if toks.capacity() <= 1024 {
        TOKENS.with(|t| t.set(toks));
    }
    info.multi = statements > 1;
    info.found_rows = found;
    info.starts.sort();
    info.starts.dedup();
    info.user_vars.sort();
    info.user_vars.dedup();
    info
}

fn is(sql: &[u8], t: Option<&Tok>, word: &str) -> bool {
    t.is_some_and(|t| {
        t.kind == Kind::Word && sql[t.start..t.end].eq_ignore_ascii_case(word.as_bytes())
    })
}

fn punct(t: Option<&Tok>, c: u8) -> bool {
    t.is_some_and(|t| t.kind == Kind::Punct(c))
}

/// Words that end a `FROM`/`JOIN` and are not table names.
fn is_dual(sql: &[u8], t: &Tok) -> bool {
    t.kind == Kind::Word && sql[t.start..t.end].eq_ignore_ascii_case(b"DUAL")
}

/// Classifies one statement (`t`: its tokens, no `;`) into `info`; returns how it leaves
/// FOUND_ROWS(). `depth` bounds recursion into `EXECUTE IMMEDIATE '...'`.
fn statement(sql: &[u8], t: &[Tok], info: &mut SqlInfo, depth: u32) -> FoundRows {
    let w = |i: usize, word: &str| is(sql, t.get(i), word);
    // Skip leading parentheses: `(SELECT ...) UNION (...)`.
    let lead = t.iter().take_while(|x| x.kind == Kind::Punct(b'(')).count();
    let first = |word: &str| w(lead, word);
    let mut found = FoundRows::Unchanged;

    if w(0, "SET") {
        return set_statement(sql, t, info, depth);
    }
    if first("SELECT") || first("WITH") || w(0, "DESC") || w(0, "DESCRIBE") {
        found = if limit_with_offset(sql, t) {
            // FOUND_ROWS() counts the rows skipped too, as far as there were rows
            // (checked: MariaDB 10.11).
            FoundRows::ReadBack
        } else {
            FoundRows::Sent
        };
    }
    if w(0, "SHOW") {
        if w(1, "WARNINGS") || w(1, "ERRORS") {
            info.readers.list = true;
            return FoundRows::Unchanged;
        }
        if w(1, "COUNT") {
            // SHOW COUNT(*) WARNINGS is `SELECT @@session.warning_count`: FOUND_ROWS() becomes
            // 1, where SHOW WARNINGS leaves it (checked: MariaDB 10.11).
            info.readers.counts = true;
            return FoundRows::Sent;
        }
        found = FoundRows::Sent;
        info.uses_tables = true;
    }
    if w(0, "GET") && (w(1, "DIAGNOSTICS") || w(2, "DIAGNOSTICS")) {
        info.readers.diagnostics = true;
        info.assigns_user_vars = true;
        collect_user_vars(sql, t, info);
        return FoundRows::Unchanged;
    }
    locks_and_handlers(sql, t, info);
    if w(0, "PREPARE") {
        info.starts.push(PinReason::TextPrepare);
        info.explains_change = true;
    }
    if (w(0, "DEALLOCATE") || w(0, "DROP")) && w(1, "PREPARE") {
        info.explains_change = true;
    }
    if w(0, "DROP") && w(1, "TEMPORARY") {
        info.explains_change = true;
        info.uses_tables = true;
    }
    if w(0, "EXECUTE") && w(1, "IMMEDIATE") {
        match t.get(2) {
            Some(s) if s.kind == Kind::Str && depth < 4 => {
                let inner = unquote(
                    &sql[s.start + 1..s.end.saturating_sub(1).max(s.start + 1)],
                    sql[s.start],
                );
                let sub = analyze_nested(&inner, depth + 1);
                merge(info, sub);
            }
            _ => info.opaque = true,
        }
        collect_user_vars(sql, t, info);
        return FoundRows::ReadBack;
    }
    writes_and_tables(sql, t, info);

    if scan(sql, t, info) {
        found = FoundRows::ReadBack;
    }
    collect_user_vars(sql, t, info);
    found
}

/// LOCK/UNLOCK TABLES, FLUSH ... WITH READ LOCK, BACKUP STAGE and HANDLER: the pins
/// they start and end.
fn locks_and_handlers(sql: &[u8], t: &[Tok], info: &mut SqlInfo) {
    let w = |i: usize, word: &str| is(sql, t.get(i), word);
    if w(0, "LOCK") && (w(1, "TABLE") || w(1, "TABLES")) {
        info.starts.push(PinReason::LockTables);
        info.uses_tables = true;
    }
    if w(0, "UNLOCK") && (w(1, "TABLE") || w(1, "TABLES")) {
        info.unlock_tables = true;
    }
    if w(0, "FLUSH") {
        // FLUSH [NO_WRITE_TO_BINLOG | LOCAL] TABLE(S) [t, ...] {WITH READ LOCK | FOR EXPORT}
        let lock = t.windows(3).any(|x| {
            is(sql, x.first(), "WITH") && is(sql, x.get(1), "READ") && is(sql, x.get(2), "LOCK")
        }) || t
            .windows(2)
            .any(|x| is(sql, x.first(), "FOR") && is(sql, x.get(1), "EXPORT"));
        if lock {
            info.starts.push(PinReason::LockTables);
        }
    }
    if w(0, "BACKUP") {
        if w(1, "STAGE") && w(2, "END") || w(1, "UNLOCK") {
            info.backup_end = true;
        } else if w(1, "STAGE") || w(1, "LOCK") {
            info.starts.push(PinReason::BackupStage);
        }
    }
    if w(0, "HANDLER") {
        info.uses_tables = true;
        if t.iter().any(|x| is(sql, Some(x), "OPEN")) {
            info.handler_opens += 1;
        } else if t.iter().any(|x| is(sql, Some(x), "CLOSE")) {
            info.handler_closes += 1;
        }
    }
}

/// CALL, LOAD DATA, INSERT/REPLACE, CREATE [TEMPORARY] and the statements that name
/// tables: what they insert, which temporary tables they create, whether they use tables.
fn writes_and_tables(sql: &[u8], t: &[Tok], info: &mut SqlInfo) {
    let w = |i: usize, word: &str| is(sql, t.get(i), word);
    if w(0, "CALL") {
        // A procedure may do anything: its OUT arguments are user variables the server does
        // not report, and state changes it reports cannot be explained.
        info.opaque = true;
        info.inserts = true;
        info.changes_last_insert_id = true;
        info.readers.last_insert_id = true;
        if t.iter().any(|x| x.kind == Kind::UserVar) {
            info.assigns_user_vars = true;
        }
    }
    if w(0, "LOAD") {
        info.load_data = true;
        info.inserts = true;
        info.uses_tables = true;
        info.changes_last_insert_id = true;
        if t.iter().any(|x| x.kind == Kind::UserVar) {
            info.assigns_user_vars = true;
        }
    }
    if w(0, "INSERT") || w(0, "REPLACE") {
        info.inserts = true;
        info.changes_last_insert_id = true;
    }
    if w(0, "CREATE") {
        // CREATE [OR REPLACE] TEMPORARY TABLE [IF NOT EXISTS] name
        let mut i = 1;
        if w(1, "OR") && w(2, "REPLACE") {
            i = 3;
        }
        if w(i, "TEMPORARY") {
            info.starts.push(PinReason::TemporaryTable);
            info.explains_change = true;
            let mut n = i + 2;
            if w(n, "IF") && w(n + 1, "NOT") && w(n + 2, "EXISTS") {
                n += 3;
            }
            if let Some(name) = table_name(sql, t, n) {
                info.temp_tables.push(name);
            }
        }
    }
    if matches!(t.first(), Some(x) if x.kind == Kind::Word)
        && (w(0, "UPDATE")
            || w(0, "DELETE")
            || w(0, "INSERT")
            || w(0, "REPLACE")
            || w(0, "TRUNCATE")
            || w(0, "ALTER")
            || w(0, "DROP") && (w(1, "TABLE") || w(2, "TABLE") || w(1, "VIEW"))
            || w(0, "CREATE")
                && t.iter()
                    .take(5)
                    .any(|x| is(sql, Some(x), "TABLE") || is(sql, Some(x), "VIEW"))
            || w(0, "RENAME")
            || w(0, "ANALYZE")
            || w(0, "OPTIMIZE")
            || w(0, "CHECK")
            || w(0, "REPAIR")
            || w(0, "CHECKSUM")
            || w(0, "TABLE")
            || w(0, "DESC")
            || w(0, "DESCRIBE"))
    {
        info.uses_tables = true;
    }
}

/// The statement's own `LIMIT` (outside parentheses) has an offset: `LIMIT a, b` or
/// `LIMIT b OFFSET a`.
fn limit_with_offset(sql: &[u8], t: &[Tok]) -> bool {
    let mut depth = 0i32;
    let mut in_limit = false;
    for x in t {
        match x.kind {
            Kind::Punct(b'(') => depth += 1,
            Kind::Punct(b')') => depth -= 1,
            Kind::Punct(b',') if depth == 0 && in_limit => return true,
            Kind::Word if depth == 0 => {
                if is(sql, Some(x), "LIMIT") {
                    in_limit = true;
                } else if in_limit && is(sql, Some(x), "OFFSET") {
                    return true;
                }
            }
            _ => {}
        }
    }
    false
}

/// What any statement's tokens may hold wherever they are: lock functions, readers of
/// per-statement state, `:=`, `INTO @v`, table names. Returns whether SQL_CALC_FOUND_ROWS
/// was seen.
fn scan(sql: &[u8], t: &[Tok], info: &mut SqlInfo) -> bool {
    let mut calc_found_rows = false;
    for (i, x) in t.iter().enumerate() {
        let next = t.get(i + 1);
        match x.kind {
            Kind::Word => {
                let word = &sql[x.start..x.end];
                let call = punct(next, b'(');
                if call && word.eq_ignore_ascii_case(b"GET_LOCK") {
                    info.get_locks += 1;
                } else if call && word.eq_ignore_ascii_case(b"RELEASE_LOCK") {
                    info.release_locks += 1;
                } else if call && word.eq_ignore_ascii_case(b"RELEASE_ALL_LOCKS") {
                    info.release_all_locks = true;
                } else if call && word.eq_ignore_ascii_case(b"ROW_COUNT") {
                    info.readers.row_count = true;
                } else if call && word.eq_ignore_ascii_case(b"FOUND_ROWS") {
                    info.readers.found_rows = true;
                } else if call && word.eq_ignore_ascii_case(b"LAST_INSERT_ID") {
                    if punct(t.get(i + 2), b')') {
                        info.readers.last_insert_id = true;
                    } else {
                        info.changes_last_insert_id = true;
                    }
                } else if word.eq_ignore_ascii_case(b"SQL_CALC_FOUND_ROWS") {
                    calc_found_rows = true;
                } else if word.eq_ignore_ascii_case(b"INTO") {
                    if next.is_some_and(|n| n.kind == Kind::UserVar) {
                        info.assigns_user_vars = true;
                    }
                } else if (word.eq_ignore_ascii_case(b"FROM") || word.eq_ignore_ascii_case(b"JOIN"))
                    && next.is_some_and(|n| {
                        matches!(n.kind, Kind::Word | Kind::Ident | Kind::Punct(b'('))
                            && !is_dual(sql, n)
                    })
                {
                    info.uses_tables = true;
                }
            }
            Kind::Assign => info.assigns_user_vars = true,
            Kind::SysVar => {
                let name = sys_var_name(sql, *x);
                if name.eq_ignore_ascii_case(b"warning_count")
                    || name.eq_ignore_ascii_case(b"error_count")
                {
                    info.readers.counts = true;
                } else if name.eq_ignore_ascii_case(b"last_insert_id")
                    || name.eq_ignore_ascii_case(b"identity")
                {
                    info.readers.last_insert_id = true;
                } else if name.eq_ignore_ascii_case(b"last_gtid") {
                    info.readers.last_gtid = true;
                }
            }
            _ => {}
        }
    }
    calc_found_rows
}

/// Classifies an inner statement text (EXECUTE IMMEDIATE) as part of the outer one.
fn analyze_nested(sql: &[u8], depth: u32) -> SqlInfo {
    let mut info = SqlInfo::default();
    let toks: Vec<Tok> = Tokens::new(sql).collect();
    if !toks.is_empty() {
        statement(sql, &toks, &mut info, depth);
    }
    info
}

/// Adds what an inner statement does to the outer statement's findings.
fn merge(info: &mut SqlInfo, sub: SqlInfo) {
    info.starts.extend(sub.starts);
    info.unlock_tables |= sub.unlock_tables;
    info.get_locks += sub.get_locks;
    info.release_locks += sub.release_locks;
    info.release_all_locks |= sub.release_all_locks;
    info.handler_opens += sub.handler_opens;
    info.handler_closes += sub.handler_closes;
    info.backup_end |= sub.backup_end;
    info.assigns_user_vars |= sub.assigns_user_vars;
    info.user_vars.extend(sub.user_vars);
    let r = &mut info.readers;
    r.row_count |= sub.readers.row_count;
    r.found_rows |= sub.readers.found_rows;
    r.counts |= sub.readers.counts;
    r.list |= sub.readers.list;
    r.diagnostics |= sub.readers.diagnostics;
    r.last_insert_id |= sub.readers.last_insert_id;
    info.uses_tables |= sub.uses_tables;
    info.changes_last_insert_id |= sub.changes_last_insert_id;
    info.inserts |= sub.inserts;
    info.statement_vars.extend(sub.statement_vars);
    info.untracked_vars.extend(sub.untracked_vars);
    info.next_transaction |= sub.next_transaction;
    info.timestamp_default |= sub.timestamp_default;
    info.charset_change |= sub.charset_change;
    info.touches_tracking |= sub.touches_tracking;
    info.opaque |= sub.opaque;
    info.load_data |= sub.load_data;
    info.temp_tables.extend(sub.temp_tables);
    info.explains_change |= sub.explains_change;
}

/// A table name at token `i` (`name`, `` `name` ``, `db.name`), as written.
fn table_name(sql: &[u8], t: &[Tok], i: usize) -> Option<Vec<u8>> {
    let first = t
        .get(i)
        .filter(|x| matches!(x.kind, Kind::Word | Kind::Ident))?;
    let mut end = first.end;
    if punct(t.get(i + 1), b'.') {
        if let Some(n) = t
            .get(i + 2)
            .filter(|x| matches!(x.kind, Kind::Word | Kind::Ident))
        {
            end = n.end;
        }
    }
    Some(sql[first.start..end].to_vec())
}

fn collect_user_vars(sql: &[u8], t: &[Tok], info: &mut SqlInfo) {
    for x in t.iter().filter(|x| x.kind == Kind::UserVar) {
        info.user_vars.push(user_var_name(sql, *x));
    }
}

/// `SET ...`: variables (system and user), `SET STATEMENT ... FOR`, `SET TRANSACTION`,
/// `SET NAMES`, `SET ROLE`, `SET PASSWORD`.
/// `SET STATEMENT a = 1, b = 2 FOR <statement>`: the variables return to their values
/// afterwards; the inner statement counts as the statement.
fn set_statement_for(sql: &[u8], t: &[Tok], info: &mut SqlInfo, depth: u32) -> FoundRows {
    let mut depth_paren = 0i32;
    let mut for_at = None;
    let mut expect_name = true;
    for (i, x) in t.iter().enumerate().skip(2) {
        match x.kind {
            Kind::Punct(b'(') => depth_paren += 1,
            Kind::Punct(b')') => depth_paren -= 1,
            Kind::Punct(b',') if depth_paren == 0 => expect_name = true,
            Kind::Word if depth_paren == 0 && is(sql, Some(x), "FOR") => {
                for_at = Some(i);
                break;
            }
            Kind::Word | Kind::SysVar if expect_name && depth_paren == 0 => {
                let name = if x.kind == Kind::SysVar {
                    sys_var_name(sql, *x).to_ascii_lowercase()
                } else {
                    sql[x.start..x.end].to_ascii_lowercase()
                };
                if !matches!(name.as_slice(), b"session" | b"local" | b"global") {
                    info.statement_vars.push(name);
                    expect_name = false;
                }
            }
            _ => {}
        }
    }
    info.explains_change = true;
    match for_at {
        Some(i) if i + 1 < t.len() && depth < 4 => statement(sql, &t[i + 1..], info, depth + 1),
        _ => FoundRows::Unchanged,
    }
}

fn set_statement(sql: &[u8], t: &[Tok], info: &mut SqlInfo, depth: u32) -> FoundRows {
    let w = |i: usize, word: &str| is(sql, t.get(i), word);
    if w(1, "STATEMENT") {
        return set_statement_for(sql, t, info, depth);
    }
    if w(1, "TRANSACTION") {
        info.next_transaction = true;
        return FoundRows::Unchanged;
    }
    if w(1, "NAMES") || w(1, "CHARSET") || w(1, "CHARACTER") && w(2, "SET") {
        info.charset_change = true;
    }
    if w(1, "ROLE") || w(1, "DEFAULT") && w(2, "ROLE") {
        // The active role decides privileges; dbproxy does not carry it.
        info.opaque = true;
        info.starts.push(PinReason::Unclassified);
        return FoundRows::Unchanged;
    }
    // Assignments: [GLOBAL|SESSION|LOCAL] name = value | @@[scope.]name = value | @v = value.
    let mut depth_paren = 0i32;
    let mut expect_target = true;
    let mut global = false;
    let (mut targets, mut one_shots) = (0u32, 0u32);
    let mut i = 1;
    while i < t.len() {
        let x = t[i];
        match x.kind {
            Kind::Punct(b'(') => depth_paren += 1,
            Kind::Punct(b')') => depth_paren -= 1,
            Kind::Punct(b',') if depth_paren == 0 => {
                expect_target = true;
                global = false;
            }
            _ if expect_target && depth_paren == 0 => {
                let scope = |s: &str| is(sql, Some(&x), s);
                if scope("GLOBAL") {
                    global = true;
                    i += 1;
                    continue;
                }
                if scope("SESSION") || scope("LOCAL") {
                    i += 1;
                    continue;
                }
                expect_target = false;
                targets += 1;
                let name: Option<Vec<u8>> = match x.kind {
                    Kind::UserVar => {
                        info.assigns_user_vars = true;
                        info.explains_change = true;
                        None
                    }
                    Kind::SysVar => {
                        let raw = &sql[x.start + 2..x.end];
                        global = raw.len() > 7 && raw[..7].eq_ignore_ascii_case(b"global.");
                        let name = sys_var_name(sql, x).to_ascii_lowercase();
                        if name.is_empty() {
                            // `@@`quoted``: not worth following.
                            info.starts.push(PinReason::Unclassified);
                        } else if name.len() == raw.len() && !name.contains(&b'.') {
                            // (`@@cache.key_buffer_size`: a key cache, global.)
                            // `@@name`: applied, not reported.
                            if matches!(
                                name.as_slice(),
                                b"tx_isolation"
                                    | b"tx_read_only"
                                    | b"transaction_isolation"
                                    | b"transaction_read_only"
                            ) {
                                // MariaDB 10.11: like SET TRANSACTION, for the next
                                // transaction only.
                                one_shots += 1;
                            }
                            if !info.untracked_vars.contains(&name) {
                                info.untracked_vars.push(name.clone());
                            }
                        }
                        Some(name)
                    }
                    Kind::Word => Some(sql[x.start..x.end].to_ascii_lowercase()),
                    _ => None,
                };
                if let (Some(name), false) = (name, global) {
                    let value = t.get(i + 2).filter(|_| {
                        punct(t.get(i + 1), b'=')
                            || t.get(i + 1).is_some_and(|y| y.kind == Kind::Assign)
                    });
                    match name.as_slice() {
                        b"timestamp" => {
                            info.timestamp_default |= value.is_some_and(|v| {
                                let v = &sql[v.start..v.end];
                                v.eq_ignore_ascii_case(b"DEFAULT") || v == b"0"
                            });
                        }
                        b"last_insert_id" | b"identity" | b"insert_id" => {
                            info.changes_last_insert_id = true;
                        }
                        b"character_set_connection" => info.charset_change = true,
                        n if n.starts_with(b"session_track_") => info.touches_tracking = true,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
        i += 1;
    }
    if one_shots > 0 {
        if one_shots == targets {
            info.next_transaction = true;
        } else {
            // Repeating the text for the next transaction would repeat the rest too.
            info.starts.push(PinReason::Unclassified);
        }
    }
    scan(sql, t, info);
    collect_user_vars(sql, t, info);
    FoundRows::Unchanged
}

#[cfg(test)]
mod tests {
    use super::*;
    use PinReason::*;

    fn starts(sql: &str) -> Vec<PinReason> {
        analyze(sql.as_bytes()).starts
    }

    #[test]
    fn unscoped_system_variables_are_untracked() {
        let i = analyze(b"SET @@sql_mode = 'ANSI', time_zone = '+01:00', @@Wait_Timeout = 5");
        assert_eq!(
            i.untracked_vars,
            vec![b"sql_mode".to_vec(), b"wait_timeout".to_vec()]
        );
        assert!(i.starts.is_empty());
        for tracked in [
            "SET @@session.sql_mode = 'ANSI'",
            "SET @@LOCAL.sql_mode = 'ANSI'",
            "SET @@global.sql_mode = 'ANSI'",
            "SET SESSION sql_mode = 'ANSI'",
            "SET sql_mode = @@sql_mode",
            "SET @@default.key_buffer_size = 8388608",
            "SELECT @@sql_mode",
        ] {
            assert!(
                analyze(tracked.as_bytes()).untracked_vars.is_empty(),
                "{tracked}"
            );
        }
        let nested = analyze(b"EXECUTE IMMEDIATE 'SET @@time_zone = ''+02:00'''");
        assert_eq!(nested.untracked_vars, vec![b"time_zone".to_vec()]);
    }

    #[test]
    fn recognises_each_pin() {
        assert_eq!(starts("LOCK TABLES t READ"), vec![LockTables]);
        assert!(analyze(b"unlock tables").unlock_tables);
        assert_eq!(analyze(b"SELECT GET_LOCK('a', 1)").get_locks, 1);
        assert!(analyze(b"DO RELEASE_ALL_LOCKS()").release_all_locks);
        assert_eq!(
            starts("CREATE TEMPORARY TABLE t (x INT)"),
            vec![TemporaryTable]
        );
        assert_eq!(
            starts("create or replace temporary table t (x INT)"),
            vec![TemporaryTable]
        );
        assert_eq!(
            analyze(b"CREATE TEMPORARY TABLE IF NOT EXISTS shop.`t 1` (x INT)").temp_tables,
            vec![b"shop.`t 1`".to_vec()]
        );
        assert_eq!(starts("PREPARE s FROM 'SELECT 1'"), vec![TextPrepare]);
        assert_eq!(starts("FLUSH TABLES WITH READ LOCK"), vec![LockTables]);
        assert_eq!(
            starts("flush local tables t1, t2 with read lock"),
            vec![LockTables]
        );
        assert_eq!(starts("FLUSH TABLES t FOR EXPORT"), vec![LockTables]);
        assert!(starts("FLUSH TABLES").is_empty());
        assert_eq!(starts("BACKUP STAGE START"), vec![BackupStage]);
        assert_eq!(starts("BACKUP STAGE BLOCK_COMMIT"), vec![BackupStage]);
        assert!(analyze(b"BACKUP STAGE END").backup_end);
        assert_eq!(starts("BACKUP LOCK t"), vec![BackupStage]);
        assert!(analyze(b"BACKUP UNLOCK").backup_end);
        assert_eq!(analyze(b"HANDLER t OPEN AS h").handler_opens, 1);
        assert_eq!(analyze(b"HANDLER h CLOSE").handler_closes, 1);
        assert_eq!(analyze(b"HANDLER h READ FIRST").handler_opens, 0);
    }

    #[test]
    fn executable_comments_are_code() {
        assert_eq!(starts("/*!40000 LOCK TABLES t WRITE */"), vec![LockTables]);
        assert_eq!(
            starts("/*M!100500 CREATE TEMPORARY TABLE t (x INT) */"),
            vec![TemporaryTable]
        );
        assert!(analyze(b"/*M! SET @v = 1 */").assigns_user_vars);
        assert!(starts("SELECT /* CREATE TEMPORARY TABLE t */ 1").is_empty());
        let hint = analyze(b"SELECT /*+ MAX_EXECUTION_TIME(10) */ 1 FROM DUAL");
        assert!(hint.starts.is_empty() && !hint.uses_tables && hint.get_locks == 0);
    }

    #[test]
    fn execute_immediate_looks_inside_literals() {
        let i = analyze(b"EXECUTE IMMEDIATE 'CREATE TEMPORARY TABLE t (x INT)'");
        assert_eq!(i.starts, vec![TemporaryTable]);
        assert!(!i.opaque);
        let i = analyze(b"EXECUTE IMMEDIATE 'SET @a = ''x'''");
        assert!(i.assigns_user_vars);
        assert_eq!(i.user_vars, vec![b"a".to_vec()]);
        assert!(analyze(b"EXECUTE IMMEDIATE @sql").opaque);
    }

    #[test]
    fn user_variables_assigned_and_named() {
        for sql in [
            "SET @v = 1",
            "set @V := 1",
            "SET sql_mode='ANSI', @v = 2",
            "SELECT @v := 3",
            "SELECT 1 INTO @v",
            "SELECT a FROM t WHERE id = 1 INTO @v",
            "CALL p(@v)",
            "GET DIAGNOSTICS @v = NUMBER",
            "LOAD DATA INFILE 'f' INTO TABLE t (@v) SET c = @v",
            "SET STATEMENT max_statement_time=1 FOR SELECT @v := 1",
        ] {
            let i = analyze(sql.as_bytes());
            assert!(i.assigns_user_vars, "{sql}");
            assert_eq!(i.user_vars, vec![b"v".to_vec()], "{sql}");
        }
        let i = analyze(b"SET @`Mixed Case` = 1, @'a''b' = 2, @\"c\" = 3");
        assert_eq!(
            i.user_vars,
            vec![b"a'b".to_vec(), b"c".to_vec(), b"mixed case".to_vec()]
        );
        let reads = analyze(b"SELECT @v, @w + 1 FROM t");
        assert!(!reads.assigns_user_vars);
        assert_eq!(reads.user_vars.len(), 2);
        assert!(!analyze(b"SET @@session.sql_mode = 'ANSI'").assigns_user_vars);
        assert!(!analyze(b"SELECT @@version").assigns_user_vars);
    }

    #[test]
    fn per_statement_state_readers() {
        let r = |s: &str| analyze(s.as_bytes()).readers;
        assert!(r("SELECT ROW_COUNT()").row_count);
        assert!(r("select found_rows()").found_rows);
        assert!(r("SELECT @@warning_count").counts);
        assert!(r("SELECT @@session.error_count").counts);
        assert!(r("SHOW COUNT(*) WARNINGS").counts);
        assert!(r("SHOW WARNINGS LIMIT 2").list);
        assert!(r("show errors").list);
        assert!(r("GET DIAGNOSTICS @n = NUMBER").diagnostics);
        assert!(r("SELECT LAST_INSERT_ID()").last_insert_id);
        assert!(r("SELECT @@identity").last_insert_id);
        assert!(!r("SELECT LAST_INSERT_ID(5)").last_insert_id);
        assert!(analyze(b"SELECT LAST_INSERT_ID(5)").changes_last_insert_id);
        assert!(!r("SELECT 'ROW_COUNT()' FROM t").diagnostics_any());
        assert!(!r("SELECT row_count FROM t").row_count);
    }

    #[test]
    fn statements_that_use_tables() {
        for sql in [
            "SELECT * FROM t",
            "SELECT x FROM (SELECT 1 x) d",
            "SELECT (SELECT 1 FROM t)",
            "INSERT INTO t VALUES (1)",
            "UPDATE t SET x = 1",
            "DELETE FROM t",
            "SET @a = (SELECT MAX(x) FROM t)",
            "SHOW TABLES",
            "DESCRIBE t",
            "CREATE TABLE t (x INT)",
            "DROP TABLE IF EXISTS t",
            "SELECT * FROM `t`",
        ] {
            assert!(analyze(sql.as_bytes()).uses_tables, "{sql}");
        }
        for sql in [
            "SELECT 1",
            "SELECT 1 FROM DUAL",
            "SET @a = 1",
            "DO 1",
            "USE shop",
            "BEGIN",
            "SELECT CAST('x' AS INT)",
            "SELECT @@warning_count",
        ] {
            assert!(!analyze(sql.as_bytes()).uses_tables, "{sql}");
        }
    }

    #[test]
    fn found_rows_and_last_insert_id() {
        let f = |s: &str| analyze(s.as_bytes()).found_rows;
        assert_eq!(f("SELECT * FROM t"), FoundRows::Sent);
        assert_eq!(f("SELECT * FROM t LIMIT 2"), FoundRows::Sent);
        assert_eq!(f("SELECT * FROM t LIMIT 2, 1"), FoundRows::ReadBack);
        assert_eq!(f("SELECT * FROM t LIMIT 1 OFFSET 3"), FoundRows::ReadBack);
        assert_eq!(f("SELECT * FROM t LIMIT ?, ?"), FoundRows::ReadBack);
        assert_eq!(
            f("SELECT * FROM (SELECT * FROM t LIMIT 2, 2) d LIMIT 5"),
            FoundRows::Sent
        );
        assert_eq!(f("SELECT a, b FROM t LIMIT 5"), FoundRows::Sent);
        assert_eq!(f("(SELECT 1) UNION (SELECT 2)"), FoundRows::Sent);
        assert_eq!(f("WITH x AS (SELECT 1) SELECT * FROM x"), FoundRows::Sent);
        assert_eq!(f("SHOW TABLES"), FoundRows::Sent);
        assert_eq!(
            f("SELECT SQL_CALC_FOUND_ROWS * FROM t LIMIT 1"),
            FoundRows::ReadBack
        );
        assert_eq!(f("INSERT INTO t VALUES (1)"), FoundRows::Unchanged);
        assert_eq!(f("EXPLAIN SELECT 1"), FoundRows::Unchanged);
        assert_eq!(f("SELECT 1; SELECT 2"), FoundRows::ReadBack);
        assert_eq!(
            f("SET @a = 1; INSERT INTO t VALUES (1)"),
            FoundRows::Unchanged
        );
        assert!(analyze(b"INSERT INTO t (v) VALUES (1)").changes_last_insert_id);
        assert!(analyze(b"replace into t values (1)").changes_last_insert_id);
        assert!(analyze(b"SET insert_id = 5").changes_last_insert_id);
        assert!(!analyze(b"UPDATE t SET x = 1").changes_last_insert_id);
        assert!(analyze(b"SELECT 1; SELECT 2").multi);
        assert!(!analyze(b"SELECT 1;").multi);
    }

    #[test]
    fn session_state_quirks() {
        let i = analyze(b"SET STATEMENT sql_mode = '', @@max_statement_time = 5 FOR SELECT 1");
        assert_eq!(
            i.statement_vars,
            vec![b"sql_mode".to_vec(), b"max_statement_time".to_vec()]
        );
        assert_eq!(i.found_rows, FoundRows::Sent);
        assert!(i.starts.is_empty());
        let i = analyze(b"SET STATEMENT sql_mode='' FOR CREATE TEMPORARY TABLE t (x INT)");
        assert_eq!(i.starts, vec![TemporaryTable]);
        assert!(analyze(b"SET TRANSACTION ISOLATION LEVEL SERIALIZABLE").next_transaction);
        // MariaDB 10.11: `@@tx_isolation` without a scope is for the next transaction.
        let i = analyze(b"SET @@tx_isolation = 'SERIALIZABLE', @@tx_read_only = 1");
        assert!(i.next_transaction && i.starts.is_empty());
        assert!(!analyze(b"SET @@session.tx_isolation = 'SERIALIZABLE'").next_transaction);
        let mixed = analyze(b"SET @@tx_isolation = 'SERIALIZABLE', sql_mode = ''");
        assert!(!mixed.next_transaction);
        assert_eq!(mixed.starts, vec![Unclassified]);
        assert!(!analyze(b"SET SESSION TRANSACTION ISOLATION LEVEL SERIALIZABLE").next_transaction);
        assert!(analyze(b"SET NAMES latin1").charset_change);
        assert!(analyze(b"set character set utf8mb4").charset_change);
        assert!(analyze(b"SET @@session.character_set_connection = latin1").charset_change);
        assert!(!analyze(b"SET character_set_results = latin1").charset_change);
        assert!(analyze(b"SET timestamp = DEFAULT").timestamp_default);
        assert!(analyze(b"SET @@session.timestamp=0").timestamp_default);
        assert!(!analyze(b"SET timestamp = 12345").timestamp_default);
        assert!(analyze(b"SET SESSION session_track_schema=OFF").touches_tracking);
        assert!(!analyze(b"SET GLOBAL session_track_schema=OFF").touches_tracking);
        assert!(analyze(b"SET ROLE admin").opaque);
        assert_eq!(starts("SET ROLE NONE"), vec![Unclassified]);
        assert!(analyze(b"DROP TEMPORARY TABLE IF EXISTS t").explains_change);
        assert!(analyze(b"SET @a = 1").explains_change);
        assert!(!analyze(b"SELECT @a := 1").explains_change);
        assert!(analyze(b"SET STATEMENT sql_mode='' FOR SELECT 1").explains_change);
        assert!(analyze(b"CALL p()").opaque);
        assert!(analyze(b"LOAD DATA LOCAL INFILE 'x' INTO TABLE t").load_data);
    }

    #[test]
    fn strings_and_comments_hide_keywords() {
        for sql in [
            "SET NAMES utf8mb4",
            "SET SESSION sql_mode = 'ANSI', @@time_zone = '+00:00'",
            "SELECT 'LOCK TABLES t READ', \"SET @v=1\" FROM DUAL -- GET_LOCK(",
            "SELECT `get_lock`(1)",
            "SELECT 'it''s', \"a\\\"b\" # CREATE TEMPORARY TABLE",
        ] {
            let i = analyze(sql.as_bytes());
            assert!(
                i.starts.is_empty() && i.get_locks == 0 && !i.assigns_user_vars,
                "{sql}"
            );
        }
    }

    #[test]
    fn never_panics_on_odd_input() {
        for sql in [
            &b"@"[..],
            b"@@",
            b"@'",
            b"/*!",
            b"/*M!1",
            b"'unterminated",
            b"SET",
            b"SET STATEMENT",
            b"SET STATEMENT x=1 FOR",
            b"EXECUTE IMMEDIATE '",
            b"CREATE TEMPORARY",
            b"-- ",
            b"*/",
            b"\xff\xfe@\x80",
            b";;;",
            b"(((",
            b"SELECT :=",
            b"SET @",
        ] {
            let _ = analyze(sql);
        }
    }
}
