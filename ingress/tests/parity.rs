//! Cilium Ingress parity features on small Ingresses: TLS passthrough,
//! host network, proxy protocol, default TLS secret, the generated
//! Service's settings, and how every `ingress.cilium.io/*` annotation is
//! parsed (aliases included) and rejected when invalid.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::networking::v1::Ingress;
use membrane_ingress::{
    HostNetwork, IngressError, Lookup, SecretRef, TranslateOptions, Translation, shared_part,
    translate, translate_shared, validate_references_with,
};
use serde_json::Value;

fn ingress(yaml: &str) -> Ingress {
    serde_yaml_ng::from_str(yaml).expect("valid Ingress YAML")
}

fn with(opts: &TranslateOptions, yaml: &str) -> Result<Translation, IngressError> {
    translate(&ingress(yaml), opts)
}

fn listener(t: &Translation) -> Value {
    t.cec.spec.resources[0].to_value()
}

fn annotated(annotations: &str) -> String {
    format!(
        r#"
metadata:
  name: web
  namespace: prod
  annotations: {{{annotations}}}
spec:
  tls: [{{hosts: [a.example.com], secretName: a-cert}}]
  rules:
  - host: a.example.com
    http:
      paths:
      - {{path: /, pathType: Prefix, backend: {{service: {{name: a, port: {{number: 443}}}}}}}}
"#
    )
}

#[test]
fn passthrough_listener_proxies_by_sni_without_terminating() {
    let t = with(
        &TranslateOptions::default(),
        &annotated("ingress.cilium.io/tls-passthrough: enabled"),
    )
    .expect("translates");
    let l = listener(&t);
    let chains = l["filterChains"].as_array().expect("chains");
    assert_eq!(chains.len(), 1, "only the SNI chain: {l}");
    assert_eq!(
        chains[0]["filterChainMatch"]["serverNames"][0],
        "a.example.com"
    );
    assert_eq!(chains[0]["filterChainMatch"]["transportProtocol"], "tls");
    assert!(chains[0].get("transportSocket").is_none(), "no termination");
    let tcp = &chains[0]["filters"][0];
    assert_eq!(tcp["name"], "envoy.filters.network.tcp_proxy");
    assert_eq!(tcp["typedConfig"]["cluster"], "prod:a:443");
    // Port 443 only; no HTTP route configuration.
    assert_eq!(t.cec.spec.services[0].ports, vec![443]);
    assert!(!t.cec.spec.resources.iter().any(|r| {
        r.name_and_type()
            .1
            .is_some_and(|s| s.ends_with("RouteConfiguration"))
    }));
    let svc_ports: Vec<i32> = t
        .service
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .expect("ports")
        .iter()
        .map(|p| p.port)
        .collect();
    assert_eq!(svc_ports, vec![443]);
}

#[test]
fn passthrough_values_and_alias_follow_cilium() {
    for (key, value, on) in [
        ("ingress.cilium.io/tls-passthrough", "enabled", true),
        ("ingress.cilium.io/tls-passthrough", "true", true),
        ("io.cilium.ingress/tls-passthrough", "enabled", true),
        ("ingress.cilium.io/tls-passthrough", "disabled", false),
        ("ingress.cilium.io/tls-passthrough", "false", false),
    ] {
        let t = with(
            &TranslateOptions::default(),
            &annotated(&format!("{key}: \"{value}\"")),
        )
        .expect("translates");
        let tcp = listener(&t)["filterChains"]
            .as_array()
            .expect("chains")
            .iter()
            .any(|c| c["filters"][0]["name"] == "envoy.filters.network.tcp_proxy");
        assert_eq!(tcp, on, "{key}: {value}");
    }
}

#[test]
fn proxy_protocol_filter_comes_before_tls_inspector() {
    let opts = TranslateOptions {
        proxy_protocol: true,
        ..TranslateOptions::default()
    };
    let t = with(&opts, &annotated("")).expect("translates");
    let l = listener(&t);
    let names: Vec<&str> = l["listenerFilters"]
        .as_array()
        .expect("filters")
        .iter()
        .filter_map(|f| f["name"].as_str())
        .collect();
    assert_eq!(
        names,
        vec![
            "envoy.filters.listener.proxy_protocol",
            "envoy.filters.listener.tls_inspector"
        ]
    );
    let off = with(&TranslateOptions::default(), &annotated("")).expect("translates");
    assert_eq!(
        listener(&off)["listenerFilters"].as_array().map(Vec::len),
        Some(1)
    );
}

#[test]
fn host_network_binds_the_host_port_and_makes_the_service_cluster_ip() {
    let opts = TranslateOptions {
        host_network: Some(HostNetwork {
            shared_listener_port: 8080,
            ..HostNetwork::default()
        }),
        ..TranslateOptions::default()
    };
    let t = with(
        &opts,
        &annotated("ingress.cilium.io/host-listener-port: \"9443\""),
    )
    .expect("ok");
    let l = listener(&t);
    assert_eq!(l["address"]["socketAddress"]["address"], "0.0.0.0");
    assert_eq!(l["address"]["socketAddress"]["portValue"], 9443);
    assert_eq!(
        l["additionalAddresses"][0]["address"]["socketAddress"]["address"],
        "::"
    );
    assert_eq!(t.cec.spec.services[0].ports, vec![9443]);
    let spec = t.service.spec.as_ref().expect("spec");
    assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
    assert_eq!(spec.external_traffic_policy, None);

    // Without the annotation: Cilium's fixed default 8080, whatever the
    // shared listener port.
    let other_shared = TranslateOptions {
        host_network: Some(HostNetwork {
            shared_listener_port: 9999,
            ..HostNetwork::default()
        }),
        ..TranslateOptions::default()
    };
    let t = with(&other_shared, &annotated("")).expect("ok");
    assert_eq!(listener(&t)["address"]["socketAddress"]["portValue"], 8080);
    // A node without IPv6 binds 0.0.0.0 only.
    let v4_only = TranslateOptions {
        host_network: Some(HostNetwork {
            ipv6: false,
            ..HostNetwork::default()
        }),
        ..TranslateOptions::default()
    };
    let t = with(&v4_only, &annotated("")).expect("ok");
    assert!(listener(&t).get("additionalAddresses").is_none());
    // NodePort wins over host network's ClusterIP, as in Cilium.
    let t = with(
        &opts,
        &annotated("ingress.cilium.io/service-type: NodePort"),
    )
    .expect("ok");
    assert_eq!(
        t.service.spec.as_ref().and_then(|s| s.type_.as_deref()),
        Some("NodePort")
    );
    // Without host network mode the annotation changes nothing.
    let t = with(
        &TranslateOptions::default(),
        &annotated("ingress.cilium.io/host-listener-port: \"9443\""),
    )
    .expect("ok");
    assert!(listener(&t).get("address").is_none());
}

#[test]
fn service_settings_follow_the_annotations() {
    let t = with(
        &TranslateOptions::default(),
        &annotated(
            "ingress.cilium.io/service-type: NodePort, ingress.cilium.io/insecure-node-port: \"30080\", ingress.cilium.io/secure-node-port: \"30443\", ingress.cilium.io/service-external-traffic-policy: Local",
        ),
    )
    .expect("ok");
    let spec = t.service.spec.as_ref().expect("spec");
    assert_eq!(spec.type_.as_deref(), Some("NodePort"));
    assert_eq!(spec.external_traffic_policy.as_deref(), Some("Local"));
    let node_ports: Vec<(i32, Option<i32>)> = spec
        .ports
        .iter()
        .flatten()
        .map(|p| (p.port, p.node_port))
        .collect();
    assert_eq!(node_ports, vec![(80, Some(30080)), (443, Some(30443))]);

    let t = with(
        &TranslateOptions::default(),
        &annotated("ingress.cilium.io/loadbalancer-class: example.com/lb"),
    )
    .expect("ok");
    let spec = t.service.spec.as_ref().expect("spec");
    assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
    assert_eq!(spec.load_balancer_class.as_deref(), Some("example.com/lb"));
    assert_eq!(spec.external_traffic_policy.as_deref(), Some("Cluster"));
}

#[test]
fn lb_annotation_prefixes_are_configurable() {
    let yaml = annotated("service.beta.kubernetes.io/x: \"1\", example.com/y: \"2\"");
    let t = with(&TranslateOptions::default(), &yaml).expect("ok");
    let copied = t.service.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(
        copied,
        BTreeMap::from([("service.beta.kubernetes.io/x".to_string(), "1".to_string())])
    );
    let opts = TranslateOptions {
        lb_annotation_prefixes: vec!["example.com".to_string()],
        ..TranslateOptions::default()
    };
    let t = with(&opts, &yaml).expect("ok");
    let copied = t.service.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(
        copied,
        BTreeMap::from([("example.com/y".to_string(), "2".to_string())])
    );
    let none = TranslateOptions {
        lb_annotation_prefixes: Vec::new(),
        ..TranslateOptions::default()
    };
    assert_eq!(
        with(&none, &yaml).expect("ok").service.metadata.annotations,
        None
    );
}

#[test]
fn every_invalid_annotation_is_rejected_naming_it() {
    let cases = [
        ("ingress.cilium.io/service-type", "ClusterIP"),
        ("io.cilium.ingress/service-type", "nodeport"),
        ("ingress.cilium.io/insecure-node-port", "x"),
        ("ingress.cilium.io/secure-node-port", "65536"),
        (
            "ingress.cilium.io/service-external-traffic-policy",
            "Everywhere",
        ),
        ("ingress.cilium.io/loadbalancer-class", ""),
        ("ingress.cilium.io/host-listener-port", "-1"),
        ("ingress.cilium.io/tls-passthrough", "yes"),
        ("ingress.cilium.io/force-https", "yes"),
        ("ingress.cilium.io/request-timeout", "5 minutes"),
        ("ingress.cilium.io/tcp-keep-alive", "on"),
        ("ingress.cilium.io/tcp-keep-alive-idle", "0"),
        ("io.cilium/tcp-keep-alive-probe-interval", "soon"),
        ("ingress.cilium.io/tcp-keep-alive-probe-max-failures", "1.5"),
        ("ingress.cilium.io/websocket", "maybe"),
    ];
    for (key, value) in cases {
        let e = with(
            &TranslateOptions::default(),
            &annotated(&format!("{key}: \"{value}\"")),
        )
        .expect_err(key);
        assert_eq!(e.field(), format!("metadata.annotations[{key}]"), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("Ingress prod/web") && text.contains(&format!("{value:?}")),
            "{text}"
        );
    }
}

#[test]
fn keep_alive_annotations_set_the_socket_options() {
    let t = with(
        &TranslateOptions::default(),
        &annotated(
            "ingress.cilium.io/tcp-keep-alive: disabled, ingress.cilium.io/tcp-keep-alive-idle: \"60\", io.cilium/tcp-keep-alive-probe-interval: \"15\", ingress.cilium.io/tcp-keep-alive-probe-max-failures: \"4\"",
        ),
    )
    .expect("ok");
    let l = listener(&t);
    let values: Vec<&str> = l["socketOptions"]
        .as_array()
        .expect("options")
        .iter()
        .filter_map(|o| o["intValue"].as_str())
        .collect();
    assert_eq!(values, vec!["0", "60", "15", "4"]);
}

struct Objects {
    service: Service,
    secrets: BTreeMap<(String, String), Secret>,
}

impl Default for Objects {
    fn default() -> Self {
        Self {
            service: serde_yaml_ng::from_str(
                "metadata: {name: a, namespace: prod}\nspec: {ports: [{port: 80}]}",
            )
            .expect("Service"),
            secrets: BTreeMap::new(),
        }
    }
}

impl Lookup for Objects {
    fn service(&self, ns: &str, name: &str) -> Option<&Service> {
        (ns == "prod" && name == "a").then_some(&self.service)
    }
    fn secret(&self, ns: &str, name: &str) -> Option<&Secret> {
        self.secrets.get(&(ns.to_string(), name.to_string()))
    }
}

const NO_SECRET_NAME: &str = r#"
metadata: {name: web, namespace: prod}
spec:
  tls: [{hosts: [a.example.com]}]
  rules:
  - host: a.example.com
    http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: a, port: {number: 80}}}}
"#;

#[test]
fn default_secret_serves_tls_hosts_without_secret_name() {
    let default = SecretRef {
        namespace: "certs".into(),
        name: "wildcard".into(),
    };
    let opts = TranslateOptions {
        default_secret: Some(default.clone()),
        ..TranslateOptions::default()
    };
    let t = with(&opts, NO_SECRET_NAME).expect("ok");
    let chain = &listener(&t)["filterChains"][1];
    assert_eq!(
        chain["transportSocket"]["typedConfig"]["commonTlsContext"]["tlsCertificateSdsSecretConfigs"]
            [0]["name"],
        "cilium-secrets/certs-wildcard"
    );
    // Without a default secret the entry is not served over TLS.
    let t = with(&TranslateOptions::default(), NO_SECRET_NAME).expect("ok");
    assert_eq!(
        listener(&t)["filterChains"].as_array().map(Vec::len),
        Some(1)
    );

    // The default secret must exist, and is named in the error.
    let ing = ingress(NO_SECRET_NAME);
    let e = validate_references_with(&ing, &Objects::default(), Some(&default))
        .expect_err("missing default secret");
    assert!(e.to_string().contains("certs/wildcard"), "{e}");
    assert!(e.field().starts_with("spec.tls[0].secretName"), "{e}");
    let mut objects = Objects::default();
    objects.secrets.insert(
        ("certs".into(), "wildcard".into()),
        Secret {
            type_: Some("kubernetes.io/tls".into()),
            data: Some(BTreeMap::from([
                ("tls.crt".to_string(), ByteString(b"c".to_vec())),
                ("tls.key".to_string(), ByteString(b"k".to_vec())),
            ])),
            ..Default::default()
        },
    );
    assert_eq!(
        validate_references_with(&ing, &objects, Some(&default)),
        Ok(())
    );
}

fn shared(name: &str, created: &str, body: &str) -> Ingress {
    ingress(&format!(
        "metadata: {{name: {name}, namespace: ns, creationTimestamp: \"{created}\", annotations: {{ingress.cilium.io/loadbalancer-mode: shared{body}}}}}\n"
    ))
}

#[test]
fn shared_passthrough_and_terminating_hosts_do_not_break_each_other() {
    let passthrough = |name: &str, created: &str, host: &str, svc: &str| {
        let mut ing = shared(
            name,
            created,
            ", ingress.cilium.io/tls-passthrough: enabled",
        );
        ing.spec = Some(
            serde_yaml_ng::from_str(&format!(
                "rules: [{{host: {host}, http: {{paths: [{{path: /, pathType: Prefix, backend: {{service: {{name: {svc}, port: {{number: 443}}}}}}}}]}}}}]"
            ))
            .expect("spec"),
        );
        ing
    };
    let mut terminating = shared("term", "2024-01-01T00:00:00Z", "");
    terminating.spec = Some(
        serde_yaml_ng::from_str(
            "tls: [{hosts: [t.example.com], secretName: c}]\nrules: [{host: t.example.com, http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: web, port: {number: 80}}}}]}}]",
        )
        .expect("spec"),
    );
    let ings = [
        terminating,
        passthrough("pt", "2024-01-01T00:00:01Z", "p.example.com", "p"),
        // Newer, same SNI as the terminated host: rejected.
        passthrough("steal-tls", "2024-01-01T00:00:02Z", "t.example.com", "x"),
        // Newer, same SNI as the passthrough host, other backend: rejected.
        passthrough("steal-pt", "2024-01-01T00:00:03Z", "p.example.com", "y"),
        // Same host and backend as an older passthrough: merged.
        passthrough("twin", "2024-01-01T00:00:04Z", "p.example.com", "p"),
    ];
    let opts = TranslateOptions::default();
    let out = translate_shared(&ings, &opts);
    let rejected: Vec<&str> = out.rejected.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(rejected, vec!["steal-tls", "steal-pt"]);
    for r in &out.rejected {
        let text = r.error.to_string();
        assert!(text.contains("already served by Ingress ns/"), "{text}");
    }
    let t = out.translation.expect("shared CEC");
    let chains = t.cec.spec.resources[0].to_value()["filterChains"]
        .as_array()
        .expect("chains")
        .clone();
    // raw_buffer HTTP, the terminating chain, the passthrough chain.
    assert_eq!(chains.len(), 3, "{chains:?}");
    let sni: Vec<&Value> = chains
        .iter()
        .map(|c| &c["filterChainMatch"]["serverNames"])
        .collect();
    assert_eq!(sni[1][0], "t.example.com");
    assert_eq!(sni[2][0], "p.example.com");
    assert_eq!(
        chains[2]["filters"][0]["typedConfig"]["cluster"],
        "ns:p:443"
    );
    assert!(shared_part(&ings[1], &opts).is_ok());
}

#[test]
fn passthrough_references_skip_what_is_ignored() {
    // The default backend, the host-less rule and the non-`/` path point at
    // Services that do not exist; only `a` (which exists) is used.
    let ing = ingress(
        r#"
metadata:
  name: web
  namespace: prod
  annotations: {ingress.cilium.io/tls-passthrough: enabled}
spec:
  defaultBackend: {service: {name: missing-default, port: {number: 1}}}
  tls: [{hosts: [a.example.com], secretName: missing-secret}]
  rules:
  - host: a.example.com
    http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: a, port: {number: 80}}}}
      - {path: /x, pathType: Prefix, backend: {service: {name: missing-path, port: {number: 1}}}}
  - http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: missing-host, port: {number: 1}}}}
"#,
    );
    assert_eq!(
        validate_references_with(&ing, &Objects::default(), None),
        Ok(())
    );
    // A used backend is still checked.
    let mut broken = ing.clone();
    if let Some(spec) = broken.spec.as_mut() {
        spec.rules = serde_yaml_ng::from_str(
            "[{host: a.example.com, http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: gone, port: {number: 80}}}}]}}]",
        )
        .expect("rules");
    }
    let e = validate_references_with(&broken, &Objects::default(), None).expect_err("missing");
    assert!(e.to_string().contains("prod/gone"), "{e}");
}
