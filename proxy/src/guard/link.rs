//! What a pinned link is: the program it runs and the cgroup it is attached to, read with
//! the bpf() syscall (aya 0.14 keeps a link's cgroup to itself). A restarted dbproxy takes
//! a pinned link over only when both are what its config and its own programs say.

use std::ffi::CString;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_TYPE_CGROUP: u32 = 3;

/// A pinned cgroup link's program and cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinnedFacts {
    pub program_id: u32,
    pub cgroup_id: u64,
}

/// What to do with a pinned link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// It runs this dbproxy's program at the configured cgroup: keep it.
    TakeOver,
    /// Attach this dbproxy's program, then remove the pinned one; the reason, for the log.
    Replace(String),
}

/// Compares a pinned link with what the config and the loaded program say (sans-IO).
pub fn judge(pinned: PinnedFacts, pinned_tag: Option<u64>, cgroup_id: u64, tag: u64) -> Verdict {
    if pinned.cgroup_id != cgroup_id {
        return Verdict::Replace(format!(
            "it is attached to cgroup id {}, the config's cgroup is {cgroup_id}",
            pinned.cgroup_id
        ));
    }
    match pinned_tag {
        Some(t) if t == tag => Verdict::TakeOver,
        Some(t) => Verdict::Replace(format!(
            "it runs another program (tag {t:016x}, this dbproxy's is {tag:016x})"
        )),
        None => Verdict::Replace(format!(
            "its program (id {}) cannot be read",
            pinned.program_id
        )),
    }
}

#[repr(C)]
struct ObjGet {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    /// The kernel refuses non-zero bytes past the fields it knows: no uninitialized padding.
    pad: u32,
}

#[repr(C)]
struct InfoByFd {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `struct bpf_link_info` up to the cgroup member of its union, with room to spare (the
/// kernel accepts a longer buffer whose tail is zero).
#[repr(C)]
#[derive(Default)]
struct LinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    pad: u32,
    cgroup_id: u64,
    attach_type: u32,
    rest: [u32; 25],
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, properly sized bpf_attr member for `cmd`.
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
        Ok(r)
    }
}

/// The pinned cgroup link at `path`. `NotFound` when nothing is pinned there.
pub fn pinned(path: &Path) -> io::Result<PinnedFacts> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in the pin path"))?;
    let mut get = ObjGet {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        pad: 0,
    };
    let fd = bpf(BPF_OBJ_GET, &mut get)?;
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("bad fd"))?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut info = LinkInfo::default();
    let mut req = InfoByFd {
        bpf_fd: std::os::fd::AsRawFd::as_raw_fd(&fd) as u32,
        info_len: std::mem::size_of::<LinkInfo>() as u32,
        info: &mut info as *mut LinkInfo as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut req)?;
    if info.link_type != BPF_LINK_TYPE_CGROUP {
        return Err(io::Error::other(format!(
            "{} is not a cgroup link (type {})",
            path.display(),
            info.link_type
        )));
    }
    Ok(PinnedFacts {
        program_id: info.prog_id,
        cgroup_id: info.cgroup_id,
    })
}

/// The tag (a hash of the instructions) of the loaded program `id`.
pub fn program_tag(id: u32) -> Option<u64> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .map(|p| p.tag())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pinned_link_is_kept_only_with_the_same_program_at_the_same_cgroup() {
        let facts = PinnedFacts {
            program_id: 7,
            cgroup_id: 100,
        };
        assert_eq!(judge(facts, Some(0xab), 100, 0xab), Verdict::TakeOver);
        assert!(
            matches!(judge(facts, Some(0xab), 101, 0xab), Verdict::Replace(w) if w.contains("cgroup"))
        );
        assert!(
            matches!(judge(facts, Some(0xac), 100, 0xab), Verdict::Replace(w) if w.contains("another program"))
        );
        assert!(matches!(judge(facts, None, 100, 0xab), Verdict::Replace(_)));
    }

    #[test]
    fn nothing_pinned_is_not_found() {
        let e = pinned(Path::new("/nonexistent/dbproxy-link")).unwrap_err();
        // Without the privilege to call bpf(), the kernel says so first.
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied
            ),
            "{e}"
        );
    }
}
