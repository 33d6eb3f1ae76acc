//! A client's command between statements, decided from its first packet: what serves it
//! ([`dispatch`]), the checks that end a session (a command not numbered 0), whether it
//! may be sent again on another connection when it did not run ([`retryable`]), how long
//! the session waits for it ([`idle_wait`]), and the errors a client is told when it is
//! let go. Plain data in and out; the driver reads, writes and waits.

use crate::mysql::command::{classify, Disposition, ResponseKind};
use crate::mysql::consts::{com, errcode};
use crate::mysql::packet::{Header, HEADER_LEN};
use crate::mysql::wire::ErrPacket;
use std::time::Duration;

/// A command up to this size is kept until its response starts, so that it can be sent
/// again when it did not run (failover, switchover).
pub const RETRY_KEEP: usize = 64 * 1024;

/// Times one command is sent again before its error goes to the client.
pub const RETRIES: u32 = 5;

/// What serves a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Answered with this error once the command (all its packets) is read and dropped:
    /// an empty packet, an unknown command byte, a command not served through a proxy,
    /// a malformed COM_PROCESS_KILL.
    Refuse(ErrPacket),
    /// COM_QUIT: the session ends (nothing is forwarded).
    Quit,
    /// COM_CHANGE_USER: authenticated by dbproxy.
    ChangeUser,
    /// COM_QUERY.
    Query,
    /// COM_PROCESS_KILL of this connection id.
    ProcessKill(u32),
    ResetConnection,
    Prepare,
    /// COM_STMT_EXECUTE and MariaDB's bulk execute.
    Execute,
    /// COM_STMT_SEND_LONG_DATA, COM_STMT_FETCH, COM_STMT_RESET.
    StatementCommand,
    CloseStatement,
    /// Answered OK by dbproxy: a ping from a client that holds no connection (pools
    /// validate with pings and must not wait for a saturated pool).
    Pong,
    /// Forwarded as it came, its response relayed; `track`: the session learns from the
    /// response (session tracking, diagnostics), which pings and statistics do not change.
    Forward {
        kind: ResponseKind,
        track: bool,
    },
}

/// The command byte of the packet at the start of `packet` (header `h`): none for an
/// empty packet, whose next bytes are another packet's header.
pub fn command_byte(packet: &[u8], h: Header) -> Option<u8> {
    (h.len > 0)
        .then(|| packet.get(HEADER_LEN).copied())
        .flatten()
}

/// Decides what serves the command whose first packet starts `packet` (header `h`,
/// complete); `held`: the session holds a database connection now.
pub fn dispatch(packet: &[u8], h: Header, held: bool) -> Command {
    let Some(c) = command_byte(packet, h) else {
        // As MariaDB: an empty packet is an unknown command.
        return Command::Refuse(ErrPacket::new(
            errcode::ER_UNKNOWN_COM_ERROR,
            "08S01",
            "Unknown command",
        ));
    };
    match classify(c) {
        Disposition::Quit => Command::Quit,
        Disposition::ChangeUser => Command::ChangeUser,
        Disposition::Refuse => Command::Refuse(ErrPacket::new(
            errcode::ER_UNKNOWN_COM_ERROR,
            "08S01",
            format!("Unknown command {c:#04x} (not served through dbproxy)"),
        )),
        Disposition::Forward(kind) => match c {
            com::QUERY => Command::Query,
            com::PROCESS_KILL => {
                let id = packet
                    .get(HEADER_LEN + 1..HEADER_LEN + 5)
                    .filter(|_| h.len == 5)
                    .and_then(|b| <[u8; 4]>::try_from(b).ok());
                match id {
                    Some(b) => Command::ProcessKill(u32::from_le_bytes(b)),
                    None => Command::Refuse(malformed("COM_PROCESS_KILL")),
                }
            }
            com::RESET_CONNECTION => Command::ResetConnection,
            com::STMT_PREPARE => Command::Prepare,
            com::STMT_EXECUTE | com::STMT_BULK_EXECUTE => Command::Execute,
            com::STMT_SEND_LONG_DATA | com::STMT_FETCH | com::STMT_RESET => {
                Command::StatementCommand
            }
            com::STMT_CLOSE => Command::CloseStatement,
            com::PING if !held => Command::Pong,
            com::PING | com::STATISTICS => Command::Forward { kind, track: false },
            _ => Command::Forward { kind, track: true },
        },
    }
}

/// As MariaDB: a command starts at sequence id 0; a client that numbers it otherwise has
/// lost track of the protocol, and is told so (with the next sequence id) and closed.
pub fn out_of_order(h: Header) -> Option<ErrPacket> {
    (h.seq != 0).then(|| {
        ErrPacket::new(
            errcode::ER_NET_PACKETS_OUT_OF_ORDER,
            "08S01",
            "Got packets out of order",
        )
    })
}

/// Whether a command is kept to be sent again if it does not run: one that will run on a
/// connection borrowed for it alone (`held` is false), on a writer endpoint, small enough
/// ([`RETRY_KEEP`]) and in one packet, a statement, and not sent [`RETRIES`] times yet.
pub fn retryable(packet: &[u8], h: Header, held: bool, writer: bool, retries: u32) -> bool {
    !held
        && writer
        && retries < RETRIES
        && !h.continues()
        && h.len <= RETRY_KEEP
        && matches!(
            command_byte(packet, h),
            Some(com::QUERY | com::STMT_EXECUTE | com::STMT_BULK_EXECUTE)
        )
}

/// Whether a command is timed and counted as a statement (latency, queries, query log).
pub fn is_statement(command: Option<u8>) -> bool {
    matches!(
        command,
        Some(com::QUERY | com::STMT_EXECUTE | com::STMT_BULK_EXECUTE)
    )
}

/// Which limit a session between commands waits under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleLimit {
    Client,
    Transaction,
}

impl IdleLimit {
    /// The setting's name, as told to the client and logged.
    pub fn setting(self) -> &'static str {
        match self {
            IdleLimit::Client => "idle_client_timeout",
            IdleLimit::Transaction => "idle_transaction_timeout",
        }
    }
}

/// How long a session waits for its next command (None: for ever), and under which
/// setting: the shorter of `idle_client_timeout` and, in a transaction that holds a
/// connection, `idle_transaction_timeout`. Zero turns a limit off.
pub fn idle_wait(
    idle_client: Duration,
    idle_transaction: Duration,
    in_transaction: bool,
) -> (Option<Duration>, IdleLimit) {
    let client = Some(idle_client).filter(|t| !t.is_zero());
    let tx = Some(idle_transaction).filter(|t| !t.is_zero() && in_transaction);
    match (client, tx) {
        (Some(c), Some(t)) if c <= t => (Some(c), IdleLimit::Client),
        (_, Some(t)) => (Some(t), IdleLimit::Transaction),
        (c, None) => (c, IdleLimit::Client),
    }
}

/// What a client idle past its limit is told before it is closed (as MariaDB 10.6+).
pub fn inactivity(why: IdleLimit) -> ErrPacket {
    ErrPacket::new(
        errcode::ER_CLIENT_INTERACTION_TIMEOUT,
        "HY000",
        format!(
            "The client was disconnected by the server because of inactivity (dbproxy {})",
            why.setting()
        ),
    )
}

/// What a client that sent part of a command and went silent is told.
pub fn read_interrupted() -> ErrPacket {
    ErrPacket::new(
        errcode::ER_NET_READ_INTERRUPTED,
        "08S01",
        "Got timeout reading communication packets (dbproxy net_read_timeout)",
    )
}

/// Why the wait for a client's next command ended without one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoCommand {
    /// The session was killed (KILL CONNECTION, the admin console).
    Killed,
    /// dbproxy drains: a session that holds nothing goes at once, one in a transaction at
    /// the drain's deadline (`in_transaction`). The client is told [`going_away`].
    Draining { in_transaction: bool },
    /// Part of a command came, then `net_read_timeout` of silence.
    Stalled,
    /// Idle past the limit that applies.
    Idle(IdleLimit),
    /// The client closed the connection, or its socket failed.
    Left,
}

impl NoCommand {
    /// What the client is told, if anything, and the sequence id it goes with (the drain's
    /// [`going_away`] goes with 1: see there).
    pub fn told(self) -> Option<(u8, ErrPacket)> {
        match self {
            NoCommand::Killed | NoCommand::Left => None,
            NoCommand::Draining { .. } => Some((1, going_away())),
            NoCommand::Stalled => Some((0, read_interrupted())),
            NoCommand::Idle(limit) => Some((0, inactivity(limit))),
        }
    }
}

/// What a client is told when dbproxy drains (MariaDB's shutdown error), sent with
/// sequence id 1 so that a client sending its next command reads it as the answer.
pub fn going_away() -> ErrPacket {
    ErrPacket::new(
        errcode::ER_SERVER_SHUTDOWN,
        "08S01",
        "Server shutdown in progress (dbproxy is draining)",
    )
}

/// A command larger than `max_allowed_packet`.
pub fn too_large() -> ErrPacket {
    ErrPacket::new(
        errcode::ER_NET_PACKET_TOO_LARGE,
        "08S01",
        "Got a packet bigger than 'max_allowed_packet' bytes",
    )
}

/// A command whose payload is not what its command byte says.
pub fn malformed(what: &str) -> ErrPacket {
    ErrPacket::new(
        errcode::ER_MALFORMED_PACKET,
        "HY000",
        format!("Malformed communication packet (dbproxy: {what})"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mysql::packet::write_packet;

    fn packet(seq: u8, payload: &[u8]) -> (Vec<u8>, Header) {
        let mut out = Vec::new();
        write_packet(&mut out, seq, payload);
        let h = Header::parse(&out).unwrap();
        (out, h)
    }

    fn dispatched(payload: &[u8], held: bool) -> Command {
        let (p, h) = packet(0, payload);
        dispatch(&p, h, held)
    }

    #[test]
    fn commands_go_where_they_are_served() {
        assert_eq!(dispatched(b"\x03SELECT 1", false), Command::Query);
        assert_eq!(dispatched(&[com::QUIT], true), Command::Quit);
        assert_eq!(
            dispatched(&[com::CHANGE_USER, 0], false),
            Command::ChangeUser
        );
        assert_eq!(dispatched(&[com::STMT_PREPARE], false), Command::Prepare);
        assert_eq!(dispatched(&[com::STMT_EXECUTE], false), Command::Execute);
        assert_eq!(
            dispatched(&[com::STMT_BULK_EXECUTE], false),
            Command::Execute
        );
        for c in [com::STMT_SEND_LONG_DATA, com::STMT_FETCH, com::STMT_RESET] {
            assert_eq!(dispatched(&[c], false), Command::StatementCommand);
        }
        assert_eq!(
            dispatched(&[com::STMT_CLOSE], false),
            Command::CloseStatement
        );
        assert_eq!(
            dispatched(&[com::RESET_CONNECTION], false),
            Command::ResetConnection
        );
        assert_eq!(
            dispatched(&[com::INIT_DB, b'x'], false),
            Command::Forward {
                kind: ResponseKind::Single,
                track: true
            }
        );
        assert_eq!(
            dispatched(&[com::FIELD_LIST], false),
            Command::Forward {
                kind: ResponseKind::FieldList,
                track: true
            }
        );
    }

    #[test]
    fn a_ping_is_answered_by_dbproxy_unless_a_connection_is_held() {
        assert_eq!(dispatched(&[com::PING], false), Command::Pong);
        assert_eq!(
            dispatched(&[com::PING], true),
            Command::Forward {
                kind: ResponseKind::Single,
                track: false
            }
        );
        assert_eq!(
            dispatched(&[com::STATISTICS], false),
            Command::Forward {
                kind: ResponseKind::Single,
                track: false
            }
        );
    }

    #[test]
    fn empty_unknown_and_refused_commands_get_errors() {
        let Command::Refuse(e) = dispatched(&[], false) else {
            panic!("an empty packet is refused");
        };
        assert_eq!((e.code, e.message.as_str()), (1047, "Unknown command"));
        let Command::Refuse(e) = dispatched(&[0x12, 1, 2], false) else {
            panic!("COM_BINLOG_DUMP is refused");
        };
        assert_eq!(e.code, 1047);
        assert!(e.message.contains("0x12"), "{}", e.message);
        let Command::Refuse(e) = dispatched(&[0xee], false) else {
            panic!("an unknown byte is refused");
        };
        assert_eq!(e.code, 1047);
    }

    #[test]
    fn an_empty_packet_is_not_read_past() {
        // An empty packet followed by a COM_QUIT in the same buffer: the next packet's
        // header is not this command's byte.
        let (mut p, h) = packet(0, &[]);
        let (q, _) = packet(0, &[com::QUIT]);
        p.extend_from_slice(&q);
        assert_eq!(command_byte(&p, h), None);
        assert!(matches!(dispatch(&p, h, false), Command::Refuse(_)));
    }

    #[test]
    fn process_kill_takes_exactly_four_bytes_of_id() {
        let mut kill = vec![com::PROCESS_KILL];
        kill.extend_from_slice(&0x4000_0007u32.to_le_bytes());
        assert_eq!(dispatched(&kill, false), Command::ProcessKill(0x4000_0007));
        for bad in [&kill[..3], &[com::PROCESS_KILL, 1, 2, 3, 4, 5][..]] {
            let Command::Refuse(e) = dispatched(bad, false) else {
                panic!("a malformed COM_PROCESS_KILL is refused");
            };
            assert_eq!(e.code, errcode::ER_MALFORMED_PACKET);
        }
    }

    #[test]
    fn commands_start_at_sequence_zero() {
        let (_, h) = packet(0, b"\x03SELECT 1");
        assert!(out_of_order(h).is_none());
        let (_, h) = packet(3, b"\x03SELECT 1");
        assert_eq!(out_of_order(h).map(|e| e.code), Some(1156));
    }

    #[test]
    fn only_small_statements_on_a_borrowed_connection_are_kept_to_retry() {
        let (p, h) = packet(0, b"\x03SELECT 1");
        assert!(retryable(&p, h, false, true, 0));
        assert!(!retryable(&p, h, true, true, 0), "a held connection");
        assert!(!retryable(&p, h, false, false, 0), "a reader endpoint");
        assert!(!retryable(&p, h, false, true, RETRIES), "retried enough");
        let (p, h) = packet(0, &[com::STMT_EXECUTE, 1, 0, 0, 0]);
        assert!(retryable(&p, h, false, true, 0));
        let (p, h) = packet(0, &[com::STMT_PREPARE]);
        assert!(!retryable(&p, h, false, true, 0), "not a statement");
        let mut big = vec![com::QUERY];
        big.resize(RETRY_KEEP + 1, b' ');
        let (p, h) = packet(0, &big);
        assert!(!retryable(&p, h, false, true, 0), "too large to keep");
        assert!(is_statement(Some(com::QUERY)) && !is_statement(Some(com::PING)));
    }

    #[test]
    fn the_shorter_idle_limit_applies() {
        let s = Duration::from_secs;
        assert_eq!(idle_wait(s(0), s(0), true), (None, IdleLimit::Client));
        assert_eq!(
            idle_wait(s(60), s(0), true),
            (Some(s(60)), IdleLimit::Client)
        );
        assert_eq!(
            idle_wait(s(60), s(10), true),
            (Some(s(10)), IdleLimit::Transaction)
        );
        assert_eq!(
            idle_wait(s(60), s(10), false),
            (Some(s(60)), IdleLimit::Client),
            "no transaction: only the client limit"
        );
        assert_eq!(
            idle_wait(s(5), s(10), true),
            (Some(s(5)), IdleLimit::Client)
        );
        assert_eq!(
            idle_wait(s(0), s(10), true),
            (Some(s(10)), IdleLimit::Transaction)
        );
        let e = inactivity(IdleLimit::Transaction);
        assert_eq!(e.code, 4031);
        assert!(e.message.ends_with("(dbproxy idle_transaction_timeout)"));
        assert_eq!(going_away().code, 1053);
        assert_eq!(read_interrupted().code, 1159);
        assert_eq!(too_large().code, 1153);
    }

    #[test]
    fn what_a_client_without_a_command_is_told() {
        let code = |n: NoCommand| n.told().map(|(_, e)| e.code);
        assert_eq!(code(NoCommand::Killed), None);
        assert_eq!(code(NoCommand::Left), None);
        assert_eq!(
            code(NoCommand::Stalled),
            Some(errcode::ER_NET_READ_INTERRUPTED)
        );
        assert_eq!(
            code(NoCommand::Idle(IdleLimit::Client)),
            Some(errcode::ER_CLIENT_INTERACTION_TIMEOUT)
        );
        let drain = NoCommand::Draining {
            in_transaction: false,
        };
        assert_eq!(
            drain.told().map(|(seq, e)| (seq, e.code)),
            Some((1, errcode::ER_SERVER_SHUTDOWN))
        );
    }
}
