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
    /// `--node-ip`, at most one per family; empty: detected.
    pub node_ips: Vec<IpAddr>,
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
    #[error("--routing-mode tunnel needs an IPv4 node address (--node-ip), got {0:?}")]
    TunnelNeedsIpv4(Vec<IpAddr>),
    #[error("--node-ip: {0} and {1} are of one family; give at most one IPv4 and one IPv6 address")]
    SameFamily(IpAddr, IpAddr),
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

/// `spec.addresses` as the agent writes it (Cilium's shape; one
/// `InternalIP` per family).
pub fn addresses_value(ips: &[IpAddr]) -> serde_json::Value {
    ips.iter()
        .map(|ip| serde_json::json!({"type": "InternalIP", "ip": ip.to_string()}))
        .collect()
}

/// The routes this node should have: every other node's pod CIDRs.
/// Native: via the node's InternalIP of the CIDR's family, when this node
/// (`local`) has an address of that family too (the underlay carries that
/// family). Tunnel: via the node's IPv4 InternalIP, for IPv4 and IPv6
/// CIDRs alike (the tunnel's underlay is IPv4, as Cilium's).
pub fn peer_routes(
    snap: &StoreSnapshot,
    own_node: &str,
    mode: RoutingMode,
    local: &[IpAddr],
) -> BTreeSet<PeerRoute> {
    plan(snap, own_node, mode, local).0
}

/// [`peer_routes`], and the remote CIDRs left without a route, each with
/// the reason (logged when that set changes).
fn plan(
    snap: &StoreSnapshot,
    own_node: &str,
    mode: RoutingMode,
    local: &[IpAddr],
) -> (BTreeSet<PeerRoute>, BTreeSet<String>) {
    let mut out = BTreeSet::new();
    let mut unrouted = BTreeSet::new();
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
            let v4 = cidr.addr().is_ipv4();
            let via = match mode {
                RoutingMode::Tunnel => ips
                    .iter()
                    .find(|ip| ip.is_ipv4())
                    .copied()
                    .ok_or("the node has no IPv4 InternalIP (the tunnel endpoint)"),
                // As Cilium's direct node routes: a family goes to the
                // node's address of that family, or nowhere. The underlay
                // must carry the family: an IPv6 route needs an IPv6 next
                // hop on a subnet this node is on.
                RoutingMode::Native if !local.iter().any(|ip| ip.is_ipv4() == v4) => {
                    Err("this node has no InternalIP of the family")
                }
                RoutingMode::Native => ips
                    .iter()
                    .find(|ip| ip.is_ipv4() == v4)
                    .copied()
                    .ok_or("the node has no InternalIP of the family"),
            };
            match via {
                Ok(node_ip) => {
                    out.insert(PeerRoute { cidr, node_ip });
                }
                // A node without any address yet is still starting.
                Err(_) if ips.is_empty() => {}
                Err(why) => {
                    unrouted.insert(format!("{cidr} of {name}: {why}"));
                }
            }
        }
    }
    (out, unrouted)
}

/// The node's InternalIPs, IPv4 first: `--node-ip`, else detected (one
/// per family); empty when the node has no address of its own (then it can
/// only be a single node).
pub async fn node_ips(opts: &RoutingOptions) -> Result<Vec<IpAddr>, RoutingError> {
    if !opts.node_ips.is_empty() {
        let mut ips = opts.node_ips.clone();
        ips.sort_by_key(|ip| !ip.is_ipv4());
        // Sorted by family, two of one family are neighbours.
        if let Some(w) = ips.windows(2).find(|w| w[0].is_ipv4() == w[1].is_ipv4()) {
            return Err(RoutingError::SameFamily(w[0], w[1]));
        }
        return Ok(ips);
    }
    let h = membrane_endpoint::netlink::connect()?;
    Ok(membrane_endpoint::routing::detect_node_ips(&h).await?)
}

/// The node's primary InternalIP (IPv4 when it has one).
pub async fn node_ip(opts: &RoutingOptions) -> Result<Option<IpAddr>, RoutingError> {
    Ok(node_ips(opts).await?.first().copied())
}

/// Create what the mode needs (the tunnel device), attach the datapath
/// where replies of remote backends and NodePort traffic arrive (the
/// device holding the node address, the tunnel device), and keep the
/// routes in step with the CiliumNodes until `shutdown`; then remove them.
pub async fn start(
    opts: &RoutingOptions,
    node_ips: Vec<IpAddr>,
    own_node: String,
    store: Store,
    datapath: Option<Arc<DatapathHandle>>,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, RoutingError> {
    let mode = match opts.mode {
        RoutingMode::Native => RouteMode::Native,
        RoutingMode::Tunnel => match node_ips.iter().find_map(|ip| match ip {
            IpAddr::V4(a) => Some(*a),
            IpAddr::V6(_) => None,
        }) {
            Some(local) => RouteMode::Tunnel {
                local,
                port: opts.tunnel_port,
            },
            None => return Err(RoutingError::TunnelNeedsIpv4(node_ips)),
        },
    };
    let router = Router::start(mode).await?;
    if let Some(dp) = &datapath {
        external_devices(dp, &node_ips, router.tunnel_index().is_some()).await?;
    }
    info!(mode = ?opts.mode, node_ips = ?node_ips, "routing to other nodes");
    Ok(tokio::spawn(follow(
        router, store, own_node, opts.mode, node_ips, datapath, shutdown,
    )))
}

/// The datapath on the devices where NodePort traffic and replies of
/// remote backends arrive (the device holding the node address, the tunnel
/// device), and those devices as the ones a NodePort flow to a remote
/// backend is SNATed through (to the node address).
async fn external_devices(
    dp: &DatapathHandle,
    node_ips: &[IpAddr],
    tunnel: bool,
) -> Result<(), RoutingError> {
    let h = membrane_endpoint::netlink::connect()?;
    // (device, the node address SNAT uses on it): IPv4 first, so a device
    // holding both families SNATs to the IPv4 address, as before.
    let mut devices: Vec<(String, IpAddr)> = Vec::new();
    for ip in node_ips {
        if let Some(d) = membrane_endpoint::routing::device_of(&h, *ip).await?
            && !devices.iter().any(|(n, _)| *n == d)
        {
            devices.push((d, *ip));
        }
    }
    if tunnel && let Some(ip) = node_ips.iter().find(|ip| ip.is_ipv4()) {
        devices.push((TUNNEL_DEVICE.to_string(), *ip));
    }
    let mut snat = std::collections::BTreeMap::new();
    for (d, node_ip) in devices {
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
    local: Vec<IpAddr>,
    datapath: Option<Arc<DatapathHandle>>,
    shutdown: CancellationToken,
) {
    let mut rx = store.subscribe();
    let mut applied: Option<BTreeSet<PeerRoute>> = None;
    let mut unrouted_seen = BTreeSet::new();
    let mut backoff = Duration::from_millis(200);
    loop {
        let (wanted, unrouted) = plan(&store.snapshot(), &own_node, mode, &local);
        // Said once per change, not on every pass.
        if unrouted != unrouted_seen {
            for u in unrouted.difference(&unrouted_seen) {
                warn!(cidr = %u, "no route to a pod CIDR of another node");
            }
            unrouted_seen = unrouted;
        }
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
        let ips: Vec<IpAddr> = ip.split(',').map(|i| i.parse().expect("ip")).collect();
        cn.spec
            .other
            .insert("addresses".into(), addresses_value(&ips));
        cn.spec.ipam.pod_cidrs = cidrs.iter().map(ToString::to_string).collect();
        Object::CiliumNode(cn)
    }

    #[test]
    fn routes_to_every_other_node_by_family() {
        let store = Store::new();
        store.apply(node("a", "192.0.2.1", &["10.213.0.0/24", "fd00::100/120"]));
        store.apply(node(
            "b",
            "192.0.2.2",
            &["10.213.1.0/24", "10.213.2.0/24", "fd00::/120"],
        ));
        // No address yet: nothing to route through.
        let mut c = CiliumNode::new("c", Default::default());
        c.spec.ipam.pod_cidrs = vec!["10.213.3.0/24".into()];
        store.apply(Object::CiliumNode(c));
        let route = |c: &str, ip: &str| PeerRoute {
            cidr: c.parse().expect("cidr"),
            node_ip: ip.parse().expect("ip"),
        };
        let v4: BTreeSet<PeerRoute> = ["10.213.1.0/24", "10.213.2.0/24"]
            .iter()
            .map(|c| route(c, "192.0.2.2"))
            .collect();
        let a4: Vec<IpAddr> = vec!["192.0.2.1".parse().expect("ip")];
        let snap = store.snapshot();
        // Native: node b has no IPv6 InternalIP, so its IPv6 CIDR has no
        // next hop (reported, not routed).
        let (got, unrouted) = plan(&snap, "a", RoutingMode::Native, &a4);
        assert_eq!(got, v4);
        assert_eq!(unrouted.len(), 1, "{unrouted:?}");
        assert!(unrouted.iter().all(|u| u.starts_with("fd00::/120 of b")));
        // Tunnel: IPv6 goes through the tunnel to the IPv4 endpoint.
        let mut tunnel = v4.clone();
        tunnel.insert(route("fd00::/120", "192.0.2.2"));
        assert_eq!(peer_routes(&snap, "a", RoutingMode::Tunnel, &a4), tunnel);

        // Both nodes dual-stack: native routes IPv6 via the IPv6 address.
        store.apply(node(
            "b",
            "192.0.2.2,2001:db8::2",
            &["10.213.1.0/24", "10.213.2.0/24", "fd00::/120"],
        ));
        let snap = store.snapshot();
        let mut native = v4.clone();
        native.insert(route("fd00::/120", "2001:db8::2"));
        let a46: Vec<IpAddr> = vec![
            "192.0.2.1".parse().expect("ip"),
            "2001:db8::1".parse().expect("ip"),
        ];
        assert_eq!(peer_routes(&snap, "a", RoutingMode::Native, &a46), native);
        // ...but not while this node has no IPv6 address itself.
        assert_eq!(peer_routes(&snap, "a", RoutingMode::Native, &a4), v4);
        assert_eq!(peer_routes(&snap, "a", RoutingMode::Tunnel, &a46), tunnel);
    }

    #[tokio::test]
    async fn node_ips_are_one_per_family_ipv4_first() {
        let opts = |ips: &[&str]| RoutingOptions {
            mode: RoutingMode::Native,
            tunnel_protocol: TunnelProtocol::Vxlan,
            tunnel_port: 8472,
            node_ips: ips.iter().map(|i| i.parse().expect("ip")).collect(),
        };
        let got = node_ips(&opts(&["2001:db8::1", "192.0.2.1"]))
            .await
            .expect("two families");
        assert_eq!(
            got,
            ["192.0.2.1", "2001:db8::1"].map(|i| i.parse::<IpAddr>().expect("ip"))
        );
        assert!(matches!(
            node_ips(&opts(&["192.0.2.1", "192.0.2.2"])).await,
            Err(RoutingError::SameFamily(..))
        ));
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
            node_ips: Vec::new(),
        };
        assert_eq!(o.pod_mtu(1500), 1450);
    }
}
