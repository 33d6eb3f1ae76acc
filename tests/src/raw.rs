//! A raw MySQL protocol client for tests and benchmarks.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A hand-rolled client for what connectors rarely do (cursors, long data, vanishing,
/// raw commands); panicking helpers for tests, `try_*` for other callers.
pub struct RawClient {
    pub s: TcpStream,
}

impl RawClient {
    /// Connects and logs in with mysql_native_password (PROTOCOL_41, SECURE_CONNECTION,
    /// PLUGIN_AUTH, TRANSACTIONS, MULTI_RESULTS, PS_MULTI_RESULTS; no DEPRECATE_EOF).
    pub fn login(port: u16, user: &str, password: &str) -> std::io::Result<RawClient> {
        use sha1::{Digest, Sha1};
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut c = RawClient { s };
        let (_, g) = c.try_read()?;
        let bad = || std::io::Error::other("unexpected greeting");
        let v = g.iter().skip(1).position(|&b| b == 0).ok_or_else(bad)? + 1;
        let mut nonce = g.get(v + 5..v + 13).ok_or_else(bad)?.to_vec();
        let i = v + 13 + 1 + 2 + 1 + 2 + 2 + 1 + 10;
        nonce.extend_from_slice(g.get(i..i + 12).ok_or_else(bad)?);
        let s1 = Sha1::digest(password.as_bytes());
        let s2 = Sha1::digest(s1);
        let mut h = Sha1::new();
        h.update(&nonce);
        h.update(s2);
        let mix = h.finalize();
        let caps: u32 = 0x200 | 0x8000 | 0x80000 | 0x2000 | 0x20000 | 0x40000 | 1;
        let mut p = caps.to_le_bytes().to_vec();
        p.extend_from_slice(&(1u32 << 24).to_le_bytes());
        p.push(45);
        p.extend_from_slice(&[0; 23]);
        p.extend_from_slice(user.as_bytes());
        p.push(0);
        p.push(20);
        p.extend(s1.iter().zip(mix.iter()).map(|(a, b)| a ^ b));
        p.extend_from_slice(b"mysql_native_password\0");
        c.try_write(1, &p)?;
        let (_, ok) = c.try_read()?;
        if ok.first() != Some(&0) {
            return Err(std::io::Error::other(format!(
                "login refused: {}",
                String::from_utf8_lossy(&ok)
            )));
        }
        Ok(c)
    }

    /// Writes one packet.
    pub fn try_write(&mut self, seq: u8, payload: &[u8]) -> std::io::Result<()> {
        let mut out = (payload.len() as u32).to_le_bytes()[..3].to_vec();
        out.push(seq);
        out.extend_from_slice(payload);
        self.s.write_all(&out)
    }

    /// Reads one packet: (sequence id, payload).
    pub fn try_read(&mut self) -> std::io::Result<(u8, Vec<u8>)> {
        let mut h = [0u8; 4];
        self.s.read_exact(&mut h)?;
        let n = usize::from(h[0]) | usize::from(h[1]) << 8 | usize::from(h[2]) << 16;
        let mut p = vec![0; n];
        self.s.read_exact(&mut p)?;
        Ok((h[3], p))
    }

    pub fn write(&mut self, seq: u8, payload: &[u8]) {
        self.try_write(seq, payload).unwrap();
    }

    pub fn read(&mut self) -> (u8, Vec<u8>) {
        self.try_read().unwrap()
    }

    /// Reads packets up to an EOF/OK/ERR terminator (EOF-style, as negotiated).
    pub fn read_until_eof(&mut self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let (_, p) = self.read();
            let end = p[0] == 0xff || (p[0] == 0xfe && p.len() < 9);
            out.push(p);
            if end {
                return out;
            }
        }
    }

    pub fn query(&mut self, sql: &str) {
        let mut p = vec![0x03];
        p.extend_from_slice(sql.as_bytes());
        self.write(0, &p);
        let (_, r) = self.read();
        assert_eq!(r[0], 0, "{sql}: {r:?}");
    }

    /// COM_STMT_PREPARE; returns (statement id, parameter count).
    pub fn prepare(&mut self, sql: &str) -> (u32, u16) {
        let mut p = vec![0x16];
        p.extend_from_slice(sql.as_bytes());
        self.write(0, &p);
        let (_, ok) = self.read();
        assert_eq!(ok[0], 0, "prepare {sql}: {ok:?}");
        let id = u32::from_le_bytes([ok[1], ok[2], ok[3], ok[4]]);
        let cols = u16::from_le_bytes([ok[5], ok[6]]);
        let params = u16::from_le_bytes([ok[7], ok[8]]);
        if params > 0 {
            self.read_until_eof();
        }
        if cols > 0 {
            self.read_until_eof();
        }
        (id, params)
    }

    /// COM_STMT_EXECUTE without parameters; with a cursor flag the reply is metadata only.
    pub fn execute(&mut self, id: u32, flags: u8, _params: &[u8]) {
        let mut p = vec![0x17];
        p.extend_from_slice(&id.to_le_bytes());
        p.push(flags);
        p.extend_from_slice(&1u32.to_le_bytes());
        self.write(0, &p);
        let (_, first) = self.read();
        assert_ne!(first[0], 0xff, "execute: {first:?}");
        self.read_until_eof(); // column definitions + EOF (cursor: no rows follow)
    }

    /// COM_STMT_FETCH; returns (rows, whether the last row was sent).
    pub fn fetch(&mut self, id: u32, rows: u32) -> (usize, bool) {
        let mut p = vec![0x1c];
        p.extend_from_slice(&id.to_le_bytes());
        p.extend_from_slice(&rows.to_le_bytes());
        self.write(0, &p);
        let packets = self.read_until_eof();
        let eof = packets.last().unwrap();
        assert_eq!(eof[0], 0xfe, "fetch: {eof:?}");
        let status = u16::from_le_bytes([eof[3], eof[4]]);
        (packets.len() - 1, status & 0x80 != 0)
    }

    pub fn send_long_data(&mut self, id: u32, param: u16, data: &[u8]) {
        let mut p = vec![0x18];
        p.extend_from_slice(&id.to_le_bytes());
        p.extend_from_slice(&param.to_le_bytes());
        p.extend_from_slice(data);
        self.write(0, &p);
    }

    /// Executes a one-parameter statement whose value came as long data; the single text
    /// value of the single row.
    pub fn execute_one_value(&mut self, id: u32, param_type: u8) -> Vec<u8> {
        let mut p = vec![0x17];
        p.extend_from_slice(&id.to_le_bytes());
        p.push(0);
        p.extend_from_slice(&1u32.to_le_bytes());
        p.push(0); // null bitmap
        p.push(1); // types follow
        p.extend_from_slice(&[param_type, 0]);
        self.write(0, &p);
        let (_, first) = self.read();
        assert_ne!(
            first[0],
            0xff,
            "execute: {}",
            String::from_utf8_lossy(&first)
        );
        self.read_until_eof(); // column definitions
        let rows = self.read_until_eof();
        let row = &rows[0];
        // Binary row: 0x00, null bitmap (1 byte for 1 column), then a length-encoded string.
        let n = usize::from(row[2]);
        row[3..3 + n].to_vec()
    }

    /// COM_QUERY of a statement that returns one row: its values as text (`None`: NULL).
    pub fn select_row(&mut self, sql: &str) -> Vec<Option<String>> {
        let mut p = vec![0x03];
        p.extend_from_slice(sql.as_bytes());
        self.write(0, &p);
        let (_, count) = self.read();
        assert_ne!(count[0], 0xff, "{sql}: {}", String::from_utf8_lossy(&count));
        self.read_until_eof(); // column definitions
        let rows = self.read_until_eof();
        let [row, _eof] = rows.as_slice() else {
            panic!("{sql}: not one row: {rows:?}");
        };
        let mut values = Vec::new();
        let mut at = 0;
        while at < row.len() {
            if row[at] == 0xfb {
                values.push(None);
                at += 1;
                continue;
            }
            // Short values only (one-byte lengths) in the rows tests read this way.
            let n = usize::from(row[at]);
            assert!(n < 0xfb, "{sql}: a long value");
            values.push(Some(
                String::from_utf8_lossy(&row[at + 1..at + 1 + n]).into_owned(),
            ));
            at += 1 + n;
        }
        values
    }

    /// COM_RESET_CONNECTION.
    pub fn reset_connection(&mut self) {
        self.write(0, &[0x1f]);
        let (_, ok) = self.read();
        assert_eq!(ok.first(), Some(&0), "COM_RESET_CONNECTION: {ok:?}");
    }
}
