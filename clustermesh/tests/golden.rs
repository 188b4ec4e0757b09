//! Golden tests: the exact bytes Cilium's agent writes and reads.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use membrane_clustermesh::export::cluster_service;
use membrane_clustermesh::merge::merge_remote;
use membrane_clustermesh::{ClusterConfig, ClusterService, keys};
use membrane_lb::service::{BackendOverrides, LbConfig, ServiceName, translate};
use serde_json::json;

/// `json.Marshal(ClusterService)` as Cilium's agent writes it for a global
/// service with one named port and two backends (Go: struct field order,
/// sorted map keys, no spaces, `hostnames`/`zones` omitted when empty).
const CILIUM_ECHO: &str = r#"{"cluster":"cluster1","namespace":"default","name":"echo","frontends":{"10.96.0.10":{"http":{"Protocol":"TCP","Port":80}}},"backends":{"10.244.1.2":{"http":{"Protocol":"TCP","Port":8080}},"10.244.1.3":{"http":{"Protocol":"TCP","Port":8080}}},"labels":{"app":"echo"},"selector":{"app":"echo"},"includeExternal":true,"shared":true,"clusterID":1}"#;

fn echo(annotations: serde_json::Value) -> (Service, EndpointSlice) {
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "echo", "namespace": "default", "labels": {"app": "echo"},
                     "annotations": annotations},
        "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "selector": {"app": "echo"},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    }))
    .unwrap();
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "echo-1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "echo"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": ["10.244.1.3"]},
            {"addresses": ["10.244.1.2"], "conditions": {"ready": true}},
            {"addresses": ["10.244.1.9"], "conditions": {"ready": false}},
            {"addresses": ["10.244.1.8"], "conditions": {"ready": true, "terminating": true}}
        ]
    }))
    .unwrap();
    (svc, slice)
}

#[test]
fn export_writes_ciliums_bytes() {
    let (svc, slice) = echo(json!({"service.cilium.io/global": "true"}));
    let cs = cluster_service(&svc, &[slice], "cluster1", 1).expect("global service is exported");
    assert_eq!(cs.to_json(), CILIUM_ECHO);
    assert_eq!(
        keys::service_key(&cs.cluster, &cs.namespace, &cs.name),
        "cilium/state/services/v1/cluster1/default/echo"
    );
}

#[test]
fn legacy_global_annotation_exports_too() {
    let (svc, slice) = echo(json!({"io.cilium/global-service": "true"}));
    assert_eq!(
        cluster_service(&svc, &[slice], "cluster1", 1)
            .unwrap()
            .to_json(),
        CILIUM_ECHO
    );
}

#[test]
fn not_global_or_not_shared_is_not_exported() {
    for ann in [
        json!({}),
        json!({"service.cilium.io/global": "false"}),
        json!({"service.cilium.io/global": "true", "service.cilium.io/shared": "false"}),
        json!({"io.cilium/global-service": "true", "io.cilium/shared-service": "false"}),
    ] {
        let (svc, slice) = echo(ann.clone());
        assert!(
            cluster_service(&svc, &[slice], "cluster1", 1).is_none(),
            "{ann}"
        );
    }
}

#[test]
fn import_reads_ciliums_bytes_and_round_trips() {
    let key = "cilium/state/services/v1/cluster1/default/echo";
    let cs = ClusterService::from_kv(key, CILIUM_ECHO.as_bytes(), "cluster1", 1).unwrap();
    assert_eq!(cs.backends.len(), 2);
    assert_eq!(cs.backends["10.244.1.2"]["http"].port, 8080);
    assert_eq!(cs.to_json(), CILIUM_ECHO);
    // Hostnames and zones, when Cilium writes them, survive the round trip.
    let with_extras = CILIUM_ECHO.replace(
        r#","labels""#,
        r#","hostnames":{"10.244.1.2":"echo-0"},"zones":{"10.244.1.2":{"zone":"a","forZones":[{"name":"a"}]}},"labels""#,
    );
    let cs = ClusterService::from_kv(key, with_extras.as_bytes(), "cluster1", 1).unwrap();
    assert_eq!(cs.to_json(), with_extras);
}

#[test]
fn import_validation_names_key_and_reason() {
    let key = "cilium/state/services/v1/cluster1/default/echo";
    let cases = [
        (
            key,
            CILIUM_ECHO.to_string(),
            "cluster2",
            1,
            "unexpected cluster name",
        ),
        (
            key,
            CILIUM_ECHO.to_string(),
            "cluster1",
            7,
            "unexpected cluster ID",
        ),
        (
            "cilium/state/services/v1/cluster1/default/other",
            CILIUM_ECHO.to_string(),
            "cluster1",
            1,
            "does not match key",
        ),
        (
            key,
            CILIUM_ECHO.replace("\"clusterID\":1", "\"clusterID\":0"),
            "cluster1",
            1,
            "reserved",
        ),
        (
            key,
            CILIUM_ECHO.replace("\"clusterID\":1", "\"clusterID\":300"),
            "cluster1",
            1,
            "above 255",
        ),
        (
            key,
            CILIUM_ECHO.replace("10.244.1.2", "not-an-ip"),
            "cluster1",
            1,
            "not an IP",
        ),
        (
            key,
            CILIUM_ECHO.replace("\"name\":\"echo\"", "\"name\":\"\""),
            "cluster1",
            1,
            "name is unset",
        ),
        (key, "{".to_string(), "cluster1", 1, "not a ClusterService"),
    ];
    for (k, v, cluster, id, want) in cases {
        let e = ClusterService::from_kv(k, v.as_bytes(), cluster, id).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with(&format!("ClusterService {k}: ")), "{msg}");
        assert!(msg.contains(want), "{msg} should contain {want}");
    }
}

#[test]
fn cluster_config_bytes() {
    assert_eq!(
        ClusterConfig::membrane(3).to_json(),
        r#"{"id":3,"capabilities":{"syncedCanaries":true,"maxConnectedClusters":255}}"#
    );
    // What an older Cilium writes: no capabilities worth mentioning.
    let c = ClusterConfig::parse_remote("c2", br#"{"id":2,"capabilities":{}}"#).unwrap();
    assert_eq!(c.id, 2);
    let c = ClusterConfig::parse_remote(
        "c2",
        br#"{"id":2,"capabilities":{"syncedCanaries":true,"cached":true,"maxConnectedClusters":255,"serviceExportsEnabled":false}}"#,
    )
    .unwrap();
    assert!(c.capabilities.cached && c.capabilities.synced_canaries);
    assert_eq!(c.capabilities.service_exports_enabled, Some(false));
    assert_eq!(
        c.to_json(),
        r#"{"id":2,"capabilities":{"syncedCanaries":true,"cached":true,"maxConnectedClusters":255,"serviceExportsEnabled":false}}"#
    );
    for (v, want) in [
        (r#"{"capabilities":{}}"#, "reserved"),
        (r#"{"id":256}"#, "above 255"),
        (
            r#"{"id":2,"capabilities":{"maxConnectedClusters":511}}"#,
            "maxConnectedClusters",
        ),
    ] {
        let e = ClusterConfig::parse_remote("c2", v.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("cluster config of c2: ") && e.contains(want),
            "{e}"
        );
    }
}

#[test]
fn cluster_names_and_ids() {
    use membrane_clustermesh::{validate_cluster_id, validate_cluster_name};
    assert!(validate_cluster_id(0).unwrap_err().contains("reserved"));
    assert!(validate_cluster_id(1).is_ok() && validate_cluster_id(255).is_ok());
    assert!(validate_cluster_id(256).is_err());
    for ok in ["c1", "cluster-2", "a", &"x".repeat(32)] {
        assert!(validate_cluster_name(ok).is_ok(), "{ok}");
    }
    for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"x".repeat(33)] {
        assert!(validate_cluster_name(bad).is_err(), "{bad}");
    }
}

#[test]
fn remote_backends_merge_into_the_local_global_service() {
    let (svc, slice) =
        echo(json!({"service.cilium.io/global": "true", "service.cilium.io/affinity": "local"}));
    let mut t = translate(
        &[svc],
        &[slice],
        &LbConfig::default(),
        &BackendOverrides::new(),
    );
    let remote = ClusterService::from_kv(
        "cilium/state/services/v1/cluster2/default/echo",
        CILIUM_ECHO
            .replace("cluster1", "cluster2")
            .replace("\"clusterID\":1", "\"clusterID\":2")
            .replace("10.244.1.", "10.245.1.")
            // One address the local cluster also has: not added twice.
            .replacen("10.245.1.3", "10.244.1.3", 1)
            .as_bytes(),
        "cluster2",
        2,
    )
    .unwrap();
    let global: BTreeSet<ServiceName> = [ServiceName {
        namespace: "default".into(),
        name: "echo".into(),
    }]
    .into();
    assert_eq!(merge_remote(&mut t.state, &global, [&remote]), 1);
    let e = &t.state.services[0];
    let bes: Vec<(String, u32)> = e
        .backends
        .iter()
        .map(|b| (b.addr.to_string(), b.cluster_id))
        .collect();
    assert_eq!(
        bes,
        [
            ("10.244.1.2:8080/TCP".to_string(), 0),
            ("10.244.1.3:8080/TCP".to_string(), 0),
            // Terminating locally: kept in the model, never exported.
            ("10.244.1.8:8080/TCP".to_string(), 0),
            ("10.245.1.2:8080/TCP".to_string(), 2)
        ]
    );
    // Merging is idempotent (a resync adds nothing).
    let mut again = t.state.clone();
    assert_eq!(merge_remote(&mut again, &global, [&remote]), 0);
    // A non-global local service takes no remote backends.
    let mut other = t.state.clone();
    assert_eq!(merge_remote(&mut other, &BTreeSet::new(), [&remote]), 0);
}
