//! The few bpf() syscalls the guard makes itself (where aya 0.14 has no API): objects in
//! bpffs by path, and an object's info by descriptor.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// bpf(`cmd`, `attr`): the descriptor or count the kernel returns.
pub fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<RawFd> {
    // SAFETY: `attr` is a live bpf_attr member for `cmd` of the size given; callers
    // zero every byte the kernel reads (it refuses non-zero bytes past the fields it knows).
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        RawFd::try_from(r).map_err(|_| io::Error::other("bpf() returned no descriptor"))
    }
}

/// A descriptor the kernel just returned.
pub fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: a new descriptor from bpf() that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// BPF_OBJ_PIN / BPF_OBJ_GET's attributes.
#[repr(C)]
struct ObjPath {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    /// No uninitialized padding reaches the kernel.
    pad: u32,
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in the pin path"))
}

/// The object pinned at `path`; `NotFound` when nothing is pinned there.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = c_path(path)?;
    let mut attr = ObjPath {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        pad: 0,
    };
    bpf(BPF_OBJ_GET, &mut attr).map(owned)
}

/// Pins `fd` at `path` in bpffs.
pub fn obj_pin(fd: &OwnedFd, path: &Path) -> io::Result<()> {
    let c = c_path(path)?;
    let mut attr = ObjPath {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
        path_fd: 0,
        pad: 0,
    };
    bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

#[repr(C)]
struct InfoByFd {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// Fills `info` (a `bpf_link_info` or `bpf_prog_info` prefix, zeroed) for `fd`.
pub fn info_by_fd<I>(fd: &OwnedFd, info: &mut I) -> io::Result<()> {
    let mut attr = InfoByFd {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<I>() as u32,
        info: info as *mut I as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(|_| ())
}
