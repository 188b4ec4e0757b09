//! Split shared CECs (parts labelled `membrane.io/shared-part-of`) joined
//! back into their first part.
//!
//! Parts laid out by Ingress (the first part annotated
//! `membrane.io/shared-layout: by-ingress`, see `membrane_ingress::SharedLayout`)
//! are decoded one by one and kept per resourceVersion, so a change
//! re-decodes only the parts it touched; the joined resources are assembled
//! from the decoded pieces: the first part's resources, its route
//! configurations filled with the virtual hosts of every part (by name,
//! routes in the order their [`RouteOrder`]s give), then the other parts'
//! clusters by name. Parts split by position (`split_shared_cec`) are
//! joined as JSON and decoded whole.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use envoy_types::pb::envoy::config::route::v3::VirtualHost;
use membrane_crds::{BackendService, CiliumEnvoyConfig, EnvoyConfigSpec};
use membrane_ingress::{BY_INGRESS, FRAGMENT_SEP, LAYOUT_ANNOTATION, ORDER_FIELD, RouteOrder};
use membrane_store::{Kind, Object, ObjectKey, StoreSnapshot};
use prost::{Message, Name};
use serde::Deserialize;

use super::parse::{CecError, Decoded, ParsedCec, parse_cec, parse_decoded};
use super::qualify::LEGACY_ADMIN_CLUSTER;
use crate::envoy_pb::{Any, Cluster, RouteConfiguration};

/// A split CEC joined back.
#[derive(Debug)]
pub struct Joined {
    /// The resourceVersions of all its parts.
    pub rv: String,
    /// The joined spec. Parts laid out by Ingress leave `resources` empty:
    /// they are in `decoded`.
    pub spec: Arc<EnvoyConfigSpec>,
    decoded: Option<Result<Arc<Assembled>, CecError>>,
}

#[derive(Debug)]
struct Assembled {
    resources: Vec<Decoded>,
    defines_legacy_admin: bool,
}

impl Joined {
    /// The joined CEC decoded and qualified (see [`parse_cec`]).
    pub fn parse(&self, object: &str, namespace: &str, name: &str) -> Result<ParsedCec, CecError> {
        match &self.decoded {
            None => parse_cec(object, namespace, name, &self.spec),
            Some(Ok(d)) => parse_decoded(
                object,
                namespace,
                name,
                d.resources.iter().cloned(),
                d.defines_legacy_admin,
            ),
            Some(Err(e)) => Err(e.clone()),
        }
    }
}

/// One part laid out by Ingress, decoded.
#[derive(Debug)]
struct Part {
    /// Resources other than route fragments: name and content.
    resources: Vec<(String, Any)>,
    /// Virtual-host entries of route fragments.
    entries: Vec<Entry>,
    backend_services: Vec<BackendService>,
}

#[derive(Debug)]
struct Entry {
    /// The route configuration it belongs to.
    base: String,
    vhost: VirtualHost,
    order: RouteOrder,
}

/// Joins split CECs, keeping decoded parts between passes.
#[derive(Debug, Default)]
pub struct SharedJoin {
    parts: HashMap<ObjectKey, (String, Arc<Result<Part, CecError>>)>,
    joined: HashMap<ObjectKey, Arc<Joined>>,
}

type Group<'a> = Vec<(usize, &'a CiliumEnvoyConfig)>;

impl SharedJoin {
    /// The split CECs in `snap` joined back, by their first part, and the
    /// keys of the other parts. Parts without their first part are
    /// ordinary CECs.
    pub fn join(
        &mut self,
        snap: &StoreSnapshot,
    ) -> (HashMap<ObjectKey, Arc<Joined>>, HashSet<ObjectKey>) {
        let mut groups: BTreeMap<ObjectKey, Group<'_>> = BTreeMap::new();
        for obj in snap.list(Kind::CiliumEnvoyConfig, None) {
            let Object::CiliumEnvoyConfig(c) = obj.as_ref() else {
                continue;
            };
            let Some(head) = membrane_ingress::shared_part_of(&c.metadata) else {
                continue;
            };
            let name = c.metadata.name.as_deref().unwrap_or_default();
            let Some(k) = name
                .strip_prefix(head)
                .and_then(|s| s.strip_prefix('-'))
                .and_then(|s| s.parse::<usize>().ok())
            else {
                continue;
            };
            let head = ObjectKey::new(Kind::CiliumEnvoyConfig, &obj.key().namespace, head);
            groups.entry(head).or_default().push((k, c));
        }
        let mut joined = HashMap::new();
        let mut parts = HashSet::new();
        let mut live_parts = HashSet::new();
        for (head_key, mut group) in groups {
            let Some(Object::CiliumEnvoyConfig(head)) = snap.get(&head_key).map(|o| o.as_ref())
            else {
                continue;
            };
            group.sort_by_key(|(k, _)| *k);
            let rv_of =
                |c: &CiliumEnvoyConfig| c.metadata.resource_version.clone().unwrap_or_default();
            let mut rv = rv_of(head);
            for (k, c) in &group {
                rv.push_str(&format!("+{k}:{}", rv_of(c)));
            }
            let by_ingress = head
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(LAYOUT_ANNOTATION))
                .is_some_and(|v| v == BY_INGRESS);
            if by_ingress {
                live_parts.insert(head_key.clone());
                for (_, c) in &group {
                    live_parts.insert(part_key(&head_key, c));
                }
            }
            let j = match self.joined.get(&head_key) {
                Some(j) if j.rv == rv => j.clone(),
                _ if by_ingress => Arc::new(self.join_by_ingress(&head_key, head, &group, rv)),
                _ => {
                    let all: Vec<CiliumEnvoyConfig> = std::iter::once(head)
                        .chain(group.iter().map(|(_, c)| *c))
                        .cloned()
                        .collect();
                    let Some(j) = membrane_ingress::join_shared_cecs(&all) else {
                        continue;
                    };
                    Arc::new(Joined {
                        rv,
                        spec: Arc::new(j.spec.config),
                        decoded: None,
                    })
                }
            };
            for (_, c) in &group {
                parts.insert(part_key(&head_key, c));
            }
            joined.insert(head_key, j);
        }
        self.parts.retain(|k, _| live_parts.contains(k));
        self.joined = joined.clone();
        (joined, parts)
    }

    /// Parts laid out by Ingress: decode the parts not decoded at their
    /// version yet, then assemble.
    fn join_by_ingress(
        &mut self,
        head_key: &ObjectKey,
        head: &CiliumEnvoyConfig,
        group: &Group<'_>,
        rv: String,
    ) -> Joined {
        let started = std::time::Instant::now();
        let mut fresh = 0;
        let mut decoded = Vec::with_capacity(group.len() + 1);
        for (key, c) in std::iter::once((head_key.clone(), head))
            .chain(group.iter().map(|(_, c)| (part_key(head_key, c), *c)))
        {
            let version = c.metadata.resource_version.clone().unwrap_or_default();
            let part = match self.parts.get(&key) {
                Some((v, p)) if *v == version => p.clone(),
                _ => {
                    let p = Arc::new(decode_part(&key, c));
                    fresh += 1;
                    self.parts.insert(key, (version, p.clone()));
                    p
                }
            };
            decoded.push(part);
        }
        let mut spec = head.spec.config.clone();
        spec.resources = Vec::new();
        let mut backends: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        let mut ok = Vec::with_capacity(decoded.len());
        let mut failed = None;
        for p in &decoded {
            match p.as_ref() {
                Ok(p) => ok.push(p),
                Err(e) => {
                    failed.get_or_insert_with(|| e.clone());
                }
            }
        }
        for b in ok.iter().flat_map(|p| &p.backend_services) {
            let ports = backends
                .entry((b.namespace.clone(), b.name.clone()))
                .or_default();
            ports.extend(b.number.iter().cloned());
        }
        spec.backend_services = backends
            .into_iter()
            .map(|((namespace, name), mut number)| {
                number.sort();
                number.dedup();
                BackendService {
                    name,
                    namespace,
                    number,
                }
            })
            .collect();
        let decoded_at = started.elapsed();
        let decoded = match failed {
            Some(e) => Err(e),
            None => assemble(head_key, &ok).map(Arc::new),
        };
        tracing::debug!(
            cec = %head_key,
            parts = ok.len(),
            decoded = fresh,
            decode_ms = decoded_at.as_secs_f64() * 1e3,
            total_ms = started.elapsed().as_secs_f64() * 1e3,
            "shared CEC joined"
        );
        Joined {
            rv,
            spec: Arc::new(spec),
            decoded: Some(decoded),
        }
    }
}

fn part_key(head: &ObjectKey, c: &CiliumEnvoyConfig) -> ObjectKey {
    ObjectKey::new(
        Kind::CiliumEnvoyConfig,
        &head.namespace,
        c.metadata.name.as_deref().unwrap_or_default(),
    )
}

/// Decode one part: resources to protobuf, route fragments to their
/// virtual-host entries with their orders.
fn decode_part(key: &ObjectKey, c: &CiliumEnvoyConfig) -> Result<Part, CecError> {
    let object = key.to_string();
    let err = |field: String, message: String| CecError {
        object: object.clone(),
        field,
        message,
    };
    let mut part = Part {
        resources: Vec::new(),
        entries: Vec::new(),
        backend_services: c.spec.config.backend_services.clone(),
    };
    for (i, raw) in c.spec.config.resources.iter().enumerate() {
        let field = format!("spec.resources[{i}]");
        let name = raw["name"].as_str().unwrap_or_default();
        let fragment = membrane_ingress::ROUTE_CONFIGURATION_TYPE == raw["@type"]
            && name.contains(FRAGMENT_SEP);
        if !fragment {
            let any = membrane_xds::codec::any_from_json(raw)
                .map_err(|e| err(field.clone(), e.to_string()))?;
            part.resources.push((name.to_owned(), any));
            continue;
        }
        let base = name
            .rsplit_once(FRAGMENT_SEP)
            .map(|(b, _)| b.to_owned())
            .unwrap_or_default();
        // The orders come out before decoding: they are not Envoy fields.
        let mut stripped = raw.clone();
        let mut orders = Vec::new();
        if let Some(vhosts) = stripped
            .get_mut("virtualHosts")
            .and_then(|v| v.as_array_mut())
        {
            for (j, vh) in vhosts.iter_mut().enumerate() {
                let at = format!("{field}.virtualHosts[{j}].{ORDER_FIELD}");
                let order = vh
                    .as_object_mut()
                    .and_then(|o| o.remove(ORDER_FIELD))
                    .ok_or_else(|| err(at.clone(), "missing".to_owned()))?;
                let order =
                    RouteOrder::deserialize(&order).map_err(|e| err(at.clone(), e.to_string()))?;
                orders.push(order);
            }
        }
        let any = membrane_xds::codec::any_from_json(&stripped)
            .map_err(|e| err(field.clone(), e.to_string()))?;
        let rc = RouteConfiguration::decode(any.value.as_slice())
            .map_err(|e| err(field.clone(), e.to_string()))?;
        for (j, (vhost, order)) in rc.virtual_hosts.into_iter().zip(orders).enumerate() {
            if order.ranks.len() != vhost.routes.len() {
                return Err(err(
                    format!("{field}.virtualHosts[{j}].{ORDER_FIELD}.ranks"),
                    format!(
                        "{} ranks for {} routes",
                        order.ranks.len(),
                        vhost.routes.len()
                    ),
                ));
            }
            part.entries.push(Entry {
                base: base.clone(),
                vhost,
                order,
            });
        }
    }
    Ok(part)
}

/// The joined resources: the first part's, its route configurations with
/// every part's virtual hosts, then the other parts' resources by name
/// (a cluster several parts carry, once).
fn assemble(head_key: &ObjectKey, parts: &[&Part]) -> Result<Assembled, CecError> {
    let err = |field: String, message: String| CecError {
        object: head_key.to_string(),
        field,
        message,
    };
    let mut by_base: HashMap<&str, BTreeMap<&str, Vec<&Entry>>> = HashMap::new();
    for e in parts.iter().flat_map(|p| &p.entries) {
        by_base
            .entry(&e.base)
            .or_default()
            .entry(&e.vhost.name)
            .or_default()
            .push(e);
    }
    let Some((head, others)) = parts.split_first() else {
        return Err(err("spec".to_owned(), "no parts".to_owned()));
    };
    let mut resources = Vec::new();
    for (i, (name, any)) in head.resources.iter().enumerate() {
        let Some(vhosts) = (any.type_url == RouteConfiguration::type_url())
            .then(|| by_base.remove(name.as_str()))
            .flatten()
        else {
            resources.push(Decoded::Packed(any.clone()));
            continue;
        };
        let field = format!("spec.resources[{i}]");
        let mut rc = RouteConfiguration::decode(any.value.as_slice())
            .map_err(|e| err(field.clone(), e.to_string()))?;
        rc.virtual_hosts = vhosts.into_values().map(merge_vhost).collect();
        resources.push(Decoded::Route(Box::new(rc)));
    }
    if let Some(base) = by_base.keys().next() {
        return Err(err(
            "spec.resources".to_owned(),
            format!(
                "route fragments name route configuration {base}, which the first part does not define"
            ),
        ));
    }
    let mut rest: Vec<&(String, Any)> = others.iter().flat_map(|p| &p.resources).collect();
    rest.sort_by(|a, b| a.0.cmp(&b.0));
    rest.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
    let defines_legacy_admin = head
        .resources
        .iter()
        .chain(rest.iter().copied())
        .any(|(n, a)| n == LEGACY_ADMIN_CLUSTER && a.type_url == Cluster::type_url());
    resources.extend(rest.into_iter().map(|(_, a)| Decoded::Packed(a.clone())));
    Ok(Assembled {
        resources,
        defines_legacy_admin,
    })
}

/// One virtual host from its entries: routes by rank, then their
/// Ingress's age and place; a route with the same match as an earlier one
/// is dropped, as the whole CEC's route ordering does.
fn merge_vhost(entries: Vec<&Entry>) -> VirtualHost {
    let mut routes: Vec<_> = entries
        .iter()
        .flat_map(|e| {
            e.vhost
                .routes
                .iter()
                .enumerate()
                .filter_map(|(i, r)| Some((e.order.key(i)?, r)))
        })
        .collect();
    routes.sort_by(|a, b| a.0.cmp(&b.0));
    let mut seen = HashSet::new();
    let routes = routes
        .into_iter()
        .filter(|(_, r)| seen.insert(r.r#match.as_ref().map(Message::encode_to_vec)))
        .map(|(_, r)| r.clone())
        .collect();
    let mut vhost = entries.first().map(|e| e.vhost.clone()).unwrap_or_default();
    vhost.routes = routes;
    vhost
}
