//! Who waits for a connection: borrowers on this core, by key, and borrowers on any core
//! that found the budget spent ("starving"), in the order they started waiting. Plain
//! queues over any handle that can tell whether its borrower gave up; the pool owns the
//! channels behind the handles.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash};
use std::time::Duration;

/// A waiting borrower's handle.
pub trait Waiter {
    /// The borrower gave up (timed out, left): nothing is handed to it any more.
    fn gone(&self) -> bool;
}

/// Whom a waiting borrower waits for: its tenant (0: none) and the tenant's weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Class {
    pub id: u64,
    pub weight: u32,
}

impl Class {
    pub const NONE: Class = Class { id: 0, weight: 1 };

    /// `t`'s turns: none in a dry run (waiting borrowers served in arrival order).
    pub fn of(t: &crate::tenants::Tenant) -> Class {
        if t.dry_run() {
            Class::NONE
        } else {
            Class {
                id: t.id,
                weight: t.weight(),
            }
        }
    }
}

/// A tenant's virtual time grows by this over its weight per connection it is served.
const STRIDE: u64 = 1 << 20;

/// Whose turn it is among waiting tenants (stride scheduling): the tenant served least for
/// its weight goes first. One per core and pool.
#[derive(Debug, Default)]
pub struct Turns {
    /// Each tenant's pass (virtual time at which it is next served).
    pass: HashMap<u64, u64>,
    /// The pass of the last borrower served: a tenant that was not waiting starts here.
    vtime: u64,
}

impl Turns {
    /// Of `waiting` (position, tenant), in arrival order, the one to serve: the first of the
    /// tenant with the lowest pass. With its pass, for [`Turns::served`].
    pub fn pick(&self, waiting: impl Iterator<Item = (usize, Class)>) -> Option<(usize, u64)> {
        let mut best: Option<(u64, usize)> = None;
        for (i, class) in waiting {
            let pass = self
                .pass
                .get(&class.id)
                .copied()
                .unwrap_or(self.vtime)
                .max(self.vtime);
            if best.is_none_or(|(b, _)| pass < b) {
                best = Some((pass, i));
            }
        }
        best.map(|(pass, i)| (i, pass))
    }

    /// `class`, picked at `pass`, was served.
    pub fn served(&mut self, class: Class, pass: u64) {
        self.vtime = pass;
        self.pass
            .insert(class.id, pass + STRIDE / u64::from(class.weight.max(1)));
    }
}

/// Borrowers on this core waiting for a connection of their key: served by weighted fair
/// queueing across tenants (stride scheduling: the tenant served least for its weight goes
/// first), oldest first within a tenant. With one tenant, plain FIFO.
#[derive(Debug)]
pub struct LocalWaiters<K, W, S> {
    by_key: HashMap<K, VecDeque<(Duration, Class, W)>, S>,
    turns: Turns,
}

impl<K, W, S: Default> Default for LocalWaiters<K, W, S> {
    fn default() -> Self {
        LocalWaiters {
            by_key: HashMap::with_hasher(S::default()),
            turns: Turns::default(),
        }
    }
}

impl<K: Hash + Eq, W: Waiter, S: BuildHasher> LocalWaiters<K, W, S> {
    /// `w`, of tenant `class`, waits for `key` since `since`.
    pub fn push(&mut self, key: K, since: Duration, class: Class, w: W) {
        self.by_key
            .entry(key)
            .or_default()
            .push_back((since, class, w));
    }

    /// Since when the longest-waiting borrower of `key` that has not given up waits.
    pub fn oldest(&self, key: &K) -> Option<Duration> {
        self.by_key
            .get(key)?
            .iter()
            .find(|(_, _, w)| !w.gone())
            .map(|(t, _, _)| *t)
    }

    /// The next borrower of `key` to serve: of the tenant with the lowest pass, its
    /// longest-waiting borrower that has not given up (those that gave up are dropped).
    pub fn pop(&mut self, key: &K) -> Option<W> {
        let q = self.by_key.get_mut(key)?;
        q.retain(|(_, _, w)| !w.gone());
        let best = self
            .turns
            .pick(q.iter().enumerate().map(|(i, (_, c, _))| (i, *c)));
        let picked = best.and_then(|(i, pass)| Some((pass, q.remove(i)?)));
        if q.is_empty() {
            self.by_key.remove(key);
        }
        let (pass, (_, class, w)) = picked?;
        self.turns.served(class, pass);
        Some(w)
    }

    /// Forgets borrowers that gave up.
    pub fn prune(&mut self) {
        for q in self.by_key.values_mut() {
            q.retain(|(_, _, w)| !w.gone());
        }
        self.by_key.retain(|_, q| !q.is_empty());
    }

    /// Borrowers waiting (those that gave up and were not pruned included).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_key.values().map(VecDeque::len).sum()
    }
}

/// A borrower on some core that found the budget spent.
#[derive(Debug)]
pub struct Starving<K, W> {
    pub key: K,
    pub waiter: W,
    /// A core already closed an idle connection of another key to free budget for it.
    pub freed: bool,
    /// When it started waiting.
    pub since: Duration,
}

/// Every core's starving borrowers of one group, oldest first.
#[derive(Debug)]
pub struct StarvingQueue<K, W> {
    q: VecDeque<Starving<K, W>>,
}

impl<K, W> Default for StarvingQueue<K, W> {
    fn default() -> Self {
        StarvingQueue { q: VecDeque::new() }
    }
}

impl<K: PartialEq, W: Waiter> StarvingQueue<K, W> {
    pub fn push(&mut self, key: K, since: Duration, waiter: W) {
        self.q.push_back(Starving {
            key,
            waiter,
            freed: false,
            since,
        });
    }

    /// Forgets borrowers that gave up; how many are left.
    pub fn prune(&mut self) -> usize {
        self.q.retain(|s| !s.waiter.gone());
        self.q.len()
    }

    pub fn len(&self) -> usize {
        self.q.len()
    }

    /// The longest-waiting borrower of `key`, taken out of the queue.
    pub fn take(&mut self, key: &K) -> Option<W> {
        let i = self.q.iter().position(|s| s.key == *key)?;
        self.q.remove(i).map(|s| s.waiter)
    }

    /// Since when the longest-waiting borrower of `key` waits.
    pub fn oldest(&self, key: &K) -> Option<Duration> {
        self.q.iter().find(|s| s.key == *key).map(|s| s.since)
    }

    /// Whether a borrower of `key` is waiting.
    pub fn wants(&self, key: &K) -> bool {
        self.q.iter().any(|s| s.key == *key)
    }

    /// Marks the longest-waiting borrower whose key `pred` accepts, and for whom nobody
    /// freed budget yet, as served by a connection closed for it; whether there was one.
    pub fn claim(&mut self, pred: impl Fn(&K) -> bool) -> bool {
        match self.q.iter_mut().find(|s| !s.freed && pred(&s.key)) {
            Some(s) => {
                s.freed = true;
                true
            }
            None => false,
        }
    }

    /// The keys waited for, oldest first.
    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.q.iter().map(|s| &s.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    /// A waiter that can give up from outside.
    #[derive(Debug, Clone)]
    struct W(u32, Rc<Cell<bool>>);

    impl Waiter for W {
        fn gone(&self) -> bool {
            self.1.get()
        }
    }

    fn w(id: u32) -> W {
        W(id, Rc::new(Cell::new(false)))
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn local_waiters_are_served_oldest_first_and_those_that_left_are_skipped() {
        let mut l: LocalWaiters<&str, W, std::collections::hash_map::RandomState> =
            LocalWaiters::default();
        let (a, b, c) = (w(1), w(2), w(3));
        l.push("k", ms(10), Class::NONE, a.clone());
        l.push("k", ms(20), Class::NONE, b.clone());
        l.push("other", ms(5), Class::NONE, c);
        assert_eq!(l.oldest(&"k"), Some(ms(10)));
        a.1.set(true);
        assert_eq!(l.oldest(&"k"), Some(ms(20)), "the first one left");
        assert_eq!(l.pop(&"k").map(|w| w.0), Some(2));
        assert_eq!(l.pop(&"k").map(|w| w.0), None);
        assert_eq!(l.len(), 1);
        l.push("k", ms(30), Class::NONE, b.clone());
        b.1.set(true);
        l.prune();
        assert_eq!(l.len(), 1, "only other's is left");
    }

    /// A tenant with 60 borrowers queued ahead does not make another wait behind them all:
    /// with weights 1:1 they take turns, with 3:1 the heavier gets three of four.
    #[test]
    fn tenants_take_turns_by_weight() {
        let mut l: LocalWaiters<&str, W, std::collections::hash_map::RandomState> =
            LocalWaiters::default();
        let a = Class { id: 1, weight: 1 };
        let b = Class { id: 2, weight: 1 };
        for i in 0..60 {
            l.push("k", ms(i), a, w(100 + i as u32));
        }
        for i in 0..4 {
            l.push("k", ms(100 + i), b, w(200 + i as u32));
        }
        let order: Vec<u32> = (0..8).filter_map(|_| l.pop(&"k")).map(|w| w.0).collect();
        assert_eq!(order, [100, 200, 101, 201, 102, 202, 103, 203]);
        let mut l: LocalWaiters<&str, W, std::collections::hash_map::RandomState> =
            LocalWaiters::default();
        let heavy = Class { id: 3, weight: 3 };
        for i in 0..20 {
            l.push("k", ms(i), a, w(i as u32));
            l.push("k", ms(i), heavy, w(1000 + i as u32));
        }
        let heavy_served = (0..8)
            .filter_map(|_| l.pop(&"k"))
            .filter(|w| w.0 >= 1000)
            .count();
        assert_eq!(heavy_served, 6);
    }

    #[test]
    fn starving_borrowers_are_taken_by_key_and_claimed_once() {
        let mut q: StarvingQueue<&str, W> = StarvingQueue::default();
        let (a, b, c) = (w(1), w(2), w(3));
        q.push("x", ms(1), a.clone());
        q.push("y", ms(2), b);
        q.push("x", ms(3), c);
        assert_eq!(q.oldest(&"x"), Some(ms(1)));
        assert!(q.wants(&"y") && !q.wants(&"z"));
        // Budget freed for a key other than x: y's borrower, once only.
        assert!(q.claim(|k| *k != "x"));
        assert!(!q.claim(|k| *k != "x"), "y was served already");
        assert!(q.claim(|k| *k == "x"), "x's first");
        assert_eq!(q.keys().copied().collect::<Vec<_>>(), vec!["x", "y", "x"]);
        a.1.set(true);
        assert_eq!(q.prune(), 2);
        assert_eq!(q.take(&"x").map(|w| w.0), Some(3));
        assert_eq!(q.take(&"x").map(|w| w.0), None);
        assert_eq!(q.len(), 1);
    }
}
