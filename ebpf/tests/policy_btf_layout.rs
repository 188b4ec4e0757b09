//! The policy map types (`src/policy.rs`) agree with `bpf/policy.h`, checked
//! against the BTF clang wrote into policy.o (sizes and every field offset).
//! LPM keys carry `prefixlen` first in C; aya adds it (`Key<K>`), so the
//! Rust key types start 4 bytes later.

use std::collections::HashMap;
use std::mem::{offset_of, size_of};

use membrane_ebpf::policy::*;

use object::{Object, ObjectSection};

/// struct name -> (size, [(member, byte offset)])
type Structs = HashMap<String, (u32, Vec<(String, u32)>)>;

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

/// A minimal BTF reader: walks the type section and keeps the structs.
fn btf_structs() -> Structs {
    let obj = object::File::parse(POLICY_OBJECT).expect("parse ELF");
    let btf = obj
        .section_by_name(".BTF")
        .expect(".BTF section (compiled with -g)")
        .data()
        .unwrap();
    assert_eq!(u16::from_le_bytes([btf[0], btf[1]]), 0xeb9f, "BTF magic");
    let hdr_len = u32_at(btf, 4) as usize;
    let type_off = u32_at(btf, 8) as usize;
    let type_len = u32_at(btf, 12) as usize;
    let str_off = u32_at(btf, 16) as usize;
    let types = &btf[hdr_len + type_off..hdr_len + type_off + type_len];
    let strs = &btf[hdr_len + str_off..];
    let name = |off: u32| -> String {
        let s = &strs[off as usize..];
        let end = s.iter().position(|b| *b == 0).unwrap();
        String::from_utf8_lossy(&s[..end]).into_owned()
    };
    let mut out = Structs::new();
    let mut p = 0usize;
    while p < types.len() {
        let name_off = u32_at(types, p);
        let info = u32_at(types, p + 4);
        let size = u32_at(types, p + 8);
        let vlen = (info & 0xffff) as usize;
        let kind = (info >> 24) & 0x1f;
        let kflag = info >> 31;
        p += 12;
        match kind {
            1 | 14 | 17 => p += 4, // INT, VAR, DECL_TAG
            3 => p += 12,          // ARRAY
            4 | 5 => {
                // STRUCT/UNION members: name, type, offset (bits)
                let mut members = Vec::new();
                for i in 0..vlen {
                    let m = p + i * 12;
                    let mut off = u32_at(types, m + 8);
                    if kflag == 1 {
                        off &= 0x00ff_ffff;
                    }
                    members.push((name(u32_at(types, m)), off / 8));
                }
                if kind == 4 {
                    out.insert(name(name_off), (size, members));
                }
                p += vlen * 12;
            }
            6 | 13 => p += vlen * 8,   // ENUM, FUNC_PROTO
            15 | 19 => p += vlen * 12, // DATASEC, ENUM64
            _ => {}                    // PTR, FWD, TYPEDEF, modifiers, FUNC, FLOAT, TYPE_TAG
        }
    }
    out
}

/// Checks size and offsets; `skip` leading C members (the LPM prefix
/// length) are not in the Rust type, which starts `skip * 4` bytes later.
macro_rules! check {
    ($structs:expr, $c:literal, $ty:ty, $skip:expr, [$($field:ident),+ $(,)?]) => {{
        let (size, members) = $structs
            .get($c)
            .unwrap_or_else(|| panic!("struct {} not in BTF", $c));
        let shift = 4 * $skip as u32;
        assert_eq!(*size as usize, size_of::<$ty>() + shift as usize, "size of {}", $c);
        let rust: Vec<(String, u32)> = vec![
            $((stringify!($field).to_string(), offset_of!($ty, $field) as u32 + shift)),+
        ];
        assert_eq!(&members[$skip..], &rust[..], "fields and offsets of {}", $c);
    }};
}

#[test]
fn policy_map_types_match_btf() {
    let s = btf_structs();
    check!(s, "pol_ipcache_key", IpcacheKey, 1, [family, pad, addr]);
    check!(s, "pol_ipcache_value", IpcacheValue, 0, [identity, pad]);
    check!(
        s,
        "pol_key",
        PolicyKey,
        1,
        [ep_id, identity, direction, proto, dport]
    );
    check!(s, "pol_value", PolicyValue, 0, [deny, pad, packets]);
    check!(
        s,
        "pol_endpoint",
        EndpointValue,
        0,
        [ep_id, identity, flags, pad]
    );
    check!(
        s,
        "pol_ct_key",
        CtKey,
        0,
        [
            saddr, daddr, sport, dport, ep_id, proto, family, direction, pad
        ]
    );
    check!(s, "pol_ct_value", CtValue, 0, [last_seen, flags, pad]);
}
