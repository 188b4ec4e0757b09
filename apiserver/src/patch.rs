//! Patches: JSON merge patch (RFC 7386), JSON patch (RFC 6902) and
//! Kubernetes strategic merge patch for the list fields of the kinds served
//! here. Pure.

use serde_json::{Map, Value};

use crate::error::ApiError;

/// RFC 7386: objects merge recursively, `null` deletes, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

fn pointer_parts(path: &str) -> Result<Vec<String>, ApiError> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    let rest = path
        .strip_prefix('/')
        .ok_or_else(|| ApiError::bad_request(format!("json patch: invalid path {path:?}")))?;
    Ok(rest.split('/').map(unescape).collect())
}

fn parent_mut<'a>(
    doc: &'a mut Value,
    parts: &[String],
    path: &str,
) -> Result<&'a mut Value, ApiError> {
    let mut cur = doc;
    for p in &parts[..parts.len().saturating_sub(1)] {
        cur = match cur {
            Value::Object(m) => m.get_mut(p),
            Value::Array(a) => p.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
            _ => None,
        }
        .ok_or_else(|| {
            ApiError::bad_request(format!("json patch: path {path:?} does not exist"))
        })?;
    }
    Ok(cur)
}

fn pointer_remove(doc: &mut Value, path: &str) -> Result<Value, ApiError> {
    let parts = pointer_parts(path)?;
    let Some(last) = parts.last() else {
        return Ok(std::mem::take(doc));
    };
    let missing = || ApiError::bad_request(format!("json patch: path {path:?} does not exist"));
    match parent_mut(doc, &parts, path)? {
        Value::Object(m) => m.remove(last).ok_or_else(missing),
        Value::Array(a) => match last.parse::<usize>() {
            Ok(i) if i < a.len() => Ok(a.remove(i)),
            _ => Err(missing()),
        },
        _ => Err(missing()),
    }
}

fn pointer_add(doc: &mut Value, path: &str, value: Value, replace: bool) -> Result<(), ApiError> {
    let parts = pointer_parts(path)?;
    let Some(last) = parts.last() else {
        *doc = value;
        return Ok(());
    };
    let bad = || ApiError::bad_request(format!("json patch: cannot set {path:?}"));
    match parent_mut(doc, &parts, path)? {
        Value::Object(m) => {
            if replace && !m.contains_key(last) {
                return Err(bad());
            }
            m.insert(last.clone(), value);
        }
        Value::Array(a) => {
            if last == "-" && !replace {
                a.push(value);
            } else {
                let i: usize = last.parse().map_err(|_| bad())?;
                if replace {
                    *a.get_mut(i).ok_or_else(bad)? = value;
                } else if i <= a.len() {
                    a.insert(i, value);
                } else {
                    return Err(bad());
                }
            }
        }
        _ => return Err(bad()),
    }
    Ok(())
}

/// RFC 6902 JSON patch.
pub fn json_patch(doc: &mut Value, patch: &Value) -> Result<(), ApiError> {
    let ops = patch
        .as_array()
        .ok_or_else(|| ApiError::bad_request("json patch: expected an array of operations"))?;
    for op in ops {
        let path = op["path"].as_str().unwrap_or_default();
        let from = op["from"].as_str().unwrap_or_default();
        match op["op"].as_str().unwrap_or_default() {
            "add" => pointer_add(doc, path, op["value"].clone(), false)?,
            "replace" => pointer_add(doc, path, op["value"].clone(), true)?,
            "remove" => {
                pointer_remove(doc, path)?;
            }
            "move" => {
                let v = pointer_remove(doc, from)?;
                pointer_add(doc, path, v, false)?;
            }
            "copy" => {
                let v = doc.pointer(from).cloned().ok_or_else(|| {
                    ApiError::bad_request(format!("json patch: {from:?} does not exist"))
                })?;
                pointer_add(doc, path, v, false)?;
            }
            "test" => {
                if doc.pointer(path) != Some(&op["value"]) {
                    return Err(ApiError::new(
                        422,
                        "Invalid",
                        format!("json patch: test of {path:?} failed"),
                    ));
                }
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "json patch: unknown operation {other:?}"
                )));
            }
        }
    }
    Ok(())
}

/// How a list field merges in a strategic merge patch.
#[derive(Debug, PartialEq, Eq)]
pub enum ListStrategy {
    /// Elements are maps identified by this key.
    MergeKey(&'static str),
    /// A set of primitives (union).
    PrimitiveMerge,
    /// The patch replaces the list (atomic).
    Replace,
}

/// The patch strategy of the list at `path` (field names from the root,
/// list indices left out), as the Kubernetes types declare it.
pub fn list_strategy(path: &[String]) -> ListStrategy {
    let Some(field) = path.last() else {
        return ListStrategy::Replace;
    };
    let parent = path.len().checked_sub(2).map(|i| path[i].as_str());
    match field.as_str() {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets"
        | "secrets" => ListStrategy::MergeKey("name"),
        "volumeMounts" => ListStrategy::MergeKey("mountPath"),
        "volumeDevices" => ListStrategy::MergeKey("devicePath"),
        "ownerReferences" => ListStrategy::MergeKey("uid"),
        "conditions" => ListStrategy::MergeKey("type"),
        "hostAliases" => ListStrategy::MergeKey("ip"),
        "topologySpreadConstraints" => ListStrategy::MergeKey("topologyKey"),
        "finalizers" => ListStrategy::PrimitiveMerge,
        "ports" => match parent {
            Some("containers" | "initContainers" | "ephemeralContainers") => {
                ListStrategy::MergeKey("containerPort")
            }
            // Service.spec.ports
            Some("spec") if path.len() == 2 => ListStrategy::MergeKey("port"),
            _ => ListStrategy::Replace,
        },
        _ => ListStrategy::Replace,
    }
}

/// Kubernetes strategic merge patch of `target` by `patch`.
pub fn strategic_merge_patch(target: &mut Value, patch: &Value) -> Result<(), ApiError> {
    smp_value(target, patch, &mut Vec::new())
}

fn smp_value(target: &mut Value, patch: &Value, path: &mut Vec<String>) -> Result<(), ApiError> {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return Ok(());
    };
    match p.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            *target = Value::Object(strip_directives(p));
            return Ok(());
        }
        Some("delete") => {
            *target = Value::Null;
            return Ok(());
        }
        Some(other) if other != "merge" => {
            return Err(ApiError::bad_request(format!(
                "strategic merge patch: unknown $patch directive {other:?} at {}",
                path.join(".")
            )));
        }
        _ => {}
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else {
        return Ok(());
    };
    // Primitive list deletions are applied before the merge.
    for (k, v) in p {
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/")
            && let (Some(Value::Array(list)), Some(del)) = (t.get_mut(field), v.as_array())
        {
            list.retain(|e| !del.contains(e));
        }
    }
    for (k, v) in p {
        if k.starts_with('$') {
            // $setElementOrder/*, $retainKeys, $deleteFromPrimitiveList/*:
            // ordering and retention hints that do not change content here.
            continue;
        }
        if v.is_null() {
            t.remove(k);
            continue;
        }
        path.push(k.clone());
        match v {
            Value::Array(items) => {
                let cur = t.entry(k.clone()).or_insert(Value::Null);
                smp_list(cur, items, path)?;
            }
            Value::Object(_) => {
                let cur = t.entry(k.clone()).or_insert(Value::Null);
                smp_value(cur, v, path)?;
                if cur.is_null() {
                    t.remove(k);
                }
            }
            _ => {
                t.insert(k.clone(), v.clone());
            }
        }
        path.pop();
    }
    Ok(())
}

fn strip_directives(m: &Map<String, Value>) -> Map<String, Value> {
    m.iter()
        .filter(|(k, _)| !k.starts_with('$'))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn smp_list(target: &mut Value, items: &[Value], path: &mut Vec<String>) -> Result<(), ApiError> {
    // `{"$patch": "replace"}` among the elements replaces the whole list.
    let replace = items
        .iter()
        .any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace"));
    let rest: Vec<Value> = items
        .iter()
        .filter(|i| i.get("$patch").and_then(Value::as_str) != Some("replace"))
        .cloned()
        .collect();
    let strategy = list_strategy(path);
    if replace || strategy == ListStrategy::Replace || !target.is_array() {
        let cleaned = rest
            .into_iter()
            .filter(|i| i.get("$patch").and_then(Value::as_str) != Some("delete"))
            .map(|i| match i {
                Value::Object(m) => Value::Object(strip_directives(&m)),
                other => other,
            })
            .collect();
        *target = Value::Array(cleaned);
        return Ok(());
    }
    let Value::Array(cur) = target else {
        return Ok(());
    };
    match strategy {
        ListStrategy::PrimitiveMerge => {
            for item in rest {
                if !cur.contains(&item) {
                    cur.push(item);
                }
            }
        }
        ListStrategy::MergeKey(key) => {
            for item in rest {
                let Some(id) = item.get(key).cloned() else {
                    return Err(ApiError::bad_request(format!(
                        "strategic merge patch: an element of {} has no merge key {key:?}",
                        path.join(".")
                    )));
                };
                let pos = cur.iter().position(|e| e.get(key) == Some(&id));
                let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
                match (pos, delete) {
                    (Some(i), true) => {
                        cur.remove(i);
                    }
                    (None, true) => {}
                    (Some(i), false) => smp_value(&mut cur[i], &item, path)?,
                    (None, false) => {
                        let mut fresh = Value::Null;
                        smp_value(&mut fresh, &item, path)?;
                        cur.push(fresh);
                    }
                }
            }
        }
        ListStrategy::Replace => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_rfc7386() {
        let mut t = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]});
        merge_patch(&mut t, &json!({"a": "z", "c": {"f": null}, "l": [3]}));
        assert_eq!(t, json!({"a": "z", "c": {"d": "e"}, "l": [3]}));
    }

    #[test]
    fn json_patch_ops() {
        let mut t = json!({"metadata": {"labels": {"a/b": "1"}}, "l": [1, 2]});
        json_patch(
            &mut t,
            &json!([
                {"op": "add", "path": "/l/-", "value": 3},
                {"op": "replace", "path": "/metadata/labels/a~1b", "value": "2"},
                {"op": "remove", "path": "/l/0"},
                {"op": "test", "path": "/l/0", "value": 2},
                {"op": "copy", "from": "/l/0", "path": "/x"},
            ]),
        )
        .expect("patch");
        assert_eq!(
            t,
            json!({"metadata": {"labels": {"a/b": "2"}}, "l": [2, 3], "x": 2})
        );
        assert!(json_patch(&mut t, &json!([{"op": "test", "path": "/x", "value": 9}])).is_err());
        assert!(json_patch(&mut t, &json!([{"op": "remove", "path": "/nope"}])).is_err());
    }

    #[test]
    fn smp_merges_containers_by_name_and_ports_by_port() {
        let mut pod = json!({"spec": {"containers": [
            {"name": "a", "image": "x", "ports": [{"containerPort": 80}], "env": [{"name": "E", "value": "1"}]},
            {"name": "b", "image": "y"}]}});
        strategic_merge_patch(
            &mut pod,
            &json!({"spec": {"$setElementOrder/containers": [{"name": "a"}, {"name": "b"}],
                "containers": [
                    {"name": "a", "ports": [{"containerPort": 443}], "env": [{"name": "E", "$patch": "delete"}]},
                    {"name": "b", "image": "z"}]}}),
        )
        .expect("patch");
        assert_eq!(pod["spec"]["containers"][0]["image"], "x");
        assert_eq!(
            pod["spec"]["containers"][0]["ports"]
                .as_array()
                .map(Vec::len),
            Some(2)
        );
        assert_eq!(pod["spec"]["containers"][0]["env"], json!([]));
        assert_eq!(pod["spec"]["containers"][1]["image"], "z");

        let mut svc = json!({"spec": {"ports": [{"port": 80, "name": "http"}, {"port": 443}]}});
        strategic_merge_patch(
            &mut svc,
            &json!({"spec": {"ports": [{"port": 80, "name": "web"}]}}),
        )
        .expect("patch");
        assert_eq!(
            svc["spec"]["ports"],
            json!([{"port": 80, "name": "web"}, {"port": 443}])
        );
    }

    #[test]
    fn smp_replaces_atomic_lists_and_honours_directives() {
        let mut ing = json!({"metadata": {"finalizers": ["a"], "labels": {"x": "1", "y": "2"}},
            "spec": {"rules": [{"host": "a"}, {"host": "b"}], "tls": {"k": 1}}});
        strategic_merge_patch(
            &mut ing,
            &json!({"metadata": {"finalizers": ["b"], "labels": {"y": null},
                                 "$deleteFromPrimitiveList/finalizers": ["a"]},
                    "spec": {"rules": [{"host": "c"}], "tls": {"$patch": "replace", "j": 2}}}),
        )
        .expect("patch");
        assert_eq!(ing["metadata"]["finalizers"], json!(["b"]));
        assert_eq!(ing["metadata"]["labels"], json!({"x": "1"}));
        assert_eq!(ing["spec"]["rules"], json!([{"host": "c"}]));
        assert_eq!(ing["spec"]["tls"], json!({"j": 2}));
        let mut o = json!({"spec": {"a": {"b": 1}}});
        strategic_merge_patch(&mut o, &json!({"spec": {"a": {"$patch": "delete"}}}))
            .expect("patch");
        assert_eq!(o, json!({"spec": {}}));
    }
}
