//! Property test: on random policies (CNP, CCNP, NetworkPolicy) and random
//! packets, the compiled per-endpoint map entries, looked up the way the
//! datapath does, agree with the reference evaluator.

mod common;

use std::net::IpAddr;

use common::*;
use membrane_policy::rules::{PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP};
use membrane_policy::{Direction, Identities, State};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

const CIDRS: &[&str] = &[
    "192.0.2.0/24",
    "192.0.2.0/25",
    "192.0.2.64/26",
    "198.51.100.0/24",
    "198.51.100.7/32",
    "0.0.0.0/0",
    "10.124.0.0/16",
    "2001:db8::/32",
    "2001:db8::/64",
    "::/0",
];
const WORLD: &[&str] = &[
    "192.0.2.1",
    "192.0.2.70",
    "192.0.2.200",
    "198.51.100.7",
    "198.51.100.9",
    "203.0.113.1",
];
const PORTS: &[u16] = &[0, 1, 53, 79, 80, 81, 443, 444, 8080, 65535];

fn pick<'a, T>(r: &mut StdRng, v: &'a [T]) -> &'a T {
    &v[r.random_range(0..v.len())]
}

fn selector(r: &mut StdRng) -> Value {
    match r.random_range(0..5) {
        0 => json!({}),
        1 => json!({"matchLabels": {"pod": pick(r, &PODS)}}),
        2 => {
            json!({"matchExpressions": [{"key": "pod", "operator": "NotIn", "values": [pick(r, &PODS)]}]})
        }
        3 => json!({"matchLabels": {"k8s:io.kubernetes.pod.namespace": pick(r, &NS)}}),
        _ => {
            json!({"matchLabels": {"io.cilium.k8s.namespace.labels.ns": pick(r, &NS), "pod": pick(r, &PODS)}})
        }
    }
}

fn ports(r: &mut StdRng) -> Value {
    let n = r.random_range(1..3);
    let mut v = Vec::new();
    for _ in 0..n {
        let port = *pick(r, PORTS);
        let mut p =
            json!({"port": port.to_string(), "protocol": pick(r, &["TCP", "UDP", "SCTP", "ANY"])});
        if r.random_bool(0.3) && port > 0 {
            p["endPort"] = json!(port.saturating_add(r.random_range(0..400)));
        }
        if r.random_bool(0.1) {
            p["port"] = json!(pick(r, &["serve-80-tcp", "serve-81-tcp", "nope"]));
            p["protocol"] = json!("TCP");
            p.as_object_mut().map(|o| o.remove("endPort"));
        }
        v.push(p);
    }
    json!([{"ports": v}])
}

fn item(r: &mut StdRng, pfx: &str) -> Value {
    let mut o = serde_json::Map::new();
    let k = |s: &str| format!("{pfx}{s}");
    match r.random_range(0..7) {
        0 => {
            o.insert(
                k("Endpoints"),
                json!(
                    (0..r.random_range(0..3))
                        .map(|_| selector(r))
                        .collect::<Vec<_>>()
                ),
            );
        }
        1 => {
            o.insert(
                k("Entities"),
                json!([pick(
                    r,
                    &[
                        "all",
                        "world",
                        "cluster",
                        "host",
                        "world-ipv4",
                        "world-ipv6",
                        "none"
                    ]
                )]),
            );
        }
        2 => {
            o.insert(k("CIDR"), json!([pick(r, CIDRS)]));
        }
        3 => {
            let c = *pick(
                r,
                &[
                    "192.0.2.0/24",
                    "192.0.2.0/25",
                    "198.51.100.0/24",
                    "2001:db8::/32",
                ],
            );
            let net: ipnet::IpNet = c.parse().expect("cidr");
            let except: Vec<&str> = CIDRS
                .iter()
                .copied()
                .filter(|e| {
                    let en: ipnet::IpNet = e.parse().expect("cidr");
                    net.contains(&en) && en != net
                })
                .collect();
            o.insert(k("CIDRSet"), json!([{"cidr": c, "except": except}]));
        }
        4 => {} // no peer field
        5 => {
            o.insert(k("Endpoints"), json!([selector(r)]));
            o.insert(k("Entities"), json!(["world"]));
        }
        _ => {
            o.insert(k("CIDRSet"), json!([]));
        }
    }
    if r.random_bool(0.5) {
        o.insert("toPorts".into(), ports(r));
    }
    if r.random_bool(0.2) {
        o.insert(
            "icmps".into(),
            json!([{"fields": [{"type": pick(r, &[0, 8, 13]), "family": "IPv4"}, {"type": "EchoRequest", "family": "IPv6"}]}]),
        );
    }
    Value::Object(o)
}

fn rule(r: &mut StdRng) -> Value {
    let mut o = serde_json::Map::new();
    o.insert("endpointSelector".into(), selector(r));
    for (sec, pfx) in [
        ("ingress", "from"),
        ("ingressDeny", "from"),
        ("egress", "to"),
        ("egressDeny", "to"),
    ] {
        let p = if sec.ends_with("Deny") { 0.25 } else { 0.5 };
        if r.random_bool(p) {
            let n = r.random_range(1..3);
            o.insert(
                sec.into(),
                json!((0..n).map(|_| item(r, pfx)).collect::<Vec<_>>()),
            );
        }
    }
    if r.random_bool(0.2) {
        o.insert(
            "enableDefaultDeny".into(),
            json!({"ingress": r.random_bool(0.5), "egress": r.random_bool(0.5)}),
        );
    }
    Value::Object(o)
}

fn np(r: &mut StdRng, i: usize) -> Value {
    let peer = |r: &mut StdRng| match r.random_range(0..4) {
        0 => json!({"podSelector": {"matchLabels": {"pod": pick(r, &PODS)}}}),
        1 => json!({"namespaceSelector": {"matchLabels": {"ns": pick(r, &NS)}}}),
        2 => {
            json!({"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": pick(r, &PODS)}}})
        }
        _ => json!({"ipBlock": {"cidr": "192.0.2.0/24", "except": ["192.0.2.128/25"]}}),
    };
    let mut spec = json!({"podSelector": selector_np(r)});
    let mut types = Vec::new();
    for (sec, field, ty) in [("ingress", "from", "Ingress"), ("egress", "to", "Egress")] {
        if r.random_bool(0.6) {
            types.push(ty);
            let mut rules = Vec::new();
            for _ in 0..r.random_range(0..3) {
                let mut rr = serde_json::Map::new();
                if r.random_bool(0.7) {
                    rr.insert(
                        field.into(),
                        json!(
                            (0..r.random_range(1..3))
                                .map(|_| peer(r))
                                .collect::<Vec<_>>()
                        ),
                    );
                }
                if r.random_bool(0.5) {
                    rr.insert("ports".into(), json!([{"port": pick(r, &[80, 81, 53]), "protocol": pick(r, &["TCP", "UDP"])}]));
                }
                rules.push(Value::Object(rr));
            }
            spec[sec] = json!(rules);
        }
    }
    spec["policyTypes"] = json!(types);
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": format!("np{i}"), "namespace": pick(r, &NS)}, "spec": spec})
}

fn selector_np(r: &mut StdRng) -> Value {
    if r.random_bool(0.5) {
        json!({})
    } else {
        json!({"matchLabels": {"pod": pick(r, &PODS)}})
    }
}

fn random_policies(r: &mut StdRng) -> String {
    let mut docs = Vec::new();
    for i in 0..r.random_range(1..5) {
        let doc = match r.random_range(0..3) {
            0 => json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                        "metadata": {"name": format!("cnp{i}"), "namespace": pick(r, &NS)},
                        "spec": rule(r)}),
            1 => json!({"apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy",
                        "metadata": {"name": format!("ccnp{i}")}, "spec": rule(r),
                        "specs": [rule(r)]}),
            _ => np(r, i),
        };
        docs.push(serde_yaml_ng::to_string(&doc).expect("yaml"));
    }
    docs.join("---\n")
}

fn endpoints_ips(v6: bool) -> Vec<IpAddr> {
    let mut v = Vec::new();
    for n in 0..3 {
        for p in 0..3 {
            v.push(if v6 { pod_ip6(n, p) } else { pod_ip(n, p) });
        }
    }
    v
}

#[test]
fn compiled_maps_agree_with_the_reference_evaluator() {
    let seed: u64 = std::env::var("POLICY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed);
    let cases: usize = std::env::var("POLICY_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let mut r = StdRng::seed_from_u64(seed);
    let c = cluster();
    let mut checked = 0usize;
    let mut denied = 0usize;
    for case in 0..cases {
        let yaml = random_policies(&mut r);
        let set = policies(&yaml);
        let s = State::build(&c, set, Identities::default());
        let mut peers: Vec<IpAddr> = endpoints_ips(false);
        peers.extend(WORLD.iter().map(|w| ip(w)));
        peers.push(ip(HOST));
        for _ in 0..60 {
            let v6 = r.random_bool(0.15);
            let (src, dst) = if v6 {
                let e = endpoints_ips(true);
                let mut all = e.clone();
                all.extend([ip("2001:db8::1"), ip("2001:db8:0:1::1"), ip("2001:db9::1")]);
                (*pick(&mut r, &all), *pick(&mut r, &e))
            } else if r.random_bool(0.5) {
                (*pick(&mut r, &endpoints_ips(false)), *pick(&mut r, &peers))
            } else {
                (*pick(&mut r, &peers), *pick(&mut r, &endpoints_ips(false)))
            };
            let (proto, port) = match r.random_range(0..5) {
                0 => (PROTO_TCP, *pick(&mut r, PORTS)),
                1 => (PROTO_UDP, *pick(&mut r, PORTS)),
                2 => (PROTO_SCTP, *pick(&mut r, PORTS)),
                _ if v6 => (PROTO_ICMPV6, *pick(&mut r, &[128u16, 129, 1])),
                _ => (PROTO_ICMP, *pick(&mut r, &[0u16, 8, 13])),
            };
            let t = s.trace(src, dst, proto, port);
            let compiled = compiled_verdict(&s, src, dst, proto, port);
            assert_eq!(
                compiled, t.verdict,
                "case {case} (POLICY_SEED={seed}): {src} -> {dst} proto {proto} port {port}\n{t:?}\npolicies:\n{yaml}"
            );
            if t.verdict == membrane_policy::Verdict::Deny {
                denied += 1;
            }
            checked += 1;
        }
        // Every endpoint and every identity, per direction, at a few ports.
        for (ep, _) in s.endpoints() {
            let pol = s.compile(ep.id).expect("compile");
            for info in s.identities.iter() {
                for dir in [Direction::Ingress, Direction::Egress] {
                    let (proto, port) = (PROTO_TCP, *pick(&mut r, PORTS));
                    let want = s
                        .evaluate(ep.id, dir, info.id, proto, port)
                        .expect("ep")
                        .verdict;
                    assert_eq!(
                        pol.lookup(dir, info.id, proto, port),
                        want,
                        "case {case}: ep {} {dir:?} identity {} tcp/{port}\n{yaml}",
                        ep.id,
                        info.id
                    );
                }
            }
        }
    }
    // The generator must exercise both outcomes.
    assert!(
        denied > checked / 10 && denied < checked * 9 / 10,
        "{denied} of {checked} denied"
    );
}

/// Per-endpoint recompute: after a random change (a policy added, removed
/// or replaced; a pod relabelled, its named ports changed, a pod gone), every
/// endpoint outside `changed_endpoints` compiles exactly as before, and a
/// change that selects nothing recompiles nothing.
#[test]
fn incremental_recompile_covers_every_change() {
    let seed: u64 = std::env::var("POLICY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x1c4e);
    let cases: usize = std::env::var("POLICY_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let mut r = StdRng::seed_from_u64(seed);
    let (mut skipped, mut recompiled) = (0usize, 0usize);
    for case in 0..cases {
        let docs: Vec<String> = random_policies(&mut r)
            .split("---\n")
            .map(str::to_string)
            .collect();
        let c0 = cluster();
        let old = State::build(&c0, policies(&docs.join("---\n")), Identities::default());
        let mut docs1 = docs.clone();
        let mut c1 = c0.clone();
        match r.random_range(0..8) {
            0 => docs1.push(random_policies(&mut r)),
            1 => {
                let i = r.random_range(0..docs1.len());
                docs1.remove(i);
            }
            2 => {
                let i = r.random_range(0..docs1.len());
                docs1[i] = random_policies(&mut r);
            }
            3 => {
                let i = r.random_range(0..c1.endpoints.len());
                c1.endpoints[i]
                    .labels
                    .insert("pod".into(), pick(&mut r, &PODS).to_string());
            }
            4 => {
                let i = r.random_range(0..c1.endpoints.len());
                c1.endpoints[i].named_ports.pop();
            }
            // A label no pod had: a new identity.
            5 => {
                let i = r.random_range(0..c1.endpoints.len());
                c1.endpoints[i]
                    .labels
                    .insert("pod".into(), format!("new{case}"));
            }
            // A new pod.
            6 => {
                let mut ep = c1.endpoints[r.random_range(0..c1.endpoints.len())].clone();
                ep.id = 100;
                ep.ips = vec![ip("10.124.9.9")];
                if r.random_bool(0.5) {
                    ep.labels.insert("pod".into(), format!("new{case}"));
                }
                c1.endpoints.push(ep);
            }
            _ => {
                let i = r.random_range(0..c1.endpoints.len());
                c1.endpoints.remove(i);
            }
        }
        let yaml1 = docs1.join("---\n");
        // Built reusing what `old` resolved, and afresh: the same.
        let new = State::build_with(&c1, policies(&yaml1), old.identities.clone(), Some(&old));
        let fresh = State::build(&c1, policies(&yaml1), old.identities.clone());
        let changed = new.changed_endpoints(&old);
        for (ep, _) in new.endpoints() {
            assert_eq!(
                new.compile(ep.id),
                fresh.compile(ep.id),
                "case {case} (POLICY_SEED={seed}): endpoint {} differs when built from the previous state\n{yaml1}",
                ep.id
            );
            if changed.contains(&ep.id) {
                recompiled += 1;
                continue;
            }
            skipped += 1;
            assert_eq!(
                new.compile(ep.id),
                old.compile(ep.id),
                "case {case} (POLICY_SEED={seed}): endpoint {} changed but was not reported\nbefore:\n{}\nafter:\n{yaml1}",
                ep.id,
                docs.join("---\n")
            );
        }
        // Nothing changed: nothing to recompile.
        let same = State::build_with(&c1, policies(&yaml1), new.identities.clone(), Some(&new));
        assert!(
            same.changed_endpoints(&new).is_empty(),
            "case {case}: an identical rebuild reported changes"
        );
    }
    // The generator must exercise both outcomes.
    assert!(
        skipped > 0 && recompiled > 0,
        "{skipped} skipped, {recompiled} recompiled"
    );
}
