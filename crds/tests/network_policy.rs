//! CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy accept Cilium's
//! manifests field for field.

use kube::{CustomResourceExt, Resource};
use membrane_crds::{CiliumClusterwideNetworkPolicy, CiliumNetworkPolicy};

#[test]
fn cnp_with_every_l3_l4_field_parses() {
    let yaml = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  enableDefaultDeny: {ingress: true, egress: false}
  ingress:
  - fromEndpoints: [{matchLabels: {pod: b}}]
    fromEntities: [world, cluster]
    fromCIDR: [192.0.2.0/24]
    fromCIDRSet: [{cidr: 198.51.100.0/24, except: [198.51.100.128/25]}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}, {port: 81, endPort: 90, protocol: UDP}, {port: http}]
  - icmps: [{fields: [{type: 8, family: IPv4}, {type: EchoRequest, family: IPv6}]}]
  ingressDeny:
  - fromEndpoints: [{matchExpressions: [{key: pod, operator: In, values: [c]}]}]
    toPorts: [{ports: [{port: "80", protocol: ANY}]}]
  egress:
  - toEndpoints: []
    toFQDNs: [{matchName: example.com}]
  egressDeny:
  - toCIDR: [1.0.0.0/8]
specs:
- endpointSelector: {}
  egress: [{toEntities: [all]}]
"#;
    let p: CiliumNetworkPolicy = serde_yaml_ng::from_str(yaml).expect("parses");
    let rules = p.rules();
    assert_eq!(rules.len(), 2);
    let r = rules[0];
    let ing = r.ingress.as_ref().expect("ingress");
    let ports = &ing[0].to_ports.as_ref().expect("toPorts")[0].ports;
    assert_eq!(ports[0].port, "80");
    assert_eq!(
        ports[1].port, "81",
        "a bare number is read as Cilium's string"
    );
    assert_eq!(ports[1].end_port, Some(90));
    assert_eq!(ports[2].port, "http");
    let icmp = &ing[1].icmps.as_ref().expect("icmps")[0].fields;
    assert_eq!(icmp[1].family.as_deref(), Some("IPv6"));
    assert_eq!(
        ing[0].from_cidr_set.as_ref().expect("set")[0].except,
        vec!["198.51.100.128/25"]
    );
    assert_eq!(
        r.enable_default_deny.as_ref().and_then(|d| d.egress),
        Some(false)
    );
    // Present-but-empty differs from absent (CVE-2025-64715).
    let eg = &r.egress.as_ref().expect("egress")[0];
    assert_eq!(eg.to_endpoints.as_deref(), Some(&[][..]));
    assert!(eg.to_cidr.is_none());
    assert!(eg.to_fqdns.is_some());
    let back = serde_json::to_value(&p).expect("serialises");
    assert_eq!(back["specs"][0]["egress"][0]["toEntities"][0], "all");
    assert_eq!(
        back["spec"]["ingressDeny"][0]["toPorts"][0]["ports"][0]["protocol"],
        "ANY"
    );
    assert_eq!(CiliumNetworkPolicy::kind(&()), "CiliumNetworkPolicy");
    assert_eq!(CiliumNetworkPolicy::api_version(&()), "cilium.io/v2");
}

#[test]
fn ccnp_has_node_selector_and_cluster_scope() {
    let p: CiliumClusterwideNetworkPolicy = serde_json::from_value(serde_json::json!({
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumClusterwideNetworkPolicy",
        "metadata": {"name": "host"},
        "spec": {"nodeSelector": {"matchLabels": {"role": "worker"}}, "ingress": [{"fromEntities": ["cluster"]}]}
    }))
    .expect("parses");
    assert!(p.rules()[0].node_selector.is_some());
    let crd = CiliumClusterwideNetworkPolicy::crd();
    assert_eq!(crd.spec.scope, "Cluster");
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some("ciliumclusterwidenetworkpolicies.cilium.io")
    );
    let y = serde_yaml_ng::to_string(&CiliumNetworkPolicy::crd()).expect("yaml");
    for needle in [
        "specs:",
        "ingressDeny:",
        "toCIDRSet:",
        "enableDefaultDeny:",
        "icmps:",
        "- cnp",
        "scope: Namespaced",
        "x-kubernetes-int-or-string: true",
    ] {
        assert!(y.contains(needle), "CNP CRD lacks {needle:?}");
    }
}
