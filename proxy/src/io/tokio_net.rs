//! The epoll driver: tokio's reactor on a current-thread runtime per worker.

use super::{BackendAddr, Buf, Detached, DetachedSocket, Driver, MaybeTls, Transport};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

/// tokio (epoll) driver.
pub struct Epoll;

/// A tokio stream.
pub enum EpollStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Transport for EpollStream {
    async fn read(&mut self, buf: &mut Buf) -> io::Result<usize> {
        if buf.data.capacity() == buf.data.len() {
            buf.reserve(4096);
        }
        match self {
            EpollStream::Tcp(s) => s.read_buf(&mut buf.data).await,
            EpollStream::Unix(s) => s.read_buf(&mut buf.data).await,
        }
    }

    async fn write(&mut self, buf: &mut Buf, n: usize) -> io::Result<()> {
        let start = buf.start;
        let data = &buf.data[start..start + n];
        match self {
            EpollStream::Tcp(s) => s.write_all(data).await?,
            EpollStream::Unix(s) => s.write_all(data).await?,
        }
        buf.consume(n);
        Ok(())
    }

    fn raw_fd(&self) -> RawFd {
        match self {
            EpollStream::Tcp(s) => s.as_raw_fd(),
            EpollStream::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl Driver for Epoll {
    type Stream = MaybeTls<EpollStream>;
    type Listener = tokio::net::TcpListener;
    const NAME: &'static str = "epoll";

    fn listener(l: std::net::TcpListener) -> io::Result<Self::Listener> {
        tokio::net::TcpListener::from_std(l)
    }

    async fn accept(l: &Self::Listener) -> io::Result<(Self::Stream, SocketAddr)> {
        let (s, peer) = l.accept().await?;
        s.set_nodelay(true)?;
        Ok((MaybeTls::plain(EpollStream::Tcp(s)), peer))
    }

    fn detach(s: Self::Stream) -> io::Result<Detached> {
        let (raw, tls) = s.into_parts();
        let socket = match raw {
            EpollStream::Tcp(s) => DetachedSocket::Tcp(s.into_std()?),
            EpollStream::Unix(s) => DetachedSocket::Unix(s.into_std()?),
        };
        Ok(Detached { socket, tls })
    }

    fn attach(s: Detached) -> io::Result<Self::Stream> {
        let raw = match s.socket {
            DetachedSocket::Tcp(s) => {
                s.set_nonblocking(true)?;
                EpollStream::Tcp(TcpStream::from_std(s)?)
            }
            DetachedSocket::Unix(s) => {
                s.set_nonblocking(true)?;
                EpollStream::Unix(UnixStream::from_std(s)?)
            }
        };
        Ok(MaybeTls::from_parts(raw, s.tls))
    }

    async fn connect(addr: &BackendAddr) -> io::Result<Self::Stream> {
        let raw = match addr {
            BackendAddr::Tcp(a) => {
                let s = TcpStream::connect(*a).await?;
                super::tune_backend_socket(std::os::fd::AsRawFd::as_raw_fd(&s))?;
                EpollStream::Tcp(s)
            }
            BackendAddr::Unix(p) => EpollStream::Unix(UnixStream::connect(p).await?),
        };
        Ok(MaybeTls::plain(raw))
    }
}
