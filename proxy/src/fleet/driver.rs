//! Runs one allocator per shared pool against the store, on a thread and runtime of its
//! own (the control plane never blocks a worker), and sets each pool's budget to its cap.
//!
//! Keys, under `/dbproxy/fleet/<name>/`:
//! - `grants/<pool>`: the pool's grant table, JSON `{instance: connections}`;
//! - `members/<pool>/<instance>`: the instance's member record on its lease, JSON with its
//!   beat, what it wants, holds and has open, and its host.

use super::alloc::{Allocator, Contact, MemberView, Params, Table, Usage, View};
use super::store::{Etcd, EtcdSettings, Put, Store, StoreError};
use crate::config::FleetConfig;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A pool the fleet shares: what it uses, and the cap it gets.
pub trait FleetPool: Send + Sync {
    /// Connections open, and connections wanted now (in use plus waiting borrowers).
    fn usage(&self) -> (u32, u32);
    /// The fleet's cap on this instance's connections.
    fn set_fleet_cap(&self, cap: usize);
}

/// One shared pool.
pub struct SharedPool {
    /// The pool's id (the target group's name; `/read_only` for its readers' pool).
    pub id: String,
    /// `max_connections_total`.
    pub budget: u32,
    pub pool: Arc<dyn FleetPool>,
}

/// An instance's member record.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Member {
    pub beat: u64,
    pub want: u32,
    pub held: u32,
    pub open: u32,
    pub cap: u32,
    pub host: String,
    pub pid: u32,
}

/// One instance as this one last read it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InstanceStatus {
    pub instance: String,
    pub host: String,
    /// Its entry in the grant table (none: not registered).
    pub held: Option<u32>,
    pub want: u32,
    pub open: u32,
    /// This instance.
    pub this: bool,
}

/// The fleet as seen for one pool.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PoolFleetStatus {
    pub pool: String,
    pub max_connections_total: u32,
    pub max_instances: u32,
    pub floor: u32,
    /// `connected`, `adrift` (cut off from the store) or `starting`.
    pub contact: String,
    /// What this instance may have open now.
    pub cap: u32,
    pub held: Option<u32>,
    /// The grant table's sum.
    pub total_held: u32,
    pub instances: Vec<InstanceStatus>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FleetStatus {
    pub name: String,
    pub instance: String,
    pub store: String,
    pub pools: Vec<PoolFleetStatus>,
}

/// The fleet, as the rest of dbproxy sees it.
pub struct Fleet {
    status: parking_lot::Mutex<FleetStatus>,
    /// Store requests that failed.
    pub store_errors: AtomicU64,
    /// Grant-table writes that landed.
    pub grant_writes: AtomicU64,
}

impl Fleet {
    pub fn status(&self) -> FleetStatus {
        self.status.lock().clone()
    }
}

/// This instance's default name: the host and the first endpoint's port.
pub fn default_instance_id(first_listen: Option<&str>) -> String {
    let host = host_name();
    match first_listen.and_then(|l| l.rsplit(':').next()) {
        Some(port) if !port.is_empty() => format!("{host}:{port}"),
        _ => host,
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

fn read_file(what: &str, path: &str) -> Result<Option<Vec<u8>>, StoreError> {
    if path.is_empty() {
        return Ok(None);
    }
    std::fs::read(path)
        .map(Some)
        .map_err(|e| StoreError::Setup(format!("fleet.{what} {path}: {e}")))
}

/// Starts the fleet's thread.
pub fn start(
    cfg: &FleetConfig,
    instance: String,
    pools: Vec<SharedPool>,
) -> Result<Arc<Fleet>, StoreError> {
    let ttl = cfg.lease_ttl;
    let client_pem = match (
        read_file("cert_file", &cfg.cert_file)?,
        read_file("key_file", &cfg.key_file)?,
    ) {
        (Some(mut c), Some(k)) => {
            c.push(b'\n');
            c.extend(k);
            Some(c)
        }
        _ => None,
    };
    let settings = EtcdSettings {
        endpoints: cfg.endpoints.clone(),
        user: (!cfg.username.is_empty()).then(|| (cfg.username.clone(), cfg.password.clone())),
        ca_pem: read_file("ca_file", &cfg.ca_file)?,
        client_pem,
        // Each endpoint gets a share of the round (tried in turn when one does not answer).
        timeout: ttl / 16,
    };
    let instance = instance.replace('/', "_");
    let fleet = Arc::new(Fleet {
        status: parking_lot::Mutex::new(FleetStatus {
            name: cfg.name.clone(),
            instance: instance.clone(),
            store: cfg.endpoints.join(","),
            pools: Vec::new(),
        }),
        store_errors: AtomicU64::new(0),
        grant_writes: AtomicU64::new(0),
    });
    let prefix = format!("/dbproxy/fleet/{}/", cfg.name);
    let return_after = cfg.return_after;
    let max_instances = cfg.max_instances;
    let f = fleet.clone();
    std::thread::Builder::new()
        .name("dbproxy-fleet".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("fleet: no runtime: {e}");
                    return;
                }
            };
            let store = match Etcd::new(settings) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!("fleet: {e}");
                    return;
                }
            };
            let start = Instant::now();
            let pools = pools
                .into_iter()
                .map(|p| {
                    let params = Params {
                        budget: p.budget,
                        max_instances,
                        ttl,
                    };
                    Shared {
                        alloc: Allocator::new(instance.clone(), params, Duration::ZERO),
                        wants: VecDeque::new(),
                        view: View::default(),
                        records: BTreeMap::new(),
                        beat: 0,
                        pool: p,
                    }
                })
                .collect();
            let mut d = Driver {
                store,
                prefix,
                instance,
                host: host_name(),
                lease: None,
                pools,
                return_after,
                start,
                fleet: f,
            };
            rt.block_on(d.run());
        })
        .map_err(|e| StoreError::Setup(format!("fleet thread: {e}")))?;
    Ok(fleet)
}

struct Shared {
    pool: SharedPool,
    alloc: Allocator,
    /// Samples of what it wanted, over `return_after`.
    wants: VecDeque<(Duration, u32)>,
    view: View,
    /// The member records of the last read (hosts and open counts for the status).
    records: BTreeMap<String, Member>,
    beat: u64,
}

impl Shared {
    fn want(&self) -> u32 {
        self.wants.iter().map(|(_, w)| *w).max().unwrap_or(0).max(1)
    }
}

struct Driver<S> {
    store: S,
    prefix: String,
    instance: String,
    host: String,
    lease: Option<i64>,
    pools: Vec<Shared>,
    return_after: Duration,
    start: Instant,
    fleet: Arc<Fleet>,
}

const SAMPLE_EVERY: Duration = Duration::from_millis(100);

impl<S: Store> Driver<S> {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    async fn run(&mut self) {
        let beat_every = self
            .pools
            .first()
            .map_or(Duration::from_secs(1), |p| p.alloc.params().beat_every());
        let timeout = self.pools.first().map_or(Duration::from_secs(1), |p| {
            p.alloc.params().request_timeout()
        });
        let mut next_round = Duration::ZERO;
        loop {
            let now = self.now();
            for p in &mut self.pools {
                let (_, want) = p.pool.pool.usage();
                p.wants.push_back((now, want));
                while p
                    .wants
                    .front()
                    .is_some_and(|(t, _)| *t + self.return_after < now)
                {
                    p.wants.pop_front();
                }
            }
            if now >= next_round {
                next_round = now + beat_every;
                if tokio::time::timeout(timeout, self.round()).await.is_err() {
                    let now = self.now();
                    self.fleet.store_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("fleet: etcd did not answer within {timeout:?}");
                    for p in &mut self.pools {
                        p.alloc.failed(now);
                    }
                }
            }
            self.apply();
            tokio::time::sleep(SAMPLE_EVERY).await;
        }
    }

    /// Sets each pool's cap, and publishes the status.
    fn apply(&mut self) {
        let now = self.now();
        let mut pools = Vec::with_capacity(self.pools.len());
        for p in &self.pools {
            let cap = p.alloc.cap(now);
            p.pool.pool.set_fleet_cap(cap as usize);
            let params = p.alloc.params();
            let instances = p
                .view
                .members
                .keys()
                .chain(p.view.table.keys())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .map(|id| {
                    let m = p.records.get(id);
                    InstanceStatus {
                        instance: id.clone(),
                        host: m.map(|m| m.host.clone()).unwrap_or_default(),
                        held: p.view.table.get(id).copied(),
                        want: m.map_or(0, |m| m.want),
                        open: m.map_or(0, |m| m.open),
                        this: *id == self.instance,
                    }
                })
                .collect();
            pools.push(PoolFleetStatus {
                pool: p.pool.id.clone(),
                max_connections_total: params.budget,
                max_instances: params.max_instances,
                floor: params.floor(),
                contact: match p.alloc.contact() {
                    Contact::Connected => "connected",
                    Contact::Adrift { .. } => "adrift",
                    Contact::Fresh { .. } => "starting",
                }
                .into(),
                cap,
                held: p.alloc.held(),
                total_held: p.view.table.values().fold(0, |a, h| a.saturating_add(*h)),
                instances,
            });
        }
        self.fleet.status.lock().pools = pools;
    }

    fn member_key(&self, pool: &str) -> String {
        format!("{}members/{pool}/{}", self.prefix, self.instance)
    }

    fn failed_all(&mut self, e: &StoreError) {
        let now = self.now();
        self.fleet.store_errors.fetch_add(1, Ordering::Relaxed);
        let was_connected = self.pools.iter().any(|p| p.alloc.beats());
        for p in &mut self.pools {
            p.alloc.failed(now);
        }
        if was_connected {
            tracing::warn!("fleet: cut off from etcd, each pool at most at its floor: {e}");
        }
    }

    fn member_record(&self, k: usize, beat: u64) -> Vec<u8> {
        let now = self.now();
        let p = &self.pools[k];
        let (open, _) = p.pool.pool.usage();
        let m = Member {
            beat,
            want: p.want(),
            held: p.alloc.held().unwrap_or(0),
            open,
            cap: p.alloc.cap(now),
            host: self.host.clone(),
            pid: std::process::id(),
        };
        serde_json::to_vec(&m).unwrap_or_default()
    }

    /// One round: the lease, the beats, one read, then each pool's decision.
    async fn round(&mut self) {
        let ttl = self
            .pools
            .first()
            .map_or(Duration::from_secs(10), |p| p.alloc.params().ttl);
        let lease = match self.lease {
            Some(l) => match self.store.keep_alive(l).await {
                Ok(true) => l,
                Ok(false) => {
                    tracing::warn!("fleet: lease {l:x} expired");
                    self.lease = None;
                    self.failed_all(&StoreError::Refused("lease expired".into()));
                    return;
                }
                Err(e) => return self.failed_all(&e),
            },
            None => match self.store.grant(ttl).await {
                Ok(l) => {
                    self.lease = Some(l);
                    l
                }
                Err(e) => return self.failed_all(&e),
            },
        };
        for k in 0..self.pools.len() {
            if !self.pools[k].alloc.beats() {
                continue;
            }
            let now = self.now();
            let beat = self.pools[k].beat + 1;
            self.pools[k].alloc.beating(now);
            let put = Put {
                key: self.member_key(&self.pools[k].pool.id),
                value: self.member_record(k, beat),
                lease,
            };
            match self.store.put(put).await {
                Ok(()) => {
                    self.pools[k].beat = beat;
                    self.pools[k].alloc.beat_landed();
                }
                Err(e) => {
                    let now = self.now();
                    self.pools[k].alloc.failed(now);
                    self.fleet.store_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(pool = %self.pools[k].pool.id, "fleet: beat failed: {e}");
                }
            }
        }
        let kvs = match self.store.read_prefix(&self.prefix).await {
            Ok(kvs) => kvs,
            Err(e) => return self.failed_all(&e),
        };
        let mut records: BTreeMap<String, BTreeMap<String, Member>> = BTreeMap::new();
        let mut tables: BTreeMap<String, (i64, Table)> = BTreeMap::new();
        for kv in kvs {
            let Some(rest) = kv.key.strip_prefix(&self.prefix) else {
                continue;
            };
            if let Some(pool) = rest.strip_prefix("grants/") {
                match serde_json::from_slice::<Table>(&kv.value) {
                    Ok(t) => {
                        tables.insert(pool.to_string(), (kv.mod_revision, t));
                    }
                    Err(e) => tracing::warn!(key = %kv.key, "fleet: unreadable grant table: {e}"),
                }
            } else if let Some((pool, id)) = rest
                .strip_prefix("members/")
                .and_then(|r| r.rsplit_once('/'))
            {
                if let Ok(m) = serde_json::from_slice::<Member>(&kv.value) {
                    records
                        .entry(pool.to_string())
                        .or_default()
                        .insert(id.to_string(), m);
                }
            }
        }
        for k in 0..self.pools.len() {
            let id = self.pools[k].pool.id.clone();
            let (rev, table) = tables.remove(&id).unwrap_or_default();
            let now = self.now();
            let p = &mut self.pools[k];
            p.records = records.remove(&id).unwrap_or_default();
            let members = p
                .records
                .iter()
                .map(|(i, m)| {
                    let view = MemberView {
                        beat: m.beat,
                        want: m.want,
                    };
                    (i.clone(), view)
                })
                .collect();
            p.view = View {
                rev,
                table,
                members,
            };
            p.alloc.observe(now, &p.view);
            let (open, _) = p.pool.pool.usage();
            let usage = Usage {
                open,
                want: p.want(),
            };
            let Some(prop) = p.alloc.decide(now, &p.view, usage) else {
                continue;
            };
            let value = serde_json::to_vec(&prop.table).unwrap_or_default();
            let put = Put {
                key: format!("{}grants/{id}", self.prefix),
                value,
                lease: 0,
            };
            let also = prop.registers.then(|| {
                let beat = self.pools[k].beat + 1;
                Put {
                    key: self.member_key(&id),
                    value: self.member_record(k, beat),
                    lease,
                }
            });
            match self.store.swap(prop.rev, put, also).await {
                Ok(Some(_)) => {
                    self.fleet.grant_writes.fetch_add(1, Ordering::Relaxed);
                    let p = &mut self.pools[k];
                    if prop.registers {
                        p.beat += 1;
                        tracing::info!(pool = %id, held = ?prop.table.get(&self.instance), "fleet: registered");
                    }
                    p.alloc.decided(now, true);
                    p.view.table = prop.table;
                }
                Ok(None) => self.pools[k].alloc.decided(now, false),
                Err(e) => {
                    self.fleet.store_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(pool = %id, "fleet: grant write failed: {e}");
                    let now = self.now();
                    self.pools[k].alloc.failed(now);
                }
            }
        }
    }
}
