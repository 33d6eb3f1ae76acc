//! What a pinned link is: the program it runs and the cgroup it is attached to, read with
//! the bpf() syscall (aya 0.14 keeps a link's cgroup to itself). A restarted dbproxy takes
//! a pinned link over only when both are what its config and its own programs say.

use super::sys;
use std::io;
use std::path::Path;

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

/// The pinned cgroup link at `path`. `NotFound` when nothing is pinned there.
pub fn pinned(path: &Path) -> io::Result<PinnedFacts> {
    let fd = sys::obj_get(path)?;
    let mut info = LinkInfo::default();
    sys::info_by_fd(&fd, &mut info)?;
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
