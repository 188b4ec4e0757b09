//! In-process stand-in for the upstream conformance echo server
//! (`images/echoserver/echoserver.go` in kubernetes-sigs/ingress-controller-conformance).
//!
//! Every path except `/health` is answered with a JSON description of the request as the
//! backend saw it, byte-compatible with what the Go server emits (`json.MarshalIndent` with a
//! one-space indent, Go-canonical header names, HTML-escaped strings).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, DATE, HeaderValue};
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

/// Where an echo "pod" pretends to run; reported verbatim in every answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EchoIdentity {
    pub namespace: String,
    pub ingress: String,
    pub service: String,
    pub pod: String,
}

impl EchoIdentity {
    /// Reads the same environment variables the upstream Deployment template sets.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).unwrap_or_default();
        EchoIdentity {
            namespace: var("NAMESPACE"),
            ingress: var("INGRESS_NAME"),
            service: var("SERVICE_NAME"),
            pod: var("POD_NAME"),
        }
    }
}

/// The JSON document the echo server answers with (field order matters: it is Go's struct order).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EchoResponse {
    pub path: String,
    pub host: String,
    pub method: String,
    pub proto: String,
    pub headers: BTreeMap<String, Vec<String>>,
    pub namespace: String,
    pub ingress: String,
    pub service: String,
    pub pod: String,
}

/// How long in-flight connections get to finish once `shutdown` resolves.
const GRACE: Duration = Duration::from_secs(5);

/// Serves the echo protocol on `listener` (HTTP/1.x, and HTTP/2 with prior knowledge) until
/// `shutdown` resolves. Returns an error only when accepting fails.
pub async fn serve(
    listener: TcpListener,
    id: EchoIdentity,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let id = Arc::new(id);
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                // Per-connection failures (e.g. the peer reset before accept) must not stop the pod.
                Err(e) if is_transient_accept_error(&e) => {
                    tracing::debug!(error = %e, "echo: transient accept error");
                    continue;
                }
                Err(e) => return Err(e),
            },
            () = &mut shutdown => break,
        };
        let id = id.clone();
        let service = hyper::service::service_fn(move |req| {
            let id = id.clone();
            async move { Ok::<_, Infallible>(handle(&req, &id)) }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "echo: connection ended with error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("echo: connections still open after grace period; dropping them");
    }
    Ok(())
}

fn is_transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// Builds the answer for one request. Pure apart from the Date header.
pub fn handle<B>(req: &Request<B>, id: &EchoIdentity) -> Response<Full<Bytes>> {
    // Go's server collapses "//" in the path before routing (preserveSlashes), so "//health"
    // is also the health check; the echoed `path` stays the raw target.
    let routed = req.uri().path().replace("//", "/");
    if routed == "/health" {
        return respond(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            false,
            Bytes::from_static(b"OK"),
        );
    }
    let echo = describe(req, id);
    match to_go_json(&echo) {
        Ok(body) => respond(StatusCode::OK, "application/json", true, Bytes::from(body)),
        Err(e) => {
            let msg = serde_json::json!({ "message": e.to_string() }).to_string();
            respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                "application/json",
                true,
                Bytes::from(msg),
            )
        }
    }
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    nosniff: bool,
    body: Bytes,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    if nosniff {
        h.insert(
            "x-content-type-options",
            HeaderValue::from_static("nosniff"),
        );
    }
    // Set explicitly so HTTP/2 answers carry it too (hyper only adds it for HTTP/1).
    if let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(SystemTime::now())) {
        h.insert(DATE, v);
    }
    resp
}

/// What the Go echo server would report for `req`.
pub fn describe<B>(req: &Request<B>, id: &EchoIdentity) -> EchoResponse {
    let uri = req.uri();
    let is_h2 = req.version() == Version::HTTP_2;
    // Go's r.RequestURI: the request target as sent. HTTP/2 has only :path.
    let path = if is_h2 {
        uri.path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".to_owned())
    } else {
        uri.to_string()
    };
    // Go's r.Host: the URL's host for absolute-form targets and HTTP/2 (:authority), else the
    // Host header.
    let host = match uri.authority() {
        Some(a) if is_h2 || uri.scheme().is_some() => a.as_str().to_owned(),
        _ => req
            .headers()
            .get(hyper::header::HOST)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default(),
    };
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in req.headers() {
        // Go moves Host out of the header map and strips Transfer-Encoding once it is parsed.
        if name == hyper::header::HOST || name == hyper::header::TRANSFER_ENCODING {
            continue;
        }
        headers
            .entry(canonical_header_key(name.as_str()))
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    // net/http: "Pragma: no-cache" without Cache-Control implies "Cache-Control: no-cache".
    if headers
        .get("Pragma")
        .is_some_and(|v| v.first().is_some_and(|p| p == "no-cache"))
        && !headers.contains_key("Cache-Control")
    {
        headers.insert("Cache-Control".into(), vec!["no-cache".into()]);
    }
    EchoResponse {
        path,
        host,
        method: req.method().as_str().to_owned(),
        proto: proto_string(req.version()).to_owned(),
        headers,
        namespace: id.namespace.clone(),
        ingress: id.ingress.clone(),
        service: id.service.clone(),
        pod: id.pod.clone(),
    }
}

/// Go's `Request.Proto` / `Response.Proto` spelling.
pub fn proto_string(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

/// Go's `textproto.CanonicalMIMEHeaderKey`: keys with non-token bytes are left alone, otherwise
/// the first letter and every letter after '-' are upper-cased and the rest lower-cased.
pub fn canonical_header_key(key: &str) -> String {
    let valid = key.bytes().all(is_token_byte);
    if !valid {
        return key.to_owned();
    }
    let mut out = String::with_capacity(key.len());
    let mut upper = true;
    for c in key.chars() {
        if upper {
            out.push(c.to_ascii_uppercase());
        } else {
            out.push(c.to_ascii_lowercase());
        }
        upper = c == '-';
    }
    out
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Serializes like Go's `json.MarshalIndent(v, "", " ")`: one-space indent, no trailing newline,
/// and `<`, `>`, `&`, U+2028, U+2029 escaped as `\u00XX` (Go's HTML-safe default).
pub fn to_go_json<T: Serialize>(value: &T) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, GoFormatter::default());
    value.serialize(&mut ser)?;
    Ok(out)
}

struct GoFormatter {
    pretty: serde_json::ser::PrettyFormatter<'static>,
}

impl Default for GoFormatter {
    fn default() -> Self {
        GoFormatter {
            pretty: serde_json::ser::PrettyFormatter::with_indent(b" "),
        }
    }
}

impl serde_json::ser::Formatter for GoFormatter {
    fn begin_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.pretty.begin_array(w)
    }
    fn end_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.pretty.end_array(w)
    }
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.pretty.begin_array_value(w, first)
    }
    fn end_array_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.pretty.end_array_value(w)
    }
    fn begin_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.pretty.begin_object(w)
    }
    fn end_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.pretty.end_object(w)
    }
    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.pretty.begin_object_key(w, first)
    }
    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.pretty.begin_object_value(w)
    }
    fn end_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.pretty.end_object_value(w)
    }
    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        let mut rest = fragment;
        while let Some(pos) = rest.find(['<', '>', '&', '\u{2028}', '\u{2029}']) {
            w.write_all(&rest.as_bytes()[..pos])?;
            let c = rest[pos..].chars().next().unwrap_or('&');
            write!(w, "\\u{:04x}", c as u32)?;
            rest = &rest[pos + c.len_utf8()..];
        }
        w.write_all(rest.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `echo-sample-response.json` from the shared conformance data (upstream echo behind Envoy).
    const SAMPLE: &str = r#"{
 "path": "/sub-path",
 "host": "my-host",
 "method": "GET",
 "proto": "HTTP/1.1",
 "headers": {
  "User-Agent": [
   "Go-http-client/1.1"
  ],
  "X-Envoy-Expected-Rq-Timeout-Ms": [
   "15000"
  ],
  "X-Forwarded-For": [
   "127.0.0.1"
  ],
  "X-Forwarded-Proto": [
   "http"
  ],
  "X-Request-Id": [
   "4b0b2f7e-0000-4000-8000-000000000000"
  ]
 },
 "namespace": "ingress-conformance-x7k2p",
 "ingress": "default-backend",
 "service": "echo-service",
 "pod": "default-backend-echo-service-6d5b8c7f9-abcde"
}"#;

    fn sample_identity() -> EchoIdentity {
        EchoIdentity {
            namespace: "ingress-conformance-x7k2p".into(),
            ingress: "default-backend".into(),
            service: "echo-service".into(),
            pod: "default-backend-echo-service-6d5b8c7f9-abcde".into(),
        }
    }

    fn sample_request() -> Request<()> {
        Request::builder()
            .method("GET")
            .uri("/sub-path")
            .header("host", "my-host")
            .header("user-agent", "Go-http-client/1.1")
            .header("x-forwarded-for", "127.0.0.1")
            .header("x-forwarded-proto", "http")
            .header("x-envoy-expected-rq-timeout-ms", "15000")
            .header("x-request-id", "4b0b2f7e-0000-4000-8000-000000000000")
            .body(())
            .unwrap()
    }

    #[test]
    fn body_is_byte_identical_to_upstream_sample() {
        let body = to_go_json(&describe(&sample_request(), &sample_identity())).unwrap();
        let body = String::from_utf8(body).unwrap();
        assert_eq!(body, SAMPLE);
        // The shared data file lives outside the repository; compare with it
        // when present, and insist on it in CI.
        let dir =
            crate::features::resolve_dir(std::path::Path::new(crate::features::DEFAULT_FEATURES));
        match std::fs::read_to_string(dir.join("echo-sample-response.json")) {
            Ok(sample) => assert_eq!(body, sample),
            Err(e) => assert!(
                std::env::var_os("CI").is_none(),
                "shared conformance data missing in CI ({}): {e}",
                dir.display()
            ),
        }
    }

    #[test]
    fn canonical_keys_follow_go() {
        assert_eq!(canonical_header_key("user-agent"), "User-Agent");
        assert_eq!(canonical_header_key("x-forwarded-for"), "X-Forwarded-For");
        assert_eq!(canonical_header_key("X-REQUEST-ID"), "X-Request-Id");
        assert_eq!(canonical_header_key("content-md5"), "Content-Md5");
        assert_eq!(canonical_header_key("bad key"), "bad key");
    }

    #[test]
    fn go_html_escaping() {
        let out = to_go_json(&"a<b>&c\u{2028}").unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#""a\u003cb\u003e\u0026c\u2028""#
        );
    }

    #[test]
    fn repeated_headers_keep_order_and_host_is_not_a_header() {
        let req = Request::builder()
            .method("POST")
            .uri("/x?y=1")
            .header("host", "h")
            .header("x-a", "1")
            .header("X-A", "2")
            .header("transfer-encoding", "chunked")
            .body(())
            .unwrap();
        let e = describe(&req, &EchoIdentity::default());
        assert_eq!(e.path, "/x?y=1");
        assert_eq!(e.host, "h");
        assert_eq!(e.method, "POST");
        assert_eq!(
            e.headers.get("X-A"),
            Some(&vec!["1".to_string(), "2".to_string()])
        );
        assert!(!e.headers.contains_key("Host"));
        assert!(!e.headers.contains_key("Transfer-Encoding"));
    }

    #[test]
    fn absolute_form_target_uses_url_host() {
        let req = Request::builder()
            .uri("http://example.com/p")
            .header("host", "other")
            .body(())
            .unwrap();
        let e = describe(&req, &EchoIdentity::default());
        assert_eq!(e.path, "http://example.com/p");
        assert_eq!(e.host, "example.com");
    }

    /// Raw HTTP/1.1 exchange against a live server: status, headers and framing as specified.
    async fn raw_exchange(addr: std::net::SocketAddr, request: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
            .await
            .unwrap()
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[tokio::test]
    async fn live_server_answers_like_upstream() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, sample_identity(), async {
            let _ = rx.await;
        }));

        let raw = raw_exchange(
            addr,
            "GET /sub-path?q=1 HTTP/1.1\r\nHost: my-host\r\nUser-Agent: Go-http-client/1.1\r\nConnection: close\r\n\r\n",
        )
        .await;
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let head_lc = head.to_ascii_lowercase();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(
            head_lc.contains("\r\ncontent-type: application/json\r\n"),
            "{head}"
        );
        assert!(
            head_lc.contains(&format!("\r\ncontent-length: {}", body.len())),
            "{head}"
        );
        assert!(head_lc.contains("\r\ndate: "), "{head}");
        assert!(!head_lc.contains("\r\nserver:"), "{head}");
        assert!(!head_lc.contains("transfer-encoding"), "{head}");
        let e: EchoResponse = serde_json::from_str(body).unwrap();
        assert_eq!(e.path, "/sub-path?q=1");
        assert_eq!(e.host, "my-host");
        assert_eq!(e.proto, "HTTP/1.1");
        assert_eq!(e.service, "echo-service");
        assert_eq!(e.pod, "default-backend-echo-service-6d5b8c7f9-abcde");
        assert_eq!(e.headers["User-Agent"], vec!["Go-http-client/1.1"]);
        assert_eq!(e.headers["Connection"], vec!["close"]);

        let raw = raw_exchange(addr, "GET /health HTTP/1.0\r\n\r\n").await;
        assert!(raw.starts_with("HTTP/1.0 200 OK\r\n"), "{raw}");
        assert!(raw.ends_with("\r\n\r\nOK"), "{raw}");

        tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn h2c_prior_knowledge_reports_http2() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, sample_identity(), async {
            let _ = rx.await;
        }));
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = Request::builder()
            .uri("http://h2-host/a/b?c")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.headers().contains_key(DATE));
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        let e: EchoResponse = serde_json::from_slice(&body).unwrap();
        assert_eq!(e.proto, "HTTP/2.0");
        assert_eq!(e.path, "/a/b?c");
        assert_eq!(e.host, "h2-host");
        drop(send);
        tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}
