//! The allocator run by many simulated instances against a simulated store, on virtual
//! time: joins, leaves, crashes, partitions, whole-store outages (with etcd's lease
//! extension at the next leader), lost answers to writes that landed, and demand that
//! comes and goes. After every step the connections all instances hold must fit the
//! budget, and an instance that has wanted its floor for a while must be allowed it.

use super::alloc::{Allocator, Contact, MemberView, Params, Proposal, Usage, View};
use crate::test_rng::Rng;
use std::collections::BTreeMap;
use std::time::Duration;

struct Store {
    rev: i64,
    /// The table, its revision and the member records, kept as instances read them.
    view: View<u32>,
    /// When each member record's lease runs out.
    expires: BTreeMap<u32, Duration>,
    /// No quorum: every request fails, and no lease expires.
    down: bool,
    /// The last writes (a failed check shows them).
    log: Vec<String>,
}

impl Store {
    fn put_member(&mut self, id: u32, beat: u64, want: u32, expires: Duration) {
        self.view.members.insert(id, MemberView { beat, want });
        self.expires.insert(id, expires);
    }

    fn cas(&mut self, p: &Proposal<u32>) -> Option<i64> {
        if p.rev != self.view.rev {
            return None;
        }
        self.rev += 1;
        self.view.rev = self.rev;
        let before = std::mem::take(&mut self.view.table);
        self.view.table.clone_from(&p.table);
        self.log
            .push(format!("rev {}: {before:?} -> {:?}", self.rev, p.table));
        if self.log.len() > 12 {
            self.log.remove(0);
        }
        Some(self.rev)
    }
}

struct Inst {
    alloc: Allocator<u32>,
    beat: u64,
    /// Connections open, and those of them inside a transaction.
    open: u32,
    busy: u32,
    /// Connections its clients would use.
    demand: u32,
    /// Over its cap since the last step (busy connections end by the next one).
    over: bool,
    next_round: Duration,
    /// Its requests fail until then.
    cut_off_until: Duration,
    /// Since when it has wanted at least its floor.
    wanting_since: Option<Duration>,
    /// A proposal held back until the other instances of this step have written.
    late: Option<Proposal<u32>>,
}

struct Sim {
    p: Params,
    rng: Rng,
    now: Duration,
    store: Store,
    insts: BTreeMap<u32, Inst>,
    /// Crashed instances, by when: one may restart under its id; a new id joins only while
    /// the running and the recently crashed are fewer than `max_instances` (the promise
    /// `max_instances` stands for).
    crashed: BTreeMap<u32, Duration>,
    next_id: u32,
    /// Worst `Σ open` seen, and the number of steps.
    peak: u32,
    steps: u64,
    grants_moved: u64,
    /// Crashes, cut-offs and store outages that happened.
    crashes: u64,
    cut_offs: u64,
    outages: u64,
}

const STEP: Duration = Duration::from_millis(250);

impl Sim {
    fn new(p: Params, seed: u64) -> Sim {
        Sim {
            p,
            rng: Rng(seed),
            now: Duration::ZERO,
            store: Store {
                rev: 1,
                view: View::default(),
                expires: BTreeMap::new(),
                down: false,
                log: Vec::new(),
            },
            insts: BTreeMap::new(),
            crashed: BTreeMap::new(),
            next_id: 0,
            peak: 0,
            steps: 0,
            grants_moved: 0,
            crashes: 0,
            cut_offs: 0,
            outages: 0,
        }
    }

    fn chance(&mut self, per_million: u64) -> bool {
        self.rng.next() % 1_000_000 < per_million
    }

    fn below(&mut self, n: u64) -> u64 {
        self.rng.next() % n.max(1)
    }

    fn join(&mut self) {
        let id = self.next_id;
        self.next_id += 1;
        self.start(id);
    }

    /// Starts instance `id`: new, or restarted after a crash.
    fn start(&mut self, id: u32) {
        let phase = Duration::from_millis(self.below(self.p.beat_every().as_millis() as u64));
        let demand = self.pick_demand();
        self.insts.insert(
            id,
            Inst {
                alloc: Allocator::new(id, self.p, self.now),
                beat: 0,
                open: 0,
                busy: 0,
                demand,
                over: false,
                next_round: self.now + phase,
                cut_off_until: Duration::ZERO,
                wanting_since: None,
                late: None,
            },
        );
    }

    fn pick_demand(&mut self) -> u32 {
        let f = u64::from(self.p.floor());
        match self.below(10) {
            0..=3 => 0,
            4..=6 => self.below(f / 2 + 1) as u32,
            7 | 8 => (f + self.below(3 * f + 1)) as u32,
            _ => (f / 2 + self.below(f)) as u32,
        }
    }

    /// Whether `id`'s request gets through now.
    fn reaches(&self, id: u32) -> bool {
        !self.store.down
            && self
                .insts
                .get(&id)
                .is_some_and(|i| i.cut_off_until <= self.now)
    }

    /// One round of instance `id`: read (adrift), beat, read, decide, write.
    fn round(&mut self, id: u32) {
        let now = self.now;
        let lost_answer = self.chance(20_000);
        let late = self.chance(300_000);
        let lost = self.chance(20_000);
        let reaches = self.reaches(id);
        let ttl = self.p.ttl;
        let Some(inst) = self.insts.get_mut(&id) else {
            return;
        };
        inst.next_round = now + self.p.beat_every();
        let a = &mut inst.alloc;
        let want = inst.demand.max(inst.busy).max(1);
        if a.beats() {
            // The beat: a write of its member record, on its lease.
            a.beating(now);
            if !reaches {
                a.failed(now);
                return;
            }
            inst.beat += 1;
            self.store.put_member(id, inst.beat, want, now + ttl);
            if lost_answer {
                a.failed(now);
                return;
            }
            a.beat_landed();
        } else if !reaches {
            a.failed(now);
            return;
        }
        a.observe(now, &self.store.view);
        let usage = Usage {
            open: inst.open,
            want,
        };
        let Some(p) = a.decide(now, &self.store.view, usage) else {
            return;
        };
        if late {
            inst.late = Some(p);
            return;
        }
        let r = self.store.cas(&p);
        if r.is_some() && p.registers {
            inst.beat += 1;
            self.store.put_member(id, inst.beat, want, now + ttl);
        }
        self.grants_moved += u64::from(r.is_some());
        let a = &mut inst.alloc;
        match r {
            _ if lost => a.failed(now),
            r => a.decided(now, r.is_some()),
        }
    }

    fn finish_late(&mut self, id: u32) {
        let reaches = self.reaches(id);
        let now = self.now;
        let Some(inst) = self.insts.get_mut(&id) else {
            return;
        };
        let Some(p) = inst.late.take() else {
            return;
        };
        if !reaches {
            inst.alloc.failed(now);
            return;
        }
        let written = self.store.cas(&p).is_some();
        if written && p.registers {
            inst.beat += 1;
            let want = inst.demand.max(inst.busy).max(1);
            self.store.put_member(id, inst.beat, want, now + self.p.ttl);
        }
        inst.alloc.decided(now, written);
    }

    /// Connections follow the cap and the demand: opening is immediate; idle ones over
    /// the cap close at once, busy ones when their transaction ends (by the next step).
    fn connections(&mut self) {
        let now = self.now;
        let f = self.p.floor();
        for inst in self.insts.values_mut() {
            let cap = inst.alloc.cap(now);
            let want = inst.demand.min(cap);
            if inst.open < want {
                inst.open = want;
            }
            inst.busy = inst.demand.min(inst.open);
            if inst.open > cap {
                inst.open = if inst.over { cap } else { cap.max(inst.busy) };
                inst.busy = inst.busy.min(inst.open);
                inst.over = inst.open > cap;
            } else {
                inst.over = false;
            }
            if inst.demand >= f {
                inst.wanting_since.get_or_insert(now);
            } else {
                inst.wanting_since = None;
            }
        }
    }

    /// Every instance and the store, for a failed check (small fleets).
    fn describe(&self) -> String {
        if self.insts.len() > 20 {
            return String::new();
        }
        let mut out = format!(
            "store down {} rev {} table {:?} members {:?}\n{}\n",
            self.store.down,
            self.store.view.rev,
            self.store.view.table,
            self.store.view.members,
            self.store.log.join("\n")
        );
        for (id, i) in &self.insts {
            out += &format!(
                "{id}: {:?} held {:?} cap {} open {} busy {} demand {} cut off until {:?}\n",
                i.alloc.contact(),
                i.alloc.held(),
                i.alloc.cap(self.now),
                i.open,
                i.busy,
                i.demand,
                i.cut_off_until
            );
        }
        out
    }

    fn check(&mut self) {
        let total: u32 = self.insts.values().map(|i| i.open).sum();
        self.peak = self.peak.max(total);
        assert!(
            total <= self.p.budget,
            "at {:?}: {total} connections open, budget {} ({} instances)\n{}",
            self.now,
            self.p.budget,
            self.insts.len(),
            self.describe()
        );
        let f = self.p.floor();
        let horizon = self.p.ttl * 6;
        for (id, i) in &self.insts {
            if let Some(since) = i.wanting_since {
                let cap = i.alloc.cap(self.now);
                assert!(
                    self.now < since + horizon || cap >= f,
                    "at {:?}: {id} has wanted {} since {since:?} but may use {cap} < floor {f} ({:?})\n{}",
                    self.now,
                    i.demand,
                    i.alloc.contact(),
                    self.describe()
                );
            }
        }
    }

    /// Runs `duration` of virtual time with the given rates of events per step (in
    /// millionths).
    fn run(&mut self, duration: Duration, rates: Rates) {
        let end = self.now + duration;
        let max = self.p.max_instances as usize;
        while self.now < end {
            self.now += STEP;
            self.steps += 1;
            // The store: outages start and end; leases expire while it has a leader, and
            // a new leader gives every lease its whole time again.
            if self.store.down {
                if self.chance(rates.outage_end) {
                    self.store.down = false;
                    let t = self.now + self.p.ttl;
                    for e in self.store.expires.values_mut() {
                        *e = (*e).max(t);
                    }
                }
            } else {
                if self.chance(rates.outage) {
                    self.store.down = true;
                    self.outages += 1;
                }
                let now = self.now;
                let gone: Vec<u32> = self
                    .store
                    .expires
                    .iter()
                    .filter(|(_, e)| **e <= now)
                    .map(|(id, _)| *id)
                    .collect();
                for id in gone {
                    self.store.expires.remove(&id);
                    self.store.view.members.remove(&id);
                }
            }
            // Instances come, go, crash, lose the network; demand moves.
            let ids: Vec<u32> = self.insts.keys().copied().collect();
            for id in &ids {
                if self.chance(rates.crash) {
                    // The kernel closes its connections; its lease runs out later.
                    self.insts.remove(id);
                    self.crashed.insert(*id, self.now);
                    self.crashes += 1;
                    continue;
                }
                if self.chance(rates.cut_off) {
                    let d = self.p.ttl * (1 + self.below(6) as u32);
                    let now = self.now;
                    if let Some(i) = self.insts.get_mut(id) {
                        i.cut_off_until = now + d;
                    }
                    self.cut_offs += 1;
                }
                if self.chance(rates.demand) {
                    let d = self.pick_demand();
                    if let Some(i) = self.insts.get_mut(id) {
                        i.demand = d;
                    }
                }
            }
            let forgotten = self.now.saturating_sub(self.p.ttl * 3);
            self.crashed.retain(|_, at| *at > forgotten);
            let restarts: Vec<u32> = self.crashed.keys().copied().collect();
            for id in restarts {
                if self.chance(rates.restart) {
                    self.crashed.remove(&id);
                    self.start(id);
                }
            }
            while self.insts.len() + self.crashed.len() < max && self.chance(rates.join) {
                self.join();
            }
            // Rounds in a random order; a few writes land after the others of the step.
            let mut due: Vec<u32> = self
                .insts
                .iter()
                .filter(|(_, i)| i.next_round <= self.now)
                .map(|(id, _)| *id)
                .collect();
            for k in (1..due.len()).rev() {
                let j = self.below(k as u64 + 1) as usize;
                due.swap(k, j);
            }
            for id in &due {
                self.round(*id);
            }
            for id in &due {
                self.finish_late(*id);
            }
            self.connections();
            self.check();
        }
    }
}

#[derive(Clone, Copy)]
struct Rates {
    join: u64,
    restart: u64,
    crash: u64,
    cut_off: u64,
    outage: u64,
    outage_end: u64,
    demand: u64,
}

fn run_fleet(instances: u32, budget: u32, ttl: Duration, hours: u64, seed: u64, churn: u64) -> Sim {
    let p = Params {
        budget,
        max_instances: instances,
        ttl,
    };
    let mut sim = Sim::new(p, seed);
    for _ in 0..instances * 9 / 10 {
        sim.join();
    }
    let rates = Rates {
        join: 200_000,
        restart: 50_000,
        crash: 20 * churn,
        cut_off: 20 * churn,
        outage: 150,
        outage_end: 5_000,
        demand: 5_000,
    };
    sim.run(Duration::from_secs(3600 * hours), rates);
    sim
}

/// 1,000 instances over two simulated hours (a one-minute lease, as a fleet that large
/// would use): the sum of their connections never exceeds the budget, every instance that
/// wants its floor gets it, and grants do move. Every round of every instance reads the
/// whole table, so this runs in the optimized build only: `cargo xtask test` runs
/// `cargo test --release -p proxy --lib fleet::sim` for it.
#[cfg(not(debug_assertions))]
#[test]
fn a_thousand_instances_never_exceed_the_budget() {
    let sim = run_fleet(1000, 10_000, Duration::from_secs(60), 2, 0x5eed_f1ee7, 1);
    eprintln!(
        "steps {} peak {} grant writes {} crashes {} cut-offs {} outages {}",
        sim.steps, sim.peak, sim.grants_moved, sim.crashes, sim.cut_offs, sim.outages
    );
    assert!(sim.steps >= 28_000);
    assert!(sim.crashes > 100 && sim.cut_offs > 100 && sim.outages > 0);
    assert!(
        sim.grants_moved > 10_000,
        "{} grants moved",
        sim.grants_moved
    );
    assert!(
        sim.peak > 10_000 * 7 / 10,
        "the budget was used: peak {}",
        sim.peak
    );
}

/// A small fleet under heavy churn for longer: the same two properties.
#[test]
fn a_small_fleet_under_churn_never_exceeds_the_budget() {
    for seed in 1..=4 {
        let sim = run_fleet(5, 30, Duration::from_secs(10), 4, seed * 0x9e37_79b9, 10);
        eprintln!(
            "steps {} peak {} grant writes {} crashes {} cut-offs {} outages {}",
            sim.steps, sim.peak, sim.grants_moved, sim.crashes, sim.cut_offs, sim.outages
        );
        assert!(sim.grants_moved > 100);
        assert!(sim.crashes > 20 && sim.cut_offs > 20 && sim.outages > 2);
        assert!(sim.peak > 25, "peak {}", sim.peak);
    }
}

/// When the others go idle, the busy instance gets what they gave back.
#[test]
fn load_shifts_to_the_busy_instance() {
    let p = Params {
        budget: 30,
        max_instances: 3,
        ttl: Duration::from_secs(10),
    };
    let mut sim = Sim::new(p, 7);
    for _ in 0..3 {
        sim.join();
    }
    for i in sim.insts.values_mut() {
        i.demand = 64;
    }
    let quiet = Rates {
        join: 0,
        restart: 0,
        crash: 0,
        cut_off: 0,
        outage: 0,
        outage_end: 0,
        demand: 0,
    };
    sim.run(Duration::from_secs(60), quiet);
    let opens: Vec<u32> = sim.insts.values().map(|i| i.open).collect();
    assert_eq!(opens, [10, 10, 10]);
    for i in sim.insts.values_mut().skip(1) {
        i.demand = 0;
    }
    sim.run(Duration::from_secs(60), quiet);
    let opens: Vec<u32> = sim.insts.values().map(|i| i.open).collect();
    assert_eq!(opens[0], 28, "{opens:?}: the idle ones keep one each");
    // The store goes: everyone falls back to at most its floor at once.
    sim.store.down = true;
    sim.run(Duration::from_secs(5), quiet);
    let caps: Vec<u32> = sim.insts.values().map(|i| i.alloc.cap(sim.now)).collect();
    assert_eq!(caps, [10, 1, 1]);
    assert!(sim
        .insts
        .values()
        .all(|i| matches!(i.alloc.contact(), Contact::Adrift { .. })));
    sim.run(p.reclaim_after(), quiet);
    let caps: Vec<u32> = sim.insts.values().map(|i| i.alloc.cap(sim.now)).collect();
    assert_eq!(caps, [10, 10, 10], "floors taken back");
    sim.store.down = false;
    for i in sim.insts.values_mut() {
        i.demand = 64;
    }
    sim.run(Duration::from_secs(60), quiet);
    let opens: Vec<u32> = sim.insts.values().map(|i| i.open).collect();
    assert_eq!(opens, [10, 10, 10], "shared again");
}
