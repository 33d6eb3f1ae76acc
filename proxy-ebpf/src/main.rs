//! dbproxy's kernel guard: connect4/connect6 programs for a cgroup that refuse connect() to
//! the protected database addresses unless the caller's cgroup is allowed. A database on
//! this host is protected on every address that reaches it (the loopback range, the
//! unspecified address, the host's own addresses); only connects made in the host's
//! network namespace are judged (a container's own database is its own business).
#![no_std]
#![no_main]

use aya_ebpf::bindings::bpf_sock_addr;
use aya_ebpf::helpers::{
    bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_netns_cookie,
};
use aya_ebpf::macros::{cgroup_sock_addr, map};
use aya_ebpf::maps::{Array, HashMap, PerCpuArray, RingBuf};
use aya_ebpf::programs::SockAddrContext;
use proxy_common::{DenyEvent, Dest4, Dest6};

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
    // SAFETY: helpers without preconditions.
    let (cgroup_id, pid_tgid) =
        unsafe { (bpf_get_current_cgroup_id(), bpf_get_current_pid_tgid()) };
    let comm = bpf_get_current_comm().unwrap_or([0; 16]);
    let pid = (pid_tgid >> 32) as u32;
    if let Some(c) = DENIED.get_ptr_mut(0) {
        // SAFETY: per-CPU slot of this CPU, valid during the run.
        unsafe { *c += 1 };
    }
    let mut a = [0u8; 16];
    let n = if addr.len() < 16 { addr.len() } else { 16 };
    a[..n].copy_from_slice(&addr[..n]);
    let event = DenyEvent {
        cgroup_id,
        pid,
        tid: pid_tgid as u32,
        comm,
        addr: a,
        port,
        family,
        pad: 0,
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
