//! Backend pods shared by the tests that run Membrane against the netns
//! topology of the eBPF tests (`mod netns` in the including test).

use std::process::{Command, Stdio};

use crate::netns;

/// Backend pods: the line echo server on `port` (the topology's readiness
/// check) and an HTTP server on `port + 1` answering with the pod's name.
const ECHO_AND_HTTP_PY: &str = r#"
import socket, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
name, port = sys.argv[1], int(sys.argv[2])
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = name.encode()
        self.send_response(200)
        self.send_header('content-length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
threading.Thread(target=ThreadingHTTPServer(('0.0.0.0', port + 1), H).serve_forever, daemon=True).start()
def handle(c):
    try:
        for line in c.makefile('rb'):
            c.sendall(name.encode() + b' ' + line)
    except OSError:
        pass
    finally:
        c.close()
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('::', port)); s.listen(128)
while True:
    c, _ = s.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
"#;

pub fn echo_and_http(ns: &netns::Netns, name: &str, port: u16) -> netns::Proc {
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            "python3",
            "-c",
            ECHO_AND_HTTP_PY,
            name,
        ])
        .arg(port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn echo+http server");
    netns::Proc(child)
}
