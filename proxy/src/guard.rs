//! The kernel guard: dbproxy's eBPF connect4/connect6 programs, attached to a cgroup, make
//! the kernel refuse connect() to the database from any process outside dbproxy's cgroup;
//! a cgroup LSM program does the same for the database's Unix socket.
//!
//! At start dbproxy moves itself into its own cgroup, loads the programs (embedded at build
//! time), fills the maps with every target of every target group and the allowed cgroups,
//! attaches at the configured cgroup and reads denial events. With `pin_path`, links and
//! maps are pinned in bpffs: the guard outlives dbproxy, and a restarted dbproxy takes the
//! pinned links over without a moment in which the database is open, or replaces them
//! (new link first, then the old one goes) when they run another program or sit at
//! another cgroup than the config says.

mod btf;
mod link;
mod sys;
mod unix_hook;

use crate::config::GuardConfig;
use crate::target::BackendAddr;
use aya::maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray, RingBuf};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, LsmCgroup};
use aya::{include_bytes_aligned, Ebpf, EbpfLoader};
use parking_lot::Mutex;
use proxy_common::{
    DenyEvent, Dest4, Dest6, UnixLayout, UnixPath, FAMILY_UNIX, PRESENT, UNIX_PATH_MAX,
};
use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
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

const MAPS: [&str; 11] = [
    "PROTECTED4",
    "PROTECTED6",
    "LOCAL_PORTS",
    "LOCAL4",
    "LOCAL6",
    "HOST_NETNS",
    "ALLOWED",
    "EVENTS",
    "DENIED",
    "PROTECTED_UNIX",
    "UNIX_LAYOUT",
];
const PROGRAMS: [&str; 2] = ["connect4", "connect6"];
/// The Unix-socket program and the LSM hook it attaches to.
const UNIX_PROGRAM: &str = "unix_connect";
const UNIX_HOOK: &str = "unix_stream_connect";
/// The cgroup connect_unix program, for kernels that refuse the LSM one.
const UNIX_CONNECT_PROGRAM: &str = "connect_unix";

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
    /// Whether the database's Unix socket is guarded, and if not, why.
    pub unix_sockets: Mutex<String>,
    /// The last refused connect() calls.
    pub recent: crate::stats::Recent<Denial>,
}

impl Default for GuardStats {
    fn default() -> Self {
        GuardStats {
            denials: AtomicU64::new(0),
            protected: AtomicU64::new(0),
            unix_sockets: Mutex::new(String::new()),
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
    unix: Mutex<BpfHashMap<MapData, UnixPath, u8>>,
    local: LocalAddrs,
    stats: Arc<GuardStats>,
}

/// `path` as the Unix-socket map's key; `None` when it does not fit `sun_path` (or is
/// empty, or abstract).
pub fn unix_key(path: &str) -> Option<UnixPath> {
    let b = path.as_bytes();
    if b.is_empty() || b.len() >= UNIX_PATH_MAX || b.contains(&0) {
        return None;
    }
    let mut key = UnixPath {
        path: [0; UNIX_PATH_MAX],
    };
    key.path[..b.len()].copy_from_slice(b);
    Some(key)
}

/// The path in a Unix-socket map key or event.
fn unix_path_of(raw: &[u8; UNIX_PATH_MAX]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

/// The Unix socket paths to protect from the start: each `unix:` target's path as
/// configured and as it resolves (symlinks followed). The server may have bound another
/// name for the same file: the health check learns that one (`@@socket`).
fn unix_target_paths(targets: &[BackendAddr]) -> HashSet<UnixPath> {
    let mut keys = HashSet::new();
    for t in targets {
        if let BackendAddr::Unix(p) = t {
            let mut names = vec![p.to_string_lossy().into_owned()];
            if let Ok(c) = std::fs::canonicalize(p) {
                names.push(c.to_string_lossy().into_owned());
            }
            keys.extend(names.iter().filter_map(|n| unix_key(n)));
        }
    }
    keys
}

impl crate::topology::monitor::Protect for Protected {
    fn address(&self, addr: SocketAddr) {
        self.protect(addr);
    }

    /// The socket a target's server reports (`@@socket`): protected when the target is on
    /// this host (a `unix:` target, or a local address).
    fn socket(&self, target: &BackendAddr, path: &str) {
        let local = match target {
            BackendAddr::Unix(_) => true,
            BackendAddr::Tcp(a) => self.local.contains(a.ip()),
        };
        if !local {
            return;
        }
        let Some(key) = unix_key(path) else {
            return;
        };
        let mut m = self.unix.lock();
        if m.get(&key, 0).is_err() && m.insert(key, PRESENT, 0).is_ok() {
            self.stats.protected.fetch_add(1, Ordering::Relaxed);
            tracing::info!(socket = %path, target = %target, "guard: protecting the database's Unix socket");
        }
    }
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
    Raw(OwnedFd),
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
    /// Starts the guard for `all_targets` (the resolved addresses of every target group).
    pub fn start(cfg: &GuardConfig, all_targets: &[BackendAddr]) -> Result<Guard, GuardError> {
        let targets: Vec<SocketAddr> = all_targets
            .iter()
            .filter_map(|t| match t {
                BackendAddr::Tcp(a) => Some(*a),
                BackendAddr::Unix(_) => None,
            })
            .collect();
        let targets = targets.as_slice();
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
        // The Unix-socket hook: the kernel's structure layout, and the sockets known now
        // (each target's server reports its own at its first health check). A pinned map
        // keeps the sockets an earlier run learnt: none is open while this one learns.
        let layout = unix_layout();
        {
            let m = ebpf
                .map_mut("UNIX_LAYOUT")
                .ok_or_else(|| GuardError::Map("map UNIX_LAYOUT missing from the object".into()))?;
            let mut a: aya::maps::Array<&mut MapData, UnixLayout> =
                aya::maps::Array::try_from(m).map_err(map_err)?;
            a.set(0, layout.clone().unwrap_or_default(), 0)
                .map_err(map_err)?;
        }
        let mut want_unix = unix_target_paths(all_targets);
        {
            let mut m = hash_map::<UnixPath, u8>(&mut ebpf, "PROTECTED_UNIX")?;
            if pin.is_some() {
                want_unix.extend(m.keys().filter_map(Result::ok));
            }
            sync_map(&mut m, &want_unix)?;
        }

        let cgroup = std::fs::File::open(&attach).map_err(|source| GuardError::Cgroup {
            path: attach.clone(),
            source,
        })?;
        let attach_id = cgroup_id(&attach)?;
        let mut links = Vec::new();
        for name in PROGRAMS {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name).map_err(GuardError::Load)?;
            prog.load()
                .map_err(|e| GuardError::Load(format!("{name}: {e}")))?;
            let tag = loaded_tag(&ebpf, name);
            let attach_new = || -> Result<NewLink, String> {
                let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
                let id = prog
                    .attach(cgroup.as_fd(), CgroupAttachMode::Single)
                    .map_err(|e| e.to_string())?;
                let link = prog.take_link(id).map_err(|e| e.to_string())?;
                FdLink::try_from(link)
                    .map(NewLink::Aya)
                    .map_err(|e| e.to_string())
            };
            links.push(attach_program(
                name, tag, attach_new, &pin, &attach, attach_id,
            )?);
        }
        // The database's Unix socket: the cgroup LSM program where the kernel takes it
        // (it judges the listening socket), else the cgroup connect_unix program (the path
        // the client gives).
        let lsm = bpf_lsm_active()
            .and_then(|()| layout.as_ref().map(|_| ()).map_err(Clone::clone))
            .and_then(|()| {
                let kernel_btf =
                    aya::Btf::from_sys_fs().map_err(|e| format!("the kernel's BTF: {e}"))?;
                let prog: &mut LsmCgroup = program(&mut ebpf, UNIX_PROGRAM)?;
                prog.load(UNIX_HOOK, &kernel_btf)
                    .map_err(|e| format!("loading {UNIX_PROGRAM}: {e}"))?;
                let tag = loaded_tag(&ebpf, UNIX_PROGRAM);
                let attach_new = || -> Result<NewLink, String> {
                    let prog: &mut LsmCgroup = program(&mut ebpf, UNIX_PROGRAM)?;
                    let id = prog.attach(cgroup.as_fd()).map_err(|e| e.to_string())?;
                    Ok(NewLink::Aya(
                        prog.take_link(id).map_err(|e| e.to_string())?.into(),
                    ))
                };
                attach_program(UNIX_PROGRAM, tag, attach_new, &pin, &attach, attach_id)
                    .map_err(|e| e.to_string())
            });
        let unix_state = match lsm {
            Ok(l) => Ok((
                l,
                "guarded (cgroup LSM on unix_stream_connect: every name for the socket)",
            )),
            Err(lsm_why) => {
                tracing::info!("guard: the Unix-socket LSM program is not available ({lsm_why}); using the cgroup connect_unix hook");
                attach_connect_unix(&ebpf, &layout, &cgroup, &pin, &attach, attach_id)
                    .map(|l| (l, "guarded (cgroup connect_unix: the path a client gives)"))
                    .map_err(|why| format!("LSM: {lsm_why}; connect_unix: {why}"))
            }
        };
        let unix_sockets = match unix_state {
            Ok((l, how)) => {
                links.push(l);
                how.to_string()
            }
            Err(why) => {
                tracing::warn!("guard: the database's Unix socket is NOT guarded ({why}): close it off with file permissions");
                format!("not guarded: {why}")
            }
        };

        let stats = Arc::new(GuardStats::default());
        *stats.unix_sockets.lock() = unix_sockets;
        let protected_count = want4.len() + want6.len() + local_ports.len() + want_unix.len();
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
            unix: Mutex::new(
                BpfHashMap::try_from(take(&mut ebpf, "PROTECTED_UNIX")?).map_err(map_err)?,
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

/// A program of the object, as its type.
fn program<'a, P>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut P, String>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| format!("program {name} missing from the object"))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())
}

/// The loaded program's tag.
fn loaded_tag(ebpf: &Ebpf, name: &str) -> Option<u64> {
    ebpf.program(name)?.info().ok().map(|i| i.tag())
}

/// A link this dbproxy made: through aya, or with the bpf() syscall.
enum NewLink {
    Aya(FdLink),
    Raw(OwnedFd),
}

impl NewLink {
    fn pin(self, p: &Path) -> Result<Attached, String> {
        match self {
            NewLink::Aya(l) => l.pin(p).map(Attached::Pinned).map_err(|e| e.to_string()),
            NewLink::Raw(fd) => {
                unix_hook::pin(&fd, p).map_err(|e| e.to_string())?;
                PinnedLink::from_pin(p)
                    .map(Attached::Pinned)
                    .map_err(|e| e.to_string())
            }
        }
    }

    fn owned(self) -> Attached {
        match self {
            NewLink::Aya(l) => Attached::Owned(l),
            NewLink::Raw(fd) => Attached::Raw(fd),
        }
    }
}

/// Attaches the loaded program `name` (whose tag is `tag`) at the configured cgroup, or
/// takes over the link pinned for it when that runs the same program at the same cgroup.
/// A pinned link that does not is replaced: the new link is attached (both run for a
/// moment), then the old one is unpinned and dropped, so the database is never open.
fn attach_program(
    name: &str,
    tag: Option<u64>,
    attach_new: impl FnOnce() -> Result<NewLink, String>,
    pin: &Option<PathBuf>,
    attach: &Path,
    attach_id: u64,
) -> Result<Attached, GuardError> {
    let attach_err = |why: String| GuardError::Attach {
        path: attach.into(),
        why: format!("{name}: {why}"),
    };
    let Some(p) = pin.as_ref().map(|d| d.join(format!("link_{name}"))) else {
        return attach_new().map(NewLink::owned).map_err(attach_err);
    };
    let replace = match link::pinned(&p) {
        Ok(facts) => match link::judge(
            facts,
            link::program_tag(facts.program_id),
            attach_id,
            tag.unwrap_or(0),
        ) {
            link::Verdict::TakeOver => {
                if let Ok(l) = PinnedLink::from_pin(&p) {
                    tracing::info!(program = name, pin = %p.display(), "guard: took over the pinned link");
                    return Ok(Attached::Pinned(l));
                }
                None
            }
            link::Verdict::Replace(why) => Some(why),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => Some(format!("it cannot be read: {e}")),
    };
    let new = attach_new().map_err(attach_err)?;
    if let Some(why) = replace {
        let old = PinnedLink::from_pin(&p)
            .map_err(|e| attach_err(format!("{}: {e}", p.display())))?
            .unpin()
            .map_err(|e| attach_err(format!("unpinning {}: {e}", p.display())))?;
        let pinned = new
            .pin(&p)
            .map_err(|e| attach_err(format!("pinning {}: {e}", p.display())))?;
        drop(old);
        tracing::warn!(program = name, pin = %p.display(), "guard: replaced the pinned link: {why}");
        return Ok(pinned);
    }
    new.pin(&p)
        .map_err(|e| attach_err(format!("pinning {}: {e}", p.display())))
}

/// The connect_unix program, loaded with the bpf() syscall (see [`unix_hook`]) and
/// attached (or a pinned one taken over).
fn attach_connect_unix(
    ebpf: &Ebpf,
    layout: &Result<UnixLayout, String>,
    cgroup: &std::fs::File,
    pin: &Option<PathBuf>,
    attach: &Path,
    attach_id: u64,
) -> Result<Attached, String> {
    layout.as_ref().map_err(Clone::clone)?;
    let maps: std::collections::HashMap<String, std::os::fd::RawFd> = ebpf
        .maps()
        .filter_map(|(name, m)| {
            let data = match m {
                Map::HashMap(d) | Map::Array(d) | Map::PerCpuArray(d) | Map::RingBuf(d) => d,
                _ => return None,
            };
            Some((name.to_string(), data.fd().as_fd().as_raw_fd()))
        })
        .collect();
    let insns = unix_hook::instructions(OBJECT, UNIX_CONNECT_PROGRAM, &maps)?;
    let prog = unix_hook::load(&insns, UNIX_CONNECT_PROGRAM, unix_hook::ATTACH_UNIX_CONNECT)?;
    let tag = unix_hook::tag(&prog).ok();
    let attach_new = || -> Result<NewLink, String> {
        unix_hook::link(&prog, cgroup.as_raw_fd(), unix_hook::ATTACH_UNIX_CONNECT)
            .map(NewLink::Raw)
            .map_err(|e| format!("attaching: {e}"))
    };
    attach_program(
        UNIX_CONNECT_PROGRAM,
        tag,
        attach_new,
        pin,
        attach,
        attach_id,
    )
    .map_err(|e| e.to_string())
}

/// Where the Unix-socket hook's fields lie in the running kernel's structures.
fn unix_layout() -> Result<UnixLayout, String> {
    let kernel = btf::Btf::of_kernel()
        .map_err(|e| format!("/sys/kernel/btf/vmlinux: {e}"))?
        .map_err(|e| format!("/sys/kernel/btf/vmlinux: {e}"))?;
    let off = |s: &str, f: &[&str]| kernel.offset_of(s, f).map_err(|e| e.to_string());
    Ok(UnixLayout {
        sock_net: off("sock", &["__sk_common", "skc_net", "net"])?,
        net_cookie: off("net", &["net_cookie"])?,
        unix_addr: off("unix_sock", &["addr"])?,
        addr_name: off("unix_address", &["name"])?,
        kern_uaddr: off("bpf_sock_addr_kern", &["uaddr"])?,
        kern_uaddrlen: off("bpf_sock_addr_kern", &["uaddrlen"])?,
        ready: 1,
        pad: 0,
    })
}

/// Whether the BPF LSM is among the kernel's active LSMs (the cgroup LSM hook runs only
/// then). securityfs is mounted at its usual place when it is not yet, as systemd does.
fn bpf_lsm_active() -> Result<(), String> {
    const LSM: &str = "/sys/kernel/security/lsm";
    if std::fs::metadata(LSM).is_err() {
        let (src, dir) = (c"securityfs", c"/sys/kernel/security");
        // SAFETY: NUL-terminated strings; no data argument.
        let r = unsafe {
            libc::mount(
                src.as_ptr(),
                dir.as_ptr(),
                src.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if r == 0 {
            tracing::info!("guard: mounted securityfs at /sys/kernel/security");
        }
    }
    let active = std::fs::read_to_string(LSM)
        .map_err(|e| format!("cannot read {LSM} ({e}), so the BPF LSM's state is unknown"))?;
    if active.trim().split(',').any(|l| l == "bpf") {
        Ok(())
    } else {
        Err(format!(
            "the BPF LSM is not active (active: {}); add bpf to the kernel's lsm= boot parameter",
            active.trim()
        ))
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
                FAMILY_UNIX => format!("unix:{}", unix_path_of(&e.path)),
                4 => SocketAddr::new(
                    IpAddr::from([e.addr[0], e.addr[1], e.addr[2], e.addr[3]]),
                    u16::from_be(e.port),
                )
                .to_string(),
                _ => SocketAddr::new(IpAddr::from(e.addr), u16::from_be(e.port)).to_string(),
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
                destination: dest,
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
    for name in PROGRAMS
        .iter()
        .chain([&UNIX_PROGRAM, &UNIX_CONNECT_PROGRAM])
    {
        let p = dir.join(format!("link_{name}"));
        let state = match link::pinned(&p) {
            Ok(f) => format!("attached (pinned) to cgroup id {}", f.cgroup_id),
            Err(_) => "not attached".to_string(),
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
    if let Ok(data) = MapData::from_pin(dir.join("PROTECTED_UNIX")) {
        if let Ok(m) = BpfHashMap::<_, UnixPath, u8>::try_from(Map::HashMap(data)) {
            for k in m.keys().filter_map(Result::ok) {
                out.push_str(&format!("protected: unix:{}\n", unix_path_of(&k.path)));
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
        .chain([&UNIX_PROGRAM, &UNIX_CONNECT_PROGRAM])
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
