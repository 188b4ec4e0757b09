//! The exact requests the writer sends, pinned against a mocked API
//! (tower-test): server-side apply, status apply, guarded update with a
//! stale-resourceVersion conflict, and delete (404 tolerated).

use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use membrane_k8s::{OPERATOR_MANAGER, WriteError, Writer};
use membrane_store::{Kind, Object, ObjectKey};
use serde_json::{Value, json};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// One expected request: method, path and query, and a check of the body.
struct Expect {
    method: Method,
    uri: &'static str,
    content_type: Option<&'static str>,
    body: fn(&Value),
    status: StatusCode,
    reply: Value,
}

fn writer() -> (Writer, Handle) {
    let (mock, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(mock, "default");
    (Writer::new(client, OPERATOR_MANAGER), handle)
}

/// Answers the next request after checking it against `expect`.
async fn serve(mut handle: Handle, expect: Expect) {
    let (request, send) = tokio::time::timeout(Duration::from_secs(1), handle.next_request())
        .await
        .expect("a request within 1 s")
        .expect("a request");
    assert_eq!(request.method(), expect.method);
    assert_eq!(request.uri().to_string(), expect.uri);
    if let Some(ct) = expect.content_type {
        assert_eq!(
            request
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some(ct)
        );
    }
    let bytes = request
        .into_body()
        .collect_bytes()
        .await
        .expect("request body");
    let body: Value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("JSON body")
    };
    (expect.body)(&body);
    let response = Response::builder()
        .status(expect.status)
        .header("content-type", "application/json")
        .body(Body::from(
            serde_json::to_vec(&expect.reply).expect("reply"),
        ))
        .expect("response");
    send.send_response(response);
}

fn service() -> Object {
    Object::from_value(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "cilium-ingress-web", "namespace": "shop",
                     "resourceVersion": "41", "uid": "u-1",
                     "labels": {"cilium.io/ingress": "true"}},
        "spec": {"type": "LoadBalancer", "ports": [{"name": "http", "port": 80}]},
        "status": {"loadBalancer": {}},
    }))
    .expect("service")
}

fn status_error(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
           "message": format!("{reason} for the test"), "reason": reason, "code": code})
}

#[tokio::test]
async fn apply_is_a_forced_server_side_apply_without_server_fields() {
    let (writer, handle) = writer();
    let server = tokio::spawn(serve(
        handle,
        Expect {
            method: Method::PATCH,
            uri: "/api/v1/namespaces/shop/services/cilium-ingress-web?&force=true&fieldManager=membrane-operator",
            content_type: Some("application/apply-patch+yaml"),
            body: |b| {
                assert_eq!(b["kind"], "Service");
                assert_eq!(b["metadata"]["labels"]["cilium.io/ingress"], "true");
                assert!(b["metadata"].get("resourceVersion").is_none(), "{b}");
                assert!(b["metadata"].get("uid").is_none(), "{b}");
                assert!(b.get("status").is_none(), "{b}");
            },
            status: StatusCode::OK,
            reply: service().to_value(),
        },
    ));
    writer.apply(&service()).await.expect("apply");
    server.await.expect("server");
}

#[tokio::test]
async fn status_goes_to_the_status_subresource() {
    let (writer, handle) = writer();
    let key = ObjectKey::new(Kind::Ingress, "shop", "web");
    let server = tokio::spawn(serve(
        handle,
        Expect {
            method: Method::PATCH,
            uri: "/apis/networking.k8s.io/v1/namespaces/shop/ingresses/web/status?&force=true&fieldManager=membrane-operator",
            content_type: Some("application/apply-patch+yaml"),
            body: |b| {
                assert_eq!(b["apiVersion"], "networking.k8s.io/v1");
                assert_eq!(b["kind"], "Ingress");
                assert_eq!(b["status"]["loadBalancer"]["ingress"][0]["ip"], "10.0.0.7");
                assert!(b.get("spec").is_none(), "{b}");
            },
            status: StatusCode::OK,
            reply: json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
                          "metadata": {"name": "web", "namespace": "shop"}}),
        },
    ));
    writer
        .apply_status(
            &key,
            json!({"loadBalancer": {"ingress": [{"ip": "10.0.0.7"}]}}),
        )
        .await
        .expect("status");
    server.await.expect("server");
}

#[tokio::test]
async fn a_stale_update_is_a_conflict_naming_the_object() {
    let (writer, handle) = writer();
    let server = tokio::spawn(serve(
        handle,
        Expect {
            method: Method::PUT,
            uri: "/api/v1/namespaces/shop/services/cilium-ingress-web?&fieldManager=membrane-operator",
            content_type: Some("application/json"),
            body: |b| assert_eq!(b["metadata"]["resourceVersion"], "41"),
            status: StatusCode::CONFLICT,
            reply: status_error(409, "Conflict"),
        },
    ));
    let err = writer.replace(&service()).await.expect_err("conflict");
    server.await.expect("server");
    assert!(matches!(err, WriteError::Conflict { .. }), "{err}");
    assert!(
        err.to_string().contains("Service shop/cilium-ingress-web"),
        "{err}"
    );
}

#[tokio::test]
async fn delete_is_background_and_tolerates_not_found() {
    for (status, code) in [(StatusCode::OK, 200), (StatusCode::NOT_FOUND, 404)] {
        let (writer, handle) = writer();
        let reply = if code == 200 {
            json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 200})
        } else {
            status_error(404, "NotFound")
        };
        let server = tokio::spawn(serve(
            handle,
            Expect {
                method: Method::DELETE,
                uri: "/apis/cilium.io/v2/namespaces/shop/ciliumenvoyconfigs/cilium-ingress-shop-web?",
                content_type: None,
                body: |b| assert_eq!(b["propagationPolicy"], "Background"),
                status,
                reply,
            },
        ));
        let key = ObjectKey::new(Kind::CiliumEnvoyConfig, "shop", "cilium-ingress-shop-web");
        writer.delete(&key).await.expect("delete");
        server.await.expect("server");
    }
}

#[tokio::test]
async fn a_refusal_names_object_verb_and_reason() {
    let (writer, handle) = writer();
    let server = tokio::spawn(serve(
        handle,
        Expect {
            method: Method::PATCH,
            uri: "/api/v1/namespaces/shop/services/cilium-ingress-web?&force=true&fieldManager=membrane-operator",
            content_type: None,
            body: |_| {},
            status: StatusCode::FORBIDDEN,
            reply: status_error(403, "Forbidden"),
        },
    ));
    let err = writer.apply(&service()).await.expect_err("refused");
    server.await.expect("server");
    let text = err.to_string();
    assert!(
        text.contains("Service shop/cilium-ingress-web")
            && text.contains("apply")
            && text.contains("403 Forbidden"),
        "{text}"
    );
}
