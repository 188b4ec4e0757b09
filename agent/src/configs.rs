//! The config pipeline: all CECs/CCECs in the store (including the ones the
//! Ingress controller generated) → one consistent set of Envoy resources.
//!
//! Each CEC is decoded once per resourceVersion. A CEC that fails is
//! rejected whole; its last good version keeps serving and no other CEC is
//! affected. Conflicts between CECs (same listener address, same resource
//! name) are settled first come, first served: the older object keeps it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use membrane_crds::EnvoyConfigSpec;
use membrane_store::{Kind, Object, ObjectKey, StoreSnapshot};
use membrane_xds::codec::type_url;

use crate::cec::{ParsedCec, parse_cec};
use crate::endpoints::load_assignments;
use crate::envoy_pb::*;
use crate::placement::{PortMap, bound_addresses, collides, frontends, place};
use crate::ports::ProxyPorts;
use crate::secrets::tls_secrets;

/// One Envoy resource ready for the snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct Built {
    pub type_url: &'static str,
    pub name: String,
    pub body: Any,
}

/// Result of one pass.
#[derive(Debug, Default)]
pub struct ConfigPass {
    pub resources: Vec<Built>,
    /// CECs/CCECs (and Secrets) that were rejected, with why.
    pub rejected: BTreeMap<ObjectKey, String>,
    /// For every CEC that serves: the `(type_url, name)` of its listeners,
    /// routes and clusters — what must be ACKed before it counts as served.
    pub served: BTreeMap<ObjectKey, Vec<(&'static str, String)>>,
}

struct Cached {
    resource_version: String,
    result: Result<ParsedCec, String>,
}

/// Long-lived state of the pipeline.
pub struct ConfigPipeline {
    ports: PortMap,
    node_labels: BTreeMap<String, String>,
    proxy_ports: ProxyPorts,
    parsed: HashMap<ObjectKey, Cached>,
    last_good: HashMap<ObjectKey, ParsedCec>,
    /// The version of each CEC Envoy last ACKed in full.
    acked_good: HashMap<ObjectKey, ParsedCec>,
    /// What each CEC served in the latest pass: its resourceVersion, whether
    /// that is a fallback to the ACKed version, and the content.
    serving: HashMap<ObjectKey, (String, bool, ParsedCec)>,
    /// CEC versions Envoy rejected: resourceVersion and why.
    quarantined: HashMap<ObjectKey, (String, String)>,
}

impl ConfigPipeline {
    pub fn new(ports: PortMap, node_labels: BTreeMap<String, String>) -> Self {
        Self {
            ports,
            node_labels,
            proxy_ports: ProxyPorts::new(10000..=20000),
            parsed: HashMap::new(),
            last_good: HashMap::new(),
            acked_good: HashMap::new(),
            serving: HashMap::new(),
            quarantined: HashMap::new(),
        }
    }

    /// Envoy ACKed everything `key` served in the latest pass: that version
    /// becomes the one to fall back to if a later version is NACKed.
    pub fn mark_acked(&mut self, key: &ObjectKey) {
        if let Some((_, _, parsed)) = self.serving.get(key) {
            self.acked_good.insert(key.clone(), parsed.clone());
        }
    }

    /// Envoy rejected what `key` serves now: quarantine that version until
    /// the object changes. Returns false when it was already quarantined.
    pub fn quarantine(&mut self, key: &ObjectKey, reason: String) -> bool {
        let Some((rv, reverted, _)) = self.serving.get(key) else {
            return false;
        };
        if *reverted {
            // Already serving the ACKed fallback; nothing newer to blame.
            return false;
        }
        if self.quarantined.get(key).is_some_and(|(q, _)| q == rv) {
            return false;
        }
        self.quarantined.insert(key.clone(), (rv.clone(), reason));
        true
    }

    pub fn run(&mut self, snap: &StoreSnapshot) -> ConfigPass {
        let mut pass = ConfigPass::default();
        let mut configs: Vec<(ObjectKey, &EnvoyConfigSpec, String, String)> = Vec::new();
        for kind in [Kind::CiliumEnvoyConfig, Kind::CiliumClusterwideEnvoyConfig] {
            for obj in snap.list(kind, None) {
                let (spec, meta) = match obj.as_ref() {
                    Object::CiliumEnvoyConfig(c) => (&c.spec.config, &c.metadata),
                    Object::CiliumClusterwideEnvoyConfig(c) => (&c.spec.config, &c.metadata),
                    _ => continue,
                };
                let created = meta
                    .creation_timestamp
                    .as_ref()
                    .map(|t| t.0.to_string())
                    .unwrap_or_default();
                configs.push((
                    obj.key(),
                    spec,
                    meta.resource_version.clone().unwrap_or_default(),
                    created,
                ));
            }
        }
        // First come, first served on conflicts.
        configs.sort_by(|a, b| (&a.3, &a.0).cmp(&(&b.3, &b.0)));
        let live: BTreeSet<ObjectKey> = configs.iter().map(|c| c.0.clone()).collect();
        self.parsed.retain(|k, _| live.contains(k));
        self.last_good.retain(|k, _| live.contains(k));
        self.acked_good.retain(|k, _| live.contains(k));
        self.quarantined.retain(|k, _| live.contains(k));
        self.serving.clear();

        let mut names: BTreeMap<(&'static str, String), ObjectKey> = BTreeMap::new();
        let mut binds: Vec<(String, u32, ObjectKey)> = Vec::new();
        let mut live_listeners = BTreeSet::new();
        let mut eds_wanted: BTreeSet<(String, String, Vec<String>)> = BTreeSet::new();
        let mut accepted: Vec<(ObjectKey, ParsedCec)> = Vec::new();

        for (key, spec, rv, _) in &configs {
            if !selects(spec.node_selector.as_ref(), &self.node_labels) {
                continue;
            }
            let object = key.to_string();
            let fresh = match self.parsed.get(key) {
                Some(c) if &c.resource_version == rv => c.result.clone(),
                _ => {
                    let r = parse_cec(&object, &key.namespace, &key.name, spec)
                        .map_err(|e| e.to_string());
                    self.parsed.insert(
                        key.clone(),
                        Cached {
                            resource_version: rv.clone(),
                            result: r.clone(),
                        },
                    );
                    r
                }
            };
            let quarantine = self
                .quarantined
                .get(key)
                .filter(|(q, _)| q == rv)
                .map(|(_, why)| why.clone());
            let fresh = match (fresh, quarantine) {
                (_, Some(why)) => Err(format!("{object}: {why}")),
                (r, None) => r,
            };
            let nacked = self.quarantined.get(key).is_some_and(|(q, _)| q == rv);
            let mut parsed = match fresh {
                Ok(p) => {
                    self.last_good.insert(key.clone(), p.clone());
                    p
                }
                Err(e) if nacked => {
                    pass.rejected.insert(key.clone(), e);
                    match self.acked_good.get(key) {
                        Some(p) => p.clone(),
                        None => continue,
                    }
                }
                Err(e) => {
                    pass.rejected.insert(key.clone(), e);
                    match self.last_good.get(key) {
                        Some(p) => p.clone(),
                        None => continue,
                    }
                }
            };

            let fe = frontends(snap, &key.namespace, spec, &parsed, self.ports);
            let reserved: BTreeSet<u16> = binds
                .iter()
                .filter_map(|b| u16::try_from(b.1).ok())
                .collect();
            if let Err((index, why)) = place(&mut parsed, &fe, &mut self.proxy_ports, &reserved) {
                pass.rejected.insert(
                    key.clone(),
                    format!("{object}: spec.resources[{index}]: {why}"),
                );
                continue;
            }
            if let Some(msg) = self.conflict(&object, &parsed, &binds, &names) {
                pass.rejected.insert(key.clone(), msg);
                continue;
            }
            for (_, _, ip, port) in bound_addresses(&parsed) {
                binds.push((ip, port, key.clone()));
            }
            for (t, n) in resource_names(&parsed) {
                names.insert((t, n), key.clone());
            }
            for l in &parsed.listeners {
                live_listeners.insert(l.listener.name.clone());
            }
            let default_ns = &key.namespace;
            for s in &spec.backend_services {
                let ns = if s.namespace.is_empty() {
                    default_ns
                } else {
                    &s.namespace
                };
                eds_wanted.insert((ns.clone(), s.name.clone(), s.number.clone()));
            }
            for s in &spec.services {
                let ns = if s.namespace.is_empty() {
                    default_ns
                } else {
                    &s.namespace
                };
                let ports = s.ports.iter().map(u16::to_string).collect();
                eds_wanted.insert((ns.clone(), s.name.clone(), ports));
            }
            self.serving
                .insert(key.clone(), (rv.clone(), nacked, parsed.clone()));
            accepted.push((key.clone(), parsed));
        }
        self.proxy_ports.retain(&live_listeners);

        for (key, parsed) in accepted {
            let mut served = Vec::new();
            for l in parsed.listeners {
                served.push((type_url::LISTENER, l.listener.name.clone()));
                pass.resources.push(built(
                    type_url::LISTENER,
                    l.listener.name.clone(),
                    to_any(&l.listener),
                ));
            }
            for r in parsed.routes {
                served.push((type_url::ROUTE, r.name.clone()));
                pass.resources
                    .push(built(type_url::ROUTE, r.name.clone(), to_any(&r)));
            }
            for c in parsed.clusters {
                served.push((type_url::CLUSTER, c.name.clone()));
                pass.resources
                    .push(built(type_url::CLUSTER, c.name.clone(), to_any(&c)));
            }
            for e in parsed.endpoints {
                pass.resources.push(built(
                    type_url::ENDPOINT,
                    e.cluster_name.clone(),
                    to_any(&e),
                ));
            }
            for s in parsed.secrets {
                pass.resources
                    .push(built(type_url::SECRET, s.name.clone(), to_any(&s)));
            }
            pass.served.insert(key, served);
        }

        let mut eds_names: BTreeSet<String> = pass
            .resources
            .iter()
            .filter(|r| r.type_url == type_url::ENDPOINT)
            .map(|r| r.name.clone())
            .collect();
        for (ns, name, ports) in eds_wanted {
            for cla in load_assignments(snap, &ns, &name, &ports) {
                if eds_names.insert(cla.cluster_name.clone()) {
                    pass.resources.push(built(
                        type_url::ENDPOINT,
                        cla.cluster_name.clone(),
                        to_any(&cla),
                    ));
                }
            }
        }

        let (secrets, bad) = tls_secrets(snap);
        let mut secret_names: BTreeSet<String> = pass
            .resources
            .iter()
            .filter(|r| r.type_url == type_url::SECRET)
            .map(|r| r.name.clone())
            .collect();
        for s in secrets {
            if secret_names.insert(s.name.clone()) {
                pass.resources
                    .push(built(type_url::SECRET, s.name.clone(), to_any(&s)));
            }
        }
        for b in bad {
            let key = ObjectKey {
                kind: Kind::Secret,
                namespace: b.namespace,
                name: b.name,
            };
            let msg = format!("{key}: {}", b.reason);
            pass.rejected.insert(key, msg);
        }
        pass
    }

    fn conflict(
        &self,
        object: &str,
        parsed: &ParsedCec,
        binds: &[(String, u32, ObjectKey)],
        names: &BTreeMap<(&'static str, String), ObjectKey>,
    ) -> Option<String> {
        for (index, listener, ip, port) in bound_addresses(parsed) {
            if let Some((_, _, owner)) = binds
                .iter()
                .find(|(bip, bport, _)| collides(&ip, port, bip, *bport))
            {
                return Some(format!(
                    "{object}: spec.resources[{index}] (listener {listener}): address {ip}:{port} is already used by {owner}"
                ));
            }
        }
        for (t, n) in resource_names(parsed) {
            if let Some(owner) = names.get(&(t, n.clone())) {
                return Some(format!(
                    "{object}: spec.resources: resource {n} is already defined by {owner}"
                ));
            }
        }
        None
    }
}

fn built(type_url: &'static str, name: String, body: Any) -> Built {
    Built {
        type_url,
        name,
        body,
    }
}

fn resource_names(p: &ParsedCec) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    out.extend(
        p.listeners
            .iter()
            .map(|l| (type_url::LISTENER, l.listener.name.clone())),
    );
    out.extend(p.routes.iter().map(|r| (type_url::ROUTE, r.name.clone())));
    out.extend(
        p.clusters
            .iter()
            .map(|c| (type_url::CLUSTER, c.name.clone())),
    );
    out.extend(
        p.endpoints
            .iter()
            .map(|e| (type_url::ENDPOINT, e.cluster_name.clone())),
    );
    out.extend(p.secrets.iter().map(|s| (type_url::SECRET, s.name.clone())));
    out
}

/// Whether a node with `labels` is selected (`None` selects every node).
pub fn selects(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    let Some(sel) = selector else { return true };
    let labels_match = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let exprs_match = sel.match_expressions.iter().flatten().all(|e| {
        let values = e.values.clone().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    labels_match && exprs_match
}
