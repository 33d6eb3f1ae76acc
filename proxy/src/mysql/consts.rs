//! Protocol constants: capability flags, status flags, command bytes, error codes.

/// Capability flags (`CLIENT_*`), shared by both directions of the handshake.
pub mod cap {
    /// `CLIENT_LONG_PASSWORD`; MariaDB reads it as `CLIENT_MYSQL` (no extended capabilities).
    pub const LONG_PASSWORD: u32 = 1;
    pub const FOUND_ROWS: u32 = 1 << 1;
    pub const LONG_FLAG: u32 = 1 << 2;
    pub const CONNECT_WITH_DB: u32 = 1 << 3;
    pub const NO_SCHEMA: u32 = 1 << 4;
    pub const COMPRESS: u32 = 1 << 5;
    pub const ODBC: u32 = 1 << 6;
    pub const LOCAL_FILES: u32 = 1 << 7;
    pub const IGNORE_SPACE: u32 = 1 << 8;
    pub const PROTOCOL_41: u32 = 1 << 9;
    pub const INTERACTIVE: u32 = 1 << 10;
    pub const SSL: u32 = 1 << 11;
    pub const IGNORE_SIGPIPE: u32 = 1 << 12;
    pub const TRANSACTIONS: u32 = 1 << 13;
    pub const RESERVED: u32 = 1 << 14;
    pub const SECURE_CONNECTION: u32 = 1 << 15;
    pub const MULTI_STATEMENTS: u32 = 1 << 16;
    pub const MULTI_RESULTS: u32 = 1 << 17;
    pub const PS_MULTI_RESULTS: u32 = 1 << 18;
    pub const PLUGIN_AUTH: u32 = 1 << 19;
    pub const CONNECT_ATTRS: u32 = 1 << 20;
    pub const PLUGIN_AUTH_LENENC_CLIENT_DATA: u32 = 1 << 21;
    pub const CAN_HANDLE_EXPIRED_PASSWORDS: u32 = 1 << 22;
    pub const SESSION_TRACK: u32 = 1 << 23;
    pub const DEPRECATE_EOF: u32 = 1 << 24;

    /// What dbproxy can offer a client (further limited by what the backend offers).
    /// Not offered here: SSL (offered per endpoint when a certificate is set), COMPRESS (refused), MySQL 8's optional metadata and
    /// query attributes (they change packet formats), MariaDB extended capabilities
    /// (`LONG_PASSWORD` is set, which MariaDB clients read as "MySQL server").
    pub const PROXY_OFFERS: u32 = LONG_PASSWORD
        | FOUND_ROWS
        | LONG_FLAG
        | CONNECT_WITH_DB
        | NO_SCHEMA
        | ODBC
        | LOCAL_FILES
        | IGNORE_SPACE
        | PROTOCOL_41
        | INTERACTIVE
        | IGNORE_SIGPIPE
        | TRANSACTIONS
        | SECURE_CONNECTION
        | MULTI_STATEMENTS
        | MULTI_RESULTS
        | PS_MULTI_RESULTS
        | PLUGIN_AUTH
        | CONNECT_ATTRS
        | PLUGIN_AUTH_LENENC_CLIENT_DATA
        | SESSION_TRACK
        | DEPRECATE_EOF;

    /// Bits that change what a server sends or how it counts on a connection. A pooled
    /// backend connection is negotiated with the client's value of each, so these bits
    /// are part of the pool key.
    pub const BEHAVIOUR: u32 = FOUND_ROWS
        | NO_SCHEMA
        | LOCAL_FILES
        | IGNORE_SPACE
        | MULTI_STATEMENTS
        | MULTI_RESULTS
        | PS_MULTI_RESULTS
        | SESSION_TRACK
        | DEPRECATE_EOF;

    /// Bits dbproxy always asks of a backend.
    pub const BACKEND_BASE: u32 = LONG_PASSWORD
        | LONG_FLAG
        | PROTOCOL_41
        | TRANSACTIONS
        | SECURE_CONNECTION
        | PLUGIN_AUTH
        | PLUGIN_AUTH_LENENC_CLIENT_DATA
        | CONNECT_ATTRS;
}

/// MariaDB's extended capabilities (`MARIADB_CLIENT_*`, bits 32 and up of the capability
/// flags): four bytes of the handshake that MySQL leaves as filler, read only when
/// `CLIENT_MYSQL` (bit 0) is clear.
pub mod ext {
    pub const PROGRESS: u32 = 1;
    pub const STMT_BULK_OPERATIONS: u32 = 1 << 2;
    pub const EXTENDED_METADATA: u32 = 1 << 3;
    pub const CACHE_METADATA: u32 = 1 << 4;

    /// What dbproxy can offer (further limited by what the backend offers). Not
    /// CACHE_METADATA: with it, statement responses come without column definitions that
    /// dbproxy needs when it answers for a client.
    pub const PROXY_OFFERS: u32 = PROGRESS | STMT_BULK_OPERATIONS | EXTENDED_METADATA;
}

/// Server status flags (`SERVER_STATUS_*`).
pub mod status {
    pub const IN_TRANS: u16 = 1;
    pub const AUTOCOMMIT: u16 = 1 << 1;
    pub const MORE_RESULTS_EXISTS: u16 = 1 << 3;
    pub const CURSOR_EXISTS: u16 = 1 << 6;
    pub const LAST_ROW_SENT: u16 = 1 << 7;
    pub const IN_TRANS_READONLY: u16 = 1 << 13;
    pub const SESSION_STATE_CHANGED: u16 = 1 << 14;
}

/// Command bytes (`COM_*`), the first byte of a client's command packet.
pub mod com {
    pub const SLEEP: u8 = 0x00;
    pub const QUIT: u8 = 0x01;
    pub const INIT_DB: u8 = 0x02;
    pub const QUERY: u8 = 0x03;
    pub const FIELD_LIST: u8 = 0x04;
    pub const CREATE_DB: u8 = 0x05;
    pub const DROP_DB: u8 = 0x06;
    pub const REFRESH: u8 = 0x07;
    pub const SHUTDOWN: u8 = 0x08;
    pub const STATISTICS: u8 = 0x09;
    pub const PROCESS_INFO: u8 = 0x0a;
    pub const PROCESS_KILL: u8 = 0x0c;
    pub const DEBUG: u8 = 0x0d;
    pub const PING: u8 = 0x0e;
    pub const CHANGE_USER: u8 = 0x11;
    pub const STMT_PREPARE: u8 = 0x16;
    pub const STMT_EXECUTE: u8 = 0x17;
    pub const STMT_SEND_LONG_DATA: u8 = 0x18;
    pub const STMT_CLOSE: u8 = 0x19;
    pub const STMT_RESET: u8 = 0x1a;
    pub const SET_OPTION: u8 = 0x1b;
    pub const STMT_FETCH: u8 = 0x1c;
    pub const RESET_CONNECTION: u8 = 0x1f;
    /// MariaDB's `COM_STMT_BULK_EXECUTE`.
    pub const STMT_BULK_EXECUTE: u8 = 0xfa;
}

/// Error codes dbproxy sends itself. Server codes where one fits, 95xx for the proxy's own.
pub mod errcode {
    pub const ER_CON_COUNT_ERROR: u16 = 1040;
    pub const ER_HANDSHAKE_ERROR: u16 = 1043;
    pub const ER_ACCESS_DENIED_ERROR: u16 = 1045;
    pub const ER_UNKNOWN_COM_ERROR: u16 = 1047;
    pub const ER_NO_SUCH_THREAD: u16 = 1094;
    /// `--read-only` and other options that refuse a statement.
    pub const ER_OPTION_PREVENTS_STATEMENT: u16 = 1290;
    /// MySQL's read-only mode.
    pub const ER_READ_ONLY_MODE: u16 = 1836;
    pub const ER_KILL_DENIED_ERROR: u16 = 1095;
    pub const ER_NET_PACKET_TOO_LARGE: u16 = 1153;
    pub const ER_UNKNOWN_STMT_HANDLER: u16 = 1243;
    pub const ER_NET_PACKETS_OUT_OF_ORDER: u16 = 1156;
    pub const ER_NET_READ_INTERRUPTED: u16 = 1159;
    pub const ER_QUERY_INTERRUPTED: u16 = 1317;
    /// Too many prepared statements (`max_prepared_stmt_count`).
    pub const ER_MAX_PREPARED_STMT_COUNT_REACHED: u16 = 1461;
    pub const ER_CONNECTION_KILLED: u16 = 1927;
    pub const ER_NO_SUCH_QUERY: u16 = 1957;
    pub const ER_NOT_SUPPORTED_YET: u16 = 1235;
    pub const ER_MALFORMED_PACKET: u16 = 1835;
    pub const ER_NOT_SUPPORTED_AUTH_MODE: u16 = 1251;
    pub const ER_CLIENT_INTERACTION_TIMEOUT: u16 = 4031;
    pub const ER_SERVER_SHUTDOWN: u16 = 1053;
    pub const ER_PARSE_ERROR: u16 = 1064;
    pub const ER_WRONG_VALUE_FOR_VAR: u16 = 1231;
    pub const ER_UNKNOWN_ERROR: u16 = 1105;
    /// A login without TLS where TLS is required.
    pub const ER_SECURE_TRANSPORT_REQUIRED: u16 = 3159;
    /// No backend connection became free within `connection_borrow_timeout`.
    pub const PROXY_BORROW_TIMEOUT: u16 = 9501;
    /// A new backend connection could not be opened or authenticated.
    pub const PROXY_BACKEND_UNAVAILABLE: u16 = 9502;
    /// The backend connection broke while serving this client.
    pub const PROXY_BACKEND_LOST: u16 = 9503;
}
