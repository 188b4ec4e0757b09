//! The policy map types (`src/policy.rs`) agree with `bpf/policy.h`, checked
//! against the BTF clang wrote into policy.o (sizes and every field offset).
//! LPM keys carry `prefixlen` first in C; aya adds it (`Key<K>`), so the
//! Rust key types start 4 bytes later.

use std::mem::{offset_of, size_of};

use membrane_ebpf::policy::*;

mod btf;
use btf::btf_structs;

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
    let s = btf_structs(POLICY_OBJECT);
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
