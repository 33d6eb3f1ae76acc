//! Types shared by dbproxy's user space and its eBPF programs: the guard's map keys and
//! its denial event. `#[repr(C)]`, plain data, no_std on the BPF target.
#![cfg_attr(target_arch = "bpf", no_std)]

/// A protected IPv4 destination. `addr` and `port` in network byte order, as the kernel
/// gives them to a connect hook; `addr == 0` means any address on `port`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Dest4 {
    pub addr: u32,
    pub port: u16,
    pub pad: u16,
}

/// A protected IPv6 destination (IPv4-mapped addresses are looked up as [`Dest4`]).
/// `addr` as four network-order words; all zero means any address on `port`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Dest6 {
    pub addr: [u32; 4],
    pub port: u16,
    pub pad: u16,
}

/// Room for a Unix socket path (`sun_path`).
pub const UNIX_PATH_MAX: usize = 108;

/// A protected Unix socket: the path its server bound, NUL-padded (the name the kernel
/// keeps with the listening socket, however a client names it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UnixPath {
    pub path: [u8; UNIX_PATH_MAX],
}

/// Where the fields the Unix-socket hook reads lie in this kernel's structures, in bytes,
/// from the kernel's BTF (they move between kernel builds). `ready == 0`: unknown, the
/// hook judges nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnixLayout {
    /// `struct sock` to its `struct net *` (`__sk_common.skc_net.net`).
    pub sock_net: u32,
    /// `struct net` to `net_cookie`.
    pub net_cookie: u32,
    /// `struct unix_sock` to `addr` (`struct unix_address *`).
    pub unix_addr: u32,
    /// `struct unix_address` to `name` (a `struct sockaddr_un`).
    pub addr_name: u32,
    /// `struct bpf_sock_addr_kern` (a cgroup sock_addr program's real context) to
    /// `uaddr` (the address the client gave) and `uaddrlen`.
    pub kern_uaddr: u32,
    pub kern_uaddrlen: u32,
    pub ready: u32,
    pub pad: u32,
}

/// [`DenyEvent::family`] of a refused Unix socket connect (its path in `path`).
pub const FAMILY_UNIX: u16 = 1;

/// A refused connect().
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DenyEvent {
    pub cgroup_id: u64,
    /// Process id (tgid) and thread id of the caller.
    pub pid: u32,
    pub tid: u32,
    pub comm: [u8; 16],
    /// IPv4 in the first 4 bytes, or IPv6; network byte order.
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    /// 4, 6, or [`FAMILY_UNIX`].
    pub family: u16,
    pub pad: u32,
    /// A Unix socket's path (NUL-padded); empty for IP.
    pub path: [u8; UNIX_PATH_MAX],
    pub pad2: u32,
}

/// Value stored for a protected destination or an allowed cgroup.
pub const PRESENT: u8 = 1;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] data without padding holes that could leak, valid for any
    // bit pattern.
    unsafe impl aya::Pod for super::Dest4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Dest6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DenyEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::UnixPath {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::UnixLayout {}
}
