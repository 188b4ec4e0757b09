//! Warning Events (`events.k8s.io/v1`) about rejected objects, deduplicated
//! as client-go's recorder does: the first occurrence creates an Event, a
//! repeat of the same (object, reason, note) raises `series.count` on it
//! instead of creating another, so `kubectl describe` shows one line per
//! distinct problem.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::jiff::Timestamp;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use membrane_store::ObjectKey;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::sink::Warning;
use crate::write::WriteError;

/// (object, reason, note): what makes two warnings the same Event.
type EventId = (ObjectKey, String, String);

/// Records Warning Events as one reporting controller and instance.
#[derive(Clone)]
pub struct EventRecorder {
    client: kube::Client,
    controller: String,
    instance: String,
    /// (object, reason, note) → (Event name, count so far).
    seen: Arc<Mutex<HashMap<EventId, (String, i64)>>>,
}

fn events_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("events.k8s.io", "v1", "Event"),
        "events",
    )
}

/// Event time in the API's MicroTime format.
fn micro_time() -> String {
    Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

impl EventRecorder {
    /// `controller` is e.g. `membrane.io/operator`; `instance` names this
    /// process (its leader-election identity).
    pub fn new(client: kube::Client, controller: &str, instance: &str) -> Self {
        Self {
            client,
            controller: controller.to_owned(),
            instance: instance.to_owned(),
            seen: Default::default(),
        }
    }

    /// Records `w`: a new Event, or one more in the series of the same one.
    pub async fn warn(&self, w: &Warning) -> Result<(), WriteError> {
        let key = &w.regarding;
        // Events of cluster-scoped objects live in `default`, as kubectl expects.
        let ns = if key.namespace.is_empty() {
            "default"
        } else {
            key.namespace.as_str()
        };
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), ns, &events_resource());
        let id = (key.clone(), w.reason.clone(), w.note.clone());
        let previous = self.seen.lock().ok().and_then(|s| s.get(&id).cloned());
        let now = micro_time();
        if let Some((name, count)) = previous {
            let patch = json!({"series": {"count": count + 1, "lastObservedTime": now}});
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                .await
            {
                Ok(_) => {
                    if let Ok(mut s) = self.seen.lock() {
                        s.insert(id, (name, count + 1));
                    }
                    return Ok(());
                }
                // Expired (event TTL): start a new one.
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(classify(key, e)),
            }
        }
        let digest = Sha256::digest(format!("{}|{}|{}|{}", key, w.reason, w.note, now));
        let suffix: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
        let name = format!("{}.{suffix}", key.name);
        let body = json!({
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": ns},
            "eventTime": now,
            "type": "Warning",
            "reason": w.reason,
            "note": truncate(&w.note, 1024),
            "action": "Reconcile",
            "reportingController": self.controller,
            "reportingInstance": self.instance,
            "regarding": {
                "apiVersion": key.kind.api_version(),
                "kind": key.kind.kind_name(),
                "namespace": if key.namespace.is_empty() { None } else { Some(&key.namespace) },
                "name": key.name,
                "uid": w.uid,
            },
        });
        let obj: DynamicObject =
            serde_json::from_value(body).map_err(|source| WriteError::Encode {
                key: key.clone(),
                source,
            })?;
        api.create(&PostParams::default(), &obj)
            .await
            .map_err(|e| classify(key, e))?;
        if let Ok(mut s) = self.seen.lock() {
            s.insert(id, (name, 1));
        }
        Ok(())
    }
}

/// The API limits an Event's note to 1 KiB.
fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

fn classify(key: &ObjectKey, e: kube::Error) -> WriteError {
    match e {
        kube::Error::Api(s) => WriteError::Refused {
            key: key.clone(),
            verb: "record event",
            code: s.code,
            reason: s.reason.clone(),
            message: s.message.clone(),
        },
        source => WriteError::Client {
            key: key.clone(),
            verb: "record event",
            source,
        },
    }
}
