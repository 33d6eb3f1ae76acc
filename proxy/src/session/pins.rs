//! Why a client must keep its backend connection. Pins are rare, counted by reason, and end
//! as soon as their reason does. Nothing here waits on the client: state that only matters
//! for the next statement (LAST_INSERT_ID(), FOUND_ROWS(), SET TRANSACTION, warnings) is
//! learnt and replayed instead (see `diag` and `replay`).

use super::sql::SqlInfo;

/// A reason to keep a client on its backend connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PinReason {
    /// A transaction is open, or autocommit is off.
    Transaction,
    /// `LOCK TABLES`, `FLUSH TABLES ... WITH READ LOCK | FOR EXPORT`, until `UNLOCK TABLES`.
    LockTables,
    /// `GET_LOCK()`, until every lock is released.
    GetLock,
    /// `CREATE [OR REPLACE] TEMPORARY TABLE`, for the session.
    TemporaryTable,
    /// Text-protocol `PREPARE`, for the session.
    TextPrepare,
    /// `HANDLER ... OPEN`, until every handler is closed.
    Handler,
    /// `BACKUP STAGE` / `BACKUP LOCK`, until `BACKUP STAGE END` / `BACKUP UNLOCK`.
    BackupStage,
    /// A binary-protocol cursor is open (COM_STMT_EXECUTE with a cursor, then FETCH).
    Cursor,
    /// COM_STMT_SEND_LONG_DATA sent parameter data that the next execute consumes.
    LongData,
    /// User variables whose values could not be read back (rare; normally they are replayed).
    UserVariable,
    /// LOAD DATA LOCAL INFILE: the client streams a file, for that command.
    LoadData,
    /// A change of session state dbproxy cannot classify or replay, for the session.
    Unclassified,
}

impl PinReason {
    pub const ALL: [PinReason; 12] = [
        PinReason::Transaction,
        PinReason::LockTables,
        PinReason::GetLock,
        PinReason::TemporaryTable,
        PinReason::TextPrepare,
        PinReason::Handler,
        PinReason::BackupStage,
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
            PinReason::Handler => "handler",
            PinReason::BackupStage => "backup_stage",
            PinReason::Cursor => "cursor",
            PinReason::LongData => "long_data",
            PinReason::UserVariable => "user_variable",
            PinReason::LoadData => "load_data",
            PinReason::Unclassified => "unclassified",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// The pins a client holds now.
#[derive(Debug, Default, Clone)]
pub struct Pins {
    active: Vec<PinReason>,
    get_locks: u32,
    handlers: u32,
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

    /// Ends every pin (the session is over or reset); returns those that were held.
    pub fn clear(&mut self) -> Vec<PinReason> {
        self.get_locks = 0;
        self.handlers = 0;
        std::mem::take(&mut self.active)
    }

    /// Applies a statement's effects once its reply arrived (`ok`: it did not fail).
    /// Returns the reasons that started and ended.
    pub fn after_statement(&mut self, e: &SqlInfo, ok: bool) -> (Vec<PinReason>, Vec<PinReason>) {
        let mut started = Vec::new();
        let mut ended = Vec::new();
        let mut start = |p: &mut Pins, r| {
            if p.start(r) {
                started.push(r);
            }
        };
        for &r in &e.starts {
            start(self, r);
        }
        if e.get_locks > 0 {
            self.get_locks += e.get_locks;
            start(self, PinReason::GetLock);
        }
        if ok && e.handler_opens > 0 {
            self.handlers += e.handler_opens;
            start(self, PinReason::Handler);
        }
        if ok {
            if e.unlock_tables && self.end(PinReason::LockTables) {
                ended.push(PinReason::LockTables);
            }
            if e.backup_end && self.end(PinReason::BackupStage) {
                ended.push(PinReason::BackupStage);
            }
            self.get_locks = self.get_locks.saturating_sub(e.release_locks);
            if (e.release_all_locks || (e.release_locks > 0 && self.get_locks == 0))
                && self.end(PinReason::GetLock)
            {
                self.get_locks = 0;
                ended.push(PinReason::GetLock);
            }
            if e.handler_closes > 0 {
                self.handlers = self.handlers.saturating_sub(e.handler_closes);
                if self.handlers == 0 && self.end(PinReason::Handler) {
                    ended.push(PinReason::Handler);
                }
            }
        }
        (started, ended)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::sql::analyze;

    #[test]
    fn index_matches_all() {
        for (i, r) in PinReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }

    #[test]
    fn pins_start_hold_and_end() {
        let mut p = Pins::default();
        let (s, _) = p.after_statement(&analyze(b"LOCK TABLES t WRITE"), true);
        assert_eq!(s, vec![PinReason::LockTables]);
        p.after_statement(&analyze(b"SELECT 1"), true);
        assert!(p.has(PinReason::LockTables));
        let (_, e) = p.after_statement(&analyze(b"UNLOCK TABLES"), true);
        assert_eq!(e, vec![PinReason::LockTables]);
        assert!(!p.is_pinned());

        p.after_statement(&analyze(b"SELECT GET_LOCK('a',1), GET_LOCK('b',1)"), true);
        p.after_statement(&analyze(b"SELECT RELEASE_LOCK('a')"), true);
        assert!(p.has(PinReason::GetLock));
        p.after_statement(&analyze(b"SELECT RELEASE_LOCK('b')"), true);
        assert!(!p.has(PinReason::GetLock));

        // An UNLOCK that failed does not end the pin.
        p.after_statement(&analyze(b"FLUSH TABLES WITH READ LOCK"), true);
        p.after_statement(&analyze(b"UNLOCK TABLES"), false);
        assert!(p.has(PinReason::LockTables));
        p.after_statement(&analyze(b"UNLOCK TABLES"), true);

        p.after_statement(&analyze(b"HANDLER t OPEN"), true);
        p.after_statement(&analyze(b"HANDLER u OPEN"), true);
        p.after_statement(&analyze(b"HANDLER t CLOSE"), true);
        assert!(p.has(PinReason::Handler));
        p.after_statement(&analyze(b"HANDLER u CLOSE"), true);
        assert!(!p.has(PinReason::Handler));
        // A failed OPEN holds nothing.
        p.after_statement(&analyze(b"HANDLER nosuch OPEN"), false);
        assert!(!p.is_pinned());

        p.after_statement(&analyze(b"BACKUP STAGE START"), true);
        p.after_statement(&analyze(b"BACKUP STAGE FLUSH"), true);
        assert!(p.has(PinReason::BackupStage));
        p.after_statement(&analyze(b"BACKUP STAGE END"), true);
        assert!(!p.is_pinned());
    }
}
