//! A core's idle connections, by key: which one a borrower gets, which go when the
//! topology changes, which is closed to free the budget. Plain code over any connection
//! type (the pool's, or a test's).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::time::Duration;

/// What the idle set needs to know of a connection.
pub trait IdleConn {
    /// The target (index in its group's topology) and the epoch it was opened in.
    fn target(&self) -> usize;
    fn epoch(&self) -> u64;
    /// The default database it is on.
    fn schema(&self) -> Option<&[u8]>;
    /// When it went idle (a monotonic time).
    fn idle_since(&self) -> Duration;
}

/// Idle connections by key.
#[derive(Debug)]
pub struct IdleSet<K, C, S> {
    lists: HashMap<K, Vec<C>, S>,
    count: usize,
}

impl<K, C, S: Default> Default for IdleSet<K, C, S> {
    fn default() -> Self {
        IdleSet {
            lists: HashMap::with_hasher(S::default()),
            count: 0,
        }
    }
}

impl<K: Hash + Eq + Clone, C: IdleConn, S: BuildHasher> IdleSet<K, C, S> {
    pub fn len(&self) -> usize {
        self.count
    }

    /// Keeps `c` idle under `key` (it is the most recently idle one).
    pub fn push(&mut self, key: K, c: C) {
        self.lists.entry(key).or_default().push(c);
        self.count += 1;
    }

    /// A connection of `key` to `target` in `epoch` for a borrower: one already on `db`
    /// first, else any; the most recently idle first (warm caches, and the others age out).
    /// One idle for less than `check_after` at `now` is lent as it is; an older one only if
    /// `healthy` says so, otherwise it goes to `dead` and the next is tried.
    #[allow(clippy::too_many_arguments)]
    pub fn take(
        &mut self,
        key: &K,
        db: Option<&[u8]>,
        target: usize,
        epoch: u64,
        now: Duration,
        check_after: Duration,
        mut healthy: impl FnMut(&C) -> bool,
        dead: &mut Vec<C>,
    ) -> Option<C> {
        let list = self.lists.get_mut(key)?;
        loop {
            let mine = |c: &C| c.target() == target && c.epoch() == epoch;
            let i = list
                .iter()
                .rposition(|c| mine(c) && c.schema() == db)
                .or_else(|| list.iter().rposition(mine))?;
            let c = list.swap_remove(i);
            self.count -= 1;
            if now.saturating_sub(c.idle_since()) < check_after || healthy(&c) {
                return Some(c);
            }
            dead.push(c);
        }
    }

    /// Any idle connection of `key` (to hand to a starving borrower on another core).
    pub fn take_any(&mut self, key: &K) -> Option<C> {
        let c = self.lists.get_mut(key)?.pop()?;
        self.count -= 1;
        Some(c)
    }

    /// One idle connection of any key but `keep`, to close so that its budget frees up.
    pub fn evict_one(&mut self, keep: Option<&K>) -> Option<C> {
        for (k, list) in self.lists.iter_mut() {
            if Some(k) == keep {
                continue;
            }
            if let Some(c) = list.pop() {
                self.count -= 1;
                return Some(c);
            }
        }
        None
    }

    /// Whether a connection of another key than `key` is idle here.
    pub fn has_other_than(&self, key: &K) -> bool {
        self.lists.iter().any(|(k, l)| k != key && !l.is_empty())
    }

    /// Takes out every connection `keep` refuses (a target no longer on the route, a
    /// connection the server closed).
    pub fn remove_unless(&mut self, mut keep: impl FnMut(&C) -> bool) -> Vec<C> {
        let mut gone = Vec::new();
        for list in self.lists.values_mut() {
            let mut i = 0;
            while i < list.len() {
                if keep(&list[i]) {
                    i += 1;
                } else {
                    gone.push(list.swap_remove(i));
                }
            }
        }
        self.lists.retain(|_, l| !l.is_empty());
        self.count -= gone.len();
        gone
    }

    /// Takes out every connection (shutdown).
    pub fn drain(&mut self) -> Vec<C> {
        self.count = 0;
        self.lists.drain().flat_map(|(_, l)| l).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq)]
    struct C {
        id: u32,
        target: usize,
        epoch: u64,
        schema: Option<Vec<u8>>,
        since: u64,
    }

    impl IdleConn for C {
        fn target(&self) -> usize {
            self.target
        }
        fn epoch(&self) -> u64 {
            self.epoch
        }
        fn schema(&self) -> Option<&[u8]> {
            self.schema.as_deref()
        }
        fn idle_since(&self) -> Duration {
            Duration::from_millis(self.since)
        }
    }

    fn c(id: u32, target: usize, schema: &str, since: u64) -> C {
        C {
            id,
            target,
            epoch: 1,
            schema: (!schema.is_empty()).then(|| schema.as_bytes().to_vec()),
            since,
        }
    }

    type Set = IdleSet<&'static str, C, std::collections::hash_map::RandomState>;

    const WINDOW: Duration = Duration::from_millis(100);
    const NOW: Duration = Duration::from_millis(1000);

    fn take(s: &mut Set, key: &'static str, db: &str, target: usize) -> Option<u32> {
        let db = (!db.is_empty()).then_some(db.as_bytes());
        let mut dead = Vec::new();
        s.take(&key, db, target, 1, NOW, WINDOW, |_| true, &mut dead)
            .map(|c| c.id)
    }

    #[test]
    fn a_borrower_gets_its_own_database_first_then_the_most_recently_idle() {
        let mut s = Set::default();
        s.push("k", c(1, 0, "a", 950));
        s.push("k", c(2, 0, "b", 960));
        s.push("k", c(3, 0, "a", 970));
        s.push("k", c(4, 1, "b", 990));
        s.push("other", c(5, 0, "b", 990));
        assert_eq!(s.len(), 5);
        assert_eq!(take(&mut s, "k", "b", 0), Some(2), "on b, target 0");
        assert_eq!(
            take(&mut s, "k", "b", 0),
            Some(3),
            "none on b left: the newest"
        );
        assert_eq!(take(&mut s, "k", "", 1), Some(4), "target 1 only");
        assert_eq!(take(&mut s, "k", "", 1), None);
        assert_eq!(take(&mut s, "nobody", "", 0), None);
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn connections_idle_past_the_window_are_checked_and_dead_ones_dropped() {
        let mut s = Set::default();
        s.push("k", c(1, 0, "", 100));
        s.push("k", c(2, 0, "", 200));
        s.push("k", c(3, 0, "", 950));
        let mut dead = Vec::new();
        let mut checked = Vec::new();
        // The newest is within the window: lent without a check.
        let got = s.take(
            &"k",
            None,
            0,
            1,
            NOW,
            WINDOW,
            |c| {
                checked.push(c.id);
                false
            },
            &mut dead,
        );
        assert_eq!(got.map(|c| c.id), Some(3));
        assert!(checked.is_empty());
        // The others are old: 2 is dead, 1 is fine.
        let got = s.take(&"k", None, 0, 1, NOW, WINDOW, |c| c.id == 1, &mut dead);
        assert_eq!(got.map(|c| c.id), Some(1));
        assert_eq!(dead.iter().map(|c| c.id).collect::<Vec<_>>(), vec![2]);
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn stale_connections_and_evictions_keep_the_count() {
        let mut s = Set::default();
        s.push("a", c(1, 0, "", 0));
        s.push("a", c(2, 1, "", 0));
        s.push("b", c(3, 1, "", 0));
        let gone = s.remove_unless(|c| c.target == 0);
        assert_eq!(gone.len(), 2);
        assert_eq!(s.len(), 1);
        assert!(!s.has_other_than(&"a"));
        s.push("b", c(4, 0, "", 0));
        assert!(s.has_other_than(&"a"));
        assert_eq!(s.evict_one(Some(&"b")).map(|c| c.id), Some(1));
        assert_eq!(
            s.evict_one(Some(&"b")),
            None,
            "only b's is left, and b is kept"
        );
        assert_eq!(s.take_any(&"b").map(|c| c.id), Some(4));
        assert_eq!(s.len(), 0);
        s.push("b", c(5, 0, "", 0));
        assert_eq!(s.drain().len(), 1);
        assert_eq!(s.len(), 0);
    }
}
