//! HTTP-level behaviour of the in-process server: discovery documents and
//! errors as `metav1.Status` objects with the right code and reason.

mod common;

use serde_json::Value;

const PORT: u16 = 35202;

fn request(method: &str, path: &str, body: &str, ctype: &str) -> (u16, Value) {
    let (code, body) = raw_request(method, path, body, ctype);
    (code, serde_json::from_str(&body).unwrap_or(Value::Null))
}

fn raw_request(method: &str, path: &str, body: &str, ctype: &str) -> (u16, String) {
    common::request(PORT, method, path, body, ctype)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_and_status_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    common::with_server(PORT, dir.path(), || {
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
}
