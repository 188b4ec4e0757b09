//! upstream `test/state` assertions, as pure functions over what a request step captured.
//! Messages follow upstream's wording so failures read the same.

use std::collections::{BTreeMap, BTreeSet};

use crate::client::{CapturedRequest, CapturedResponse, verify_hostname};

/// Upstream dereferences nil here and the step fails; we say why instead.
const NOTHING_CAPTURED: &str =
    "no response was captured: the request step failed or did not run before this assertion";

fn resp(r: Option<&CapturedResponse>) -> Result<&CapturedResponse, String> {
    r.ok_or_else(|| NOTHING_CAPTURED.to_owned())
}

fn req(r: Option<&CapturedRequest>) -> Result<&CapturedRequest, String> {
    r.ok_or_else(|| NOTHING_CAPTURED.to_owned())
}

pub fn status_code(r: Option<&CapturedResponse>, expected: u16) -> Result<(), String> {
    let got = resp(r)?.status_code;
    if got != expected {
        return Err(format!(
            "expected status code {expected} but {got} was returned"
        ));
    }
    Ok(())
}

pub fn served_by(r: Option<&CapturedRequest>, service: &str) -> Result<(), String> {
    let got = &req(r)?.service;
    if got != service {
        return Err(format!(
            "expected the request to be served by {service} but it was served by {got}"
        ));
    }
    Ok(())
}

pub fn request_host(r: Option<&CapturedRequest>, host: &str) -> Result<(), String> {
    let got = &req(r)?.host;
    if got != host {
        return Err(format!(
            "expected the request host to be {host} but was {got}"
        ));
    }
    Ok(())
}

pub fn tls_hostname(r: Option<&CapturedResponse>, hostname: &str) -> Result<(), String> {
    let got = &resp(r)?.tls_hostname;
    if got != hostname {
        return Err(format!(
            "expected the response TLS hostname to be {hostname} but was {got}"
        ));
    }
    Ok(())
}

pub fn response_certificate(r: Option<&CapturedResponse>, hostname: &str) -> Result<(), String> {
    let cert = r.and_then(|r| r.certificate.as_deref()).ok_or_else(|| {
        "hostname verification requires executing a request and also target an HTTPS URL".to_owned()
    })?;
    verify_hostname(cert, hostname)
}

/// Step "the secure connection must verify the ... hostname": both checks, in upstream order.
pub fn secure_connection(r: Option<&CapturedResponse>, hostname: &str) -> Result<(), String> {
    tls_hostname(r, hostname)?;
    response_certificate(r, hostname)
}

pub fn response_proto(r: Option<&CapturedResponse>, proto: &str) -> Result<(), String> {
    let got = &resp(r)?.proto;
    if got != proto {
        return Err(format!(
            "expected the response protocol to be {proto} but it was {got}"
        ));
    }
    Ok(())
}

pub fn request_proto(r: Option<&CapturedRequest>, proto: &str) -> Result<(), String> {
    let got = &req(r)?.proto;
    if got != proto {
        return Err(format!(
            "expected the request protocol to be {proto} but it was {got}"
        ));
    }
    Ok(())
}

pub fn method(r: Option<&CapturedRequest>, method: &str) -> Result<(), String> {
    let got = &req(r)?.method;
    if got != method {
        return Err(format!(
            "expected the request method to be {method} but it was {got}"
        ));
    }
    Ok(())
}

pub fn request_path(r: Option<&CapturedRequest>, path: &str) -> Result<(), String> {
    let want = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    };
    let got = &req(r)?.path;
    if *got != want {
        return Err(format!(
            "expected the request path to be {want} but it was {got}"
        ));
    }
    Ok(())
}

/// Go's `%v` of a `map[string][]string`.
fn go_map(h: &BTreeMap<String, Vec<String>>) -> String {
    let inner: Vec<String> = h
        .iter()
        .map(|(k, v)| format!("{k}:[{}]", v.join(" ")))
        .collect();
    format!("map[{}]", inner.join(" "))
}

/// `*` means "present with any value". Keys are looked up exactly, as upstream indexes the map.
fn header(
    which: &str,
    headers: &BTreeMap<String, Vec<String>>,
    key: &str,
    value: &str,
) -> Result<(), String> {
    let Some(values) = headers.get(key) else {
        return Err(format!(
            "expected {which} headers to contain {key} but it only contained {}",
            go_map(headers)
        ));
    };
    if value == "*" || values.iter().any(|v| v == value) {
        return Ok(());
    }
    Err(format!(
        "expected {which} headers {key} to contain a {value} value but it contained [{}]",
        values.join(" ")
    ))
}

pub fn response_header(r: Option<&CapturedResponse>, key: &str, value: &str) -> Result<(), String> {
    header("response", &resp(r)?.headers, key, value)
}

pub fn request_header(r: Option<&CapturedRequest>, key: &str, value: &str) -> Result<(), String> {
    header("request", &req(r)?.headers, key, value)
}

/// upstream `assertHeaderTable`: first row is the `key | value` header, then one check per row.
pub fn header_table(
    rows: Option<&[Vec<String>]>,
    check: impl Fn(&str, &str) -> Result<(), String>,
) -> Result<(), String> {
    let rows = rows.unwrap_or_default();
    if rows.is_empty() {
        return Err("expected a table with at least one row".to_owned());
    }
    for (i, row) in rows.iter().enumerate() {
        let [k, v] = row.as_slice() else {
            return Err(format!(
                "expected a table with 2 cells, it contained {}",
                row.len()
            ));
        };
        if i == 0 {
            // upstream's check (note the &&): only a row that is neither "key" nor "value" fails.
            if k != "key" && v != "value" {
                return Err(format!(
                    "expected a table with a header row of 'key' and 'value' but got '{k}' and '{v}'"
                ));
            }
            continue;
        }
        check(k, v)?;
    }
    Ok(())
}

/// Load balancing: distinct `pod` values per status code over many requests.
pub type ResultStatus = BTreeMap<u16, BTreeSet<String>>;

pub fn distinct_pods(results: &ResultStatus, status: u16, pods: usize) -> Result<(), String> {
    let Some(seen) = results.get(&status) else {
        return Err(format!("no reponses for status code {status} returned"));
    };
    if seen.len() != pods {
        return Err(format!(
            "expected {pods} different POD IP addresses/FQDN for status code {status} but {} was returned",
            seen.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A canned, correct echo answer as Envoy would return it (default_backend example 2).
    fn good() -> (CapturedRequest, CapturedResponse) {
        let body = r#"{"path":"/sub-path","host":"my-host","method":"GET","proto":"HTTP/1.1",
            "headers":{"User-Agent":["Go-http-client/1.1"],"X-Forwarded-Proto":["http"]},
            "namespace":"ingress-conformance-x7k2p","ingress":"default-backend",
            "service":"echo-service","pod":"default-backend-echo-service-6d5b8c7f9-abcde"}"#;
        let req: CapturedRequest = serde_json::from_str(body).unwrap();
        let mut headers = BTreeMap::new();
        for (k, v) in [
            ("Content-Length", "510"),
            ("Content-Type", "application/json"),
            ("Date", "Sat, 21 Nov 2026 17:22:39 GMT"),
            ("Server", "envoy"),
        ] {
            headers.insert(k.to_string(), vec![v.to_string()]);
        }
        let resp = CapturedResponse {
            status_code: 200,
            content_length: 510,
            proto: "HTTP/1.1".into(),
            headers,
            tls_hostname: String::new(),
            certificate: None,
        };
        (req, resp)
    }

    fn table(rows: &[(&str, &str)]) -> Vec<Vec<String>> {
        rows.iter()
            .map(|(k, v)| vec![k.to_string(), v.to_string()])
            .collect()
    }

    #[test]
    fn matching_answer_passes_every_assertion() {
        let (req, resp) = good();
        status_code(Some(&resp), 200).unwrap();
        served_by(Some(&req), "echo-service").unwrap();
        request_host(Some(&req), "my-host").unwrap();
        response_proto(Some(&resp), "HTTP/1.1").unwrap();
        request_proto(Some(&req), "HTTP/1.1").unwrap();
        method(Some(&req), "GET").unwrap();
        request_path(Some(&req), "sub-path").unwrap();
        request_path(Some(&req), "/sub-path").unwrap();
        let rt = table(&[
            ("key", "value"),
            ("Content-Length", "*"),
            ("Content-Type", "*"),
            ("Date", "*"),
            ("Server", "*"),
        ]);
        header_table(Some(&rt), |k, v| response_header(Some(&resp), k, v)).unwrap();
        let qt = table(&[("key", "value"), ("User-Agent", "Go-http-client/1.1")]);
        header_table(Some(&qt), |k, v| request_header(Some(&req), k, v)).unwrap();
    }

    #[test]
    fn wrong_status_fails() {
        let (_, mut resp) = good();
        resp.status_code = 404;
        assert_eq!(
            status_code(Some(&resp), 200).unwrap_err(),
            "expected status code 200 but 404 was returned"
        );
        // and the other way round: a 404 scenario must not accept 200
        assert!(status_code(Some(&good().1), 404).is_err());
    }

    #[test]
    fn wrong_service_fails() {
        let (mut req, _) = good();
        req.service = "foo-prefix".into();
        assert_eq!(
            served_by(Some(&req), "foo-exact").unwrap_err(),
            "expected the request to be served by foo-exact but it was served by foo-prefix"
        );
        // A non-JSON answer (e.g. Envoy's 404 text) leaves an empty service.
        assert!(served_by(Some(&CapturedRequest::default()), "foo-exact").is_err());
    }

    #[test]
    fn wrong_request_fields_fail() {
        let (req, resp) = good();
        assert!(request_host(Some(&req), "other-host").is_err());
        assert!(method(Some(&req), "POST").is_err());
        assert!(request_path(Some(&req), "").is_err());
        assert!(request_path(Some(&req), "resource").is_err());
        assert!(request_proto(Some(&req), "HTTP/2.0").is_err());
        assert!(response_proto(Some(&resp), "HTTP/1.0").is_err());
    }

    #[test]
    fn missing_or_wrong_headers_fail() {
        let (req, mut resp) = good();
        resp.headers.remove("Server");
        let rt = table(&[("key", "value"), ("Content-Type", "*"), ("Server", "*")]);
        let err = header_table(Some(&rt), |k, v| response_header(Some(&resp), k, v)).unwrap_err();
        assert!(err.starts_with("expected response headers to contain Server but it only contained map[Content-Length:[510]"), "{err}");

        let qt = table(&[("key", "value"), ("User-Agent", "curl/8")]);
        let err = header_table(Some(&qt), |k, v| request_header(Some(&req), k, v)).unwrap_err();
        assert_eq!(
            err,
            "expected request headers User-Agent to contain a curl/8 value but it contained [Go-http-client/1.1]"
        );
        // exact key lookup, as upstream indexes the Go map
        assert!(request_header(Some(&req), "user-agent", "*").is_err());
    }

    #[test]
    fn malformed_tables_fail() {
        assert!(header_table(Some(&[]), |_, _| Ok(())).is_err());
        assert!(header_table(None, |_, _| Ok(())).is_err());
        let bad_header = table(&[("k", "v"), ("A", "b")]);
        assert!(header_table(Some(&bad_header), |_, _| Ok(())).is_err());
        let three = vec![vec!["key".into(), "value".into(), "x".into()]];
        assert!(header_table(Some(&three), |_, _| Ok(())).is_err());
    }

    #[test]
    fn nothing_captured_fails_every_assertion() {
        assert!(status_code(None, 200).is_err());
        assert!(served_by(None, "x").is_err());
        assert!(request_header(None, "A", "*").is_err());
        assert!(response_header(None, "A", "*").is_err());
        assert!(secure_connection(None, "foo.bar.com").is_err());
    }

    #[test]
    fn certificate_name_checks() {
        let key = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048).unwrap();
        let good_cert = crate::certs::self_signed_with_key(&key, &["foo.bar.com".into()]).unwrap();
        let wrong_cert = crate::certs::self_signed_with_key(&key, &["other.com".into()]).unwrap();
        let der = |pem: &str| {
            let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
            p.contents
        };
        let mk = |pem: &str| CapturedResponse {
            tls_hostname: crate::client::first_dns_name(&der(pem)).unwrap_or_default(),
            certificate: Some(der(pem)),
            ..good().1
        };
        secure_connection(Some(&mk(&good_cert.cert_pem)), "foo.bar.com").unwrap();
        let err = secure_connection(Some(&mk(&wrong_cert.cert_pem)), "foo.bar.com").unwrap_err();
        assert_eq!(
            err,
            "expected the response TLS hostname to be foo.bar.com but was other.com"
        );
        // The name check alone also fails on a mismatching certificate.
        let err = response_certificate(Some(&mk(&wrong_cert.cert_pem)), "foo.bar.com").unwrap_err();
        assert_eq!(
            err,
            "x509: certificate is valid for other.com, not foo.bar.com"
        );
        // Plain HTTP captured no certificate.
        let err = secure_connection(Some(&good().1), "foo.bar.com").unwrap_err();
        assert!(err.contains("TLS hostname"), "{err}");
        let err = response_certificate(Some(&good().1), "foo.bar.com").unwrap_err();
        assert!(err.contains("HTTPS"), "{err}");
        // Wildcard certificates verify like Go's VerifyHostname.
        let wild = crate::certs::self_signed_with_key(&key, &["*.foo.com".into()]).unwrap();
        response_certificate(Some(&mk(&wild.cert_pem)), "bar.foo.com").unwrap();
        assert!(response_certificate(Some(&mk(&wild.cert_pem)), "baz.bar.foo.com").is_err());
    }

    #[test]
    fn pod_distribution() {
        let mut r = ResultStatus::new();
        for i in 0..10 {
            r.entry(200).or_default().insert(format!("pod-{i}"));
        }
        distinct_pods(&r, 200, 10).unwrap();
        assert_eq!(
            distinct_pods(&r, 200, 9).unwrap_err(),
            "expected 9 different POD IP addresses/FQDN for status code 200 but 10 was returned"
        );
        assert_eq!(
            distinct_pods(&r, 503, 10).unwrap_err(),
            "no reponses for status code 503 returned"
        );
        let mut few = ResultStatus::new();
        few.entry(200).or_default().insert("only-one".into());
        assert!(distinct_pods(&few, 200, 10).is_err());
    }
}
