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

use membrane_crds::{
    BackendService, CiliumEnvoyConfig, CiliumEnvoyConfigSpec, EnvoyConfigSpec, EnvoyResource,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::conflicts::{Conflicts, Id};
use crate::envoy::{self, ROUTE_CONFIGURATION_TYPE};
use crate::model::{Backend, Model, PassthroughChain, TlsChain, VirtualHost, route_rank};
use crate::names::{INSECURE_ROUTE_NAME, SECURE_ROUTE_NAME};
use crate::shared::{
    FRAGMENT_SEP, SharedPart, SharedTranslation, SplitError, age_key, assemble_model,
    is_route_config, json_len, part_meta, shared_cec, shared_translation,
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

/// Hosts, TLS and passthrough chains of the merged parts, counted, so the
/// first part (which has no routes) follows a change without a merge.
#[derive(Debug, Default)]
struct Hosts {
    insecure: BTreeMap<String, usize>,
    secure: BTreeMap<String, usize>,
    /// Per Secret: chains, and how many name each host.
    tls: BTreeMap<(String, String), (usize, BTreeMap<String, usize>)>,
    passthrough: BTreeMap<Backend, (usize, BTreeMap<String, usize>)>,
}

fn count(map: &mut BTreeMap<String, usize>, key: &str, add: bool) {
    if add {
        *map.entry(key.to_owned()).or_default() += 1;
    } else if let Some(n) = map.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(key);
        }
    }
}

fn count_chain<K: Ord>(
    map: &mut BTreeMap<K, (usize, BTreeMap<String, usize>)>,
    key: K,
    hosts: &[String],
    add: bool,
) {
    let entry = map.entry(key);
    if !add && matches!(entry, std::collections::btree_map::Entry::Vacant(_)) {
        return;
    }
    let (chains, names) = entry.or_default();
    for h in hosts {
        count(names, h, add);
    }
    if add {
        *chains += 1;
    } else {
        *chains = chains.saturating_sub(1);
    }
    map.retain(|_, (n, _)| *n > 0);
}

impl Hosts {
    fn apply(&mut self, p: &SharedPart, add: bool) {
        for vh in &p.model.insecure {
            count(&mut self.insecure, &vh.host, add);
        }
        for vh in &p.model.secure {
            count(&mut self.secure, &vh.host, add);
        }
        for c in &p.model.tls {
            let key = (c.secret_namespace.clone(), c.secret_name.clone());
            count_chain(&mut self.tls, key, &c.server_names, add);
        }
        for c in &p.model.passthrough {
            count_chain(
                &mut self.passthrough,
                c.backend.clone(),
                &c.server_names,
                add,
            );
        }
    }

    /// The merged model of the parts counted, without routes or backends:
    /// what the first part is rendered from.
    fn model(&self, opts: &TranslateOptions) -> Model {
        let vhosts = |m: &BTreeMap<String, usize>| -> Vec<VirtualHost> {
            m.keys()
                .map(|host| VirtualHost {
                    host: host.clone(),
                    routes: Vec::new(),
                })
                .collect()
        };
        Model {
            namespace: opts.shared_namespace.clone(),
            name: opts.shared_service_name.clone(),
            insecure: vhosts(&self.insecure),
            secure: vhosts(&self.secure),
            tls: self
                .tls
                .iter()
                .map(|((ns, name), (_, hosts))| TlsChain {
                    secret_namespace: ns.clone(),
                    secret_name: name.clone(),
                    server_names: hosts.keys().cloned().collect(),
                })
                .collect(),
            tls_fields: BTreeMap::new(),
            backends: BTreeMap::new(),
            settings: Default::default(),
            passthrough: self
                .passthrough
                .iter()
                .map(|(backend, (_, hosts))| PassthroughChain {
                    backend: backend.clone(),
                    server_names: hosts.keys().cloned().collect(),
                })
                .collect(),
            passthrough_fields: BTreeMap::new(),
        }
    }
}

/// The shared CEC kept rendered per Ingress between changes, with the
/// merge's conflict outcomes: a change costs the Ingresses it touches.
/// Pure: the caller writes what it returns.
#[derive(Debug, Default)]
pub struct SharedLayout {
    conflicts: Conflicts,
    /// Hosts of the included parts.
    hosts: Hosts,
    /// Per included Ingress, its rendered share.
    chunks: HashMap<Id, Chunk>,
    /// Sum of the chunks' bytes.
    total: usize,
    part_of: HashMap<Id, usize>,
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

    /// Nothing held: the next render must be given every part.
    pub fn is_empty(&self) -> bool {
        self.conflicts.is_empty()
    }

    /// Merges `parts` (see [`crate::merge_shared_preferring`]) and lays
    /// the shared CEC out in objects of at most `max_bytes`: one object
    /// when it fits, else a first part and parts by Ingress. Compares every
    /// part with the one held; [`Self::render_changes`] is given only the
    /// changes.
    pub fn render<'a>(
        &mut self,
        parts: impl IntoIterator<Item = &'a SharedPart>,
        serving: &BTreeSet<(String, String)>,
        opts: &TranslateOptions,
        max_bytes: usize,
    ) -> Result<LayoutOutput, SplitError> {
        let given: HashMap<Id, &SharedPart> = parts
            .into_iter()
            .map(|p| ((p.namespace.clone(), p.name.clone()), p))
            .collect();
        let gone: Vec<Id> = self
            .conflicts
            .ids()
            .filter(|id| !given.contains_key(*id))
            .cloned()
            .collect();
        let changes = given
            .into_iter()
            .map(|(id, p)| (id, Some(p)))
            .chain(gone.into_iter().map(|id| (id, None)));
        self.render_changes(changes, serving, opts, max_bytes)
    }

    /// [`Self::render`] given only what changed since the last call: a
    /// part, or `None` for an Ingress no longer shared (unchanged parts may
    /// be given too). `serving` must be the last call's
    /// `translation.included` (any set for the first call).
    pub fn render_changes<'a>(
        &mut self,
        changes: impl IntoIterator<Item = (Id, Option<&'a SharedPart>)>,
        serving: &BTreeSet<(String, String)>,
        opts: &TranslateOptions,
        max_bytes: usize,
    ) -> Result<LayoutOutput, SplitError> {
        let name = opts.shared_service_name.clone();
        let id = format!("{}/{name}", opts.shared_namespace);

        // Refresh the rendered chunks: only Ingresses whose included part
        // changed.
        let mut changed: HashSet<IngressOrder> = HashSet::new();
        for key in self.conflicts.update(changes, serving) {
            let now = self.conflicts.included(&key);
            match (now, self.chunks.get(&key)) {
                (Some(p), Some(c)) if c.part == *p => continue,
                (None, None) => continue,
                _ => {}
            }
            if let Some(old) = self.chunks.remove(&key) {
                self.total = self.total.saturating_sub(old.bytes);
                self.hosts.apply(&old.part, false);
                let at = if now.is_some() {
                    self.part_of.get(&key).copied()
                } else {
                    self.part_of.remove(&key)
                };
                if let Some(part) = at.and_then(|k| self.parts.get_mut(&k)) {
                    part.members.remove(&old.order);
                    part.bytes = part.bytes.saturating_sub(old.bytes);
                    part.dirty = true;
                }
            }
            let Some(p) = now else { continue };
            let chunk = Chunk::render(p, &id)?;
            changed.insert(chunk.order.clone());
            self.total += chunk.bytes;
            self.hosts.apply(p, true);
            if let Some(part) = self.part_of.get(&key).and_then(|k| self.parts.get_mut(k)) {
                part.members.insert(chunk.order.clone());
                part.bytes += chunk.bytes;
                part.dirty = true;
            }
            self.chunks.insert(key, chunk);
        }

        // Small enough for one object: the whole CEC, as Cilium writes it.
        if self.total < max_bytes {
            let mut included: Vec<&SharedPart> = self.chunks.values().map(|c| &c.part).collect();
            included.sort_by(|a, b| age_key(a).cmp(&age_key(b)));
            let cec = shared_cec(&assemble_model(&included, opts), opts);
            if json_len(&cec, &id)? <= max_bytes {
                self.part_of.clear();
                self.parts.clear();
                let head_changed = !same(self.head.as_ref(), &cec);
                self.head = Some(cec.clone());
                return Ok(LayoutOutput {
                    translation: self.translation(cec, opts),
                    head_changed,
                    parts: Vec::new(),
                    names: BTreeSet::from([name]),
                });
            }
        }

        // The first part: the listener and the route configurations
        // without virtual hosts, rendered from the hosts without routes.
        let mut head = shared_cec(&self.hosts.model(opts), opts);
        for r in &mut head.spec.config.resources {
            let mut v = r.to_value();
            if is_route_config(&v) {
                v["virtualHosts"] = Value::Array(Vec::new());
                *r = v.into();
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
            translation: self.translation(head, opts),
            head_changed,
            parts: out_parts,
            names,
        })
    }

    /// The shared objects around `cec`, with the merge's outcome.
    fn translation(&self, cec: CiliumEnvoyConfig, opts: &TranslateOptions) -> SharedTranslation {
        shared_translation(
            cec,
            opts,
            self.conflicts.included_ids(),
            self.conflicts.rejections(),
        )
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
            resources.push(EnvoyResource::from(json!({
                "@type": ROUTE_CONFIGURATION_TYPE,
                "name": format!("{rc}{FRAGMENT_SEP}{k}"),
                "virtualHosts": entries,
            })));
        }
        resources.extend(clusters.into_iter().map(EnvoyResource::from));
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
            let r = r.to_value();
            let name = r["name"].as_str().unwrap_or_default();
            let Some((base, _)) = name
                .rsplit_once(FRAGMENT_SEP)
                .filter(|_| is_route_config(&r))
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
    for res in &mut spec.resources {
        let mut r = res.to_value();
        let name = r["name"].as_str().unwrap_or_default().to_owned();
        let Some(hosts) = by_base.remove(&name).filter(|_| is_route_config(&r)) else {
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
        *res = r.into();
    }
    spec.resources
        .extend(rest.into_values().map(EnvoyResource::from));
    spec.backend_services = backend_services(&backends).collect();
    Some(out)
}
