//! The agent side of `membrane-cni`: for every ADD a veth pair (host side
//! `lxc<hash>`, peer moved into the container's namespace), a /32 (and
//! /128) from the node's pod CIDRs, routes through the node's gateway, the
//! datapath's programs on the host side and an endpoint registered before
//! ADD returns; DEL, CHECK, GC and STATUS as the CNI spec defines them.
//!
//! [`Manager`] does the work; [`serve`] answers the plugin on a unix socket.

mod manager;
pub mod netlink;
pub mod routing;
mod server;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use membrane_cni::spec::{self, CniError, ErrorCode};
use membrane_ipam::Cidr;
use serde::{Deserialize, Serialize};

pub use manager::{Manager, host_ifname};
pub use server::serve;

/// Name of the host device holding the node's IPv4 gateway address (as
/// Cilium's `cilium_host`).
pub const HOST_DEVICE: &str = "membrane_host";
/// Its veth peer (as `cilium_net`).
pub const HOST_PEER_DEVICE: &str = "membrane_net";

/// How the endpoint manager runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// Holds `ipam.json` and `endpoints.json`, which survive restarts.
    pub state_dir: PathBuf,
    pub node_name: String,
    /// The node's pod CIDRs (one per family at most is used for gateways).
    pub pod_cidrs: Vec<Cidr>,
    /// MTU of pod interfaces unless the network configuration sets one.
    pub mtu: u32,
    /// After DEL, leave an `unreachable` route for the old address until it
    /// is reused (Cilium's `--unreachable-routes`).
    pub unreachable_routes: bool,
}

/// What the agent adds around an endpoint's life: Pod labels from the
/// store, the datapath's programs on the host interface.
pub trait Hooks: Send + Sync {
    /// Labels of Pod `namespace/name`, if the store has it.
    fn pod_labels(&self, _namespace: &str, _name: &str) -> Option<BTreeMap<String, String>> {
        None
    }
    /// Attach the datapath to a new endpoint's host interface.
    fn attach(&self, _host_ifname: &str) -> Result<(), String> {
        Ok(())
    }
    /// Detach from a removed endpoint's host interface.
    fn detach(&self, _host_ifname: &str) {}
    /// The endpoint is complete and about to be registered: whatever must
    /// hold from its first packet (policy) is programmed here, before ADD
    /// returns. An error fails the ADD (and rolls it back).
    fn ready(&self, _endpoint: &Endpoint) -> Result<(), String> {
        Ok(())
    }
    /// After a restart: an endpoint whose host interface is still there
    /// (the datapath was attached again); registrations keyed by its
    /// addresses (host routing) are renewed here.
    fn restored(&self, _endpoint: &Endpoint) {}
}

/// No hooks (tests, or an agent without datapath and store).
pub struct NoHooks;
impl Hooks for NoHooks {}

/// One pod interface Membrane set up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub id: u64,
    pub container_id: String,
    pub ifname: String,
    pub netns: String,
    pub pod_namespace: String,
    pub pod_name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub addrs: Vec<IpAddr>,
    pub host_ifname: String,
    #[serde(default)]
    pub host_mac: String,
    #[serde(default)]
    pub mac: String,
    pub mtu: u32,
    pub node: String,
    /// `ready` once ADD finished.
    pub state: String,
    /// The CNI result body ADD returned (without `cniVersion`).
    #[serde(default)]
    pub result: serde_json::Value,
}

impl Endpoint {
    /// `namespace/name` of the pod.
    pub fn pod(&self) -> String {
        format!("{}/{}", self.pod_namespace, self.pod_name)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("network namespace {path}: {why}")]
    Netns { path: PathBuf, why: String },
    #[error("{what}: {why}")]
    Kernel { what: String, why: String },
    #[error(transparent)]
    Ipam(#[from] membrane_ipam::IpamError),
    #[error("endpoint state {path}: {why}")]
    State { path: PathBuf, why: String },
    #[error("{0}: the agent is stopping")]
    Unavailable(String),
    #[error("CHECK: {0}")]
    Check(String),
    #[error("container {0} has no endpoint here")]
    Unknown(String),
    #[error("datapath: attaching to {ifname}: {why}")]
    Datapath { ifname: String, why: String },
}

impl EndpointError {
    /// The CNI error the plugin prints.
    pub fn to_cni(&self) -> CniError {
        let code = match self {
            EndpointError::Netns { .. } => ErrorCode::ContainerUnknown,
            EndpointError::Kernel { .. } | EndpointError::Datapath { .. } => {
                ErrorCode::Plugin(spec::CODE_KERNEL)
            }
            EndpointError::Ipam(membrane_ipam::IpamError::Exhausted { .. })
            | EndpointError::Ipam(membrane_ipam::IpamError::NoPool { .. }) => {
                ErrorCode::Plugin(spec::CODE_POOL_EXHAUSTED)
            }
            EndpointError::Ipam(_) | EndpointError::State { .. } => ErrorCode::Io,
            EndpointError::Check(_) => ErrorCode::Plugin(spec::CODE_CHECK_FAILED),
            EndpointError::Unknown(_) => ErrorCode::ContainerUnknown,
            EndpointError::Unavailable(_) => ErrorCode::TryAgainLater,
        };
        CniError::new(code, self.to_string())
    }
}
