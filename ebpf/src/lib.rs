//! Membrane's eBPF service load balancer.
//!
//! `bpf/lb.c` (compiled by clang in build.rs) is a tc ingress program for
//! the host side of pod veths and for external devices. It DNATs packets
//! for service frontends to a backend chosen by random slots or Cilium's
//! Maglev table, keeps established flows on their backend through a
//! conntrack map, reverse-NATs the replies and counts drops by reason.
//! [`Datapath`] loads it with aya, pins maps and TCX links under a pin
//! directory (so forwarding survives an agent restart) and syncs maps from a
//! [`membrane_lb::service::DesiredState`] by writing only differences.
//!
//! With eBPF host routing (the default when the kernel has the helpers) the
//! tc program also forwards what it translated, and pod traffic in general,
//! itself: `bpf_redirect_peer` to a local endpoint (`lb_endpoints`), else
//! `bpf_fib_lookup` + `bpf_redirect_neigh`. [`sock::SockLb`] (`bpf/sock.c`)
//! is the socket LB for host-network processes.
//!
//! `bpf/policy.c` enforces L3/L4 policy on both hooks of a pod's host-side
//! device; [`policy::PolicyDatapath`] loads it and syncs its ipcache and
//! per-endpoint entries from [`membrane_policy`] (see docs/policy.md).

pub mod datapath;
pub mod maps;
pub mod policy;
pub mod snat;
pub mod sock;

pub use datapath::{
    BackendStatus, DEFAULT_PIN_DIR, Datapath, DatapathConfig, DatapathError, HostRouting,
    LB_OBJECT, PROGRAM_NAME, ServiceStatus, SyncReport, check_bpffs, probe_host_routing,
};
pub use maps::{PROXY_MARK, PROXY_MARK_MASK, Stat};
pub use policy::{PolicyConfig, PolicyDatapath, PolicyDatapathError, PolicyStat, PolicySyncReport};
pub use sock::{DEFAULT_CGROUP_ROOT, SOCK_OBJECT, SockLb, SockLbError};
