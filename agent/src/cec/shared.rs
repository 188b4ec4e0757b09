//! Split shared CECs (parts labelled `membrane.io/shared-part-of`) joined
//! back into their first part.
//!
//! Parts laid out by Ingress (the first part annotated
//! `membrane.io/shared-layout: by-ingress`, see `membrane_ingress::SharedLayout`)
//! are decoded, qualified and encoded one by one and kept per
//! resourceVersion, so a change re-decodes only the parts it touched. The
//! joined resources are assembled from the encoded pieces: the first
//! part's resources, its route configurations filled with the virtual
//! hosts of every part (by name, routes in the order their [`RouteOrder`]s
//! give), then the other parts' clusters by name. A joined route
//! configuration is built as protobuf bytes by concatenating its pieces
//! (a repeated field's encodings concatenate), exactly the bytes prost
//! gives for the assembled message, without decoding or re-encoding the
//! thousands of routes that did not change. Parts split by position
//! (`split_shared_cec`) are joined as JSON and decoded whole.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use envoy_types::pb::envoy::config::route::v3::{Route, VirtualHost};
use membrane_crds::{BackendService, CiliumEnvoyConfig, EnvoyConfigSpec};
use membrane_ingress::{
    BY_INGRESS, FRAGMENT_SEP, IngressOrder, LAYOUT_ANNOTATION, ORDER_FIELD, RouteOrder,
};
use membrane_store::{Kind, Object, ObjectKey, StoreSnapshot};
use membrane_xds::Resource;
use prost::encoding::{WireType, encode_key, encode_varint};
use prost::{Message, Name};
use serde::Deserialize;

use super::parse::{
    CecError, Decoded, Encoded, ParsedCec, ParsedListener, check_names, parse_cec, parse_resource,
    qualify_vhost,
};
use crate::envoy_pb::{Any, Cluster, ClusterDiscoveryType, DiscoveryType, RouteConfiguration};

/// A split CEC joined back.
#[derive(Debug)]
pub struct Joined {
    /// The resourceVersions of all its parts.
    pub rv: String,
    /// The joined spec. Parts laid out by Ingress leave `resources` empty:
    /// they are in `parsed`.
    pub spec: Arc<EnvoyConfigSpec>,
    /// Parts laid out by Ingress: the joined CEC decoded and qualified for
    /// the key of its first part.
    parsed: Option<(ObjectKey, Result<ParsedCec, CecError>)>,
}

impl Joined {
    /// The joined CEC decoded and qualified (see [`parse_cec`]).
    pub fn parse(&self, object: &str, namespace: &str, name: &str) -> Result<ParsedCec, CecError> {
        match &self.parsed {
            Some((key, parsed)) if key.namespace == namespace && key.name == name => parsed.clone(),
            _ => parse_cec(object, namespace, name, &self.spec),
        }
    }
}

/// One part laid out by Ingress, decoded, qualified and encoded.
#[derive(Debug, Default)]
struct Part {
    listeners: Vec<ParsedListener>,
    /// Route configurations of the first part, by the name written in it:
    /// those with virtual hosts in the parts are joined, the others served
    /// as they are.
    routes: Vec<(String, RouteConfiguration)>,
    /// Everything else.
    encoded: Vec<Encoded>,
    /// Virtual-host entries of route fragments.
    entries: Vec<Entry>,
    backend_services: Vec<BackendService>,
}

#[derive(Debug)]
struct Entry {
    /// The route configuration it belongs to, as written.
    base: String,
    host: String,
    /// The virtual host without its routes, encoded.
    shell: Arc<Shell>,
    order: Arc<IngressOrder>,
    routes: Vec<Arc<EncodedRoute>>,
}

/// A message encoded without one repeated field: the bytes before and after
/// where that field's items go (prost encodes fields in declaration order).
#[derive(Debug, PartialEq, Eq)]
struct Shell {
    before: Vec<u8>,
    after: Vec<u8>,
}

impl Shell {
    /// `vhost` around its routes (`name`, `domains`, then `routes`).
    fn virtual_host(vhost: &VirtualHost) -> Self {
        let before = VirtualHost {
            name: vhost.name.clone(),
            domains: vhost.domains.clone(),
            ..Default::default()
        };
        let after = VirtualHost {
            name: String::new(),
            domains: Vec::new(),
            routes: Vec::new(),
            ..vhost.clone()
        };
        Self {
            before: before.encode_to_vec(),
            after: after.encode_to_vec(),
        }
    }

    /// `rc` around its virtual hosts (`name`, then `virtual_hosts`).
    fn route_configuration(rc: &RouteConfiguration) -> Self {
        let before = RouteConfiguration {
            name: rc.name.clone(),
            ..Default::default()
        };
        let after = RouteConfiguration {
            name: String::new(),
            virtual_hosts: Vec::new(),
            ..rc.clone()
        };
        Self {
            before: before.encode_to_vec(),
            after: after.encode_to_vec(),
        }
    }
}

/// A route encoded as an item of `VirtualHost.routes` (key, length, bytes).
#[derive(Debug)]
struct EncodedRoute {
    rank: (u8, u32),
    framed: Vec<u8>,
    /// Its match, encoded: a later route with the same one is dropped.
    matches: Option<Vec<u8>>,
    hash: u64,
}

/// Where a route goes in its joined virtual host: rank (class, longer
/// paths first), its Ingress's age, its place in the Ingress, then the
/// part and entry it comes from.
type Slot = (u8, Reverse<u32>, Arc<IngressOrder>, usize, usize, usize);

/// One virtual host of a joined route configuration.
#[derive(Debug, Default)]
struct JoinedHost {
    routes: BTreeMap<Slot, Arc<EncodedRoute>>,
    /// The shell of every entry by part and entry: the first one's is used.
    shells: BTreeMap<(usize, usize), Arc<Shell>>,
    /// Encoded as an item of `RouteConfiguration.virtual_hosts`, and its
    /// hash; `None` when a change touched it.
    built: Option<(Arc<Vec<u8>>, u64)>,
}

/// The joined state of one split CEC, kept between passes.
#[derive(Debug, Default)]
struct Assembly {
    /// The parts it was assembled from, by their index (0: the first).
    parts: BTreeMap<usize, Arc<Part>>,
    /// Route configuration (as written) → host → its joined virtual host.
    hosts: HashMap<String, BTreeMap<String, JoinedHost>>,
}

impl Assembly {
    fn add(&mut self, k: usize, part: &Arc<Part>, add: bool) {
        for (j, e) in part.entries.iter().enumerate() {
            let host = self
                .hosts
                .entry(e.base.clone())
                .or_default()
                .entry(e.host.clone())
                .or_default();
            host.built = None;
            for (i, r) in e.routes.iter().enumerate() {
                let slot = (r.rank.0, Reverse(r.rank.1), e.order.clone(), i, k, j);
                if add {
                    host.routes.insert(slot, r.clone());
                } else {
                    host.routes.remove(&slot);
                }
            }
            if add {
                host.shells.insert((k, j), e.shell.clone());
            } else {
                host.shells.remove(&(k, j));
            }
        }
        if !add {
            for hosts in self.hosts.values_mut() {
                hosts.retain(|_, h| !h.shells.is_empty());
            }
            self.hosts.retain(|_, h| !h.is_empty());
        }
    }

    /// Takes `parts` (by index) as the parts now.
    fn update(&mut self, parts: &BTreeMap<usize, Arc<Part>>) {
        let old: Vec<(usize, Arc<Part>)> = self
            .parts
            .iter()
            .filter(|(k, p)| parts.get(k).is_none_or(|n| !Arc::ptr_eq(n, p)))
            .map(|(k, p)| (*k, p.clone()))
            .collect();
        for (k, p) in old {
            self.add(k, &p, false);
            self.parts.remove(&k);
        }
        for (k, p) in parts {
            if self.parts.contains_key(k) {
                continue;
            }
            self.add(*k, p, true);
            self.parts.insert(*k, p.clone());
        }
    }
}

/// A cached part: its version, whether it defines the legacy admin
/// cluster, and how it was qualified.
#[derive(Debug)]
struct CachedPart {
    version: String,
    defines_legacy_admin: bool,
    qualified_with: bool,
    part: Result<Arc<Part>, CecError>,
}

/// Joins split CECs, keeping decoded parts between passes.
#[derive(Debug, Default)]
pub struct SharedJoin {
    parts: HashMap<ObjectKey, CachedPart>,
    assemblies: HashMap<ObjectKey, Assembly>,
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
        let mut live_heads = HashSet::new();
        for (head_key, mut group) in groups {
            let Some(Object::CiliumEnvoyConfig(head)) = snap.get(&head_key).map(|o| o.as_ref())
            else {
                continue;
            };
            group.sort_by_key(|(k, _)| *k);
            for (_, c) in &group {
                parts.insert(part_key(&head_key, c));
            }
            // One part per index (a name like `x-01` parses as 1 too).
            group.dedup_by_key(|(k, _)| *k);
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
                live_heads.insert(head_key.clone());
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
                        parsed: None,
                    })
                }
            };
            joined.insert(head_key, j);
        }
        self.parts.retain(|k, _| live_parts.contains(k));
        self.assemblies.retain(|k, _| live_heads.contains(k));
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
        let all: Vec<(usize, ObjectKey, &CiliumEnvoyConfig)> =
            std::iter::once((0, head_key.clone(), head))
                .chain(group.iter().map(|(k, c)| (*k, part_key(head_key, c), *c)))
                .collect();
        // A cluster named `envoy-admin` anywhere changes how every part's
        // routes name the admin cluster.
        let mut legacy = false;
        for (_, key, c) in &all {
            let version = c.metadata.resource_version.as_deref().unwrap_or_default();
            legacy |= match self.parts.get(key) {
                Some(p) if p.version == version => p.defines_legacy_admin,
                _ => defines_legacy_admin(c),
            };
        }
        let mut fresh = 0;
        let mut decoded: BTreeMap<usize, Arc<Part>> = BTreeMap::new();
        let mut failed = None;
        let mut backends: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        for (k, key, c) in &all {
            let version = c.metadata.resource_version.clone().unwrap_or_default();
            let cached = self
                .parts
                .get(key)
                .filter(|p| p.version == version && p.qualified_with == legacy);
            let part = match cached {
                Some(p) => p.part.clone(),
                None => {
                    fresh += 1;
                    let part = decode_part(head_key, key, *k == 0, c, legacy).map(Arc::new);
                    self.parts.insert(
                        key.clone(),
                        CachedPart {
                            version,
                            defines_legacy_admin: defines_legacy_admin(c),
                            qualified_with: legacy,
                            part: part.clone(),
                        },
                    );
                    part
                }
            };
            match part {
                Ok(p) => {
                    for b in &p.backend_services {
                        backends
                            .entry((b.namespace.clone(), b.name.clone()))
                            .or_default()
                            .extend(b.number.iter().cloned());
                    }
                    decoded.insert(*k, p);
                }
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        let mut spec = head.spec.config.clone();
        spec.resources = Vec::new();
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
        let parsed = match failed {
            Some(e) => Err(e),
            None => {
                let assembly = self.assemblies.entry(head_key.clone()).or_default();
                assembly.update(&decoded);
                assemble(head_key, assembly)
            }
        };
        tracing::debug!(
            cec = %head_key,
            parts = all.len(),
            decoded = fresh,
            decode_ms = decoded_at.as_secs_f64() * 1e3,
            total_ms = started.elapsed().as_secs_f64() * 1e3,
            "shared CEC joined"
        );
        Joined {
            rv,
            spec: Arc::new(spec),
            parsed: Some((head_key.clone(), parsed)),
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

/// Whether the object defines a cluster named `envoy-admin` (see
/// [`super::qualify::qualify_cluster_ref`]).
fn defines_legacy_admin(c: &CiliumEnvoyConfig) -> bool {
    c.spec
        .config
        .resources
        .iter()
        .any(super::parse::is_legacy_admin)
}

/// FNV-1a: a content hash for the pieces (equal hash ⇔ equal bytes, in
/// practice), combined without hashing the joined megabytes again.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) -> &mut Self {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// Decode one part: resources to protobuf, qualified for the CEC of the
/// first part (`head_key`); route fragments to their virtual-host
/// entries, each route encoded; everything but listeners and the first
/// part's route configurations encoded.
fn decode_part(
    head_key: &ObjectKey,
    key: &ObjectKey,
    is_head: bool,
    c: &CiliumEnvoyConfig,
    legacy: bool,
) -> Result<Part, CecError> {
    let object = key.to_string();
    let (ns, name) = (head_key.namespace.as_str(), head_key.name.as_str());
    let err = |field: String, message: String| CecError {
        object: object.clone(),
        field,
        message,
    };
    let mut part = Part {
        backend_services: c.spec.config.backend_services.clone(),
        ..Part::default()
    };
    let mut parsed = ParsedCec::default();
    let mut route_names = Vec::new();
    for (i, raw) in c.spec.config.resources.iter().enumerate() {
        let field = format!("spec.resources[{i}]");
        let raw = raw.to_value();
        let local = raw["name"].as_str().unwrap_or_default();
        let fragment = membrane_ingress::ROUTE_CONFIGURATION_TYPE == raw["@type"]
            && local.contains(FRAGMENT_SEP);
        if !fragment {
            let any = membrane_xds::codec::any_from_json(&raw)
                .map_err(|e| err(field.clone(), e.to_string()))?;
            if is_head && any.type_url == RouteConfiguration::type_url() {
                route_names.push(local.to_owned());
            }
            parse_resource(
                &object,
                ns,
                name,
                legacy,
                i,
                Decoded::Packed(any),
                &mut parsed,
            )?;
            continue;
        }
        let base = local
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
        for (j, (mut vhost, order)) in rc.virtual_hosts.into_iter().zip(orders).enumerate() {
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
            qualify_vhost(ns, name, legacy, &mut vhost);
            let routes = std::mem::take(&mut vhost.routes)
                .into_iter()
                .zip(&order.ranks)
                .map(|(r, rank)| Arc::new(encode_route(&r, *rank)))
                .collect();
            part.entries.push(Entry {
                base: base.clone(),
                host: vhost.name.clone(),
                shell: Arc::new(Shell::virtual_host(&vhost)),
                order: Arc::new(order.ingress),
                routes,
            });
        }
    }
    part.listeners = parsed.listeners;
    if is_head {
        part.routes = route_names.into_iter().zip(parsed.routes).collect();
    } else {
        part.encoded
            .extend(parsed.routes.iter().map(|r| encoded(&r.name, r, None)));
    }
    for cl in &parsed.clusters {
        part.encoded.push(encoded(&cl.name, cl, eds_name(cl)));
    }
    for e in &parsed.endpoints {
        part.encoded.push(encoded(&e.cluster_name, e, None));
    }
    for s in &parsed.secrets {
        part.encoded.push(encoded(&s.name, s, None));
    }
    Ok(part)
}

fn encoded<T: Message + Name>(name: &str, msg: &T, eds_name: Option<String>) -> Encoded {
    Encoded {
        resource: Arc::new(Resource::with_name(name, membrane_xds::codec::encode(msg))),
        eds_name,
    }
}

/// The assignment an EDS cluster waits for: its service name, else its name.
fn eds_name(c: &Cluster) -> Option<String> {
    let eds = matches!(
        c.cluster_discovery_type,
        Some(ClusterDiscoveryType::Type(t)) if t == DiscoveryType::Eds as i32
    );
    eds.then(|| {
        c.eds_cluster_config
            .as_ref()
            .map(|e| e.service_name.clone())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| c.name.clone())
    })
}

fn encode_route(r: &Route, rank: (u8, u32)) -> EncodedRoute {
    let mut framed = Vec::with_capacity(r.encoded_len() + 8);
    prost::encoding::message::encode(3, r, &mut framed);
    let hash = Fnv::new().write(&framed).finish();
    EncodedRoute {
        rank,
        framed,
        matches: r.r#match.as_ref().map(Message::encode_to_vec),
        hash,
    }
}

/// The joined virtual host, as an item of `RouteConfiguration.virtual_hosts`:
/// routes by slot, a route with the same match as an earlier one dropped,
/// around the shell of the first entry.
fn build_host(host: &JoinedHost) -> (Arc<Vec<u8>>, u64) {
    let empty = Shell {
        before: Vec::new(),
        after: Vec::new(),
    };
    let shell = host.shells.values().next().map_or(&empty, |s| s.as_ref());
    let mut seen: HashSet<Option<&[u8]>> = HashSet::with_capacity(host.routes.len());
    let kept: Vec<&EncodedRoute> = host
        .routes
        .values()
        .filter(|r| seen.insert(r.matches.as_deref()))
        .map(|r| r.as_ref())
        .collect();
    let len =
        shell.before.len() + shell.after.len() + kept.iter().map(|r| r.framed.len()).sum::<usize>();
    let mut out = Vec::with_capacity(len + 16);
    encode_key(2, WireType::LengthDelimited, &mut out);
    encode_varint(len as u64, &mut out);
    out.extend_from_slice(&shell.before);
    let mut h = Fnv::new();
    h.write(&shell.before);
    for r in kept {
        out.extend_from_slice(&r.framed);
        h.write(&r.hash.to_le_bytes());
    }
    out.extend_from_slice(&shell.after);
    h.write(&shell.after);
    (Arc::new(out), h.finish())
}

/// The joined resources: the first part's, its route configurations with
/// every part's virtual hosts, then the other parts' resources by name
/// (one that several parts carry alike, once).
fn assemble(head_key: &ObjectKey, assembly: &mut Assembly) -> Result<ParsedCec, CecError> {
    let object = head_key.to_string();
    let Some(head) = assembly.parts.get(&0).cloned() else {
        return Err(CecError {
            object,
            field: "spec".to_owned(),
            message: "no first part".to_owned(),
        });
    };
    let mut out = ParsedCec::default();
    let mut joined_names = HashSet::new();
    for (local, rc) in &head.routes {
        let Some(hosts) = assembly.hosts.get_mut(local) else {
            out.routes.push(rc.clone());
            continue;
        };
        if !joined_names.insert(local.as_str()) {
            // Named twice: the names check says so.
            out.routes.push(rc.clone());
            continue;
        }
        let shell = Shell::route_configuration(rc);
        let mut h = Fnv::new();
        h.write(RouteConfiguration::type_url().as_bytes());
        h.write(&[0]).write(&shell.before);
        let mut built = Vec::with_capacity(hosts.len());
        for host in hosts.values_mut() {
            let (bytes, hash) = match &host.built {
                Some(b) => b.clone(),
                None => {
                    let b = build_host(host);
                    host.built = Some(b.clone());
                    b
                }
            };
            h.write(&hash.to_le_bytes());
            built.push(bytes);
        }
        h.write(&shell.after);
        let len =
            shell.before.len() + shell.after.len() + built.iter().map(|b| b.len()).sum::<usize>();
        let mut value = Vec::with_capacity(len);
        value.extend_from_slice(&shell.before);
        for b in &built {
            value.extend_from_slice(b);
        }
        value.extend_from_slice(&shell.after);
        out.encoded.push(Encoded {
            resource: Arc::new(Resource {
                name: rc.name.clone(),
                type_url: RouteConfiguration::type_url(),
                body: Any {
                    type_url: RouteConfiguration::type_url(),
                    value,
                },
                hash: h.finish(),
            }),
            eds_name: None,
        });
    }
    if let Some(base) = assembly
        .hosts
        .keys()
        .find(|b| !joined_names.contains(b.as_str()))
    {
        return Err(CecError {
            object,
            field: "spec.resources".to_owned(),
            message: format!(
                "route fragments name route configuration {base}, which the first part does not define"
            ),
        });
    }
    out.listeners.extend(head.listeners.iter().cloned());
    out.encoded.extend(head.encoded.iter().cloned());
    let mut rest: Vec<&Encoded> = Vec::new();
    for p in assembly.parts.range(1..).map(|(_, p)| p) {
        out.listeners.extend(p.listeners.iter().cloned());
        rest.extend(&p.encoded);
    }
    rest.sort_by(|a, b| a.resource.name.cmp(&b.resource.name));
    rest.dedup_by(|a, b| {
        a.resource.name == b.resource.name
            && a.resource.type_url == b.resource.type_url
            && a.resource.hash == b.resource.hash
    });
    out.encoded.extend(rest.into_iter().cloned());
    check_names(&object, &out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::route::v3::{RouteMatch, route_match::PathSpecifier};

    fn route(prefix: &str) -> Route {
        Route {
            r#match: Some(RouteMatch {
                path_specifier: Some(PathSpecifier::Prefix(prefix.to_owned())),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn shells_and_framed_routes_give_prost_bytes() {
        let vhost = VirtualHost {
            name: "h".into(),
            domains: vec!["h".into(), "h:*".into()],
            routes: vec![route("/a"), route("/b")],
            require_tls: 1,
            include_request_attempt_count: true,
            ..Default::default()
        };
        let rc = RouteConfiguration {
            name: "ns/cec/listener-insecure".into(),
            virtual_hosts: vec![vhost.clone(), vhost.clone()],
            internal_only_headers: vec!["x".into()],
            validate_clusters: Some(Default::default()),
            ..Default::default()
        };
        let mut host = JoinedHost::default();
        host.shells
            .insert((0, 0), Arc::new(Shell::virtual_host(&vhost)));
        let order = Arc::new(IngressOrder(None, 0, "a".into(), "b".into()));
        for (i, r) in vhost.routes.iter().enumerate() {
            host.routes.insert(
                (2, Reverse(2), order.clone(), i, 1, 0),
                Arc::new(encode_route(r, (2, 2))),
            );
        }
        // A later route with the same match is dropped.
        host.routes.insert(
            (2, Reverse(2), order.clone(), 5, 1, 0),
            Arc::new(encode_route(&route("/a"), (2, 2))),
        );
        let (item, _) = build_host(&host);
        let shell = Shell::route_configuration(&rc);
        let mut bytes = shell.before.clone();
        bytes.extend_from_slice(&item);
        bytes.extend_from_slice(&item);
        bytes.extend_from_slice(&shell.after);
        assert_eq!(bytes, rc.encode_to_vec());
    }
}
