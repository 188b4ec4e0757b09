//! Decoding and name qualification of one CEC/CCEC. Pure: no I/O.

use std::sync::Arc;

use envoy_types::pb::envoy::config::route::v3::VirtualHost;
use membrane_crds::{EnvoyConfigSpec, EnvoyResource};
use membrane_xds::Resource;
use prost::Name;

use super::qualify::{LEGACY_ADMIN_CLUSTER, qualify, qualify_cluster_ref};
use crate::envoy_pb::*;

/// Why a CEC was rejected. The message always names the object, the
/// resource index and the field.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{object}: {field}: {message}")]
pub struct CecError {
    /// e.g. `CiliumEnvoyConfig default/my-cec`.
    pub object: String,
    /// e.g. `spec.resources[2].filterChains[0]`.
    pub field: String,
    pub message: String,
}

/// A listener plus what the agent needs to place it.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedListener {
    /// The name as written in the CEC (what `spec.services[].listener` uses).
    pub local_name: String,
    pub listener: Listener,
    /// True when the CEC gave no address: the agent picks one.
    pub needs_address: bool,
    /// Index in `spec.resources`, for error messages.
    pub index: usize,
    /// RDS route configurations its HTTP connection managers name: the
    /// field (for messages) and the qualified name.
    pub rds: Vec<(String, String)>,
}

/// Every resource of one CEC, decoded and qualified.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParsedCec {
    pub listeners: Vec<ParsedListener>,
    pub routes: Vec<RouteConfiguration>,
    pub clusters: Vec<Cluster>,
    pub endpoints: Vec<ClusterLoadAssignment>,
    pub secrets: Vec<Secret>,
    /// Routes, clusters, endpoints and secrets already qualified and
    /// encoded (the pieces of a shared CEC joined from its parts, see
    /// `super::shared`): served as they are.
    pub encoded: Vec<Encoded>,
}

/// A resource other than a listener, qualified and encoded.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub resource: Arc<Resource>,
    /// An EDS cluster: the assignment it waits for.
    pub eds_name: Option<String>,
}

struct Ctx<'a> {
    object: &'a str,
    namespace: &'a str,
    name: &'a str,
    /// The CEC defines its own cluster named `envoy-admin`.
    defines_legacy_admin: bool,
}

impl Ctx<'_> {
    fn err(&self, field: impl Into<String>, message: impl Into<String>) -> CecError {
        CecError {
            object: self.object.to_owned(),
            field: field.into(),
            message: message.into(),
        }
    }
    fn q(&self, name: &str) -> String {
        qualify(self.namespace, self.name, name)
    }
    /// A reference to a cluster (which may be a bootstrap cluster).
    fn q_cluster(&self, name: &str) -> String {
        qualify_cluster_ref(self.namespace, self.name, name, self.defines_legacy_admin)
    }
}

/// Decode and qualify the resources of a CEC. `object` is how errors name it
/// (`CiliumEnvoyConfig ns/name`); `namespace` is empty for a CCEC.
pub fn parse_cec(
    object: &str,
    namespace: &str,
    name: &str,
    spec: &EnvoyConfigSpec,
) -> Result<ParsedCec, CecError> {
    let defines_legacy_admin = spec.resources.iter().any(is_legacy_admin);
    let ctx = Ctx {
        object,
        namespace,
        name,
        defines_legacy_admin,
    };
    let mut decoded = Vec::with_capacity(spec.resources.len());
    for (index, raw) in spec.resources.iter().enumerate() {
        let field = format!("spec.resources[{index}]");
        decoded.push(Decoded::Packed(
            membrane_xds::codec::any_from_json(&raw.to_value())
                .map_err(|e| ctx.err(&field, e.to_string()))?,
        ));
    }
    parse_decoded(object, namespace, name, decoded, defines_legacy_admin)
}

/// Whether `r` is a cluster named `envoy-admin` (see
/// [`super::qualify::qualify_cluster_ref`]).
pub(crate) fn is_legacy_admin(r: &EnvoyResource) -> bool {
    let (name, type_url) = r.name_and_type();
    name.as_deref() == Some(LEGACY_ADMIN_CLUSTER)
        && type_url.is_some_and(|t| t.ends_with("envoy.config.cluster.v3.Cluster"))
}

/// A resource decoded from its JSON: packed, or a route configuration
/// assembled by the caller (a joined shared CEC), which spares packing and
/// unpacking its thousands of routes.
#[derive(Debug, Clone)]
pub enum Decoded {
    Packed(Any),
    Route(Box<RouteConfiguration>),
}

/// [`parse_cec`] of resources already decoded from JSON (in `spec.resources`
/// order). `defines_legacy_admin`: one of them is a cluster named
/// `envoy-admin`.
pub fn parse_decoded(
    object: &str,
    namespace: &str,
    name: &str,
    resources: impl IntoIterator<Item = Decoded>,
    defines_legacy_admin: bool,
) -> Result<ParsedCec, CecError> {
    let mut out = ParsedCec::default();
    for (index, resource) in resources.into_iter().enumerate() {
        parse_resource(
            object,
            namespace,
            name,
            defines_legacy_admin,
            index,
            resource,
            &mut out,
        )?;
    }
    check_names(object, &out)?;
    Ok(out)
}

/// Decodes and qualifies `resource`, at `index` in `spec.resources`,
/// into `out` (see [`parse_decoded`]; names are not checked).
pub fn parse_resource(
    object: &str,
    namespace: &str,
    name: &str,
    defines_legacy_admin: bool,
    index: usize,
    resource: Decoded,
    out: &mut ParsedCec,
) -> Result<(), CecError> {
    let ctx = Ctx {
        object,
        namespace,
        name,
        defines_legacy_admin,
    };
    let field = format!("spec.resources[{index}]");
    let any = match resource {
        Decoded::Packed(any) => any,
        Decoded::Route(r) => {
            out.routes.push(route_configuration(&ctx, &field, *r)?);
            return Ok(());
        }
    };
    let any = &any;
    let bad = |e: prost::DecodeError| ctx.err(&field, e.to_string());
    if let Some(l) = from_any::<Listener>(any) {
        out.listeners
            .push(listener(&ctx, &field, index, l.map_err(bad)?)?);
    } else if let Some(r) = from_any::<RouteConfiguration>(any) {
        out.routes
            .push(route_configuration(&ctx, &field, r.map_err(bad)?)?);
    } else if let Some(c) = from_any::<Cluster>(any) {
        out.clusters.push(cluster(&ctx, &field, c.map_err(bad)?)?);
    } else if let Some(e) = from_any::<ClusterLoadAssignment>(any) {
        let mut e = e.map_err(bad)?;
        require_name(&ctx, &field, "clusterName", &e.cluster_name)?;
        e.cluster_name = ctx.q(&e.cluster_name);
        out.endpoints.push(e);
    } else if let Some(s) = from_any::<Secret>(any) {
        let mut s = s.map_err(bad)?;
        require_name(&ctx, &field, "name", &s.name)?;
        s.name = ctx.q(&s.name);
        out.secrets.push(s);
    } else {
        return Err(ctx.err(
            format!("{field}.@type"),
            format!(
                "{} is not a resource type a CiliumEnvoyConfig may hold (Listener, RouteConfiguration, Cluster, ClusterLoadAssignment, Secret)",
                any.type_url
            ),
        ));
    }
    Ok(())
}

/// Qualifies the clusters the routes of `vhost` send to, as
/// [`parse_decoded`] does for a route configuration's.
pub fn qualify_vhost(
    namespace: &str,
    name: &str,
    defines_legacy_admin: bool,
    vhost: &mut VirtualHost,
) {
    let ctx = Ctx {
        object: "",
        namespace,
        name,
        defines_legacy_admin,
    };
    qualify_vhost_routes(&ctx, vhost);
}

fn require_name(ctx: &Ctx<'_>, field: &str, key: &str, value: &str) -> Result<(), CecError> {
    if value.is_empty() {
        Err(ctx.err(format!("{field}.{key}"), "must not be empty"))
    } else {
        Ok(())
    }
}

/// No two resources of one type share a name.
pub fn check_names(object: &str, cec: &ParsedCec) -> Result<(), CecError> {
    fn dup<'a>(names: impl Iterator<Item = &'a str>) -> Option<&'a str> {
        let mut seen = std::collections::HashSet::new();
        names.into_iter().find(|n| !seen.insert(*n))
    }
    let encoded = |t: String| {
        cec.encoded
            .iter()
            .filter(move |e| e.resource.type_url == t)
            .map(|e| e.resource.name.as_str())
    };
    let found = [
        (
            "Listener",
            dup(cec.listeners.iter().map(|l| l.listener.name.as_str())),
        ),
        (
            "RouteConfiguration",
            dup(cec
                .routes
                .iter()
                .map(|r| r.name.as_str())
                .chain(encoded(RouteConfiguration::type_url()))),
        ),
        (
            "Cluster",
            dup(cec
                .clusters
                .iter()
                .map(|c| c.name.as_str())
                .chain(encoded(Cluster::type_url()))),
        ),
        (
            "ClusterLoadAssignment",
            dup(cec
                .endpoints
                .iter()
                .map(|e| e.cluster_name.as_str())
                .chain(encoded(ClusterLoadAssignment::type_url()))),
        ),
        (
            "Secret",
            dup(cec
                .secrets
                .iter()
                .map(|s| s.name.as_str())
                .chain(encoded(Secret::type_url()))),
        ),
    ];
    for (kind, name) in found {
        if let Some(name) = name {
            return Err(CecError {
                object: object.to_owned(),
                field: "spec.resources".to_owned(),
                message: format!("two {kind}s are named {name}"),
            });
        }
    }
    Ok(())
}

fn listener(
    ctx: &Ctx<'_>,
    field: &str,
    index: usize,
    mut l: Listener,
) -> Result<ParsedListener, CecError> {
    require_name(ctx, field, "name", &l.name)?;
    let local_name = l.name.clone();
    l.name = ctx.q(&l.name);
    let mut rds = Vec::new();
    for (i, chain) in l.filter_chains.iter_mut().enumerate() {
        filter_chain(ctx, &format!("{field}.filterChains[{i}]"), chain, &mut rds)?;
    }
    if let Some(chain) = l.default_filter_chain.as_mut() {
        filter_chain(ctx, &format!("{field}.defaultFilterChain"), chain, &mut rds)?;
    }
    let needs_address = l.address.is_none();
    Ok(ParsedListener {
        local_name,
        listener: l,
        needs_address,
        index,
        rds,
    })
}

fn filter_chain(
    ctx: &Ctx<'_>,
    field: &str,
    chain: &mut FilterChain,
    rds_names: &mut Vec<(String, String)>,
) -> Result<(), CecError> {
    for (i, filter) in chain.filters.iter_mut().enumerate() {
        let field = format!("{field}.filters[{i}].typedConfig");
        let Some(FilterConfigType::TypedConfig(any)) = filter.config_type.as_mut() else {
            continue;
        };
        let bad = |e: prost::DecodeError| ctx.err(&field, e.to_string());
        if let Some(hcm) = from_any::<HttpConnectionManager>(any) {
            let mut hcm = hcm.map_err(bad)?;
            match hcm.route_specifier.as_mut() {
                Some(RouteSpecifier::Rds(rds)) => {
                    require_name(ctx, &field, "rds.routeConfigName", &rds.route_config_name)?;
                    rds.route_config_name = ctx.q(&rds.route_config_name);
                    rds_names.push((
                        format!("{field}.rds.routeConfigName"),
                        rds.route_config_name.clone(),
                    ));
                    if rds.config_source.is_none() {
                        rds.config_source = Some(ads_config_source());
                    }
                }
                Some(RouteSpecifier::RouteConfig(rc)) => qualify_routes(ctx, rc),
                _ => {}
            }
            *any = to_any(&hcm);
        } else if let Some(tcp) = from_any::<TcpProxy>(any) {
            let mut tcp = tcp.map_err(bad)?;
            match tcp.cluster_specifier.as_mut() {
                Some(TcpClusterSpecifier::Cluster(c)) => *c = ctx.q_cluster(c),
                Some(TcpClusterSpecifier::WeightedClusters(w)) => {
                    for c in &mut w.clusters {
                        c.name = ctx.q_cluster(&c.name);
                    }
                }
                None => {}
            }
            *any = to_any(&tcp);
        }
    }
    if let Some(ts) = chain.transport_socket.as_mut()
        && let Some(TransportConfigType::TypedConfig(any)) = ts.config_type.as_mut()
        && let Some(tls) = from_any::<DownstreamTlsContext>(any)
    {
        let field = format!("{field}.transportSocket.typedConfig");
        let mut tls = tls.map_err(|e| ctx.err(&field, e.to_string()))?;
        if let Some(common) = tls.common_tls_context.as_mut() {
            fill_sds(ctx, common);
        }
        *any = to_any(&tls);
    }
    Ok(())
}

fn fill_sds(ctx: &Ctx<'_>, common: &mut CommonTlsContext) {
    for sds in &mut common.tls_certificate_sds_secret_configs {
        sds.name = ctx.q(&sds.name);
        if sds.sds_config.is_none() {
            sds.sds_config = Some(ads_config_source());
        }
    }
}

fn qualify_routes(ctx: &Ctx<'_>, rc: &mut RouteConfiguration) {
    for vhost in &mut rc.virtual_hosts {
        qualify_vhost_routes(ctx, vhost);
    }
}

fn qualify_vhost_routes(ctx: &Ctx<'_>, vhost: &mut VirtualHost) {
    for route in &mut vhost.routes {
        if let Some(RouteActionKind::Route(action)) = route.action.as_mut() {
            match action.cluster_specifier.as_mut() {
                Some(RouteClusterSpecifier::Cluster(c)) => *c = ctx.q_cluster(c),
                Some(RouteClusterSpecifier::WeightedClusters(w)) => {
                    for c in &mut w.clusters {
                        c.name = ctx.q_cluster(&c.name);
                    }
                }
                _ => {}
            }
        }
    }
}

fn route_configuration(
    ctx: &Ctx<'_>,
    field: &str,
    mut rc: RouteConfiguration,
) -> Result<RouteConfiguration, CecError> {
    require_name(ctx, field, "name", &rc.name)?;
    rc.name = ctx.q(&rc.name);
    qualify_routes(ctx, &mut rc);
    Ok(rc)
}

fn cluster(ctx: &Ctx<'_>, field: &str, mut c: Cluster) -> Result<Cluster, CecError> {
    require_name(ctx, field, "name", &c.name)?;
    c.name = ctx.q(&c.name);
    let is_eds = matches!(
        c.cluster_discovery_type,
        Some(ClusterDiscoveryType::Type(t)) if t == DiscoveryType::Eds as i32
    );
    if is_eds {
        let eds = c
            .eds_cluster_config
            .get_or_insert_with(EdsClusterConfig::default);
        if eds.eds_config.is_none() {
            eds.eds_config = Some(ads_config_source());
        }
        eds.service_name = ctx.q(&eds.service_name);
    }
    if let Some(ts) = c.transport_socket.as_mut()
        && let Some(TransportConfigType::TypedConfig(any)) = ts.config_type.as_mut()
        && let Some(tls) = from_any::<UpstreamTlsContext>(any)
    {
        let field = format!("{field}.transportSocket.typedConfig");
        let mut tls = tls.map_err(|e| ctx.err(&field, e.to_string()))?;
        if let Some(common) = tls.common_tls_context.as_mut() {
            fill_sds(ctx, common);
        }
        *any = to_any(&tls);
    }
    Ok(c)
}
