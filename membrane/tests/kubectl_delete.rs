//! `kubectl delete` with ownerReference garbage collection, finalizers and
//! namespace deletion.

mod kubectl_support;

use kubectl_support::{ApiServer, eventually, json, repo};

fn exists(s: &ApiServer, args: &[&str]) -> bool {
    let mut a = vec!["get"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["-o", "name", "--ignore-not-found"]);
    !s.ok(&a).trim().is_empty()
}

#[test]
fn delete_collects_owned_objects() {
    let s = ApiServer::start(29131);
    s.ok(&[
        "apply",
        "-f",
        repo().join("examples/quickstart").to_str().expect("path"),
    ]);
    let ing = json(&s.ok(&["get", "ingress", "quickstart", "-o", "json"]));
    let uid = ing["metadata"]["uid"].as_str().expect("uid");
    // A CEC owned by the Ingress, as the operator writes it, and a Secret
    // owned by that CEC (a chain).
    let cec = format!(
        r#"
apiVersion: cilium.io/v2
kind: CiliumEnvoyConfig
metadata:
  name: cilium-ingress-default-quickstart
  namespace: default
  ownerReferences:
  - apiVersion: networking.k8s.io/v1
    kind: Ingress
    name: quickstart
    uid: {uid}
    controller: true
    blockOwnerDeletion: true
spec:
  resources: []
"#
    );
    s.ok_stdin(&["apply", "-f", "-"], &cec);
    let cec_uid = json(&s.ok(&[
        "get",
        "cec",
        "cilium-ingress-default-quickstart",
        "-o",
        "json",
    ]))["metadata"]["uid"]
        .as_str()
        .expect("uid")
        .to_string();
    let secret = format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: chained\n  ownerReferences:\n  - {{apiVersion: cilium.io/v2, kind: CiliumEnvoyConfig, name: x, uid: {cec_uid}}}\nstringData: {{a: b}}\n"
    );
    s.ok_stdin(&["apply", "-f", "-"], &secret);
    // Owned by the Ingress and by a Service that stays: survives, minus the
    // dangling reference.
    let svc_uid = json(&s.ok(&["get", "svc", "echo-a", "-o", "json"]))["metadata"]["uid"]
        .as_str()
        .expect("uid")
        .to_string();
    let shared = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: shared\n  ownerReferences:\n  - {{apiVersion: networking.k8s.io/v1, kind: Ingress, name: quickstart, uid: {uid}}}\n  - {{apiVersion: v1, kind: Service, name: echo-a, uid: {svc_uid}}}\n"
    );
    s.ok_stdin(&["apply", "-f", "-"], &shared);

    let out = s.ok(&["delete", "ingress", "quickstart"]);
    assert!(
        out.contains("ingress.networking.k8s.io \"quickstart\" deleted"),
        "{out}"
    );
    eventually("the owned CEC to be collected", || {
        !exists(&s, &["cec", "cilium-ingress-default-quickstart"])
    });
    eventually("the Secret owned by the CEC to be collected", || {
        !exists(&s, &["secret", "chained"])
    });
    eventually("the dangling owner reference to go", || {
        let cm = json(&s.ok(&["get", "cm", "shared", "-o", "json"]));
        cm["metadata"]["ownerReferences"].as_array().map(Vec::len) == Some(1)
    });
    assert!(exists(&s, &["svc", "echo-a"]));

    // Orphan propagation keeps dependents and drops their references.
    let svc = json(&s.ok(&["get", "svc", "echo-b", "-o", "json"]));
    let svc_b = svc["metadata"]["uid"].as_str().expect("uid");
    s.ok_stdin(
        &["apply", "-f", "-"],
        &format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: orphan\n  ownerReferences:\n  - {{apiVersion: v1, kind: Service, name: echo-b, uid: {svc_b}}}\n"),
    );
    s.ok(&["delete", "svc", "echo-b", "--cascade=orphan"]);
    eventually("the orphan's reference to go", || {
        json(&s.ok(&["get", "cm", "orphan", "-o", "json"]))["metadata"]["ownerReferences"].is_null()
    });
    assert!(!exists(&s, &["svc", "echo-b"]));
}

#[test]
fn finalizers_hold_deletion_and_namespaces_take_their_contents() {
    let s = ApiServer::start(29132);
    s.ok_stdin(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: held\n  finalizers: [example.com/hold]\n",
    );
    s.ok(&["delete", "cm", "held", "--wait=false"]);
    let held = json(&s.ok(&["get", "cm", "held", "-o", "json"]));
    assert!(held["metadata"]["deletionTimestamp"].is_string(), "{held}");
    s.ok(&[
        "patch",
        "cm",
        "held",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ]);
    assert!(!exists(&s, &["cm", "held"]));

    // kubectl's generators send protobuf.
    s.ok(&["create", "namespace", "doomed"]);
    s.ok(&[
        "create",
        "configmap",
        "gen",
        "-n",
        "doomed",
        "--from-literal=k=v",
    ]);
    s.ok(&[
        "create",
        "secret",
        "generic",
        "gen",
        "-n",
        "doomed",
        "--from-literal=k=v",
    ]);
    s.ok(&["create", "serviceaccount", "gen", "-n", "doomed"]);
    let cm = json(&s.ok(&["get", "cm", "gen", "-n", "doomed", "-o", "json"]));
    assert_eq!(cm["data"]["k"], "v");
    let secret = json(&s.ok(&["get", "secret", "gen", "-n", "doomed", "-o", "json"]));
    assert_eq!(secret["data"]["k"], "dg==");
    assert_eq!(secret["type"], "Opaque");
    assert!(exists(&s, &["serviceaccount", "gen", "-n", "doomed"]));
    s.ok_stdin(
        &["apply", "-n", "doomed", "-f", "-"],
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: b}\n",
    );
    // kubectl waits until the namespace is gone.
    s.ok(&["delete", "namespace", "doomed", "--timeout=30s"]);
    assert!(!exists(&s, &["namespace", "doomed"]));
    assert!(
        s.ok(&["get", "cm,secret", "-n", "doomed", "-o", "name"])
            .trim()
            .is_empty()
    );
    // Creating in a missing namespace is refused.
    let out = s.with_stdin(
        &["apply", "-n", "doomed", "-f", "-"],
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: late}\n",
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("namespaces \"doomed\" not found"));
}
