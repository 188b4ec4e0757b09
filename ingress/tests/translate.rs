//! Behaviour tests of the public API on small Ingresses written as YAML.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::networking::v1::Ingress;
use membrane_crds::EnvoyResource;
use membrane_ingress::{
    IngressError, Lookup, TranslateOptions, Translation, names, translate, translate_all,
    validate_references,
};
use serde_json::{Value, json};

fn ingress(yaml: &str) -> Ingress {
    serde_yaml_ng::from_str(yaml).expect("valid Ingress YAML")
}

fn ok(yaml: &str) -> Translation {
    translate(&ingress(yaml), &TranslateOptions::default()).expect("translates")
}

fn err(yaml: &str) -> IngressError {
    translate(&ingress(yaml), &TranslateOptions::default()).expect_err("must fail")
}

fn resource(t: &Translation, type_suffix: &str, name: &str) -> Option<Value> {
    t.cec
        .spec
        .resources
        .iter()
        .map(EnvoyResource::to_value)
        .find(|r| {
            r["@type"]
                .as_str()
                .is_some_and(|s| s.ends_with(type_suffix))
                && r["name"] == name
        })
}

fn vhost(t: &Translation, route_config: &str, host: &str) -> Option<Value> {
    resource(t, "RouteConfiguration", route_config)?["virtualHosts"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == host)
        .cloned()
}

const TLS_INGRESS: &str = r#"
metadata: {name: web, namespace: prod}
spec:
  tls:
  - hosts: [a.example.com]
    secretName: a-cert
  rules:
  - host: a.example.com
    http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: a, port: {number: 80}}}}
  - host: plain.example.com
    http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: p, port: {number: 80}}}}
"#;

fn with_annotation(yaml: &str, key: &str, value: &str) -> String {
    yaml.replacen(
        "metadata: {name: web, namespace: prod}",
        &format!("metadata: {{name: web, namespace: prod, annotations: {{{key}: \"{value}\"}}}}"),
        1,
    )
}

#[test]
fn service_and_endpoint_slice_follow_cilium() {
    let t = ok(TLS_INGRESS);
    assert_eq!(
        t.cec.metadata.name.as_deref(),
        Some("cilium-ingress-prod-web")
    );
    assert_eq!(t.cec.metadata.namespace.as_deref(), Some("prod"));

    let svc = serde_json::to_value(&t.service).unwrap();
    assert_eq!(svc["metadata"]["name"], "cilium-ingress-web");
    assert_eq!(svc["metadata"]["namespace"], "prod");
    assert_eq!(svc["metadata"]["labels"]["cilium.io/ingress"], "true");
    assert_eq!(svc["metadata"]["ownerReferences"][0]["kind"], "Ingress");
    assert_eq!(svc["metadata"]["ownerReferences"][0]["name"], "web");
    assert_eq!(svc["spec"]["type"], "LoadBalancer");
    assert_eq!(
        svc["spec"]["ports"],
        json!([
            {"name": "http", "port": 80, "protocol": "TCP"},
            {"name": "https", "port": 443, "protocol": "TCP"},
        ])
    );

    let eps = serde_json::to_value(&t.endpoint_slice).unwrap();
    assert_eq!(eps["metadata"]["name"], "cilium-ingress-web");
    assert_eq!(
        eps["metadata"]["labels"]["kubernetes.io/service-name"],
        "cilium-ingress-web"
    );
    assert_eq!(eps["addressType"], "IPv4");
    assert_eq!(eps["endpoints"][0]["addresses"], json!(["192.192.192.192"]));
    assert_eq!(eps["ports"], svc["spec"]["ports"]);

    assert_eq!(t.cec.spec.services.len(), 1);
    assert_eq!(t.cec.spec.services[0].name, "cilium-ingress-web");
    assert_eq!(t.cec.spec.services[0].ports, vec![80, 443]);
}

#[test]
fn no_tls_means_port_80_only() {
    let t = ok(r#"
metadata: {name: web}
spec:
  defaultBackend: {service: {name: b, port: {number: 80}}}
"#);
    // Namespace defaults to "default" for namespace-less manifests.
    assert_eq!(
        t.cec.metadata.name.as_deref(),
        Some("cilium-ingress-default-web")
    );
    assert_eq!(t.cec.spec.services[0].ports, vec![80]);
    assert_eq!(
        t.service
            .spec
            .as_ref()
            .unwrap()
            .ports
            .as_ref()
            .unwrap()
            .len(),
        1
    );
    assert!(resource(&t, "RouteConfiguration", "listener-secure").is_none());
    let listener = resource(&t, "Listener", "listener").unwrap();
    assert_eq!(listener["filterChains"].as_array().unwrap().len(), 1);
    assert!(listener.get("address").is_none());
}

#[test]
fn long_names_are_shortened_consistently() {
    let name = "n".repeat(70);
    let t = ok(&format!(
        "metadata: {{name: {name}, namespace: ns}}\nspec:\n  defaultBackend: {{service: {{name: b, port: {{number: 80}}}}}}\n"
    ));
    let svc_name = t.service.metadata.name.clone().unwrap();
    assert_eq!(svc_name.len(), 63);
    assert_eq!(svc_name, names::service_name(&name));
    assert_eq!(
        t.endpoint_slice.metadata.name.as_deref(),
        Some(svc_name.as_str())
    );
    assert_eq!(t.cec.spec.services[0].name, svc_name);
    assert_eq!(
        t.endpoint_slice.metadata.labels.as_ref().unwrap()["kubernetes.io/service-name"],
        svc_name
    );
}

#[test]
fn tls_hosts_are_redirected_by_default() {
    let t = ok(TLS_INGRESS);
    let insecure = vhost(&t, "listener-insecure", "a.example.com").unwrap();
    assert_eq!(
        insecure["routes"][0]["redirect"],
        json!({"httpsRedirect": true})
    );
    assert!(insecure["routes"][0].get("route").is_none());
    let secure = vhost(&t, "listener-secure", "a.example.com").unwrap();
    assert_eq!(secure["routes"][0]["route"]["cluster"], "prod:a:80");
    // Hosts without TLS are served in plain text and not in the TLS config.
    let plain = vhost(&t, "listener-insecure", "plain.example.com").unwrap();
    assert_eq!(plain["routes"][0]["route"]["cluster"], "prod:p:80");
    assert!(vhost(&t, "listener-secure", "plain.example.com").is_none());

    let listener = resource(&t, "Listener", "listener").unwrap();
    let chain = &listener["filterChains"][1];
    assert_eq!(
        chain["filterChainMatch"]["serverNames"],
        json!(["a.example.com"])
    );
    assert_eq!(chain["filterChainMatch"]["transportProtocol"], "tls");
    assert_eq!(
        chain["filters"][0]["typedConfig"]["rds"]["routeConfigName"],
        "listener-secure"
    );
    assert_eq!(
        chain["transportSocket"]["typedConfig"]["commonTlsContext"]["tlsCertificateSdsSecretConfigs"]
            [0]["name"],
        "cilium-secrets/prod-a-cert"
    );
}

#[test]
fn force_https_annotation_overrides_default() {
    for value in ["disabled", "false"] {
        let t = ok(&with_annotation(
            TLS_INGRESS,
            "ingress.cilium.io/force-https",
            value,
        ));
        let insecure = vhost(&t, "listener-insecure", "a.example.com").unwrap();
        assert_eq!(
            insecure["routes"][0]["route"]["cluster"], "prod:a:80",
            "{value}"
        );
    }
    let off = TranslateOptions {
        enforce_https_default: false,
        ..Default::default()
    };
    let t = translate(&ingress(TLS_INGRESS), &off).unwrap();
    let insecure = vhost(&t, "listener-insecure", "a.example.com").unwrap();
    assert!(insecure["routes"][0].get("redirect").is_none());
    for value in ["enabled", "true"] {
        let yaml = with_annotation(TLS_INGRESS, "ingress.cilium.io/force-https", value);
        let t = translate(&ingress(&yaml), &off).unwrap();
        let insecure = vhost(&t, "listener-insecure", "a.example.com").unwrap();
        assert_eq!(
            insecure["routes"][0]["redirect"],
            json!({"httpsRedirect": true}),
            "{value}"
        );
    }
}

#[test]
fn custom_secrets_namespace_is_used_for_sds() {
    let opts = TranslateOptions {
        secrets_namespace: "membrane-secrets".into(),
        ..Default::default()
    };
    let t = translate(&ingress(TLS_INGRESS), &opts).unwrap();
    let listener = resource(&t, "Listener", "listener").unwrap();
    assert_eq!(
        listener["filterChains"][1]["transportSocket"]["typedConfig"]["commonTlsContext"]["tlsCertificateSdsSecretConfigs"]
            [0]["name"],
        "membrane-secrets/prod-a-cert"
    );
}

#[test]
fn request_timeout_sets_route_timeout() {
    let t = ok(&with_annotation(
        TLS_INGRESS,
        "ingress.cilium.io/request-timeout",
        "1m30s",
    ));
    let secure = vhost(&t, "listener-secure", "a.example.com").unwrap();
    assert_eq!(secure["routes"][0]["route"]["timeout"], "90s");
    let plain = vhost(&t, "listener-insecure", "plain.example.com").unwrap();
    assert_eq!(plain["routes"][0]["route"]["timeout"], "90s");
    // Without the annotation there is no timeout field (Envoy's default).
    let t = ok(TLS_INGRESS);
    let plain = vhost(&t, "listener-insecure", "plain.example.com").unwrap();
    assert!(plain["routes"][0]["route"].get("timeout").is_none());
}

#[test]
fn invalid_annotations_are_errors_naming_the_annotation() {
    let e = err(&with_annotation(
        TLS_INGRESS,
        "ingress.cilium.io/request-timeout",
        "soon",
    ));
    assert!(matches!(e, IngressError::InvalidAnnotation { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.starts_with("Ingress prod/web: "), "{msg}");
    assert!(
        msg.contains("metadata.annotations[ingress.cilium.io/request-timeout]"),
        "{msg}"
    );
    assert!(msg.contains("\"soon\""), "{msg}");

    let e = err(&with_annotation(
        TLS_INGRESS,
        "ingress.cilium.io/force-https",
        "maybe",
    ));
    assert_eq!(
        e.field(),
        "metadata.annotations[ingress.cilium.io/force-https]"
    );
}

#[test]
fn wildcard_host_routes_match_one_label() {
    let t = ok(r#"
metadata: {name: w, namespace: ns}
spec:
  rules:
  - host: "*.foo.com"
    http:
      paths:
      - {path: /a, pathType: Exact, backend: {service: {name: s, port: {number: 1}}}}
      - {path: /, pathType: Prefix, backend: {service: {name: s, port: {number: 1}}}}
"#);
    let vh = vhost(&t, "listener-insecure", "*.foo.com").unwrap();
    assert_eq!(vh["domains"], json!(["*.foo.com", "*.foo.com:*"]));
    for route in vh["routes"].as_array().unwrap() {
        assert_eq!(
            route["match"]["headers"],
            json!([{"name": ":authority", "stringMatch": {"safeRegex": {"regex": "^[^.]+[.]foo[.]com(:[0-9]+)?$"}}}])
        );
    }
}

#[test]
fn regex_paths_and_prefix_forms() {
    let t = ok(r#"
metadata: {name: r, namespace: ns}
spec:
  rules:
  - host: h
    http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: s, port: {number: 1}}}}
      - {path: /x/, pathType: Prefix, backend: {service: {name: s, port: {number: 1}}}}
      - {path: "/img/.*[.]png", pathType: ImplementationSpecific, backend: {service: {name: s, port: {number: 1}}}}
      - {path: /x, pathType: Prefix, backend: {service: {name: other, port: {number: 2}}}}
"#);
    let routes = vhost(&t, "listener-insecure", "h").unwrap()["routes"]
        .as_array()
        .unwrap()
        .clone();
    let matches: Vec<Value> = routes.iter().map(|r| r["match"].clone()).collect();
    assert_eq!(
        matches,
        vec![
            json!({"safeRegex": {"regex": "/img/.*[.]png"}}),
            json!({"pathSeparatedPrefix": "/x"}),
            json!({"prefix": "/"}),
        ]
    );
    // `/x/` and `/x` are the same match: the first rule wins.
    assert_eq!(routes[1]["route"]["cluster"], "ns:s:1");
}

#[test]
fn tls_host_without_rule_uses_default_backend() {
    let t = ok(r#"
metadata: {name: d, namespace: ns}
spec:
  tls:
  - {hosts: [z.example.com, a.example.com], secretName: s1}
  - {hosts: [m.example.com], secretName: s0}
  defaultBackend: {service: {name: fallback, port: {number: 80}}}
"#);
    let secure = vhost(&t, "listener-secure", "z.example.com").unwrap();
    assert_eq!(secure["routes"][0]["route"]["cluster"], "ns:fallback:80");
    // Redirect vhost for the TLS host, catch-all still served in plain text.
    let redirect = vhost(&t, "listener-insecure", "z.example.com").unwrap();
    assert_eq!(
        redirect["routes"][0]["redirect"],
        json!({"httpsRedirect": true})
    );
    let catch_all = vhost(&t, "listener-insecure", "*").unwrap();
    assert_eq!(catch_all["routes"][0]["route"]["cluster"], "ns:fallback:80");
    // One chain per secret, sorted by secret, server names sorted.
    let listener = resource(&t, "Listener", "listener").unwrap();
    let chains = listener["filterChains"].as_array().unwrap();
    assert_eq!(chains.len(), 3);
    assert_eq!(
        chains[1]["filterChainMatch"]["serverNames"],
        json!(["m.example.com"])
    );
    assert_eq!(
        chains[2]["filterChainMatch"]["serverNames"],
        json!(["a.example.com", "z.example.com"])
    );
}

#[test]
fn every_translation_error_names_its_field() {
    let cases: &[(&str, &str)] = &[
        (
            r#"
metadata: {name: e, namespace: ns}
spec:
  rules:
  - http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: s, port: {}}}}
"#,
            "spec.rules[0].http.paths[0].backend.service.port",
        ),
        (
            r#"
metadata: {name: e, namespace: ns}
spec:
  rules:
  - http:
      paths:
      - {path: /ok, pathType: Exact, backend: {service: {name: s, port: {number: 1}}}}
      - {path: /, pathType: Prefix, backend: {resource: {kind: Bucket, name: b}}}
"#,
            "spec.rules[0].http.paths[1].backend.resource",
        ),
        (
            r#"
metadata: {name: e, namespace: ns}
spec:
  rules:
  - http:
      paths:
      - {path: "/(unclosed", pathType: ImplementationSpecific, backend: {service: {name: s, port: {number: 1}}}}
"#,
            "spec.rules[0].http.paths[0].path",
        ),
        (
            r#"
metadata: {name: e, namespace: ns}
spec:
  rules:
  - http:
      paths:
      - {path: /, backend: {service: {name: s, port: {number: 1}}}}
"#,
            "spec.rules[0].http.paths[0].pathType",
        ),
        (
            r#"
metadata: {name: e, namespace: ns}
spec:
  rules:
  - http:
      paths:
      - {path: /, pathType: Fuzzy, backend: {service: {name: s, port: {number: 1}}}}
"#,
            "spec.rules[0].http.paths[0].pathType",
        ),
        (
            r#"
metadata: {name: e, namespace: ns}
spec:
  rules:
  - http:
      paths:
      - {path: relative, pathType: Prefix, backend: {service: {name: s, port: {number: 1}}}}
"#,
            "spec.rules[0].http.paths[0].path",
        ),
        (
            r#"
metadata: {name: e, namespace: ns}
spec:
  rules:
  - host: "foo.*.com"
    http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: s, port: {number: 1}}}}
"#,
            "spec.rules[0].host",
        ),
        (
            r#"
metadata: {name: e, namespace: ns}
spec:
  defaultBackend: {service: {name: s, port: {number: 70000}}}
"#,
            "spec.defaultBackend.service.port.number",
        ),
        (
            r#"
metadata: {name: e, namespace: ns}
spec:
  defaultBackend: {}
"#,
            "spec.defaultBackend.service",
        ),
    ];
    for (yaml, field) in cases {
        let e = err(yaml);
        assert_eq!(e.field(), *field, "{e}");
        let msg = e.to_string();
        assert!(msg.starts_with("Ingress ns/e: "), "{msg}");
        assert!(msg.contains(field), "{msg}");
    }
    let e = err("metadata: {namespace: ns}\nspec: {}\n");
    assert!(matches!(e, IngressError::MissingName { .. }));
}

#[test]
fn translate_all_isolates_bad_ingresses() {
    let good = ingress(TLS_INGRESS);
    let bad = ingress(&with_annotation(
        TLS_INGRESS,
        "ingress.cilium.io/request-timeout",
        "x",
    ));
    let results = translate_all(&[good.clone(), bad, good], &TranslateOptions::default());
    assert_eq!(results.len(), 3);
    assert!(results[0].is_ok());
    assert!(results[1].is_err());
    assert!(results[2].is_ok());
}

// ---- reference validation ----

#[derive(Default)]
struct Objects {
    services: BTreeMap<(String, String), Service>,
    secrets: BTreeMap<(String, String), Secret>,
}

impl Lookup for Objects {
    fn service(&self, ns: &str, name: &str) -> Option<&Service> {
        self.services.get(&(ns.to_string(), name.to_string()))
    }
    fn secret(&self, ns: &str, name: &str) -> Option<&Secret> {
        self.secrets.get(&(ns.to_string(), name.to_string()))
    }
}

impl Objects {
    fn with_service(mut self, ns: &str, yaml: &str) -> Self {
        let svc: Service = serde_yaml_ng::from_str(yaml).unwrap();
        let name = svc.metadata.name.clone().unwrap();
        self.services.insert((ns.into(), name), svc);
        self
    }
    fn with_secret(
        mut self,
        ns: &str,
        name: &str,
        type_: Option<&str>,
        crt: &[u8],
        key: &[u8],
    ) -> Self {
        let secret = Secret {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                ..Default::default()
            },
            type_: type_.map(str::to_string),
            data: Some(BTreeMap::from([
                ("tls.crt".to_string(), ByteString(crt.to_vec())),
                ("tls.key".to_string(), ByteString(key.to_vec())),
            ])),
            ..Default::default()
        };
        self.secrets.insert((ns.into(), name.into()), secret);
        self
    }
}

const REF_INGRESS: &str = r#"
metadata: {name: foo, namespace: default}
spec:
  tls:
  - {hosts: [h], secretName: cert}
  rules:
  - host: h
    http:
      paths:
      - {path: /a, pathType: Prefix, backend: {service: {name: svc, port: {number: 8080}}}}
      - {path: /b, pathType: Prefix, backend: {service: {name: bar, port: {name: http}}}}
"#;

fn complete() -> Objects {
    Objects::default()
        .with_service(
            "default",
            "metadata: {name: svc}\nspec: {ports: [{port: 8080}]}",
        )
        .with_service(
            "default",
            "metadata: {name: bar}\nspec: {ports: [{name: http, port: 80}]}",
        )
        .with_secret("default", "cert", Some("kubernetes.io/tls"), b"crt", b"key")
}

#[test]
fn references_ok() {
    assert_eq!(
        validate_references(&ingress(REF_INGRESS), &complete()),
        Ok(())
    );
    // An Opaque Secret with both keys is accepted too.
    let objects = complete().with_secret("default", "cert", Some("Opaque"), b"crt", b"key");
    assert_eq!(validate_references(&ingress(REF_INGRESS), &objects), Ok(()));
}

#[test]
fn missing_service_is_reported_with_field() {
    let mut objects = complete();
    objects.services.remove(&("default".into(), "bar".into()));
    let e = validate_references(&ingress(REF_INGRESS), &objects).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Ingress default/foo: spec.rules[0].http.paths[1].backend.service.name: Service default/bar not found"
    );
}

#[test]
fn missing_service_port_is_reported() {
    let objects = complete()
        .with_service(
            "default",
            "metadata: {name: svc}\nspec: {ports: [{port: 9090}]}",
        )
        .with_service(
            "default",
            "metadata: {name: bar}\nspec: {ports: [{name: grpc, port: 80}]}",
        );
    let e = validate_references(&ingress(REF_INGRESS), &objects).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Ingress default/foo: spec.rules[0].http.paths[0].backend.service.port.number: Service default/svc has no port 8080"
    );
    let objects = complete().with_service(
        "default",
        "metadata: {name: bar}\nspec: {ports: [{name: grpc, port: 80}]}",
    );
    let e = validate_references(&ingress(REF_INGRESS), &objects).unwrap_err();
    assert_eq!(
        e.field(),
        "spec.rules[0].http.paths[1].backend.service.port.name"
    );
}

#[test]
fn tls_secret_problems_are_reported() {
    let mut objects = complete();
    objects.secrets.clear();
    let e = validate_references(&ingress(REF_INGRESS), &objects).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Ingress default/foo: spec.tls[0].secretName: Secret default/cert not found"
    );

    let objects = complete().with_secret("default", "cert", Some("kubernetes.io/tls"), b"crt", b"");
    let e = validate_references(&ingress(REF_INGRESS), &objects).unwrap_err();
    assert!(matches!(e, IngressError::InvalidSecret { .. }), "{e:?}");
    assert!(e.to_string().contains("tls.key"), "{e}");

    let mut objects = complete();
    let secret = objects
        .secrets
        .get_mut(&("default".into(), "cert".into()))
        .unwrap();
    secret.type_ = Some("Opaque".into());
    secret.data.as_mut().unwrap().remove("tls.key");
    let e = validate_references(&ingress(REF_INGRESS), &objects).unwrap_err();
    assert!(
        e.to_string().contains("expected \"kubernetes.io/tls\""),
        "{e}"
    );
}

#[test]
fn default_backend_reference_is_checked() {
    let ing = ingress(
        "metadata: {name: d, namespace: ns}\nspec:\n  defaultBackend: {service: {name: gone, port: {number: 80}}}\n",
    );
    let e = validate_references(&ing, &Objects::default()).unwrap_err();
    assert_eq!(e.field(), "spec.defaultBackend.service.name");
}
