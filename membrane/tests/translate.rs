//! `membrane translate` prints exactly the golden CECs of the ingress crate.

use std::path::Path;
use std::process::Command;

/// The `membrane translate` flags a golden case's `options.yaml` stands for.
fn option_flags(case: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(case.join("options.yaml")) else {
        return Vec::new();
    };
    let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).expect("options.yaml");
    let mut flags = Vec::new();
    if let Some(d) = v.get("default_secret") {
        for (flag, key) in [
            ("--ingress-default-secret-namespace", "namespace"),
            ("--ingress-default-secret-name", "name"),
        ] {
            flags.push(flag.to_string());
            flags.push(d[key].as_str().expect("string").to_string());
        }
    }
    if v.get("proxy_protocol").and_then(|p| p.as_bool()) == Some(true) {
        flags.push("--enable-ingress-proxy-protocol".into());
    }
    if let Some(port) = v
        .get("host_network_shared_listener_port")
        .and_then(|p| p.as_u64())
    {
        flags.push("--ingress-host-network".into());
        flags.push("--ingress-host-network-shared-listener-port".into());
        flags.push(port.to_string());
    }
    if let Some(labels) = v
        .get("host_network_node_labels")
        .and_then(|l| l.as_mapping())
    {
        let list: Vec<String> = labels
            .iter()
            .filter_map(|(k, v)| Some(format!("{}={}", k.as_str()?, v.as_str()?)))
            .collect();
        flags.push(format!(
            "--ingress-host-network-node-label-selector={}",
            list.join(",")
        ));
    }
    if let Some(prefixes) = v
        .get("lb_annotation_prefixes")
        .and_then(|p| p.as_sequence())
    {
        let list: Vec<&str> = prefixes.iter().filter_map(|p| p.as_str()).collect();
        flags.push(format!(
            "--ingress-lb-annotation-prefixes={}",
            list.join(",")
        ));
    }
    flags
}

#[test]
fn translate_matches_every_golden_case() {
    let testdata = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ingress/testdata");
    let mut cases = 0;
    for entry in std::fs::read_dir(&testdata).expect("ingress/testdata") {
        let case = entry.expect("entry").path();
        let out = Command::new(env!("CARGO_BIN_EXE_membrane"))
            .arg("translate")
            .arg("-f")
            .arg(case.join("input.yaml"))
            .args(option_flags(&case))
            .output()
            .expect("run membrane translate");
        let stderr = String::from_utf8_lossy(&out.stderr);
        match std::fs::read_to_string(case.join("output-rejected.txt")) {
            // Cases with rejected Ingresses still print the good CECs, name
            // every rejection on stderr and exit non-zero.
            Ok(rejected) => {
                assert!(!out.status.success(), "{}", case.display());
                for line in rejected.lines().filter(|l| !l.trim().is_empty()) {
                    // Lines are `<ns>/<name>: <message>`.
                    let msg = line.split_once(": ").map_or(line, |(_, m)| m).trim();
                    assert!(
                        stderr.contains(msg),
                        "{}: stderr lacks {msg:?}:\n{stderr}",
                        case.display()
                    );
                }
            }
            Err(_) => assert!(out.status.success(), "{}: {stderr}", case.display()),
        }
        let want = std::fs::read_to_string(case.join("output-cec.yaml")).expect("golden");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            want,
            "{}",
            case.display()
        );
        cases += 1;
    }
    assert!(cases >= 5, "expected the five golden cases, found {cases}");
}

#[test]
fn translate_reports_the_failing_field_and_exits_non_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bad.yaml");
    std::fs::write(
        &file,
        r#"apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: bad, namespace: default}
spec:
  ingressClassName: cilium
  rules:
  - http:
      paths:
      - path: "/(unclosed"
        pathType: ImplementationSpecific
        backend: {service: {name: svc, port: {number: 80}}}
"#,
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_membrane"))
        .args(["translate", "-f"])
        .arg(&file)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Ingress default/bad") && err.contains("spec.rules[0].http.paths[0].path"),
        "{err}"
    );
}
