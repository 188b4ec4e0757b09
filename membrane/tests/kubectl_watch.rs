//! `kubectl get -w` against `membrane apiserver` sees objects appear,
//! change and go.

mod kubectl_support;

use kubectl_support::ApiServer;

#[test]
fn get_watch_sees_changes() {
    let s = ApiServer::start(29111);
    s.ok_stdin(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: first}\ndata: {a: b}\n",
    );
    let w = s.watch(&[
        "get",
        "configmaps",
        "-w",
        "-o",
        "custom-columns=NAME:.metadata.name,A:.data.a",
    ]);
    w.expect_line("first");
    s.ok_stdin(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: second}\ndata: {a: new}\n",
    );
    let line = w.expect_line("second");
    assert!(line.contains("new"), "{line}");
    s.ok(&[
        "patch",
        "configmap",
        "first",
        "--type=merge",
        "-p",
        r#"{"data":{"a":"patched"}}"#,
    ]);
    let line = w.expect_line("patched");
    assert!(line.contains("first"), "{line}");

    // The default (server-side table) output of a watch too.
    let w3 = s.watch(&["get", "configmaps", "-w"]);
    w3.expect_line("DATA");
    s.ok_stdin(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: third}\ndata: {a: b, c: d}\n",
    );
    let line = w3.expect_line("third");
    assert_eq!(
        line.split_whitespace().nth(1),
        Some("2"),
        "DATA column: {line}"
    );

    // A label-selected watch sees only matching objects.
    let w2 = s.watch(&["get", "configmaps", "-l", "team=x", "-w", "-o", "name"]);
    s.ok(&["label", "configmap", "second", "team=y"]);
    s.ok(&["label", "configmap", "first", "team=x"]);
    let line = w2.expect_line("configmap/");
    assert_eq!(line, "configmap/first");
    // Leaving the selection is seen as a deletion by a selector watch.
    let list = kubectl_support::json(&s.ok(&[
        "get",
        "--raw",
        "/api/v1/namespaces/default/configmaps?labelSelector=team%3Dx",
    ]));
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .expect("rv")
        .to_string();
    s.ok(&["label", "configmap", "first", "team=z", "--overwrite"]);
    // Replayed from the resourceVersion of the list, which predates it.
    let body = kubectl_support::raw_get(
        s.port,
        &format!(
            "/api/v1/namespaces/default/configmaps?watch=1&labelSelector=team%3Dx&resourceVersion={rv}&timeoutSeconds=1"
        ),
    );
    assert!(body.contains(r#""type":"DELETED""#), "{body}");
    assert!(!body.contains("second"), "{body}");
}
