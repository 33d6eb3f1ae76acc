//! The io_uring driver: tokio-uring, one ring per worker thread.

use super::{Buf, Driver, Stream};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use tokio_uring::buf::BoundedBuf;

/// tokio-uring driver.
pub struct Uring;

/// A tokio-uring TCP stream.
pub struct UringStream(tokio_uring::net::TcpStream);

impl Stream for UringStream {
    async fn read(&mut self, buf: &mut Buf) -> io::Result<usize> {
        if buf.data.capacity() == buf.data.len() {
            buf.reserve(4096);
        }
        let (data, start) = buf.take_vec();
        let len = data.len();
        let cap = data.capacity();
        let (res, slice) = self.0.read(data.slice(len..cap)).await;
        buf.put_vec(slice.into_inner(), start);
        res
    }

    async fn write(&mut self, buf: &mut Buf, n: usize) -> io::Result<()> {
        let mut n = n;
        if super::alone() {
            let sent = super::send_now(self.raw_fd(), &buf.filled()[..n])?;
            buf.consume(sent);
            n -= sent;
            if n == 0 {
                return Ok(());
            }
        }
        let (data, start) = buf.take_vec();
        let (res, slice) = self.0.write_all(data.slice(start..start + n)).await;
        buf.put_vec(slice.into_inner(), start);
        res?;
        buf.consume(n);
        Ok(())
    }

    fn raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl Driver for Uring {
    type Stream = UringStream;
    type Listener = tokio_uring::net::TcpListener;
    const NAME: &'static str = "uring";

    fn listener(l: std::net::TcpListener) -> io::Result<Self::Listener> {
        Ok(tokio_uring::net::TcpListener::from_std(l))
    }

    async fn accept(l: &Self::Listener) -> io::Result<(UringStream, SocketAddr)> {
        let (s, peer) = l.accept().await?;
        s.set_nodelay(true)?;
        Ok((UringStream(s), peer))
    }

    fn detach(s: UringStream) -> io::Result<std::net::TcpStream> {
        // tokio-uring has no into_std: keep a duplicate descriptor and let the ring close
        // its own.
        let fd = s.0.as_raw_fd();
        // SAFETY: fd is open (owned by `s`); dup returns a new descriptor or -1.
        let dup = unsafe { libc::dup(fd) };
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        drop(s);
        // SAFETY: `dup` is a fresh descriptor we own.
        Ok(unsafe { <std::net::TcpStream as std::os::fd::FromRawFd>::from_raw_fd(dup) })
    }

    fn attach(s: std::net::TcpStream) -> io::Result<UringStream> {
        Ok(UringStream(tokio_uring::net::TcpStream::from_std(s)))
    }

    async fn connect(addr: SocketAddr) -> io::Result<UringStream> {
        let s = tokio_uring::net::TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(UringStream(s))
    }
}

/// Submission queue entries of each worker's ring.
pub const RING_ENTRIES: u32 = 1024;

/// Whether an io_uring instance of the workers' size can be set up here (kernels, seccomp
/// profiles, containers and memlock limits may refuse it).
pub fn available() -> Result<(), io::Error> {
    io_uring::IoUring::new(RING_ENTRIES).map(|_| ())
}
