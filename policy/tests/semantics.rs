//! Cilium's documented L3/L4 semantics and its L3/L4 bypass advisories,
//! as decisions of the reference evaluator, each cross-checked against the
//! compiled map entries (see common::trace).

mod common;

use common::*;
use membrane_policy::rules::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};
use membrane_policy::{Direction, Identities, PolicySet, State, Verdict};

const A: usize = 0;
const B: usize = 1;
const C: usize = 2;
const X: usize = 0;
const Y: usize = 1;

#[test]
fn deny_on_a_port_beats_an_allow_from_a_peer() {
    let s = state(
        &cluster(),
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: deny80, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress:
  - fromEndpoints: [{matchLabels: {pod: b}}]
  ingressDeny:
  - toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"#,
    );
    let t = trace(&s, pod_ip(X, B), pod_ip(X, A), PROTO_TCP, 80);
    assert_eq!(t.verdict, Verdict::Deny);
    assert_eq!(
        rule_of(&t),
        "CiliumNetworkPolicy x/deny80 spec.ingressDeny[0]"
    );
    let t = trace(&s, pod_ip(X, B), pod_ip(X, A), PROTO_TCP, 81);
    assert_eq!(t.verdict, Verdict::Allow);
    assert_eq!(rule_of(&t), "CiliumNetworkPolicy x/deny80 spec.ingress[0]");
    let t = trace(&s, pod_ip(X, C), pod_ip(X, A), PROTO_TCP, 81);
    assert_eq!(t.verdict, Verdict::Deny);
    assert!(rule_of(&t).starts_with("default deny"), "{}", rule_of(&t));
    // Egress of a is not enforced: only ingress rules select it.
    assert_eq!(
        verdict(&s, pod_ip(X, A), pod_ip(Y, C), PROTO_UDP, 53),
        Verdict::Allow
    );
    // A peer deny drops everything from that peer, whatever allows it.
    let s = state(
        &cluster(),
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: peerdeny, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress: [{fromEntities: [all]}]
  ingressDeny: [{fromEndpoints: [{matchLabels: {pod: b}}]}]
"#,
    );
    for (p, port) in [(PROTO_TCP, 80), (PROTO_UDP, 81), (PROTO_ICMP, 8)] {
        assert_eq!(
            verdict(&s, pod_ip(X, B), pod_ip(X, A), p, port),
            Verdict::Deny
        );
        assert_eq!(
            verdict(&s, pod_ip(X, C), pod_ip(X, A), p, port),
            Verdict::Allow
        );
    }
}

#[test]
fn external_lockdown() {
    let s = state(
        &cluster(),
        r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: lockdown}
spec:
  endpointSelector: {}
  ingressDeny: [{fromEntities: [world]}]
  ingress: [{fromEntities: [all]}]
"#,
    );
    assert_eq!(
        verdict(&s, pod_ip(Y, B), pod_ip(X, A), PROTO_TCP, 80),
        Verdict::Allow
    );
    assert_eq!(
        verdict(&s, ip("192.0.2.7"), pod_ip(X, A), PROTO_TCP, 80),
        Verdict::Deny
    );
    assert_eq!(
        verdict(&s, ip("2001:db8::7"), pod_ip6(X, A), PROTO_TCP, 80),
        Verdict::Deny
    );
    assert_eq!(
        verdict(&s, ip(HOST), pod_ip(X, A), PROTO_TCP, 80),
        Verdict::Allow
    );
}

#[test]
fn cnp_selectors_default_to_its_namespace_ccnp_selectors_do_not() {
    let cnp = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: from-b, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress: [{fromEndpoints: [{matchLabels: {pod: b}}]}]
"#;
    let s = state(&cluster(), cnp);
    assert_eq!(
        verdict(&s, pod_ip(X, B), pod_ip(X, A), PROTO_TCP, 80),
        Verdict::Allow
    );
    assert_eq!(
        verdict(&s, pod_ip(Y, B), pod_ip(X, A), PROTO_TCP, 80),
        Verdict::Deny
    );
    // The endpointSelector is namespaced too: y/a is not selected.
    assert_eq!(
        verdict(&s, pod_ip(X, C), pod_ip(Y, A), PROTO_TCP, 80),
        Verdict::Allow
    );
    let ccnp = cnp
        .replace("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy")
        .replace(", namespace: x", "");
    let s = state(&cluster(), &ccnp);
    assert_eq!(
        verdict(&s, pod_ip(Y, B), pod_ip(X, A), PROTO_TCP, 80),
        Verdict::Allow
    );
    assert_eq!(
        verdict(&s, pod_ip(X, C), pod_ip(Y, A), PROTO_TCP, 80),
        Verdict::Deny
    );
    // A CNP peer naming another namespace reaches it.
    let s = state(
        &cluster(),
        &cnp.replace(
            "{matchLabels: {pod: b}}",
            "{matchLabels: {pod: b, k8s:io.kubernetes.pod.namespace: y}}",
        ),
    );
    assert_eq!(
        verdict(&s, pod_ip(Y, B), pod_ip(X, A), PROTO_TCP, 80),
        Verdict::Allow
    );
    assert_eq!(
        verdict(&s, pod_ip(X, B), pod_ip(X, A), PROTO_TCP, 80),
        Verdict::Deny
    );
}

#[test]
fn icmp_allowed_by_l3_rules_dropped_once_a_port_rule_exists_unless_allowed() {
    let l3 = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: l3, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress: [{fromEndpoints: [{matchLabels: {pod: b}}]}]
"#;
    let s = state(&cluster(), l3);
    assert_eq!(
        verdict(&s, pod_ip(X, B), pod_ip(X, A), PROTO_ICMP, 8),
        Verdict::Allow
    );
    let l4 = l3.replace(
        "[{fromEndpoints: [{matchLabels: {pod: b}}]}]",
        "[{fromEndpoints: [{matchLabels: {pod: b}}], toPorts: [{ports: [{port: \"80\", protocol: TCP}]}]}]",
    );
    let s = state(&cluster(), &l4);
    assert_eq!(
        verdict(&s, pod_ip(X, B), pod_ip(X, A), PROTO_ICMP, 8),
        Verdict::Deny
    );
    assert_eq!(
        verdict(&s, pod_ip(X, B), pod_ip(X, A), PROTO_TCP, 80),
        Verdict::Allow
    );
    let echo = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: echo, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress:
  - fromEndpoints: [{matchLabels: {pod: b}}]
    icmps: [{fields: [{type: EchoRequest, family: IPv4}, {type: 128, family: IPv6}]}]
"#;
    let s = state(&cluster(), echo);
    assert_eq!(
        verdict(&s, pod_ip(X, B), pod_ip(X, A), PROTO_ICMP, 8),
        Verdict::Allow
    );
    assert_eq!(
        verdict(&s, pod_ip6(X, B), pod_ip6(X, A), PROTO_ICMPV6, 128),
        Verdict::Allow
    );
    assert_eq!(
        verdict(&s, pod_ip(X, B), pod_ip(X, A), PROTO_ICMP, 13),
        Verdict::Deny
    );
    assert_eq!(
        verdict(&s, pod_ip(X, B), pod_ip(X, A), PROTO_TCP, 80),
        Verdict::Deny
    );
    // "Deny echo, allow all other ICMP" (Cilium 1.12).
    let s = state(
        &cluster(),
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: noecho, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress: [{fromEndpoints: [{}]}]
  ingressDeny: [{icmps: [{fields: [{type: 8}]}]}]
"#,
    );
    assert_eq!(
        verdict(&s, pod_ip(X, B), pod_ip(X, A), PROTO_ICMP, 8),
        Verdict::Deny
    );
    assert_eq!(
        verdict(&s, pod_ip(X, B), pod_ip(X, A), PROTO_ICMP, 13),
        Verdict::Allow
    );
    assert_eq!(
        verdict(&s, pod_ip(X, B), pod_ip(X, A), PROTO_TCP, 80),
        Verdict::Allow
    );
}

#[test]
fn egress_port_range_is_a_few_prefixes_not_one_entry_per_port() {
    let s = state(
        &cluster(),
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: range, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  egress: [{toPorts: [{ports: [{port: "80", endPort: 444, protocol: TCP}]}]}]
"#,
    );
    for (port, want) in [
        (79, Verdict::Deny),
        (80, Verdict::Allow),
        (300, Verdict::Allow),
        (444, Verdict::Allow),
        (445, Verdict::Deny),
    ] {
        assert_eq!(
            verdict(&s, pod_ip(X, A), pod_ip(Y, B), PROTO_TCP, port),
            want,
            "port {port}"
        );
    }
    assert_eq!(
        verdict(&s, pod_ip(X, A), pod_ip(Y, B), PROTO_UDP, 80),
        Verdict::Deny
    );
    let pol = s.compile(ep_id(X, A)).expect("compiled");
    let egress: Vec<_> = pol
        .entries
        .iter()
        .filter(|e| e.direction == Direction::Egress)
        .collect();
    assert!(egress.len() <= 16, "80..=444 took {} entries", egress.len());
    assert!(pol.egress_enforced && !pol.ingress_enforced);
}

#[test]
fn cidr_with_except_and_to_cidr() {
    let s = state(
        &cluster(),
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: cidr, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  egress:
  - toCIDR: [198.51.100.7/32]
  - toCIDRSet: [{cidr: 192.0.2.0/24, except: [192.0.2.128/25]}]
"#,
    );
    let a = pod_ip(X, A);
    assert_eq!(
        verdict(&s, a, ip("192.0.2.5"), PROTO_TCP, 80),
        Verdict::Allow
    );
    assert_eq!(
        verdict(&s, a, ip("192.0.2.200"), PROTO_TCP, 80),
        Verdict::Deny
    );
    assert_eq!(
        verdict(&s, a, ip("198.51.100.7"), PROTO_UDP, 53),
        Verdict::Allow
    );
    assert_eq!(
        verdict(&s, a, ip("198.51.100.8"), PROTO_UDP, 53),
        Verdict::Deny
    );
    // CIDR rules do not select pods inside them.
    assert_eq!(verdict(&s, a, pod_ip(Y, B), PROTO_TCP, 80), Verdict::Deny);
}

/// CVE-2024-47825: a deny of 1.0.0.0/8 was ignored beside an allow of
/// 1.1.1.2/32 plus `toEntities: all`, or with `enableDefaultDeny: false`.
#[test]
fn cve_2024_47825_broad_cidr_deny_beats_narrow_allow() {
    let base = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: cve, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  egressDeny: [{toCIDR: [1.0.0.0/8]}]
  egress:
  - toCIDR: [1.1.1.2/32]
  - toEntities: [all]
"#;
    let a = pod_ip(X, A);
    for yaml in [
        base.to_string(),
        base.replace("  - toEntities: [all]\n", "") + "  enableDefaultDeny: {egress: false}\n",
    ] {
        let s = state(&cluster(), &yaml);
        let t = trace(&s, a, ip("1.1.1.2"), PROTO_TCP, 443);
        assert_eq!(t.verdict, Verdict::Deny, "{yaml}");
        assert_eq!(rule_of(&t), "CiliumNetworkPolicy x/cve spec.egressDeny[0]");
        assert_eq!(
            verdict(&s, a, ip("1.200.0.1"), PROTO_TCP, 443),
            Verdict::Deny
        );
        assert_eq!(
            verdict(&s, a, ip("2.2.2.2"), PROTO_TCP, 443),
            Verdict::Allow
        );
    }
}

/// CVE-2025-64715: a peer list that resolves to nothing (an unknown group,
/// an empty list, a selector matching no pod) must not widen egress.
#[test]
fn cve_2025_64715_empty_peer_set_never_means_everything() {
    for peers in [
        "toGroups: [{aws: {securityGroupsIds: [sg-none]}}]",
        "toCIDRSet: []",
        "toEndpoints: []",
        "toEndpoints: [{matchLabels: {pod: nobody}}]",
        "toCIDRSet: [{cidrGroupRef: missing}]",
        "toEntities: [none]",
    ] {
        let yaml = format!(
            r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: empty, namespace: x}}
spec:
  endpointSelector: {{matchLabels: {{pod: a}}}}
  egress:
  - {peers}
    toPorts: [{{ports: [{{port: "443", protocol: TCP}}]}}]
"#
        );
        let set = policies(&yaml);
        let s = State::build(&cluster(), set, Identities::default());
        let a = pod_ip(X, A);
        for dst in [ip("192.0.2.1"), pod_ip(Y, B), ip(HOST)] {
            assert_eq!(
                verdict(&s, a, dst, PROTO_TCP, 443),
                Verdict::Deny,
                "{peers} → {dst}"
            );
        }
    }
}

/// CVE-2023-39347: a pod labelled with another namespace's name keeps its
/// real namespace's identity and policies.
#[test]
fn cve_2023_39347_pod_cannot_fake_its_namespace() {
    let mut c = cluster();
    for ep in &mut c.endpoints {
        if ep.namespace == "y" && ep.name == "b" {
            ep.labels
                .insert("io.kubernetes.pod.namespace".into(), "x".into());
            ep.labels
                .insert("io.cilium.k8s.namespace.labels.ns".into(), "x".into());
        }
    }
    let s = state(
        &c,
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: in-x, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress: [{fromEndpoints: [{matchLabels: {pod: b}}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: ns-x, namespace: x}
spec:
  podSelector: {matchLabels: {pod: c}}
  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: x}}}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: lock-b, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: b}}
  egress: [{toEntities: [world]}]
"#,
    );
    // The fake label neither grants x's allows...
    assert_eq!(
        verdict(&s, pod_ip(Y, B), pod_ip(X, A), PROTO_TCP, 80),
        Verdict::Deny
    );
    assert_eq!(
        verdict(&s, pod_ip(Y, B), pod_ip(X, C), PROTO_TCP, 80),
        Verdict::Deny
    );
    assert_eq!(
        verdict(&s, pod_ip(X, A), pod_ip(X, C), PROTO_TCP, 80),
        Verdict::Allow
    );
    // ...nor puts y/b under x's policies (lock-b confines x/b only).
    assert_eq!(
        verdict(&s, pod_ip(X, B), pod_ip(Y, C), PROTO_TCP, 80),
        Verdict::Deny
    );
    assert_eq!(
        verdict(&s, pod_ip(Y, B), pod_ip(Y, C), PROTO_TCP, 80),
        Verdict::Allow
    );
    let yb = s
        .endpoints()
        .find(|(e, _)| e.namespace == "y" && e.name == "b")
        .map(|(_, id)| id);
    let info = s.identities.get(yb.expect("y/b")).expect("identity");
    assert_eq!(info.labels.namespace(), Some("y"));
}

#[test]
fn network_policy_model_cases() {
    let c = cluster();
    // namespaceSelector AND podSelector in one peer.
    let s = state(
        &c,
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: and, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: b}}}]
    ports: [{port: serve-81-tcp}]
"#,
    );
    assert_eq!(
        verdict(&s, pod_ip(Y, B), pod_ip(X, A), PROTO_TCP, 81),
        Verdict::Allow
    );
    assert_eq!(
        verdict(&s, pod_ip(Y, B), pod_ip(X, A), PROTO_TCP, 80),
        Verdict::Deny
    );
    assert_eq!(
        verdict(&s, pod_ip(Y, C), pod_ip(X, A), PROTO_TCP, 81),
        Verdict::Deny
    );
    assert_eq!(
        verdict(&s, pod_ip(X, B), pod_ip(X, A), PROTO_TCP, 81),
        Verdict::Deny
    );
    // namespaceSelector {} means every pod, never the world.
    let s = state(
        &c,
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: pods, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - to: [{namespaceSelector: {}}]
  - ports: [{port: 53, protocol: UDP}]
"#,
    );
    assert_eq!(
        verdict(&s, pod_ip(X, A), pod_ip(Z, C), PROTO_TCP, 80),
        Verdict::Allow
    );
    assert_eq!(
        verdict(&s, pod_ip(X, A), ip("192.0.2.1"), PROTO_TCP, 80),
        Verdict::Deny
    );
    assert_eq!(
        verdict(&s, pod_ip(X, A), ip("192.0.2.1"), PROTO_UDP, 53),
        Verdict::Allow
    );
    // Allow-all ingress (empty rule) unions over a narrower policy.
    let s = state(
        &c,
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: narrow, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: all, namespace: x}
spec:
  podSelector: {}
  ingress: [{}]
"#,
    );
    assert_eq!(
        verdict(&s, pod_ip(Z, C), pod_ip(X, A), PROTO_UDP, 81),
        Verdict::Allow
    );
    // Deny-all ingress: policyTypes without rules.
    let s = state(
        &c,
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress]
"#,
    );
    assert_eq!(
        verdict(&s, pod_ip(X, B), pod_ip(X, A), PROTO_TCP, 80),
        Verdict::Deny
    );
    assert_eq!(
        verdict(&s, pod_ip(X, A), pod_ip(Y, A), PROTO_TCP, 80),
        Verdict::Allow
    );
}

const Z: usize = 2;

#[test]
fn bad_fields_are_named_and_never_widen() {
    let set = policies(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: bad, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress: [{fromCIDR: [not-a-cidr]}]
  egressDeny: [{toPorts: [{ports: [{port: "80", protocol: QUIC}]}]}]
"#,
    );
    let msgs: Vec<String> = set.errors.iter().map(ToString::to_string).collect();
    assert!(
        msgs.iter()
            .any(|m| m.contains("CiliumNetworkPolicy x/bad: spec.ingress[0].fromCIDR[0]")),
        "{msgs:?}"
    );
    assert!(
        msgs.iter()
            .any(|m| m.contains("spec.egressDeny[0].toPorts[0].ports[0].protocol")),
        "{msgs:?}"
    );
    let s = State::build(&cluster(), set, Identities::default());
    // The broken allow allows nothing; the broken deny denies everything.
    assert_eq!(
        verdict(&s, ip("192.0.2.1"), pod_ip(X, A), PROTO_TCP, 80),
        Verdict::Deny
    );
    assert_eq!(
        verdict(&s, pod_ip(X, A), pod_ip(X, B), PROTO_TCP, 81),
        Verdict::Deny
    );
    let _ = PolicySet::default();
}

/// In a CCNP, `fromEndpoints: [{}]` is every pod of the cluster, never the
/// world or the host (cilium/cilium#12890); in a CNP, every pod of its
/// namespace.
#[test]
fn wildcard_endpoint_selector_means_pods() {
    let ccnp = r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: pods}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress: [{fromEndpoints: [{}]}]
"#;
    let mut c = cluster();
    c.allow_localhost = false;
    let set = policies(ccnp);
    let s = State::build(&c, set, Identities::default());
    assert_eq!(
        verdict(&s, pod_ip(Z, C), pod_ip(X, A), PROTO_TCP, 80),
        Verdict::Allow
    );
    assert_eq!(
        verdict(&s, ip("192.0.2.1"), pod_ip(X, A), PROTO_TCP, 80),
        Verdict::Deny
    );
    assert_eq!(
        verdict(&s, ip(HOST), pod_ip(X, A), PROTO_TCP, 80),
        Verdict::Deny
    );
    let cnp = ccnp
        .replace("CiliumClusterwideNetworkPolicy", "CiliumNetworkPolicy")
        .replace("{name: pods}", "{name: pods, namespace: x}");
    let s = State::build(&c, policies(&cnp), Identities::default());
    assert_eq!(
        verdict(&s, pod_ip(X, C), pod_ip(X, A), PROTO_TCP, 80),
        Verdict::Allow
    );
    assert_eq!(
        verdict(&s, pod_ip(Z, C), pod_ip(X, A), PROTO_TCP, 80),
        Verdict::Deny
    );
}

/// L7 port rules need the proxy; until it enforces them the port rule
/// allows nothing (never the whole port) and says so.
#[test]
fn l7_rules_are_reported_and_allow_nothing() {
    let set = policies(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: http, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress:
  - fromEndpoints: [{matchLabels: {pod: b}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}], rules: {http: [{method: GET}]}}]
"#,
    );
    assert!(
        set.errors.iter().any(|e| e
            .to_string()
            .contains("x/http: spec.ingress[0].toPorts: L7 rules")),
        "{:?}",
        set.errors
    );
    let s = State::build(&cluster(), set, Identities::default());
    assert_eq!(
        verdict(&s, pod_ip(X, B), pod_ip(X, A), PROTO_TCP, 80),
        Verdict::Deny
    );
}
