//! The kernel guard: dbproxy's eBPF connect4/connect6 programs, attached to a cgroup, make
//! the kernel refuse connect() to the database from any process outside dbproxy's cgroup.
//!
//! At start dbproxy moves itself into its own cgroup, loads the programs (embedded at build
//! time), fills the maps with every target of every target group and the allowed cgroups,
//! attaches at the configured cgroup and reads denial events. With `pin_path`, links and
//! maps are pinned in bpffs: the guard outlives dbproxy, and a restarted dbproxy takes the
//! pinned links over without a moment in which the database is open.

use crate::config::GuardConfig;
use aya::maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray, RingBuf};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use aya::{include_bytes_aligned, Ebpf, EbpfLoader};
use parking_lot::Mutex;
use proxy_common::{DenyEvent, Dest4, Dest6, PRESENT};
use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The eBPF object, embedded by build.rs (empty when it was not built).
static OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf.o"));

/// Whether this binary carries the guard's eBPF object (`cargo xtask build` embeds it).
pub fn built_in() -> bool {
    !OBJECT.is_empty()
}

const MAPS: [&str; 9] = [
    "PROTECTED4",
    "PROTECTED6",
    "LOCAL_PORTS",
    "LOCAL4",
    "LOCAL6",
    "HOST_NETNS",
    "ALLOWED",
    "EVENTS",
    "DENIED",
];
const PROGRAMS: [&str; 2] = ["connect4", "connect6"];

/// Why the guard could not start; dbproxy then refuses to start.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("the guard needs {0}; run dbproxy as root, or with CAP_BPF CAP_NET_ADMIN CAP_PERFMON (packaging/dbproxy.service)")]
    MissingCapability(String),
    #[error("this dbproxy was built without the guard's eBPF object: run `cargo xtask build-ebpf`, then rebuild dbproxy")]
    NoObject,
    #[error("no cgroup2 filesystem is mounted (see /proc/mounts); set guard.attach_cgroup")]
    NoCgroup2,
    #[error("{path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the eBPF programs failed: {0}")]
    Load(String),
    #[error("attaching to {path} failed: {why}")]
    Attach { path: PathBuf, why: String },
    #[error("guard maps: {0}")]
    Map(String),
}

/// Counters the guard keeps (read by metrics and status).
#[derive(Debug)]
pub struct GuardStats {
    pub denials: AtomicU64,
    pub protected: AtomicU64,
    /// The last refused connect() calls.
    pub recent: crate::stats::Recent<Denial>,
}

impl Default for GuardStats {
    fn default() -> Self {
        GuardStats {
            denials: AtomicU64::new(0),
            protected: AtomicU64::new(0),
            recent: crate::stats::Recent::new(20),
        }
    }
}

/// A connect() to the database the kernel refused.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Denial {
    /// Seconds since the Unix epoch.
    pub at: f64,
    pub pid: u32,
    pub comm: String,
    pub destination: String,
}

/// The guard's protected destinations, which follow the targets' addresses.
pub struct Protected {
    v4: Mutex<BpfHashMap<MapData, Dest4, u8>>,
    v6: Mutex<BpfHashMap<MapData, Dest6, u8>>,
    local_ports: Mutex<BpfHashMap<MapData, u16, u8>>,
    local: LocalAddrs,
    stats: Arc<GuardStats>,
}

impl Protected {
    /// Protects `addr` too (a target found at a new address); old addresses stay
    /// protected.
    pub fn protect(&self, addr: SocketAddr) {
        let (v4, v6) = destinations(&[addr], &[]);
        let mut added = 0;
        if self.local.contains(addr.ip()) {
            let mut m = self.local_ports.lock();
            let port = addr.port().to_be();
            if m.get(&port, 0).is_err() && m.insert(port, PRESENT, 0).is_ok() {
                added += 1;
            }
        }
        for d in v4 {
            let mut m = self.v4.lock();
            if m.get(&d, 0).is_err() && m.insert(d, PRESENT, 0).is_ok() {
                added += 1;
            }
        }
        for d in v6 {
            let mut m = self.v6.lock();
            if m.get(&d, 0).is_err() && m.insert(d, PRESENT, 0).is_ok() {
                added += 1;
            }
        }
        if added > 0 {
            self.stats.protected.fetch_add(added, Ordering::Relaxed);
            tracing::info!(%addr, "guard: protecting a target's new address");
        }
    }
}

/// A running guard. Dropping it detaches the programs unless their links are pinned.
pub struct Guard {
    pub stats: Arc<GuardStats>,
    pub protected: Arc<Protected>,
    pub attach_cgroup: PathBuf,
    pub proxy_cgroup_id: u64,
    _ebpf: Ebpf,
    _links: Vec<Attached>,
}

/// An attachment held for the guard's lifetime (dropping an owned link detaches it).
#[allow(dead_code)]
enum Attached {
    Owned(FdLink),
    Pinned(PinnedLink),
}

/// The first cgroup2 mount point.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    })
}

/// The cgroup id the kernel reports for tasks in the cgroup at `path` (its inode number).
pub fn cgroup_id(path: &Path) -> Result<u64, GuardError> {
    std::fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|source| GuardError::Cgroup {
            path: path.into(),
            source,
        })
}

/// Effective capabilities missing for the guard, named.
fn missing_capabilities() -> Vec<&'static str> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let eff = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:").map(|v| v.trim().to_string()))
        })
        .and_then(|v| u64::from_str_radix(&v, 16).ok())
        .unwrap_or(0);
    let has = |c: u32| eff & (1u64 << c) != 0;
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF (or CAP_SYS_ADMIN)");
    }
    if !has(CAP_NET_ADMIN) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_NET_ADMIN (or CAP_SYS_ADMIN)");
    }
    // The verifier refuses the programs' pointer arithmetic without it.
    if !has(CAP_PERFMON) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_PERFMON (or CAP_SYS_ADMIN)");
    }
    missing
}

/// Resolved cgroup paths: (attach point, dbproxy's own cgroup).
pub fn cgroup_paths(cfg: &GuardConfig) -> Result<(PathBuf, PathBuf), GuardError> {
    let mount = cgroup2_mount();
    let attach = match cfg.attach_cgroup.as_str() {
        "" => mount.clone().ok_or(GuardError::NoCgroup2)?,
        p => PathBuf::from(p),
    };
    let proxy = match cfg.proxy_cgroup.as_str() {
        "" => mount.ok_or(GuardError::NoCgroup2)?.join("dbproxy"),
        p => PathBuf::from(p),
    };
    Ok((attach, proxy))
}

/// Moves this process (all its threads) into the cgroup at `path`, creating it.
fn enter_cgroup(path: &Path) -> Result<(), GuardError> {
    let err = |source| GuardError::Cgroup {
        path: path.into(),
        source,
    };
    std::fs::create_dir_all(path).map_err(err)?;
    std::fs::write(path.join("cgroup.procs"), std::process::id().to_string()).map_err(err)
}

/// This host's own addresses: the loopback range, the unspecified addresses, and every
/// interface's (as `getifaddrs` lists them at start).
#[derive(Debug, Clone, Default)]
pub struct LocalAddrs {
    interfaces: Vec<IpAddr>,
}

impl LocalAddrs {
    /// The interfaces' addresses now.
    pub fn of_host() -> LocalAddrs {
        let mut interfaces = Vec::new();
        let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
        // SAFETY: getifaddrs fills `list` with a linked list we free below.
        if unsafe { libc::getifaddrs(&mut list) } != 0 {
            tracing::warn!(
                "guard: cannot list this host's addresses: {}",
                std::io::Error::last_os_error()
            );
            return LocalAddrs { interfaces };
        }
        let mut cur = list;
        while !cur.is_null() {
            // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
            let ifa = unsafe { &*cur };
            if !ifa.ifa_addr.is_null() {
                // SAFETY: ifa_addr points to a sockaddr of the family it names.
                let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
                if family == libc::AF_INET {
                    // SAFETY: an AF_INET address is a sockaddr_in.
                    let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                    interfaces.push(IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes()));
                } else if family == libc::AF_INET6 {
                    // SAFETY: an AF_INET6 address is a sockaddr_in6.
                    let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                    interfaces.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                }
            }
            cur = ifa.ifa_next;
        }
        // SAFETY: the list getifaddrs allocated, freed once.
        unsafe { libc::freeifaddrs(list) };
        interfaces.sort();
        interfaces.dedup();
        LocalAddrs { interfaces }
    }

    /// Whether a connect to `ip` reaches this host.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(a) => a.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        ip.is_loopback() || ip.is_unspecified() || self.interfaces.contains(&ip)
    }

    /// The interfaces' addresses as the guard's maps hold them (network order).
    fn keys(&self) -> (HashSet<u32>, HashSet<[u32; 4]>) {
        let mut v4 = HashSet::new();
        let mut v6 = HashSet::new();
        for ip in &self.interfaces {
            match ip {
                IpAddr::V4(a) => {
                    v4.insert(u32::from_ne_bytes(a.octets()));
                }
                IpAddr::V6(a) => {
                    let o = a.octets();
                    let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                    v6.insert([w(0), w(4), w(8), w(12)]);
                }
            }
        }
        (v4, v6)
    }
}

/// The cookie of this process's network namespace (`SO_NETNS_COOKIE`).
fn netns_cookie() -> Result<u64, GuardError> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let s = std::net::UdpSocket::bind("127.0.0.1:0")
        .map_err(|e| GuardError::Load(format!("network namespace cookie: {e}")))?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket, and a u64 buffer of the length given.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(GuardError::Load(format!(
            "network namespace cookie: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(cookie)
}

/// The destinations to protect: every target address, plus any address on `ports`.
fn destinations(targets: &[SocketAddr], ports: &[u16]) -> (HashSet<Dest4>, HashSet<Dest6>) {
    let d4 = |addr: u32, port: u16| Dest4 {
        addr,
        port: port.to_be(),
        pad: 0,
    };
    let d6 = |addr: [u32; 4], port: u16| Dest6 {
        addr,
        port: port.to_be(),
        pad: 0,
    };
    let mut v4 = HashSet::new();
    let mut v6 = HashSet::new();
    for t in targets {
        match t.ip() {
            IpAddr::V4(a) => {
                v4.insert(d4(u32::from_ne_bytes(a.octets()), t.port()));
            }
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(m) => {
                    v4.insert(d4(u32::from_ne_bytes(m.octets()), t.port()));
                }
                None => {
                    let o = a.octets();
                    let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                    v6.insert(d6([w(0), w(4), w(8), w(12)], t.port()));
                }
            },
        }
    }
    for &p in ports {
        v4.insert(d4(0, p));
        v6.insert(d6([0; 4], p));
    }
    (v4, v6)
}

fn map_err(e: impl std::fmt::Display) -> GuardError {
    GuardError::Map(e.to_string())
}

fn hash_map<'a, K: aya::Pod, V: aya::Pod>(
    ebpf: &'a mut Ebpf,
    name: &str,
) -> Result<BpfHashMap<&'a mut MapData, K, V>, GuardError> {
    let m = ebpf
        .map_mut(name)
        .ok_or_else(|| GuardError::Map(format!("map {name} missing from the object")))?;
    BpfHashMap::try_from(m).map_err(map_err)
}

/// Makes a map hold exactly `want` (pinned maps keep what an earlier run put there).
fn sync_map<K: aya::Pod + Eq + std::hash::Hash>(
    map: &mut BpfHashMap<&mut MapData, K, u8>,
    want: &HashSet<K>,
) -> Result<(), GuardError> {
    let stale: Vec<K> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !want.contains(k))
        .collect();
    for k in stale {
        map.remove(&k).map_err(map_err)?;
    }
    for k in want {
        map.insert(*k, PRESENT, 0).map_err(map_err)?;
    }
    Ok(())
}

impl Guard {
    /// Starts the guard for `targets` (the resolved addresses of every target group).
    pub fn start(cfg: &GuardConfig, targets: &[SocketAddr]) -> Result<Guard, GuardError> {
        let missing = missing_capabilities();
        if !missing.is_empty() {
            return Err(GuardError::MissingCapability(missing.join(" and ")));
        }
        if OBJECT.is_empty() {
            return Err(GuardError::NoObject);
        }
        let (attach, proxy) = cgroup_paths(cfg)?;
        enter_cgroup(&proxy)?;
        let own = cgroup_id(&proxy)?;
        let mut allowed: HashSet<u64> = HashSet::from([own]);
        for c in &cfg.allowed_cgroups {
            allowed.insert(cgroup_id(Path::new(c))?);
        }
        let pin = (!cfg.pin_path.is_empty()).then(|| PathBuf::from(&cfg.pin_path));
        let mut loader = EbpfLoader::new();
        let map_pins: Vec<(&str, PathBuf)> = match &pin {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|source| GuardError::Cgroup {
                    path: dir.clone(),
                    source,
                })?;
                MAPS.iter().map(|m| (*m, dir.join(m))).collect()
            }
            None => Vec::new(),
        };
        for (name, path) in &map_pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(OBJECT)
            .map_err(|e| GuardError::Load(e.to_string()))?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::debug!("guard: eBPF log unavailable: {e}");
                None
            }
        };

        let (want4, want6) = destinations(targets, &cfg.protect_ports);
        sync_map(&mut hash_map::<Dest4, u8>(&mut ebpf, "PROTECTED4")?, &want4)?;
        sync_map(&mut hash_map::<Dest6, u8>(&mut ebpf, "PROTECTED6")?, &want6)?;
        // A database on this host answers on every local address: its port is protected
        // on all of them.
        let local = LocalAddrs::of_host();
        let local_ports: HashSet<u16> = targets
            .iter()
            .filter(|t| local.contains(t.ip()))
            .map(|t| t.port().to_be())
            .collect();
        let (local4, local6) = local.keys();
        sync_map(
            &mut hash_map::<u16, u8>(&mut ebpf, "LOCAL_PORTS")?,
            &local_ports,
        )?;
        sync_map(&mut hash_map::<u32, u8>(&mut ebpf, "LOCAL4")?, &local4)?;
        sync_map(&mut hash_map::<[u32; 4], u8>(&mut ebpf, "LOCAL6")?, &local6)?;
        let netns = netns_cookie()?;
        {
            let m = ebpf
                .map_mut("HOST_NETNS")
                .ok_or_else(|| GuardError::Map("map HOST_NETNS missing from the object".into()))?;
            let mut a: aya::maps::Array<&mut MapData, u64> =
                aya::maps::Array::try_from(m).map_err(map_err)?;
            a.set(0, netns, 0).map_err(map_err)?;
        }
        sync_map(&mut hash_map::<u64, u8>(&mut ebpf, "ALLOWED")?, &allowed)?;

        let cgroup = std::fs::File::open(&attach).map_err(|source| GuardError::Cgroup {
            path: attach.clone(),
            source,
        })?;
        let mut links = Vec::new();
        for name in PROGRAMS {
            let link_pin = pin.as_ref().map(|d| d.join(format!("link_{name}")));
            if let Some(p) = &link_pin {
                if let Ok(l) = PinnedLink::from_pin(p) {
                    tracing::info!(program = name, pin = %p.display(), "guard: took over the pinned link");
                    links.push(Attached::Pinned(l));
                    continue;
                }
            }
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or_else(|| GuardError::Load(format!("program {name} missing from the object")))?
                .try_into()
                .map_err(|e| GuardError::Load(format!("{name}: {e}")))?;
            prog.load()
                .map_err(|e| GuardError::Load(format!("{name}: {e}")))?;
            let attach_err = |why: String| GuardError::Attach {
                path: attach.clone(),
                why,
            };
            let id = prog
                .attach(cgroup.as_fd(), CgroupAttachMode::Single)
                .map_err(|e| attach_err(format!("{name}: {e}")))?;
            let link = prog
                .take_link(id)
                .map_err(|e| attach_err(format!("{name}: {e}")))?;
            let fd_link = FdLink::try_from(link).map_err(|e| attach_err(format!("{name}: {e}")))?;
            match link_pin {
                Some(p) => {
                    let pinned = fd_link
                        .pin(&p)
                        .map_err(|e| attach_err(format!("pinning {}: {e}", p.display())))?;
                    links.push(Attached::Pinned(pinned));
                }
                None => links.push(Attached::Owned(fd_link)),
            }
        }

        let stats = Arc::new(GuardStats::default());
        let protected_count = want4.len() + want6.len() + local_ports.len();
        stats
            .protected
            .store(protected_count as u64, Ordering::Relaxed);
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| GuardError::Map(format!("map {name} missing")))
        };
        let protected = Arc::new(Protected {
            v4: Mutex::new(BpfHashMap::try_from(take(&mut ebpf, "PROTECTED4")?).map_err(map_err)?),
            v6: Mutex::new(BpfHashMap::try_from(take(&mut ebpf, "PROTECTED6")?).map_err(map_err)?),
            local_ports: Mutex::new(
                BpfHashMap::try_from(take(&mut ebpf, "LOCAL_PORTS")?).map_err(map_err)?,
            ),
            local,
            stats: stats.clone(),
        });
        let events = ebpf
            .take_map("EVENTS")
            .ok_or_else(|| GuardError::Map("map EVENTS missing".into()))?;
        let ring = RingBuf::try_from(events).map_err(map_err)?;
        let denied =
            PerCpuArray::<MapData, u64>::try_from(take(&mut ebpf, "DENIED")?).map_err(map_err)?;
        let s = stats.clone();
        std::thread::Builder::new()
            .name("dbproxy-guard".into())
            .spawn(move || read_events(ring, &denied, logger, &s))
            .map_err(|e| GuardError::Load(format!("cannot start the event thread: {e}")))?;
        tracing::info!(
            attach = %attach.display(),
            proxy_cgroup = %proxy.display(),
            cgroup_id = own,
            protected = protected_count,
            local_database_ports = local_ports.len(),
            netns_cookie = netns,
            pinned = pin.is_some(),
            "guard: only dbproxy's cgroup may connect to the database"
        );
        Ok(Guard {
            stats,
            protected,
            attach_cgroup: attach,
            proxy_cgroup_id: own,
            _ebpf: ebpf,
            _links: links,
        })
    }
}

/// Logs and counts denial events; drains the eBPF log too.
/// Denials logged per second at most; the rest are counted and summed up in one line.
const DENIAL_LINES_PER_SECOND: u32 = 10;

/// The kernel's count of refused connects (every one, also those whose event was lost
/// when the ring was full).
fn kernel_denials(denied: &PerCpuArray<MapData, u64>) -> u64 {
    denied.get(&0, 0).map_or(0, |v| v.iter().sum())
}

fn read_events(
    mut ring: RingBuf<MapData>,
    denied: &PerCpuArray<MapData, u64>,
    mut logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    stats: &GuardStats,
) {
    // A pinned counter keeps earlier runs' refusals: this run counts from here.
    let baseline = kernel_denials(denied);
    let mut second = std::time::Instant::now();
    let (mut logged, mut unlogged) = (0u32, 0u64);
    loop {
        let mut fds = vec![libc::pollfd {
            fd: ring.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        if let Some(l) = &logger {
            fds.push(libc::pollfd {
                fd: l.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // SAFETY: fds is a valid array of pollfd for the call's duration.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
        while let Some(item) = ring.next() {
            if item.len() < std::mem::size_of::<DenyEvent>() {
                continue;
            }
            // SAFETY: the program writes whole DenyEvent records; read unaligned.
            let e: DenyEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            let comm_len = e.comm.iter().position(|&b| b == 0).unwrap_or(e.comm.len());
            let comm = String::from_utf8_lossy(&e.comm[..comm_len]);
            let dest = match e.family {
                4 => SocketAddr::new(
                    IpAddr::from([e.addr[0], e.addr[1], e.addr[2], e.addr[3]]),
                    u16::from_be(e.port),
                ),
                _ => SocketAddr::new(IpAddr::from(e.addr), u16::from_be(e.port)),
            };
            if second.elapsed() >= std::time::Duration::from_secs(1) {
                second = std::time::Instant::now();
                logged = 0;
            }
            if logged < DENIAL_LINES_PER_SECOND {
                logged += 1;
                tracing::warn!(pid = e.pid, comm = %comm, cgroup_id = e.cgroup_id, destination = %dest, "guard: refused a connect() to the database");
            } else {
                unlogged += 1;
            }
            stats.recent.push(Denial {
                at: crate::stats::unix_now(),
                pid: e.pid,
                comm: comm.to_string(),
                destination: dest.to_string(),
            });
        }
        if unlogged > 0 && second.elapsed() >= std::time::Duration::from_secs(1) {
            tracing::warn!(
                unlogged,
                "guard: more connects to the database refused than logged (at most {DENIAL_LINES_PER_SECOND} lines a second; the counter has them all)"
            );
            unlogged = 0;
        }
        let all = kernel_denials(denied).saturating_sub(baseline);
        stats.denials.fetch_max(all, Ordering::Relaxed);
        if let Some(l) = logger.as_mut() {
            l.flush();
        }
    }
}

/// What `dbproxy guard status` prints.
pub fn status(cfg: &GuardConfig) -> Result<String, GuardError> {
    let (attach, proxy) = cgroup_paths(cfg)?;
    let mut out = format!(
        "attach cgroup: {}\nproxy cgroup:  {}\n",
        attach.display(),
        proxy.display()
    );
    if cfg.pin_path.is_empty() {
        out.push_str("pin_path is empty: the guard is attached only while dbproxy runs (metrics: dbproxy_guard_*)\n");
        return Ok(out);
    }
    let dir = PathBuf::from(&cfg.pin_path);
    for name in PROGRAMS {
        let p = dir.join(format!("link_{name}"));
        let state = if PinnedLink::from_pin(&p).is_ok() {
            "attached (pinned)"
        } else {
            "not attached"
        };
        out.push_str(&format!("{name}: {state}\n"));
    }
    if let Ok(data) = MapData::from_pin(dir.join("PROTECTED4")) {
        if let Ok(m) = BpfHashMap::<_, Dest4, u8>::try_from(Map::HashMap(data)) {
            for k in m.keys().filter_map(Result::ok) {
                let ip = std::net::Ipv4Addr::from(k.addr.to_ne_bytes());
                out.push_str(&format!("protected: {ip}:{}\n", u16::from_be(k.port)));
            }
        }
    }
    if let Ok(data) = MapData::from_pin(dir.join("PROTECTED6")) {
        if let Ok(m) = BpfHashMap::<_, Dest6, u8>::try_from(Map::HashMap(data)) {
            for k in m.keys().filter_map(Result::ok) {
                let mut b = [0u8; 16];
                for (i, w) in k.addr.iter().enumerate() {
                    b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
                }
                out.push_str(&format!(
                    "protected: [{}]:{}\n",
                    std::net::Ipv6Addr::from(b),
                    u16::from_be(k.port)
                ));
            }
        }
    }
    if let Ok(data) = MapData::from_pin(dir.join("ALLOWED")) {
        if let Ok(m) = BpfHashMap::<_, u64, u8>::try_from(Map::HashMap(data)) {
            for k in m.keys().filter_map(Result::ok) {
                out.push_str(&format!("allowed cgroup id: {k}\n"));
            }
        }
    }
    if let Ok(data) = MapData::from_pin(dir.join("DENIED")) {
        if let Ok(m) = PerCpuArray::<_, u64>::try_from(Map::PerCpuArray(data)) {
            if let Ok(v) = m.get(&0, 0) {
                out.push_str(&format!("refused connects: {}\n", v.iter().sum::<u64>()));
            }
        }
    }
    Ok(out)
}

/// `dbproxy guard detach`: removes the pinned links (detaching the programs) and maps.
pub fn detach(cfg: &GuardConfig) -> Result<String, GuardError> {
    if cfg.pin_path.is_empty() {
        return Ok(
            "pin_path is empty: nothing is pinned; the guard detaches when dbproxy exits\n".into(),
        );
    }
    let dir = PathBuf::from(&cfg.pin_path);
    let mut out = String::new();
    let names = PROGRAMS
        .iter()
        .map(|n| format!("link_{n}"))
        .chain(MAPS.iter().map(|m| m.to_string()));
    for name in names {
        let p = dir.join(&name);
        match std::fs::remove_file(&p) {
            Ok(()) => out.push_str(&format!("removed {}\n", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(GuardError::Cgroup { path: p, source }),
        }
    }
    if out.is_empty() {
        out.push_str("nothing pinned\n");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_cover_targets_mapped_addresses_and_ports() {
        let t: Vec<SocketAddr> = vec![
            "127.0.0.1:3306".parse().unwrap(),
            "[::1]:3307".parse().unwrap(),
            "[::ffff:10.0.0.1]:3308".parse().unwrap(),
        ];
        let (v4, v6) = destinations(&t, &[4000]);
        let d4 = |o: [u8; 4], p: u16| Dest4 {
            addr: u32::from_ne_bytes(o),
            port: p.to_be(),
            pad: 0,
        };
        assert!(v4.contains(&d4([127, 0, 0, 1], 3306)));
        assert!(v4.contains(&d4([10, 0, 0, 1], 3308)), "mapped goes to v4");
        assert!(v4.contains(&d4([0, 0, 0, 0], 4000)));
        let one = u32::from_ne_bytes([0, 0, 0, 1]);
        assert!(v6.contains(&Dest6 {
            addr: [0, 0, 0, one],
            port: 3307u16.to_be(),
            pad: 0
        }));
        assert!(v6.contains(&Dest6 {
            addr: [0; 4],
            port: 4000u16.to_be(),
            pad: 0
        }));
        assert_eq!((v4.len(), v6.len()), (3, 2));
    }

    #[test]
    fn local_addresses_are_the_loopback_range_the_unspecified_and_the_interfaces() {
        let local = LocalAddrs {
            interfaces: vec!["10.1.2.3".parse().unwrap(), "fd00::5".parse().unwrap()],
        };
        for ip in [
            "127.0.0.1",
            "127.0.0.2",
            "127.255.0.9",
            "0.0.0.0",
            "::1",
            "::",
            "::ffff:127.0.0.2",
            "10.1.2.3",
            "::ffff:10.1.2.3",
            "fd00::5",
        ] {
            assert!(local.contains(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["10.1.2.4", "128.0.0.1", "fd00::6", "::2"] {
            assert!(!local.contains(ip.parse().unwrap()), "{ip}");
        }
        let (v4, v6) = local.keys();
        assert!(v4.contains(&u32::from_ne_bytes([10, 1, 2, 3])));
        assert_eq!((v4.len(), v6.len()), (1, 1));
        // This host has at least its loopback interface, and a namespace cookie.
        assert!(LocalAddrs::of_host().contains("127.0.0.1".parse().unwrap()));
        assert!(netns_cookie().unwrap() > 0);
    }
}
