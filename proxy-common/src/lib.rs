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
    /// 4 or 6.
    pub family: u16,
    pub pad: u32,
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
}
