//! CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy and NetworkPolicy
//! are store kinds: parsed with strict field checking, keyed and scoped.

use membrane_store::{Kind, Object, parse_documents};

#[test]
fn policy_kinds_parse_strictly_and_round_trip() {
    let text = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress:
  - fromCIDRSet: [{cidr: 192.0.2.0/24, except: []}]
    toPorts: [{ports: [{port: 80, protocol: TCP}], serverNames: []}]
  ingressDeny: [{fromEntities: [world]}]
  enableDefaultDeny: {ingress: true}
specs:
- endpointSelector: {}
  egress: [{toEndpoints: [], icmps: [{fields: [{type: EchoRequest, family: IPv6}]}]}]
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: c}
spec:
  nodeSelector: {}
  egressDeny: [{toCIDR: [1.0.0.0/8]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: n, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress]
  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}], ports: [{port: http}]}]
"#;
    let objs = parse_documents(text).expect("parses");
    let kinds: Vec<Kind> = objs.iter().map(Object::kind).collect();
    assert_eq!(
        kinds,
        vec![
            Kind::CiliumNetworkPolicy,
            Kind::CiliumClusterwideNetworkPolicy,
            Kind::NetworkPolicy
        ]
    );
    assert_eq!(objs[0].key().to_string(), "CiliumNetworkPolicy x/p");
    assert_eq!(objs[1].key().namespace, "");
    let v = objs[0].to_value();
    assert_eq!(
        v["specs"][0]["egress"][0]["toEndpoints"],
        serde_json::json!([])
    );
    assert_eq!(
        v["spec"]["ingress"][0]["toPorts"][0]["ports"][0]["port"],
        "80"
    );
    let back = Object::from_value(v).expect("round trip");
    assert_eq!(back, objs[0]);
    for (s, k) in [
        ("cnp", Kind::CiliumNetworkPolicy),
        ("ccnp", Kind::CiliumClusterwideNetworkPolicy),
        ("netpol", Kind::NetworkPolicy),
    ] {
        assert_eq!(Kind::parse(s).expect("kind"), k);
    }
}

#[test]
fn misspelt_policy_field_is_named() {
    let err = parse_documents(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p, namespace: x}
spec:
  endpointSelector: {}
  ingress: [{fromEndpoint: [{}]}]
"#,
    )
    .expect_err("unknown field");
    assert!(
        err.to_string().contains("spec.ingress[0].fromEndpoint"),
        "{err}"
    );
}
