//! A worker's timers: deadlines with the task waiting on each. Plain code, no clock of its
//! own: the runtime gives it `now`.
//!
//! A binary heap ordered by deadline, with lazy removal: a cancelled timer frees its slot at
//! once and its heap entry is skipped when it comes up. The heap is compacted when stale
//! entries outnumber live ones, so that long timers set and cancelled on every command (an
//! idle timeout of hours) do not pile up.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::task::Waker;
use std::time::Instant;

/// A timer's handle: its slot and the generation it was set in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerId {
    index: u32,
    generation: u32,
}

#[derive(Debug, Default)]
struct Slot {
    generation: u32,
    live: bool,
    fired: bool,
    waker: Option<Waker>,
}

/// Stale heap entries tolerated before a compaction, beyond the live ones.
const SLACK: usize = 256;

/// The timers of one worker.
#[derive(Debug, Default)]
pub struct Timers {
    heap: BinaryHeap<Reverse<(Instant, u32, u32)>>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    live: usize,
}

impl Timers {
    /// Sets a timer for `deadline`, waking `waker` when it passes.
    pub fn set(&mut self, deadline: Instant, waker: Waker) -> TimerId {
        let index = super::claim(&mut self.slots, &mut self.free);
        let generation = match self.slots.get_mut(index as usize) {
            Some(s) => {
                s.live = true;
                s.fired = false;
                s.waker = Some(waker);
                s.generation
            }
            None => 0,
        };
        self.live += 1;
        if self.heap.len() > 2 * self.live + SLACK {
            self.compact();
        }
        self.heap.push(Reverse((deadline, index, generation)));
        TimerId { index, generation }
    }

    /// Whether timer `id` has fired; else its waker is replaced by `waker`.
    pub fn poll(&mut self, id: TimerId, waker: &Waker) -> bool {
        match self.slot(id) {
            Some(s) if s.fired => true,
            Some(s) => {
                if !s.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
                    s.waker = Some(waker.clone());
                }
                false
            }
            None => true,
        }
    }

    /// Removes timer `id` (fired or not).
    pub fn cancel(&mut self, id: TimerId) {
        if let Some(s) = self.slot(id) {
            s.live = false;
            s.fired = false;
            s.waker = None;
            s.generation = s.generation.wrapping_add(1);
            self.free.push(id.index);
            self.live = self.live.saturating_sub(1);
        }
    }

    /// Fires every timer whose deadline is not after `now`: its task is woken.
    pub fn fire(&mut self, now: Instant) {
        while let Some(Reverse((at, index, generation))) = self.heap.peek().copied() {
            if at > now {
                break;
            }
            self.heap.pop();
            if let Some(s) = self.slots.get_mut(index as usize) {
                if s.live && s.generation == generation && !s.fired {
                    s.fired = true;
                    if let Some(w) = s.waker.take() {
                        w.wake();
                    }
                }
            }
        }
    }

    /// The earliest deadline of a live timer that has not fired.
    pub fn next(&mut self) -> Option<Instant> {
        while let Some(Reverse((at, index, generation))) = self.heap.peek().copied() {
            match self.slots.get(index as usize) {
                Some(s) if s.live && s.generation == generation && !s.fired => return Some(at),
                _ => {
                    self.heap.pop();
                }
            }
        }
        None
    }

    fn slot(&mut self, id: TimerId) -> Option<&mut Slot> {
        self.slots
            .get_mut(id.index as usize)
            .filter(|s| s.live && s.generation == id.generation)
    }

    fn compact(&mut self) {
        let slots = &self.slots;
        self.heap.retain(|Reverse((_, i, g))| {
            slots
                .get(*i as usize)
                .is_some_and(|s| s.live && s.generation == *g && !s.fired)
        });
    }

    /// Heap entries, stale ones included (tests).
    #[cfg(test)]
    fn entries(&self) -> usize {
        self.heap.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;
    use std::time::Duration;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn waker() -> (Arc<Count>, Waker) {
        let c = Arc::new(Count(AtomicUsize::new(0)));
        (c.clone(), Waker::from(c))
    }

    #[test]
    fn fires_in_deadline_order_and_only_once() {
        let t0 = Instant::now();
        let mut t = Timers::default();
        let (a, wa) = waker();
        let (b, wb) = waker();
        let ia = t.set(t0 + Duration::from_millis(20), wa.clone());
        let ib = t.set(t0 + Duration::from_millis(10), wb.clone());
        assert_eq!(t.next(), Some(t0 + Duration::from_millis(10)));
        t.fire(t0 + Duration::from_millis(15));
        assert_eq!(b.0.load(Ordering::SeqCst), 1);
        assert_eq!(a.0.load(Ordering::SeqCst), 0);
        assert!(t.poll(ib, &wb));
        assert!(!t.poll(ia, &wa));
        assert_eq!(t.next(), Some(t0 + Duration::from_millis(20)));
        t.fire(t0 + Duration::from_millis(30));
        t.fire(t0 + Duration::from_millis(40));
        assert_eq!(a.0.load(Ordering::SeqCst), 1);
        assert_eq!(t.next(), None);
    }

    #[test]
    fn a_cancelled_timer_never_wakes_and_its_slot_is_reused() {
        let t0 = Instant::now();
        let mut t = Timers::default();
        let (a, wa) = waker();
        let ia = t.set(t0 + Duration::from_millis(5), wa.clone());
        t.cancel(ia);
        assert_eq!(t.next(), None);
        let (b, wb) = waker();
        let ib = t.set(t0 + Duration::from_millis(50), wb);
        assert_ne!(ia, ib, "a new generation");
        t.fire(t0 + Duration::from_millis(10));
        assert_eq!(a.0.load(Ordering::SeqCst), 0);
        assert_eq!(b.0.load(Ordering::SeqCst), 0);
        // The old handle names nothing now: cancelling it leaves the new timer alone.
        t.cancel(ia);
        t.fire(t0 + Duration::from_millis(60));
        assert_eq!(b.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn long_timers_set_and_cancelled_do_not_pile_up() {
        let t0 = Instant::now();
        let mut t = Timers::default();
        let (_, w) = waker();
        let keep = t.set(t0 + Duration::from_secs(1), w.clone());
        for _ in 0..100_000 {
            let id = t.set(t0 + Duration::from_secs(8 * 3600), w.clone());
            t.cancel(id);
        }
        assert!(t.entries() <= 2 * 2 + SLACK + 1, "{} entries", t.entries());
        assert_eq!(t.next(), Some(t0 + Duration::from_secs(1)));
        assert!(!t.poll(keep, &w));
    }
}
