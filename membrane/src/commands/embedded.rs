//! The clients `membrane up` runs inside its own process against the
//! embedded Kubernetes API: the local API's writes and reads
//! ([`ApiObjects`], a [`membrane_store::Upstream`]) and the watched
//! manifest directory ([`ManifestSync`]). Both call the API in-process
//! (same semantics as over HTTP: server-side apply, admission, watch
//! events, garbage collection), which saves a loopback round trip and lets
//! a `GET /v1/objects` read its own writes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use membrane_apiserver::api::{DeleteOpts, PatchType, WriteOpts};
use membrane_apiserver::resources::Resource;
use membrane_apiserver::{Api, Error as ApiServerError};
use membrane_store::{Change, Kind, Object, ObjectKey, Store, Upstream};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

/// Field manager of the objects the watched manifest directory applies.
pub const MANIFESTS_MANAGER: &str = "membrane-manifests";
/// Field manager of `membrane apply` (the local API).
pub const LOCAL_API_MANAGER: &str = "membrane-apply";

/// The embedded API as seen by one in-process client (one field manager).
#[derive(Clone)]
pub struct ApiObjects {
    api: Arc<Api>,
    gc: Arc<Notify>,
    manager: &'static str,
}

/// Metadata the API server owns: an applied configuration never sets it
/// (a store mirror fills it in; a user's copy of it would be a stale
/// precondition).
const SERVER_METADATA: &[&str] = &[
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "managedFields",
    "selfLink",
];

/// `obj` as an applied configuration.
fn applied_configuration(obj: &Object) -> Value {
    let mut v = obj.to_value();
    if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        for k in SERVER_METADATA {
            meta.remove(*k);
        }
    }
    v
}

fn resource_version(v: &Value) -> Option<&str> {
    v["metadata"]["resourceVersion"].as_str()
}

impl ApiObjects {
    pub fn new(api: Arc<Api>, gc: Arc<Notify>, manager: &'static str) -> Self {
        Self { api, gc, manager }
    }

    fn resource(&self, kind: Kind) -> Result<Resource, String> {
        let (group, version) = kind
            .api_version()
            .rsplit_once('/')
            .unwrap_or(("", kind.api_version()));
        self.api
            .find(group, version, kind.plural())
            .ok_or_else(|| format!("{} is not served by the API", kind.plural()))
    }

    fn namespace_of(key: &ObjectKey) -> Option<&str> {
        if !key.kind.namespaced() {
            None
        } else if key.namespace.is_empty() {
            Some("default")
        } else {
            Some(key.namespace.as_str())
        }
    }

    fn opts(&self) -> WriteOpts {
        WriteOpts {
            manager: self.manager.into(),
            dry_run: false,
            // The directory and `membrane apply` declare the object: they
            // win over whatever another manager set (kubectl's --force-conflicts).
            force: true,
        }
    }

    /// Creates namespace `ns` if missing: manifests and `membrane apply`
    /// never needed a Namespace object before their objects (the store had
    /// no such check), and must keep working as they did.
    pub fn ensure_namespace(&self, ns: &str) -> Result<(), String> {
        let res = self.resource(Kind::Namespace)?;
        match self.api.get(&res, None, ns) {
            Ok(_) => return Ok(()),
            Err(ApiServerError::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(format!("Namespace {ns}: {e}")),
        }
        let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
        match self.api.create(&res, None, obj, &self.opts()) {
            Ok(_) => {
                info!(
                    namespace = ns,
                    manager = self.manager,
                    "created missing namespace"
                );
                Ok(())
            }
            Err(ApiServerError::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(format!("Namespace {ns}: {e}")),
        }
    }

    /// Server-side apply of one object.
    pub fn apply_one(&self, obj: &Object) -> Result<Change, String> {
        let key = obj.key();
        let res = self.resource(key.kind).map_err(|e| format!("{key}: {e}"))?;
        let ns = Self::namespace_of(&key);
        if let Some(ns) = ns {
            self.ensure_namespace(ns)
                .map_err(|e| format!("{key}: namespace: {e}"))?;
        }
        let before = match self.api.get(&res, ns, &key.name) {
            Ok(v) => resource_version(&v).map(str::to_owned),
            Err(_) => None,
        };
        let (after, created) = self
            .api
            .patch(
                &res,
                ns,
                &key.name,
                PatchType::Apply,
                applied_configuration(obj),
                "",
                &self.opts(),
            )
            .map_err(|e| format!("{key}: {e}"))?;
        Ok(if created {
            Change::Created
        } else if before.as_deref() == resource_version(&after) {
            Change::Unchanged
        } else {
            Change::Configured
        })
    }

    pub fn delete_one(&self, key: &ObjectKey) -> Result<bool, String> {
        let res = self.resource(key.kind).map_err(|e| format!("{key}: {e}"))?;
        match self.api.delete(
            &res,
            Self::namespace_of(key),
            &key.name,
            &DeleteOpts::default(),
        ) {
            Ok(_) => {
                // Dependents (a deleted Ingress's CEC, Service, slice) go now,
                // not at the next periodic collection.
                self.gc.notify_one();
                Ok(true)
            }
            Err(ApiServerError::Api(e)) if e.code == 404 => Ok(false),
            Err(e) => Err(format!("{key}: {e}")),
        }
    }

    fn to_object(kind: Kind, mut v: Value) -> Option<Object> {
        if let Some(m) = v.as_object_mut() {
            m.insert("apiVersion".into(), kind.api_version().into());
            m.insert("kind".into(), kind.kind_name().into());
        }
        let name = v["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        match Object::from_value(v) {
            Ok(o) => Some(o),
            Err(e) => {
                debug!(%kind, %name, error = %e, "stored object the store cannot hold");
                None
            }
        }
    }

    /// Stored objects of `kind` (raw), in a namespace or all.
    fn list_raw(&self, kind: Kind, namespace: Option<&str>) -> Result<Vec<Value>, String> {
        let res = self.resource(kind)?;
        let ns = if kind.namespaced() { namespace } else { None };
        self.api
            .store
            .list(&res.prefix(ns))
            .map(|(items, _)| items)
            .map_err(|e| format!("listing {}: {e}", kind.plural()))
    }

    /// Keys of the objects `manager` has applied (its managedFields entry).
    pub fn applied_by(&self, manager: &str) -> Vec<ObjectKey> {
        let mut keys = Vec::new();
        for &kind in Kind::all() {
            let items = match self.list_raw(kind, None) {
                Ok(items) => items,
                Err(e) => {
                    warn!(error = %e, "finding objects applied by {manager}");
                    continue;
                }
            };
            for v in items {
                let ours = v["metadata"]["managedFields"].as_array().is_some_and(|m| {
                    m.iter().any(|e| {
                        e["manager"].as_str() == Some(manager)
                            && e["operation"].as_str() == Some("Apply")
                    })
                });
                if ours {
                    keys.push(ObjectKey::new(
                        kind,
                        v["metadata"]["namespace"].as_str().unwrap_or_default(),
                        v["metadata"]["name"].as_str().unwrap_or_default(),
                    ));
                }
            }
        }
        keys
    }
}

impl Upstream for ApiObjects {
    /// In dependency order (Namespaces, classes, Services and Secrets,
    /// slices, then the rest), so the controllers never see an Ingress of
    /// the same request before its Services; results in input order.
    fn apply(&self, objs: &[Object]) -> Vec<Result<Change, String>> {
        let mut order: Vec<usize> = (0..objs.len()).collect();
        order.sort_by_key(|&i| apply_rank(objs[i].kind()));
        let mut results: Vec<Option<Result<Change, String>>> = vec![None; objs.len()];
        for i in order {
            results[i] = Some(self.apply_one(&objs[i]));
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err("not applied".into())))
            .collect()
    }

    fn delete(&self, keys: &[ObjectKey]) -> Vec<Result<bool, String>> {
        keys.iter().map(|k| self.delete_one(k)).collect()
    }

    fn status(&self, key: &ObjectKey, status: Value) -> Result<(), String> {
        let res = self.resource(key.kind).map_err(|e| format!("{key}: {e}"))?;
        // The whole status is replaced, as the store did: an apply would
        // merge maps (a CIDR dropped from a status map would linger).
        let patch = json!([{"op": "add", "path": "/status", "value": status}]);
        let sub = if res.status { "status" } else { "" };
        self.api
            .patch(
                &res,
                Self::namespace_of(key),
                &key.name,
                PatchType::Json,
                patch,
                sub,
                &self.opts(),
            )
            .map(drop)
            .map_err(|e| format!("{key}: status: {e}"))
    }

    fn get(&self, key: &ObjectKey) -> Result<Option<Object>, String> {
        let res = self.resource(key.kind)?;
        match self.api.get(&res, Self::namespace_of(key), &key.name) {
            Ok(v) => Ok(Self::to_object(key.kind, v)),
            Err(ApiServerError::Api(e)) if e.code == 404 => Ok(None),
            Err(e) => Err(format!("{key}: {e}")),
        }
    }

    fn list(&self, kind: Kind, namespace: Option<&str>) -> Result<Vec<Object>, String> {
        let mut objs: Vec<Object> = self
            .list_raw(kind, namespace)?
            .into_iter()
            .filter_map(|v| Self::to_object(kind, v))
            .collect();
        objs.sort_by_key(|o| o.key());
        Ok(objs)
    }
}

/// Apply order: what other objects need first (namespaces, classes).
fn apply_rank(kind: Kind) -> u8 {
    match kind {
        Kind::Namespace => 0,
        Kind::IngressClass => 1,
        Kind::Secret | Kind::Service => 2,
        Kind::EndpointSlice | Kind::Endpoints => 3,
        _ => 4,
    }
}

/// Keeps the embedded API in line with a watched manifest directory. The
/// directory is read into its own store (files as scopes, exactly as
/// before: bad documents reported with their field, the rest applied);
/// this applies what it declares (server-side apply, manager
/// `membrane-manifests`, forced) and deletes what it no longer declares —
/// only objects this manager applied. An unchanged reload writes nothing.
pub struct ManifestSync {
    api: ApiObjects,
    manifests: Store,
    /// The agent's store: directory problems and API refusals are listed
    /// by `membrane status` from there.
    report: Store,
    /// What was applied last, per object (`None`: applied by an earlier
    /// run, content unknown). The directory's store shares these objects,
    /// so remembering them costs no copy.
    applied: BTreeMap<ObjectKey, Option<Arc<Object>>>,
    /// Problems copied into `report`, and refusals recorded there.
    reported: BTreeSet<String>,
}

fn refusal_origin(key: &ObjectKey) -> String {
    format!("manifests: {key}")
}

impl ManifestSync {
    /// Starts from what earlier runs applied (found by their managedFields),
    /// so a file removed while Membrane was down still deletes its objects.
    pub fn new(api: ApiObjects, manifests: Store, report: Store) -> Self {
        let applied = api
            .applied_by(MANIFESTS_MANAGER)
            .into_iter()
            .map(|k| (k, None))
            .collect();
        Self {
            api,
            manifests,
            report,
            applied,
            reported: BTreeSet::new(),
        }
    }

    /// One reconciliation: apply what changed, delete what is gone, mirror
    /// the directory's problems. Blocking (SQLite commits).
    pub fn sync(&mut self) {
        let snap = self.manifests.snapshot();
        let mut desired: Vec<(ObjectKey, &Arc<Object>)> =
            snap.iter().map(|(k, o)| (k.clone(), o)).collect();
        desired.sort_by_key(|(k, _)| (apply_rank(k.kind), k.clone()));
        let mut problems: BTreeMap<String, String> = self.manifests.problems();
        let mut writes = 0usize;
        for (key, obj) in &desired {
            let unchanged = self
                .applied
                .get(key)
                .and_then(Option::as_ref)
                .is_some_and(|last| Arc::ptr_eq(last, obj) || **last == ***obj);
            if unchanged {
                continue;
            }
            writes += 1;
            match self.api.apply_one(obj) {
                Ok(change) => {
                    debug!(object = %key, %change, "manifests: applied");
                    self.applied.insert(key.clone(), Some(Arc::clone(obj)));
                }
                Err(e) => {
                    warn!(object = %key, error = %e, "manifests: the API refused an object");
                    problems.insert(refusal_origin(key), e);
                    // Retried on the next change of the directory.
                    self.applied.remove(key);
                }
            }
        }
        let present: BTreeSet<&ObjectKey> = desired.iter().map(|(k, _)| k).collect();
        let gone: Vec<ObjectKey> = self
            .applied
            .keys()
            .filter(|k| !present.contains(k))
            .cloned()
            .collect();
        for key in gone {
            writes += 1;
            match self.api.delete_one(&key) {
                Ok(_) => {
                    debug!(object = %key, "manifests: deleted");
                    self.applied.remove(&key);
                }
                Err(e) => {
                    warn!(object = %key, error = %e, "manifests: deleting");
                    problems.insert(refusal_origin(&key), e);
                }
            }
        }
        if writes > 0 {
            debug!(writes, "manifests: synced");
        }
        // Mirror problems into the report store (set changed, clear gone).
        let now: BTreeSet<String> = problems.keys().cloned().collect();
        for origin in self.reported.difference(&now) {
            self.report.set_problem(origin, None);
        }
        let current = self.report.problems();
        for (origin, problem) in problems {
            if current.get(&origin) != Some(&problem) {
                self.report.set_problem(&origin, Some(problem));
            }
        }
        self.reported = now;
    }
}

/// Field manager of the Node `membrane up` declares from its flags.
pub const UP_MANAGER: &str = "membrane-up";

/// Declares Node `name` with `labels` (server-side apply, manager
/// `membrane-up`): the flags are the source of this node's labels, and a
/// label dropped from them is removed. A failure is logged; the agent then
/// registers the Node itself.
pub fn declare_node(api: &Api, name: &str, labels: &BTreeMap<String, String>) {
    let Some(res) = api.find("", "v1", "nodes") else {
        warn!("nodes are not served by the API");
        return;
    };
    let node = json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
    });
    let opts = WriteOpts {
        manager: UP_MANAGER.into(),
        dry_run: false,
        force: true,
    };
    if let Err(e) = api.patch(&res, None, name, PatchType::Apply, node, "", &opts) {
        warn!(node = name, error = %e, "declaring this node's labels");
    }
}
