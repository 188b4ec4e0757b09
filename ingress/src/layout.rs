//! Writing the shared CEC in parts that follow the Ingresses.
//!
//! The shared CEC of thousands of routes is more than one object may hold
//! (etcd's request limit). When it does not fit, [`SharedLayout`] writes a
//! first part (the listener, the route configurations without virtual
//! hosts, `spec.services`) and parts that each hold the routes, clusters
//! and backend Services of a group of Ingresses. Each Ingress's share is
//! rendered once per version and kept; an Ingress stays in its part while
//! the part has room, so one Ingress change re-renders and rewrites that
//! part alone (two when it outgrows its part and moves).
//!
//! Every virtual-host entry in a part carries where its routes go among
//! the other Ingresses' ([`RouteOrder`], field [`ORDER_FIELD`]), so joining
//! the parts (the agent) gives back the route configuration the whole CEC
//! has: virtual hosts by name, routes by rank, then age of their Ingress,
//! a route shadowed by an identical match dropped.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use membrane_crds::{BackendService, CiliumEnvoyConfig, CiliumEnvoyConfigSpec, EnvoyConfigSpec};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::envoy::{self, ROUTE_CONFIGURATION_TYPE};
use crate::model::route_rank;
use crate::names::{INSECURE_ROUTE_NAME, SECURE_ROUTE_NAME};
use crate::shared::{
    FRAGMENT_SEP, SharedPart, SharedTranslation, SplitError, is_route_config, json_len,
    merge_model, part_meta, shared_cec,
};
use crate::translate::TranslateOptions;

/// Annotation on the first part of a shared CEC written by Ingress.
pub const LAYOUT_ANNOTATION: &str = "membrane.io/shared-layout";
/// Its value.
pub const BY_INGRESS: &str = "by-ingress";
/// Key of a [`RouteOrder`] on a virtual-host entry of a route fragment.
/// Not an Envoy field: the join takes it out before decoding.
pub const ORDER_FIELD: &str = "membraneOrder";

/// Where an Ingress's routes go among equal-ranked ones: creation time
/// (seconds, nanoseconds; none first), namespace, name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct IngressOrder(pub Option<i64>, pub i32, pub String, pub String);

/// Where the routes of one virtual-host entry go in the joined virtual host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteOrder {
    pub ingress: IngressOrder,
    /// Per route, in order: its class (Exact, regex, Prefix, default
    /// backend) and path length.
    pub ranks: Vec<(u8, u32)>,
}

/// The sort key of a route in a joined virtual host: class, longer paths
/// first, the Ingress's age, its position in the Ingress.
pub type RouteKey<'a> = (u8, Reverse<u32>, &'a IngressOrder, usize);

impl RouteOrder {
    /// The key of route `idx` of the entry, if the order covers it.
    pub fn key(&self, idx: usize) -> Option<RouteKey<'_>> {
        let &(class, len) = self.ranks.get(idx)?;
        Some((class, Reverse(len), &self.ingress, idx))
    }
}

/// One Ingress's share of the parts, rendered.
#[derive(Debug)]
struct Chunk {
    part: SharedPart,
    order: IngressOrder,
    /// Virtual-host entries for the insecure and the secure route
    /// configuration.
    entries: [Vec<Value>; 2],
    clusters: Vec<(String, Value)>,
    backends: BTreeMap<(String, String), BTreeSet<String>>,
    /// Serialized size, separators included.
    bytes: usize,
}

impl Chunk {
    fn render(part: &SharedPart, id: &str) -> Result<Self, SplitError> {
        let order = IngressOrder(
            part.created.as_ref().map(|t| t.0.as_second()),
            part.created.as_ref().map_or(0, |t| t.0.subsec_nanosecond()),
            part.namespace.clone(),
            part.name.clone(),
        );
        let entries = [&part.model.insecure, &part.model.secure].map(|vhosts| {
            vhosts
                .iter()
                .map(|vh| {
                    let mut v = envoy::virtual_host(vh);
                    let ranks = vh
                        .routes
                        .iter()
                        .map(|r| {
                            let (class, len) = route_rank(r);
                            (class, u32::try_from(len).unwrap_or(u32::MAX))
                        })
                        .collect();
                    let o = RouteOrder {
                        ingress: order.clone(),
                        ranks,
                    };
                    if let Some(map) = v.as_object_mut() {
                        map.insert(ORDER_FIELD.to_owned(), json!(o));
                    }
                    v
                })
                .collect::<Vec<_>>()
        });
        let clusters = envoy::clusters(&part.model.backends);
        let mut bytes = 0;
        for v in entries
            .iter()
            .flatten()
            .chain(clusters.iter().map(|(_, v)| v))
        {
            bytes += json_len(v, id)? + 1;
        }
        for b in backend_services(&part.model.backends) {
            bytes += json_len(&b, id)? + 1;
        }
        Ok(Self {
            part: part.clone(),
            order,
            entries,
            clusters,
            backends: part.model.backends.clone(),
            bytes,
        })
    }
}

fn same(a: Option<&CiliumEnvoyConfig>, b: &CiliumEnvoyConfig) -> bool {
    a.is_some_and(|a| a.metadata == b.metadata && a.spec == b.spec)
}

fn backend_services(
    backends: &BTreeMap<(String, String), BTreeSet<String>>,
) -> impl Iterator<Item = BackendService> + '_ {
    backends.iter().map(|((ns, name), ports)| BackendService {
        name: name.clone(),
        namespace: ns.clone(),
        number: ports.iter().cloned().collect(),
    })
}

/// A part beyond the first: its Ingresses and their size.
#[derive(Debug, Default)]
struct Part {
    members: BTreeSet<IngressOrder>,
    bytes: usize,
    /// Changed since it was last returned.
    dirty: bool,
}

/// What [`SharedLayout::render`] gives.
#[derive(Debug)]
pub struct LayoutOutput {
    /// The shared objects; `cec` is the whole CEC or its first part.
    pub translation: SharedTranslation,
    /// `translation.cec` differs from what the last call returned.
    pub head_changed: bool,
    /// The other parts that changed since the last call (all of them after
    /// [`SharedLayout::rewrite_all`]), to write before the first.
    pub parts: Vec<CiliumEnvoyConfig>,
    /// Names of all the objects of the shared CEC now, the first included.
    pub names: BTreeSet<String>,
}

/// The shared CEC kept rendered per Ingress between changes. Pure: the
/// caller writes what it returns.
#[derive(Debug, Default)]
pub struct SharedLayout {
    chunks: HashMap<(String, String), Chunk>,
    part_of: HashMap<(String, String), usize>,
    parts: BTreeMap<usize, Part>,
    /// The first part (or whole CEC) last returned.
    head: Option<CiliumEnvoyConfig>,
}

/// Room kept free for growth when Ingresses are placed into a part: the
/// part is only rewritten as a whole when one outgrows it.
const FILL_PERCENT: usize = 75;
/// Parts are filled to at most this when Ingresses are placed: a change
/// rewrites, and the agent decodes, one part, so smaller parts make a
/// change cheaper (10,000 routes are ~50 parts).
const FILL_BYTES: usize = 128 << 10;

impl SharedLayout {
    /// The next call returns every part as changed (an object was changed
    /// or deleted behind the writer's back).
    pub fn rewrite_all(&mut self) {
        self.head = None;
        for p in self.parts.values_mut() {
            p.dirty = true;
        }
    }

    /// The next call returns the object `name` (the first part or another)
    /// as changed.
    pub fn rewrite(&mut self, name: &str) {
        if self
            .head
            .as_ref()
            .is_some_and(|h| h.metadata.name.as_deref() == Some(name))
        {
            self.head = None;
            return;
        }
        let Some(head) = self.head.as_ref().and_then(|h| h.metadata.name.as_deref()) else {
            self.rewrite_all();
            return;
        };
        let k = name
            .strip_prefix(head)
            .and_then(|s| s.strip_prefix('-'))
            .and_then(|s| s.parse::<usize>().ok());
        match k.and_then(|k| self.parts.get_mut(&k)) {
            Some(p) => p.dirty = true,
            None => self.rewrite_all(),
        }
    }

    /// Merges `parts` (see [`crate::merge_shared_preferring`]) and lays
    /// the shared CEC out in objects of at most `max_bytes`: one object
    /// when it fits, else a first part and parts by Ingress.
    pub fn render<'a>(
        &mut self,
        parts: impl IntoIterator<Item = &'a SharedPart>,
        serving: &BTreeSet<(String, String)>,
        opts: &TranslateOptions,
        max_bytes: usize,
    ) -> Result<LayoutOutput, SplitError> {
        let mut merged = merge_model(parts, serving, opts);
        let name = opts.shared_service_name.clone();
        let id = format!("{}/{name}", opts.shared_namespace);

        // Refresh the rendered chunks: only new or changed Ingresses.
        let mut live: HashSet<(String, String)> = HashSet::new();
        let mut changed: HashSet<IngressOrder> = HashSet::new();
        for p in &merged.included {
            let key = (p.namespace.clone(), p.name.clone());
            live.insert(key.clone());
            if self.chunks.get(&key).is_some_and(|c| c.part == **p) {
                continue;
            }
            let chunk = Chunk::render(p, &id)?;
            changed.insert(chunk.order.clone());
            let old = self.chunks.remove(&key);
            if let Some(part) = self.part_of.get(&key).and_then(|k| self.parts.get_mut(k)) {
                if let Some(old) = &old {
                    part.members.remove(&old.order);
                    part.bytes = part.bytes.saturating_sub(old.bytes);
                }
                part.members.insert(chunk.order.clone());
                part.bytes += chunk.bytes;
                part.dirty = true;
            }
            self.chunks.insert(key, chunk);
        }
        let gone: Vec<(String, String)> = self
            .chunks
            .keys()
            .filter(|k| !live.contains(*k))
            .cloned()
            .collect();
        for key in gone {
            let Some(chunk) = self.chunks.remove(&key) else {
                continue;
            };
            if let Some(part) = self
                .part_of
                .remove(&key)
                .and_then(|k| self.parts.get_mut(&k))
            {
                part.members.remove(&chunk.order);
                part.bytes = part.bytes.saturating_sub(chunk.bytes);
                part.dirty = true;
            }
        }

        // Small enough for one object: the whole CEC, as Cilium writes it.
        let total: usize = self.chunks.values().map(|c| c.bytes).sum();
        if total < max_bytes {
            let cec = shared_cec(&merged.model, opts);
            if json_len(&cec, &id)? <= max_bytes {
                self.part_of.clear();
                self.parts.clear();
                let head_changed = !same(self.head.as_ref(), &cec);
                self.head = Some(cec.clone());
                return Ok(LayoutOutput {
                    translation: merged.finish(cec, opts),
                    head_changed,
                    parts: Vec::new(),
                    names: BTreeSet::from([name]),
                });
            }
        }

        // The first part: the listener and the route configurations
        // without virtual hosts, rendered from the model without routes.
        for vh in merged
            .model
            .insecure
            .iter_mut()
            .chain(merged.model.secure.iter_mut())
        {
            vh.routes.clear();
        }
        merged.model.backends.clear();
        let mut head = shared_cec(&merged.model, opts);
        for r in &mut head.spec.config.resources {
            if is_route_config(r) {
                r["virtualHosts"] = Value::Array(Vec::new());
            }
        }
        head.metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(LAYOUT_ANNOTATION.to_owned(), BY_INGRESS.to_owned());
        let head_len = json_len(&head, &id)?;
        if head_len > max_bytes {
            return Err(SplitError::TooLarge {
                cec: id,
                field: "the listener and route configurations".to_owned(),
                bytes: head_len,
                max: max_bytes,
            });
        }

        // Room for an Ingress's share in a part: the limit less an empty
        // part with both route fragments, less a margin for the names.
        let empty = self.part_object(&head, 0, &[], &[], Default::default(), Vec::new());
        let budget = max_bytes.saturating_sub(json_len(&empty, &id)? + 1024);
        let fill = (budget / 100 * FILL_PERCENT).min(FILL_BYTES);

        // Parts that outgrew the budget give up the Ingresses that grew,
        // then their newest.
        let mut unplaced: BTreeSet<IngressOrder> = BTreeSet::new();
        for part in self.parts.values_mut() {
            if part.bytes > budget {
                let grown: Vec<IngressOrder> = part
                    .members
                    .iter()
                    .filter(|o| changed.contains(*o))
                    .cloned()
                    .collect();
                for order in grown {
                    let key = (order.2.clone(), order.3.clone());
                    part.members.remove(&order);
                    part.bytes = part
                        .bytes
                        .saturating_sub(self.chunks.get(&key).map_or(0, |c| c.bytes));
                    self.part_of.remove(&key);
                    unplaced.insert(order);
                }
            }
            while part.bytes > budget {
                let Some(last) = part.members.pop_last() else {
                    break;
                };
                let key = (last.2.clone(), last.3.clone());
                part.bytes = part
                    .bytes
                    .saturating_sub(self.chunks.get(&key).map_or(0, |c| c.bytes));
                part.dirty = true;
                self.part_of.remove(&key);
                unplaced.insert(last);
            }
        }
        for (key, c) in &self.chunks {
            if !self.part_of.contains_key(key) {
                unplaced.insert(c.order.clone());
            }
        }
        for order in unplaced {
            let key = (order.2.clone(), order.3.clone());
            let bytes = self.chunks.get(&key).map_or(0, |c| c.bytes);
            if bytes > budget {
                return Err(SplitError::TooLarge {
                    cec: id,
                    field: format!("the routes and clusters of Ingress {}/{}", key.0, key.1),
                    bytes,
                    max: budget,
                });
            }
            let k = match self
                .parts
                .iter()
                .find(|(_, p)| p.bytes + bytes <= fill)
                .map(|(k, _)| *k)
            {
                Some(k) => k,
                None => (1..).find(|k| !self.parts.contains_key(k)).unwrap_or(1),
            };
            let part = self.parts.entry(k).or_default();
            part.members.insert(order);
            part.bytes += bytes;
            part.dirty = true;
            self.part_of.insert(key, k);
        }
        self.parts.retain(|_, p| !p.members.is_empty());

        let mut names = BTreeSet::from([name.clone()]);
        let mut out_parts = Vec::new();
        for (&k, part) in &self.parts {
            names.insert(format!("{name}-{k}"));
            if !part.dirty {
                continue;
            }
            let mut entries: [Vec<Value>; 2] = [Vec::new(), Vec::new()];
            let mut clusters: BTreeMap<&str, &Value> = BTreeMap::new();
            let mut backends: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
            for order in &part.members {
                let Some(c) = self.chunks.get(&(order.2.clone(), order.3.clone())) else {
                    continue;
                };
                for (to, from) in entries.iter_mut().zip(&c.entries) {
                    to.extend(from.iter().cloned());
                }
                for (n, v) in &c.clusters {
                    clusters.insert(n, v);
                }
                for (svc, ports) in &c.backends {
                    backends
                        .entry(svc.clone())
                        .or_default()
                        .extend(ports.iter().cloned());
                }
            }
            let [insecure, secure] = entries;
            let clusters: Vec<Value> = clusters.into_values().cloned().collect();
            let obj = self.part_object(&head, k, &insecure, &secure, backends, clusters);
            let len = json_len(&obj, &id)?;
            if len > max_bytes {
                return Err(SplitError::TooLarge {
                    cec: id,
                    field: format!("part {k}"),
                    bytes: len,
                    max: max_bytes,
                });
            }
            out_parts.push(obj);
        }
        for part in self.parts.values_mut() {
            part.dirty = false;
        }
        let head_changed = !same(self.head.as_ref(), &head);
        self.head = Some(head.clone());
        Ok(LayoutOutput {
            translation: merged.finish(head, opts),
            head_changed,
            parts: out_parts,
            names,
        })
    }

    /// Part `k` of the shared CEC whose first part is `head`.
    fn part_object(
        &self,
        head: &CiliumEnvoyConfig,
        k: usize,
        insecure: &[Value],
        secure: &[Value],
        backends: BTreeMap<(String, String), BTreeSet<String>>,
        clusters: Vec<Value>,
    ) -> CiliumEnvoyConfig {
        let name = head.metadata.name.clone().unwrap_or_default();
        let mut resources = Vec::new();
        for (rc, entries) in [(INSECURE_ROUTE_NAME, insecure), (SECURE_ROUTE_NAME, secure)] {
            // An empty part (k = 0) is measured with both.
            if entries.is_empty() && k != 0 {
                continue;
            }
            resources.push(json!({
                "@type": ROUTE_CONFIGURATION_TYPE,
                "name": format!("{rc}{FRAGMENT_SEP}{k}"),
                "virtualHosts": entries,
            }));
        }
        resources.extend(clusters);
        let spec = EnvoyConfigSpec {
            backend_services: backend_services(&backends).collect(),
            resources,
            node_selector: head.spec.config.node_selector.clone(),
            ..Default::default()
        };
        let mut c =
            CiliumEnvoyConfig::new(&format!("{name}-{k}"), CiliumEnvoyConfigSpec::from(spec));
        c.metadata = part_meta(head, k.max(1), &name);
        if let Some(a) = c.metadata.annotations.as_mut() {
            a.remove(LAYOUT_ANNOTATION);
        }
        c
    }
}

/// Whether `cec` is the first part of a shared CEC laid out by Ingress.
pub fn is_by_ingress(cec: &CiliumEnvoyConfig) -> bool {
    cec.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(LAYOUT_ANNOTATION))
        .is_some_and(|v| v == BY_INGRESS)
}

/// The whole CEC that [`SharedLayout`] laid out in `parts` (the first part
/// first), in JSON: what the agent's join gives, for tests and tools.
pub(crate) fn join_by_ingress(parts: &[CiliumEnvoyConfig]) -> Option<CiliumEnvoyConfig> {
    let (first, others) = parts.split_first()?;
    let mut out = first.clone();
    if let Some(a) = out.metadata.annotations.as_mut() {
        a.remove(LAYOUT_ANNOTATION);
        if a.is_empty() {
            out.metadata.annotations = None;
        }
    }
    // Virtual-host entries by route configuration and host.
    type Entries = BTreeMap<String, Vec<(RouteOrder, Value)>>;
    let mut by_base: HashMap<String, Entries> = HashMap::new();
    let mut rest: BTreeMap<String, Value> = BTreeMap::new();
    let mut backends: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for p in parts {
        for b in &p.spec.config.backend_services {
            backends
                .entry((b.namespace.clone(), b.name.clone()))
                .or_default()
                .extend(b.number.iter().cloned());
        }
    }
    for p in others {
        for r in &p.spec.config.resources {
            let name = r["name"].as_str().unwrap_or_default();
            let Some((base, _)) = name
                .rsplit_once(FRAGMENT_SEP)
                .filter(|_| is_route_config(r))
            else {
                rest.insert(name.to_owned(), r.clone());
                continue;
            };
            for vh in r["virtualHosts"].as_array().into_iter().flatten() {
                let mut vh = vh.clone();
                let order = vh
                    .as_object_mut()
                    .and_then(|o| o.remove(ORDER_FIELD))
                    .and_then(|o| RouteOrder::deserialize(&o).ok())?;
                let host = vh["name"].as_str().unwrap_or_default().to_owned();
                by_base
                    .entry(base.to_owned())
                    .or_default()
                    .entry(host)
                    .or_default()
                    .push((order, vh));
            }
        }
    }
    let spec = &mut out.spec.config;
    for r in &mut spec.resources {
        let name = r["name"].as_str().unwrap_or_default().to_owned();
        let Some(hosts) = by_base.remove(&name).filter(|_| is_route_config(r)) else {
            continue;
        };
        let vhosts: Vec<Value> = hosts
            .into_values()
            .map(|entries| {
                let mut routes: Vec<(RouteKey<'_>, &Value)> = entries
                    .iter()
                    .flat_map(|(order, vh)| {
                        vh["routes"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .enumerate()
                            .filter_map(move |(i, r)| Some((order.key(i)?, r)))
                    })
                    .collect();
                routes.sort_by(|a, b| a.0.cmp(&b.0));
                let mut seen: Vec<&Value> = Vec::new();
                let mut kept = Vec::new();
                for (_, r) in routes {
                    if seen.contains(&&r["match"]) {
                        continue;
                    }
                    seen.push(&r["match"]);
                    kept.push(r.clone());
                }
                let mut vh = entries.first().map(|(_, v)| v.clone()).unwrap_or_default();
                vh["routes"] = Value::Array(kept);
                vh
            })
            .collect();
        r["virtualHosts"] = Value::Array(vhosts);
    }
    spec.resources.extend(rest.into_values());
    spec.backend_services = backend_services(&backends).collect();
    Some(out)
}
