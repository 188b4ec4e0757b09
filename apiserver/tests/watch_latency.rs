//! A watch event leaves the server when its write commits, not when later
//! writes fill a batch: each of 40 writes in a row is answered and its event
//! read by a raw HTTP watcher before the next write is sent. The write →
//! event time is printed (docs/benchmarks.md has the release figures);
//! it is not asserted, since wall-clock bounds make tests flaky.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::Value;

const PORT: u16 = 31201;

fn request(method: &str, path: &str, body: &str, ctype: &str) -> u16 {
    common::request(PORT, method, path, body, ctype).0
}

/// The next watch event (one JSON line of the chunked body).
fn next_event(reader: &mut impl BufRead) -> Value {
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line).expect("watch read");
        assert!(n > 0, "watch ended");
        if line.starts_with('{') {
            return serde_json::from_str(line.trim()).expect("event JSON");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_to_back_writes_reach_a_watcher_without_delay() {
    let dir = tempfile::tempdir().expect("tempdir");
    common::with_server(PORT, dir.path(), || {
        let created = request(
            "POST",
            "/api/v1/namespaces/default/configmaps",
            r#"{"metadata":{"name":"c"},"data":{"v":"0"}}"#,
            "application/json",
        );
        assert_eq!(created, 201);
        let mut watch = TcpStream::connect(("127.0.0.1", PORT)).expect("connect");
        watch
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        write!(
            watch,
            "GET /api/v1/namespaces/default/configmaps?watch=1&fieldSelector=metadata.name%3Dc HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        .expect("write");
        let mut watch = BufReader::new(watch);
        // The initial ADDED.
        assert_eq!(next_event(&mut watch)["type"], "ADDED");
        let mut rounds = Vec::new();
        for v in 1..=40 {
            let start = Instant::now();
            let code = request(
                "PATCH",
                "/api/v1/namespaces/default/configmaps/c",
                &format!(r#"{{"data":{{"v":"{v}"}}}}"#),
                "application/merge-patch+json",
            );
            assert_eq!(code, 200);
            let ev = next_event(&mut watch);
            assert_eq!(ev["type"], "MODIFIED");
            assert_eq!(ev["object"]["data"]["v"], v.to_string(), "events in order");
            rounds.push(start.elapsed());
        }
        rounds.sort();
        eprintln!(
            "write → watch event: median {:?}, max {:?}",
            rounds[rounds.len() / 2],
            rounds[rounds.len() - 1]
        );
    })
    .await;
}
