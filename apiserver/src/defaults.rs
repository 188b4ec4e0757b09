//! Defaulting that the Kubernetes API server applies to built-in kinds and
//! clients rely on (kubectl dereferences these fields). Pure.

use serde_json::{Value, json};

fn each_mut(v: &mut Value, f: impl Fn(&mut serde_json::Map<String, Value>)) {
    if let Some(items) = v.as_array_mut() {
        for item in items {
            if let Some(m) = item.as_object_mut() {
                f(m);
            }
        }
    }
}

fn default_protocol(m: &mut serde_json::Map<String, Value>) {
    m.entry("protocol").or_insert(json!("TCP"));
}

/// Fill in defaults for an object of `kind` in the API group `group`.
pub fn apply(group: &str, kind: &str, obj: &mut Value) {
    if !obj.is_object() {
        return;
    }
    match (group, kind) {
        ("discovery.k8s.io", "EndpointSlice") => {
            each_mut(&mut obj["ports"], |p| {
                p.entry("name").or_insert(json!(""));
                default_protocol(p);
            });
        }
        ("", "Service") => {
            let spec = &mut obj["spec"];
            if !spec.is_object() {
                return;
            }
            if spec["type"].is_null() {
                spec["type"] = json!("ClusterIP");
            }
            if spec["sessionAffinity"].is_null() {
                spec["sessionAffinity"] = json!("None");
            }
            each_mut(&mut spec["ports"], |p| {
                default_protocol(p);
                if !p.contains_key("targetPort")
                    && let Some(port) = p.get("port").cloned()
                {
                    p.insert("targetPort".into(), port);
                }
            });
        }
        ("", "Secret") if obj["type"].is_null() => {
            obj["type"] = json!("Opaque");
        }
        ("", "Endpoints") => {
            each_mut(&mut obj["subsets"], |s| {
                if let Some(ports) = s.get_mut("ports") {
                    each_mut(ports, default_protocol);
                }
            });
        }
        ("", "Pod") => {
            for list in ["containers", "initContainers"] {
                if let Some(containers) = obj.get_mut("spec").and_then(|s| s.get_mut(list)) {
                    each_mut(containers, |c| {
                        if let Some(ports) = c.get_mut("ports") {
                            each_mut(ports, default_protocol);
                        }
                    });
                }
            }
        }
        _ => {}
    }
    // Indexing above may have created `null` members on odd input.
    if let Some(m) = obj.as_object_mut() {
        m.retain(|_, v| !v.is_null());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpointslice_and_service_ports() {
        let mut es = json!({"ports": [{"port": 80}]});
        apply("discovery.k8s.io", "EndpointSlice", &mut es);
        assert_eq!(
            es["ports"][0],
            json!({"port": 80, "name": "", "protocol": "TCP"})
        );
        let mut svc = json!({"spec": {"ports": [{"port": 80}]}});
        apply("", "Service", &mut svc);
        assert_eq!(svc["spec"]["ports"][0]["targetPort"], 80);
        assert_eq!(svc["spec"]["type"], "ClusterIP");
        let mut cm = json!({"data": {}});
        apply("", "ConfigMap", &mut cm);
        assert_eq!(cm, json!({"data": {}}));
    }
}
