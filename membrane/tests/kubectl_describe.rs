//! `kubectl describe` of an object shows its Events.

mod kubectl_support;

use kubectl_support::{ApiServer, json, repo};

#[test]
fn describe_shows_events() {
    let s = ApiServer::start(29121);
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
    // An events.k8s.io/v1 Event (what kube-rs' Recorder writes) about the
    // same object shows too: both APIs share one storage.
    let recorded = format!(
        r#"
apiVersion: events.k8s.io/v1
kind: Event
metadata:
  name: quickstart.recorded
  namespace: default
regarding:
  apiVersion: networking.k8s.io/v1
  kind: Ingress
  name: quickstart
  namespace: default
  uid: {uid}
reason: Programmed
note: listener programmed on the proxy
type: Normal
action: Reconcile
eventTime: "2026-01-01T00:00:00.000000Z"
reportingController: membrane.io/operator
reportingInstance: membrane-operator-0
"#
    );
    s.ok_stdin(&["apply", "-f", "-"], &recorded);
    let core = json(&s.ok(&["get", "events.v1.", "quickstart.recorded", "-o", "json"]));
    assert_eq!(
        core["message"], "listener programmed on the proxy",
        "{core}"
    );
    assert_eq!(core["involvedObject"]["uid"], uid);
    let described = s.ok(&["describe", "ingress", "quickstart"]);
    assert!(
        described.contains("listener programmed on the proxy"),
        "{described}"
    );
    assert!(described.contains("Programmed"), "{described}");
    let listed = json(&s.ok(&["get", "events.v1.events.k8s.io", "-o", "json"]));
    let notes: Vec<&str> = listed["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|e| e["note"].as_str())
        .collect();
    assert_eq!(notes.len(), 2, "{listed}");

    // Backends resolve through the EndpointSlices.
    assert!(described.contains("127.0.10.1:3000"), "{described}");
    // Another object's describe does not show it.
    let svc = s.ok(&["describe", "service", "echo-a"]);
    assert!(!svc.contains("Translated"), "{svc}");
}
