//! Field ownership (`metadata.managedFields`, FieldsV1) and server-side
//! apply: the applied configuration is merged into the live object, fields
//! the applier stopped setting are removed when nobody else owns them, and
//! a field another manager owns with a different value is a conflict unless
//! forced. Pure.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

use crate::error::ApiError;
use crate::patch::{ListStrategy, list_strategy};

/// A set of field paths; a path is FieldsV1 keys (`f:spec`, `k:{"name":"a"}`,
/// `v:"x"`), and `.` ends a path that names a list element itself.
pub type FieldSet = BTreeSet<Vec<String>>;

/// One `managedFields` entry.
#[derive(Clone, Debug, PartialEq)]
pub struct Managed {
    pub manager: String,
    pub operation: String,
    pub api_version: String,
    pub time: String,
    pub subresource: String,
    pub fields: FieldSet,
}

/// Fields that belong to the server, never to a manager.
fn ignored(path: &[String], key: &str) -> bool {
    match path {
        [] => matches!(key, "apiVersion" | "kind"),
        [m] if m == "f:metadata" => matches!(
            key,
            "name"
                | "namespace"
                | "uid"
                | "resourceVersion"
                | "generation"
                | "creationTimestamp"
                | "managedFields"
                | "deletionTimestamp"
                | "deletionGracePeriodSeconds"
                | "selfLink"
        ),
        _ => false,
    }
}

/// Names of the plain field path (for list strategies).
fn plain(path: &[String]) -> Vec<String> {
    path.iter()
        .filter_map(|s| s.strip_prefix("f:").map(String::from))
        .collect()
}

/// Every leaf field path set in `obj` (status left out when `skip_status`).
pub fn fields_of(obj: &Value, skip_status: bool) -> FieldSet {
    let mut out = FieldSet::new();
    let mut path = Vec::new();
    if let Value::Object(m) = obj {
        for (k, v) in m {
            if ignored(&path, k) || (skip_status && k == "status") {
                continue;
            }
            path.push(format!("f:{k}"));
            walk(v, &mut path, &mut out);
            path.pop();
        }
    }
    out
}

fn walk(v: &Value, path: &mut Vec<String>, out: &mut FieldSet) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, child) in m {
                if ignored(path, k) {
                    continue;
                }
                path.push(format!("f:{k}"));
                walk(child, path, out);
                path.pop();
            }
        }
        Value::Array(items) if !items.is_empty() => match list_strategy(&plain(path)) {
            ListStrategy::MergeKey(key) => {
                for item in items {
                    let Some(id) = item.get(key) else {
                        out.insert(path.clone());
                        continue;
                    };
                    path.push(format!("k:{}", json!({ key: id })));
                    let mut dot = path.clone();
                    dot.push(".".into());
                    out.insert(dot);
                    walk(item, path, out);
                    path.pop();
                }
            }
            ListStrategy::PrimitiveMerge => {
                for item in items {
                    let mut p = path.clone();
                    p.push(format!("v:{item}"));
                    out.insert(p);
                }
            }
            ListStrategy::Replace => {
                out.insert(path.clone());
            }
        },
        _ => {
            out.insert(path.clone());
        }
    }
}

/// The value at a field path, if set.
pub fn value_at<'a>(obj: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = obj;
    for seg in path {
        if seg == "." {
            return Some(cur);
        }
        cur = if let Some(f) = seg.strip_prefix("f:") {
            cur.get(f)?
        } else if let Some(k) = seg.strip_prefix("k:") {
            let want: Map<String, Value> = serde_json::from_str(k).ok()?;
            cur.as_array()?
                .iter()
                .find(|e| want.iter().all(|(wk, wv)| e.get(wk) == Some(wv)))?
        } else if let Some(v) = seg.strip_prefix("v:") {
            let want: Value = serde_json::from_str(v).ok()?;
            cur.as_array()?.iter().find(|e| **e == want)?
        } else {
            return None;
        };
    }
    Some(cur)
}

/// Remove the field at `path` (a list element for `k:`/`v:` ... `.`).
fn remove_at(obj: &mut Value, path: &[String]) {
    let Some((last, parent)) = path.split_last() else {
        return;
    };
    if last == "." {
        // The element itself: remove it from its list.
        if let Some((elem, list_path)) = parent.split_last() {
            remove_element(obj, list_path, elem);
        }
        return;
    }
    if last.starts_with("v:") || last.starts_with("k:") {
        remove_element(obj, parent, last);
        return;
    }
    let mut cur = obj;
    for seg in parent {
        let next = if let Some(f) = seg.strip_prefix("f:") {
            cur.get_mut(f)
        } else if let Some(k) = seg.strip_prefix("k:") {
            let Ok(want) = serde_json::from_str::<Map<String, Value>>(k) else {
                return;
            };
            cur.as_array_mut().and_then(|a| {
                a.iter_mut()
                    .find(|e| want.iter().all(|(wk, wv)| e.get(wk) == Some(wv)))
            })
        } else {
            None
        };
        match next {
            Some(n) => cur = n,
            None => return,
        }
    }
    if let (Some(f), Value::Object(m)) = (last.strip_prefix("f:"), cur) {
        m.remove(f);
    }
}

fn remove_element(obj: &mut Value, list_path: &[String], elem: &str) {
    let mut cur = &mut *obj;
    for seg in list_path {
        let next = match seg.strip_prefix("f:") {
            Some(f) => cur.get_mut(f),
            None => None,
        };
        match next {
            Some(n) => cur = n,
            None => return,
        }
    }
    let Value::Array(items) = cur else { return };
    if let Some(k) = elem.strip_prefix("k:") {
        if let Ok(want) = serde_json::from_str::<Map<String, Value>>(k) {
            items.retain(|e| !want.iter().all(|(wk, wv)| e.get(wk) == Some(wv)));
        }
    } else if let Some(v) = elem.strip_prefix("v:")
        && let Ok(want) = serde_json::from_str::<Value>(v)
    {
        items.retain(|e| *e != want);
    }
}

/// Deep merge of an applied configuration into the live object.
fn merge(live: &mut Value, applied: &Value, path: &mut Vec<String>) {
    match applied {
        Value::Object(a) => {
            if !live.is_object() {
                *live = Value::Object(Map::new());
            }
            if let Value::Object(l) = live {
                for (k, v) in a {
                    path.push(k.clone());
                    merge(l.entry(k.clone()).or_insert(Value::Null), v, path);
                    path.pop();
                }
            }
        }
        Value::Array(items) => {
            let strategy = list_strategy(path);
            match (strategy, live.as_array_mut()) {
                (ListStrategy::MergeKey(key), Some(cur)) => {
                    for item in items {
                        match cur.iter().position(|e| e.get(key) == item.get(key)) {
                            Some(i) => merge(&mut cur[i], item, path),
                            None => cur.push(item.clone()),
                        }
                    }
                }
                (ListStrategy::PrimitiveMerge, Some(cur)) => {
                    for item in items {
                        if !cur.contains(item) {
                            cur.push(item.clone());
                        }
                    }
                }
                _ => *live = applied.clone(),
            }
        }
        other => *live = other.clone(),
    }
}

/// FieldsV1 JSON of a field set.
pub fn to_fields_v1(set: &FieldSet) -> Value {
    let mut root = Value::Object(Map::new());
    for path in set {
        let mut cur = &mut root;
        for seg in path {
            let Value::Object(m) = cur else { break };
            cur = m
                .entry(seg.clone())
                .or_insert_with(|| Value::Object(Map::new()));
        }
    }
    root
}

/// Field set of FieldsV1 JSON.
pub fn from_fields_v1(v: &Value) -> FieldSet {
    fn go(v: &Value, path: &mut Vec<String>, out: &mut FieldSet) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, child) in m {
                    path.push(k.clone());
                    go(child, path, out);
                    path.pop();
                }
            }
            _ => {
                if !path.is_empty() {
                    out.insert(path.clone());
                }
            }
        }
    }
    let mut out = FieldSet::new();
    go(v, &mut Vec::new(), &mut out);
    out
}

/// Parse `metadata.managedFields`.
pub fn read_managed(obj: &Value) -> Vec<Managed> {
    obj["metadata"]["managedFields"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| Managed {
                    manager: e["manager"].as_str().unwrap_or_default().into(),
                    operation: e["operation"].as_str().unwrap_or("Update").into(),
                    api_version: e["apiVersion"].as_str().unwrap_or_default().into(),
                    time: e["time"].as_str().unwrap_or_default().into(),
                    subresource: e["subresource"].as_str().unwrap_or_default().into(),
                    fields: from_fields_v1(&e["fieldsV1"]),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Write `metadata.managedFields` (empty entries dropped).
pub fn write_managed(obj: &mut Value, managed: &[Managed]) {
    let entries: Vec<Value> = managed
        .iter()
        .filter(|m| !m.fields.is_empty())
        .map(|m| {
            let mut e = json!({
                "manager": m.manager,
                "operation": m.operation,
                "apiVersion": m.api_version,
                "time": m.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": to_fields_v1(&m.fields),
            });
            if !m.subresource.is_empty() {
                e["subresource"] = json!(m.subresource);
            }
            e
        })
        .collect();
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if entries.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(entries));
        }
    }
}

/// Who is writing, and when.
pub struct Writer<'a> {
    pub manager: &'a str,
    pub api_version: &'a str,
    pub time: &'a str,
    pub subresource: &'a str,
}

fn entry<'m>(managed: &'m mut Vec<Managed>, w: &Writer, op: &str) -> &'m mut Managed {
    let pos = managed.iter().position(|m| {
        m.manager == w.manager && m.operation == op && m.subresource == w.subresource
    });
    let i = match pos {
        Some(i) => i,
        None => {
            managed.push(Managed {
                manager: w.manager.into(),
                operation: op.into(),
                api_version: w.api_version.into(),
                time: w.time.into(),
                subresource: w.subresource.into(),
                fields: FieldSet::new(),
            });
            managed.len() - 1
        }
    };
    let e = &mut managed[i];
    e.time = w.time.into();
    e.api_version = w.api_version.into();
    e
}

/// Record an ordinary write (create, update, patch): fields whose value
/// changed move to the writer's `Update` entry; fields that are gone leave
/// every entry. `new` gets the resulting managedFields.
pub fn record_update(old: Option<&Value>, new: &mut Value, w: &Writer, skip_status: bool) {
    let mut managed = old.map(read_managed).unwrap_or_default();
    let now = fields_of(new, skip_status && w.subresource.is_empty());
    let changed: FieldSet = now
        .iter()
        .filter(|p| {
            p.last().is_some_and(|l| l != ".")
                && old.and_then(|o| value_at(o, p)) != value_at(new, p)
        })
        .cloned()
        .collect();
    let all_new = fields_of(new, false);
    for m in managed.iter_mut() {
        m.fields
            .retain(|p| all_new.contains(p) && !changed.contains(p));
    }
    if !changed.is_empty() {
        let e = entry(&mut managed, w, "Update");
        for p in &changed {
            e.fields.insert(p.clone());
            // Own the list element too, so its removal is attributable.
            for i in 1..p.len() {
                if p[i - 1].starts_with("k:") {
                    let mut dot = p[..i].to_vec();
                    dot.push(".".into());
                    e.fields.insert(dot);
                }
            }
        }
    }
    write_managed(new, &managed);
}

/// Server-side apply of `applied` onto `live` (None: create). Returns the
/// new object with its managedFields. Conflicts compare the live values
/// with `compared`: the applied configuration as the server will store it
/// (defaulted), so a field a default filled in is not a conflict.
pub fn apply(
    live: Option<&Value>,
    applied: &Value,
    compared: &Value,
    w: &Writer,
    force: bool,
    skip_status: bool,
) -> Result<Value, ApiError> {
    let skip_status = skip_status && w.subresource.is_empty();
    let mut managed = live.map(read_managed).unwrap_or_default();
    let new_set = fields_of(applied, skip_status);
    let mut conflicts = Vec::new();
    for m in managed.iter_mut() {
        if m.manager == w.manager && m.operation == "Apply" && m.subresource == w.subresource {
            continue;
        }
        let mut lost = Vec::new();
        for p in m.fields.intersection(&new_set) {
            if p.last().is_some_and(|l| l == ".") {
                continue;
            }
            let before = live.and_then(|l| value_at(l, p));
            if before != value_at(compared, p) {
                conflicts.push((m.manager.clone(), m.api_version.clone(), p.clone()));
                lost.push(p.clone());
            }
        }
        if force {
            for p in lost {
                m.fields.remove(&p);
            }
        }
    }
    if !conflicts.is_empty() && !force {
        let pretty = |p: &[String]| -> String {
            p.iter()
                .map(|s| match s.strip_prefix("f:") {
                    Some(f) => format!(".{f}"),
                    None => format!("[{}]", s.trim_start_matches("k:").trim_start_matches("v:")),
                })
                .collect()
        };
        let lines: Vec<String> = conflicts
            .iter()
            .map(|(m, v, p)| format!("conflict with \"{m}\" using {v}: {}", pretty(p)))
            .collect();
        let causes: Vec<Value> = conflicts
            .iter()
            .map(|(m, v, p)| {
                json!({"reason": "FieldManagerConflict",
                       "message": format!("conflict with \"{m}\" using {v}"),
                       "field": pretty(p)})
            })
            .collect();
        let mut e = ApiError::new(
            409,
            "Conflict",
            format!(
                "Apply failed with {} conflict{}: {}",
                conflicts.len(),
                if conflicts.len() == 1 { "" } else { "s" },
                lines.join("\n")
            ),
        );
        e.details = Some(json!({"causes": causes}));
        return Err(e);
    }
    let mut obj = live.cloned().unwrap_or_else(|| json!({}));
    // Fields this manager applied before and no longer does, unless another
    // manager still owns them, are removed.
    let previous = managed
        .iter()
        .find(|m| {
            m.manager == w.manager && m.operation == "Apply" && m.subresource == w.subresource
        })
        .map(|m| m.fields.clone())
        .unwrap_or_default();
    for p in previous.difference(&new_set) {
        let owned_elsewhere = managed
            .iter()
            .any(|m| !(m.manager == w.manager && m.operation == "Apply") && m.fields.contains(p));
        if !owned_elsewhere {
            remove_at(&mut obj, p);
            // The maps that only held it go too (a map key this manager
            // stopped setting leaves no `{}` behind), unless someone owns
            // the empty map itself or the applied configuration sets it.
            for depth in (1..p.len()).rev() {
                let parent = &p[..depth];
                if !parent.last().is_some_and(|s| s.starts_with("f:")) {
                    break;
                }
                let empty = value_at(&obj, parent)
                    .is_some_and(|v| v.as_object().is_some_and(|m| m.is_empty()));
                let kept = managed.iter().any(|m| m.fields.contains(parent))
                    || value_at(applied, parent).is_some();
                if !empty || kept {
                    break;
                }
                remove_at(&mut obj, parent);
            }
        }
    }
    let mut applied_body = applied.clone();
    if skip_status && let Some(m) = applied_body.as_object_mut() {
        m.remove("status");
    }
    if let Some(meta) = applied_body
        .get_mut("metadata")
        .and_then(Value::as_object_mut)
    {
        meta.remove("managedFields");
        meta.remove("resourceVersion");
        meta.remove("uid");
        meta.remove("creationTimestamp");
    }
    merge(&mut obj, &applied_body, &mut Vec::new());
    entry(&mut managed, w, "Apply").fields = new_set;
    write_managed(&mut obj, &managed);
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(m: &'static str) -> Writer<'static> {
        Writer {
            manager: m,
            api_version: "v1",
            time: "2026-01-01T00:00:00Z",
            subresource: "",
        }
    }

    #[test]
    fn fields_v1_round_trip_with_keyed_lists() {
        let o = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "labels": {"a": "b"}},
            "spec": {"containers": [{"name": "c", "image": "i"}]}});
        let set = fields_of(&o, true);
        let v1 = to_fields_v1(&set);
        assert_eq!(
            v1,
            json!({"f:metadata": {"f:labels": {"f:a": {}}},
                   "f:spec": {"f:containers": {"k:{\"name\":\"c\"}": {".": {}, "f:image": {}, "f:name": {}}}}})
        );
        assert_eq!(from_fields_v1(&v1), set);
    }

    #[test]
    fn apply_merges_removes_and_conflicts() {
        let cfg1 = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "labels": {"a": "1", "b": "2"}},
            "data": {"x": "1"}});
        let o1 = apply(None, &cfg1, &cfg1, &w("alice"), false, false).expect("create");
        assert_eq!(o1["metadata"]["labels"]["b"], "2");
        // alice drops label b: removed.
        let cfg2 = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "labels": {"a": "1"}},
            "data": {"x": "1"}});
        let o2 = apply(Some(&o1), &cfg2, &cfg2, &w("alice"), false, false).expect("apply");
        assert!(o2["metadata"]["labels"].get("b").is_none());
        // bob sets data.x to another value: conflict, unless forced.
        let bob = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"x": "2"}});
        let err = apply(Some(&o2), &bob, &bob, &w("bob"), false, false).expect_err("conflict");
        assert_eq!(err.code, 409);
        assert!(
            err.message.contains("conflict with \"alice\""),
            "{}",
            err.message
        );
        // Same value: shared ownership, no conflict.
        let same = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"x": "1"}});
        apply(Some(&o2), &same, &same, &w("bob"), false, false).expect("shared");
        let o3 = apply(Some(&o2), &bob, &bob, &w("bob"), true, false).expect("forced");
        assert_eq!(o3["data"]["x"], "2");
        let m = read_managed(&o3);
        let alice = m.iter().find(|e| e.manager == "alice").expect("alice");
        assert!(
            !alice
                .fields
                .contains(&vec!["f:data".to_string(), "f:x".to_string()])
        );
    }

    #[test]
    fn a_map_key_no_longer_applied_leaves_no_empty_map() {
        let first = json!({"metadata": {"name": "x"},
                           "status": {"cidrs": {"a": {"state": "in-use"}, "b": {"state": "released"}}}});
        let obj = apply(None, &first, &first, &w("agent"), false, false).expect("apply");
        let second =
            json!({"metadata": {"name": "x"}, "status": {"cidrs": {"a": {"state": "in-use"}}}});
        let obj = apply(Some(&obj), &second, &second, &w("agent"), false, false).expect("apply");
        assert_eq!(obj["status"]["cidrs"], json!({"a": {"state": "in-use"}}));
        // Nothing applied any more: the whole status goes, not `{}`s.
        let third = json!({"metadata": {"name": "x"}});
        let obj = apply(Some(&obj), &third, &third, &w("agent"), false, false).expect("apply");
        assert!(obj.get("status").is_none(), "{obj}");
        assert_eq!(obj["metadata"]["name"], "x");
    }

    #[test]
    fn update_moves_changed_fields() {
        let old = json!({"metadata": {"name": "c"}, "data": {"x": "1", "y": "1"}});
        let mut o = old.clone();
        record_update(None, &mut o, &w("first"), false);
        let mut new = o.clone();
        new["data"]["x"] = json!("2");
        record_update(Some(&o), &mut new, &w("second"), false);
        let m = read_managed(&new);
        let first = m.iter().find(|e| e.manager == "first").expect("first");
        let second = m.iter().find(|e| e.manager == "second").expect("second");
        assert!(
            first
                .fields
                .contains(&vec!["f:data".to_string(), "f:y".to_string()])
        );
        assert!(
            second
                .fields
                .contains(&vec!["f:data".to_string(), "f:x".to_string()])
        );
        assert!(
            !first
                .fields
                .contains(&vec!["f:data".to_string(), "f:x".to_string()])
        );
    }
}
