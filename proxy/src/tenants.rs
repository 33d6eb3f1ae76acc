//! Tenants inside one instance: each dbproxy user's share of the database connections.
//!
//! A user's `max_database_connections` bounds the connections its sessions hold at once
//! (all pools, all cores); its `weight` orders it among the users waiting for a pool's
//! connections (weighted fair queueing, `pool::waiting`). Users that log in to the
//! database as the same login count apart. With `[proxy] tenant_dry_run`, nobody waits for
//! a limit and waiting borrowers are served in turn, as without tenants: what would have
//! waited is counted.

use crate::stats::Latency;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One user's state, shared by its sessions on every core; kept across reloads.
#[derive(Debug)]
pub struct Tenant {
    pub name: String,
    /// A small number naming it in the pools' fair queues.
    pub id: u64,
    /// `max_database_connections` (0: none).
    limit: AtomicUsize,
    weight: AtomicU32,
    dry_run: AtomicBool,
    /// Places taken under its limit now: connections held, and borrows waiting for the
    /// pool with their place.
    borrowed: AtomicUsize,
    /// Connections its sessions hold now.
    holding: AtomicUsize,
    /// Its sessions waiting for a connection now (for its limit or the pool).
    pub waiting: AtomicI64,
    /// Connections borrowed, in all.
    pub borrows: AtomicU64,
    /// How long borrows waited (for its limit and the pool).
    pub wait: Latency,
    /// Borrows that gave up (timed out) while it was at its limit.
    pub refusals: AtomicU64,
    /// Dry run: borrows that went over its limit (would have waited).
    pub over_limit: AtomicU64,
    freed: tokio::sync::Notify,
}

/// A place under a tenant's limit; gives it back when dropped.
#[derive(Debug)]
pub struct TenantPermit {
    tenant: Arc<Tenant>,
    /// A connection is attached to it (counted as held).
    holding: bool,
    /// Counted in `borrowed` (a user with a limit, or in a dry run): a user without one
    /// pays nothing more per borrow than the held gauge.
    counted: bool,
}

impl Drop for TenantPermit {
    fn drop(&mut self) {
        if self.holding {
            self.tenant.holding.fetch_sub(1, Ordering::AcqRel);
        }
        if self.counted {
            self.tenant.borrowed.fetch_sub(1, Ordering::AcqRel);
            self.tenant.freed.notify_one();
        }
    }
}

impl TenantPermit {
    fn new(tenant: Arc<Tenant>, counted: bool) -> TenantPermit {
        TenantPermit {
            tenant,
            holding: false,
            counted,
        }
    }

    pub fn tenant(&self) -> &Arc<Tenant> {
        &self.tenant
    }

    /// A connection is attached to this place now.
    pub fn holds(&mut self) {
        if !std::mem::replace(&mut self.holding, true) {
            self.tenant.holding.fetch_add(1, Ordering::AcqRel);
        }
    }
}

impl Tenant {
    fn new(name: &str, id: u64) -> Tenant {
        Tenant {
            name: name.to_string(),
            id,
            limit: AtomicUsize::new(0),
            weight: AtomicU32::new(1),
            dry_run: AtomicBool::new(false),
            borrowed: AtomicUsize::new(0),
            holding: AtomicUsize::new(0),
            waiting: AtomicI64::new(0),
            borrows: AtomicU64::new(0),
            wait: Latency::default(),
            refusals: AtomicU64::new(0),
            over_limit: AtomicU64::new(0),
            freed: tokio::sync::Notify::new(),
        }
    }

    /// Applies (re)loaded settings.
    pub fn configure(&self, limit: Option<usize>, weight: u32, dry_run: bool) {
        self.limit.store(limit.unwrap_or(0), Ordering::Release);
        self.weight.store(weight.max(1), Ordering::Release);
        self.dry_run.store(dry_run, Ordering::Release);
        // A higher limit lets waiting sessions go.
        self.freed.notify_waiters();
    }

    /// `tenant_dry_run`: limits and weights only counted, waiting borrowers served in turn.
    pub fn dry_run(&self) -> bool {
        self.dry_run.load(Ordering::Acquire)
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Acquire)
    }

    pub fn limit(&self) -> Option<usize> {
        match self.limit.load(Ordering::Acquire) {
            0 => None,
            n => Some(n),
        }
    }

    /// Connections its sessions hold now.
    pub fn holding(&self) -> usize {
        self.holding.load(Ordering::Acquire)
    }

    /// Places taken under its limit (connections held and borrows waiting for the pool);
    /// counted only while it has a limit.
    pub fn borrowed(&self) -> usize {
        self.borrowed.load(Ordering::Acquire)
    }

    /// A place under its limit, if one is free now (always, without a limit or in a dry run).
    pub fn try_take(self: &Arc<Self>) -> Option<TenantPermit> {
        let limit = self.limit.load(Ordering::Acquire);
        if limit == 0 {
            return Some(TenantPermit::new(self.clone(), false));
        }
        if self.dry_run.load(Ordering::Acquire) {
            if self.borrowed.fetch_add(1, Ordering::AcqRel) >= limit {
                self.over_limit.fetch_add(1, Ordering::Relaxed);
            }
            return Some(TenantPermit::new(self.clone(), true));
        }
        self.borrowed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| TenantPermit::new(self.clone(), true))
    }

    /// A place under its limit, once one is free; `None` at `deadline`.
    pub async fn take(self: &Arc<Self>, deadline: Instant) -> Option<TenantPermit> {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(p) = self.try_take() {
                return Some(p);
            }
            if crate::rt::time::timeout_at(deadline, freed).await.is_err() {
                self.refusals.fetch_add(1, Ordering::Relaxed);
                // A wake-up this waiter took without using it goes to the next one.
                self.freed.notify_one();
                return None;
            }
        }
    }

    /// A borrow that waited `d` in all.
    pub fn waited(&self, d: Duration) {
        self.wait.observe(d);
    }
}

/// Every user's tenant, by name.
#[derive(Debug, Default)]
pub struct Tenants {
    by_name: parking_lot::Mutex<HashMap<String, Arc<Tenant>>>,
}

impl Tenants {
    /// `name`'s tenant with these settings (made at its first login).
    pub fn get(&self, name: &str, limit: Option<usize>, weight: u32, dry_run: bool) -> Arc<Tenant> {
        let mut m = self.by_name.lock();
        let id = m.len() as u64 + 1;
        let t = m
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(Tenant::new(name, id)))
            .clone();
        t.configure(limit, weight, dry_run);
        t
    }

    /// Every tenant, by name.
    pub fn all(&self) -> Vec<Arc<Tenant>> {
        let mut v: Vec<Arc<Tenant>> = self.by_name.lock().values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_holds_and_a_dry_run_only_counts() {
        let ts = Tenants::default();
        let a = ts.get("a", Some(2), 1, false);
        let p1 = a.try_take().unwrap();
        let _p2 = a.try_take().unwrap();
        assert!(a.try_take().is_none());
        assert_eq!(a.borrowed(), 2);
        drop(p1);
        assert!(a.try_take().is_some());
        let a = ts.get("a", Some(2), 1, true);
        let held: Vec<TenantPermit> = (0..4).filter_map(|_| a.try_take()).collect();
        assert_eq!(held.len(), 4);
        assert!(a.over_limit.load(Ordering::Relaxed) >= 2);
        let b = ts.get("b", None, 3, false);
        assert_eq!((b.weight(), b.limit()), (3, None));
        assert_ne!(a.id, b.id);
    }

    #[tokio::test]
    async fn a_waiting_session_gets_the_place_given_back() {
        let ts = Tenants::default();
        let a = ts.get("a", Some(1), 1, false);
        let p = a.try_take().unwrap();
        let a2 = a.clone();
        let waiter =
            tokio::spawn(async move { a2.take(Instant::now() + Duration::from_secs(5)).await });
        tokio::task::yield_now().await;
        drop(p);
        assert!(waiter.await.unwrap().is_some());
        let _p = a.try_take();
        assert!(a
            .take(Instant::now() + Duration::from_millis(20))
            .await
            .is_none());
        assert_eq!(a.refusals.load(Ordering::Relaxed), 1);
    }
}
