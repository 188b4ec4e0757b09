//! Ingress → intermediate model: virtual hosts with ordered routes for the
//! plain-text and TLS route configurations, TLS filter chains and backends.
//!
//! This follows Cilium's ingestion (`operator/pkg/model/ingestion/ingress.go`)
//! and its CEC translator: hosts are coalesced per Ingress, a TLS host serves
//! the routes of its rule (or of the catch-all `*` rules/default backend when
//! it has no rule of its own), and a TLS host is redirected to HTTPS on the
//! plain-text side when HTTPS is enforced.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::networking::v1::{Ingress, IngressBackend};

use crate::annotations;
use crate::error::IngressError;

/// The catch-all virtual host (rules without host, default backend).
pub(crate) const WILDCARD_HOST: &str = "*";

/// How a backend names its Service port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum PortRef {
    Number(i32),
    Name(String),
}

impl PortRef {
    /// The port as it appears in cluster names and `backendServices`.
    pub fn as_string(&self) -> String {
        match self {
            PortRef::Number(n) => n.to_string(),
            PortRef::Name(n) => n.clone(),
        }
    }
}

/// A Service port traffic is sent to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Backend {
    pub namespace: String,
    pub name: String,
    pub port: PortRef,
}

/// How a route matches the request path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum PathMatch {
    /// `pathType: Exact`.
    Exact(String),
    /// `pathType: ImplementationSpecific`: a full-match regular expression.
    Regex(String),
    /// `pathType: Prefix`, normalised: `/` or a path without trailing slash,
    /// matched per path element.
    Prefix(String),
}

/// What a matching route does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    Forward(Backend),
    HttpsRedirect,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Route {
    pub path: PathMatch,
    pub action: Action,
    /// The Ingress's default backend: matched only when nothing else is.
    pub is_default: bool,
    /// `ingress.cilium.io/request-timeout` of the Ingress the route comes
    /// from; per route because shared mode merges several Ingresses.
    pub timeout: Option<Duration>,
    /// The Ingress field the route was generated from, for messages.
    pub source: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VirtualHost {
    /// A host name, a `*.` wildcard host, or `*` for the catch-all.
    pub host: String,
    pub routes: Vec<Route>,
}

/// One TLS filter chain: a certificate and the SNI names it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TlsChain {
    pub secret_namespace: String,
    pub secret_name: String,
    pub server_names: Vec<String>,
}

/// One TLS passthrough filter chain: SNI names proxied, still encrypted,
/// to one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PassthroughChain {
    pub backend: Backend,
    /// Sorted, unique.
    pub server_names: Vec<String>,
}

/// The whole translation input for one Ingress, already ordered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Model {
    pub namespace: String,
    pub name: String,
    /// `ingress.cilium.io/*` settings of the Ingress (defaults for the
    /// merged shared model).
    pub settings: annotations::Parsed,
    /// TLS passthrough chains, sorted by backend.
    pub passthrough: Vec<PassthroughChain>,
    /// Passthrough host → the `spec.rules[..].host` field that made it.
    pub passthrough_fields: BTreeMap<String, String>,
    /// Virtual hosts of `listener-insecure`, sorted by host.
    pub insecure: Vec<VirtualHost>,
    /// Virtual hosts of `listener-secure`, sorted by host.
    pub secure: Vec<VirtualHost>,
    /// TLS filter chains, sorted by secret namespace, then name.
    pub tls: Vec<TlsChain>,
    /// TLS host → the `spec.tls[..].hosts[..]` field that made it, for
    /// messages.
    pub tls_fields: BTreeMap<String, String>,
    /// Every Service → sorted, unique ports (as strings, Cilium's order).
    pub backends: BTreeMap<(String, String), BTreeSet<String>>,
}

impl Model {
    /// Whether the Ingress terminates TLS (and so needs port 443).
    pub fn has_tls(&self) -> bool {
        !self.tls.is_empty()
    }

    /// Whether the listener needs port 443 (terminated or passed-through TLS).
    pub fn serves_tls_port(&self) -> bool {
        self.has_tls() || !self.passthrough.is_empty()
    }

    /// Whether the listener serves plain-text HTTP: every Ingress except a
    /// TLS passthrough one.
    pub fn serves_http(&self) -> bool {
        !self.settings.tls_passthrough
    }

    /// The Service ports the listener answers on: `[80]`, `[443]` or
    /// `[80, 443]`.
    pub fn service_ports(&self) -> Vec<u16> {
        let mut ports = Vec::new();
        if self.serves_http() {
            ports.push(80);
        }
        if self.serves_tls_port() {
            ports.push(443);
        }
        ports
    }
}

/// `namespace/name` of an Ingress for messages; namespace defaults to
/// `default` as in `kubectl apply` without `-n`.
pub(crate) fn identity(ing: &Ingress) -> Result<(String, String), IngressError> {
    let namespace = ing
        .metadata
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".to_string());
    let name = ing
        .metadata
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| IngressError::MissingName {
            namespace: namespace.clone(),
        })?;
    Ok((namespace, name))
}

/// A TLS Secret by namespace and name (the controller's default
/// certificate, `--ingress-default-secret-namespace/-name`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SecretRef {
    pub namespace: String,
    pub name: String,
}

/// Builds the model of one Ingress. `default_secret` serves TLS hosts whose
/// `spec.tls` entry has no `secretName`, as Cilium's default secret does.
pub(crate) fn build(
    ing: &Ingress,
    enforce_https_default: bool,
    default_secret: Option<&SecretRef>,
) -> Result<Model, IngressError> {
    let (namespace, name) = identity(ing)?;
    let ingress_id = format!("{namespace}/{name}");
    let settings = annotations::parse(ing).map_err(|e| IngressError::InvalidAnnotation {
        ingress: ingress_id.clone(),
        annotation: e.annotation,
        value: e.value,
        reason: e.reason,
    })?;
    if settings.tls_passthrough {
        return build_passthrough(ing, namespace, name, settings);
    }
    let force_https = settings.force_https.unwrap_or(enforce_https_default);
    let request_timeout = settings.request_timeout;

    let default_spec = Default::default();
    let spec = ing.spec.as_ref().unwrap_or(&default_spec);
    let mut backends: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    let mut add_backend = |b: &Backend| {
        backends
            .entry((b.namespace.clone(), b.name.clone()))
            .or_default()
            .insert(b.port.as_string());
    };

    // Host → routes in rule order; BTreeMap keeps hosts sorted like Cilium.
    let mut insecure: BTreeMap<String, Vec<Route>> = BTreeMap::new();

    if let Some(default_backend) = &spec.default_backend {
        let backend = backend_of(
            default_backend,
            &namespace,
            &ingress_id,
            "spec.defaultBackend",
        )?;
        add_backend(&backend);
        insecure
            .entry(WILDCARD_HOST.to_string())
            .or_default()
            .push(Route {
                path: PathMatch::Prefix("/".to_string()),
                action: Action::Forward(backend),
                is_default: true,
                timeout: request_timeout,
                source: "spec.defaultBackend".to_string(),
            });
    }

    for (i, rule) in spec.rules.iter().flatten().enumerate() {
        let host = match rule.host.as_deref() {
            None | Some("") => WILDCARD_HOST.to_string(),
            Some(h) => {
                validate_host(h).map_err(|reason| IngressError::InvalidField {
                    ingress: ingress_id.clone(),
                    field: format!("spec.rules[{i}].host"),
                    reason,
                })?;
                h.to_string()
            }
        };
        let Some(http) = &rule.http else {
            tracing::warn!(ingress = %ingress_id, rule = i, "rule without http, skipping it");
            continue;
        };
        for (j, path) in http.paths.iter().enumerate() {
            let field = format!("spec.rules[{i}].http.paths[{j}]");
            let path_match =
                path_match_of(path.path.as_deref(), &path.path_type, &ingress_id, &field)?;
            let backend = backend_of(
                &path.backend,
                &namespace,
                &ingress_id,
                &format!("{field}.backend"),
            )?;
            add_backend(&backend);
            insecure.entry(host.clone()).or_default().push(Route {
                path: path_match,
                action: Action::Forward(backend),
                is_default: false,
                timeout: request_timeout,
                source: field,
            });
        }
    }

    // TLS: host → (secret, routes). A later `tls` entry for the same host
    // replaces the certificate, as in Cilium.
    let mut tls_fields: BTreeMap<String, String> = BTreeMap::new();
    let mut secure: BTreeMap<String, ((String, String), Vec<Route>)> = BTreeMap::new();
    for (t, tls) in spec.tls.iter().flatten().enumerate() {
        let secret = match tls.secret_name.as_deref().filter(|s| !s.is_empty()) {
            Some(s) => (namespace.clone(), s.to_string()),
            None => match default_secret {
                Some(d) => (d.namespace.clone(), d.name.clone()),
                None => {
                    tracing::warn!(ingress = %ingress_id, tls = t, "TLS entry without secretName and no default secret configured, skipping it");
                    continue;
                }
            },
        };
        for (h, host) in tls.hosts.iter().flatten().enumerate() {
            validate_host(host).map_err(|reason| IngressError::InvalidField {
                ingress: ingress_id.clone(),
                field: format!("spec.tls[{t}].hosts[{h}]"),
                reason,
            })?;
            let routes = insecure
                .get(host)
                .or_else(|| insecure.get(WILDCARD_HOST))
                .cloned();
            let Some(routes) = routes else {
                tracing::warn!(ingress = %ingress_id, host = %host, "TLS host has no rule and there is no default backend, not serving it");
                continue;
            };
            secure.insert(host.clone(), (secret.clone(), routes));
            tls_fields.insert(host.clone(), format!("spec.tls[{t}].hosts[{h}]"));
        }
    }

    let mut by_secret: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for (host, (secret, _)) in &secure {
        by_secret
            .entry(secret.clone())
            .or_default()
            .push(host.clone());
    }
    let tls = by_secret
        .into_iter()
        .map(|((secret_namespace, secret_name), server_names)| TlsChain {
            secret_namespace,
            secret_name,
            server_names,
        })
        .collect();

    let mut insecure_vhosts: BTreeMap<String, Vec<Route>> = insecure;
    if force_https {
        for (host, (_, routes)) in &secure {
            let redirects = routes
                .iter()
                .map(|r| Route {
                    path: r.path.clone(),
                    action: Action::HttpsRedirect,
                    is_default: r.is_default,
                    timeout: None,
                    source: r.source.clone(),
                })
                .collect();
            insecure_vhosts.insert(host.clone(), redirects);
        }
    }

    let finish = |host: String, routes: Vec<Route>| VirtualHost {
        host,
        routes: order_routes(routes),
    };
    Ok(Model {
        insecure: insecure_vhosts
            .into_iter()
            .map(|(h, r)| finish(h, r))
            .collect(),
        secure: secure.into_iter().map(|(h, (_, r))| finish(h, r)).collect(),
        tls,
        tls_fields,
        backends,
        namespace,
        name,
        settings,
        passthrough: Vec::new(),
        passthrough_fields: BTreeMap::new(),
    })
}

/// The model of a TLS passthrough Ingress, following Cilium's
/// `IngressPassthrough`: every rule needs a host and only paths `/` count;
/// the default backend and `spec.tls` play no part. Ignored rules and
/// paths are logged; an Ingress left with nothing to serve is an error
/// (Cilium silently generates nothing).
fn build_passthrough(
    ing: &Ingress,
    namespace: String,
    name: String,
    settings: annotations::Parsed,
) -> Result<Model, IngressError> {
    let ingress_id = format!("{namespace}/{name}");
    let default_spec = Default::default();
    let spec = ing.spec.as_ref().unwrap_or(&default_spec);
    if spec.default_backend.is_some() {
        tracing::warn!(ingress = %ingress_id, "TLS passthrough Ingress: spec.defaultBackend is ignored");
    }
    // Host → (backend, field); the first `/` path of a host wins, as the
    // TCP proxy can only have one destination.
    let mut hosts: BTreeMap<String, (Backend, String)> = BTreeMap::new();
    for (i, rule) in spec.rules.iter().flatten().enumerate() {
        let Some(host) = rule.host.as_deref().filter(|h| !h.is_empty()) else {
            tracing::warn!(ingress = %ingress_id, rule = i, "TLS passthrough Ingress: rule without host is ignored");
            continue;
        };
        let field = format!("spec.rules[{i}].host");
        validate_host(host).map_err(|reason| IngressError::InvalidField {
            ingress: ingress_id.clone(),
            field: field.clone(),
            reason,
        })?;
        for (j, path) in rule.http.iter().flat_map(|h| h.paths.iter()).enumerate() {
            if path.path.as_deref() != Some("/") {
                tracing::warn!(ingress = %ingress_id, rule = i, path = j, "TLS passthrough Ingress: paths other than \"/\" are ignored");
                continue;
            }
            let backend = backend_of(
                &path.backend,
                &namespace,
                &ingress_id,
                &format!("spec.rules[{i}].http.paths[{j}].backend"),
            )?;
            hosts
                .entry(host.to_string())
                .or_insert((backend, field.clone()));
        }
    }
    if hosts.is_empty() {
        return Err(IngressError::InvalidField {
            ingress: ingress_id,
            field: "spec.rules".to_string(),
            reason: format!(
                "{} is enabled but no rule has both a host and a path \"/\", so there is nothing to pass through",
                annotations::TLS_PASSTHROUGH
            ),
        });
    }
    let mut backends: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    let mut by_backend: BTreeMap<Backend, Vec<String>> = BTreeMap::new();
    let mut passthrough_fields = BTreeMap::new();
    for (host, (backend, field)) in hosts {
        backends
            .entry((backend.namespace.clone(), backend.name.clone()))
            .or_default()
            .insert(backend.port.as_string());
        by_backend.entry(backend).or_default().push(host.clone());
        passthrough_fields.insert(host, field);
    }
    Ok(Model {
        namespace,
        name,
        settings,
        insecure: Vec::new(),
        secure: Vec::new(),
        tls: Vec::new(),
        tls_fields: BTreeMap::new(),
        passthrough: by_backend
            .into_iter()
            .map(|(backend, server_names)| PassthroughChain {
                backend,
                server_names,
            })
            .collect(),
        passthrough_fields,
        backends,
    })
}

/// Route precedence inside a virtual host (Envoy takes the first match):
/// Exact, then regex, then Prefix, each longer path first, then the default
/// backend. The sort is stable, so equal keys keep rule order. Later routes
/// with the same match as an earlier one could never be reached and are
/// dropped (so a `Prefix /` rule wins over the default backend, as the
/// Ingress spec requires).
pub(crate) fn order_routes(mut routes: Vec<Route>) -> Vec<Route> {
    routes.sort_by_key(|r| {
        let (class, len) = route_rank(r);
        (class, std::cmp::Reverse(len))
    });
    let mut seen = std::collections::HashSet::new();
    routes.retain(|r| {
        let fresh = seen.insert(r.path.clone());
        if !fresh {
            tracing::debug!(path = ?r.path, "dropping route shadowed by an identical match");
        }
        fresh
    });
    routes
}

/// A route's class (Exact 0, regex 1, Prefix 2, default backend 3) and
/// path length: [`order_routes`] sorts by class, then longer paths first.
pub(crate) fn route_rank(r: &Route) -> (u8, usize) {
    match (&r.path, r.is_default) {
        (_, true) => (3, 0),
        (PathMatch::Exact(p), _) => (0, p.len()),
        (PathMatch::Regex(p), _) => (1, p.len()),
        (PathMatch::Prefix(p), _) => (2, p.len()),
    }
}

/// Host names must be DNS names; `*` is allowed only as a whole first label.
fn validate_host(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("must not be empty".to_string());
    }
    let rest = host.strip_prefix("*.").unwrap_or(host);
    if rest.contains('*') {
        return Err(format!(
            "invalid host {host:?}: a wildcard is only allowed as the whole first label (\"*.example.com\")"
        ));
    }
    if rest.contains(':') || rest.contains('/') {
        return Err(format!(
            "invalid host {host:?}: must be a DNS name without port or path"
        ));
    }
    Ok(())
}

fn path_match_of(
    path: Option<&str>,
    path_type: &str,
    ingress: &str,
    field: &str,
) -> Result<PathMatch, IngressError> {
    let invalid = |f: &str, reason: String| IngressError::InvalidField {
        ingress: ingress.to_string(),
        field: format!("{field}.{f}"),
        reason,
    };
    let path = path.unwrap_or("");
    match path_type {
        "Exact" | "Prefix" => {
            let path = if path.is_empty() { "/" } else { path };
            if !path.starts_with('/') {
                return Err(invalid(
                    "path",
                    format!("{path:?} must be an absolute path starting with '/'"),
                ));
            }
            if path_type == "Exact" {
                return Ok(PathMatch::Exact(path.to_string()));
            }
            let trimmed = path.trim_end_matches('/');
            Ok(PathMatch::Prefix(if trimmed.is_empty() {
                "/".to_string()
            } else {
                trimmed.to_string()
            }))
        }
        "ImplementationSpecific" => {
            let path = if path.is_empty() { "/" } else { path };
            // Envoy's safe_regex is RE2 and matches the whole path; Rust's
            // regex crate accepts the same syntax family, so validate here
            // rather than have Envoy reject the whole listener.
            regex::Regex::new(&format!("^(?:{path})$")).map_err(|e| {
                IngressError::InvalidRegex {
                    ingress: ingress.to_string(),
                    field: format!("{field}.path"),
                    regex: path.to_string(),
                    reason: e
                        .to_string()
                        .lines()
                        .last()
                        .unwrap_or_default()
                        .trim()
                        .to_string(),
                }
            })?;
            Ok(PathMatch::Regex(path.to_string()))
        }
        "" => Err(invalid(
            "pathType",
            "required (Exact, Prefix or ImplementationSpecific)".to_string(),
        )),
        other => Err(invalid(
            "pathType",
            format!(
                "unknown path type {other:?} (expected Exact, Prefix or ImplementationSpecific)"
            ),
        )),
    }
}

fn backend_of(
    backend: &IngressBackend,
    namespace: &str,
    ingress: &str,
    field: &str,
) -> Result<Backend, IngressError> {
    if backend.resource.is_some() {
        return Err(IngressError::UnsupportedResourceBackend {
            ingress: ingress.to_string(),
            field: format!("{field}.resource"),
        });
    }
    let Some(service) = &backend.service else {
        return Err(IngressError::InvalidField {
            ingress: ingress.to_string(),
            field: format!("{field}.service"),
            reason: "required".to_string(),
        });
    };
    if service.name.is_empty() {
        return Err(IngressError::InvalidField {
            ingress: ingress.to_string(),
            field: format!("{field}.service.name"),
            reason: "required".to_string(),
        });
    }
    let port = service.port.as_ref();
    let number = port.and_then(|p| p.number).filter(|n| *n != 0);
    let name = port.and_then(|p| p.name.clone()).filter(|n| !n.is_empty());
    // Cilium prefers the number when both are set.
    let port = match (number, name) {
        (Some(n), _) if !(1..=65535).contains(&n) => {
            return Err(IngressError::InvalidField {
                ingress: ingress.to_string(),
                field: format!("{field}.service.port.number"),
                reason: format!("{n} is not a valid port (1-65535)"),
            });
        }
        (Some(n), _) => PortRef::Number(n),
        (None, Some(name)) => PortRef::Name(name),
        (None, None) => {
            return Err(IngressError::InvalidField {
                ingress: ingress.to_string(),
                field: format!("{field}.service.port"),
                reason: "needs a port number or a port name".to_string(),
            });
        }
    };
    Ok(Backend {
        namespace: namespace.to_string(),
        name: service.name.clone(),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fwd(path: PathMatch) -> Route {
        Route {
            path,
            action: Action::HttpsRedirect,
            is_default: false,
            timeout: None,
            source: String::new(),
        }
    }

    #[test]
    fn routes_are_ordered_exact_regex_prefix_default() {
        let default = Route {
            path: PathMatch::Prefix("/".into()),
            action: Action::HttpsRedirect,
            is_default: true,
            timeout: None,
            source: String::new(),
        };
        let routes = vec![
            default.clone(),
            fwd(PathMatch::Prefix("/".into())),
            fwd(PathMatch::Prefix("/a".into())),
            fwd(PathMatch::Regex("/r.*".into())),
            fwd(PathMatch::Exact("/e".into())),
            fwd(PathMatch::Prefix("/aaa/bbb".into())),
            fwd(PathMatch::Regex("/longer/.*".into())),
            fwd(PathMatch::Exact("/exact/long".into())),
        ];
        let ordered: Vec<PathMatch> = order_routes(routes).into_iter().map(|r| r.path).collect();
        assert_eq!(
            ordered,
            vec![
                PathMatch::Exact("/exact/long".into()),
                PathMatch::Exact("/e".into()),
                PathMatch::Regex("/longer/.*".into()),
                PathMatch::Regex("/r.*".into()),
                PathMatch::Prefix("/aaa/bbb".into()),
                PathMatch::Prefix("/a".into()),
                // The rule's `Prefix /` shadows the default backend.
                PathMatch::Prefix("/".into()),
            ]
        );
    }

    #[test]
    fn default_backend_comes_last() {
        let default = Route {
            path: PathMatch::Prefix("/".into()),
            action: Action::HttpsRedirect,
            is_default: true,
            timeout: None,
            source: String::new(),
        };
        let ordered = order_routes(vec![default, fwd(PathMatch::Prefix("/x".into()))]);
        assert_eq!(ordered.len(), 2);
        assert!(!ordered[0].is_default);
        assert!(ordered[1].is_default);
    }

    #[test]
    fn equal_rank_keeps_rule_order() {
        let ordered = order_routes(vec![
            fwd(PathMatch::Exact("/bb".into())),
            fwd(PathMatch::Exact("/aa".into())),
        ]);
        assert_eq!(ordered[0].path, PathMatch::Exact("/bb".into()));
        assert_eq!(ordered[1].path, PathMatch::Exact("/aa".into()));
    }

    #[test]
    fn prefix_trailing_slash_is_removed() {
        let m = |p: &str| path_match_of(Some(p), "Prefix", "ns/i", "f").unwrap();
        assert_eq!(m("/"), PathMatch::Prefix("/".into()));
        assert_eq!(m("/aaa/bbb/"), PathMatch::Prefix("/aaa/bbb".into()));
        assert_eq!(m("/foo//"), PathMatch::Prefix("/foo".into()));
        assert_eq!(m("/foo"), PathMatch::Prefix("/foo".into()));
        assert_eq!(
            path_match_of(None, "Prefix", "ns/i", "f").unwrap(),
            PathMatch::Prefix("/".into())
        );
        // Exact keeps its trailing slash: /foo/ must not match /foo.
        assert_eq!(
            path_match_of(Some("/foo/"), "Exact", "ns/i", "f").unwrap(),
            PathMatch::Exact("/foo/".into())
        );
    }

    #[test]
    fn hosts_are_validated() {
        assert!(validate_host("foo.bar.com").is_ok());
        assert!(validate_host("*.foo.com").is_ok());
        assert!(validate_host("foo.*.com").is_err());
        assert!(validate_host("*foo.com").is_err());
        assert!(validate_host("foo.com:80").is_err());
    }
}
