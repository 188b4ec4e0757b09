//! `membrane policy trace -f DIR --src --dst --dport` prints the verdict
//! and the rule that decided it, for allowed and denied packets.

use std::process::Command;

fn trace(src: &str, dst: &str, dport: &str) -> (bool, String, String) {
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../policy/tests/fixtures/trace"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_membrane"))
        .args([
            "policy", "trace", "-f", dir, "--src", src, "--dst", dst, "--dport", dport,
        ])
        .output()
        .expect("run membrane");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn deny_rule_is_named() {
    let (ok, out, err) = trace("10.124.1.3", "10.124.1.2", "80/TCP");
    assert!(ok, "{err}");
    assert!(
        out.contains("Ingress: DENIED  by CiliumNetworkPolicy x/deny80 spec.ingressDeny[0]"),
        "{out}"
    );
    assert!(out.contains("Final verdict: DENIED"), "{out}");
    assert!(out.contains("k8s:pod=b"), "{out}");
}

#[test]
fn allow_rule_is_named_for_ips_and_labels() {
    let (ok, out, err) = trace("10.124.1.3", "10.124.1.2", "81/tcp");
    assert!(ok, "{err}");
    assert!(
        out.contains("Ingress: ALLOWED by CiliumNetworkPolicy x/deny80 spec.ingress[0]"),
        "{out}"
    );
    assert!(out.contains("Final verdict: ALLOWED"), "{out}");
    let (ok, out, err) = trace(
        "k8s:pod=b,k8s:io.kubernetes.pod.namespace=y",
        "k8s:pod=a,k8s:io.kubernetes.pod.namespace=x",
        "8080/TCP",
    );
    assert!(ok, "{err}");
    // The named port `http` of pod a resolves only for the real pod, not
    // for a label-only endpoint: 8080 is denied by default here.
    assert!(out.contains("Final verdict: DENIED"), "{out}");
    let (_, out, _) = trace(
        "k8s:pod=b,k8s:io.kubernetes.pod.namespace=y",
        "10.124.1.2",
        "8080/TCP",
    );
    assert!(
        out.contains("Ingress: ALLOWED by NetworkPolicy x/web-from-y spec.ingress[0]"),
        "{out}"
    );
}

#[test]
fn egress_deny_to_world_and_default_deny() {
    let (_, out, _) = trace("10.124.1.3", "192.0.2.1", "443/TCP");
    assert!(
        out.contains(
            "Egress : DENIED  by CiliumClusterwideNetworkPolicy no-world-egress spec.egressDeny[0]"
        ),
        "{out}"
    );
    assert!(
        out.contains("To:   identity 9 [reserved:world,reserved:world-ipv4]"),
        "{out}"
    );
    let (_, out, _) = trace("10.124.2.3", "10.124.1.2", "8081/TCP");
    assert!(
        out.contains("Ingress: DENIED  default deny (CiliumNetworkPolicy x/deny80 selects the endpoint for ingress)"),
        "{out}"
    );
}

#[test]
fn bad_arguments_are_named() {
    let (ok, _, err) = trace("10.124.1.3", "192.0.2.1", "443/QUIC");
    assert!(!ok);
    assert!(err.contains("--dport \"443/QUIC\""), "{err}");
    let (ok, _, err) = trace("not an ip", "192.0.2.1", "443/TCP");
    assert!(!ok);
    assert!(err.contains("neither an IP address nor labels"), "{err}");
}
