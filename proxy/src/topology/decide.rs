//! Roles from health checks, sans-IO: check results in, a snapshot and events out.
//!
//! Rules (MaxScale's and ProxySQL's lessons): roles come from what the servers report, not
//! from the configuration's order; a writer stays the writer until it fails or turns
//! read-only (never two writers: another server that reports writable meanwhile is left
//! unused and named in a warning); a refused or reset connection marks a target down at
//! once, other failures after `failure_threshold` checks in a row; when the writer is lost,
//! the first writable target becomes the writer, one that was never deposed before one that
//! was.

use super::{Lag, Snapshot, TargetRole, TargetView};
use crate::target::BackendAddr;
use std::time::{Duration, Instant};

/// What a check of one target found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// The target answered.
    Up(Probe),
    /// It did not. `hard`: the connection was refused or reset (the server is gone, no
    /// need to wait for more checks).
    Down { hard: bool, why: String },
    /// It answered but cannot be used as configured (TLS: no TLS offered, certificate not
    /// trusted): down at once, and waiting for it will not help.
    Refused { why: String },
}

/// A target's answers to the probe queries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// `@@read_only` or `@@innodb_read_only`.
    pub read_only: bool,
    pub lag: Lag,
}

/// Something worth a log line (and a counter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    TargetDown {
        target: String,
        why: String,
    },
    TargetUp {
        target: String,
    },
    /// The writer failed or turned read-only; `detection`: first failed check to now.
    WriterLost {
        target: String,
        why: String,
        detection: Duration,
    },
    WriterChosen {
        target: String,
        previous: Option<String>,
    },
    /// `target` reports writable while `writer` is the writer: it is not used.
    SecondWriter {
        target: String,
        writer: String,
    },
    AddressChanged {
        target: String,
        from: String,
        to: String,
    },
}

#[derive(Debug, Clone)]
struct TargetState {
    name: String,
    addr: Option<BackendAddr>,
    /// Failed checks in a row.
    failures: u32,
    /// When the current run of failures started.
    failing_since: Option<Instant>,
    up: bool,
    /// Down because it refuses dbproxy as configured ([`Check::Refused`]).
    refused: bool,
    why: String,
    probe: Option<Probe>,
    role: TargetRole,
    /// Generation at which the role or address last changed.
    epoch: u64,
    /// Was the writer and lost that role: chosen again only when no other target is
    /// writable.
    deposed: bool,
    /// A second-writer warning was given for the current episode.
    warned_second: bool,
    /// Removed from the configuration (a reload): never used again, its checks ignored.
    retired: bool,
}

impl TargetState {
    fn new(name: &str) -> Self {
        TargetState {
            name: name.to_string(),
            addr: None,
            failures: 0,
            failing_since: None,
            up: false,
            refused: false,
            why: "not checked yet".into(),
            probe: None,
            role: TargetRole::Unavailable,
            epoch: 0,
            deposed: false,
            warned_second: false,
            retired: false,
        }
    }
}

impl TargetState {
    fn writable(&self) -> bool {
        self.up && self.probe.as_ref().is_some_and(|p| !p.read_only)
    }
}

/// The roles of one target group's targets.
#[derive(Debug, Clone)]
pub struct Decider {
    threshold: u32,
    generation: u64,
    writer: Option<usize>,
    /// The writer lost last, until another is chosen.
    lost: Option<usize>,
    targets: Vec<TargetState>,
}

impl Decider {
    /// Targets by their configured names; nothing is known of them yet.
    pub fn new(names: &[String], failure_threshold: u32) -> Self {
        Decider {
            threshold: failure_threshold.max(1),
            generation: 1,
            writer: None,
            lost: None,
            targets: names.iter().map(|n| TargetState::new(n)).collect(),
        }
    }

    /// A target added by a reload: a new slot (indices of the others never change), or
    /// the slot it had before it was removed. Unknown until its first check.
    pub fn add(&mut self, name: &str) -> usize {
        if let Some(i) = self
            .targets
            .iter()
            .position(|t| t.name == name && t.retired)
        {
            if let Some(t) = self.targets.get_mut(i) {
                let epoch = t.epoch;
                *t = TargetState::new(name);
                t.epoch = epoch;
            }
            return i;
        }
        self.targets.push(TargetState::new(name));
        self.targets.len() - 1
    }

    /// The slot of a target in use now, by name.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.targets
            .iter()
            .position(|t| t.name == name && !t.retired)
    }

    /// Slots taken (targets in use and removed ones).
    pub fn slots(&self) -> usize {
        self.targets.len()
    }

    /// A target removed by a reload: down for good (if it was the writer, another writable
    /// target takes over as at a failover); its connections close as they come back.
    pub fn retire(&mut self, i: usize, now: Instant) -> Vec<Event> {
        let mut events = Vec::new();
        let Some(t) = self.targets.get_mut(i).filter(|t| !t.retired) else {
            return events;
        };
        t.retired = true;
        if t.up {
            events.push(Event::TargetDown {
                target: t.name.clone(),
                why: "removed from the configuration".into(),
            });
        }
        t.up = false;
        t.probe = None;
        t.failing_since.get_or_insert(now);
        t.why = "removed from the configuration".into();
        self.decide(now, Some(i), &mut events);
        events
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Takes in one check of target `i`, reached at `addr` (`None`: its name did not
    /// resolve), and decides the roles again.
    pub fn observe(
        &mut self,
        i: usize,
        addr: Option<BackendAddr>,
        check: Check,
        now: Instant,
    ) -> Vec<Event> {
        let mut events = Vec::new();
        let Some(t) = self.targets.get_mut(i).filter(|t| !t.retired) else {
            return events;
        };
        let mut moved = false;
        if let Some(a) = addr {
            if t.addr.as_ref().is_some_and(|old| *old != a) {
                events.push(Event::AddressChanged {
                    target: t.name.clone(),
                    from: t.addr.as_ref().map(|o| o.to_string()).unwrap_or_default(),
                    to: a.to_string(),
                });
                moved = true;
            }
            t.addr = Some(a);
        }
        match check {
            Check::Up(p) => {
                if !t.up {
                    events.push(Event::TargetUp {
                        target: t.name.clone(),
                    });
                }
                t.up = true;
                t.refused = false;
                t.failures = 0;
                t.failing_since = None;
                t.why.clear();
                t.probe = Some(p);
            }
            Check::Refused { why } => {
                t.failures = t.failures.saturating_add(1);
                t.failing_since.get_or_insert(now);
                if t.up || !t.refused {
                    events.push(Event::TargetDown {
                        target: t.name.clone(),
                        why: why.clone(),
                    });
                }
                t.up = false;
                t.refused = true;
                t.why = why;
            }
            Check::Down { hard, why } => {
                t.refused = false;
                t.failures = t.failures.saturating_add(1);
                t.failing_since.get_or_insert(now);
                if t.up && (hard || t.failures >= self.threshold) {
                    t.up = false;
                    events.push(Event::TargetDown {
                        target: t.name.clone(),
                        why: why.clone(),
                    });
                }
                if !t.up {
                    t.why = why;
                }
            }
        }
        self.decide(now, moved.then_some(i), &mut events);
        events
    }

    /// Chooses the writer and every target's role; bumps the generation when any changed.
    fn decide(&mut self, now: Instant, moved: Option<usize>, events: &mut Vec<Event>) {
        if let Some(w) = self.writer {
            if let Some(t) = self.targets.get_mut(w).filter(|t| !t.writable()) {
                let why = if t.up {
                    "it reports read_only".to_string()
                } else {
                    format!("it is down: {}", t.why)
                };
                events.push(Event::WriterLost {
                    target: t.name.clone(),
                    why,
                    detection: t
                        .failing_since
                        .map_or(Duration::ZERO, |s| now.saturating_duration_since(s)),
                });
                t.deposed = true;
                self.writer = None;
                self.lost = Some(w);
            }
        }
        let previous = self.writer;
        if self.writer.is_none() {
            let pick = |deposed: bool| {
                self.targets
                    .iter()
                    .position(|t| t.writable() && t.deposed == deposed)
            };
            if let Some(c) = pick(false).or_else(|| pick(true)) {
                let old = self
                    .lost
                    .take()
                    .filter(|&l| l != c)
                    .and_then(|l| self.targets.get(l))
                    .map(|t| t.name.clone());
                if let Some(t) = self.targets.get_mut(c) {
                    t.deposed = false;
                    t.warned_second = false;
                    events.push(Event::WriterChosen {
                        target: t.name.clone(),
                        previous: old,
                    });
                }
                self.writer = Some(c);
            }
        }
        let writer_name = self
            .writer
            .and_then(|w| self.targets.get(w))
            .map(|t| t.name.clone());
        let next = self.generation + 1;
        let mut changed = previous != self.writer;
        for (i, t) in self.targets.iter_mut().enumerate() {
            let role = if Some(i) == self.writer {
                TargetRole::Writer
            } else if !t.up {
                TargetRole::Unavailable
            } else if t.writable() {
                if !t.warned_second {
                    t.warned_second = true;
                    events.push(Event::SecondWriter {
                        target: t.name.clone(),
                        writer: writer_name.clone().unwrap_or_default(),
                    });
                }
                TargetRole::Unavailable
            } else {
                t.warned_second = false;
                TargetRole::Reader
            };
            if role != t.role || moved == Some(i) {
                t.role = role;
                t.epoch = next;
                changed = true;
            }
        }
        if changed {
            self.generation = next;
        }
    }

    /// What the cores route by.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            generation: self.generation,
            writer: self.writer,
            targets: self
                .targets
                .iter()
                .map(|t| TargetView {
                    name: t.name.clone(),
                    addr: t.addr.clone(),
                    role: t.role,
                    up: t.up,
                    refused: t.refused,
                    lag: t.probe.as_ref().map_or(Lag::Unknown, |p| p.lag),
                    epoch: t.epoch,
                    retired: t.retired,
                    why: if t.role == TargetRole::Unavailable && t.up {
                        "reports writable while another target is the writer".into()
                    } else {
                        t.why.clone()
                    },
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec!["a:3306".into(), "b:3306".into()]
    }

    fn addr(p: u16) -> Option<BackendAddr> {
        Some(BackendAddr::Tcp(([127, 0, 0, 1], p).into()))
    }

    fn up(read_only: bool) -> Check {
        Check::Up(Probe {
            read_only,
            lag: if read_only {
                Lag::Seconds(0)
            } else {
                Lag::None
            },
        })
    }

    fn down(hard: bool) -> Check {
        Check::Down {
            hard,
            why: "x".into(),
        }
    }

    /// A primary (a) and a replica (b), both checked once.
    fn pair(now: Instant) -> Decider {
        let mut d = Decider::new(&names(), 2);
        d.observe(0, addr(1), up(false), now);
        d.observe(1, addr(2), up(true), now);
        d
    }

    #[test]
    fn roles_come_from_the_servers_not_the_order() {
        let now = Instant::now();
        let mut d = Decider::new(&names(), 2);
        d.observe(0, addr(1), up(true), now);
        let ev = d.observe(1, addr(2), up(false), now);
        assert!(ev.contains(&Event::WriterChosen {
            target: "b:3306".into(),
            previous: None
        }));
        let s = d.snapshot();
        assert_eq!(s.writer, Some(1));
        assert_eq!(s.targets[0].role, TargetRole::Reader);
    }

    #[test]
    fn a_refused_connection_marks_the_writer_down_at_once_a_timeout_after_the_threshold() {
        let now = Instant::now();
        let mut d = pair(now);
        let g = d.generation();
        let ev = d.observe(0, addr(1), down(false), now);
        assert!(ev.is_empty(), "{ev:?}");
        assert_eq!(d.snapshot().writer, Some(0));
        assert_eq!(d.generation(), g);
        let later = now + Duration::from_secs(1);
        let ev = d.observe(0, addr(1), down(false), later);
        assert!(
            ev.iter().any(|e| matches!(e, Event::WriterLost { detection, .. } if *detection == Duration::from_secs(1))),
            "{ev:?}"
        );
        assert_eq!(d.snapshot().writer, None);
        assert!(d.generation() > g);

        let mut d = pair(now);
        d.observe(0, addr(1), down(true), now);
        assert_eq!(d.snapshot().writer, None);
        assert_eq!(d.snapshot().targets[0].role, TargetRole::Unavailable);
    }

    #[test]
    fn a_target_that_refuses_dbproxy_fails_borrows_at_once() {
        let now = Instant::now();
        let mut d = Decider::new(&names(), 3);
        let refused = || Check::Refused {
            why: "invalid peer certificate: UnknownIssuer".into(),
        };
        assert_eq!(d.observe(0, addr(1), refused(), now).len(), 1);
        // One target refusing while the other is not known yet: wait for it.
        assert!(matches!(
            d.snapshot().choose(crate::topology::Route::Writer, &[]),
            crate::topology::Choice::Wait(_)
        ));
        d.observe(1, addr(2), refused(), now);
        match d.snapshot().choose(crate::topology::Route::Writer, &[]) {
            crate::topology::Choice::Fail(why) => assert!(why.contains("UnknownIssuer"), "{why}"),
            other => panic!("{other:?}"),
        }
        // Logged once per episode; a target that comes back is chosen as usual.
        assert!(d.observe(1, addr(2), refused(), now).is_empty());
        d.observe(1, addr(2), up(false), now);
        assert!(matches!(
            d.snapshot().choose(crate::topology::Route::Writer, &[]),
            crate::topology::Choice::Target(1, _)
        ));
    }

    #[test]
    fn a_promoted_replica_becomes_the_writer_and_the_old_one_comes_back_unused() {
        let now = Instant::now();
        let mut d = pair(now);
        d.observe(0, addr(1), down(true), now);
        let ev = d.observe(1, addr(2), up(false), now);
        assert!(ev.contains(&Event::WriterChosen {
            target: "b:3306".into(),
            previous: Some("a:3306".into())
        }));
        let epoch_b = d.snapshot().targets[1].epoch;
        // The old primary restarts writable: never two writers.
        let ev = d.observe(0, addr(1), up(false), now);
        assert!(ev.contains(&Event::SecondWriter {
            target: "a:3306".into(),
            writer: "b:3306".into()
        }));
        let s = d.snapshot();
        assert_eq!(s.writer, Some(1));
        assert_eq!(s.targets[0].role, TargetRole::Unavailable);
        assert_eq!(
            s.targets[1].epoch, epoch_b,
            "the writer's connections stay valid"
        );
        // Warned once per episode, not at every check.
        assert!(d.observe(0, addr(1), up(false), now).is_empty());
        // Made read-only, it serves reads.
        d.observe(0, addr(1), up(true), now);
        assert_eq!(d.snapshot().targets[0].role, TargetRole::Reader);
    }

    #[test]
    fn a_planned_switchover_leaves_no_writer_until_the_replica_is_promoted() {
        let now = Instant::now();
        let mut d = pair(now);
        let ev = d.observe(0, addr(1), up(true), now);
        assert!(matches!(&ev[..], [Event::WriterLost { why, .. }] if why.contains("read_only")));
        assert_eq!(d.snapshot().writer, None);
        d.observe(1, addr(2), up(false), now);
        assert_eq!(d.snapshot().writer, Some(1));
        assert_eq!(d.snapshot().targets[0].role, TargetRole::Reader);
    }

    #[test]
    fn a_second_writer_takes_over_when_the_writer_fails_and_a_deposed_one_only_when_alone() {
        let now = Instant::now();
        let mut d = pair(now);
        d.observe(1, addr(2), up(false), now);
        assert_eq!(d.snapshot().targets[1].role, TargetRole::Unavailable);
        d.observe(0, addr(1), down(true), now);
        assert_eq!(d.snapshot().writer, Some(1));
        // b fails too; a, deposed, is the only writable one left: it is the writer again.
        d.observe(1, addr(2), down(true), now);
        d.observe(0, addr(1), up(false), now);
        assert_eq!(d.snapshot().writer, Some(0));
    }

    #[test]
    fn an_address_change_starts_a_new_epoch_for_that_target() {
        let now = Instant::now();
        let mut d = pair(now);
        let before = d.snapshot();
        let ev = d.observe(0, addr(9), up(false), now);
        assert!(matches!(&ev[..], [Event::AddressChanged { to, .. }] if to == "127.0.0.1:9"));
        let after = d.snapshot();
        assert_eq!(after.writer, Some(0));
        assert!(after.targets[0].epoch > before.targets[0].epoch);
        assert_eq!(after.targets[1].epoch, before.targets[1].epoch);
        assert_eq!(after.targets[0].addr, addr(9));
    }

    #[test]
    fn a_target_added_takes_a_new_slot_and_a_removed_writer_is_replaced() {
        let now = Instant::now();
        let mut d = pair(now);
        let c = d.add("c:3306");
        assert_eq!((c, d.slots()), (2, 3));
        assert_eq!(d.snapshot().targets[2].role, TargetRole::Unavailable);
        d.observe(c, addr(3), up(false), now);
        // c is writable while a is the writer: unused.
        assert_eq!(d.snapshot().writer, Some(0));
        let epoch_b = d.snapshot().targets[1].epoch;
        let ev = d.retire(0, now);
        assert!(
            ev.iter().any(|e| matches!(e, Event::WriterLost { .. })),
            "{ev:?}"
        );
        assert!(
            ev.iter()
                .any(|e| matches!(e, Event::WriterChosen { target, .. } if target == "c:3306")),
            "{ev:?}"
        );
        let s = d.snapshot();
        assert_eq!(s.writer, Some(2));
        assert!(s.targets[0].retired && s.targets[0].role == TargetRole::Unavailable);
        // The others keep their slot and epoch (their connections stay valid).
        assert_eq!(s.targets[1].epoch, epoch_b);
        assert_eq!(s.targets[1].role, TargetRole::Reader);
        // A removed target's late reports change nothing.
        d.observe(0, addr(1), up(false), now);
        assert_eq!(d.snapshot(), s);
        assert_eq!(d.index_of("a:3306"), None);
        // Added again, it gets its old slot back, unknown until checked.
        assert_eq!(d.add("a:3306"), 0);
        assert!(!d.snapshot().targets[0].retired && !d.snapshot().targets[0].up);
        assert_eq!(d.index_of("a:3306"), Some(0));
    }
}
