//! The io_uring driver: every read, write, accept and connect is an operation on the
//! worker's own ring ([`crate::rt`]), with no tokio in between.

use super::{BackendAddr, Buf, Detached, DetachedSocket, Driver, MaybeTls, Transport};
use crate::rt::{self, Held};
use io_uring::{opcode, types};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The driver of workers that run [`crate::rt`].
pub struct Ring;

/// A socket whose operations go through the worker's ring.
pub enum RingStream {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

fn result(res: i32) -> io::Result<usize> {
    usize::try_from(res).map_err(|_| io::Error::from_raw_os_error(-res))
}

fn no_runtime() -> io::Error {
    io::Error::other("no io_uring runtime on this thread")
}

/// Receives into `data`'s spare capacity.
async fn recv(fd: RawFd, data: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
    let op = rt::start(Held::Buf(data), |h| {
        let (ptr, room) = match h {
            Held::Buf(b) => {
                let room = b.capacity() - b.len();
                // SAFETY: `len` is within the allocation; the kernel writes at most `room`
                // bytes past it, into capacity the vector owns until the completion.
                (unsafe { b.as_mut_ptr().add(b.len()) }, room)
            }
            _ => (std::ptr::null_mut(), 0),
        };
        opcode::Recv::new(types::Fd(fd), ptr, u32::try_from(room).unwrap_or(u32::MAX)).build()
    });
    let op = match op {
        Ok(op) => op,
        Err(Held::Buf(b)) => return (Err(no_runtime()), b),
        Err(_) => return (Err(no_runtime()), Vec::new()),
    };
    let (res, held) = op.await;
    let Held::Buf(mut data) = held else {
        return (
            Err(io::Error::from_raw_os_error(libc::ECANCELED)),
            Vec::new(),
        );
    };
    let res = result(res);
    if let Ok(n) = res {
        let len = (data.len() + n).min(data.capacity());
        // SAFETY: the kernel initialised `n` bytes after the old length, within capacity.
        unsafe { data.set_len(len) };
    }
    (res, data)
}

/// Sends `data[at..end]` once (it may send less).
async fn send(fd: RawFd, data: Vec<u8>, at: usize, end: usize) -> (io::Result<usize>, Vec<u8>) {
    let op = rt::start(Held::Buf(data), |h| {
        let part = match h {
            Held::Buf(b) => b.get(at..end).unwrap_or_default(),
            _ => &[],
        };
        opcode::Send::new(
            types::Fd(fd),
            part.as_ptr(),
            u32::try_from(part.len()).unwrap_or(u32::MAX),
        )
        .flags(libc::MSG_NOSIGNAL)
        .build()
    });
    let op = match op {
        Ok(op) => op,
        Err(Held::Buf(b)) => return (Err(no_runtime()), b),
        Err(_) => return (Err(no_runtime()), Vec::new()),
    };
    let (res, held) = op.await;
    let data = match held {
        Held::Buf(b) => b,
        _ => Vec::new(),
    };
    (result(res), data)
}

impl Transport for RingStream {
    async fn read(&mut self, buf: &mut Buf) -> io::Result<usize> {
        if buf.data.capacity() == buf.data.len() {
            buf.reserve(4096);
        }
        let (data, start) = buf.take_vec();
        let (res, data) = recv(self.raw_fd(), data).await;
        buf.put_vec(data, start);
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
        let fd = self.raw_fd();
        let (mut data, start) = buf.take_vec();
        let end = start + n;
        let mut at = start;
        while at < end {
            let (res, back) = send(fd, data, at, end).await;
            data = back;
            match res {
                Ok(0) => {
                    buf.put_vec(data, start);
                    return Err(io::ErrorKind::WriteZero.into());
                }
                Ok(k) => at += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    buf.put_vec(data, start);
                    return Err(e);
                }
            }
        }
        buf.put_vec(data, start);
        buf.consume(n);
        Ok(())
    }

    async fn readable(&self) -> io::Result<()> {
        let fd = self.raw_fd();
        let op = rt::start(Held::Nothing, |_| {
            opcode::PollAdd::new(types::Fd(fd), (libc::POLLIN | libc::POLLRDHUP) as u32).build()
        })
        .map_err(|_| no_runtime())?;
        let (res, _) = op.await;
        result(res).map(drop)
    }

    fn raw_fd(&self) -> RawFd {
        match self {
            RingStream::Tcp(s) => s.as_raw_fd(),
            RingStream::Unix(s) => s.as_raw_fd(),
        }
    }
}

/// A listening socket of a ring worker.
pub struct RingListener(std::net::TcpListener);

/// The peer address an accept wrote.
fn peer_of(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    // SAFETY: `storage` is a sockaddr_storage of `len` bytes the kernel filled.
    let addr = unsafe { socket2::SockAddr::new(*storage, len) };
    addr.as_socket()
}

async fn connect_to(fd: RawFd, addr: socket2::SockAddr) -> io::Result<()> {
    let op = rt::start(Held::Addr(Box::new(addr)), |h| {
        let (ptr, len) = match h {
            Held::Addr(a) => (a.as_ptr(), a.len()),
            _ => (std::ptr::null(), 0),
        };
        opcode::Connect::new(types::Fd(fd), ptr.cast(), len).build()
    })
    .map_err(|_| no_runtime())?;
    let (res, _) = op.await;
    result(res).map(drop)
}

impl Driver for Ring {
    type Stream = MaybeTls<RingStream>;
    type Listener = RingListener;
    const NAME: &'static str = "uring";

    fn listener(l: std::net::TcpListener) -> io::Result<Self::Listener> {
        Ok(RingListener(l))
    }

    async fn accept(l: &Self::Listener) -> io::Result<(Self::Stream, SocketAddr)> {
        let fd = l.0.as_raw_fd();
        // SAFETY: an all-zero sockaddr_storage is a valid (empty) value.
        let storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let op = rt::start(Held::Peer(Box::new((storage, len))), |h| {
            let (addr, len) = match h {
                Held::Peer(p) => (
                    (&mut p.0 as *mut libc::sockaddr_storage).cast(),
                    &mut p.1 as *mut libc::socklen_t,
                ),
                _ => (std::ptr::null_mut(), std::ptr::null_mut()),
            };
            opcode::Accept::new(types::Fd(fd), addr, len)
                .flags(libc::SOCK_CLOEXEC)
                .build()
        })
        .map_err(|_| no_runtime())?;
        let (res, held) = op.await;
        let raw = result(res)?;
        // SAFETY: a successful accept returns a new descriptor owned by nothing else.
        let owned = unsafe { OwnedFd::from_raw_fd(raw as RawFd) };
        // TCP_NODELAY comes from the listener ([`super::reuseport_listener`]).
        let s = std::net::TcpStream::from(owned);
        let peer = match held {
            Held::Peer(p) => peer_of(&p.0, p.1),
            _ => None,
        };
        let peer = match peer {
            Some(p) => p,
            None => s.peer_addr()?,
        };
        Ok((MaybeTls::plain(RingStream::Tcp(s)), peer))
    }

    fn detach(s: Self::Stream) -> io::Result<Detached> {
        let (raw, tls) = s.into_parts();
        let socket = match raw {
            RingStream::Tcp(s) => DetachedSocket::Tcp(s),
            RingStream::Unix(s) => DetachedSocket::Unix(s),
        };
        Ok(Detached { socket, tls })
    }

    fn attach(s: Detached) -> io::Result<Self::Stream> {
        let raw = match s.socket {
            DetachedSocket::Tcp(s) => RingStream::Tcp(s),
            DetachedSocket::Unix(s) => RingStream::Unix(s),
        };
        Ok(MaybeTls::from_parts(raw, s.tls))
    }

    async fn connect(addr: &BackendAddr) -> io::Result<Self::Stream> {
        let raw = match addr {
            BackendAddr::Tcp(a) => {
                let domain = socket2::Domain::for_address(*a);
                let sock = socket2::Socket::new(
                    domain,
                    socket2::Type::STREAM.cloexec(),
                    Some(socket2::Protocol::TCP),
                )?;
                connect_to(sock.as_raw_fd(), socket2::SockAddr::from(*a)).await?;
                let s = std::net::TcpStream::from(sock);
                super::tune_backend_socket(s.as_raw_fd())?;
                RingStream::Tcp(s)
            }
            BackendAddr::Unix(p) => {
                let sock = socket2::Socket::new(
                    socket2::Domain::UNIX,
                    socket2::Type::STREAM.cloexec(),
                    None,
                )?;
                connect_to(sock.as_raw_fd(), socket2::SockAddr::unix(p)?).await?;
                RingStream::Unix(std::os::unix::net::UnixStream::from(OwnedFd::from(sock)))
            }
        };
        Ok(MaybeTls::plain(raw))
    }
}
