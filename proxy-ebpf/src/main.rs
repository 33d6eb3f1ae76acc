//! dbproxy's kernel guard: connect4/connect6 programs for a cgroup that refuse connect() to
//! the protected database addresses unless the caller's cgroup is allowed. A database on
//! this host is protected on every address that reaches it (the loopback range, the
//! unspecified address, the host's own addresses); only connects made in the host's
//! network namespace are judged (a container's own database is its own business).
//!
//! A cgroup LSM program on `unix_stream_connect` does the same for the database's Unix
//! socket: it judges the listening socket the kernel found (the path its server bound, in
//! the host's network namespace), so no other name for the file (a relative path, a
//! symlink, a hard link, /proc/PID/root/...) gets around it. Where the kernel refuses LSM
//! programs, a cgroup `connect_unix` program (Linux 6.7+) judges the path the client
//! gives instead.
#![no_std]
#![no_main]

use aya_ebpf::bindings::bpf_sock_addr;
use aya_ebpf::helpers::{
    bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
    bpf_get_netns_cookie, bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes,
};
use aya_ebpf::macros::{cgroup_sock_addr, lsm_cgroup, map};
use aya_ebpf::maps::{Array, HashMap, PerCpuArray, RingBuf};
use aya_ebpf::programs::{LsmContext, SockAddrContext};
use proxy_common::{DenyEvent, Dest4, Dest6, UnixLayout, UnixPath, FAMILY_UNIX, UNIX_PATH_MAX};

const ALLOW: i32 = 1;
const DENY: i32 = 0;

/// Protected IPv4 destinations (ip + port, or 0 + port).
#[map]
static PROTECTED4: HashMap<Dest4, u8> = HashMap::with_max_entries(1024, 0);

/// Protected IPv6 destinations.
#[map]
static PROTECTED6: HashMap<Dest6, u8> = HashMap::with_max_entries(1024, 0);

/// Ports (network order) of databases on this host: protected on every local address.
#[map]
static LOCAL_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(256, 0);

/// The host's own IPv4 addresses (network order), besides 127.0.0.0/8 and 0.0.0.0.
#[map]
static LOCAL4: HashMap<u32, u8> = HashMap::with_max_entries(1024, 0);

/// The host's own IPv6 addresses, besides ::1 and ::.
#[map]
static LOCAL6: HashMap<[u32; 4], u8> = HashMap::with_max_entries(1024, 0);

/// The cookie of the network namespace whose connects are judged (dbproxy's, the host's);
/// 0: every namespace.
#[map]
static HOST_NETNS: Array<u64> = Array::with_max_entries(1, 0);

/// Protected Unix sockets, by the path their server bound.
#[map]
static PROTECTED_UNIX: HashMap<UnixPath, u8> = HashMap::with_max_entries(256, 0);

/// Where the Unix-socket hook finds what it reads in this kernel's structures.
#[map]
static UNIX_LAYOUT: Array<UnixLayout> = Array::with_max_entries(1, 0);

/// Cgroup ids whose processes may connect (dbproxy's own, and break-glass ones).
#[map]
static ALLOWED: HashMap<u64, u8> = HashMap::with_max_entries(256, 0);

/// One event per refused connect().
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Refused connects, per CPU (index 0).
#[map]
static DENIED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands a valid bpf_sock_addr to a cgroup_sock_addr program.
    let sa: &bpf_sock_addr = unsafe { &*ctx.sock_addr };
    let (addr, port) = (sa.user_ip4, sa.user_port as u16);
    if !(protected4(addr, port) || local4(addr, port)) || !judged(&ctx) || allowed() {
        return ALLOW;
    }
    deny(4, &addr.to_ne_bytes(), port)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as in connect4.
    let sa: &bpf_sock_addr = unsafe { &*ctx.sock_addr };
    let ip = [
        sa.user_ip6[0],
        sa.user_ip6[1],
        sa.user_ip6[2],
        sa.user_ip6[3],
    ];
    let port = sa.user_port as u16;
    // ::ffff:a.b.c.d reaches the IPv4 address a.b.c.d.
    let mapped = ip[0] == 0 && ip[1] == 0 && u32::from_be(ip[2]) == 0xffff;
    let hit = if mapped {
        protected4(ip[3], port) || local4(ip[3], port)
    } else {
        protected6(ip, port) || local6(ip, port)
    };
    if !hit || !judged(&ctx) || allowed() {
        return ALLOW;
    }
    let mut bytes = [0u8; 16];
    for (i, w) in ip.iter().enumerate() {
        let b = w.to_ne_bytes();
        bytes[i * 4] = b[0];
        bytes[i * 4 + 1] = b[1];
        bytes[i * 4 + 2] = b[2];
        bytes[i * 4 + 3] = b[3];
    }
    deny(6, &bytes, port)
}

/// `offsetof(struct sockaddr_un, sun_path)`: fixed by the ABI.
const SUN_PATH: u64 = 2;

/// A connect() to a listening Unix stream socket, found: refused when that socket is a
/// protected database's (by the path its server bound) in the judged namespace.
#[lsm_cgroup(hook = "unix_stream_connect")]
pub fn unix_connect(ctx: LsmContext) -> i32 {
    // unix_stream_connect(struct sock *sock, struct sock *other, struct sock *newsk):
    // `other` is the listening socket, a `struct unix_sock`.
    let other: u64 = ctx.arg(1);
    match protected_unix(other) {
        Some(path) if !allowed() => deny_unix(&path),
        _ => ALLOW,
    }
}

/// The cgroup `connect_unix` hook: the path the client gives, when it is a protected
/// database socket's. Built into a connect4 section (aya 0.14 knows no connect_unix);
/// dbproxy loads it itself with the Unix attach type. Every network namespace is judged:
/// a path reaches the same file from any of them (`unshare -rn` must not be a way round).
#[cgroup_sock_addr(connect4)]
pub fn connect_unix(ctx: SockAddrContext) -> i32 {
    match unix_path_given(&ctx) {
        Some(path) if !allowed() => deny_unix(&path),
        _ => ALLOW,
    }
}

/// The path in the address the client passed to connect(), when protected.
#[inline(always)]
fn unix_path_given(ctx: &SockAddrContext) -> Option<UnixPath> {
    let layout = UNIX_LAYOUT.get(0)?;
    if layout.ready == 0 {
        return None;
    }
    // The context is a `struct bpf_sock_addr_kern`: read its fields as kernel memory.
    let base = ctx.sock_addr as u64;
    // SAFETY: bpf_probe_read_kernel checks the address; a bad one is an error.
    let uaddr =
        unsafe { bpf_probe_read_kernel((base + layout.kern_uaddr as u64) as *const u64) }.ok()?;
    // SAFETY: as above.
    let len = unsafe { bpf_probe_read_kernel((base + layout.kern_uaddrlen as u64) as *const u32) }
        .ok()?;
    if len <= SUN_PATH as u32 {
        return None;
    }
    // The path may fill `len` without a NUL: read at most that much (the kernel's copy of
    // the address has other bytes behind it).
    let mut n = (len - SUN_PATH as u32) as usize;
    if n > UNIX_PATH_MAX - 1 {
        n = UNIX_PATH_MAX - 1;
    }
    let mut key = UnixPath {
        path: [0; UNIX_PATH_MAX],
    };
    // SAFETY: reads at most n + 1 <= UNIX_PATH_MAX bytes into the key, NUL-terminated.
    let r = unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_kernel_str(
            key.path.as_mut_ptr() as *mut core::ffi::c_void,
            (n + 1) as u32,
            (uaddr + SUN_PATH) as *const core::ffi::c_void,
        )
    };
    if r < 0 {
        return None;
    }
    // SAFETY: map lookups return pointers valid for this program run.
    unsafe { PROTECTED_UNIX.get(key) }?;
    Some(key)
}

/// The path `other` was bound to, when it is a protected database's socket.
#[inline(always)]
fn protected_unix(other: u64) -> Option<UnixPath> {
    let layout = UNIX_LAYOUT.get(0)?;
    if layout.ready == 0 {
        return None;
    }
    let host = HOST_NETNS.get(0).copied().unwrap_or(0);
    if host != 0 {
        // SAFETY: bpf_probe_read_kernel checks the address; a bad one is an error.
        let net = unsafe { bpf_probe_read_kernel((other + layout.sock_net as u64) as *const u64) }
            .ok()?;
        // SAFETY: as above.
        let cookie =
            unsafe { bpf_probe_read_kernel((net + layout.net_cookie as u64) as *const u64) }
                .ok()?;
        if cookie != host {
            return None;
        }
    }
    // SAFETY: as above.
    let addr =
        unsafe { bpf_probe_read_kernel((other + layout.unix_addr as u64) as *const u64) }.ok()?;
    if addr == 0 {
        return None;
    }
    let mut key = UnixPath {
        path: [0; UNIX_PATH_MAX],
    };
    let name = addr + layout.addr_name as u64 + SUN_PATH;
    // SAFETY: as above; the bound path is NUL-terminated, at most UNIX_PATH_MAX bytes.
    unsafe { bpf_probe_read_kernel_str_bytes(name as *const u8, &mut key.path) }.ok()?;
    // SAFETY: map lookups return pointers valid for this program run.
    unsafe { PROTECTED_UNIX.get(key) }?;
    Some(key)
}

#[inline(always)]
fn protected4(addr: u32, port: u16) -> bool {
    // SAFETY: map lookups return pointers valid for this program run.
    unsafe {
        PROTECTED4.get(Dest4 { addr, port, pad: 0 }).is_some()
            || PROTECTED4
                .get(Dest4 {
                    addr: 0,
                    port,
                    pad: 0,
                })
                .is_some()
    }
}

#[inline(always)]
fn protected6(addr: [u32; 4], port: u16) -> bool {
    // SAFETY: as in protected4.
    unsafe {
        PROTECTED6.get(Dest6 { addr, port, pad: 0 }).is_some()
            || PROTECTED6
                .get(Dest6 {
                    addr: [0; 4],
                    port,
                    pad: 0,
                })
                .is_some()
    }
}

/// `addr:port` reaches a database on this host: its port is a local database's, and the
/// address is this host's (127.0.0.0/8, 0.0.0.0, or an interface's).
#[inline(always)]
fn local4(addr: u32, port: u16) -> bool {
    // SAFETY: map lookups return pointers valid for this program run.
    unsafe {
        LOCAL_PORTS.get(port).is_some()
            && (u32::from_be(addr) >> 24 == 127 || addr == 0 || LOCAL4.get(addr).is_some())
    }
}

/// As [`local4`] for IPv6: ::1, ::, or an interface's address.
#[inline(always)]
fn local6(addr: [u32; 4], port: u16) -> bool {
    let unspecified = addr[0] == 0 && addr[1] == 0 && addr[2] == 0;
    let loopback = unspecified && u32::from_be(addr[3]) == 1;
    let any = unspecified && addr[3] == 0;
    // SAFETY: as in local4.
    unsafe { LOCAL_PORTS.get(port).is_some() && (loopback || any || LOCAL6.get(addr).is_some()) }
}

/// Whether this connect is made in the namespace the guard judges.
#[inline(always)]
fn judged(ctx: &SockAddrContext) -> bool {
    let host = HOST_NETNS.get(0).copied().unwrap_or(0);
    // SAFETY: the context pointer is the program's own argument.
    host == 0 || unsafe { bpf_get_netns_cookie(ctx.sock_addr as *mut _) } == host
}

#[inline(always)]
fn allowed() -> bool {
    // SAFETY: helper without arguments; the lookup pointer is only tested.
    unsafe { ALLOWED.get(bpf_get_current_cgroup_id()).is_some() }
}

#[inline(always)]
fn deny(family: u16, addr: &[u8], port: u16) -> i32 {
    let mut a = [0u8; 16];
    let n = if addr.len() < 16 { addr.len() } else { 16 };
    a[..n].copy_from_slice(&addr[..n]);
    report(family, a, port, &[0; UNIX_PATH_MAX])
}

#[inline(always)]
fn deny_unix(path: &UnixPath) -> i32 {
    report(FAMILY_UNIX, [0; 16], 0, &path.path)
}

/// Counts a refusal and hands its event to dbproxy.
#[inline(always)]
fn report(family: u16, addr: [u8; 16], port: u16, path: &[u8; UNIX_PATH_MAX]) -> i32 {
    // SAFETY: helpers without preconditions.
    let (cgroup_id, pid_tgid) =
        unsafe { (bpf_get_current_cgroup_id(), bpf_get_current_pid_tgid()) };
    let comm = bpf_get_current_comm().unwrap_or([0; 16]);
    let pid = (pid_tgid >> 32) as u32;
    if let Some(c) = DENIED.get_ptr_mut(0) {
        // SAFETY: per-CPU slot of this CPU, valid during the run.
        unsafe { *c += 1 };
    }
    let event = DenyEvent {
        cgroup_id,
        pid,
        tid: pid_tgid as u32,
        comm,
        addr,
        port,
        family,
        pad: 0,
        path: *path,
        pad2: 0,
    };
    // dbproxy logs it (rate-limited); DENIED counts it even when the ring is full.
    let _ = EVENTS.output::<DenyEvent>(&event, 0);
    DENY
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
