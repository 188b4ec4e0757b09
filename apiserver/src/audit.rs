//! Audit log (`membrane apiserver --audit-log FILE`): one JSON line per
//! request with the attributes a Kubernetes authorizer sees — user agent,
//! verb, API group, resource, subresource, namespace, name — and the
//! response code, so tests can check every call a client makes against the
//! RBAC rules it will have in a cluster.
//!
//! The attributes are derived from the request path the way the Kubernetes
//! API server's `RequestInfoFactory` does, independently of this server's
//! routing, so a request this server cannot answer is still attributed.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{Value, json};

use crate::error::Error;

/// What an authorizer is asked about one request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Attributes {
    /// Kubernetes verb: get, list, watch, create, update, patch, delete,
    /// deletecollection; for non-resource requests the lowercased method.
    pub verb: String,
    /// False for discovery, /version, /healthz, /openapi, …
    pub resource_request: bool,
    pub api_group: String,
    pub api_version: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
    /// The request path (what a non-resource rule matches).
    pub path: String,
}

/// Namespace subresources: `/api/v1/namespaces/NAME/status` is the
/// namespace's status, not a resource named `status` inside it.
const NAMESPACE_SUBRESOURCES: [&str; 2] = ["status", "finalize"];

/// The authorizer attributes of a request.
pub fn attributes(method: &str, path: &str, query: Option<&str>) -> Attributes {
    let mut a = Attributes {
        verb: method.to_ascii_lowercase(),
        path: path.to_string(),
        ..Attributes::default()
    };
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return a,
    };
    if rest.is_empty() {
        // Discovery of a group version.
        return a;
    }
    a.resource_request = true;
    a.api_group = group.to_string();
    a.api_version = version.to_string();
    let mut parts = rest;
    if parts[0] == "namespaces" && parts.len() > 1 {
        a.namespace = parts[1].to_string();
        if parts.len() > 2 && !NAMESPACE_SUBRESOURCES.contains(&parts[2]) {
            parts = &parts[2..];
        }
    }
    a.resource = parts[0].to_string();
    if let Some(name) = parts.get(1) {
        a.name = name.to_string();
    }
    if let Some(sub) = parts.get(2) {
        a.subresource = sub.to_string();
    }
    // A namespace's own name is its name, not a namespace scope.
    if a.resource == "namespaces" {
        a.namespace = String::new();
        if let Some(name) = rest.get(1) {
            a.name = name.to_string();
        }
    }
    let watch = query.unwrap_or_default().split('&').any(|p| {
        matches!(
            p.split_once('=').unwrap_or((p, "")),
            ("watch", "true" | "1" | "")
        )
    });
    a.verb = match (method, a.name.is_empty()) {
        ("GET" | "HEAD", _) if watch => "watch",
        ("GET" | "HEAD", true) => "list",
        ("GET" | "HEAD", false) => "get",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "deletecollection",
        ("DELETE", false) => "delete",
        _ => return a,
    }
    .to_string();
    a
}

/// An append-only JSON-lines audit file.
pub struct AuditLog {
    file: Mutex<File>,
    failed: AtomicBool,
}

impl AuditLog {
    /// Opens `path` for appending (created if missing).
    pub fn open(path: &Path) -> Result<AuditLog, Error> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::Io(format!("audit log {}", parent.display()), e))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::Io(format!("audit log {}", path.display()), e))?;
        Ok(AuditLog {
            file: Mutex::new(file),
            failed: AtomicBool::new(false),
        })
    }

    /// Appends one line; a failing write is reported once and never fails
    /// the request.
    pub fn record(&self, user_agent: &str, a: &Attributes, code: u16) {
        let mut line = serde_json::to_vec(&entry(user_agent, a, code)).unwrap_or_default();
        line.push(b'\n');
        let written = match self.file.lock() {
            Ok(mut f) => f.write_all(&line),
            Err(poisoned) => poisoned.into_inner().write_all(&line),
        };
        if let Err(e) = written
            && !self.failed.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(error = %e, "audit log: write failed; further failures are not reported");
        }
    }
}

/// The JSON line of one request.
pub fn entry(user_agent: &str, a: &Attributes, code: u16) -> Value {
    let mut v = json!({
        "userAgent": user_agent,
        "verb": a.verb,
        "code": code,
    });
    if a.resource_request {
        v["apiGroup"] = json!(a.api_group);
        v["apiVersion"] = json!(a.api_version);
        v["resource"] = json!(a.resource);
        v["subresource"] = json!(a.subresource);
        v["namespace"] = json!(a.namespace);
        v["name"] = json!(a.name);
    } else {
        v["nonResourceURL"] = json!(a.path);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(method: &str, path: &str, query: Option<&str>) -> (String, String, String, String) {
        let a = attributes(method, path, query);
        (a.verb, a.resource, a.namespace, a.name)
    }

    #[test]
    fn verbs_follow_the_kubernetes_request_info() {
        let s = |x: &str| x.to_string();
        assert_eq!(
            at(
                "GET",
                "/api/v1/services",
                Some("watch=true&resourceVersion=3")
            ),
            (s("watch"), s("services"), s(""), s(""))
        );
        assert_eq!(
            at("GET", "/api/v1/namespaces/a/services", None),
            (s("list"), s("services"), s("a"), s(""))
        );
        assert_eq!(
            at("GET", "/api/v1/namespaces/a/services/web", None),
            (s("get"), s("services"), s("a"), s("web"))
        );
        assert_eq!(
            at("POST", "/apis/events.k8s.io/v1/namespaces/a/events", None),
            (s("create"), s("events"), s("a"), s(""))
        );
        assert_eq!(
            at(
                "DELETE",
                "/apis/cilium.io/v2/namespaces/a/ciliumenvoyconfigs",
                None
            ),
            (
                s("deletecollection"),
                s("ciliumenvoyconfigs"),
                s("a"),
                s("")
            )
        );
        assert_eq!(
            at("DELETE", "/api/v1/namespaces/gone", None),
            (s("delete"), s("namespaces"), s(""), s("gone"))
        );
        let status = attributes(
            "PATCH",
            "/apis/networking.k8s.io/v1/namespaces/a/ingresses/web/status",
            Some("fieldManager=x"),
        );
        assert_eq!(
            (
                status.verb.as_str(),
                status.api_group.as_str(),
                status.resource.as_str(),
                status.subresource.as_str()
            ),
            ("patch", "networking.k8s.io", "ingresses", "status")
        );
        let ns_status = attributes("PUT", "/api/v1/namespaces/a/status", None);
        assert_eq!(
            (ns_status.resource.as_str(), ns_status.name.as_str()),
            ("namespaces", "a")
        );
        assert_eq!(ns_status.subresource, "status");
    }

    #[test]
    fn discovery_is_not_a_resource_request() {
        for p in ["/api", "/api/v1", "/apis", "/apis/cilium.io/v2", "/version"] {
            let a = attributes("GET", p, None);
            assert!(!a.resource_request, "{p}");
            assert_eq!(a.verb, "get");
            assert_eq!(entry("x", &a, 200)["nonResourceURL"], p);
        }
    }
}
