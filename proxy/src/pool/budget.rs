//! A target group's `max_connections`, shared by every core: a semaphore of permits, one
//! per open connection. A reload that lowers the limit below what is open takes idle
//! permits out at once and records the rest as a debt that connections pay off as they
//! close, so that none is cut off.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The budget of one pool.
#[derive(Debug)]
pub struct Budget {
    sem: Arc<Semaphore>,
    /// `max_connections` now.
    max: AtomicUsize,
    /// Permits still to take out of circulation after the limit shrank below what is open.
    debt: Arc<AtomicUsize>,
}

/// One connection's share of a budget. Given back when dropped, unless the budget is owed
/// permits: then it pays one of the debt instead.
#[derive(Debug)]
pub struct Permit {
    permit: Option<OwnedSemaphorePermit>,
    debt: Arc<AtomicUsize>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let Some(p) = self.permit.take() else {
            return;
        };
        let paid = self
            .debt
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| d.checked_sub(1))
            .is_ok();
        if paid {
            p.forget();
        }
    }
}

impl Budget {
    pub fn new(max: usize) -> Budget {
        Budget {
            sem: Arc::new(Semaphore::new(max)),
            max: AtomicUsize::new(max),
            debt: Arc::default(),
        }
    }

    /// `max_connections` now.
    pub fn max(&self) -> usize {
        self.max.load(Ordering::Acquire)
    }

    /// Connections open now (permits out).
    pub fn open(&self) -> usize {
        (self.max() + self.debt.load(Ordering::Acquire))
            .saturating_sub(self.sem.available_permits())
    }

    /// Permits owed (the limit shrank below what is open by this many).
    pub fn owed(&self) -> usize {
        self.debt.load(Ordering::Acquire)
    }

    /// Whether the budget is owed permits (the limit shrank below what is open).
    pub fn over(&self) -> bool {
        self.debt.load(Ordering::Acquire) > 0
    }

    fn wrap(&self, p: OwnedSemaphorePermit) -> Permit {
        Permit {
            permit: Some(p),
            debt: self.debt.clone(),
        }
    }

    /// A permit, if one is free now.
    pub fn try_take(&self) -> Option<Permit> {
        self.sem
            .clone()
            .try_acquire_owned()
            .ok()
            .map(|p| self.wrap(p))
    }

    /// A permit, once one is free.
    pub async fn take(&self) -> Option<Permit> {
        let p = self.sem.clone().acquire_owned().await.ok()?;
        Some(self.wrap(p))
    }

    /// A new limit: more permits at once (what is still owed paid first), or fewer (the
    /// free ones taken out now, the rest owed).
    pub fn resize(&self, max: usize) {
        let old = self.max.swap(max, Ordering::AcqRel);
        if max > old {
            let mut grow = max - old;
            while grow > 0 {
                let d = self.debt.load(Ordering::Acquire);
                if d == 0 {
                    break;
                }
                let pay = d.min(grow);
                if self
                    .debt
                    .compare_exchange(d, d - pay, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    grow -= pay;
                }
            }
            self.sem.add_permits(grow);
        } else if max < old {
            let shrink = old - max;
            let taken = self.sem.forget_permits(shrink);
            self.debt.fetch_add(shrink - taken, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_count_open_connections() {
        let b = Budget::new(2);
        let p1 = b.try_take().unwrap();
        let p2 = b.try_take().unwrap();
        assert!(b.try_take().is_none());
        assert_eq!(b.open(), 2);
        drop(p1);
        assert_eq!(b.open(), 1);
        drop(p2);
        assert_eq!(b.open(), 0);
    }

    /// Shrinking below what is open cuts nothing off: the open connections pay the debt as
    /// they close; growing again pays what is still owed first.
    #[test]
    fn a_smaller_budget_is_paid_off_as_connections_close() {
        let b = Budget::new(4);
        let ps: Vec<Permit> = (0..3).map(|_| b.try_take().unwrap()).collect();
        b.resize(1);
        assert_eq!(b.max(), 1);
        assert!(
            b.over(),
            "three open, one allowed: two owed (one free permit taken)"
        );
        assert_eq!(b.open(), 3);
        assert!(b.try_take().is_none());
        let mut ps = ps.into_iter();
        drop(ps.next());
        drop(ps.next());
        assert!(!b.over(), "two closed: the debt is paid");
        assert_eq!(b.open(), 1);
        assert!(b.try_take().is_none(), "one open of one");
        b.resize(3);
        let extra: Vec<Permit> = (0..2).map(|_| b.try_take().unwrap()).collect();
        assert_eq!(b.open(), 3);
        drop(extra);
        drop(ps);
        assert_eq!(b.open(), 0);
        // Owed, then grown before anything closed: the growth pays the debt.
        let held: Vec<Permit> = (0..3).map(|_| b.try_take().unwrap()).collect();
        b.resize(1);
        b.resize(3);
        assert!(!b.over());
        assert!(b.try_take().is_none(), "three open of three");
        drop(held);
        assert_eq!(b.open(), 0);
    }
}
