//! Kubernetes mode's write side: what Membrane generates goes to the API
//! by server-side apply under one field manager per role, so the operator
//! and the agents own exactly the fields they write and never fight users
//! (or each other) over the rest. Status goes through the status
//! subresource. Deleting what is already gone is not an error.

use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use membrane_store::{Kind, Object, ObjectKey};
use serde_json::Value;

use crate::api_resource;

/// Field manager of `membrane operator` (Ingress → CEC, Services, status).
pub const OPERATOR_MANAGER: &str = "membrane-operator";
/// Field manager of `membrane agent` (per-node reports).
pub const AGENT_MANAGER: &str = "membrane-agent";

/// Errors of writes, each naming the object.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Another writer changed the object since it was read (409 on update).
    #[error("{key}: conflict: {message}")]
    Conflict { key: ObjectKey, message: String },
    /// The API refused the write (validation, permissions, …).
    #[error("{key}: the API refused {verb} ({code} {reason}): {message}")]
    Refused {
        key: ObjectKey,
        verb: &'static str,
        code: u16,
        reason: String,
        message: String,
    },
    #[error("{key}: {verb}: {source}")]
    Client {
        key: ObjectKey,
        verb: &'static str,
        source: kube::Error,
    },
    #[error("{key}: cannot encode: {source}")]
    Encode {
        key: ObjectKey,
        source: serde_json::Error,
    },
}

/// Writes objects to a Kubernetes API as one field manager.
#[derive(Clone)]
pub struct Writer {
    client: kube::Client,
    manager: &'static str,
}

impl Writer {
    pub fn new(client: kube::Client, manager: &'static str) -> Self {
        Self { client, manager }
    }

    fn api(&self, kind: Kind, namespace: &str) -> Api<DynamicObject> {
        let ar = api_resource(kind);
        if kind.namespaced() {
            Api::namespaced_with(self.client.clone(), namespace, &ar)
        } else {
            Api::all_with(self.client.clone(), &ar)
        }
    }

    /// Server-side apply of `obj` as this manager, taking over fields other
    /// managers hold (Membrane is the source of truth for what it generates).
    pub async fn apply(&self, obj: &Object) -> Result<(), WriteError> {
        let key = obj.key();
        let mut body = obj.to_value();
        strip_server_fields(&mut body);
        let params = PatchParams::apply(self.manager).force();
        self.api(key.kind, &key.namespace)
            .patch(&key.name, &params, &Patch::Apply(body))
            .await
            .map(drop)
            .map_err(|e| classify(&key, "apply", e))
    }

    /// Server-side apply of `status` through the status subresource.
    pub async fn apply_status(&self, key: &ObjectKey, status: Value) -> Result<(), WriteError> {
        let body = serde_json::json!({
            "apiVersion": key.kind.api_version(),
            "kind": key.kind.kind_name(),
            "metadata": {"name": key.name},
            "status": status,
        });
        let params = PatchParams::apply(self.manager).force();
        self.api(key.kind, &key.namespace)
            .patch_status(&key.name, &params, &Patch::Apply(body))
            .await
            .map(drop)
            .map_err(|e| classify(key, "apply status", e))
    }

    /// Update (PUT) guarded by the object's resourceVersion: a stale read is
    /// a [`WriteError::Conflict`], to be retried from a fresh read.
    pub async fn replace(&self, obj: &Object) -> Result<(), WriteError> {
        let key = obj.key();
        let data: DynamicObject =
            serde_json::from_value(obj.to_value()).map_err(|source| WriteError::Encode {
                key: key.clone(),
                source,
            })?;
        let params = PostParams {
            field_manager: Some(self.manager.to_owned()),
            ..PostParams::default()
        };
        self.api(key.kind, &key.namespace)
            .replace(&key.name, &params, &data)
            .await
            .map(drop)
            .map_err(|e| classify(&key, "update", e))
    }

    /// Deletes `key` (background propagation); an object already gone is fine.
    pub async fn delete(&self, key: &ObjectKey) -> Result<(), WriteError> {
        match self
            .api(key.kind, &key.namespace)
            .delete(&key.name, &DeleteParams::background())
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(classify(key, "delete", e)),
        }
    }
}

/// Fields the server owns: sending them in an apply patch is refused or
/// silently claims them.
fn strip_server_fields(body: &mut Value) {
    if let Some(meta) = body.get_mut("metadata").and_then(Value::as_object_mut) {
        for field in [
            "resourceVersion",
            "uid",
            "creationTimestamp",
            "generation",
            "managedFields",
        ] {
            meta.remove(field);
        }
    }
    if let Some(map) = body.as_object_mut() {
        map.remove("status");
    }
}

fn classify(key: &ObjectKey, verb: &'static str, e: kube::Error) -> WriteError {
    match e {
        kube::Error::Api(s) if s.code == 409 && verb == "update" => WriteError::Conflict {
            key: key.clone(),
            message: s.message.clone(),
        },
        kube::Error::Api(s) => WriteError::Refused {
            key: key.clone(),
            verb,
            code: s.code,
            reason: s.reason.clone(),
            message: s.message.clone(),
        },
        source => WriteError::Client {
            key: key.clone(),
            verb,
            source,
        },
    }
}
