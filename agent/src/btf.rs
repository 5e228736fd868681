//! Just enough of the kernel's BTF (/sys/kernel/btf/vmlinux) to choose hooks: which
//! functions and tracepoints exist, how many arguments a function takes, and where a
//! struct member lies. Kernels differ in exactly these, and the choice must be made
//! before a program is loaded (a program reading the wrong argument slot is refused).
use std::path::Path;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum BtfError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0} is not BTF this version understands: {1}")]
    Format(String, &'static str),
}

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, Clone)]
struct Type {
    name: u32,
    kind: u32,
    kind_flag: bool,
    /// size or referenced type, by kind
    size_type: u32,
    /// (name, type, offset) of struct/union members; (name, type) of prototype params.
    members: Vec<(u32, u32, u32)>,
}

/// A parsed BTF blob: types by id, and names to ids per kind.
pub struct Btf {
    types: Vec<Type>, // index = type id (0 is void)
    strings: Vec<u8>,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

impl Btf {
    /// The running kernel's BTF.
    pub fn kernel() -> Result<Btf, BtfError> {
        Btf::from_file(Path::new("/sys/kernel/btf/vmlinux"))
    }

    pub fn from_file(path: &Path) -> Result<Btf, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Btf::parse(&data).map_err(|why| BtfError::Format(path.display().to_string(), why))
    }

    pub fn parse(b: &[u8]) -> Result<Btf, &'static str> {
        if b.len() < 24 || u16::from_le_bytes([b[0], b[1]]) != MAGIC {
            return Err("bad magic (big-endian BTF is not supported)");
        }
        let hdr_len = u32_at(b, 4).ok_or("short header")? as usize;
        let type_off = u32_at(b, 8).ok_or("short header")? as usize;
        let type_len = u32_at(b, 12).ok_or("short header")? as usize;
        let str_off = u32_at(b, 16).ok_or("short header")? as usize;
        let str_len = u32_at(b, 20).ok_or("short header")? as usize;
        let types_sec = b
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or("type section out of bounds")?;
        let strings = b
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or("string section out of bounds")?
            .to_vec();
        let mut types = vec![Type {
            name: 0,
            kind: 0,
            kind_flag: false,
            size_type: 0,
            members: vec![],
        }];
        let mut at = 0;
        let short = "truncated type";
        while at < types_sec.len() {
            let name = u32_at(types_sec, at).ok_or(short)?;
            let info = u32_at(types_sec, at + 4).ok_or(short)?;
            let size_type = u32_at(types_sec, at + 8).ok_or(short)?;
            at += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let mut members = vec![];
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = at + i * 12;
                        members.push((
                            u32_at(types_sec, m).ok_or(short)?,
                            u32_at(types_sec, m + 4).ok_or(short)?,
                            u32_at(types_sec, m + 8).ok_or(short)?,
                        ));
                    }
                    vlen * 12
                }
                KIND_ENUM => vlen * 8,
                KIND_FUNC_PROTO => {
                    for i in 0..vlen {
                        let m = at + i * 8;
                        members.push((
                            u32_at(types_sec, m).ok_or(short)?,
                            u32_at(types_sec, m + 4).ok_or(short)?,
                            0,
                        ));
                    }
                    vlen * 8
                }
                KIND_DATASEC | KIND_ENUM64 => vlen * 12,
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
                | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
                _ => return Err("unknown type kind"),
            };
            at += extra;
            types.push(Type {
                name,
                kind,
                kind_flag: info >> 31 == 1,
                size_type,
                members,
            });
        }
        Ok(Btf { types, strings })
    }

    fn str_at(&self, off: u32) -> &str {
        let s = self.strings.get(off as usize..).unwrap_or_default();
        let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
        std::str::from_utf8(&s[..end]).unwrap_or("")
    }

    /// The first type of `kind` named `name`. A scan, not an index: the agent asks a
    /// dozen names once at startup, and an index of every name (11 MB for a distribution
    /// kernel) was most of its startup memory peak.
    fn first(&self, kind: u32, name: &str) -> Option<&Type> {
        self.types
            .iter()
            .skip(1)
            .find(|t| t.kind == kind && t.name != 0 && self.str_at(t.name) == name)
    }

    /// Number of arguments of kernel function `name`, when BTF describes it.
    pub fn func_arg_count(&self, name: &str) -> Option<usize> {
        let f = self.first(KIND_FUNC, name)?;
        let proto = self.types.get(f.size_type as usize)?;
        (proto.kind == KIND_FUNC_PROTO).then_some(proto.members.len())
    }

    /// Whether the BTF-enabled tracepoint `name` exists (its `btf_trace_<name>` typedef).
    pub fn has_tracepoint(&self, name: &str) -> bool {
        self.first(KIND_TYPEDEF, &format!("btf_trace_{name}"))
            .is_some()
    }

    /// Byte offset of `member` in struct `name`, looking through anonymous struct and
    /// union members.
    pub fn member_offset(&self, name: &str, member: &str) -> Option<u32> {
        let t = self.first(KIND_STRUCT, name)?;
        self.find_member(t, member, 0).map(|bits| bits / 8)
    }

    fn find_member(&self, t: &Type, member: &str, base_bits: u32) -> Option<u32> {
        for &(mname, mtype, off) in &t.members {
            // With kind_flag the offset's upper 8 bits are the bitfield size.
            let bits = if t.kind_flag { off & 0x00ff_ffff } else { off };
            if mname != 0 {
                if self.str_at(mname) == member {
                    return Some(base_bits + bits);
                }
                continue;
            }
            let inner = self.resolve(mtype)?;
            if matches!(inner.kind, KIND_STRUCT | KIND_UNION)
                && let Some(b) = self.find_member(inner, member, base_bits + bits)
            {
                return Some(b);
            }
        }
        None
    }

    /// Follows typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.types.get(id as usize)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_type
                }
                _ => return Some(t),
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-built BTF blob: int, struct s { int a; union { int b; int c; }; },
    /// func f(int, int).
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0s\0a\0b\0c\0f\0x\0btf_trace_tp\0".to_vec();
        let off = |s: &str| -> u32 {
            let pos = strings
                .windows(s.len() + 2)
                .position(|w| w[0] == 0 && &w[1..=s.len()] == s.as_bytes() && w[s.len() + 1] == 0)
                .unwrap();
            pos as u32 + 1
        };
        let mut t = vec![];
        let mut push = |v: &[u32]| v.iter().for_each(|x| t.extend_from_slice(&x.to_le_bytes()));
        // 1: int (size 4, 32 bits)
        push(&[off("int"), KIND_INT << 24, 4, 32]);
        // 2: anonymous union { b; c } (size 4)
        push(&[0, (KIND_UNION << 24) | 2, 4, off("b"), 1, 0, off("c"), 1, 0]);
        // 3: struct s { a at 0; anon union at 32 bits } (size 8)
        push(&[
            off("s"),
            (KIND_STRUCT << 24) | 2,
            8,
            off("a"),
            1,
            0,
            0,
            2,
            32,
        ]);
        // 4: proto (int x, int x) -> int
        push(&[0, (KIND_FUNC_PROTO << 24) | 2, 1, off("x"), 1, off("x"), 1]);
        // 5: func f
        push(&[off("f"), KIND_FUNC << 24, 4]);
        // 6: typedef btf_trace_tp -> 4
        push(&[off("btf_trace_tp"), KIND_TYPEDEF << 24, 4]);
        let mut b = vec![];
        b.extend_from_slice(&MAGIC.to_le_bytes());
        b.extend_from_slice(&[1, 0]);
        for v in [
            24u32,
            0,
            t.len() as u32,
            t.len() as u32,
            strings.len() as u32,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&t);
        b.extend_from_slice(&strings);
        b
    }

    #[test]
    fn finds_functions_tracepoints_and_members() {
        let btf = Btf::parse(&blob()).unwrap();
        assert_eq!(btf.func_arg_count("f"), Some(2));
        assert_eq!(btf.func_arg_count("g"), None);
        assert!(btf.has_tracepoint("tp"));
        assert!(!btf.has_tracepoint("other"));
        assert_eq!(btf.member_offset("s", "a"), Some(0));
        assert_eq!(btf.member_offset("s", "c"), Some(4));
        assert_eq!(btf.member_offset("s", "z"), None);
    }

    #[test]
    fn rejects_what_is_not_btf() {
        assert!(Btf::parse(b"not btf at all, not at all").is_err());
        let mut b = blob();
        b.truncate(40);
        assert!(Btf::parse(&b).is_err());
    }

    #[test]
    fn reads_the_running_kernel() {
        // Every kernel we run on has these; skip where BTF is absent (unit tests run anywhere).
        let Ok(btf) = Btf::kernel() else {
            eprintln!("skipping: no /sys/kernel/btf/vmlinux");
            return;
        };
        assert!(btf.member_offset("sock_common", "skc_cookie").is_some());
        assert!(btf.has_tracepoint("inet_sock_set_state"));
        assert!(matches!(btf.func_arg_count("inet_csk_accept"), Some(2 | 4)));
    }
}
