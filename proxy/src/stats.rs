//! Counters the data path updates and the admin side reads: latency histograms, each
//! endpoint's client counters, and small logs of recent events. Plain atomics, no locks on
//! the data path; nothing here knows how it is exported. What every statement counts is
//! striped by worker ([`Counter`], [`Latency`]): each core adds to a cache line of its own,
//! and a scrape sums the stripes.

use crossbeam::utils::CachePadded;
use parking_lot::Mutex;
use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Stripes of a per-statement counter; workers beyond this share them.
pub const STRIPES: usize = 8;

thread_local! {
    /// This thread's stripe (a worker's index; 0 for every other thread).
    static STRIPE: Cell<usize> = const { Cell::new(0) };
}

/// Makes this thread (worker `index`) count in its own stripe.
pub fn set_stripe(index: usize) {
    STRIPE.with(|s| s.set(index % STRIPES));
}

fn stripe() -> usize {
    STRIPE.with(Cell::get)
}

/// A counter added to on every statement: one cache line per worker, so that cores do not
/// take the line from each other at every statement.
#[derive(Debug, Default)]
pub struct Counter {
    stripes: [CachePadded<AtomicU64>; STRIPES],
}

impl Counter {
    pub fn add(&self, n: u64) {
        if let Some(s) = self.stripes.get(stripe()) {
            s.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// The total so far.
    pub fn get(&self) -> u64 {
        self.stripes.iter().map(|s| s.load(Ordering::Relaxed)).sum()
    }
}

/// Upper bounds (seconds) of the latency histograms' buckets: 50 µs to 10 s.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 10.0,
];

/// How many reasons a split endpoint has to send a statement to the writer
/// (`routing::WriterWhy::ALL` has this length).
pub const SPLIT_WRITER_REASONS: usize = 9;

/// What a split endpoint's routing did (`routing::`), kept by the writer's pool of its
/// target group.
#[derive(Debug, Default)]
pub struct SplitStats {
    /// Statements sent to a reader.
    pub to_reader: Counter,
    /// Statements a split endpoint sent to the writer, by why (`routing::WriterWhy`'s
    /// order).
    pub to_writer: [AtomicU64; SPLIT_WRITER_REASONS],
    /// Reads that waited on a reader for the client's causal position.
    pub causal_waits: AtomicU64,
    /// Waits that timed out (the read then went to the writer).
    pub causal_timeouts: AtomicU64,
    /// Reads that needed no wait: their reader was known to have the client's position.
    pub causal_known: AtomicU64,
    /// How long the waits took (the wait's answer, which comes ahead of the read's).
    pub causal_wait: Latency,
}

/// A latency histogram over [`LATENCY_BUCKETS`] (the last slot counts the rest), striped
/// by worker as [`Counter`] is.
#[derive(Debug, Default)]
pub struct Latency {
    stripes: [CachePadded<LatencyStripe>; STRIPES],
}

#[derive(Debug, Default)]
struct LatencyStripe {
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

/// A histogram read at one moment: cumulative counts per upper bound, `+Inf` last.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    pub sum_seconds: f64,
    pub count: u64,
    pub buckets: Vec<(f64, u64)>,
}

impl Latency {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        let Some(s) = self.stripes.get(stripe()) else {
            return;
        };
        if let Some(b) = s.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        s.sum_ns.fetch_add(
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// The histogram with `zero` more observations of no time at all (borrows served
    /// without waiting are counted, not timed).
    pub fn snapshot_with_zeros(&self, zero: u64) -> HistogramSnapshot {
        let mut cumulative = zero;
        let mut buckets = Vec::with_capacity(LATENCY_BUCKETS.len() + 1);
        for i in 0..=LATENCY_BUCKETS.len() {
            cumulative += self
                .stripes
                .iter()
                .filter_map(|s| s.buckets.get(i))
                .map(|n| n.load(Ordering::Relaxed))
                .sum::<u64>();
            buckets.push((
                LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY),
                cumulative,
            ));
        }
        HistogramSnapshot {
            sum_seconds: self
                .stripes
                .iter()
                .map(|s| s.sum_ns.load(Ordering::Relaxed))
                .sum::<u64>() as f64
                / 1e9,
            count: cumulative,
            buckets,
        }
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        self.snapshot_with_zeros(0)
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.stripes
            .iter()
            .flat_map(|s| s.buckets.iter())
            .map(|b| b.load(Ordering::Relaxed))
            .sum()
    }
}

/// What an endpoint ([[endpoints]]) counts about its clients: RDS Proxy's client metrics.
#[derive(Debug)]
pub struct EndpointStats {
    pub name: String,
    pub listen: String,
    pub target_group: String,
    /// `read_write` or `read_only`.
    pub role: &'static str,
    /// Open now (logging in included).
    pub clients: AtomicI64,
    /// Logged in over TLS and connected now.
    pub tls_clients: AtomicI64,
    pub received: AtomicU64,
    pub closed: AtomicU64,
    pub setup_succeeded: AtomicU64,
    /// Refused for a wrong password, an unknown user or a bad token.
    pub setup_failed_auth: AtomicU64,
    /// Statements received (COM_QUERY, COM_STMT_EXECUTE, COM_STMT_BULK_EXECUTE).
    pub queries: Counter,
    /// Statement received to its response sent.
    pub query_latency: Latency,
}

impl EndpointStats {
    pub fn new(name: &str, listen: &str, target_group: &str, role: &'static str) -> Self {
        EndpointStats {
            name: name.to_string(),
            listen: listen.to_string(),
            target_group: target_group.to_string(),
            role,
            clients: AtomicI64::new(0),
            tls_clients: AtomicI64::new(0),
            received: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            setup_succeeded: AtomicU64::new(0),
            setup_failed_auth: AtomicU64::new(0),
            queries: Counter::default(),
            query_latency: Latency::default(),
        }
    }

    /// A client connected: counted until the returned guard is dropped.
    pub fn connected(&self) -> ClientGuard<'_> {
        self.received.fetch_add(1, Ordering::Relaxed);
        self.clients.fetch_add(1, Ordering::AcqRel);
        ClientGuard(self)
    }
}

/// Counts a client as open until dropped (every exit path of a session).
pub struct ClientGuard<'a>(&'a EndpointStats);

impl Drop for ClientGuard<'_> {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::AcqRel);
        self.0.closed.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counts a gauge up until dropped.
pub struct GaugeGuard<'a>(&'a AtomicI64);

impl<'a> GaugeGuard<'a> {
    pub fn new(g: &'a AtomicI64) -> Self {
        g.fetch_add(1, Ordering::AcqRel);
        GaugeGuard(g)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The last few events of a kind (failovers, guard denials), newest last.
#[derive(Debug)]
pub struct Recent<T> {
    keep: usize,
    events: Mutex<VecDeque<T>>,
}

impl<T: Clone> Recent<T> {
    pub fn new(keep: usize) -> Self {
        Recent {
            keep,
            events: Mutex::new(VecDeque::with_capacity(keep)),
        }
    }

    pub fn push(&self, e: T) {
        let mut q = self.events.lock();
        if q.len() >= self.keep {
            q.pop_front();
        }
        q.push_back(e);
    }

    pub fn list(&self) -> Vec<T> {
        self.events.lock().iter().cloned().collect()
    }
}

/// Seconds since the Unix epoch, now (for events shown to people).
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripes_of_several_workers_add_up() {
        let c = std::sync::Arc::new(Counter::default());
        let l = std::sync::Arc::new(Latency::default());
        let threads: Vec<_> = (0..STRIPES + 2)
            .map(|i| {
                let (c, l) = (c.clone(), l.clone());
                std::thread::spawn(move || {
                    set_stripe(i);
                    for _ in 0..1000 {
                        c.add(1);
                        l.observe(Duration::from_micros(70));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("worker");
        }
        let n = 1000 * (STRIPES as u64 + 2);
        assert_eq!(c.get(), n);
        assert_eq!(l.count(), n);
        let s = l.snapshot();
        assert_eq!(s.count, n);
        // 70 µs falls in the 100 µs bucket, not the 50 µs one.
        assert_eq!(s.buckets.first().map(|b| b.1), Some(0));
        assert_eq!(s.buckets.get(1).map(|b| b.1), Some(n));
        assert!((s.sum_seconds - n as f64 * 70e-6).abs() < 1e-6);
    }

    #[test]
    fn latency_buckets_are_cumulative_and_count_zeros() {
        let l = Latency::default();
        l.observe(Duration::from_micros(30));
        l.observe(Duration::from_millis(3));
        l.observe(Duration::from_secs(60));
        let s = l.snapshot_with_zeros(2);
        assert_eq!(s.count, 5);
        assert_eq!(s.buckets.first(), Some(&(0.00005, 3)));
        let at_5ms = s.buckets.iter().find(|(b, _)| *b == 0.005).map(|b| b.1);
        assert_eq!(at_5ms, Some(4));
        assert_eq!(s.buckets.last(), Some(&(f64::INFINITY, 5)));
        assert!((s.sum_seconds - 60.00303).abs() < 1e-6);
        assert_eq!(l.count(), 3);
    }

    #[test]
    fn recent_keeps_the_newest() {
        let r = Recent::new(2);
        for i in 0..5 {
            r.push(i);
        }
        assert_eq!(r.list(), vec![3, 4]);
    }

    #[test]
    fn client_guard_counts_open_and_closed() {
        let e = EndpointStats::new("e", "127.0.0.1:1", "g", "read_write");
        {
            let _a = e.connected();
            let _b = e.connected();
            assert_eq!(e.clients.load(Ordering::Relaxed), 2);
        }
        assert_eq!(e.clients.load(Ordering::Relaxed), 0);
        assert_eq!(e.closed.load(Ordering::Relaxed), 2);
        assert_eq!(e.received.load(Ordering::Relaxed), 2);
    }
}
