//! The worker's ring: operations in flight, each with the task waiting on it and what the
//! kernel reads or writes while it runs (a buffer, an address), held here until its
//! completion arrives, even when the task gave up on it (its future was dropped: the
//! operation is cancelled, and forgotten at its completion).
//!
//! One ring per worker thread, created and entered by that thread only
//! (`SINGLE_ISSUER | DEFER_TASKRUN`; `COOP_TASKRUN | TASKRUN_FLAG` on kernels without them).
//! Each turn is one `io_uring_enter`: it submits, and waits with the turn's timeout in the
//! same call (`EXT_ARG`). `user_data` packs the operation's slot and generation.

use io_uring::{opcode, squeue, types, IoUring};
use std::io;
use std::os::fd::RawFd;
use std::task::{Poll, Waker};
use std::time::Duration;

pub use crate::event_loop::uring::{available, RING_ENTRIES};
use crate::event_loop::uring::{build_ring, enter_and_collect};

/// `user_data` of the eventfd poll that wakes the ring from other threads.
const WAKE: u64 = u64::MAX;
/// `user_data` of cancellations (their completions are ignored).
const CANCEL: u64 = u64::MAX - 1;

/// What the kernel holds while an operation runs.
#[derive(Debug, Default)]
pub enum Held {
    #[default]
    Nothing,
    /// A buffer read into or sent from.
    Buf(Vec<u8>),
    /// A connect's address.
    Addr(Box<socket2::SockAddr>),
    /// An accept's address and its length.
    Peer(Box<(libc::sockaddr_storage, libc::socklen_t)>),
}

#[derive(Debug, Default)]
struct OpSlot {
    generation: u32,
    in_use: bool,
    /// The task gave up on it: freed at its completion.
    abandoned: bool,
    result: Option<i32>,
    waker: Option<Waker>,
    held: Held,
}

/// An operation's handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpId {
    index: u32,
    generation: u32,
}

impl OpId {
    fn user_data(self) -> u64 {
        u64::from(self.generation) << 32 | u64::from(self.index)
    }
}

/// The ring and its operations.
pub struct Reactor {
    ring: IoUring,
    ops: Vec<OpSlot>,
    free: Vec<u32>,
    /// Submissions that did not fit in the queue.
    backlog: Vec<squeue::Entry>,
    wake_fd: RawFd,
    /// The wake poll must be armed again (a multishot poll ended).
    rearm_wake: bool,
    /// Completions copied out of the queue before they are handled.
    done: Vec<(u64, i32, u32)>,
}

impl Reactor {
    /// A ring woken from other threads through `wake_fd` (an eventfd).
    pub fn new(wake_fd: RawFd) -> io::Result<Reactor> {
        let mut r = Reactor {
            ring: build_ring()?,
            ops: Vec::new(),
            free: Vec::new(),
            backlog: Vec::new(),
            wake_fd,
            rearm_wake: true,
            done: Vec::with_capacity(RING_ENTRIES as usize * 2),
        };
        r.arm_wake();
        Ok(r)
    }

    fn arm_wake(&mut self) {
        if std::mem::take(&mut self.rearm_wake) {
            let e = opcode::PollAdd::new(types::Fd(self.wake_fd), libc::POLLIN as u32)
                .multi(true)
                .build()
                .user_data(WAKE);
            self.push(e);
        }
    }

    fn push(&mut self, e: squeue::Entry) {
        // SAFETY: every entry's buffers and addresses are held in `ops` until its
        // completion arrives (see `Held`), abandoned or not.
        if unsafe { self.ring.submission().push(&e) }.is_err() {
            self.backlog.push(e);
        }
    }

    /// Starts an operation: `build` makes its entry from what it holds (`held` stays here,
    /// at a stable address for a boxed address, or a buffer whose heap part does not move).
    pub fn start(&mut self, held: Held, build: impl FnOnce(&mut Held) -> squeue::Entry) -> OpId {
        let index = super::claim(&mut self.ops, &mut self.free);
        let Some(slot) = self.ops.get_mut(index as usize) else {
            // Cannot happen (the slot was just made); no entry is submitted.
            return OpId {
                index,
                generation: u32::MAX,
            };
        };
        slot.in_use = true;
        slot.abandoned = false;
        slot.result = None;
        slot.waker = None;
        slot.held = held;
        let id = OpId {
            index,
            generation: slot.generation,
        };
        let e = build(&mut slot.held).user_data(id.user_data());
        self.push(e);
        id
    }

    /// The result of operation `id` once complete, with what it held; else `waker` is
    /// woken at its completion.
    pub fn poll(&mut self, id: OpId, waker: &Waker) -> Poll<(i32, Held)> {
        let Some(slot) = self.live(id) else {
            return Poll::Ready((-libc::ECANCELED, Held::Nothing));
        };
        match slot.result.take() {
            Some(res) => {
                let held = std::mem::take(&mut slot.held);
                self.release(id.index);
                Poll::Ready((res, held))
            }
            None => {
                if !slot.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
                    slot.waker = Some(waker.clone());
                }
                Poll::Pending
            }
        }
    }

    /// The task gave up on operation `id`: it is cancelled, and what it holds is freed at
    /// its completion.
    pub fn abandon(&mut self, id: OpId) {
        let Some(slot) = self.live(id) else {
            return;
        };
        if slot.result.is_some() {
            self.release(id.index);
            return;
        }
        slot.abandoned = true;
        slot.waker = None;
        let e = opcode::AsyncCancel::new(id.user_data())
            .build()
            .user_data(CANCEL);
        self.push(e);
    }

    fn live(&mut self, id: OpId) -> Option<&mut OpSlot> {
        self.ops
            .get_mut(id.index as usize)
            .filter(|s| s.in_use && s.generation == id.generation)
    }

    fn release(&mut self, index: u32) {
        if let Some(s) = self.ops.get_mut(index as usize) {
            s.in_use = false;
            s.abandoned = false;
            s.waker = None;
            s.held = Held::Nothing;
            s.generation = s.generation.wrapping_add(1);
            self.free.push(index);
        }
    }

    /// Operations in flight (abandoned ones included).
    pub fn in_flight(&self) -> usize {
        self.ops.len() - self.free.len()
    }

    /// One turn: submits what was started and collects completions, waking their tasks.
    /// Waits for one when `wait`, up to `timeout`. Returns whether the wake-up eventfd
    /// fired.
    pub fn turn(&mut self, wait: bool, timeout: Option<Duration>) -> io::Result<bool> {
        self.arm_wake();
        // SAFETY: the backlog's entries hold what they point to in `ops` (see `push`).
        unsafe {
            enter_and_collect(
                &mut self.ring,
                &mut self.backlog,
                wait,
                timeout,
                &mut self.done,
            )?
        };
        let done = std::mem::take(&mut self.done);
        let mut woken = false;
        for &(u, res, flags) in &done {
            match u {
                WAKE => {
                    woken = true;
                    if !io_uring::cqueue::more(flags) {
                        self.rearm_wake = true;
                    }
                }
                CANCEL => {}
                _ => self.complete(u, res),
            }
        }
        self.done = done;
        Ok(woken)
    }

    fn complete(&mut self, user_data: u64, res: i32) {
        let id = OpId {
            index: user_data as u32,
            generation: (user_data >> 32) as u32,
        };
        let Some(slot) = self.live(id) else {
            return;
        };
        if slot.abandoned {
            self.release(id.index);
            return;
        }
        slot.result = Some(res);
        if let Some(w) = slot.waker.take() {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::sync::Arc;
    use std::task::Wake;

    struct Nop;
    impl Wake for Nop {
        fn wake(self: Arc<Self>) {}
    }

    fn eventfd() -> std::os::fd::OwnedFd {
        // SAFETY: eventfd with valid flags; checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a new descriptor owned by nothing else.
        unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }
    }

    fn recv(r: &mut Reactor, fd: RawFd, cap: usize) -> OpId {
        r.start(Held::Buf(Vec::with_capacity(cap)), |h| {
            let Held::Buf(b) = h else { unreachable!() };
            opcode::Recv::new(types::Fd(fd), b.as_mut_ptr(), cap as u32).build()
        })
    }

    #[test]
    fn a_receive_completes_with_its_buffer_and_an_abandoned_one_is_freed() {
        let ev = eventfd();
        let Ok(mut r) = Reactor::new(ev.as_raw_fd()) else {
            // No io_uring here (seccomp): nothing to test.
            return;
        };
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let w = Waker::from(Arc::new(Nop));
        let id = recv(&mut r, b.as_raw_fd(), 64);
        r.turn(false, None).unwrap();
        assert!(r.poll(id, &w).is_pending());
        a.write_all(b"hello").unwrap();
        r.turn(true, Some(Duration::from_secs(5))).unwrap();
        let Poll::Ready((n, Held::Buf(_))) = r.poll(id, &w) else {
            panic!("no completion")
        };
        assert_eq!(n, 5);
        assert_eq!(r.in_flight(), 0);

        // Given up while in flight: cancelled, and its slot comes back at the completion.
        let id = recv(&mut r, b.as_raw_fd(), 64);
        r.turn(false, None).unwrap();
        r.abandon(id);
        for _ in 0..10 {
            if r.in_flight() == 0 {
                break;
            }
            r.turn(true, Some(Duration::from_millis(100))).unwrap();
        }
        assert_eq!(r.in_flight(), 0);
        assert!(r.poll(id, &w).is_ready(), "a stale handle names nothing");
    }
}
