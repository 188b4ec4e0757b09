//! Kubernetes Services + EndpointSlices → load-balancer frontends and backends.
//!
//! Pure translation, as Cilium's agent does it: every (frontend address, port,
//! protocol) becomes one [`ServiceEntry`] with its own backends, algorithm and
//! session affinity. Backend states come from EndpointSlice conditions plus
//! operator overrides (`quarantined`, `maintenance`), which win.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;

pub use crate::affinity::Affinity;
use crate::affinity::mesh_annotations;
pub use crate::maglev::Protocol;
use crate::maglev::{self, BackendState, DEFAULT_BACKEND_WEIGHT, MaglevBackend, MaglevConfig};

/// Cilium's per-service algorithm annotation.
pub const ANNOTATION_LB_ALGORITHM: &str = "service.cilium.io/lb-algorithm";
/// Label that ties an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Kubernetes' default ClientIP affinity timeout (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_SECS: u32 = 10_800;

/// Backend selection algorithm of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Algorithm {
    #[default]
    Random,
    Maglev,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Random => "random",
            Algorithm::Maglev => "maglev",
        }
    }
}

impl FromStr for Algorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "random" => Ok(Algorithm::Random),
            "maglev" => Ok(Algorithm::Maglev),
            _ => Err(format!(
                "unknown algorithm {s:?} (expected random or maglev)"
            )),
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// State names as `cilium service list` prints them.
pub fn state_str(s: BackendState) -> &'static str {
    match s {
        BackendState::Active => "active",
        BackendState::Terminating => "terminating",
        BackendState::Quarantined => "quarantined",
        BackendState::Maintenance => "maintenance",
    }
}

/// Parses `active|terminating|quarantined|maintenance`.
pub fn parse_state(s: &str) -> Result<BackendState, String> {
    match s.to_ascii_lowercase().as_str() {
        "active" => Ok(BackendState::Active),
        "terminating" => Ok(BackendState::Terminating),
        "quarantined" => Ok(BackendState::Quarantined),
        "maintenance" => Ok(BackendState::Maintenance),
        _ => Err(format!(
            "unknown backend state {s:?} (expected active, terminating, quarantined or maintenance)"
        )),
    }
}

/// An L3/L4 address: what identifies a frontend or a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct L3n4Addr {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Protocol,
}

impl L3n4Addr {
    pub fn new(addr: IpAddr, port: u16, proto: Protocol) -> Self {
        L3n4Addr { addr, port, proto }
    }
}

impl fmt::Display for L3n4Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}/{}", self.port, self.proto),
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{}", self.port, self.proto),
        }
    }
}

/// How a frontend is exposed, as in `cilium service list`'s Type column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrontendType {
    ClusterIP,
    NodePort,
    LoadBalancer,
    ExternalIPs,
}

impl FrontendType {
    pub fn as_str(self) -> &'static str {
        match self {
            FrontendType::ClusterIP => "ClusterIP",
            FrontendType::NodePort => "NodePort",
            FrontendType::LoadBalancer => "LoadBalancer",
            FrontendType::ExternalIPs => "ExternalIPs",
        }
    }
}

/// One backend of a frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backend {
    pub addr: L3n4Addr,
    pub state: BackendState,
    pub weight: u16,
    /// Cluster Mesh cluster id of the backend; 0 = this cluster.
    pub cluster_id: u32,
}

/// `namespace/name` of a Kubernetes Service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One frontend with everything the datapath needs to balance it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceEntry {
    pub name: ServiceName,
    /// The Service port's name ("" when unnamed).
    pub port_name: String,
    pub frontend: L3n4Addr,
    pub kind: FrontendType,
    /// Sorted by address; never two with the same address.
    pub backends: Vec<Backend>,
    pub algorithm: Algorithm,
    /// ClientIP session affinity timeout in seconds; `None` = no affinity.
    pub affinity_timeout: Option<u32>,
    /// Cluster Mesh affinity of a global service ([`Affinity::None`] otherwise).
    pub affinity: Affinity,
}

impl ServiceEntry {
    /// Backends new flows may be sent to: the active ones, or the
    /// terminating ones while none is active (Cilium's graceful termination).
    /// Quarantined and maintenance backends never are; weight 0 is maintenance.
    /// With a Cluster Mesh affinity, only the preferred cluster's backends
    /// while one of them is active; otherwise every cluster's.
    pub fn selectable(&self) -> Vec<&Backend> {
        let healthy = |b: &Backend| b.state == BackendState::Active && b.weight > 0;
        if self.affinity != Affinity::None
            && self
                .backends
                .iter()
                .any(|b| healthy(b) && self.affinity.prefers(b.cluster_id))
        {
            return self
                .backends
                .iter()
                .filter(|b| healthy(b) && self.affinity.prefers(b.cluster_id))
                .collect();
        }
        let pick = |s: BackendState| -> Vec<&Backend> {
            self.backends
                .iter()
                .filter(|b| b.state == s && b.weight > 0)
                .collect()
        };
        let active = pick(BackendState::Active);
        if active.is_empty() {
            pick(BackendState::Terminating)
        } else {
            active
        }
    }

    /// Whether `cluster mesh affinity` prefers this backend (what
    /// `service list --clustermesh-affinity` marks `(preferred)`).
    pub fn is_preferred(&self, b: &Backend) -> bool {
        self.affinity.prefers(b.cluster_id)
    }

    /// Cilium's Maglev table for this frontend, with `id` naming each backend.
    /// Empty when no backend is selectable.
    pub fn maglev_table(&self, cfg: &MaglevConfig, id: impl Fn(&L3n4Addr) -> u32) -> Vec<u32> {
        let mb: Vec<MaglevBackend> = self
            .selectable()
            .into_iter()
            .map(|b| MaglevBackend {
                addr: b.addr.addr,
                port: b.addr.port,
                proto: b.addr.proto,
                cluster_id: b.cluster_id,
                weight: b.weight,
                // Participation was decided above; Maglev hashes every
                // participant as active, as Cilium does.
                state: BackendState::Active,
                id: id(&b.addr),
            })
            .collect();
        maglev::lookup_table(cfg, &mb)
    }
}

/// What the datapath should hold: every frontend, sorted by frontend.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub services: Vec<ServiceEntry>,
}

impl DesiredState {
    pub fn get(&self, frontend: &L3n4Addr) -> Option<&ServiceEntry> {
        self.services
            .binary_search_by(|s| s.frontend.cmp(frontend))
            .ok()
            .and_then(|i| self.services.get(i))
    }
}

/// Node-level settings of the translation.
#[derive(Debug, Clone, Default)]
pub struct LbConfig {
    /// Algorithm of services without the annotation (`--bpf-lb-algorithm`).
    pub default_algorithm: Algorithm,
    /// Addresses NodePort frontends are exposed on.
    pub node_addresses: Vec<IpAddr>,
}

/// Operator-set backend states (`membrane service update --states`); they
/// override what EndpointSlices say.
pub type BackendOverrides = BTreeMap<L3n4Addr, BackendState>;

/// A problem with one Service; the rest still translates.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Service {service}: {field}: {message}")]
pub struct ServiceError {
    pub service: ServiceName,
    pub field: String,
    pub message: String,
}

/// Result of [`translate`]: the state plus per-object problems.
#[derive(Debug, Clone, Default)]
pub struct Translation {
    pub state: DesiredState,
    pub errors: Vec<ServiceError>,
}

fn service_name(svc: &Service) -> ServiceName {
    ServiceName {
        namespace: svc
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name: svc.metadata.name.clone().unwrap_or_default(),
    }
}

fn proto_of(p: Option<&String>) -> Result<Protocol, String> {
    match p {
        None => Ok(Protocol::Tcp),
        Some(s) => s.parse(),
    }
}

fn u16_port(p: i32) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| *p != 0)
}

/// Translates Services and EndpointSlices into frontends and backends.
pub fn translate(
    services: &[Service],
    slices: &[EndpointSlice],
    cfg: &LbConfig,
    overrides: &BackendOverrides,
) -> Translation {
    let mut slices_by_svc: BTreeMap<ServiceName, Vec<&EndpointSlice>> = BTreeMap::new();
    for s in slices {
        let Some(svc) = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_SERVICE_NAME))
        else {
            continue;
        };
        let key = ServiceName {
            namespace: s
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            name: svc.clone(),
        };
        slices_by_svc.entry(key).or_default().push(s);
    }

    let mut out = Translation::default();
    let mut seen: BTreeSet<L3n4Addr> = BTreeSet::new();
    for svc in services {
        let name = service_name(svc);
        let empty = Vec::new();
        let svc_slices = slices_by_svc.get(&name).unwrap_or(&empty);
        let before = out.state.services.len();
        translate_one(svc, &name, svc_slices, cfg, overrides, &mut out);
        // Two Services claiming one frontend: the first (in input order) keeps
        // it, the later one is reported rather than silently shadowing.
        let mut kept = Vec::new();
        for e in out.state.services.drain(before..) {
            if seen.insert(e.frontend) {
                kept.push(e);
            } else {
                out.errors.push(ServiceError {
                    service: name.clone(),
                    field: "spec".into(),
                    message: format!("frontend {} is already used by another Service", e.frontend),
                });
            }
        }
        out.state.services.extend(kept);
    }
    out.state.services.sort_by_key(|e| e.frontend);
    out
}

fn translate_one(
    svc: &Service,
    name: &ServiceName,
    slices: &[&EndpointSlice],
    cfg: &LbConfig,
    overrides: &BackendOverrides,
    out: &mut Translation,
) {
    let err = |field: &str, message: String| ServiceError {
        service: name.clone(),
        field: field.into(),
        message,
    };
    let Some(spec) = svc.spec.as_ref() else {
        return;
    };
    let ty = spec.type_.as_deref().unwrap_or("ClusterIP");
    if ty == "ExternalName" {
        return;
    }

    let algorithm = match svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_LB_ALGORITHM))
    {
        None => cfg.default_algorithm,
        Some(v) => match v.parse() {
            Ok(a) => a,
            Err(e) => {
                out.errors.push(err(
                    &format!("metadata.annotations[{ANNOTATION_LB_ALGORITHM}]"),
                    format!("{e}; using {}", cfg.default_algorithm),
                ));
                cfg.default_algorithm
            }
        },
    };

    let (mesh, problems) = mesh_annotations(svc.metadata.annotations.as_ref());
    for p in problems {
        out.errors.push(err(&p.field, p.message));
    }
    let affinity = mesh.affinity;

    let affinity_timeout = if spec.session_affinity.as_deref() == Some("ClientIP") {
        let t = spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds);
        match t {
            None => Some(DEFAULT_AFFINITY_TIMEOUT_SECS),
            Some(t) if t > 0 => Some(t as u32),
            Some(t) => {
                out.errors.push(err(
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    format!("{t} is not positive; using {DEFAULT_AFFINITY_TIMEOUT_SECS}"),
                ));
                Some(DEFAULT_AFFINITY_TIMEOUT_SECS)
            }
        }
    } else {
        None
    };

    // clusterIPs lists both families of a dual-stack Service; clusterIP is
    // the primary one and only used when clusterIPs is absent.
    let mut cluster_ips: Vec<&String> = spec.cluster_ips.iter().flatten().collect();
    if cluster_ips.is_empty() {
        cluster_ips.extend(spec.cluster_ip.iter());
    }
    let mut vips: Vec<(IpAddr, FrontendType)> = Vec::new();
    for (i, ip) in cluster_ips.iter().enumerate() {
        if ip.as_str() == "None" || ip.is_empty() {
            continue; // headless
        }
        match ip.parse::<IpAddr>() {
            Ok(a) => vips.push((a, FrontendType::ClusterIP)),
            Err(_) => out.errors.push(err(
                &format!("spec.clusterIPs[{i}]"),
                format!("{ip:?} is not an IP address"),
            )),
        }
    }
    for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
        match ip.parse::<IpAddr>() {
            Ok(a) => vips.push((a, FrontendType::ExternalIPs)),
            Err(_) => out.errors.push(err(
                &format!("spec.externalIPs[{i}]"),
                format!("{ip:?} is not an IP address"),
            )),
        }
    }
    if ty == "LoadBalancer" {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|l| l.ingress.as_ref());
        for (i, ing) in ingress.into_iter().flatten().enumerate() {
            let Some(ip) = ing.ip.as_ref() else { continue };
            match ip.parse::<IpAddr>() {
                Ok(a) => vips.push((a, FrontendType::LoadBalancer)),
                Err(_) => out.errors.push(err(
                    &format!("status.loadBalancer.ingress[{i}].ip"),
                    format!("{ip:?} is not an IP address"),
                )),
            }
        }
    }
    let node_port_type = ty == "NodePort" || ty == "LoadBalancer";

    for (pi, sp) in spec.ports.iter().flatten().enumerate() {
        let proto = match proto_of(sp.protocol.as_ref()) {
            Ok(p) => p,
            Err(e) => {
                out.errors
                    .push(err(&format!("spec.ports[{pi}].protocol"), e));
                continue;
            }
        };
        let Some(port) = u16_port(sp.port) else {
            out.errors.push(err(
                &format!("spec.ports[{pi}].port"),
                format!("{} is not a valid port", sp.port),
            ));
            continue;
        };
        let v4 = backends_for(sp, proto, slices, false, overrides);
        let v6 = backends_for(sp, proto, slices, true, overrides);
        let entry = |addr: IpAddr, port: u16, kind: FrontendType| ServiceEntry {
            name: name.clone(),
            port_name: sp.name.clone().unwrap_or_default(),
            frontend: L3n4Addr::new(addr, port, proto),
            kind,
            backends: if addr.is_ipv6() {
                v6.clone()
            } else {
                v4.clone()
            },
            algorithm,
            affinity_timeout,
            affinity,
        };
        for (vip, kind) in &vips {
            out.state.services.push(entry(*vip, port, *kind));
        }
        if node_port_type && let Some(np) = sp.node_port {
            match u16_port(np) {
                Some(np) => {
                    for a in &cfg.node_addresses {
                        out.state
                            .services
                            .push(entry(*a, np, FrontendType::NodePort));
                    }
                }
                None => out.errors.push(err(
                    &format!("spec.ports[{pi}].nodePort"),
                    format!("{np} is not a valid port"),
                )),
            }
        }
    }
}

/// Backends of one Service port in one address family. EndpointSlice ports
/// match the Service port by name (both empty for a single unnamed port) and
/// protocol; the slice port's number is the backend port.
fn backends_for(
    sp: &ServicePort,
    proto: Protocol,
    slices: &[&EndpointSlice],
    v6: bool,
    overrides: &BackendOverrides,
) -> Vec<Backend> {
    let want_name = sp.name.as_deref().unwrap_or("");
    let mut out: BTreeMap<L3n4Addr, Backend> = BTreeMap::new();
    for s in slices {
        let family_ok = match s.address_type.as_str() {
            "IPv4" => !v6,
            "IPv6" => v6,
            _ => false, // FQDN slices have nothing to balance to
        };
        if !family_ok {
            continue;
        }
        let Some(port) = s.ports.iter().flatten().find_map(|p| {
            let same_name = p.name.as_deref().unwrap_or("") == want_name;
            let same_proto = proto_of(p.protocol.as_ref()).ok() == Some(proto);
            if same_name && same_proto {
                p.port.and_then(u16_port)
            } else {
                None
            }
        }) else {
            continue;
        };
        for ep in s.endpoints.iter().flatten() {
            let c = ep.conditions.as_ref();
            // nil conditions mean "ready" to every consumer (kube-proxy too).
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            let serving = c.and_then(|c| c.serving).unwrap_or(ready);
            let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
            let state = if terminating {
                if !serving {
                    continue;
                }
                BackendState::Terminating
            } else if ready {
                BackendState::Active
            } else {
                continue;
            };
            for a in &ep.addresses {
                let Ok(ip) = a.parse::<IpAddr>() else {
                    continue;
                };
                if ip.is_ipv6() != v6 {
                    continue;
                }
                let key = L3n4Addr::new(ip, port, proto);
                let state = overrides.get(&key).copied().unwrap_or(state);
                out.entry(key).or_insert(Backend {
                    addr: key,
                    state,
                    weight: DEFAULT_BACKEND_WEIGHT,
                    cluster_id: 0,
                });
            }
        }
    }
    out.into_values().collect()
}

#[cfg(test)]
mod tests;
