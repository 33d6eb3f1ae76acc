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
    pub const VAR_STRING: u8 = 253;
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
        // The fixed fields are the last 13 bytes (length 0x0c and 12 bytes); MariaDB's
        // extended metadata (MARIADB_CLIENT_EXTENDED_METADATA) sits before them.
        if r.rest().len() != 13 {
            r.lenenc_bytes("extended metadata")?;
        }
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

/// Bytes a binary-protocol value of `column_type` takes when it has a fixed size.
fn fixed_size(column_type: u8) -> Option<usize> {
    Some(match column_type {
        column_type::TINY => 1,
        column_type::SHORT | column_type::YEAR => 2,
        column_type::LONG | column_type::INT24 | column_type::FLOAT => 4,
        column_type::LONGLONG | column_type::DOUBLE => 8,
        column_type::NULL => 0,
        _ => return None,
    })
}

/// The values of a binary-protocol row (`None` for NULL), as their raw encodings.
pub fn parse_binary_row<'a>(
    payload: &'a [u8],
    columns: &[ColumnDef],
) -> Result<Vec<Option<&'a [u8]>>, ProtocolError> {
    let mut r = Reader::new(payload);
    if r.u8("binary row header")? != 0 {
        return Err(ProtocolError::Malformed("binary row header"));
    }
    let bitmap = r.take((columns.len() + 7 + 2) / 8, "NULL bitmap")?;
    let mut out = Vec::with_capacity(columns.len());
    for (i, c) in columns.iter().enumerate() {
        let bit = i + 2;
        if bitmap
            .get(bit / 8)
            .is_some_and(|b| b & (1 << (bit % 8)) != 0)
        {
            out.push(None);
            continue;
        }
        let v = match fixed_size(c.column_type) {
            Some(n) => r.take(n, "binary value")?,
            None => {
                // Strings, decimals, dates and times: a length then the bytes.
                let rest = r.rest();
                let n = Reader::new(rest).lenenc_int("value length")?;
                let mut len = Vec::new();
                put_lenenc(&mut len, n);
                let n = usize::try_from(n).map_err(|_| ProtocolError::Truncated("value"))?;
                r.take(len.len() + n, "binary value")?
            }
        };
        out.push(Some(v));
    }
    Ok(out)
}

/// A binary-protocol row for `columns` from text-protocol values (numbers in decimal,
/// everything else as bytes), as a server would send it.
pub fn encode_binary_row(
    columns: &[ColumnDef],
    values: &[Option<&[u8]>],
) -> Result<Vec<u8>, ProtocolError> {
    let mut out = vec![0u8];
    let mut bitmap = vec![0u8; (columns.len() + 7 + 2) / 8];
    let mut body = Vec::new();
    for (i, c) in columns.iter().enumerate() {
        let Some(v) = values.get(i).copied().flatten() else {
            let bit = i + 2;
            bitmap[bit / 8] |= 1 << (bit % 8);
            continue;
        };
        let text = std::str::from_utf8(v).map_err(|_| ProtocolError::Malformed("number"))?;
        let int = || -> Result<[u8; 8], ProtocolError> {
            let n = if c.is_unsigned() {
                text.parse::<u64>().map(u64::to_le_bytes)
            } else {
                text.parse::<i64>().map(i64::to_le_bytes)
            };
            n.map_err(|_| ProtocolError::Malformed("integer"))
        };
        match c.column_type {
            column_type::TINY => body.extend_from_slice(&int()?[..1]),
            column_type::SHORT | column_type::YEAR => body.extend_from_slice(&int()?[..2]),
            column_type::LONG | column_type::INT24 => body.extend_from_slice(&int()?[..4]),
            column_type::LONGLONG => body.extend_from_slice(&int()?),
            column_type::DOUBLE => body.extend_from_slice(
                &text
                    .parse::<f64>()
                    .map_err(|_| ProtocolError::Malformed("double"))?
                    .to_le_bytes(),
            ),
            column_type::FLOAT => body.extend_from_slice(
                &text
                    .parse::<f32>()
                    .map_err(|_| ProtocolError::Malformed("float"))?
                    .to_le_bytes(),
            ),
            _ => put_lenenc_bytes(&mut body, v),
        }
    }
    out.extend_from_slice(&bitmap);
    out.extend_from_slice(&body);
    Ok(out)
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
    fn column_definition_with_mariadb_extended_metadata() {
        let plain = sample()[1].clone();
        // The same definition with `format=json` between the names and the fixed fields.
        let names_end = plain.len() - 13;
        let mut ext = plain[..names_end].to_vec();
        ext.extend_from_slice(b"\x06\x01\x04json");
        ext.extend_from_slice(&plain[names_end..]);
        assert_eq!(
            ColumnDef::parse(&ext).unwrap(),
            ColumnDef::parse(&plain).unwrap()
        );
        let mut empty = plain[..names_end].to_vec();
        empty.push(0);
        empty.extend_from_slice(&plain[names_end..]);
        assert_eq!(
            ColumnDef::parse(&empty).unwrap(),
            ColumnDef::parse(&plain).unwrap()
        );
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

    #[test]
    fn binary_rows() {
        let col = |t: u8, flags: u16| ColumnDef {
            schema: vec![],
            table: vec![],
            org_table: vec![],
            name: b"c".to_vec(),
            org_name: vec![],
            charset: 63,
            length: 21,
            column_type: t,
            flags,
            decimals: 0,
        };
        let cols = [
            col(column_type::LONGLONG, 0),
            col(253, 0),
            col(column_type::LONG, UNSIGNED_FLAG),
            col(column_type::DOUBLE, 0),
            col(253, 0),
        ];
        let row = encode_binary_row(
            &cols,
            &[
                Some(b"-1"),
                Some(b"Warning"),
                Some(b"1292"),
                Some(b"0.5"),
                None,
            ],
        )
        .unwrap();
        // Header, bitmap (NULL: column 4 -> bit 6), -1 as 8 bytes, "Warning", 1292, 0.5.
        assert_eq!(row[..2], [0, 0x40]);
        let v = parse_binary_row(&row, &cols).unwrap();
        assert_eq!(v[0], Some(&(-1i64).to_le_bytes()[..]));
        assert_eq!(v[1], Some(&b"\x07Warning"[..]));
        assert_eq!(v[2], Some(&1292u32.to_le_bytes()[..]));
        assert_eq!(v[3], Some(&0.5f64.to_le_bytes()[..]));
        assert_eq!(v[4], None);
        assert!(parse_binary_row(&row[..5], &cols).is_err());
        assert!(encode_binary_row(&cols, &[Some(b"x")]).is_err());
    }
}
