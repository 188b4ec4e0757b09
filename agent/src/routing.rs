//! Pods on other nodes: this node's routes to every other node's pod
//! CIDRs, learned from CiliumNodes (`spec.ipam.podCIDRs` and the
//! `InternalIP` in `spec.addresses`), as Cilium's `--routing-mode
//! native|tunnel`. The kernel side is `membrane_endpoint::routing`; this
//! module decides what should exist and keeps it so: reconciled on every
//! CiliumNode change, retried with a bounded backoff, rebuilt after a
//! restart (routes carry Membrane's protocol number), removed on shutdown.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use membrane_crds::CiliumNode;
use membrane_endpoint::routing::{PeerRoute, RouteMode, Router, TUNNEL_DEVICE, TUNNEL_OVERHEAD};
use membrane_store::{Store, StoreSnapshot};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::datapath::DatapathHandle;

/// How often routes are re-applied even without a CiliumNode change.
const RESYNC: Duration = Duration::from_secs(30);

/// `--routing-mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoutingMode {
    Native,
    Tunnel,
}

impl FromStr for RoutingMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "native" => Ok(RoutingMode::Native),
            "tunnel" => Ok(RoutingMode::Tunnel),
            other => Err(format!("{other:?}: expected native or tunnel")),
        }
    }
}

/// `--tunnel-protocol`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TunnelProtocol {
    Vxlan,
}

impl FromStr for TunnelProtocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "vxlan" => Ok(TunnelProtocol::Vxlan),
            "geneve" => Err("geneve: not supported yet; use vxlan".into()),
            other => Err(format!("{other:?}: expected vxlan")),
        }
    }
}

#[derive(Clone, Debug)]
pub struct RoutingOptions {
    pub mode: RoutingMode,
    pub tunnel_protocol: TunnelProtocol,
    /// UDP port of the tunnel (`--tunnel-port`, Cilium's 8472).
    pub tunnel_port: u16,
    /// `--node-ip`; `None`: detected.
    pub node_ip: Option<IpAddr>,
}

impl RoutingOptions {
    /// Pod MTU for a configured MTU: in tunnel mode the encapsulation's
    /// overhead is taken off, as Cilium does, so a full-size pod packet
    /// still fits the underlay once encapsulated.
    pub fn pod_mtu(&self, mtu: u32) -> u32 {
        match self.mode {
            RoutingMode::Native => mtu,
            RoutingMode::Tunnel => mtu.saturating_sub(TUNNEL_OVERHEAD),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error(transparent)]
    Kernel(#[from] membrane_endpoint::EndpointError),
    #[error("--routing-mode tunnel needs an IPv4 node address (--node-ip), got {0}")]
    TunnelNeedsIpv4(IpAddr),
}

/// The node's `InternalIP`s in a CiliumNode's `spec.addresses`.
pub fn internal_ips(cn: &CiliumNode) -> Vec<IpAddr> {
    cn.spec
        .other
        .get("addresses")
        .and_then(|a| a.as_array())
        .into_iter()
        .flatten()
        .filter(|a| a["type"] == "InternalIP")
        .filter_map(|a| a["ip"].as_str()?.parse().ok())
        .collect()
}

/// `spec.addresses` as the agent writes it (Cilium's shape).
pub fn addresses_value(ip: IpAddr) -> serde_json::Value {
    serde_json::json!([{"type": "InternalIP", "ip": ip.to_string()}])
}

/// The routes this node should have: every other node's pod CIDRs via its
/// InternalIP of the same family (tunnel mode: IPv4 only, the tunnel's
/// underlay family).
pub fn peer_routes(snap: &StoreSnapshot, own_node: &str, mode: RoutingMode) -> BTreeSet<PeerRoute> {
    let mut out = BTreeSet::new();
    for cn in snap.typed::<CiliumNode>(None) {
        let name = cn.metadata.name.as_deref().unwrap_or_default();
        if name == own_node {
            continue;
        }
        let ips = internal_ips(cn);
        for c in &cn.spec.ipam.pod_cidrs {
            let Ok(cidr) = c.parse::<membrane_ipam::Cidr>() else {
                continue;
            };
            let via = ips
                .iter()
                .find(|ip| ip.is_ipv4() == cidr.addr().is_ipv4())
                .copied();
            match via {
                Some(ip) if mode == RoutingMode::Tunnel && !ip.is_ipv4() => {}
                Some(node_ip) => {
                    out.insert(PeerRoute { cidr, node_ip });
                }
                None => {}
            }
        }
    }
    out
}

/// The node's InternalIP: `--node-ip`, else detected; `None` when the node
/// has no address of its own (then it can only be a single node).
pub async fn node_ip(opts: &RoutingOptions) -> Result<Option<IpAddr>, RoutingError> {
    if let Some(ip) = opts.node_ip {
        return Ok(Some(ip));
    }
    let h = membrane_endpoint::netlink::connect()?;
    Ok(membrane_endpoint::routing::detect_node_ip(&h).await?)
}

/// Create what the mode needs (the tunnel device), attach the datapath
/// where replies of remote backends and NodePort traffic arrive (the
/// device holding the node address, the tunnel device), and keep the
/// routes in step with the CiliumNodes until `shutdown`; then remove them.
pub async fn start(
    opts: &RoutingOptions,
    node_ip: IpAddr,
    own_node: String,
    store: Store,
    datapath: Option<Arc<DatapathHandle>>,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, RoutingError> {
    let mode = match opts.mode {
        RoutingMode::Native => RouteMode::Native,
        RoutingMode::Tunnel => match node_ip {
            IpAddr::V4(local) => RouteMode::Tunnel {
                local,
                port: opts.tunnel_port,
            },
            other => return Err(RoutingError::TunnelNeedsIpv4(other)),
        },
    };
    let router = Router::start(mode).await?;
    if let Some(dp) = &datapath {
        external_devices(dp, node_ip, router.tunnel_index().is_some()).await?;
    }
    info!(mode = ?opts.mode, %node_ip, "routing to other nodes");
    Ok(tokio::spawn(follow(
        router, store, own_node, opts.mode, datapath, shutdown,
    )))
}

/// The datapath on the devices where NodePort traffic and replies of
/// remote backends arrive (the device holding the node address, the tunnel
/// device), and those devices as the ones a NodePort flow to a remote
/// backend is SNATed through (to the node address).
async fn external_devices(
    dp: &DatapathHandle,
    node_ip: IpAddr,
    tunnel: bool,
) -> Result<(), RoutingError> {
    let h = membrane_endpoint::netlink::connect()?;
    let mut devices = Vec::new();
    if let Some(d) = membrane_endpoint::routing::device_of(&h, node_ip).await? {
        devices.push(d);
    }
    if tunnel {
        devices.push(TUNNEL_DEVICE.to_string());
    }
    let mut snat = std::collections::BTreeMap::new();
    for d in devices {
        if let Err(e) = dp.attach_device(&d) {
            warn!(device = %d, error = %e, "attaching the datapath");
            continue;
        }
        if let Some(l) = membrane_endpoint::netlink::link_by_name(&h, &d).await? {
            snat.insert(l.header.index, node_ip);
        }
    }
    if let Err(e) = membrane_ebpf::snat::set_snat_devices(dp.pin_dir(), &snat) {
        warn!(error = %e, "NodePort SNAT devices: NodePort to remote backends will not work");
    }
    Ok(())
}

async fn follow(
    mut router: Router,
    store: Store,
    own_node: String,
    mode: RoutingMode,
    datapath: Option<Arc<DatapathHandle>>,
    shutdown: CancellationToken,
) {
    let mut rx = store.subscribe();
    let mut applied: Option<BTreeSet<PeerRoute>> = None;
    let mut backoff = Duration::from_millis(200);
    loop {
        let wanted = peer_routes(&store.snapshot(), &own_node, mode);
        let mut retry = None;
        if applied.as_ref() != Some(&wanted) {
            match router.apply(&wanted).await {
                Ok(()) => {
                    applied = Some(wanted);
                    backoff = Duration::from_millis(200);
                }
                Err(e) => {
                    warn!(error = %e, retry_in = ?backoff, "routes to other nodes");
                    applied = None;
                    retry = Some(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
        // A periodic pass repairs routes someone else removed or changed.
        let sleep = tokio::time::sleep(retry.unwrap_or(RESYNC));
        tokio::select! {
            r = rx.changed() => if r.is_err() { break },
            _ = sleep => applied = None,
            _ = shutdown.cancelled() => break,
        }
        // Other changes than CiliumNodes find `wanted` unchanged.
    }
    if let Some(dp) = &datapath
        && router.tunnel_index().is_some()
    {
        // The device goes; so must the program's link pinned for it.
        dp.detach_device(TUNNEL_DEVICE);
    }
    match router.stop().await {
        Ok(()) => info!("routes to other nodes removed"),
        Err(e) => warn!(error = %e, "removing routes to other nodes"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use membrane_store::Object;

    fn node(name: &str, ip: &str, cidrs: &[&str]) -> Object {
        let mut cn = CiliumNode::new(name, Default::default());
        cn.spec
            .other
            .insert("addresses".into(), addresses_value(ip.parse().expect("ip")));
        cn.spec.ipam.pod_cidrs = cidrs.iter().map(ToString::to_string).collect();
        Object::CiliumNode(cn)
    }

    #[test]
    fn routes_to_every_other_node_by_family() {
        let store = Store::new();
        store.apply(node("a", "192.0.2.1", &["10.213.0.0/24"]));
        store.apply(node(
            "b",
            "192.0.2.2",
            &["10.213.1.0/24", "10.213.2.0/24", "fd00::/120"],
        ));
        // No address yet: nothing to route through.
        let mut c = CiliumNode::new("c", Default::default());
        c.spec.ipam.pod_cidrs = vec!["10.213.3.0/24".into()];
        store.apply(Object::CiliumNode(c));
        let got = peer_routes(&store.snapshot(), "a", RoutingMode::Native);
        let want: BTreeSet<PeerRoute> = ["10.213.1.0/24", "10.213.2.0/24"]
            .iter()
            .map(|c| PeerRoute {
                cidr: c.parse().expect("cidr"),
                node_ip: "192.0.2.2".parse().expect("ip"),
            })
            .collect();
        assert_eq!(got, want);
        assert_eq!(
            peer_routes(&store.snapshot(), "a", RoutingMode::Tunnel),
            want
        );
    }

    #[test]
    fn flags_parse_as_cilium_spells_them() {
        assert_eq!("native".parse::<RoutingMode>(), Ok(RoutingMode::Native));
        assert_eq!("tunnel".parse::<RoutingMode>(), Ok(RoutingMode::Tunnel));
        assert!("direct".parse::<RoutingMode>().is_err());
        assert!("geneve".parse::<TunnelProtocol>().is_err());
        let o = RoutingOptions {
            mode: RoutingMode::Tunnel,
            tunnel_protocol: TunnelProtocol::Vxlan,
            tunnel_port: 8472,
            node_ip: None,
        };
        assert_eq!(o.pod_mtu(1500), 1450);
    }
}
