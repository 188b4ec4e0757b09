//! HTTP-level behaviour of the in-process server: discovery documents and
//! errors as `metav1.Status` objects with the right code and reason.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use membrane_apiserver::{ApiServer, Config};
use serde_json::Value;

const PORT: u16 = 35202;

fn request(method: &str, path: &str, body: &str, ctype: &str) -> (u16, Value) {
    let (code, body) = raw_request(method, path, body, ctype);
    (code, serde_json::from_str(&body).unwrap_or(Value::Null))
}

fn raw_request(method: &str, path: &str, body: &str, ctype: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", PORT)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read");
    let code = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    (code, body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_and_status_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = None;
    for _ in 0..20 {
        match ApiServer::bind(Config::new(([127, 0, 0, 1], PORT).into(), dir.path())).await {
            Ok(s) => {
                server = Some(s);
                break;
            }
            Err(e) if e.to_string().contains("in use") => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("bind: {e}"),
        }
    }
    let server = server.expect("port stayed in use");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(async {
        let _ = stop_rx.await;
    }));

    let result = tokio::task::spawn_blocking(|| {
        let (code, v) = request("GET", "/apis", "", "application/json");
        assert_eq!(code, 200);
        let groups: Vec<&str> = v["groups"]
            .as_array()
            .expect("groups")
            .iter()
            .filter_map(|g| g["name"].as_str())
            .collect();
        for g in [
            "networking.k8s.io",
            "discovery.k8s.io",
            "cilium.io",
            "apiextensions.k8s.io",
        ] {
            assert!(groups.contains(&g), "{groups:?}");
        }
        let (code, v) = request("GET", "/apis/networking.k8s.io/v1", "", "application/json");
        assert_eq!(code, 200);
        assert!(
            v["resources"]
                .as_array()
                .expect("resources")
                .iter()
                .any(|r| r["name"] == "ingresses/status")
        );

        let cm = "/api/v1/namespaces/default/configmaps";
        let cases: Vec<(&str, String, &str, &str, u16, &str)> = vec![
            (
                "GET",
                format!("{cm}/missing"),
                "",
                "application/json",
                404,
                "NotFound",
            ),
            (
                "GET",
                "/apis/nope.io/v1/things".into(),
                "",
                "application/json",
                404,
                "NotFound",
            ),
            (
                "POST",
                cm.into(),
                r#"{"metadata":{"name":"a"}}"#,
                "application/json",
                201,
                "",
            ),
            (
                "POST",
                cm.into(),
                r#"{"metadata":{"name":"a"}}"#,
                "application/json",
                409,
                "AlreadyExists",
            ),
            (
                "PUT",
                format!("{cm}/a"),
                r#"{"metadata":{"name":"a","resourceVersion":"1"}}"#,
                "application/json",
                409,
                "Conflict",
            ),
            (
                "POST",
                cm.into(),
                r#"{"metadata":{"name":"UPPER"}}"#,
                "application/json",
                422,
                "Invalid",
            ),
            (
                "POST",
                cm.into(),
                "{not json",
                "application/json",
                400,
                "BadRequest",
            ),
            (
                "POST",
                format!("{cm}/a"),
                "{}",
                "application/json",
                405,
                "MethodNotAllowed",
            ),
            (
                "PATCH",
                format!("{cm}/a"),
                "{}",
                "text/plain",
                415,
                "UnsupportedMediaType",
            ),
        ];
        for (method, path, body, ctype, want, reason) in cases {
            let (code, v) = request(method, &path, body, ctype);
            assert_eq!(code, want, "{method} {path}: {v}");
            if !reason.is_empty() {
                assert_eq!(v["kind"], "Status", "{v}");
                assert_eq!(v["reason"], reason, "{v}");
                assert_eq!(v["code"], want, "{v}");
            }
        }
        // A watch from a version this store never had ends with 410 Expired.
        let (code, body) = raw_request(
            "GET",
            &format!("{cm}?watch=1&resourceVersion=999999"),
            "",
            "application/json",
        );
        assert_eq!(code, 200);
        assert!(
            body.contains(r#""type":"ERROR""#) && body.contains(r#""reason":"Expired""#),
            "{body}"
        );
    })
    .await;
    let _ = stop_tx.send(());
    serving.await.expect("server task").expect("serve");
    result.expect("test body");
}
