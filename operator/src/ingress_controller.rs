//! The Ingress controller: every managed dedicated-mode Ingress becomes a
//! CEC, a LoadBalancer Service and an EndpointSlice in the sink (as Cilium's
//! operator writes them to the API server); shared-mode Ingresses are merged
//! into the one shared CEC and Service; TLS Secrets are synced into the
//! secrets namespace. An Ingress that fails translation, or loses a
//! shared-mode conflict, keeps whatever it served last, so a bad edit never
//! takes down what already serves.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use membrane_crds::CiliumEnvoyConfig;
use membrane_ingress::{
    HostNetwork, INGRESS_LABEL, LoadBalancerMode, Lookup, SecretRef, SharedPart, TranslateOptions,
};
use membrane_k8s::Sink;
use membrane_store::{Kind, Object, ObjectKey, StoreSnapshot};
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

/// Outcome of one pass.
#[derive(Debug, Default)]
pub struct IngressPass {
    /// Managed Ingresses whose generated objects exist (freshly or from the
    /// last good translation).
    pub managed: Vec<ManagedIngress>,
    /// Ingresses that failed translation or validation, with why.
    pub rejected: BTreeMap<ObjectKey, String>,
}

/// The outcome of translating one Ingress, remembered across passes.
#[derive(Debug, Clone)]
enum Memo {
    /// Dedicated objects written, with the hash stamped on them (if someone
    /// else changes or deletes them, they are written again).
    Dedicated {
        managed: ManagedIngress,
        applied: Vec<(ObjectKey, String)>,
    },
    Shared(SharedPart),
    Failed(String),
}

/// What the last shared merge read and produced.
#[derive(Debug, Clone)]
struct SharedMemo {
    inputs: Vec<(ObjectKey, String)>,
    applied: Vec<(ObjectKey, String)>,
    managed: Vec<ManagedIngress>,
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
    let spec = ing.spec.as_ref();
    let backends = spec
        .and_then(|s| s.default_backend.as_ref())
        .into_iter()
        .chain(
            spec.iter()
                .flat_map(|s| s.rules.iter().flatten())
                .flat_map(|r| r.http.iter().flat_map(|h| h.paths.iter()))
                .map(|p| &p.backend),
        );
    for b in backends {
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

/// The Ingress controller. It remembers the last good shared-mode part of
/// every shared Ingress: the shared CEC merges many Ingresses, so unlike in
/// dedicated mode the sink holds no per-Ingress object to fall back to.
#[derive(Debug, Default)]
pub struct IngressController {
    last_good: HashMap<ObjectKey, SharedPart>,
    /// Per Ingress: the fingerprint of everything its translation read, and
    /// what came out. An unchanged Ingress is neither re-translated nor
    /// re-applied, so one change costs one translation, not one per Ingress.
    memo: HashMap<ObjectKey, (String, Memo)>,
    /// The inputs and outputs of the last shared merge.
    shared_memo: Option<SharedMemo>,
    /// `(namespace, name)` of the Ingresses in the current shared CEC: they
    /// win conflicts against newcomers of the same age.
    serving: BTreeSet<(String, String)>,
    /// Largest shared CEC part written; `None` is [`PART_BUDGET`].
    part_budget: Option<usize>,
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

    /// Run one reconcile pass.
    ///
    /// Dedicated Ingresses get their own CEC, Service and EndpointSlice;
    /// shared ones are merged into one CEC plus the shared Service in
    /// `opts.shared_namespace`. A failing Ingress keeps serving what it
    /// served last (its dedicated objects, or its last good shared part),
    /// including across a mode switch, until its new form works.
    pub fn reconcile(
        &mut self,
        sink: &dyn Sink,
        snap: &StoreSnapshot,
        opts: &TranslateOptions,
    ) -> IngressPass {
        let classes: Vec<IngressClass> = snap.typed::<IngressClass>(None).cloned().collect();
        let lookup = SnapshotLookup(snap);
        let mut pass = IngressPass::default();
        // Ingresses whose dedicated objects stay (garbage collection spares them).
        let mut dedicated_owners: BTreeSet<(String, String)> = BTreeSet::new();
        // Ingresses served from `self.last_good` in the shared CEC.
        let mut shared_keys: BTreeSet<ObjectKey> = BTreeSet::new();
        let mut wanted_secrets: BTreeMap<(String, String), (String, String)> = BTreeMap::new();

        for ing in snap.typed::<Ingress>(None) {
            if !membrane_ingress::is_managed(ing, &classes) {
                continue;
            }
            let key = key_of(Kind::Ingress, &ing.metadata);
            let mode = membrane_ingress::loadbalancer_mode(ing, opts.default_lb_mode);
            let fp = format!(
                "{mode:?} {}",
                fingerprint(ing, snap, opts.default_secret.as_ref())
            );
            let cached = self
                .memo
                .get(&key)
                .filter(|(f, m)| {
                    *f == fp
                        && match m {
                            Memo::Dedicated { applied, .. } => untouched(snap, applied),
                            _ => true,
                        }
                })
                .map(|(_, m)| m.clone());
            let memo = match cached {
                Some(m) => m,
                None => {
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
                                    managed: ManagedIngress {
                                        ingress: key.clone(),
                                        cec: key_of(Kind::CiliumEnvoyConfig, &t.cec.metadata),
                                        service: key_of(Kind::Service, &t.service.metadata),
                                    },
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
                                Ok(part) => Memo::Shared(part),
                                Err(e) => Memo::Failed(e.to_string()),
                            }
                        }
                        Err(e) => Memo::Failed(e.to_string()),
                    };
                    self.memo.insert(key.clone(), (fp, m.clone()));
                    m
                }
            };
            let outcome: Result<(), String> = match memo {
                Memo::Dedicated { managed, .. } => {
                    pass.managed.push(managed);
                    dedicated_owners.insert((key.namespace.clone(), key.name.clone()));
                    Ok(())
                }
                Memo::Shared(part) => {
                    self.last_good.insert(key.clone(), part);
                    shared_keys.insert(key.clone());
                    Ok(())
                }
                Memo::Failed(e) => Err(e),
            };
            if let Err(e) = outcome {
                pass.rejected.insert(key.clone(), e);
                // Last good: whatever this Ingress served before stays,
                // whichever mode that was.
                if let Some(m) = dedicated_last_good(snap, &key) {
                    pass.managed.push(m);
                    dedicated_owners.insert((key.namespace.clone(), key.name.clone()));
                } else if self.last_good.contains_key(&key) {
                    shared_keys.insert(key.clone());
                }
            }
            for secret in tls_secrets(ing, opts.default_secret.as_ref()) {
                wanted_secrets.insert(
                    (
                        opts.secrets_namespace.clone(),
                        format!("{}-{}", secret.namespace, secret.name),
                    ),
                    (secret.namespace, secret.name),
                );
            }
        }

        self.last_good.retain(|k, _| shared_keys.contains(k));
        let live: BTreeSet<ObjectKey> = snap
            .typed::<Ingress>(None)
            .map(|i| key_of(Kind::Ingress, &i.metadata))
            .collect();
        self.memo.retain(|k, _| live.contains(k));
        self.apply_shared(
            sink,
            snap,
            opts,
            &shared_keys,
            &mut pass,
            &mut dedicated_owners,
        );
        garbage_collect(sink, snap, &dedicated_owners);
        sync_secrets(sink, snap, &wanted_secrets, &opts.secrets_namespace);
        pass
    }

    /// Merge the shared parts into the shared CEC, Service and EndpointSlice,
    /// or remove those when no Ingress is in shared mode.
    fn apply_shared(
        &mut self,
        sink: &dyn Sink,
        snap: &StoreSnapshot,
        opts: &TranslateOptions,
        shared_keys: &BTreeSet<ObjectKey>,
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
            delete_shared(sink, snap, opts, &cec_key);
            return;
        }
        // Unchanged inputs and untouched outputs: replay the last merge.
        let inputs: Vec<(ObjectKey, String)> = shared_keys
            .iter()
            .map(|k| {
                let fp = self.memo.get(k).map(|(f, _)| f.clone()).unwrap_or_default();
                (k.clone(), fp)
            })
            .collect();
        let memo = match self.shared_memo.take() {
            Some(m) if m.inputs == inputs && untouched(snap, &m.applied) => m,
            _ => self.merge_shared(
                sink,
                snap,
                opts,
                shared_keys,
                inputs,
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

    #[allow(clippy::too_many_arguments)]
    fn merge_shared(
        &mut self,
        sink: &dyn Sink,
        snap: &StoreSnapshot,
        opts: &TranslateOptions,
        shared_keys: &BTreeSet<ObjectKey>,
        inputs: Vec<(ObjectKey, String)>,
        cec_key: &ObjectKey,
        service_key: &ObjectKey,
    ) -> SharedMemo {
        let t = membrane_ingress::merge_shared_preferring(
            shared_keys.iter().filter_map(|k| self.last_good.get(k)),
            &self.serving,
            opts,
        );
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
            .map(|(namespace, name)| ManagedIngress {
                ingress: ObjectKey {
                    kind: Kind::Ingress,
                    namespace: namespace.clone(),
                    name: name.clone(),
                },
                cec: cec_key.clone(),
                service: service_key.clone(),
            })
            .collect();
        // Parts beyond the first go out before it, so an agent that sees the
        // new first part finds its parts; parts no longer produced go last.
        let parts = match membrane_ingress::split_shared_cec(
            &t.cec,
            self.part_budget.unwrap_or(PART_BUDGET),
        ) {
            Ok(parts) => parts,
            Err(e) => {
                // One resource alone is over the budget: write it whole and
                // let the API server say no rather than drop routes here.
                warn!(cec = %cec_key, error = %e, "shared CEC cannot be split");
                vec![t.cec]
            }
        };
        let names: BTreeSet<String> = parts
            .iter()
            .filter_map(|c| c.metadata.name.clone())
            .collect();
        let mut objects: Vec<Object> = Vec::with_capacity(parts.len() + 2);
        let mut parts = parts.into_iter();
        let head = parts.next();
        objects.extend(parts.map(Object::CiliumEnvoyConfig));
        objects.extend(head.map(Object::CiliumEnvoyConfig));
        objects.push(Object::Service(t.service));
        objects.push(Object::EndpointSlice(t.endpoint_slice));
        let applied = apply_recorded(sink, objects);
        for stale in shared_parts(snap, cec_key).filter(|k| !names.contains(&k.name)) {
            sink.delete(&stale);
        }
        SharedMemo {
            inputs,
            applied,
            managed,
            conflicts,
        }
    }
}

/// The dedicated objects an Ingress generated earlier, if its CEC exists.
fn dedicated_last_good(snap: &StoreSnapshot, key: &ObjectKey) -> Option<ManagedIngress> {
    let cec = generated_cec(snap, key)?;
    Some(ManagedIngress {
        ingress: key.clone(),
        service: ObjectKey {
            kind: Kind::Service,
            namespace: key.namespace.clone(),
            name: membrane_ingress::names::service_name(&key.name),
        },
        cec,
    })
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
fn garbage_collect(sink: &dyn Sink, snap: &StoreSnapshot, owners: &BTreeSet<(String, String)>) {
    for kind in [Kind::CiliumEnvoyConfig, Kind::Service, Kind::EndpointSlice] {
        let stale: Vec<ObjectKey> = snap
            .list(kind, None)
            .filter(|o| {
                let meta = o.meta();
                owner_ingress(meta).is_some_and(|owner| {
                    !owners.contains(&(meta.namespace.clone().unwrap_or_default(), owner))
                })
            })
            .map(|o| o.key())
            .collect();
        for key in stale {
            sink.delete(&key);
        }
    }
}

/// Copy each referenced TLS Secret to `<secrets-ns>/<ns>-<name>`, as Cilium's
/// operator does, and remove copies nobody references any more.
fn sync_secrets(
    sink: &dyn Sink,
    snap: &StoreSnapshot,
    wanted: &BTreeMap<(String, String), (String, String)>,
    secrets_ns: &str,
) {
    for ((dst_ns, dst_name), (src_ns, src_name)) in wanted {
        let Some(src) = snap.get_typed::<Secret>(src_ns, src_name) else {
            continue;
        };
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
            type_: src.type_.clone(),
            data: src.data.clone(),
            ..Default::default()
        };
        sink.apply_all(vec![Object::Secret(copy)]);
    }
    let stale: Vec<ObjectKey> = snap
        .typed::<Secret>(Some(secrets_ns))
        .filter(|s| {
            s.metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.contains_key(SYNCED_LABEL))
        })
        .map(|s| key_of(Kind::Secret, &s.metadata))
        .filter(|k| !wanted.contains_key(&(k.namespace.clone(), k.name.clone())))
        .collect();
    for key in stale {
        sink.delete(&key);
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

    fn run(ctl: &mut IngressController, store: &Store) -> IngressPass {
        let opts = TranslateOptions::default();
        ctl.reconcile(&StoreSink(store.clone()), &store.snapshot(), &opts)
    }

    /// Paths in the shared CEC's insecure route configuration.
    fn shared_paths(store: &Store) -> Vec<String> {
        let Some(cec) = store.get_typed::<CiliumEnvoyConfig>("kube-system", "cilium-ingress")
        else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for r in &cec.spec.resources {
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

    #[test]
    fn a_large_shared_cec_is_written_in_parts_within_the_budget_and_shrinks_back() {
        const BUDGET: usize = 6 * 1024;
        let store = Store::new();
        store.apply(service("a", "s"));
        for i in 0..40 {
            store.apply(ingress(
                "a",
                &format!("i{i}"),
                "shared",
                &format!("/p{i}"),
                "s",
            ));
        }
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
        ctl.reconcile(&StoreSink(store.clone()), &store.snapshot(), &opts);
        assert!(store.get(&copy).is_none());
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
