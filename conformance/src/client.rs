//! A client that behaves like upstream's `test/http.CaptureRoundTrip` (Go net/http):
//! a new connection per request, `User-Agent: Go-http-client/1.1`, no `Accept-Encoding`,
//! `Content-Length: 0` on POST/PUT/PATCH, SNI = the scenario host, any server certificate
//! accepted but the leaf kept, redirects re-issued against the same address.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::Request;
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::{Deserialize, Deserializer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::echo::{canonical_header_key, proto_string};

/// Go's `http.Client.Timeout` in upstream (`HTTPClientTimeout`).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Go's client stops after 10 redirects; upstream recurses without bound, so this only
/// turns a redirect loop into an error instead of a hang.
const MAX_REDIRECTS: usize = 10;
/// Bodies are echo JSON documents; anything larger is not from the echo server.
const MAX_BODY: usize = 16 << 20;

/// The echo server's view of the request (upstream `CapturedRequest`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct CapturedRequest {
    #[serde(default, deserialize_with = "null_default")]
    pub path: String,
    #[serde(default, deserialize_with = "null_default")]
    pub host: String,
    #[serde(default, deserialize_with = "null_default")]
    pub method: String,
    #[serde(default, deserialize_with = "null_default")]
    pub proto: String,
    #[serde(default, deserialize_with = "null_default")]
    pub headers: BTreeMap<String, Vec<String>>,
    #[serde(default, deserialize_with = "null_default")]
    pub namespace: String,
    #[serde(default, deserialize_with = "null_default")]
    pub ingress: String,
    #[serde(default, deserialize_with = "null_default")]
    pub service: String,
    #[serde(default, deserialize_with = "null_default")]
    pub pod: String,
}

/// JSON `null` leaves Go's zero value; serde would reject it for a String.
fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// What the client saw (upstream `CapturedResponse`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CapturedResponse {
    pub status_code: u16,
    /// -1 when unknown, as in Go.
    pub content_length: i64,
    pub proto: String,
    /// Go-canonical names, as `http.Response.Header`.
    pub headers: BTreeMap<String, Vec<String>>,
    /// First DNS SAN of the server's leaf certificate ("" for plain HTTP).
    pub tls_hostname: String,
    /// DER of the server's leaf certificate.
    pub certificate: Option<Vec<u8>>,
}

/// Ports the Ingress address is reached on (80/443 unless overridden for tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    pub http: u16,
    pub https: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Ports {
            http: 80,
            https: 443,
        }
    }
}

/// The parts of a URL upstream reads with Go's `url.Parse`: scheme, host (with port), path
/// (percent-decoded; query and fragment dropped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedUrl {
    pub scheme: String,
    pub host: String,
    pub path: String,
}

pub fn parse_url(raw: &str) -> Result<ParsedUrl, String> {
    let (scheme, rest) = split_scheme(raw).unwrap_or(("", raw));
    let (host, path_etc) = match rest.strip_prefix("//") {
        Some(r) => {
            let end = r.find(['/', '?', '#']).unwrap_or(r.len());
            (&r[..end], &r[end..])
        }
        None => ("", rest),
    };
    let path_raw = path_etc.split(['?', '#']).next().unwrap_or_default();
    Ok(ParsedUrl {
        scheme: scheme.to_ascii_lowercase(),
        host: host.to_owned(),
        path: percent_decode(path_raw).map_err(|e| format!("parse {raw:?}: {e}"))?,
    })
}

fn split_scheme(raw: &str) -> Option<(&str, &str)> {
    let colon = raw.find(':')?;
    let scheme = &raw[..colon];
    let mut chars = scheme.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) {
        Some((scheme, &raw[colon + 1..]))
    } else {
        None
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("invalid URL escape {:?}", &s[i..s.len().min(i + 3)]))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Go's `url.PathEscape`-like escaping used by `URL.EscapedPath` (encodePath mode).
fn escape_path(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    for &c in p.as_bytes() {
        if c.is_ascii_alphanumeric() || b"-_.~$&+,/:;=@".contains(&c) {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

/// The request target Go sends for `scheme://location/` + `path` (one leading '/' trimmed):
/// a '?' starts the query, '#' a fragment that is not sent.
pub fn request_target(path: &str) -> Result<String, String> {
    let p = path.strip_prefix('/').unwrap_or(path);
    let p = p.split('#').next().unwrap_or_default();
    let (p, query) = match p.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (p, None),
    };
    let mut target = escape_path(&percent_decode(&format!("/{p}"))?);
    if let Some(q) = query {
        target.push('?');
        target.push_str(q);
    }
    Ok(target)
}

/// Go's `http.Response.Location()` resolution followed by upstream's use of
/// `Scheme`, `Hostname()` and `Path`.
pub fn resolve_redirect(
    base_scheme: &str,
    base_host: &str,
    base_target: &str,
    location: &str,
) -> Result<ParsedUrl, String> {
    let abs = if split_scheme(location).is_some() {
        parse_url(location)?
    } else if location.starts_with("//") {
        parse_url(&format!("{base_scheme}:{location}"))?
    } else {
        let base_path = base_target.split('?').next().unwrap_or("/");
        let rel = parse_url(location)?;
        let joined = if rel.path.starts_with('/') {
            rel.path
        } else if location.is_empty() || location.starts_with('?') || location.starts_with('#') {
            percent_decode(base_path)?
        } else {
            let dir = base_path.rsplit_once('/').map_or("", |(d, _)| d);
            format!("{}/{}", percent_decode(dir)?, rel.path)
        };
        ParsedUrl {
            scheme: base_scheme.to_owned(),
            host: base_host.to_owned(),
            path: remove_dot_segments(&joined),
        }
    };
    Ok(ParsedUrl {
        host: hostname_of(&abs.host).to_owned(),
        ..abs
    })
}

/// Go's `URL.Hostname()`: the host without port and IPv6 brackets.
fn hostname_of(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segs: Vec<&str> = path.split('/').collect();
    for (i, seg) in segs.iter().enumerate() {
        let last = i + 1 == segs.len();
        match *seg {
            "." => {
                if last {
                    out.push("");
                }
            }
            ".." => {
                if out.len() > 1 {
                    out.pop();
                }
                if last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    let joined = out.join("/");
    if joined.starts_with('/') {
        joined
    } else {
        format!("/{joined}")
    }
}

fn is_redirect(status: u16) -> bool {
    matches!(status, 301 | 302 | 303 | 307 | 308)
}

/// upstream `CaptureRoundTrip(method, scheme, hostname, path, location)`: one request to the
/// Ingress address `location`, following redirects the upstream way.
pub async fn capture_round_trip(
    method: &str,
    scheme: &str,
    hostname: &str,
    path: &str,
    location: &str,
    ports: Ports,
) -> Result<(CapturedRequest, CapturedResponse), String> {
    let (mut scheme, mut hostname, mut path) =
        (scheme.to_owned(), hostname.to_owned(), path.to_owned());
    for _ in 0..=MAX_REDIRECTS {
        let target = request_target(&path)?;
        let (req, resp, location_header) =
            tokio::time::timeout(CLIENT_TIMEOUT, round_trip(method, &scheme, &hostname, &target, location, ports))
                .await
                .map_err(|_| {
                    format!(
                        "{method} {scheme}://{location}{target} (Host {hostname:?}): Client.Timeout exceeded ({CLIENT_TIMEOUT:?})"
                    )
                })??;
        if !is_redirect(resp.status_code) {
            return Ok((req, resp));
        }
        let loc = location_header
            .ok_or_else(|| format!("{} redirect without a Location header", resp.status_code))?;
        // The request URL's host is the Ingress address, not the Host header.
        let next = resolve_redirect(&scheme, location, &target, &loc)?;
        tracing::debug!(from = %target, to = ?next, "re-issuing redirect against the Ingress address");
        scheme = next.scheme;
        hostname = next.host;
        path = next.path;
    }
    Err(format!("stopped after {MAX_REDIRECTS} redirects"))
}

async fn round_trip(
    method: &str,
    scheme: &str,
    hostname: &str,
    target: &str,
    location: &str,
    ports: Ports,
) -> Result<(CapturedRequest, CapturedResponse, Option<String>), String> {
    let (port, tls) = match scheme {
        "http" => (ports.http, false),
        "https" => (ports.https, true),
        other => return Err(format!("unsupported protocol scheme {other:?}")),
    };
    let default_port = if tls { 443 } else { 80 };
    // Without a scenario host Go's Host header is the URL's host: the address (with the port
    // only when it is not the scheme's default).
    let host_header = if !hostname.is_empty() {
        hostname.to_owned()
    } else if port == default_port {
        location.to_owned()
    } else {
        format!("{location}:{port}")
    };
    let what = format!("{method} {scheme}://{location}:{port}{target} (Host {host_header:?})");
    let tcp = TcpStream::connect((location, port))
        .await
        .map_err(|e| format!("{what}: dial: {e}"))?;
    if tls {
        let leaf = Arc::new(Mutex::new(None));
        let config = tls_config(leaf.clone()).map_err(|e| format!("{what}: {e}"))?;
        // Go sets ServerName to the scenario host, or derives it from the URL host
        // (an IP address, for which no SNI is sent).
        let sni_source = if hostname.is_empty() {
            location
        } else {
            hostname
        };
        let server_name = ServerName::try_from(sni_source.to_owned())
            .or_else(|_| ServerName::try_from(location.to_owned()))
            .map_err(|e| format!("{what}: server name: {e}"))?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(server_name, tcp)
            .await
            .map_err(|e| format!("{what}: TLS handshake: {e}"))?;
        let der = leaf.lock().map(|l| l.clone()).unwrap_or(None);
        let (req, mut resp, loc) = exchange(stream, method, &host_header, target, &what).await?;
        if let Some(der) = der {
            resp.tls_hostname = first_dns_name(&der).unwrap_or_default();
            resp.certificate = Some(der);
        }
        Ok((req, resp, loc))
    } else {
        exchange(tcp, method, &host_header, target, &what).await
    }
}

async fn exchange<S>(
    stream: S,
    method: &str,
    host: &str,
    target: &str,
    what: &str,
) -> Result<(CapturedRequest, CapturedResponse, Option<String>), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .title_case_headers(true)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("{what}: {e}"))?;
    let conn = tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(target)
        .header(hyper::header::HOST, host)
        .header(hyper::header::USER_AGENT, "Go-http-client/1.1");
    if matches!(method, "POST" | "PUT" | "PATCH") {
        req = req.header(hyper::header::CONTENT_LENGTH, "0");
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("{what}: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("{what}: {e}"))?;
    let status = resp.status().as_u16();
    let proto = proto_string(resp.version()).to_owned();
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in resp.headers() {
        headers
            .entry(canonical_header_key(name.as_str()))
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    // Go's transfer reader consumes Transfer-Encoding; a chunked body has no Content-Length.
    let chunked = headers
        .remove("Transfer-Encoding")
        .is_some_and(|v| v.iter().any(|t| t.eq_ignore_ascii_case("chunked")));
    if chunked {
        headers.remove("Content-Length");
    }
    let content_length = headers
        .get("Content-Length")
        .and_then(|v| v.first())
        .and_then(|v| v.trim().parse::<i64>().ok())
        .unwrap_or(-1);
    let location = headers.get("Location").and_then(|v| v.first()).cloned();
    // Like Go's ioutil.ReadAll with the error ignored: a truncated body is just shorter.
    let body = match Limited::new(resp.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            tracing::debug!(error = %e, "{what}: reading body");
            Bytes::new()
        }
    };
    drop(sender);
    conn.abort();
    // upstream: "we cannot assume the response is JSON" - only JSON objects are decoded.
    let captured =
        if serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&body).is_ok() {
            serde_json::from_slice::<CapturedRequest>(&body)
                .map_err(|e| format!("{what}: unexpected error reading response: {e}"))?
        } else {
            CapturedRequest::default()
        };
    Ok((
        captured,
        CapturedResponse {
            status_code: status,
            content_length,
            proto,
            headers,
            tls_hostname: String::new(),
            certificate: None,
        },
        location,
    ))
}

/// First DNS SAN of a DER certificate (upstream reads `certs[0].DNSNames[0]`).
pub fn first_dns_name(der: &[u8]) -> Option<String> {
    dns_names(der).into_iter().next()
}

/// Every DNS SAN of a DER certificate.
pub fn dns_names(der: &[u8]) -> Vec<String> {
    use x509_parser::prelude::*;
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some((*d).to_owned()),
            _ => None,
        })
        .collect()
}

/// Go's `x509.Certificate.VerifyHostname`: does the certificate cover `hostname`?
pub fn verify_hostname(der: &[u8], hostname: &str) -> Result<(), String> {
    let cert = CertificateDer::from(der);
    let ee = webpki::EndEntityCert::try_from(&cert)
        .map_err(|e| format!("x509: cannot parse certificate: {e}"))?;
    let name = ServerName::try_from(hostname)
        .map_err(|e| format!("x509: invalid hostname {hostname:?}: {e}"))?;
    ee.verify_is_valid_for_subject_name(&name).map_err(|_| {
        let names = dns_names(der);
        if names.is_empty() {
            format!("x509: certificate is not valid for any names, but wanted to match {hostname}")
        } else {
            format!(
                "x509: certificate is valid for {}, not {hostname}",
                names.join(", ")
            )
        }
    })
}

fn tls_config(leaf: Arc<Mutex<Option<Vec<u8>>>>) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(CapturingVerifier {
        leaf,
        algs: provider.signature_verification_algorithms,
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(config)
}

/// Go's `InsecureSkipVerify` + `VerifyPeerCertificate` capture: the chain is not validated,
/// but the handshake signature still is (Go checks it regardless).
#[derive(Debug)]
struct CapturingVerifier {
    leaf: Arc<Mutex<Option<Vec<u8>>>>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for CapturingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Ok(mut l) = self.leaf.lock() {
            *l = Some(end_entity.to_vec());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::mpsc;

    /// Serves one canned response per connection and reports each request head.
    async fn raw_server(responses: Vec<String>) -> (u16, mpsc::UnboundedReceiver<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            for resp in responses {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut chunk).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                tx.send(String::from_utf8(buf).unwrap()).unwrap();
                s.write_all(resp.as_bytes()).await.unwrap();
                s.shutdown().await.unwrap();
            }
        });
        (port, rx)
    }

    fn ports(p: u16) -> Ports {
        Ports { http: p, https: p }
    }

    const OK_TEXT: &str =
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nx-custom: a\r\nContent-Type: text/plain\r\n\r\nhi";

    #[tokio::test]
    async fn requests_look_like_go_net_http() {
        let (port, mut rx) = raw_server(vec![OK_TEXT.into(), OK_TEXT.into(), OK_TEXT.into()]).await;
        let (req, resp) =
            capture_round_trip("POST", "http", "some-host", "", "127.0.0.1", ports(port))
                .await
                .unwrap();
        assert_eq!(
            rx.recv().await.unwrap(),
            "POST / HTTP/1.1\r\nHost: some-host\r\nUser-Agent: Go-http-client/1.1\r\nContent-Length: 0\r\n\r\n"
        );
        // A text body is not decoded; headers are Go-canonical.
        assert_eq!(req, CapturedRequest::default());
        assert_eq!(resp.status_code, 200);
        assert_eq!(resp.proto, "HTTP/1.1");
        assert_eq!(resp.content_length, 2);
        assert_eq!(resp.headers["X-Custom"], vec!["a"]);
        assert_eq!(resp.headers["Content-Type"], vec!["text/plain"]);

        capture_round_trip("DELETE", "http", "h", "resource", "127.0.0.1", ports(port))
            .await
            .unwrap();
        assert_eq!(
            rx.recv().await.unwrap(),
            "DELETE /resource HTTP/1.1\r\nHost: h\r\nUser-Agent: Go-http-client/1.1\r\n\r\n"
        );
        // No scenario host: the Host header is the address (with the non-default port).
        capture_round_trip("GET", "http", "", "sub-path", "127.0.0.1", ports(port))
            .await
            .unwrap();
        assert_eq!(
            rx.recv().await.unwrap(),
            format!(
                "GET /sub-path HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: Go-http-client/1.1\r\n\r\n"
            )
        );
    }

    #[tokio::test]
    async fn chunked_answers_have_no_content_length() {
        let chunked = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n";
        let (port, _rx) = raw_server(vec![chunked.into()]).await;
        let (_, resp) = capture_round_trip("GET", "http", "h", "/", "127.0.0.1", ports(port))
            .await
            .unwrap();
        assert!(
            !resp.headers.contains_key("Content-Length"),
            "{:?}",
            resp.headers
        );
        assert!(!resp.headers.contains_key("Transfer-Encoding"));
        assert_eq!(resp.content_length, -1);
    }

    #[tokio::test]
    async fn redirects_are_reissued_against_the_same_address() {
        let (port, mut rx) = raw_server(vec![
            "HTTP/1.1 301 Moved Permanently\r\nLocation: http://other.example:8080/new?q=1\r\nContent-Length: 0\r\n\r\n".into(),
            "HTTP/1.1 302 Found\r\nLocation: rel/x\r\nContent-Length: 0\r\n\r\n".into(),
            OK_TEXT.into(),
        ])
        .await;
        let (_, resp) =
            capture_round_trip("GET", "http", "start", "/a/b", "127.0.0.1", ports(port))
                .await
                .unwrap();
        assert_eq!(resp.status_code, 200);
        assert!(
            rx.recv()
                .await
                .unwrap()
                .starts_with("GET /a/b HTTP/1.1\r\nHost: start\r\n")
        );
        // Location's host (without port) becomes the Host; its query is dropped.
        assert!(
            rx.recv()
                .await
                .unwrap()
                .starts_with("GET /new HTTP/1.1\r\nHost: other.example\r\n")
        );
        // Relative to the request URL, whose host is the Ingress address.
        assert!(
            rx.recv()
                .await
                .unwrap()
                .starts_with("GET /rel/x HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        );
    }

    #[tokio::test]
    async fn redirect_without_location_is_an_error() {
        let (port, _rx) = raw_server(vec![
            "HTTP/1.1 302 Found\r\nContent-Length: 0\r\n\r\n".into(),
        ])
        .await;
        let err = capture_round_trip("GET", "http", "h", "/", "127.0.0.1", ports(port))
            .await
            .unwrap_err();
        assert!(err.contains("Location"), "{err}");
    }

    #[tokio::test]
    async fn connection_refused_is_an_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let err = capture_round_trip("GET", "http", "h", "/", "127.0.0.1", ports(port))
            .await
            .unwrap_err();
        assert!(err.contains("dial"), "{err}");
    }

    #[tokio::test]
    async fn https_keeps_the_leaf_and_sends_sni() {
        let cert = crate::certs::self_signed_rsa(&["foo.bar.com".into()]).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(cert.cert_pem.as_bytes()).unwrap();
        let cert_der = CertificateDer::from(pem.contents.clone());
        let key_der = {
            use rsa::pkcs1::{DecodeRsaPrivateKey, EncodeRsaPrivateKey};
            let k = rsa::RsaPrivateKey::from_pkcs1_pem(&cert.key_pem).unwrap();
            rustls::pki_types::PrivateKeyDer::Pkcs1(
                k.to_pkcs1_der().unwrap().as_bytes().to_vec().into(),
            )
        };
        let server_config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert_der], key_der)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (sni_tx, mut sni_rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let tls = acceptor.accept(tcp).await.unwrap();
                sni_tx
                    .send(tls.get_ref().1.server_name().map(str::to_owned))
                    .unwrap();
                let id = crate::echo::EchoIdentity {
                    service: "foo-bar-com".into(),
                    ..Default::default()
                };
                let svc = hyper::service::service_fn(move |req| {
                    let id = id.clone();
                    async move { Ok::<_, std::convert::Infallible>(crate::echo::handle(&req, &id)) }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc),
                );
            }
        });
        let (req, resp) =
            capture_round_trip("GET", "https", "foo.bar.com", "", "127.0.0.1", ports(port))
                .await
                .unwrap();
        assert_eq!(sni_rx.recv().await.unwrap().as_deref(), Some("foo.bar.com"));
        assert_eq!(resp.status_code, 200);
        assert_eq!(resp.tls_hostname, "foo.bar.com");
        assert_eq!(resp.certificate.as_deref(), Some(&pem.contents[..]));
        assert_eq!(req.service, "foo-bar-com");
        assert_eq!(req.host, "foo.bar.com");
        crate::assertions::secure_connection(Some(&resp), "foo.bar.com").unwrap();
        assert!(crate::assertions::secure_connection(Some(&resp), "other.bar.com").is_err());
        // Without a scenario host no SNI is sent for the IP address.
        let (_, resp) = capture_round_trip("GET", "https", "", "", "127.0.0.1", ports(port))
            .await
            .unwrap();
        assert_eq!(sni_rx.recv().await.unwrap(), None);
        assert_eq!(resp.tls_hostname, "foo.bar.com");
    }

    #[test]
    fn url_helpers_follow_go() {
        assert_eq!(
            parse_url("https://foo.bar.com").unwrap(),
            ParsedUrl {
                scheme: "https".into(),
                host: "foo.bar.com".into(),
                path: "".into()
            }
        );
        assert_eq!(
            parse_url("http://prefix-path-rules/aaa/bbb/?x#y")
                .unwrap()
                .path,
            "/aaa/bbb/"
        );
        assert_eq!(parse_url("http://h/a%20b").unwrap().path, "/a b");
        assert!(parse_url("http://h/%zz").is_err());
        assert_eq!(request_target("").unwrap(), "/");
        assert_eq!(request_target("/foo/").unwrap(), "/foo/");
        assert_eq!(request_target("sub-path").unwrap(), "/sub-path");
        assert_eq!(request_target("a b?q=1").unwrap(), "/a%20b?q=1");
        assert_eq!(request_target("//x").unwrap(), "//x");
        let r = resolve_redirect("http", "127.0.0.1", "/a/b", "https://foo.bar.com/").unwrap();
        assert_eq!(
            (r.scheme.as_str(), r.host.as_str(), r.path.as_str()),
            ("https", "foo.bar.com", "/")
        );
        let r = resolve_redirect("http", "127.0.0.1", "/a/b", "../c").unwrap();
        assert_eq!((r.host.as_str(), r.path.as_str()), ("127.0.0.1", "/c"));
        let r = resolve_redirect("https", "127.0.0.1", "/", "//h.example:8443/p").unwrap();
        assert_eq!(
            (r.scheme.as_str(), r.host.as_str(), r.path.as_str()),
            ("https", "h.example", "/p")
        );
    }
}
