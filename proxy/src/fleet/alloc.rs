//! One instance's share of a fleet-wide connection budget, sans-IO: store views, request
//! outcomes and time in; the table to write and the local cap out.
//!
//! The store holds, per target group, a grant table (instance id → connections it may
//! hold), written only by compare-and-swap on its revision, and one member record per
//! instance (on the instance's lease) whose `beat` the instance bumps every
//! [`Params::beat_every`]. The table always satisfies
//!
//! ```text
//!   Σ accounted(entry) + (max_instances − entries) × floor  ≤  budget
//! ```
//!
//! where `floor = budget / max_instances`: every slot nobody has registered in is reserved
//! at the floor, because an instance that cannot reach the store may use its floor.
//!
//! - **Registering** takes one of those reserved slots and holds the floor in it, so it
//!   changes nothing in the sum: safe whatever anyone else believes.
//! - **Lending.** A registered instance may hold less than its floor (its target, from the
//!   fleet's wants, is lower) and others grow into what it gave back. That is how load
//!   shifts to the busy instances.
//! - **Growing** needs room in the grower's own view, in which an entry whose owner it has
//!   not seen beat since it (re)connected counts at least the floor: that owner may have
//!   been adrift long enough to take its floor back.
//! - **Adrift.** An instance whose request fails stops beating at once and caps itself at
//!   `min(held, floor)`; its excess over the floor goes before anyone can collect its
//!   entry (collection needs [`Params::stale_after`] without a beat). Only after
//!   [`Params::reclaim_after`] since its last write may it use its whole floor again: by then
//!   every instance still in contact has collected its entry (which then counts as a
//!   reserved slot, at the floor).
//! - **Collecting.** An entry whose member record is gone (its lease expired) or whose beat
//!   has not moved for [`Params::stale_after`] of the observer's clock is dropped.
//!
//! Connections outlive grants: a lower cap closes idle connections at once and the rest
//! as their transactions end (the pool's budget debt), and the table never claims less
//! than the instance still has open.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::time::Duration;

/// The fleet's settings for one target group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// `max_connections_total`: the whole fleet's connections.
    pub budget: u32,
    /// `max_instances`: how many instances may run at once (a promise of the operator).
    pub max_instances: u32,
    /// The lease time: an instance that lost the store is at its floor within it, and a
    /// dead instance's grant returns to the others within about twice it.
    pub ttl: Duration,
}

impl Params {
    /// What every instance may use without the store.
    pub fn floor(&self) -> u32 {
        self.budget / self.max_instances.max(1)
    }

    /// How often an instance bumps its beat and reads the store.
    pub fn beat_every(&self) -> Duration {
        self.ttl / 4
    }

    /// The longest one round of store requests may take. A beat that landed at `t` is
    /// followed by a round at `t + ttl/4`, failed by `t + 3ttl/8` (ridden out: within
    /// [`Params::tolerate`]), and one at `t + ttl/2` failed by `t + 5ttl/8`: adrift then,
    /// well before anyone may collect the entry at `t + ttl`.
    pub fn request_timeout(&self) -> Duration {
        self.ttl / 8
    }

    /// How long after its last beat that landed an instance rides out failed requests
    /// before it counts as adrift.
    pub fn tolerate(&self) -> Duration {
        self.ttl / 2
    }

    /// An entry whose beat did not move for this long (by the observer's clock) is
    /// collected.
    pub fn stale_after(&self) -> Duration {
        self.ttl
    }

    /// An instance that lost the store uses its whole floor this long after its last
    /// write: collection ([`Params::stale_after`]) plus two beats for its observers to
    /// notice and a margin.
    pub fn reclaim_after(&self) -> Duration {
        self.ttl * 2
    }

    /// Connections the registered instances may share: the budget less the slots nobody
    /// registered in.
    fn shareable(&self, registered: usize) -> u32 {
        let unregistered = (self.max_instances as usize).saturating_sub(registered) as u32;
        self.budget
            .saturating_sub(unregistered.saturating_mul(self.floor()))
    }
}

/// A target group's grant table: instance id → connections it may hold.
pub type Table<I = String> = BTreeMap<I, u32>;

/// What an instance's member record says, as far as one group's allocation needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemberView {
    /// Bumped by its owner at every beat.
    pub beat: u64,
    /// Connections it would use now (in use, waiting, recent peak).
    pub want: u32,
}

/// One read of the store for one group.
#[derive(Debug, Clone, PartialEq)]
pub struct View<I = String> {
    /// The table's revision (0: no table yet); a write must name it.
    pub rev: i64,
    pub table: Table<I>,
    /// The member records present (their leases alive).
    pub members: BTreeMap<I, MemberView>,
}

impl<I> Default for View<I> {
    fn default() -> Self {
        View {
            rev: 0,
            table: BTreeMap::new(),
            members: BTreeMap::new(),
        }
    }
}

/// A compare-and-swap of the grant table.
#[derive(Debug, Clone, PartialEq)]
pub struct Proposal<I = String> {
    /// The revision the write is conditional on.
    pub rev: i64,
    pub table: Table<I>,
    /// It registers the instance: its member record (with a new beat) goes in the same
    /// transaction, so that nobody confirms it before its entry says what it uses.
    pub registers: bool,
}

/// What the instance's pool is doing now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Connections open (idle and in use).
    pub open: u32,
    /// What it would use: recent peak of in use plus waiting.
    pub want: u32,
}

/// Where an instance stands with the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contact {
    /// Not registered since it started.
    Fresh { since: Duration },
    /// Registered; its last write succeeded.
    Connected,
    /// A request failed; `last_write` is when its last beat was sent.
    Adrift { last_write: Duration },
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    beat: u64,
    /// When the beat last moved, by this instance's clock.
    moved_at: Duration,
    /// Its beat moved while this instance was connected: its owner is in contact too.
    confirmed: bool,
}

/// One instance's allocation for one target group. `I` is how instances are named (their
/// ids in the store; the simulation uses numbers).
#[derive(Debug)]
pub struct Allocator<I = String> {
    id: I,
    params: Params,
    contact: Contact,
    /// Its entry in the table as last read or written (`None`: not in it).
    held: Option<u32>,
    /// The target it is shrinking to, if below what it holds.
    limit: Option<u32>,
    /// When the last beat was sent, and when the last one that landed was.
    last_write: Option<Duration>,
    last_beat_ok: Option<Duration>,
    seen: HashMap<I, Seen>,
    /// A read succeeded since the last failure.
    read: bool,
    /// The write in flight.
    pending: Option<Proposal<I>>,
}

impl<I: Ord + Hash + Clone> Allocator<I> {
    pub fn new(id: I, params: Params, now: Duration) -> Allocator<I> {
        Allocator {
            id,
            params,
            contact: Contact::Fresh { since: now },
            held: None,
            limit: None,
            last_write: None,
            last_beat_ok: None,
            seen: HashMap::new(),
            read: false,
            pending: None,
        }
    }

    pub fn id(&self) -> &I {
        &self.id
    }

    pub fn params(&self) -> Params {
        self.params
    }

    /// New settings (a reload); the next decision follows them.
    pub fn set_params(&mut self, params: Params) {
        self.params = params;
    }

    pub fn contact(&self) -> Contact {
        self.contact
    }

    /// Its entry in the table, as last known.
    pub fn held(&self) -> Option<u32> {
        self.held
    }

    /// The connections this instance may have open now.
    pub fn cap(&self, now: Duration) -> u32 {
        let floor = self.params.floor();
        match self.contact {
            Contact::Connected => {
                let held = self.held.unwrap_or(0);
                self.limit.map_or(held, |l| l.min(held))
            }
            Contact::Fresh { since } => {
                if now >= since + self.params.reclaim_after() {
                    floor
                } else {
                    0
                }
            }
            Contact::Adrift { last_write } => {
                if now >= last_write + self.params.reclaim_after() {
                    floor
                } else {
                    self.held.unwrap_or(0).min(floor)
                }
            }
        }
    }

    /// Whether the instance beats on its own: only while connected. Otherwise its beat
    /// goes with its registration, after a read: a beat that reached the store unseen
    /// would have its observers confirm an entry that understates what it uses, and
    /// would put off its collection past its reclaim.
    pub fn beats(&self) -> bool {
        self.contact == Contact::Connected
    }

    /// A beat (a write of its member record) is about to be sent.
    pub fn beating(&mut self, now: Duration) {
        self.last_write = Some(now);
    }

    /// The beat sent last landed.
    pub fn beat_landed(&mut self) {
        self.last_beat_ok = self.last_write;
    }

    /// A request failed or timed out. Within [`Params::tolerate`] of its last beat that
    /// landed (an etcd leader election, one lost packet) it stays connected; after that it
    /// stops beating and caps itself at the floor, still well before anyone may collect
    /// its entry.
    pub fn failed(&mut self, now: Duration) {
        self.read = false;
        // A table write whose answer was lost may have landed: of the two values of its
        // entry, the smaller one binds.
        if let Some(p) = self.pending.take() {
            let proposed = p.table.get(&self.id).copied();
            self.held = match (self.held, proposed) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (_, None) | (None, _) => None,
            };
        }
        let tolerated = self
            .last_beat_ok
            .is_some_and(|t| now < t + self.params.tolerate());
        match self.contact {
            // Never registered: it keeps waiting out its start.
            Contact::Fresh { .. } => {}
            Contact::Connected if tolerated => {}
            Contact::Connected | Contact::Adrift { .. } => {
                self.contact = Contact::Adrift {
                    last_write: self.last_write.unwrap_or(now),
                };
                self.limit = None;
            }
        }
    }

    /// A read of the store for this group.
    pub fn observe(&mut self, now: Duration, view: &View<I>) {
        let connected = self.contact == Contact::Connected;
        if self.seen.len() > view.members.len() {
            self.seen.retain(|id, _| view.members.contains_key(id));
        }
        for (id, m) in &view.members {
            match self.seen.get_mut(id) {
                Some(s) if s.beat != m.beat => {
                    s.beat = m.beat;
                    s.moved_at = now;
                    s.confirmed |= connected;
                }
                Some(_) => {}
                None => {
                    self.seen.insert(
                        id.clone(),
                        Seen {
                            beat: m.beat,
                            moved_at: now,
                            confirmed: false,
                        },
                    );
                }
            }
        }
        self.read = true;
        if connected {
            match view.table.get(&self.id) {
                Some(h) => self.held = Some(*h),
                // Collected while it thought itself connected: it starts again.
                None => {
                    self.contact = Contact::Adrift {
                        last_write: self.last_write.unwrap_or(now),
                    };
                    self.limit = None;
                }
            }
        }
    }

    /// Whether `id`'s entry may be collected.
    fn collectable(&self, now: Duration, id: &I, view: &View<I>) -> bool {
        if *id == self.id {
            return false;
        }
        if !view.members.contains_key(id) {
            return true;
        }
        self.seen
            .get(id)
            .is_some_and(|s| now >= s.moved_at + self.params.stale_after())
    }

    /// What `id`'s entry counts for, as far as this instance can tell.
    fn accounted(&self, id: &I, held: u32) -> u32 {
        if self.seen.get(id).is_some_and(|s| s.confirmed) {
            held
        } else {
            held.max(self.params.floor())
        }
    }

    /// The table this instance would write now, from `view` (the one it last observed):
    /// others' dead entries dropped, its own entry registered, grown or shrunk. `None`:
    /// nothing to change, or a write is in flight.
    pub fn decide(&mut self, now: Duration, view: &View<I>, usage: Usage) -> Option<Proposal<I>> {
        if self.pending.is_some() || !self.read {
            return None;
        }
        let p = self.params;
        let floor = p.floor();
        let mut table: Table<I> = view
            .table
            .iter()
            .filter(|(id, _)| !self.collectable(now, id, view))
            .map(|(id, h)| (id.clone(), *h))
            .collect();
        let registering = self.contact != Contact::Connected;
        // What it uses now, whatever the table says: registering never claims less.
        let using = self.cap(now).max(usage.open);
        let mine = match table.get(&self.id) {
            // Back after being adrift, or restarted under the same id, with its entry still
            // there: it claims what it may be using now, and no more of the entry than the
            // floor (it grows again as anyone does). Its observers count it at least at
            // the floor by the time it may take its floor back.
            Some(h) if registering => using.max((*h).min(floor)),
            Some(h) => *h,
            // A slot nobody holds: the floor if that much is free. A slot just collected
            // may still be lent out (its owner held less than the floor); then it takes
            // what is free and grows as the others shrink to their fair shares.
            None if table.len() < p.max_instances as usize => {
                let others = table
                    .iter()
                    .map(|(id, h)| self.accounted(id, *h))
                    .fold(0, u32::saturating_add);
                let room = p.shareable(table.len() + 1).saturating_sub(others);
                room.min(floor).max(using)
            }
            // Every slot taken (dead entries not yet collected): it waits.
            None if table.len() != view.table.len() => {
                return self.propose(view.rev, table, false);
            }
            None => return None,
        };
        table.insert(self.id.clone(), mine);
        let shareable = p.shareable(table.len());
        let wants: Vec<(&I, u32)> = table
            .keys()
            .map(|id| {
                let w = if *id == self.id {
                    usage.want
                } else {
                    view.members.get(id).map_or(0, |m| m.want)
                };
                (id, w)
            })
            .collect();
        let target = fair_share_of(shareable, &wants, &self.id);
        let others: u32 = table
            .iter()
            .filter(|(id, _)| **id != self.id)
            .map(|(id, h)| self.accounted(id, *h))
            .fold(0, u32::saturating_add);
        let free = shareable.saturating_sub(others.saturating_add(mine));
        let new = if registering {
            mine
        } else if mine < target {
            mine + free.min(target - mine)
        } else if mine > target {
            target.max(usage.open)
        } else {
            mine
        };
        self.limit = (target < new).then_some(target);
        table.insert(self.id.clone(), new);
        if !registering && table == view.table {
            return None;
        }
        self.propose(view.rev, table, registering)
    }

    fn propose(&mut self, rev: i64, table: Table<I>, registers: bool) -> Option<Proposal<I>> {
        let p = Proposal {
            rev,
            table,
            registers,
        };
        self.pending = Some(p.clone());
        Some(p)
    }

    /// The answer to the last proposal: written (at revision `_rev`), or the table had
    /// moved on (it reads again before deciding again).
    pub fn decided(&mut self, now: Duration, written: bool) {
        let Some(p) = self.pending.take() else {
            return;
        };
        if !written {
            self.read = false;
            return;
        }
        let held = p.table.get(&self.id).copied();
        if held.is_some() && self.contact != Contact::Connected {
            // Registered (its member record went in the same transaction, a beat): from
            // now on only beats seen while connected confirm anyone.
            self.contact = Contact::Connected;
            self.last_beat_ok = Some(now);
            for s in self.seen.values_mut() {
                s.confirmed = false;
            }
        }
        self.held = held;
    }
}

/// `me`'s max-min fair share of `total` among `wants`: everyone gets what it wants if that
/// fits, else the fullest level every share can be raised to, the remainder spread one
/// by one in id order.
pub fn fair_share_of<I: Ord>(total: u32, wants: &[(&I, u32)], me: &I) -> u32 {
    let mut order: Vec<&(&I, u32)> = wants.iter().collect();
    order.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(b.0)));
    let mut left = total;
    let mut n = order.len() as u32;
    let mut rest: Vec<&I> = Vec::new();
    for (id, want) in order {
        let level = left / n.max(1);
        if *want <= level {
            if *id == me {
                return *want;
            }
            left -= want;
            n -= 1;
        } else {
            rest.push(id);
        }
    }
    let Some(level) = left.checked_div(rest.len() as u32) else {
        return 0;
    };
    let extra = left - level * rest.len() as u32;
    rest.sort();
    match rest.iter().position(|id| *id == me) {
        Some(k) => level + u32::from((k as u32) < extra),
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn params() -> Params {
        Params {
            budget: 30,
            max_instances: 3,
            ttl: Duration::from_secs(4),
        }
    }

    fn member(beat: u64, want: u32) -> MemberView {
        MemberView { beat, want }
    }

    #[test]
    fn fair_shares_fill_the_smallest_wants_first() {
        let shares = |total: u32, v: &[(&str, u32)]| -> Vec<u32> {
            let wants: Vec<(&&str, u32)> = v.iter().map(|(a, b)| (a, *b)).collect();
            v.iter()
                .map(|(me, _)| fair_share_of(total, &wants, me))
                .collect()
        };
        assert_eq!(shares(30, &[("a", 64), ("b", 64), ("c", 64)]), [10, 10, 10]);
        assert_eq!(shares(30, &[("a", 64), ("b", 1), ("c", 1)]), [28, 1, 1]);
        assert_eq!(shares(31, &[("a", 64), ("b", 64), ("c", 2)]), [15, 14, 2]);
        assert_eq!(
            shares(10, &[("a", 3), ("b", 2)]),
            [3, 2],
            "what nobody wants stays free"
        );
        assert_eq!(fair_share_of::<&str>(10, &[], &"a"), 0);
    }

    /// A fresh instance registers at its floor in a reserved slot, then grows into what
    /// the others do not want once it has seen them beat.
    #[test]
    fn registering_takes_the_floor_and_growth_waits_for_confirmed_peers() {
        let mut a = Allocator::<String>::new("a".into(), params(), Duration::ZERO);
        assert_eq!(a.cap(Duration::ZERO), 0, "no floor before registering");
        let mut v = View {
            rev: 5,
            table: Table::from([("b".into(), 10)]),
            members: BTreeMap::from([("b".into(), member(1, 1))]),
        };
        a.observe(S, &v);
        let p = a.decide(S, &v, Usage { open: 0, want: 64 }).unwrap();
        assert_eq!(p.rev, 5);
        assert_eq!(p.table["a"], 10);
        a.beating(S);
        a.decided(S, true);
        assert_eq!(a.contact(), Contact::Connected);
        assert_eq!(a.cap(S), 10);
        v.rev = 6;
        v.table = p.table.clone();
        v.members.insert("a".into(), member(1, 64));
        // b gave back all but one, but a has not seen b beat since it registered: b may
        // be adrift and back at its floor.
        v.table.insert("b".into(), 1);
        v.rev = 7;
        a.observe(2 * S, &v);
        assert_eq!(
            a.decide(2 * S, &v, Usage { open: 10, want: 64 }),
            None,
            "b counts at its floor until confirmed"
        );
        v.members.insert("b".into(), member(2, 1));
        a.observe(3 * S, &v);
        let p = a.decide(3 * S, &v, Usage { open: 10, want: 64 }).unwrap();
        assert_eq!(
            p.table["a"], 19,
            "30 less b's 1 less the unregistered slot's 10"
        );
        assert_eq!(p.rev, 7);
        a.decided(S, true);
        assert_eq!(a.cap(4 * S), 19);
    }

    /// Holding more than its fair share, an instance caps at once and gives back only what
    /// has closed.
    #[test]
    fn shrinking_gives_back_only_what_closed() {
        let mut a = Allocator::<String>::new("a".into(), params(), Duration::ZERO);
        let v = View {
            rev: 9,
            table: Table::from([("a".into(), 20), ("b".into(), 5), ("c".into(), 5)]),
            members: BTreeMap::from([
                ("a".into(), member(1, 20)),
                ("b".into(), member(1, 64)),
                ("c".into(), member(1, 64)),
            ]),
        };
        a.contact = Contact::Connected;
        a.held = Some(20);
        a.observe(S, &v);
        let p = a.decide(S, &v, Usage { open: 18, want: 64 }).unwrap();
        assert_eq!(p.table["a"], 18, "18 still open");
        assert_eq!(a.cap(S), 10, "its fair share, at once");
        a.decided(S, true);
        let mut v2 = v.clone();
        v2.table = p.table;
        v2.rev = 10;
        a.observe(2 * S, &v2);
        let p = a.decide(2 * S, &v2, Usage { open: 10, want: 64 }).unwrap();
        assert_eq!(p.table["a"], 10);
    }

    /// A failure soon after a beat that landed is ridden out; one later makes it adrift.
    #[test]
    fn a_short_outage_is_ridden_out() {
        let mut a = Allocator::<String>::new("a".into(), params(), Duration::ZERO);
        a.contact = Contact::Connected;
        a.held = Some(25);
        a.beating(10 * S);
        a.beat_landed();
        a.failed(11 * S);
        assert_eq!(a.contact(), Contact::Connected);
        assert_eq!(a.cap(11 * S), 25);
        a.beating(11 * S);
        a.failed(12 * S);
        assert_eq!(a.contact(), Contact::Adrift { last_write: 11 * S });
        assert_eq!(a.cap(12 * S), 10);
    }

    /// Adrift: at most the floor at once, the whole floor only after `reclaim_after`
    /// since its last write; a fresh instance with no store waits as long.
    #[test]
    fn adrift_caps_at_the_floor_and_reclaims_it_late() {
        let p = params();
        let mut a = Allocator::<String>::new("a".into(), p, Duration::ZERO);
        a.contact = Contact::Connected;
        a.held = Some(25);
        a.beating(10 * S);
        a.failed(11 * S);
        assert_eq!(a.cap(11 * S), 10);
        assert!(!a.beats());
        let mut b = Allocator::<String>::new("b".into(), p, Duration::ZERO);
        b.contact = Contact::Connected;
        b.held = Some(3);
        b.beating(10 * S);
        b.failed(11 * S);
        assert_eq!(b.cap(11 * S), 3);
        assert_eq!(b.cap(10 * S + p.reclaim_after() - S), 3);
        assert_eq!(b.cap(10 * S + p.reclaim_after()), 10);
        let c = Allocator::<String>::new("c".into(), p, 5 * S);
        assert_eq!(c.cap(5 * S + p.reclaim_after() - S), 0);
        assert_eq!(c.cap(5 * S + p.reclaim_after()), 10);
    }

    /// A dead instance's entry is collected once its record is gone or its beat stood
    /// still for `stale_after`; the observer then counts its slot at the floor.
    #[test]
    fn dead_entries_are_collected() {
        let p = params();
        let mut a = Allocator::<String>::new("a".into(), p, Duration::ZERO);
        a.contact = Contact::Connected;
        a.held = Some(10);
        let v = View {
            rev: 3,
            table: Table::from([("a".into(), 10), ("b".into(), 15), ("c".into(), 5)]),
            members: BTreeMap::from([("a".into(), member(1, 10)), ("b".into(), member(1, 15))]),
        };
        a.observe(S, &v);
        let prop = a.decide(S, &v, Usage { open: 10, want: 10 }).unwrap();
        assert!(!prop.table.contains_key("c"), "c's record is gone");
        assert!(prop.table.contains_key("b"));
        a.decided(S, false);
        a.observe(S + p.stale_after(), &v);
        let prop = a
            .decide(S + p.stale_after(), &v, Usage { open: 10, want: 10 })
            .unwrap();
        assert!(!prop.table.contains_key("b"), "b's beat stood still");
    }
}
