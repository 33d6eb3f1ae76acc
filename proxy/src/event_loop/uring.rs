//! The io_uring loop: one ring per worker thread, created and used by that thread only
//! (`SINGLE_ISSUER | DEFER_TASKRUN`; `COOP_TASKRUN | TASKRUN_FLAG` on kernels without
//! them). Each turn is one `io_uring_enter`: it submits what the handler asked for and
//! waits, with the turn's timeout in the same call (`EXT_ARG`).
//!
//! - Listeners accept with multishot accept.
//! - Connections receive with multishot receive into a ring of provided buffers shared by
//!   every connection of the worker: an idle connection holds no buffer. Each completion's
//!   buffer is lent to the handler and given back to the kernel in the same turn.
//! - Sends are plain copying sends from the handler's own buffer, one in flight per
//!   connection (a short send is continued by the loop).
//! - Another thread wakes the loop through an eventfd watched by a multishot poll.
//!
//! `user_data` packs the operation, the slot's generation and its index.

use super::{deliver_accepted, nodelay, AcceptPause, Ctl, Event, EventLoop, Op, Token, Waker};
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// Submission queue entries per ring (the completion queue is twice that).
pub const RING_ENTRIES: u32 = 1024;
/// Provided receive buffers per worker, and their size.
const BUFFERS: u16 = 1024;
const BUFFER_SIZE: usize = 16 * 1024;
/// The provided buffer group's id.
const GROUP: u16 = 0;

/// What a completion is for (the top byte of `user_data`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Accept = 1,
    Recv = 2,
    Send = 3,
    Connect = 4,
    Cancel = 5,
    Wake = 6,
}

impl Kind {
    fn of(b: u64) -> Option<Kind> {
        Some(match b {
            1 => Kind::Accept,
            2 => Kind::Recv,
            3 => Kind::Send,
            4 => Kind::Connect,
            5 => Kind::Cancel,
            6 => Kind::Wake,
            _ => return None,
        })
    }
}

fn pack(kind: Kind, generation: u32, index: u32) -> u64 {
    (kind as u64) << 56 | u64::from(generation & 0x00ff_ffff) << 32 | u64::from(index)
}

fn unpack(u: u64) -> (Option<Kind>, u32, u32) {
    (
        Kind::of(u >> 56),
        ((u >> 32) & 0x00ff_ffff) as u32,
        u as u32,
    )
}

/// A slot's operations in flight.
#[derive(Debug, Default)]
struct SlotIo {
    generation: u32,
    /// A multishot receive is in flight.
    receiving: bool,
    /// The handler wants to receive.
    want_recv: bool,
    /// The send in flight: its buffer and how far it got.
    send: Option<(Vec<u8>, usize)>,
    /// The address of a connect in flight (the kernel reads it during the operation).
    connecting: Option<Box<socket2::SockAddr>>,
    /// Operations in flight (the slot is reused only once none is).
    inflight: u32,
    /// Closed by the handler: no more events, released once nothing is in flight.
    closed: bool,
}

/// The ring of provided receive buffers.
struct BufRing {
    /// The ring's entries (page-aligned, mapped).
    entries: *mut types::BufRingEntry,
    mapped: usize,
    mask: u16,
    tail: u16,
    /// The buffers themselves, `BUFFER_SIZE` each.
    memory: Vec<u8>,
}

impl BufRing {
    fn new(ring: &IoUring) -> io::Result<BufRing> {
        let mapped = usize::from(BUFFERS) * std::mem::size_of::<types::BufRingEntry>();
        // SAFETY: an anonymous private mapping of `mapped` bytes; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let mut r = BufRing {
            entries: p.cast(),
            mapped,
            mask: BUFFERS - 1,
            tail: 0,
            memory: vec![0u8; usize::from(BUFFERS) * BUFFER_SIZE],
        };
        // SAFETY: the mapping lives as long as `r`, which unregisters it before unmapping
        // (Drop), and holds `BUFFERS` entries.
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(p as u64, BUFFERS, GROUP, 0)?;
        }
        for bid in 0..BUFFERS {
            r.give(bid);
        }
        r.publish();
        Ok(r)
    }

    /// Puts buffer `bid` back in the ring (visible to the kernel at [`Self::publish`]).
    fn give(&mut self, bid: u16) {
        let at = usize::from(self.tail & self.mask);
        let addr = self.memory.as_ptr() as u64 + u64::from(bid) * BUFFER_SIZE as u64;
        // SAFETY: `at` < BUFFERS entries of the mapping; the entry is not the kernel's until
        // the tail moves past it.
        unsafe {
            let e = &mut *self.entries.add(at);
            e.set_addr(addr);
            e.set_len(BUFFER_SIZE as u32);
            e.set_bid(bid);
        }
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes the buffers given back visible to the kernel.
    fn publish(&mut self) {
        // SAFETY: the tail field lives in the ring's first entry; the kernel reads it with
        // acquire semantics, so it is stored with release semantics after the entries.
        unsafe {
            let tail =
                types::BufRingEntry::tail(self.entries) as *const std::sync::atomic::AtomicU16;
            (*tail).store(self.tail, std::sync::atomic::Ordering::Release);
        }
    }

    /// The first `len` bytes of buffer `bid`.
    fn bytes(&self, bid: u16, len: usize) -> &[u8] {
        let start = usize::from(bid) * BUFFER_SIZE;
        self.memory
            .get(start..start + len.min(BUFFER_SIZE))
            .unwrap_or_default()
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `new` (the ring is gone or has unregistered it).
        unsafe { libc::munmap(self.entries.cast(), self.mapped) };
    }
}

/// The io_uring loop of one worker.
pub struct UringLoop {
    ring: IoUring,
    ctl: Ctl,
    io: Vec<SlotIo>,
    listeners: Vec<OwnedFd>,
    /// Listeners whose multishot accept ended (re-armed next turn).
    rearm_accept: Vec<usize>,
    /// Accepting failed: the listeners are re-armed when the pause is over, not before.
    accept: AcceptPause,
    /// Connections whose receive ran out of buffers (re-armed next turn).
    rearm_recv: Vec<Token>,
    bufs: BufRing,
    waker: Waker,
    waker_fd: RawFd,
    /// Completions of this turn, copied out of the queue before they are handled.
    done: Vec<(u64, i32, u32)>,
    /// Submissions that did not fit in the queue this turn.
    backlog: Vec<squeue::Entry>,
}

/// Whether an io_uring of the workers' size can be set up here (kernels, seccomp profiles,
/// containers and memlock limits may refuse it).
pub fn available() -> io::Result<()> {
    IoUring::new(RING_ENTRIES).map(drop)
}

/// One turn's work on a ring: the entries that did not fit in the submission queue go first,
/// then one `io_uring_enter` submits and, when `wait` and no completion is there, waits for
/// one up to `timeout`; the completions are copied out into `done` (user_data, result,
/// flags).
///
/// # Safety
/// Every entry in `backlog` must keep its buffers and addresses alive until its completion.
pub(crate) unsafe fn enter_and_collect(
    ring: &mut IoUring,
    backlog: &mut Vec<squeue::Entry>,
    wait: bool,
    timeout: Option<Duration>,
    done: &mut Vec<(u64, i32, u32)>,
) -> io::Result<()> {
    while let Some(e) = backlog.pop() {
        // SAFETY: the caller's promise.
        if unsafe { ring.submission().push(&e) }.is_err() {
            backlog.push(e);
            ring.submit()?;
        }
    }
    let want = usize::from(wait && ring.completion().is_empty());
    enter(ring, want, timeout)?;
    done.clear();
    done.extend(
        ring.completion()
            .map(|c| (c.user_data(), c.result(), c.flags())),
    );
    Ok(())
}

/// One `io_uring_enter`: submits, and waits for `want` completions up to `timeout` (in the
/// same call, `EXT_ARG`). A timeout, an interruption or a busy completion queue is no error:
/// the caller collects what is there.
fn enter(ring: &IoUring, want: usize, timeout: Option<Duration>) -> io::Result<()> {
    let entered = match timeout {
        Some(d) if want > 0 => {
            let ts = types::Timespec::new()
                .sec(d.as_secs())
                .nsec(d.subsec_nanos());
            let args = types::SubmitArgs::new().timespec(&ts);
            ring.submitter().submit_with_args(want, &args)
        }
        _ => ring.submitter().submit_and_wait(want),
    };
    match entered {
        Ok(_) => Ok(()),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ETIME | libc::EINTR | libc::EBUSY)
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// A ring for one worker thread (the event loop's and [`crate::rt`]'s).
pub(crate) fn build_ring() -> io::Result<IoUring> {
    let cq = RING_ENTRIES * 2;
    let mut b = IoUring::builder();
    b.setup_single_issuer()
        .setup_defer_taskrun()
        .setup_cqsize(cq);
    match b.build(RING_ENTRIES) {
        Ok(r) => Ok(r),
        Err(_) => {
            // Kernels before 6.1: no deferred task running.
            let mut b = IoUring::builder();
            b.setup_coop_taskrun().setup_taskrun_flag().setup_cqsize(cq);
            b.build(RING_ENTRIES)
                .or_else(|_| IoUring::builder().setup_cqsize(cq).build(RING_ENTRIES))
        }
    }
}

impl UringLoop {
    /// A loop accepting on `listeners` (bound, listening, non-blocking).
    pub fn new(listeners: Vec<std::net::TcpListener>) -> io::Result<UringLoop> {
        let ring = build_ring()?;
        let bufs = BufRing::new(&ring)?;
        let (waker, waker_fd) = Waker::new()?;
        let mut l = UringLoop {
            ring,
            ctl: Ctl::default(),
            io: Vec::new(),
            listeners: listeners.into_iter().map(OwnedFd::from).collect(),
            rearm_accept: Vec::new(),
            accept: AcceptPause::default(),
            rearm_recv: Vec::new(),
            bufs,
            waker,
            waker_fd,
            done: Vec::with_capacity(RING_ENTRIES as usize * 2),
            backlog: Vec::new(),
        };
        for i in 0..l.listeners.len() {
            l.arm_accept(i);
        }
        l.arm_wake();
        Ok(l)
    }

    fn push(&mut self, e: squeue::Entry) {
        // SAFETY: every entry's buffers and addresses outlive its operation: receive
        // buffers are the ring's, send buffers and connect addresses are held in `io` until
        // the completion arrives.
        if unsafe { self.ring.submission().push(&e) }.is_err() {
            self.backlog.push(e);
        }
    }

    fn arm_accept(&mut self, i: usize) {
        let Some(fd) = self.listeners.get(i).map(|l| l.as_raw_fd()) else {
            return;
        };
        let e = opcode::AcceptMulti::new(types::Fd(fd))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(pack(Kind::Accept, 0, i as u32));
        self.push(e);
    }

    fn arm_wake(&mut self) {
        let e = opcode::PollAdd::new(types::Fd(self.waker_fd), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(pack(Kind::Wake, 0, 0));
        self.push(e);
    }

    /// The slot's io state, reset when the slot was handed out again since.
    fn slot(&mut self, t: Token) -> &mut SlotIo {
        let i = t.index();
        if self.io.len() <= i {
            self.io.resize_with(i + 1, SlotIo::default);
        }
        let s = &mut self.io[i];
        if s.generation != t.generation && s.inflight == 0 {
            *s = SlotIo {
                generation: t.generation,
                ..SlotIo::default()
            };
        }
        s
    }

    fn arm_recv(&mut self, t: Token) {
        let Some(fd) = self.ctl.slots.fd(t) else {
            return;
        };
        let s = self.slot(t);
        s.want_recv = true;
        if s.receiving || s.closed {
            return;
        }
        s.receiving = true;
        s.inflight += 1;
        let e = opcode::RecvMulti::new(types::Fd(fd), GROUP)
            .build()
            .user_data(pack(Kind::Recv, t.generation, t.index));
        self.push(e);
    }

    fn push_send(&mut self, t: Token) {
        let Some(fd) = self.ctl.slots.fd(t) else {
            return;
        };
        let s = self.slot(t);
        let Some((buf, at)) = s.send.as_ref() else {
            return;
        };
        let rest = buf.get(*at..).unwrap_or_default();
        let e = opcode::Send::new(types::Fd(fd), rest.as_ptr(), rest.len() as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(pack(Kind::Send, t.generation, t.index));
        self.push(e);
    }

    /// Turns the handler's operations into submissions.
    fn apply(&mut self) {
        if !self.accept.paused(std::time::Instant::now()) {
            for i in std::mem::take(&mut self.rearm_accept) {
                self.arm_accept(i);
            }
        }
        for t in std::mem::take(&mut self.rearm_recv) {
            if self.ctl.slots.live(t) && self.slot(t).want_recv {
                self.arm_recv(t);
            }
        }
        let ops = std::mem::take(&mut self.ctl.ops);
        for op in ops {
            match op {
                Op::Recv(t) => self.arm_recv(t),
                Op::StopRecv(t) => {
                    if !self.ctl.slots.live(t) {
                        continue;
                    }
                    let s = self.slot(t);
                    s.want_recv = false;
                    if s.receiving {
                        let target = pack(Kind::Recv, t.generation, t.index);
                        s.inflight += 1;
                        let e = opcode::AsyncCancel::new(target).build().user_data(pack(
                            Kind::Cancel,
                            t.generation,
                            t.index,
                        ));
                        self.push(e);
                    }
                }
                Op::Send(t, buf, start) => {
                    if !self.ctl.slots.live(t) {
                        continue;
                    }
                    let s = self.slot(t);
                    s.send = Some((buf, start));
                    s.inflight += 1;
                    self.push_send(t);
                }
                Op::Connect(t, addr) => {
                    let Some(fd) = self.ctl.slots.fd(t) else {
                        continue;
                    };
                    let addr = Box::new(socket2::SockAddr::from(addr));
                    let e = opcode::Connect::new(types::Fd(fd), addr.as_ptr().cast(), addr.len())
                        .build()
                        .user_data(pack(Kind::Connect, t.generation, t.index));
                    let s = self.slot(t);
                    s.connecting = Some(addr);
                    s.inflight += 1;
                    self.push(e);
                }
                Op::Close(t) => {
                    let Some(fd) = self.ctl.slots.take(t) else {
                        continue;
                    };
                    let s = self.slot(t);
                    s.closed = true;
                    s.want_recv = false;
                    let receiving = s.receiving;
                    let idle = s.inflight == 0;
                    if receiving {
                        s.inflight += 1;
                        let target = pack(Kind::Recv, t.generation, t.index);
                        let e = opcode::AsyncCancel::new(target).build().user_data(pack(
                            Kind::Cancel,
                            t.generation,
                            t.index,
                        ));
                        self.push(e);
                    }
                    // The operations in flight hold the file; closing the descriptor now
                    // ends the connection once they complete (the receive is cancelled).
                    drop(fd);
                    if idle {
                        self.ctl.slots.release(t.index);
                    }
                }
            }
        }
    }

    /// One operation of slot `index` completed: the slot is released once a closed one has
    /// nothing left in flight.
    fn finished(&mut self, index: u32) {
        let Some(s) = self.io.get_mut(index as usize) else {
            return;
        };
        s.inflight = s.inflight.saturating_sub(1);
        if s.closed && s.inflight == 0 {
            s.send = None;
            s.connecting = None;
            s.closed = false;
            self.ctl.slots.release(index);
        }
    }

    /// Handles one completion.
    fn complete(
        &mut self,
        user_data: u64,
        res: i32,
        flags: u32,
        handle: &mut impl FnMut(&mut Ctl, Event<'_>),
    ) -> Option<u16> {
        let (kind, generation, index) = unpack(user_data);
        // Whether the event belongs to a slot the handler still has.
        let live = self
            .io
            .get(index as usize)
            .is_some_and(|s| s.generation & 0x00ff_ffff == generation && !s.closed);
        match kind? {
            Kind::Accept => {
                self.accepted(index as usize, res, flags, handle);
                None
            }
            Kind::Wake => {
                if !cqueue::more(flags) {
                    self.arm_wake();
                }
                Waker::drain(self.waker_fd);
                handle(&mut self.ctl, Event::Woken);
                None
            }
            Kind::Recv => self.received(index, live, res, flags, handle),
            Kind::Send => {
                self.send_done(index, live, res, handle);
                None
            }
            Kind::Connect => {
                self.connect_done(index, live, res, handle);
                None
            }
            Kind::Cancel => {
                self.finished(index);
                None
            }
        }
    }

    /// A multishot accept's completion on listener `i`.
    fn accepted(
        &mut self,
        i: usize,
        res: i32,
        flags: u32,
        handle: &mut impl FnMut(&mut Ctl, Event<'_>),
    ) {
        if !cqueue::more(flags) {
            self.rearm_accept.push(i);
        }
        if res < 0 {
            self.accept.failed(
                &io::Error::from_raw_os_error(-res),
                std::time::Instant::now(),
            );
            return;
        }
        // SAFETY: a successful accept's result is a new descriptor we own.
        let socket = unsafe { OwnedFd::from_raw_fd(res) };
        deliver_accepted(&mut self.ctl, &mut self.accept, i, socket, handle);
    }

    /// A multishot receive's completion: the bytes (in a provided buffer, whose id is
    /// returned to be recycled once the handler is done), the end of the stream, or an
    /// error; the receive re-armed when it ended and is still wanted.
    fn received(
        &mut self,
        index: u32,
        live: bool,
        res: i32,
        flags: u32,
        handle: &mut impl FnMut(&mut Ctl, Event<'_>),
    ) -> Option<u16> {
        let bid = cqueue::buffer_select(flags);
        let more = cqueue::more(flags);
        if !more {
            if let Some(s) = self.io.get_mut(index as usize) {
                s.receiving = false;
            }
            self.finished(index);
        }
        if !live {
            return bid;
        }
        let (s, token) = self.slot_at(index)?;
        let wanted = s.want_recv;
        if res > 0 {
            if let Some(b) = bid {
                let bytes = self.bufs.bytes(b, res as usize);
                handle(&mut self.ctl, Event::Data { token, bytes });
            }
            if !more && self.io.get(index as usize).is_some_and(|s| s.want_recv) {
                self.arm_recv(token);
            }
        } else if res == -libc::ENOBUFS {
            // Every buffer is in use this turn: receive again next turn.
            self.rearm_recv.push(token);
        } else if res == -libc::ECANCELED {
            if wanted {
                // Cancelled by a stop, then wanted again.
                self.arm_recv(token);
            }
        } else {
            s.want_recv = false;
            let error = (res < 0).then(|| io::Error::from_raw_os_error(-res));
            handle(&mut self.ctl, Event::Closed { token, error });
        }
        bid
    }

    /// Slot `index`'s I/O state and its full token, for one of its completions.
    fn slot_at(&mut self, index: u32) -> Option<(&mut SlotIo, Token)> {
        let s = self.io.get_mut(index as usize)?;
        let generation = s.generation;
        Some((s, Token { index, generation }))
    }

    /// A send's completion: a short one continued, otherwise the buffer back to the
    /// handler with the result.
    fn send_done(
        &mut self,
        index: u32,
        live: bool,
        res: i32,
        handle: &mut impl FnMut(&mut Ctl, Event<'_>),
    ) {
        let Some((s, token)) = self.slot_at(index) else {
            return;
        };
        let result = match res {
            n if n > 0 => {
                let short = s.send.as_mut().is_some_and(|(buf, at)| {
                    *at += n as usize;
                    *at < buf.len()
                });
                if short && live {
                    // A short send: the rest goes in the next submission.
                    self.push_send(token);
                    return;
                }
                Ok(())
            }
            0 => Err(io::Error::from(io::ErrorKind::WriteZero)),
            e => Err(io::Error::from_raw_os_error(-e)),
        };
        let sent = s.send.take();
        self.finished(index);
        if let (true, Some((buf, _))) = (live, sent) {
            handle(&mut self.ctl, Event::Sent { token, buf, result });
        }
    }

    /// A connect's completion.
    fn connect_done(
        &mut self,
        index: u32,
        live: bool,
        res: i32,
        handle: &mut impl FnMut(&mut Ctl, Event<'_>),
    ) {
        let Some((s, token)) = self.slot_at(index) else {
            return;
        };
        s.connecting = None;
        self.finished(index);
        if !live {
            return;
        }
        let result = if res < 0 {
            Err(io::Error::from_raw_os_error(-res))
        } else {
            if let Some(fd) = self.ctl.slots.fd(token) {
                nodelay(fd);
            }
            Ok(())
        };
        handle(&mut self.ctl, Event::Connected { token, result });
    }
}

impl EventLoop for UringLoop {
    const NAME: &'static str = "uring";

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
        // What did not fit last time goes first (the queue was emptied by the last enter).
        let timeout = self.accept.limit(timeout, std::time::Instant::now());
        // SAFETY: the backlog's entries were made as `push` requires.
        unsafe {
            enter_and_collect(
                &mut self.ring,
                &mut self.backlog,
                true,
                timeout,
                &mut self.done,
            )?
        };
        let done = std::mem::take(&mut self.done);
        let mut returned = false;
        for &(u, res, flags) in &done {
            if let Some(bid) = self.complete(u, res, flags, handle) {
                self.bufs.give(bid);
                returned = true;
            }
        }
        self.done = done;
        if returned {
            self.bufs.publish();
        }
        Ok(())
    }
}

impl Drop for UringLoop {
    fn drop(&mut self) {
        let _ = self.ring.submitter().unregister_buf_ring(GROUP);
    }
}
