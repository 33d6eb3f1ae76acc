//! A prepared statement's execution as the session decides it: which of the client's
//! statements a COM_STMT_EXECUTE (or MariaDB's bulk execute) runs, what it needs of the
//! connection, whether it opens a cursor, whether its diagnostics can be answered at all,
//! and the command the connection gets (its own statement id, the parameter types it
//! lacks). The driver prepares the statement on the connection when it is missing there,
//! and sends what this builds.

use super::diag::Answer;
use super::sql::SqlInfo;
use super::state::Needs;
use super::stmts::{BackendStmts, StmtKey};
use super::ClientSession;
use crate::mysql::consts::{com, errcode};
use crate::mysql::stmt::{execute_opens_cursor, rewrite_bulk, rewrite_execute, stmt_id};
use crate::mysql::wire::ErrPacket;
use std::sync::Arc;

/// A client's execute, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Execute {
    /// The client's statement id (dbproxy's).
    pub cid: u32,
    pub key: Arc<StmtKey>,
    /// What the statement's text does (classified when it was prepared).
    pub info: Arc<SqlInfo>,
    /// What the connection must have of the client's session.
    pub needs: Needs,
    /// A COM_STMT_EXECUTE asking for a cursor (the rows come through COM_STMT_FETCH).
    pub cursor: bool,
}

/// The client's statement a COM_STMT_* command names, or the error it gets (as MariaDB
/// words it, with `what` the server function that would have failed).
pub fn client_statement(s: &ClientSession, payload: &[u8], what: &str) -> Result<u32, ErrPacket> {
    let id = stmt_id(payload).unwrap_or(0);
    s.stmts.resolve(id).ok_or_else(|| {
        ErrPacket::new(
            errcode::ER_UNKNOWN_STMT_HANDLER,
            "HY000",
            format!("Unknown prepared statement handler ({id}) given to {what}"),
        )
    })
}

/// Reads a COM_STMT_EXECUTE or COM_STMT_BULK_EXECUTE payload.
pub fn read(s: &ClientSession, payload: &[u8]) -> Result<Execute, ErrPacket> {
    let cid = client_statement(s, payload, "mysqld_stmt_execute")?;
    let stmt = s.stmts.get(cid).ok_or_else(|| {
        ErrPacket::new(
            errcode::ER_UNKNOWN_STMT_HANDLER,
            "HY000",
            "Unknown prepared statement handler",
        )
    })?;
    let info = stmt.info.clone();
    Ok(Execute {
        cid,
        key: stmt.key.clone(),
        needs: Needs {
            last_insert_id: info.readers.last_insert_id || info.changes_last_insert_id,
        },
        info,
        cursor: payload.first() == Some(&com::STMT_EXECUTE) && execute_opens_cursor(payload),
    })
}

/// A prepared statement's diagnostics answer: its text cannot be rewritten, so an answer
/// that needs a rewrite is refused rather than showing another client's values.
pub fn answer(answer: Answer) -> Result<Answer, ErrPacket> {
    match answer {
        Answer::Rewrite(_) | Answer::Capture => Err(ErrPacket::new(
            errcode::ER_UNKNOWN_COM_ERROR,
            "HY000",
            "(dbproxy) a prepared statement that reads ROW_COUNT(), FOUND_ROWS() or warnings inside an expression, or GET DIAGNOSTICS, must run right after the statement it asks about; use the text protocol for it",
        )),
        a => Ok(a),
    }
}

/// Why an execute could not be built for the connection.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The statement is not (or no longer) prepared on the connection.
    #[error("the statement is not prepared on the connection")]
    NotPrepared,
    /// The client's payload does not hold what its header says (the client is told).
    #[error("{0}")]
    Malformed(String),
}

/// Appends to `out` the execute the connection gets: its own statement id, and the
/// parameter types when the client left them out and the connection's statement last
/// saw other ones (a bulk execute carries its own).
pub fn build(
    s: &mut ClientSession,
    ex: &Execute,
    payload: &[u8],
    backend: &mut BackendStmts,
    out: &mut Vec<u8>,
) -> Result<(), BuildError> {
    let cs = s.stmts.get_mut(ex.cid).ok_or(BuildError::NotPrepared)?;
    let bs = backend.get_mut(&cs.key).ok_or(BuildError::NotPrepared)?;
    let built = if payload.first() == Some(&com::STMT_BULK_EXECUTE) {
        // The server keeps the bulk's types: what it has now is not known here.
        bs.types = None;
        rewrite_bulk(payload, bs.id, out)
    } else {
        rewrite_execute(payload, cs.params, &mut cs.types, &mut bs.types, bs.id, out)
    };
    built.map_err(|e| BuildError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::sql::analyze;
    use crate::session::stmts::StmtContext;

    /// A session with `SELECT ?` prepared (client id returned), and a connection that has
    /// it as statement 77.
    fn prepared() -> (ClientSession, BackendStmts, u32) {
        let mut s = crate::session::testing::session(None);
        let sql: &[u8] = b"SELECT LAST_INSERT_ID() + ?";
        let key = StmtKey::new(StmtContext::default(), Arc::from(sql));
        let cid = s.stmts.add(key.clone(), Arc::new(analyze(sql)), 1, 1);
        let mut b = BackendStmts::new(4);
        b.insert(key, 77, 1);
        (s, b, cid)
    }

    fn execute(cid: u32, flags: u8, types: bool) -> Vec<u8> {
        let mut p = vec![com::STMT_EXECUTE];
        p.extend_from_slice(&cid.to_le_bytes());
        p.push(flags);
        p.extend_from_slice(&1u32.to_le_bytes());
        p.push(0); // null bitmap
        p.push(u8::from(types));
        if types {
            p.extend_from_slice(&[8, 0]); // LONGLONG
        }
        p.extend_from_slice(&5i64.to_le_bytes());
        p
    }

    #[test]
    fn an_execute_is_read_and_built_for_the_connection() {
        let (mut s, mut b, cid) = prepared();
        let payload = execute(cid, 0, true);
        let ex = read(&s, &payload).unwrap();
        assert_eq!(ex.cid, cid);
        assert!(ex.needs.last_insert_id, "it reads LAST_INSERT_ID()");
        assert!(!ex.cursor);
        let mut out = Vec::new();
        build(&mut s, &ex, &payload, &mut b, &mut out).unwrap();
        assert_eq!(out.get(1..5), Some(&77u32.to_le_bytes()[..]));
        // The next execute leaves the types out: the connection saw them, it gets none.
        let again = execute(cid, 0, false);
        let mut out = Vec::new();
        build(&mut s, &ex, &again, &mut b, &mut out).unwrap();
        assert_eq!(out.len(), again.len());
    }

    #[test]
    fn a_connection_that_never_saw_the_types_gets_them() {
        let (mut s, mut b, cid) = prepared();
        let payload = execute(cid, 0, true);
        let ex = read(&s, &payload).unwrap();
        build(&mut s, &ex, &payload, &mut b, &mut Vec::new()).unwrap();
        // Another connection, the statement prepared there afresh.
        let mut other = BackendStmts::new(4);
        other.insert(ex.key.clone(), 5, 1);
        let mut out = Vec::new();
        build(&mut s, &ex, &execute(cid, 0, false), &mut other, &mut out).unwrap();
        assert_eq!(out, {
            let mut p = execute(5, 0, true);
            p[1..5].copy_from_slice(&5u32.to_le_bytes());
            p
        });
    }

    #[test]
    fn unknown_statements_cursors_and_unprepared_connections() {
        let (mut s, _, cid) = prepared();
        let e = read(&s, &execute(cid + 40, 0, true)).unwrap_err();
        assert_eq!(e.code, 1243);
        assert!(e.message.contains("mysqld_stmt_execute"), "{}", e.message);
        let ex = read(&s, &execute(cid, 1, true)).unwrap();
        assert!(ex.cursor, "CURSOR_TYPE_READ_ONLY");
        let err = build(
            &mut s,
            &ex,
            &execute(cid, 1, true),
            &mut BackendStmts::new(4),
            &mut Vec::new(),
        );
        assert!(matches!(err, Err(BuildError::NotPrepared)));
        let (mut s, mut b, cid) = prepared();
        let ex = read(&s, &execute(cid, 0, true)).unwrap();
        let short = execute(cid, 0, true)[..8].to_vec();
        let err = build(&mut s, &ex, &short, &mut b, &mut Vec::new());
        assert!(matches!(err, Err(BuildError::Malformed(_))), "{err:?}");
    }

    #[test]
    fn a_prepared_statement_is_never_rewritten() {
        assert_eq!(answer(Answer::Forward), Ok(Answer::Forward));
        let patch = Answer::PatchRow(vec![b"1".to_vec()]);
        assert_eq!(answer(patch.clone()), Ok(patch));
        assert_eq!(
            answer(Answer::Rewrite(b"x".to_vec())).unwrap_err().code,
            1047
        );
        assert!(answer(Answer::Capture).is_err());
    }
}
