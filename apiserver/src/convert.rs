//! events.k8s.io/v1 Events are stored as core/v1 Events (one storage, as
//! in Kubernetes), so Events an operator records through events.k8s.io
//! show in `kubectl describe`, which reads core/v1. Pure.

use serde_json::{Map, Value};

/// (core/v1 field, events.k8s.io/v1 field)
const RENAMES: &[(&str, &str)] = &[
    ("involvedObject", "regarding"),
    ("message", "note"),
    ("source", "deprecatedSource"),
    ("firstTimestamp", "deprecatedFirstTimestamp"),
    ("lastTimestamp", "deprecatedLastTimestamp"),
    ("count", "deprecatedCount"),
    ("reportingComponent", "reportingController"),
];

fn rename(v: &Value, to_core: bool, api_version: &str) -> Value {
    let Value::Object(m) = v else {
        return v.clone();
    };
    let mut out = Map::new();
    for (k, val) in m {
        let renamed = RENAMES
            .iter()
            .find(|(core, events)| if to_core { k == events } else { k == core })
            .map(|(core, events)| if to_core { *core } else { *events })
            .unwrap_or(k);
        out.insert(renamed.to_string(), val.clone());
    }
    out.insert("apiVersion".into(), Value::String(api_version.into()));
    out.insert("kind".into(), Value::String("Event".into()));
    Value::Object(out)
}

/// An events.k8s.io/v1 Event as a core/v1 Event.
pub fn event_to_core(v: &Value) -> Value {
    rename(v, true, "v1")
}

/// A core/v1 Event as an events.k8s.io/v1 Event.
pub fn event_from_core(v: &Value) -> Value {
    rename(v, false, "events.k8s.io/v1")
}

/// A field selector on events.k8s.io fields, in core/v1 field names.
pub fn event_selector_to_core(sel: &str) -> String {
    sel.split(',')
        .map(|req| {
            let mut r = req.to_string();
            for (core, events) in RENAMES {
                if r.starts_with(&format!("{events}."))
                    || r.starts_with(&format!("{events}="))
                    || r.starts_with(&format!("{events}!="))
                {
                    r = format!("{core}{}", &r[events.len()..]);
                }
            }
            r
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trip() {
        let v1 = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": "e"}, "regarding": {"kind": "Ingress", "name": "a", "uid": "u"},
            "note": "hello", "reason": "Synced", "type": "Normal", "reportingController": "membrane",
            "reportingInstance": "i", "action": "Reconcile", "eventTime": "2026-01-01T00:00:00.000000Z"});
        let core = event_to_core(&v1);
        assert_eq!(core["apiVersion"], "v1");
        assert_eq!(core["involvedObject"]["uid"], "u");
        assert_eq!(core["message"], "hello");
        assert_eq!(core["reportingComponent"], "membrane");
        assert_eq!(event_from_core(&core), v1);
        assert_eq!(
            event_selector_to_core("regarding.name=a,reason=Synced"),
            "involvedObject.name=a,reason=Synced"
        );
    }
}
