//! The Ingress controller: every managed dedicated-mode Ingress becomes a
//! CEC, a LoadBalancer Service and an EndpointSlice in the sink (as Cilium's
//! operator writes them to the API server); shared-mode Ingresses are merged
//! into the one shared CEC and Service; TLS Secrets are synced into the
//! secrets namespace. An Ingress that fails translation, or loses a
//! shared-mode conflict, keeps whatever it served last, so a bad edit never
//! takes down what already serves.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::networking::v1::{Ingress, IngressBackend, IngressClass};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use membrane_crds::CiliumEnvoyConfig;
use membrane_ingress::{
    HostNetwork, INGRESS_LABEL, LoadBalancerMode, Lookup, SecretRef, SharedLayout, SharedPart,
    TranslateOptions,
};
use membrane_k8s::Sink;
use membrane_store::{
    ChangeCursor, Changes, KeyChangeKind, Kind, Object, ObjectKey, Store, StoreSnapshot,
};
use sha2::{Digest, Sha256};
use tracing::warn;

const SYNCED_LABEL: &str = "membrane.io/synced-secret";
const SOURCE_ANNOTATION: &str = "membrane.io/source-secret";
/// Hash of what the controller generated, stamped on the object: the next
/// pass knows an object is still as written without waiting to read back
/// the resourceVersion of a write that may still be in flight.
pub const APPLIED_HASH_ANNOTATION: &str = "membrane.io/applied-hash";
/// The most a generated object may serialize to before it is written: etcd
/// refuses requests over 1.5 MiB and Cilium's shared CEC breaks at about
/// that size, so the shared CEC is split into parts below 1 MiB, leaving
/// room for what the API server adds (managedFields, the hash annotation,
/// owner references).
pub const PART_BUDGET: usize = membrane_ingress::MAX_OBJECT_BYTES - 64 * 1024;

/// The Ingress controller's feature flags (`membrane up --ingress-*`,
/// Cilium's `ingressController.*` Helm values).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressOptions {
    /// `--enforce-ingress-https`: redirect TLS hosts to HTTPS unless the
    /// Ingress says otherwise (`ingress.cilium.io/force-https`).
    pub enforce_https: bool,
    /// `--ingress-default-secret-namespace/-name`.
    pub default_secret: Option<SecretRef>,
    /// `--enable-ingress-proxy-protocol`.
    pub proxy_protocol: bool,
    /// `--ingress-host-network` (with its shared listener port).
    pub host_network: Option<HostNetwork>,
    /// `--ingress-lb-annotation-prefixes`.
    pub lb_annotation_prefixes: Vec<String>,
}

impl Default for IngressOptions {
    fn default() -> Self {
        let t = TranslateOptions::default();
        Self {
            enforce_https: t.enforce_https_default,
            default_secret: t.default_secret,
            proxy_protocol: t.proxy_protocol,
            host_network: t.host_network,
            lb_annotation_prefixes: t.lb_annotation_prefixes,
        }
    }
}

impl IngressOptions {
    /// `base` with these options set.
    pub fn apply(&self, base: TranslateOptions) -> TranslateOptions {
        TranslateOptions {
            enforce_https_default: self.enforce_https,
            default_secret: self.default_secret.clone(),
            proxy_protocol: self.proxy_protocol,
            host_network: self.host_network.clone(),
            lb_annotation_prefixes: self.lb_annotation_prefixes.clone(),
            ..base
        }
    }
}

struct SnapshotLookup<'a>(&'a StoreSnapshot);

impl Lookup for SnapshotLookup<'_> {
    fn service(&self, ns: &str, name: &str) -> Option<&Service> {
        self.0.get_typed::<Service>(ns, name)
    }
    fn secret(&self, ns: &str, name: &str) -> Option<&Secret> {
        self.0.get_typed::<Secret>(ns, name)
    }
}

/// Keys of a managed Ingress and the CEC generated for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedIngress {
    pub ingress: ObjectKey,
    pub cec: ObjectKey,
    pub service: ObjectKey,
}

impl ManagedIngress {
    /// A dedicated Ingress's objects: its CEC and its LB Service.
    fn dedicated(ingress: &ObjectKey, cec: ObjectKey) -> Arc<Self> {
        Arc::new(ManagedIngress {
            ingress: ingress.clone(),
            service: ObjectKey {
                kind: Kind::Service,
                namespace: ingress.namespace.clone(),
                name: membrane_ingress::names::service_name(&ingress.name),
            },
            cec,
        })
    }
}

/// Outcome of one pass.
#[derive(Debug, Default)]
pub struct IngressPass {
    /// Managed Ingresses whose generated objects exist (freshly or from the
    /// last good translation).
    /// Entries are shared between passes: an unchanged entry is the same
    /// allocation as in the pass before.
    pub managed: Vec<Arc<ManagedIngress>>,
    /// Ingresses that failed translation or validation, with why.
    pub rejected: BTreeMap<ObjectKey, String>,
}

/// The outcome of translating one Ingress, remembered across passes.
#[derive(Debug, Clone)]
enum Memo {
    /// Dedicated objects written, with the hash stamped on them (if someone
    /// else changes or deletes them, they are written again).
    Dedicated {
        managed: Arc<ManagedIngress>,
        applied: Vec<(ObjectKey, String)>,
    },
    Shared(Box<SharedPart>),
    Failed(String),
}

/// What the last shared merge read and produced.
#[derive(Debug, Clone)]
struct SharedMemo {
    applied: Vec<(ObjectKey, String)>,
    managed: Vec<Arc<ManagedIngress>>,
    conflicts: Vec<(ObjectKey, String)>,
}

/// The Secret serving each TLS entry of `ing`: its own `secretName`, else
/// the default secret. A TLS passthrough Ingress uses none.
fn tls_secrets(ing: &Ingress, default_secret: Option<&SecretRef>) -> Vec<SecretRef> {
    if membrane_ingress::is_tls_passthrough(ing) {
        return Vec::new();
    }
    let ns = ing.metadata.namespace.clone().unwrap_or_default();
    ing.spec
        .iter()
        .flat_map(|s| s.tls.iter().flatten())
        .filter_map(
            |tls| match tls.secret_name.as_deref().filter(|s| !s.is_empty()) {
                Some(name) => Some(SecretRef {
                    namespace: ns.clone(),
                    name: name.to_owned(),
                }),
                None => default_secret.cloned(),
            },
        )
        .collect()
}

/// Everything a translation reads besides the options: the Ingress itself
/// and the Services and Secrets it references, by resourceVersion.
fn fingerprint(ing: &Ingress, snap: &StoreSnapshot, default_secret: Option<&SecretRef>) -> String {
    let ns = ing.metadata.namespace.clone().unwrap_or_default();
    let rv = |kind: Kind, name: &str| {
        let key = ObjectKey {
            kind,
            namespace: ns.clone(),
            name: name.to_owned(),
        };
        snap.get(&key)
            .and_then(|o| o.meta().resource_version.clone())
            .unwrap_or_else(|| "-".into())
    };
    // The Ingress's spec (generation), annotations and labels, not its
    // resourceVersion: a status write must not cause a re-translation (in
    // Kubernetes mode that would be three needless writes per Ingress).
    let meta = &ing.metadata;
    let mut fp = match meta.generation {
        Some(g) => format!(
            "g{g} {:?} {:?}",
            meta.annotations.as_ref(),
            meta.labels.as_ref()
        ),
        None => meta.resource_version.clone().unwrap_or_default(),
    };
    for b in backends(ing) {
        if let Some(svc) = &b.service {
            fp.push_str(&format!(" s:{}@{}", svc.name, rv(Kind::Service, &svc.name)));
        }
    }
    for secret in tls_secrets(ing, default_secret) {
        let key = ObjectKey {
            kind: Kind::Secret,
            namespace: secret.namespace.clone(),
            name: secret.name.clone(),
        };
        let version = snap
            .get(&key)
            .and_then(|o| o.meta().resource_version.clone())
            .unwrap_or_else(|| "-".into());
        fp.push_str(&format!(
            " t:{}/{}@{version}",
            secret.namespace, secret.name
        ));
    }
    fp
}

/// Whether every object is (still) as the controller wrote it.
fn untouched(snap: &StoreSnapshot, applied: &[(ObjectKey, String)]) -> bool {
    applied.iter().all(|(k, hash)| {
        snap.get(k).is_some_and(|o| {
            o.meta()
                .annotations
                .as_ref()
                .and_then(|a| a.get(APPLIED_HASH_ANNOTATION))
                == Some(hash)
        })
    })
}

/// Stamp each object with the hash of its content, write them, and record
/// the hashes.
fn apply_recorded(sink: &dyn Sink, mut objects: Vec<Object>) -> Vec<(ObjectKey, String)> {
    let mut recorded = Vec::with_capacity(objects.len());
    for obj in &mut objects {
        let digest = Sha256::digest(obj.to_value().to_string());
        let hash: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
        obj.meta_mut()
            .annotations
            .get_or_insert_with(Default::default)
            .insert(APPLIED_HASH_ANNOTATION.to_owned(), hash.clone());
        recorded.push((obj.key(), hash));
    }
    sink.apply_all(objects);
    recorded
}

fn key_of(kind: Kind, meta: &ObjectMeta) -> ObjectKey {
    ObjectKey {
        kind,
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
    }
}

/// The Ingress that generated an object: its controller owner reference.
fn owner_ingress(meta: &ObjectMeta) -> Option<String> {
    meta.owner_references
        .iter()
        .flatten()
        .find(|o| o.kind == "Ingress" && o.controller == Some(true))
        .map(|o| o.name.clone())
}

/// What one Ingress contributed to the last pass, kept between passes so a
/// pass only redoes the Ingresses its changes reach.
#[derive(Debug, Clone, Default)]
struct Outcome {
    /// Its dedicated objects (fresh or last good), which garbage
    /// collection spares.
    dedicated: Option<Arc<ManagedIngress>>,
    /// Served from its last good part in the shared CEC.
    shared: bool,
    rejected: Option<String>,
    /// TLS Secrets to sync into the secrets namespace.
    secrets: Vec<SecretRef>,
}

/// Every backend an Ingress names: its default backend, then each path's.
fn backends(ing: &Ingress) -> impl Iterator<Item = &IngressBackend> {
    let spec = ing.spec.as_ref();
    spec.and_then(|s| s.default_backend.as_ref())
        .into_iter()
        .chain(
            spec.into_iter()
                .flat_map(|s| s.rules.iter().flatten())
                .flat_map(|r| r.http.iter().flat_map(|h| h.paths.iter()))
                .map(|p| &p.backend),
        )
}

/// The Services and Secrets an Ingress's translation reads.
fn references(ing: &Ingress, default_secret: Option<&SecretRef>) -> Vec<ObjectKey> {
    let ns = ing.metadata.namespace.as_deref().unwrap_or_default();
    let mut refs: Vec<ObjectKey> = backends(ing)
        .filter_map(|b| b.service.as_ref())
        .map(|s| ObjectKey::new(Kind::Service, ns, &s.name))
        .chain(
            tls_secrets(ing, default_secret)
                .into_iter()
                .map(|s| ObjectKey::new(Kind::Secret, &s.namespace, &s.name)),
        )
        .collect();
    refs.sort();
    refs.dedup();
    refs
}

/// The Ingresses a pass must reconcile, from the store's change log.
#[derive(Debug, Default)]
struct Dirty {
    /// Everything: first pass, a resync, changed options or IngressClasses.
    all: bool,
    ingresses: BTreeSet<ObjectKey>,
    /// Secrets (sources or synced copies) that changed.
    secrets: BTreeSet<ObjectKey>,
}

/// The Ingress controller, a reconciler in the kube-rs style: each pass
/// reads the store's change log from the revision it last saw and
/// reconciles only the Ingresses a change reaches (the Ingress itself, or
/// through an index the Services and Secrets it references and the objects
/// generated for it). A first pass, a resync of the log, new options or a
/// changed IngressClass (which decides what is managed) reconcile all.
///
/// It remembers the last good shared-mode part of every shared Ingress:
/// the shared CEC merges many Ingresses, so unlike in dedicated mode the
/// sink holds no per-Ingress object to fall back to.
#[derive(Debug, Default)]
pub struct IngressController {
    last_good: HashMap<ObjectKey, SharedPart>,
    /// Per Ingress: the fingerprint of everything its translation read, and
    /// what came out. An unchanged Ingress is neither re-translated nor
    /// re-applied, so one change costs one translation, not one per Ingress.
    memo: HashMap<ObjectKey, (String, Memo)>,
    /// The outputs of the last shared merge.
    shared_memo: Option<SharedMemo>,
    /// The inputs of the last shared merge: the fingerprint of every
    /// shared Ingress. Only reconciled Ingresses can change them.
    shared_inputs: HashMap<ObjectKey, String>,
    /// `(namespace, name)` of the Ingresses in the current shared CEC: they
    /// win conflicts against newcomers of the same age.
    serving: BTreeSet<(String, String)>,
    /// Largest shared CEC part written; `None` is [`PART_BUDGET`].
    part_budget: Option<usize>,
    /// The shared CEC rendered per Ingress and laid out in parts, kept
    /// between passes so a change rewrites only the parts it touches.
    layout: SharedLayout,
    /// Where the last pass read the store's change log up to.
    seen: ChangeCursor,
    /// The options of the last pass: other options redo everything.
    opts: Option<TranslateOptions>,
    /// Per managed Ingress, what it contributed.
    outcomes: BTreeMap<ObjectKey, Outcome>,
    /// Ingresses in shared mode (served from `last_good`).
    shared_keys: BTreeSet<ObjectKey>,
    /// Service or Secret → the Ingresses whose translation reads it, and
    /// back.
    referenced_by: HashMap<ObjectKey, BTreeSet<ObjectKey>>,
    references: HashMap<ObjectKey, Vec<ObjectKey>>,
    /// Ingress → the objects with it as controller owner, and back.
    owned: HashMap<ObjectKey, BTreeSet<ObjectKey>>,
    owner_of: HashMap<ObjectKey, ObjectKey>,
    /// Ingresses whose generated objects were (re)written and not yet seen
    /// back as written: reconciled on every pass until they are, as a full
    /// pass would.
    unsettled: BTreeSet<ObjectKey>,
    /// Synced Secret copy → its source and the source's resourceVersion
    /// when it was last written.
    synced: BTreeMap<(String, String), ((String, String), String)>,
}

impl IngressController {
    /// A controller that splits the shared CEC into parts of at most
    /// `bytes` (tests use a small budget instead of thousands of routes).
    pub fn with_part_budget(bytes: usize) -> Self {
        Self {
            part_budget: Some(bytes),
            ..Self::default()
        }
    }

    /// Run one reconcile pass over everything in `snap`.
    pub fn reconcile(
        &mut self,
        sink: &dyn Sink,
        snap: &StoreSnapshot,
        opts: &TranslateOptions,
    ) -> IngressPass {
        self.reconcile_changes(sink, snap, opts, &Changes::Resync)
    }

    /// Run one pass over what `store` changed since the last one.
    pub fn reconcile_store(
        &mut self,
        sink: &dyn Sink,
        store: &Store,
        opts: &TranslateOptions,
    ) -> IngressPass {
        let changes = self.seen.advance(store);
        // Taken after the log was read: it holds at least those changes
        // (later ones are read again next pass, which is harmless).
        let snap = store.snapshot();
        self.reconcile_changes(sink, &snap, opts, &changes)
    }

    /// Run one reconcile pass for `changes` (since the previous pass, with
    /// `snap` at or after them; [`Changes::Resync`]: everything).
    ///
    /// Dedicated Ingresses get their own CEC, Service and EndpointSlice;
    /// shared ones are merged into one CEC plus the shared Service in
    /// `opts.shared_namespace`. A failing Ingress keeps serving what it
    /// served last (its dedicated objects, or its last good shared part),
    /// including across a mode switch, until its new form works.
    pub fn reconcile_changes(
        &mut self,
        sink: &dyn Sink,
        snap: &StoreSnapshot,
        opts: &TranslateOptions,
        changes: &Changes,
    ) -> IngressPass {
        let started = std::time::Instant::now();
        let new_opts = self.opts.as_ref() != Some(opts);
        if new_opts {
            self.opts = Some(opts.clone());
            // Part metadata follows the options: lay out anew.
            self.layout = SharedLayout::default();
            self.shared_memo = None;
            self.shared_inputs.clear();
        }
        let mut dirty = self.dirty(snap, changes);
        dirty.all |= new_opts;
        let classes: Vec<IngressClass> = snap.typed::<IngressClass>(None).cloned().collect();
        let todo: Vec<ObjectKey> = if dirty.all {
            self.rebuild_owned(snap);
            snap.list(Kind::Ingress, None)
                .map(|o| o.key())
                .chain(self.outcomes.keys().cloned())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect()
        } else {
            dirty
                .ingresses
                .iter()
                .chain(&self.unsettled)
                .cloned()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect()
        };
        for key in &todo {
            let ing = snap.get_typed::<Ingress>(&key.namespace, &key.name);
            let outcome = match ing {
                Some(ing) if membrane_ingress::is_managed(ing, &classes) => {
                    Some(self.reconcile_one(sink, snap, opts, key, ing))
                }
                _ => None,
            };
            self.set_references(key, ing.filter(|_| outcome.is_some()), opts);
            match outcome {
                Some(o) => {
                    if o.shared {
                        self.shared_keys.insert(key.clone());
                    } else {
                        self.shared_keys.remove(key);
                        self.last_good.remove(key);
                    }
                    self.outcomes.insert(key.clone(), o);
                }
                None => {
                    self.unsettled.remove(key);
                    self.outcomes.remove(key);
                    self.shared_keys.remove(key);
                    self.last_good.remove(key);
                    self.memo.remove(key);
                }
            }
        }

        let mut pass = IngressPass::default();
        let old_conflicts: Vec<ObjectKey> = self
            .shared_memo
            .iter()
            .flat_map(|m| m.conflicts.iter().map(|(k, _)| k.clone()))
            .collect();
        let shared_keys = std::mem::take(&mut self.shared_keys);
        // Ingresses that lost a shared-mode conflict but keep their
        // dedicated objects.
        let mut keepers: BTreeSet<(String, String)> = BTreeSet::new();
        self.apply_shared(
            sink,
            snap,
            opts,
            &shared_keys,
            &todo,
            &mut pass,
            &mut keepers,
        );
        self.shared_keys = shared_keys;
        for (key, o) in &self.outcomes {
            if let Some(m) = &o.dedicated {
                pass.managed.push(m.clone());
            }
            if let Some(e) = &o.rejected {
                pass.rejected.insert(key.clone(), e.clone());
            }
        }

        // Garbage: dedicated objects whose Ingress is gone, no longer
        // ours, or has moved to the shared load balancer.
        let keeps = |ns: &str, name: &str| {
            let key = ObjectKey::new(Kind::Ingress, ns, name);
            self.outcomes
                .get(&key)
                .is_some_and(|o| o.dedicated.is_some())
                || keepers.contains(&(ns.to_owned(), name.to_owned()))
        };
        if dirty.all {
            garbage_collect(sink, snap, &keeps);
        } else {
            let reached: BTreeSet<&ObjectKey> = todo
                .iter()
                .chain(&old_conflicts)
                .chain(
                    self.shared_memo
                        .iter()
                        .flat_map(|m| m.conflicts.iter().map(|(k, _)| k)),
                )
                .collect();
            for ing in reached {
                if keeps(&ing.namespace, &ing.name) {
                    continue;
                }
                for obj in self.owned.get(ing).into_iter().flatten() {
                    sink.delete(obj);
                }
            }
        }
        let wanted = self.wanted_secrets(opts);
        self.sync_secrets(sink, snap, &wanted, opts, &dirty);
        tracing::debug!(
            full = dirty.all,
            reconciled = todo.len(),
            managed = self.outcomes.len(),
            ms = started.elapsed().as_secs_f64() * 1e3,
            "ingress controller pass"
        );
        pass
    }

    /// The Ingresses `changes` reach.
    fn dirty(&mut self, snap: &StoreSnapshot, changes: &Changes) -> Dirty {
        let mut dirty = Dirty::default();
        let Changes::Keys(keys) = changes else {
            dirty.all = true;
            return dirty;
        };
        for c in keys {
            let key = &c.key;
            match key.kind {
                // Which Ingresses are ours depends on the classes (and the
                // default class).
                Kind::IngressClass => dirty.all = true,
                // Status is neither read nor translated.
                Kind::Ingress if c.kind != KeyChangeKind::StatusUpdated => {
                    dirty.ingresses.insert(key.clone());
                }
                Kind::Service | Kind::Secret | Kind::CiliumEnvoyConfig | Kind::EndpointSlice => {
                    if let Some(by) = self.referenced_by.get(key) {
                        dirty.ingresses.extend(by.iter().cloned());
                    }
                    if key.kind == Kind::Secret {
                        dirty.secrets.insert(key.clone());
                    }
                    // Objects generated for an Ingress: written by someone
                    // else, or deleted, they are written again.
                    let owner = snap
                        .get(key)
                        .and_then(|o| owner_ingress(o.meta()))
                        .map(|name| ObjectKey::new(Kind::Ingress, &key.namespace, &name));
                    if let Some(old) = self.owner_of.remove(key) {
                        if let Some(set) = self.owned.get_mut(&old) {
                            set.remove(key);
                            if set.is_empty() {
                                self.owned.remove(&old);
                            }
                        }
                        dirty.ingresses.insert(old);
                    }
                    if let Some(owner) = owner {
                        if key.kind != Kind::Secret {
                            self.owned
                                .entry(owner.clone())
                                .or_default()
                                .insert(key.clone());
                            self.owner_of.insert(key.clone(), owner.clone());
                        }
                        dirty.ingresses.insert(owner);
                    }
                }
                _ => {}
            }
        }
        dirty
    }

    /// The owner index from scratch.
    fn rebuild_owned(&mut self, snap: &StoreSnapshot) {
        self.owned.clear();
        self.owner_of.clear();
        for kind in [Kind::CiliumEnvoyConfig, Kind::Service, Kind::EndpointSlice] {
            for o in snap.list(kind, None) {
                if let Some(name) = owner_ingress(o.meta()) {
                    let key = o.key();
                    let owner = ObjectKey::new(Kind::Ingress, &key.namespace, &name);
                    self.owned
                        .entry(owner.clone())
                        .or_default()
                        .insert(key.clone());
                    self.owner_of.insert(key, owner);
                }
            }
        }
    }

    /// Record what `ing` (now) references; `None`: nothing any more.
    fn set_references(&mut self, key: &ObjectKey, ing: Option<&Ingress>, opts: &TranslateOptions) {
        let refs = ing
            .map(|i| references(i, opts.default_secret.as_ref()))
            .unwrap_or_default();
        if self.references.get(key) == Some(&refs) {
            return;
        }
        for old in self.references.remove(key).unwrap_or_default() {
            if let Some(set) = self.referenced_by.get_mut(&old) {
                set.remove(key);
                if set.is_empty() {
                    self.referenced_by.remove(&old);
                }
            }
        }
        for r in &refs {
            self.referenced_by
                .entry(r.clone())
                .or_default()
                .insert(key.clone());
        }
        if !refs.is_empty() {
            self.references.insert(key.clone(), refs);
        }
    }

    /// Reconcile one managed Ingress: translate it unless its inputs and
    /// outputs are as the last pass left them, write what it generates.
    fn reconcile_one(
        &mut self,
        sink: &dyn Sink,
        snap: &StoreSnapshot,
        opts: &TranslateOptions,
        key: &ObjectKey,
        ing: &Ingress,
    ) -> Outcome {
        let lookup = SnapshotLookup(snap);
        let mode = membrane_ingress::loadbalancer_mode(ing, opts.default_lb_mode);
        let fp = format!(
            "{mode:?} {}",
            fingerprint(ing, snap, opts.default_secret.as_ref())
        );
        let cached = self
            .memo
            .get(key)
            .filter(|(f, m)| {
                *f == fp
                    && match m {
                        Memo::Dedicated { applied, .. } => untouched(snap, applied),
                        _ => true,
                    }
            })
            .map(|(_, m)| m.clone());
        self.unsettled.remove(key);
        let memo = match cached {
            Some(m) => m,
            None => {
                self.unsettled.insert(key.clone());
                let m = match mode {
                    Ok(LoadBalancerMode::Dedicated) => {
                        match membrane_ingress::validate_references_with(
                            ing,
                            &lookup,
                            opts.default_secret.as_ref(),
                        )
                        .and_then(|()| membrane_ingress::translate(ing, opts))
                        {
                            Ok(t) => Memo::Dedicated {
                                managed: Arc::new(ManagedIngress {
                                    ingress: key.clone(),
                                    cec: key_of(Kind::CiliumEnvoyConfig, &t.cec.metadata),
                                    service: key_of(Kind::Service, &t.service.metadata),
                                }),
                                // The CEC first: it is what the agents wait for.
                                applied: apply_recorded(
                                    sink,
                                    vec![
                                        Object::CiliumEnvoyConfig(t.cec),
                                        Object::Service(t.service),
                                        Object::EndpointSlice(t.endpoint_slice),
                                    ],
                                ),
                            },
                            Err(e) => Memo::Failed(e.to_string()),
                        }
                    }
                    Ok(LoadBalancerMode::Shared) => {
                        match membrane_ingress::validate_references_with(
                            ing,
                            &lookup,
                            opts.default_secret.as_ref(),
                        )
                        .and_then(|()| membrane_ingress::shared_part(ing, opts))
                        {
                            Ok(part) => Memo::Shared(Box::new(part)),
                            Err(e) => Memo::Failed(e.to_string()),
                        }
                    }
                    Err(e) => Memo::Failed(e.to_string()),
                };
                self.memo.insert(key.clone(), (fp, m.clone()));
                m
            }
        };
        let mut outcome = Outcome {
            secrets: tls_secrets(ing, opts.default_secret.as_ref()),
            ..Outcome::default()
        };
        match memo {
            Memo::Dedicated { managed, .. } => outcome.dedicated = Some(managed),
            Memo::Shared(part) => {
                self.last_good.insert(key.clone(), *part);
                outcome.shared = true;
            }
            Memo::Failed(e) => {
                outcome.rejected = Some(e);
                // Last good: whatever this Ingress served before stays,
                // whichever mode that was.
                if let Some(m) = self.dedicated_last_good(snap, key) {
                    outcome.dedicated = Some(m);
                } else if self.last_good.contains_key(key) {
                    outcome.shared = true;
                }
            }
        }
        outcome
    }

    /// The dedicated objects an Ingress generated earlier, if its CEC exists.
    fn dedicated_last_good(
        &self,
        snap: &StoreSnapshot,
        key: &ObjectKey,
    ) -> Option<Arc<ManagedIngress>> {
        let cec = self
            .owned
            .get(key)?
            .iter()
            .find(|k| k.kind == Kind::CiliumEnvoyConfig && snap.get(k).is_some())?
            .clone();
        Some(ManagedIngress::dedicated(key, cec))
    }

    /// Every TLS Secret a managed Ingress uses, by the name of its copy.
    fn wanted_secrets(
        &self,
        opts: &TranslateOptions,
    ) -> BTreeMap<(String, String), (String, String)> {
        self.outcomes
            .values()
            .flat_map(|o| &o.secrets)
            .map(|s| {
                (
                    (
                        opts.secrets_namespace.clone(),
                        format!("{}-{}", s.namespace, s.name),
                    ),
                    (s.namespace.clone(), s.name.clone()),
                )
            })
            .collect()
    }

    /// Copy each referenced TLS Secret to `<secrets-ns>/<ns>-<name>`, as
    /// Cilium's operator does, and remove copies nobody references any
    /// more. A copy is written again when its source or the copy changed.
    fn sync_secrets(
        &mut self,
        sink: &dyn Sink,
        snap: &StoreSnapshot,
        wanted: &BTreeMap<(String, String), (String, String)>,
        opts: &TranslateOptions,
        dirty: &Dirty,
    ) {
        let secrets_ns = opts.secrets_namespace.as_str();
        for (dst, src) in wanted {
            let (dst_ns, dst_name) = dst;
            let (src_ns, src_name) = src;
            let Some(source) = snap.get_typed::<Secret>(src_ns, src_name) else {
                self.synced.remove(dst);
                continue;
            };
            let rv = source.metadata.resource_version.clone().unwrap_or_default();
            let copy_key = ObjectKey::new(Kind::Secret, dst_ns, dst_name);
            let current = self
                .synced
                .get(dst)
                .is_some_and(|(s, r)| s == src && *r == rv)
                && !dirty.secrets.contains(&copy_key)
                && !dirty.all;
            if current {
                continue;
            }
            let copy = Secret {
                metadata: ObjectMeta {
                    namespace: Some(dst_ns.clone()),
                    name: Some(dst_name.clone()),
                    labels: Some([(SYNCED_LABEL.to_owned(), "true".to_owned())].into()),
                    annotations: Some(
                        [(SOURCE_ANNOTATION.to_owned(), format!("{src_ns}/{src_name}"))].into(),
                    ),
                    ..Default::default()
                },
                type_: source.type_.clone(),
                data: source.data.clone(),
                ..Default::default()
            };
            sink.apply_all(vec![Object::Secret(copy)]);
            self.synced.insert(dst.clone(), (src.clone(), rv));
        }
        self.synced.retain(|dst, _| wanted.contains_key(dst));
        let is_copy = |s: &Secret| {
            s.metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.contains_key(SYNCED_LABEL))
        };
        // The copies live in the secrets namespace only: a short walk.
        let stale: Vec<ObjectKey> = snap
            .typed::<Secret>(Some(secrets_ns))
            .filter(|s| is_copy(s))
            .map(|s| key_of(Kind::Secret, &s.metadata))
            .collect();
        for key in stale {
            if !wanted.contains_key(&(key.namespace.clone(), key.name.clone())) {
                sink.delete(&key);
            }
        }
    }
    /// Merge the shared parts into the shared CEC, Service and EndpointSlice,
    /// or remove those when no Ingress is in shared mode. `todo`: the
    /// Ingresses this pass reconciled, the only ones whose part can have
    /// changed.
    #[allow(clippy::too_many_arguments)]
    fn apply_shared(
        &mut self,
        sink: &dyn Sink,
        snap: &StoreSnapshot,
        opts: &TranslateOptions,
        shared_keys: &BTreeSet<ObjectKey>,
        todo: &[ObjectKey],
        pass: &mut IngressPass,
        dedicated_owners: &mut BTreeSet<(String, String)>,
    ) {
        let cec_key = ObjectKey {
            kind: Kind::CiliumEnvoyConfig,
            namespace: opts.shared_namespace.clone(),
            name: opts.shared_service_name.clone(),
        };
        let service_key = ObjectKey {
            kind: Kind::Service,
            ..cec_key.clone()
        };
        if shared_keys.is_empty() {
            self.serving.clear();
            self.shared_memo = None;
            self.shared_inputs.clear();
            self.layout = SharedLayout::default();
            delete_shared(sink, snap, opts, &cec_key);
            return;
        }
        // Unchanged inputs and untouched outputs: replay the last merge.
        let mut inputs_changed = false;
        for k in todo {
            let fp = shared_keys
                .contains(k)
                .then(|| self.memo.get(k).map(|(f, _)| f.clone()).unwrap_or_default());
            if self.shared_inputs.get(k) != fp.as_ref() {
                inputs_changed = true;
                match fp {
                    Some(fp) => self.shared_inputs.insert(k.clone(), fp),
                    None => self.shared_inputs.remove(k),
                };
            }
        }
        let memo = match self.shared_memo.take() {
            Some(m) if !inputs_changed && untouched(snap, &m.applied) => m,
            prev => self.merge_shared(
                sink,
                snap,
                opts,
                shared_keys,
                todo,
                prev,
                &cec_key,
                &service_key,
            ),
        };
        for (key, error) in &memo.conflicts {
            pass.rejected
                .entry(key.clone())
                .or_insert_with(|| error.clone());
            // Moving into shared mode onto a taken host: keep the old address.
            if let Some(m) = dedicated_last_good(snap, key) {
                pass.managed.push(m);
                dedicated_owners.insert((key.namespace.clone(), key.name.clone()));
            }
        }
        pass.managed.extend(memo.managed.iter().cloned());
        self.shared_memo = Some(memo);
    }

    /// Merge the shared parts and write what changed since `prev` (the
    /// last merge): the parts of the shared CEC whose Ingresses changed,
    /// its first part if it changed, and again whatever was changed or
    /// deleted by someone else.
    #[allow(clippy::too_many_arguments)]
    fn merge_shared(
        &mut self,
        sink: &dyn Sink,
        snap: &StoreSnapshot,
        opts: &TranslateOptions,
        shared_keys: &BTreeSet<ObjectKey>,
        todo: &[ObjectKey],
        prev: Option<SharedMemo>,
        cec_key: &ObjectKey,
        service_key: &ObjectKey,
    ) -> SharedMemo {
        // Objects changed or deleted behind our back (or whose write is
        // not seen yet) are written again; the others stay as recorded.
        // Entries of Ingresses still included are kept as they were (the
        // status writer looks again only at entries that changed).
        let mut prev_managed: BTreeMap<ObjectKey, Arc<ManagedIngress>> = prev
            .as_ref()
            .into_iter()
            .flat_map(|m| &m.managed)
            .filter(|m| &m.cec == cec_key && &m.service == service_key)
            .map(|m| (m.ingress.clone(), m.clone()))
            .collect();
        let (prev_applied, mut again): (Vec<_>, Vec<_>) = match prev {
            Some(m) => m
                .applied
                .into_iter()
                .partition(|a| untouched(snap, std::slice::from_ref(a))),
            None => {
                self.layout.rewrite_all();
                (Vec::new(), Vec::new())
            }
        };
        let fresh = prev_applied.is_empty() && again.is_empty();
        for (k, _) in &again {
            if k.kind == Kind::CiliumEnvoyConfig {
                self.layout.rewrite(&k.name);
            }
        }
        again.retain(|(k, _)| k.kind != Kind::CiliumEnvoyConfig);
        // A fresh layout is given every shared part, else what this pass
        // reconciled.
        let given: Vec<&ObjectKey> = if self.layout.is_empty() {
            shared_keys.iter().collect()
        } else {
            todo.iter().collect()
        };
        let changes = given.into_iter().map(|k| {
            let part = shared_keys
                .contains(k)
                .then(|| self.last_good.get(k))
                .flatten();
            ((k.namespace.clone(), k.name.clone()), part)
        });
        let rendered = self.layout.render_changes(
            changes,
            &self.serving,
            opts,
            self.part_budget.unwrap_or(PART_BUDGET),
        );
        let (t, head_changed, parts, names) = match rendered {
            Ok(o) => (o.translation, o.head_changed, o.parts, o.names),
            Err(e) => {
                // One Ingress or the listener alone is over the budget:
                // write the CEC whole and let the API server say no rather
                // than drop routes here.
                warn!(cec = %cec_key, error = %e, "shared CEC cannot be split");
                self.layout = SharedLayout::default();
                let t = membrane_ingress::merge_shared_preferring(
                    shared_keys.iter().filter_map(|k| self.last_good.get(k)),
                    &self.serving,
                    opts,
                );
                (t, true, Vec::new(), BTreeSet::from([cec_key.name.clone()]))
            }
        };
        self.serving = t.included.iter().cloned().collect();
        let conflicts = t
            .conflicts
            .iter()
            .map(|c| {
                let key = ObjectKey {
                    kind: Kind::Ingress,
                    namespace: c.namespace.clone(),
                    name: c.name.clone(),
                };
                (key, c.error.to_string())
            })
            .collect();
        let managed = t
            .included
            .iter()
            .map(|(namespace, name)| {
                let ingress = ObjectKey {
                    kind: Kind::Ingress,
                    namespace: namespace.clone(),
                    name: name.clone(),
                };
                prev_managed.remove(&ingress).unwrap_or_else(|| {
                    Arc::new(ManagedIngress {
                        ingress,
                        cec: cec_key.clone(),
                        service: service_key.clone(),
                    })
                })
            })
            .collect();
        // Parts beyond the first go out before it, so an agent that sees the
        // new first part finds its parts; parts no longer produced go last.
        let mut objects: Vec<Object> = parts.into_iter().map(Object::CiliumEnvoyConfig).collect();
        if head_changed || fresh {
            objects.push(Object::CiliumEnvoyConfig(t.cec));
        }
        if fresh || again.iter().any(|(k, _)| k.kind == Kind::Service) {
            objects.push(Object::Service(t.service));
        }
        if fresh || again.iter().any(|(k, _)| k.kind == Kind::EndpointSlice) {
            objects.push(Object::EndpointSlice(t.endpoint_slice));
        }
        tracing::debug!(
            cec = %cec_key,
            objects = names.len(),
            written = objects.len(),
            "shared CEC laid out"
        );
        let written = apply_recorded(sink, objects);
        // What was not written again is still as recorded last time.
        let mut applied: Vec<(ObjectKey, String)> = prev_applied
            .into_iter()
            .filter(|(k, _)| {
                !written.iter().any(|(w, _)| w == k)
                    && (k.kind != Kind::CiliumEnvoyConfig || names.contains(&k.name))
            })
            .collect();
        applied.extend(written);
        for stale in shared_parts(snap, cec_key).filter(|k| !names.contains(&k.name)) {
            sink.delete(&stale);
        }
        SharedMemo {
            applied,
            managed,
            conflicts,
        }
    }
}

/// The dedicated objects an Ingress generated earlier, if its CEC exists.
fn dedicated_last_good(snap: &StoreSnapshot, key: &ObjectKey) -> Option<Arc<ManagedIngress>> {
    let cec = generated_cec(snap, key)?;
    Some(ManagedIngress::dedicated(key, cec))
}

/// Remove the shared objects, but only if they are the ones this
/// controller writes (a CEC for the shared Service, a Service and
/// EndpointSlice labelled as Ingress load balancer), never a user's own.
fn delete_shared(
    sink: &dyn Sink,
    snap: &StoreSnapshot,
    opts: &TranslateOptions,
    cec_key: &ObjectKey,
) {
    let ours_cec =
        snap.get_typed::<CiliumEnvoyConfig>(&cec_key.namespace, &cec_key.name)
            .is_some_and(|c| {
                c.spec.services.iter().any(|s| {
                    s.name == opts.shared_service_name && s.namespace == opts.shared_namespace
                })
            });
    if ours_cec {
        for part in shared_parts(snap, cec_key) {
            sink.delete(&part);
        }
        sink.delete(cec_key);
    }
    for kind in [Kind::Service, Kind::EndpointSlice] {
        let key = ObjectKey {
            kind,
            ..cec_key.clone()
        };
        let ours = snap.get(&key).is_some_and(|o| {
            let meta = o.meta();
            meta.owner_references.as_ref().is_none_or(|o| o.is_empty())
                && meta
                    .labels
                    .as_ref()
                    .is_some_and(|l| l.get(INGRESS_LABEL).is_some_and(|v| v == "true"))
        });
        if ours {
            sink.delete(&key);
        }
    }
}

/// The parts (beyond the first) of the split CEC `head`.
fn shared_parts<'a>(
    snap: &'a StoreSnapshot,
    head: &'a ObjectKey,
) -> impl Iterator<Item = ObjectKey> + 'a {
    snap.list(Kind::CiliumEnvoyConfig, Some(&head.namespace))
        .filter(|o| membrane_ingress::shared_part_of(o.meta()) == Some(head.name.as_str()))
        .map(|o| o.key())
}

fn generated_cec(snap: &StoreSnapshot, ingress: &ObjectKey) -> Option<ObjectKey> {
    snap.list(Kind::CiliumEnvoyConfig, Some(&ingress.namespace))
        .find(|o| owner_ingress(o.meta()).as_deref() == Some(ingress.name.as_str()))
        .map(|o| o.key())
}

/// Delete dedicated objects whose Ingress is gone, no longer ours, or has
/// moved to the shared load balancer.
fn garbage_collect(sink: &dyn Sink, snap: &StoreSnapshot, keeps: &dyn Fn(&str, &str) -> bool) {
    for kind in [Kind::CiliumEnvoyConfig, Kind::Service, Kind::EndpointSlice] {
        let stale: Vec<ObjectKey> = snap
            .list(kind, None)
            .filter(|o| {
                let meta = o.meta();
                owner_ingress(meta).is_some_and(|owner| {
                    !keeps(meta.namespace.as_deref().unwrap_or_default(), &owner)
                })
            })
            .map(|o| o.key())
            .collect();
        for key in stale {
            sink.delete(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::networking::v1::Ingress;
    use membrane_k8s::StoreSink;
    use membrane_store::Store;

    fn apply_yaml<T: serde::de::DeserializeOwned>(yaml: &str) -> T {
        serde_yaml_ng::from_str(yaml).expect("valid YAML")
    }

    fn service(ns: &str, name: &str) -> Object {
        Object::Service(apply_yaml(&format!(
            "metadata: {{name: {name}, namespace: {ns}}}\nspec:\n  ports: [{{port: 80}}]\n"
        )))
    }

    fn ingress(ns: &str, name: &str, mode: &str, path: &str, svc: &str) -> Object {
        Object::Ingress(apply_yaml::<Ingress>(&format!(
            r#"
metadata:
  name: {name}
  namespace: {ns}
  annotations: {{ingress.cilium.io/loadbalancer-mode: {mode}}}
spec:
  ingressClassName: cilium
  rules:
  - host: x.com
    http:
      paths:
      - {{path: {path}, pathType: Prefix, backend: {{service: {{name: {svc}, port: {{number: 80}}}}}}}}
"#
        )))
    }

    fn key(kind: Kind, ns: &str, name: &str) -> ObjectKey {
        ObjectKey {
            kind,
            namespace: ns.into(),
            name: name.into(),
        }
    }

    /// An incremental pass, as the operator runs it.
    fn run(ctl: &mut IngressController, store: &Store) -> IngressPass {
        let opts = TranslateOptions::default();
        ctl.reconcile_store(&StoreSink(store.clone()), store, &opts)
    }

    /// Paths in the shared CEC's insecure route configuration.
    fn shared_paths(store: &Store) -> Vec<String> {
        let Some(cec) = store.get_typed::<CiliumEnvoyConfig>("kube-system", "cilium-ingress")
        else {
            return Vec::new();
        };
        route_prefixes(&cec.spec.resources)
    }

    /// The path prefixes of every route in the route configurations among
    /// `resources`.
    fn route_prefixes(resources: &[membrane_crds::EnvoyResource]) -> Vec<String> {
        let mut out = Vec::new();
        for r in resources {
            let r = r.to_value();
            for vh in r["virtualHosts"].as_array().into_iter().flatten() {
                for route in vh["routes"].as_array().into_iter().flatten() {
                    let m = &route["match"];
                    let p = m["pathSeparatedPrefix"].as_str().or(m["prefix"].as_str());
                    out.push(p.unwrap_or_default().to_owned());
                }
            }
        }
        out
    }

    fn managed_cec(pass: &IngressPass, ns: &str, name: &str) -> Option<ObjectKey> {
        pass.managed
            .iter()
            .find(|m| m.ingress == key(Kind::Ingress, ns, name))
            .map(|m| m.cec.clone())
    }

    /// The shared CEC's first part and its other parts, joined.
    fn shared_joined(store: &Store) -> Option<(usize, CiliumEnvoyConfig)> {
        let mut parts: Vec<CiliumEnvoyConfig> = store
            .snapshot()
            .typed::<CiliumEnvoyConfig>(Some("kube-system"))
            .filter(|c| {
                c.metadata.name.as_deref() == Some("cilium-ingress")
                    || membrane_ingress::shared_part_of(&c.metadata) == Some("cilium-ingress")
            })
            .cloned()
            .collect();
        parts.sort_by_key(|c| c.metadata.name.as_deref() != Some("cilium-ingress"));
        let n = parts.len();
        membrane_ingress::join_shared_cecs(&parts).map(|j| (n, j))
    }

    /// A store with Service a/s and `n` shared Ingresses a/i<k> routing
    /// `/p<k>` to it.
    fn shared_ingresses(n: usize) -> Store {
        let store = Store::new();
        store.apply(service("a", "s"));
        for i in 0..n {
            store.apply(ingress(
                "a",
                &format!("i{i}"),
                "shared",
                &format!("/p{i}"),
                "s",
            ));
        }
        store
    }

    #[test]
    fn a_large_shared_cec_is_written_in_parts_within_the_budget_and_shrinks_back() {
        const BUDGET: usize = 6 * 1024;
        let store = shared_ingresses(40);
        let mut ctl = IngressController::with_part_budget(BUDGET);
        let pass = run(&mut ctl, &store);
        assert!(pass.rejected.is_empty(), "{:?}", pass.rejected);
        let (n, joined) = shared_joined(&store).expect("parts join");
        assert!(n >= 2, "{n} parts");
        for c in store
            .snapshot()
            .typed::<CiliumEnvoyConfig>(Some("kube-system"))
        {
            let bytes = serde_json::to_vec(c).expect("json").len();
            assert!(
                bytes <= BUDGET + 256,
                "{:?}: {bytes} bytes",
                c.metadata.name
            );
        }
        let mut paths: Vec<String> = Vec::new();
        for r in &joined.spec.config.resources {
            let r = r.to_value();
            for vh in r["virtualHosts"].as_array().into_iter().flatten() {
                for route in vh["routes"].as_array().into_iter().flatten() {
                    let m = &route["match"];
                    let p = m["pathSeparatedPrefix"].as_str().or(m["prefix"].as_str());
                    paths.push(p.unwrap_or_default().to_owned());
                }
            }
        }
        for i in 0..40 {
            assert!(
                paths.contains(&format!("/p{i}")),
                "/p{i} missing: {paths:?}"
            );
        }

        // Fewer Ingresses: fewer parts, and the parts no longer needed go.
        for i in 2..40 {
            store.delete(&key(Kind::Ingress, "a", &format!("i{i}")));
        }
        run(&mut ctl, &store);
        let (n, _) = shared_joined(&store).expect("parts join");
        assert_eq!(n, 1, "two small Ingresses fit in one object");
        assert_eq!(
            store
                .snapshot()
                .typed::<CiliumEnvoyConfig>(Some("kube-system"))
                .count(),
            1
        );

        // No shared Ingress: the CEC and every part are gone.
        for i in 0..2 {
            store.delete(&key(Kind::Ingress, "a", &format!("i{i}")));
        }
        run(&mut ctl, &store);
        assert_eq!(
            store
                .snapshot()
                .typed::<CiliumEnvoyConfig>(Some("kube-system"))
                .count(),
            0
        );
    }

    /// Counts the objects written, by name, then writes them to the store.
    struct CountingSink {
        inner: StoreSink,
        writes: std::sync::Mutex<Vec<String>>,
    }

    impl Sink for CountingSink {
        fn apply_all(&self, objs: Vec<Object>) {
            if let Ok(mut w) = self.writes.lock() {
                w.extend(objs.iter().map(|o| o.key().to_string()));
            }
            self.inner.apply_all(objs);
        }
        fn delete(&self, key: &ObjectKey) {
            if let Ok(mut w) = self.writes.lock() {
                w.push(format!("delete {key}"));
            }
            self.inner.delete(key);
        }
        fn status(&self, key: &ObjectKey, status: serde_json::Value) {
            self.inner.status(key, status);
        }
        fn warn(&self, warning: membrane_k8s::Warning) {
            self.inner.warn(warning);
        }
    }

    #[test]
    fn one_shared_ingress_change_rewrites_only_its_part() {
        const BUDGET: usize = 6 * 1024;
        let store = shared_ingresses(60);
        let sink = CountingSink {
            inner: StoreSink(store.clone()),
            writes: std::sync::Mutex::new(Vec::new()),
        };
        let opts = TranslateOptions::default();
        let mut ctl = IngressController::with_part_budget(BUDGET);
        ctl.reconcile_store(&sink, &store, &opts);
        let parts = shared_joined(&store).expect("parts join").0;
        assert!(parts >= 4, "{parts} parts");
        let take = || std::mem::take(&mut *sink.writes.lock().expect("lock"));
        let first: Vec<String> = take()
            .into_iter()
            .filter(|w| w.starts_with("CiliumEnvoyConfig"))
            .collect();
        assert_eq!(
            first.len(),
            parts,
            "first pass writes every part: {first:?}"
        );

        for (k, i) in [7, 23, 41, 7].into_iter().enumerate() {
            // One more path on Ingress i.
            let Object::Ingress(mut ing) =
                ingress("a", &format!("i{i}"), "shared", &format!("/p{i}"), "s")
            else {
                panic!("an Ingress");
            };
            let rule = ing
                .spec
                .as_mut()
                .and_then(|s| s.rules.as_mut())
                .and_then(|r| r.first_mut())
                .and_then(|r| r.http.as_mut())
                .expect("a rule");
            let mut extra = rule.paths[0].clone();
            extra.path = Some(format!("/extra{k}"));
            rule.paths.push(extra);
            store.apply(Object::Ingress(ing));
            ctl.reconcile_store(&sink, &store, &opts);
            let cec_writes: Vec<String> = take()
                .into_iter()
                .filter(|w| w.contains("CiliumEnvoyConfig"))
                .collect();
            assert_eq!(cec_writes.len(), 1, "change {k}: {cec_writes:?}");
            assert!(
                !cec_writes[0].ends_with("/cilium-ingress"),
                "change {k}: the first part is not rewritten: {cec_writes:?}"
            );
            // An unrelated pass writes nothing.
            ctl.reconcile_store(&sink, &store, &opts);
            assert!(take().is_empty(), "change {k}: nothing more to write");
            assert!(
                shared_paths_joined(&store).contains(&format!("/extra{k}")),
                "change {k} is served"
            );
        }
    }

    /// Paths of the joined shared CEC.
    fn shared_paths_joined(store: &Store) -> Vec<String> {
        let Some((_, joined)) = shared_joined(store) else {
            return Vec::new();
        };
        route_prefixes(&joined.spec.config.resources)
    }

    #[test]
    fn shared_ingresses_share_the_cec_and_a_broken_one_keeps_its_last_good_part() {
        let store = Store::new();
        store.apply(service("a", "s"));
        store.apply(service("b", "s"));
        store.apply(ingress("a", "one", "shared", "/one", "s"));
        store.apply(ingress("b", "two", "shared", "/two", "s"));
        let mut ctl = IngressController::default();
        let pass = run(&mut ctl, &store);
        assert!(pass.rejected.is_empty(), "{:?}", pass.rejected);
        let shared = key(Kind::CiliumEnvoyConfig, "kube-system", "cilium-ingress");
        assert_eq!(managed_cec(&pass, "a", "one"), Some(shared.clone()));
        assert_eq!(managed_cec(&pass, "b", "two"), Some(shared.clone()));
        assert!(
            pass.managed
                .iter()
                .all(|m| m.service == key(Kind::Service, "kube-system", "cilium-ingress"))
        );
        assert!(
            store
                .get(&key(Kind::Service, "kube-system", "cilium-ingress"))
                .is_some()
        );
        assert!(
            store
                .get(&key(Kind::EndpointSlice, "kube-system", "cilium-ingress"))
                .is_some()
        );
        assert_eq!(shared_paths(&store), vec!["/one", "/two"]);

        // b/two now points at a missing Service: rejected, still served as before.
        store.apply(ingress("b", "two", "shared", "/two-new", "missing"));
        let pass = run(&mut ctl, &store);
        let why = &pass.rejected[&key(Kind::Ingress, "b", "two")];
        assert!(why.contains("Service b/missing not found"), "{why}");
        assert_eq!(managed_cec(&pass, "b", "two"), Some(shared));
        assert_eq!(shared_paths(&store), vec!["/one", "/two"]);

        // A stateless pass has no last good part: only a/one remains.
        let pass = IngressController::default().reconcile(
            &StoreSink(store.clone()),
            &store.snapshot(),
            &TranslateOptions::default(),
        );
        assert_eq!(managed_cec(&pass, "b", "two"), None);
        assert_eq!(shared_paths(&store), vec!["/one"]);

        // No shared Ingress left: the shared objects go.
        store.delete(&key(Kind::Ingress, "a", "one"));
        store.delete(&key(Kind::Ingress, "b", "two"));
        run(&mut ctl, &store);
        for kind in [Kind::CiliumEnvoyConfig, Kind::Service, Kind::EndpointSlice] {
            assert!(
                store
                    .get(&key(kind, "kube-system", "cilium-ingress"))
                    .is_none(),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn switching_modes_moves_the_ingress_and_collects_the_old_objects() {
        let store = Store::new();
        store.apply(service("a", "s"));
        store.apply(ingress("a", "one", "dedicated", "/one", "s"));
        let mut ctl = IngressController::default();
        let pass = run(&mut ctl, &store);
        let dedicated = key(Kind::CiliumEnvoyConfig, "a", "cilium-ingress-a-one");
        assert_eq!(managed_cec(&pass, "a", "one"), Some(dedicated.clone()));
        assert!(
            store
                .get(&key(
                    Kind::CiliumEnvoyConfig,
                    "kube-system",
                    "cilium-ingress"
                ))
                .is_none()
        );

        // To shared, but broken: the dedicated objects keep serving.
        store.apply(ingress("a", "one", "shared", "/one", "missing"));
        let pass = run(&mut ctl, &store);
        assert!(pass.rejected.contains_key(&key(Kind::Ingress, "a", "one")));
        assert_eq!(managed_cec(&pass, "a", "one"), Some(dedicated.clone()));
        assert!(store.get(&dedicated).is_some());

        // Fixed: moved into the shared CEC, dedicated objects collected.
        store.apply(ingress("a", "one", "shared", "/one", "s"));
        let pass = run(&mut ctl, &store);
        assert!(pass.rejected.is_empty(), "{:?}", pass.rejected);
        assert_eq!(
            managed_cec(&pass, "a", "one"),
            Some(key(
                Kind::CiliumEnvoyConfig,
                "kube-system",
                "cilium-ingress"
            ))
        );
        assert!(store.get(&dedicated).is_none());
        assert!(
            store
                .get(&key(Kind::Service, "a", "cilium-ingress-one"))
                .is_none()
        );
        assert!(
            store
                .get(&key(Kind::EndpointSlice, "a", "cilium-ingress-one"))
                .is_none()
        );

        // Back to dedicated but broken: it keeps its shared last good part.
        store.apply(ingress("a", "one", "dedicated", "/one", "missing"));
        let pass = run(&mut ctl, &store);
        assert!(pass.rejected.contains_key(&key(Kind::Ingress, "a", "one")));
        assert_eq!(
            managed_cec(&pass, "a", "one"),
            Some(key(
                Kind::CiliumEnvoyConfig,
                "kube-system",
                "cilium-ingress"
            ))
        );
        assert_eq!(shared_paths(&store), vec!["/one"]);

        // Fixed: dedicated again, and the shared objects are gone.
        store.apply(ingress("a", "one", "dedicated", "/one", "s"));
        let pass = run(&mut ctl, &store);
        assert_eq!(managed_cec(&pass, "a", "one"), Some(dedicated.clone()));
        assert!(
            store
                .get(&key(
                    Kind::CiliumEnvoyConfig,
                    "kube-system",
                    "cilium-ingress"
                ))
                .is_none()
        );

        // An invalid mode keeps what serves.
        store.apply(ingress("a", "one", "sharde", "/one", "s"));
        let pass = run(&mut ctl, &store);
        let why = &pass.rejected[&key(Kind::Ingress, "a", "one")];
        assert!(why.contains("loadbalancer-mode"), "{why}");
        assert_eq!(managed_cec(&pass, "a", "one"), Some(dedicated));
    }

    #[test]
    fn a_newcomer_claiming_a_served_path_is_rejected_and_keeps_its_dedicated_address() {
        let store = Store::new();
        store.apply(service("a", "s"));
        store.apply(service("b", "s"));
        store.apply(ingress("a", "owner", "shared", "/p", "s"));
        store.apply(ingress("b", "mover", "dedicated", "/p", "s"));
        let mut ctl = IngressController::default();
        run(&mut ctl, &store);
        // The mover switches to shared onto a path a/owner serves.
        store.apply(ingress("b", "mover", "shared", "/p", "s"));
        let pass = run(&mut ctl, &store);
        let why = &pass.rejected[&key(Kind::Ingress, "b", "mover")];
        assert!(why.contains("a/owner") && why.contains("\"/p\""), "{why}");
        assert_eq!(
            managed_cec(&pass, "b", "mover"),
            Some(key(Kind::CiliumEnvoyConfig, "b", "cilium-ingress-b-mover"))
        );
        assert!(
            store
                .get(&key(Kind::Service, "b", "cilium-ingress-mover"))
                .is_some()
        );
        assert_eq!(
            managed_cec(&pass, "a", "owner"),
            Some(key(
                Kind::CiliumEnvoyConfig,
                "kube-system",
                "cilium-ingress"
            ))
        );
    }

    #[test]
    fn default_secret_is_synced_validated_and_unsynced() {
        let store = Store::new();
        store.apply(service("a", "s"));
        store.apply(Object::Ingress(apply_yaml::<Ingress>(
            r#"
metadata: {name: web, namespace: a}
spec:
  ingressClassName: cilium
  tls: [{hosts: [x.com]}]
  rules:
  - host: x.com
    http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: s, port: {number: 80}}}}
"#,
        )));
        let opts = IngressOptions {
            default_secret: Some(SecretRef {
                namespace: "certs".into(),
                name: "default".into(),
            }),
            ..IngressOptions::default()
        }
        .apply(TranslateOptions::default());
        let mut ctl = IngressController::default();
        let copy = key(Kind::Secret, "cilium-secrets", "certs-default");

        // Missing default secret: rejected, naming it.
        let pass = ctl.reconcile(&StoreSink(store.clone()), &store.snapshot(), &opts);
        let why = &pass.rejected[&key(Kind::Ingress, "a", "web")];
        assert!(why.contains("certs/default"), "{why}");

        // Present: served, and copied into the secrets namespace for SDS.
        store.apply(Object::Secret(apply_yaml(
            "metadata: {name: default, namespace: certs}\ntype: kubernetes.io/tls\ndata: {tls.crt: Yw==, tls.key: aw==}\n",
        )));
        let pass = ctl.reconcile(&StoreSink(store.clone()), &store.snapshot(), &opts);
        assert!(pass.rejected.is_empty(), "{:?}", pass.rejected);
        assert!(store.get(&copy).is_some());

        // No Ingress needs it any more: the copy goes.
        store.delete(&key(Kind::Ingress, "a", "web"));
        ctl.reconcile_store(&StoreSink(store.clone()), &store, &opts);
        assert!(store.get(&copy).is_none());
    }

    /// A sink that writes into the store and counts what it was asked to
    /// write, by kind.
    struct Counting {
        store: Store,
        applied: std::sync::Mutex<Vec<ObjectKey>>,
        deleted: std::sync::Mutex<Vec<ObjectKey>>,
    }

    impl Counting {
        fn new(store: &Store) -> Self {
            Self {
                store: store.clone(),
                applied: Default::default(),
                deleted: Default::default(),
            }
        }
        fn take(&self) -> (Vec<ObjectKey>, Vec<ObjectKey>) {
            (
                std::mem::take(&mut *self.applied.lock().expect("lock")),
                std::mem::take(&mut *self.deleted.lock().expect("lock")),
            )
        }
    }

    impl Sink for Counting {
        fn apply_all(&self, objs: Vec<Object>) {
            self.applied
                .lock()
                .expect("lock")
                .extend(objs.iter().map(|o| o.key()));
            self.store.apply_all(objs);
        }
        fn delete(&self, key: &ObjectKey) {
            self.deleted.lock().expect("lock").push(key.clone());
            self.store.delete(key);
        }
        fn status(&self, key: &ObjectKey, status: serde_json::Value) {
            self.store.update_status(key, status);
        }
        fn warn(&self, _: membrane_k8s::Warning) {}
    }

    #[test]
    fn one_ingress_change_writes_its_objects_only() {
        let store = Store::new();
        for i in 0..50 {
            store.apply(service("a", &format!("s{i}")));
            store.apply(ingress(
                "a",
                &format!("i{i}"),
                "dedicated",
                &format!("/p{i}"),
                &format!("s{i}"),
            ));
        }
        let sink = Counting::new(&store);
        let opts = TranslateOptions::default();
        let mut ctl = IngressController::default();
        let pass = ctl.reconcile_store(&sink, &store, &opts);
        assert_eq!(pass.managed.len(), 50);
        assert_eq!(sink.take().0.len(), 150);
        // The writes come back as changes: nothing more to write.
        ctl.reconcile_store(&sink, &store, &opts);
        assert_eq!(sink.take(), (vec![], vec![]));

        store.apply(ingress("a", "i7", "dedicated", "/new", "s7"));
        let pass = ctl.reconcile_store(&sink, &store, &opts);
        assert_eq!(pass.managed.len(), 50);
        let (applied, deleted) = sink.take();
        assert_eq!(
            applied,
            vec![
                key(Kind::CiliumEnvoyConfig, "a", "cilium-ingress-a-i7"),
                key(Kind::Service, "a", "cilium-ingress-i7"),
                key(Kind::EndpointSlice, "a", "cilium-ingress-i7"),
            ]
        );
        assert!(deleted.is_empty());

        // A referenced Service reaches its Ingress through the index (the
        // translation reads the Service's version).
        store.apply(Object::Service(apply_yaml(
            "metadata: {name: s9, namespace: a, labels: {x: y}}\nspec:\n  ports: [{port: 80}]\n",
        )));
        ctl.reconcile_store(&sink, &store, &opts);
        let (applied, _) = sink.take();
        assert_eq!(applied.len(), 3, "{applied:?}");
        assert!(
            applied.iter().all(|k| k.name.ends_with("i9")),
            "{applied:?}"
        );

        // A generated object deleted behind the controller's back comes back.
        let cec = key(Kind::CiliumEnvoyConfig, "a", "cilium-ingress-a-i3");
        store.delete(&cec);
        ctl.reconcile_store(&sink, &store, &opts);
        assert!(store.get(&cec).is_some());
        assert_eq!(sink.take().0.len(), 3);

        // Removal: its objects go, nobody else's.
        store.delete(&key(Kind::Ingress, "a", "i4"));
        let pass = ctl.reconcile_store(&sink, &store, &opts);
        assert_eq!(pass.managed.len(), 49);
        let (applied, mut deleted) = sink.take();
        assert!(applied.is_empty(), "{applied:?}");
        deleted.sort();
        assert_eq!(
            deleted,
            vec![
                key(Kind::Service, "a", "cilium-ingress-i4"),
                key(Kind::EndpointSlice, "a", "cilium-ingress-i4"),
                key(Kind::CiliumEnvoyConfig, "a", "cilium-ingress-a-i4"),
            ]
            .into_iter()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
        );
    }

    #[test]
    fn class_changes_reach_every_ingress_without_a_class() {
        let store = Store::new();
        store.apply(service("a", "s"));
        let classless: Ingress = apply_yaml(
            r#"
metadata: {name: plain, namespace: a}
spec:
  rules:
  - host: y.com
    http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: s, port: {number: 80}}}}
"#,
        );
        store.apply(Object::Ingress(classless));
        store.apply(ingress("a", "classed", "dedicated", "/c", "s"));
        let mut ctl = IngressController::default();
        let pass = run(&mut ctl, &store);
        assert!(managed_cec(&pass, "a", "plain").is_none());
        assert!(managed_cec(&pass, "a", "classed").is_some());

        let class = |default: &str| {
            Object::IngressClass(apply_yaml(&format!(
                "metadata: {{name: cilium, annotations: {{ingressclass.kubernetes.io/is-default-class: \"{default}\"}}}}\nspec: {{controller: cilium.io/ingress-controller}}\n"
            )))
        };
        // `cilium` becomes the default class: the class-less Ingress is ours.
        store.apply(class("true"));
        let pass = run(&mut ctl, &store);
        let plain = key(Kind::CiliumEnvoyConfig, "a", "cilium-ingress-a-plain");
        assert_eq!(managed_cec(&pass, "a", "plain"), Some(plain.clone()));
        assert!(store.get(&plain).is_some());

        // No longer the default: it is not ours any more, its objects go.
        store.apply(class("false"));
        let pass = run(&mut ctl, &store);
        assert!(managed_cec(&pass, "a", "plain").is_none());
        assert!(store.get(&plain).is_none());
        assert!(managed_cec(&pass, "a", "classed").is_some());
    }

    /// A small deterministic generator (no extra dependency).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    /// What a pass reports and what it left in the store, comparable.
    fn outcome(pass: &IngressPass, store: &Store) -> (Vec<String>, Vec<String>, Vec<String>) {
        let mut managed: Vec<String> = pass
            .managed
            .iter()
            .map(|m| format!("{} {} {}", m.ingress, m.cec, m.service))
            .collect();
        managed.sort();
        let rejected = pass.rejected.keys().map(|k| k.to_string()).collect();
        let snap = store.snapshot();
        let mut objects = Vec::new();
        for kind in [Kind::CiliumEnvoyConfig, Kind::Service, Kind::EndpointSlice] {
            for o in snap.list(kind, None) {
                let mut v = o.to_value();
                // Store bookkeeping differs between two stores.
                if let Some(m) = v.get_mut("metadata").and_then(|m| m.as_object_mut()) {
                    for f in ["resourceVersion", "generation", "uid", "creationTimestamp"] {
                        m.remove(f);
                    }
                    // Owners' uids differ between stores, and so does the
                    // hash of what holds them.
                    if let Some(a) = m.get_mut("annotations").and_then(|a| a.as_object_mut()) {
                        a.remove(APPLIED_HASH_ANNOTATION);
                    }
                    for o in m
                        .get_mut("ownerReferences")
                        .and_then(|o| o.as_array_mut())
                        .into_iter()
                        .flatten()
                    {
                        if let Some(o) = o.as_object_mut() {
                            o.remove("uid");
                        }
                    }
                }
                objects.push(v.to_string());
            }
        }
        (managed, rejected, objects)
    }

    /// The same creation time in both stores (conflicts are decided by age).
    fn aged(obj: Object) -> Object {
        let mut v = obj.to_value();
        v["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z".into();
        match obj {
            Object::Ingress(_) => Object::Ingress(serde_json::from_value(v).expect("Ingress")),
            other => other,
        }
    }

    #[test]
    fn incremental_passes_match_full_passes_over_random_changes() {
        for seed in 0..6u64 {
            let mut rng = Lcg(seed);
            let incr_store = Store::new();
            let full_store = Store::new();
            let mut incr = IngressController::default();
            let mut full = IngressController::default();
            let opts = TranslateOptions::default();
            for step in 0..40 {
                // One random change to the inputs, applied to both stores.
                let i = rng.next(6);
                let change = match rng.next(6) {
                    0 => aged(ingress(
                        "a",
                        &format!("i{i}"),
                        if rng.next(2) == 0 {
                            "dedicated"
                        } else {
                            "shared"
                        },
                        &format!("/p{}", rng.next(4)),
                        &format!("s{}", rng.next(4)),
                    )),
                    1 => service("a", &format!("s{}", rng.next(4))),
                    2 => {
                        let k = key(Kind::Service, "a", &format!("s{}", rng.next(4)));
                        incr_store.delete(&k);
                        full_store.delete(&k);
                        service("b", "unrelated")
                    }
                    3 => {
                        let k = key(Kind::Ingress, "a", &format!("i{i}"));
                        incr_store.delete(&k);
                        full_store.delete(&k);
                        service("b", "unrelated")
                    }
                    _ => aged(ingress(
                        "a",
                        &format!("i{i}"),
                        "dedicated",
                        &format!("/q{}", rng.next(3)),
                        &format!("s{}", rng.next(4)),
                    )),
                };
                incr_store.apply(change.clone());
                full_store.apply(change);
                let a = incr.reconcile_store(&StoreSink(incr_store.clone()), &incr_store, &opts);
                let b = full.reconcile(
                    &StoreSink(full_store.clone()),
                    &full_store.snapshot(),
                    &opts,
                );
                assert_eq!(
                    outcome(&a, &incr_store),
                    outcome(&b, &full_store),
                    "seed {seed} step {step}"
                );
            }
        }
    }

    #[test]
    fn default_flags_are_ciliums_defaults() {
        // No flag given means the translation Cilium's defaults produce.
        assert_eq!(
            IngressOptions::default().apply(TranslateOptions::default()),
            TranslateOptions::default()
        );
        let o = IngressOptions::default();
        assert!(o.enforce_https && !o.proxy_protocol && o.host_network.is_none());
        assert_eq!(
            o.lb_annotation_prefixes,
            membrane_ingress::DEFAULT_LB_ANNOTATION_PREFIXES
        );
    }
}
