//! The worker runtime: a small single-threaded executor for the sessions' drivers, on a
//! ring of our own (`reactor`) or, where io_uring cannot be used, an epoll of our own
//! (`poller`), with the worker's timers (`timers`). No tokio on the data path: one thread,
//! and one `io_uring_enter` (or `epoll_wait`) per turn that submits, collects and waits up
//! to the next timer.
//!
//! Tasks are the futures `spawn` is given; a task is polled when its waker was woken (by a
//! completion, a timer, another task, or another thread through the runtime's eventfd).
//! Outside a worker of this runtime (the epoll driver's tokio runtime, tests),
//! [`spawn`] and the [`time`] functions fall back to tokio's, so that code above runs on
//! either.

mod poller;
mod pooled;
mod reactor;
pub mod time;
mod timers;

pub use poller::Interest;
pub use pooled::{pooled, Pooled};
pub use reactor::{available, Held, RING_ENTRIES};

use parking_lot::Mutex;
use poller::{Poller, RegId};
use reactor::{OpId, Reactor};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};
use timers::{TimerId, Timers};

/// A free slot of a slab (`slots` and its free list): one given back, else a new one.
fn claim<T: Default>(slots: &mut Vec<T>, free: &mut Vec<u32>) -> u32 {
    free.pop().unwrap_or_else(|| {
        slots.push(T::default());
        u32::try_from(slots.len() - 1).unwrap_or(u32::MAX)
    })
}

/// Tasks polled in a row before the ring is looked at again.
const POLLS_PER_TURN: usize = 256;

thread_local! {
    static CURRENT: RefCell<Option<Rc<Core>>> = const { RefCell::new(None) };
}

/// The runtime of this thread, if it runs one.
fn current() -> Option<Rc<Core>> {
    CURRENT.try_with(|c| c.borrow().clone()).ok().flatten()
}

/// The time this thread's runtime read at the start of its turn, if it runs one.
fn turn_time() -> Option<Instant> {
    CURRENT
        .try_with(|c| c.borrow().as_ref().map(|core| core.now.get()))
        .ok()
        .flatten()
}

/// Whether this thread runs this runtime (else tokio's serves [`spawn`] and [`time`]).
pub fn is_current() -> bool {
    CURRENT.try_with(|c| c.borrow().is_some()).unwrap_or(false)
}

/// How other threads reach the runtime: wakes queued here, and an eventfd the ring watches
/// while it sleeps.
struct Remote {
    queue: Mutex<Vec<(u32, u32)>>,
    pending: AtomicBool,
    sleeping: AtomicBool,
    eventfd: OwnedFd,
}

impl Remote {
    fn push(&self, task: (u32, u32)) {
        self.queue.lock().push(task);
        self.pending.store(true, Ordering::SeqCst);
        if self.sleeping.swap(false, Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a valid u64 to the eventfd this runtime owns; a
            // full counter (EAGAIN) means a wake-up is pending already.
            unsafe { libc::write(self.eventfd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }

    fn drain_eventfd(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64 from a non-blocking eventfd.
        unsafe { libc::read(self.eventfd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }
}

/// A task's waker.
struct TaskWaker {
    index: u32,
    generation: u32,
    /// In a ready queue already.
    scheduled: AtomicBool,
    home: Arc<Remote>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        let task = (self.index, self.generation);
        let here = CURRENT
            .try_with(|c| match &*c.borrow() {
                Some(core) if Arc::ptr_eq(&core.remote, &self.home) => {
                    core.ready.borrow_mut().push_back(task);
                    true
                }
                _ => false,
            })
            .unwrap_or(false);
        if !here {
            self.home.push(task);
        }
    }
}

type Task = Pin<Box<dyn Future<Output = ()>>>;

#[derive(Default)]
struct TaskSlot {
    generation: u32,
    live: bool,
    /// Absent while the task is being polled.
    future: Option<Task>,
    handle: Option<Arc<TaskWaker>>,
    waker: Option<Waker>,
    /// Aborted while being polled: dropped after its poll.
    aborted: bool,
}

#[derive(Default)]
struct Tasks {
    slots: Vec<TaskSlot>,
    free: Vec<u32>,
}

impl Tasks {
    /// The slot of task `(index, generation)` while it lives.
    fn live(&mut self, (index, generation): (u32, u32)) -> Option<&mut TaskSlot> {
        self.slots
            .get_mut(index as usize)
            .filter(|s| s.live && s.generation == generation)
    }
}

/// What a runtime waits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// Operations on an io_uring ([`start`]).
    Ring,
    /// Readiness from an epoll ([`register`]).
    Epoll,
}

// One per worker, made once: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
enum Io {
    Ring(Reactor),
    Epoll(Poller),
}

impl Io {
    fn turn(&mut self, wait: bool, timeout: Option<Duration>) -> io::Result<bool> {
        match self {
            Io::Ring(r) => r.turn(wait, timeout),
            Io::Epoll(p) => p.turn(wait, timeout),
        }
    }

    /// Operations the kernel may still write into (io_uring only).
    fn in_flight(&self) -> usize {
        match self {
            Io::Ring(r) => r.in_flight(),
            Io::Epoll(_) => 0,
        }
    }
}

/// One worker's runtime.
struct Core {
    io: RefCell<Io>,
    timers: RefCell<Timers>,
    tasks: RefCell<Tasks>,
    ready: RefCell<VecDeque<(u32, u32)>>,
    remote: Arc<Remote>,
    /// The time at the start of this turn.
    now: Cell<Instant>,
}

impl Core {
    fn spawn(&self, future: Task) -> (u32, u32) {
        let mut tasks = self.tasks.borrow_mut();
        let Tasks { slots, free } = &mut *tasks;
        let index = claim(slots, free);
        let Some(slot) = tasks.slots.get_mut(index as usize) else {
            return (index, u32::MAX);
        };
        let handle = Arc::new(TaskWaker {
            index,
            generation: slot.generation,
            scheduled: AtomicBool::new(true),
            home: self.remote.clone(),
        });
        slot.live = true;
        slot.aborted = false;
        slot.future = Some(future);
        slot.waker = Some(Waker::from(handle.clone()));
        slot.handle = Some(handle);
        let id = (index, slot.generation);
        drop(tasks);
        self.ready.borrow_mut().push_back(id);
        id
    }

    /// Polls task `id` once; whether it finished (or is gone).
    fn poll_task(&self, (index, generation): (u32, u32)) -> bool {
        let (mut future, waker) = {
            let mut tasks = self.tasks.borrow_mut();
            let Some(slot) = tasks.live((index, generation)) else {
                return true;
            };
            let (Some(f), Some(w), Some(h)) = (slot.future.take(), &slot.waker, &slot.handle)
            else {
                return false;
            };
            h.scheduled.store(false, Ordering::Release);
            (f, w.clone())
        };
        let done = future
            .as_mut()
            .poll(&mut Context::from_waker(&waker))
            .is_ready();
        let mut tasks = self.tasks.borrow_mut();
        let finished = match tasks.slots.get_mut(index as usize) {
            Some(slot) if !done && !slot.aborted => {
                slot.future = Some(future);
                return false;
            }
            Some(_) => {
                Self::free(&mut tasks, index);
                true
            }
            None => true,
        };
        drop(tasks);
        // Dropped outside the borrow: its drop may cancel operations or wake tasks.
        drop(future);
        finished
    }

    fn free(tasks: &mut Tasks, index: u32) {
        if let Some(slot) = tasks.slots.get_mut(index as usize) {
            slot.live = false;
            slot.aborted = false;
            slot.handle = None;
            slot.waker = None;
            slot.generation = slot.generation.wrapping_add(1);
            tasks.free.push(index);
        }
    }

    fn abort(&self, (index, generation): (u32, u32)) {
        let future = {
            let mut tasks = self.tasks.borrow_mut();
            let Some(slot) = tasks.live((index, generation)) else {
                return;
            };
            match slot.future.take() {
                Some(f) => {
                    Self::free(&mut tasks, index);
                    f
                }
                None => {
                    slot.aborted = true;
                    return;
                }
            }
        };
        drop(future);
    }

    fn is_live(&self, (index, generation): (u32, u32)) -> bool {
        self.tasks
            .borrow()
            .slots
            .get(index as usize)
            .is_some_and(|s| s.live && s.generation == generation)
    }

    /// Every task is dropped (their operations abandoned).
    fn drop_tasks(&self) {
        loop {
            let future = {
                let mut tasks = self.tasks.borrow_mut();
                let mut found = None;
                for i in 0..tasks.slots.len() {
                    if let Some(f) = tasks.slots.get_mut(i).and_then(|s| s.future.take()) {
                        Self::free(&mut tasks, i as u32);
                        found = Some(f);
                        break;
                    }
                }
                found
            };
            match future {
                Some(f) => drop(f),
                None => break,
            }
        }
    }
}

/// A spawned task's handle: it can be aborted (dropped wherever it waits).
pub enum JoinHandle {
    Ours((u32, u32)),
    Tokio(tokio::task::JoinHandle<()>),
}

impl JoinHandle {
    /// Drops the task.
    pub fn abort(&self) {
        match self {
            JoinHandle::Ours(id) => {
                if let Some(core) = current() {
                    core.abort(*id);
                }
            }
            JoinHandle::Tokio(h) => h.abort(),
        }
    }
}

/// Runs `future` as a task of this thread's runtime (tokio's `spawn_local` outside one).
pub fn spawn<F: Future<Output = ()> + 'static>(future: F) -> JoinHandle {
    match current() {
        Some(core) => JoinHandle::Ours(core.spawn(Box::pin(future))),
        None => JoinHandle::Tokio(tokio::task::spawn_local(future)),
    }
}

/// Runs this thread's runtime until `main` is done; then every other task is dropped.
pub fn block_on<F: Future<Output = ()> + 'static>(flavor: Flavor, main: F) -> io::Result<()> {
    // SAFETY: eventfd with valid flags; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor owned by nothing else.
    let eventfd = unsafe { OwnedFd::from_raw_fd(fd) };
    let io = match flavor {
        Flavor::Ring => Io::Ring(Reactor::new(eventfd.as_raw_fd())?),
        Flavor::Epoll => Io::Epoll(Poller::new(eventfd.as_raw_fd())?),
    };
    let core = Rc::new(Core {
        io: RefCell::new(io),
        timers: RefCell::new(Timers::default()),
        tasks: RefCell::new(Tasks::default()),
        ready: RefCell::new(VecDeque::with_capacity(1024)),
        remote: Arc::new(Remote {
            queue: Mutex::new(Vec::new()),
            pending: AtomicBool::new(false),
            sleeping: AtomicBool::new(false),
            eventfd,
        }),
        now: Cell::new(Instant::now()),
    });
    CURRENT.with(|c| *c.borrow_mut() = Some(core.clone()));
    let main = core.spawn(Box::pin(main));
    let res = run(&core, main);
    core.drop_tasks();
    // What the kernel still holds (abandoned operations) is freed at its completion.
    let until = Instant::now() + Duration::from_secs(1);
    while core.io.borrow().in_flight() > 0 && Instant::now() < until {
        if core
            .io
            .borrow_mut()
            .turn(true, Some(Duration::from_millis(10)))
            .is_err()
        {
            break;
        }
    }
    CURRENT.with(|c| *c.borrow_mut() = None);
    res
}

fn run(core: &Core, main: (u32, u32)) -> io::Result<()> {
    let mut taken = Vec::new();
    loop {
        if core.remote.pending.swap(false, Ordering::SeqCst) {
            std::mem::swap(&mut taken, &mut *core.remote.queue.lock());
            core.ready.borrow_mut().extend(taken.drain(..));
        }
        for _ in 0..POLLS_PER_TURN {
            let Some(t) = core.ready.borrow_mut().pop_front() else {
                break;
            };
            core.poll_task(t);
        }
        if !core.is_live(main) {
            return Ok(());
        }
        // The clock is read once per turn, after the wait: timers set since count from
        // the turn's start, at worst a turn's work late.
        let now = core.now.get();
        let mut busy = !core.ready.borrow().is_empty();
        if !busy {
            core.remote.sleeping.store(true, Ordering::SeqCst);
            if core.remote.pending.load(Ordering::SeqCst) {
                busy = true;
            }
        }
        let timeout = core
            .timers
            .borrow_mut()
            .next()
            .map(|d| d.saturating_duration_since(now));
        let woken = core.io.borrow_mut().turn(!busy, timeout);
        core.remote.sleeping.store(false, Ordering::SeqCst);
        if woken? {
            core.remote.drain_eventfd();
        }
        let now = Instant::now();
        core.now.set(now);
        core.timers.borrow_mut().fire(now);
    }
}

/// An operation on this thread's ring, started with [`start`]: its result (the kernel's
/// return value, negative errno on failure) and what it held.
pub struct Op {
    id: Option<OpId>,
}

/// Starts an operation on this thread's ring; see [`reactor::Reactor::start`]. Outside a
/// ring runtime it gives `held` back.
pub fn start(
    held: Held,
    build: impl FnOnce(&mut Held) -> io_uring::squeue::Entry,
) -> Result<Op, Held> {
    let Some(core) = current() else {
        return Err(held);
    };
    let mut io = core.io.borrow_mut();
    match &mut *io {
        Io::Ring(r) => Ok(Op {
            id: Some(r.start(held, build)),
        }),
        Io::Epoll(_) => Err(held),
    }
}

/// Runs `f` on this thread's ring, if it has one.
fn with_ring<T>(f: impl FnOnce(&mut Reactor) -> T) -> Option<T> {
    let core = current()?;
    let mut io = core.io.borrow_mut();
    match &mut *io {
        Io::Ring(r) => Some(f(r)),
        Io::Epoll(_) => None,
    }
}

/// Runs `f` on this thread's epoll, if it has one.
fn with_poller<T>(f: impl FnOnce(&mut Poller) -> T) -> Option<T> {
    let core = current()?;
    let mut io = core.io.borrow_mut();
    match &mut *io {
        Io::Epoll(p) => Some(f(p)),
        Io::Ring(_) => None,
    }
}

/// A socket registered with this thread's epoll: tasks wait on it for readiness. Dropping
/// it deregisters the socket (do so before it is closed or handed to another worker).
#[derive(Debug)]
pub struct Registration {
    id: RegId,
    fd: RawFd,
}

/// Registers non-blocking socket `fd` with this thread's epoll.
pub fn register(fd: RawFd) -> io::Result<Registration> {
    match with_poller(|p| p.register(fd)) {
        Some(id) => Ok(Registration { id: id?, fd }),
        None => Err(io::Error::other("no epoll runtime on this thread")),
    }
}

impl Registration {
    /// Waits until the socket may be ready for `interest` (at once if it has been since
    /// the last [`Self::would_block`]).
    pub async fn ready(&self, interest: Interest) {
        std::future::poll_fn(|cx| {
            with_poller(|p| p.poll_ready(self.id, interest, cx.waker())).unwrap_or(Poll::Ready(()))
        })
        .await
    }

    /// A system call for `interest` would block: the next [`Self::ready`] waits for an
    /// event.
    pub fn would_block(&self, interest: Interest) {
        with_poller(|p| p.clear(self.id, interest));
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        with_poller(|p| p.deregister(self.id, self.fd));
    }
}

impl Future for Op {
    type Output = (i32, Held);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<(i32, Held)> {
        let Some(id) = self.id else {
            return Poll::Ready((-libc::ECANCELED, Held::Nothing));
        };
        let Some(r) = with_ring(|r| r.poll(id, cx.waker())) else {
            return Poll::Ready((-libc::ENXIO, Held::Nothing));
        };
        if r.is_ready() {
            self.id = None;
        }
        r
    }
}

impl Drop for Op {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            with_ring(|r| r.abandon(id));
        }
    }
}

/// A timer of this thread's runtime.
struct Sleep {
    deadline: Instant,
    id: Option<TimerId>,
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Some(core) = current() else {
            return Poll::Ready(());
        };
        match self.id {
            Some(id) => match core.timers.borrow_mut().poll(id, cx.waker()) {
                true => Poll::Ready(()),
                false => Poll::Pending,
            },
            None if self.deadline <= core.now.get() => Poll::Ready(()),
            None => {
                let id = core
                    .timers
                    .borrow_mut()
                    .set(self.deadline, cx.waker().clone());
                self.id = Some(id);
                Poll::Pending
            }
        }
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            if let Some(core) = current() {
                core.timers.borrow_mut().cancel(id);
            }
        }
    }
}

#[cfg(test)]
mod tests;
