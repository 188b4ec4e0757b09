//! A minimal BTF reader for the layout tests: the structs clang wrote into a
//! compiled object, with their sizes and member offsets.

use std::collections::HashMap;

use object::{Object, ObjectSection};

/// struct name -> (size, [(member, byte offset)])
pub type Structs = HashMap<String, (u32, Vec<(String, u32)>)>;

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

/// A minimal BTF reader: walks the type section and keeps the structs.
pub fn btf_structs(elf: &[u8]) -> Structs {
    let obj = object::File::parse(elf).expect("parse ELF");
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
