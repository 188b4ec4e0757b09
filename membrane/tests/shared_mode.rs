//! Real Envoy: Cilium's shared Ingress load-balancer mode. Two shared
//! Ingresses in two namespaces are served on the one shared address; bad
//! shared Ingresses (missing Service, host+path taken by an older Ingress)
//! are rejected while the good ones keep serving; an Ingress switched to
//! dedicated mode gets its own address and leaves the shared CEC, and
//! switched back its dedicated objects are garbage-collected.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;

const HTTP_PORT: u16 = 28780;
const HOST: &str = "shared.example.com";

fn addr(ip: &str) -> SocketAddr {
    format!("{ip}:{HTTP_PORT}").parse().expect("address")
}

fn in_namespace(yaml: &str, ns: &str) -> String {
    yaml.replace("namespace: default", &format!("namespace: {ns}"))
}

/// An Ingress `ns/name` routing `path` (Prefix) on `HOST` to `svc:80`, in
/// load-balancer mode `mode`.
fn ingress(ns: &str, name: &str, mode: &str, path: &str, svc: &str) -> String {
    format!(
        r#"apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: {name}
  namespace: {ns}
  annotations:
    ingress.cilium.io/loadbalancer-mode: {mode}
spec:
  ingressClassName: cilium
  rules:
    - host: {HOST}
      http:
        paths:
          - path: {path}
            pathType: Prefix
            backend:
              service:
                name: {svc}
                port:
                  number: 80
"#
    )
}

fn names(m: &Membrane, kind: &str, ns: &str) -> String {
    let (code, out) = m.cli(&["get", kind, "-n", ns]).expect("cli");
    assert_eq!(code, 0, "{out}");
    out
}

#[test]
fn shared_ingresses_share_one_address_isolate_bad_ones_and_switch_modes() {
    let backends = Backends::new();
    backends.start("127.0.41.1", "svc-a");
    backends.start("127.0.41.2", "svc-b");
    let m = Membrane::start("127.0.111.0/24", HTTP_PORT, 28781);
    let dir = m.manifests();
    let services = [
        in_namespace(&service_yaml("svc-a", 80, None, "127.0.41.1"), "shop"),
        in_namespace(&service_yaml("svc-b", 80, None, "127.0.41.2"), "blog"),
    ]
    .join("---\n");
    std::fs::write(
        dir.join("services.yaml"),
        format!("{INGRESS_CLASS}---\n{services}"),
    )
    .expect("write");
    std::fs::write(
        dir.join("web.yaml"),
        ingress("shop", "web", "shared", "/web", "svc-a"),
    )
    .expect("write");
    // Written second, so shop/web is the older Ingress.
    std::fs::write(
        dir.join("posts.yaml"),
        ingress("blog", "posts", "shared", "/posts", "svc-b"),
    )
    .expect("write");

    // 1. Both on the same shared address, both served there.
    let shared_ip = m.wait_ingress_ip("shop", "web");
    let posts_ip = m.wait_ingress_ip("blog", "posts");
    assert_eq!(shared_ip, posts_ip, "shared Ingresses share one address");
    let serves = |ip: &str, path: &str, want: Option<&str>| {
        wait_until(Duration::from_secs(10), || {
            served_by(addr(ip), HOST, path).as_deref() == want
        })
    };
    assert!(serves(&shared_ip, "/web", Some("svc-a")), "{}", m.log());
    assert!(serves(&shared_ip, "/posts", Some("svc-b")), "{}", m.log());
    let kube_system = names(&m, "cec", "kube-system");
    assert!(kube_system.contains("cilium-ingress"), "{kube_system}");
    assert!(
        !names(&m, "cec", "shop").contains("cilium-ingress-shop-web"),
        "no dedicated CEC for a shared Ingress"
    );
    let svc = names(&m, "svc", "kube-system");
    assert!(svc.contains("cilium-ingress"), "{svc}");

    // 2. Bad shared Ingresses are rejected, each with its own reason; the
    // two good ones keep serving.
    std::fs::write(
        dir.join("bad.yaml"),
        [
            ingress("blog", "missing-svc", "shared", "/missing", "nope"),
            ingress("blog", "thief", "shared", "/web", "svc-b"),
        ]
        .join("---\n"),
    )
    .expect("write");
    let mut rejected = Vec::new();
    let both = wait_until(Duration::from_secs(10), || {
        rejected = m.rejected();
        let has = |o: &str| rejected.iter().any(|(k, _)| k.contains(o));
        has("blog/missing-svc") && has("blog/thief")
    });
    assert!(both, "rejections missing: {rejected:?}\n{}", m.log());
    let reason = |o: &str| {
        rejected
            .iter()
            .find(|(k, _)| k.contains(o))
            .map(|(_, r)| r.clone())
            .unwrap_or_default()
    };
    let missing = reason("blog/missing-svc");
    assert!(
        missing.contains("spec.rules[0].http.paths[0].backend.service.name")
            && missing.contains("blog/nope"),
        "{missing}"
    );
    let thief = reason("blog/thief");
    assert!(
        thief.contains("shop/web") && thief.contains("\"/web\"") && thief.contains(HOST),
        "{thief}"
    );
    assert_eq!(
        served_by(addr(&shared_ip), HOST, "/web").as_deref(),
        Some("svc-a")
    );
    assert_eq!(
        served_by(addr(&shared_ip), HOST, "/posts").as_deref(),
        Some("svc-b")
    );
    assert_eq!(served_by(addr(&shared_ip), HOST, "/missing"), None);
    assert_eq!(m.ingress_ip("blog", "missing-svc"), None);
    assert_eq!(m.ingress_ip("blog", "thief"), None);
    std::fs::remove_file(dir.join("bad.yaml")).expect("remove");

    // 3. blog/posts switches to dedicated: its own address, and the shared
    // address stops serving it while shop/web stays.
    std::fs::write(
        dir.join("posts.yaml"),
        ingress("blog", "posts", "dedicated", "/posts", "svc-b"),
    )
    .expect("write");
    let mut own_ip = String::new();
    let moved = wait_until(Duration::from_secs(15), || {
        own_ip = m.ingress_ip("blog", "posts").unwrap_or_default();
        !own_ip.is_empty() && own_ip != shared_ip
    });
    assert!(moved, "blog/posts never got its own address:\n{}", m.log());
    assert!(serves(&own_ip, "/posts", Some("svc-b")), "{}", m.log());
    assert!(serves(&shared_ip, "/posts", None), "{}", m.log());
    assert_eq!(
        served_by(addr(&shared_ip), HOST, "/web").as_deref(),
        Some("svc-a")
    );
    assert!(names(&m, "cec", "blog").contains("cilium-ingress-blog-posts"));

    // 4. And back: the dedicated objects are garbage-collected.
    std::fs::write(
        dir.join("posts.yaml"),
        ingress("blog", "posts", "shared", "/posts", "svc-b"),
    )
    .expect("write");
    assert!(serves(&shared_ip, "/posts", Some("svc-b")), "{}", m.log());
    let gone = wait_until(Duration::from_secs(10), || {
        !names(&m, "cec", "blog").contains("cilium-ingress-blog-posts")
            && !names(&m, "svc", "blog").contains("cilium-ingress-posts")
    });
    assert!(gone, "dedicated objects left behind:\n{}", m.log());
    assert!(
        wait_until(Duration::from_secs(10), || m
            .ingress_ip("blog", "posts")
            .as_deref()
            == Some(shared_ip.as_str())),
        "status not back on the shared address"
    );
    assert!(serves(&own_ip, "/posts", None), "{}", m.log());
    assert!(m.rejected().is_empty(), "{:?}", m.rejected());
}
