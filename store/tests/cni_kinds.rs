//! Pod and CiliumNode objects (CNI, cluster-pool IPAM).

use membrane_store::{Kind, Object, parse_documents};

#[test]
fn pod_and_cilium_node_parse_and_keep_unknown_cilium_fields() {
    let text = r#"
apiVersion: v1
kind: Pod
metadata: {name: web, labels: {app: web}}
spec:
  containers: [{name: c, image: busybox}]
---
apiVersion: cilium.io/v2
kind: CiliumNode
metadata: {name: node-a, namespace: ignored}
spec:
  addresses: [{type: InternalIP, ip: 10.123.250.1}]
  ipam:
    podCIDRs: [10.123.1.0/24]
    pools: {}
status:
  ipam:
    pod-cidrs:
      10.123.1.0/24: {status: in-use}
    operator-status: {}
"#;
    let objs = parse_documents(text).expect("parse");
    assert_eq!(objs[0].key().to_string(), "Pod default/web");
    assert_eq!(objs[1].key().to_string(), "CiliumNode node-a");
    let Object::CiliumNode(n) = &objs[1] else {
        panic!("not a CiliumNode")
    };
    assert_eq!(n.spec.ipam.pod_cidrs, vec!["10.123.1.0/24"]);
    let status = n.status.as_ref().expect("status");
    assert_eq!(status.ipam.pod_cidrs["10.123.1.0/24"].status, "in-use");
    // Fields Cilium writes and Membrane does not read survive a round trip.
    let v = objs[1].to_value();
    assert_eq!(v["spec"]["addresses"][0]["ip"], "10.123.250.1");
    assert!(v["status"]["ipam"]["operator-status"].is_object());
    assert_eq!(Kind::parse("cn").expect("cn"), Kind::CiliumNode);
    assert_eq!(Kind::parse("po").expect("po"), Kind::Pod);
    assert!(!Kind::CiliumNode.namespaced());
}
