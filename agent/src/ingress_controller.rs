//! The Ingress controller: every managed Ingress becomes a CEC, a LoadBalancer
//! Service and an EndpointSlice in the store (as Cilium's operator writes them
//! to the API server), and its TLS Secrets are synced into the secrets
//! namespace. An Ingress that fails translation keeps whatever it generated
//! last, so a bad edit never takes down what already serves.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use membrane_ingress::{Lookup, TranslateOptions};
use membrane_store::{Kind, Object, ObjectKey, Store, StoreSnapshot};

const SYNCED_LABEL: &str = "membrane.io/synced-secret";
const SOURCE_ANNOTATION: &str = "membrane.io/source-secret";

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

/// Run one reconcile pass.
pub fn reconcile(store: &Store, snap: &StoreSnapshot, opts: &TranslateOptions) -> IngressPass {
    let classes: Vec<IngressClass> = snap.typed::<IngressClass>(None).cloned().collect();
    let lookup = SnapshotLookup(snap);
    let mut pass = IngressPass::default();
    let mut owners: BTreeSet<(String, String)> = BTreeSet::new();
    let mut wanted_secrets: BTreeMap<(String, String), (String, String)> = BTreeMap::new();

    for ing in snap.typed::<Ingress>(None) {
        if !membrane_ingress::is_managed(ing, &classes) {
            continue;
        }
        let key = key_of(Kind::Ingress, &ing.metadata);
        owners.insert((key.namespace.clone(), key.name.clone()));
        let result = membrane_ingress::validate_references(ing, &lookup)
            .and_then(|()| membrane_ingress::translate(ing, opts));
        match result {
            Ok(t) => {
                let cec = key_of(Kind::CiliumEnvoyConfig, &t.cec.metadata);
                let service = key_of(Kind::Service, &t.service.metadata);
                store.apply(Object::CiliumEnvoyConfig(t.cec));
                store.apply(Object::Service(t.service));
                store.apply(Object::EndpointSlice(t.endpoint_slice));
                pass.managed.push(ManagedIngress {
                    ingress: key.clone(),
                    cec,
                    service,
                });
            }
            Err(e) => {
                pass.rejected.insert(key.clone(), e.to_string());
                // Last good: whatever this Ingress generated before stays.
                if let Some(cec) = generated_cec(snap, &key) {
                    pass.managed.push(ManagedIngress {
                        ingress: key.clone(),
                        service: ObjectKey {
                            kind: Kind::Service,
                            namespace: key.namespace.clone(),
                            name: format!("cilium-ingress-{}", key.name),
                        },
                        cec,
                    });
                }
            }
        }
        for tls in ing.spec.iter().flat_map(|s| s.tls.iter().flatten()) {
            if let Some(secret) = tls.secret_name.as_deref() {
                wanted_secrets.insert(
                    (
                        opts.secrets_namespace.clone(),
                        format!("{}-{secret}", key.namespace),
                    ),
                    (key.namespace.clone(), secret.to_owned()),
                );
            }
        }
    }

    garbage_collect(store, snap, &owners);
    sync_secrets(store, snap, &wanted_secrets, &opts.secrets_namespace);
    pass
}

fn generated_cec(snap: &StoreSnapshot, ingress: &ObjectKey) -> Option<ObjectKey> {
    snap.list(Kind::CiliumEnvoyConfig, Some(&ingress.namespace))
        .find(|o| owner_ingress(o.meta()).as_deref() == Some(ingress.name.as_str()))
        .map(|o| o.key())
}

/// Delete generated objects whose Ingress is gone or no longer ours.
fn garbage_collect(store: &Store, snap: &StoreSnapshot, owners: &BTreeSet<(String, String)>) {
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
            store.delete(&key);
        }
    }
}

/// Copy each referenced TLS Secret to `<secrets-ns>/<ns>-<name>`, as Cilium's
/// operator does, and remove copies nobody references any more.
fn sync_secrets(
    store: &Store,
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
        store.apply(Object::Secret(copy));
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
        store.delete(&key);
    }
}
