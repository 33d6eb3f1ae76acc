//! The epoll driver: tokio's reactor on a current-thread runtime per worker.

use super::{Buf, Driver, Stream};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// tokio (epoll) driver.
pub struct Epoll;

/// A tokio TCP stream.
pub struct EpollStream(tokio::net::TcpStream);

impl Stream for EpollStream {
    async fn read(&mut self, buf: &mut Buf) -> io::Result<usize> {
        if buf.data.capacity() == buf.data.len() {
            buf.reserve(4096);
        }
        let n = self.0.read_buf(&mut buf.data).await?;
        Ok(n)
    }

    async fn write(&mut self, buf: &mut Buf, n: usize) -> io::Result<()> {
        let start = buf.start;
        self.0.write_all(&buf.data[start..start + n]).await?;
        buf.consume(n);
        Ok(())
    }

    fn raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
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
        Ok((EpollStream(s), peer))
    }

    fn detach(s: EpollStream) -> io::Result<std::net::TcpStream> {
        s.0.into_std()
    }

    fn attach(s: std::net::TcpStream) -> io::Result<EpollStream> {
        s.set_nonblocking(true)?;
        Ok(EpollStream(tokio::net::TcpStream::from_std(s)?))
    }

    async fn connect(addr: SocketAddr) -> io::Result<EpollStream> {
        let s = tokio::net::TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(EpollStream(s))
    }
}
