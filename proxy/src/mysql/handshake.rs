//! Connection phase packets: HandshakeV10, HandshakeResponse41, AuthSwitchRequest and
//! COM_CHANGE_USER, in both directions (dbproxy is a server to clients, a client to backends).

use super::consts::cap;
use super::wire::{put_lenenc, put_lenenc_bytes, put_nul, Reader};
use super::ProtocolError;

/// The server's greeting (HandshakeV10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerHandshake {
    pub version: String,
    pub connection_id: u32,
    /// The nonce (20 bytes from a MySQL or MariaDB server).
    pub nonce: Vec<u8>,
    pub capabilities: u32,
    /// MariaDB's extended capabilities (only without `CLIENT_MYSQL`).
    pub ext_capabilities: u32,
    pub collation: u8,
    pub status: u16,
    pub auth_plugin: String,
}

impl ServerHandshake {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(96);
        out.push(10);
        put_nul(&mut out, self.version.as_bytes());
        out.extend_from_slice(&self.connection_id.to_le_bytes());
        let mut nonce = [0u8; 20];
        let n = self.nonce.len().min(20);
        nonce[..n].copy_from_slice(&self.nonce[..n]);
        out.extend_from_slice(&nonce[..8]);
        out.push(0);
        out.extend_from_slice(&(self.capabilities as u16).to_le_bytes());
        out.push(self.collation);
        out.extend_from_slice(&self.status.to_le_bytes());
        out.extend_from_slice(&((self.capabilities >> 16) as u16).to_le_bytes());
        out.push(21);
        out.extend_from_slice(&[0u8; 6]);
        let ext = if self.capabilities & cap::LONG_PASSWORD == 0 {
            self.ext_capabilities
        } else {
            0
        };
        out.extend_from_slice(&ext.to_le_bytes());
        out.extend_from_slice(&nonce[8..]);
        out.push(0);
        put_nul(&mut out, self.auth_plugin.as_bytes());
        out
    }

    pub fn parse(payload: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(payload);
        let proto = r.u8("protocol version")?;
        if proto != 10 {
            return Err(ProtocolError::Unsupported(format!(
                "handshake protocol version {proto}"
            )));
        }
        let version = String::from_utf8_lossy(r.nul_terminated("server version")?).into_owned();
        let connection_id = r.u32("connection id")?;
        let mut nonce = r.take(8, "auth data part 1")?.to_vec();
        r.u8("filler")?;
        let mut capabilities = u32::from(r.u16("capabilities")?);
        let mut collation = 0;
        let mut status = 0;
        let mut auth_plugin = String::new();
        let mut ext_capabilities = 0;
        if !r.is_empty() {
            collation = r.u8("character set")?;
            status = r.u16("status flags")?;
            capabilities |= u32::from(r.u16("capabilities (upper)")?) << 16;
            let data_len = usize::from(r.u8("auth data length")?);
            r.take(6, "reserved")?;
            let ext = r.u32("extended capabilities")?;
            if capabilities & cap::LONG_PASSWORD == 0 {
                ext_capabilities = ext;
            }
            if capabilities & cap::SECURE_CONNECTION != 0 {
                let n = data_len.saturating_sub(8).max(13);
                let part2 = r.take(n.min(r.rest().len()), "auth data part 2")?;
                let part2 = part2.strip_suffix(&[0]).unwrap_or(part2);
                nonce.extend_from_slice(part2);
            }
            if capabilities & cap::PLUGIN_AUTH != 0 {
                auth_plugin = String::from_utf8_lossy(r.nul_terminated_or_rest()).into_owned();
            }
        }
        Ok(ServerHandshake {
            version,
            connection_id,
            nonce,
            capabilities,
            ext_capabilities,
            collation,
            status,
            auth_plugin,
        })
    }
}

/// The client's answer to the greeting (HandshakeResponse41).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HandshakeResponse {
    pub capabilities: u32,
    /// MariaDB's extended capabilities (only without `CLIENT_MYSQL`).
    pub ext_capabilities: u32,
    pub max_packet: u32,
    pub collation: u8,
    pub user: Vec<u8>,
    pub auth_response: Vec<u8>,
    pub database: Option<Vec<u8>>,
    pub auth_plugin: Option<Vec<u8>>,
    /// Connection attributes as (key, value) pairs.
    pub attrs: Attrs,
}

/// Connection attributes: (key, value) pairs.
pub type Attrs = Vec<(Vec<u8>, Vec<u8>)>;

/// Length of an SSLRequest packet (a truncated HandshakeResponse41 with `CLIENT_SSL`).
pub const SSL_REQUEST_LEN: usize = 32;

/// Whether a client's packet is an SSLRequest: the first 32 bytes of a HandshakeResponse41
/// with `CLIENT_SSL`, and nothing after them.
pub fn is_ssl_request(payload: &[u8]) -> bool {
    payload.len() == SSL_REQUEST_LEN
        && payload
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
            .is_some_and(|c| c & cap::SSL != 0)
}

/// An SSLRequest (dbproxy asking a backend for TLS): capabilities, max packet, collation,
/// filler, and MariaDB's extended capabilities in the filler's last 4 bytes.
pub fn encode_ssl_request(caps: u32, ext_caps: u32, collation: u8) -> Vec<u8> {
    let mut p = Vec::with_capacity(SSL_REQUEST_LEN);
    p.extend_from_slice(&(caps | cap::SSL).to_le_bytes());
    p.extend_from_slice(&(1u32 << 30).to_le_bytes());
    p.push(collation);
    p.extend_from_slice(&[0; 19]);
    p.extend_from_slice(&ext_caps.to_le_bytes());
    p
}

impl HandshakeResponse {
    pub fn parse(payload: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(payload);
        let capabilities = r.u32("client capabilities")?;
        if capabilities & cap::PROTOCOL_41 == 0 {
            return Err(ProtocolError::Unsupported(
                "clients without CLIENT_PROTOCOL_41".into(),
            ));
        }
        let max_packet = r.u32("max packet size")?;
        let collation = r.u8("character set")?;
        r.take(19, "filler")?;
        let ext = r.u32("extended capabilities")?;
        let ext_capabilities = if capabilities & cap::LONG_PASSWORD == 0 {
            ext
        } else {
            0
        };
        if payload.len() == SSL_REQUEST_LEN && capabilities & cap::SSL != 0 {
            return Err(ProtocolError::Unsupported("TLS (SSLRequest)".into()));
        }
        let user = r.nul_terminated("user name")?.to_vec();
        let auth_response = if capabilities & cap::PLUGIN_AUTH_LENENC_CLIENT_DATA != 0 {
            r.lenenc_bytes("auth response")?.to_vec()
        } else if capabilities & cap::SECURE_CONNECTION != 0 {
            let n = usize::from(r.u8("auth response length")?);
            r.take(n, "auth response")?.to_vec()
        } else {
            r.nul_terminated("auth response")?.to_vec()
        };
        let database = if capabilities & cap::CONNECT_WITH_DB != 0 && !r.is_empty() {
            Some(r.nul_terminated_or_rest().to_vec()).filter(|d| !d.is_empty())
        } else {
            None
        };
        let auth_plugin = if capabilities & cap::PLUGIN_AUTH != 0 && !r.is_empty() {
            Some(r.nul_terminated_or_rest().to_vec())
        } else {
            None
        };
        let attrs = if capabilities & cap::CONNECT_ATTRS != 0 && !r.is_empty() {
            parse_attrs(r.lenenc_bytes("connection attributes")?)?
        } else {
            Vec::new()
        };
        Ok(HandshakeResponse {
            capabilities,
            ext_capabilities,
            max_packet,
            collation,
            user,
            auth_response,
            database,
            auth_plugin,
            attrs,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let caps = self.capabilities;
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(&caps.to_le_bytes());
        out.extend_from_slice(&self.max_packet.to_le_bytes());
        out.push(self.collation);
        out.extend_from_slice(&[0u8; 19]);
        let ext = if caps & cap::LONG_PASSWORD == 0 {
            self.ext_capabilities
        } else {
            0
        };
        out.extend_from_slice(&ext.to_le_bytes());
        put_nul(&mut out, &self.user);
        if caps & cap::PLUGIN_AUTH_LENENC_CLIENT_DATA != 0 {
            put_lenenc_bytes(&mut out, &self.auth_response);
        } else {
            out.push(self.auth_response.len() as u8);
            out.extend_from_slice(&self.auth_response);
        }
        if caps & cap::CONNECT_WITH_DB != 0 {
            put_nul(&mut out, self.database.as_deref().unwrap_or_default());
        }
        if caps & cap::PLUGIN_AUTH != 0 {
            put_nul(&mut out, self.auth_plugin.as_deref().unwrap_or_default());
        }
        if caps & cap::CONNECT_ATTRS != 0 {
            put_attrs(&mut out, &self.attrs);
        }
        out
    }
}

fn parse_attrs(mut data: &[u8]) -> Result<Attrs, ProtocolError> {
    let mut attrs = Vec::new();
    while !data.is_empty() {
        let mut r = Reader::new(data);
        let k = r.lenenc_bytes("attribute name")?.to_vec();
        let v = r.lenenc_bytes("attribute value")?.to_vec();
        attrs.push((k, v));
        data = r.rest();
    }
    Ok(attrs)
}

fn put_attrs(out: &mut Vec<u8>, attrs: &Attrs) {
    let mut body = Vec::new();
    for (k, v) in attrs {
        put_lenenc_bytes(&mut body, k);
        put_lenenc_bytes(&mut body, v);
    }
    put_lenenc(out, body.len() as u64);
    out.extend_from_slice(&body);
}

/// AuthSwitchRequest (0xFE): the server asks for another plugin's answer to a nonce.
pub fn encode_auth_switch(plugin: &str, nonce: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + plugin.len() + nonce.len() + 1);
    out.push(0xfe);
    put_nul(&mut out, plugin.as_bytes());
    out.extend_from_slice(nonce);
    out.push(0);
    out
}

/// Parses an AuthSwitchRequest into (plugin name, plugin data without a trailing NUL).
pub fn parse_auth_switch(payload: &[u8]) -> Result<(Vec<u8>, Vec<u8>), ProtocolError> {
    let mut r = Reader::new(payload);
    if r.u8("auth switch header")? != 0xfe {
        return Err(ProtocolError::Malformed("not an auth switch request"));
    }
    if r.is_empty() {
        return Err(ProtocolError::Unsupported(
            "the pre-4.1 mysql_old_password plugin".into(),
        ));
    }
    let plugin = r.nul_terminated_or_rest().to_vec();
    let data = r.rest();
    let data = data.strip_suffix(&[0]).unwrap_or(data).to_vec();
    Ok((plugin, data))
}

/// COM_CHANGE_USER's content.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChangeUser {
    pub user: Vec<u8>,
    pub auth_response: Vec<u8>,
    pub database: Option<Vec<u8>>,
    /// Collation id (two bytes on the wire); `None` when the client sent none.
    pub collation: Option<u16>,
    pub auth_plugin: Option<Vec<u8>>,
    pub attrs: Attrs,
}

impl ChangeUser {
    /// Parses a COM_CHANGE_USER payload (command byte included) sent with `caps`.
    pub fn parse(payload: &[u8], caps: u32) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(payload);
        r.u8("command")?;
        let user = r.nul_terminated("user name")?.to_vec();
        let auth_response = if caps & cap::SECURE_CONNECTION != 0 {
            let n = usize::from(r.u8("auth response length")?);
            r.take(n, "auth response")?.to_vec()
        } else {
            r.nul_terminated("auth response")?.to_vec()
        };
        let db = r.nul_terminated_or_rest().to_vec();
        let database = Some(db).filter(|d| !d.is_empty());
        let mut cu = ChangeUser {
            user,
            auth_response,
            database,
            ..Default::default()
        };
        if r.rest().len() >= 2 {
            cu.collation = Some(r.u16("character set")?);
            if caps & cap::PLUGIN_AUTH != 0 && !r.is_empty() {
                cu.auth_plugin = Some(r.nul_terminated_or_rest().to_vec());
            }
            if caps & cap::CONNECT_ATTRS != 0 && !r.is_empty() {
                cu.attrs = parse_attrs(r.lenenc_bytes("connection attributes")?)?;
            }
        }
        Ok(cu)
    }

    /// Encodes the command (command byte included) for a connection negotiated with `caps`.
    pub fn encode(&self, caps: u32) -> Vec<u8> {
        let mut out = Vec::with_capacity(96);
        out.push(super::consts::com::CHANGE_USER);
        put_nul(&mut out, &self.user);
        out.push(self.auth_response.len() as u8);
        out.extend_from_slice(&self.auth_response);
        put_nul(&mut out, self.database.as_deref().unwrap_or_default());
        out.extend_from_slice(&self.collation.unwrap_or(0).to_le_bytes());
        if caps & cap::PLUGIN_AUTH != 0 {
            put_nul(&mut out, self.auth_plugin.as_deref().unwrap_or_default());
        }
        if caps & cap::CONNECT_ATTRS != 0 {
            put_attrs(&mut out, &self.attrs);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mysql::consts::ext;

    #[test]
    fn server_handshake_round_trip() {
        let hs = ServerHandshake {
            version: "5.5.5-10.11.6-MariaDB".into(),
            connection_id: 42,
            nonce: b"ABCDEFGHIJKLMNOPQRST".to_vec(),
            capabilities: cap::PROXY_OFFERS,
            ext_capabilities: 0,
            collation: 45,
            status: 2,
            auth_plugin: "mysql_native_password".into(),
        };
        assert_eq!(ServerHandshake::parse(&hs.encode()).unwrap(), hs);
    }

    #[test]
    fn parses_a_real_mariadb_greeting() {
        // Laid out as MariaDB 10.11 sends it (payload only).
        let mut p = vec![10];
        p.extend_from_slice(b"5.5.5-10.11.6-MariaDB-0+deb12u1\0");
        p.extend_from_slice(&[0x05, 0, 0, 0]);
        p.extend_from_slice(b"q)Xl9f%:\0");
        p.extend_from_slice(&[0xfe, 0xf7, 0x2d, 0x02, 0, 0xff, 0x81, 0x15]);
        p.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x1d, 0, 0, 0]);
        p.extend_from_slice(b"3Ru#KN>Ey(B[\0mysql_native_password\0");
        let hs = ServerHandshake::parse(&p).unwrap();
        assert_eq!(hs.connection_id, 5);
        assert_eq!(hs.nonce, b"q)Xl9f%:3Ru#KN>Ey(B[".to_vec());
        assert_eq!(hs.auth_plugin, "mysql_native_password");
        assert_eq!(hs.collation, 45);
        assert!(hs.capabilities & cap::DEPRECATE_EOF != 0);
        assert!(hs.capabilities & cap::LONG_PASSWORD == 0);
    }

    #[test]
    fn handshake_response_round_trip_all_fields() {
        let r = HandshakeResponse {
            capabilities: cap::PROTOCOL_41
                | cap::SECURE_CONNECTION
                | cap::PLUGIN_AUTH
                | cap::PLUGIN_AUTH_LENENC_CLIENT_DATA
                | cap::CONNECT_WITH_DB
                | cap::CONNECT_ATTRS,
            // CLIENT_MYSQL clear: MariaDB's extended capabilities travel in the filler.
            ext_capabilities: ext::EXTENDED_METADATA | ext::STMT_BULK_OPERATIONS,
            max_packet: 1 << 24,
            collation: 33,
            user: b"app".to_vec(),
            auth_response: vec![1; 20],
            database: Some(b"shop".to_vec()),
            auth_plugin: Some(b"mysql_native_password".to_vec()),
            attrs: vec![(b"_client_name".to_vec(), b"libmariadb".to_vec())],
        };
        assert_eq!(HandshakeResponse::parse(&r.encode()).unwrap(), r);
        let mut r2 = r.clone();
        r2.capabilities &= !(cap::PLUGIN_AUTH_LENENC_CLIENT_DATA | cap::CONNECT_ATTRS);
        r2.attrs.clear();
        assert_eq!(HandshakeResponse::parse(&r2.encode()).unwrap(), r2);
    }

    #[test]
    fn handshake_response_rejects_garbage_and_ssl() {
        assert!(HandshakeResponse::parse(b"garbage").is_err());
        assert!(HandshakeResponse::parse(&[0u8; 40]).is_err()); // no PROTOCOL_41
        let mut ssl = vec![0u8; 32];
        ssl[..4].copy_from_slice(&(cap::PROTOCOL_41 | cap::SSL).to_le_bytes());
        assert!(matches!(
            HandshakeResponse::parse(&ssl),
            Err(ProtocolError::Unsupported(_))
        ));
        // Truncated in the middle of the user name.
        let mut t = vec![0u8; 32];
        t[..4].copy_from_slice(&cap::PROTOCOL_41.to_le_bytes());
        t.extend_from_slice(b"us");
        assert!(HandshakeResponse::parse(&t).is_err());
    }

    #[test]
    fn auth_switch_round_trip() {
        let p = encode_auth_switch("caching_sha2_password", b"01234567890123456789");
        let (plugin, data) = parse_auth_switch(&p).unwrap();
        assert_eq!(plugin, b"caching_sha2_password");
        assert_eq!(data, b"01234567890123456789");
        assert!(parse_auth_switch(&[0xfe]).is_err());
    }

    #[test]
    fn change_user_round_trip() {
        let caps =
            cap::PROTOCOL_41 | cap::SECURE_CONNECTION | cap::PLUGIN_AUTH | cap::CONNECT_ATTRS;
        let cu = ChangeUser {
            user: b"u".to_vec(),
            auth_response: vec![7; 20],
            database: Some(b"db".to_vec()),
            collation: Some(45),
            auth_plugin: Some(b"mysql_native_password".to_vec()),
            attrs: vec![(b"k".to_vec(), b"v".to_vec())],
        };
        assert_eq!(ChangeUser::parse(&cu.encode(caps), caps).unwrap(), cu);
        assert!(ChangeUser::parse(&[0x11, b'u'], caps).is_err());
    }
}
