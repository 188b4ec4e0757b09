use super::*;
use serde_json::json;

fn svc(v: serde_json::Value) -> Service {
    serde_json::from_value(v).unwrap()
}
fn slice(v: serde_json::Value) -> EndpointSlice {
    serde_json::from_value(v).unwrap()
}

fn echo_svc() -> Service {
    svc(json!({
        "metadata": {"name": "echo", "namespace": "default"},
        "spec": {
            "type": "LoadBalancer",
            "clusterIP": "10.96.0.10",
            "clusterIPs": ["10.96.0.10", "fd00:96::10"],
            "externalIPs": ["192.0.2.7"],
            "ports": [
                {"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080},
                {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053}
            ]
        },
        "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}}
    }))
}

fn echo_slices() -> Vec<EndpointSlice> {
    vec![
        slice(json!({
            "metadata": {"name": "echo-a", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "echo"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "UDP"}],
            "endpoints": [
                {"addresses": ["10.244.1.2"], "conditions": {"ready": true}},
                {"addresses": ["10.244.2.2"]},
                {"addresses": ["10.244.3.2"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.244.4.2"], "conditions": {"ready": false, "serving": false, "terminating": true}},
                {"addresses": ["10.244.5.2"], "conditions": {"ready": false}}
            ]
        })),
        slice(json!({
            "metadata": {"name": "echo-b", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "echo"}},
            "addressType": "IPv6",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": ["fd00:244::2"]}]
        })),
        // Another namespace's Service of the same name must not leak in.
        slice(json!({
            "metadata": {"name": "echo-x", "namespace": "other",
                         "labels": {"kubernetes.io/service-name": "echo"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": ["10.244.9.9"]}]
        })),
    ]
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn cfg() -> LbConfig {
    LbConfig {
        default_algorithm: Algorithm::Random,
        node_addresses: vec![ip("192.168.1.10")],
    }
}

#[test]
fn frontends_of_every_type_and_family() {
    let t = translate(
        &[echo_svc()],
        &echo_slices(),
        &cfg(),
        &BackendOverrides::new(),
    );
    assert!(t.errors.is_empty(), "{:?}", t.errors);
    let got: Vec<(String, &str)> = t
        .state
        .services
        .iter()
        .map(|s| (s.frontend.to_string(), s.kind.as_str()))
        .collect();
    let want = [
        ("10.96.0.10:53/UDP", "ClusterIP"),
        ("10.96.0.10:80/TCP", "ClusterIP"),
        ("192.0.2.7:53/UDP", "ExternalIPs"),
        ("192.0.2.7:80/TCP", "ExternalIPs"),
        ("192.168.1.10:30053/UDP", "NodePort"),
        ("192.168.1.10:30080/TCP", "NodePort"),
        ("198.51.100.1:53/UDP", "LoadBalancer"),
        ("198.51.100.1:80/TCP", "LoadBalancer"),
        ("[fd00:96::10]:53/UDP", "ClusterIP"),
        ("[fd00:96::10]:80/TCP", "ClusterIP"),
    ];
    let want: Vec<(String, &str)> = want.iter().map(|(a, b)| (a.to_string(), *b)).collect();
    assert_eq!(got, want);
}

#[test]
fn backend_states_from_conditions_and_ports_by_name() {
    let t = translate(
        &[echo_svc()],
        &echo_slices(),
        &cfg(),
        &BackendOverrides::new(),
    );
    let fe = L3n4Addr::new(ip("10.96.0.10"), 80, Protocol::Tcp);
    let e = t.state.get(&fe).unwrap();
    let got: Vec<(String, BackendState)> = e
        .backends
        .iter()
        .map(|b| (b.addr.to_string(), b.state))
        .collect();
    assert_eq!(
        got,
        vec![
            ("10.244.1.2:8080/TCP".into(), BackendState::Active),
            ("10.244.2.2:8080/TCP".into(), BackendState::Active),
            ("10.244.3.2:8080/TCP".into(), BackendState::Terminating),
        ]
    );
    let udp = t
        .state
        .get(&L3n4Addr::new(ip("10.96.0.10"), 53, Protocol::Udp))
        .unwrap();
    assert_eq!(udp.backends[0].addr.to_string(), "10.244.1.2:5353/UDP");
    let v6 = t
        .state
        .get(&L3n4Addr::new(ip("fd00:96::10"), 80, Protocol::Tcp))
        .unwrap();
    assert_eq!(v6.backends.len(), 1);
    assert_eq!(v6.backends[0].addr.to_string(), "[fd00:244::2]:8080/TCP");
    // No IPv6 UDP port in the IPv6 slice: the frontend exists with no backends.
    let v6udp = t
        .state
        .get(&L3n4Addr::new(ip("fd00:96::10"), 53, Protocol::Udp))
        .unwrap();
    assert!(v6udp.backends.is_empty());
}

#[test]
fn overrides_quarantine_and_maintenance_never_selected() {
    let mut ov = BackendOverrides::new();
    ov.insert(
        L3n4Addr::new(ip("10.244.1.2"), 8080, Protocol::Tcp),
        BackendState::Quarantined,
    );
    ov.insert(
        L3n4Addr::new(ip("10.244.2.2"), 8080, Protocol::Tcp),
        BackendState::Maintenance,
    );
    let t = translate(&[echo_svc()], &echo_slices(), &cfg(), &ov);
    let e = t
        .state
        .get(&L3n4Addr::new(ip("10.96.0.10"), 80, Protocol::Tcp))
        .unwrap();
    assert_eq!(e.backends[0].state, BackendState::Quarantined);
    assert_eq!(e.backends[1].state, BackendState::Maintenance);
    // Only the terminating one is left, so it takes new flows.
    let sel: Vec<String> = e.selectable().iter().map(|b| b.addr.to_string()).collect();
    assert_eq!(sel, vec!["10.244.3.2:8080/TCP"]);
}

#[test]
fn terminating_only_when_no_active() {
    let t = translate(
        &[echo_svc()],
        &echo_slices(),
        &cfg(),
        &BackendOverrides::new(),
    );
    let e = t
        .state
        .get(&L3n4Addr::new(ip("10.96.0.10"), 80, Protocol::Tcp))
        .unwrap();
    let sel: Vec<String> = e.selectable().iter().map(|b| b.addr.to_string()).collect();
    assert_eq!(sel, vec!["10.244.1.2:8080/TCP", "10.244.2.2:8080/TCP"]);
}

#[test]
fn algorithm_annotation_default_and_error() {
    let mut s = echo_svc();
    let t = translate(&[s.clone()], &[], &cfg(), &BackendOverrides::new());
    assert!(
        t.state
            .services
            .iter()
            .all(|e| e.algorithm == Algorithm::Random)
    );

    let c = LbConfig {
        default_algorithm: Algorithm::Maglev,
        ..cfg()
    };
    let t = translate(&[s.clone()], &[], &c, &BackendOverrides::new());
    assert!(
        t.state
            .services
            .iter()
            .all(|e| e.algorithm == Algorithm::Maglev)
    );

    s.metadata.annotations = Some(
        [(ANNOTATION_LB_ALGORITHM.to_string(), "maglev".to_string())]
            .into_iter()
            .collect(),
    );
    let t = translate(&[s.clone()], &[], &cfg(), &BackendOverrides::new());
    assert!(
        t.state
            .services
            .iter()
            .all(|e| e.algorithm == Algorithm::Maglev)
    );

    s.metadata.annotations = Some(
        [(
            ANNOTATION_LB_ALGORITHM.to_string(),
            "roundrobin".to_string(),
        )]
        .into_iter()
        .collect(),
    );
    let t = translate(&[s], &[], &cfg(), &BackendOverrides::new());
    assert_eq!(t.errors.len(), 1);
    let msg = t.errors[0].to_string();
    assert!(msg.contains("default/echo"), "{msg}");
    assert!(msg.contains("service.cilium.io/lb-algorithm"), "{msg}");
    assert!(msg.contains("roundrobin"), "{msg}");
    assert!(
        t.state
            .services
            .iter()
            .all(|e| e.algorithm == Algorithm::Random)
    );
}

#[test]
fn session_affinity() {
    let mut s = echo_svc();
    let spec = s.spec.as_mut().unwrap();
    spec.session_affinity = Some("ClientIP".into());
    let t = translate(&[s.clone()], &[], &cfg(), &BackendOverrides::new());
    assert!(
        t.state
            .services
            .iter()
            .all(|e| e.affinity_timeout == Some(DEFAULT_AFFINITY_TIMEOUT_SECS))
    );
    let spec = s.spec.as_mut().unwrap();
    spec.session_affinity_config =
        serde_json::from_value(json!({"clientIP": {"timeoutSeconds": 30}})).unwrap();
    let t = translate(&[s], &[], &cfg(), &BackendOverrides::new());
    assert!(
        t.state
            .services
            .iter()
            .all(|e| e.affinity_timeout == Some(30))
    );
    let t = translate(&[echo_svc()], &[], &cfg(), &BackendOverrides::new());
    assert!(
        t.state
            .services
            .iter()
            .all(|e| e.affinity_timeout.is_none())
    );
}

#[test]
fn headless_externalname_and_bad_fields() {
    let headless = svc(json!({
        "metadata": {"name": "h", "namespace": "default"},
        "spec": {"clusterIP": "None", "ports": [{"port": 80}]}
    }));
    let ext = svc(json!({
        "metadata": {"name": "e", "namespace": "default"},
        "spec": {"type": "ExternalName", "externalName": "example.com"}
    }));
    let bad = svc(json!({
        "metadata": {"name": "bad", "namespace": "ns1"},
        "spec": {"clusterIP": "10.96.0.99", "externalIPs": ["not-an-ip"],
                 "ports": [{"port": 80, "protocol": "ICMP"}, {"port": 81}]}
    }));
    let t = translate(&[headless, ext, bad], &[], &cfg(), &BackendOverrides::new());
    let fes: Vec<String> = t
        .state
        .services
        .iter()
        .map(|e| e.frontend.to_string())
        .collect();
    assert_eq!(fes, vec!["10.96.0.99:81/TCP"]);
    let errs: Vec<String> = t.errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert!(errs[0].contains("ns1/bad") && errs[0].contains("spec.externalIPs[0]"));
    assert!(errs[1].contains("spec.ports[0].protocol"));
}

#[test]
fn duplicate_frontend_reported_first_wins() {
    let a = svc(json!({"metadata": {"name": "a", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.5", "ports": [{"port": 80}]}}));
    let b = svc(json!({"metadata": {"name": "b", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.5", "ports": [{"port": 80}]}}));
    let t = translate(&[a, b], &[], &cfg(), &BackendOverrides::new());
    assert_eq!(t.state.services.len(), 1);
    assert_eq!(t.state.services[0].name.name, "a");
    assert_eq!(t.errors.len(), 1);
    assert!(t.errors[0].to_string().contains("default/b"));
}

#[test]
fn unnamed_port_matches_unnamed_slice_port() {
    let s = svc(json!({"metadata": {"name": "u", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.6", "ports": [{"port": 80}]}}));
    let sl = slice(json!({
        "metadata": {"name": "u-1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "u"}},
        "addressType": "IPv4",
        "ports": [{"port": 9000}],
        "endpoints": [{"addresses": ["10.244.7.7"]}]
    }));
    let t = translate(&[s], &[sl], &cfg(), &BackendOverrides::new());
    assert_eq!(
        t.state.services[0].backends[0].addr.to_string(),
        "10.244.7.7:9000/TCP"
    );
}

#[test]
fn maglev_table_matches_cilium_check_vector() {
    // The vector: M=251, 10.0.0.{1,2,3}:80 with ids 1..3.
    let s = svc(json!({"metadata": {"name": "m", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.7", "ports": [{"port": 80}]}}));
    let sl = slice(json!({
        "metadata": {"name": "m-1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "m"}},
        "addressType": "IPv4",
        "ports": [{"port": 80}],
        "endpoints": [{"addresses": ["10.0.0.3"]}, {"addresses": ["10.0.0.1"]}, {"addresses": ["10.0.0.2"]}]
    }));
    let t = translate(&[s], &[sl], &cfg(), &BackendOverrides::new());
    let e = &t.state.services[0];
    let cfg = MaglevConfig::from_seed_b64(251, crate::maglev::DEFAULT_HASH_SEED).unwrap();
    let table = e.maglev_table(&cfg, |a| match a.addr.to_string().as_str() {
        "10.0.0.1" => 1,
        "10.0.0.2" => 2,
        _ => 3,
    });
    assert_eq!(table.len(), 251);
    assert!(crate::maglev::rle(&table).starts_with("2(2),1(2),2(1),3(1),2(2),1(1),3(3)"));
    // A quarantined backend gets no slot.
    let mut e2 = e.clone();
    e2.backends[2].state = BackendState::Quarantined;
    let t2 = e2.maglev_table(&cfg, |a| {
        if a.addr.to_string() == "10.0.0.1" {
            1
        } else {
            2
        }
    });
    assert!(t2.iter().all(|id| *id == 1 || *id == 2));
    assert!(!t2.contains(&3));
}

fn mesh_entry(affinity: &str) -> ServiceEntry {
    let s = svc(json!({"metadata": {"name": "g", "namespace": "default",
            "annotations": {"service.cilium.io/global": "true", "service.cilium.io/affinity": affinity}},
        "spec": {"clusterIP": "10.96.0.8", "ports": [{"port": 80}]}}));
    let sl = slice(json!({
        "metadata": {"name": "g-1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "g"}},
        "addressType": "IPv4",
        "ports": [{"port": 80}],
        "endpoints": [{"addresses": ["10.0.0.1"]}, {"addresses": ["10.0.0.2"]}]
    }));
    let t = translate(&[s], &[sl], &cfg(), &BackendOverrides::new());
    assert!(t.errors.is_empty(), "{:?}", t.errors);
    let mut e = t.state.services[0].clone();
    // Two remote backends from cluster 2, as the Cluster Mesh merge adds them.
    for a in ["10.1.0.1", "10.1.0.2"] {
        e.backends.push(Backend {
            addr: L3n4Addr::new(ip(a), 80, Protocol::Tcp),
            state: BackendState::Active,
            weight: DEFAULT_BACKEND_WEIGHT,
            cluster_id: 2,
        });
    }
    e
}

fn selected(e: &ServiceEntry) -> Vec<String> {
    e.selectable()
        .iter()
        .map(|b| b.addr.addr.to_string())
        .collect()
}

#[test]
fn affinity_from_annotations_only_on_global_services() {
    assert_eq!(mesh_entry("local").affinity, Affinity::Local);
    assert_eq!(mesh_entry("remote").affinity, Affinity::Remote);
    assert_eq!(mesh_entry("none").affinity, Affinity::None);
    let s = svc(json!({"metadata": {"name": "n", "namespace": "default",
            "annotations": {"service.cilium.io/affinity": "local"}},
        "spec": {"clusterIP": "10.96.0.9", "ports": [{"port": 80}]}}));
    let t = translate(&[s], &[], &cfg(), &BackendOverrides::new());
    assert_eq!(t.state.services[0].affinity, Affinity::None);
}

#[test]
fn affinity_none_uses_every_cluster() {
    let e = mesh_entry("none");
    assert_eq!(
        selected(&e),
        ["10.0.0.1", "10.0.0.2", "10.1.0.1", "10.1.0.2"]
    );
    assert!(e.backends.iter().all(|b| !e.is_preferred(b)));
}

#[test]
fn affinity_local_falls_back_to_remote_only_without_a_healthy_local() {
    let mut e = mesh_entry("local");
    assert_eq!(selected(&e), ["10.0.0.1", "10.0.0.2"]);
    let preferred: Vec<bool> = e.backends.iter().map(|b| e.is_preferred(b)).collect();
    assert_eq!(preferred, [true, true, false, false]);
    // One local left: still only local.
    e.backends[0].state = BackendState::Quarantined;
    assert_eq!(selected(&e), ["10.0.0.2"]);
    // No healthy local (quarantined, maintenance): remote ones.
    e.backends[1].state = BackendState::Maintenance;
    assert_eq!(selected(&e), ["10.1.0.1", "10.1.0.2"]);
    // A terminating local is not healthy either.
    e.backends[1].state = BackendState::Terminating;
    assert_eq!(selected(&e), ["10.1.0.1", "10.1.0.2"]);
    // Local comes back: remote ones are dropped again.
    e.backends[0].state = BackendState::Active;
    assert_eq!(selected(&e), ["10.0.0.1"]);
}

#[test]
fn affinity_remote_is_the_reverse() {
    let mut e = mesh_entry("remote");
    assert_eq!(selected(&e), ["10.1.0.1", "10.1.0.2"]);
    e.backends.retain(|b| b.cluster_id == 0);
    assert_eq!(selected(&e), ["10.0.0.1", "10.0.0.2"]);
}

#[test]
fn affinity_nothing_active_anywhere_keeps_terminating_fallback() {
    let mut e = mesh_entry("local");
    for b in &mut e.backends {
        b.state = BackendState::Terminating;
    }
    assert_eq!(selected(&e).len(), 4);
}

#[test]
fn maglev_over_the_selected_set_hashes_remote_backends_with_cluster_id() {
    let cfg = MaglevConfig::from_seed_b64(251, crate::maglev::DEFAULT_HASH_SEED).unwrap();
    let id = |a: &L3n4Addr| match a.addr.to_string().as_str() {
        "10.0.0.1" => 1,
        "10.0.0.2" => 2,
        "10.1.0.1" => 3,
        _ => 4,
    };
    let local = mesh_entry("local").maglev_table(&cfg, id);
    assert!(local.iter().all(|i| *i == 1 || *i == 2));
    let remote = mesh_entry("remote").maglev_table(&cfg, id);
    assert!(remote.iter().all(|i| *i == 3 || *i == 4));
    // The table equals Maglev over the same backends with `ip@2` hash strings.
    let mb: Vec<crate::maglev::MaglevBackend> = ["10.1.0.1", "10.1.0.2"]
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let mut b = crate::maglev::MaglevBackend::new(ip(a), 80, 3 + i as u32);
            b.cluster_id = 2;
            b
        })
        .collect();
    assert_eq!(mb[0].hash_string(), "[10.1.0.1@2:80/TCP,State:active]");
    assert_eq!(remote, crate::maglev::lookup_table(&cfg, &mb));
    let none = mesh_entry("none").maglev_table(&cfg, id);
    for want in 1..=4 {
        assert!(none.contains(&want));
    }
}
