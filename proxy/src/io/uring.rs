//! The io_uring driver: tokio-uring, one ring per worker thread.

use super::{BackendAddr, Buf, Detached, DetachedSocket, Driver, MaybeTls, Transport};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use tokio_uring::buf::BoundedBuf;
use tokio_uring::net::{TcpStream, UnixStream};

/// tokio-uring driver.
pub struct Uring;

/// A tokio-uring stream.
pub enum UringStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Transport for UringStream {
    async fn read(&mut self, buf: &mut Buf) -> io::Result<usize> {
        if buf.data.capacity() == buf.data.len() {
            buf.reserve(4096);
        }
        let (data, start) = buf.take_vec();
        let len = data.len();
        let cap = data.capacity();
        let (res, slice) = match self {
            UringStream::Tcp(s) => s.read(data.slice(len..cap)).await,
            UringStream::Unix(s) => s.read(data.slice(len..cap)).await,
        };
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
        let slice = data.slice(start..start + n);
        let (res, slice) = match self {
            UringStream::Tcp(s) => s.write_all(slice).await,
            UringStream::Unix(s) => s.write_all(slice).await,
        };
        buf.put_vec(slice.into_inner(), start);
        res?;
        buf.consume(n);
        Ok(())
    }

    fn raw_fd(&self) -> RawFd {
        match self {
            UringStream::Tcp(s) => s.as_raw_fd(),
            UringStream::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl Driver for Uring {
    type Stream = MaybeTls<UringStream>;
    type Listener = tokio_uring::net::TcpListener;
    const NAME: &'static str = "uring";

    fn listener(l: std::net::TcpListener) -> io::Result<Self::Listener> {
        Ok(tokio_uring::net::TcpListener::from_std(l))
    }

    async fn accept(l: &Self::Listener) -> io::Result<(Self::Stream, SocketAddr)> {
        let (s, peer) = l.accept().await?;
        s.set_nodelay(true)?;
        Ok((MaybeTls::plain(UringStream::Tcp(s)), peer))
    }

    fn detach(s: Self::Stream) -> io::Result<Detached> {
        let (s, tls) = s.into_parts();
        // tokio-uring has no into_std: keep a duplicate descriptor and let the ring close
        // its own.
        let fd = s.raw_fd();
        // SAFETY: fd is open (owned by `s`); dup returns a new descriptor or -1.
        let dup = unsafe { libc::dup(fd) };
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        let unix = matches!(s, UringStream::Unix(_));
        drop(s);
        // SAFETY: `dup` is a fresh descriptor we own, of the kind `s` was.
        let socket = unsafe {
            if unix {
                DetachedSocket::Unix(std::os::unix::net::UnixStream::from_raw_fd(dup))
            } else {
                DetachedSocket::Tcp(std::net::TcpStream::from_raw_fd(dup))
            }
        };
        Ok(Detached { socket, tls })
    }

    fn attach(s: Detached) -> io::Result<Self::Stream> {
        let raw = match s.socket {
            DetachedSocket::Tcp(s) => UringStream::Tcp(TcpStream::from_std(s)),
            DetachedSocket::Unix(s) => UringStream::Unix(UnixStream::from_std(s)),
        };
        Ok(MaybeTls::from_parts(raw, s.tls))
    }

    async fn connect(addr: &BackendAddr) -> io::Result<Self::Stream> {
        let raw = match addr {
            BackendAddr::Tcp(a) => {
                let s = TcpStream::connect(*a).await?;
                super::tune_backend_socket(std::os::fd::AsRawFd::as_raw_fd(&s))?;
                UringStream::Tcp(s)
            }
            BackendAddr::Unix(p) => UringStream::Unix(UnixStream::connect(p).await?),
        };
        Ok(MaybeTls::plain(raw))
    }
}

/// Submission queue entries of each worker's ring.
pub const RING_ENTRIES: u32 = 1024;

/// Whether an io_uring instance of the workers' size can be set up here (kernels, seccomp
/// profiles, containers and memlock limits may refuse it).
pub fn available() -> Result<(), io::Error> {
    io_uring::IoUring::new(RING_ENTRIES).map(|_| ())
}
