//! What the HTTP-level tests share: a server on a fixed loopback port for
//! the length of a blocking test body, and one raw HTTP/1.1 request.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use membrane_apiserver::{ApiServer, Config};

/// Serves the API from `dir` on 127.0.0.1:`port` while `body` runs on a
/// blocking thread, then stops the server; a panic in `body` fails the
/// test after the server has stopped.
pub async fn with_server<F>(port: u16, dir: &Path, body: F)
where
    F: FnOnce() + Send + 'static,
{
    // The port may be held for a moment by another process's outgoing
    // connection (it can be inside the ephemeral range): bounded retries.
    let mut server = None;
    for _ in 0..20 {
        match ApiServer::bind(Config::new(([127, 0, 0, 1], port).into(), dir)).await {
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
    let result = tokio::task::spawn_blocking(body).await;
    let _ = stop_tx.send(());
    serving.await.expect("server task").expect("serve");
    result.expect("test body");
}

/// One request on its own connection: status code and body.
pub fn request(port: u16, method: &str, path: &str, body: &str, ctype: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
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
    let code = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}
