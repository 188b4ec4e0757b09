//! Policies and endpoints from Kubernetes objects (as JSON values), and
//! the `membrane policy trace` report. Pure: callers read the files.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use serde_json::Value;

use crate::engine::{Cluster, Endpoint, NamedPort, Reason, State, Trace, TraceEnd, Verdict};
use crate::identity::Identities;
use crate::labels::POD_NAMESPACE_LABEL;
use crate::rules::{PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP, PolicySet};

/// Endpoint ids of the synthetic endpoints `--src`/`--dst` labels make.
const SYNTHETIC_SRC: u32 = u32::MAX - 1;
const SYNTHETIC_DST: u32 = u32::MAX - 2;

/// What a set of manifests holds for policy.
#[derive(Debug, Default)]
pub struct Manifests {
    pub cluster: Cluster,
    pub policies: PolicySet,
    /// Objects that could not be read, by kind/name.
    pub errors: Vec<String>,
}

impl Manifests {
    /// Reads Pods, Namespaces, CiliumNetworkPolicies,
    /// CiliumClusterwideNetworkPolicies and NetworkPolicies; other kinds
    /// are ignored. Lists (`kind: List`) are flattened.
    pub fn from_values(values: &[Value]) -> Manifests {
        let mut m = Manifests {
            cluster: Cluster {
                allow_localhost: true,
                ..Cluster::default()
            },
            ..Manifests::default()
        };
        let mut flat = Vec::new();
        for v in values {
            match v.get("items").and_then(Value::as_array) {
                Some(items) if v["kind"].as_str().is_some_and(|k| k.ends_with("List")) => {
                    flat.extend(items.iter().cloned())
                }
                _ => flat.push(v.clone()),
            }
        }
        for v in flat {
            let kind = v["kind"].as_str().unwrap_or_default().to_string();
            let name = v["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let what = format!("{kind} {name}");
            let res: Result<(), serde_json::Error> = (|| {
                match kind.as_str() {
                    "CiliumNetworkPolicy" => m.policies.add_cnp(&serde_json::from_value(v)?),
                    "CiliumClusterwideNetworkPolicy" => {
                        m.policies.add_ccnp(&serde_json::from_value(v)?)
                    }
                    "NetworkPolicy" => m.policies.add_network_policy(&serde_json::from_value(v)?),
                    "Namespace" => {
                        let ns: Namespace = serde_json::from_value(v)?;
                        let mut labels = ns.metadata.labels.clone().unwrap_or_default();
                        labels
                            .entry("kubernetes.io/metadata.name".into())
                            .or_insert_with(|| name.clone());
                        m.cluster.namespaces.insert(name.clone(), labels);
                    }
                    "Pod" => {
                        let pod: Pod = serde_json::from_value(v)?;
                        let id = m.cluster.endpoints.len() as u32 + 1;
                        m.cluster.endpoints.push(endpoint_of(&pod, id));
                    }
                    _ => {}
                }
                Ok(())
            })();
            if let Err(e) = res {
                m.errors.push(format!("{what}: {e}"));
            }
        }
        // Namespaces referenced only by pods still carry their name label.
        for ep in &m.cluster.endpoints {
            m.cluster
                .namespaces
                .entry(ep.namespace.clone())
                .or_insert_with(|| {
                    BTreeMap::from([(
                        "kubernetes.io/metadata.name".to_string(),
                        ep.namespace.clone(),
                    )])
                });
        }
        m
    }
}

fn endpoint_of(pod: &Pod, id: u32) -> Endpoint {
    let mut ips: Vec<IpAddr> = Vec::new();
    if let Some(st) = &pod.status {
        for p in st.pod_ips.iter().flatten() {
            if let Ok(ip) = p.ip.parse() {
                ips.push(ip);
            }
        }
        if ips.is_empty()
            && let Some(ip) = st.pod_ip.as_deref().and_then(|s| s.parse().ok())
        {
            ips.push(ip);
        }
    }
    let mut named_ports = Vec::new();
    for c in pod.spec.iter().flat_map(|s| s.containers.iter()) {
        for p in c.ports.iter().flatten() {
            if let (Some(name), Ok(port)) = (&p.name, u16::try_from(p.container_port)) {
                named_ports.push(NamedPort {
                    name: name.clone(),
                    proto: match p.protocol.as_deref().unwrap_or("TCP") {
                        "UDP" => PROTO_UDP,
                        "SCTP" => PROTO_SCTP,
                        _ => PROTO_TCP,
                    },
                    port,
                });
            }
        }
    }
    Endpoint {
        id,
        name: pod.metadata.name.clone().unwrap_or_default(),
        namespace: pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        ips,
        named_ports,
    }
}

/// `80/TCP`, `8/ICMP`, `128/ICMPv6` (ICMP takes the type in the port's place).
pub fn parse_dport(s: &str) -> Result<(u8, u16), String> {
    let (port, proto) = s.split_once('/').unwrap_or((s, "TCP"));
    let proto = match proto.to_ascii_uppercase().as_str() {
        "TCP" => PROTO_TCP,
        "UDP" => PROTO_UDP,
        "SCTP" => PROTO_SCTP,
        "ICMP" => PROTO_ICMP,
        "ICMPV6" => PROTO_ICMPV6,
        o => {
            return Err(format!(
                "--dport {s:?}: unknown protocol {o:?} (TCP, UDP, SCTP, ICMP, ICMPv6)"
            ));
        }
    };
    let port: u16 = port
        .parse()
        .map_err(|_| format!("--dport {s:?}: {port:?} is not a port number"))?;
    if matches!(proto, PROTO_ICMP | PROTO_ICMPV6) && port > 255 {
        return Err(format!("--dport {s:?}: an ICMP type is 0..=255"));
    }
    Ok((proto, port))
}

/// `--src`/`--dst`: an address, or labels `k=v,k8s:k=v,...` (the pod's
/// namespace from `io.kubernetes.pod.namespace`, else `default`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Party {
    Ip(IpAddr),
    Labels {
        namespace: String,
        labels: BTreeMap<String, String>,
    },
}

pub fn parse_party(s: &str) -> Result<Party, String> {
    if let Ok(ip) = s.trim().parse::<IpAddr>() {
        return Ok(Party::Ip(ip));
    }
    let mut labels = BTreeMap::new();
    let mut namespace = "default".to_string();
    for kv in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let k = k
            .strip_prefix("k8s:")
            .or(k.strip_prefix("any:"))
            .unwrap_or(k);
        let valid = |x: &str| {
            x.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
        };
        if k.is_empty() || !valid(k) || !valid(v) {
            return Err(format!(
                "{s:?} is neither an IP address nor labels (k=v,...): bad label {kv:?}"
            ));
        }
        if k == POD_NAMESPACE_LABEL {
            namespace = v.to_string();
        } else {
            labels.insert(k.to_string(), v.to_string());
        }
    }
    if labels.is_empty() && namespace == "default" && !s.contains(POD_NAMESPACE_LABEL) {
        return Err(format!(
            "{s:?} is neither an IP address nor labels (k=v,...)"
        ));
    }
    Ok(Party::Labels { namespace, labels })
}

/// Traces `src` → `dst` over the manifests and renders the report.
pub fn trace_report(
    m: &Manifests,
    src: &Party,
    dst: &Party,
    proto: u8,
    port: u16,
) -> (Trace, String) {
    let mut cluster = m.cluster.clone();
    let mut end = |p: &Party, id: u32| -> TraceEnd {
        match p {
            Party::Ip(ip) => TraceEnd::Ip(*ip),
            Party::Labels { namespace, labels } => {
                cluster.endpoints.push(Endpoint {
                    id,
                    name: format!("<{}>", if id == SYNTHETIC_SRC { "src" } else { "dst" }),
                    namespace: namespace.clone(),
                    labels: labels.clone(),
                    ips: Vec::new(),
                    named_ports: Vec::new(),
                });
                TraceEnd::Endpoint(id)
            }
        }
    };
    let s = end(src, SYNTHETIC_SRC);
    let d = end(dst, SYNTHETIC_DST);
    let state = State::build(&cluster, m.policies.clone(), Identities::default());
    let t = state.trace_ends(s, d, proto, port);
    let mut out = String::new();
    let describe = |id: u32| -> String {
        state
            .identities
            .get(id)
            .map(|i| format!("identity {id} [{}]", i.labels))
            .unwrap_or_else(|| format!("identity {id}"))
    };
    let proto_name = match proto {
        PROTO_TCP => "TCP",
        PROTO_UDP => "UDP",
        PROTO_SCTP => "SCTP",
        PROTO_ICMP => "ICMP",
        PROTO_ICMPV6 => "ICMPv6",
        _ => "?",
    };
    let _ = writeln!(out, "From: {}", describe(t.src_identity));
    let _ = writeln!(out, "To:   {}", describe(t.dst_identity));
    let _ = writeln!(out, "Port: {port}/{proto_name}");
    for (dir, d) in [("Egress ", &t.egress), ("Ingress", &t.ingress)] {
        match d {
            Some(d) => {
                let v = if d.verdict == Verdict::Allow {
                    "ALLOWED"
                } else {
                    "DENIED"
                };
                let by = if matches!(d.reason, Reason::Rule(_)) {
                    "by "
                } else {
                    ""
                };
                let _ = writeln!(out, "{dir}: {v:<7} {by}{}", d.reason);
            }
            None => {
                let _ = writeln!(out, "{dir}: not a local endpoint, not enforced here");
            }
        }
    }
    let v = if t.verdict == Verdict::Allow {
        "ALLOWED"
    } else {
        "DENIED"
    };
    let _ = writeln!(out, "Final verdict: {v}");
    (t, out)
}
