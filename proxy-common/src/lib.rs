//! Types shared by dbproxy's user space and its eBPF programs (`#[repr(C)]`, no_std on the
//! BPF target). The kernel guard's map keys and events arrive here with that issue; the
//! crate exists now so that the workspace has the shape of the design card.
#![cfg_attr(target_arch = "bpf", no_std)]
