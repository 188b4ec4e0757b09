//! Local global Services → Cilium `ClusterService`s (pure).

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use membrane_lb::affinity::mesh_annotations;
use membrane_lb::service::LABEL_SERVICE_NAME;

use crate::types::{ClusterService, L4Addr, PortConfiguration};

/// The `ClusterService` this cluster shares for `svc`, or `None` when it is
/// not shared: not global, `shared: "false"` (its backends stay private;
/// Cilium removes the key), or headless/ExternalName.
pub fn cluster_service(
    svc: &Service,
    slices: &[EndpointSlice],
    cluster: &str,
    cluster_id: u32,
) -> Option<ClusterService> {
    let (mesh, _) = mesh_annotations(svc.metadata.annotations.as_ref());
    if !mesh.global || !mesh.shared {
        return None;
    }
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let namespace = svc
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = svc.metadata.name.clone()?;

    let mut ports = PortConfiguration::new();
    for p in spec.ports.iter().flatten() {
        let Ok(port) = u16::try_from(p.port) else {
            continue;
        };
        ports.insert(
            p.name.clone().unwrap_or_default(),
            L4Addr {
                protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                port,
            },
        );
    }
    let mut cluster_ips: Vec<&String> = spec.cluster_ips.iter().flatten().collect();
    if cluster_ips.is_empty() {
        cluster_ips.extend(spec.cluster_ip.iter());
    }
    let mut frontends = BTreeMap::new();
    for ip in cluster_ips {
        if let Ok(a) = ip.parse::<IpAddr>() {
            frontends.insert(a.to_string(), ports.clone());
        }
    }

    let mut backends: BTreeMap<String, PortConfiguration> = BTreeMap::new();
    let mut hostnames = BTreeMap::new();
    for s in slices {
        let same_ns = s.metadata.namespace.as_deref().unwrap_or("default") == namespace;
        let owned = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_SERVICE_NAME))
            == Some(&name);
        if !same_ns || !owned || !(s.address_type == "IPv4" || s.address_type == "IPv6") {
            continue;
        }
        let mut slice_ports = PortConfiguration::new();
        for p in s.ports.iter().flatten() {
            let Some(port) = p.port.and_then(|p| u16::try_from(p).ok()) else {
                continue;
            };
            slice_ports.insert(
                p.name.clone().unwrap_or_default(),
                L4Addr {
                    protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                    port,
                },
            );
        }
        for ep in s.endpoints.iter().flatten() {
            let c = ep.conditions.as_ref();
            // Only ready, non-terminating endpoints are shared: a remote
            // cluster cannot tell their state.
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
            if !ready || terminating {
                continue;
            }
            for a in &ep.addresses {
                let Ok(ip) = a.parse::<IpAddr>() else {
                    continue;
                };
                let key = ip.to_string();
                backends
                    .entry(key.clone())
                    .or_default()
                    .extend(slice_ports.clone());
                if let Some(h) = &ep.hostname {
                    hostnames.insert(key, h.clone());
                }
            }
        }
    }

    Some(ClusterService {
        cluster: cluster.to_string(),
        namespace,
        name,
        frontends,
        backends,
        hostnames,
        zones: BTreeMap::new(),
        labels: svc.metadata.labels.clone().unwrap_or_default(),
        selector: spec.selector.clone().unwrap_or_default(),
        include_external: true,
        shared: true,
        cluster_id,
    })
}

/// Every shared global service of the local store, keyed by `ns/name`.
pub fn cluster_services(
    services: &[Service],
    slices: &[EndpointSlice],
    cluster: &str,
    cluster_id: u32,
) -> BTreeMap<String, ClusterService> {
    // Slices indexed by their Service once: linear in the store, not
    // services × slices.
    let mut by_svc: BTreeMap<(&str, &str), Vec<EndpointSlice>> = BTreeMap::new();
    for s in slices {
        if let Some(name) = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_SERVICE_NAME))
        {
            let ns = s.metadata.namespace.as_deref().unwrap_or("default");
            by_svc
                .entry((ns, name.as_str()))
                .or_default()
                .push(s.clone());
        }
    }
    let none = Vec::new();
    services
        .iter()
        .filter(|s| mesh_annotations(s.metadata.annotations.as_ref()).0.global)
        .filter_map(|s| {
            let ns = s.metadata.namespace.as_deref().unwrap_or("default");
            let name = s.metadata.name.as_deref().unwrap_or_default();
            let mine = by_svc.get(&(ns, name)).unwrap_or(&none);
            cluster_service(s, mine, cluster, cluster_id)
        })
        .map(|cs| (format!("{}/{}", cs.namespace, cs.name), cs))
        .collect()
}
