//! Text-protocol result sets dbproxy reads (its own read-backs) or writes (answers it gives
//! for a client): column definitions, rows, and a whole buffered response.

use super::consts::cap;
use super::wire::{put_lenenc, put_lenenc_bytes, Reader};
use super::ProtocolError;

/// Column types dbproxy looks at (`MYSQL_TYPE_*`).
pub mod column_type {
    pub const DECIMAL: u8 = 0;
    pub const TINY: u8 = 1;
    pub const SHORT: u8 = 2;
    pub const LONG: u8 = 3;
    pub const FLOAT: u8 = 4;
    pub const DOUBLE: u8 = 5;
    pub const NULL: u8 = 6;
    pub const LONGLONG: u8 = 8;
    pub const INT24: u8 = 9;
    pub const YEAR: u8 = 13;
    pub const NEWDECIMAL: u8 = 246;
}

/// Column flag `UNSIGNED_FLAG`.
pub const UNSIGNED_FLAG: u16 = 32;

/// A column definition (Protocol::ColumnDefinition41).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnDef {
    pub schema: Vec<u8>,
    pub table: Vec<u8>,
    pub org_table: Vec<u8>,
    pub name: Vec<u8>,
    pub org_name: Vec<u8>,
    pub charset: u16,
    pub length: u32,
    pub column_type: u8,
    pub flags: u16,
    pub decimals: u8,
}

impl ColumnDef {
    pub fn parse(payload: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(payload);
        r.lenenc_bytes("catalog")?;
        let schema = r.lenenc_bytes("schema")?.to_vec();
        let table = r.lenenc_bytes("table")?.to_vec();
        let org_table = r.lenenc_bytes("org_table")?.to_vec();
        let name = r.lenenc_bytes("name")?.to_vec();
        let org_name = r.lenenc_bytes("org_name")?.to_vec();
        r.lenenc_int("fixed fields length")?;
        let charset = r.u16("character set")?;
        let length = r.u32("column length")?;
        let column_type = r.u8("column type")?;
        let flags = r.u16("flags")?;
        let decimals = r.u8("decimals")?;
        Ok(ColumnDef {
            schema,
            table,
            org_table,
            name,
            org_name,
            charset,
            length,
            column_type,
            flags,
            decimals,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.name.len());
        put_lenenc_bytes(&mut out, b"def");
        put_lenenc_bytes(&mut out, &self.schema);
        put_lenenc_bytes(&mut out, &self.table);
        put_lenenc_bytes(&mut out, &self.org_table);
        put_lenenc_bytes(&mut out, &self.name);
        put_lenenc_bytes(&mut out, &self.org_name);
        out.push(0x0c);
        out.extend_from_slice(&self.charset.to_le_bytes());
        out.extend_from_slice(&self.length.to_le_bytes());
        out.push(self.column_type);
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.push(self.decimals);
        out.extend_from_slice(&[0, 0]);
        out
    }

    pub fn is_unsigned(&self) -> bool {
        self.flags & UNSIGNED_FLAG != 0
    }
}

/// The values of a text-protocol row (`None` for NULL).
pub fn parse_text_row(payload: &[u8], columns: usize) -> Result<Vec<Option<&[u8]>>, ProtocolError> {
    let mut r = Reader::new(payload);
    let mut out = Vec::with_capacity(columns);
    for _ in 0..columns {
        if r.rest().first() == Some(&0xfb) {
            r.u8("NULL")?;
            out.push(None);
        } else {
            out.push(Some(r.lenenc_bytes("column value")?));
        }
    }
    Ok(out)
}

/// Encodes a text-protocol row.
pub fn encode_text_row<'a>(values: impl IntoIterator<Item = Option<&'a [u8]>>) -> Vec<u8> {
    let mut out = Vec::new();
    for v in values {
        match v {
            Some(v) => put_lenenc_bytes(&mut out, v),
            None => out.push(0xfb),
        }
    }
    out
}

/// A response read whole (small ones only: read-backs and answers dbproxy builds), as
/// logical packet payloads in order, sequence ids dropped.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Packets(pub Vec<Vec<u8>>);

/// One text result set taken apart: column definitions (raw and parsed), rows (raw), and the
/// terminator (raw; EOF or, with DEPRECATE_EOF, an OK packet with a 0xFE header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextResult {
    pub columns: Vec<ColumnDef>,
    pub raw_columns: Vec<Vec<u8>>,
    pub rows: Vec<Vec<u8>>,
    pub terminator: Vec<u8>,
}

impl TextResult {
    /// Takes apart a single text result set (`packets`: the whole response).
    pub fn parse(packets: &[Vec<u8>], caps: u32) -> Result<Self, ProtocolError> {
        let first = packets
            .first()
            .ok_or(ProtocolError::Truncated("result set"))?;
        if first.first() == Some(&0xff) || first.first() == Some(&0x00) {
            return Err(ProtocolError::Malformed("not a result set"));
        }
        let n = Reader::new(first).lenenc_int("column count")?;
        let n = usize::try_from(n).map_err(|_| ProtocolError::Malformed("column count"))?;
        let defs = packets
            .get(1..1 + n)
            .ok_or(ProtocolError::Truncated("column definitions"))?;
        let mut at = 1 + n;
        if caps & cap::DEPRECATE_EOF == 0 {
            at += 1; // EOF after the definitions
        }
        let rest = packets.get(at..).ok_or(ProtocolError::Truncated("rows"))?;
        let (terminator, rows) = rest
            .split_last()
            .ok_or(ProtocolError::Truncated("result set terminator"))?;
        if terminator.first() != Some(&0xfe) {
            return Err(ProtocolError::Malformed("result set without terminator"));
        }
        Ok(TextResult {
            columns: defs
                .iter()
                .map(|d| ColumnDef::parse(d))
                .collect::<Result<_, _>>()?,
            raw_columns: defs.to_vec(),
            rows: rows.to_vec(),
            terminator: terminator.clone(),
        })
    }

    /// The payloads of this result set with `rows` instead of its own, ready to send to a
    /// client negotiated with `caps`.
    pub fn with_rows(&self, rows: Vec<Vec<u8>>, caps: u32) -> Packets {
        let mut out = Vec::with_capacity(rows.len() + self.raw_columns.len() + 3);
        let mut count = Vec::new();
        put_lenenc(&mut count, self.raw_columns.len() as u64);
        out.push(count);
        out.extend(self.raw_columns.iter().cloned());
        if caps & cap::DEPRECATE_EOF == 0 {
            // The EOF after the definitions carries the same status as the terminator.
            let mut eof = self.terminator.clone();
            eof.truncate(5);
            out.push(eof);
        }
        out.extend(rows);
        out.push(self.terminator.clone());
        Packets(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // `SELECT ROW_COUNT()` from MariaDB 10.11, without DEPRECATE_EOF.
    fn sample() -> Vec<Vec<u8>> {
        let def = ColumnDef {
            schema: vec![],
            table: vec![],
            org_table: vec![],
            name: b"ROW_COUNT()".to_vec(),
            org_name: vec![],
            charset: 63,
            length: 21,
            column_type: column_type::LONGLONG,
            flags: 129,
            decimals: 0,
        };
        vec![
            vec![1],
            def.encode(),
            vec![0xfe, 0, 0, 2, 0],
            encode_text_row([Some(&b"-1"[..])]),
            vec![0xfe, 0, 0, 2, 0],
        ]
    }

    #[test]
    fn column_definition_round_trip() {
        let p = sample();
        let d = ColumnDef::parse(&p[1]).unwrap();
        assert_eq!(d.name, b"ROW_COUNT()");
        assert_eq!(d.encode(), p[1]);
        assert!(ColumnDef::parse(&p[1][..10]).is_err());
    }

    #[test]
    fn rows_and_results() {
        let row = encode_text_row([Some(&b"a"[..]), None, Some(&b""[..])]);
        assert_eq!(
            parse_text_row(&row, 3).unwrap(),
            vec![Some(&b"a"[..]), None, Some(&b""[..])]
        );
        assert!(parse_text_row(&row, 4).is_err());
        let r = TextResult::parse(&sample(), 0).unwrap();
        assert_eq!(r.rows.len(), 1);
        assert_eq!(r.with_rows(r.rows.clone(), 0).0, sample());
        let empty = r.with_rows(vec![], 0);
        assert_eq!(empty.0.len(), 4);
        assert!(TextResult::parse(&sample()[..2], 0).is_err());
        assert!(TextResult::parse(&[vec![0xff, 1, 0]], 0).is_err());
    }
}
