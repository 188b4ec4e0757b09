//! Routes to other nodes' pod CIDRs, in the node's namespace.
//!
//! - Native routing: `CIDR via <node InternalIP>`; the underlay carries pod
//!   addresses as they are.
//! - Tunnel (VXLAN): a device `cilium_vxlan` (UDP port as configured,
//!   learning off) whose MAC is derived from the node's InternalIP, so no
//!   node has to publish it. Per remote node: a permanent neighbour entry
//!   (its InternalIP → its derived MAC) and a static FDB entry (that MAC →
//!   its InternalIP); per remote pod CIDR `CIDR via <InternalIP> dev
//!   cilium_vxlan onlink`. The kernel encapsulates; the remote node accepts
//!   the frame (its own MAC) and routes the inner packet to the pod. IPv6
//!   pod CIDRs go through the same tunnel to the node's IPv4 address (the
//!   underlay stays IPv4, as Cilium's): IPv6 routes cannot take an IPv4
//!   next hop (the kernel refuses `RTA_VIA`), so each node also gets a
//!   link-local next hop derived from its address ([`tunnel_gw6`]) with a
//!   permanent neighbour entry to the same MAC. This
//!   keeps the datapath's programs unchanged (no tunnel keys in tc), and
//!   `ip route` / `bridge fdb` show the state.
//!
//! Every route carries [`ROUTE_PROTOCOL`], so a restarted agent finds the
//! ones it installed before and removes those no longer wanted.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use membrane_ipam::Cidr;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteScope,
};
use rtnetlink::{Handle, LinkVxlan, RouteMessageBuilder};
use tracing::{info, warn};

use crate::EndpointError;
use crate::netlink::{self, is_exists, is_not_found};

/// The VXLAN device (Cilium's name).
pub const TUNNEL_DEVICE: &str = "cilium_vxlan";
/// VNI of the tunnel. Cilium puts the source identity there; Membrane
/// carries no identity in the tunnel, so one fixed VNI.
pub const TUNNEL_VNI: u32 = 2;
/// VXLAN overhead (outer IPv4 + UDP + VXLAN + inner Ethernet).
pub const TUNNEL_OVERHEAD: u32 = 50;
/// `ip route` protocol of Membrane's node routes (shown as `proto 77`).
pub const ROUTE_PROTOCOL: u8 = 77;

/// How pod CIDRs of other nodes are reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteMode {
    Native,
    /// VXLAN from `local` (this node's InternalIP) on UDP `port`.
    Tunnel {
        local: Ipv4Addr,
        port: u16,
    },
}

/// One remote pod CIDR and the node holding it. In tunnel mode `node_ip`
/// is the node's IPv4 address (the tunnel endpoint) for IPv6 CIDRs too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PeerRoute {
    pub cidr: Cidr,
    pub node_ip: IpAddr,
}

impl PeerRoute {
    /// The route's gateway: the node's address, or through the tunnel for
    /// an IPv6 CIDR behind an IPv4 endpoint, the node's derived link-local
    /// next hop.
    pub fn next_hop(&self, tunnel: bool) -> IpAddr {
        match (self.cidr.addr(), self.node_ip) {
            (IpAddr::V6(_), IpAddr::V4(ip)) if tunnel => IpAddr::V6(tunnel_gw6(ip)),
            _ => self.node_ip,
        }
    }
}

/// The tunnel MAC of the node with InternalIP `ip`: locally administered,
/// unicast, the address's four bytes last.
pub fn tunnel_mac(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x0a, 0x4d, o[0], o[1], o[2], o[3]]
}

/// The IPv6 next hop through the tunnel of the node with InternalIP `ip`:
/// link-local (valid on `cilium_vxlan` only) and carrying the address, so
/// like the MAC it needs no publishing. Differs from the device's own
/// EUI-64 link-local address, which has `ff:fe` in the middle.
pub fn tunnel_gw6(ip: Ipv4Addr) -> Ipv6Addr {
    let o = ip.octets();
    Ipv6Addr::new(
        0xfe80,
        0,
        0,
        0,
        0,
        0x0a4d,
        u16::from_be_bytes([o[0], o[1]]),
        u16::from_be_bytes([o[2], o[3]]),
    )
}

fn kernel(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> EndpointError {
    let what = what.into();
    move |e| EndpointError::Kernel {
        what,
        why: e.to_string(),
    }
}

/// Devices Membrane creates (pod veths, the gateway pair, the tunnel):
/// their addresses are never the node's.
fn is_membrane_device(name: &str) -> bool {
    name.starts_with("lxc") || name.starts_with("membrane_") || name.starts_with("cilium_")
}

/// The node's address: the first global address of the device holding the
/// IPv4 default route, else the first global address (IPv4 first) of any
/// device but Membrane's own.
pub async fn detect_node_ip(h: &Handle) -> Result<Option<IpAddr>, EndpointError> {
    let default_oif = netlink::routes(h, false)
        .await?
        .into_iter()
        .find(|(dst, len, _, oif, _)| dst.is_none() && *len == 0 && oif.is_some())
        .and_then(|r| r.3);
    let addrs: Vec<(u32, String, IpAddr)> = global_addrs(h)
        .await?
        .into_iter()
        .filter(|(_, name, _)| !is_membrane_device(name))
        .collect();
    if let Some(oif) = default_oif
        && let Some((_, _, a)) = addrs.iter().find(|(i, _, a)| *i == oif && a.is_ipv4())
    {
        return Ok(Some(*a));
    }
    Ok(addrs
        .iter()
        .find(|(_, _, a)| a.is_ipv4())
        .or_else(|| addrs.first())
        .map(|(_, _, a)| *a))
}

/// The node's addresses, at most one per family, IPv4 first: IPv4 as
/// [`detect_node_ip`] picks it; IPv6 the first global address of the
/// device holding the IPv6 default route, else of the IPv4 one, else of
/// any device but Membrane's own.
pub async fn detect_node_ips(h: &Handle) -> Result<Vec<IpAddr>, EndpointError> {
    let mut out = Vec::new();
    if let Some(v4) = detect_node_ip(h).await?.filter(IpAddr::is_ipv4) {
        out.push(v4);
    }
    let mut default_oifs = [None, None];
    for (slot, v6) in default_oifs.iter_mut().zip([true, false]) {
        *slot = netlink::routes(h, v6)
            .await?
            .into_iter()
            .find(|(dst, len, _, oif, _)| dst.is_none() && *len == 0 && oif.is_some())
            .and_then(|r| r.3);
    }
    let [v6_oif, v4_oif] = default_oifs;
    let addrs: Vec<(u32, IpAddr)> = global_addrs(h)
        .await?
        .into_iter()
        .filter(|(_, name, a)| !is_membrane_device(name) && a.is_ipv6())
        .map(|(i, _, a)| (i, a))
        .collect();
    let on =
        |oif: Option<u32>| oif.and_then(|o| addrs.iter().find(|(i, _)| *i == o).map(|(_, a)| *a));
    if let Some(v6) = on(v6_oif)
        .or_else(|| on(v4_oif))
        .or_else(|| addrs.first().map(|(_, a)| *a))
    {
        out.push(v6);
    }
    Ok(out)
}

/// (ifindex, device name, address) of every global unicast address.
async fn global_addrs(h: &Handle) -> Result<Vec<(u32, String, IpAddr)>, EndpointError> {
    let links: Vec<_> = h
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(kernel("listing links"))?;
    let names: BTreeMap<u32, String> = links
        .iter()
        .filter_map(|l| {
            l.attributes.iter().find_map(|a| match a {
                netlink_packet_route::link::LinkAttribute::IfName(n) => {
                    Some((l.header.index, n.clone()))
                }
                _ => None,
            })
        })
        .collect();
    let msgs: Vec<_> = h
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(kernel("listing addresses"))?;
    Ok(msgs
        .iter()
        .flat_map(|m| {
            let name = names.get(&m.header.index).cloned().unwrap_or_default();
            m.attributes.iter().filter_map(move |a| match a {
                AddressAttribute::Address(ip) if is_global(ip) => {
                    Some((m.header.index, name.clone(), *ip))
                }
                _ => None,
            })
        })
        .collect())
}

fn is_global(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => !a.is_loopback() && !a.is_link_local() && !a.is_unspecified(),
        IpAddr::V6(a) => {
            !a.is_loopback() && !a.is_unspecified() && (a.segments()[0] & 0xffc0) != 0xfe80
        }
    }
}

/// The name of the device holding `ip`, if any.
pub async fn device_of(h: &Handle, ip: IpAddr) -> Result<Option<String>, EndpointError> {
    Ok(global_addrs(h)
        .await?
        .into_iter()
        .find(|(_, _, a)| *a == ip)
        .map(|(_, n, _)| n))
}

/// Installs and removes the routes to other nodes.
pub struct Router {
    handle: Handle,
    mode: RouteMode,
    /// The tunnel device's index (tunnel mode).
    tunnel_index: Option<u32>,
    /// Remote node addresses with neighbour + FDB entries (tunnel mode).
    tunnel_peers: BTreeSet<Ipv4Addr>,
}

impl Router {
    /// Connect and, in tunnel mode, create `cilium_vxlan` (an existing one
    /// is kept, so a restarted agent does not interrupt traffic).
    pub async fn start(mode: RouteMode) -> Result<Router, EndpointError> {
        let handle = netlink::connect()?;
        let mut r = Router {
            handle,
            mode,
            tunnel_index: None,
            tunnel_peers: BTreeSet::new(),
        };
        match mode {
            RouteMode::Tunnel { local, port } => {
                r.tunnel_index = Some(r.ensure_tunnel(local, port).await?);
            }
            // Switched from tunnel mode: Membrane's old device (its MAC
            // says so) goes, and every route through it.
            RouteMode::Native => {
                let ours = netlink::link_by_name(&r.handle, TUNNEL_DEVICE)
                    .await?
                    .and_then(|l| netlink::mac_of(&l))
                    .is_some_and(|m| m.starts_with("0a:4d:"));
                if ours && netlink::delete_link(&r.handle, TUNNEL_DEVICE).await? {
                    info!(
                        device = TUNNEL_DEVICE,
                        "tunnel device of an earlier run removed"
                    );
                }
            }
        }
        Ok(r)
    }

    pub fn tunnel_index(&self) -> Option<u32> {
        self.tunnel_index
    }

    async fn ensure_tunnel(&self, local: Ipv4Addr, port: u16) -> Result<u32, EndpointError> {
        let h = &self.handle;
        let mac = tunnel_mac(local);
        if let Some(l) = netlink::link_by_name(h, TUNNEL_DEVICE).await? {
            // Same address: ours, from before a restart. Anything else
            // (another local address or a device of someone else's) is
            // replaced.
            if netlink::mac_of(&l).as_deref() == Some(mac_str(&mac).as_str()) {
                netlink::set_up(h, l.header.index).await?;
                return Ok(l.header.index);
            }
            netlink::delete_link(h, TUNNEL_DEVICE).await?;
        }
        let msg = LinkVxlan::new(TUNNEL_DEVICE, TUNNEL_VNI)
            .port(port)
            .local(local)
            .learning(false)
            .address(mac.to_vec())
            .up()
            .build();
        h.link().add(msg).execute().await.map_err(kernel(format!(
            "creating {TUNNEL_DEVICE} (VXLAN port {port})"
        )))?;
        let l = netlink::link_by_name(h, TUNNEL_DEVICE)
            .await?
            .ok_or_else(|| EndpointError::Kernel {
                what: format!("creating {TUNNEL_DEVICE}"),
                why: "device missing right after creation".into(),
            })?;
        info!(device = TUNNEL_DEVICE, port, %local, "tunnel device created");
        Ok(l.header.index)
    }

    fn route_msg(&self, p: &PeerRoute) -> RouteMessage {
        let mut m = match (p.cidr.addr(), p.next_hop(self.tunnel_index.is_some())) {
            (IpAddr::V4(d), IpAddr::V4(g)) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(d, p.cidr.prefix())
                .gateway(g)
                .scope(RouteScope::Universe)
                .build(),
            (IpAddr::V6(d), IpAddr::V6(g)) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(d, p.cidr.prefix())
                .gateway(g)
                .scope(RouteScope::Universe)
                .build(),
            // Filtered out by the caller (families must match).
            (IpAddr::V4(d), _) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(d, p.cidr.prefix())
                .build(),
            (IpAddr::V6(d), _) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(d, p.cidr.prefix())
                .build(),
        };
        m.header.protocol = RouteProtocol::Other(ROUTE_PROTOCOL);
        if let Some(i) = self.tunnel_index {
            m.attributes.push(RouteAttribute::Oif(i));
            // The IPv4 endpoint is on no subnet of the device; the IPv6
            // next hop is link-local, which needs no `onlink`.
            if p.cidr.addr().is_ipv4() {
                m.header.flags |= RouteFlags::Onlink;
            }
        }
        m
    }

    /// Routes installed by Membrane (this or an earlier run): destination
    /// CIDR → (gateway, output device).
    pub async fn installed(
        &self,
    ) -> Result<BTreeMap<Cidr, (Option<IpAddr>, Option<u32>)>, EndpointError> {
        let mut out = BTreeMap::new();
        for v6 in [false, true] {
            let msg = if v6 {
                RouteMessageBuilder::<Ipv6Addr>::new().build()
            } else {
                RouteMessageBuilder::<Ipv4Addr>::new().build()
            };
            let all: Vec<RouteMessage> = self
                .handle
                .route()
                .get(msg)
                .execute()
                .try_collect()
                .await
                .map_err(kernel("listing routes"))?;
            for m in all {
                if m.header.protocol != RouteProtocol::Other(ROUTE_PROTOCOL) {
                    continue;
                }
                let mut dst = None;
                let mut gw = None;
                let mut oif = None;
                for a in &m.attributes {
                    match a {
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        RouteAttribute::Destination(RouteAddress::Inet(d)) => {
                            dst = Some(IpAddr::V4(*d))
                        }
                        RouteAttribute::Destination(RouteAddress::Inet6(d)) => {
                            dst = Some(IpAddr::V6(*d))
                        }
                        RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = Some(IpAddr::V4(*g)),
                        RouteAttribute::Gateway(RouteAddress::Inet6(g)) => {
                            gw = Some(IpAddr::V6(*g))
                        }
                        _ => {}
                    }
                }
                if let Some(d) = dst
                    && let Ok(c) = Cidr::new(d, m.header.destination_prefix_length)
                {
                    out.insert(c, (gw, oif));
                }
            }
        }
        Ok(out)
    }

    /// Make the kernel hold exactly `wanted` (plus, in tunnel mode, the
    /// neighbour and FDB entries of their nodes). Idempotent; routes of
    /// earlier runs that are no longer wanted go.
    pub async fn apply(&mut self, wanted: &BTreeSet<PeerRoute>) -> Result<(), EndpointError> {
        let installed = self.installed().await?;
        let mut first_err = None;
        for (cidr, (gw, _)) in &installed {
            if wanted.iter().any(|p| p.cidr == *cidr) {
                continue;
            }
            let p = PeerRoute {
                cidr: *cidr,
                node_ip: gw.unwrap_or(cidr.addr()),
            };
            let mut m = self.route_msg(&p);
            // Delete by destination and protocol whatever its next hop.
            m.attributes
                .retain(|a| matches!(a, RouteAttribute::Destination(_)));
            m.header.flags = RouteFlags::empty();
            if let Err(e) = netlink::del_route(&self.handle, m, &cidr.to_string()).await {
                first_err.get_or_insert(e);
            } else {
                info!(%cidr, "route to a node removed");
            }
        }
        if let Some(index) = self.tunnel_index {
            let peers: BTreeSet<Ipv4Addr> = wanted
                .iter()
                .filter_map(|p| match p.node_ip {
                    IpAddr::V4(a) => Some(a),
                    IpAddr::V6(_) => None,
                })
                .collect();
            for ip in &peers {
                // The IPv6 next hop only for a node with IPv6 CIDRs: a
                // host without IPv6 has no neighbour table for it.
                let v6 = wanted
                    .iter()
                    .any(|p| p.node_ip == IpAddr::V4(*ip) && !p.cidr.addr().is_ipv4());
                if let Err(e) = self.add_tunnel_peer(index, *ip, v6).await {
                    first_err.get_or_insert(e);
                }
            }
            let gone: Vec<Ipv4Addr> = self.tunnel_peers.difference(&peers).copied().collect();
            for ip in gone {
                self.del_tunnel_peer(index, ip).await;
            }
            self.tunnel_peers = peers;
        }
        for p in wanted {
            // Already there: same next hop (through the tunnel device in
            // tunnel mode).
            if let Some((gw, oif)) = installed.get(&p.cidr)
                && *gw == Some(p.next_hop(self.tunnel_index.is_some()))
                && (self.tunnel_index.is_none() || *oif == self.tunnel_index)
            {
                continue;
            }
            let m = self.route_msg(p);
            match netlink::replace_route(&self.handle, m, &p.cidr.to_string()).await {
                Ok(()) => info!(cidr = %p.cidr, via = %p.node_ip, "route to a node"),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn add_tunnel_peer(
        &self,
        index: u32,
        ip: Ipv4Addr,
        v6: bool,
    ) -> Result<(), EndpointError> {
        let mac = tunnel_mac(ip);
        // The IPv4 endpoint for IPv4 routes, the derived link-local next
        // hop for IPv6 ones; both resolve to the node's MAC.
        let gw6 = v6.then(|| IpAddr::V6(tunnel_gw6(ip)));
        for gw in std::iter::once(IpAddr::V4(ip)).chain(gw6) {
            self.handle
                .neighbours()
                .add(index, gw)
                .link_layer_address(&mac)
                .replace()
                .execute()
                .await
                .map_err(kernel(format!("neighbour {gw} on {TUNNEL_DEVICE}")))?;
        }
        let mut fdb = self
            .handle
            .neighbours()
            .add_bridge(index, &mac)
            .destination(IpAddr::V4(ip))
            .replace();
        fdb.message_mut().header.flags = NeighbourFlags::Own;
        match fdb.execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_exists(&e) => Ok(()),
            Err(e) => Err(kernel(format!("FDB entry {} → {ip}", mac_str(&mac)))(e)),
        }
    }

    async fn del_tunnel_peer(&self, index: u32, ip: Ipv4Addr) {
        let mac = tunnel_mac(ip);
        for gw in [IpAddr::V4(ip), IpAddr::V6(tunnel_gw6(ip))] {
            let mut neigh = self.handle.neighbours().add(index, gw);
            let msg = neigh.message_mut().clone();
            if let Err(e) = self.handle.neighbours().del(msg).execute().await
                && !is_not_found(&e)
            {
                warn!(%gw, error = %e, "removing a tunnel neighbour");
            }
        }
        let mut fdb = self.handle.neighbours().add_bridge(index, &mac);
        let mut msg = fdb.message_mut().clone();
        msg.header.flags = NeighbourFlags::Own;
        msg.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
        msg.header.family = AddressFamily::Bridge;
        if let Err(e) = self.handle.neighbours().del(msg).execute().await
            && !is_not_found(&e)
        {
            warn!(%ip, error = %e, "removing a tunnel FDB entry");
        }
    }

    /// Remove every route this module installed and the tunnel device
    /// (its neighbour and FDB entries go with it).
    pub async fn stop(mut self) -> Result<(), EndpointError> {
        self.tunnel_peers.clear();
        let routes = self.apply(&BTreeSet::new()).await;
        if self.mode != RouteMode::Native {
            netlink::delete_link(&self.handle, TUNNEL_DEVICE).await?;
            info!(device = TUNNEL_DEVICE, "tunnel device removed");
        }
        routes
    }
}

fn mac_str(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnel_mac_is_local_unicast_and_carries_the_address() {
        let m = tunnel_mac(Ipv4Addr::new(192, 0, 2, 7));
        assert_eq!(m[0] & 0x01, 0, "unicast");
        assert_eq!(m[0] & 0x02, 0x02, "locally administered");
        assert_eq!(&m[2..], &[192, 0, 2, 7]);
        assert_eq!(mac_str(&m), "0a:4d:c0:00:02:07");
    }

    #[test]
    fn ipv6_through_the_tunnel_takes_the_derived_link_local_next_hop() {
        let gw = tunnel_gw6(Ipv4Addr::new(192, 0, 2, 7));
        assert_eq!(gw.to_string(), "fe80::a4d:c000:207");
        assert!(gw.is_unicast_link_local());
        let node_ip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
        let v6 = PeerRoute {
            cidr: "fd00::/120".parse().expect("cidr"),
            node_ip,
        };
        assert_eq!(v6.next_hop(true), IpAddr::V6(gw));
        assert_eq!(v6.next_hop(false), node_ip);
        let v4 = PeerRoute {
            cidr: "10.0.1.0/24".parse().expect("cidr"),
            node_ip,
        };
        assert_eq!(v4.next_hop(true), node_ip);
    }
}
