//! The worker's epoll, for where io_uring cannot be used: sockets registered once,
//! edge-triggered, each with the tasks waiting to read or write it. A task tries its
//! system call first and waits here only when the socket would block.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::task::{Poll, Waker};
use std::time::Duration;

/// `epoll_event.u64` of the runtime's eventfd.
const WAKE: u64 = u64::MAX;

/// Which way a task waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interest {
    Read,
    Write,
}

/// A registered socket's handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegId {
    index: u32,
    generation: u32,
}

impl RegId {
    fn key(self) -> u64 {
        u64::from(self.generation) << 32 | u64::from(self.index)
    }
}

#[derive(Debug, Default)]
struct Entry {
    generation: u32,
    live: bool,
    /// Readiness seen since the last time a system call would block.
    readable: bool,
    writable: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
}

/// One worker's epoll and its registrations.
pub struct Poller {
    epoll: OwnedFd,
    entries: Vec<Entry>,
    free: Vec<u32>,
    events: Vec<libc::epoll_event>,
}

impl Poller {
    /// An epoll watching `wake_fd` (an eventfd) for wake-ups from other threads.
    pub fn new(wake_fd: RawFd) -> io::Result<Poller> {
        // SAFETY: epoll_create1 with a valid flag; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor owned by nothing else.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        let p = Poller {
            epoll,
            entries: Vec::new(),
            free: Vec::new(),
            events: vec![libc::epoll_event { events: 0, u64: 0 }; 1024],
        };
        p.ctl(libc::EPOLL_CTL_ADD, wake_fd, libc::EPOLLIN as u32, WAKE)?;
        Ok(p)
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, key: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: key };
        // SAFETY: a valid epoll descriptor and event; the result is checked.
        if unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Registers socket `fd` (non-blocking) for both directions, edge-triggered.
    pub fn register(&mut self, fd: RawFd) -> io::Result<RegId> {
        let index = super::claim(&mut self.entries, &mut self.free);
        let generation = match self.entries.get_mut(index as usize) {
            Some(e) => {
                // Worth a system call at first: a new socket may be readable, and is
                // writable.
                *e = Entry {
                    generation: e.generation,
                    live: true,
                    readable: true,
                    writable: true,
                    ..Entry::default()
                };
                e.generation
            }
            None => 0,
        };
        let id = RegId { index, generation };
        let events = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
        if let Err(e) = self.ctl(libc::EPOLL_CTL_ADD, fd, events, id.key()) {
            self.release(id);
            return Err(e);
        }
        Ok(id)
    }

    /// Forgets socket `fd` (before it is closed, or handed to another worker).
    pub fn deregister(&mut self, id: RegId, fd: RawFd) {
        let _ = self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0);
        self.release(id);
    }

    fn release(&mut self, id: RegId) {
        if let Some(e) = self.live(id) {
            e.live = false;
            e.reader = None;
            e.writer = None;
            e.generation = e.generation.wrapping_add(1);
            self.free.push(id.index);
        }
    }

    fn live(&mut self, id: RegId) -> Option<&mut Entry> {
        self.entries
            .get_mut(id.index as usize)
            .filter(|e| e.live && e.generation == id.generation)
    }

    /// Ready when the socket may be ready for `interest`: a system call is worth trying.
    pub fn poll_ready(&mut self, id: RegId, interest: Interest, waker: &Waker) -> Poll<()> {
        let Some(e) = self.live(id) else {
            return Poll::Ready(());
        };
        let (ready, slot) = match interest {
            Interest::Read => (e.readable, &mut e.reader),
            Interest::Write => (e.writable, &mut e.writer),
        };
        if ready {
            return Poll::Ready(());
        }
        if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *slot = Some(waker.clone());
        }
        Poll::Pending
    }

    /// A system call would block: the next wait for `interest` waits for an event.
    pub fn clear(&mut self, id: RegId, interest: Interest) {
        if let Some(e) = self.live(id) {
            match interest {
                Interest::Read => e.readable = false,
                Interest::Write => e.writable = false,
            }
        }
    }

    /// One turn: waits for events (up to `timeout`) when `wait`, waking their tasks.
    /// Returns whether the wake-up eventfd fired.
    pub fn turn(&mut self, wait: bool, timeout: Option<Duration>) -> io::Result<bool> {
        let ms = match (wait, timeout) {
            (false, _) => 0,
            (true, None) => -1,
            // Rounded up: a timer is never woken early.
            (true, Some(d)) => i32::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX),
        };
        let cap = i32::try_from(self.events.len()).unwrap_or(i32::MAX);
        // SAFETY: `events` has room for `cap` entries; the result is checked.
        let n =
            unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), self.events.as_mut_ptr(), cap, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EINTR) => Ok(false),
                _ => Err(e),
            };
        }
        let mut woken = false;
        for i in 0..n as usize {
            let Some(ev) = self.events.get(i).copied() else {
                break;
            };
            let key = ev.u64;
            if key == WAKE {
                woken = true;
                continue;
            }
            let id = RegId {
                index: key as u32,
                generation: (key >> 32) as u32,
            };
            let flags = ev.events as i32;
            let Some(e) = self.live(id) else {
                continue;
            };
            let err = flags & (libc::EPOLLERR | libc::EPOLLHUP) != 0;
            if err || flags & (libc::EPOLLIN | libc::EPOLLRDHUP) != 0 {
                e.readable = true;
                if let Some(w) = e.reader.take() {
                    w.wake();
                }
            }
            if err || flags & libc::EPOLLOUT != 0 {
                e.writable = true;
                if let Some(w) = e.writer.take() {
                    w.wake();
                }
            }
        }
        Ok(woken)
    }

    /// Registrations held.
    #[cfg(test)]
    pub fn registered(&self) -> usize {
        self.entries.len() - self.free.len()
    }
}
