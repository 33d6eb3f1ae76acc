//! Failed logins slow down their source: after `threshold` failures in a row from one
//! address (within [`FORGET_AFTER`] of each other), every further login from it waits
//! before its verdict, twice as long each time up to `max_delay` (as MySQL's
//! connection_control does). A successful login clears the address.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// An address's failures are forgotten this long after its last one.
pub const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);

/// Addresses remembered at most (the stalest are dropped first beyond it).
const MAX_ADDRESSES: usize = 100_000;

/// Failures per source address.
#[derive(Debug)]
pub struct LoginThrottle {
    threshold: u32,
    max_delay: Duration,
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
    /// Logins made to wait, and the time they waited (metrics).
    pub delayed: AtomicU64,
    pub delayed_us: AtomicU64,
    pub failed: AtomicU64,
}

impl LoginThrottle {
    /// `max_delay` zero: no throttling.
    pub fn new(threshold: u32, max_delay: Duration) -> Self {
        LoginThrottle {
            threshold,
            max_delay,
            failures: Mutex::new(HashMap::new()),
            delayed: AtomicU64::new(0),
            delayed_us: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }

    /// How long a login from `ip` waits before its verdict, now.
    pub fn delay(&self, ip: IpAddr, now: Instant) -> Duration {
        if self.max_delay.is_zero() {
            return Duration::ZERO;
        }
        let n = match self.failures.lock().get(&ip) {
            Some(&(n, last)) if now.saturating_duration_since(last) < FORGET_AFTER => n,
            _ => 0,
        };
        if n < self.threshold {
            return Duration::ZERO;
        }
        let steps = (n - self.threshold).min(20);
        Duration::from_millis(100)
            .saturating_mul(1 << steps)
            .min(self.max_delay)
    }

    /// Counts a wait that was served.
    pub fn waited(&self, d: Duration) {
        if !d.is_zero() {
            self.delayed.fetch_add(1, Ordering::Relaxed);
            self.delayed_us.fetch_add(
                d.as_micros().min(u128::from(u64::MAX)) as u64,
                Ordering::Relaxed,
            );
        }
    }

    pub fn failed(&self, ip: IpAddr, now: Instant) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut m = self.failures.lock();
        if m.len() >= MAX_ADDRESSES && !m.contains_key(&ip) {
            m.retain(|_, (_, last)| now.saturating_duration_since(*last) < FORGET_AFTER);
            if m.len() >= MAX_ADDRESSES {
                if let Some(stalest) = m.iter().min_by_key(|(_, (_, last))| *last).map(|(k, _)| *k)
                {
                    m.remove(&stalest);
                }
            }
        }
        let e = m.entry(ip).or_insert((0, now));
        if now.saturating_duration_since(e.1) >= FORGET_AFTER {
            e.0 = 0;
        }
        e.0 = e.0.saturating_add(1);
        e.1 = now;
    }

    pub fn succeeded(&self, ip: IpAddr) {
        self.failures.lock().remove(&ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_after_the_threshold_per_address_and_reset() {
        let t = LoginThrottle::new(3, Duration::from_secs(5));
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let now = Instant::now();
        for _ in 0..3 {
            assert_eq!(t.delay(a, now), Duration::ZERO);
            t.failed(a, now);
        }
        assert_eq!(t.delay(a, now), Duration::from_millis(100));
        t.failed(a, now);
        assert_eq!(t.delay(a, now), Duration::from_millis(200));
        for _ in 0..100 {
            t.failed(a, now);
        }
        assert_eq!(t.delay(a, now), Duration::from_secs(5));
        // Another address is not slowed; the address is forgotten after a while.
        assert_eq!(t.delay(b, now), Duration::ZERO);
        assert_eq!(t.delay(a, now + FORGET_AFTER), Duration::ZERO);
        t.succeeded(a);
        assert_eq!(t.delay(a, now), Duration::ZERO);
        assert_eq!(
            LoginThrottle::new(3, Duration::ZERO).delay(a, now),
            Duration::ZERO
        );
    }
}
