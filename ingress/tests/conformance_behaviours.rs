//! Behaviours the Ingress conformance suite observes through Envoy, pinned
//! at the translation level: the configuration must leave Envoy's `Server`
//! header in place (the suite requires one; the echo backend sends none),
//! must not add filters that re-frame responses (the suite requires a
//! Content-Length, never chunked), and must order routes so Exact beats
//! Prefix and a longer prefix beats a shorter one.

use k8s_openapi::api::networking::v1::Ingress;
use membrane_ingress::{TranslateOptions, translate};
use serde_json::Value;

fn cec_resources(yaml: &str) -> Vec<Value> {
    let ing: Ingress = serde_yaml_ng::from_str(yaml).expect("Ingress YAML");
    let t = translate(&ing, &TranslateOptions::default()).expect("translates");
    t.cec
        .spec
        .config
        .resources
        .iter()
        .map(membrane_crds::EnvoyResource::to_value)
        .collect()
}

const PATHS: &str = r#"
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: order, namespace: ns}
spec:
  rules:
  - host: exact-path-rules
    http:
      paths:
      - {path: /foo, pathType: Prefix, backend: {service: {name: prefix, port: {number: 8080}}}}
      - {path: /foo, pathType: Exact, backend: {service: {name: exact, port: {number: 8080}}}}
      - {path: /, pathType: Prefix, backend: {service: {name: root, port: {number: 8080}}}}
      - {path: /foo/bar/, pathType: Prefix, backend: {service: {name: longer, port: {number: 8080}}}}
"#;

fn hcms(resources: &[Value]) -> Vec<&Value> {
    resources
        .iter()
        .filter(|r| r["@type"].as_str().is_some_and(|t| t.ends_with("Listener")))
        .flat_map(|l| l["filterChains"].as_array().into_iter().flatten())
        .flat_map(|c| c["filters"].as_array().into_iter().flatten())
        .map(|f| &f["typedConfig"])
        .collect()
}

#[test]
fn envoy_keeps_its_server_header_and_response_framing() {
    let resources = cec_resources(PATHS);
    let hcms = hcms(&resources);
    assert!(!hcms.is_empty());
    for hcm in hcms {
        // Default OVERWRITE makes Envoy add `server: envoy`; PASS_THROUGH
        // would leave none because the backend sends none.
        let transform = hcm["serverHeaderTransformation"]
            .as_str()
            .unwrap_or("OVERWRITE");
        assert_eq!(transform, "OVERWRITE", "{hcm}");
        for f in hcm["httpFilters"].as_array().into_iter().flatten() {
            let name = f["name"].as_str().unwrap_or_default();
            assert!(
                !name.contains("compressor") && !name.contains("buffer"),
                "filter {name} would re-frame responses"
            );
        }
    }
}

#[test]
fn exact_beats_prefix_and_longer_prefixes_come_first() {
    let resources = cec_resources(PATHS);
    let routes = resources
        .iter()
        .find(|r| r["name"] == "listener-insecure")
        .expect("listener-insecure");
    let vhost = routes["virtualHosts"]
        .as_array()
        .and_then(|v| v.iter().find(|h| h["name"] == "exact-path-rules"))
        .expect("vhost");
    let order: Vec<String> = vhost["routes"]
        .as_array()
        .expect("routes")
        .iter()
        .map(|r| {
            let m = &r["match"];
            let cluster = r["route"]["cluster"].as_str().unwrap_or_default();
            if let Some(p) = m["path"].as_str() {
                format!("exact {p} -> {cluster}")
            } else if let Some(p) = m["pathSeparatedPrefix"].as_str() {
                format!("prefix {p} -> {cluster}")
            } else {
                format!(
                    "prefix {} -> {cluster}",
                    m["prefix"].as_str().unwrap_or_default()
                )
            }
        })
        .collect();
    assert_eq!(
        order,
        [
            "exact /foo -> ns:exact:8080",
            "prefix /foo/bar -> ns:longer:8080",
            "prefix /foo -> ns:prefix:8080",
            "prefix / -> ns:root:8080",
        ]
    );
}
