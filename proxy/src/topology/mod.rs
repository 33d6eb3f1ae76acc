//! Target groups' topology: each target's role (writer, reader, unavailable), health,
//! replication lag and the generation they were decided in.
//!
//! A monitor per group ([`monitor`]) checks every target on connections of its own and
//! feeds [`decide::Decider`], which is sans-IO. Each decision is published whole as a
//! [`Snapshot`] that every core reads lock-free; the data path reports what it sees (a
//! connection reset or refused, a writer that refused a write as read-only) with
//! [`Topology::suspect`], which gets the target checked at once.

pub mod decide;
pub mod monitor;
pub mod probe;

pub use crate::target::{BackendAddr, ReaderFallback, MAX_TARGETS};
use arc_swap::ArcSwap;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// What a target does now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetRole {
    Writer,
    Reader,
    /// Down, not checked yet, or a second writer left unused.
    Unavailable,
}

impl TargetRole {
    pub fn name(self) -> &'static str {
        match self {
            TargetRole::Writer => "writer",
            TargetRole::Reader => "reader",
            TargetRole::Unavailable => "unavailable",
        }
    }
}

/// Replication lag as a target reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lag {
    /// Not a replica (no replication configured).
    None,
    /// Replicating, this many seconds behind.
    Seconds(u64),
    /// Replication configured but not running (or no lag reported).
    Stopped,
    /// Could not be read (privileges, or not checked yet).
    Unknown,
}

impl Lag {
    /// Whether a reader with this lag may serve reads under `max` (`None`: no limit).
    pub fn within(self, max: Option<Duration>) -> bool {
        match (self, max) {
            (_, None) => true,
            (Lag::None | Lag::Unknown, Some(_)) => true,
            (Lag::Seconds(s), Some(m)) => Duration::from_secs(s) <= m,
            (Lag::Stopped, Some(_)) => false,
        }
    }

    /// Seconds behind, for metrics (`-1`: not replicating or unknown).
    pub fn seconds(self) -> i64 {
        match self {
            Lag::Seconds(s) => i64::try_from(s).unwrap_or(i64::MAX),
            _ => -1,
        }
    }
}

/// One target as the cores see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetView {
    /// As configured (`host:port` or `unix:/path`).
    pub name: String,
    /// Where it was reached at the last check; `None` until its name resolved.
    pub addr: Option<BackendAddr>,
    pub role: TargetRole,
    pub up: bool,
    /// Down because it refuses dbproxy as configured (TLS): borrows fail at once instead
    /// of waiting for it.
    pub refused: bool,
    pub lag: Lag,
    /// The generation its role or address last changed in: a pooled connection opened
    /// in another epoch is not used again.
    pub epoch: u64,
    /// Why it is unavailable.
    pub why: String,
    /// Removed from the configuration by a reload (its slot stays; status skips it).
    pub retired: bool,
}

/// One decision of a group's roles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub generation: u64,
    pub writer: Option<usize>,
    pub targets: Vec<TargetView>,
}

/// What a pool serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Writer,
    Reader {
        max_lag: Option<Duration>,
        fallback: ReaderFallback,
    },
}

/// Where a new borrow goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// This target, in this epoch.
    Target(usize, u64),
    /// Nothing fit now; wait for the topology to change.
    Wait(String),
    /// Nothing fit, and the route says not to wait.
    Fail(String),
}

impl Snapshot {
    /// Before the first check.
    pub fn unknown(names: &[String]) -> Snapshot {
        decide::Decider::new(names, 1).snapshot()
    }

    /// Where a new borrow on `route` goes; readers by the fewest `borrowed` connections.
    pub fn choose(&self, route: Route, borrowed: &[AtomicUsize]) -> Choice {
        let writer = self
            .writer
            .and_then(|w| self.targets.get(w).map(|t| (w, t.epoch)));
        match route {
            Route::Writer => match writer {
                Some((w, e)) => Choice::Target(w, e),
                None => match self.refusal() {
                    Some(why) => Choice::Fail(why),
                    None => Choice::Wait("no writer".into()),
                },
            },
            Route::Reader { max_lag, fallback } => {
                let best = self
                    .targets
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| t.role == TargetRole::Reader && t.lag.within(max_lag))
                    .min_by_key(|(i, _)| borrowed.get(*i).map_or(0, |b| b.load(Ordering::Relaxed)));
                if let Some((i, t)) = best {
                    return Choice::Target(i, t.epoch);
                }
                let why = "no reader is up with replication lag within max_replication_lag";
                match (fallback, writer) {
                    (ReaderFallback::Writer, Some((w, e))) => Choice::Target(w, e),
                    (ReaderFallback::Error, _) => Choice::Fail(why.into()),
                    _ => match self.refusal() {
                        Some(why) => Choice::Fail(why),
                        None => Choice::Wait(why.into()),
                    },
                }
            }
        }
    }

    /// When every target refuses dbproxy as configured: why (nothing to wait for).
    fn refusal(&self) -> Option<String> {
        let mut live = self.targets.iter().filter(|t| !t.retired).peekable();
        if live.peek().is_none() || !live.all(|t| t.refused) {
            return None;
        }
        Some(
            self.targets
                .iter()
                .filter(|t| !t.retired)
                .map(|t| format!("{}: {}", t.name, t.why))
                .collect::<Vec<_>>()
                .join("; "),
        )
    }

    /// Whether a connection to `target` opened in `epoch` may serve `route` now.
    pub fn valid(&self, route: Route, target: usize, epoch: u64) -> bool {
        let Some(t) = self.targets.get(target).filter(|t| t.epoch == epoch) else {
            return false;
        };
        match route {
            Route::Writer => self.writer == Some(target),
            Route::Reader { max_lag, fallback } => {
                (t.role == TargetRole::Reader && t.lag.within(max_lag))
                    || (fallback == ReaderFallback::Writer && self.writer == Some(target))
            }
        }
    }

    /// Whether `target` was marked down (statements in flight there are given up). A
    /// target removed by a reload is not: its sessions finish what they began there.
    pub fn is_down(&self, target: usize) -> bool {
        self.targets
            .get(target)
            .is_some_and(|t| !t.up && !t.retired)
    }

    /// The address of `target`, if known.
    pub fn addr(&self, target: usize) -> Option<&BackendAddr> {
        self.targets.get(target).and_then(|t| t.addr.as_ref())
    }
}

/// Reports from the data path that a target needs checking now.
#[derive(Debug, Default)]
struct Suspicion {
    raised: AtomicU64,
    cleared: AtomicU64,
}

/// Failover counters and times (metrics and status).
#[derive(Debug, Default)]
pub struct TopologyStats {
    /// Writers chosen after a writer was lost.
    pub failovers: AtomicU64,
    /// Times the writer was lost.
    pub writer_lost: AtomicU64,
    /// The last loss: first failed check to the writer marked down.
    pub last_detection_us: AtomicU64,
    /// The last loss: writer marked down to the first statement served on the new one.
    pub last_recovery_us: AtomicU64,
    recovering: AtomicBool,
    lost_at: Mutex<Option<Instant>>,
    pub checks: AtomicU64,
    pub failed_checks: AtomicU64,
}

/// Something the monitor decided, kept for the status page.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TopologyEvent {
    /// Seconds since the Unix epoch.
    pub at: f64,
    /// `target_down`, `target_up`, `writer_lost`, `failover`, `writer_chosen`,
    /// `second_writer`, `address_changed`.
    pub kind: String,
    pub target: String,
    pub detail: String,
}

/// How long a target was up over the last minute (RDS Proxy's AvailabilityPercentage).
#[derive(Debug, Default)]
pub struct Availability {
    /// Health changes, oldest first: the last one before the window stays as its start.
    changes: Mutex<std::collections::VecDeque<(Instant, bool)>>,
}

/// The window [`Availability`] looks at.
pub const AVAILABILITY_WINDOW: Duration = Duration::from_secs(60);

impl Availability {
    /// A check found the target `up` at `now`.
    pub fn record(&self, now: Instant, up: bool) {
        let mut c = self.changes.lock();
        if c.back().map(|&(_, u)| u) != Some(up) {
            c.push_back((now, up));
        }
        while c.len() > 1
            && c.get(1)
                .is_some_and(|&(t, _)| now.saturating_duration_since(t) > AVAILABILITY_WINDOW)
        {
            c.pop_front();
        }
    }

    /// Percentage of the last minute (or of the time since the first check, if shorter)
    /// the target was up; `None` before its first check.
    pub fn percentage(&self, now: Instant) -> Option<f64> {
        let c = self.changes.lock();
        let first = c.front()?.0;
        let start = now
            .checked_sub(AVAILABILITY_WINDOW)
            .map_or(first, |s| s.max(first));
        let total = now.saturating_duration_since(start).as_secs_f64();
        // Down time is summed (not up time): a target never down is exactly 100.
        let mut down = 0.0;
        for (i, &(t, is_up)) in c.iter().enumerate() {
            let end = c.get(i + 1).map_or(now, |n| n.0);
            let from = t.max(start);
            if !is_up && end > from {
                down += end.saturating_duration_since(from).as_secs_f64();
            }
        }
        if total <= 0.0 {
            return Some(if c.back().is_some_and(|b| b.1) {
                100.0
            } else {
                0.0
            });
        }
        Some((100.0 - 100.0 * down / total).clamp(0.0, 100.0))
    }
}

/// A target group's topology, shared by its monitor and every core.
pub struct Topology {
    pub group: String,
    /// The group's monitor, for targets added or removed by a reload (set when it starts).
    pub(crate) control: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<monitor::Control>>,
    /// Each target's availability (by index).
    pub availability: Vec<Availability>,
    /// The monitor's recent decisions (failovers among them).
    pub events: crate::stats::Recent<TopologyEvent>,
    snap: ArcSwap<Snapshot>,
    /// Woken at every published check result.
    changed: Notify,
    /// Wakes the monitor's target tasks (a suspicion was raised).
    pub(crate) nudge: Notify,
    suspects: Vec<Suspicion>,
    pub stats: TopologyStats,
}

impl Topology {
    pub fn new(group: &str, targets: &[String]) -> Arc<Self> {
        Arc::new(Topology {
            group: group.to_string(),
            snap: ArcSwap::from_pointee(Snapshot::unknown(targets)),
            changed: Notify::new(),
            nudge: Notify::new(),
            control: std::sync::OnceLock::new(),
            suspects: (0..MAX_TARGETS.max(targets.len()))
                .map(|_| Suspicion::default())
                .collect(),
            availability: (0..MAX_TARGETS.max(targets.len()))
                .map(|_| Availability::default())
                .collect(),
            events: crate::stats::Recent::new(50),
            stats: TopologyStats::default(),
        })
    }

    /// A topology whose one target, at `addr`, is the writer, with no monitor (benchmarks,
    /// tests of the pool on its own).
    pub fn with_writer(group: &str, target: &str, addr: BackendAddr) -> Arc<Self> {
        let names = [target.to_string()];
        let t = Topology::new(group, &names);
        let mut d = decide::Decider::new(&names, 1);
        d.observe(
            0,
            Some(addr),
            decide::Check::Up(decide::Probe {
                read_only: false,
                lag: Lag::None,
            }),
            Instant::now(),
        );
        t.publish(Some(d.snapshot()), None);
        t
    }

    /// The current decision (cheap; no lock).
    pub fn load(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.snap.load()
    }

    /// The current decision, to keep across awaits.
    pub fn load_full(&self) -> Arc<Snapshot> {
        self.snap.load_full()
    }

    /// A future that completes at the next published check result; create it before
    /// looking at the snapshot, then await it.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// Publishes a check result: a new decision when `snap` is one, and the check of
    /// `target` that answers suspicions up to `upto`; then wakes whoever waits.
    pub fn publish(&self, snap: Option<Snapshot>, checked: Option<(usize, u64)>) {
        if let Some(s) = snap {
            self.snap.store(Arc::new(s));
        }
        if let Some((target, upto)) = checked {
            self.cleared(target, upto);
            let up = self.snap.load().targets.get(target).is_some_and(|t| t.up);
            if let Some(a) = self.availability.get(target) {
                a.record(Instant::now(), up);
            }
        }
        self.changed.notify_waiters();
    }

    /// The data path saw `target` fail (a reset, a refused connection, a read-only
    /// refusal from the writer): check it now; borrows for it wait for that check.
    pub fn suspect(&self, target: usize) {
        if let Some(s) = self.suspects.get(target) {
            s.raised.fetch_add(1, Ordering::AcqRel);
            self.nudge.notify_waiters();
        }
    }

    /// Whether a suspicion about `target` awaits its check.
    pub fn suspected(&self, target: usize) -> bool {
        self.suspects
            .get(target)
            .is_some_and(|s| s.raised.load(Ordering::Acquire) > s.cleared.load(Ordering::Acquire))
    }

    /// The suspicion count a check of `target` starting now answers.
    pub(crate) fn suspicion(&self, target: usize) -> u64 {
        self.suspects
            .get(target)
            .map_or(0, |s| s.raised.load(Ordering::Acquire))
    }

    /// A check that started when the count was `upto` was published.
    pub(crate) fn cleared(&self, target: usize, upto: u64) {
        if let Some(s) = self.suspects.get(target) {
            s.cleared.fetch_max(upto, Ordering::AcqRel);
        }
    }

    /// A reload changed the group's targets: the monitor checks the added ones (new slots:
    /// the others keep their index, role and connections) and retires the removed ones (if
    /// the writer is among them, another writable target takes over as at a failover).
    pub fn change_targets(&self, add: &[String], remove: &[String]) -> Result<(), String> {
        let Some(control) = self.control.get() else {
            return Err("the group's monitor is not running".into());
        };
        let snap = self.load();
        let reused = |n: &String| snap.targets.iter().any(|t| t.retired && &t.name == n);
        let new_slots = add.iter().filter(|n| !reused(n)).count();
        if snap.targets.len() + new_slots > MAX_TARGETS {
            return Err(format!(
                "a target group holds at most {MAX_TARGETS} targets over its life (removed ones included)"
            ));
        }
        for name in remove {
            control
                .send(monitor::Control::Remove(name.clone()))
                .map_err(|_| "the group's monitor stopped".to_string())?;
        }
        for name in add {
            control
                .send(monitor::Control::Add(name.clone()))
                .map_err(|_| "the group's monitor stopped".to_string())?;
        }
        Ok(())
    }

    /// Keeps an event of `kind` about `target` for the status page.
    pub(crate) fn note(&self, kind: &str, target: &str, detail: &str) {
        self.events.push(TopologyEvent {
            at: crate::stats::unix_now(),
            kind: kind.to_string(),
            target: target.to_string(),
            detail: detail.to_string(),
        });
    }

    /// Keeps a monitor decision for the status page.
    pub(crate) fn record(&self, e: &decide::Event) {
        use decide::Event;
        let (kind, target, detail) = match e {
            Event::TargetDown { target, why } => ("target_down", target, why.clone()),
            Event::TargetUp { target } => ("target_up", target, String::new()),
            Event::WriterLost {
                target,
                why,
                detection,
            } => (
                "writer_lost",
                target,
                format!("{why} (detected in {} ms)", detection.as_millis()),
            ),
            Event::WriterChosen {
                target,
                previous: Some(p),
            } => ("failover", target, format!("was {p}")),
            Event::WriterChosen {
                target,
                previous: None,
            } => ("writer_chosen", target, String::new()),
            Event::SecondWriter { target, writer } => (
                "second_writer",
                target,
                format!("read_only = 0 while {writer} is the writer: not used"),
            ),
            Event::AddressChanged { target, from, to } => {
                ("address_changed", target, format!("{from} -> {to}"))
            }
        };
        self.events.push(TopologyEvent {
            at: crate::stats::unix_now(),
            kind: kind.to_string(),
            target: target.clone(),
            detail,
        });
    }

    /// The writer was lost now.
    pub(crate) fn writer_lost(&self, detection: Duration) {
        self.stats.writer_lost.fetch_add(1, Ordering::Relaxed);
        self.stats
            .last_detection_us
            .store(detection.as_micros() as u64, Ordering::Relaxed);
        *self.stats.lost_at.lock() = Some(Instant::now());
        self.stats.recovering.store(true, Ordering::Release);
    }

    /// A new writer was chosen after one was lost.
    pub(crate) fn failed_over(&self) {
        self.stats.failovers.fetch_add(1, Ordering::Relaxed);
    }

    /// A statement is about to be served on the writer: the first after a loss ends the
    /// recovery time.
    pub fn served_on_writer(&self) {
        if !self.stats.recovering.load(Ordering::Relaxed)
            || !self.stats.recovering.swap(false, Ordering::AcqRel)
        {
            return;
        }
        if let Some(at) = self.stats.lost_at.lock().take() {
            let took = at.elapsed();
            self.stats
                .last_recovery_us
                .store(took.as_micros() as u64, Ordering::Relaxed);
            tracing::info!(group = %self.group, recovery_ms = took.as_millis() as u64, "first statement served on the new writer");
        }
    }
}

/// Borrowed connections per target, for choosing the least busy reader.
pub fn borrowed_counters(n: usize) -> Vec<AtomicUsize> {
    (0..n).map(|_| AtomicUsize::new(0)).collect()
}

#[cfg(test)]
mod tests {
    use super::decide::{Check, Decider, Probe};
    use super::*;

    fn three() -> Decider {
        let names: Vec<String> = ["w:1", "r1:1", "r2:1"].map(String::from).to_vec();
        let mut d = Decider::new(&names, 2);
        let now = Instant::now();
        let a = |p: u16| Some(BackendAddr::Tcp(([127, 0, 0, 1], p).into()));
        d.observe(
            0,
            a(1),
            Check::Up(Probe {
                read_only: false,
                lag: Lag::None,
            }),
            now,
        );
        d.observe(
            1,
            a(2),
            Check::Up(Probe {
                read_only: true,
                lag: Lag::Seconds(0),
            }),
            now,
        );
        d.observe(
            2,
            a(3),
            Check::Up(Probe {
                read_only: true,
                lag: Lag::Stopped,
            }),
            now,
        );
        d
    }

    #[test]
    fn readers_by_fewest_borrowed_within_the_lag_limit_then_the_fallback() {
        let s = three().snapshot();
        let b = borrowed_counters(3);
        let lag = Some(Duration::from_secs(10));
        let route = |fallback| Route::Reader {
            max_lag: lag,
            fallback,
        };
        // r2's replication is stopped: over any limit.
        assert!(matches!(
            s.choose(route(ReaderFallback::Error), &b),
            Choice::Target(1, _)
        ));
        let nolimit = Route::Reader {
            max_lag: None,
            fallback: ReaderFallback::Error,
        };
        b[1].store(3, Ordering::Relaxed);
        assert!(matches!(s.choose(nolimit, &b), Choice::Target(2, _)));
        let mut s2 = s.clone();
        s2.targets[1].lag = Lag::Seconds(11);
        assert!(matches!(
            s2.choose(route(ReaderFallback::Writer), &b),
            Choice::Target(0, _)
        ));
        assert!(matches!(
            s2.choose(route(ReaderFallback::Wait), &b),
            Choice::Wait(_)
        ));
        assert!(matches!(
            s2.choose(route(ReaderFallback::Error), &b),
            Choice::Fail(_)
        ));
        assert!(matches!(s2.choose(Route::Writer, &b), Choice::Target(0, _)));
    }

    #[test]
    fn connections_are_valid_for_their_route_and_epoch_only() {
        let s = three().snapshot();
        let e0 = s.targets[0].epoch;
        let e1 = s.targets[1].epoch;
        assert!(s.valid(Route::Writer, 0, e0));
        assert!(!s.valid(Route::Writer, 0, e0 + 1));
        assert!(!s.valid(Route::Writer, 1, e1));
        let reader = Route::Reader {
            max_lag: None,
            fallback: ReaderFallback::Wait,
        };
        assert!(s.valid(reader, 1, e1));
        assert!(!s.valid(reader, 0, e0), "no fallback to the writer");
    }

    #[test]
    fn suspicions_are_cleared_only_by_a_check_started_after_them() {
        let t = Topology::new("g", &["a:1".into()]);
        assert!(!t.suspected(0));
        let before = t.suspicion(0);
        t.suspect(0);
        assert!(t.suspected(0));
        t.cleared(0, before);
        assert!(t.suspected(0), "a check that started before the report");
        t.cleared(0, t.suspicion(0));
        assert!(!t.suspected(0));
    }

    #[test]
    fn availability_is_the_share_of_the_last_minute_up() {
        let a = Availability::default();
        let t0 = Instant::now();
        assert_eq!(a.percentage(t0), None);
        a.record(t0, true);
        a.record(t0 + Duration::from_secs(10), true);
        assert_eq!(a.percentage(t0 + Duration::from_secs(20)), Some(100.0));
        a.record(t0 + Duration::from_secs(20), false);
        a.record(t0 + Duration::from_secs(30), true);
        let p = a.percentage(t0 + Duration::from_secs(40)).unwrap_or(0.0);
        assert!((p - 75.0).abs() < 1e-9, "{p}");
        // Two minutes later the outage is out of the window.
        assert_eq!(a.percentage(t0 + Duration::from_secs(150)), Some(100.0));
    }
}
