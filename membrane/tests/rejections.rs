//! Real Envoy: each kind of bad input is rejected with a message naming the
//! object and the field, while a good sibling keeps serving and updating.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;

const HTTP_PORT: u16 = 28180;

fn addr(ip: &str) -> SocketAddr {
    format!("{ip}:{HTTP_PORT}").parse().expect("address")
}

fn assert_rejected(m: &Membrane, object: &str, needles: &[&str]) {
    let mut last = Vec::new();
    let found = wait_until(Duration::from_secs(10), || {
        last = m.rejected();
        last.iter()
            .any(|(o, r)| o == object && needles.iter().all(|n| r.contains(n)))
    });
    assert!(
        found,
        "{object} not rejected with {needles:?}; rejected: {last:#?}"
    );
}

#[test]
fn bad_objects_are_rejected_and_siblings_keep_serving() {
    let backends = Backends::new();
    backends.start("127.0.22.1", "good");
    backends.start("127.0.22.2", "good-two");
    let m = Membrane::start("127.0.102.0/24", HTTP_PORT, 28543);
    m.apply(INGRESS_CLASS);
    m.apply(&service_yaml("good", 80, None, "127.0.22.1"));
    m.apply(&service_yaml("good-two", 80, None, "127.0.22.2"));
    m.apply(&ingress_yaml("sibling", &[("/", "good", 80)]));
    let ip = m.wait_ingress_ip("default", "sibling");
    assert_eq!(served_by(addr(&ip), "x", "/").as_deref(), Some("good"));
    let (code, _) = m.cli(&["status"]).expect("cli");
    assert_eq!(code, 0, "status exits 0 while nothing is rejected");

    // Ingress whose backend Service does not exist.
    m.apply(&ingress_yaml("missing-svc", &[("/", "nope", 80)]));
    assert_rejected(
        &m,
        "Ingress default/missing-svc",
        &[
            "spec.rules[0].http.paths[0].backend.service.name",
            "not found",
        ],
    );

    // Ingress whose TLS Secret is missing, and one whose Secret has no tls.key.
    let tls_ingress = |name: &str, secret: &str| {
        format!(
            r#"apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: {name}, namespace: default}}
spec:
  ingressClassName: cilium
  tls: [{{hosts: [secure.example.com], secretName: {secret}}}]
  rules:
  - host: secure.example.com
    http:
      paths:
      - {{path: /, pathType: Prefix, backend: {{service: {{name: good, port: {{number: 80}}}}}}}}
"#
        )
    };
    m.apply(&tls_ingress("missing-secret", "absent"));
    assert_rejected(
        &m,
        "Ingress default/missing-secret",
        &["spec.tls[0].secretName", "absent"],
    );
    // A real certificate, so only the missing key is wrong.
    let (crt, _) = membrane_certs::self_signed(&["secure.example.com"]).expect("issue");
    m.apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: no-key, namespace: default}}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}\n",
        indent(&crt, 4)
    ));
    m.apply(&tls_ingress("keyless", "no-key"));
    assert_rejected(
        &m,
        "Ingress default/keyless",
        &["spec.tls[0].secretName", "tls.key"],
    );

    // Invalid ImplementationSpecific regex.
    m.apply(
        r#"apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: bad-regex, namespace: default}
spec:
  ingressClassName: cilium
  rules:
  - http:
      paths:
      - {path: "/(unclosed", pathType: ImplementationSpecific, backend: {service: {name: good, port: {number: 80}}}}
"#,
    );
    assert_rejected(
        &m,
        "Ingress default/bad-regex",
        &["spec.rules[0].http.paths[0].path", "regex"],
    );

    // CEC with an unknown @type.
    m.apply(
        r#"apiVersion: cilium.io/v2
kind: CiliumEnvoyConfig
metadata: {name: unknown-type, namespace: default}
spec:
  resources:
  - {"@type": type.googleapis.com/envoy.config.listener.v3.Listenr, name: x}
"#,
    );
    assert_rejected(
        &m,
        "CiliumEnvoyConfig default/unknown-type",
        &["spec.resources[0]", "envoy.config.listener.v3.Listenr"],
    );

    // CEC with a misspelled field.
    m.apply(&direct_cec("misspelled", 28901, "x", "filterChainz"));
    assert_rejected(
        &m,
        "CiliumEnvoyConfig default/misspelled",
        &["spec.resources[0]", "filterChainz"],
    );

    // Two CECs defining the same listener port: the first keeps it.
    m.apply(&direct_cec("port-owner", 28902, "owner", "filterChains"));
    assert!(
        wait_until(Duration::from_secs(10), || body_at(28902).as_deref()
            == Some("owner")),
        "{}",
        m.log()
    );
    m.apply(&direct_cec("port-thief", 28902, "thief", "filterChains"));
    assert_rejected(
        &m,
        "CiliumEnvoyConfig default/port-thief",
        &[
            "spec.resources[0]",
            "127.0.0.1:28902",
            "already used by CiliumEnvoyConfig default/port-owner",
        ],
    );
    assert_eq!(body_at(28902).as_deref(), Some("owner"));

    // A CEC edited into a bad state keeps serving its last good version.
    m.apply(&direct_cec("last-good", 28903, "v1", "filterChains"));
    assert!(
        wait_until(Duration::from_secs(10), || body_at(28903).as_deref()
            == Some("v1")),
        "{}",
        m.log()
    );
    m.apply(&direct_cec("last-good", 28903, "v2", "filterChainz"));
    assert_rejected(
        &m,
        "CiliumEnvoyConfig default/last-good",
        &["spec.resources[0]", "filterChainz"],
    );
    assert_eq!(body_at(28903).as_deref(), Some("v1"));

    // The sibling still serves, and its own updates still land.
    assert_eq!(served_by(addr(&ip), "x", "/").as_deref(), Some("good"));
    m.apply(&ingress_yaml(
        "sibling",
        &[("/", "good", 80), ("/two", "good-two", 80)],
    ));
    assert!(
        wait_until(Duration::from_secs(10), || served_by(
            addr(&ip),
            "x",
            "/two"
        )
        .as_deref()
            == Some("good-two")),
        "sibling update did not land:\n{}",
        m.log()
    );

    // `membrane status` lists every rejected object and exits non-zero.
    let (code, out) = m.cli(&["status"]).expect("cli");
    assert_ne!(code, 0);
    for object in [
        "Ingress default/missing-svc",
        "Ingress default/missing-secret",
        "Ingress default/keyless",
        "Ingress default/bad-regex",
        "CiliumEnvoyConfig default/unknown-type",
        "CiliumEnvoyConfig default/misspelled",
        "CiliumEnvoyConfig default/port-thief",
        "CiliumEnvoyConfig default/last-good",
    ] {
        assert!(
            out.contains(object),
            "status does not list {object}:\n{out}"
        );
    }
    // No rejected object was ever NACKed by Envoy: validation caught it first.
    let status = m.status();
    assert!(
        !status.to_string().contains("\"error_detail\""),
        "Envoy NACKed something: {status:#}"
    );
}

fn indent(text: &str, n: usize) -> String {
    text.lines()
        .map(|l| format!("{:n$}{l}", ""))
        .collect::<Vec<_>>()
        .join("\n")
}
