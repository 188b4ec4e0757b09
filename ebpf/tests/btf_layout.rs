//! The `#[repr(C)]` map types agree with the C structs, checked against the
//! BTF clang wrote into the compiled object (sizes and every field offset).

use std::mem::{offset_of, size_of};

use membrane_ebpf::LB_OBJECT;
use membrane_ebpf::maps::*;

mod btf;
use btf::btf_structs;

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
    let s = btf_structs(LB_OBJECT);
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
    check!(s, "lb_ep_key", EpKey, [addr, family, pad]);
    check!(s, "lb_ep_value", EpValue, [ifindex, flags, mac, node_mac]);
}

#[test]
fn sock_map_types_match_btf() {
    let s = btf_structs(membrane_ebpf::SOCK_OBJECT);
    check!(s, "lb_svc_key", SvcKey, [addr, port, proto, family]);
    check!(
        s,
        "lb_sock_rev_key",
        SockRevKey,
        [cookie, addr, port, family, pad]
    );
    check!(s, "lb_rnat_value", RnatValue, [addr, port, pad]);
}
