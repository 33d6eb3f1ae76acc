//! The epoll loop, for hosts where io_uring cannot be used: one epoll per worker,
//! edge-triggered, each socket registered once for reading and writing. Reads go into one
//! scratch buffer of the worker's (lent to the handler as the io_uring loop lends its
//! provided buffers), sends are tried at once and continued when the socket is writable.

use super::{deliver_accepted, nodelay, AcceptPause, Ctl, Event, EventLoop, Op, Token, Waker};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// Bytes read per `recv` (the scratch buffer's size).
const SCRATCH: usize = 64 * 1024;
/// Events taken per `epoll_wait`.
const EVENTS: usize = 512;

/// The epoll data of listeners and the waker (connections use their slot index).
const LISTENER: u64 = 1 << 62;
const WAKER: u64 = 1 << 61;

#[derive(Debug, Default)]
struct SlotIo {
    generation: u32,
    registered: bool,
    want_recv: bool,
    /// Readable since the last read reached EAGAIN (edge-triggered: remembered).
    readable: bool,
    writable: bool,
    /// The send pending: its buffer and how far it got.
    send: Option<(Vec<u8>, usize)>,
    connecting: bool,
}

/// The epoll loop of one worker.
pub struct EpollLoop {
    epoll: OwnedFd,
    ctl: Ctl,
    io: Vec<SlotIo>,
    listeners: Vec<OwnedFd>,
    waker: Waker,
    waker_fd: RawFd,
    scratch: Vec<u8>,
    events: Vec<libc::epoll_event>,
    /// Slots with something to do without waiting (a read to make, a send to finish).
    ready: Vec<Token>,
    /// Events made while applying operations (a send done at once, a failed connect).
    immediate: Vec<Pending>,
    /// Accepting failed: the listeners (level-triggered) are not watched until this time,
    /// or every turn would fail again at once.
    accept: AcceptPause,
}

/// An event found while applying operations, delivered in the same turn.
enum Pending {
    Sent(Token, Vec<u8>, io::Result<()>),
    Connected(Token, io::Result<()>),
    Closed(Token, Option<io::Error>),
}

fn ctl_add(ep: RawFd, fd: RawFd, events: u32, data: u64) -> io::Result<()> {
    epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, events, data)
}

fn epoll_ctl(ep: RawFd, op: i32, fd: RawFd, events: u32, data: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: data };
    // SAFETY: valid epoll and socket descriptors, and a valid event struct.
    if unsafe { libc::epoll_ctl(ep, op, fd, &mut ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl EpollLoop {
    /// A loop accepting on `listeners` (bound, listening, non-blocking).
    pub fn new(listeners: Vec<std::net::TcpListener>) -> io::Result<EpollLoop> {
        // SAFETY: epoll_create1 with a valid flag; the result is checked.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor owned by nothing else.
        let epoll = unsafe { OwnedFd::from_raw_fd(ep) };
        let listeners: Vec<OwnedFd> = listeners.into_iter().map(OwnedFd::from).collect();
        for (i, l) in listeners.iter().enumerate() {
            ctl_add(ep, l.as_raw_fd(), libc::EPOLLIN as u32, LISTENER | i as u64)?;
        }
        let (waker, waker_fd) = Waker::new()?;
        ctl_add(ep, waker_fd, libc::EPOLLIN as u32, WAKER)?;
        Ok(EpollLoop {
            epoll,
            ctl: Ctl::default(),
            io: Vec::new(),
            listeners,
            waker,
            waker_fd,
            scratch: vec![0u8; SCRATCH],
            events: Vec::with_capacity(EVENTS),
            ready: Vec::new(),
            immediate: Vec::new(),
            accept: AcceptPause::default(),
        })
    }

    fn slot(&mut self, t: Token) -> &mut SlotIo {
        let i = t.index();
        if self.io.len() <= i {
            self.io.resize_with(i + 1, SlotIo::default);
        }
        let s = &mut self.io[i];
        if s.generation != t.generation || !s.registered {
            *s = SlotIo {
                generation: t.generation,
                ..SlotIo::default()
            };
        }
        s
    }

    /// Registers a slot's socket with epoll at its first use.
    fn ensure_registered(&mut self, t: Token) -> io::Result<()> {
        let Some(fd) = self.ctl.slots.fd(t) else {
            return Ok(());
        };
        let ep = self.epoll.as_raw_fd();
        let s = self.slot(t);
        if s.registered {
            return Ok(());
        }
        let ev = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
        ctl_add(ep, fd, ev, u64::from(t.index))?;
        s.registered = true;
        // Whatever the socket has now shows as the first edge.
        Ok(())
    }

    /// Sends what it can of a slot's pending send; the event once it is all out.
    fn try_send(&mut self, t: Token) {
        let Some(fd) = self.ctl.slots.fd(t) else {
            return;
        };
        let s = self.slot(t);
        let Some((buf, at)) = s.send.as_mut() else {
            return;
        };
        while *at < buf.len() {
            let rest = &buf[*at..];
            // SAFETY: sends from a valid slice on a live socket.
            let n = unsafe {
                libc::send(
                    fd,
                    rest.as_ptr().cast(),
                    rest.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                *at += n as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => {
                    s.writable = false;
                    return;
                }
                io::ErrorKind::Interrupted => continue,
                _ => {
                    if let Some((buf, _)) = s.send.take() {
                        self.immediate.push(Pending::Sent(t, buf, Err(e)));
                    }
                    return;
                }
            }
        }
        if let Some((buf, _)) = s.send.take() {
            self.immediate.push(Pending::Sent(t, buf, Ok(())));
        }
    }

    fn apply(&mut self) {
        let ops = std::mem::take(&mut self.ctl.ops);
        for op in ops {
            match op {
                Op::Recv(t) => {
                    if !self.ctl.slots.live(t) {
                        continue;
                    }
                    if let Err(e) = self.ensure_registered(t) {
                        self.immediate.push(Pending::Closed(t, Some(e)));
                        continue;
                    }
                    let s = self.slot(t);
                    s.want_recv = true;
                    // Bytes that arrived while receiving was off raised no new edge.
                    s.readable = true;
                    self.ready.push(t);
                }
                Op::StopRecv(t) => {
                    if self.ctl.slots.live(t) {
                        self.slot(t).want_recv = false;
                    }
                }
                Op::Send(t, buf, start) => {
                    if !self.ctl.slots.live(t) {
                        continue;
                    }
                    if let Err(e) = self.ensure_registered(t) {
                        self.immediate.push(Pending::Sent(t, buf, Err(e)));
                        continue;
                    }
                    self.slot(t).send = Some((buf, start));
                    self.try_send(t);
                }
                Op::Connect(t, addr) => {
                    let Some(fd) = self.ctl.slots.fd(t) else {
                        continue;
                    };
                    if let Err(e) = self.ensure_registered(t) {
                        self.immediate.push(Pending::Connected(t, Err(e)));
                        continue;
                    }
                    let sa = socket2::SockAddr::from(addr);
                    // SAFETY: connect with a valid address on a live non-blocking socket.
                    let r = unsafe { libc::connect(fd, sa.as_ptr().cast(), sa.len()) };
                    let err = io::Error::last_os_error();
                    if r == 0 {
                        nodelay(fd);
                        self.immediate.push(Pending::Connected(t, Ok(())));
                    } else if err.raw_os_error() == Some(libc::EINPROGRESS) {
                        self.slot(t).connecting = true;
                    } else {
                        self.immediate.push(Pending::Connected(t, Err(err)));
                    }
                }
                Op::Close(t) => {
                    if let Some(fd) = self.ctl.slots.take(t) {
                        // Closing the descriptor removes it from the epoll set.
                        drop(fd);
                        let s = self.slot(t);
                        s.registered = false;
                        s.send = None;
                        self.ctl.slots.release(t.index);
                    }
                }
            }
        }
    }

    /// Reads what a readable, receiving slot has, handing each read to the handler.
    fn read_slot(&mut self, t: Token, handle: &mut impl FnMut(&mut Ctl, Event<'_>)) {
        loop {
            let Some(fd) = self.ctl.slots.fd(t) else {
                return;
            };
            let s = self.slot(t);
            if !s.want_recv || !s.readable {
                return;
            }
            // SAFETY: reads into the scratch buffer, valid for its length.
            let n = unsafe {
                libc::recv(
                    fd,
                    self.scratch.as_mut_ptr().cast(),
                    self.scratch.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                let bytes = &self.scratch[..n as usize];
                handle(&mut self.ctl, Event::Data { token: t, bytes });
                // The handler may have applied backpressure or closed it: the loop checks.
                self.apply();
                self.flush_immediate(handle);
                continue;
            }
            let s = self.slot(t);
            if n == 0 {
                s.want_recv = false;
                handle(
                    &mut self.ctl,
                    Event::Closed {
                        token: t,
                        error: None,
                    },
                );
                return;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => {
                    s.readable = false;
                    return;
                }
                io::ErrorKind::Interrupted => continue,
                _ => {
                    s.want_recv = false;
                    handle(
                        &mut self.ctl,
                        Event::Closed {
                            token: t,
                            error: Some(e),
                        },
                    );
                    return;
                }
            }
        }
    }

    fn flush_immediate(&mut self, handle: &mut impl FnMut(&mut Ctl, Event<'_>)) {
        while !self.immediate.is_empty() {
            for p in std::mem::take(&mut self.immediate) {
                let ev = match p {
                    Pending::Sent(token, buf, result) if self.ctl.slots.live(token) => {
                        Event::Sent { token, buf, result }
                    }
                    Pending::Connected(token, result) if self.ctl.slots.live(token) => {
                        Event::Connected { token, result }
                    }
                    Pending::Closed(token, error) if self.ctl.slots.live(token) => {
                        Event::Closed { token, error }
                    }
                    _ => continue,
                };
                handle(&mut self.ctl, ev);
            }
            self.apply();
        }
    }

    /// Turns the listeners' readiness on or off (off while accepting is paused).
    fn watch_listeners(&self, on: bool) {
        let events = if on { libc::EPOLLIN as u32 } else { 0 };
        for (i, l) in self.listeners.iter().enumerate() {
            let (ep, fd) = (self.epoll.as_raw_fd(), l.as_raw_fd());
            if let Err(e) = epoll_ctl(ep, libc::EPOLL_CTL_MOD, fd, events, LISTENER | i as u64) {
                tracing::warn!("cannot change a listener's readiness: {e}");
            }
        }
    }

    fn accept_all(&mut self, i: usize, handle: &mut impl FnMut(&mut Ctl, Event<'_>)) {
        let Some(l) = self.listeners.get(i).map(|l| l.as_raw_fd()) else {
            return;
        };
        loop {
            // SAFETY: accept4 on a live listening socket; no address is asked for.
            let fd = unsafe {
                libc::accept4(
                    l,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                )
            };
            if fd < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => return,
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted => continue,
                    _ => {
                        self.accept.failed(&e, std::time::Instant::now());
                        self.watch_listeners(false);
                        return;
                    }
                }
            }
            // SAFETY: accept4's result is a new descriptor we own.
            let socket = unsafe { OwnedFd::from_raw_fd(fd) };
            deliver_accepted(&mut self.ctl, &mut self.accept, i, socket, handle);
        }
    }
}

impl EventLoop for EpollLoop {
    const NAME: &'static str = "epoll";

    fn ctl(&mut self) -> &mut Ctl {
        &mut self.ctl
    }

    fn waker(&self) -> Waker {
        self.waker.clone()
    }

    fn turn(
        &mut self,
        timeout: Option<Duration>,
        handle: &mut impl FnMut(&mut Ctl, Event<'_>),
    ) -> io::Result<()> {
        self.apply();
        self.flush_immediate(handle);
        if self.accept.ran_out(std::time::Instant::now()) {
            self.watch_listeners(true);
        }
        let timeout = self.accept.limit(timeout, std::time::Instant::now());
        // Reads owed from before (receiving turned on for a socket that had bytes).
        for t in std::mem::take(&mut self.ready) {
            self.read_slot(t, handle);
        }
        self.flush_immediate(handle);
        let wait_ms = if !self.ready.is_empty() || !self.ctl.ops.is_empty() {
            0
        } else {
            match timeout {
                // Rounded up: a timer is never woken for early.
                Some(d) => i32::try_from(d.as_micros().div_ceil(1000)).unwrap_or(i32::MAX),
                None => -1,
            }
        };
        self.events.clear();
        // SAFETY: the event array has EVENTS entries of capacity.
        let n = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                self.events.as_mut_ptr(),
                EVENTS as i32,
                wait_ms,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(e)
            };
        }
        // SAFETY: epoll_wait initialised the first n entries.
        unsafe { self.events.set_len(n as usize) };
        let events = std::mem::take(&mut self.events);
        for ev in &events {
            let (data, bits) = (ev.u64, ev.events);
            if data & LISTENER != 0 {
                self.accept_all((data & !LISTENER) as usize, handle);
                continue;
            }
            if data & WAKER != 0 {
                Waker::drain(self.waker_fd);
                handle(&mut self.ctl, Event::Woken);
                continue;
            }
            let index = data as u32;
            let Some(s) = self.io.get_mut(index as usize) else {
                continue;
            };
            if !s.registered {
                continue;
            }
            let t = Token {
                index,
                generation: s.generation,
            };
            if bits & (libc::EPOLLOUT | libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0 {
                s.writable = true;
                if std::mem::take(&mut s.connecting) {
                    let result = self
                        .ctl
                        .slots
                        .fd(t)
                        .map(|fd| {
                            // SAFETY: a live socket, for this call only.
                            let b = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
                            match socket2::SockRef::from(&b).take_error() {
                                Ok(None) => {
                                    nodelay(fd);
                                    Ok(())
                                }
                                Ok(Some(e)) | Err(e) => Err(e),
                            }
                        })
                        .unwrap_or_else(|| Err(io::Error::from(io::ErrorKind::NotConnected)));
                    handle(&mut self.ctl, Event::Connected { token: t, result });
                } else if s.send.is_some() {
                    self.try_send(t);
                }
            }
            if bits & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32
                != 0
            {
                if let Some(s) = self.io.get_mut(index as usize) {
                    s.readable = true;
                }
                self.read_slot(t, handle);
            }
            self.apply();
            self.flush_immediate(handle);
        }
        self.events = events;
        Ok(())
    }
}
