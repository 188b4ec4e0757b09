//! A small cluster (the Kubernetes policy test model: namespaces x, y, z,
//! pods a, b, c) and helpers to build policy state from YAML.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::IpAddr;

use membrane_policy::rules::PROTO_TCP;
use membrane_policy::{Cluster, Endpoint, Identities, NamedPort, PolicySet, State, Trace, Verdict};

pub const NS: [&str; 3] = ["x", "y", "z"];
pub const PODS: [&str; 3] = ["a", "b", "c"];
pub const HOST: &str = "10.124.0.1";

pub fn pod_ip(ns: usize, pod: usize) -> IpAddr {
    format!("10.124.{}.{}", ns + 1, pod + 2)
        .parse()
        .expect("ip")
}

pub fn pod_ip6(ns: usize, pod: usize) -> IpAddr {
    format!("fd00:124:{}::{}", ns + 1, pod + 2)
        .parse()
        .expect("ip")
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

pub fn ep_id(ns: usize, pod: usize) -> u32 {
    (ns * 3 + pod + 1) as u32
}

pub fn cluster() -> Cluster {
    let mut c = Cluster {
        host_ips: vec![ip(HOST)],
        allow_localhost: true,
        ..Cluster::default()
    };
    for (i, ns) in NS.iter().enumerate() {
        c.namespaces.insert(
            ns.to_string(),
            BTreeMap::from([
                ("ns".to_string(), ns.to_string()),
                ("kubernetes.io/metadata.name".to_string(), ns.to_string()),
            ]),
        );
        for (j, pod) in PODS.iter().enumerate() {
            c.endpoints.push(Endpoint {
                id: ep_id(i, j),
                name: pod.to_string(),
                namespace: ns.to_string(),
                labels: BTreeMap::from([("pod".to_string(), pod.to_string())]),
                ips: vec![pod_ip(i, j), pod_ip6(i, j)],
                named_ports: vec![
                    NamedPort {
                        name: "serve-80-tcp".into(),
                        proto: PROTO_TCP,
                        port: 80,
                    },
                    NamedPort {
                        name: "serve-81-tcp".into(),
                        proto: PROTO_TCP,
                        port: 81,
                    },
                ],
            });
        }
    }
    c
}

/// Parses a multi-document YAML of CNP/CCNP/NetworkPolicy objects.
pub fn policies(yaml: &str) -> PolicySet {
    let mut set = PolicySet::default();
    for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
        let v: serde_json::Value = serde::Deserialize::deserialize(doc).expect("yaml");
        if v.is_null() {
            continue;
        }
        match v["kind"].as_str() {
            Some("CiliumNetworkPolicy") => set.add_cnp(&serde_json::from_value(v).expect("cnp")),
            Some("CiliumClusterwideNetworkPolicy") => {
                set.add_ccnp(&serde_json::from_value(v).expect("ccnp"))
            }
            Some("NetworkPolicy") => {
                set.add_network_policy(&serde_json::from_value(v).expect("np"))
            }
            k => panic!("unexpected kind {k:?}"),
        }
    }
    set
}

pub fn state(c: &Cluster, yaml: &str) -> State {
    let set = policies(yaml);
    assert!(set.errors.is_empty(), "{:?}", set.errors);
    State::build(c, set, Identities::default())
}

/// Trace, and check that the compiled maps agree with the reference.
pub fn trace(s: &State, src: IpAddr, dst: IpAddr, proto: u8, port: u16) -> Trace {
    let t = s.trace(src, dst, proto, port);
    let compiled = compiled_verdict(s, src, dst, proto, port);
    assert_eq!(
        compiled, t.verdict,
        "compiled maps disagree with the reference: {t:?}"
    );
    t
}

pub fn compiled_verdict(s: &State, src: IpAddr, dst: IpAddr, proto: u8, port: u16) -> Verdict {
    use membrane_policy::Direction;
    let src_id = s.ipcache.lookup(src);
    let dst_id = s.ipcache.lookup(dst);
    let mut v = Verdict::Allow;
    for (ep, _) in s.endpoints() {
        if ep.ips.contains(&src) {
            let pol = s.compile(ep.id).expect("compile");
            if pol.lookup(Direction::Egress, dst_id, proto, port) == Verdict::Deny {
                v = Verdict::Deny;
            }
        }
        if ep.ips.contains(&dst) {
            let pol = s.compile(ep.id).expect("compile");
            if pol.lookup(Direction::Ingress, src_id, proto, port) == Verdict::Deny {
                v = Verdict::Deny;
            }
        }
    }
    v
}

pub fn verdict(s: &State, src: IpAddr, dst: IpAddr, proto: u8, port: u16) -> Verdict {
    trace(s, src, dst, proto, port).verdict
}

pub fn rule_of(t: &Trace) -> String {
    t.deciding()
        .map(|d| d.reason.to_string())
        .unwrap_or_default()
}
