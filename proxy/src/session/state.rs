//! Session state that moves with a client, what a backend connection currently has, and the
//! statements that bring one to the other (the replay).
//!
//! System variables and the default schema are learnt from the server's session tracking;
//! user variables and LAST_INSERT_ID() are read back (MariaDB does not track them); one-shot
//! state (`SET insert_id`, `SET TRANSACTION`) is replayed before the next statement and never
//! left behind on a connection another client will use.

use super::stmts::{StmtContext, CONTEXT_VARS};
use super::uservars::{self, UserVars};
use crate::mysql::session::Change;
use std::collections::BTreeMap;

/// How dbproxy treats a system variable the server reported changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VarKind {
    /// Kept for the session: replayed on the next connection.
    Session,
    /// `last_insert_id` / `identity`: LAST_INSERT_ID(), kept apart and replayed when read.
    LastInsertId,
    /// `insert_id`: the next insert's id only.
    InsertId,
    /// `last_gtid`: the GTID of the session's last commit (binlog on), reported after
    /// every write; kept per client with its diagnostics, answered from there when read.
    LastGtid,
    /// Cannot follow the client (replication and tracking controls): pins.
    NotReplayable,
}

/// Classifies a reported system variable.
pub fn var_kind(name: &[u8]) -> VarKind {
    let n = name.to_ascii_lowercase();
    match n.as_slice() {
        b"last_insert_id" | b"identity" => VarKind::LastInsertId,
        b"insert_id" => VarKind::InsertId,
        b"last_gtid" => VarKind::LastGtid,
        b"rand_seed1" | b"rand_seed2" | b"pseudo_thread_id" | b"gtid_seq_no" => {
            VarKind::NotReplayable
        }
        // The server sets these from the default schema at every USE, silently: a value
        // the client assigned would not survive the replay's USE.
        b"character_set_database" | b"collation_database" => VarKind::NotReplayable,
        n if n.starts_with(b"session_track_") => VarKind::NotReplayable,
        _ => VarKind::Session,
    }
}

/// Variables MariaDB changes along with `name` without reporting them: the other name of
/// an alias (`storage_engine` is `default_storage_engine`), a character set and its
/// collation, and variables derived from it (`max_join_size` clears `sql_big_selects`).
/// They are read back whenever `name` is reported changed and they are not.
pub fn coupled(name: &[u8]) -> &'static [&'static str] {
    match name {
        b"character_set_connection" => &["collation_connection"],
        b"collation_connection" => &["character_set_connection"],
        b"character_set_server" => &["collation_server"],
        b"collation_server" => &["character_set_server"],
        b"storage_engine" => &["default_storage_engine"],
        b"default_storage_engine" => &["storage_engine"],
        b"long_query_time" => &["log_slow_query_time"],
        b"log_slow_query_time" => &["long_query_time"],
        b"min_examined_row_limit" => &["log_slow_min_examined_row_limit"],
        b"log_slow_min_examined_row_limit" => &["min_examined_row_limit"],
        b"old_alter_table" => &["alter_algorithm"],
        b"alter_algorithm" => &["old_alter_table"],
        b"tmp_table_size" => &["tmp_memory_table_size"],
        b"tmp_memory_table_size" => &["tmp_table_size"],
        b"slow_query_log" => &["log_slow_query"],
        b"log_slow_query" => &["slow_query_log"],
        b"max_insert_delayed_threads" => &["max_delayed_threads"],
        b"max_delayed_threads" => &["max_insert_delayed_threads"],
        b"log_queries_not_using_indexes" => &["log_slow_filter"],
        b"log_slow_filter" => &["log_queries_not_using_indexes"],
        b"max_join_size" => &["sql_big_selects"],
        b"tx_isolation" => &["transaction_isolation"],
        b"transaction_isolation" => &["tx_isolation"],
        b"tx_read_only" => &["transaction_read_only"],
        b"transaction_read_only" => &["tx_read_only"],
        _ => &[],
    }
}

/// Variables that assigning `name` resets to values that depend on the new one only in
/// part (a character set's default collation, `sql_big_selects` cleared by any
/// `max_join_size`): a replay that sets `name` sets them again after it.
fn resets(name: &[u8]) -> &'static [&'static str] {
    match name {
        b"character_set_connection" => &["collation_connection"],
        b"character_set_server" => &["collation_server"],
        b"max_join_size" => &["sql_big_selects"],
        _ => &[],
    }
}

/// What a backend connection's session holds, as far as dbproxy knows (and, with the
/// test-only check-in verification, checks).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendSession {
    pub schema: Option<Vec<u8>>,
    /// Every system variable reported changed since the connection was opened or reset,
    /// with the value as the server printed it.
    pub vars: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Variable values right after a reset (tracking switched on, `init_query` run).
    pub baseline: BTreeMap<Vec<u8>, Vec<u8>>,
    pub user_vars: UserVars,
    /// User variables set on this connection whose values could not be read back, while
    /// the client was not pinned for them (`exclude_variable_sets`): unset before the
    /// connection goes back to the pool.
    pub unknown_user_vars: std::collections::BTreeSet<Vec<u8>>,
    pub last_insert_id: u64,
    /// A `SET insert_id` is waiting for the next insert on this connection.
    pub insert_id_pending: bool,
    /// A `SET TRANSACTION` is waiting for the next transaction on this connection.
    pub next_transaction_pending: bool,
}

impl BackendSession {
    /// Applies one session-tracking entry that dbproxy caused itself (replays, resets).
    pub fn apply(&mut self, c: &Change<'_>) {
        match c {
            Change::SystemVariable(n, v) => {
                let n = n.to_ascii_lowercase();
                match var_kind(&n) {
                    VarKind::LastInsertId => {
                        self.last_insert_id = parse_u64(v);
                    }
                    VarKind::InsertId => self.insert_id_pending = parse_u64(v) != 0,
                    VarKind::LastGtid => {}
                    _ => {
                        self.vars.insert(n, v.to_vec());
                    }
                }
            }
            Change::Schema(s) => self.schema = Some(s.to_vec()).filter(|s| !s.is_empty()),
            Change::StateChanged | Change::Other(_) => {}
        }
    }

    /// After COM_RESET_CONNECTION or COM_CHANGE_USER: nothing the clients set is left.
    pub fn reset(&mut self, keep_schema: bool) {
        if !keep_schema {
            self.schema = None;
        }
        self.vars.clear();
        self.user_vars.clear();
        self.unknown_user_vars.clear();
        self.last_insert_id = 0;
        self.insert_id_pending = false;
        self.next_transaction_pending = false;
    }

    /// The current value of a variable (changed, else its baseline).
    pub fn var(&self, name: &str) -> Option<&[u8]> {
        self.vars
            .get(name.as_bytes())
            .or_else(|| self.baseline.get(name.as_bytes()))
            .map(Vec::as_slice)
    }
}

fn parse_u64(v: &[u8]) -> u64 {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The state a client expects on whichever connection serves it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientState {
    pub schema: Option<Vec<u8>>,
    /// System variables the client changed, as the server reported them.
    pub vars: BTreeMap<Vec<u8>, Vec<u8>>,
    pub user_vars: UserVars,
    pub last_insert_id: u64,
    /// A `SET insert_id` not consumed yet (its value).
    pub insert_id: Option<u64>,
    /// `SET TRANSACTION ...` statements not consumed yet (their texts, in order: each may
    /// set another characteristic of the next transaction).
    pub next_transaction: Vec<Vec<u8>>,
}

impl ClientState {
    /// The context a statement prepared now is bound to.
    pub fn stmt_context(&self) -> StmtContext {
        StmtContext {
            schema: self.schema.clone(),
            vars: CONTEXT_VARS.map(|n| self.vars.get(n.as_bytes()).cloned()),
        }
    }

    /// The client's writes do not reach replicas: it turned the binary log off for its
    /// session (`sql_log_bin = 0`) or marks its events not to replicate
    /// (`skip_replication = 1`).
    pub fn writes_unreplicated(&self) -> bool {
        let is = |name: &str, values: [&str; 2]| {
            self.vars.get(name.as_bytes()).is_some_and(|v| {
                values
                    .iter()
                    .any(|w| v.trim_ascii().eq_ignore_ascii_case(w.as_bytes()))
            })
        };
        is("sql_log_bin", ["0", "OFF"]) || is("skip_replication", ["1", "ON"])
    }
}

/// What it takes to give a backend connection a client's session state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replay {
    /// The client has no default database but the connection has one: only a reset clears
    /// it (COM_CHANGE_USER, which also clears everything else; plan again afterwards).
    pub reset: bool,
    /// One `SET` statement: system variables, user variables, last_insert_id, insert_id.
    pub set: Option<String>,
    /// A default database to select.
    pub init_db: Option<Vec<u8>>,
    /// `SET TRANSACTION` statements to repeat.
    pub next_transaction: Vec<Vec<u8>>,
    /// The SET assigns system variables (which the server may refuse).
    system: bool,
    /// Variables the plan sets back to DEFAULT: their new values join the baseline.
    defaulted: Vec<Vec<u8>>,
    /// What the connection will hold once the plan ran (apply with [`Replay::done`]).
    user_vars: Option<UserVars>,
    last_insert_id: Option<u64>,
    insert_id: bool,
}

impl Replay {
    pub fn is_empty(&self) -> bool {
        !self.reset
            && self.set.is_none()
            && self.init_db.is_none()
            && self.next_transaction.is_empty()
    }

    /// Whether the plan can be sent ahead of the client's statement without waiting for its
    /// answer: one SET of assignments the server cannot refuse (user variables,
    /// last_insert_id, insert_id). Anything that may fail (system variables, a schema, a
    /// reset) must succeed before the client's statement runs.
    pub fn pipelinable(&self) -> bool {
        self.set.is_some()
            && !self.system
            && !self.reset
            && self.init_db.is_none()
            && self.next_transaction.is_empty()
    }

    /// Records on `backend` what the plan set that session tracking does not report.
    pub fn done(&self, backend: &mut BackendSession) {
        for n in &self.defaulted {
            // A variable set back to DEFAULT is at the session's own value again: it joins
            // the baseline (else every later borrower would set it to DEFAULT once more).
            if let Some(v) = backend.vars.get(n) {
                backend.baseline.insert(n.clone(), v.clone());
            }
        }
        if let Some(u) = &self.user_vars {
            backend.user_vars = u.clone();
        }
        if let Some(id) = self.last_insert_id {
            backend.last_insert_id = id;
        }
        if self.insert_id {
            backend.insert_id_pending = true;
        }
        if !self.next_transaction.is_empty() {
            backend.next_transaction_pending = true;
        }
    }
}

/// What the statement about to run needs of the connection beyond the session state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    /// It reads LAST_INSERT_ID(), or may change it (its value is read back afterwards, which
    /// is only the client's if the connection had the client's value before).
    pub last_insert_id: bool,
}

/// Plans the statements that turn `backend` into what `client` expects. With `full`, the
/// whole session (the client just got this connection); otherwise only what is replayed
/// lazily (LAST_INSERT_ID(), one-shots) on a connection the client already holds.
pub fn plan(client: &ClientState, backend: &BackendSession, needs: Needs, full: bool) -> Replay {
    let mut sets: Vec<String> = Vec::new();
    let mut r = Replay::default();
    if full {
        if client.schema.is_none() && backend.schema.is_some() {
            return Replay {
                reset: true,
                ..Default::default()
            };
        }
        r.defaulted = system_variables(client, backend, &mut sets);
        r.system = !sets.is_empty();
        let u = uservars::diff(&client.user_vars, &backend.user_vars);
        if !u.is_empty() {
            sets.extend(u);
            let mut now = client.user_vars.clone();
            for (k, v) in &backend.user_vars {
                if !v.is_unset() && !now.contains_key(k) {
                    now.insert(k.clone(), uservars::UserValue::unset());
                }
            }
            r.user_vars = Some(now);
        }
        r.init_db = match &client.schema {
            Some(s) if backend.schema.as_deref() != Some(s) => Some(s.clone()),
            _ => None,
        };
        if !backend.next_transaction_pending {
            r.next_transaction = client.next_transaction.clone();
        }
    }
    if needs.last_insert_id && backend.last_insert_id != client.last_insert_id {
        sets.push(format!("last_insert_id = {}", client.last_insert_id));
        r.last_insert_id = Some(client.last_insert_id);
    }
    if let Some(id) = client.insert_id {
        if !backend.insert_id_pending {
            sets.push(format!("insert_id = {id}"));
            r.insert_id = true;
        }
    }
    if !sets.is_empty() {
        r.set = Some(format!("SET {}", sets.join(", ")));
    }
    r
}

/// `SESSION name = value` assignments for every system variable that differs; returns the
/// names set to DEFAULT.
fn system_variables(
    client: &ClientState,
    backend: &BackendSession,
    sets: &mut Vec<String>,
) -> Vec<Vec<u8>> {
    let mut defaulted = Vec::new();
    let want = |k: &Vec<u8>| client.vars.get(k).or_else(|| backend.baseline.get(k));
    // The common case: nothing differs.
    if client
        .vars
        .iter()
        .all(|(k, v)| backend.vars.get(k).or_else(|| backend.baseline.get(k)) == Some(v))
        && backend.vars.iter().all(|(k, v)| want(k) == Some(v))
    {
        return defaulted;
    }
    let mut names: Vec<&Vec<u8>> = client.vars.keys().chain(backend.vars.keys()).collect();
    names.sort();
    names.dedup();
    let mut assigned = Vec::new();
    for name in names {
        let have = backend
            .vars
            .get(name)
            .or_else(|| backend.baseline.get(name));
        let target = want(name);
        if target == have {
            continue;
        }
        let value = match target {
            // The server reports a NULL character set as an empty value.
            Some(v) if v.is_empty() && name.starts_with(b"character_set_") => "NULL".to_string(),
            Some(v) => sql_value(v),
            None => {
                defaulted.push(name.clone());
                "DEFAULT".to_string()
            }
        };
        assigned.push(name.clone());
        sets.push(format!("SESSION {} = {}", sql_ident(name), value));
    }
    // Setting a variable changes those coupled to it (character_set_connection resets
    // collation_connection, max_join_size clears sql_big_selects): put the values the
    // client expects back after it.
    let mut coupled_sets = Vec::new();
    for name in &assigned {
        for c in resets(name) {
            let c = c.as_bytes().to_vec();
            if assigned.contains(&c) || coupled_sets.iter().any(|(n, _)| *n == c) {
                continue;
            }
            if let Some(v) = want(&c) {
                coupled_sets.push((c, v));
            }
        }
    }
    for (name, v) in coupled_sets {
        sets.push(format!("SESSION {} = {}", sql_ident(&name), sql_value(v)));
    }
    defaulted
}

/// The statements that give a connection a statement's prepare-time context (schema,
/// sql_mode, character sets) when it differs from what the connection has now: `(SET, USE)`.
pub fn context_switch(
    ctx: &StmtContext,
    backend: &BackendSession,
) -> Option<(Option<String>, Option<Vec<u8>>)> {
    let mut sets = Vec::new();
    for (i, name) in CONTEXT_VARS.iter().enumerate() {
        let want = ctx.vars[i]
            .as_deref()
            .or_else(|| backend.baseline.get(name.as_bytes()).map(Vec::as_slice));
        if want != backend.var(name) {
            match want {
                Some(v) => sets.push(format!("SESSION {name} = {}", sql_value(v))),
                None => sets.push(format!("SESSION {name} = DEFAULT")),
            }
        }
    }
    let db = match &ctx.schema {
        Some(s) if backend.schema.as_ref() != Some(s) => Some(s.clone()),
        _ => None,
    };
    if sets.is_empty() && db.is_none() {
        return None;
    }
    let set = (!sets.is_empty()).then(|| format!("SET {}", sets.join(", ")));
    Some((set, db))
}

/// `SET TRANSACTION` with the session's own characteristics: cancels a pending one-shot
/// `SET TRANSACTION` before the connection serves another client.
pub fn neutral_next_transaction(backend: &BackendSession) -> String {
    let iso = backend
        .var("tx_isolation")
        .or_else(|| backend.var("transaction_isolation"))
        .map(|v| String::from_utf8_lossy(v).replace('-', " "))
        .filter(|v| v.bytes().all(|b| b.is_ascii_uppercase() || b == b' '))
        .unwrap_or_else(|| "REPEATABLE READ".into());
    let read_only = backend
        .var("tx_read_only")
        .or_else(|| backend.var("transaction_read_only"))
        .is_some_and(|v| v == b"ON" || v == b"1");
    format!(
        "SET TRANSACTION ISOLATION LEVEL {iso}, {}",
        if read_only { "READ ONLY" } else { "READ WRITE" }
    )
}

/// A variable name for SQL: only names made of identifier characters are written bare.
fn sql_ident(name: &[u8]) -> String {
    let s = String::from_utf8_lossy(name);
    if s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
    {
        s.into_owned()
    } else {
        format!("`{}`", s.replace('`', "``"))
    }
}

/// A value as the server printed it, written back so that the server reads the same value
/// whatever the session's sql_mode (ANSI_QUOTES, NO_BACKSLASH_ESCAPES): numbers bare, NULL
/// as NULL, plain text in single quotes, anything else as a hex string literal.
pub fn sql_value(v: &[u8]) -> String {
    let numeric = !v.is_empty()
        && v.iter()
            .enumerate()
            .all(|(i, &b)| b.is_ascii_digit() || (b == b'-' && i == 0) || b == b'.')
        && v.iter().any(u8::is_ascii_digit);
    if numeric || v == b"NULL" {
        return String::from_utf8_lossy(v).into_owned();
    }
    if v.iter()
        .all(|&b| (0x20..0x7f).contains(&b) && b != b'\'' && b != b'\\')
    {
        return format!("'{}'", String::from_utf8_lossy(v));
    }
    format!("X'{}'", hex::encode(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::uservars::UserValue;

    fn backend() -> BackendSession {
        let mut b = BackendSession::default();
        b.baseline
            .insert(b"wait_timeout".to_vec(), b"4321".to_vec());
        b.baseline
            .insert(b"sql_mode".to_vec(), b"STRICT_TRANS_TABLES".to_vec());
        b.vars = b.baseline.clone();
        b
    }

    #[test]
    fn unreplicated_writes_are_known_from_the_tracked_variables() {
        let mut c = ClientState::default();
        assert!(!c.writes_unreplicated());
        for (name, value, off) in [
            ("sql_log_bin", "OFF", true),
            ("sql_log_bin", "0", true),
            ("sql_log_bin", "ON", false),
            ("skip_replication", "ON", true),
            ("skip_replication", "OFF", false),
        ] {
            c.vars.clear();
            c.vars.insert(name.into(), value.into());
            assert_eq!(c.writes_unreplicated(), off, "{name} = {value}");
        }
    }

    #[test]
    fn replay_sets_restores_and_selects() {
        let mut b = backend();
        b.vars.insert(b"time_zone".to_vec(), b"+01:00".to_vec());
        b.vars.insert(b"wait_timeout".to_vec(), b"100".to_vec());
        b.schema = Some(b"a".to_vec());
        let mut c = ClientState::default();
        c.vars
            .insert(b"sql_mode".to_vec(), b"ANSI_QUOTES,O'K".to_vec());
        c.schema = Some(b"b".to_vec());
        let r = plan(&c, &b, Needs::default(), true);
        assert_eq!(
            r.set.as_deref(),
            Some("SET SESSION sql_mode = X'414e53495f51554f5445532c4f274b', SESSION time_zone = DEFAULT, SESSION wait_timeout = 4321")
        );
        assert_eq!(r.init_db.as_deref(), Some(&b"b"[..]));
        assert!(!r.reset);
        assert!(!r.pipelinable(), "system variables may be refused");
        // Once set to DEFAULT (and reported so), time_zone is at the baseline: not again.
        let mut after = b.clone();
        after.vars.insert(b"time_zone".to_vec(), b"SYSTEM".to_vec());
        after
            .vars
            .insert(b"wait_timeout".to_vec(), b"4321".to_vec());
        after
            .vars
            .insert(b"sql_mode".to_vec(), b"ANSI_QUOTES,O'K".to_vec());
        after.schema = Some(b"b".to_vec());
        r.done(&mut after);
        assert!(plan(&c, &after, Needs::default(), true).is_empty());
        c.schema = None;
        assert!(plan(&c, &b, Needs::default(), true).reset);
        let same = BackendSession {
            schema: Some(b"a".to_vec()),
            ..backend()
        };
        let c = ClientState {
            schema: Some(b"a".to_vec()),
            ..Default::default()
        };
        assert!(plan(&c, &same, Needs::default(), true).is_empty());
    }

    #[test]
    fn user_variables_last_insert_id_and_one_shots() {
        let mut b = backend();
        b.user_vars.insert(b"other".to_vec(), UserValue::int("7"));
        b.last_insert_id = 9;
        let mut c = ClientState::default();
        c.user_vars.insert(b"me".to_vec(), UserValue::int("1"));
        c.last_insert_id = 42;
        c.insert_id = Some(77);
        c.next_transaction = vec![
            b"SET TRANSACTION READ ONLY".to_vec(),
            b"SET TRANSACTION ISOLATION LEVEL READ COMMITTED".to_vec(),
        ];
        // LAST_INSERT_ID() is replayed only for a statement that reads it.
        let r = plan(&c, &b, Needs::default(), true);
        assert_eq!(
            r.set.as_deref(),
            Some("SET @`me` = 1, @`other` = CAST(NULL AS BINARY), insert_id = 77")
        );
        assert_eq!(r.next_transaction, c.next_transaction);
        let mut after = b.clone();
        r.done(&mut after);
        assert!(uservars::same(&after.user_vars, &c.user_vars));
        assert!(after.insert_id_pending && after.next_transaction_pending);
        let r = plan(
            &c,
            &after,
            Needs {
                last_insert_id: true,
            },
            false,
        );
        assert_eq!(r.set.as_deref(), Some("SET last_insert_id = 42"));
        r.done(&mut after);
        assert!(plan(
            &c,
            &after,
            Needs {
                last_insert_id: true
            },
            true
        )
        .is_empty());
    }

    #[test]
    fn a_variable_that_changes_another_is_followed_by_it() {
        let mut b = BackendSession::default();
        b.vars.insert(b"max_join_size".to_vec(), b"1000".to_vec());
        b.vars.insert(b"sql_big_selects".to_vec(), b"ON".to_vec());
        let mut c = ClientState::default();
        c.vars.insert(b"max_join_size".to_vec(), b"2000".to_vec());
        c.vars.insert(b"sql_big_selects".to_vec(), b"ON".to_vec());
        // Setting max_join_size clears sql_big_selects on the server: set it again after.
        let r = plan(&c, &b, Needs::default(), true);
        assert_eq!(
            r.set.as_deref(),
            Some("SET SESSION max_join_size = 2000, SESSION sql_big_selects = 'ON'")
        );
        // Two names of one variable carry one value: both are set, in either order.
        c.vars.clear();
        b.vars.clear();
        b.vars
            .insert(b"default_storage_engine".to_vec(), b"Aria".to_vec());
        b.vars.insert(b"storage_engine".to_vec(), b"Aria".to_vec());
        c.vars
            .insert(b"default_storage_engine".to_vec(), b"MEMORY".to_vec());
        c.vars
            .insert(b"storage_engine".to_vec(), b"MEMORY".to_vec());
        let r = plan(&c, &b, Needs::default(), true);
        assert_eq!(
            r.set.as_deref(),
            Some(
                "SET SESSION default_storage_engine = 'MEMORY', SESSION storage_engine = 'MEMORY'"
            )
        );
    }

    #[test]
    fn connection_collation_follows_its_character_set() {
        let mut b = BackendSession::default();
        b.baseline
            .insert(b"character_set_connection".to_vec(), b"utf8mb4".to_vec());
        b.baseline.insert(
            b"collation_connection".to_vec(),
            b"utf8mb4_unicode_ci".to_vec(),
        );
        b.vars = b.baseline.clone();
        b.vars
            .insert(b"character_set_connection".to_vec(), b"latin1".to_vec());
        let r = plan(&ClientState::default(), &b, Needs::default(), true);
        assert_eq!(
            r.set.as_deref(),
            Some("SET SESSION character_set_connection = 'utf8mb4', SESSION collation_connection = 'utf8mb4_unicode_ci'")
        );
    }

    #[test]
    fn prepare_context_and_neutral_transaction() {
        let mut b = backend();
        b.schema = Some(b"t2".to_vec());
        let ctx = StmtContext {
            schema: Some(b"t1".to_vec()),
            vars: Default::default(),
        };
        assert_eq!(context_switch(&ctx, &b), Some((None, Some(b"t1".to_vec()))));
        let mut ansi = ctx.clone();
        ansi.vars[0] = Some(b"ANSI".to_vec());
        b.schema = Some(b"t1".to_vec());
        assert_eq!(
            context_switch(&ansi, &b),
            Some((Some("SET SESSION sql_mode = 'ANSI'".into()), None))
        );
        assert_eq!(context_switch(&ctx, &b), None);
        b.baseline
            .insert(b"tx_isolation".to_vec(), b"READ-COMMITTED".to_vec());
        assert_eq!(
            neutral_next_transaction(&b),
            "SET TRANSACTION ISOLATION LEVEL READ COMMITTED, READ WRITE"
        );
    }

    #[test]
    fn values_are_written_back_faithfully() {
        assert_eq!(sql_value(b"4321"), "4321");
        assert_eq!(sql_value(b"-1.5"), "-1.5");
        assert_eq!(sql_value(b"OFF"), "'OFF'");
        assert_eq!(sql_value(b"+01:00"), "'+01:00'");
        assert_eq!(sql_value(b"a\\b"), "X'615c62'");
        assert_eq!(sql_value(b""), "''");
        assert_eq!(sql_ident(b"weird`name"), "`weird``name`");
        assert_eq!(var_kind(b"INSERT_ID"), VarKind::InsertId);
        assert_eq!(var_kind(b"session_track_schema"), VarKind::NotReplayable);
        assert_eq!(var_kind(b"time_zone"), VarKind::Session);
        assert_eq!(var_kind(b"last_gtid"), VarKind::LastGtid);
    }
}
