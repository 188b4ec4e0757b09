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
use membrane_crds::CiliumEnvoyConfig;

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
    namespace: String,
    name: String,
    created: Option<Time>,
    model: Model,
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
    let mut parts: Vec<&SharedPart> = parts.into_iter().collect();
    // Older first (missing timestamps sort first); at equal age an Ingress
    // already serving beats a newcomer, then namespace, then name.
    // Timestamps have one-second resolution: without the serving rule a new
    // Ingress could take a path from one created in the same second that
    // already serves it.
    parts.sort_by_cached_key(|p| {
        let newcomer = !serving.contains(&(p.namespace.clone(), p.name.clone()));
        (
            p.created.clone(),
            newcomer,
            p.namespace.clone(),
            p.name.clone(),
        )
    });

    // Claims point at the part that owns them; borrowed, no string copies.
    let mut routes_claimed: HashMap<(&str, &PathMatch, bool), usize> = HashMap::new();
    let mut sni_claimed: HashMap<&str, (usize, SniUse)> = HashMap::new();
    let mut included = Vec::new();
    let mut conflicts = Vec::new();

    for (idx, part) in parts.iter().enumerate() {
        if let Some(error) = first_conflict(part, &parts, &routes_claimed, &sni_claimed) {
            conflicts.push(IngressRejection {
                namespace: part.namespace.clone(),
                name: part.name.clone(),
                error,
            });
            continue;
        }
        for vh in part.model.insecure.iter().chain(&part.model.secure) {
            for r in &vh.routes {
                routes_claimed.insert((vh.host.as_str(), &r.path, r.is_default), idx);
            }
        }
        for chain in &part.model.tls {
            for host in &chain.server_names {
                sni_claimed.insert(host.as_str(), (idx, SniUse::Terminate(chain)));
            }
        }
        for chain in &part.model.passthrough {
            for host in &chain.server_names {
                sni_claimed.insert(host.as_str(), (idx, SniUse::Passthrough(&chain.backend)));
            }
        }
        included.push(idx);
    }

    let mut insecure: BTreeMap<&str, Vec<Route>> = BTreeMap::new();
    let mut secure: BTreeMap<&str, Vec<Route>> = BTreeMap::new();
    let mut tls: BTreeMap<(&str, &str), BTreeSet<&str>> = BTreeMap::new();
    let mut backends: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    let mut passthrough: BTreeMap<&Backend, BTreeSet<&str>> = BTreeMap::new();
    for &idx in &included {
        let m = &parts[idx].model;
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
    let merged = Model {
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
    };

    let ns = &opts.shared_namespace;
    let svc = &opts.shared_service_name;
    let host_port = opts.host_network.as_ref().map(|h| h.shared_listener_port);
    // No owner: the shared objects outlive any one Ingress.
    let cec = build_cec(svc, ns, svc, &SHARED_PORTS, &merged, opts, host_port, None);
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
        included: included
            .into_iter()
            .map(|i| (parts[i].namespace.clone(), parts[i].name.clone()))
            .collect(),
        conflicts,
    }
}

/// How an older Ingress uses an SNI name on the shared listener.
#[derive(Clone, Copy)]
enum SniUse<'a> {
    Terminate(&'a TlsChain),
    Passthrough(&'a Backend),
}

impl SniUse<'_> {
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

fn first_conflict(
    part: &SharedPart,
    parts: &[&SharedPart],
    routes_claimed: &HashMap<(&str, &PathMatch, bool), usize>,
    sni_claimed: &HashMap<&str, (usize, SniUse)>,
) -> Option<IngressError> {
    let id = |p: &SharedPart| format!("{}/{}", p.namespace, p.name);
    for vh in part.model.insecure.iter().chain(&part.model.secure) {
        for r in &vh.routes {
            if let Some(&owner) = routes_claimed.get(&(vh.host.as_str(), &r.path, r.is_default)) {
                return Some(IngressError::SharedConflict {
                    ingress: id(part),
                    field: r.source.clone(),
                    what: describe_route(&vh.host, r),
                    owner: id(parts[owner]),
                });
            }
        }
    }
    // One SNI name can only select one filter chain: the same certificate
    // may be shared, anything else (another certificate, terminating vs
    // passing through, another passthrough backend) is a conflict. This is
    // what keeps a passthrough Ingress from breaking the others
    // (cilium/cilium#31242).
    let mine = part
        .model
        .tls
        .iter()
        .flat_map(|c| {
            c.server_names
                .iter()
                .map(move |h| (h, SniUse::Terminate(c)))
        })
        .chain(part.model.passthrough.iter().flat_map(|c| {
            c.server_names
                .iter()
                .map(move |h| (h, SniUse::Passthrough(&c.backend)))
        }));
    for (host, use_) in mine {
        let Some(&(owner, theirs)) = sni_claimed.get(host.as_str()) else {
            continue;
        };
        let compatible = match (use_, theirs) {
            (SniUse::Terminate(a), SniUse::Terminate(b)) => {
                a.secret_namespace == b.secret_namespace && a.secret_name == b.secret_name
            }
            (SniUse::Passthrough(a), SniUse::Passthrough(b)) => a == b,
            _ => false,
        };
        if compatible {
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
            owner: format!("{} ({})", id(parts[owner]), theirs.describe()),
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
