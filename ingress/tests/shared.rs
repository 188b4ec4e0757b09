//! Shared load-balancer mode: mode selection, merging, isolation of bad or
//! conflicting Ingresses, and scale.

use k8s_openapi::api::networking::v1::Ingress;
use membrane_ingress::{
    IngressError, LoadBalancerMode, SharedTranslation, TranslateOptions, loadbalancer_mode,
    merge_shared, merge_shared_preferring, shared_part, translate_cluster, translate_shared,
};
use serde_json::Value;

fn ingress(yaml: &str) -> Ingress {
    serde_yaml_ng::from_str(yaml).expect("valid Ingress YAML")
}

/// A shared Ingress `ns/name` created at `created` (RFC 3339) routing each
/// `(host, path, service)` with pathType Prefix to port 80.
fn shared(ns: &str, name: &str, created: &str, routes: &[(&str, &str, &str)]) -> Ingress {
    let mut rules = String::new();
    for (host, path, svc) in routes {
        rules.push_str(&format!(
            "  - host: \"{host}\"\n    http:\n      paths:\n      - {{path: {path}, pathType: Prefix, backend: {{service: {{name: {svc}, port: {{number: 80}}}}}}}}\n"
        ));
    }
    ingress(&format!(
        "metadata:\n  name: {name}\n  namespace: {ns}\n  creationTimestamp: \"{created}\"\n  annotations: {{ingress.cilium.io/loadbalancer-mode: shared}}\nspec:\n  ingressClassName: cilium\n  rules:\n{rules}"
    ))
}

fn route_config(t: &SharedTranslation, name: &str) -> Option<Value> {
    t.cec
        .spec
        .resources
        .iter()
        .find(|r| {
            let (n, ty) = r.name_and_type();
            n.as_deref() == Some(name) && ty.is_some_and(|s| s.ends_with("RouteConfiguration"))
        })
        .map(|r| r.to_value())
}

/// (host, [cluster or "redirect"]) per virtual host of a route configuration.
fn vhosts(t: &SharedTranslation, name: &str) -> Vec<(String, Vec<String>)> {
    let rc = route_config(t, name);
    rc.as_ref()
        .and_then(|rc| rc["virtualHosts"].as_array())
        .into_iter()
        .flatten()
        .map(|vh| {
            let routes = vh["routes"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    r["route"]["cluster"]
                        .as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| "redirect".to_owned())
                })
                .collect();
            (vh["name"].as_str().unwrap_or_default().to_owned(), routes)
        })
        .collect()
}

fn merge(ings: &[Ingress]) -> SharedTranslation {
    let opts = TranslateOptions::default();
    let parts: Vec<_> = ings
        .iter()
        .map(|i| shared_part(i, &opts).expect("translates"))
        .collect();
    merge_shared(&parts, &opts)
}

#[test]
fn mode_comes_from_annotation_then_default() {
    let plain = ingress("metadata: {name: a, namespace: n}\nspec: {}");
    assert_eq!(
        loadbalancer_mode(&plain, LoadBalancerMode::Dedicated),
        Ok(LoadBalancerMode::Dedicated)
    );
    assert_eq!(
        loadbalancer_mode(&plain, LoadBalancerMode::Shared),
        Ok(LoadBalancerMode::Shared)
    );
    let annotated = |v: &str| {
        ingress(&format!(
            "metadata: {{name: a, namespace: n, annotations: {{ingress.cilium.io/loadbalancer-mode: '{v}'}}}}\nspec: {{}}"
        ))
    };
    assert_eq!(
        loadbalancer_mode(&annotated("dedicated"), LoadBalancerMode::Shared),
        Ok(LoadBalancerMode::Dedicated)
    );
    assert_eq!(
        loadbalancer_mode(&annotated("shared"), LoadBalancerMode::Dedicated),
        Ok(LoadBalancerMode::Shared)
    );
    // Empty means unset, as in Cilium.
    assert_eq!(
        loadbalancer_mode(&annotated(""), LoadBalancerMode::Shared),
        Ok(LoadBalancerMode::Shared)
    );
    let err = loadbalancer_mode(&annotated("both"), LoadBalancerMode::Dedicated).unwrap_err();
    assert_eq!(
        err.field(),
        "metadata.annotations[ingress.cilium.io/loadbalancer-mode]"
    );
    assert!(err.to_string().contains("n/a"), "{err}");
    assert!(err.to_string().contains("\"both\""), "{err}");
    assert_eq!("shared".parse(), Ok(LoadBalancerMode::Shared));
    assert_eq!(LoadBalancerMode::Dedicated.to_string(), "dedicated");
}

#[test]
fn shared_objects_follow_cilium() {
    let t = merge(&[shared(
        "a",
        "one",
        "2024-01-01T00:00:00Z",
        &[("x.com", "/", "s")],
    )]);
    assert_eq!(t.cec.metadata.name.as_deref(), Some("cilium-ingress"));
    assert_eq!(t.cec.metadata.namespace.as_deref(), Some("kube-system"));
    assert!(t.cec.metadata.owner_references.is_none());
    let services = &t.cec.spec.services;
    assert_eq!(services.len(), 1);
    assert_eq!(services[0].name, "cilium-ingress");
    assert_eq!(services[0].namespace, "kube-system");
    assert_eq!(services[0].ports, vec![80, 443]);

    assert_eq!(t.service.metadata.name.as_deref(), Some("cilium-ingress"));
    assert_eq!(t.service.metadata.namespace.as_deref(), Some("kube-system"));
    assert!(t.service.metadata.owner_references.is_none());
    let spec = t.service.spec.as_ref().unwrap();
    assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
    let ports: Vec<(String, i32)> = spec
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone().unwrap(), p.port))
        .collect();
    assert_eq!(ports, vec![("http".into(), 80), ("https".into(), 443)]);
    let es = &t.endpoint_slice;
    assert_eq!(es.metadata.name.as_deref(), Some("cilium-ingress"));
    assert_eq!(
        es.metadata.labels.as_ref().unwrap()["kubernetes.io/service-name"],
        "cilium-ingress"
    );
    assert_eq!(
        es.endpoints.as_ref().unwrap()[0].addresses,
        vec!["192.192.192.192"]
    );

    // The namespace and name are configurable.
    let opts = TranslateOptions {
        shared_namespace: "cilium".into(),
        shared_service_name: "ingress-lb".into(),
        ..Default::default()
    };
    let ing = shared("a", "one", "2024-01-01T00:00:00Z", &[("x.com", "/", "s")]);
    let t = merge_shared([&shared_part(&ing, &opts).unwrap()], &opts);
    assert_eq!(t.cec.metadata.name.as_deref(), Some("ingress-lb"));
    assert_eq!(t.cec.metadata.namespace.as_deref(), Some("cilium"));
    assert_eq!(t.cec.spec.services[0].namespace, "cilium");
    assert_eq!(t.service.metadata.namespace.as_deref(), Some("cilium"));
}

#[test]
fn hosts_are_merged_across_ingresses_in_cilium_route_order() {
    let older = shared(
        "ns1",
        "older",
        "2024-01-01T00:00:00Z",
        &[("x.com", "/", "root"), ("y.com", "/y", "why")],
    );
    let newer = ingress(
        r#"
metadata:
  name: newer
  namespace: ns2
  creationTimestamp: "2024-01-02T00:00:00Z"
  annotations: {ingress.cilium.io/loadbalancer-mode: shared}
spec:
  rules:
  - host: x.com
    http:
      paths:
      - {path: /exact, pathType: Exact, backend: {service: {name: ex, port: {number: 80}}}}
      - {path: /longer/prefix, pathType: Prefix, backend: {service: {name: long, port: {number: 80}}}}
      - {path: "/re/[a-z]+", pathType: ImplementationSpecific, backend: {service: {name: re, port: {number: 80}}}}
"#,
    );
    let t = merge(&[newer.clone(), older.clone()]);
    assert_eq!(
        vhosts(&t, "listener-insecure"),
        vec![
            (
                "x.com".to_owned(),
                vec![
                    "ns2:ex:80".to_owned(),
                    "ns2:re:80".to_owned(),
                    "ns2:long:80".to_owned(),
                    "ns1:root:80".to_owned(),
                ]
            ),
            ("y.com".to_owned(), vec!["ns1:why:80".to_owned()]),
        ]
    );
    assert_eq!(
        t.included,
        vec![
            ("ns1".to_owned(), "older".to_owned()),
            ("ns2".to_owned(), "newer".to_owned())
        ]
    );
    let backends: Vec<(String, String)> = t
        .cec
        .spec
        .backend_services
        .iter()
        .map(|b| (b.namespace.clone(), b.name.clone()))
        .collect();
    assert_eq!(backends.len(), 5);
    assert!(backends.windows(2).all(|w| w[0] <= w[1]), "{backends:?}");
    // No TLS anywhere: no secure route configuration.
    assert!(route_config(&t, "listener-secure").is_none());
    // Input order never matters.
    assert_eq!(
        merge(&[older, newer]).cec.spec.resources,
        t.cec.spec.resources
    );
}

#[test]
fn older_ingress_wins_a_host_and_path_conflict() {
    let a = shared("zz", "a", "2024-01-01T00:00:00Z", &[("x.com", "/p", "a")]);
    let b = shared("aa", "b", "2024-01-02T00:00:00Z", &[("x.com", "/p/", "b")]);
    for input in [vec![a.clone(), b.clone()], vec![b.clone(), a.clone()]] {
        let t = merge(&input);
        assert_eq!(t.included, vec![("zz".to_owned(), "a".to_owned())]);
        assert_eq!(t.conflicts.len(), 1);
        let c = &t.conflicts[0];
        assert_eq!((c.namespace.as_str(), c.name.as_str()), ("aa", "b"));
        assert_eq!(c.error.field(), "spec.rules[0].http.paths[0]");
        let msg = c.error.to_string();
        assert!(msg.starts_with("Ingress aa/b: "), "{msg}");
        assert!(msg.contains("Ingress zz/a"), "{msg}");
        assert!(msg.contains("\"x.com\"") && msg.contains("\"/p\""), "{msg}");
        assert!(matches!(c.error, IngressError::SharedConflict { .. }));
        assert_eq!(
            vhosts(&t, "listener-insecure"),
            vec![("x.com".to_owned(), vec!["zz:a:80".to_owned()])]
        );
    }
    // Same timestamp: namespace/name decides.
    let a2 = shared("zz", "a", "2024-01-01T00:00:00Z", &[("x.com", "/p", "a")]);
    let b2 = shared("aa", "b", "2024-01-01T00:00:00Z", &[("x.com", "/p", "b")]);
    let t = merge(&[a2, b2]);
    assert_eq!(t.included, vec![("aa".to_owned(), "b".to_owned())]);
    assert_eq!(t.conflicts[0].name, "a");
    // Different path types on the same path do not conflict.
    let c = ingress(
        r#"
metadata: {name: c, namespace: cc, creationTimestamp: "2024-01-03T00:00:00Z"}
spec:
  rules:
  - host: x.com
    http:
      paths:
      - {path: /p, pathType: Exact, backend: {service: {name: c, port: {number: 80}}}}
"#,
    );
    let t = merge(&[a, c]);
    assert!(t.conflicts.is_empty(), "{:?}", t.conflicts);
    assert_eq!(
        vhosts(&t, "listener-insecure")[0].1,
        vec!["cc:c:80".to_owned(), "zz:a:80".to_owned()]
    );
}

#[test]
fn at_equal_age_the_serving_ingress_keeps_its_path() {
    // Same second (timestamps have one-second resolution): by name alone
    // aa/newcomer would win, but zz/serving already serves the path.
    let serving = shared(
        "zz",
        "serving",
        "2024-01-01T00:00:00Z",
        &[("x.com", "/p", "a")],
    );
    let newcomer = shared(
        "aa",
        "newcomer",
        "2024-01-01T00:00:00Z",
        &[("x.com", "/p", "b")],
    );
    let opts = TranslateOptions::default();
    let parts = [
        shared_part(&newcomer, &opts).unwrap(),
        shared_part(&serving, &opts).unwrap(),
    ];
    let incumbents = std::collections::BTreeSet::from([("zz".to_owned(), "serving".to_owned())]);
    let t = merge_shared_preferring(&parts, &incumbents, &opts);
    assert_eq!(t.included, vec![("zz".to_owned(), "serving".to_owned())]);
    assert_eq!(t.conflicts[0].name, "newcomer");
    // Age still comes first: an older Ingress reclaims its path.
    let older = shared(
        "aa",
        "older",
        "2023-12-31T23:59:59Z",
        &[("x.com", "/p", "b")],
    );
    let parts = [
        shared_part(&older, &opts).unwrap(),
        shared_part(&serving, &opts).unwrap(),
    ];
    let t = merge_shared_preferring(&parts, &incumbents, &opts);
    assert_eq!(t.included, vec![("aa".to_owned(), "older".to_owned())]);
}

#[test]
fn rules_beat_default_backends_and_two_default_backends_conflict() {
    let fallback = |ns: &str, created: &str| {
        ingress(&format!(
            "metadata: {{name: fb, namespace: {ns}, creationTimestamp: \"{created}\"}}\nspec:\n  defaultBackend: {{service: {{name: d, port: {{number: 8080}}}}}}\n"
        ))
    };
    let catch_all = shared("r", "rule", "2024-01-05T00:00:00Z", &[("*", "/", "any")]);
    // A host-less rule is written without `host`.
    let catch_all = {
        let mut c = catch_all;
        if let Some(rules) = c.spec.as_mut().and_then(|s| s.rules.as_mut()) {
            rules[0].host = None;
        }
        c
    };
    let t = merge(&[fallback("d1", "2024-01-01T00:00:00Z"), catch_all]);
    assert!(t.conflicts.is_empty(), "{:?}", t.conflicts);
    // The newer Ingress's explicit `/` rule shadows the older default backend.
    assert_eq!(
        vhosts(&t, "listener-insecure"),
        vec![("*".to_owned(), vec!["r:any:80".to_owned()])]
    );
    let t = merge(&[
        fallback("d2", "2024-01-02T00:00:00Z"),
        fallback("d1", "2024-01-01T00:00:00Z"),
    ]);
    assert_eq!(t.included, vec![("d1".to_owned(), "fb".to_owned())]);
    assert_eq!(t.conflicts[0].error.field(), "spec.defaultBackend");
    assert!(
        t.conflicts[0].error.to_string().contains("default backend"),
        "{}",
        t.conflicts[0].error
    );
}

const TLS_A: &str = r#"
metadata:
  name: a
  namespace: shop
  creationTimestamp: "2024-01-01T00:00:00Z"
spec:
  tls:
  - hosts: [a.com]
    secretName: cert
  rules:
  - host: a.com
    http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: a, port: {number: 80}}}}
"#;

#[test]
fn tls_chains_are_per_secret_and_sni_conflicts_are_rejected() {
    let same_secret = ingress(
        r#"
metadata:
  name: b
  namespace: shop
  creationTimestamp: "2024-01-02T00:00:00Z"
spec:
  tls:
  - hosts: [b.com, a.com]
    secretName: cert
  rules:
  - host: b.com
    http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: b, port: {number: 80}}}}
  - host: a.com
    http:
      paths:
      - {path: /b, pathType: Prefix, backend: {service: {name: b, port: {number: 80}}}}
"#,
    );
    let other_ns = ingress(
        r#"
metadata:
  name: c
  namespace: blog
  creationTimestamp: "2024-01-03T00:00:00Z"
spec:
  tls:
  - hosts: [c.com]
    secretName: cert
  rules:
  - host: c.com
    http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: c, port: {number: 80}}}}
"#,
    );
    let t = merge(&[ingress(TLS_A), same_secret, other_ns]);
    assert!(t.conflicts.is_empty(), "{:?}", t.conflicts);
    let listener = t.cec.spec.resources[0].to_value();
    let chains: Vec<(Value, Value)> = listener["filterChains"]
        .as_array()
        .unwrap()
        .iter()
        .skip(1)
        .map(|c| {
            (
                c["filterChainMatch"]["serverNames"].clone(),
                c["transportSocket"]["typedConfig"]["commonTlsContext"]
                    ["tlsCertificateSdsSecretConfigs"][0]["name"]
                    .clone(),
            )
        })
        .collect();
    assert_eq!(
        chains,
        vec![
            (
                serde_json::json!(["c.com"]),
                serde_json::json!("cilium-secrets/blog-cert")
            ),
            (
                serde_json::json!(["a.com", "b.com"]),
                serde_json::json!("cilium-secrets/shop-cert")
            ),
        ]
    );
    // a.com on HTTPS: both Ingresses' paths; on HTTP: redirects.
    let secure = vhosts(&t, "listener-secure");
    assert_eq!(
        secure[0],
        (
            "a.com".to_owned(),
            vec!["shop:b:80".to_owned(), "shop:a:80".to_owned()]
        )
    );
    let insecure = vhosts(&t, "listener-insecure");
    assert_eq!(
        insecure[0],
        (
            "a.com".to_owned(),
            vec!["redirect".to_owned(), "redirect".to_owned()]
        )
    );

    // Another certificate for a.com from a newer Ingress is rejected.
    let thief = ingress(
        r#"
metadata:
  name: thief
  namespace: other
  creationTimestamp: "2024-01-04T00:00:00Z"
spec:
  tls:
  - hosts: [a.com]
    secretName: mine
  rules:
  - host: a.com
    http:
      paths:
      - {path: /thief, pathType: Prefix, backend: {service: {name: t, port: {number: 80}}}}
"#,
    );
    let t = merge(&[ingress(TLS_A), thief]);
    assert_eq!(t.conflicts.len(), 1);
    assert_eq!(t.conflicts[0].error.field(), "spec.tls[0].hosts[0]");
    let msg = t.conflicts[0].error.to_string();
    assert!(
        msg.contains("shop/a") && msg.contains("other/mine"),
        "{msg}"
    );
}

#[test]
fn request_timeout_stays_with_its_ingress() {
    let slow = ingress(
        r#"
metadata:
  name: slow
  namespace: n
  creationTimestamp: "2024-01-01T00:00:00Z"
  annotations: {ingress.cilium.io/request-timeout: 90s}
spec:
  rules:
  - host: x.com
    http:
      paths:
      - {path: /slow, pathType: Prefix, backend: {service: {name: slow, port: {number: 80}}}}
"#,
    );
    let fast = shared(
        "n",
        "fast",
        "2024-01-02T00:00:00Z",
        &[("x.com", "/fast", "fast")],
    );
    let t = merge(&[slow, fast]);
    let rc = route_config(&t, "listener-insecure").unwrap();
    let routes = rc["virtualHosts"][0]["routes"].as_array().unwrap();
    let timeout_of = |cluster: &str| {
        routes
            .iter()
            .find(|r| r["route"]["cluster"] == cluster)
            .map(|r| r["route"]["timeout"].clone())
    };
    assert_eq!(timeout_of("n:slow:80"), Some(serde_json::json!("90s")));
    assert_eq!(timeout_of("n:fast:80"), Some(Value::Null));
}

#[test]
fn a_bad_ingress_is_left_out_and_the_rest_is_merged() {
    let good = shared("a", "good", "2024-01-02T00:00:00Z", &[("x.com", "/", "g")]);
    let bad = ingress(
        r#"
metadata: {name: bad, namespace: b, creationTimestamp: "2024-01-01T00:00:00Z"}
spec:
  rules:
  - host: y.com
    http:
      paths:
      - {path: "/(", pathType: ImplementationSpecific, backend: {service: {name: s, port: {number: 80}}}}
"#,
    );
    let out = translate_shared(&[bad, good], &TranslateOptions::default());
    assert_eq!(out.rejected.len(), 1);
    assert_eq!(out.rejected[0].name, "bad");
    assert_eq!(
        out.rejected[0].error.field(),
        "spec.rules[0].http.paths[0].path"
    );
    let t = out.translation.expect("the good one is served");
    assert_eq!(t.included, vec![("a".to_owned(), "good".to_owned())]);
    assert_eq!(vhosts(&t, "listener-insecure")[0].0, "x.com");

    // Nothing translatable: no shared objects.
    let only_bad = ingress("metadata: {namespace: b}\nspec: {}");
    let out = translate_shared(&[only_bad], &TranslateOptions::default());
    assert!(out.translation.is_none());
    assert_eq!(out.rejected[0].error.field(), "metadata.name");
}

#[test]
fn cluster_translation_partitions_by_mode() {
    let dedicated = ingress(
        "metadata: {name: d, namespace: n}\nspec:\n  defaultBackend: {service: {name: s, port: {number: 80}}}\n",
    );
    let share = shared("n", "s", "2024-01-01T00:00:00Z", &[("x.com", "/", "s")]);
    let out = translate_cluster(&[dedicated.clone(), share], &TranslateOptions::default());
    assert!(out.rejected.is_empty());
    let names: Vec<String> = out
        .cecs()
        .iter()
        .map(|c| c.metadata.name.clone().unwrap_or_default())
        .collect();
    assert_eq!(names, vec!["cilium-ingress-n-d", "cilium-ingress"]);

    // With shared as the default, the annotation-less Ingress joins too.
    let opts = TranslateOptions {
        default_lb_mode: LoadBalancerMode::Shared,
        ..Default::default()
    };
    let out = translate_cluster(&[dedicated], &opts);
    assert!(out.dedicated.is_empty());
    assert_eq!(out.shared.expect("shared").included.len(), 1);
}

#[test]
fn two_thousand_ingresses_ten_thousand_routes_five_thousand_services() {
    const INGRESSES: usize = 2_000;
    const PATHS: usize = 5;
    // Even Ingresses spread their paths over 3 Services, odd ones over 2:
    // 1,000 × 3 + 1,000 × 2 = 5,000 Services.
    let ings: Vec<Ingress> = (0..INGRESSES)
        .map(|i| {
            let services = if i % 2 == 0 { 3 } else { 2 };
            let mut paths = String::new();
            for j in 0..PATHS {
                let path_type = if j == 0 { "Exact" } else { "Prefix" };
                paths.push_str(&format!(
                    "      - {{path: /i{i}/p{j}, pathType: {path_type}, backend: {{service: {{name: svc-{i}-{}, port: {{number: 8080}}}}}}}}\n",
                    j % services
                ));
            }
            // Two Ingresses share each host (in different namespaces).
            ingress(&format!(
                "metadata:\n  name: ing-{i}\n  namespace: ns-{}\n  creationTimestamp: \"2024-01-01T00:00:00Z\"\n  annotations: {{ingress.cilium.io/loadbalancer-mode: shared}}\nspec:\n  rules:\n  - host: h{}.example.com\n    http:\n      paths:\n{paths}",
                i % 20,
                i / 2
            ))
        })
        .collect();
    let started = std::time::Instant::now();
    let out = translate_cluster(&ings, &TranslateOptions::default());
    // Reported, not asserted: speed is for benchmarks.
    eprintln!(
        "translated 2,000 shared Ingresses in {:?}",
        started.elapsed()
    );
    assert!(out.rejected.is_empty(), "{:?}", out.rejected.first());
    let t = out.shared.expect("shared objects");
    assert_eq!(t.included.len(), INGRESSES);
    let rc = route_config(&t, "listener-insecure").expect("insecure routes");
    let vhosts = rc["virtualHosts"].as_array().unwrap();
    assert_eq!(vhosts.len(), INGRESSES / 2);
    let routes: usize = vhosts
        .iter()
        .map(|v| v["routes"].as_array().map_or(0, Vec::len))
        .sum();
    assert_eq!(routes, INGRESSES * PATHS);
    assert_eq!(t.cec.spec.backend_services.len(), 5_000);
    let clusters = t
        .cec
        .spec
        .resources
        .iter()
        .filter(|r| r.name_and_type().1.is_some_and(|s| s.ends_with("Cluster")))
        .count();
    assert_eq!(clusters, 5_000);
}
