//! The driver of the control plane's tokio runtimes (the health-check monitor, the
//! start-up probe, benches of the pool): tokio's own sockets. Workers do not use it.

use super::{BackendAddr, Buf, Detached, DetachedSocket, Driver, MaybeTls, Transport};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

/// The tokio driver.
pub struct TokioNet;

/// A tokio stream.
pub enum TokioStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Transport for TokioStream {
    async fn read(&mut self, buf: &mut Buf) -> io::Result<usize> {
        if buf.data.capacity() == buf.data.len() {
            buf.reserve(4096);
        }
        match self {
            TokioStream::Tcp(s) => s.read_buf(&mut buf.data).await,
            TokioStream::Unix(s) => s.read_buf(&mut buf.data).await,
        }
    }

    async fn write(&mut self, buf: &mut Buf, n: usize) -> io::Result<()> {
        let start = buf.start;
        let data = &buf.data[start..start + n];
        match self {
            TokioStream::Tcp(s) => s.write_all(data).await?,
            TokioStream::Unix(s) => s.write_all(data).await?,
        }
        buf.consume(n);
        Ok(())
    }

    async fn readable(&self) -> io::Result<()> {
        match self {
            TokioStream::Tcp(s) => s.readable().await,
            TokioStream::Unix(s) => s.readable().await,
        }
    }

    fn raw_fd(&self) -> RawFd {
        match self {
            TokioStream::Tcp(s) => s.as_raw_fd(),
            TokioStream::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl Driver for TokioNet {
    type Stream = MaybeTls<TokioStream>;
    type Listener = tokio::net::TcpListener;
    const NAME: &'static str = "tokio";

    fn listener(l: std::net::TcpListener) -> io::Result<Self::Listener> {
        tokio::net::TcpListener::from_std(l)
    }

    async fn accept(l: &Self::Listener) -> io::Result<(Self::Stream, SocketAddr)> {
        let (s, peer) = l.accept().await?;
        s.set_nodelay(true)?;
        Ok((MaybeTls::plain(TokioStream::Tcp(s)), peer))
    }

    fn detach(s: Self::Stream) -> io::Result<Detached> {
        let (raw, tls) = s.into_parts();
        let socket = match raw {
            TokioStream::Tcp(s) => DetachedSocket::Tcp(s.into_std()?),
            TokioStream::Unix(s) => DetachedSocket::Unix(s.into_std()?),
        };
        Ok(Detached { socket, tls })
    }

    fn attach(s: Detached) -> io::Result<Self::Stream> {
        let raw = match s.socket {
            DetachedSocket::Tcp(s) => {
                s.set_nonblocking(true)?;
                TokioStream::Tcp(TcpStream::from_std(s)?)
            }
            DetachedSocket::Unix(s) => {
                s.set_nonblocking(true)?;
                TokioStream::Unix(UnixStream::from_std(s)?)
            }
        };
        Ok(MaybeTls::from_parts(raw, s.tls))
    }

    async fn connect(addr: &BackendAddr) -> io::Result<Self::Stream> {
        let raw = match addr {
            BackendAddr::Tcp(a) => {
                let s = TcpStream::connect(*a).await?;
                super::tune_backend_socket(std::os::fd::AsRawFd::as_raw_fd(&s))?;
                TokioStream::Tcp(s)
            }
            BackendAddr::Unix(p) => TokioStream::Unix(UnixStream::connect(p).await?),
        };
        Ok(MaybeTls::plain(raw))
    }
}
