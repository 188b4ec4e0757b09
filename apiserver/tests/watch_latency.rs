//! A watch event leaves the server as soon as its write commits: writes in
//! quick succession each reach a raw HTTP watcher in about the time of the
//! write request itself (no batching, flush interval or polling between the
//! commit and the watch stream; a Nagle/delayed-ACK stall would be ~40 ms).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use membrane_apiserver::{ApiServer, Config};
use serde_json::Value;

/// In this engineer's assigned range (31000–31999).
const PORT: u16 = 31201;

fn request(method: &str, path: &str, body: &str, ctype: &str) -> u16 {
    let mut s = TcpStream::connect(("127.0.0.1", PORT)).expect("connect");
    s.set_nodelay(true).expect("nodelay");
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
    raw.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
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
        let median = rounds[rounds.len() / 2];
        // A write and its event take a few milliseconds even in a debug
        // build on a loaded machine; a stall (a delayed ACK, a flush timer)
        // is tens of milliseconds.
        assert!(
            median < Duration::from_millis(20),
            "median write → watch event {median:?} (rounds {rounds:?})"
        );
    })
    .await;
    let _ = stop_tx.send(());
    serving.await.expect("server task").expect("serve");
    result.expect("test body");
}
