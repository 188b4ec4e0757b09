//! Where listeners listen. In `up` mode (no eBPF datapath) a CEC listener
//! that `spec.services` points at binds the LoadBalancer address of that
//! Service on its ports — the effect Cilium gets by redirecting the VIP to
//! the proxy port. Other address-less listeners get a proxy port on loopback.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Service;
use membrane_crds::EnvoyConfigSpec;
use membrane_store::StoreSnapshot;

use crate::cec::ParsedCec;
use crate::envoy_pb::*;
use crate::lb_ipam::lb_ip;
use crate::ports::ProxyPorts;

/// Port overrides for the well-known HTTP ports (`--http-port`/`--https-port`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortMap {
    pub http: u16,
    pub https: u16,
}

impl Default for PortMap {
    fn default() -> Self {
        Self {
            http: 80,
            https: 443,
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
        let Some(ip) = lb_ip(svc) else {
            continue;
        };
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
            let bind = (ip.to_string(), ports.map(p));
            if !binds.contains(&bind) {
                binds.push(bind);
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
) -> Result<(), (usize, String)> {
    for pl in &mut parsed.listeners {
        if !pl.needs_address {
            continue;
        }
        let addrs: Vec<Address> = match binds.get(&pl.local_name) {
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
