//! TLS over either driver's transport: rustls's buffered state machine fed from and drained
//! into owned buffers (`read_tls` / `process_new_packets` / `write_tls`), so io_uring and
//! epoll share one TLS code path. A stream starts in plain text and may be upgraded once
//! (MySQL's SSLRequest switches to TLS mid-handshake).

use super::{Buf, Transport};
use futures_util::future::Either;
use rustls::pki_types::ServerName;
use std::future::Future;
use std::io::{self, Read, Write};
use std::os::fd::RawFd;
use std::sync::Arc;

/// Ciphertext read per transport read.
const TLS_READ: usize = 18 * 1024;

/// A transport with TLS on it or not.
pub struct MaybeTls<T> {
    raw: T,
    tls: Option<Box<Tls>>,
}

/// A TLS session and its ciphertext buffers.
pub struct Tls {
    conn: rustls::Connection,
    /// Ciphertext received and not yet fed to rustls.
    rx: Buf,
    /// Ciphertext to send.
    tx: Buf,
    /// Plaintext rustls holds for us.
    plain: usize,
    /// The peer sent close_notify.
    closed: bool,
}

/// Why a TLS handshake did not complete.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Tls(#[from] rustls::Error),
    #[error("the TLS handshake did not finish in time")]
    TimedOut,
}

impl HandshakeError {
    /// A certificate the peer presented (or dbproxy's trust in it) is the problem, not the
    /// network.
    pub fn is_certificate(&self) -> bool {
        matches!(
            self,
            HandshakeError::Tls(
                rustls::Error::InvalidCertificate(_)
                    | rustls::Error::NoCertificatesPresented
                    | rustls::Error::AlertReceived(
                        rustls::AlertDescription::BadCertificate
                            | rustls::AlertDescription::UnknownCA
                            | rustls::AlertDescription::CertificateUnknown
                    )
            )
        )
    }
}

/// What a finished TLS handshake agreed, for logs.
#[derive(Debug, Clone)]
pub struct Agreed {
    pub version: &'static str,
    pub cipher: String,
}

impl<T: Transport> MaybeTls<T> {
    pub fn plain(raw: T) -> Self {
        MaybeTls { raw, tls: None }
    }

    /// The parts, to move the stream to another worker (`tls` travels with it).
    pub fn into_parts(self) -> (T, Option<Box<Tls>>) {
        (self.raw, self.tls)
    }

    pub fn from_parts(raw: T, tls: Option<Box<Tls>>) -> Self {
        MaybeTls { raw, tls }
    }

    pub fn raw(&self) -> &T {
        &self.raw
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Reads once: plaintext from TLS, or bytes from the transport; `Ok(0)` is the end.
    /// The plain path is the transport's own future; the TLS path is boxed, so that TLS
    /// does not make every session's future (an idle client's memory) larger.
    pub fn read<'s, 'b>(
        &'s mut self,
        buf: &'b mut Buf,
    ) -> impl Future<Output = io::Result<usize>> + use<'s, 'b, T> {
        match self.tls.as_deref_mut() {
            None => Either::Left(self.raw.read(buf)),
            Some(t) => Either::Right(Box::pin(tls_read(t, &mut self.raw, buf))),
        }
    }

    /// Writes the first `n` unread bytes of `buf` (encrypted under TLS) and consumes them;
    /// the TLS path boxed as [`Self::read`]'s.
    pub fn write<'s, 'b>(
        &'s mut self,
        buf: &'b mut Buf,
        n: usize,
    ) -> impl Future<Output = io::Result<()>> + use<'s, 'b, T> {
        match self.tls.as_deref_mut() {
            None => Either::Left(self.raw.write(buf, n)),
            Some(t) => Either::Right(Box::pin(tls_write(t, &mut self.raw, buf, n))),
        }
    }

    pub fn raw_fd(&self) -> RawFd {
        self.raw.raw_fd()
    }

    /// Waits until [`Self::read`] has something: plaintext or ciphertext held here, or
    /// bytes at the socket. (A partial TLS record held here counts: the read that follows
    /// may then wait for the rest of it.)
    pub async fn readable(&self) -> io::Result<()> {
        match &self.tls {
            Some(t) if t.plain > 0 || t.closed || !t.rx.is_empty() => Ok(()),
            _ => self.raw.readable().await,
        }
    }

    /// Whether an idle connection is still fit: no bytes it was not asked for (plaintext
    /// or ciphertext held here, or waiting in the socket) and not hung up.
    pub fn idle_healthy(&self) -> bool {
        match &self.tls {
            Some(t) if t.plain > 0 || t.closed || !t.rx.is_empty() => false,
            _ => super::idle_socket_is_healthy(self.raw.raw_fd()),
        }
    }

    /// Server side of a TLS handshake on this plain stream. `early` holds bytes already
    /// read from the client after its SSLRequest (the start of its ClientHello).
    pub async fn accept_tls(
        &mut self,
        config: Arc<rustls::ServerConfig>,
        early: &[u8],
        deadline: std::time::Instant,
    ) -> Result<Agreed, HandshakeError> {
        let conn = rustls::ServerConnection::new(config)?;
        self.handshake(conn.into(), early, deadline).await
    }

    /// Client side of a TLS handshake on this plain stream (dbproxy to a database).
    pub async fn connect_tls(
        &mut self,
        config: Arc<rustls::ClientConfig>,
        name: ServerName<'static>,
        deadline: std::time::Instant,
    ) -> Result<Agreed, HandshakeError> {
        let conn = rustls::ClientConnection::new(config, name)?;
        self.handshake(conn.into(), &[], deadline).await
    }

    async fn handshake(
        &mut self,
        conn: rustls::Connection,
        early: &[u8],
        deadline: std::time::Instant,
    ) -> Result<Agreed, HandshakeError> {
        if self.tls.is_some() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "TLS is on already").into());
        }
        let mut rx = Buf::with_capacity(TLS_READ);
        rx.extend(early);
        let mut t = Box::new(Tls {
            conn,
            rx,
            tx: Buf::with_capacity(TLS_READ),
            plain: 0,
            closed: false,
        });
        let fd = self.raw.raw_fd();
        let run = drive_handshake(&mut t, &mut self.raw);
        let r = tokio::select! {
            r = run => r,
            _ = crate::rt::time::sleep_until(deadline) => Err(HandshakeError::TimedOut),
        };
        if matches!(r, Err(HandshakeError::TimedOut)) {
            // A read may be in flight under io_uring: shutting the socket down ends it.
            super::shutdown(fd);
        }
        r?;
        let agreed = Agreed {
            version: match t.conn.protocol_version() {
                Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
                Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
                _ => "TLS",
            },
            cipher: t
                .conn
                .negotiated_cipher_suite()
                .map(|c| format!("{:?}", c.suite()))
                .unwrap_or_default(),
        };
        self.tls = Some(t);
        Ok(agreed)
    }
}

async fn tls_read<T: Transport>(t: &mut Tls, raw: &mut T, buf: &mut Buf) -> io::Result<usize> {
    loop {
        if t.plain > 0 {
            return t.take_plain(buf);
        }
        if t.closed {
            return Ok(0);
        }
        if !t.rx.is_empty() {
            // What rustls wants to send back (a key update's answer) goes out with the next
            // write.
            t.feed()?;
            continue;
        }
        t.rx.reserve(TLS_READ);
        if raw.read(&mut t.rx).await? == 0 {
            return Ok(0);
        }
    }
}

async fn tls_write<T: Transport>(
    t: &mut Tls,
    raw: &mut T,
    buf: &mut Buf,
    n: usize,
) -> io::Result<()> {
    let mut done = 0;
    while done < n {
        let data = buf.filled().get(done..n).unwrap_or_default();
        let k = t.conn.writer().write(data)?;
        done += k;
        if k == 0 && !t.conn.wants_write() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "TLS session takes no more data",
            ));
        }
        flush(t, raw).await?;
    }
    buf.consume(n);
    Ok(())
}

async fn drive_handshake<T: Transport>(t: &mut Tls, raw: &mut T) -> Result<(), HandshakeError> {
    while t.conn.is_handshaking() {
        if t.conn.wants_write() {
            flush(t, raw).await?;
            continue;
        }
        if t.rx.is_empty() {
            t.rx.reserve(TLS_READ);
            if raw.read(&mut t.rx).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection during the TLS handshake",
                )
                .into());
            }
        }
        if let Err(e) = t.feed_tls() {
            // Tell the peer why (an alert), as far as it listens.
            let _ = flush(t, raw).await;
            return Err(e);
        }
    }
    // The last flight (and, under TLS 1.3, the server's session tickets).
    if t.conn.wants_write() {
        flush(t, raw).await?;
    }
    Ok(())
}

/// Sends every byte of ciphertext rustls has queued.
async fn flush<T: Transport>(t: &mut Tls, raw: &mut T) -> io::Result<()> {
    while t.conn.wants_write() {
        t.conn.write_tls(&mut BufWriter(&mut t.tx))?;
    }
    let n = t.tx.len();
    if n > 0 {
        raw.write(&mut t.tx, n).await?;
    }
    Ok(())
}

struct BufWriter<'a>(&'a mut Buf);

impl Write for BufWriter<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.extend(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Tls {
    /// Feeds buffered ciphertext to rustls (one record or so at a time).
    fn feed_tls(&mut self) -> Result<(), HandshakeError> {
        let used = self.conn.read_tls(&mut self.rx.filled())?;
        self.rx.consume(used);
        let st = self.conn.process_new_packets()?;
        self.plain = st.plaintext_bytes_to_read();
        self.closed = st.peer_has_closed();
        Ok(())
    }

    fn feed(&mut self) -> io::Result<()> {
        self.feed_tls().map_err(|e| match e {
            HandshakeError::Io(e) => e,
            e => io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
        })
    }

    /// Moves plaintext into `buf`'s spare capacity.
    fn take_plain(&mut self, buf: &mut Buf) -> io::Result<usize> {
        let n = buf.read_with(self.plain, |dst| self.conn.reader().read(dst))?;
        self.plain -= n.min(self.plain);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// An in-memory transport.
    struct Pipe(DuplexStream);

    impl Transport for Pipe {
        async fn read(&mut self, buf: &mut Buf) -> io::Result<usize> {
            let mut tmp = vec![0u8; 7000];
            let n = self.0.read(&mut tmp).await?;
            buf.extend(&tmp[..n]);
            Ok(n)
        }
        async fn write(&mut self, buf: &mut Buf, n: usize) -> io::Result<()> {
            self.0.write_all(&buf.filled()[..n]).await?;
            buf.consume(n);
            Ok(())
        }
        /// A pipe cannot be watched: the read that follows waits instead.
        async fn readable(&self) -> io::Result<()> {
            Ok(())
        }
        fn raw_fd(&self) -> RawFd {
            -1
        }
    }

    fn configs() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["db.test".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    /// Reads until `n` bytes arrived.
    async fn read_n(s: &mut MaybeTls<Pipe>, n: usize) -> Vec<u8> {
        let mut b = Buf::with_capacity(1024);
        while b.len() < n {
            b.reserve(4096);
            assert!(s.read(&mut b).await.unwrap() > 0, "early end");
        }
        b.filled().to_vec()
    }

    #[tokio::test]
    async fn both_ends_agree_and_move_megabytes_either_way() {
        let (server_cfg, client_cfg) = configs();
        let (a, b) = tokio::io::duplex(16 * 1024);
        let mut client = MaybeTls::plain(Pipe(a));
        let mut server = MaybeTls::plain(Pipe(b));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let name = ServerName::try_from("db.test").unwrap();
        let (c, s) = tokio::join!(
            client.connect_tls(client_cfg, name, deadline),
            server.accept_tls(server_cfg, &[], deadline)
        );
        assert_eq!(c.unwrap().version, "TLSv1.3");
        s.unwrap();
        assert!(client.is_tls() && server.is_tls());
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut out = Buf::from_vec(big.clone());
        let n = out.len();
        let (w, r) = tokio::join!(client.write(&mut out, n), read_n(&mut server, big.len()));
        w.unwrap();
        assert!(r == big);
        let mut back = Buf::from_vec(b"pong".to_vec());
        server.write(&mut back, 4).await.unwrap();
        assert_eq!(read_n(&mut client, 4).await, b"pong");
    }

    #[tokio::test]
    async fn bytes_read_before_the_upgrade_are_not_lost() {
        let (server_cfg, client_cfg) = configs();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let mut client = MaybeTls::plain(Pipe(a));
        let mut server_pipe = Pipe(b);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let name = ServerName::try_from("db.test").unwrap();
        // The server's driver read the client's first flight along with what came before.
        let server = async move {
            let mut early = Buf::with_capacity(64 * 1024);
            while early.is_empty() {
                server_pipe.read(&mut early).await.unwrap();
            }
            let mut s = MaybeTls::plain(server_pipe);
            s.accept_tls(server_cfg, early.filled(), deadline)
                .await
                .map(|_| s)
        };
        let (c, s) = tokio::join!(client.connect_tls(client_cfg, name, deadline), server);
        c.unwrap();
        let mut s = s.unwrap();
        let mut m = Buf::from_vec(b"hello".to_vec());
        client.write(&mut m, 5).await.unwrap();
        assert_eq!(read_n(&mut s, 5).await, b"hello");
    }

    #[tokio::test]
    async fn garbage_instead_of_a_client_hello_fails_cleanly() {
        let (server_cfg, _) = configs();
        let (mut a, b) = tokio::io::duplex(4096);
        a.write_all(&[b'G'; 300]).await.unwrap();
        let mut server = MaybeTls::plain(Pipe(b));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let e = server
            .accept_tls(server_cfg, &[], deadline)
            .await
            .unwrap_err();
        assert!(
            matches!(e, HandshakeError::Tls(_) | HandshakeError::Io(_)),
            "{e}"
        );
        assert!(!server.is_tls());
    }

    #[tokio::test]
    async fn a_silent_peer_times_out() {
        let (server_cfg, _) = configs();
        let (_a, b) = tokio::io::duplex(4096);
        let mut server = MaybeTls::plain(Pipe(b));
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(50);
        let e = server
            .accept_tls(server_cfg, &[], deadline)
            .await
            .unwrap_err();
        assert!(matches!(e, HandshakeError::TimedOut), "{e}");
    }

    #[test]
    fn certificate_errors_are_told_apart() {
        let e = HandshakeError::Tls(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        ));
        assert!(e.is_certificate());
        assert!(!HandshakeError::TimedOut.is_certificate());
    }
}
