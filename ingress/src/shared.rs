//! Shared load-balancer mode: every shared Ingress is served by ONE CEC named
//! after the shared LoadBalancer Service (`cilium-ingress` in Cilium's
//! namespace), as Cilium's operator does with
//! `ingress.cilium.io/loadbalancer-mode: shared`.
//!
//! Unlike Cilium, which builds one model from all shared Ingresses so that a
//! single bad Ingress fails the whole CEC, each Ingress is translated on its
//! own into a [`SharedPart`]; failing Ingresses are left out (the caller may
//! keep their last good part), and parts are merged in age order: when two
//! Ingresses claim the same host and path, or the same TLS host with
//! different certificates, the older one wins and the newer is reported.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::str::FromStr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use membrane_crds::{CiliumEnvoyConfig, EnvoyResource};

use crate::error::IngressError;
use crate::model::{
    self, Backend, Model, PassthroughChain, PathMatch, Route, TlsChain, VirtualHost, WILDCARD_HOST,
};
use crate::translate::{
    TranslateOptions, Translation, build_cec, lb_service, placeholder_endpoint_slice, translate,
};

/// Per-Ingress choice between a dedicated and the shared load balancer.
pub const LOADBALANCER_MODE: &str = "ingress.cilium.io/loadbalancer-mode";

/// Ports of the shared Service (Cilium's Helm chart creates it with both).
pub const SHARED_PORTS: [u16; 2] = [80, 443];

/// How an Ingress is exposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoadBalancerMode {
    /// Its own CEC, LoadBalancer Service and address.
    #[default]
    Dedicated,
    /// The shared CEC and the shared Service's address.
    Shared,
}

impl FromStr for LoadBalancerMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "dedicated" => Ok(LoadBalancerMode::Dedicated),
            "shared" => Ok(LoadBalancerMode::Shared),
            _ => Err("expected \"dedicated\" or \"shared\"".to_string()),
        }
    }
}

impl fmt::Display for LoadBalancerMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LoadBalancerMode::Dedicated => "dedicated",
            LoadBalancerMode::Shared => "shared",
        })
    }
}

/// The effective mode of an Ingress: its `ingress.cilium.io/loadbalancer-mode`
/// annotation, else `default`. Cilium silently falls back to the default on
/// an unknown value; we reject it so the user learns which address to expect.
pub fn loadbalancer_mode(
    ing: &Ingress,
    default: LoadBalancerMode,
) -> Result<LoadBalancerMode, IngressError> {
    let found = crate::annotations::lookup(ing.metadata.annotations.as_ref(), LOADBALANCER_MODE)
        .filter(|(_, v)| !v.is_empty());
    let Some((annotation, value)) = found else {
        return Ok(default);
    };
    value.parse().map_err(|reason| {
        let (namespace, name) = model::identity(ing).unwrap_or_default();
        IngressError::InvalidAnnotation {
            ingress: format!("{namespace}/{name}"),
            annotation: annotation.to_string(),
            value: value.to_string(),
            reason,
        }
    })
}

/// One Ingress's contribution to the shared CEC, translated on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedPart {
    pub(crate) namespace: String,
    pub(crate) name: String,
    pub(crate) created: Option<Time>,
    pub(crate) model: Model,
}

impl SharedPart {
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Translates one Ingress for the shared CEC. Pure: references are not
/// checked (see [`crate::validate_references`]).
pub fn shared_part(ing: &Ingress, opts: &TranslateOptions) -> Result<SharedPart, IngressError> {
    let model = model::build(
        ing,
        opts.enforce_https_default,
        opts.default_secret.as_ref(),
    )?;
    Ok(SharedPart {
        namespace: model.namespace.clone(),
        name: model.name.clone(),
        created: ing.metadata.creation_timestamp.clone(),
        model,
    })
}

/// An Ingress left out of the translation, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressRejection {
    pub namespace: String,
    pub name: String,
    pub error: IngressError,
}

/// The shared CEC, LoadBalancer Service and EndpointSlice.
#[derive(Debug, Clone)]
pub struct SharedTranslation {
    pub cec: CiliumEnvoyConfig,
    pub service: Service,
    pub endpoint_slice: EndpointSlice,
    /// `(namespace, name)` of every Ingress merged into the CEC, in merge
    /// (age) order.
    pub included: Vec<(String, String)>,
    /// Parts left out because an older Ingress claims the same host and path
    /// or TLS host.
    pub conflicts: Vec<IngressRejection>,
}

/// Merges parts into the shared objects. Parts may come in any order (the
/// merge order is by age); an empty input gives a CEC without routes.
pub fn merge_shared<'a>(
    parts: impl IntoIterator<Item = &'a SharedPart>,
    opts: &TranslateOptions,
) -> SharedTranslation {
    merge_shared_preferring(parts, &BTreeSet::new(), opts)
}

/// [`merge_shared`], where `serving` (`(namespace, name)` of the Ingresses
/// the current shared CEC includes, i.e. the last `included`) wins
/// conflicts against newcomers of the same age.
pub fn merge_shared_preferring<'a>(
    parts: impl IntoIterator<Item = &'a SharedPart>,
    serving: &BTreeSet<(String, String)>,
    opts: &TranslateOptions,
) -> SharedTranslation {
    let merged = merge_model(parts, serving, opts);
    let cec = shared_cec(&merged.model, opts);
    merged.finish(cec, opts)
}

/// The shared parts merged into one model, before it is rendered.
pub(crate) struct Merged {
    pub model: Model,
    /// `(namespace, name)` of the included parts in merge order.
    pub included_ids: Vec<(String, String)>,
    pub conflicts: Vec<IngressRejection>,
}

impl Merged {
    /// The shared objects around `cec` (the whole shared CEC or its first part).
    pub fn finish(self, cec: CiliumEnvoyConfig, opts: &TranslateOptions) -> SharedTranslation {
        shared_translation(cec, opts, self.included_ids, self.conflicts)
    }
}

/// The shared objects around `cec` (the whole shared CEC or its first
/// part), with what the merge included and left out.
pub(crate) fn shared_translation(
    cec: CiliumEnvoyConfig,
    opts: &TranslateOptions,
    included: Vec<(String, String)>,
    conflicts: Vec<IngressRejection>,
) -> SharedTranslation {
    let ns = &opts.shared_namespace;
    let svc = &opts.shared_service_name;
    let mut service = lb_service(svc, ns, &SHARED_PORTS, None);
    if opts.host_network.is_some()
        && let Some(spec) = service.spec.as_mut()
    {
        spec.type_ = Some("ClusterIP".to_string());
        spec.external_traffic_policy = None;
    }
    SharedTranslation {
        cec,
        service,
        endpoint_slice: placeholder_endpoint_slice(svc, ns, &SHARED_PORTS, None),
        included,
        conflicts,
    }
}

/// The shared CEC of a merged model.
pub(crate) fn shared_cec(merged: &Model, opts: &TranslateOptions) -> CiliumEnvoyConfig {
    let ns = &opts.shared_namespace;
    let svc = &opts.shared_service_name;
    let host_port = opts.host_network.as_ref().map(|h| h.shared_listener_port);
    // No owner: the shared objects outlive any one Ingress.
    build_cec(svc, ns, svc, &SHARED_PORTS, merged, opts, host_port, None)
}

/// Where an Ingress's routes go among equal-ranked routes of a merged
/// virtual host: older first, then by namespace and name.
pub(crate) fn age_key(p: &SharedPart) -> (Option<Time>, &str, &str) {
    (p.created.clone(), p.namespace.as_str(), p.name.as_str())
}

pub(crate) fn merge_model<'a>(
    parts: impl IntoIterator<Item = &'a SharedPart>,
    serving: &BTreeSet<(String, String)>,
    opts: &TranslateOptions,
) -> Merged {
    let mut parts: Vec<&SharedPart> = parts.into_iter().collect();
    // Older first (missing timestamps sort first); at equal age an Ingress
    // already serving beats a newcomer, then namespace, then name.
    // Timestamps have one-second resolution: without the serving rule a new
    // Ingress could take a path from one created in the same second that
    // already serves it.
    parts.sort_by_cached_key(|p| merge_key(p, serving));

    // Claims point at the part that owns them; borrowed, no string copies.
    let mut routes_claimed: HashMap<(&str, &PathMatch, bool), usize> = HashMap::new();
    let mut sni_claimed: HashMap<&str, (usize, SniUse)> = HashMap::new();
    let mut included = Vec::new();
    let mut conflicts = Vec::new();

    for (idx, part) in parts.iter().enumerate() {
        let conflict = first_conflict(
            part,
            |host, path, is_default| {
                routes_claimed
                    .get(&(host, path, is_default))
                    .map(|&i| parts[i])
            },
            |host| sni_claimed.get(host).map(|&(i, u)| (parts[i], u)),
        );
        if let Some(error) = conflict {
            conflicts.push(IngressRejection {
                namespace: part.namespace.clone(),
                name: part.name.clone(),
                error,
            });
            continue;
        }
        for (host, path, is_default) in route_claims(part) {
            routes_claimed.insert((host, path, is_default), idx);
        }
        for (host, use_) in sni_uses(part) {
            sni_claimed.insert(host, (idx, use_));
        }
        included.push(idx);
    }
    let included_ids: Vec<(String, String)> = included
        .iter()
        .map(|&i| (parts[i].namespace.clone(), parts[i].name.clone()))
        .collect();
    // Routes of equal rank keep age order; within one second by namespace
    // and name only (not by who served first), so that where an Ingress's
    // routes go depends on that Ingress alone and a part written per
    // Ingress group stays valid (see `crate::layout`).
    let mut included: Vec<&SharedPart> = included.into_iter().map(|i| parts[i]).collect();
    included.sort_by(|a, b| age_key(a).cmp(&age_key(b)));
    Merged {
        model: assemble_model(&included, opts),
        included_ids,
        conflicts,
    }
}

/// Where a part goes in the merge: age, an Ingress already `serving`
/// before a newcomer, then namespace and name.
pub(crate) type MergeKey = (Option<Time>, bool, String, String);

pub(crate) fn merge_key(p: &SharedPart, serving: &BTreeSet<(String, String)>) -> MergeKey {
    let newcomer = !serving.contains(&(p.namespace.clone(), p.name.clone()));
    (
        p.created.clone(),
        newcomer,
        p.namespace.clone(),
        p.name.clone(),
    )
}

/// What a part claims on the shared route configurations: host, path and
/// whether it is the default backend, per route.
pub(crate) fn route_claims(p: &SharedPart) -> impl Iterator<Item = (&str, &PathMatch, bool)> {
    p.model
        .insecure
        .iter()
        .chain(&p.model.secure)
        .flat_map(|vh| {
            vh.routes
                .iter()
                .map(move |r| (vh.host.as_str(), &r.path, r.is_default))
        })
}

/// How a part uses SNI names on the shared listener, in the order the
/// merge records them (a later use of a name replaces an earlier one).
pub(crate) fn sni_uses(p: &SharedPart) -> impl Iterator<Item = (&str, SniUse<'_>)> {
    let tls = p.model.tls.iter().flat_map(|c| {
        c.server_names
            .iter()
            .map(move |h| (h.as_str(), SniUse::Terminate(c)))
    });
    let passthrough = p.model.passthrough.iter().flat_map(|c| {
        c.server_names
            .iter()
            .map(move |h| (h.as_str(), SniUse::Passthrough(&c.backend)))
    });
    tls.chain(passthrough)
}

/// The use of SNI name `host` a part that was merged left on record.
pub(crate) fn recorded_sni_use<'p>(p: &'p SharedPart, host: &str) -> Option<SniUse<'p>> {
    sni_uses(p)
        .filter(|(h, _)| *h == host)
        .last()
        .map(|(_, u)| u)
}

/// The merged model of `included` (in age order).
pub(crate) fn assemble_model(included: &[&SharedPart], opts: &TranslateOptions) -> Model {
    let mut insecure: BTreeMap<&str, Vec<Route>> = BTreeMap::new();
    let mut secure: BTreeMap<&str, Vec<Route>> = BTreeMap::new();
    let mut tls: BTreeMap<(&str, &str), BTreeSet<&str>> = BTreeMap::new();
    let mut backends: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    let mut passthrough: BTreeMap<&Backend, BTreeSet<&str>> = BTreeMap::new();
    for part in included {
        let m = &part.model;
        for chain in &m.passthrough {
            passthrough
                .entry(&chain.backend)
                .or_default()
                .extend(chain.server_names.iter().map(String::as_str));
        }
        for (target, vhosts) in [(&mut insecure, &m.insecure), (&mut secure, &m.secure)] {
            for vh in vhosts {
                target
                    .entry(vh.host.as_str())
                    .or_default()
                    .extend(vh.routes.iter().cloned());
            }
        }
        for chain in &m.tls {
            tls.entry((&chain.secret_namespace, &chain.secret_name))
                .or_default()
                .extend(chain.server_names.iter().map(String::as_str));
        }
        for (svc, ports) in &m.backends {
            backends
                .entry(svc.clone())
                .or_default()
                .extend(ports.iter().cloned());
        }
    }
    let finish = |vhosts: BTreeMap<&str, Vec<Route>>| -> Vec<VirtualHost> {
        vhosts
            .into_iter()
            .map(|(host, routes)| VirtualHost {
                host: host.to_string(),
                // Parts are in age order and the sort is stable, so equal
                // ranks keep the older Ingress first.
                routes: model::order_routes(routes),
            })
            .collect()
    };
    Model {
        namespace: opts.shared_namespace.clone(),
        name: opts.shared_service_name.clone(),
        insecure: finish(insecure),
        secure: finish(secure),
        tls: tls
            .into_iter()
            .map(|((ns, name), hosts)| TlsChain {
                secret_namespace: ns.to_string(),
                secret_name: name.to_string(),
                server_names: hosts.into_iter().map(str::to_string).collect(),
            })
            .collect(),
        tls_fields: BTreeMap::new(),
        backends,
        // Listener-wide settings of one Ingress (keep-alive) cannot apply to
        // a listener shared by all: the shared listener uses the defaults.
        settings: Default::default(),
        passthrough: passthrough
            .into_iter()
            .map(|(backend, hosts)| PassthroughChain {
                backend: backend.clone(),
                server_names: hosts.into_iter().map(str::to_string).collect(),
            })
            .collect(),
        passthrough_fields: BTreeMap::new(),
    }
}

/// How an older Ingress uses an SNI name on the shared listener.
#[derive(Clone, Copy)]
pub(crate) enum SniUse<'a> {
    Terminate(&'a TlsChain),
    Passthrough(&'a Backend),
}

impl SniUse<'_> {
    /// Whether two Ingresses may use one SNI name this way: the same
    /// certificate, or passing through to the same backend.
    pub(crate) fn compatible(&self, other: &SniUse<'_>) -> bool {
        match (self, other) {
            (SniUse::Terminate(a), SniUse::Terminate(b)) => {
                a.secret_namespace == b.secret_namespace && a.secret_name == b.secret_name
            }
            (SniUse::Passthrough(a), SniUse::Passthrough(b)) => a == b,
            _ => false,
        }
    }

    fn describe(&self) -> String {
        match self {
            SniUse::Terminate(c) => format!("Secret {}/{}", c.secret_namespace, c.secret_name),
            SniUse::Passthrough(b) => format!(
                "TLS passthrough to Service {}/{} port {}",
                b.namespace,
                b.name,
                b.port.as_string()
            ),
        }
    }
}

/// The first claim of `part` an older merged part holds: `route_owner`
/// gives the merged part holding a route, `sni_owner` the last merged part
/// using an SNI name and how.
pub(crate) fn first_conflict<'p>(
    part: &SharedPart,
    route_owner: impl Fn(&str, &PathMatch, bool) -> Option<&'p SharedPart>,
    sni_owner: impl Fn(&str) -> Option<(&'p SharedPart, SniUse<'p>)>,
) -> Option<IngressError> {
    let id = |p: &SharedPart| format!("{}/{}", p.namespace, p.name);
    for vh in part.model.insecure.iter().chain(&part.model.secure) {
        for r in &vh.routes {
            if let Some(owner) = route_owner(vh.host.as_str(), &r.path, r.is_default) {
                return Some(IngressError::SharedConflict {
                    ingress: id(part),
                    field: r.source.clone(),
                    what: describe_route(&vh.host, r),
                    owner: id(owner),
                });
            }
        }
    }
    // One SNI name can only select one filter chain: the same certificate
    // may be shared, anything else (another certificate, terminating vs
    // passing through, another passthrough backend) is a conflict. This is
    // what keeps a passthrough Ingress from breaking the others
    // (cilium/cilium#31242).
    for (host, use_) in sni_uses(part) {
        let Some((owner, theirs)) = sni_owner(host) else {
            continue;
        };
        if use_.compatible(&theirs) {
            continue;
        }
        let field = part
            .model
            .tls_fields
            .get(host)
            .or_else(|| part.model.passthrough_fields.get(host))
            .cloned()
            .unwrap_or_else(|| "spec.tls".to_string());
        return Some(IngressError::SharedConflict {
            ingress: id(part),
            field,
            what: format!("TLS host {host:?} with {}", use_.describe()),
            owner: format!("{} ({})", id(owner), theirs.describe()),
        });
    }
    None
}

fn describe_route(host: &str, r: &Route) -> String {
    let host = if host == WILDCARD_HOST {
        "any host".to_string()
    } else {
        format!("host {host:?}")
    };
    if r.is_default {
        return format!("the default backend for {host}");
    }
    match &r.path {
        PathMatch::Exact(p) => format!("{host} path {p:?} (Exact)"),
        PathMatch::Prefix(p) => format!("{host} path {p:?} (Prefix)"),
        PathMatch::Regex(p) => format!("{host} path {p:?} (ImplementationSpecific)"),
    }
}

/// Translates shared-mode Ingresses (all of `ingresses`, whatever their
/// annotation): each on its own, failures left out, the rest merged.
/// `translation` is `None` when no Ingress could be served.
pub fn translate_shared<'a>(
    ingresses: impl IntoIterator<Item = &'a Ingress>,
    opts: &TranslateOptions,
) -> SharedOutcome {
    let mut rejected = Vec::new();
    let mut parts = Vec::new();
    for ing in ingresses {
        match shared_part(ing, opts) {
            Ok(p) => parts.push(p),
            Err(error) => rejected.push(rejection(ing, error)),
        }
    }
    if parts.is_empty() {
        return SharedOutcome {
            translation: None,
            rejected,
        };
    }
    let translation = merge_shared(&parts, opts);
    rejected.extend(translation.conflicts.iter().cloned());
    SharedOutcome {
        translation: Some(translation),
        rejected,
    }
}

fn rejection(ing: &Ingress, error: IngressError) -> IngressRejection {
    let (namespace, name) = model::identity(ing).unwrap_or_else(|_| {
        (
            ing.metadata.namespace.clone().unwrap_or_default(),
            String::new(),
        )
    });
    IngressRejection {
        namespace,
        name,
        error,
    }
}

/// Result of [`translate_shared`].
#[derive(Debug, Clone)]
pub struct SharedOutcome {
    pub translation: Option<SharedTranslation>,
    /// Translation failures and conflicts, one per Ingress left out.
    pub rejected: Vec<IngressRejection>,
}

/// Every Ingress translated in its effective mode (see [`loadbalancer_mode`]
/// and [`TranslateOptions::default_lb_mode`]).
#[derive(Debug, Clone, Default)]
pub struct ClusterTranslation {
    /// Dedicated-mode Ingresses that translated, in input order.
    pub dedicated: Vec<Translation>,
    /// The shared objects, when at least one shared Ingress translated.
    pub shared: Option<SharedTranslation>,
    /// Every Ingress left out, with why.
    pub rejected: Vec<IngressRejection>,
}

impl ClusterTranslation {
    /// The CECs as Cilium's operator would write them: dedicated ones in
    /// input order, then the shared one.
    pub fn cecs(&self) -> Vec<CiliumEnvoyConfig> {
        self.dedicated
            .iter()
            .map(|t| t.cec.clone())
            .chain(self.shared.iter().map(|s| s.cec.clone()))
            .collect()
    }
}

/// Translates a set of Ingresses (already filtered to the managed ones) the
/// way the controller does, minus reference checks: this is what
/// `membrane translate` and the golden tests render.
pub fn translate_cluster(ingresses: &[Ingress], opts: &TranslateOptions) -> ClusterTranslation {
    let mut out = ClusterTranslation::default();
    let mut shared = Vec::new();
    for ing in ingresses {
        match loadbalancer_mode(ing, opts.default_lb_mode) {
            Ok(LoadBalancerMode::Dedicated) => match translate(ing, opts) {
                Ok(t) => out.dedicated.push(t),
                Err(error) => out.rejected.push(rejection(ing, error)),
            },
            Ok(LoadBalancerMode::Shared) => shared.push(ing),
            Err(error) => out.rejected.push(rejection(ing, error)),
        }
    }
    let outcome = translate_shared(shared, opts);
    out.shared = outcome.translation;
    out.rejected.extend(outcome.rejected);
    out
}

// ---------------------------------------------------------------------------
// Splitting the shared CEC into objects that fit etcd's request limit.

/// The largest object Membrane writes: etcd's default request limit
/// (`--max-request-bytes`, 1.5 MiB) less room for the request around it;
/// Cilium's single shared CEC breaks at about 1.5 MB.
pub const MAX_OBJECT_BYTES: usize = 1 << 20;

/// Label on every part of a split shared CEC but the first: the name of
/// the first, which the parts are joined back into.
pub const SHARED_PART_OF_LABEL: &str = "membrane.io/shared-part-of";

/// The name of the first part, if `meta` is a later part of a split CEC.
pub fn shared_part_of(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Option<&str> {
    meta.labels
        .as_ref()?
        .get(SHARED_PART_OF_LABEL)
        .map(String::as_str)
}

/// Name suffix of a RouteConfiguration fragment: routes of a route
/// configuration too large for one object, continued in another part.
pub const FRAGMENT_SEP: &str = "~membrane-part-";

/// Why the shared CEC cannot be split.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    #[error(
        "CiliumEnvoyConfig {cec}: {field} alone serializes to {bytes} bytes, more than the {max}-byte object limit"
    )]
    TooLarge {
        cec: String,
        field: String,
        bytes: usize,
        max: usize,
    },
    #[error("CiliumEnvoyConfig {cec}: serializing: {reason}")]
    Serialize { cec: String, reason: String },
}

pub(crate) fn json_len(v: &impl serde::Serialize, cec: &str) -> Result<usize, SplitError> {
    serde_json::to_vec(v)
        .map(|b| b.len())
        .map_err(|e| SplitError::Serialize {
            cec: cec.to_owned(),
            reason: e.to_string(),
        })
}

pub(crate) fn is_route_config(r: &serde_json::Value) -> bool {
    r["@type"]
        .as_str()
        .is_some_and(|t| t.ends_with(".RouteConfiguration"))
}

/// A route configuration larger than `budget` as fragments of at most
/// `budget` bytes each: the first keeps every field and the first routes of
/// each virtual host, the others (named `<name>~membrane-part-<k>`) carry
/// only virtual-host names and the following routes, in order.
fn fragment_route_config(
    rc: &serde_json::Value,
    budget: usize,
    cec: &str,
    field: &str,
) -> Result<Vec<serde_json::Value>, SplitError> {
    use serde_json::{Value, json};
    let name = rc["name"].as_str().unwrap_or_default().to_owned();
    let mut base = rc.clone();
    let vhosts = match base.get_mut("virtualHosts").map(Value::take) {
        Some(Value::Array(v)) => v,
        _ => Vec::new(),
    };
    // The base with every virtual host but without routes.
    let mut skeleton = Vec::new();
    let mut routes_of = Vec::new();
    for mut vh in vhosts {
        let routes = match vh.get_mut("routes").map(Value::take) {
            Some(Value::Array(r)) => r,
            _ => Vec::new(),
        };
        // An empty list stands for the routes (kept only if it was there).
        if let Some(o) = vh.as_object_mut()
            && o.contains_key("routes")
        {
            o.insert("routes".to_owned(), Value::Array(Vec::new()));
        }
        skeleton.push(vh);
        routes_of.push(routes);
    }
    base["virtualHosts"] = Value::Array(skeleton.clone());
    let too_large = |bytes| SplitError::TooLarge {
        cec: cec.to_owned(),
        field: field.to_owned(),
        bytes,
        max: budget,
    };
    let base_len = json_len(&base, cec)?;
    if base_len > budget {
        return Err(too_large(base_len));
    }
    let mut out: Vec<Value> = Vec::new();
    // The fragment being filled: its JSON and its size so far.
    let mut current = base;
    let mut used = base_len;
    let type_url = rc["@type"].clone();
    let fresh = |k: usize| json!({"@type": type_url, "name": format!("{name}{FRAGMENT_SEP}{k}"), "virtualHosts": []});
    for (vi, routes) in routes_of.into_iter().enumerate() {
        let vh_name = skeleton[vi]["name"].clone();
        for route in routes {
            let len = json_len(&route, cec)? + 1;
            // The virtual host this route goes into, in the fragment being filled.
            let in_current = |c: &Value| {
                c["virtualHosts"]
                    .as_array()
                    .and_then(|v| v.iter().position(|h| h["name"] == vh_name))
            };
            let overhead = if in_current(&current).is_some() {
                0
            } else {
                json_len(&json!({"name": vh_name, "routes": []}), cec)? + 1
            };
            if used + len + overhead > budget {
                out.push(std::mem::replace(&mut current, fresh(out.len() + 1)));
                used = json_len(&current, cec)?;
            }
            let idx = match in_current(&current) {
                Some(i) => i,
                None => {
                    let hosts = current["virtualHosts"].as_array_mut();
                    let Some(hosts) = hosts else { continue };
                    hosts.push(json!({"name": vh_name, "routes": []}));
                    used += json_len(&json!({"name": vh_name, "routes": []}), cec)? + 1;
                    hosts.len() - 1
                }
            };
            if used + len > budget {
                return Err(too_large(len));
            }
            match current["virtualHosts"][idx].get_mut("routes") {
                Some(Value::Array(r)) => r.push(route),
                _ => current["virtualHosts"][idx]["routes"] = Value::Array(vec![route]),
            }
            used += len;
        }
    }
    out.push(current);
    Ok(out)
}

/// Splits a generated CEC (the shared one) into objects that each
/// serialize to at most `max_bytes`: the first keeps the name,
/// `spec.services` and the node selector; the others are named
/// `<name>-<k>` and labelled [`SHARED_PART_OF_LABEL`]. Resources keep
/// their order and are never split, except a route configuration larger
/// than an object, whose routes continue in fragments (see
/// [`join_shared_cecs`], which gives back the CEC this was given).
pub fn split_shared_cec(
    cec: &CiliumEnvoyConfig,
    max_bytes: usize,
) -> Result<Vec<CiliumEnvoyConfig>, SplitError> {
    use membrane_crds::{CiliumEnvoyConfigSpec, EnvoyConfigSpec};
    let name = cec.metadata.name.clone().unwrap_or_default();
    let id = format!(
        "{}/{name}",
        cec.metadata.namespace.as_deref().unwrap_or_default()
    );
    if json_len(cec, &id)? <= max_bytes {
        return Ok(vec![cec.clone()]);
    }
    let spec = &cec.spec.config;
    let part = |k: usize, spec: EnvoyConfigSpec| {
        let mut c = CiliumEnvoyConfig::new(
            &if k == 0 {
                name.clone()
            } else {
                format!("{name}-{k}")
            },
            CiliumEnvoyConfigSpec::from(spec),
        );
        c.metadata = part_meta(cec, k, &name);
        c
    };
    // Room for resources in a part: the limit less an empty part (with
    // `spec.services`, the largest metadata), less a margin for the
    // part's name and separators.
    let empty = part(
        0,
        EnvoyConfigSpec {
            services: spec.services.clone(),
            node_selector: spec.node_selector.clone(),
            ..Default::default()
        },
    );
    let budget = max_bytes.saturating_sub(json_len(&empty, &id)? + 64);
    // Resources and backend services as items to pack, in order.
    enum Item {
        Resource(EnvoyResource),
        Backend(membrane_crds::BackendService),
    }
    let mut items: Vec<(Item, usize)> = Vec::new();
    for (i, r) in spec.resources.iter().enumerate() {
        let len = r.len() + 1;
        if len <= budget {
            items.push((Item::Resource(r.clone()), len));
            continue;
        }
        let field = format!("spec.resources[{i}]");
        let r = r.to_value();
        if !is_route_config(&r) {
            return Err(SplitError::TooLarge {
                cec: id,
                field,
                bytes: len,
                max: budget,
            });
        }
        for f in fragment_route_config(&r, budget, &id, &field)? {
            let f = EnvoyResource::from(f);
            let len = f.len() + 1;
            items.push((Item::Resource(f), len));
        }
    }
    for b in &spec.backend_services {
        let len = json_len(b, &id)? + 1;
        items.push((Item::Backend(b.clone()), len));
    }
    let mut specs: Vec<EnvoyConfigSpec> = vec![EnvoyConfigSpec {
        services: spec.services.clone(),
        node_selector: spec.node_selector.clone(),
        ..Default::default()
    }];
    let mut used = 0usize;
    for (item, len) in items {
        if used + len > budget {
            specs.push(EnvoyConfigSpec {
                node_selector: spec.node_selector.clone(),
                ..Default::default()
            });
            used = 0;
        }
        used += len;
        let Some(s) = specs.last_mut() else { continue };
        match item {
            Item::Resource(r) => s.resources.push(r),
            Item::Backend(b) => s.backend_services.push(b),
        }
    }
    Ok(specs
        .into_iter()
        .enumerate()
        .map(|(k, s)| part(k, s))
        .collect())
}

/// Metadata of part `k` of a split CEC.
pub(crate) fn part_meta(
    cec: &CiliumEnvoyConfig,
    k: usize,
    name: &str,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
    let mut meta = cec.metadata.clone();
    if k > 0 {
        meta.name = Some(format!("{name}-{k}"));
        meta.labels
            .get_or_insert_with(BTreeMap::new)
            .insert(SHARED_PART_OF_LABEL.to_owned(), name.to_owned());
        meta.uid = None;
        meta.resource_version = None;
    }
    meta
}

/// The CEC that [`split_shared_cec`] split into `parts` (the first part
/// first, the others in order): resources and backend services
/// concatenated, route-configuration fragments merged back into their
/// route configuration. Parts laid out by Ingress ([`crate::SharedLayout`])
/// are joined the same way the agent joins them.
pub fn join_shared_cecs(parts: &[CiliumEnvoyConfig]) -> Option<CiliumEnvoyConfig> {
    use serde_json::Value;
    let first = parts.first()?;
    if crate::layout::is_by_ingress(first) {
        return crate::layout::join_by_ingress(parts);
    }
    let mut out = first.clone();
    let spec = &mut out.spec.config;
    for p in &parts[1..] {
        spec.resources
            .extend(p.spec.config.resources.iter().cloned());
        spec.backend_services
            .extend(p.spec.config.backend_services.iter().cloned());
    }
    let mut joined: Vec<Value> = Vec::with_capacity(spec.resources.len());
    let mut index: HashMap<String, usize> = HashMap::new();
    for r in std::mem::take(&mut spec.resources) {
        let r = r.to_value();
        let name = r["name"].as_str().unwrap_or_default().to_owned();
        let base = name
            .rsplit_once(FRAGMENT_SEP)
            .map(|(b, _)| b.to_owned())
            .filter(|_| is_route_config(&r));
        let Some(&at) = base.as_ref().and_then(|b| index.get(b)) else {
            if is_route_config(&r) {
                index.insert(name, joined.len());
            }
            joined.push(r);
            continue;
        };
        for vh in r["virtualHosts"].as_array().into_iter().flatten() {
            let target = joined[at]["virtualHosts"]
                .as_array_mut()
                .and_then(|hosts| hosts.iter_mut().find(|h| h["name"] == vh["name"]));
            let Some(target) = target else { continue };
            let more = vh["routes"].as_array().cloned().unwrap_or_default();
            match target.get_mut("routes") {
                Some(Value::Array(routes)) => routes.extend(more),
                _ => target["routes"] = Value::Array(more),
            }
        }
    }
    spec.resources = joined.into_iter().map(EnvoyResource::from).collect();
    out.metadata.labels = first.metadata.labels.clone();
    Some(out)
}
