//! `kubectl edit` round-trips through the embedded API (the editor is a
//! script that rewrites a field).

mod kubectl_support;

use kubectl_support::{ApiServer, json, repo};

#[test]
fn edit_changes_an_object() {
    let s = ApiServer::start(29141);
    s.ok(&[
        "apply",
        "-f",
        repo().join("examples/quickstart").to_str().expect("path"),
    ]);
    let editor = s.data.path().join("editor.sh");
    std::fs::write(
        &editor,
        "#!/bin/sh\nsed -i 's/number: 80$/number: 8080/' \"$1\"\n",
    )
    .expect("write editor");
    let mut cmd = s.kubectl_cmd(&["edit", "ingress", "quickstart"]);
    cmd.env("KUBE_EDITOR", format!("sh {}", editor.display()));
    let out = cmd.output().expect("kubectl edit");
    assert!(
        out.status.success(),
        "kubectl edit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("edited"));
    let ing = json(&s.ok(&["get", "ingress", "quickstart", "-o", "json"]));
    let port = &ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["port"]["number"];
    assert_eq!(port, 8080, "{ing}");
    assert_eq!(ing["metadata"]["generation"], 2);
    // The edit is attributed to kubectl-edit.
    let full = json(&s.ok(&[
        "get",
        "ingress",
        "quickstart",
        "-o",
        "json",
        "--show-managed-fields",
    ]));
    assert!(
        full["metadata"]["managedFields"]
            .as_array()
            .expect("managedFields")
            .iter()
            .any(|m| m["manager"] == "kubectl-edit"),
        "{full}"
    );
}
