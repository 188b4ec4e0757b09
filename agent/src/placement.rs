//! Where listeners listen. In `up` mode (no eBPF datapath) a CEC listener
//! that `spec.services` points at binds the LoadBalancer address of that
//! Service on its ports — the effect Cilium gets by redirecting the VIP to
//! the proxy port. Other address-less listeners get a proxy port on loopback.
//!
//! With the eBPF datapath (transparent mode) the listener gets a proxy port
//! instead, as in Cilium, and is transparent: the Service's frontends
//! (LoadBalancer address and ClusterIPs, on the Service's own ports) become
//! VIPs that the tc program assigns to the listener's socket without
//! rewriting the packets ([`redirect_targets`]), so Envoy sees the original
//! destination as the connection's local address.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use envoy_types::pb::google::protobuf::BoolValue;
use k8s_openapi::api::core::v1::Service;
use membrane_crds::EnvoyConfigSpec;
use membrane_store::StoreSnapshot;

use crate::cec::ParsedCec;
use crate::envoy_pb::*;
use crate::lb_ipam::lb_ip;
use crate::ports::ProxyPorts;

/// The ClusterIPs of a Service (none for headless Services).
pub fn cluster_ips(svc: &Service) -> Vec<std::net::IpAddr> {
    let Some(spec) = svc.spec.as_ref() else {
        return Vec::new();
    };
    let mut out: Vec<std::net::IpAddr> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .filter_map(|ip| ip.parse().ok())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Port overrides for the well-known HTTP ports (`--http-port`/`--https-port`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortMap {
    pub http: u16,
    pub https: u16,
    /// The eBPF datapath redirects frontends to listeners: listeners named
    /// by `spec.services` get a transparent proxy port instead of binding
    /// the frontends, which keep their own ports.
    pub transparent: bool,
}

impl Default for PortMap {
    fn default() -> Self {
        Self {
            http: 80,
            https: 443,
            transparent: false,
        }
    }
}

impl PortMap {
    pub fn map(&self, port: u16) -> u16 {
        match port {
            80 => self.http,
            443 => self.https,
            p => p,
        }
    }
}

/// The frontends each listener (by local name) must bind.
pub fn frontends(
    snap: &StoreSnapshot,
    cec_namespace: &str,
    spec: &EnvoyConfigSpec,
    parsed: &ParsedCec,
    ports: PortMap,
) -> BTreeMap<String, Vec<(String, u16)>> {
    let mut out: BTreeMap<String, Vec<(String, u16)>> = BTreeMap::new();
    let Some(first) = parsed.listeners.first() else {
        return out;
    };
    for entry in &spec.services {
        let ns = if entry.namespace.is_empty() {
            cec_namespace
        } else {
            &entry.namespace
        };
        let Some(svc) = snap.get_typed::<Service>(ns, &entry.name) else {
            continue;
        };
        let lb = lb_ip(svc);
        let cips = if ports.transparent {
            cluster_ips(svc)
        } else {
            Vec::new()
        };
        if lb.is_none() && cips.is_empty() {
            continue;
        }
        let svc_ports: Vec<u16> = if entry.ports.is_empty() {
            svc.spec
                .iter()
                .flat_map(|s| s.ports.iter().flatten())
                .filter_map(|p| u16::try_from(p.port).ok())
                .collect()
        } else {
            entry.ports.clone()
        };
        let listener = if entry.listener.is_empty() {
            first.local_name.clone()
        } else {
            entry.listener.clone()
        };
        let binds = out.entry(listener).or_default();
        for p in svc_ports {
            // Bound directly, the LB address takes the mapped port (the
            // up-mode contract); as a redirected VIP it keeps the Service
            // port, which is the destination the packets carry.
            let lb_port = if ports.transparent { p } else { ports.map(p) };
            let want = lb
                .map(|ip| (ip.to_string(), lb_port))
                .into_iter()
                .chain(cips.iter().map(|ip| (ip.to_string(), p)));
            for bind in want {
                if !binds.contains(&bind) {
                    binds.push(bind);
                }
            }
        }
    }
    out
}

/// Give every address-less listener its addresses. Returns the listener
/// index (in `spec.resources`) that could not be placed, if any.
pub fn place(
    parsed: &mut ParsedCec,
    binds: &BTreeMap<String, Vec<(String, u16)>>,
    proxy_ports: &mut ProxyPorts,
    reserved: &BTreeSet<u16>,
    transparent: bool,
) -> Result<(), (usize, String)> {
    for pl in &mut parsed.listeners {
        if !pl.needs_address {
            continue;
        }
        let addrs: Vec<Address> = match binds.get(&pl.local_name) {
            Some(b) if !b.is_empty() && transparent => {
                let Some(port) = proxy_ports.port_for(&pl.listener.name, reserved) else {
                    return Err((pl.index, "no free proxy port left".into()));
                };
                // Connections assigned to it keep the VIP as local address,
                // which need not be local: it answers from it
                // (IP_TRANSPARENT). Bound to the wildcard address, as in
                // Cilium, because Envoy reports a specifically bound
                // listener's address as every connection's local address
                // instead of the original destination.
                pl.listener.transparent = Some(BoolValue { value: true });
                pl.listener.freebind = Some(BoolValue { value: true });
                let mut a = vec![socket_address("0.0.0.0", port)];
                if b.iter().any(|(ip, _)| ip.contains(':')) {
                    a.push(socket_address("::", port));
                }
                a
            }
            Some(b) if !b.is_empty() => b
                .iter()
                .map(|(ip, port)| socket_address(ip, *port))
                .collect(),
            _ => {
                let Some(port) = proxy_ports.port_for(&pl.listener.name, reserved) else {
                    return Err((pl.index, "no free proxy port left".into()));
                };
                vec![socket_address("127.0.0.1", port)]
            }
        };
        let mut addrs = addrs.into_iter();
        pl.listener.address = addrs.next();
        pl.listener.additional_addresses = addrs
            .map(|a| AdditionalAddress {
                address: Some(a),
                ..Default::default()
            })
            .collect();
    }
    Ok(())
}

/// In transparent mode, where the eBPF program delivers each frontend of a
/// placed CEC: `(VIP, port) → the listener's proxy address` of the same
/// family. Empty otherwise.
pub fn redirect_targets(
    parsed: &ParsedCec,
    binds: &BTreeMap<String, Vec<(String, u16)>>,
    transparent: bool,
) -> Vec<(SocketAddr, SocketAddr)> {
    let mut out = Vec::new();
    if !transparent {
        return out;
    }
    for pl in &parsed.listeners {
        let Some(fes) = binds.get(&pl.local_name) else {
            continue;
        };
        let own: Vec<SocketAddr> = pl
            .listener
            .address
            .iter()
            .chain(
                pl.listener
                    .additional_addresses
                    .iter()
                    .filter_map(|a| a.address.as_ref()),
            )
            .filter_map(ip_port)
            .filter_map(|(ip, port)| {
                // The program looks the listener up by a concrete address;
                // loopback finds the wildcard listener.
                let ip = match ip.parse::<IpAddr>().ok()? {
                    IpAddr::V4(a) if a.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
                    IpAddr::V6(a) if a.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
                    a => a,
                };
                Some(SocketAddr::new(ip, u16::try_from(port).ok()?))
            })
            .collect();
        for (ip, port) in fes {
            let Ok(ip) = ip.parse::<IpAddr>() else {
                continue;
            };
            if let Some(to) = own.iter().find(|a| a.is_ipv4() == ip.is_ipv4()) {
                out.push((SocketAddr::new(ip, *port), *to));
            }
        }
    }
    out
}

/// Every `(ip, port)` the listeners of a CEC listen on.
pub fn bound_addresses(parsed: &ParsedCec) -> Vec<(usize, String, String, u32)> {
    let mut out = Vec::new();
    for pl in &parsed.listeners {
        let all = pl.listener.address.iter().chain(
            pl.listener
                .additional_addresses
                .iter()
                .filter_map(|a| a.address.as_ref()),
        );
        for addr in all {
            if let Some((ip, port)) = ip_port(addr) {
                out.push((pl.index, pl.listener.name.clone(), ip, port));
            }
        }
    }
    out
}

/// Two binds collide when the ports match and either address is the
/// wildcard or both are the same address.
pub fn collides(a_ip: &str, a_port: u32, b_ip: &str, b_port: u32) -> bool {
    let wildcard = |ip: &str| ip == "0.0.0.0" || ip == "::" || ip.is_empty();
    a_port == b_port && a_port != 0 && (a_ip == b_ip || wildcard(a_ip) || wildcard(b_ip))
}
