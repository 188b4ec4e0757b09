//! The shared CEC split so that no written object exceeds etcd's 1 MiB
//! request limit, and joined back to the very same configuration.

use std::collections::BTreeSet;

use k8s_openapi::api::networking::v1::Ingress;
use membrane_crds::EnvoyResource;
use membrane_ingress::{
    MAX_OBJECT_BYTES, SHARED_PART_OF_LABEL, SplitError, TranslateOptions, join_shared_cecs,
    merge_shared, shared_part, split_shared_cec,
};

/// The benchmark's shape: Ingress `i` with `paths` Prefix paths, route `j`
/// to Service `(i * paths + j) % services`.
fn ingress(i: usize, paths: usize, services: usize, host: Option<&str>) -> Ingress {
    let mut p = String::new();
    for j in 0..paths {
        let s = (i * paths + j) % services;
        p.push_str(&format!(
            "      - {{path: /i{i}/r{j}, pathType: Prefix, backend: {{service: {{name: svc-{s}, port: {{number: 80}}}}}}}}\n"
        ));
    }
    let host = host.map(|h| format!("    host: {h}\n")).unwrap_or_default();
    serde_yaml_ng::from_str(&format!(
        "metadata:\n  name: ing-{i}\n  namespace: bench\n  annotations: {{ingress.cilium.io/loadbalancer-mode: shared}}\nspec:\n  ingressClassName: cilium\n  rules:\n  - http:\n      paths:\n{p}{host}"
    ))
    .expect("valid Ingress YAML")
}

fn names(resources: &[EnvoyResource], suffix: &str) -> BTreeSet<String> {
    resources
        .iter()
        .map(EnvoyResource::name_and_type)
        .filter(|(_, t)| t.as_deref().is_some_and(|t| t.ends_with(suffix)))
        .filter_map(|(name, _)| name)
        .collect()
}

#[test]
fn ten_thousand_routes_split_into_objects_under_one_mib_and_join_back() {
    let opts = TranslateOptions::default();
    // 10,000 routes in 2,000 Ingresses over 5,000 Services (one host), plus
    // 1,000 routes on 100 hosts, so more than one virtual host is split.
    let mut parts = Vec::new();
    for i in 0..2000 {
        parts.push(shared_part(&ingress(i, 5, 5000, None), &opts).expect("translates"));
    }
    for i in 2000..2100 {
        let host = format!("h{i}.example.com");
        parts.push(shared_part(&ingress(i, 10, 5000, Some(&host)), &opts).expect("translates"));
    }
    let whole = merge_shared(&parts, &opts).cec;
    let whole_bytes = serde_json::to_vec(&whole).expect("serializes").len();
    assert!(
        whole_bytes > 3 * MAX_OBJECT_BYTES,
        "the unsplit CEC is large ({whole_bytes} bytes)"
    );
    let route_config = whole
        .spec
        .resources
        .iter()
        .find(|r| r.name_and_type().0.as_deref() == Some("listener-insecure"))
        .expect("route configuration");
    assert!(
        serde_json::to_vec(route_config).expect("json").len() > MAX_OBJECT_BYTES,
        "one route configuration alone exceeds the limit, so it must be fragmented"
    );

    let split = split_shared_cec(&whole, MAX_OBJECT_BYTES).expect("splits");
    assert!(split.len() >= 4, "{} parts", split.len());
    for (k, part) in split.iter().enumerate() {
        let bytes = serde_json::to_vec(part).expect("serializes").len();
        assert!(bytes <= MAX_OBJECT_BYTES, "part {k}: {bytes} bytes");
        let label = part
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SHARED_PART_OF_LABEL));
        if k == 0 {
            assert_eq!(part.metadata.name, whole.metadata.name);
            assert_eq!(label, None);
            assert_eq!(part.spec.config.services, whole.spec.config.services);
        } else {
            assert_eq!(label.map(String::as_str), Some("cilium-ingress"));
            assert!(part.spec.config.services.is_empty(), "only the first binds");
        }
    }

    // Joined, it is the same configuration: equal as a whole, and the same
    // listeners, route configurations (with every route in order) and
    // clusters.
    let joined = join_shared_cecs(&split).expect("parts");
    for suffix in ["Listener", "RouteConfiguration", "Cluster"] {
        assert_eq!(
            names(&joined.spec.config.resources, suffix),
            names(&whole.spec.config.resources, suffix),
            "{suffix}"
        );
    }
    let rc = |c: &membrane_crds::CiliumEnvoyConfig| {
        c.spec
            .config
            .resources
            .iter()
            .find(|r| r.name_and_type().0.as_deref() == Some("listener-insecure"))
            .cloned()
    };
    assert_eq!(rc(&joined), rc(&whole));
    assert_eq!(joined.spec, whole.spec);
    assert_eq!(joined.metadata, whole.metadata);
}

#[test]
fn a_small_cec_is_not_split_and_an_unsplittable_resource_is_an_error() {
    let opts = TranslateOptions::default();
    let parts: Vec<_> = (0..3)
        .map(|i| shared_part(&ingress(i, 2, 10, None), &opts).expect("translates"))
        .collect();
    let cec = merge_shared(&parts, &opts).cec;
    let split = split_shared_cec(&cec, MAX_OBJECT_BYTES).expect("splits");
    assert_eq!(split.len(), 1);
    assert_eq!(split[0].spec, cec.spec);
    assert_eq!(split[0].metadata, cec.metadata);
    // A limit below one cluster: named with its field.
    match split_shared_cec(&cec, 600) {
        Err(SplitError::TooLarge { field, .. }) => {
            assert!(field.starts_with("spec.resources["), "{field}")
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
}
