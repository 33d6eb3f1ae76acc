//! A throwaway certificate authority for the TLS tests, and a TLS probe that speaks just
//! enough of the MySQL handshake (greeting, SSLRequest) to see the certificate an endpoint
//! presents.

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// A CA in a temporary directory; `ca.pem` is what clients trust.
pub struct TestCa {
    pub dir: tempfile::TempDir,
    /// The CA certificate (PEM).
    pub ca: PathBuf,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let dir = tempfile::Builder::new()
            .prefix("dbproxy-pki-")
            .tempdir()
            .unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, issuer.pem()).unwrap();
        TestCa { dir, ca, issuer }
    }

    /// Issues a server certificate for `names` (DNS names or IP addresses) and writes
    /// `<stem>.pem` and `<stem>.key`; returns their paths.
    pub fn issue(&self, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("server"),
        );
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (
            self.dir.path().join(format!("{stem}.pem")),
            self.dir.path().join(format!("{stem}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

/// The DER of the first certificate in a PEM file.
pub fn pem_der(path: &Path) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_file(path)
        .unwrap()
        .to_vec()
}

fn client_config(ca: &Path) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// Reads the greeting and sends an SSLRequest: the stream is then where the TLS handshake
/// starts. Returns the greeting's capability flags.
pub fn ssl_request(s: &mut TcpStream) -> u32 {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut h = [0u8; 4];
    s.read_exact(&mut h).unwrap();
    let len = u32::from_le_bytes([h[0], h[1], h[2], 0]) as usize;
    let mut g = vec![0u8; len];
    s.read_exact(&mut g).unwrap();
    let v = g.iter().skip(1).position(|&b| b == 0).unwrap() + 1;
    let low = u16::from_le_bytes([g[v + 14], g[v + 15]]);
    let high = u16::from_le_bytes([g[v + 19], g[v + 20]]);
    let caps = u32::from(low) | (u32::from(high) << 16);
    // PROTOCOL_41 | SSL | SECURE_CONNECTION | PLUGIN_AUTH
    let want: u32 = (1 << 9) | (1 << 11) | (1 << 15) | (1 << 19);
    let mut p = vec![32, 0, 0, 1];
    p.extend_from_slice(&want.to_le_bytes());
    p.extend_from_slice(&(1u32 << 24).to_le_bytes());
    p.push(33);
    p.extend_from_slice(&[0; 23]);
    s.write_all(&p).unwrap();
    caps
}

/// The certificate (DER) an endpoint presents to a client that asks for TLS, verified
/// against `ca` for the name `localhost`.
pub fn peer_certificate(port: u16, ca: &Path) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let caps = ssl_request(&mut s);
    assert!(
        caps & (1 << 11) != 0,
        "the endpoint does not offer CLIENT_SSL"
    );
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(client_config(ca), name).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut s).unwrap();
    }
    conn.peer_certificates().unwrap()[0].to_vec()
}
