//! User variables that move with their client. MariaDB does not report them through session
//! tracking, so dbproxy reads back the ones a statement may have assigned, in the same round
//! trip (a query pipelined after the statement), with their types, and replays them on the
//! next backend connection that serves the client.

use crate::mysql::resultset::{column_type, ColumnDef};
use std::collections::BTreeMap;

/// The type MariaDB keeps for a user variable (also when its value is NULL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ty {
    Int,
    UInt,
    Decimal,
    Double,
    /// A string in `charset` with `collation` (`binary`/`binary` for binary strings).
    Str {
        charset: Vec<u8>,
        collation: Vec<u8>,
    },
}

/// A user variable: its type and value (`None`: NULL; numbers as the server printed them,
/// strings as bytes in their own character set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserValue {
    pub ty: Ty,
    pub value: Option<Vec<u8>>,
}

impl UserValue {
    /// What a variable never set reads as (and one set to plain NULL: a binary NULL).
    pub fn unset() -> UserValue {
        UserValue {
            ty: Ty::Str {
                charset: b"binary".to_vec(),
                collation: b"binary".to_vec(),
            },
            value: None,
        }
    }

    pub fn int(v: &str) -> UserValue {
        UserValue {
            ty: Ty::Int,
            value: Some(v.as_bytes().to_vec()),
        }
    }

    /// Whether it reads as a variable never set does (equal to [`UserValue::unset`]).
    pub fn is_unset(&self) -> bool {
        self.value.is_none()
            && matches!(&self.ty, Ty::Str { charset, collation }
                if charset.as_slice() == b"binary" && collation.as_slice() == b"binary")
    }
}

/// User variables by lowercased name; a missing one reads as [`UserValue::unset`].
pub type UserVars = BTreeMap<Vec<u8>, UserValue>;

/// Why a read-back could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReadBackError {
    #[error("unexpected read-back shape: {0}")]
    Shape(&'static str),
    #[error("unexpected value in read-back: {0}")]
    Value(&'static str),
}

/// Columns per variable in the read-back: `@v, HEX(@v), CHARSET(@v), COLLATION(@v)`, where
/// the hex digits are NULL for a value whose replay would not fit in one packet the server
/// takes (`max_allowed_packet`). Some MariaDB releases answer NULL for such a HEX() by
/// themselves, not all: a replay built from digits that do not fit would fail. A NULL there
/// keeps the value on its connection (the client is pinned).
pub const COLUMNS_PER_VAR: usize = 4;

/// A user variable reference for SQL (`` @`na``me` ``).
pub fn var_ref(name: &[u8]) -> String {
    let mut s = String::with_capacity(name.len() + 3);
    s.push_str("@`");
    s.push_str(&String::from_utf8_lossy(name).replace('`', "``"));
    s.push('`');
    s
}

/// Room left in a replay's packet for everything but one value's hex digits (the command
/// byte, `SET @name = _charset X'...' COLLATE collation`, other assignments).
const REPLAY_SLACK: usize = 1024;

/// Appends the select items that read `name` back (see [`COLUMNS_PER_VAR`]).
pub fn push_read_back(sql: &mut String, name: &[u8]) {
    let v = var_ref(name);
    if !sql.ends_with("SELECT ") {
        sql.push_str(", ");
    }
    sql.push_str(&format!(
        "{v}, IF(LENGTH({v}) * 2 + {REPLAY_SLACK} < @@max_allowed_packet, HEX({v}), NULL), \
         CHARSET({v}), COLLATION({v})"
    ));
}

fn is_plain_name(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'_')
}

/// The value of one variable from its four read-back columns.
pub fn parse_value(col: &ColumnDef, values: &[Option<&[u8]>]) -> Result<UserValue, ReadBackError> {
    let [v, hexed, charset, collation] = values else {
        return Err(ReadBackError::Shape("four columns per variable"));
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
    let ty = match col.column_type {
        column_type::LONGLONG
        | column_type::LONG
        | column_type::INT24
        | column_type::SHORT
        | column_type::TINY => {
            if col.is_unsigned() {
                Ty::UInt
            } else {
                Ty::Int
            }
        }
        column_type::NEWDECIMAL | column_type::DECIMAL => Ty::Decimal,
        column_type::DOUBLE | column_type::FLOAT => Ty::Double,
        _ => {
            let (Some(charset), Some(collation)) = (charset, collation) else {
                return Err(ReadBackError::Value("a string without character set"));
            };
            if !is_plain_name(charset) || !is_plain_name(collation) {
                return Err(ReadBackError::Value("character set or collation name"));
            }
            Ty::Str {
                charset: charset.to_vec(),
                collation: collation.to_vec(),
            }
        }
    };
    let value = match (v, &ty) {
        (None, _) => None,
        (Some(_), Ty::Str { .. }) => {
            let hexed = hexed.ok_or(ReadBackError::Value("a string without its bytes"))?;
            Some(hex::decode(hexed).map_err(|_| ReadBackError::Value("hex digits"))?)
        }
        (Some(v), _) => Some(number(v)?),
    };
    Ok(UserValue { ty, value })
}

impl UserValue {
    /// An SQL expression that gives a variable this value and type back, whatever the
    /// session's sql_mode and character sets.
    pub fn sql(&self) -> String {
        let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
        match (&self.ty, &self.value) {
            (Ty::Int, Some(v)) => text(v),
            (Ty::Int, None) => "CAST(NULL AS SIGNED)".into(),
            (Ty::UInt, Some(v)) => format!("CAST({} AS UNSIGNED)", text(v)),
            (Ty::UInt, None) => "CAST(NULL AS UNSIGNED)".into(),
            (Ty::Decimal, Some(v)) if v.contains(&b'.') => text(v),
            // A decimal without a fractional part would read back as an integer literal.
            (Ty::Decimal, Some(v)) => format!("CAST({} AS DECIMAL(65,0))", text(v)),
            (Ty::Decimal, None) => "CAST(NULL AS DECIMAL(65,0))".into(),
            (Ty::Double, Some(v)) if v.iter().any(|b| matches!(b, b'e' | b'E')) => text(v),
            (Ty::Double, Some(v)) => format!("{}E0", text(v)),
            (Ty::Double, None) => "CAST(NULL AS DOUBLE)".into(),
            (Ty::Str { charset, .. }, None) if charset.as_slice() == b"binary" => {
                "CAST(NULL AS BINARY)".into()
            }
            (Ty::Str { charset, collation }, None) => format!(
                "CAST(NULL AS CHAR CHARACTER SET {}) COLLATE {}",
                text(charset),
                text(collation)
            ),
            (Ty::Str { charset, collation }, Some(bytes)) => {
                let mut s = String::with_capacity(16 + 2 * bytes.len());
                s.push('_');
                s.push_str(&text(charset));
                s.push_str(" X'");
                s.push_str(&hex::encode(bytes));
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

/// The assignments (`@v = ...`) that turn `backend`'s user variables into `client`'s. A
/// variable the client never set is made a binary NULL (MariaDB cannot unset one; a binary
/// NULL reads as a variable never set does).
pub fn diff(client: &UserVars, backend: &UserVars) -> Vec<String> {
    let mut out = Vec::new();
    for (name, want) in client {
        if !reads_as(backend.get(name), want) {
            out.push(format!("{} = {}", var_ref(name), want.sql()));
        }
    }
    for (name, have) in backend {
        if !have.is_unset() && !client.contains_key(name) {
            out.push(format!("{} = {}", var_ref(name), UserValue::unset().sql()));
        }
    }
    out
}

/// Whether a variable that is `have` (`None`: never set) reads as `want`.
fn reads_as(have: Option<&UserValue>, want: &UserValue) -> bool {
    have.map_or_else(|| want.is_unset(), |h| h == want)
}

/// Whether two sets of user variables read the same (a binary NULL reads as unset).
pub fn same(a: &UserVars, b: &UserVars) -> bool {
    a.iter().all(|(k, v)| reads_as(b.get(k), v)) && b.iter().all(|(k, v)| reads_as(a.get(k), v))
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
            UserValue::int("-5")
        );
        let u = parse(8, 128 | UNSIGNED_FLAG, [Some(b"1"), Some(b"1"), bin, bin]).unwrap();
        assert_eq!(u.sql(), "CAST(1 AS UNSIGNED)");
        let d = parse(246, 128, [Some(b"1.50"), Some(b"2"), bin, bin]).unwrap();
        assert_eq!(d.sql(), "1.50");
        let whole = UserValue {
            ty: Ty::Decimal,
            value: Some(b"5".to_vec()),
        };
        assert_eq!(whole.sql(), "CAST(5 AS DECIMAL(65,0))");
        let f = parse(5, 128, [Some(b"-0.00000000025"), Some(b"0"), bin, bin]).unwrap();
        assert_eq!(f.sql(), "-0.00000000025E0");
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
    }

    #[test]
    fn nulls_keep_their_types_and_unset_is_a_binary_null() {
        let bin = Some(&b"binary"[..]);
        let fresh = parse(251, 128, [None, None, bin, bin]).unwrap();
        assert!(fresh.is_unset());
        assert_eq!(fresh.sql(), "CAST(NULL AS BINARY)");
        let int_null = parse(8, 128, [None, None, bin, bin]).unwrap();
        assert_eq!(int_null.sql(), "CAST(NULL AS SIGNED)");
        let text_null = parse(
            251,
            0,
            [None, None, Some(b"utf8mb4"), Some(b"utf8mb4_unicode_ci")],
        )
        .unwrap();
        assert_eq!(
            text_null.sql(),
            "CAST(NULL AS CHAR CHARACTER SET utf8mb4) COLLATE utf8mb4_unicode_ci"
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
            "SELECT @`a`, IF(LENGTH(@`a`) * 2 + 1024 < @@max_allowed_packet, HEX(@`a`), NULL), CHARSET(@`a`), COLLATION(@`a`), \
             @`we``ird`, IF(LENGTH(@`we``ird`) * 2 + 1024 < @@max_allowed_packet, HEX(@`we``ird`), NULL), CHARSET(@`we``ird`), COLLATION(@`we``ird`)"
        );
        let mut client = UserVars::new();
        client.insert(b"a".to_vec(), UserValue::int("1"));
        client.insert(b"n".to_vec(), UserValue::unset());
        let mut backend = UserVars::new();
        backend.insert(b"b".to_vec(), UserValue::int("2"));
        backend.insert(b"c".to_vec(), UserValue::unset());
        assert_eq!(
            diff(&client, &backend),
            vec!["@`a` = 1", "@`b` = CAST(NULL AS BINARY)"]
        );
        assert!(!same(&client, &backend));
        backend.insert(b"a".to_vec(), UserValue::int("1"));
        backend.insert(b"b".to_vec(), UserValue::unset());
        assert!(same(&client, &backend));
        assert!(diff(&client, &backend).is_empty());
    }
}
