//! The client session, sans-IO: what a client's commands need from a backend connection,
//! what dbproxy learns from the responses, and the decision at the end of every response
//! (keep the connection, or give it back and what to do first). The driver (`conn/`) owns
//! the sockets and feeds this module; nothing here does I/O.
//!
//! Rooms: `sql` (what a statement's text does), `pins`, `state` (session state, backend
//! records, replay plans), `uservars`, `diag` (ROW_COUNT(), FOUND_ROWS(), warnings),
//! `stmts` (prepared statements), `login` (the connection phase).

pub mod answer;
pub mod borrowing;
pub mod command;
pub mod connection_phase;
pub mod cursor;
pub mod diag;
pub mod execute;
pub mod idle;
pub mod kill;
pub mod login;
pub mod pg_lost_tx;
pub mod pg_sql_statements;
pub mod pg_statements;
pub mod pin_reason;
pub mod pins;
pub mod plan;
pub mod postgres;
pub mod querylog;
pub mod relaying;
pub mod sql;
pub mod state;
pub mod statement_watch;
pub mod stmts;
pub mod uservars;

use crate::auth::User;
use crate::mysql::consts::{cap, errcode, status};
use crate::mysql::resultset::TextResult;
use crate::mysql::session::Change;
use crate::mysql::wire::ErrPacket;
use diag::{Diag, Ending};
use pins::{PinReason, Pins};
use sql::{FoundRows, SqlInfo};
use state::{BackendSession, ClientState, Needs, Replay, VarKind};
use std::sync::Arc;
use stmts::ClientStmts;

/// Pins that started and ended with an event (the driver counts them).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PinChanges {
    pub started: Vec<PinReason>,
    pub ended: Vec<PinReason>,
}

impl PinChanges {
    fn merge(&mut self, (s, e): (Vec<PinReason>, Vec<PinReason>)) {
        self.started.extend(s);
        self.ended.extend(e);
    }

    fn merge_one(&mut self, other: PinChanges) {
        self.merge((other.started, other.ended));
    }
}

/// A query dbproxy pipelines after a client's statement, on the same connection, to learn
/// what session tracking does not report: user variables, LAST_INSERT_ID(), FOUND_ROWS(),
/// variables set as `@@name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadBack {
    pub sql: String,
    last_insert_id: bool,
    found_rows: bool,
    collation: bool,
    insert_id: bool,
    vars: Vec<Vec<u8>>,
    /// Session variables, read as the server prints them (as session tracking would).
    sys_vars: Vec<Vec<u8>>,
    timestamp_default: bool,
    /// Reads variables coupled to those a statement changed: what it learns needs no
    /// further read-back.
    coupled: bool,
}

/// How a read-back reads a session variable: as `@@session.name` where the variable exists
/// on every MariaDB and prints as session tracking does (character sets, collations,
/// engines), else from information_schema (NULL when the server has no such variable, and
/// ON/OFF as tracking prints them), which costs more and clears the warning list.
fn read_expr(name: &[u8]) -> String {
    let n = String::from_utf8_lossy(name);
    if name.starts_with(b"character_set_")
        || name.starts_with(b"collation_")
        || name.ends_with(b"storage_engine")
    {
        format!("@@session.{n}")
    } else {
        format!(
            "(SELECT SESSION_VALUE FROM information_schema.SYSTEM_VARIABLES \
             WHERE VARIABLE_NAME = '{}' AND VARIABLE_SCOPE <> 'GLOBAL')",
            n.to_ascii_uppercase()
        )
    }
}

impl ReadBack {
    /// The query reads a table (information_schema), which clears the server's warning
    /// list: the client's list is captured before it is sent, so it is not pipelined.
    pub fn names_tables(&self) -> bool {
        self.sys_vars.iter().any(|n| read_expr(n).starts_with('('))
    }

    /// Reads `names` (session variables) back after the statement that changed them.
    fn variables(names: Vec<Vec<u8>>) -> ReadBack {
        let items: Vec<String> = names.iter().map(|n| read_expr(n)).collect();
        ReadBack {
            sql: format!("SELECT {}", items.join(", ")),
            last_insert_id: false,
            found_rows: false,
            collation: false,
            insert_id: false,
            vars: Vec::new(),
            sys_vars: names,
            timestamp_default: false,
            coupled: true,
        }
    }

    /// What a statement needs read back, if anything; `insert_id_pending`: the client has
    /// a `SET insert_id` waiting, which only an insert that generates a value consumes.
    pub fn for_statement(info: &SqlInfo, insert_id_pending: bool) -> Option<ReadBack> {
        let vars = if info.assigns_user_vars {
            info.user_vars.clone()
        } else {
            Vec::new()
        };
        let last_insert_id = info.changes_last_insert_id;
        let found_rows = info.found_rows == FoundRows::ReadBack;
        let collation = info.charset_change;
        let insert_id = insert_id_pending && info.inserts;
        let sys_vars: Vec<Vec<u8>> = info
            .untracked_vars
            .iter()
            .filter(|n| n.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'_'))
            .cloned()
            .collect();
        if vars.is_empty()
            && sys_vars.is_empty()
            && !last_insert_id
            && !found_rows
            && !collation
            && !insert_id
        {
            return None;
        }
        let mut sql = String::from("SELECT ");
        let mut items: Vec<&str> = Vec::new();
        if last_insert_id {
            items.push("LAST_INSERT_ID()");
        }
        if found_rows {
            items.push("FOUND_ROWS()");
        }
        if collation {
            items.push("@@session.collation_connection");
        }
        if insert_id {
            items.push("@@session.insert_id");
        }
        let reads: Vec<String> = sys_vars.iter().map(|n| read_expr(n)).collect();
        items.extend(reads.iter().map(String::as_str));
        sql.push_str(&items.join(", "));
        for v in &vars {
            uservars::push_read_back(&mut sql, v);
        }
        Some(ReadBack {
            sql,
            last_insert_id,
            found_rows,
            collation,
            insert_id,
            vars,
            sys_vars,
            timestamp_default: info.timestamp_default,
            coupled: false,
        })
    }
}

/// Why a read-back pins when it set a variable that cannot follow the client.
const NOT_REPLAYABLE: &str = "a variable that cannot follow the client was set";

/// How a client's statement went, as the relay saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub ending: Ending,
    /// Status flags of the last OK/EOF (None after an ERR).
    pub status: Option<u16>,
}

impl Outcome {
    /// A statement that failed (its ERR went to the client).
    pub const FAILED: Outcome = Outcome {
        ending: Ending::Err,
        status: None,
    };

    pub fn failed(&self) -> bool {
        self.ending == Ending::Err
    }
}

/// What session tracking said in a response.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tracked {
    /// The server reported a state change no variable or schema entry explains.
    pub unexplained: bool,
    /// The client set a variable that cannot follow it.
    pub not_replayable: bool,
}

/// What to run on a connection before it goes back to the pool.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Release {
    /// Read the client's warning list back first (`SHOW WARNINGS`).
    pub capture_warnings: bool,
    /// Then these statements (clearing one-shots meant for this client only).
    pub statements: Vec<String>,
}

impl Release {
    pub fn is_empty(&self) -> bool {
        !self.capture_warnings && self.statements.is_empty()
    }
}

/// The session state of one client.
pub struct ClientSession {
    pub user: Arc<User>,
    /// Capabilities agreed with the client.
    pub caps: u32,
    /// MariaDB's extended capabilities agreed with the client.
    pub ext_caps: u32,
    pub collation: u8,
    pub state: ClientState,
    pub diag: Diag,
    pub pins: Pins,
    pub stmts: ClientStmts,
    /// Status flags as the client last saw them.
    pub status: u16,
    /// The client statement with an open cursor, and one with long data sent.
    pub cursor: Option<u32>,
    pub long_data: Option<u32>,
    /// `session_pinning_filters = ["exclude_variable_sets"]`: user variables that could
    /// not be read back do not pin.
    pub exclude_variable_sets: bool,
    /// Variables learnt since [`ClientSession::coupled_read_back`] last ran.
    learnt: Vec<Vec<u8>>,
}

impl ClientSession {
    pub fn new(user: Arc<User>, caps: u32, collation: u8, schema: Option<Vec<u8>>) -> Self {
        ClientSession {
            user,
            caps,
            ext_caps: 0,
            collation,
            state: ClientState {
                schema,
                ..Default::default()
            },
            diag: Diag::default(),
            pins: Pins::default(),
            stmts: ClientStmts::default(),
            status: status::AUTOCOMMIT,
            cursor: None,
            long_data: None,
            exclude_variable_sets: false,
            learnt: Vec::new(),
        }
    }

    /// Whether the client may give its backend connection back now: no transaction open
    /// (the server's IN_TRANS flag; with autocommit off the next statement on a table opens
    /// one, on whichever connection serves it, autocommit being replayed like any
    /// variable), nothing pinned.
    pub fn releasable(&self) -> bool {
        self.status & status::IN_TRANS == 0 && !self.pins.is_pinned()
    }

    /// The client starts afresh (COM_RESET_CONNECTION keeps the schema, COM_CHANGE_USER
    /// sets its own). Returns the pins that ended.
    pub fn reset(&mut self, schema: Option<Vec<u8>>) -> Vec<PinReason> {
        self.state = ClientState {
            schema,
            ..Default::default()
        };
        // As MariaDB: FOUND_ROWS() survives a reset or change of user; the rest starts over.
        let found_rows = self.diag.found_rows;
        self.diag = Diag::default();
        self.diag.found_rows = found_rows;
        self.stmts = ClientStmts::default();
        self.status = status::AUTOCOMMIT;
        self.cursor = None;
        self.long_data = None;
        self.learnt.clear();
        self.pins.clear()
    }

    /// The connection the client held failed during a command; the client was told with
    /// error `code`. What lived only on that connection is gone: an open transaction, and
    /// what pinned it (locks, temporary tables, cursors). The rest of the session (schema,
    /// variables, prepared statements) is replayed on the next connection. Returns the
    /// pins that ended.
    pub fn connection_lost(&mut self, code: u16, message: &str) -> Vec<PinReason> {
        self.status &= !(status::IN_TRANS | status::IN_TRANS_READONLY);
        self.cursor = None;
        self.long_data = None;
        self.diag.lost(code, message);
        self.pins.clear()
    }

    /// What a client whose statement was in flight on a connection that failed (`why`) is
    /// told. Its session goes on; a transaction it had open is gone (rolled back by the
    /// server, or with it), which SQLSTATE 40001 says to every driver.
    pub fn lost_error(&self, why: &str) -> ErrPacket {
        if self.status & status::IN_TRANS != 0 {
            ErrPacket::new(
                errcode::PROXY_BACKEND_LOST,
                "40001",
                format!("(dbproxy) the database connection failed during the transaction, which was rolled back; the session stays open: {why}"),
            )
        } else {
            ErrPacket::new(
                errcode::PROXY_BACKEND_LOST,
                "HY000",
                format!("(dbproxy) the database connection failed during the statement, whose outcome is unknown; the session stays open: {why}"),
            )
        }
    }

    /// The statements that give `backend` this client's session before a statement that
    /// needs `needs`; `fresh`: the client just got this connection.
    pub fn replay(&self, backend: &BackendSession, needs: Needs, fresh: bool) -> Replay {
        state::plan(&self.state, backend, needs, fresh)
    }

    /// A replay (or anything else of dbproxy's) ran on the connection the client holds.
    pub fn backend_used(&mut self) {
        self.diag.backend_used();
    }

    /// The client now holds a connection it did not hold for its previous statement.
    pub fn moved(&mut self) {
        self.diag.moved();
    }

    /// Learns from the session-tracking entries of an OK packet of the client's own
    /// statement `info`, on `backend`.
    pub fn learn_tracking(
        &mut self,
        info: &SqlInfo,
        changes: &[Change<'_>],
        backend: &mut BackendSession,
    ) -> Tracked {
        let mut t = Tracked::default();
        let mut changed = false;
        let mut explained = false;
        for c in changes {
            match c {
                Change::StateChanged => changed = true,
                Change::Other(_) => {}
                Change::Schema(s) => {
                    self.state.schema = Some(s.to_vec()).filter(|s| !s.is_empty());
                    backend.schema = self.state.schema.clone();
                    explained = true;
                }
                Change::SystemVariable(n, v) => {
                    let name = n.to_ascii_lowercase();
                    if info.statement_vars.contains(&name) {
                        // SET STATEMENT ... FOR: the server reports the temporary value and
                        // restores the old one silently.
                        explained = true;
                        continue;
                    }
                    if self.learn_variable(name, v, info.timestamp_default, backend) {
                        explained = true;
                    } else {
                        t.not_replayable = true;
                    }
                }
            }
        }
        let explained_by_text = info.explains_change || info.assigns_user_vars;
        t.unexplained = changed && (info.opaque || !(explained || explained_by_text));
        t
    }

    /// Learns a session variable's value as the server printed it (`name` lowercased);
    /// false: the variable cannot follow the client.
    fn learn_variable(
        &mut self,
        name: Vec<u8>,
        v: &[u8],
        timestamp_default: bool,
        backend: &mut BackendSession,
    ) -> bool {
        if !self.learnt.contains(&name) {
            self.learnt.push(name.clone());
        }
        match state::var_kind(&name) {
            VarKind::Session => {
                if name == b"timestamp" && timestamp_default {
                    // The server reports the old value; the clock runs again.
                    self.state.vars.remove(&name);
                    backend.vars.remove(&name);
                } else {
                    self.state.vars.insert(name.clone(), v.to_vec());
                    backend.vars.insert(name, v.to_vec());
                }
            }
            VarKind::LastInsertId => {
                let id = String::from_utf8_lossy(v).trim().parse().unwrap_or(0);
                self.state.last_insert_id = id;
                backend.last_insert_id = id;
            }
            VarKind::InsertId => {
                let id = String::from_utf8_lossy(v).trim().parse().unwrap_or(0);
                self.state.insert_id = (id != 0).then_some(id);
                backend.insert_id_pending = id != 0;
            }
            VarKind::LastGtid => self.diag.set_last_gtid(v),
            VarKind::NotReplayable => return false,
        }
        true
    }

    /// Learns from the answer to a [`ReadBack`]; an error or an odd answer pins (the values
    /// stay on that connection then).
    pub fn learn_read_back(
        &mut self,
        rb: &ReadBack,
        answer: Result<&TextResult, &ErrPacket>,
        backend: &mut BackendSession,
    ) -> PinChanges {
        self.diag.backend_used();
        if rb.names_tables() {
            self.diag.list_cleared();
        }
        let mut changes = PinChanges::default();
        let learnt = answer
            .map_err(|e| e.to_string())
            .and_then(|r| self.apply_read_back(rb, r, backend));
        if rb.coupled {
            self.learnt.clear();
        }
        if let Err(why) = learnt {
            let reason = if rb.vars.is_empty() || why == NOT_REPLAYABLE {
                PinReason::Unclassified
            } else {
                PinReason::UserVariable
            };
            if reason == PinReason::UserVariable && self.exclude_variable_sets {
                // Not pinned: the values stay on this connection only while the client
                // holds it; elsewhere they read as unset, and the connection is cleared of
                // them before it serves anyone else.
                tracing::debug!("read-back failed, not pinning (exclude_variable_sets): {why}");
                for name in &rb.vars {
                    self.state.user_vars.remove(name);
                    backend.user_vars.remove(name);
                    backend.unknown_user_vars.insert(name.clone());
                }
            } else {
                tracing::debug!("read-back failed, pinning: {why}");
                if self.pins.start(reason) {
                    changes.started.push(reason);
                }
            }
        }
        changes
    }

    fn apply_read_back(
        &mut self,
        rb: &ReadBack,
        r: &TextResult,
        backend: &mut BackendSession,
    ) -> Result<(), String> {
        let [row] = r.rows.as_slice() else {
            return Err("not one row".into());
        };
        let values = crate::mysql::resultset::parse_text_row(row, r.columns.len())
            .map_err(|e| e.to_string())?;
        let mut at = 0;
        let num = |v: Option<&[u8]>| -> Result<u64, String> {
            std::str::from_utf8(v.unwrap_or(b"0"))
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| "a number".to_string())
        };
        if rb.last_insert_id {
            let id = num(values.get(at).copied().flatten())?;
            self.state.last_insert_id = id;
            backend.last_insert_id = id;
            at += 1;
        }
        if rb.found_rows {
            self.diag
                .set_found_rows(num(values.get(at).copied().flatten())?);
            at += 1;
        }
        if rb.collation {
            let c = values
                .get(at)
                .copied()
                .flatten()
                .ok_or("no collation_connection")?
                .to_vec();
            self.learn_variable(b"collation_connection".to_vec(), &c, false, backend);
            at += 1;
        }
        if rb.insert_id {
            if num(values.get(at).copied().flatten())? == 0 {
                // The insert generated a value: the pending insert_id was used.
                self.state.insert_id = None;
                backend.insert_id_pending = false;
            }
            at += 1;
        }
        let mut replayable = true;
        for name in &rb.sys_vars {
            // NULL: no such session variable (the statement failed).
            if let Some(v) = values.get(at).copied().flatten() {
                replayable &= self.learn_variable(name.clone(), v, rb.timestamp_default, backend);
            }
            at += 1;
        }
        for name in &rb.vars {
            let cols = values
                .get(at..at + uservars::COLUMNS_PER_VAR)
                .ok_or("too few columns")?;
            let col = r.columns.get(at).ok_or("too few column definitions")?;
            let v = uservars::parse_value(col, cols).map_err(|e| e.to_string())?;
            backend.unknown_user_vars.remove(name);
            if v.is_unset() {
                self.state.user_vars.remove(name);
                backend.user_vars.remove(name);
            } else {
                self.state.user_vars.insert(name.clone(), v.clone());
                backend.user_vars.insert(name.clone(), v);
            }
            at += uservars::COLUMNS_PER_VAR;
        }
        if replayable {
            Ok(())
        } else {
            Err(NOT_REPLAYABLE.into())
        }
    }

    /// Applies a statement's effects once its response is through: pins, transaction state,
    /// diagnostics, one-shots. `text`: the statement's SQL (empty for commands without
    /// one); `tracked`: what its session tracking said.
    pub fn after_statement(
        &mut self,
        info: &SqlInfo,
        text: &[u8],
        outcome: Outcome,
        tracked: Tracked,
        backend: &mut BackendSession,
    ) -> PinChanges {
        self.diag.after_statement(info, outcome.ending);
        self.apply(info, text, outcome, tracked, backend)
    }

    /// After a command that is not a statement of the client's (COM_PING, COM_INIT_DB,
    /// COM_STMT_FETCH, ...): pins and transaction state as for a statement; dbproxy does not
    /// model what such commands leave in ROW_COUNT()/FOUND_ROWS(), so the connection's are
    /// no longer taken for the client's.
    pub fn after_command(
        &mut self,
        info: &SqlInfo,
        outcome: Outcome,
        tracked: Tracked,
        backend: &mut BackendSession,
    ) -> PinChanges {
        self.diag.counts_stale();
        self.apply(info, b"", outcome, tracked, backend)
    }

    /// Pins, transaction state and one-shots after a response.
    fn apply(
        &mut self,
        info: &SqlInfo,
        text: &[u8],
        outcome: Outcome,
        tracked: Tracked,
        backend: &mut BackendSession,
    ) -> PinChanges {
        let mut changes = PinChanges::default();
        if let Some(s) = outcome.status {
            self.status = s;
        }
        changes.merge(self.pins.after_statement(info, !outcome.failed()));
        let mut unclassified =
            info.touches_tracking || tracked.not_replayable || tracked.unexplained;
        if !outcome.failed() && info.next_transaction {
            if info.multi {
                // Its text cannot be told apart from the other statements' to repeat it.
                unclassified = true;
            } else {
                self.state.next_transaction.push(text.to_vec());
                backend.next_transaction_pending = true;
            }
        }
        let started_transaction =
            self.status & status::IN_TRANS != 0 || (info.uses_tables && !outcome.failed());
        if started_transaction && !info.next_transaction {
            // A transaction started (explicitly, or an autocommit statement on a table):
            // pending characteristics were used (checked: MariaDB 10.11).
            self.state.next_transaction.clear();
            backend.next_transaction_pending = false;
        }
        if unclassified && self.pins.start(PinReason::Unclassified) {
            changes.started.push(PinReason::Unclassified);
        }
        self.transaction_pin(&mut changes);
        changes
    }

    /// After COM_STMT_PREPARE: a failed prepare, or one with warnings, leaves its
    /// conditions in the warning list.
    pub fn after_prepare(&mut self, info: &SqlInfo, failed: bool, warnings: u16) -> PinChanges {
        self.diag.after_prepare(failed, warnings, info.uses_tables);
        let mut changes = PinChanges::default();
        self.transaction_pin(&mut changes);
        changes
    }

    /// A failed command that never reached the server (unknown statement id, no backend).
    pub fn command_refused(&mut self) -> PinChanges {
        let mut changes = PinChanges::default();
        self.transaction_pin(&mut changes);
        changes
    }

    fn transaction_pin(&mut self, changes: &mut PinChanges) {
        if self.status & status::IN_TRANS != 0 {
            if self.pins.start(PinReason::Transaction) {
                changes.started.push(PinReason::Transaction);
            }
        } else if self.pins.end(PinReason::Transaction) {
            changes.ended.push(PinReason::Transaction);
        }
    }

    /// What to do on `backend` before giving it back.
    pub fn release(&self, backend: &BackendSession) -> Release {
        let mut r = Release {
            capture_warnings: self.diag.needs_capture(),
            statements: Vec::new(),
        };
        if backend.insert_id_pending {
            r.statements.push("SET insert_id = 0".into());
        }
        if backend.next_transaction_pending {
            r.statements.push(state::neutral_next_transaction(backend));
        }
        if !backend.unknown_user_vars.is_empty() {
            let unset = uservars::UserValue::unset().sql();
            let sets: Vec<String> = backend
                .unknown_user_vars
                .iter()
                .map(|n| format!("{} = {unset}", uservars::var_ref(n)))
                .collect();
            r.statements.push(format!("SET {}", sets.join(", ")));
        }
        r
    }

    /// Whether a connection the session ends with (the client left) can go back as it is:
    /// nothing pinned, no transaction, and none of what [`Self::release`] would clear left
    /// on it. Otherwise it is reset before anyone reuses it.
    pub fn clean_at_end(&self, backend: &BackendSession) -> bool {
        self.releasable() && self.release(backend).statements.is_empty()
    }

    /// The release steps ran.
    pub fn released(&mut self, backend: &mut BackendSession, warnings: Option<&TextResult>) {
        if let Some(w) = warnings {
            self.diag.captured(w);
        }
        backend.insert_id_pending = false;
        backend.next_transaction_pending = false;
        backend.unknown_user_vars.clear();
    }

    /// What to read back after the statement `info`, in the same round trip.
    pub fn read_back(&self, info: &SqlInfo) -> Option<ReadBack> {
        ReadBack::for_statement(info, self.state.insert_id.is_some())
    }

    /// After a statement and its read-back were learnt: the variables MariaDB changed along
    /// with those it reported (see [`state::coupled`]) and did not report, to read back.
    pub fn coupled_read_back(&mut self) -> Option<ReadBack> {
        let learnt = std::mem::take(&mut self.learnt);
        let mut names: Vec<Vec<u8>> = Vec::new();
        for n in &learnt {
            for c in state::coupled(n) {
                let c = c.as_bytes().to_vec();
                if !learnt.contains(&c) && !names.contains(&c) {
                    names.push(c);
                }
            }
        }
        (!names.is_empty()).then(|| ReadBack::variables(names))
    }

    /// Whether the client negotiated session tracking itself (otherwise dbproxy strips it
    /// from OK packets).
    pub fn wants_tracking(&self) -> bool {
        self.caps & cap::SESSION_TRACK != 0
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! What the session's tests share.

    use super::ClientSession;
    use crate::config::{UserAuthPlugin, UserConfig};
    use crate::mysql::consts::cap;

    /// User `name` (password `pw`, any plugin), logging in to the database as itself with
    /// `db`; `arns`: the IAM roles that may log in as it with a token.
    pub fn user_config(name: &str, arns: Vec<String>) -> UserConfig {
        UserConfig {
            name: name.into(),
            password: "pw".into(),
            password_hash: None,
            backend_user: None,
            backend_password: "db".into(),
            auth_plugin: UserAuthPlugin::Any,
            postgres_auth: Default::default(),
            aws_iam_arns: arns,
            jwt_subjects: Vec::new(),
            max_database_connections: None,
            weight: 1,
        }
    }

    /// What a MariaDB 10.11 behind dbproxy offers, as the greeting tells clients.
    pub fn profile() -> super::login::Profile {
        super::login::Profile {
            version: "5.5.5-10.11.6-MariaDB".into(),
            capabilities: cap::PROXY_OFFERS,
            ext_capabilities: 0,
            collation: 45,
        }
    }

    /// A session of user `app` (protocol 4.1, collation 45) in `schema`.
    pub fn session(schema: Option<&[u8]>) -> ClientSession {
        let users = crate::auth::Users::new(&[user_config("app", Vec::new())]);
        let user = users.get(b"app").expect("the user just configured");
        ClientSession::new(user, cap::PROTOCOL_41, 45, schema.map(<[u8]>::to_vec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mysql::resultset::{encode_text_row, ColumnDef};
    use crate::session::sql::analyze;
    use crate::session::uservars::UserValue;

    fn session() -> ClientSession {
        testing::session(Some(b"shop"))
    }

    fn col(name: &str, t: u8, flags: u16) -> ColumnDef {
        ColumnDef {
            schema: vec![],
            table: vec![],
            org_table: vec![],
            name: name.as_bytes().to_vec(),
            org_name: vec![],
            charset: 63,
            length: 21,
            column_type: t,
            flags,
            decimals: 0,
        }
    }

    fn result(cols: Vec<ColumnDef>, row: Vec<Option<&[u8]>>) -> TextResult {
        TextResult {
            raw_columns: cols.iter().map(ColumnDef::encode).collect(),
            columns: cols,
            rows: vec![encode_text_row(row)],
            terminator: vec![0xfe, 0, 0, 2, 0],
        }
    }

    fn ok(affected: u64) -> Outcome {
        Outcome {
            ending: Ending::Ok {
                affected,
                warnings: 0,
            },
            status: Some(status::AUTOCOMMIT),
        }
    }

    /// `exclude_variable_sets`: a variable that could not be read back does not pin; it is
    /// forgotten by the client and unset on the connection before it goes back.
    #[test]
    fn a_variable_not_read_back_is_unset_before_release_under_the_filter() {
        let mut s = session();
        s.exclude_variable_sets = true;
        s.state.user_vars.insert(b"v".to_vec(), UserValue::int("1"));
        let mut b = BackendSession::default();
        b.user_vars.insert(b"v".to_vec(), UserValue::int("1"));
        let rb = ReadBack::for_statement(&analyze(b"SET @v = REPEAT('x', 9)"), false).unwrap();
        let e = ErrPacket::new(1, "HY000", "x");
        assert_eq!(
            s.learn_read_back(&rb, Err(&e), &mut b),
            PinChanges::default()
        );
        assert!(s.state.user_vars.is_empty() && b.user_vars.is_empty());
        assert_eq!(
            s.release(&b).statements,
            vec!["SET @`v` = CAST(NULL AS BINARY)".to_string()]
        );
        s.released(&mut b, None);
        assert!(s.release(&b).statements.is_empty());
        // Without the filter the client is pinned instead.
        s.exclude_variable_sets = false;
        let c = s.learn_read_back(&rb, Err(&e), &mut b);
        assert_eq!(c.started, vec![PinReason::UserVariable]);
        assert!(b.unknown_user_vars.is_empty());
    }

    /// As a new MariaDB connection: ROW_COUNT() 0, FOUND_ROWS() 0. A reset (or change of
    /// user) sets ROW_COUNT() back to 0 and keeps FOUND_ROWS(), as MariaDB does.
    #[test]
    fn per_statement_counts_of_a_new_and_a_reset_session() {
        let mut s = session();
        assert_eq!((s.diag.row_count, s.diag.found_rows), (0, 0));
        let mut b = BackendSession::default();
        let calc = analyze(b"SELECT v FROM t");
        let rows = Outcome {
            ending: Ending::Rows {
                rows: 3,
                warnings: 0,
            },
            status: Some(status::AUTOCOMMIT),
        };
        s.after_statement(&calc, b"", rows, Tracked::default(), &mut b);
        assert_eq!((s.diag.row_count, s.diag.found_rows), (-1, 3));
        s.reset(None);
        assert_eq!((s.diag.row_count, s.diag.found_rows), (0, 3));
    }

    #[test]
    fn read_back_learns_user_variables_and_last_insert_id() {
        let mut s = session();
        let mut b = BackendSession::default();
        let info = analyze(b"INSERT INTO t (v) VALUES (@x := 5)");
        let rb = ReadBack::for_statement(&info, false).unwrap();
        assert_eq!(
            rb.sql,
            "SELECT LAST_INSERT_ID(), @`x`, \
             IF(LENGTH(@`x`) * 2 + 1024 < @@max_allowed_packet, HEX(@`x`), NULL), \
             CHARSET(@`x`), COLLATION(@`x`)"
        );
        let bin = Some(&b"binary"[..]);
        let r = result(
            vec![
                col("LAST_INSERT_ID()", 8, 161),
                col("@`x`", 8, 128),
                col("h", 253, 0),
                col("c", 253, 0),
                col("k", 253, 0),
            ],
            vec![Some(b"41"), Some(b"5"), Some(b"5"), bin, bin],
        );
        assert_eq!(
            s.learn_read_back(&rb, Ok(&r), &mut b),
            PinChanges::default()
        );
        assert_eq!(s.state.last_insert_id, 41);
        assert_eq!(b.last_insert_id, 41);
        assert_eq!(s.state.user_vars.get(&b"x"[..]), Some(&UserValue::int("5")));
        assert_eq!(b.user_vars, s.state.user_vars);
        // A read-back that failed pins the client to the connection that has the values.
        let e = ErrPacket::new(1, "HY000", "x");
        let c = s.learn_read_back(&rb, Err(&e), &mut b);
        assert_eq!(c.started, vec![PinReason::UserVariable]);
        assert!(ReadBack::for_statement(&analyze(b"SELECT @x"), false).is_none());
        assert!(ReadBack::for_statement(&analyze(b"SELECT 1"), true).is_none());
    }

    #[test]
    fn variables_changed_silently_with_a_reported_one_are_read_back() {
        let mut s = session();
        let mut b = BackendSession::default();
        let info = analyze(b"SET storage_engine = MEMORY, long_query_time = 3");
        s.learn_tracking(
            &info,
            &[
                Change::SystemVariable(b"storage_engine", b"MEMORY"),
                Change::SystemVariable(b"long_query_time", b"3.000000"),
            ],
            &mut b,
        );
        let rb = s.coupled_read_back().unwrap();
        assert_eq!(
            rb.sql,
            "SELECT @@session.default_storage_engine, \
             (SELECT SESSION_VALUE FROM information_schema.SYSTEM_VARIABLES \
             WHERE VARIABLE_NAME = 'LOG_SLOW_QUERY_TIME' AND VARIABLE_SCOPE <> 'GLOBAL')"
        );
        assert!(rb.names_tables());
        let r = result(
            vec![col("a", 253, 0), col("b", 253, 0)],
            vec![Some(b"MEMORY"), Some(b"3.000000")],
        );
        assert_eq!(
            s.learn_read_back(&rb, Ok(&r), &mut b),
            PinChanges::default()
        );
        for (n, v) in [
            ("storage_engine", "MEMORY"),
            ("default_storage_engine", "MEMORY"),
            ("long_query_time", "3.000000"),
            ("log_slow_query_time", "3.000000"),
        ] {
            assert_eq!(s.state.vars.get(n.as_bytes()), Some(&v.as_bytes().to_vec()));
        }
        assert_eq!(b.vars, s.state.vars);
        // What the read-back learnt needs nothing more; a server without the other name
        // answers NULL, which leaves the record as it is.
        assert!(s.coupled_read_back().is_none());
        s.learn_tracking(
            &analyze(b"SET tx_isolation = 'READ-COMMITTED'"),
            &[Change::SystemVariable(b"tx_isolation", b"READ-COMMITTED")],
            &mut b,
        );
        let rb = s.coupled_read_back().unwrap();
        let r = result(vec![col("a", 253, 0)], vec![None]);
        s.learn_read_back(&rb, Ok(&r), &mut b);
        assert!(!s.state.vars.contains_key(&b"transaction_isolation"[..]));
        // SET NAMES: the collation is read back with the statement, nothing after it.
        let info = analyze(b"SET NAMES latin1");
        s.learn_tracking(
            &info,
            &[Change::SystemVariable(
                b"character_set_connection",
                b"latin1",
            )],
            &mut b,
        );
        let rb = ReadBack::for_statement(&info, false).unwrap();
        let r = result(vec![col("a", 253, 0)], vec![Some(b"latin1_swedish_ci")]);
        s.learn_read_back(&rb, Ok(&r), &mut b);
        assert!(s.coupled_read_back().is_none());
        // The database's character set is reset by every USE: setting it pins.
        let c = s.learn_tracking(
            &analyze(b"SET character_set_database = cp1251"),
            &[Change::SystemVariable(b"character_set_database", b"cp1251")],
            &mut b,
        );
        assert!(c.not_replayable);
    }

    #[test]
    fn read_back_learns_variables_set_without_a_scope() {
        let mut s = session();
        let mut b = BackendSession::default();
        let info = analyze(b"SET @@sql_mode = 'ANSI', @@timestamp = DEFAULT");
        let rb = ReadBack::for_statement(&info, false).unwrap();
        assert_eq!(
            rb.sql,
            "SELECT (SELECT SESSION_VALUE FROM information_schema.SYSTEM_VARIABLES \
             WHERE VARIABLE_NAME = 'SQL_MODE' AND VARIABLE_SCOPE <> 'GLOBAL'), \
             (SELECT SESSION_VALUE FROM information_schema.SYSTEM_VARIABLES \
             WHERE VARIABLE_NAME = 'TIMESTAMP' AND VARIABLE_SCOPE <> 'GLOBAL')"
        );
        s.state
            .vars
            .insert(b"timestamp".to_vec(), b"5.000000".to_vec());
        let r = result(
            vec![col("a", 253, 0), col("b", 253, 0)],
            vec![Some(b"ANSI"), Some(b"1800000000.000001")],
        );
        assert_eq!(
            s.learn_read_back(&rb, Ok(&r), &mut b),
            PinChanges::default()
        );
        assert_eq!(s.state.vars.get(&b"sql_mode"[..]), Some(&b"ANSI".to_vec()));
        assert_eq!(b.vars, s.state.vars);
        // The clock runs again: no timestamp to replay.
        assert!(!s.state.vars.contains_key(&b"timestamp"[..]));
        // One that cannot follow the client pins.
        let info = analyze(b"SET @@pseudo_thread_id = 5");
        let rb = ReadBack::for_statement(&info, false).unwrap();
        let r = result(vec![col("a", 253, 0)], vec![Some(b"5")]);
        let c = s.learn_read_back(&rb, Ok(&r), &mut b);
        assert_eq!(c.started, vec![PinReason::Unclassified]);
    }

    #[test]
    fn tracking_learns_and_ignores_what_it_must() {
        let mut s = session();
        let mut b = BackendSession::default();
        let set = analyze(b"SET time_zone = '+01:00'");
        let t = s.learn_tracking(
            &set,
            &[
                Change::SystemVariable(b"time_zone", b"+01:00"),
                Change::StateChanged,
            ],
            &mut b,
        );
        assert_eq!(t, Tracked::default());
        assert_eq!(
            s.state.vars.get(&b"time_zone"[..]).map(Vec::as_slice),
            Some(&b"+01:00"[..])
        );
        let stmt = analyze(b"SET STATEMENT sql_mode='' FOR SELECT 1");
        s.learn_tracking(
            &stmt,
            &[
                Change::SystemVariable(b"sql_mode", b""),
                Change::StateChanged,
            ],
            &mut b,
        );
        assert!(!s.state.vars.contains_key(&b"sql_mode"[..]));
        let ts = analyze(b"SET timestamp = DEFAULT");
        s.state
            .vars
            .insert(b"timestamp".to_vec(), b"5.000000".to_vec());
        s.learn_tracking(
            &ts,
            &[Change::SystemVariable(b"timestamp", b"5.000000")],
            &mut b,
        );
        assert!(!s.state.vars.contains_key(&b"timestamp"[..]));
        // A write with the binary log on: the commit's GTID is the client's, and no pin.
        let insert = analyze(b"INSERT INTO t VALUES (1)");
        let t = s.learn_tracking(
            &insert,
            &[
                Change::StateChanged,
                Change::SystemVariable(b"last_gtid", b"0-1-7"),
            ],
            &mut b,
        );
        assert!(!t.not_replayable && !t.unexplained, "{t:?}");
        assert_eq!(s.diag.last_gtid, b"0-1-7");
        assert!(!s.state.vars.contains_key(&b"last_gtid"[..]));
        let call = analyze(b"CALL p()");
        assert!(
            s.learn_tracking(&call, &[Change::StateChanged], &mut b)
                .unexplained
        );
        let diag = analyze(b"GET DIAGNOSTICS @n = NUMBER");
        assert!(
            !s.learn_tracking(&diag, &[Change::StateChanged], &mut b)
                .unexplained
        );
        let tmp = analyze(b"CREATE TEMPORARY TABLE t (x INT)");
        assert!(
            !s.learn_tracking(&tmp, &[Change::StateChanged], &mut b)
                .unexplained
        );
        let odd = analyze(b"DO 1");
        assert!(
            s.learn_tracking(&odd, &[Change::StateChanged], &mut b)
                .unexplained
        );
        let track = analyze(b"SET pseudo_thread_id = 5");
        assert!(
            s.learn_tracking(
                &track,
                &[Change::SystemVariable(b"pseudo_thread_id", b"5")],
                &mut b
            )
            .not_replayable
        );
    }

    #[test]
    fn one_shots_follow_the_client_and_never_stay_behind() {
        let mut s = session();
        let mut b = BackendSession::default();
        let set = analyze(b"SET insert_id = 500");
        s.learn_tracking(
            &set,
            &[Change::SystemVariable(b"insert_id", b"500")],
            &mut b,
        );
        s.after_statement(&set, b"", ok(0), Tracked::default(), &mut b);
        assert_eq!(s.state.insert_id, Some(500));
        // Given back before the insert: cleared there, replayed on the next connection.
        assert_eq!(
            s.release(&b).statements,
            vec!["SET insert_id = 0".to_string()]
        );
        s.released(&mut b, None);
        let other = BackendSession::default();
        assert_eq!(
            s.replay(&other, Needs::default(), true).set.as_deref(),
            Some("SET insert_id = 500")
        );
        // An insert with an explicit id does not use it; one that generates a value does.
        // Only the server knows which: @@session.insert_id is read back.
        let ins = analyze(b"INSERT INTO t (v) VALUES (1)");
        let rb = s.read_back(&ins).unwrap();
        assert_eq!(rb.sql, "SELECT LAST_INSERT_ID(), @@session.insert_id");
        let answer = |lid: &'static [u8], pending: &'static [u8]| {
            result(
                vec![
                    col("LAST_INSERT_ID()", 8, 161),
                    col("@@session.insert_id", 8, 160),
                ],
                vec![Some(lid), Some(pending)],
            )
        };
        s.after_statement(&ins, b"", ok(1), Tracked::default(), &mut b);
        s.learn_read_back(&rb, Ok(&answer(b"0", b"500")), &mut b);
        assert_eq!(
            s.state.insert_id,
            Some(500),
            "an explicit id left it pending"
        );
        s.learn_read_back(&rb, Ok(&answer(b"500", b"0")), &mut b);
        assert_eq!(s.state.insert_id, None);
        assert_eq!(s.state.last_insert_id, 500);

        let text = b"SET TRANSACTION ISOLATION LEVEL SERIALIZABLE";
        s.after_statement(&analyze(text), text, ok(0), Tracked::default(), &mut b);
        assert!(b.next_transaction_pending);
        assert!(s.release(&b).statements[0]
            .starts_with("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"));
        s.released(&mut b, None);
        let r = s.replay(&b, Needs::default(), true);
        assert_eq!(
            r.next_transaction,
            vec![b"SET TRANSACTION ISOLATION LEVEL SERIALIZABLE".to_vec()]
        );
        r.done(&mut b);
        let begin = analyze(b"BEGIN");
        s.after_statement(
            &begin,
            b"BEGIN",
            Outcome {
                ending: Ending::Ok {
                    affected: 0,
                    warnings: 0,
                },
                status: Some(status::AUTOCOMMIT | status::IN_TRANS),
            },
            Tracked::default(),
            &mut b,
        );
        assert!(s.state.next_transaction.is_empty());
        assert!(!b.next_transaction_pending);
        assert!(s.pins.has(PinReason::Transaction));
    }

    #[test]
    fn a_connection_left_at_the_end_goes_back_as_it_is_only_when_clean() {
        let s = session();
        let mut b = BackendSession::default();
        assert!(s.clean_at_end(&b));
        // Each one-shot or unknown variable left on it means a reset.
        b.insert_id_pending = true;
        assert!(!s.clean_at_end(&b));
        let mut b = BackendSession {
            next_transaction_pending: true,
            ..BackendSession::default()
        };
        assert!(!s.clean_at_end(&b));
        b.next_transaction_pending = false;
        b.unknown_user_vars.insert(b"big".to_vec());
        assert!(!s.clean_at_end(&b), "a user variable nobody recorded");
        // A transaction or a pin: reset too.
        let mut s = session();
        s.status |= status::IN_TRANS;
        assert!(!s.clean_at_end(&BackendSession::default()));
    }
}
