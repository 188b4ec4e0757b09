//! `#[repr(C)]` mirrors of `bpf/lb.h`. Sizes are asserted at compile time;
//! `tests/btf_layout.rs` checks every field offset against the BTF that
//! clang emitted for the C structs.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use membrane_lb::maglev::BackendState;
use membrane_lb::service::{L3n4Addr, Protocol};

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

pub const ALG_RANDOM: u8 = 0;
pub const ALG_MAGLEV: u8 = 1;

pub const BACKEND_ACTIVE: u8 = 0;
pub const BACKEND_TERMINATING: u8 = 1;
pub const BACKEND_QUARANTINED: u8 = 2;
pub const BACKEND_MAINTENANCE: u8 = 3;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;

/// Names of the maps, as pinned under the pin directory.
pub const MAP_SERVICES: &str = "lb_services";
pub const MAP_BACKENDS: &str = "lb_backends";
pub const MAP_SLOTS: &str = "lb_slots";
pub const MAP_MAGLEV: &str = "lb_maglev";
pub const MAP_CT: &str = "lb_ct";
pub const MAP_RNAT: &str = "lb_rnat";
pub const MAP_AFFINITY: &str = "lb_affinity";
pub const MAP_STATS: &str = "lb_stats";
/// Frontend → local proxy listener (value laid out as [`RnatValue`]).
pub const MAP_REDIRECT: &str = "lb_redirect";
/// Mark (under [`PROXY_MARK_MASK`]) on packets assigned to a local proxy
/// socket; they must be routed to the local table (see `LB_PROXY_MARK`).
pub const PROXY_MARK: u32 = 0x0e00;
pub const PROXY_MARK_MASK: u32 = 0x0f00;
/// Local endpoints (pod address → host-side device) for eBPF host routing.
pub const MAP_ENDPOINTS: &str = "lb_endpoints";
/// Socket LB: socket cookie + backend → service (bpf/sock.c).
pub const MAP_SOCK_REV: &str = "lb_sock_rev";
/// Counts the per-packet path uses to skip lookups that cannot hit
/// (`LB_CFG_*` in bpf/lb.h).
pub const MAP_CONFIG: &str = "lb_config";
/// [`MAP_CONFIG`] index: entries in `lb_redirect`.
pub const CFG_REDIRECTS: u32 = 0;
/// [`MAP_CONFIG`] index: entries in `lb_snat_dev`.
pub const CFG_SNAT_DEVS: u32 = 1;
/// [`EpValue::flags`]: deliver through the host device's egress hook.
pub const EP_F_EGRESS_HOOK: u32 = 1;
pub const ALL_MAPS: [&str; 12] = [
    MAP_SERVICES,
    MAP_BACKENDS,
    MAP_SLOTS,
    MAP_MAGLEV,
    MAP_CT,
    MAP_RNAT,
    MAP_AFFINITY,
    MAP_STATS,
    MAP_REDIRECT,
    MAP_ENDPOINTS,
    MAP_SOCK_REV,
    MAP_CONFIG,
];

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SvcKey {
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SvcValue {
    pub svc_id: u32,
    pub count: u32,
    pub affinity_timeout: u32,
    pub algorithm: u8,
    pub flags: u8,
    pub pad: u16,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SlotKey {
    pub svc_id: u32,
    pub slot: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BackendValue {
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
    pub state: u8,
    pub pad: [u8; 3],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Tuple {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub pad: [u8; 2],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CtValue {
    pub backend_id: u32,
    pub svc_id: u32,
    pub last_seen: u64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RnatValue {
    pub addr: [u8; 16],
    pub port: u16,
    pub pad: [u8; 2],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct AffinityKey {
    pub addr: [u8; 16],
    pub svc_id: u32,
    pub family: u8,
    pub pad: [u8; 3],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub pad: u32,
    pub last_seen: u64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct EpKey {
    pub addr: [u8; 16],
    pub family: u8,
    pub pad: [u8; 3],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EpValue {
    /// Host-side device of the endpoint.
    pub ifindex: u32,
    /// [`EP_F_EGRESS_HOOK`].
    pub flags: u32,
    /// The pod's MAC; all zero = leave the frame's MACs alone.
    pub mac: [u8; 6],
    /// The host side's MAC.
    pub node_mac: [u8; 6],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SockRevKey {
    pub cookie: u64,
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    pub family: u8,
    pub pad: [u8; 5],
}

// Sizes the C side has (checked against BTF in tests/btf_layout.rs).
const _: () = assert!(size_of::<SvcKey>() == 20);
const _: () = assert!(size_of::<SvcValue>() == 16);
const _: () = assert!(size_of::<SlotKey>() == 8);
const _: () = assert!(size_of::<BackendValue>() == 24);
const _: () = assert!(size_of::<Tuple>() == 40);
const _: () = assert!(size_of::<CtValue>() == 16);
const _: () = assert!(size_of::<RnatValue>() == 20);
const _: () = assert!(size_of::<AffinityKey>() == 24);
const _: () = assert!(size_of::<AffinityValue>() == 16);
const _: () = assert!(size_of::<EpKey>() == 20);
const _: () = assert!(size_of::<EpValue>() == 20);
const _: () = assert!(size_of::<SockRevKey>() == 32);

// SAFETY: all of these are #[repr(C)], Copy, made only of integers and
// integer arrays, with explicit padding fields: every bit pattern is valid
// and there are no implicit padding bytes.
unsafe impl aya::Pod for SvcKey {}
unsafe impl aya::Pod for SvcValue {}
unsafe impl aya::Pod for SlotKey {}
unsafe impl aya::Pod for BackendValue {}
unsafe impl aya::Pod for Tuple {}
unsafe impl aya::Pod for CtValue {}
unsafe impl aya::Pod for RnatValue {}
unsafe impl aya::Pod for AffinityKey {}
unsafe impl aya::Pod for AffinityValue {}
unsafe impl aya::Pod for EpKey {}
unsafe impl aya::Pod for EpValue {}
unsafe impl aya::Pod for SockRevKey {}

/// Address in the 16-byte form the maps use (IPv4 in the first 4 bytes).
pub fn addr_bytes(a: IpAddr) -> ([u8; 16], u8) {
    let mut out = [0u8; 16];
    match a {
        IpAddr::V4(v4) => {
            out[..4].copy_from_slice(&v4.octets());
            (out, FAMILY_V4)
        }
        IpAddr::V6(v6) => (v6.octets(), FAMILY_V6),
    }
}

pub fn addr_from_bytes(b: &[u8; 16], family: u8) -> Option<IpAddr> {
    match family {
        FAMILY_V4 => Some(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))),
        FAMILY_V6 => Some(IpAddr::V6(Ipv6Addr::from(*b))),
        _ => None,
    }
}

pub fn proto_num(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => IPPROTO_TCP,
        Protocol::Udp => IPPROTO_UDP,
        Protocol::Sctp => IPPROTO_SCTP,
    }
}

pub fn proto_from_num(n: u8) -> Option<Protocol> {
    match n {
        IPPROTO_TCP => Some(Protocol::Tcp),
        IPPROTO_UDP => Some(Protocol::Udp),
        IPPROTO_SCTP => Some(Protocol::Sctp),
        _ => None,
    }
}

pub fn state_num(s: BackendState) -> u8 {
    match s {
        BackendState::Active => BACKEND_ACTIVE,
        BackendState::Terminating => BACKEND_TERMINATING,
        BackendState::Quarantined => BACKEND_QUARANTINED,
        BackendState::Maintenance => BACKEND_MAINTENANCE,
    }
}

pub fn state_from_num(n: u8) -> BackendState {
    match n {
        BACKEND_TERMINATING => BackendState::Terminating,
        BACKEND_QUARANTINED => BackendState::Quarantined,
        BACKEND_MAINTENANCE => BackendState::Maintenance,
        _ => BackendState::Active,
    }
}

impl SvcKey {
    pub fn from_l3n4(a: &L3n4Addr) -> Self {
        let (addr, family) = addr_bytes(a.addr);
        SvcKey {
            addr,
            port: a.port.to_be(),
            proto: proto_num(a.proto),
            family,
        }
    }

    pub fn to_l3n4(&self) -> Option<L3n4Addr> {
        Some(L3n4Addr::new(
            addr_from_bytes(&self.addr, self.family)?,
            u16::from_be(self.port),
            proto_from_num(self.proto)?,
        ))
    }
}

impl BackendValue {
    pub fn new(a: &L3n4Addr, state: BackendState) -> Self {
        let (addr, family) = addr_bytes(a.addr);
        BackendValue {
            addr,
            port: a.port.to_be(),
            proto: proto_num(a.proto),
            family,
            state: state_num(state),
            pad: [0; 3],
        }
    }

    pub fn to_l3n4(&self) -> Option<L3n4Addr> {
        Some(L3n4Addr::new(
            addr_from_bytes(&self.addr, self.family)?,
            u16::from_be(self.port),
            proto_from_num(self.proto)?,
        ))
    }
}

/// Indices of `lb_stats`, mirrored from `LB_STAT_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u32)]
pub enum Stat {
    FwdNew = 0,
    FwdEstablished = 1,
    RevNat = 2,
    DropNoBackend = 3,
    DropBackendMissing = 4,
    DropRewrite = 5,
    DropMalformed = 6,
    AffinityHit = 7,
    Reselect = 8,
    Redirect = 9,
    DropNoListener = 10,
    HostRoutePeer = 11,
    HostRouteEgress = 12,
    HostRouteFib = 13,
    SockTranslate = 14,
    SockRev = 15,
}

impl Stat {
    pub const ALL: [Stat; 16] = [
        Stat::FwdNew,
        Stat::FwdEstablished,
        Stat::RevNat,
        Stat::DropNoBackend,
        Stat::DropBackendMissing,
        Stat::DropRewrite,
        Stat::DropMalformed,
        Stat::AffinityHit,
        Stat::Reselect,
        Stat::Redirect,
        Stat::DropNoListener,
        Stat::HostRoutePeer,
        Stat::HostRouteEgress,
        Stat::HostRouteFib,
        Stat::SockTranslate,
        Stat::SockRev,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stat::FwdNew => "forward_new",
            Stat::FwdEstablished => "forward_established",
            Stat::RevNat => "reverse_nat",
            Stat::DropNoBackend => "drop_no_backend",
            Stat::DropBackendMissing => "drop_backend_missing",
            Stat::DropRewrite => "drop_rewrite",
            Stat::DropMalformed => "malformed",
            Stat::AffinityHit => "affinity_hit",
            Stat::Reselect => "reselect",
            Stat::Redirect => "redirect_to_proxy",
            Stat::DropNoListener => "drop_no_proxy_listener",
            Stat::HostRoutePeer => "host_route_redirect_peer",
            Stat::HostRouteEgress => "host_route_redirect_egress_hook",
            Stat::HostRouteFib => "host_route_fib",
            Stat::SockTranslate => "sock_translate",
            Stat::SockRev => "sock_reverse",
        }
    }
}
