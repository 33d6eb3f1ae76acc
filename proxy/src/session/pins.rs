//! Why a client must keep its backend connection. Pins are rare, counted by reason, and end
//! as soon as their reason does. Nothing here waits on the client: state that only matters
//! for the next statement (LAST_INSERT_ID(), FOUND_ROWS(), SET TRANSACTION, warnings) is
//! learnt and replayed instead (see `diag` and `replay`).

pub use super::pin_reason::PinReason;
use super::sql::SqlInfo;

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
