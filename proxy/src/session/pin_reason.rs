//! The reasons a client may be pinned to its backend connection: a leaf that both the
//! statement analysis (`sql`, which says what a statement starts) and the pins a client
//! holds (`pins`) use.

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
    /// PostgreSQL: `LISTEN`, for the session (notifications go to the server's session).
    Listen,
    /// PostgreSQL: a session-level advisory lock (`pg_advisory_lock` and its kin).
    AdvisoryLock,
    /// PostgreSQL: `DECLARE ... WITH HOLD`, a cursor that outlives its transaction.
    HoldCursor,
    /// PostgreSQL: `LOAD` of a shared library into the server's session.
    LoadLibrary,
}

impl PinReason {
    pub const ALL: [PinReason; 16] = [
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
        PinReason::Listen,
        PinReason::AdvisoryLock,
        PinReason::HoldCursor,
        PinReason::LoadLibrary,
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
            PinReason::Listen => "listen",
            PinReason::AdvisoryLock => "advisory_lock",
            PinReason::HoldCursor => "hold_cursor",
            PinReason::LoadLibrary => "load_library",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}
