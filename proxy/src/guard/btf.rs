//! Just enough of the kernel's BTF (`/sys/kernel/btf/vmlinux`) to find where a structure's
//! field lies: the Unix-socket hook reads kernel structures whose layout changes between
//! kernel builds, so dbproxy looks the offsets up in the running kernel's own type
//! information at start instead of compiling them in.

/// Why an offset could not be found.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("not BTF data (bad magic or header)")]
    Header,
    #[error("BTF type {0} is cut short")]
    Truncated(u32),
    #[error("BTF type {id} has unknown kind {kind}")]
    UnknownKind { id: u32, kind: u32 },
    #[error("struct {0} is not in the kernel's BTF")]
    NoStruct(String),
    #[error("{0} has no field {1}")]
    NoField(String, String),
    #[error("{0}.{1} is a bit field")]
    BitField(String, String),
}

const MAGIC: u16 = 0xeb9f;

// Kinds (include/uapi/linux/btf.h).
const INT: u32 = 1;
const PTR: u32 = 2;
const ARRAY: u32 = 3;
const STRUCT: u32 = 4;
const UNION: u32 = 5;
const ENUM: u32 = 6;
const FWD: u32 = 7;
const TYPEDEF: u32 = 8;
const VOLATILE: u32 = 9;
const CONST: u32 = 10;
const RESTRICT: u32 = 11;
const FUNC: u32 = 12;
const FUNC_PROTO: u32 = 13;
const VAR: u32 = 14;
const DATASEC: u32 = 15;
const FLOAT: u32 = 16;
const DECL_TAG: u32 = 17;
const TYPE_TAG: u32 = 18;
const ENUM64: u32 = 19;

/// A member of a struct or union.
#[derive(Debug, Clone)]
struct Member {
    name: u32,
    ty: u32,
    /// Bits from the start of the enclosing type.
    bit_offset: u32,
    bit_field: bool,
}

/// One type: its kind, name, what it refers to, and its members when it has any.
#[derive(Debug, Clone)]
struct Type {
    kind: u32,
    name: u32,
    /// The referred type of a typedef, qualifier or pointer.
    ty: u32,
    members: Vec<Member>,
}

/// Parsed BTF: types by id (id 0 is `void`) and the string section.
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    let b = data.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

impl Btf {
    /// The running kernel's BTF.
    pub fn of_kernel() -> std::io::Result<Result<Btf, BtfError>> {
        std::fs::read("/sys/kernel/btf/vmlinux").map(|d| Btf::parse(&d))
    }

    /// Parses little-endian BTF.
    pub fn parse(data: &[u8]) -> Result<Btf, BtfError> {
        let magic = data.get(0..2).ok_or(BtfError::Header)?;
        if u16::from_le_bytes([magic[0], magic[1]]) != MAGIC {
            return Err(BtfError::Header);
        }
        let field = |i: usize| u32_at(data, 4 + 4 * i).ok_or(BtfError::Header);
        let hdr_len = field(0)? as usize;
        let (type_off, type_len) = (field(1)? as usize, field(2)? as usize);
        let (str_off, str_len) = (field(3)? as usize, field(4)? as usize);
        let section = |off: usize, len: usize| {
            let start = hdr_len.checked_add(off).ok_or(BtfError::Header)?;
            let end = start.checked_add(len).ok_or(BtfError::Header)?;
            data.get(start..end).ok_or(BtfError::Header)
        };
        let type_data = section(type_off, type_len)?;
        let strings = section(str_off, str_len)?.to_vec();
        let mut types = vec![Type {
            kind: 0,
            name: 0,
            ty: 0,
            members: Vec::new(),
        }];
        let mut at = 0usize;
        while at < type_data.len() {
            let id = types.len() as u32;
            let word = |i: usize| u32_at(type_data, at + 4 * i).ok_or(BtfError::Truncated(id));
            let (name, info, size_or_type) = (word(0)?, word(1)?, word(2)?);
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            at += 12;
            let mut members = Vec::new();
            let extra = match kind {
                INT | VAR | DECL_TAG => 4,
                PTR | FWD | TYPEDEF | VOLATILE | CONST | RESTRICT | FUNC | FLOAT | TYPE_TAG => 0,
                ARRAY => 12,
                STRUCT | UNION => {
                    for m in 0..vlen {
                        let w = |i: usize| {
                            u32_at(type_data, at + 12 * m + 4 * i).ok_or(BtfError::Truncated(id))
                        };
                        let offset = w(2)?;
                        members.push(Member {
                            name: w(0)?,
                            ty: w(1)?,
                            bit_offset: if kind_flag {
                                offset & 0xff_ffff
                            } else {
                                offset
                            },
                            bit_field: kind_flag && offset >> 24 != 0,
                        });
                    }
                    12 * vlen
                }
                ENUM | FUNC_PROTO => 8 * vlen,
                DATASEC | ENUM64 => 12 * vlen,
                _ => return Err(BtfError::UnknownKind { id, kind }),
            };
            at += extra;
            if at > type_data.len() {
                return Err(BtfError::Truncated(id));
            }
            types.push(Type {
                kind,
                name,
                ty: size_or_type,
                members,
            });
        }
        Ok(Btf { types, strings })
    }

    fn name(&self, off: u32) -> &[u8] {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        &rest[..end]
    }

    /// The type behind typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.types.get(id as usize)?;
            match t.kind {
                TYPEDEF | VOLATILE | CONST | RESTRICT | TYPE_TAG => id = t.ty,
                _ => return Some(t),
            }
        }
        None
    }

    /// The byte offset of `fields` (a path of field names, each in the type of the one
    /// before) from the start of `struct name`. Fields of anonymous structs and unions are
    /// found as the C compiler finds them.
    pub fn offset_of(&self, name: &str, fields: &[&str]) -> Result<u32, BtfError> {
        let mut t = self
            .types
            .iter()
            .find(|t| t.kind == STRUCT && self.name(t.name) == name.as_bytes())
            .ok_or_else(|| BtfError::NoStruct(name.into()))?;
        let mut bits = 0u32;
        let mut within = name.to_string();
        for field in fields {
            let (off, m) = self
                .member(t, field, 0)
                .ok_or_else(|| BtfError::NoField(within.clone(), field.to_string()))?;
            if m.bit_field || off % 8 != 0 {
                return Err(BtfError::BitField(within, field.to_string()));
            }
            bits += off;
            within = format!("{within}.{field}");
            t = match self.resolve(m.ty) {
                Some(next) => next,
                None => return Err(BtfError::NoField(within, String::new())),
            };
        }
        Ok(bits / 8)
    }

    /// `field` in `t` (or in an anonymous member of it): its bit offset from `t`'s start.
    fn member<'a>(&'a self, t: &'a Type, field: &str, depth: u32) -> Option<(u32, &'a Member)> {
        if depth > 8 || !matches!(t.kind, STRUCT | UNION) {
            return None;
        }
        if let Some(m) = t
            .members
            .iter()
            .find(|m| self.name(m.name) == field.as_bytes())
        {
            return Some((m.bit_offset, m));
        }
        t.members.iter().filter(|m| m.name == 0).find_map(|m| {
            let inner = self.resolve(m.ty)?;
            self.member(inner, field, depth + 1)
                .map(|(off, found)| (m.bit_offset + off, found))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds BTF: `strings` joined with NULs, types as raw words.
    fn btf(strings: &[&str], types: &[u32]) -> Vec<u8> {
        let mut s = vec![0u8];
        for x in strings {
            s.extend_from_slice(x.as_bytes());
            s.push(0);
        }
        let t: Vec<u8> = types.iter().flat_map(|w| w.to_le_bytes()).collect();
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for w in [24u32, 0, t.len() as u32, t.len() as u32, s.len() as u32] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&t);
        out.extend_from_slice(&s);
        out
    }

    fn info(kind: u32, vlen: u32) -> u32 {
        (kind << 24) | vlen
    }

    #[test]
    fn finds_fields_through_members_typedefs_and_anonymous_unions() {
        // Names: 1 "int", 5 "inner", 11 "a", 13 "b", 15 "outer", 21 "x", 23 "in", 26 "t".
        let strings = ["int", "inner", "a", "b", "outer", "x", "in", "t"];
        let types = [
            // 1: int
            1,
            info(INT, 0),
            4,
            32,
            // 2: struct inner { int a @0; int b @32 }
            5,
            info(STRUCT, 2),
            8,
            11,
            1,
            0,
            13,
            1,
            32,
            // 3: typedef struct inner t
            26,
            info(TYPEDEF, 0),
            2,
            // 4: union { int x @0 } (anonymous)
            0,
            info(UNION, 1),
            4,
            21,
            1,
            0,
            // 5: struct outer { int a @0; <anon union> @64; t in @128 }
            15,
            info(STRUCT, 3),
            24,
            11,
            1,
            0,
            0,
            4,
            64,
            23,
            3,
            128,
        ];
        let b = Btf::parse(&btf(&strings, &types)).unwrap();
        assert_eq!(b.offset_of("inner", &["b"]), Ok(4));
        assert_eq!(b.offset_of("outer", &["x"]), Ok(8));
        assert_eq!(b.offset_of("outer", &["in", "b"]), Ok(20));
        assert_eq!(
            b.offset_of("outer", &["nope"]),
            Err(BtfError::NoField("outer".into(), "nope".into()))
        );
        assert_eq!(
            b.offset_of("missing", &["a"]),
            Err(BtfError::NoStruct("missing".into()))
        );
    }

    #[test]
    fn refuses_what_is_not_btf_or_cut_short() {
        assert!(Btf::parse(b"").is_err());
        assert!(Btf::parse(&[0u8; 64]).is_err());
        let whole = btf(&["int"], &[1, info(INT, 0), 4, 32]);
        for n in 0..whole.len() {
            let _ = Btf::parse(&whole[..n]);
        }
        let mut bad = whole.clone();
        bad[24 + 7] = 0x7f; // an unknown kind
        assert!(Btf::parse(&bad).is_err());
    }

    /// The running kernel's own BTF: the fields the hook reads exist. (The guard's Unix
    /// socket programs need it; a kernel without `/sys/kernel/btf/vmlinux` fails here.)
    #[test]
    fn the_kernels_unix_socket_fields_are_found() {
        let b = match Btf::of_kernel() {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => panic!("/sys/kernel/btf/vmlinux does not parse: {e}"),
            Err(e) => panic!("/sys/kernel/btf/vmlinux cannot be read (a kernel without BTF?): {e}"),
        };
        assert_eq!(b.offset_of("unix_address", &["name"]), Ok(8));
        assert!(b
            .offset_of("sock", &["__sk_common", "skc_net", "net"])
            .is_ok());
        assert!(b.offset_of("net", &["net_cookie"]).unwrap() > 0);
        assert!(b.offset_of("unix_sock", &["addr"]).unwrap() > 0);
    }
}
