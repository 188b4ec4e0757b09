//! Scale of the control-plane side: 1,000 endpoints and 10,000 rules,
//! resolved and compiled for every endpoint. Ignored by default (it is a
//! measurement); `cargo test -p membrane-policy --test scale -- --ignored --nocapture`.

use std::collections::BTreeMap;
use std::time::Instant;

use membrane_policy::{Cluster, Endpoint, Identities, PolicySet, State};
use serde_json::json;

#[test]
#[ignore = "a measurement for docs/benchmarks.md, not a check; run with --ignored --nocapture"]
fn thousand_endpoints_ten_thousand_rules() {
    let mut c = Cluster {
        allow_localhost: true,
        ..Cluster::default()
    };
    for ns in 0..10 {
        c.namespaces.insert(
            format!("ns{ns}"),
            BTreeMap::from([("team".to_string(), format!("t{}", ns % 3))]),
        );
    }
    for i in 0..1000u32 {
        c.endpoints.push(Endpoint {
            id: i + 1,
            name: format!("p{i}"),
            namespace: format!("ns{}", i % 10),
            labels: BTreeMap::from([
                ("app".to_string(), format!("app{}", i % 100)),
                ("pod".to_string(), format!("p{i}")),
            ]),
            ips: vec![
                format!("10.124.{}.{}", i / 250, 1 + i % 250)
                    .parse()
                    .expect("ip"),
            ],
            named_ports: Vec::new(),
        });
    }
    let t0 = Instant::now();
    let mut set = PolicySet::default();
    // 1,000 policies of 10 rules: app k may talk to apps k+1..k+10 on a port range.
    for p in 0..1000 {
        let rules: Vec<_> = (0..10)
            .map(|r| json!({"fromEndpoints": [{"matchLabels": {"app": format!("app{}", (p + r + 1) % 100)}}],
                            "toPorts": [{"ports": [{"port": "8000", "endPort": 8000 + r * 7, "protocol": "TCP"}]}]}))
            .collect();
        let cnp = json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": format!("p{p}"), "namespace": format!("ns{}", p % 10)},
            "spec": {"endpointSelector": {"matchLabels": {"app": format!("app{}", p % 100)}}, "ingress": rules}});
        set.add_cnp(&serde_json::from_value(cnp).expect("cnp"));
    }
    assert_eq!(set.rules.len(), 10_000);
    let t1 = Instant::now();
    let s = State::build(&c, set, Identities::default());
    let t2 = Instant::now();
    let mut entries = 0;
    for ep in 1..=1000 {
        entries += s.compile(ep).expect("ep").entries.len();
    }
    let t3 = Instant::now();
    let one = Instant::now();
    let _ = s.compile(500).expect("ep");
    let one = one.elapsed();
    println!(
        "translate {:?}, resolve (identities, ipcache, peers) {:?}, compile 1000 endpoints {:?} ({entries} entries), one endpoint {:?}",
        t1 - t0,
        t2 - t1,
        t3 - t2,
        one
    );
    assert!(entries > 0);
}
