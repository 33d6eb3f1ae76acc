//! The epoll driver, for where io_uring cannot be used: non-blocking system calls made
//! by the session itself, and the worker's own epoll ([`crate::rt`]) when one would block.

use super::{BackendAddr, Buf, Detached, DetachedSocket, Driver, MaybeTls, Transport};
use crate::rt::{self, Interest, Registration};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// The driver of workers that run [`crate::rt`] on epoll.
pub struct Epoll;

/// A non-blocking socket registered with the worker's epoll.
pub struct EpollStream {
    /// Dropped before the socket (it deregisters it).
    reg: Registration,
    socket: DetachedSocket,
}

fn fd_of(s: &DetachedSocket) -> RawFd {
    match s {
        DetachedSocket::Tcp(s) => s.as_raw_fd(),
        DetachedSocket::Unix(s) => s.as_raw_fd(),
    }
}

impl EpollStream {
    fn new(socket: DetachedSocket) -> io::Result<EpollStream> {
        match &socket {
            DetachedSocket::Tcp(s) => s.set_nonblocking(true)?,
            DetachedSocket::Unix(s) => s.set_nonblocking(true)?,
        }
        let reg = rt::register(fd_of(&socket))?;
        Ok(EpollStream { reg, socket })
    }

    /// Runs `call` until it does not block, waiting for `interest` in between.
    async fn retry<T>(
        &self,
        interest: Interest,
        mut call: impl FnMut() -> io::Result<T>,
    ) -> io::Result<T> {
        loop {
            self.reg.ready(interest).await;
            match call() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.reg.would_block(interest),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }
}

/// One non-blocking `recv` into `spare`.
fn recv(fd: RawFd, spare: &mut [std::mem::MaybeUninit<u8>]) -> io::Result<usize> {
    // SAFETY: `spare` is writable memory of its length; the result is checked.
    let n = unsafe {
        libc::recv(
            fd,
            spare.as_mut_ptr().cast(),
            spare.len(),
            libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

impl Transport for EpollStream {
    async fn read(&mut self, buf: &mut Buf) -> io::Result<usize> {
        if buf.data.capacity() == buf.data.len() {
            buf.reserve(4096);
        }
        let fd = fd_of(&self.socket);
        let data = &mut buf.data;
        let reg = &self.reg;
        loop {
            reg.ready(Interest::Read).await;
            match recv(fd, data.spare_capacity_mut()) {
                Ok(n) => {
                    let len = (data.len() + n).min(data.capacity());
                    // SAFETY: the kernel initialised `n` bytes after the old length.
                    unsafe { data.set_len(len) };
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => reg.would_block(Interest::Read),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    async fn write(&mut self, buf: &mut Buf, n: usize) -> io::Result<()> {
        let fd = fd_of(&self.socket);
        let mut left = n;
        while left > 0 {
            let sent = self
                .retry(Interest::Write, || {
                    let part = buf.filled().get(..left).unwrap_or_default();
                    match super::send_now(fd, part)? {
                        0 => Err(io::ErrorKind::WouldBlock.into()),
                        k => Ok(k),
                    }
                })
                .await?;
            buf.consume(sent);
            left -= sent;
        }
        Ok(())
    }

    async fn readable(&self) -> io::Result<()> {
        let fd = fd_of(&self.socket);
        loop {
            self.reg.ready(Interest::Read).await;
            // The readiness flag stays up until a call would block: a peek says whether
            // it still holds.
            let mut b = [std::mem::MaybeUninit::<u8>::uninit(); 1];
            // SAFETY: `b` is one writable byte; the result is checked.
            let n = unsafe {
                libc::recv(
                    fd,
                    b.as_mut_ptr().cast(),
                    1,
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => self.reg.would_block(Interest::Read),
                io::ErrorKind::Interrupted => {}
                _ => return Err(e),
            }
        }
    }

    fn raw_fd(&self) -> RawFd {
        fd_of(&self.socket)
    }
}

/// A listening socket of an epoll worker.
pub struct EpollListener {
    reg: Registration,
    socket: std::net::TcpListener,
}

impl Driver for Epoll {
    type Stream = MaybeTls<EpollStream>;
    type Listener = EpollListener;
    const NAME: &'static str = "epoll";

    fn listener(l: std::net::TcpListener) -> io::Result<Self::Listener> {
        l.set_nonblocking(true)?;
        let reg = rt::register(l.as_raw_fd())?;
        Ok(EpollListener { reg, socket: l })
    }

    async fn accept(l: &Self::Listener) -> io::Result<(Self::Stream, SocketAddr)> {
        loop {
            l.reg.ready(Interest::Read).await;
            match l.socket.accept() {
                Ok((s, peer)) => {
                    // TCP_NODELAY comes from the listener.
                    let stream = EpollStream::new(DetachedSocket::Tcp(s))?;
                    return Ok((MaybeTls::plain(stream), peer));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    l.reg.would_block(Interest::Read)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn detach(s: Self::Stream) -> io::Result<Detached> {
        let (raw, tls) = s.into_parts();
        let EpollStream { reg, socket } = raw;
        drop(reg);
        Ok(Detached { socket, tls })
    }

    fn attach(s: Detached) -> io::Result<Self::Stream> {
        Ok(MaybeTls::from_parts(EpollStream::new(s.socket)?, s.tls))
    }

    async fn connect(addr: &BackendAddr) -> io::Result<Self::Stream> {
        let (sock, to) = match addr {
            BackendAddr::Tcp(a) => (
                socket2::Socket::new(
                    socket2::Domain::for_address(*a),
                    socket2::Type::STREAM.nonblocking().cloexec(),
                    Some(socket2::Protocol::TCP),
                )?,
                socket2::SockAddr::from(*a),
            ),
            BackendAddr::Unix(p) => (
                socket2::Socket::new(
                    socket2::Domain::UNIX,
                    socket2::Type::STREAM.nonblocking().cloexec(),
                    None,
                )?,
                socket2::SockAddr::unix(p)?,
            ),
        };
        let pending = match sock.connect(&to) {
            Ok(()) => false,
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
            Err(e) => return Err(e),
        };
        let socket = match addr {
            BackendAddr::Tcp(_) => DetachedSocket::Tcp(std::net::TcpStream::from(sock)),
            BackendAddr::Unix(_) => {
                DetachedSocket::Unix(std::os::unix::net::UnixStream::from(OwnedFd::from(sock)))
            }
        };
        let stream = EpollStream::new(socket)?;
        if pending {
            stream.reg.ready(Interest::Write).await;
            if let Some(e) = super::with_sock(fd_of(&stream.socket), |s| s.take_error())? {
                return Err(e);
            }
        }
        if let DetachedSocket::Tcp(s) = &stream.socket {
            super::tune_backend_socket(s.as_raw_fd())?;
        }
        Ok(MaybeTls::plain(stream))
    }
}
