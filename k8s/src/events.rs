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

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;
    use membrane_store::Kind;

    async fn body_json(req: Request<Body>) -> serde_json::Value {
        let bytes = req.into_body().collect_bytes().await.expect("body");
        serde_json::from_slice(&bytes).expect("json body")
    }

    /// The first warning creates an events.k8s.io/v1 Event regarding the
    /// object; the same warning again patches `series.count` on that Event
    /// instead of creating a second one.
    #[tokio::test]
    async fn a_repeated_warning_raises_the_series_count() {
        let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(mock, "default");
        let server = tokio::spawn(async move {
            let (req, send) = handle.next_request().await.expect("create");
            assert_eq!(req.method().as_str(), "POST");
            assert_eq!(
                req.uri().path(),
                "/apis/events.k8s.io/v1/namespaces/shop/events"
            );
            let body = body_json(req).await;
            assert_eq!(body["type"], "Warning");
            assert_eq!(body["reason"], "MissingBackend");
            assert_eq!(body["regarding"]["kind"], "Ingress");
            assert_eq!(body["regarding"]["name"], "web");
            assert_eq!(body["regarding"]["uid"], "u-1");
            assert_eq!(body["reportingController"], "membrane-operator");
            let name = body["metadata"]["name"].as_str().expect("name").to_owned();
            assert!(name.starts_with("web."), "{name}");
            send.send_response(
                Response::builder()
                    .body(Body::from(serde_json::to_vec(&body).expect("json")))
                    .expect("response"),
            );
            let (req, send) = handle.next_request().await.expect("patch");
            assert_eq!(req.method().as_str(), "PATCH");
            assert_eq!(
                req.uri().path(),
                format!("/apis/events.k8s.io/v1/namespaces/shop/events/{name}")
            );
            let patch = body_json(req).await;
            assert_eq!(patch["series"]["count"], 2);
            send.send_response(
                Response::builder()
                    .body(Body::from(serde_json::to_vec(&body).expect("json")))
                    .expect("response"),
            );
        });
        let recorder = EventRecorder::new(client, "membrane-operator", "op-1");
        let w = Warning {
            regarding: ObjectKey::new(Kind::Ingress, "shop", "web"),
            uid: Some("u-1".into()),
            reason: "MissingBackend".into(),
            note: "spec.rules[0].http.paths[0].backend.service.name: Service shop/x not found"
                .into(),
        };
        recorder.warn(&w).await.expect("first");
        recorder.warn(&w).await.expect("repeat");
        server.await.expect("mock server");
    }
}
