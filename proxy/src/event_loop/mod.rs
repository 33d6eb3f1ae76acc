//! One event loop per worker thread, with no async runtime: sockets in, events out. It
//! knows connection slots, buffers and time, nothing about MySQL.
//!
//! Two loops of the same shape:
//! - [`uring::UringLoop`]: io_uring (`SINGLE_ISSUER | DEFER_TASKRUN`, one `submit_and_wait`
//!   per turn with its timeout in the same call, multishot accept, multishot receive into a
//!   provided buffer ring, plain copying sends);
//! - [`epoll::EpollLoop`]: edge-triggered epoll with the same events, where io_uring cannot
//!   be used (old kernels, seccomp profiles that block it).
//!
//! The worker hands operations to [`Ctl`] (receive, send, connect, close) and gets
//! [`Event`]s back from [`EventLoop::turn`]. Received bytes are lent for the duration of the
//! event only (the buffer goes back to the kernel right after): a connection holds no
//! receive buffer of its own while it is idle. A send takes an owned buffer and gives it
//! back in [`Event::Sent`] once every byte is sent, so that its allocation is reused.

pub mod epoll;
pub mod uring;

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// A connection slot of one loop: its index and the generation it was handed out in (a
/// completion for a slot reused since is recognised and dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token {
    index: u32,
    generation: u32,
}

impl Token {
    /// The slot index (dense, small: fit for a `Vec` index).
    pub fn index(self) -> usize {
        self.index as usize
    }
}

/// What happened.
#[derive(Debug)]
pub enum Event<'a> {
    /// A listener (by its position in the list the loop was built with) accepted a
    /// connection: adopt it with [`Ctl::adopt`] or drop it.
    Accepted {
        listener: usize,
        socket: OwnedFd,
        peer: Option<SocketAddr>,
    },
    /// Bytes arrived on a connection whose receiving is on. They are lent until the
    /// handler returns.
    Data { token: Token, bytes: &'a [u8] },
    /// The peer closed its sending side (or the connection failed: `error`). Receiving is
    /// off from here on.
    Closed {
        token: Token,
        error: Option<io::Error>,
    },
    /// A send finished: every byte went out, or it failed. The buffer comes back.
    Sent {
        token: Token,
        buf: Vec<u8>,
        result: io::Result<()>,
    },
    /// A connect finished.
    Connected {
        token: Token,
        result: io::Result<()>,
    },
    /// Another thread called [`Waker::wake`].
    Woken,
}

/// An operation the handler asks for; applied when the handler returns.
#[derive(Debug)]
enum Op {
    Recv(Token),
    StopRecv(Token),
    Send(Token, Vec<u8>, usize),
    Connect(Token, SocketAddr),
    Close(Token),
}

/// Connection slots: which are in use, and their generations.
#[derive(Debug, Default)]
struct Slots {
    /// Per slot: its generation, and the socket while in use.
    entries: Vec<(u32, Option<OwnedFd>)>,
    free: Vec<u32>,
}

impl Slots {
    fn insert(&mut self, fd: OwnedFd) -> Token {
        match self.free.pop() {
            Some(index) => {
                let e = &mut self.entries[index as usize];
                e.0 = e.0.wrapping_add(1);
                e.1 = Some(fd);
                Token {
                    index,
                    generation: e.0,
                }
            }
            None => {
                let index = u32::try_from(self.entries.len()).unwrap_or(u32::MAX);
                self.entries.push((0, Some(fd)));
                Token {
                    index,
                    generation: 0,
                }
            }
        }
    }

    /// The socket of a live token.
    fn fd(&self, t: Token) -> Option<RawFd> {
        match self.entries.get(t.index()) {
            Some((g, Some(fd))) if *g == t.generation => Some(fd.as_raw_fd()),
            _ => None,
        }
    }

    fn live(&self, t: Token) -> bool {
        self.fd(t).is_some()
    }

    /// Takes the socket out; the slot is free once `release` is called.
    fn take(&mut self, t: Token) -> Option<OwnedFd> {
        match self.entries.get_mut(t.index()) {
            Some((g, fd)) if *g == t.generation => fd.take(),
            _ => None,
        }
    }

    /// The slot can be handed out again (nothing in flight refers to it).
    fn release(&mut self, index: u32) {
        self.free.push(index);
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// The handler's side of a loop: operations to apply once it returns, and the slots.
#[derive(Debug, Default)]
pub struct Ctl {
    ops: Vec<Op>,
    slots: Slots,
}

impl Ctl {
    /// Serves a connected socket (accepted, or moved in from another worker): its token.
    /// Nothing is received until [`Ctl::recv`].
    pub fn adopt(&mut self, socket: OwnedFd) -> Token {
        self.slots.insert(socket)
    }

    /// Opens a TCP connection to `addr`; [`Event::Connected`] says how it went. The socket
    /// is made here (non-blocking, close-on-exec), so a token comes back at once.
    pub fn connect(&mut self, addr: SocketAddr) -> io::Result<Token> {
        let domain = socket2::Domain::for_address(addr);
        let s = socket2::Socket::new(
            domain,
            socket2::Type::STREAM.nonblocking().cloexec(),
            Some(socket2::Protocol::TCP),
        )?;
        let t = self.slots.insert(s.into());
        self.ops.push(Op::Connect(t, addr));
        Ok(t)
    }

    /// Starts receiving: [`Event::Data`] as bytes arrive, until [`Ctl::stop_recv`] or
    /// [`Event::Closed`].
    pub fn recv(&mut self, t: Token) {
        self.ops.push(Op::Recv(t));
    }

    /// Stops receiving (bytes wait in the kernel): backpressure. Data already on its way
    /// may still be delivered.
    pub fn stop_recv(&mut self, t: Token) {
        self.ops.push(Op::StopRecv(t));
    }

    /// Sends `buf[start..]`; [`Event::Sent`] gives the buffer back. One send at a time per
    /// connection.
    pub fn send(&mut self, t: Token, buf: Vec<u8>, start: usize) {
        self.ops.push(Op::Send(t, buf, start));
    }

    /// Closes a connection: no event for it follows (a send in flight is abandoned).
    pub fn close(&mut self, t: Token) {
        self.ops.push(Op::Close(t));
    }

    /// The raw descriptor of a live connection (socket options, peer checks).
    pub fn fd(&self, t: Token) -> Option<RawFd> {
        self.slots.fd(t)
    }

    /// Takes a connection out of the loop (to move it to another worker): its socket.
    /// Only for a connection with nothing in flight (not receiving, no send pending).
    pub fn detach(&mut self, t: Token) -> Option<OwnedFd> {
        let fd = self.slots.take(t)?;
        self.slots.release(t.index);
        Some(fd)
    }

    /// Slots handed out so far (the size of per-connection tables).
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }
}

/// Wakes a loop from another thread (an eventfd the loop watches).
#[derive(Debug, Clone)]
pub struct Waker(std::sync::Arc<OwnedFd>);

impl Waker {
    fn new() -> io::Result<(Waker, RawFd)> {
        // SAFETY: eventfd with valid flags; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor owned by nothing else.
        let owned = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok((Waker(std::sync::Arc::new(owned)), fd))
    }

    /// Wakes the loop: its next turn delivers [`Event::Woken`].
    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to the eventfd this waker owns; a full
        // counter (EAGAIN) means a wake-up is pending already.
        unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Drains the counter (the loop, after a wake-up).
    fn drain(fd: RawFd) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64 from a non-blocking eventfd.
        unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
    }
}

/// A worker's event loop.
pub trait EventLoop {
    /// Its name in logs and configuration (`uring`, `epoll`).
    const NAME: &'static str;

    /// The handler's side: operations and slots.
    fn ctl(&mut self) -> &mut Ctl;

    /// Wakes this loop from another thread.
    fn waker(&self) -> Waker;

    /// One turn: applies the operations asked for, waits for at least one event (or
    /// `timeout`), and hands each event to `handle`.
    fn turn(
        &mut self,
        timeout: Option<Duration>,
        handle: &mut impl FnMut(&mut Ctl, Event<'_>),
    ) -> io::Result<()>;
}

/// How long accepting pauses after it failed (out of descriptors or memory): retrying at
/// once would spin, and the connections wait in the listen queue meanwhile.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Accepting paused after a failure: when to try again, and whether the failure was
/// already logged (one warning per episode, not one per retry).
#[derive(Debug, Default)]
struct AcceptPause {
    until: Option<std::time::Instant>,
    failing: bool,
}

impl AcceptPause {
    /// An accept failed at `now`: pause for [`ACCEPT_BACKOFF`].
    fn failed(&mut self, e: &io::Error, now: Instant) {
        if !std::mem::replace(&mut self.failing, true) {
            tracing::warn!("accept failed, pausing it {ACCEPT_BACKOFF:?} at a time: {e}");
        } else {
            tracing::debug!("accept failed again: {e}");
        }
        self.until = Some(now + ACCEPT_BACKOFF);
    }

    /// A connection was accepted: an episode of failures, if any, is over.
    fn accepted(&mut self) {
        if std::mem::take(&mut self.failing) {
            tracing::info!("accepting connections again");
        }
    }

    /// Whether accepting is paused at `now` (a pause that ran out is cleared).
    fn paused(&mut self, now: Instant) -> bool {
        match self.until {
            Some(t) if now < t => true,
            Some(_) => {
                self.until = None;
                false
            }
            None => false,
        }
    }

    /// Whether a pause ran out by `now` since the last call (the listeners are to be
    /// watched again).
    fn ran_out(&mut self, now: Instant) -> bool {
        self.until.is_some() && !self.paused(now)
    }

    /// The turn's timeout at `now`, shortened to reach the end of the pause when that
    /// comes first.
    fn limit(&self, timeout: Option<Duration>, now: Instant) -> Option<Duration> {
        let Some(at) = self.until else {
            return timeout;
        };
        let left = at.saturating_duration_since(now);
        Some(timeout.map_or(left, |t| t.min(left)))
    }
}

/// A connection accepted on listener `listener`: the episode of failures, if any, is over,
/// the socket gets TCP_NODELAY, and the handler hears of it with its peer's address.
fn deliver_accepted(
    ctl: &mut Ctl,
    pause: &mut AcceptPause,
    listener: usize,
    socket: OwnedFd,
    handle: &mut impl FnMut(&mut Ctl, Event<'_>),
) {
    pause.accepted();
    let fd = socket.as_raw_fd();
    nodelay(fd);
    let peer = peer_of(fd);
    handle(
        ctl,
        Event::Accepted {
            listener,
            socket,
            peer,
        },
    );
}

/// The peer address of a connected socket (None for Unix sockets and on error).
fn peer_of(fd: RawFd) -> Option<SocketAddr> {
    // SAFETY: `fd` is a live socket the caller owns for the duration of this call.
    let b = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    socket2::SockRef::from(&b).peer_addr().ok()?.as_socket()
}

/// `TCP_NODELAY` on an accepted or connected TCP socket (a Unix socket refuses it: fine).
fn nodelay(fd: RawFd) {
    // SAFETY: `fd` is a live socket the caller owns for the duration of this call.
    let b = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let _ = socket2::SockRef::from(&b).set_nodelay(true);
}

#[cfg(test)]
mod tests;
