//! The runner end to end against a fake Membrane: an in-memory local API on a unix socket
//! and a toy Ingress proxy (host/prefix/default-backend routing over the EndpointSlices).
//! Checks scenario counting, failure reasons, cleanup, the IngressClass and the JSON report
//! without needing Envoy.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use membrane_conformance::{RunOptions, run_with_output};
use serde_json::{Value, json};

type Store = Arc<Mutex<Vec<Value>>>;

fn kind_of(path_kind: &str) -> &'static str {
    match path_kind {
        "ingress" | "ingresses" | "ing" => "Ingress",
        "ingressclass" => "IngressClass",
        "service" | "svc" => "Service",
        "endpointslice" => "EndpointSlice",
        "secret" => "Secret",
        "namespace" | "ns" => "Namespace",
        _ => "Unknown",
    }
}

fn meta(v: &Value, f: &str) -> String {
    v["metadata"][f].as_str().unwrap_or_default().to_owned()
}

fn docs(body: &str) -> Vec<Value> {
    let v: Value = serde_json::from_str(body).unwrap();
    if v["kind"] == "List" {
        v["items"].as_array().unwrap().clone()
    } else {
        vec![v]
    }
}

async fn api_handler(store: Store, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let uri = req.uri().clone();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8(body.to_vec()).unwrap();
    let mut s = store.lock().unwrap();
    let (status, answer) = match (method.as_str(), uri.path()) {
        ("POST", "/v1/apply") => {
            let mut results = Vec::new();
            for mut d in docs(&body) {
                let (kind, ns, name) = (d["kind"].clone(), meta(&d, "namespace"), meta(&d, "name"));
                if kind == "Ingress" && d["spec"]["ingressClassName"] == "cilium" {
                    d["status"] = json!({"loadBalancer": {"ingress": [{"ip": "127.0.0.1"}]}});
                }
                let existing = s.iter().position(|o| {
                    o["kind"] == kind && meta(o, "namespace") == ns && meta(o, "name") == name
                });
                let result = match existing {
                    Some(i) => {
                        s[i] = d;
                        "configured"
                    }
                    None => {
                        s.push(d);
                        "created"
                    }
                };
                results
                    .push(json!({"kind": kind, "namespace": ns, "name": name, "result": result}));
            }
            (200, json!({ "results": results }))
        }
        ("POST", "/v1/delete") => {
            let mut results = Vec::new();
            for d in docs(&body) {
                let name = meta(&d, "name");
                let before = s.len();
                if d["kind"] == "Namespace" {
                    s.retain(|o| {
                        !(meta(o, "namespace") == name
                            || (o["kind"] == "Namespace" && meta(o, "name") == name))
                    });
                }
                let result = if s.len() < before {
                    "deleted"
                } else {
                    "not found"
                };
                results.push(json!({"kind": d["kind"], "name": name, "result": result}));
            }
            (200, json!({ "results": results }))
        }
        ("GET", p) if p.starts_with("/v1/objects/") => {
            let kind = kind_of(&p["/v1/objects/".len()..]);
            let q: BTreeMap<String, String> = uri
                .query()
                .unwrap_or_default()
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            let items: Vec<Value> = s
                .iter()
                .filter(|o| o["kind"] == kind)
                .filter(|o| {
                    q.get("namespace")
                        .is_none_or(|ns| meta(o, "namespace") == *ns)
                })
                .filter(|o| q.get("name").is_none_or(|n| meta(o, "name") == *n))
                .cloned()
                .collect();
            if q.contains_key("name") && items.is_empty() {
                (404, json!({"error": "not found"}))
            } else {
                (200, json!({ "items": items }))
            }
        }
        _ => (404, json!({"error": "no such endpoint"})),
    };
    let mut resp = Response::new(Full::new(Bytes::from(answer.to_string())));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap();
    resp
}

/// Which service an Ingress routes `host` + `path` to (toy rules: exact host, path prefix).
fn route(ingress: &Value, host: &str, path: &str) -> Option<String> {
    for rule in ingress["spec"]["rules"].as_array().into_iter().flatten() {
        if rule["host"].as_str().is_some_and(|h| h != host) {
            continue;
        }
        for p in rule["http"]["paths"].as_array().into_iter().flatten() {
            if path.starts_with(p["path"].as_str().unwrap_or("/")) {
                return p["backend"]["service"]["name"].as_str().map(str::to_owned);
            }
        }
    }
    ingress["spec"]["defaultBackend"]["service"]["name"]
        .as_str()
        .map(str::to_owned)
}

async fn proxy_handler(
    store: Store,
    rr: Arc<AtomicUsize>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let host = req
        .headers()
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default()
        .split(':')
        .next()
        .unwrap_or_default()
        .to_owned();
    let target = {
        let s = store.lock().unwrap();
        s.iter()
            .filter(|o| o["kind"] == "Ingress" && o["status"].is_object())
            .find_map(|ing| {
                let svc = route(ing, &host, req.uri().path())?;
                let ns = meta(ing, "namespace");
                let ips: Vec<String> = s
                    .iter()
                    .filter(|o| {
                        o["kind"] == "EndpointSlice"
                            && meta(o, "namespace") == ns
                            && o["metadata"]["labels"]["kubernetes.io/service-name"] == svc.as_str()
                    })
                    .flat_map(|o| o["endpoints"].as_array().cloned().unwrap_or_default())
                    .filter_map(|e| e["addresses"][0].as_str().map(str::to_owned))
                    .collect();
                (!ips.is_empty())
                    .then(|| ips[rr.fetch_add(1, Ordering::Relaxed) % ips.len()].clone())
            })
    };
    let Some(ip) = target else {
        let mut r = Response::new(Full::new(Bytes::from_static(b"no route")));
        *r.status_mut() = StatusCode::NOT_FOUND;
        r.headers_mut().insert("server", "envoy".parse().unwrap());
        return r;
    };
    let stream = tokio::net::TcpStream::connect((ip.as_str(), 3000))
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let (mut parts, body) = req.into_parts();
    parts
        .headers
        .insert("x-forwarded-proto", "http".parse().unwrap());
    let body = body.collect().await.unwrap().to_bytes();
    let resp = send
        .send_request(Request::from_parts(parts, Full::new(body)))
        .await
        .unwrap();
    let (mut parts, body) = resp.into_parts();
    parts.headers.insert("server", "envoy".parse().unwrap());
    Response::from_parts(parts, Full::new(body.collect().await.unwrap().to_bytes()))
}

struct Fake {
    store: Store,
    dir: tempfile::TempDir,
    http_port: u16,
}

async fn fake_membrane() -> Fake {
    let store: Store = Arc::new(Mutex::new(vec![
        // A leftover from an interrupted run: must be removed at start.
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ingress-conformance-old12",
               "labels": {"app.kubernetes.io/name": "ingress-conformance"}}}),
    ]));
    let dir = tempfile::tempdir().unwrap();
    let api = tokio::net::UnixListener::bind(dir.path().join("api.sock")).unwrap();
    let s = store.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = api.accept().await.unwrap();
            let s = s.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |r| {
                    let s = s.clone();
                    async move { Ok::<_, Infallible>(api_handler(s, r).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_port = proxy.local_addr().unwrap().port();
    let s = store.clone();
    let rr = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let (stream, _) = proxy.accept().await.unwrap();
            let (s, rr) = (s.clone(), rr.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |r| {
                    let (s, rr) = (s.clone(), rr.clone());
                    async move { Ok::<_, Infallible>(proxy_handler(s, rr, r).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Fake {
        store,
        dir,
        http_port,
    }
}

const FEATURE: &str = r#"Feature: Fake backend checks
  Background:
    Given a new random namespace
    Given an Ingress resource named "default-backend" with this spec:
    """
    defaultBackend:
      service:
        name: echo-service
        port:
          number: 8080
    rules:
      - host: "foo.bar.com"
        http:
          paths:
            - path: /foo
              pathType: Prefix
              backend:
                service:
                  name: foo-prefix
                  port:
                    name: http
    """
    Then The Ingress status shows the IP address or FQDN where it is exposed

  Scenario Outline: default backend answers
    When I send a "<method>" request to http://"<host>"/"<path>"
    Then the response status-code must be 200
    And the response must be served by the "echo-service" service
    And the response headers must contain <key> with matching <value>
      | key            | value |
      | Content-Length | *     |
      | Server         | *     |
    And the request method must be "<method>"
    And the request path must be "<path>"
    And the request headers must contain <key> with matching <value>
      | key        | value              |
      | User-Agent | Go-http-client/1.1 |

    Examples:
      | method | host      | path     |
      | GET    | my-host   | sub-path |
      | POST   |           |          |

  Scenario: host and prefix rule
    When I send a "GET" request to "http://foo.bar.com/foo/x"
    Then the response status-code must be 200
    And the response must be served by the "foo-prefix" service
    And the request host must be "foo.bar.com"

  Scenario: a wrong expectation fails with the reason
    When I send a "GET" request to "http://foo.bar.com/foo"
    Then the response must be served by the "echo-service" service
    And the response status-code must be 200

  Scenario: scaling spreads requests over the pods
    Then The backend deployment "echo-service" for the ingress resource is scaled to 3
    When I send 12 requests to "http://some-host"
    Then all the responses status-code must be 200 and the response body should contain the IP address of 3 different Kubernetes pods
"#;

const CLASS_FEATURE: &str = r#"Feature: Ingress class
  Scenario: a foreign class gets no status
    Given an Ingress resource in a new random namespace
    """
    apiVersion: networking.k8s.io/v1
    kind: Ingress
    metadata:
      name: test-ingress-class
    spec:
      ingressClassName: some-invalid-class-name
      defaultBackend:
        service:
          name: x
          port:
            number: 8080
    """
    Then The Ingress status should not contain the IP address or FQDN

  Scenario: our class gets a status, so the negative step fails
    Given an Ingress resource in a new random namespace
    """
    apiVersion: networking.k8s.io/v1
    kind: Ingress
    metadata:
      name: mine
    spec:
      defaultBackend:
        service:
          name: x
          port:
            number: 8080
    """
    Then The Ingress status should not contain the IP address or FQDN
"#;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_against_fake_membrane() {
    let fake = fake_membrane().await;
    let features = tempfile::tempdir().unwrap();
    std::fs::write(features.path().join("a_fake.feature"), FEATURE).unwrap();
    std::fs::write(features.path().join("b_class.feature"), CLASS_FEATURE).unwrap();
    let report = fake.dir.path().join("report.json");
    let opts = RunOptions {
        features: features.path().to_owned(),
        ingress_class: "cilium".into(),
        ingress_class_wait: Duration::from_millis(1500),
        scale_settle: Duration::from_millis(10),
        report: Some(report.clone()),
        api_socket: fake.dir.path().join("api.sock"),
        http_port: fake.http_port,
        https_port: 1,
    };
    let out = Captured::default();
    // `run` is Send: spawn it to prove it.
    let summary = tokio::spawn(run_with_output(opts, Box::new(out.clone())))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();

    assert_eq!((summary.passed, summary.failed), (5, 2), "{text}");
    assert!(text.trim_end().ends_with("5 passed, 2 failed"), "{text}");
    assert!(!summary.success());

    let failed: Vec<_> = summary.scenarios.iter().filter(|s| !s.passed).collect();
    assert_eq!(
        failed[0].scenario,
        "a wrong expectation fails with the reason"
    );
    let f = failed[0].failure.as_ref().unwrap();
    assert_eq!(
        f.step,
        "Then the response must be served by the \"echo-service\" service"
    );
    assert_eq!(
        f.reason,
        "expected the request to be served by echo-service but it was served by foo-prefix"
    );
    assert!(f.location.starts_with("a_fake.feature:"), "{}", f.location);
    let f = failed[1].failure.as_ref().unwrap();
    assert!(
        f.reason
            .starts_with("waiting for Ingress status should not return an IP address or FQDN"),
        "{}",
        f.reason
    );
    // Outline rows were expanded Go-style and ran in file order.
    assert_eq!(summary.scenarios[0].scenario, "default backend answers");
    assert_eq!(
        summary.scenarios[5].scenario,
        "a foreign class gets no status"
    );
    assert!(summary.scenarios[5].passed, "{text}");

    // Settings that differ from upstream are reported.
    assert!(
        summary
            .notes
            .iter()
            .any(|n| n.starts_with("ingress_class_wait"))
    );
    assert!(summary.notes.iter().any(|n| n.starts_with("scale_settle")));
    assert!(
        text.contains("NOTE: non-default setting: scale_settle"),
        "{text}"
    );

    // The IngressClass exists; every scenario namespace (and the leftover) is gone.
    let store = fake.store.lock().unwrap();
    let class = store.iter().find(|o| o["kind"] == "IngressClass").unwrap();
    assert_eq!(class["metadata"]["name"], "cilium");
    assert_eq!(class["spec"]["controller"], "cilium.io/ingress-controller");
    assert!(
        !store
            .iter()
            .any(|o| meta(o, "name").starts_with("ingress-conformance-")
                || meta(o, "namespace").starts_with("ingress-conformance-")),
        "left over: {store:?}"
    );

    // Cucumber JSON report: both features, failed steps marked.
    let json: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let feats = json.as_array().unwrap();
    assert_eq!(feats.len(), 2);
    let statuses: Vec<&str> = feats
        .iter()
        .flat_map(|f| f["elements"].as_array().unwrap())
        .flat_map(|e| e["steps"].as_array().unwrap())
        .map(|s| s["result"]["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses.iter().filter(|s| **s == "failed").count(), 2);
    assert!(statuses.iter().filter(|s| **s == "passed").count() > 20);
}
