//! The SQL admin console (`[admin] sql_listen`), as ProxySQL's port 6032 and PgBouncer's
//! console: `mariadb -h 127.0.0.1 -P 6032 -u admin -p`, then `SHOW POOLS`, `SHOW CLIENTS`,
//! `SHOW TARGETS`, `SHOW PINS`, `SHOW ENDPOINTS`, `SHOW EVENTS`, `RELOAD`, `PAUSE`,
//! `RESUME`, `SHOW HELP`. Logins go through the same login machine as clients' (the admin
//! user only, no TLS: bind it to loopback). Answers are text result sets read from
//! [`super::status::collect`], so they match `GET /status`.

use super::status::{self, Status};
use crate::auth::Users;
use crate::config::{AdminConfig, UserConfig};
use crate::mysql::consts::{cap, com, errcode, status as st};
use crate::mysql::packet::write_packet as frame;
use crate::mysql::resultset::{column_type, encode_text_row, ColumnDef};
use crate::mysql::wire::{ok_packet, put_lenenc, put_lenenc_bytes, ErrPacket};
use crate::session::login::{ClientTls, Login, Profile, Step};
use crate::shared::ProxyShared;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The longest statement the console reads.
const MAX_COMMAND: usize = 64 * 1024;

/// The admin user as a [`Users`] table of one.
pub fn admin_users(cfg: &AdminConfig, store: Option<&crate::secrets::SecretStore>) -> Users {
    let u = UserConfig {
        name: cfg.admin_user.clone(),
        password: cfg.admin_password.clone(),
        password_hash: cfg.admin_password_hash.clone(),
        backend_user: None,
        backend_password: Default::default(),
        auth_plugin: Default::default(),
        postgres_auth: Default::default(),
        aws_iam_arns: Vec::new(),
        jwt_subjects: Vec::new(),
        max_database_connections: None,
        weight: 1,
    };
    Users::with_secrets(&[u], store)
}

/// Accepts console clients until the process ends.
pub async fn serve(listener: TcpListener, shared: Arc<ProxyShared>) {
    loop {
        match listener.accept().await {
            Ok((s, peer)) => {
                let sh = shared.clone();
                tokio::spawn(async move {
                    let _ = s.set_nodelay(true);
                    // The admin user as configured now (a reload may change it).
                    let users = admin_users(&sh.config().admin, sh.secrets.as_ref());
                    if let Err(e) = session(s, peer, &sh, &users).await {
                        tracing::debug!(%peer, "admin console session ended: {e}");
                    }
                });
            }
            Err(e) => {
                tracing::warn!("admin console accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn read_packet(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut h = [0u8; 4];
    s.read_exact(&mut h).await?;
    let len = usize::from(h[0]) | usize::from(h[1]) << 8 | usize::from(h[2]) << 16;
    if len > MAX_COMMAND {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "statement too long for the admin console",
        ));
    }
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).await?;
    Ok((h[3], p))
}

async fn send(s: &mut TcpStream, seq: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(payload.len() + 4);
    frame(&mut out, seq, payload);
    s.write_all(&out).await
}

async fn session(
    mut s: TcpStream,
    peer: SocketAddr,
    shared: &Arc<ProxyShared>,
    users: &Users,
) -> std::io::Result<()> {
    let profile = Profile {
        version: format!("5.5.5-10.11.0-dbproxy-{}-admin", env!("CARGO_PKG_VERSION")),
        // Classic EOF packets and no session tracking: the console writes its own results.
        capabilities: cap::PROXY_OFFERS & !(cap::DEPRECATE_EOF | cap::SESSION_TRACK | cap::SSL),
        ext_capabilities: 0,
        collation: 45,
    };
    let id = shared.next_connection_id();
    let nonce = crate::mysql::auth::new_nonce();
    let (mut machine, greeting) =
        Login::start(&profile, id, nonce, peer.ip().to_string(), ClientTls::Off);
    send(&mut s, 0, &greeting).await?;
    let login = async {
        loop {
            let (seq, p) = read_packet(&mut s).await?;
            match machine.on_packet(users, seq, &p) {
                Step::Send { seq, payload } => send(&mut s, seq, &payload).await?,
                Step::Accepted(a) => {
                    let (pre, ok_seq) = a.preamble();
                    if let Some((seq, p)) = pre {
                        send(&mut s, seq, &p).await?;
                    }
                    send(&mut s, ok_seq, &ok_packet(st::AUTOCOMMIT)).await?;
                    return Ok::<_, std::io::Error>(true);
                }
                Step::Refused { seq, err, log } => {
                    tracing::warn!(%peer, "admin console login refused: {log}");
                    send(&mut s, seq, &err.encode()).await?;
                    return Ok(false);
                }
                // No TLS and no tokens on the console.
                Step::StartTls | Step::VerifyToken { .. } => return Ok(false),
            }
        }
    };
    let handshake_timeout = shared.config().proxy.handshake_timeout;
    match tokio::time::timeout(handshake_timeout, login).await {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) | Err(_) => return Ok(()),
        Ok(Err(e)) => return Err(e),
    }
    tracing::info!(%peer, "admin console login");
    loop {
        let (_, p) = read_packet(&mut s).await?;
        let Some((&command, rest)) = p.split_first() else {
            continue;
        };
        let answer = match command {
            com::QUIT => return Ok(()),
            com::PING | com::INIT_DB => Answer::Ok(String::new()),
            com::QUERY => {
                let sql = String::from_utf8_lossy(rest);
                tracing::info!(%peer, statement = %sql.trim(), "admin console");
                run(shared, &sql).await
            }
            _ => Answer::Err(ErrPacket::new(
                errcode::ER_UNKNOWN_COM_ERROR,
                "08S01",
                "the dbproxy admin console takes text statements only",
            )),
        };
        write_answer(&mut s, answer).await?;
    }
}

/// What a statement gets.
#[derive(Debug, PartialEq)]
pub enum Answer {
    Ok(String),
    Rows {
        columns: Vec<&'static str>,
        rows: Vec<Vec<Option<String>>>,
    },
    Err(ErrPacket),
}

async fn write_answer(s: &mut TcpStream, a: Answer) -> std::io::Result<()> {
    match a {
        Answer::Ok(info) => {
            let mut ok = vec![0x00, 0, 0];
            ok.extend_from_slice(&st::AUTOCOMMIT.to_le_bytes());
            ok.extend_from_slice(&[0, 0]);
            // Length-encoded, as MariaDB sends it (its connector reads it so).
            if !info.is_empty() {
                put_lenenc_bytes(&mut ok, info.as_bytes());
            }
            send(s, 1, &ok).await
        }
        Answer::Err(e) => send(s, 1, &e.encode()).await,
        Answer::Rows { columns, rows } => {
            let mut out = Vec::new();
            let mut seq = 1u8;
            let mut push = |out: &mut Vec<u8>, p: &[u8]| {
                frame(out, seq, p);
                seq = seq.wrapping_add(1);
            };
            let mut count = Vec::new();
            put_lenenc(&mut count, columns.len() as u64);
            push(&mut out, &count);
            for c in &columns {
                let def = ColumnDef {
                    schema: Vec::new(),
                    table: b"dbproxy".to_vec(),
                    org_table: Vec::new(),
                    name: c.as_bytes().to_vec(),
                    org_name: Vec::new(),
                    charset: 45,
                    length: 1024,
                    column_type: column_type::VAR_STRING,
                    flags: 0,
                    decimals: 0,
                };
                push(&mut out, &def.encode());
            }
            let eof = [0xfe, 0, 0, st::AUTOCOMMIT as u8, 0];
            push(&mut out, &eof);
            for r in &rows {
                push(
                    &mut out,
                    &encode_text_row(r.iter().map(|v| v.as_deref().map(str::as_bytes))),
                );
            }
            push(&mut out, &eof);
            s.write_all(&out).await
        }
    }
}

/// Reloads off the console's runtime (reading secrets may block).
async fn reload(shared: &Arc<ProxyShared>) -> Result<String, String> {
    let sh = shared.clone();
    tokio::task::spawn_blocking(move || sh.reload())
        .await
        .unwrap_or_else(|e| Err(format!("the reload stopped: {e}")))
}

/// Runs one console statement.
pub async fn run(shared: &Arc<ProxyShared>, sql: &str) -> Answer {
    let words = sql
        .trim()
        .trim_end_matches(';')
        .split_whitespace()
        .map(str::to_ascii_uppercase)
        .collect::<Vec<_>>();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["SHOW", what] | ["SHOW", what, ..] if *what != "HELP" => match show(shared, what) {
            Some(a) => a,
            None => unknown(sql),
        },
        ["SHOW", "HELP"] | ["HELP"] => help(),
        ["RELOAD"] => match reload(shared).await {
            Ok(report) => {
                tracing::info!("RELOAD from the admin console: {report}");
                Answer::Ok(report)
            }
            Err(e) => Answer::Err(ErrPacket::new(
                errcode::ER_UNKNOWN_ERROR,
                "HY000",
                format!("configuration not reloaded (the running one stays): {e}"),
            )),
        },
        ["PAUSE"] => {
            shared.set_paused(true);
            tracing::warn!("PAUSE: new statements are held until RESUME");
            Answer::Ok("paused: statements outside a transaction wait until RESUME".into())
        }
        ["QUERY", "LOGGING", "ON"] => {
            let until = shared.query_log.enable(
                crate::session::querylog::MAX_ON,
                crate::stats::unix_now() as u64,
            );
            tracing::warn!(
                until,
                "enhanced query logging on (statements with literals blanked; off by itself after 24 h)"
            );
            Answer::Ok("query logging on for 24 h (QUERY LOGGING OFF ends it)".into())
        }
        ["QUERY", "LOGGING", "OFF"] => {
            shared.query_log.disable();
            tracing::warn!("enhanced query logging off");
            Answer::Ok(String::new())
        }
        ["RESUME"] => {
            shared.set_paused(false);
            tracing::warn!("RESUME: statements flow again");
            Answer::Ok(String::new())
        }
        // What client programs send on their own when they connect.
        ["SET", ..] => Answer::Ok(String::new()),
        ["SELECT", rest @ ..] => select(rest).unwrap_or_else(|| unknown(sql)),
        _ => unknown(sql),
    }
}

fn unknown(sql: &str) -> Answer {
    Answer::Err(ErrPacket::new(
        errcode::ER_PARSE_ERROR,
        "42000",
        format!(
            "dbproxy admin console: unknown statement {:?}; try SHOW HELP",
            sql.trim()
        ),
    ))
}

fn select(rest: &[&str]) -> Option<Answer> {
    let what = rest.first()?;
    let value = match *what {
        "@@VERSION_COMMENT" => "dbproxy admin console".to_string(),
        "@@VERSION" | "VERSION()" => env!("CARGO_PKG_VERSION").to_string(),
        "DATABASE()" => {
            return Some(Answer::Rows {
                columns: vec!["DATABASE()"],
                rows: vec![vec![None]],
            })
        }
        "1" => "1".to_string(),
        _ => return None,
    };
    let column: &'static str = match *what {
        "@@VERSION_COMMENT" => "@@version_comment",
        "@@VERSION" => "@@version",
        "VERSION()" => "VERSION()",
        _ => "1",
    };
    Some(Answer::Rows {
        columns: vec![column],
        rows: vec![vec![Some(value)]],
    })
}

fn help() -> Answer {
    let rows = [
        (
            "SHOW POOLS",
            "each pool: budget, open, idle, borrowed, in transaction, pinned",
        ),
        (
            "SHOW CLIENTS",
            "each client connection: user, endpoint, peer, database connection held",
        ),
        (
            "SHOW TARGETS",
            "each target: role, health, lag, availability",
        ),
        ("SHOW PINS", "clients pinned now, by pool and reason"),
        (
            "SHOW FLEET",
            "each instance sharing a pool's max_connections_total: its share, want and open connections",
        ),
        (
            "SHOW ENDPOINTS",
            "each endpoint: clients, logins, statements",
        ),
        (
            "SHOW EVENTS",
            "the monitors' recent decisions (failovers among them)",
        ),
        ("RELOAD", "read the configuration file again (as SIGHUP)"),
        (
            "PAUSE",
            "hold new statements of sessions outside a transaction",
        ),
        ("RESUME", "let them run"),
        (
            "QUERY LOGGING ON|OFF",
            "log every statement (literals blanked), user and duration; off by itself after 24 h",
        ),
    ];
    Answer::Rows {
        columns: vec!["statement", "what it does"],
        rows: rows
            .iter()
            .map(|(a, b)| vec![Some(a.to_string()), Some(b.to_string())])
            .collect(),
    }
}

/// `SHOW <what>` from a status read now.
pub fn show(shared: &ProxyShared, what: &str) -> Option<Answer> {
    let status = status::collect(shared);
    show_from(&status, what)
}

/// `SHOW <what>` from `status`.
pub fn show_from(status: &Status, what: &str) -> Option<Answer> {
    status::rows(status, what).map(|(columns, rows)| Answer::Rows { columns, rows })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> Status {
        Status {
            version: "0".into(),
            uptime_seconds: 1.0,
            draining: false,
            paused: false,
            held_statements: 0,
            query_logging_until: None,
            client_connections: 1,
            endpoints: Vec::new(),
            target_groups: Vec::new(),
            pools: vec![status::PoolStatus {
                pool: "default".into(),
                target_group: "default".into(),
                target_role: "read_write".into(),
                engine: "mysql".into(),
                max_connections: 10,
                open: 3,
                idle: 2,
                borrowed: 1,
                in_transaction: 1,
                waiting: 2,
                pinned: 0,
                pinned_by_reason: [("cursor".to_string(), 0)].into_iter().collect(),
                requests: 42,
                borrow_timeouts: 0,
                idle_per_core: vec![1, 1],
            }],
            clients: Vec::new(),
            events: Vec::new(),
            guard: None,
            fleet: None,
        }
    }

    #[test]
    fn show_pools_is_the_status() {
        let Some(Answer::Rows { columns, rows }) = show_from(&status(), "POOLS") else {
            panic!("no rows");
        };
        assert_eq!(columns.first(), Some(&"pool"));
        let row: Vec<String> = rows[0]
            .iter()
            .map(|v| v.clone().unwrap_or_default())
            .collect();
        assert_eq!(
            row,
            [
                "default",
                "default",
                "read_write",
                "10",
                "3",
                "2",
                "1",
                "1",
                "2",
                "0",
                "42",
                "0",
                "mysql"
            ]
        );
        assert_eq!(show_from(&status(), "NOTHING"), None);
    }

    #[test]
    fn show_fleet_lists_each_instance_of_each_shared_pool() {
        use crate::fleet::driver::{InstanceStatus, PoolFleetStatus};
        let mut st = status();
        let inst = |id: &str, held, this| InstanceStatus {
            instance: id.into(),
            host: "h".into(),
            held,
            want: 64,
            open: 3,
            this,
        };
        st.fleet = Some(crate::fleet::FleetStatus {
            name: "prod".into(),
            instance: "a".into(),
            store: "http://e:2379".into(),
            pools: vec![PoolFleetStatus {
                pool: "default".into(),
                max_connections_total: 30,
                max_instances: 3,
                floor: 10,
                contact: "connected".into(),
                cap: 20,
                held: Some(20),
                total_held: 21,
                instances: vec![inst("a", Some(20), true), inst("b", None, false)],
            }],
        });
        let Some(Answer::Rows { columns, rows }) = show_from(&st, "FLEET") else {
            panic!("no rows");
        };
        assert_eq!(columns[..4], ["pool", "instance", "host", "held"]);
        let cells = |r: &Vec<Option<String>>| -> Vec<String> {
            r.iter()
                .map(|v| v.clone().unwrap_or("NULL".into()))
                .collect()
        };
        assert_eq!(
            cells(&rows[0]),
            [
                "default",
                "a",
                "h",
                "20",
                "64",
                "3",
                "yes",
                "connected",
                "30",
                "21",
                "10"
            ]
        );
        assert_eq!(cells(&rows[1])[3], "NULL", "b is not registered");
        assert!(show_from(&status(), "FLEET")
            .is_some_and(|a| matches!(a, Answer::Rows { rows, .. } if rows.is_empty())));
    }

    #[test]
    fn clients_get_their_version_comment() {
        let Some(Answer::Rows { rows, .. }) = select(&["@@VERSION_COMMENT", "LIMIT", "1"]) else {
            panic!("no rows");
        };
        assert_eq!(rows, vec![vec![Some("dbproxy admin console".to_string())]]);
    }
}
