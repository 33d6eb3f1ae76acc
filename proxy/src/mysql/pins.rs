//! Why a client must keep its backend connection, from the SQL it sends and the replies it
//! gets. Pins are rare, counted by reason, and end as soon as their reason does.

/// A reason to keep a client on its backend connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PinReason {
    /// A transaction is open, or autocommit is off.
    Transaction,
    /// `LOCK TABLES`, until `UNLOCK TABLES`.
    LockTables,
    /// `GET_LOCK()`, until every lock is released.
    GetLock,
    /// `CREATE TEMPORARY TABLE`, for the session.
    TemporaryTable,
    /// Text-protocol `PREPARE`, for the session.
    TextPrepare,
    /// `SQL_CALC_FOUND_ROWS`, for the next statement (`FOUND_ROWS()`).
    FoundRows,
    /// An insert id was generated, for the next statement (`LAST_INSERT_ID()`).
    LastInsertId,
    /// `SET TRANSACTION ...` applies to the next transaction only.
    NextTransaction,
    /// A binary-protocol cursor is open (COM_STMT_EXECUTE with a cursor, then FETCH).
    Cursor,
    /// COM_STMT_SEND_LONG_DATA sent parameter data that the next execute consumes.
    LongData,
    /// A user variable was assigned (`SET @v`, `:=`, `INTO @v`), for the session.
    UserVariable,
    /// LOAD DATA LOCAL INFILE: the client streams a file, for that command.
    LoadData,
    /// A change of session state dbproxy cannot classify or replay, for the session.
    Unclassified,
}

impl PinReason {
    pub const ALL: [PinReason; 13] = [
        PinReason::Transaction,
        PinReason::LockTables,
        PinReason::GetLock,
        PinReason::TemporaryTable,
        PinReason::TextPrepare,
        PinReason::FoundRows,
        PinReason::LastInsertId,
        PinReason::NextTransaction,
        PinReason::Cursor,
        PinReason::LongData,
        PinReason::UserVariable,
        PinReason::LoadData,
        PinReason::Unclassified,
    ];

    /// The metric label.
    pub fn name(self) -> &'static str {
        match self {
            PinReason::Transaction => "transaction",
            PinReason::LockTables => "lock_tables",
            PinReason::GetLock => "get_lock",
            PinReason::TemporaryTable => "temporary_table",
            PinReason::TextPrepare => "text_prepare",
            PinReason::FoundRows => "found_rows",
            PinReason::LastInsertId => "last_insert_id",
            PinReason::NextTransaction => "next_transaction",
            PinReason::Cursor => "cursor",
            PinReason::LongData => "long_data",
            PinReason::UserVariable => "user_variable",
            PinReason::LoadData => "load_data",
            PinReason::Unclassified => "unclassified",
        }
    }

    pub fn index(self) -> usize {
        PinReason::ALL.iter().position(|&r| r == self).unwrap_or(0)
    }

    /// Reasons that last for one more statement only.
    pub fn is_next_statement(self) -> bool {
        matches!(
            self,
            PinReason::FoundRows | PinReason::LastInsertId | PinReason::NextTransaction
        )
    }
}

/// What a statement does to pins.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SqlEffects {
    pub starts: Vec<PinReason>,
    pub unlock_tables: bool,
    pub get_locks: u32,
    pub release_locks: u32,
    pub release_all_locks: bool,
    /// Sets `session_track_*` itself: dbproxy's view of the session would go blind.
    pub touches_tracking: bool,
}

/// Uppercased words and single punctuation of `sql`, without comments and literals
/// (string literals become a single `'` token; `/*! ... */` bodies count as code).
fn tokens(sql: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < sql.len() {
        let c = sql[i];
        match c {
            b' ' | b'\t' | b'\r' | b'\n' => i += 1,
            b'#' => {
                while i < sql.len() && sql[i] != b'\n' {
                    i += 1;
                }
            }
            b'-' if sql.get(i + 1) == Some(&b'-')
                && sql.get(i + 2).is_none_or(|b| b.is_ascii_whitespace()) =>
            {
                while i < sql.len() && sql[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if sql.get(i + 1) == Some(&b'*') => {
                if sql.get(i + 2) == Some(&b'!') {
                    // Versioned comment: skip the marker and version digits, keep the body.
                    i += 3;
                    while i < sql.len() && sql[i].is_ascii_digit() {
                        i += 1;
                    }
                } else {
                    i += 2;
                    while i + 1 < sql.len() && !(sql[i] == b'*' && sql[i + 1] == b'/') {
                        i += 1;
                    }
                    i += 2;
                }
            }
            b'*' if sql.get(i + 1) == Some(&b'/') => i += 2,
            b'\'' | b'"' | b'`' => {
                let q = c;
                i += 1;
                while i < sql.len() {
                    if sql[i] == b'\\' && q != b'`' {
                        i += 2;
                        continue;
                    }
                    if sql[i] == q {
                        if sql.get(i + 1) == Some(&q) {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                i += 1;
                out.push(if q == b'`' {
                    b"`".to_vec()
                } else {
                    b"'".to_vec()
                });
            }
            c if c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80 => {
                let s = i;
                while i < sql.len()
                    && (sql[i].is_ascii_alphanumeric()
                        || sql[i] == b'_'
                        || sql[i] == b'$'
                        || sql[i] >= 0x80)
                {
                    i += 1;
                }
                out.push(sql[s..i].to_ascii_uppercase());
            }
            b':' if sql.get(i + 1) == Some(&b'=') => {
                out.push(b":=".to_vec());
                i += 2;
            }
            _ => {
                out.push(vec![c]);
                i += 1;
            }
        }
    }
    out
}

/// Classifies the text of a COM_QUERY (one or several statements).
pub fn classify_sql(sql: &[u8]) -> SqlEffects {
    let toks = tokens(sql);
    let mut e = SqlEffects::default();
    let mut start = true; // at the start of a statement
    let mut in_set = false;
    for (i, t) in toks.iter().enumerate() {
        let next = |k: usize| toks.get(i + k).map(Vec::as_slice);
        let t = t.as_slice();
        if t == b";" {
            start = true;
            in_set = false;
            continue;
        }
        if start {
            match t {
                b"LOCK" if matches!(next(1), Some(b"TABLE" | b"TABLES")) => {
                    e.starts.push(PinReason::LockTables)
                }
                b"UNLOCK" if matches!(next(1), Some(b"TABLE" | b"TABLES")) => {
                    e.unlock_tables = true
                }
                b"PREPARE" => e.starts.push(PinReason::TextPrepare),
                b"SET" => {
                    in_set = true;
                    if next(1) == Some(b"TRANSACTION") {
                        e.starts.push(PinReason::NextTransaction);
                    }
                }
                _ => {}
            }
            start = false;
        }
        match t {
            b"TEMPORARY" if i > 0 && toks[i - 1] == b"CREATE" => {
                e.starts.push(PinReason::TemporaryTable)
            }
            b"SQL_CALC_FOUND_ROWS" => e.starts.push(PinReason::FoundRows),
            b"GET_LOCK" if next(1) == Some(b"(") => e.get_locks += 1,
            b"RELEASE_LOCK" if next(1) == Some(b"(") => e.release_locks += 1,
            b"RELEASE_ALL_LOCKS" if next(1) == Some(b"(") => e.release_all_locks = true,
            b":=" => e.starts.push(PinReason::UserVariable),
            b"INTO" if next(1) == Some(b"@") => e.starts.push(PinReason::UserVariable),
            b"@" if in_set && next(1) != Some(b"@") && (i == 0 || toks[i - 1] != b"@") => {
                e.starts.push(PinReason::UserVariable)
            }
            t if in_set && t.starts_with(b"SESSION_TRACK_") => e.touches_tracking = true,
            _ => {}
        }
    }
    e.starts.sort();
    e.starts.dedup();
    e
}

/// The pins a client holds now.
#[derive(Debug, Default, Clone)]
pub struct Pins {
    active: Vec<PinReason>,
    get_locks: u32,
}

impl Pins {
    pub fn is_pinned(&self) -> bool {
        !self.active.is_empty()
    }

    pub fn active(&self) -> &[PinReason] {
        &self.active
    }

    pub fn has(&self, r: PinReason) -> bool {
        self.active.contains(&r)
    }

    /// Starts a pin; returns true when it was not held already (count it).
    pub fn start(&mut self, r: PinReason) -> bool {
        if self.has(r) {
            return false;
        }
        self.active.push(r);
        true
    }

    /// Ends a pin; returns true when it was held.
    pub fn end(&mut self, r: PinReason) -> bool {
        let before = self.active.len();
        self.active.retain(|&a| a != r);
        before != self.active.len()
    }

    /// Applies a statement's effects once its reply arrived (`ok`: it did not fail).
    /// Returns the reasons that started and ended.
    pub fn after_statement(
        &mut self,
        e: &SqlEffects,
        ok: bool,
    ) -> (Vec<PinReason>, Vec<PinReason>) {
        let mut started = Vec::new();
        let mut ended = Vec::new();
        // One-statement pins from before this statement end now.
        for r in PinReason::ALL
            .iter()
            .copied()
            .filter(|r| r.is_next_statement())
        {
            if !e.starts.contains(&r) && self.end(r) {
                ended.push(r);
            }
        }
        for &r in &e.starts {
            if self.start(r) {
                started.push(r);
            }
        }
        if e.get_locks > 0 {
            self.get_locks += e.get_locks;
            if self.start(PinReason::GetLock) {
                started.push(PinReason::GetLock);
            }
        }
        if ok {
            if e.unlock_tables && self.end(PinReason::LockTables) {
                ended.push(PinReason::LockTables);
            }
            self.get_locks = self.get_locks.saturating_sub(e.release_locks);
            if (e.release_all_locks || (e.release_locks > 0 && self.get_locks == 0))
                && self.end(PinReason::GetLock)
            {
                self.get_locks = 0;
                ended.push(PinReason::GetLock);
            }
        }
        (started, ended)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn starts(sql: &str) -> Vec<PinReason> {
        classify_sql(sql.as_bytes()).starts
    }

    #[test]
    fn recognises_each_reason() {
        use PinReason::*;
        assert_eq!(starts("LOCK TABLES t READ"), vec![LockTables]);
        assert!(classify_sql(b"unlock tables").unlock_tables);
        assert_eq!(classify_sql(b"SELECT GET_LOCK('a', 1)").get_locks, 1);
        assert!(classify_sql(b"DO RELEASE_ALL_LOCKS()").release_all_locks);
        assert_eq!(
            starts("CREATE TEMPORARY TABLE t (x INT)"),
            vec![TemporaryTable]
        );
        assert_eq!(starts("PREPARE s FROM 'SELECT 1'"), vec![TextPrepare]);
        assert_eq!(
            starts("SELECT SQL_CALC_FOUND_ROWS * FROM t LIMIT 1"),
            vec![FoundRows]
        );
        assert_eq!(
            starts("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"),
            vec![NextTransaction]
        );
        assert_eq!(starts("SET @v = 1"), vec![UserVariable]);
        assert_eq!(starts("SET sql_mode='ANSI', @x:=2"), vec![UserVariable]);
        assert_eq!(starts("SELECT @n := @n + 1 FROM t"), vec![UserVariable]);
        assert_eq!(starts("SELECT 1 INTO @one"), vec![UserVariable]);
        assert!(classify_sql(b"SET SESSION session_track_schema=OFF").touches_tracking);
    }

    #[test]
    fn system_variables_strings_and_comments_do_not_pin() {
        for sql in [
            "SET NAMES utf8mb4",
            "SET SESSION sql_mode = 'ANSI', @@time_zone = '+00:00'",
            "SELECT 'LOCK TABLES t READ', \"SET @v=1\" FROM t -- GET_LOCK(",
            "SELECT /* CREATE TEMPORARY TABLE */ 1",
            "SELECT @v FROM t",
            "SELECT `get_lock`(1)",
        ] {
            assert_eq!(classify_sql(sql.as_bytes()), SqlEffects::default(), "{sql}");
        }
        assert_eq!(
            starts("/*!40000 LOCK TABLES t WRITE */"),
            vec![PinReason::LockTables]
        );
    }

    #[test]
    fn pins_start_hold_and_end() {
        let mut p = Pins::default();
        let (s, _) = p.after_statement(&classify_sql(b"LOCK TABLES t WRITE"), true);
        assert_eq!(s, vec![PinReason::LockTables]);
        p.after_statement(&classify_sql(b"SELECT 1"), true);
        assert!(p.has(PinReason::LockTables));
        let (_, e) = p.after_statement(&classify_sql(b"UNLOCK TABLES"), true);
        assert_eq!(e, vec![PinReason::LockTables]);
        assert!(!p.is_pinned());

        p.after_statement(
            &classify_sql(b"SELECT GET_LOCK('a',1), GET_LOCK('b',1)"),
            true,
        );
        p.after_statement(&classify_sql(b"SELECT RELEASE_LOCK('a')"), true);
        assert!(p.has(PinReason::GetLock));
        p.after_statement(&classify_sql(b"SELECT RELEASE_LOCK('b')"), true);
        assert!(!p.has(PinReason::GetLock));

        p.after_statement(&classify_sql(b"SELECT SQL_CALC_FOUND_ROWS 1"), true);
        assert!(p.has(PinReason::FoundRows));
        let (_, e) = p.after_statement(&classify_sql(b"SELECT FOUND_ROWS()"), true);
        assert_eq!(e, vec![PinReason::FoundRows]);

        // An UNLOCK that failed does not end the pin.
        p.after_statement(&classify_sql(b"LOCK TABLES t READ"), true);
        p.after_statement(&classify_sql(b"UNLOCK TABLES"), false);
        assert!(p.has(PinReason::LockTables));
    }
}
