//! Real Envoy: `membrane up --enable-ingress-proxy-protocol` (Cilium's
//! `ingressController.enableProxyProtocol`). Requests behind a PROXY
//! protocol v1 header (curl --haproxy-protocol) or a v2 header are served,
//! over HTTP and over TLS; a plain request without the header is refused.

mod common;
mod ingress_support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::*;
use ingress_support::*;

const HTTP_PORT: u16 = 27280;
const HTTPS_PORT: u16 = 27643;

/// A PROXY protocol v2 header for a TCP/IPv4 connection from `src` to `dst`.
fn proxy_v2_header(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY command
    h.push(0x11); // AF_INET, STREAM
    h.extend_from_slice(&12u16.to_be_bytes());
    let ip = |a: SocketAddr| match a.ip() {
        std::net::IpAddr::V4(v4) => v4.octets(),
        std::net::IpAddr::V6(_) => Ipv4Addr::LOCALHOST.octets(),
    };
    h.extend_from_slice(&ip(src));
    h.extend_from_slice(&ip(dst));
    h.extend_from_slice(&src.port().to_be_bytes());
    h.extend_from_slice(&dst.port().to_be_bytes());
    h
}

/// A plain HTTP/1.1 GET after `preamble`: the status code, 0 when the
/// connection was closed without an answer.
fn get_after(addr: SocketAddr, preamble: &[u8]) -> u16 {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return 0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut req = preamble.to_vec();
    req.extend_from_slice(b"GET /pp HTTP/1.1\r\nHost: pp.example.com\r\nConnection: close\r\n\r\n");
    if s.write_all(&req).is_err() {
        return 0;
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// curl with PROXY v1 (`--haproxy-protocol`): the body on success.
fn curl_v1(url: &str, resolve: Option<&str>) -> Option<String> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sk", "--max-time", "5", "--haproxy-protocol"]);
    if let Some(r) = resolve {
        cmd.args(["--resolve", r]);
    }
    let out = cmd.arg(url).output().expect("curl is required");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn proxy_protocol_v1_and_v2_are_accepted_and_plain_requests_refused() {
    let backends = Backends::new();
    backends.start("127.0.165.1", "pp-web");
    let m = Membrane::start_with(
        "127.0.165.128/25",
        HTTP_PORT,
        HTTPS_PORT,
        &["--enable-ingress-proxy-protocol"],
    );
    m.apply(INGRESS_CLASS);
    m.apply(&service_yaml("pp-web", 80, None, "127.0.165.1"));
    m.apply(&tls_secret("pp-tls", "pp.example.com"));
    m.apply(
        r#"apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: pp
  namespace: default
  annotations: {ingress.cilium.io/force-https: disabled}
spec:
  ingressClassName: cilium
  tls: [{hosts: [pp.example.com], secretName: pp-tls}]
  rules:
    - host: pp.example.com
      http:
        paths:
          - {path: /, pathType: Prefix, backend: {service: {name: pp-web, port: {number: 80}}}}
"#,
    );
    let ip = m.wait_ingress_ip("default", "pp");
    let addr: SocketAddr = format!("{ip}:{HTTP_PORT}").parse().expect("address");

    // PROXY v1 over HTTP.
    let url = format!("http://{ip}:{HTTP_PORT}/pp");
    let resolve = format!("pp.example.com:{HTTP_PORT}:{ip}");
    let served = wait_until(Duration::from_secs(20), || {
        curl_v1(
            &format!("http://pp.example.com:{HTTP_PORT}/pp"),
            Some(&resolve),
        )
        .is_some_and(|b| b.contains("\"pp-web\""))
    });
    assert!(served, "PROXY v1 request ({url}) not served:\n{}", m.log());

    // PROXY v2 over HTTP.
    let v2 = proxy_v2_header("192.0.2.7:4711".parse().expect("address"), addr);
    assert_eq!(get_after(addr, &v2), 200, "PROXY v2 request not served");

    // PROXY v1 in front of TLS: the header comes before the ClientHello.
    let tls = curl_v1(
        &format!("https://pp.example.com:{HTTPS_PORT}/pp"),
        Some(&format!("pp.example.com:{HTTPS_PORT}:{ip}")),
    );
    assert!(
        tls.is_some_and(|b| b.contains("\"pp-web\"")),
        "PROXY v1 + TLS not served"
    );

    // Without the header the connection is refused (closed unanswered),
    // over HTTP and over TLS.
    assert_eq!(get_after(addr, b""), 0, "plain request must be refused");
    assert_eq!(
        https_get(&ip, HTTPS_PORT, "pp.example.com", "/pp"),
        None,
        "plain TLS request must be refused"
    );
}
