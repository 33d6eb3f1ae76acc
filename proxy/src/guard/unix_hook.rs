//! Loads the guard's cgroup `connect_unix` program (Linux 6.7+) with the bpf() syscall:
//! aya 0.14 parses no `cgroup/connect_unix` section and cannot set another expected attach
//! type, so the program is built into a connect4 section and taken from the object here:
//! its instructions, the helper functions it calls (`memset`, ...), and its maps (the
//! descriptors aya created for the others).

use super::sys::{self, bpf};
use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget, SymbolKind};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
/// `BPF_CGROUP_UNIX_CONNECT`.
pub const ATTACH_UNIX_CONNECT: u32 = 49;
const BPF_PSEUDO_MAP_FD: u8 = 1;
const BPF_PSEUDO_CALL: u8 = 1;
const LD_IMM64: u8 = 0x18;
const CALL: u8 = 0x85;

/// The instructions of `function`, followed by each `.text` function it calls (the
/// verifier refuses instructions nothing reaches), with map references and calls
/// resolved. `maps` gives each map's descriptor.
pub fn instructions(
    object: &[u8],
    function: &str,
    maps: &HashMap<String, RawFd>,
) -> Result<Vec<u8>, String> {
    let file = object::File::parse(object).map_err(|e| format!("the eBPF object: {e}"))?;
    let sym = file
        .symbols()
        .find(|s| s.name() == Ok(function) && s.kind() == SymbolKind::Text)
        .ok_or_else(|| format!("no function {function} in the eBPF object"))?;
    let section = file
        .section_by_index(sym.section_index().ok_or("function without a section")?)
        .map_err(|e| e.to_string())?;
    let data = section.data().map_err(|e| e.to_string())?;
    let (start, size) = (sym.address() as usize, sym.size() as usize);
    let mut insns = data
        .get(start..start + size)
        .ok_or("function outside its section")?
        .to_vec();
    let text = file.section_by_name(".text");
    let text_data = match &text {
        Some(t) => t.data().map_err(|e| e.to_string())?,
        None => &[],
    };
    // Where each called function was appended, by its address in .text.
    let mut appended: HashMap<u64, usize> = HashMap::new();
    for (offset, rel) in section.relocations() {
        let offset = offset as usize;
        if offset < start || offset >= start + size {
            continue;
        }
        let i = (offset - start) / 8;
        let RelocationTarget::Symbol(target) = rel.target() else {
            return Err(format!("{function}: a relocation without a symbol"));
        };
        let target = file.symbol_by_index(target).map_err(|e| e.to_string())?;
        let name = target.name().map_err(|e| e.to_string())?;
        let at = i * 8;
        let opcode = *insns.get(at).ok_or("relocation past the end")?;
        if opcode == LD_IMM64 {
            let fd = maps
                .get(name)
                .ok_or_else(|| format!("{function}: map {name} not created"))?;
            set_src(&mut insns, at, BPF_PSEUDO_MAP_FD);
            insns[at + 4..at + 8].copy_from_slice(&fd.to_le_bytes());
        } else if opcode == CALL {
            let in_text = text
                .as_ref()
                .is_some_and(|t| Some(t.index()) == target.section_index());
            if !in_text || target.kind() != SymbolKind::Text {
                return Err(format!("{function}: a call to {name}, not in .text"));
            }
            let from = target.address();
            let at_end = match appended.get(&from) {
                Some(&a) => a,
                None => {
                    let (s, n) = (from as usize, target.size() as usize);
                    let body = text_data
                        .get(s..s + n)
                        .ok_or_else(|| format!("{name} outside .text"))?;
                    let a = insns.len();
                    insns.extend_from_slice(body);
                    appended.insert(from, a);
                    a
                }
            };
            let to = at_end / 8;
            let rel = to as i64 - (i as i64 + 1);
            set_src(&mut insns, at, BPF_PSEUDO_CALL);
            insns[at + 4..at + 8].copy_from_slice(&(rel as i32).to_le_bytes());
        } else {
            return Err(format!("{function}: an unexpected relocation to {name}"));
        }
    }
    Ok(insns)
}

fn set_src(insns: &mut [u8], at: usize, src: u8) {
    insns[at + 1] = (insns[at + 1] & 0x0f) | (src << 4);
}

#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    rest: [u64; 8],
}

/// Loads `insns` as a cgroup sock_addr program for `attach_type`; the verifier's words
/// when it refuses.
pub fn load(insns: &[u8], name: &str, attach_type: u32) -> Result<OwnedFd, String> {
    let license = c"GPL";
    let mut log = vec![0u8; 64 * 1024];
    let mut prog_name = [0u8; 16];
    for (d, s) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    let mut attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        insn_cnt: (insns.len() / 8) as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name,
        expected_attach_type: attach_type,
        ..ProgLoad::default()
    };
    match bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => Ok(sys::owned(fd)),
        Err(first) => {
            // Again with the verifier's log, for the message.
            attr.log_level = 1;
            attr.log_size = log.len() as u32;
            attr.log_buf = log.as_mut_ptr() as u64;
            let again = bpf(BPF_PROG_LOAD, &mut attr);
            if let Ok(fd) = again {
                return Ok(sys::owned(fd));
            }
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            let tail: Vec<&str> = text.lines().rev().take(3).collect();
            Err(format!("{first}; verifier: {}", tail.join(" / ")))
        }
    }
}

#[repr(C)]
#[derive(Default)]
struct LinkCreate {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    rest: [u64; 4],
}

/// Attaches `prog` to the cgroup `cgroup` as a link.
pub fn link(prog: &OwnedFd, cgroup: RawFd, attach_type: u32) -> io::Result<OwnedFd> {
    let mut attr = LinkCreate {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: cgroup as u32,
        attach_type,
        ..LinkCreate::default()
    };
    bpf(BPF_LINK_CREATE, &mut attr).map(sys::owned)
}

/// Pins `fd` (a link) at `path` in bpffs.
pub fn pin(fd: &OwnedFd, path: &Path) -> io::Result<()> {
    sys::obj_pin(fd, path)
}

/// The tag of a loaded program (as `bpf_prog_info.tag`).
pub fn tag(prog: &OwnedFd) -> io::Result<u64> {
    // type, id, tag[8], then more the kernel fills as far as the length says.
    let mut info = [0u8; 64];
    sys::info_by_fd(prog, &mut info)?;
    let mut t = [0u8; 8];
    t.copy_from_slice(&info[8..16]);
    Ok(u64::from_be_bytes(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_and_maps_are_resolved_in_the_embedded_object() {
        let object = super::super::OBJECT;
        assert!(
            !object.is_empty(),
            "dbproxy was built without the guard's eBPF object: run `cargo xtask build-ebpf` \
             first (cargo xtask test does)"
        );
        let names = [
            "UNIX_LAYOUT",
            "HOST_NETNS",
            "PROTECTED_UNIX",
            "ALLOWED",
            "DENIED",
            "EVENTS",
        ];
        let maps: HashMap<String, RawFd> = names.iter().map(|n| (n.to_string(), 1000)).collect();
        let insns = instructions(object, "connect_unix", &maps).unwrap();
        assert_eq!(insns.len() % 8, 0);
        let mut map_refs = 0;
        for i in insns.chunks(8) {
            if i[0] == LD_IMM64 && i[1] >> 4 == BPF_PSEUDO_MAP_FD {
                assert_eq!(i32::from_le_bytes([i[4], i[5], i[6], i[7]]), 1000);
                map_refs += 1;
            }
            if i[0] == CALL && i[1] >> 4 == BPF_PSEUDO_CALL {
                let to = i32::from_le_bytes([i[4], i[5], i[6], i[7]]);
                assert!(to != -1, "a call left unresolved");
            }
        }
        assert!(map_refs >= 3, "{map_refs} map references");
        let missing = instructions(object, "connect_unix", &HashMap::new()).unwrap_err();
        assert!(missing.contains("not created"), "{missing}");
        assert!(instructions(object, "no_such_function", &maps).is_err());
    }
}
