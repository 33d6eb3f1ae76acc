//! TLS settings: dbproxy's certificate for clients (swapped whole on reload, so a client
//! mid-handshake keeps the one it started with) and the client configurations it uses
//! towards databases. The byte-level TLS lives in `io::tls_stream`.

use crate::config::BackendTlsMode;
use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// A certificate, key or CA file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {why}")]
    File { path: String, why: String },
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    #[error("no CA certificates: {0}")]
    NoRoots(String),
}

fn file_err(path: &Path, why: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        why: why.to_string(),
    }
}

/// The one cryptography provider dbproxy uses (ring), TLS 1.2 and 1.3 only.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Reads a PEM certificate chain (leaf first).
pub fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(path, e))?;
    if chain.is_empty() {
        return Err(file_err(path, "no CERTIFICATE in the file"));
    }
    Ok(chain)
}

/// Builds the configuration clients are served with from a chain and key in PEM files.
pub fn server_config(cert: &Path, key: &Path) -> Result<ServerConfig, TlsError> {
    let chain = read_chain(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| file_err(key, e))?;
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| file_err(cert, format!("certificate and key do not fit: {e}")))?;
    Ok(cfg)
}

/// Loads every certificate, key and CA file a configuration names (`check-config`): each
/// problem, prefixed with its key.
pub fn check_files(cfg: &crate::config::Config) -> Vec<String> {
    let mut errs = Vec::new();
    if cfg.proxy.has_tls() {
        if let Err(e) = server_config(
            Path::new(&cfg.proxy.tls_cert),
            Path::new(&cfg.proxy.tls_key),
        ) {
            errs.push(format!("proxy.tls_cert / proxy.tls_key: {e}"));
        }
    }
    for (i, g) in cfg.target_groups.iter().enumerate() {
        if let Err(e) = BackendTls::new(g.backend_tls, &g.backend_tls_ca, Arc::default()) {
            errs.push(format!("target_groups[{i}].backend_tls_ca: {e}"));
        }
    }
    errs
}

/// dbproxy's certificate for clients, replaced whole on reload.
pub struct ServerTls {
    cert: PathBuf,
    key: PathBuf,
    current: ArcSwap<ServerConfig>,
    /// Successful loads (the first included).
    pub loads: AtomicU64,
}

impl ServerTls {
    pub fn load(cert: &Path, key: &Path) -> Result<ServerTls, TlsError> {
        let cfg = server_config(cert, key)?;
        Ok(ServerTls {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: ArcSwap::from_pointee(cfg),
            loads: AtomicU64::new(1),
        })
    }

    /// The configuration a new TLS handshake uses.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.current.load_full()
    }

    /// Reads the files again; on any error the pair in use stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let cfg = server_config(&self.cert, &self.key)?;
        self.current.store(Arc::new(cfg));
        self.loads.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// TLS counters, process-wide (metrics).
#[derive(Debug, Default)]
pub struct TlsStats {
    /// Client TLS handshakes that succeeded.
    pub client_handshakes: AtomicU64,
    /// Client TLS handshakes that failed.
    pub client_handshake_failures: AtomicU64,
    /// Backend connections on TLS now.
    pub backend_connections: AtomicUsize,
    pub backend_handshakes: AtomicU64,
    pub backend_handshake_failures: AtomicU64,
}

/// Holds one backend connection in [`TlsStats::backend_connections`] while it lives.
#[derive(Debug)]
pub struct TlsConnCount(Arc<TlsStats>);

impl TlsConnCount {
    pub fn new(stats: Arc<TlsStats>) -> Self {
        stats.backend_connections.fetch_add(1, Ordering::Relaxed);
        TlsConnCount(stats)
    }
}

impl Drop for TlsConnCount {
    fn drop(&mut self) {
        self.0.backend_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How dbproxy speaks TLS to the databases of one target group.
#[derive(Debug, Clone)]
pub struct BackendTls {
    pub mode: BackendTlsMode,
    config: Option<Arc<ClientConfig>>,
    pub stats: Arc<TlsStats>,
}

impl BackendTls {
    pub fn disabled() -> BackendTls {
        BackendTls {
            mode: BackendTlsMode::Disabled,
            config: None,
            stats: Arc::default(),
        }
    }

    /// Builds the client configuration for `mode`; `ca` is a PEM file (empty: the
    /// system's roots).
    pub fn new(
        mode: BackendTlsMode,
        ca: &str,
        stats: Arc<TlsStats>,
    ) -> Result<BackendTls, TlsError> {
        let builder =
            ClientConfig::builder_with_provider(provider()).with_protocol_versions(VERSIONS)?;
        let config = match mode {
            BackendTlsMode::Disabled => {
                return Ok(BackendTls {
                    stats,
                    ..BackendTls::disabled()
                })
            }
            BackendTlsMode::Preferred => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Lenient {
                    chain: None,
                    provider: provider(),
                }))
                .with_no_client_auth(),
            BackendTlsMode::VerifyCa | BackendTlsMode::VerifyFull => {
                let roots = Arc::new(roots(ca)?);
                let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider())
                    .build()
                    .map_err(|e| TlsError::NoRoots(e.to_string()))?;
                if mode == BackendTlsMode::VerifyCa {
                    builder
                        .dangerous()
                        .with_custom_certificate_verifier(Arc::new(Lenient {
                            chain: Some(webpki),
                            provider: provider(),
                        }))
                        .with_no_client_auth()
                } else {
                    builder.with_webpki_verifier(webpki).with_no_client_auth()
                }
            }
        };
        let mut config = config;
        // SNI only where the name is checked.
        config.enable_sni = mode == BackendTlsMode::VerifyFull;
        Ok(BackendTls {
            mode,
            config: Some(Arc::new(config)),
            stats,
        })
    }

    /// The client configuration, unless TLS is off.
    pub fn config(&self) -> Option<Arc<ClientConfig>> {
        self.config.clone()
    }

    /// Whether a server that does not offer TLS must be refused.
    pub fn required(&self) -> bool {
        matches!(
            self.mode,
            BackendTlsMode::VerifyCa | BackendTlsMode::VerifyFull
        )
    }
}

/// The name a target's certificate must carry: the host of `host:port` (an IP address is
/// matched against the certificate's IP addresses).
pub fn server_name(target: &str) -> ServerName<'static> {
    let host = match target.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => h,
        _ => target,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string())
        .unwrap_or_else(|_| ServerName::try_from("invalid.invalid").expect("a valid DNS name"))
}

fn roots(ca: &str) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    if ca.is_empty() {
        let found = rustls_native_certs::load_native_certs();
        for c in found.certs {
            let _ = store.add(c);
        }
        if store.is_empty() {
            let why = found
                .errors
                .first()
                .map(|e| e.to_string())
                .unwrap_or_else(|| "the system has none".into());
            return Err(TlsError::NoRoots(format!(
                "backend_tls_ca is empty and the system's roots could not be read ({why})"
            )));
        }
        return Ok(store);
    }
    let path = Path::new(ca);
    for c in read_chain(path)? {
        store
            .add(c)
            .map_err(|e| file_err(path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(store)
}

/// The certificate checks of `preferred` (none: encryption only, like MySQL's `PREFERRED`)
/// and `verify_ca` (the chain must lead to a trusted root; the name is not checked). The
/// handshake's signatures are checked either way.
#[derive(Debug)]
struct Lenient {
    /// `None`: any certificate.
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        verify_tls12_signature(message, cert, dss, algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        verify_tls13_signature(message, cert, dss, algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_come_from_the_target() {
        assert_eq!(
            server_name("db.example.com:3306"),
            ServerName::try_from("db.example.com").unwrap()
        );
        assert!(matches!(
            server_name("127.0.0.1:3306"),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("[::1]:3306"),
            ServerName::IpAddress(_)
        ));
    }

    #[test]
    fn missing_files_are_named() {
        let e = server_config(
            Path::new("/nonexistent/c.pem"),
            Path::new("/nonexistent/k.pem"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("/nonexistent/c.pem"), "{e}");
        let e = BackendTls::new(
            BackendTlsMode::VerifyCa,
            "/nonexistent/ca.pem",
            Arc::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        assert!(BackendTls::new(BackendTlsMode::Preferred, "", Arc::default()).is_ok());
    }
}
