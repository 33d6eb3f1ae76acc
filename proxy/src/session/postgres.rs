//! A PostgreSQL client's session between server connections (transaction pooling): the
//! settings that follow the client from one server connection to the next, the statements
//! that may have changed them, and those that pin the client to its server connection.
//! Sans-IO: message bodies and read-back rows in, SQL and decisions out.
//!
//! Settings are not learnt by parsing every form of SET: after a transaction whose
//! statements may have changed one (SET, RESET, DISCARD, `set_config`), dbproxy reads the
//! server's session settings back ([`read_back_sql`]) and keeps what it finds. So a SET
//! inside a transaction that rolled back, `SET LOCAL`, and `set_config` with bind
//! parameters all end as the server says. Before a client's next transaction on another
//! server connection, [`Settings::replay_sql`] turns that connection's settings into the
//! client's.

use super::pin_reason::PinReason;
use std::collections::{BTreeMap, BTreeSet};

/// The settings whose order matters in a replay: the session's user first (setting it
/// resets the role), then the role.
const SESSION_AUTHORIZATION: &str = "session_authorization";
const ROLE: &str = "role";

/// Custom settings (`myapp.tenant`) a client may have, read back by name: PostgreSQL's
/// `pg_settings` does not list them. More than this many are not followed.
pub const MAX_CUSTOM: usize = 64;

/// A session's settings that differ from the server's defaults, by lower-case name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Settings {
    values: BTreeMap<String, String>,
}

impl Settings {
    /// What a client's startup parameters ask for (`user`, `database` and `replication`
    /// excluded; `options` taken apart into its `-c name=value` settings).
    pub fn from_startup(params: &[(String, String)]) -> Settings {
        let mut values = BTreeMap::new();
        for (name, value) in params {
            match name.to_ascii_lowercase().as_str() {
                "user" | "database" | "replication" => {}
                "options" => {
                    for (n, v) in parse_options(value) {
                        values.insert(n.to_ascii_lowercase(), v);
                    }
                }
                lower => {
                    values.insert(lower.to_string(), value.clone());
                }
            }
        }
        Settings { values }
    }

    /// The settings a read-back found: `(name, value)` rows, a `None` value being a
    /// custom setting the session never had. `login_user` is whom the connection logged
    /// in as: a `session_authorization` equal to it is the default.
    pub fn from_rows<'a>(
        rows: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
        login_user: &str,
    ) -> Settings {
        let mut values = BTreeMap::new();
        for (name, value) in rows {
            let Some(value) = value else { continue };
            let name = name.to_ascii_lowercase();
            let default = match name.as_str() {
                SESSION_AUTHORIZATION => value == login_user,
                ROLE => value == "none",
                _ => false,
            };
            if !default {
                values.insert(name, value.to_string());
            }
        }
        Settings { values }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// What a server reported (`reported`, ParameterStatus), with these settings over
    /// the parameters they name.
    pub fn over_reported(&self, mut reported: Vec<(String, String)>) -> Vec<(String, String)> {
        for (name, value) in &mut reported {
            if let Some(v) = self.values.get(&name.to_ascii_lowercase()) {
                v.clone_into(value);
            }
        }
        reported
    }

    /// The custom settings (names with a dot) among these.
    pub fn custom_names(&self) -> impl Iterator<Item = &str> {
        self.values
            .keys()
            .map(String::as_str)
            .filter(|n| n.contains('.'))
    }

    /// One simple query that turns a server connection whose settings are `server` into
    /// this session (`None` when they are the same already). Names that are not plain
    /// setting names are left out.
    pub fn replay_sql(&self, server: &Settings) -> Option<String> {
        if self == server {
            return None;
        }
        let mut sql = String::new();
        let mut sets: Vec<(&str, &str)> = Vec::new();
        // The user, then the role, then the rest: each as a reset or a set.
        let rest: BTreeSet<&str> = server
            .values
            .keys()
            .chain(self.values.keys())
            .map(String::as_str)
            .filter(|n| *n != SESSION_AUTHORIZATION && *n != ROLE)
            .collect();
        let ordered = [SESSION_AUTHORIZATION, ROLE].into_iter().chain(rest);
        for name in ordered {
            if !plain_name(name) {
                continue;
            }
            match (server.get(name), self.get(name)) {
                (Some(_), None) => {
                    if !sets.is_empty() {
                        push_sets(&mut sql, &mut sets);
                    }
                    match name {
                        SESSION_AUTHORIZATION => sql.push_str("RESET SESSION AUTHORIZATION;"),
                        ROLE => sql.push_str("RESET ROLE;"),
                        _ => {
                            sql.push_str("RESET ");
                            sql.push_str(name);
                            sql.push(';');
                        }
                    }
                }
                (was, Some(v)) if was != Some(v) => sets.push((name, v)),
                _ => {}
            }
        }
        push_sets(&mut sql, &mut sets);
        (!sql.is_empty()).then_some(sql)
    }
}

/// `SELECT set_config(...), ...;` for `sets`, which it empties.
fn push_sets(sql: &mut String, sets: &mut Vec<(&str, &str)>) {
    if sets.is_empty() {
        return;
    }
    sql.push_str("SELECT ");
    for (i, (name, value)) in sets.drain(..).enumerate() {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str("set_config(");
        push_literal(sql, name);
        sql.push_str(", ");
        push_literal(sql, value);
        sql.push_str(", false)");
    }
    sql.push(';');
}

/// A string literal that reads the same whatever `standard_conforming_strings` is.
fn push_literal(sql: &mut String, s: &str) {
    sql.push_str("E'");
    for c in s.chars() {
        match c {
            '\'' => sql.push_str("''"),
            '\\' => sql.push_str("\\\\"),
            c => sql.push(c),
        }
    }
    sql.push('\'');
}

/// A setting's name as PostgreSQL spells them: letters, digits, `_`, and one dot for a
/// custom setting's prefix.
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63 * 2 + 1
        && name.bytes().filter(|&b| b == b'.').count() <= 1
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
        && !name.starts_with(|c: char| c.is_ascii_digit() || c == '.')
        && !name.ends_with('.')
}

/// The query that reads a session's settings back: what `pg_settings` lists as set in
/// the session, the user and the role, and the custom settings named in `custom`. Its
/// rows go to [`Settings::from_rows`].
pub fn read_back_sql<'a>(custom: impl IntoIterator<Item = &'a str>) -> String {
    let mut sql = String::from(
        "SELECT name, setting FROM pg_catalog.pg_settings WHERE source = 'session' \
         UNION ALL SELECT 'role', pg_catalog.current_setting('role') \
         UNION ALL SELECT 'session_authorization', \
         pg_catalog.current_setting('session_authorization')",
    );
    for name in custom
        .into_iter()
        .filter(|n| plain_name(n))
        .take(MAX_CUSTOM)
    {
        sql.push_str(" UNION ALL SELECT ");
        push_literal(&mut sql, name);
        sql.push_str(", pg_catalog.current_setting(");
        push_literal(&mut sql, name);
        sql.push_str(", true)");
    }
    sql
}

/// The `-c name=value` (and `--name=value`) settings of a startup `options` string;
/// backslash escapes a space or a backslash.
fn parse_options(options: &str) -> Vec<(String, String)> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    word.push(n);
                }
            }
            c if c.is_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let setting = if w == "-c" {
            it.next()
        } else if let Some(rest) = w.strip_prefix("--") {
            Some(rest.to_string())
        } else {
            w.strip_prefix("-c").map(str::to_string)
        };
        if let Some((n, v)) = setting.as_deref().and_then(|s| s.split_once('=')) {
            out.push((n.replace('-', "_"), v.to_string()));
        }
    }
    out
}

/// What a client's Query or Parse means for its session.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Seen {
    /// It may have changed the session's settings: read them back before the server
    /// connection goes back.
    pub settings: bool,
    /// It leaves state on the server connection that cannot move with the client.
    pub pin: Option<PinReason>,
    /// Custom settings it names (`SET myapp.tenant`, `set_config('myapp.tenant', ...)`).
    pub custom: Vec<String>,
    /// It may remove prepared statements on the server: `DEALLOCATE` (`Some(true)` for
    /// `DEALLOCATE ALL`) or `DISCARD ALL` (`Some(true)`).
    pub deallocates: Option<bool>,
}

/// Reads a client's message: a Query (`Q`) or a Parse (`P`) body, as the tracker hands
/// them on (an empty body is one too long to keep: it counts as changing settings).
pub fn seen(tag: u8, body: &[u8]) -> Seen {
    if body.is_empty() {
        return Seen {
            settings: true,
            ..Seen::default()
        };
    }
    match tag {
        b'Q' => scan(body.strip_suffix(&[0]).unwrap_or(body)),
        b'P' => {
            // Named statements do not pin: they are renamed per client (`pg_statements`).
            let mut parts = body.splitn(3, |&b| b == 0);
            let _name = parts.next();
            scan(parts.next().unwrap_or_default())
        }
        _ => Seen::default(),
    }
}

/// A token of SQL as far as the scan needs: words, string literals, punctuation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok<'a> {
    Word(&'a [u8]),
    Str(&'a [u8]),
    Punct(u8),
}

/// Scans the statements of a query's text (several, separated by `;`).
pub fn scan(sql: &[u8]) -> Seen {
    let mut out = Seen::default();
    let mut toks = Tokens { sql, at: 0 };
    // The statement's first words, and what came just before the current token.
    let mut first: Option<&[u8]> = None;
    let mut second: Option<&[u8]> = None;
    let mut prev: [Option<Tok<'_>>; 2] = [None, None];
    while let Some(t) = toks.next() {
        match t {
            Tok::Punct(b';') => {
                first = None;
                second = None;
                prev = [None, None];
                continue;
            }
            Tok::Word(w) if first.is_none() => {
                first = Some(w);
                statement_start(w, &mut out);
            }
            Tok::Word(w) if second.is_none() => {
                second = Some(w);
                if let Some(f) = first {
                    statement_second(f, w, &mut toks, &mut out);
                }
            }
            _ => {}
        }
        if let Tok::Word(w) = t {
            let f = first.unwrap_or_default();
            if is(w, "set_config") {
                out.settings = true;
                if let (Some(Tok::Punct(b'(')), Some(Tok::Str(name))) = (toks.peek(), toks.peek2())
                {
                    custom(name, &mut out);
                }
            } else if is_any(
                w,
                &[
                    "pg_advisory_lock",
                    "pg_advisory_lock_shared",
                    "pg_try_advisory_lock",
                    "pg_try_advisory_lock_shared",
                ],
            ) && toks.peek() == Some(Tok::Punct(b'('))
            {
                pin(&mut out, PinReason::AdvisoryLock);
            } else if is_any(w, &["temp", "temporary"])
                && matches!(prev[1], Some(Tok::Word(p)) if is_any(p, &["into", "create", "global", "local"]))
                && !is(f, "set")
            {
                pin(&mut out, PinReason::TemporaryTable);
            } else if is(w, "hold")
                && is(f, "declare")
                && matches!(prev[1], Some(Tok::Word(p)) if is(p, "with"))
            {
                pin(&mut out, PinReason::HoldCursor);
            }
        }
        prev = [prev[1], Some(t)];
    }
    out
}

/// What a statement's first word says.
fn statement_start(w: &[u8], out: &mut Seen) {
    if is(w, "reset") {
        out.settings = true;
    } else if is(w, "discard") {
        out.settings = true;
        out.deallocates = Some(false);
    } else if is(w, "deallocate") {
        out.deallocates = Some(false);
    } else if is(w, "listen") {
        pin(out, PinReason::Listen);
    } else if is(w, "load") {
        pin(out, PinReason::LoadLibrary);
    }
}

/// What a statement's second word says, with its first: `SET [SESSION] name`, but not
/// `SET LOCAL` (gone with its transaction) or `SET TRANSACTION`.
fn statement_second(first: &[u8], w: &[u8], toks: &mut Tokens<'_>, out: &mut Seen) {
    if is_any(first, &["discard", "deallocate"]) {
        let all = is(w, "all")
            || is(w, "prepare") && matches!(toks.peek(), Some(Tok::Word(n)) if is(n, "all"));
        if all {
            out.deallocates = Some(true);
        }
        return;
    }
    if !is(first, "set") || is_any(w, &["local", "transaction"]) {
        return;
    }
    out.settings = true;
    let name = if is(w, "session") {
        match toks.peek() {
            Some(Tok::Word(n)) if !is(n, "characteristics") => n,
            _ => return,
        }
    } else {
        w
    };
    // A custom setting's name is `prefix.name`: the word, a dot, a word.
    if let (Some(Tok::Punct(b'.')), Some(Tok::Word(rest))) = toks.peek_after(name) {
        let mut full = name.to_vec();
        full.push(b'.');
        full.extend_from_slice(rest);
        custom(&full, out);
    }
}

fn custom(name: &[u8], out: &mut Seen) {
    if let Ok(n) = std::str::from_utf8(name) {
        let n = n.to_ascii_lowercase();
        if n.contains('.') && plain_name(&n) && !out.custom.contains(&n) {
            out.custom.push(n);
        }
    }
}

fn pin(out: &mut Seen, r: PinReason) {
    if out.pin.is_none() {
        out.pin = Some(r);
    }
}

fn is(w: &[u8], word: &str) -> bool {
    w.eq_ignore_ascii_case(word.as_bytes())
}

fn is_any(w: &[u8], words: &[&str]) -> bool {
    words.iter().any(|x| is(w, x))
}

/// A tokenizer that skips what cannot hold a statement's words: spaces, comments (nested
/// block comments too), and the insides of quoted identifiers.
struct Tokens<'a> {
    sql: &'a [u8],
    at: usize,
}

impl<'a> Tokens<'a> {
    fn next(&mut self) -> Option<Tok<'a>> {
        let (t, end) = self.token_at(self.at)?;
        self.at = end;
        Some(t)
    }

    fn peek(&self) -> Option<Tok<'a>> {
        self.token_at(self.at).map(|(t, _)| t)
    }

    fn peek2(&self) -> Option<Tok<'a>> {
        let (_, end) = self.token_at(self.at)?;
        self.token_at(end).map(|(t, _)| t)
    }

    /// The two tokens after the word `w` (which must be the next token or the last one
    /// taken).
    fn peek_after(&self, w: &'a [u8]) -> (Option<Tok<'a>>, Option<Tok<'a>>) {
        let start = w.as_ptr() as usize - self.sql.as_ptr() as usize + w.len();
        match self.token_at(start) {
            Some((t, end)) => (Some(t), self.token_at(end).map(|(t, _)| t)),
            None => (None, None),
        }
    }

    fn token_at(&self, mut i: usize) -> Option<(Tok<'a>, usize)> {
        let s = self.sql;
        loop {
            let c = *s.get(i)?;
            match c {
                c if c.is_ascii_whitespace() => i += 1,
                b'-' if s.get(i + 1) == Some(&b'-') => {
                    i = s[i..]
                        .iter()
                        .position(|&b| b == b'\n')
                        .map_or(s.len(), |p| i + p + 1);
                }
                b'/' if s.get(i + 1) == Some(&b'*') => {
                    let mut depth = 0usize;
                    while i < s.len() {
                        if s.get(i..i + 2) == Some(b"/*") {
                            depth += 1;
                            i += 2;
                        } else if s.get(i..i + 2) == Some(b"*/") {
                            depth -= 1;
                            i += 2;
                            if depth == 0 {
                                break;
                            }
                        } else {
                            i += 1;
                        }
                    }
                }
                b'\'' => return Some(string(s, i, false)),
                b'e' | b'E' if s.get(i + 1) == Some(&b'\'') => return Some(string(s, i + 1, true)),
                b'"' => {
                    let mut j = i + 1;
                    while j < s.len() {
                        if s[j] == b'"' {
                            if s.get(j + 1) == Some(&b'"') {
                                j += 2;
                                continue;
                            }
                            break;
                        }
                        j += 1;
                    }
                    let body = s.get(i + 1..j).unwrap_or_default();
                    return Some((Tok::Word(body), (j + 1).min(s.len())));
                }
                b'$' => {
                    // $tag$ ... $tag$ (dollar quoting), or a parameter ($1).
                    let tag_end = s[i + 1..]
                        .iter()
                        .position(|&b| !(b.is_ascii_alphanumeric() || b == b'_'))
                        .map(|p| i + 1 + p);
                    match tag_end {
                        Some(e)
                            if s.get(e) == Some(&b'$')
                                && !s[i + 1..e].first().is_some_and(u8::is_ascii_digit) =>
                        {
                            let tag = &s[i..=e];
                            let body_start = e + 1;
                            let close = s[body_start..]
                                .windows(tag.len())
                                .position(|w| w == tag)
                                .map(|p| body_start + p);
                            return Some(match close {
                                Some(c) => (Tok::Str(&s[body_start..c]), c + tag.len()),
                                None => (Tok::Str(&s[body_start..]), s.len()),
                            });
                        }
                        _ => return Some((Tok::Punct(b'$'), i + 1)),
                    }
                }
                c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                    let end = s[i..]
                        .iter()
                        .position(|&b| {
                            !(b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80)
                        })
                        .map_or(s.len(), |p| i + p);
                    return Some((Tok::Word(&s[i..end]), end));
                }
                c => return Some((Tok::Punct(c), i + 1)),
            }
        }
    }
}

/// A string literal starting at the quote at `i`; `escapes`: an `E'...'` string.
fn string(s: &[u8], i: usize, escapes: bool) -> (Tok<'_>, usize) {
    let mut j = i + 1;
    while j < s.len() {
        match s[j] {
            b'\\' if escapes => j += 2,
            b'\'' if s.get(j + 1) == Some(&b'\'') => j += 2,
            b'\'' => break,
            _ => j += 1,
        }
    }
    let body = s.get(i + 1..j.min(s.len())).unwrap_or_default();
    (Tok::Str(body), (j + 1).min(s.len()))
}

/// The SQL-level prepared statements (`PREPARE`, `EXECUTE`, `DEALLOCATE`) a query's text
/// names, by their names as the server spells them (unquoted names in lower case).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SqlNames {
    /// Every name it uses, defines or removes.
    pub used: Vec<Vec<u8>>,
    /// The names it defines or removes (`PREPARE`, `DEALLOCATE name`).
    pub changed: Vec<Vec<u8>>,
    /// It removes every prepared statement (`DEALLOCATE ALL`, `DISCARD ALL`).
    pub all: bool,
    /// It reads `pg_prepared_statements`: every name is to agree.
    pub lists: bool,
}

/// Whether a query's text may name an SQL-level prepared statement: a quick look for the
/// words before [`sql_names`] reads it.
pub fn may_name_sql_statements(sql: &[u8]) -> bool {
    sql.iter().enumerate().any(|(i, b)| {
        let rest = sql.get(i..).unwrap_or_default();
        let starts = |w: &[u8]| {
            rest.get(..w.len())
                .is_some_and(|r| r.eq_ignore_ascii_case(w))
        };
        match b | 0x20 {
            b'e' => starts(b"execute"),
            b'p' => starts(b"prepare") || starts(b"pg_prepared_statements"),
            b'd' => starts(b"deallocate") || starts(b"discard"),
            _ => false,
        }
    })
}

/// The SQL-level prepared statements a query's text names (see [`SqlNames`]). `EXECUTE`
/// is read anywhere (`EXPLAIN EXECUTE`, `CREATE TABLE .. AS EXECUTE`); a word after it
/// that names no statement (`GRANT EXECUTE ON`) costs at most a look at the name.
pub fn sql_names(sql: &[u8]) -> SqlNames {
    let mut out = SqlNames::default();
    let mut toks = Tokens { sql, at: 0 };
    let mut first: Option<&[u8]> = None;
    let mut words = 0usize;
    let mut prev: Option<Tok<'_>> = None;
    while let Some(t) = toks.next() {
        if t == Tok::Punct(b';') {
            first = None;
            words = 0;
            prev = None;
            continue;
        }
        if let Tok::Word(w) = t {
            words += 1;
            out.lists |= is(w, "pg_prepared_statements");
            let f = *first.get_or_insert(w);
            let after = |p: &str| matches!(prev, Some(Tok::Word(x)) if is(x, p));
            let name = ident(sql, w);
            if words == 2 && is(f, "prepare") {
                push_name(&mut out.used, &name);
                push_name(&mut out.changed, &name);
            } else if words == 2 && is(f, "discard") && is(w, "all") && !quoted(sql, w) {
                out.all = true;
            } else if (words == 2 || words == 3 && after("prepare")) && is(f, "deallocate") {
                if is(w, "all") && !quoted(sql, w) {
                    out.all = true;
                } else if !(words == 2 && is(w, "prepare") && !quoted(sql, w)) {
                    push_name(&mut out.used, &name);
                    push_name(&mut out.changed, &name);
                }
            } else if after("execute") {
                push_name(&mut out.used, &name);
            }
        }
        prev = Some(t);
    }
    out
}

fn push_name(names: &mut Vec<Vec<u8>>, name: &[u8]) {
    if !names.iter().any(|n| n == name) {
        names.push(name.to_vec());
    }
}

/// Whether the word `w` (a slice of `sql`) was written in double quotes.
fn quoted(sql: &[u8], w: &[u8]) -> bool {
    let at = (w.as_ptr() as usize).wrapping_sub(sql.as_ptr() as usize);
    at > 0 && sql.get(at - 1) == Some(&b'"')
}

/// An identifier as the server reads it: a quoted one as written (`""` a quote), an
/// unquoted one in lower case.
fn ident(sql: &[u8], w: &[u8]) -> Vec<u8> {
    if quoted(sql, w) {
        let mut out = Vec::with_capacity(w.len());
        let mut i = 0;
        while let Some(&b) = w.get(i) {
            out.push(b);
            i += if b == b'"' { 2 } else { 1 };
        }
        out
    } else {
        w.to_ascii_lowercase()
    }
}

/// The text that defines the SQL-level prepared statement `name`, from the source a
/// server keeps for it (`pg_prepared_statements.statement`: the whole query string that
/// held the `PREPARE`). A source of one statement is kept whole, so that a replay shows
/// the same source; from several, the last `PREPARE` of the name. `None` when no
/// `PREPARE` of that name is in it.
pub fn sql_definition(source: &[u8], name: &[u8]) -> Option<Vec<u8>> {
    let mut toks = Tokens { sql: source, at: 0 };
    // Each statement's span, and whether it prepares `name`.
    let mut statements = 0usize;
    let mut found: Option<(usize, usize)> = None;
    let mut start = 0usize;
    let mut words = 0usize;
    let mut prepares = false;
    // Where the statement's last token ends.
    let mut end_of_last = 0usize;
    loop {
        let t = toks.next();
        if matches!(t, None | Some(Tok::Punct(b';'))) {
            if end_of_last > start {
                statements += 1;
                if prepares {
                    found = Some((start, end_of_last));
                }
            }
            if t.is_none() {
                break;
            }
            start = toks.at;
            end_of_last = start;
            words = 0;
            prepares = false;
            continue;
        }
        end_of_last = toks.at;
        if let Some(Tok::Word(w)) = t {
            words += 1;
            if words == 1 {
                prepares = is(w, "prepare");
            } else if words == 2 && prepares {
                prepares = ident(source, w) == name;
            }
        } else if words < 2 {
            prepares = false;
        }
    }
    let (a, b) = found?;
    if statements == 1 {
        return Some(source.to_vec());
    }
    let text = source.get(a..b)?;
    let trimmed = text.trim_ascii();
    Some(trimmed.to_vec())
}

/// Startup settings remembered with the server's spelling of them (what a read-back found
/// after they were applied: `DateStyle=ISO` reads back as `ISO, MDY`), per backend login
/// and database: a client that starts with settings another client started with needs no
/// read-back (a new connection per transaction pays no extra query). At most
/// [`Spellings::LIMIT`] kept; the oldest go first.
#[derive(Debug, Default)]
pub struct Spellings {
    known: std::collections::HashMap<(u64, String, Settings), Settings>,
    order: std::collections::VecDeque<(u64, String, Settings)>,
}

impl Spellings {
    pub const LIMIT: usize = 64;

    pub fn get(&self, login: u64, database: &str, startup: &Settings) -> Option<&Settings> {
        // The key is built only to look up: a lookup allocates (once per client).
        self.known
            .get(&(login, database.to_string(), startup.clone()))
    }

    pub fn remember(&mut self, login: u64, database: &str, startup: Settings, spelled: Settings) {
        let key = (login, database.to_string(), startup);
        if self.known.contains_key(&key) {
            return;
        }
        if self.order.len() >= Self::LIMIT {
            if let Some(old) = self.order.pop_front() {
                self.known.remove(&old);
            }
        }
        self.order.push_back(key.clone());
        self.known.insert(key, spelled);
    }
}

/// A client's session as it moves between server connections.
#[derive(Debug, Default)]
pub struct PgSession {
    /// Its settings as last read back (or as its startup parameters asked, before that).
    pub settings: Settings,
    /// Custom settings it has named, to read back by name.
    custom: BTreeSet<String>,
    /// Something since the last read-back may have changed its settings.
    touched: bool,
    /// What keeps it on its server connection until it leaves.
    pin: Option<PinReason>,
    /// Since the last [`PgSession::take_deallocated`]: prepared statements may have gone
    /// from the server (`Some(true)`: all of the client's too).
    deallocated: Option<bool>,
    /// Its startup settings are as the client sent them, not yet as the server spells
    /// them (no read-back yet).
    fresh: bool,
}

/// What to do once the server connection's exchange is settled.
#[derive(Debug, PartialEq, Eq)]
pub enum AtRest {
    /// Keep the connection: the client is pinned to it.
    Keep(PinReason),
    /// Read the settings back with this query, then release.
    ReadBack(String),
    /// Release it now.
    Release,
}

impl PgSession {
    pub fn new(startup: &[(String, String)]) -> PgSession {
        let settings = Settings::from_startup(startup);
        let custom = settings.custom_names().map(str::to_string).collect();
        PgSession {
            settings,
            custom,
            // The startup settings are read back once applied: the server's spelling of
            // each value is what later comparisons use.
            touched: true,
            pin: None,
            deallocated: None,
            fresh: true,
        }
    }

    /// Its startup settings, while they are as the client sent them (before the first
    /// read-back).
    pub fn fresh_startup(&self) -> Option<&Settings> {
        self.fresh.then_some(&self.settings)
    }

    /// A Query or Parse the client sent (see [`seen`]); returns a pin it starts.
    pub fn client_sent(&mut self, tag: u8, body: &[u8]) -> Option<PinReason> {
        self.apply(&seen(tag, body))
    }

    /// What a statement the client runs does (read from its text); returns a pin it
    /// starts.
    pub fn apply(&mut self, s: &Seen) -> Option<PinReason> {
        self.touched |= s.settings;
        if let Some(all) = s.deallocates {
            self.deallocated = Some(all || self.deallocated == Some(true));
        }
        for c in &s.custom {
            if self.custom.len() < MAX_CUSTOM && !self.custom.contains(c) {
                self.custom.insert(c.clone());
            }
        }
        match (self.pin, s.pin) {
            (None, Some(p)) => {
                self.pin = Some(p);
                Some(p)
            }
            _ => None,
        }
    }

    /// Whether prepared statements may have gone from the server since the last call
    /// (`Some(true)`: every one of the client's).
    pub fn take_deallocated(&mut self) -> Option<bool> {
        self.deallocated.take()
    }

    pub fn pinned(&self) -> Option<PinReason> {
        self.pin
    }

    /// Pins the session for `reason` (returned when it starts the pin).
    pub fn pin_for(&mut self, reason: PinReason) -> Option<PinReason> {
        if self.pin.is_some() {
            return None;
        }
        self.pin = Some(reason);
        Some(reason)
    }

    /// The exchange on the server connection is settled (nothing outstanding, no
    /// transaction): what now.
    pub fn at_rest(&self) -> AtRest {
        match (self.pin, self.touched) {
            (Some(p), _) => AtRest::Keep(p),
            (None, true) => AtRest::ReadBack(read_back_sql(self.custom.iter().map(String::as_str))),
            (None, false) => AtRest::Release,
        }
    }

    /// The read-back's rows: the client's settings now.
    pub fn read_back(&mut self, settings: Settings) {
        self.settings = settings;
        self.touched = false;
        self.fresh = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(pairs: &[(&str, &str)]) -> Settings {
        Settings::from_rows(pairs.iter().map(|(n, v)| (*n, Some(*v))), "app")
    }

    #[test]
    fn startup_parameters_and_options_become_settings() {
        let p = [
            ("user".to_string(), "app".to_string()),
            ("application_name".to_string(), "psql".to_string()),
            (
                "options".to_string(),
                "-c search_path=a,b --statement-timeout=5s -cwork_mem=4MB -c x=a\\ b".to_string(),
            ),
        ];
        let st = Settings::from_startup(&p);
        assert_eq!(st.get("application_name"), Some("psql"));
        assert_eq!(st.get("search_path"), Some("a,b"));
        assert_eq!(st.get("statement_timeout"), Some("5s"));
        assert_eq!(st.get("work_mem"), Some("4MB"));
        assert_eq!(st.get("x"), Some("a b"));
        assert_eq!(st.get("user"), None);
    }

    #[test]
    fn a_replay_resets_what_the_client_lacks_and_sets_what_differs_user_and_role_first() {
        let server = s(&[("search_path", "x"), ("timezone", "UTC"), ("role", "bob")]);
        let client = s(&[
            ("timezone", "Europe/Paris"),
            ("session_authorization", "alice"),
            ("myapp.tenant", "it's \\ 7"),
        ]);
        assert_eq!(
            client.replay_sql(&server).unwrap(),
            "SELECT set_config(E'session_authorization', E'alice', false);RESET ROLE;\
             SELECT set_config(E'myapp.tenant', E'it''s \\\\ 7', false);RESET search_path;\
             SELECT set_config(E'timezone', E'Europe/Paris', false);"
        );
        assert_eq!(client.replay_sql(&client), None);
        assert_eq!(Settings::default().replay_sql(&Settings::default()), None);
    }

    #[test]
    fn a_clients_startup_settings_stand_over_what_the_server_reported() {
        let st = Settings::from_startup(&[
            ("TimeZone".to_string(), "Asia/Tokyo".to_string()),
            ("application_name".to_string(), "app1".to_string()),
        ]);
        let reported = vec![
            ("TimeZone".to_string(), "UTC".to_string()),
            ("server_version".to_string(), "15.18".to_string()),
            ("application_name".to_string(), String::new()),
        ];
        assert_eq!(
            st.over_reported(reported),
            [
                ("TimeZone".to_string(), "Asia/Tokyo".to_string()),
                ("server_version".to_string(), "15.18".to_string()),
                ("application_name".to_string(), "app1".to_string()),
            ]
        );
    }

    #[test]
    fn defaults_read_back_are_no_settings() {
        let st = Settings::from_rows(
            [
                ("role", Some("none")),
                ("session_authorization", Some("app")),
                ("myapp.x", None),
                ("TimeZone", Some("UTC")),
            ],
            "app",
        );
        assert_eq!(st, s(&[("timezone", "UTC")]));
    }

    #[test]
    fn names_that_are_not_setting_names_are_never_sent() {
        let client = s(&[("a; DROP TABLE t", "1"), ("ok_name", "2")]);
        let sql = client.replay_sql(&Settings::default()).unwrap();
        assert!(!sql.contains("DROP"), "{sql}");
        assert!(!read_back_sql(["x'); DROP TABLE t; --.y"]).contains("DROP"));
    }

    #[test]
    fn statements_that_may_change_settings_are_seen() {
        for q in [
            "SET search_path = a",
            "set session statement_timeout to 5",
            "  /* c */ RESET ALL",
            "discard all",
            "SELECT set_config('a.b', $1, false)",
            "BEGIN; SET TimeZone = 'UTC'; COMMIT",
            "SET ROLE alice",
        ] {
            assert!(scan(q.as_bytes()).settings, "{q}");
        }
        for q in [
            "SELECT 1",
            "UPDATE t SET a = 1",
            "SET LOCAL search_path = a",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SELECT 'SET x = 1'",
            "-- SET x = 1\nSELECT 1",
        ] {
            assert!(!scan(q.as_bytes()).settings, "{q}");
        }
    }

    #[test]
    fn custom_settings_are_named() {
        assert_eq!(scan(b"SET myapp.tenant = 'a'").custom, ["myapp.tenant"]);
        assert_eq!(
            scan(b"SET SESSION MyApp.Tenant TO 1").custom,
            ["myapp.tenant"]
        );
        assert_eq!(
            scan(b"select set_config('myapp.user', 'x', false)").custom,
            ["myapp.user"]
        );
        assert!(scan(b"SET search_path = a").custom.is_empty());
    }

    #[test]
    fn pins_by_reason() {
        let cases: [(&str, Option<PinReason>); 12] = [
            ("LISTEN ch", Some(PinReason::Listen)),
            ("SELECT pg_advisory_lock(1)", Some(PinReason::AdvisoryLock)),
            (
                "select pg_try_advisory_lock_shared(1, 2)",
                Some(PinReason::AdvisoryLock),
            ),
            ("SELECT pg_advisory_xact_lock(1)", None),
            (
                "CREATE TEMP TABLE t (a int)",
                Some(PinReason::TemporaryTable),
            ),
            (
                "create global temporary table t (a int)",
                Some(PinReason::TemporaryTable),
            ),
            (
                "SELECT * INTO TEMP t FROM u",
                Some(PinReason::TemporaryTable),
            ),
            ("SELECT temp FROM weather", None),
            (
                "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
                Some(PinReason::HoldCursor),
            ),
            ("DECLARE c CURSOR FOR SELECT 1", None),
            ("PREPARE p AS SELECT 1", None),
            ("LOAD 'auto_explain'", Some(PinReason::LoadLibrary)),
        ];
        for (q, want) in cases {
            assert_eq!(scan(q.as_bytes()).pin, want, "{q}");
        }
    }

    #[test]
    fn statements_that_remove_prepared_statements() {
        assert_eq!(scan(b"DISCARD ALL").deallocates, Some(true));
        assert_eq!(scan(b"discard plans").deallocates, Some(false));
        assert_eq!(scan(b"DEALLOCATE ALL").deallocates, Some(true));
        assert_eq!(scan(b"DEALLOCATE PREPARE ALL").deallocates, Some(true));
        assert_eq!(scan(b"DEALLOCATE p1").deallocates, Some(false));
        assert_eq!(scan(b"SELECT 1").deallocates, None);
    }

    #[test]
    fn quoted_text_hides_words() {
        for q in [
            "SELECT 'LISTEN x; SET a = 1'",
            "SELECT $$; LISTEN x; $$",
            "SELECT $f$ pg_advisory_lock(1) $f$",
            "SELECT E'\\'; LISTEN x'",
            "SELECT \"listen\" FROM t",
            "/* /* nested */ LISTEN x */ SELECT 1",
        ] {
            let s = scan(q.as_bytes());
            assert_eq!((s.pin, s.settings), (None, false), "{q}");
        }
    }

    #[test]
    fn a_parse_is_read_by_its_text_and_its_name_pins_nothing() {
        assert_eq!(seen(b'P', b"s1\0SELECT 1\0\0\0").pin, None);
        assert_eq!(
            seen(b'P', b"s1\0LISTEN x\0\0\0").pin,
            Some(PinReason::Listen)
        );
        assert!(seen(b'P', b"\0SET x = 1\0\0\0").settings);
        // Too long to keep: counted as changing settings.
        assert!(seen(b'Q', b"").settings);
    }

    #[test]
    fn a_session_reads_back_after_a_change_and_keeps_a_pin() {
        let mut s = PgSession::new(&[("TimeZone".into(), "UTC".into())]);
        assert!(matches!(s.at_rest(), AtRest::ReadBack(_)));
        s.read_back(Settings::from_rows([("TimeZone", Some("UTC"))], "app"));
        assert_eq!(s.at_rest(), AtRest::Release);
        s.client_sent(b'Q', b"SELECT 1\0");
        assert_eq!(s.at_rest(), AtRest::Release);
        s.client_sent(b'Q', b"SET myapp.t = 1\0");
        match s.at_rest() {
            AtRest::ReadBack(sql) => assert!(sql.contains("'myapp.t'"), "{sql}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(s.client_sent(b'Q', b"LISTEN x\0"), Some(PinReason::Listen));
        assert_eq!(s.client_sent(b'Q', b"LISTEN y\0"), None);
        assert_eq!(s.at_rest(), AtRest::Keep(PinReason::Listen));
    }

    fn names(sql: &str) -> (Vec<String>, Vec<String>, bool) {
        let n = sql_names(sql.as_bytes());
        let s = |v: Vec<Vec<u8>>| {
            v.into_iter()
                .map(|x| String::from_utf8(x).unwrap())
                .collect()
        };
        (s(n.used), s(n.changed), n.all)
    }

    #[test]
    fn sql_prepared_statements_are_named_as_the_server_spells_them() {
        let none: Vec<String> = Vec::new();
        assert_eq!(
            names("PREPARE Q1(int) AS SELECT $1"),
            (vec!["q1".into()], vec!["q1".into()], false)
        );
        assert_eq!(
            names("prepare \"My\"\"Q\" as select 1"),
            (vec!["My\"Q".into()], vec!["My\"Q".into()], false)
        );
        assert_eq!(
            names("EXECUTE q1(1)"),
            (vec!["q1".into()], none.clone(), false)
        );
        assert_eq!(
            names("explain (analyze) execute Q2"),
            (vec!["q2".into()], none.clone(), false)
        );
        assert_eq!(
            names("CREATE TABLE t AS EXECUTE q3(1)"),
            (vec!["q3".into()], none.clone(), false)
        );
        assert_eq!(
            names("DEALLOCATE q1; DEALLOCATE PREPARE q2"),
            (
                vec!["q1".into(), "q2".into()],
                vec!["q1".into(), "q2".into()],
                false
            )
        );
        assert_eq!(names("DEALLOCATE ALL"), (none.clone(), none.clone(), true));
        assert_eq!(
            names("deallocate prepare all"),
            (none.clone(), none.clone(), true)
        );
        assert_eq!(names("DISCARD ALL"), (none.clone(), none.clone(), true));
        assert_eq!(names("DISCARD PLANS"), (none.clone(), none.clone(), false));
        assert_eq!(
            names("DEALLOCATE \"all\""),
            (vec!["all".into()], vec!["all".into()], false)
        );
        assert_eq!(
            names("SELECT 'EXECUTE x'; -- EXECUTE y\nSELECT $$PREPARE z$$"),
            (none.clone(), none.clone(), false)
        );
        assert!(sql_names(b"SELECT * FROM pg_catalog.pg_prepared_statements").lists);
        assert!(!sql_names(b"SELECT 'pg_prepared_statements'").lists);
        assert!(may_name_sql_statements(b"TABLE pg_prepared_statements"));
        assert!(may_name_sql_statements(b"explain Execute q"));
        assert!(may_name_sql_statements(b"DEALLOCATE q"));
        assert!(!may_name_sql_statements(
            b"SELECT abalance FROM pgbench_accounts WHERE aid = 1"
        ));
    }

    #[test]
    fn an_sql_definition_is_its_whole_source_or_its_own_statement() {
        let def = |src: &str, name: &str| {
            sql_definition(src.as_bytes(), name.as_bytes()).map(|d| String::from_utf8(d).unwrap())
        };
        assert_eq!(
            def("PREPARE a(int) AS SELECT $1 + 1;", "a").as_deref(),
            Some("PREPARE a(int) AS SELECT $1 + 1;")
        );
        assert_eq!(
            def("/* c */ prepare \"Weird\" (int) as select $1", "Weird").as_deref(),
            Some("/* c */ prepare \"Weird\" (int) as select $1")
        );
        assert_eq!(
            def(
                "PREPARE b AS SELECT ';'\n;  SELECT 7; PREPARE c AS SELECT 2",
                "b"
            )
            .as_deref(),
            Some("PREPARE b AS SELECT ';'")
        );
        assert_eq!(
            def("SELECT 7; PREPARE c AS SELECT 2 ;", "c").as_deref(),
            Some("PREPARE c AS SELECT 2")
        );
        assert_eq!(
            def(
                "PREPARE c AS SELECT 1; DEALLOCATE c; PREPARE c AS SELECT 2",
                "c"
            )
            .as_deref(),
            Some("PREPARE c AS SELECT 2")
        );
        assert_eq!(def("SELECT 1; SELECT 2", "c"), None);
        assert_eq!(def("PREPARE d AS SELECT 1", "c"), None);
    }

    #[test]
    fn startup_settings_spelled_once_need_no_read_back_for_the_next_client() {
        let startup = [("DateStyle".to_string(), "ISO".to_string())];
        let spelled = Settings::from_rows([("datestyle", Some("ISO, MDY"))], "app");
        let mut spellings = Spellings::default();
        let mut first = PgSession::new(&startup);
        let key = first.fresh_startup().cloned().unwrap();
        assert!(spellings.get(1, "shop", &key).is_none());
        first.read_back(spelled.clone());
        assert!(first.fresh_startup().is_none());
        spellings.remember(1, "shop", key.clone(), spelled.clone());
        // Another login or database is another server's spelling.
        assert!(spellings.get(2, "shop", &key).is_none());
        assert!(spellings.get(1, "other", &key).is_none());
        let mut next = PgSession::new(&startup);
        let known = spellings
            .get(1, "shop", next.fresh_startup().unwrap())
            .cloned()
            .unwrap();
        next.read_back(known);
        assert_eq!(next.at_rest(), AtRest::Release);
        assert_eq!(next.settings.get("datestyle"), Some("ISO, MDY"));
        // Bounded.
        for i in 0..Spellings::LIMIT as u64 + 5 {
            spellings.remember(10 + i, "shop", key.clone(), spelled.clone());
        }
        assert!(spellings.known.len() <= Spellings::LIMIT);
        assert!(spellings.get(1, "shop", &key).is_none(), "the oldest went");
    }

    #[test]
    fn scanning_never_panics_on_cut_text() {
        let texts = [
            "SELECT 'unterminated",
            "SELECT $a$ never closed",
            "/* open",
            "SET",
            "SET SESSION",
            "SET a.",
            "E'\\",
            "\"",
            "$",
            "$1",
            "set_config(",
            "PREPARE",
            "PREPARE \"a",
            "EXECUTE",
            "DEALLOCATE PREPARE",
        ];
        for t in texts {
            for cut in 0..=t.len() {
                let _ = scan(&t.as_bytes()[..cut]);
                let _ = sql_names(&t.as_bytes()[..cut]);
                let _ = sql_definition(&t.as_bytes()[..cut], b"a");
            }
        }
    }
}
