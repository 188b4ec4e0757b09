//! The real kubectl against `membrane apiserver`: client-side and
//! server-side apply of examples/quickstart, the cilium.io CRDs and a
//! CiliumEnvoyConfig; `get -o yaml`; field-manager conflicts.

mod kubectl_support;

use kubectl_support::{ApiServer, json, repo};

const CEC: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumEnvoyConfig
metadata:
  name: echo
  namespace: default
  labels:
    app: echo
spec:
  services:
  - name: echo-a
    namespace: default
  backendServices:
  - name: echo-a
    namespace: default
    number: ["80"]
  resources:
  - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
    name: listener
    filterChains: []
"#;

#[test]
fn client_side_apply_of_the_quickstart() {
    let s = ApiServer::start(29101);
    let quickstart = repo().join("examples/quickstart");
    let q = quickstart.to_str().expect("path");
    let out = s.ok(&["apply", "-f", q]);
    for line in [
        "ingressclass.networking.k8s.io/cilium created",
        "ingress.networking.k8s.io/quickstart created",
        "service/echo-a created",
        "service/echo-b created",
        "endpointslice.discovery.k8s.io/echo-a-1 created",
        "endpointslice.discovery.k8s.io/echo-b-1 created",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    // Applying again changes nothing: no resourceVersion moves. (kubectl
    // still sends the atomic EndpointSlice port list, which the server
    // defaults like Kubernetes does, and then says "configured".)
    let versions = |s: &ApiServer| -> Vec<String> {
        let all = json(&s.ok(&[
            "get",
            "ingress,ingressclass,svc,endpointslices",
            "-o",
            "json",
        ]));
        all["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|o| {
                format!(
                    "{}={}",
                    o["metadata"]["name"], o["metadata"]["resourceVersion"]
                )
            })
            .collect()
    };
    let before = versions(&s);
    assert_eq!(before.len(), 6, "{before:?}");
    let again = s.ok(&["apply", "-f", q]);
    for line in [
        "ingressclass.networking.k8s.io/cilium unchanged",
        "ingress.networking.k8s.io/quickstart unchanged",
        "service/echo-a unchanged",
        "service/echo-b unchanged",
    ] {
        assert!(again.contains(line), "missing {line:?} in:\n{again}");
    }
    assert_eq!(versions(&s), before);
    let rv_before =
        json(&s.ok(&["get", "ingress", "quickstart", "-o", "json"]))["metadata"]["resourceVersion"]
            .clone();

    // A changed file is patched in place.
    let services = std::fs::read_to_string(quickstart.join("services.yaml")).expect("read");
    let changed = services.replace("port: 8080", "port: 8081");
    let out = s.ok_stdin(&["apply", "-f", "-"], &changed);
    assert!(out.contains("service/echo-b configured"), "{out}");
    let svc = json(&s.ok(&["get", "service", "echo-b", "-o", "json"]));
    assert_eq!(
        svc["spec"]["ports"].as_array().map(Vec::len),
        Some(1),
        "{svc}"
    );
    assert_eq!(svc["spec"]["ports"][0]["port"], 8081);
    assert_eq!(svc["metadata"]["generation"], 2);
    // The untouched Ingress kept its resourceVersion.
    let ing = json(&s.ok(&["get", "ingress", "quickstart", "-o", "json"]));
    assert_eq!(ing["metadata"]["resourceVersion"], rv_before);

    // get -o yaml shows what was applied.
    let yaml = s.ok(&["get", "ingress", "quickstart", "-o", "yaml"]);
    for needle in [
        "kind: Ingress",
        "ingressClassName: cilium",
        "name: echo-b",
        "kubectl.kubernetes.io/last-applied-configuration",
        "uid: ",
        "creationTimestamp: ",
    ] {
        assert!(yaml.contains(needle), "missing {needle:?} in:\n{yaml}");
    }
    let listed = s.ok(&[
        "get",
        "endpointslices",
        "-l",
        "kubernetes.io/service-name=echo-b",
        "-o",
        "name",
    ]);
    assert_eq!(listed.trim(), "endpointslice.discovery.k8s.io/echo-b-1");
    // kubectl follows continue tokens.
    let paged = s.ok(&[
        "get",
        "services,endpointslices",
        "--chunk-size=1",
        "-o",
        "name",
    ]);
    assert_eq!(paged.lines().count(), 4, "{paged}");
    let paged = s.ok(&["get", "namespaces", "--chunk-size=1", "--no-headers"]);
    assert_eq!(paged.lines().count(), 4, "{paged}");

    // Server-side printing: kubectl's usual columns.
    let table = s.ok(&["get", "services"]);
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        [
            "NAME",
            "TYPE",
            "CLUSTER-IP",
            "EXTERNAL-IP",
            "PORT(S)",
            "AGE"
        ],
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("echo-b") && l.contains("8081/TCP")),
        "{table}"
    );
    let table = s.ok(&["get", "ingress", "-A"]);
    assert!(table.starts_with("NAMESPACE"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.contains("quickstart") && l.contains("cilium")),
        "{table}"
    );

    // Field validation (kubectl's default is Strict) for built-in kinds.
    let typo = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: typo}\ndta: {a: b}\n";
    let out = s.with_stdin(&["apply", "-f", "-"], typo);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("strict decoding error: unknown field \"dta\""),
        "{err}"
    );
    let out = s.with_stdin(&["apply", "--validate=warn", "-f", "-"], typo);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown field \"dta\""),
        "warning expected: {err}"
    );

    // Moving to server-side apply with the same content conflicts with
    // nothing, although the server defaulted fields in atomic lists.
    let out = s.ok_stdin(&["apply", "--server-side", "-f", "-"], &changed);
    assert_eq!(out.matches("serverside-applied").count(), 4, "{out}");
    let out = s.ok(&[
        "apply",
        "--server-side",
        "-f",
        quickstart.join("ingress.yaml").to_str().expect("path"),
    ]);
    assert_eq!(out.matches("serverside-applied").count(), 2, "{out}");
}

#[test]
fn server_side_apply_of_the_quickstart_and_a_cec() {
    let s = ApiServer::start(29102);
    let quickstart = repo().join("examples/quickstart");
    let out = s.ok(&[
        "apply",
        "--server-side",
        "-f",
        quickstart.to_str().expect("path"),
    ]);
    assert_eq!(out.matches("serverside-applied").count(), 6, "{out}");

    let crds = repo().join("crds/yaml");
    let out = s.ok(&["apply", "--server-side", "-f", crds.to_str().expect("path")]);
    assert!(
        out.contains("ciliumenvoyconfigs.cilium.io serverside-applied"),
        "{out}"
    );
    let crd = json(&s.ok(&["get", "crd", "ciliumenvoyconfigs.cilium.io", "-o", "json"]));
    assert_eq!(crd["status"]["conditions"][1]["type"], "Established");

    let out = s.ok_stdin(&["apply", "--server-side", "-f", "-"], CEC);
    assert!(
        out.contains("ciliumenvoyconfig.cilium.io/echo serverside-applied"),
        "{out}"
    );
    let cec = json(&s.ok(&["get", "cec", "echo", "-o", "json", "--show-managed-fields"]));
    assert_eq!(cec["spec"]["backendServices"][0]["number"][0], "80");
    let managers: Vec<&str> = cec["metadata"]["managedFields"]
        .as_array()
        .expect("managedFields")
        .iter()
        .filter_map(|m| m["manager"].as_str())
        .collect();
    assert!(managers.contains(&"kubectl"), "{managers:?}");
    assert_eq!(cec["metadata"]["managedFields"][0]["operation"], "Apply");

    // Another manager setting the same field to another value conflicts...
    let other = "apiVersion: cilium.io/v2\nkind: CiliumEnvoyConfig\nmetadata:\n  name: echo\n  namespace: default\n  labels:\n    app: other\n";
    let out = s.with_stdin(
        &["apply", "--server-side", "--field-manager=other", "-f", "-"],
        other,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("conflict") && err.contains(".metadata.labels.app"),
        "{err}"
    );
    // ...unless forced, which moves the field to it.
    s.ok_stdin(
        &[
            "apply",
            "--server-side",
            "--field-manager=other",
            "--force-conflicts",
            "-f",
            "-",
        ],
        other,
    );
    let cec = json(&s.ok(&["get", "cec", "echo", "-o", "json"]));
    assert_eq!(cec["metadata"]["labels"]["app"], "other");

    // The first manager dropping a field it alone owned removes it.
    let trimmed = CEC.replace("  labels:\n    app: echo\n", "");
    let no_services = trimmed.replace(
        "  services:\n  - name: echo-a\n    namespace: default\n",
        "",
    );
    s.ok_stdin(&["apply", "--server-side", "-f", "-"], &no_services);
    let cec = json(&s.ok(&["get", "cec", "echo", "-o", "json"]));
    assert!(cec["spec"].get("services").is_none(), "{cec}");
    assert_eq!(
        cec["metadata"]["labels"]["app"], "other",
        "still owned by `other`"
    );

    // Client-side apply of a CEC (a JSON merge patch for custom kinds).
    let out = s.ok_stdin(
        &["apply", "-f", "-"],
        &CEC.replace("name: echo\n", "name: echo2\n"),
    );
    assert!(
        out.contains("ciliumenvoyconfig.cilium.io/echo2 created"),
        "{out}"
    );
    let changed = CEC
        .replace("name: echo\n", "name: echo2\n")
        .replace("[\"80\"]", "[\"8080\"]");
    let out = s.ok_stdin(&["apply", "-f", "-"], &changed);
    assert!(out.contains("configured"), "{out}");
    let yaml = s.ok(&["get", "ciliumenvoyconfigs", "echo2", "-o", "yaml"]);
    assert!(yaml.contains("- \"8080\""), "{yaml}");
}

#[test]
fn a_new_crd_is_served_at_once() {
    let s = ApiServer::start(29103);
    let crd = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.com
spec:
  group: example.com
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wd]}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}
"#;
    // kubectl has discovered the server before the CRD exists.
    s.ok(&["get", "configmaps"]);
    s.ok_stdin(&["apply", "-f", "-"], crd);
    let out = s.ok_stdin(
        &["apply", "-f", "-"],
        "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w1}\nspec: {size: 3}\n",
    );
    assert!(out.contains("widget.example.com/w1 created"), "{out}");
    let w = json(&s.ok(&["get", "wd", "w1", "-o", "json"]));
    assert_eq!(w["spec"]["size"], 3);
    // Deleting the CRD stops serving its resource and deletes its objects:
    // created again, it is empty.
    s.ok(&["delete", "crd", "widgets.example.com"]);
    let (code, _) = s.http(
        "GET",
        "/apis/example.com/v1/namespaces/default/widgets",
        None,
    );
    assert_eq!(code, 404);
    s.ok_stdin(&["apply", "-f", "-"], crd);
    let listed = s.ok(&["get", "widgets", "-o", "name"]);
    assert!(listed.trim().is_empty(), "{listed}");
}
