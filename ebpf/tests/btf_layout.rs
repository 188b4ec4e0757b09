//! The `#[repr(C)]` map types agree with the C structs, checked against the
//! BTF clang wrote into the compiled object (sizes and every field offset).

use std::collections::HashMap;
use std::mem::{offset_of, size_of};

use membrane_ebpf::LB_OBJECT;
use membrane_ebpf::maps::*;
use object::{Object, ObjectSection};

/// struct name -> (size, [(member, byte offset)])
type Structs = HashMap<String, (u32, Vec<(String, u32)>)>;

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

/// A minimal BTF reader: walks the type section and keeps the structs.
fn btf_structs() -> Structs {
    let obj = object::File::parse(LB_OBJECT).expect("parse ELF");
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

macro_rules! check {
    ($structs:expr, $c:literal, $ty:ty, [$($field:ident),+ $(,)?]) => {{
        let (size, members) = $structs
            .get($c)
            .unwrap_or_else(|| panic!("struct {} not in BTF", $c));
        assert_eq!(*size as usize, size_of::<$ty>(), "size of {}", $c);
        let rust: Vec<(String, u32)> = vec![
            $((stringify!($field).to_string(), offset_of!($ty, $field) as u32)),+
        ];
        assert_eq!(members, &rust, "fields and offsets of {}", $c);
    }};
}

#[test]
fn rust_map_types_match_btf() {
    let s = btf_structs();
    check!(s, "lb_svc_key", SvcKey, [addr, port, proto, family]);
    check!(
        s,
        "lb_svc_value",
        SvcValue,
        [svc_id, count, affinity_timeout, algorithm, flags, pad]
    );
    check!(s, "lb_slot_key", SlotKey, [svc_id, slot]);
    check!(
        s,
        "lb_backend",
        BackendValue,
        [addr, port, proto, family, state, pad]
    );
    check!(
        s,
        "lb_tuple",
        Tuple,
        [saddr, daddr, sport, dport, proto, family, pad]
    );
    check!(s, "lb_ct_value", CtValue, [backend_id, svc_id, last_seen]);
    check!(s, "lb_rnat_value", RnatValue, [addr, port, pad]);
    check!(
        s,
        "lb_affinity_key",
        AffinityKey,
        [addr, svc_id, family, pad]
    );
    check!(
        s,
        "lb_affinity_value",
        AffinityValue,
        [backend_id, pad, last_seen]
    );
}
