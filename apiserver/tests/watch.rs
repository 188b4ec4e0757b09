//! The HTTP server in-process: concurrent writers and a live watcher see
//! every change exactly once, in resourceVersion order, and a watch that
//! replays from the events table sees the same sequence.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::Value;

const PORT: u16 = 35201;

fn request(method: &str, path: &str, body: &str, ctype: &str) -> (u16, String) {
    common::request(PORT, method, path, body, ctype)
}

/// Read watch events (one JSON object per line) until `n` or the deadline.
fn read_events(reader: &mut impl BufRead, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut out = Vec::new();
    let mut line = String::new();
    while out.len() < n && Instant::now() < deadline {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                if line.starts_with('{') {
                    out.push(serde_json::from_str(line.trim()).expect("event JSON"));
                }
            }
        }
    }
    out
}

fn rv_of(e: &Value) -> u64 {
    e["object"]["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|r| r.parse().ok())
        .expect("resourceVersion")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_reach_live_and_replaying_watchers_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    common::with_server(PORT, dir.path(), || {
        let (code, list) = request("GET", "/api/v1/namespaces/default/configmaps", "", "application/json");
        assert_eq!(code, 200, "{list}");
        let rv0 = serde_json::from_str::<Value>(&list).expect("list")["metadata"]["resourceVersion"]
            .as_str()
            .expect("rv")
            .to_string();

        // A live watcher, connected before the writes.
        let mut live = TcpStream::connect(("127.0.0.1", PORT)).expect("connect");
        live.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        write!(
            live,
            "GET /api/v1/namespaces/default/configmaps?watch=1&resourceVersion={rv0} HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        .expect("write");
        let mut live = BufReader::new(live);
        let mut status = String::new();
        live.read_line(&mut status).expect("status line");
        assert!(status.contains(" 200 "), "{status}");

        // 4 writers × 10 objects × (create + 2 patches + delete).
        let writers: Vec<_> = (0..4)
            .map(|w| {
                std::thread::spawn(move || {
                    for i in 0..10 {
                        let name = format!("w{w}-{i}");
                        let path = format!("/api/v1/namespaces/default/configmaps/{name}");
                        let (c, b) = request(
                            "POST",
                            "/api/v1/namespaces/default/configmaps",
                            &format!(r#"{{"metadata":{{"name":"{name}"}},"data":{{"v":"0"}}}}"#),
                            "application/json",
                        );
                        assert_eq!(c, 201, "{b}");
                        for v in 1..3 {
                            let (c, b) = request(
                                "PATCH",
                                &path,
                                &format!(r#"{{"data":{{"v":"{v}"}}}}"#),
                                "application/merge-patch+json",
                            );
                            assert_eq!(c, 200, "{b}");
                        }
                        let (c, b) = request("DELETE", &path, "", "application/json");
                        assert_eq!(c, 200, "{b}");
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().expect("writer");
        }
        let total = 4 * 10 * 4;
        let seen = read_events(&mut live, total);
        assert_eq!(seen.len(), total, "live watcher saw {} of {total}", seen.len());
        let live_rvs: Vec<u64> = seen.iter().map(rv_of).collect();
        assert!(live_rvs.windows(2).all(|w| w[0] < w[1]), "out of order: {live_rvs:?}");

        // Per object: ADDED, MODIFIED, MODIFIED, DELETED.
        for w in 0..4 {
            for i in 0..10 {
                let name = format!("w{w}-{i}");
                let types: Vec<&str> = seen
                    .iter()
                    .filter(|e| e["object"]["metadata"]["name"] == name.as_str())
                    .filter_map(|e| e["type"].as_str())
                    .collect();
                assert_eq!(types, ["ADDED", "MODIFIED", "MODIFIED", "DELETED"], "{name}");
            }
        }

        // Replaying from the same version gives the same sequence.
        let (code, body) = request(
            "GET",
            &format!("/api/v1/namespaces/default/configmaps?watch=1&resourceVersion={rv0}&timeoutSeconds=1"),
            "",
            "application/json",
        );
        assert_eq!(code, 200);
        let replayed: Vec<u64> = read_events(&mut BufReader::new(body.as_bytes()), total + 1)
            .iter()
            .map(rv_of)
            .collect();
        assert_eq!(replayed, live_rvs);
    })
    .await;
}
