//! The epoll driver: tokio's reactor on a current-thread runtime per worker.

use super::{BackendAddr, Buf, Detached, Driver, Stream};
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

impl Stream for EpollStream {
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
    type Stream = EpollStream;
    type Listener = tokio::net::TcpListener;
    const NAME: &'static str = "epoll";

    fn listener(l: std::net::TcpListener) -> io::Result<Self::Listener> {
        tokio::net::TcpListener::from_std(l)
    }

    async fn accept(l: &Self::Listener) -> io::Result<(EpollStream, SocketAddr)> {
        let (s, peer) = l.accept().await?;
        s.set_nodelay(true)?;
        Ok((EpollStream::Tcp(s), peer))
    }

    fn detach(s: EpollStream) -> io::Result<Detached> {
        Ok(match s {
            EpollStream::Tcp(s) => Detached::Tcp(s.into_std()?),
            EpollStream::Unix(s) => Detached::Unix(s.into_std()?),
        })
    }

    fn attach(s: Detached) -> io::Result<EpollStream> {
        Ok(match s {
            Detached::Tcp(s) => {
                s.set_nonblocking(true)?;
                EpollStream::Tcp(TcpStream::from_std(s)?)
            }
            Detached::Unix(s) => {
                s.set_nonblocking(true)?;
                EpollStream::Unix(UnixStream::from_std(s)?)
            }
        })
    }

    async fn connect(addr: &BackendAddr) -> io::Result<EpollStream> {
        match addr {
            BackendAddr::Tcp(a) => {
                let s = TcpStream::connect(*a).await?;
                s.set_nodelay(true)?;
                Ok(EpollStream::Tcp(s))
            }
            BackendAddr::Unix(p) => Ok(EpollStream::Unix(UnixStream::connect(p).await?)),
        }
    }
}
