//! `kubectl describe` of an object shows its Events.

mod kubectl_support;

use kubectl_support::{ApiServer, json, repo};

#[test]
fn describe_shows_events() {
    let s = ApiServer::start(35121);
    s.ok(&[
        "apply",
        "-f",
        repo().join("examples/quickstart").to_str().expect("path"),
    ]);
    let ing = json(&s.ok(&["get", "ingress", "quickstart", "-o", "json"]));
    let uid = ing["metadata"]["uid"].as_str().expect("uid");
    let event = format!(
        r#"
apiVersion: v1
kind: Event
metadata:
  generateName: quickstart.
  namespace: default
involvedObject:
  apiVersion: networking.k8s.io/v1
  kind: Ingress
  name: quickstart
  namespace: default
  uid: {uid}
reason: Translated
message: the Ingress was translated to CiliumEnvoyConfig cilium-ingress-default-quickstart
type: Normal
count: 1
firstTimestamp: "2026-01-01T00:00:00Z"
lastTimestamp: "2026-01-01T00:00:00Z"
source:
  component: membrane-operator
"#
    );
    let out = s.ok_stdin(&["create", "-f", "-"], &event);
    assert!(out.starts_with("event/quickstart."), "generateName: {out}");
    let described = s.ok(&["describe", "ingress", "quickstart"]);
    assert!(described.contains("Events:"), "{described}");
    assert!(described.contains("Translated"), "{described}");
    assert!(described.contains("membrane-operator"), "{described}");
    assert!(
        described.contains("the Ingress was translated to CiliumEnvoyConfig"),
        "{described}"
    );
    // Backends resolve through the EndpointSlices.
    assert!(described.contains("127.0.10.1:3000"), "{described}");
    // Another object's describe does not show it.
    let svc = s.ok(&["describe", "service", "echo-a"]);
    assert!(!svc.contains("Translated"), "{svc}");
}
