//! User variables that move with their client. MariaDB does not report them through session
//! tracking, so dbproxy reads back the ones a statement may have assigned, in the same round
//! trip (a query pipelined after the statement), with their types, and replays them on the
//! next backend connection that serves the client.

use crate::mysql::resultset::{column_type, ColumnDef};
use std::collections::BTreeMap;

/// A user variable's value, with the type MariaDB keeps for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserValue {
    Null,
    Int(Vec<u8>),
    UInt(Vec<u8>),
    Decimal(Vec<u8>),
    Double(Vec<u8>),
    /// A string: its bytes in its own character set, and its collation (`binary` for binary
    /// strings).
    Str {
        bytes: Vec<u8>,
        charset: Vec<u8>,
        collation: Vec<u8>,
    },
}

/// User variables by lowercased name. A variable set to NULL and one never set read the same.
pub type UserVars = BTreeMap<Vec<u8>, UserValue>;

/// Why a read-back could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReadBackError {
    #[error("unexpected read-back shape: {0}")]
    Shape(&'static str),
    #[error("unexpected value in read-back: {0}")]
    Value(&'static str),
}

/// Columns per variable in the read-back: `@v, HEX(@v), CHARSET(@v), COLLATION(@v)`.
pub const COLUMNS_PER_VAR: usize = 4;

/// A user variable reference for SQL (`` @`na``me` ``).
pub fn var_ref(name: &[u8]) -> String {
    let mut s = String::with_capacity(name.len() + 3);
    s.push_str("@`");
    s.push_str(&String::from_utf8_lossy(name).replace('`', "``"));
    s.push('`');
    s
}

/// Appends the select items that read `name` back (see [`COLUMNS_PER_VAR`]).
pub fn push_read_back(sql: &mut String, name: &[u8]) {
    let v = var_ref(name);
    if !sql.ends_with("SELECT ") {
        sql.push_str(", ");
    }
    sql.push_str(&format!("{v}, HEX({v}), CHARSET({v}), COLLATION({v})"));
}

fn is_plain_name(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'_')
}

fn unhex(h: &[u8]) -> Option<Vec<u8>> {
    if !h.len().is_multiple_of(2) {
        return None;
    }
    let d = |c: u8| (c as char).to_digit(16).map(|v| v as u8);
    h.chunks(2)
        .map(|p| Some(d(p[0])? << 4 | d(p[1])?))
        .collect()
}

/// The value of one variable from its four read-back columns.
pub fn parse_value(col: &ColumnDef, values: &[Option<&[u8]>]) -> Result<UserValue, ReadBackError> {
    let [v, hex, charset, collation] = values else {
        return Err(ReadBackError::Shape("four columns per variable"));
    };
    let Some(v) = v else {
        return Ok(UserValue::Null);
    };
    let number = |v: &[u8]| -> Result<Vec<u8>, ReadBackError> {
        if !v.is_empty()
            && v.iter()
                .all(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E'))
        {
            Ok(v.to_vec())
        } else {
            Err(ReadBackError::Value("a number that is not one"))
        }
    };
    Ok(match col.column_type {
        column_type::LONGLONG
        | column_type::LONG
        | column_type::INT24
        | column_type::SHORT
        | column_type::TINY => {
            if col.is_unsigned() {
                UserValue::UInt(number(v)?)
            } else {
                UserValue::Int(number(v)?)
            }
        }
        column_type::NEWDECIMAL | column_type::DECIMAL => UserValue::Decimal(number(v)?),
        column_type::DOUBLE | column_type::FLOAT => UserValue::Double(number(v)?),
        _ => {
            let (Some(hex), Some(charset), Some(collation)) = (hex, charset, collation) else {
                return Err(ReadBackError::Value("a string without bytes or collation"));
            };
            if !is_plain_name(charset) || !is_plain_name(collation) {
                return Err(ReadBackError::Value("character set or collation name"));
            }
            UserValue::Str {
                bytes: unhex(hex).ok_or(ReadBackError::Value("hex digits"))?,
                charset: charset.to_vec(),
                collation: collation.to_vec(),
            }
        }
    })
}

impl UserValue {
    /// An SQL expression that gives a variable this value and type back, whatever the
    /// session's sql_mode and character sets.
    pub fn sql(&self) -> String {
        let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
        match self {
            UserValue::Null => "NULL".into(),
            UserValue::Int(v) => text(v),
            UserValue::UInt(v) => format!("CAST({} AS UNSIGNED)", text(v)),
            UserValue::Decimal(v) if v.contains(&b'.') => text(v),
            // A decimal without a fractional part would read back as an integer literal.
            UserValue::Decimal(v) => format!("CAST({} AS DECIMAL(65,0))", text(v)),
            UserValue::Double(v) if v.iter().any(|b| matches!(b, b'e' | b'E')) => text(v),
            UserValue::Double(v) => format!("{}E0", text(v)),
            UserValue::Str {
                bytes,
                charset,
                collation,
            } => {
                let mut s = String::with_capacity(16 + 2 * bytes.len());
                s.push('_');
                s.push_str(&text(charset));
                s.push_str(" X'");
                for b in bytes {
                    s.push_str(&format!("{b:02x}"));
                }
                s.push('\'');
                if charset.as_slice() != b"binary" {
                    s.push_str(" COLLATE ");
                    s.push_str(&text(collation));
                }
                s
            }
        }
    }
}

/// The assignments (`@v = ...`) that turn `backend`'s user variables into `client`'s;
/// variables the client does not have are set to NULL (MariaDB cannot unset them).
pub fn diff(client: &UserVars, backend: &UserVars) -> Vec<String> {
    let mut out = Vec::new();
    for (name, want) in client {
        let have = backend.get(name).unwrap_or(&UserValue::Null);
        if have != want {
            out.push(format!("{} = {}", var_ref(name), want.sql()));
        }
    }
    for (name, have) in backend {
        if *have != UserValue::Null && !client.contains_key(name) {
            out.push(format!("{} = NULL", var_ref(name)));
        }
    }
    out
}

/// Whether two sets of user variables read the same (NULL and absent are equal).
pub fn same(a: &UserVars, b: &UserVars) -> bool {
    let null = UserValue::Null;
    a.iter().all(|(k, v)| b.get(k).unwrap_or(&null) == v)
        && b.iter().all(|(k, v)| a.get(k).unwrap_or(&null) == v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mysql::resultset::UNSIGNED_FLAG;

    fn col(t: u8, flags: u16) -> ColumnDef {
        ColumnDef {
            schema: vec![],
            table: vec![],
            org_table: vec![],
            name: b"@v".to_vec(),
            org_name: vec![],
            charset: 63,
            length: 20,
            column_type: t,
            flags,
            decimals: 0,
        }
    }

    fn parse(t: u8, flags: u16, v: [Option<&[u8]>; 4]) -> Result<UserValue, ReadBackError> {
        parse_value(&col(t, flags), &v)
    }

    #[test]
    fn values_keep_their_types() {
        // What MariaDB 10.11 returns for each kind (checked by hand against the server).
        let bin = Some(&b"binary"[..]);
        assert_eq!(
            parse(8, 128, [Some(b"-5"), Some(b"FFFFFFFFFFFFFFFB"), bin, bin]).unwrap(),
            UserValue::Int(b"-5".to_vec())
        );
        let u = parse(8, 128 | UNSIGNED_FLAG, [Some(b"1"), Some(b"1"), bin, bin]).unwrap();
        assert_eq!(u.sql(), "CAST(1 AS UNSIGNED)");
        let d = parse(246, 128, [Some(b"1.50"), Some(b"2"), bin, bin]).unwrap();
        assert_eq!(d.sql(), "1.50");
        assert_eq!(
            UserValue::Decimal(b"5".to_vec()).sql(),
            "CAST(5 AS DECIMAL(65,0))"
        );
        let f = parse(5, 128, [Some(b"-0.00000000025"), Some(b"0"), bin, bin]).unwrap();
        assert_eq!(f.sql(), "-0.00000000025E0");
        assert_eq!(UserValue::Double(b"1e300".to_vec()).sql(), "1e300");
        let s = parse(
            251,
            0,
            [
                Some("é".as_bytes()),
                Some(b"C3A9"),
                Some(b"utf8mb4"),
                Some(b"utf8mb4_unicode_ci"),
            ],
        )
        .unwrap();
        assert_eq!(s.sql(), "_utf8mb4 X'c3a9' COLLATE utf8mb4_unicode_ci");
        let b = parse(251, 128, [Some(b"\x00?"), Some(b"00FF"), bin, bin]).unwrap();
        assert_eq!(b.sql(), "_binary X'00ff'");
        assert_eq!(
            parse(251, 128, [None, None, bin, bin]).unwrap(),
            UserValue::Null
        );
    }

    #[test]
    fn hostile_read_backs_are_refused() {
        let bin = Some(&b"binary"[..]);
        assert!(parse(8, 0, [Some(b"1; DROP"), None, bin, bin]).is_err());
        assert!(parse(251, 0, [Some(b"x"), Some(b"7"), bin, bin]).is_err());
        assert!(parse(251, 0, [Some(b"x"), Some(b"78"), Some(b"utf8 x"), bin]).is_err());
        assert!(parse_value(&col(8, 0), &[None]).is_err());
    }

    #[test]
    fn read_back_and_replay_sql() {
        let mut q = String::from("SELECT ");
        push_read_back(&mut q, b"a");
        push_read_back(&mut q, b"we`ird");
        assert_eq!(
            q,
            "SELECT @`a`, HEX(@`a`), CHARSET(@`a`), COLLATION(@`a`), @`we``ird`, HEX(@`we``ird`), CHARSET(@`we``ird`), COLLATION(@`we``ird`)"
        );
        let mut client = UserVars::new();
        client.insert(b"a".to_vec(), UserValue::Int(b"1".to_vec()));
        client.insert(b"n".to_vec(), UserValue::Null);
        let mut backend = UserVars::new();
        backend.insert(b"b".to_vec(), UserValue::Int(b"2".to_vec()));
        backend.insert(b"c".to_vec(), UserValue::Null);
        assert_eq!(diff(&client, &backend), vec!["@`a` = 1", "@`b` = NULL"]);
        assert!(!same(&client, &backend));
        backend.insert(b"a".to_vec(), UserValue::Int(b"1".to_vec()));
        backend.insert(b"b".to_vec(), UserValue::Null);
        assert!(same(&client, &backend));
        assert!(diff(&client, &backend).is_empty());
    }
}
