//! Prepared-statement packets: statement ids, OK_stmt, and COM_STMT_EXECUTE rewritten for
//! another backend's statement (the bookkeeping lives in `crate::session::stmts`).

use super::wire::Reader;
use super::ProtocolError;

/// The statement id of a COM_STMT_* payload (bytes 1..5).
pub fn stmt_id(payload: &[u8]) -> Result<u32, ProtocolError> {
    let mut r = Reader::new(payload);
    r.u8("command")?;
    r.u32("statement id")
}

/// Writes `id` as the statement id of a COM_STMT_* payload or an OK_stmt reply.
pub fn patch_stmt_id(payload: &mut [u8], id: u32) {
    if let Some(b) = payload.get_mut(1..5) {
        b.copy_from_slice(&id.to_le_bytes());
    }
}

/// The parts of an OK_stmt reply dbproxy needs: (statement id, columns, parameters).
pub fn parse_prepare_ok(payload: &[u8]) -> Result<(u32, u16, u16), ProtocolError> {
    let mut r = Reader::new(payload);
    if r.u8("OK_stmt header")? != 0 {
        return Err(ProtocolError::Malformed("not an OK_stmt packet"));
    }
    let id = r.u32("statement id")?;
    let columns = r.u16("column count")?;
    let params = r.u16("parameter count")?;
    Ok((id, columns, params))
}

/// Where the parameter types of a COM_STMT_EXECUTE payload are, for a statement with
/// `params` parameters: `(offset of the new-params-bound flag, flag)`.
fn bound_flag(payload: &[u8], params: u16) -> Result<Option<(usize, u8)>, ProtocolError> {
    if params == 0 {
        return Ok(None);
    }
    let at = 1 + 4 + 1 + 4 + usize::from(params).div_ceil(8);
    let flag = *payload
        .get(at)
        .ok_or(ProtocolError::Truncated("new-params-bound flag"))?;
    Ok(Some((at, flag)))
}

/// Whether a COM_STMT_EXECUTE opens a cursor (any cursor type flag).
pub fn execute_opens_cursor(payload: &[u8]) -> bool {
    payload.get(5).is_some_and(|f| f & 0x0f != 0)
}

/// Parameter types remembered for a statement on one side (client or backend).
pub type Types = Option<Vec<u8>>;

/// Rewrites a client's COM_STMT_EXECUTE for a backend statement `backend_id` with `params`
/// parameters: the backend's id, and the parameter types when the client leaves them out
/// (it sent them on an earlier execute, perhaps to another backend) and the backend
/// statement last saw other ones. Appends the rewritten payload to `out`; updates the types
/// remembered on both sides.
pub fn rewrite_execute(
    payload: &[u8],
    params: u16,
    client: &mut Types,
    backend: &mut Types,
    backend_id: u32,
    out: &mut Vec<u8>,
) -> Result<(), ProtocolError> {
    let start = out.len();
    match bound_flag(payload, params)? {
        Some((at, 1)) => {
            let n = 2 * usize::from(params);
            let types = payload
                .get(at + 1..at + 1 + n)
                .ok_or(ProtocolError::Truncated("parameter types"))?;
            if client.as_deref() != Some(types) {
                *client = Some(types.to_vec());
            }
            if backend.as_deref() != Some(types) {
                *backend = Some(types.to_vec());
            }
            out.extend_from_slice(payload);
        }
        Some((at, _)) => match &*client {
            Some(types) if backend.as_ref() != Some(types) => {
                out.reserve(payload.len() + types.len());
                out.extend_from_slice(&payload[..at]);
                out.push(1);
                out.extend_from_slice(types);
                out.extend_from_slice(&payload[at + 1..]);
                *backend = Some(types.clone());
            }
            _ => out.extend_from_slice(payload),
        },
        None => out.extend_from_slice(payload),
    }
    patch_stmt_id(&mut out[start..], backend_id);
    Ok(())
}

/// COM_STMT_BULK_EXECUTE's flag for "parameter types follow".
const BULK_SEND_TYPES: u16 = 128;

/// Rewrites a client's COM_STMT_BULK_EXECUTE (MariaDB) for backend statement `backend_id`.
/// Only with its parameter types, as MariaDB's connectors send it: without them the server
/// would take the types of the last execute on that connection, perhaps another client's.
pub fn rewrite_bulk(
    payload: &[u8],
    backend_id: u32,
    out: &mut Vec<u8>,
) -> Result<(), ProtocolError> {
    let flags = payload
        .get(5..7)
        .ok_or(ProtocolError::Truncated("bulk execute flags"))?;
    if u16::from_le_bytes([flags[0], flags[1]]) & BULK_SEND_TYPES == 0 {
        return Err(ProtocolError::Unsupported(
            "COM_STMT_BULK_EXECUTE without parameter types".into(),
        ));
    }
    let start = out.len();
    out.extend_from_slice(payload);
    patch_stmt_id(&mut out[start..], backend_id);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn execute(id: u32, params: u16, bound: bool, values: &[u8]) -> Vec<u8> {
        let mut p = vec![0x17];
        p.extend_from_slice(&id.to_le_bytes());
        p.push(0);
        p.extend_from_slice(&1u32.to_le_bytes());
        p.extend(std::iter::repeat_n(0u8, usize::from(params).div_ceil(8)));
        p.push(u8::from(bound));
        if bound {
            for _ in 0..params {
                p.extend_from_slice(&[0x08, 0x00]); // LONGLONG
            }
        }
        p.extend_from_slice(values);
        p
    }

    #[test]
    fn bulk_executes_get_the_backend_id_and_need_their_types() {
        let mut p = vec![
            0xfa, 7, 0, 0, 0, 128, 0, 0x08, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0,
        ];
        let mut out = b"kept".to_vec();
        rewrite_bulk(&p, 42, &mut out).unwrap();
        assert_eq!(&out[..4], b"kept");
        assert_eq!(&out[4..9], &[0xfa, 42, 0, 0, 0]);
        assert_eq!(&out[9..], &p[5..]);
        p[5] = 0;
        assert!(rewrite_bulk(&p, 42, &mut Vec::new()).is_err());
        assert!(rewrite_bulk(&p[..6], 42, &mut Vec::new()).is_err());
    }

    fn rewritten(
        payload: &[u8],
        client: &mut Types,
        backend: &mut Types,
        id: u32,
    ) -> Result<Vec<u8>, ProtocolError> {
        let mut out = b"kept".to_vec();
        rewrite_execute(payload, 1, client, backend, id, &mut out)?;
        assert_eq!(&out[..4], b"kept", "appends after what is there");
        Ok(out.split_off(4))
    }

    #[test]
    fn execute_gets_the_backend_id_and_types_when_needed() {
        let (mut client, mut b1) = (None, None);
        let first = execute(5, 1, true, &7i64.to_le_bytes());
        let out = rewritten(&first, &mut client, &mut b1, 77).unwrap();
        assert_eq!(stmt_id(&out).unwrap(), 77);
        assert_eq!(out.len(), first.len());
        assert_eq!(client.as_deref(), Some(&[0x08, 0x00][..]));
        // A later execute without types on a backend that has them: only the id changes.
        let later = execute(5, 1, false, &8i64.to_le_bytes());
        let out = rewritten(&later, &mut client, &mut b1, 77).unwrap();
        assert_eq!(out.len(), later.len());
        // The same on a backend that never saw the types: they are put in.
        let mut b2 = None;
        let out = rewritten(&later, &mut client, &mut b2, 3).unwrap();
        assert_eq!(out, {
            let mut e = execute(3, 1, true, &8i64.to_le_bytes());
            e[1..5].copy_from_slice(&3u32.to_le_bytes());
            e
        });
        assert!(rewritten(&later[..10], &mut client, &mut b2, 3).is_err());
    }

    #[test]
    fn prepare_ok_and_cursor_flag() {
        let ok = [0u8, 9, 0, 0, 0, 2, 0, 1, 0, 0, 0, 0];
        assert_eq!(parse_prepare_ok(&ok).unwrap(), (9, 2, 1));
        assert!(parse_prepare_ok(&[0xff, 1, 2]).is_err());
        let mut e = execute(1, 0, false, &[]);
        assert!(!execute_opens_cursor(&e));
        e[5] = 1;
        assert!(execute_opens_cursor(&e));
    }
}
