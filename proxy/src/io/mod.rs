//! The only code that touches sockets. Both drivers move owned buffers (the io_uring
//! shape), so the session loop is written once, generic over [`Driver`].

pub mod epoll;
pub mod ring;
pub mod tls_stream;
pub mod tokio_net;
pub mod unix_listen;

pub use tls_stream::MaybeTls;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::Arc;

use crate::mysql::Header;
pub use crate::target::BackendAddr;

/// A byte buffer with a read cursor: `data[start..]` is unread; spare capacity after
/// `data.len()` is where the next read lands.
#[derive(Debug, Default)]
pub struct Buf {
    data: Vec<u8>,
    start: usize,
}

impl Buf {
    pub fn with_capacity(n: usize) -> Self {
        Buf {
            data: Vec::with_capacity(n),
            start: 0,
        }
    }

    /// A buffer holding `data`, all unread.
    pub fn from_vec(data: Vec<u8>) -> Self {
        Buf { data, start: 0 }
    }

    /// The underlying vector (unread bytes from `start` on), to reuse its allocation.
    pub fn into_vec(self) -> Vec<u8> {
        self.data
    }

    /// Unread bytes.
    pub fn filled(&self) -> &[u8] {
        &self.data[self.start..]
    }

    /// Unread bytes, for patching in place.
    pub fn filled_mut(&mut self) -> &mut [u8] {
        &mut self.data[self.start..]
    }

    pub fn len(&self) -> usize {
        self.data.len() - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Marks `n` unread bytes as used.
    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.data.len());
        if self.start == self.data.len() {
            self.data.clear();
            self.start = 0;
        }
    }

    /// Makes room for at least `n` more bytes after the unread ones.
    pub fn reserve(&mut self, n: usize) {
        if self.data.capacity() - self.data.len() >= n {
            return;
        }
        if self.start > 0 {
            self.data.drain(..self.start);
            self.start = 0;
        }
        self.data.reserve(n);
    }

    /// Gives large buffers back to the allocator once they are empty.
    pub fn shrink(&mut self, keep: usize) {
        if self.is_empty() && self.data.capacity() > keep {
            self.data = Vec::with_capacity(keep);
            self.start = 0;
        }
    }

    /// Puts `b` back in front of the unread bytes (a command to serve again).
    pub fn unread(&mut self, b: &[u8]) {
        if self.start >= b.len() && self.data.get(self.start - b.len()..self.start) == Some(b) {
            self.start -= b.len();
            return;
        }
        let rest = self.data.split_off(self.start);
        self.data.clear();
        self.start = 0;
        self.data.extend_from_slice(b);
        self.data.extend_from_slice(&rest);
    }

    /// Lets `fill` write up to `max` bytes into the spare capacity (made if there is none)
    /// and keeps what it says it wrote.
    pub fn read_with(
        &mut self,
        max: usize,
        fill: impl FnOnce(&mut [u8]) -> io::Result<usize>,
    ) -> io::Result<usize> {
        if self.data.capacity() == self.data.len() {
            self.reserve(4096);
        }
        let len = self.data.len();
        let room = (self.data.capacity() - len).min(max);
        self.data.resize(len + room, 0);
        let r = fill(&mut self.data[len..]);
        let n = match &r {
            Ok(n) => (*n).min(room),
            Err(_) => 0,
        };
        self.data.truncate(len + n);
        r.map(|_| n)
    }

    /// Appends bytes (used for packets dbproxy writes itself).
    pub fn extend(&mut self, b: &[u8]) {
        self.reserve(b.len());
        self.data.extend_from_slice(b);
    }

    fn take_vec(&mut self) -> (Vec<u8>, usize) {
        (
            std::mem::take(&mut self.data),
            std::mem::take(&mut self.start),
        )
    }

    fn put_vec(&mut self, data: Vec<u8>, start: usize) {
        self.data = data;
        self.start = start;
    }
}

/// A socket taken off one worker's reactor, to be adopted by another.
#[derive(Debug)]
pub enum DetachedSocket {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

/// A stream taken off one worker's reactor: its socket and its TLS session, if any.
pub struct Detached {
    pub socket: DetachedSocket,
    pub tls: Option<Box<tls_stream::Tls>>,
}

/// A driver's connected socket (TCP, or a Unix socket to a local backend).
pub trait Transport: Sized + 'static {
    /// Reads once into `buf`'s spare capacity (reserve first); `Ok(0)` is end of stream.
    /// If the future is dropped before completion the buffer's content is lost, so the
    /// caller must close the stream then.
    fn read(&mut self, buf: &mut Buf) -> impl Future<Output = io::Result<usize>>;

    /// Writes the first `n` unread bytes of `buf` and consumes them.
    fn write(&mut self, buf: &mut Buf, n: usize) -> impl Future<Output = io::Result<()>>;

    /// Waits until a read would not block (bytes, the end of the stream, or an error).
    /// Moves no bytes, so it may be dropped unfinished: a relay that serves both
    /// directions waits on both sockets this way and reads only the one that is ready.
    fn readable(&self) -> impl Future<Output = io::Result<()>>;

    fn raw_fd(&self) -> RawFd;
}

/// A connected stream as the session sees it: plain, or TLS once upgraded.
pub trait Stream: Sized + 'static {
    /// Reads once into `buf`'s spare capacity; `Ok(0)` is end of stream. If the future is
    /// dropped before completion the stream must be closed.
    fn read(&mut self, buf: &mut Buf) -> impl Future<Output = io::Result<usize>>;

    /// Writes the first `n` unread bytes of `buf` and consumes them.
    fn write(&mut self, buf: &mut Buf, n: usize) -> impl Future<Output = io::Result<()>>;

    /// Waits until a read would return something (see [`Transport::readable`]); may be
    /// dropped unfinished.
    fn readable(&self) -> impl Future<Output = io::Result<()>>;

    fn raw_fd(&self) -> RawFd;

    fn is_tls(&self) -> bool;

    /// Whether an idle connection is still usable: nothing unasked received, not closed.
    fn idle_healthy(&self) -> bool;

    /// Upgrades to TLS as the server; `early` holds bytes already received after the
    /// SSLRequest.
    fn accept_tls(
        &mut self,
        config: Arc<rustls::ServerConfig>,
        early: &[u8],
        deadline: std::time::Instant,
    ) -> impl Future<Output = Result<tls_stream::Agreed, tls_stream::HandshakeError>>;

    /// Upgrades to TLS as the client.
    fn connect_tls(
        &mut self,
        config: Arc<rustls::ClientConfig>,
        name: rustls::pki_types::ServerName<'static>,
        deadline: std::time::Instant,
    ) -> impl Future<Output = Result<tls_stream::Agreed, tls_stream::HandshakeError>>;
}

impl<T: Transport> Stream for MaybeTls<T> {
    fn read<'s, 'b>(
        &'s mut self,
        buf: &'b mut Buf,
    ) -> impl Future<Output = io::Result<usize>> + use<'s, 'b, T> {
        MaybeTls::read(self, buf)
    }
    fn write<'s, 'b>(
        &'s mut self,
        buf: &'b mut Buf,
        n: usize,
    ) -> impl Future<Output = io::Result<()>> + use<'s, 'b, T> {
        MaybeTls::write(self, buf, n)
    }
    async fn readable(&self) -> io::Result<()> {
        MaybeTls::readable(self).await
    }
    fn raw_fd(&self) -> RawFd {
        MaybeTls::raw_fd(self)
    }
    fn is_tls(&self) -> bool {
        MaybeTls::is_tls(self)
    }
    fn idle_healthy(&self) -> bool {
        MaybeTls::idle_healthy(self)
    }
    async fn accept_tls(
        &mut self,
        config: Arc<rustls::ServerConfig>,
        early: &[u8],
        deadline: std::time::Instant,
    ) -> Result<tls_stream::Agreed, tls_stream::HandshakeError> {
        MaybeTls::accept_tls(self, config, early, deadline).await
    }
    async fn connect_tls(
        &mut self,
        config: Arc<rustls::ClientConfig>,
        name: rustls::pki_types::ServerName<'static>,
        deadline: std::time::Instant,
    ) -> Result<tls_stream::Agreed, tls_stream::HandshakeError> {
        MaybeTls::connect_tls(self, config, name, deadline).await
    }
}

/// An I/O driver: how to accept, connect and spawn on the current worker thread.
pub trait Driver: 'static {
    type Stream: Stream;
    type Listener: 'static;

    /// The name used in logs and config (`uring`, `epoll`).
    const NAME: &'static str;

    /// Wraps a bound, listening, non-blocking std listener.
    fn listener(l: std::net::TcpListener) -> io::Result<Self::Listener>;

    fn accept(l: &Self::Listener) -> impl Future<Output = io::Result<(Self::Stream, SocketAddr)>>;

    fn connect(addr: &BackendAddr) -> impl Future<Output = io::Result<Self::Stream>>;

    /// Takes a stream off this thread's reactor so that another worker can adopt it.
    fn detach(s: Self::Stream) -> io::Result<Detached>;

    /// Adopts a stream detached by another worker.
    fn attach(s: Detached) -> io::Result<Self::Stream>;
}

/// Whether a connection that sits idle is still usable: the peer has not closed it and
/// sent nothing unasked. One non-blocking `recv(MSG_PEEK)`.
pub fn idle_socket_is_healthy(fd: RawFd) -> bool {
    let mut b = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    match with_sock(fd, |s| {
        s.recv_with_flags(&mut b, libc::MSG_PEEK | libc::MSG_DONTWAIT)
    }) {
        Err(e) => e.kind() == io::ErrorKind::WouldBlock,
        // Bytes nobody asked for, or the end of the stream.
        Ok(_) => false,
    }
}

/// Runs `f` on a socket the caller owns (`socket2` does the system calls); a stream
/// without a descriptor of its own (-1: in-memory test pipes) gets EBADF, as the system
/// call would give.
fn with_sock<T>(fd: RawFd, f: impl FnOnce(socket2::SockRef<'_>) -> io::Result<T>) -> io::Result<T> {
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: every caller passes the descriptor of a socket it owns and keeps open until
    // this returns; it is not -1.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    f(socket2::SockRef::from(&fd))
}

/// Whether the peer of a connected socket has hung up (closed or shut down its sending
/// side), whatever it sent before that: `poll` with POLLRDHUP, no waiting (`socket2` has
/// no poll; a peek cannot tell a hang-up behind data the client sent first).
pub fn peer_hung_up(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: p is one valid pollfd; a zero timeout does not block.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// How often a read from the database that is taking long checks on the client.
pub const PEER_CHECK: std::time::Duration = std::time::Duration::from_millis(250);

/// Why a read from the database was given up.
#[derive(Debug, thiserror::Error)]
pub enum GaveUp {
    /// The client hung up while dbproxy waited on the database for it.
    #[error("the client hung up while its statement ran")]
    PeerGone,
    /// The database was marked down while the statement ran.
    #[error("the database was marked down while the statement ran")]
    TargetDown,
    /// The database did not answer in time (the text says which limit).
    #[error("{0}")]
    Overdue(String),
}

/// Awaits `read` (from the database, on behalf of the client on `peer`) and, every
/// [`PEER_CHECK`] it waits, checks that the client is still there and asks `watch`
/// whether to give up (the database marked down, a deadline passed; `watch` may also act,
/// e.g. kill the statement, and let the read go on). When it gives up, the read is
/// dropped unfinished: the stream it came from must be closed.
pub async fn read_watching_peer<F: Future<Output = io::Result<usize>>>(
    read: F,
    peer: RawFd,
    mut watch: impl FnMut() -> Option<GaveUp>,
) -> Result<io::Result<usize>, GaveUp> {
    tokio::pin!(read);
    loop {
        // The read first: one that is ready never arms a timer.
        tokio::select! {
            biased;
            r = &mut read => return Ok(r),
            _ = crate::rt::time::sleep(PEER_CHECK) => {
                if peer_hung_up(peer) {
                    return Err(GaveUp::PeerGone);
                }
                if let Some(why) = watch() {
                    return Err(why);
                }
            }
        }
    }
}

/// Reads until `buf` starts with a complete physical packet and returns its header; the
/// packet stays in `buf`. `limit` bounds the payload length accepted.
pub async fn read_packet<S: Stream>(s: &mut S, buf: &mut Buf, limit: usize) -> io::Result<Header> {
    read_packet_by(s, buf, limit, None).await
}

/// [`read_packet`] that gives up at `deadline` with `ErrorKind::TimedOut`; the stream is
/// shut down then and must be dropped.
pub async fn read_packet_by<S: Stream>(
    s: &mut S,
    buf: &mut Buf,
    limit: usize,
    deadline: Option<std::time::Instant>,
) -> io::Result<Header> {
    read_packet_until(s, buf, limit, deadline, std::future::pending()).await
}

/// [`read_packet_by`] that also gives up, with `ErrorKind::Interrupted`, once `stop`
/// resolves (the session was killed); the stream is shut down then and must be dropped.
/// (Not an `async fn` of its own, nor is [`read_command`]: a wrapper's future would keep
/// a second copy of its arguments, `stop` included, in every idle client's session.)
pub fn read_packet_until<'a, S: Stream>(
    s: &'a mut S,
    buf: &'a mut Buf,
    limit: usize,
    deadline: Option<std::time::Instant>,
    stop: impl Future<Output = ()> + 'a,
) -> impl Future<Output = io::Result<Header>> + 'a {
    read_packet_within(s, buf, limit, deadline, stop)
}

/// Reads one packet by `deadline`.
async fn read_packet_within<S: Stream>(
    s: &mut S,
    buf: &mut Buf,
    limit: usize,
    deadline: Option<std::time::Instant>,
    stop: impl Future<Output = ()>,
) -> io::Result<Header> {
    tokio::pin!(stop);
    loop {
        if let Some(h) = Header::parse(buf.filled()) {
            if h.len > limit {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    PacketTooLarge(h.len),
                ));
            }
            if buf.len() >= h.total() {
                return Ok(h);
            }
            buf.reserve(h.total() - buf.len());
        } else {
            buf.reserve(4096);
        }
        if read_by(s, buf, deadline, stop.as_mut()).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// Writes `n` bytes of `buf` unless the peer takes nothing until `deadline` (a client that
/// stopped reading a result): the socket is shut down then, which ends the write in
/// flight, and the error is `TimedOut`; the stream must be dropped.
pub async fn write_by<S: Stream>(
    s: &mut S,
    buf: &mut Buf,
    n: usize,
    deadline: std::time::Instant,
) -> io::Result<()> {
    let fd = s.raw_fd();
    let write = s.write(buf, n);
    tokio::pin!(write);
    tokio::select! {
        biased;
        r = &mut write => return r,
        _ = crate::rt::time::sleep_until(deadline) => {}
    }
    // The stream borrowed above owns fd until this returns. A socket that is gone already
    // needs no shutting down.
    let _ = with_sock(fd, |s| s.shutdown(std::net::Shutdown::Both));
    let _ = write.await;
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        "the client took nothing within net_write_timeout",
    ))
}

/// One read that gives up at `deadline`. A read in flight is not simply dropped (an
/// io_uring read would keep the descriptor open until the peer sends something): the
/// socket's receive side is shut down, which completes the read; the stream can still
/// send (a last error packet) and must then be dropped.
pub async fn read_by<S: Stream>(
    s: &mut S,
    buf: &mut Buf,
    deadline: Option<std::time::Instant>,
    stop: std::pin::Pin<&mut impl Future<Output = ()>>,
) -> io::Result<usize> {
    let fd = s.raw_fd();
    let read = s.read(buf);
    tokio::pin!(read);
    let timeout = async {
        match deadline {
            Some(d) => crate::rt::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    let kind = tokio::select! {
        biased;
        r = &mut read => return r,
        _ = timeout => io::ErrorKind::TimedOut,
        _ = stop => io::ErrorKind::Interrupted,
    };
    shutdown(fd);
    let _ = read.await;
    Err(kind.into())
}

thread_local! {
    /// Commands this worker thread is serving right now.
    static ACTIVE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks a command in progress on this worker thread until dropped (see [`alone`]).
pub struct Active(());

impl Active {
    pub fn enter() -> Active {
        ACTIVE.with(|a| a.set(a.get() + 1));
        Active(())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        ACTIVE.with(|a| a.set(a.get().saturating_sub(1)));
    }
}

/// Whether at most one command is in progress on this worker thread: nothing else would
/// share an io_uring submission, so a write is better done at once (measured: one thread
/// of clients gains; many lose when every write is its own syscall).
pub fn alone() -> bool {
    ACTIVE.with(|a| a.get() <= 1)
}

/// Sends what the socket takes right now without waiting (`MSG_DONTWAIT`): the bytes
/// sent, 0 when its send buffer is full.
pub fn send_now(fd: RawFd, data: &[u8]) -> io::Result<usize> {
    if data.is_empty() {
        return Ok(0);
    }
    match with_sock(fd, |s| {
        s.send_with_flags(data, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    }) {
        Ok(n) => Ok(n),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) =>
        {
            Ok(0)
        }
        Err(e) => Err(e),
    }
}

/// Shuts a socket's receive side down (its owner still holds the descriptor).
pub fn shutdown(fd: RawFd) {
    let _ = with_sock(fd, |s| s.shutdown(std::net::Shutdown::Read));
}

/// Writes one logical packet built by dbproxy.
pub async fn write_packet<S: Stream>(s: &mut S, seq: u8, payload: &[u8]) -> io::Result<u8> {
    let mut out = Vec::with_capacity(payload.len() + 4);
    let next = crate::mysql::packet::write_packet(&mut out, seq, payload);
    let mut b = Buf {
        data: out,
        start: 0,
    };
    let n = b.len();
    s.write(&mut b, n).await?;
    Ok(next)
}

/// A peer announced a packet larger than allowed.
#[derive(Debug, thiserror::Error)]
#[error("packet of {0} bytes is larger than allowed")]
pub struct PacketTooLarge(pub usize);

/// Keepalive probes start after this much silence on a database connection...
pub const BACKEND_KEEPALIVE_IDLE: std::time::Duration = std::time::Duration::from_secs(10);
/// ...follow each other this often...
pub const BACKEND_KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);
/// ...and this many unanswered ones close it.
pub const BACKEND_KEEPALIVE_PROBES: u32 = 3;
/// Data sent to the database and not acknowledged for this long closes the connection
/// (`TCP_USER_TIMEOUT`; it also bounds the keepalive probes).
pub const BACKEND_USER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(25);

/// Sets up a TCP connection to a database: no Nagle delay, and a peer that vanishes
/// without a reset (a black-holed address during a failover, a host powered off) is
/// noticed within about 25 s (keepalive, `TCP_USER_TIMEOUT`) instead of after the
/// kernel's 15 minutes of retransmissions. A live server answers keepalive probes while a
/// long statement runs, so that is never cut.
pub fn tune_backend_socket(fd: RawFd) -> io::Result<()> {
    with_sock(fd, |s| {
        s.set_nodelay(true)?;
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(BACKEND_KEEPALIVE_IDLE)
            .with_interval(BACKEND_KEEPALIVE_INTERVAL)
            .with_retries(BACKEND_KEEPALIVE_PROBES);
        s.set_tcp_keepalive(&keepalive)?;
        s.set_tcp_user_timeout(Some(BACKEND_USER_TIMEOUT))
    })
}

/// Builds a listening socket with SO_REUSEPORT so that every worker can bind the address,
/// and with TCP_NODELAY, which Linux hands down to every connection it accepts (one
/// `setsockopt` less per client login).
pub fn reuseport_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nodelay(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The options that make a vanished database noticed in about 25 s; that it is, is
    /// proven against a black-holed database by `backend_faults.rs`
    /// (`a_black_holed_database_is_noticed_by_keepalive`).
    #[test]
    fn database_sockets_get_keepalive_and_a_user_timeout() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        tune_backend_socket(std::os::fd::AsRawFd::as_raw_fd(&s)).unwrap();
        let r = socket2::SockRef::from(&s);
        assert!(r.nodelay().unwrap());
        assert!(r.keepalive().unwrap());
        assert_eq!(r.keepalive_time().unwrap(), BACKEND_KEEPALIVE_IDLE);
        assert_eq!(r.keepalive_interval().unwrap(), BACKEND_KEEPALIVE_INTERVAL);
        assert_eq!(r.keepalive_retries().unwrap(), BACKEND_KEEPALIVE_PROBES);
        assert_eq!(r.tcp_user_timeout().unwrap(), Some(BACKEND_USER_TIMEOUT));
    }

    /// The listener's TCP_NODELAY is what accepted clients get (the drivers do not set it
    /// again).
    #[test]
    fn accepted_clients_inherit_no_delay_from_the_listener() {
        let l = reuseport_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        l.set_nonblocking(false).unwrap();
        let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (a, _) = l.accept().unwrap();
        assert!(socket2::SockRef::from(&a).nodelay().unwrap());
    }

    /// A peer that closes its end: an idle connection to it is no longer healthy and the
    /// hang-up is seen even behind bytes it sent first; a live silent peer is neither.
    #[test]
    fn a_closed_peer_is_noticed() {
        use std::io::Write;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut peer, _) = l.accept().unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&ours);
        assert!(idle_socket_is_healthy(fd), "a silent live peer");
        assert!(!peer_hung_up(fd));
        peer.write_all(b"x").unwrap();
        assert!(
            wait(|| !idle_socket_is_healthy(fd)),
            "bytes nobody asked for"
        );
        assert!(!peer_hung_up(fd), "data alone is no hang-up");
        drop(peer);
        assert!(wait(|| peer_hung_up(fd)), "closed behind its data");
        assert_eq!(send_now(fd, b"").unwrap(), 0);
        shutdown(fd);
    }

    /// Polls `f` for up to 2 s (a loopback FIN or segment arrives within microseconds).
    fn wait(mut f: impl FnMut() -> bool) -> bool {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while std::time::Instant::now() < until {
            if f() {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        false
    }

    #[test]
    fn buf_cursor() {
        let mut b = Buf::with_capacity(8);
        b.extend(b"hello");
        b.consume(2);
        assert_eq!(b.filled(), b"llo");
        b.reserve(100);
        assert_eq!(b.filled(), b"llo");
        b.consume(10);
        assert!(b.is_empty());
        b.shrink(4);
        assert!(b.data.capacity() <= 4);
    }
}
