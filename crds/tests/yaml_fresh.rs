//! The CRD YAML checked in under `crds/yaml/` must match the Rust types.
//! `UPDATE_GOLDEN=1 cargo test -p membrane-crds` regenerates it.

use std::path::Path;

#[test]
fn checked_in_crd_yaml_is_fresh() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("yaml");
    let update = std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1");
    let files = membrane_crds::crd_files();
    assert_eq!(files.len(), 5);
    for (name, yaml) in files {
        let path = dir.join(&name);
        if update {
            std::fs::write(&path, &yaml).expect("write CRD YAML");
            continue;
        }
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert_eq!(
            on_disk, yaml,
            "crds/yaml/{name} is stale: run UPDATE_GOLDEN=1 cargo test -p membrane-crds"
        );
    }
}

#[test]
fn crds_carry_cilium_names_and_short_names() {
    let all = membrane_crds::all_crds_yaml();
    for needle in [
        "name: ciliumenvoyconfigs.cilium.io",
        "name: ciliumclusterwideenvoyconfigs.cilium.io",
        "- cec",
        "- ccec",
        "scope: Namespaced",
        "scope: Cluster",
        "x-kubernetes-preserve-unknown-fields: true",
        "backendServices:",
        "nodeSelector:",
    ] {
        assert!(all.contains(needle), "CRD YAML lacks {needle:?}");
    }
}

#[test]
fn spec_json_shape_matches_cilium() {
    let cec: membrane_crds::CiliumEnvoyConfig = serde_json::from_value(serde_json::json!({
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumEnvoyConfig",
        "metadata": {"name": "x", "namespace": "default"},
        "spec": {
            "services": [{"name": "s", "namespace": "default", "ports": [80, 443], "listener": "l"}],
            "backendServices": [{"name": "b", "number": ["8080", "http"]}],
            "resources": [{"@type": "type.googleapis.com/envoy.config.listener.v3.Listener", "name": "l"}],
            "nodeSelector": {"matchLabels": {"a": "b"}}
        }
    }))
    .expect("Cilium-shaped CEC parses");
    assert_eq!(cec.spec.services[0].ports, vec![80, 443]);
    assert_eq!(cec.spec.backend_services[0].number, vec!["8080", "http"]);
    assert_eq!(cec.spec.resources.len(), 1);
    let back = serde_json::to_value(&cec).expect("serialises");
    assert_eq!(back["spec"]["backendServices"][0]["number"][1], "http");
}
