//! The health check's queries and how their answers are read (sans-IO).

use super::decide::Probe;
use super::Lag;
use crate::mysql::resultset::{parse_text_row, TextResult};

/// Whether the server takes writes: one row, two columns.
pub const READ_ONLY_SQL: &str = "SELECT @@global.read_only, @@global.innodb_read_only";

/// The server's Unix socket (the kernel guard protects it when the server is local).
pub const SOCKET_SQL: &str = "SELECT @@global.socket";

/// The socket path in [`SOCKET_SQL`]'s answer; none when empty or NULL.
pub fn socket(r: &TextResult) -> Option<String> {
    let row = r.rows.first()?;
    let v = parse_text_row(row, 1).ok()?;
    let path = std::str::from_utf8(v.first().copied().flatten()?).ok()?;
    (!path.is_empty()).then(|| path.to_string())
}

/// Every replication channel's state (MariaDB; MySQL 8 answers the second form).
pub const REPLICAS_SQL: &str = "SHOW ALL SLAVES STATUS";
pub const REPLICAS_SQL_MYSQL: &str = "SHOW REPLICA STATUS";

/// Why an answer could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProbeError {
    #[error("unexpected answer to the health check: {0}")]
    Unexpected(&'static str),
}

/// `true` when either flag is on.
pub fn read_only(r: &TextResult) -> Result<bool, ProbeError> {
    let row = r
        .rows
        .first()
        .ok_or(ProbeError::Unexpected("no row for @@read_only"))?;
    let values = parse_text_row(row, 2).map_err(|_| ProbeError::Unexpected("@@read_only row"))?;
    Ok(values
        .iter()
        .any(|v| matches!(v, Some(b) if *b != b"0" && !b.eq_ignore_ascii_case(b"OFF"))))
}

/// The lag of the worst replication channel: no channel is [`Lag::None`]; a channel whose
/// threads are not both running, or that reports no lag, is [`Lag::Stopped`].
pub fn replication_lag(r: &TextResult) -> Result<Lag, ProbeError> {
    if r.rows.is_empty() {
        return Ok(Lag::None);
    }
    let col = |names: &[&str]| {
        r.columns.iter().position(|c| {
            names
                .iter()
                .any(|n| c.name.eq_ignore_ascii_case(n.as_bytes()))
        })
    };
    let io = col(&["Slave_IO_Running", "Replica_IO_Running"]);
    let sql = col(&["Slave_SQL_Running", "Replica_SQL_Running"]);
    let behind = col(&["Seconds_Behind_Master", "Seconds_Behind_Source"]);
    let (Some(io), Some(sql), Some(behind)) = (io, sql, behind) else {
        return Err(ProbeError::Unexpected("replica status without its columns"));
    };
    let mut worst = 0u64;
    for row in &r.rows {
        let v = parse_text_row(row, r.columns.len())
            .map_err(|_| ProbeError::Unexpected("replica status row"))?;
        let yes = |i: usize| matches!(v.get(i), Some(Some(b)) if b.eq_ignore_ascii_case(b"Yes"));
        if !yes(io) || !yes(sql) {
            return Ok(Lag::Stopped);
        }
        let secs = v
            .get(behind)
            .copied()
            .flatten()
            .and_then(|b| std::str::from_utf8(b).ok()?.parse::<u64>().ok());
        match secs {
            Some(s) => worst = worst.max(s),
            None => return Ok(Lag::Stopped),
        }
    }
    Ok(Lag::Seconds(worst))
}

/// PostgreSQL's health check: whether the server is a standby, and if so how far behind
/// (0 when it has replayed all it received; -1 when it receives nothing).
pub const PG_ROLE_SQL: &str = "SELECT pg_catalog.pg_is_in_recovery()::int, \
    CASE WHEN NOT pg_catalog.pg_is_in_recovery() THEN NULL \
    WHEN pg_catalog.pg_last_wal_receive_lsn() IS NULL THEN -1 \
    WHEN pg_catalog.pg_last_wal_receive_lsn() = pg_catalog.pg_last_wal_replay_lsn() THEN 0 \
    ELSE COALESCE(floor(extract(epoch FROM pg_catalog.now() - pg_catalog.pg_last_xact_replay_timestamp()))::bigint, -1) END";

/// What a new PostgreSQL health-check connection asks once, for the guard: where the
/// server's Unix socket is (`<dir>/.s.PGSQL.<port>`).
pub const PG_SOCKET_SQL: &str = "SELECT pg_catalog.current_setting('unix_socket_directories'), \
    pg_catalog.current_setting('port')";

/// The answer to [`PG_SOCKET_SQL`]: the socket in the first directory that is a path
/// (not an abstract name).
pub fn pg_socket(rows: &[Vec<Option<String>>]) -> Option<String> {
    let [Some(dirs), Some(port)] = rows.first().map(Vec::as_slice)? else {
        return None;
    };
    let dir = dirs
        .split(',')
        .map(str::trim)
        .find(|d| d.starts_with('/'))?;
    Some(format!("{}/.s.PGSQL.{port}", dir.trim_end_matches('/')))
}

/// The server's port, which every role may read (for [`pg_default_sockets`]).
pub const PG_PORT_SQL: &str = "SELECT pg_catalog.current_setting('port')";

/// The directories PostgreSQL's packages put the socket in (Debian's, and libpq's
/// default elsewhere).
const PG_SOCKET_DIRS: [&str; 3] = ["/var/run/postgresql", "/run/postgresql", "/tmp"];

/// The answer to [`PG_PORT_SQL`]: the socket in each of [`PG_SOCKET_DIRS`].
pub fn pg_default_sockets(rows: &[Vec<Option<String>>]) -> Vec<String> {
    match rows.first().map(Vec::as_slice) {
        Some([Some(port)]) => PG_SOCKET_DIRS
            .iter()
            .map(|d| format!("{d}/.s.PGSQL.{port}"))
            .collect(),
        _ => Vec::new(),
    }
}

/// The answer to [`PG_ROLE_SQL`].
pub fn pg_role(rows: &[Vec<Option<String>>]) -> Result<Probe, ProbeError> {
    let Some([Some(standby), lag]) = rows.first().map(Vec::as_slice) else {
        return Err(ProbeError::Unexpected("no row for pg_is_in_recovery()"));
    };
    let read_only = standby == "1";
    let lag = match (read_only, lag.as_deref().map(str::parse::<i64>)) {
        (false, _) => Lag::None,
        (true, Some(Ok(s))) if s >= 0 => Lag::Seconds(s.unsigned_abs()),
        (true, Some(Ok(_))) => Lag::Stopped,
        (true, _) => Lag::Unknown,
    };
    Ok(Probe { read_only, lag })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_postgresql_socket_is_found_in_its_directories() {
        let row = |d: &str, p: &str| vec![vec![Some(d.to_string()), Some(p.to_string())]];
        assert_eq!(
            pg_socket(&row("/var/run/postgresql", "5432")).as_deref(),
            Some("/var/run/postgresql/.s.PGSQL.5432")
        );
        assert_eq!(
            pg_socket(&row("@abstract, /tmp/pg/", "6000")).as_deref(),
            Some("/tmp/pg/.s.PGSQL.6000")
        );
        assert_eq!(pg_socket(&row("", "5432")), None);
        assert_eq!(
            pg_default_sockets(&[vec![Some("6432".into())]])[0],
            "/var/run/postgresql/.s.PGSQL.6432"
        );
        assert_eq!(pg_socket(&[]), None);
    }
    use crate::mysql::resultset::{encode_text_row, ColumnDef};

    fn result(names: &[&str], rows: &[Vec<Option<&str>>]) -> TextResult {
        TextResult {
            columns: names
                .iter()
                .map(|n| ColumnDef {
                    schema: vec![],
                    table: vec![],
                    org_table: vec![],
                    name: n.as_bytes().to_vec(),
                    org_name: vec![],
                    charset: 33,
                    length: 0,
                    column_type: 253,
                    flags: 0,
                    decimals: 0,
                })
                .collect(),
            raw_columns: vec![],
            rows: rows
                .iter()
                .map(|r| encode_text_row(r.iter().map(|v| v.map(str::as_bytes))))
                .collect(),
            terminator: vec![0xfe],
        }
    }

    #[test]
    fn the_socket_is_the_path_reported_or_none() {
        let r = |v| result(&["@@global.socket"], &[vec![v]]);
        assert_eq!(
            socket(&r(Some("/run/mysqld/mysqld.sock"))).as_deref(),
            Some("/run/mysqld/mysqld.sock")
        );
        assert_eq!(socket(&r(Some(""))), None);
        assert_eq!(socket(&r(None)), None);
        assert_eq!(socket(&result(&["a"], &[])), None);
    }

    #[test]
    fn read_only_is_either_flag() {
        let r = |a, b| result(&["a", "b"], &[vec![Some(a), Some(b)]]);
        assert!(!read_only(&r("0", "0")).unwrap());
        assert!(read_only(&r("1", "0")).unwrap());
        assert!(read_only(&r("0", "1")).unwrap());
        assert!(read_only(&result(&["a"], &[])).is_err());
    }

    #[test]
    fn lag_is_the_worst_channel_and_stopped_threads_count_as_stopped() {
        let cols = [
            "Connection_name",
            "Slave_IO_Running",
            "Slave_SQL_Running",
            "Seconds_Behind_Master",
        ];
        assert_eq!(replication_lag(&result(&cols, &[])).unwrap(), Lag::None);
        let ch = |io, sql, s| vec![Some(""), Some(io), Some(sql), s];
        assert_eq!(
            replication_lag(&result(
                &cols,
                &[ch("Yes", "Yes", Some("3")), ch("Yes", "Yes", Some("7"))]
            ))
            .unwrap(),
            Lag::Seconds(7)
        );
        assert_eq!(
            replication_lag(&result(&cols, &[ch("Yes", "No", None)])).unwrap(),
            Lag::Stopped
        );
        assert_eq!(
            replication_lag(&result(&cols, &[ch("Connecting", "Yes", None)])).unwrap(),
            Lag::Stopped
        );
        let mysql = [
            "Replica_IO_Running",
            "Replica_SQL_Running",
            "Seconds_Behind_Source",
        ];
        assert_eq!(
            replication_lag(&result(
                &mysql,
                &[vec![Some("Yes"), Some("Yes"), Some("0")]]
            ))
            .unwrap(),
            Lag::Seconds(0)
        );
    }

    #[test]
    fn a_postgresql_standby_and_its_lag() {
        let row = |a: &str, b: Option<&str>| vec![vec![Some(a.to_string()), b.map(str::to_string)]];
        let p = pg_role(&row("0", None)).unwrap();
        assert_eq!((p.read_only, p.lag), (false, Lag::None));
        let p = pg_role(&row("1", Some("3"))).unwrap();
        assert_eq!((p.read_only, p.lag), (true, Lag::Seconds(3)));
        let p = pg_role(&row("1", Some("-1"))).unwrap();
        assert_eq!((p.read_only, p.lag), (true, Lag::Stopped));
        assert!(pg_role(&[]).is_err());
    }
}
