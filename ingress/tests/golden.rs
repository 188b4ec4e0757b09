//! Golden tests: `testdata/<case>/input.yaml` (one or more Ingress documents)
//! → `testdata/<case>/output-cec.yaml`: one CEC per dedicated-mode Ingress in
//! input order, then the shared CEC when any Ingress is in shared mode
//! (`ingress.cilium.io/loadbalancer-mode: shared`). Ingresses left out are
//! listed in `output-rejected.txt`, which exists only when there are any.
//! `output-service.yaml` holds the generated Services in the same order.
//! An optional `options.yaml` sets controller options (the `membrane up`
//! flags): `default_secret: {namespace, name}`, `proxy_protocol: true`,
//! `host_network_shared_listener_port: 8080` (enables host network mode),
//! `host_network_node_labels: {k: v}`,
//! `lb_annotation_prefixes: [...]`.
//! `UPDATE_GOLDEN=1 cargo test -p membrane-ingress` rewrites the outputs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::networking::v1::Ingress;
use membrane_ingress::{
    HostNetwork, SecretRef, TranslateOptions, cecs_to_yaml, to_yaml, translate_cluster,
};
use serde::Deserialize;

/// Cases that must exist, so a deleted directory cannot pass silently.
const REQUIRED_CASES: &[&str] = &[
    "default-backend",
    "host-rules",
    "path-rules",
    "path-types",
    "shared-host",
    "shared-two-namespaces",
    "shared-default-backend",
    "shared-conflicts",
    "tls-passthrough",
    "shared-tls-passthrough",
    "host-network",
    "shared-host-network",
    "proxy-protocol",
    "service-type",
    "default-secret",
    "lb-annotation-prefixes",
    "invalid-annotations",
    "keep-alive",
];

/// `options.yaml` of a case.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseOptions {
    default_secret: Option<DefaultSecret>,
    #[serde(default)]
    proxy_protocol: bool,
    host_network_shared_listener_port: Option<u16>,
    #[serde(default)]
    host_network_node_labels: BTreeMap<String, String>,
    lb_annotation_prefixes: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DefaultSecret {
    namespace: String,
    name: String,
}

fn options(case: &Path) -> TranslateOptions {
    let mut opts = TranslateOptions::default();
    let Ok(text) = std::fs::read_to_string(case.join("options.yaml")) else {
        return opts;
    };
    let o: CaseOptions = serde_yaml_ng::from_str(&text).expect("options.yaml parses");
    opts.default_secret = o.default_secret.map(|s| SecretRef {
        namespace: s.namespace,
        name: s.name,
    });
    opts.proxy_protocol = o.proxy_protocol;
    opts.host_network = o
        .host_network_shared_listener_port
        .map(|shared_listener_port| HostNetwork {
            shared_listener_port,
            node_labels: o.host_network_node_labels.clone(),
            ..HostNetwork::default()
        });
    if let Some(p) = o.lb_annotation_prefixes {
        opts.lb_annotation_prefixes = p;
    }
    opts
}

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata")
}

fn parse_ingresses(text: &str) -> Vec<Ingress> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|doc| Ingress::deserialize(doc).expect("input.yaml holds Ingress documents"))
        .collect()
}

/// (CEC YAML, Service YAML, rejected Ingresses one per line).
fn render(ingresses: &[Ingress], opts: &TranslateOptions) -> (String, String, String) {
    let out = translate_cluster(ingresses, opts);
    let rejected: String = out
        .rejected
        .iter()
        .map(|r| format!("{}/{}: {}\n", r.namespace, r.name, r.error))
        .collect();
    let services: Vec<_> = out
        .dedicated
        .iter()
        .map(|t| t.service.clone())
        .chain(out.shared.iter().map(|s| s.service.clone()))
        .collect();
    (
        cecs_to_yaml(&out.cecs()).expect("YAML renders"),
        to_yaml(&services).expect("YAML renders"),
        rejected,
    )
}

fn compare(path: &Path, got: &str, update: bool, failures: &mut Vec<String>) {
    if update {
        if got.is_empty() && path.file_name().is_some_and(|n| n == "output-rejected.txt") {
            let _ = std::fs::remove_file(path);
        } else {
            std::fs::write(path, got).expect("write golden");
        }
        return;
    }
    let want = std::fs::read_to_string(path).unwrap_or_default();
    if got != want {
        failures.push(format!(
            "{}: output differs (run UPDATE_GOLDEN=1 cargo test -p membrane-ingress)\n--- want\n{want}\n--- got\n{got}",
            path.display()
        ));
    }
}

#[test]
fn golden_cases() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(testdata())
        .expect("testdata exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.join("input.yaml").is_file())
        .collect();
    cases.sort();
    for required in REQUIRED_CASES {
        assert!(
            cases.iter().any(|c| c.ends_with(required)),
            "golden case {required} is missing"
        );
    }

    let mut failures = Vec::new();
    for case in &cases {
        let input = std::fs::read_to_string(case.join("input.yaml")).expect("read input");
        let ingresses = parse_ingresses(&input);
        assert!(!ingresses.is_empty(), "{}: no Ingress", case.display());
        let (cecs, services, rejected) = render(&ingresses, &options(case));
        compare(&case.join("output-cec.yaml"), &cecs, update, &mut failures);
        compare(
            &case.join("output-service.yaml"),
            &services,
            update,
            &mut failures,
        );
        compare(
            &case.join("output-rejected.txt"),
            &rejected,
            update,
            &mut failures,
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn outputs_are_deterministic() {
    for case in REQUIRED_CASES {
        let input =
            std::fs::read_to_string(testdata().join(case).join("input.yaml")).expect("read input");
        let ingresses = parse_ingresses(&input);
        let opts = options(&testdata().join(case));
        assert_eq!(
            render(&ingresses, &opts),
            render(&ingresses, &opts),
            "{case}"
        );
    }
}
