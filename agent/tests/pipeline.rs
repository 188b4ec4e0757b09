//! The config pipeline over a real store: EDS from EndpointSlices (port
//! names, readiness), first-come listener addresses, last good version on a
//! bad edit, node selectors, LB addresses binding Ingress listeners.

use std::collections::BTreeMap;

use membrane_agent::configs::ConfigPipeline;
use membrane_agent::envoy_pb::*;
use membrane_agent::placement::PortMap;
use membrane_store::{Kind, ObjectKey, Store, parse_documents};
use membrane_xds::type_url;

fn store_with(yaml: &str) -> Store {
    let store = Store::new();
    for obj in parse_documents(yaml).expect("valid YAML") {
        store.apply(obj);
    }
    store
}

fn cec(name: &str, port: u16, extra: &str) -> String {
    format!(
        r#"apiVersion: cilium.io/v2
kind: CiliumEnvoyConfig
metadata: {{name: {name}, namespace: default}}
spec:
  {extra}
  resources:
  - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
    name: l
    address: {{socketAddress: {{address: 127.0.0.1, portValue: {port}}}}}
    filterChains:
    - filters:
      - name: tcp
        typedConfig:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          statPrefix: t
          cluster: c
"#
    )
}

const SERVICE: &str = r#"apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: admin, port: 9000, targetPort: 9001}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, port: 8080}
- {name: admin, port: 9001}
endpoints:
- addresses: [10.0.0.1]
  conditions: {ready: true}
- addresses: [10.0.0.2]
  conditions: {ready: false}
- addresses: [10.0.0.3]
"#;

fn endpoints_of(pass: &membrane_agent::configs::ConfigPass, name: &str) -> Vec<(String, u32)> {
    let r = pass
        .resources
        .iter()
        .find(|r| r.type_url == type_url::ENDPOINT && r.name == name)
        .unwrap_or_else(|| panic!("no ClusterLoadAssignment {name}"));
    let cla: ClusterLoadAssignment = from_any(&r.body).expect("cla").expect("decodes");
    cla.endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .filter_map(|e| match &e.host_identifier {
            Some(HostIdentifier::Endpoint(ep)) => ep.address.as_ref().and_then(ip_port),
            _ => None,
        })
        .collect()
}

#[test]
fn backend_services_publish_ready_endpoints_by_port_number_and_name() {
    let store = store_with(&format!(
        "{SERVICE}---\n{}",
        cec(
            "eds",
            21001,
            "backendServices: [{name: web, number: [\"http\"]}]"
        )
    ));
    let pass = ConfigPipeline::new(PortMap::default(), BTreeMap::new()).run(&store.snapshot());
    assert!(pass.rejected.is_empty(), "{:?}", pass.rejected);
    let want = vec![("10.0.0.1".to_owned(), 8080), ("10.0.0.3".to_owned(), 8080)];
    assert_eq!(endpoints_of(&pass, "default/web:80"), want);
    assert_eq!(endpoints_of(&pass, "default/web:http"), want);
    assert!(
        !pass.resources.iter().any(|r| r.name == "default/web:9000"),
        "only the selected port is published"
    );
}

/// Creation times have whole seconds: a newcomer created in the same second
/// as the CEC serving an address, with a name that sorts first, must not
/// take the address over.
#[test]
fn the_serving_cec_keeps_an_address_contested_within_its_second() {
    let same_second = |yaml: String| {
        yaml.replace(
            "namespace: default}",
            "namespace: default, creationTimestamp: \"2026-12-01T10:00:00Z\"}",
        )
    };
    let store = store_with(&same_second(cec("zz-first", 21003, "")));
    let mut pipeline = ConfigPipeline::new(PortMap::default(), BTreeMap::new());
    let pass = pipeline.run(&store.snapshot());
    assert!(pass.rejected.is_empty(), "{:?}", pass.rejected);
    store.apply(
        parse_documents(&same_second(cec("aa-second", 21003, "")))
            .expect("yaml")
            .remove(0),
    );
    let pass = pipeline.run(&store.snapshot());
    let newcomer = ObjectKey::new(Kind::CiliumEnvoyConfig, "default", "aa-second");
    let why = pass.rejected.get(&newcomer).expect("newcomer rejected");
    assert!(why.contains("default/zz-first"), "{why}");
    assert!(
        pass.resources
            .iter()
            .any(|r| r.name == "default/zz-first/l")
    );
    assert!(
        !pass
            .resources
            .iter()
            .any(|r| r.name == "default/aa-second/l")
    );
}

#[test]
fn the_older_cec_keeps_a_contested_address() {
    let store = store_with(&cec("first", 21002, ""));
    store.apply(
        parse_documents(&cec("second", 21002, ""))
            .expect("yaml")
            .remove(0),
    );
    let pass = ConfigPipeline::new(PortMap::default(), BTreeMap::new()).run(&store.snapshot());
    let second = ObjectKey {
        kind: Kind::CiliumEnvoyConfig,
        namespace: "default".into(),
        name: "second".into(),
    };
    let why = pass.rejected.get(&second).expect("second rejected");
    assert!(
        why.contains("127.0.0.1:21002") && why.contains("default/first"),
        "{why}"
    );
    assert!(pass.resources.iter().any(|r| r.name == "default/first/l"));
    assert!(!pass.resources.iter().any(|r| r.name == "default/second/l"));
}

#[test]
fn a_bad_edit_keeps_serving_the_last_good_version() {
    let store = store_with(&cec("live", 21003, ""));
    let mut pipeline = ConfigPipeline::new(PortMap::default(), BTreeMap::new());
    let good = pipeline.run(&store.snapshot());
    assert!(good.rejected.is_empty());
    let bad = cec("live", 21003, "").replace("filterChains", "filterChainz");
    store.apply(parse_documents(&bad).expect("yaml").remove(0));
    let pass = pipeline.run(&store.snapshot());
    assert_eq!(pass.rejected.len(), 1);
    assert_eq!(
        pass.resources, good.resources,
        "last good version still published"
    );
}

#[test]
fn node_selectors_pick_nodes() {
    let store = store_with(&cec(
        "sel",
        21004,
        "nodeSelector: {matchLabels: {role: edge}}",
    ));
    let none = ConfigPipeline::new(PortMap::default(), BTreeMap::new()).run(&store.snapshot());
    assert!(none.resources.is_empty());
    let labels = BTreeMap::from([("role".to_owned(), "edge".to_owned())]);
    let edge = ConfigPipeline::new(PortMap::default(), labels).run(&store.snapshot());
    assert!(edge.resources.iter().any(|r| r.name == "default/sel/l"));
}

#[test]
fn address_less_listeners_bind_their_service_lb_address_or_a_proxy_port() {
    let store = store_with(
        r#"apiVersion: v1
kind: Service
metadata: {name: front, namespace: default}
spec:
  type: LoadBalancer
  ports: [{name: http, port: 80}, {name: https, port: 443}]
---
apiVersion: cilium.io/v2
kind: CiliumEnvoyConfig
metadata: {name: bound, namespace: default}
spec:
  services: [{name: front, ports: [80, 443]}]
  resources:
  - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
    name: l
---
apiVersion: cilium.io/v2
kind: CiliumEnvoyConfig
metadata: {name: free, namespace: default}
spec:
  resources:
  - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
    name: l
"#,
    );
    let key = ObjectKey {
        kind: Kind::Service,
        namespace: "default".into(),
        name: "front".into(),
    };
    assert!(store.update_status(
        &key,
        serde_json::json!({"loadBalancer": {"ingress": [{"ip": "127.0.100.9"}]}})
    ));
    let ports = PortMap {
        http: 28080,
        https: 28443,
        ..PortMap::default()
    };
    let pass = ConfigPipeline::new(ports, BTreeMap::new()).run(&store.snapshot());
    assert!(pass.rejected.is_empty(), "{:?}", pass.rejected);
    let listener = |name: &str| -> Listener {
        let r = pass
            .resources
            .iter()
            .find(|r| r.name == name)
            .expect("listener");
        from_any(&r.body).expect("listener").expect("decodes")
    };
    let bound = listener("default/bound/l");
    assert_eq!(
        bound.address.as_ref().and_then(ip_port),
        Some(("127.0.100.9".to_owned(), 28080))
    );
    assert_eq!(
        bound.additional_addresses[0]
            .address
            .as_ref()
            .and_then(ip_port),
        Some(("127.0.100.9".to_owned(), 28443))
    );
    let free = listener("default/free/l");
    let (ip, port) = free.address.as_ref().and_then(ip_port).expect("address");
    assert_eq!(ip, "127.0.0.1");
    assert!((10000..=20000).contains(&port), "proxy port {port}");
}

#[test]
fn with_the_ebpf_datapath_frontends_are_redirected_to_a_transparent_proxy_port() {
    let store = store_with(
        r#"apiVersion: v1
kind: Service
metadata: {name: front, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.30
  ports: [{name: http, port: 80}]
---
apiVersion: cilium.io/v2
kind: CiliumEnvoyConfig
metadata: {name: bound, namespace: default}
spec:
  services: [{name: front, ports: [80]}]
  resources:
  - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
    name: l
"#,
    );
    let key = ObjectKey {
        kind: Kind::Service,
        namespace: "default".into(),
        name: "front".into(),
    };
    assert!(store.update_status(
        &key,
        serde_json::json!({"loadBalancer": {"ingress": [{"ip": "127.0.100.9"}]}})
    ));
    let ports = PortMap {
        transparent: true,
        ..PortMap::default()
    };
    let pass = ConfigPipeline::new(ports, BTreeMap::new()).run(&store.snapshot());
    assert!(pass.rejected.is_empty(), "{:?}", pass.rejected);
    let r = pass
        .resources
        .iter()
        .find(|r| r.name == "default/bound/l")
        .expect("listener");
    let l: Listener = from_any(&r.body).expect("listener").expect("decodes");
    let (ip, port) = l.address.as_ref().and_then(ip_port).expect("address");
    assert_eq!(
        ip, "0.0.0.0",
        "wildcard, so Envoy reports the original destination"
    );
    assert!((10000..=20000).contains(&port), "proxy port {port}");
    assert_eq!(l.transparent.map(|b| b.value), Some(true));
    let targets: Vec<(String, String)> = pass
        .redirects
        .iter()
        .map(|(vip, to)| (vip.to_string(), to.to_string()))
        .collect();
    let to = format!("127.0.0.1:{port}");
    assert!(
        targets.contains(&("127.0.100.9:80".to_owned(), to.clone())),
        "{targets:?}"
    );
    assert!(
        targets.contains(&("10.96.0.30:80".to_owned(), to)),
        "{targets:?}"
    );
}

/// Issue 14 item 5: an EDS NACK is pinned on the Service (and its slices)
/// whose ClusterLoadAssignment Envoy refused; that Service falls back to
/// what Envoy last ACKed until its inputs change, and nothing else moves.
#[test]
fn an_eds_nack_is_pinned_on_the_service_and_its_slices() {
    use membrane_agent::configs::Quarantined;
    use membrane_agent::nack::{Nack, suspects};

    let with_cluster = cec(
        "eds",
        21011,
        "backendServices: [{name: web, number: [\"80\"]}]",
    ) + r#"  - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
    name: c
    type: EDS
    edsClusterConfig: {serviceName: default/web:80}
"#;
    let store = store_with(&format!("{SERVICE}---\n{with_cluster}"));
    let mut pipeline = ConfigPipeline::new(PortMap::default(), BTreeMap::new());
    let pass = pipeline.run(&store.snapshot());
    let web = ObjectKey::new(Kind::Service, "default", "web");
    assert_eq!(
        pass.served.get(&web),
        Some(&vec![(type_url::ENDPOINT, "default/web:80".to_owned())]),
        "only names an EDS cluster asks for"
    );
    // Envoy ACKed that version.
    pipeline.mark_acked(&web);
    let acked = endpoints_of(&pass, "default/web:80");

    // The slice changes and Envoy NACKs the new assignment.
    store.apply(
        parse_documents(&SERVICE.replace("10.0.0.1]", "10.0.0.9]"))
            .expect("yaml")
            .remove(1),
    );
    let pass = pipeline.run(&store.snapshot());
    assert_eq!(endpoints_of(&pass, "default/web:80")[0].0, "10.0.0.3");
    let snapshot = membrane_agent::build_snapshot(&pass.resources);
    let nack = Nack {
        type_url: type_url::ENDPOINT.to_owned(),
        error_detail: "malformed IP address".to_owned(),
        stream_id: 1,
        nonce: "7".to_owned(),
        subscribed: Some(["default/web:80".to_owned()].into()),
    };
    let cache = membrane_xds::SnapshotCache::new();
    let blamed = suspects(&nack, &pass.served, &snapshot, &cache, "node");
    assert_eq!(blamed, vec![web.clone()], "only the Service is blamed");
    assert_eq!(
        pipeline.quarantine(&web, "Envoy rejected its ClusterLoadAssignment".into()),
        Quarantined::New
    );

    let pass = pipeline.run(&store.snapshot());
    assert_eq!(
        endpoints_of(&pass, "default/web:80"),
        acked,
        "the ACKed assignment is served again"
    );
    let slice = ObjectKey::new(Kind::EndpointSlice, "default", "web-1");
    for key in [&web, &slice] {
        let why = pass
            .rejected
            .get(key)
            .unwrap_or_else(|| panic!("{key} not rejected: {:?}", pass.rejected));
        assert!(
            why.contains("Envoy rejected its ClusterLoadAssignment"),
            "{why}"
        );
    }
    assert!(
        !pass
            .rejected
            .keys()
            .any(|k| k.kind == Kind::CiliumEnvoyConfig)
    );

    // A new version of the slice lifts the quarantine.
    store.apply(
        parse_documents(&SERVICE.replace("10.0.0.1]", "10.0.0.8]"))
            .expect("yaml")
            .remove(1),
    );
    let pass = pipeline.run(&store.snapshot());
    assert!(pass.rejected.is_empty(), "{:?}", pass.rejected);
    assert!(
        endpoints_of(&pass, "default/web:80")
            .iter()
            .any(|(ip, _)| ip == "10.0.0.8")
    );
}

/// Issue 8 item 2: every EDS cluster gets an assignment, empty when the
/// Service, its slices or the port are missing.
#[test]
fn every_eds_cluster_gets_an_assignment() {
    let store = store_with(&cec(
        "ghosts",
        21012,
        "backendServices: [{name: ghost, number: [\"80\"]}]",
    ));
    let with_clusters = cec(
        "ghosts",
        21012,
        "backendServices: [{name: ghost, number: [\"80\"]}]",
    ) + r#"  - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
    name: opaque
    type: EDS
    edsClusterConfig: {serviceName: not-a-service}
"#;
    store.apply(parse_documents(&with_clusters).expect("yaml").remove(0));
    let pass = ConfigPipeline::new(PortMap::default(), BTreeMap::new()).run(&store.snapshot());
    assert!(pass.rejected.is_empty(), "{:?}", pass.rejected);
    assert_eq!(endpoints_of(&pass, "default/ghost:80"), vec![]);
    assert_eq!(endpoints_of(&pass, "default/ghosts/not-a-service"), vec![]);
}

/// An SDS NACK is pinned on the TLS Secret; it falls back to the version
/// Envoy last ACKed until the Secret changes.
#[test]
fn an_sds_nack_is_pinned_on_the_secret() {
    use membrane_agent::configs::Quarantined;

    let secret = |host: &str| {
        let (crt, key) = membrane_certs::self_signed(&[host]).expect("issue");
        let indent = |t: &str| {
            t.lines()
                .map(|l| format!("    {l}"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: tls, namespace: default}}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}\n  tls.key: |\n{}\n",
            indent(&crt),
            indent(&key)
        )
    };
    let store = store_with(&secret("a.example"));
    let mut pipeline = ConfigPipeline::new(PortMap::default(), BTreeMap::new());
    let key = ObjectKey::new(Kind::Secret, "default", "tls");
    let pass = pipeline.run(&store.snapshot());
    assert_eq!(
        pass.served.get(&key),
        Some(&vec![(type_url::SECRET, "default/tls".to_owned())])
    );
    let hash_of = |pass: &membrane_agent::configs::ConfigPass| {
        pass.resources
            .iter()
            .find(|r| r.type_url == type_url::SECRET)
            .map(|r| r.hash)
    };
    let acked = hash_of(&pass);
    pipeline.mark_acked(&key);

    store.apply(
        parse_documents(&secret("b.example"))
            .expect("yaml")
            .remove(0),
    );
    let pass = pipeline.run(&store.snapshot());
    assert_ne!(hash_of(&pass), acked);
    assert_eq!(
        pipeline.quarantine(&key, "Envoy rejected its Secret default/tls: bad".into()),
        Quarantined::New
    );
    let pass = pipeline.run(&store.snapshot());
    assert_eq!(hash_of(&pass), acked, "the ACKed version is served again");
    let why = pass.rejected.get(&key).expect("secret rejected");
    assert!(
        why.starts_with("Secret default/tls: Envoy rejected its Secret"),
        "{why}"
    );

    store.apply(
        parse_documents(&secret("c.example"))
            .expect("yaml")
            .remove(0),
    );
    let pass = pipeline.run(&store.snapshot());
    assert!(pass.rejected.is_empty(), "{:?}", pass.rejected);
}

/// Issue 14 item 6: a NACKed CEC version is retried on a growing timer,
/// sooner when another CEC changes, and cleared once Envoy accepts it.
#[test]
fn quarantined_versions_are_retried_with_backoff() {
    use membrane_agent::configs::Quarantined;
    use std::time::{Duration, Instant};

    let store = store_with(&cec("victim", 21021, ""));
    let mut pipeline = ConfigPipeline::new(PortMap::default(), BTreeMap::new());
    let victim = ObjectKey::new(Kind::CiliumEnvoyConfig, "default", "victim");
    pipeline.run(&store.snapshot());
    let t0 = Instant::now();
    assert_eq!(
        pipeline.quarantine(&victim, "busy".into()),
        Quarantined::New
    );
    let pass = pipeline.run(&store.snapshot());
    assert!(pass.rejected.contains_key(&victim));
    assert!(!pass.resources.iter().any(|r| r.name == "default/victim/l"));
    let first = pipeline.next_retry().expect("a retry is scheduled");
    assert!(first >= t0 + Duration::from_secs(4), "first retry too soon");
    assert!(!pipeline.retry_due(t0), "not due yet");

    // Due: served again as is; rejected again, the next retry waits longer.
    assert!(pipeline.retry_due(first));
    let pass = pipeline.run(&store.snapshot());
    assert!(!pass.rejected.contains_key(&victim));
    assert!(pass.resources.iter().any(|r| r.name == "default/victim/l"));
    let t1 = Instant::now();
    assert_eq!(
        pipeline.quarantine(&victim, "busy".into()),
        Quarantined::Again
    );
    let second = pipeline.next_retry().expect("scheduled");
    assert!(
        second >= t1 + Duration::from_secs(9),
        "backoff did not grow"
    );

    // Another CEC arrives (it may define what the victim needs): sooner.
    store.apply(
        parse_documents(&cec("other", 21022, ""))
            .expect("yaml")
            .remove(0),
    );
    pipeline.run(&store.snapshot());
    let soon = pipeline.next_retry().expect("scheduled");
    assert!(
        soon < t1 + Duration::from_secs(2),
        "a change did not hasten the retry"
    );

    // Accepted on retry: the quarantine is gone for good.
    assert!(pipeline.retry_due(soon));
    pipeline.run(&store.snapshot());
    pipeline.mark_acked(&victim);
    assert_eq!(pipeline.next_retry(), None);
    let pass = pipeline.run(&store.snapshot());
    assert!(pass.rejected.is_empty(), "{:?}", pass.rejected);
}
