//! RBAC checker: every request a role made (from `membrane apiserver
//! --audit-log`, attributed to the role by its User-Agent
//! `membrane-operator/<v>` / `membrane-agent/<v>`) must be allowed by the
//! ClusterRoles/Roles the chart binds to that role's ServiceAccount, with
//! Kubernetes' RBAC semantics: ClusterRoleBindings grant everywhere,
//! RoleBindings only in their namespace; `*` wildcards; `*/sub`
//! subresource rules; resourceNames only match named requests; a patch or
//! update that created the object (201) also needs `create`, as the
//! Kubernetes API server authorizes server-side apply. Discovery and the
//! other non-resource URLs every authenticated user may read
//! (system:discovery, system:public-info-viewer) are allowed.
//!
//! For the lead: `rbac::check_log_against_chart(path)` runs the whole check
//! on any audit log (e.g. of membrane/tests/k8s_roles.rs) with the chart's
//! default values.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde_json::Value;

/// One audited request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub user_agent: String,
    pub verb: String,
    pub api_group: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
    /// Set for non-resource requests (discovery, /version, …).
    pub non_resource_url: Option<String>,
    pub code: u16,
}

impl AuditEntry {
    fn from_json(v: &Value) -> Option<AuditEntry> {
        let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
        Some(AuditEntry {
            user_agent: s("userAgent"),
            verb: v["verb"].as_str()?.to_string(),
            api_group: s("apiGroup"),
            resource: s("resource"),
            subresource: s("subresource"),
            namespace: s("namespace"),
            name: s("name"),
            non_resource_url: v["nonResourceURL"].as_str().map(String::from),
            code: u16::try_from(v["code"].as_u64()?).ok()?,
        })
    }

    /// `resource/subresource` as RBAC rules name it.
    pub fn combined_resource(&self) -> String {
        if self.subresource.is_empty() {
            self.resource.clone()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        }
    }

    /// The verbs the Kubernetes authorizer checks for this request.
    fn required_verbs(&self) -> Vec<&str> {
        let mut verbs = vec![self.verb.as_str()];
        if matches!(self.verb.as_str(), "patch" | "update") && self.code == 201 {
            verbs.push("create");
        }
        verbs
    }
}

impl fmt::Display for AuditEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(url) = &self.non_resource_url {
            return write!(f, "{} {url}", self.verb);
        }
        let group = if self.api_group.is_empty() {
            "core".to_string()
        } else {
            self.api_group.clone()
        };
        write!(f, "{} {} ({group})", self.verb, self.combined_resource())?;
        if !self.name.is_empty() {
            write!(f, " {:?}", self.name)?;
        }
        if !self.namespace.is_empty() {
            write!(f, " in namespace {:?}", self.namespace)?;
        }
        write!(f, " -> {}", self.code)
    }
}

/// Reads a `--audit-log` file (panics naming a malformed line).
pub fn read_audit_log(path: &Path) -> Vec<AuditEntry> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading audit log {}: {e}", path.display()));
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str::<Value>(l)
                .ok()
                .as_ref()
                .and_then(AuditEntry::from_json)
                .unwrap_or_else(|| panic!("{}:{}: not an audit entry: {l}", path.display(), i + 1))
        })
        .collect()
}

/// A ServiceAccount (namespace, name).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ServiceAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServiceAccount {}/{}", self.namespace, self.name)
    }
}

/// A role's User-Agent prefix and the ServiceAccount the chart gives it.
#[derive(Debug, Clone)]
pub struct RoleIdentity {
    pub user_agent_prefix: String,
    pub service_account: ServiceAccount,
}

/// The chart's roles with default values, released into `namespace`.
pub fn chart_roles(namespace: &str) -> Vec<RoleIdentity> {
    ["membrane-operator", "membrane-agent"]
        .iter()
        .map(|name| RoleIdentity {
            user_agent_prefix: format!("{name}/"),
            service_account: ServiceAccount {
                namespace: namespace.to_string(),
                name: name.to_string(),
            },
        })
        .collect()
}

#[derive(Debug, Clone, Default)]
struct Rule {
    api_groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
    resource_names: Vec<String>,
    non_resource_urls: Vec<String>,
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(String::from))
        .collect()
}

impl Rule {
    fn from_json(v: &Value) -> Rule {
        Rule {
            api_groups: strings(&v["apiGroups"]),
            resources: strings(&v["resources"]),
            verbs: strings(&v["verbs"]),
            resource_names: strings(&v["resourceNames"]),
            non_resource_urls: strings(&v["nonResourceURLs"]),
        }
    }

    fn has_verb(&self, verb: &str) -> bool {
        self.verbs.iter().any(|v| v == "*" || v == verb)
    }

    fn allows(&self, e: &AuditEntry, verb: &str) -> bool {
        if !self.has_verb(verb) {
            return false;
        }
        if let Some(url) = &e.non_resource_url {
            return self.non_resource_urls.iter().any(|p| url_matches(p, url));
        }
        let group = self
            .api_groups
            .iter()
            .any(|g| g == "*" || *g == e.api_group);
        let combined = e.combined_resource();
        let resource = self.resources.iter().any(|r| {
            r == "*"
                || *r == combined
                || (!e.subresource.is_empty() && *r == format!("*/{}", e.subresource))
        });
        let name = self.resource_names.is_empty()
            || (!e.name.is_empty() && self.resource_names.contains(&e.name));
        group && resource && name
    }
}

fn url_matches(pattern: &str, url: &str) -> bool {
    pattern == "*"
        || pattern == url
        || pattern
            .strip_suffix('*')
            .is_some_and(|prefix| url.starts_with(prefix))
}

/// Non-resource URLs Kubernetes' default ClusterRoles (system:discovery,
/// system:public-info-viewer) let every authenticated user GET.
const DEFAULT_NON_RESOURCE: [&str; 10] = [
    "/api",
    "/api/*",
    "/apis",
    "/apis/*",
    "/healthz",
    "/livez",
    "/readyz",
    "/version",
    "/version/",
    "/openapi/*",
];

#[derive(Debug, Clone)]
struct Binding {
    /// `None` for a ClusterRoleBinding.
    namespace: Option<String>,
    role_kind: String,
    role_name: String,
    subjects: Vec<ServiceAccount>,
}

/// The RBAC objects of a rendered chart.
#[derive(Debug, Clone, Default)]
pub struct Rbac {
    cluster_roles: BTreeMap<String, Vec<Rule>>,
    roles: BTreeMap<(String, String), Vec<Rule>>,
    bindings: Vec<Binding>,
}

impl Rbac {
    /// Collects ClusterRoles, Roles and their bindings from `objects`
    /// (objects without a namespace get `default_namespace`, as Helm
    /// installs them into the release namespace).
    pub fn from_objects(objects: &[Value], default_namespace: &str) -> Rbac {
        let mut rbac = Rbac::default();
        for o in objects {
            if o["apiVersion"] != "rbac.authorization.k8s.io/v1" {
                continue;
            }
            let name = o["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let ns = o["metadata"]["namespace"]
                .as_str()
                .unwrap_or(default_namespace)
                .to_string();
            let rules = || {
                o["rules"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(Rule::from_json)
                    .collect::<Vec<_>>()
            };
            let binding = |namespace: Option<String>| Binding {
                namespace: namespace.clone(),
                role_kind: o["roleRef"]["kind"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                role_name: o["roleRef"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                subjects: o["subjects"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|s| s["kind"] == "ServiceAccount")
                    .map(|s| ServiceAccount {
                        namespace: s["namespace"]
                            .as_str()
                            .map(String::from)
                            .or_else(|| namespace.clone())
                            .unwrap_or_default(),
                        name: s["name"].as_str().unwrap_or_default().to_string(),
                    })
                    .collect(),
            };
            match o["kind"].as_str() {
                Some("ClusterRole") => {
                    rbac.cluster_roles.insert(name, rules());
                }
                Some("Role") => {
                    rbac.roles.insert((ns, name), rules());
                }
                Some("ClusterRoleBinding") => rbac.bindings.push(binding(None)),
                Some("RoleBinding") => rbac.bindings.push(binding(Some(ns))),
                _ => {}
            }
        }
        rbac
    }

    /// The rules bound to `sa` that apply to a request in `namespace`
    /// (empty for cluster-scoped requests).
    fn rules_for(&self, sa: &ServiceAccount, namespace: &str) -> Vec<&Rule> {
        let mut out = Vec::new();
        for b in &self.bindings {
            if !b.subjects.contains(sa) {
                continue;
            }
            if let Some(ns) = &b.namespace
                && ns != namespace
            {
                continue;
            }
            let rules = match (b.role_kind.as_str(), &b.namespace) {
                ("ClusterRole", _) => self.cluster_roles.get(&b.role_name),
                ("Role", Some(ns)) => self.roles.get(&(ns.clone(), b.role_name.clone())),
                _ => None,
            };
            out.extend(rules.into_iter().flatten());
        }
        out
    }

    /// Whether `sa` may make the request `e` (every verb it needs).
    pub fn missing_verbs(&self, sa: &ServiceAccount, e: &AuditEntry) -> Vec<String> {
        let rules = self.rules_for(sa, &e.namespace);
        e.required_verbs()
            .into_iter()
            .filter(|verb| {
                let default_ok = e.verb == "get"
                    && e.non_resource_url
                        .as_deref()
                        .is_some_and(|u| DEFAULT_NON_RESOURCE.iter().any(|p| url_matches(p, u)));
                !default_ok && !rules.iter().any(|r| r.allows(e, verb))
            })
            .map(String::from)
            .collect()
    }
}

/// A request the role's RBAC does not allow.
#[derive(Debug, Clone)]
pub struct Violation {
    pub service_account: ServiceAccount,
    /// The verb the rules lack (may differ from the request's verb: an
    /// apply that created its object also needs `create`).
    pub missing_verb: String,
    pub entry: AuditEntry,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (User-Agent {:?}) is not granted {:?} for: {}",
            self.service_account, self.entry.user_agent, self.missing_verb, self.entry
        )
    }
}

/// The outcome of a check.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Requests checked per ServiceAccount (to tell an empty log apart from
    /// a clean one).
    pub checked: BTreeMap<ServiceAccount, usize>,
    pub violations: Vec<Violation>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (sa, n) in &self.checked {
            writeln!(f, "{sa}: {n} requests checked")?;
        }
        for v in &self.violations {
            writeln!(f, "VIOLATION: {v}")?;
        }
        Ok(())
    }
}

/// Checks every entry whose User-Agent starts with a role's prefix against
/// that role's ServiceAccount; other clients (kubectl, tests) are skipped.
pub fn check(rbac: &Rbac, entries: &[AuditEntry], roles: &[RoleIdentity]) -> Report {
    let mut report = Report::default();
    for e in entries {
        let Some(role) = roles
            .iter()
            .find(|r| e.user_agent.starts_with(&r.user_agent_prefix))
        else {
            continue;
        };
        let sa = &role.service_account;
        *report.checked.entry(sa.clone()).or_default() += 1;
        for verb in rbac.missing_verbs(sa, e) {
            report.violations.push(Violation {
                service_account: sa.clone(),
                missing_verb: verb,
                entry: e.clone(),
            });
        }
    }
    report
}

/// Renders the chart with default values and checks the audit log at
/// `path` against it. `None` when helm-python-sdk is missing outside CI.
pub fn check_log_against_chart(path: &Path) -> Option<Report> {
    let rendered = super::render(&serde_json::json!({}))?;
    let rbac = Rbac::from_objects(&rendered.objects, super::NAMESPACE);
    Some(check(
        &rbac,
        &read_audit_log(path),
        &chart_roles(super::NAMESPACE),
    ))
}
