//! Object semantics over the store: create/update/patch/delete with
//! Kubernetes metadata rules, status subresources, server-side apply,
//! finalizers, namespace deletion and ownerReference garbage collection.
//! Synchronous (the HTTP layer calls it on blocking threads).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, RwLock};

use serde_json::{Map, Value, json};

use crate::error::{ApiError, Error};
use crate::patch::{json_patch, merge_patch, strategic_merge_patch};
use crate::resources::{self, Resource};
use crate::selectors::{FieldSelector, LabelSelector};
use crate::ssa::{self, Writer};
use crate::store::{Mutation, Outcome, Store};
use crate::util::{name_suffix, now_rfc3339, uuid, valid_name};

/// Namespaces every cluster has.
pub const DEFAULT_NAMESPACES: &[&str] =
    &["default", "kube-system", "kube-public", "kube-node-lease"];

/// Options of a write request.
#[derive(Clone, Debug, Default)]
pub struct WriteOpts {
    /// `fieldManager`, or the client's user agent product.
    pub manager: String,
    pub dry_run: bool,
    pub force: bool,
}

/// Patch content types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchType {
    Merge,
    Strategic,
    Json,
    Apply,
}

/// Deletion propagation policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Propagation {
    #[default]
    Background,
    Foreground,
    Orphan,
}

/// Options of a delete request.
#[derive(Clone, Debug, Default)]
pub struct DeleteOpts {
    pub propagation: Propagation,
    pub precondition_uid: Option<String>,
    pub precondition_rv: Option<String>,
    pub dry_run: bool,
}

const FOREGROUND: &str = "foregroundDeletion";
const ORPHAN: &str = "orphan";

/// The API: storage plus the table of served resources.
pub struct Api {
    pub store: Store,
    /// Swapped whole when CRDs change; requests look resources up in it
    /// without copying the table.
    resources: RwLock<Arc<Vec<Resource>>>,
}

fn name_of(obj: &Value) -> &str {
    obj["metadata"]["name"].as_str().unwrap_or_default()
}

fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj["metadata"].is_object() {
        obj["metadata"] = json!({});
    }
    match obj.get_mut("metadata") {
        Some(Value::Object(m)) => m,
        // Unreachable: set to an object just above.
        _ => unreachable!("metadata is an object"),
    }
}

fn finalizers(obj: &Value) -> Vec<String> {
    obj["metadata"]["finalizers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|f| f.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn set_finalizers(obj: &mut Value, list: &[String]) {
    let meta = meta_mut(obj);
    if list.is_empty() {
        meta.remove("finalizers");
    } else {
        meta.insert("finalizers".into(), json!(list));
    }
}

/// Whether two objects are equal apart from their top-level `keys` (compared
/// in place: these objects can be large, and this runs on every write).
fn eq_without(a: &Value, b: &Value, keys: &[&str]) -> bool {
    match (a.as_object(), b.as_object()) {
        (Some(x), Some(y)) => {
            let kept =
                |m: &Map<String, Value>| m.keys().filter(|k| !keys.contains(&k.as_str())).count();
            kept(x) == kept(y)
                && x.iter()
                    .filter(|(k, _)| !keys.contains(&k.as_str()))
                    .all(|(k, v)| y.get(k) == Some(v))
        }
        _ => a == b,
    }
}

/// Parse a request body: JSON, or YAML for apply patches and YAML content.
pub fn parse_body(body: &[u8], yaml: bool) -> Result<Value, ApiError> {
    // Clients (kube-rs, kubectl) send apply patches as JSON under the YAML
    // media type; JSON is YAML, and a JSON parser reads a large object
    // (a CEC) many times faster than the YAML one.
    if yaml
        && body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
        && let Ok(v) = serde_json::from_slice::<Value>(body)
    {
        return Ok(v);
    }
    if yaml {
        serde_yaml_ng::from_slice::<Value>(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML body: {e}")))
    } else {
        serde_json::from_slice::<Value>(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding JSON body: {e}")))
    }
}

impl Api {
    /// Open the data directory, create the default namespaces and load the
    /// stored CRDs into the resource table.
    pub fn open(dir: &Path, window: u64) -> Result<Api, Error> {
        Api::open_with(dir, window, crate::store::SyncMode::default())
    }

    /// [`Api::open`] with the given commit durability.
    pub fn open_with(dir: &Path, window: u64, sync: crate::store::SyncMode) -> Result<Api, Error> {
        let api = Api {
            store: Store::open_with(dir, window, sync)?,
            resources: RwLock::new(Arc::new(resources::builtin())),
        };
        api.refresh_crds()?;
        let ns = api.must_find("", "namespaces")?;
        for name in DEFAULT_NAMESPACES {
            if api.store.get(&ns.key(None, name))?.is_none() {
                let obj =
                    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
                let opts = WriteOpts {
                    manager: "membrane-apiserver".into(),
                    ..WriteOpts::default()
                };
                match api.create(&ns, None, obj, &opts) {
                    Ok(_) => {}
                    Err(Error::Api(e)) if e.code == 409 => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(api)
    }

    /// Every served resource.
    pub fn resources(&self) -> Vec<Resource> {
        self.table().to_vec()
    }

    fn table(&self) -> Arc<Vec<Resource>> {
        self.resources
            .read()
            .map(|r| r.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<Resource> {
        self.table()
            .iter()
            .find(|r| r.group == group && r.version == version && r.plural == plural)
            .cloned()
    }

    fn must_find(&self, group: &str, plural: &str) -> Result<Resource, Error> {
        self.table()
            .iter()
            .find(|r| r.group == group && r.plural == plural)
            .cloned()
            .ok_or_else(|| ApiError::internal(format!("resource {plural} not in the table")).into())
    }

    /// Rebuild the resource table from the built-ins and stored CRDs.
    fn refresh_crds(&self) -> Result<(), Error> {
        let crd = Resource {
            group: "apiextensions.k8s.io".into(),
            version: "v1".into(),
            plural: "customresourcedefinitions".into(),
            ..resources::builtin()
                .into_iter()
                .find(|r| r.plural == "customresourcedefinitions")
                .ok_or_else(|| ApiError::internal("no CRD resource"))?
        };
        let (crds, _) = self.store.list(&crd.prefix(None))?;
        let mut all = resources::builtin();
        for c in &crds {
            for r in resources::from_crd(c) {
                if !all
                    .iter()
                    .any(|b| b.group == r.group && b.version == r.version && b.plural == r.plural)
                {
                    all.push(r);
                }
            }
        }
        if let Ok(mut w) = self.resources.write() {
            *w = Arc::new(all);
        }
        Ok(())
    }

    pub fn get(&self, res: &Resource, ns: Option<&str>, name: &str) -> Result<Value, Error> {
        self.store
            .get(&res.key(ns, name))?
            .ok_or_else(|| ApiError::not_found(&res.qualified(), name).into())
    }

    /// A list document of the matching objects.
    pub fn list(
        &self,
        res: &Resource,
        ns: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
    ) -> Result<Value, Error> {
        self.list_page(res, ns, labels, fields, None, None)
    }

    /// One page of a list: at most `limit` items after the position a
    /// `continue` token names. Later pages carry the first page's
    /// resourceVersion, so a watch from it replays every change made while
    /// the pages were read (the pages themselves show the current state).
    pub fn list_page(
        &self,
        res: &Resource,
        ns: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
        limit: Option<usize>,
        continue_token: Option<&str>,
    ) -> Result<Value, Error> {
        let (start, first_rv) = match continue_token {
            Some(t) if !t.is_empty() => {
                let (k, rv) = decode_continue(t)?;
                (Some(k), Some(rv))
            }
            _ => (None, None),
        };
        let (keyed, rv) = self.store.list_keyed(&res.prefix(ns))?;
        let rv = first_rv.unwrap_or(rv);
        let mut matching = keyed
            .into_iter()
            .filter(|(k, _)| start.as_ref().is_none_or(|s| k > s))
            .filter(|(_, o)| labels.matches(o) && fields.matches(o));
        let mut items = Vec::new();
        let mut last_key: Option<String> = None;
        for (k, o) in matching.by_ref() {
            if limit.is_some_and(|l| items.len() >= l) {
                // One more exists: the page ends before it.
                let mut meta = json!({"resourceVersion": rv.to_string()});
                if let Some(last) = &last_key {
                    meta["continue"] = json!(encode_continue(last, rv));
                    meta["remainingItemCount"] = json!(1 + matching.count());
                }
                drop(k);
                return Ok(json!({
                    "kind": format!("{}List", res.kind),
                    "apiVersion": res.api_version(),
                    "metadata": meta,
                    "items": items,
                }));
            }
            last_key = Some(k);
            items.push(o);
        }
        Ok(json!({
            "kind": format!("{}List", res.kind),
            "apiVersion": res.api_version(),
            "metadata": {"resourceVersion": rv.to_string()},
            "items": items,
        }))
    }

    fn check_namespace(&self, res: &Resource, ns: Option<&str>) -> Result<(), Error> {
        if !res.namespaced {
            return Ok(());
        }
        let ns = ns.ok_or_else(|| {
            ApiError::bad_request(format!(
                "{} is namespaced: the request needs a namespace",
                res.plural
            ))
        })?;
        let nsres = self.must_find("", "namespaces")?;
        match self.store.get(&nsres.key(None, ns))? {
            None => Err(ApiError::not_found("namespaces", ns).into()),
            Some(n) if !n["metadata"]["deletionTimestamp"].is_null() => Err(ApiError::new(
                403,
                "Forbidden",
                format!(
                    "{} is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                    res.qualified()
                ),
            )
            .into()),
            Some(_) => Ok(()),
        }
    }

    /// Check identity fields of a body against the request and fill them in.
    fn identify(&self, res: &Resource, ns: Option<&str>, obj: &mut Value) -> Result<(), ApiError> {
        if !obj.is_object() {
            return Err(ApiError::bad_request(format!(
                "the body of a {} request must be an object",
                res.kind
            )));
        }
        if !(obj["metadata"].is_object() || obj["metadata"].is_null()) {
            return Err(ApiError::bad_request(format!(
                "{}: metadata must be an object",
                res.kind
            )));
        }
        let name = name_of(obj).to_string();
        if let Some(k) = obj["kind"].as_str()
            && k != res.kind
        {
            return Err(ApiError::bad_request(format!(
                "{} \"{name}\": kind {k:?} does not match the endpoint (expected {:?})",
                res.qualified(),
                res.kind
            )));
        }
        if let Some(v) = obj["apiVersion"].as_str()
            && v != res.api_version()
        {
            return Err(ApiError::bad_request(format!(
                "{} \"{name}\": apiVersion {v:?} does not match the endpoint (expected {:?})",
                res.qualified(),
                res.api_version()
            )));
        }
        obj["kind"] = json!(res.kind);
        obj["apiVersion"] = json!(res.api_version());
        let meta = meta_mut(obj);
        if res.namespaced {
            let want = ns.unwrap_or_default();
            match meta.get("namespace").and_then(Value::as_str) {
                Some(n) if !n.is_empty() && n != want => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                _ => {
                    meta.insert("namespace".into(), json!(want));
                }
            }
        } else {
            meta.remove("namespace");
        }
        Ok(())
    }

    /// Server-owned fields and the status rules shared by every write to an
    /// existing object. Returns what to store.
    fn finish(
        &self,
        res: &Resource,
        old: &Value,
        mut new: Value,
        sub: &str,
        opts: &WriteOpts,
        ssa_done: bool,
    ) -> Result<Mutation, Error> {
        let name = name_of(old).to_string();
        crate::defaults::apply(&res.group, &res.kind, &mut new);
        if !name_of(&new).is_empty() && name_of(&new) != name {
            return Err(ApiError::bad_request(format!(
                "{} \"{name}\": the name of the object ({}) does not match the name on the URL",
                res.qualified(),
                name_of(&new)
            ))
            .into());
        }
        if let Some(rv) = new["metadata"]["resourceVersion"].as_str()
            && !rv.is_empty()
            && Some(rv) != old["metadata"]["resourceVersion"].as_str()
        {
            return Err(ApiError::conflict(
                &res.qualified(),
                &name,
                "the object has been modified; please apply your changes to the latest version and try again",
            )
            .into());
        }
        if sub == "status" {
            // Only status changes through the status subresource.
            let status = new.get("status").cloned();
            let managed = new["metadata"]["managedFields"].clone();
            new = old.clone();
            match status {
                Some(s) => new["status"] = s,
                None => {
                    if let Some(m) = new.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
            if ssa_done {
                meta_mut(&mut new).insert("managedFields".into(), managed);
            }
        } else if res.status {
            match old.get("status") {
                Some(s) => new["status"] = s.clone(),
                None => {
                    if let Some(m) = new.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
        }
        {
            let old_meta = &old["metadata"];
            let meta = meta_mut(&mut new);
            for k in [
                "name",
                "namespace",
                "uid",
                "creationTimestamp",
                "generation",
                "deletionTimestamp",
                "resourceVersion",
            ] {
                match old_meta.get(k) {
                    Some(v) => meta.insert(k.into(), v.clone()),
                    None => meta.remove(k),
                };
            }
        }
        let skip = ["metadata", "status"];
        let skip_self: &[&str] = if res.status { &skip } else { &skip[..1] };
        if !eq_without(&new, old, skip_self) {
            let generation = old["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
            meta_mut(&mut new).insert("generation".into(), json!(generation));
        }
        if res.plural == "customresourcedefinitions" {
            crd_status(&mut new);
        }
        if !ssa_done {
            let w = Writer {
                manager: &opts.manager,
                api_version: &res.api_version(),
                time: &now_rfc3339(),
                subresource: sub,
            };
            ssa::record_update(Some(old), &mut new, &w, res.status);
        }
        // A write that changes nothing but managedFields timestamps is a no-op.
        if eq_but_times(&new, old) {
            return Ok(Mutation::Keep);
        }
        if !old["metadata"]["deletionTimestamp"].is_null()
            && finalizers(&new).is_empty()
            && res.plural != "namespaces"
        {
            return Ok(Mutation::Delete(new));
        }
        Ok(Mutation::Put(new))
    }

    fn commit(
        &self,
        res: &Resource,
        key: &str,
        f: impl FnOnce(Option<Value>) -> Result<Mutation, Error>,
        dry_run: bool,
    ) -> Result<Outcome, Error> {
        if dry_run {
            let cur = self.store.get(key)?;
            return Ok(match f(cur.clone())? {
                Mutation::Put(o) if cur.is_some() => Outcome::Updated(o),
                Mutation::Put(o) => Outcome::Created(o),
                Mutation::Delete(o) => Outcome::Deleted(o),
                Mutation::Keep => Outcome::Unchanged(cur),
            });
        }
        let out = self.store.mutate(key, f)?;
        if res.plural == "customresourcedefinitions" && !matches!(out, Outcome::Unchanged(_)) {
            self.refresh_crds()?;
            if matches!(out, Outcome::Deleted(_)) {
                self.drop_unserved()?;
            }
        }
        Ok(out)
    }

    /// Prepare a new object: generateName, uid, timestamps, managedFields.
    fn prepare_create(
        &self,
        res: &Resource,
        ns: Option<&str>,
        mut obj: Value,
        opts: &WriteOpts,
        ssa_done: bool,
    ) -> Result<Value, Error> {
        self.identify(res, ns, &mut obj)?;
        crate::defaults::apply(&res.group, &res.kind, &mut obj);
        let meta = meta_mut(&mut obj);
        if meta
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .is_empty()
        {
            match meta.get("generateName").and_then(Value::as_str) {
                Some(g) if !g.is_empty() => {
                    let name = format!("{g}{}", name_suffix());
                    meta.insert("name".into(), json!(name));
                }
                _ => {
                    return Err(ApiError::invalid(
                        &res.kind,
                        "",
                        "metadata.name",
                        "Required value: name or generateName is required",
                    )
                    .into());
                }
            }
        }
        let name = name_of(&obj).to_string();
        let name_ok = if res.kind == "Event" || res.group == "cilium.io" {
            !name.is_empty() && !name.contains('/')
        } else {
            valid_name(&name)
        };
        if !name_ok {
            return Err(ApiError::invalid(
                &res.kind,
                &name,
                "metadata.name",
                &format!(
                    "Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'"
                ),
            )
            .into());
        }
        let now = now_rfc3339();
        let meta = meta_mut(&mut obj);
        meta.insert("uid".into(), json!(uuid()));
        meta.insert("creationTimestamp".into(), json!(now));
        meta.insert("generation".into(), json!(1));
        for k in [
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "resourceVersion",
            "selfLink",
        ] {
            meta.remove(k);
        }
        if res.status && res.plural != "namespaces" {
            // Status is the controllers' (written through /status).
            if let Some(m) = obj.as_object_mut() {
                m.remove("status");
            }
        }
        if res.plural == "namespaces" {
            obj["status"] = json!({"phase": "Active"});
            if obj["spec"]["finalizers"].is_null() {
                obj["spec"] = json!({"finalizers": ["kubernetes"]});
            }
        }
        if res.plural == "customresourcedefinitions" {
            crd_status(&mut obj);
        }
        if !ssa_done {
            let w = Writer {
                manager: &opts.manager,
                api_version: &res.api_version(),
                time: &now,
                subresource: "",
            };
            ssa::record_update(None, &mut obj, &w, res.status);
        }
        Ok(obj)
    }

    pub fn create(
        &self,
        res: &Resource,
        ns: Option<&str>,
        body: Value,
        opts: &WriteOpts,
    ) -> Result<Value, Error> {
        self.check_namespace(res, ns)?;
        let obj = self.prepare_create(res, ns, body, opts, false)?;
        let name = name_of(&obj).to_string();
        let key = res.key(ns, &name);
        let qualified = res.qualified();
        let out = self.commit(
            res,
            &key,
            |cur| match cur {
                Some(_) => Err(ApiError::already_exists(&qualified, &name).into()),
                None => Ok(Mutation::Put(obj)),
            },
            opts.dry_run,
        )?;
        outcome_object(out)
    }

    /// PUT: replace the object (or its status).
    pub fn update(
        &self,
        res: &Resource,
        ns: Option<&str>,
        name: &str,
        mut body: Value,
        sub: &str,
        opts: &WriteOpts,
    ) -> Result<Value, Error> {
        self.identify(res, ns, &mut body)?;
        let key = res.key(ns, name);
        let qualified = res.qualified();
        let out = self.commit(
            res,
            &key,
            |cur| match cur {
                None => Err(ApiError::not_found(&qualified, name).into()),
                Some(old) => self.finish(res, &old, body, sub, opts, false),
            },
            opts.dry_run,
        )?;
        outcome_object(out)
    }

    /// PATCH of any type; an apply patch creates a missing object.
    /// Returns the object and whether it was created.
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &self,
        res: &Resource,
        ns: Option<&str>,
        name: &str,
        kind: PatchType,
        patch: Value,
        sub: &str,
        opts: &WriteOpts,
    ) -> Result<(Value, bool), Error> {
        let key = res.key(ns, name);
        let qualified = res.qualified();
        if kind == PatchType::Apply {
            let mut applied = patch;
            self.identify(res, ns, &mut applied)?;
            if name_of(&applied) != name {
                return Err(ApiError::bad_request(format!(
                    "{qualified} \"{name}\": the name in the applied configuration ({:?}) does not match the URL",
                    name_of(&applied)
                ))
                .into());
            }
            if !self.store.contains(&key)? {
                self.check_namespace(res, ns)?;
            }
            let mut compared = applied.clone();
            crate::defaults::apply(&res.group, &res.kind, &mut compared);
            let out = self.commit(
                res,
                &key,
                |cur| {
                    let time = now_rfc3339();
                    let w = Writer {
                        manager: &opts.manager,
                        api_version: &res.api_version(),
                        time: &time,
                        subresource: sub,
                    };
                    match cur {
                        // As Kubernetes: the status subresource of an object
                        // that does not exist is not found (an apply of the
                        // status alone never creates an object without spec).
                        None if !sub.is_empty() => {
                            Err(ApiError::not_found(&qualified, name).into())
                        }
                        None => {
                            let merged =
                                ssa::apply(None, &applied, &compared, &w, opts.force, res.status)?;
                            let managed = merged["metadata"]["managedFields"].clone();
                            let mut obj = self.prepare_create(res, ns, merged, opts, true)?;
                            meta_mut(&mut obj).insert("managedFields".into(), managed);
                            Ok(Mutation::Put(obj))
                        }
                        Some(old) => {
                            let merged = ssa::apply(
                                Some(&old),
                                &applied,
                                &compared,
                                &w,
                                opts.force,
                                res.status,
                            )?;
                            self.finish(res, &old, merged, sub, opts, true)
                        }
                    }
                },
                opts.dry_run,
            )?;
            let created = matches!(out, Outcome::Created(_));
            return Ok((outcome_object(out)?, created));
        }
        let out = self.commit(
            res,
            &key,
            |cur| {
                let Some(old) = cur else {
                    return Err(ApiError::not_found(&qualified, name).into());
                };
                let mut new = old.clone();
                match kind {
                    PatchType::Merge => merge_patch(&mut new, &patch),
                    PatchType::Strategic => strategic_merge_patch(&mut new, &patch)?,
                    PatchType::Json => json_patch(&mut new, &patch)?,
                    PatchType::Apply => {}
                }
                // The patch may carry a resourceVersion precondition; absent,
                // it applies to whatever is current.
                self.identify(res, ns, &mut new)?;
                if patch["metadata"]["resourceVersion"].is_null() {
                    meta_mut(&mut new).insert(
                        "resourceVersion".into(),
                        old["metadata"]["resourceVersion"].clone(),
                    );
                }
                self.finish(res, &old, new, sub, opts, false)
            },
            opts.dry_run,
        )?;
        Ok((outcome_object(out)?, false))
    }

    /// DELETE: immediately, or mark for deletion while finalizers remain.
    pub fn delete(
        &self,
        res: &Resource,
        ns: Option<&str>,
        name: &str,
        opts: &DeleteOpts,
    ) -> Result<Value, Error> {
        if res.group.is_empty()
            && res.plural == "namespaces"
            && ["default", "kube-system", "kube-public"].contains(&name)
        {
            return Err(ApiError::new(
                403,
                "Forbidden",
                format!("namespaces \"{name}\" is forbidden: this namespace may not be deleted"),
            )
            .into());
        }
        let key = res.key(ns, name);
        let qualified = res.qualified();
        let out = self.commit(
            res,
            &key,
            |cur| {
                let Some(mut obj) = cur else {
                    return Err(ApiError::not_found(&qualified, name).into());
                };
                if let Some(uid) = &opts.precondition_uid
                    && obj["metadata"]["uid"].as_str() != Some(uid)
                {
                    return Err(ApiError::conflict(&qualified, name, "Precondition failed: UID in precondition does not match the UID in record").into());
                }
                if let Some(rv) = &opts.precondition_rv
                    && obj["metadata"]["resourceVersion"].as_str() != Some(rv)
                {
                    return Err(ApiError::conflict(&qualified, name, "Precondition failed: ResourceVersion in precondition does not match the ResourceVersion in record").into());
                }
                let mut fins = finalizers(&obj);
                match opts.propagation {
                    Propagation::Foreground if !fins.iter().any(|f| f == FOREGROUND) => fins.push(FOREGROUND.into()),
                    Propagation::Orphan if !fins.iter().any(|f| f == ORPHAN) => fins.push(ORPHAN.into()),
                    _ => {}
                }
                let terminating_ns = res.plural == "namespaces";
                if fins.is_empty() && !terminating_ns {
                    return Ok(Mutation::Delete(obj));
                }
                if !obj["metadata"]["deletionTimestamp"].is_null() && finalizers(&obj) == fins {
                    return Ok(Mutation::Keep);
                }
                set_finalizers(&mut obj, &fins);
                let meta = meta_mut(&mut obj);
                if meta.get("deletionTimestamp").is_none_or(Value::is_null) {
                    meta.insert("deletionTimestamp".into(), json!(now_rfc3339()));
                    meta.insert("deletionGracePeriodSeconds".into(), json!(0));
                }
                if terminating_ns {
                    obj["status"]["phase"] = json!("Terminating");
                }
                Ok(Mutation::Put(obj))
            },
            opts.dry_run,
        )?;
        outcome_object(out)
    }

    /// One garbage collection pass: namespaces being deleted lose their
    /// contents and then go; dependents whose owners are all gone are
    /// deleted (dangling references to gone owners are removed when other
    /// owners remain); foreground and orphan finalizers are completed.
    /// Returns how many objects it changed.
    pub fn gc_pass(&self) -> Result<usize, Error> {
        let mut changed = self.drop_unserved()?;
        let (all, _) = self.store.list("")?;
        let uids: HashMap<String, &Value> = all
            .iter()
            .filter_map(|o| o["metadata"]["uid"].as_str().map(|u| (u.to_string(), o)))
            .collect();
        let table = self.table();
        let key_of = |o: &Value| -> Option<(Resource, Option<String>, String)> {
            let api_version = o["apiVersion"].as_str()?;
            let (group, version) = match api_version.split_once('/') {
                Some((g, v)) => (g, v),
                None => ("", api_version),
            };
            let kind = o["kind"].as_str()?;
            let res = table
                .iter()
                .find(|r| r.group == group && r.version == version && r.kind == kind)?
                .clone();
            let ns = if res.namespaced {
                o["metadata"]["namespace"].as_str().map(String::from)
            } else {
                None
            };
            Some((res, ns, name_of(o).to_string()))
        };
        let gc_opts = WriteOpts {
            manager: "membrane-garbage-collector".into(),
            ..WriteOpts::default()
        };
        // Owners referenced by some dependent, and by a dependent that
        // blocks its owner's foreground deletion.
        let mut referenced: HashSet<String> = HashSet::new();
        let mut blocking: HashSet<String> = HashSet::new();
        for o in &all {
            let refs = o["metadata"]["ownerReferences"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if refs.is_empty() {
                continue;
            }
            let Some((res, ns, name)) = key_of(o) else {
                continue;
            };
            let ref_uid = |r: &Value| r["uid"].as_str().unwrap_or_default().to_string();
            for r in &refs {
                referenced.insert(ref_uid(r));
                if r["blockOwnerDeletion"] == true {
                    blocking.insert(ref_uid(r));
                }
            }
            let owner_state = |r: &Value| -> Option<Vec<String>> {
                uids.get(&ref_uid(r)).map(|owner| {
                    if owner["metadata"]["deletionTimestamp"].is_null() {
                        Vec::new()
                    } else {
                        finalizers(owner)
                    }
                })
            };
            let gone: Vec<&Value> = refs.iter().filter(|r| owner_state(r).is_none()).collect();
            let foreground = refs
                .iter()
                .any(|r| owner_state(r).is_some_and(|f| f.iter().any(|x| x == FOREGROUND)));
            let orphaning: Vec<&Value> = refs
                .iter()
                .filter(|r| owner_state(r).is_some_and(|f| f.iter().any(|x| x == ORPHAN)))
                .collect();
            if (gone.len() == refs.len() || foreground) && orphaning.is_empty() {
                if o["metadata"]["deletionTimestamp"].is_null() {
                    let r = self.delete(&res, ns.as_deref(), &name, &DeleteOpts::default());
                    log_gc(&res, &name, r.map(|_| ()));
                    changed += 1;
                }
            } else if !gone.is_empty() || !orphaning.is_empty() {
                let drop: HashSet<String> = gone
                    .iter()
                    .chain(orphaning.iter())
                    .map(|r| ref_uid(r))
                    .collect();
                let kept: Vec<Value> = refs
                    .iter()
                    .filter(|r| !drop.contains(&ref_uid(r)))
                    .cloned()
                    .collect();
                let patch = if kept.is_empty() {
                    json!({"metadata": {"ownerReferences": null}})
                } else {
                    json!({"metadata": {"ownerReferences": kept}})
                };
                let r = self.patch(
                    &res,
                    ns.as_deref(),
                    &name,
                    PatchType::Merge,
                    patch,
                    "",
                    &gc_opts,
                );
                log_gc(&res, &name, r.map(|_| ()));
                changed += 1;
            }
        }
        // Owners waiting on their dependents (foreground) or on orphaning.
        for o in &all {
            if o["metadata"]["deletionTimestamp"].is_null() {
                continue;
            }
            let fins = finalizers(o);
            let uid = o["metadata"]["uid"].as_str().unwrap_or_default();
            let has = |f: &str| fins.iter().any(|x| x == f);
            if !has(FOREGROUND) && !has(ORPHAN) {
                continue;
            }
            // Foreground waits for blocking dependents; orphaning for every
            // dependent to lose its reference.
            if (has(FOREGROUND) && blocking.contains(uid))
                || (has(ORPHAN) && referenced.contains(uid))
            {
                continue;
            }
            let Some((res, ns, name)) = key_of(o) else {
                continue;
            };
            let rest: Vec<String> = fins
                .into_iter()
                .filter(|f| f != FOREGROUND && f != ORPHAN)
                .collect();
            let patch = json!({"metadata": {"finalizers": if rest.is_empty() { Value::Null } else { json!(rest) }}});
            let r = self.patch(
                &res,
                ns.as_deref(),
                &name,
                PatchType::Merge,
                patch,
                "",
                &gc_opts,
            );
            log_gc(&res, &name, r.map(|_| ()));
            changed += 1;
        }
        // Namespaces being deleted.
        for n in all.iter().filter(|o| {
            o["kind"] == "Namespace"
                && o["apiVersion"] == "v1"
                && !o["metadata"]["deletionTimestamp"].is_null()
        }) {
            let ns_name = name_of(n);
            let mut remaining = 0;
            for o in &all {
                if o["metadata"]["namespace"].as_str() != Some(ns_name) {
                    continue;
                }
                let Some((res, ns, name)) = key_of(o) else {
                    continue;
                };
                if !res.namespaced {
                    continue;
                }
                remaining += 1;
                if o["metadata"]["deletionTimestamp"].is_null() {
                    let r = self.delete(&res, ns.as_deref(), &name, &DeleteOpts::default());
                    log_gc(&res, &name, r.map(|_| ()));
                    changed += 1;
                }
            }
            if remaining == 0 {
                let nsres = self.must_find("", "namespaces")?;
                let key = nsres.key(None, ns_name);
                self.store.mutate(&key, |cur| {
                    Ok(match cur {
                        Some(obj) if finalizers(&obj).is_empty() => Mutation::Delete(obj),
                        _ => Mutation::Keep,
                    })
                })?;
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// Delete the objects of resources no longer served (their CRD was
    /// deleted), as Kubernetes deletes a CRD's objects with it.
    fn drop_unserved(&self) -> Result<usize, Error> {
        let served: HashSet<String> = self.resources().iter().map(|r| r.prefix(None)).collect();
        let mut dropped = 0;
        for key in self.store.keys("")? {
            let prefix: String = key
                .splitn(3, '/')
                .take(2)
                .map(|p| format!("{p}/"))
                .collect();
            if !served.contains(&prefix) {
                self.store
                    .mutate(&key, |cur| Ok(cur.map_or(Mutation::Keep, Mutation::Delete)))?;
                dropped += 1;
            }
        }
        Ok(dropped)
    }

    /// Delete Events last seen more than `ttl` seconds before `now` (as
    /// Kubernetes expires Events, one hour by default), so a long-running
    /// server's storage does not grow with every Event ever recorded.
    pub fn expire_events(&self, ttl: i64, now: i64) -> Result<usize, Error> {
        let Some(events) = self.find("", "v1", "events") else {
            return Ok(0);
        };
        let (keyed, _) = self.store.list_keyed(&events.prefix(None))?;
        let mut expired = 0;
        for (key, e) in keyed {
            let last = [
                &e["series"]["lastObservedTime"],
                &e["lastTimestamp"],
                &e["eventTime"],
                &e["metadata"]["creationTimestamp"],
            ]
            .iter()
            .filter_map(|t| t.as_str().and_then(crate::table::parse_time))
            .max();
            if last.is_some_and(|t| now - t > ttl) {
                self.store
                    .mutate(&key, |cur| Ok(cur.map_or(Mutation::Keep, Mutation::Delete)))?;
                expired += 1;
            }
        }
        Ok(expired)
    }

    /// Run GC passes until nothing changes (bounded).
    /// A pass reads every object, so it runs only when a commit since the
    /// last pass that found nothing to do can have given it work (a delete,
    /// a deletion in progress, new owner references): endpoint churn or
    /// status writes cost no pass.
    pub fn collect_garbage(&self) -> Result<(), Error> {
        for _ in 0..32 {
            let relevant = self.store.gc_relevant_rv();
            if relevant == 0 {
                break;
            }
            let rv = self.store.current_rv()?;
            if self.gc_pass()? == 0 {
                self.store.gc_clean(rv);
                break;
            }
        }
        Ok(())
    }
}

fn encode_continue(key: &str, rv: u64) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(json!({"start": key, "rv": rv}).to_string())
}

fn decode_continue(token: &str) -> Result<(String, u64), ApiError> {
    use base64::Engine;
    let bad = || ApiError::bad_request(format!("invalid continue token {token:?}"));
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    match (v["start"].as_str(), v["rv"].as_u64()) {
        (Some(k), Some(rv)) => Ok((k.to_string(), rv)),
        _ => Err(bad()),
    }
}

fn log_gc(res: &Resource, name: &str, r: Result<(), Error>) {
    match r {
        Ok(()) => tracing::debug!(resource = %res.qualified(), name, "garbage collected"),
        // Gone already, or changed meanwhile: the next pass sees it.
        Err(Error::Api(e)) if e.code == 404 || e.code == 409 => {}
        Err(e) => {
            tracing::warn!(resource = %res.qualified(), name, error = %e, "garbage collection")
        }
    }
}

fn outcome_object(out: Outcome) -> Result<Value, Error> {
    match out {
        Outcome::Created(o) | Outcome::Updated(o) | Outcome::Deleted(o) => Ok(o),
        Outcome::Unchanged(Some(o)) => Ok(o),
        Outcome::Unchanged(None) => {
            Err(ApiError::internal("object vanished during the write").into())
        }
    }
}

/// Whether two objects are equal apart from their managedFields timestamps.
fn eq_but_times(a: &Value, b: &Value) -> bool {
    if !eq_without(a, b, &["metadata"]) {
        return false;
    }
    let (ma, mb) = (&a["metadata"], &b["metadata"]);
    if !eq_without(ma, mb, &["managedFields"]) {
        return false;
    }
    match (ma.get("managedFields"), mb.get("managedFields")) {
        (Some(Value::Array(x)), Some(Value::Array(y))) => {
            x.len() == y.len() && x.iter().zip(y).all(|(e, f)| eq_without(e, f, &["time"]))
        }
        (x, y) => x == y,
    }
}

/// A stored CRD is immediately established with the names it asks for.
fn crd_status(crd: &mut Value) {
    let names = crd["spec"]["names"].clone();
    let versions: Vec<Value> = crd["spec"]["versions"]
        .as_array()
        .map(|v| {
            v.iter()
                .filter(|x| x["storage"] == true)
                .map(|x| x["name"].clone())
                .collect()
        })
        .unwrap_or_default();
    let time = crd["status"]["conditions"][0]["lastTransitionTime"]
        .as_str()
        .map(String::from)
        .unwrap_or_else(now_rfc3339);
    crd["status"] = json!({
        "acceptedNames": names,
        "storedVersions": versions,
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": time},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": time},
        ],
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An apply body in JSON (what kube-rs and kubectl send) reads the same
    /// through the JSON fast path as through YAML; YAML still works, and a
    /// flow mapping that is not JSON falls back to the YAML parser.
    #[test]
    fn apply_bodies_in_json_and_yaml() {
        let json_body = br#" {"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c"},"data":{"a":"1","b":"x y"},"n":[1,2.5,true,null]}"#;
        let fast = parse_body(json_body, true).expect("json");
        let yaml: Value = serde_yaml_ng::from_slice(json_body).expect("yaml parser");
        assert_eq!(fast, yaml);
        let block = b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\n";
        assert_eq!(
            parse_body(block, true).expect("yaml")["metadata"]["name"],
            "c"
        );
        let flow = b"{apiVersion: v1, kind: ConfigMap, metadata: {name: c}}";
        assert_eq!(parse_body(flow, true).expect("flow")["kind"], "ConfigMap");
        let err = parse_body(b"{\"a\": [", true).expect_err("truncated");
        assert!(err.message.contains("YAML"), "{}", err.message);
    }
}
