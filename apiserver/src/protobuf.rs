//! Decoding of the Kubernetes protobuf request bodies kubectl's generator
//! subcommands send (`kubectl create namespace|configmap|secret|
//! serviceaccount`): the `k8s\0` envelope (`runtime.Unknown`) around the
//! object's protobuf. Only the kinds and fields those commands write are
//! decoded; anything else is refused (415) rather than silently dropped.
//! Pure.

use base64::Engine;
use serde_json::{Map, Value, json};

use crate::error::ApiError;

const MAGIC: &[u8] = b"k8s\0";

fn unsupported(what: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        415,
        "UnsupportedMediaType",
        format!("protobuf body: {what}; send JSON or YAML (e.g. `kubectl apply -f`)"),
    )
}

/// One field of a protobuf message.
enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

fn varint(b: &[u8], pos: &mut usize) -> Result<u64, ApiError> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*pos).ok_or_else(|| unsupported("truncated varint"))?;
        *pos += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(unsupported("varint too long"))
}

/// The fields of a message, in order.
fn fields(b: &[u8]) -> Result<Vec<(u64, Field<'_>)>, ApiError> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < b.len() {
        let key = varint(b, &mut pos)?;
        let (num, wire) = (key >> 3, key & 7);
        match wire {
            0 => out.push((num, Field::Varint(varint(b, &mut pos)?))),
            2 => {
                let len = varint(b, &mut pos)? as usize;
                let end = pos
                    .checked_add(len)
                    .filter(|e| *e <= b.len())
                    .ok_or_else(|| unsupported("truncated field"))?;
                out.push((num, Field::Bytes(&b[pos..end])));
                pos = end;
            }
            1 => pos += 8,
            5 => pos += 4,
            w => return Err(unsupported(format!("wire type {w}"))),
        }
    }
    Ok(out)
}

fn string(f: &Field) -> Result<String, ApiError> {
    match f {
        Field::Bytes(b) => {
            String::from_utf8(b.to_vec()).map_err(|_| unsupported("a string is not UTF-8"))
        }
        Field::Varint(_) => Err(unsupported("expected a string")),
    }
}

fn bytes<'a>(f: &Field<'a>) -> Result<&'a [u8], ApiError> {
    match f {
        Field::Bytes(b) => Ok(b),
        Field::Varint(_) => Err(unsupported("expected bytes")),
    }
}

/// A map entry (key = 1, value = 2); binary values base64 as in JSON.
fn map_entry(f: &Field, binary: bool) -> Result<(String, Value), ApiError> {
    let mut k = String::new();
    let mut v = Value::String(String::new());
    for (n, e) in fields(bytes(f)?)? {
        match n {
            1 => k = string(&e)?,
            2 if binary => v = json!(base64::engine::general_purpose::STANDARD.encode(bytes(&e)?)),
            2 => v = json!(string(&e)?),
            _ => {}
        }
    }
    Ok((k, v))
}

fn insert_entry(obj: &mut Value, field: &str, (k, v): (String, Value)) {
    if !obj[field].is_object() {
        obj[field] = json!({});
    }
    obj[field][k] = v;
}

fn is_empty(f: &Field) -> bool {
    match f {
        Field::Bytes(b) => b.is_empty(),
        Field::Varint(v) => *v == 0,
    }
}

fn object_meta(b: &[u8], kind: &str) -> Result<Value, ApiError> {
    let mut m = json!({});
    for (n, f) in fields(b)? {
        match n {
            1..=3 => {
                let s = string(&f)?;
                if !s.is_empty() {
                    let key = ["name", "generateName", "namespace"][(n - 1) as usize];
                    m[key] = json!(s);
                }
            }
            11 => insert_entry(&mut m, "labels", map_entry(&f, false)?),
            12 => insert_entry(&mut m, "annotations", map_entry(&f, false)?),
            14 => {
                if !m["finalizers"].is_array() {
                    m["finalizers"] = json!([]);
                }
                if let Some(a) = m["finalizers"].as_array_mut() {
                    a.push(json!(string(&f)?));
                }
            }
            // selfLink, uid, resourceVersion, generation, timestamps,
            // managedFields: server-owned, ignored like in JSON.
            4..=10 | 17 => {}
            _ if is_empty(&f) => {}
            n => {
                return Err(unsupported(format!(
                    "{kind}.metadata field {n} is not supported"
                )));
            }
        }
    }
    Ok(m)
}

/// Decode a protobuf request body into the JSON form of the object.
pub fn decode(body: &[u8]) -> Result<Value, ApiError> {
    let inner = body
        .strip_prefix(MAGIC)
        .ok_or_else(|| unsupported("missing the k8s envelope"))?;
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), &[][..]);
    for (n, f) in fields(inner)? {
        match n {
            1 => {
                for (tn, tf) in fields(bytes(&f)?)? {
                    match tn {
                        1 => api_version = string(&tf)?,
                        2 => kind = string(&tf)?,
                        _ => {}
                    }
                }
            }
            2 => raw = bytes(&f)?,
            3 if !is_empty(&f) => return Err(unsupported("content encodings are not supported")),
            _ => {}
        }
    }
    let mut obj = json!({"apiVersion": api_version, "kind": kind});
    for (n, f) in fields(raw)? {
        match (kind.as_str(), n) {
            (_, 1) => obj["metadata"] = object_meta(bytes(&f)?, &kind)?,
            ("ConfigMap", 2) => insert_entry(&mut obj, "data", map_entry(&f, false)?),
            ("ConfigMap", 3) => insert_entry(&mut obj, "binaryData", map_entry(&f, true)?),
            ("ConfigMap", 4) | ("Secret", 5) => {
                if let Field::Varint(v) = f {
                    obj["immutable"] = json!(v != 0);
                }
            }
            ("Secret", 2) => insert_entry(&mut obj, "data", map_entry(&f, true)?),
            ("Secret", 3) => {
                let t = string(&f)?;
                if !t.is_empty() {
                    obj["type"] = json!(t);
                }
            }
            ("Secret", 4) => insert_entry(&mut obj, "stringData", map_entry(&f, false)?),
            ("Namespace", 2) => {
                let mut fins = Vec::new();
                for (sn, sf) in fields(bytes(&f)?)? {
                    if sn == 1 {
                        fins.push(json!(string(&sf)?));
                    }
                }
                if !fins.is_empty() {
                    obj["spec"] = json!({"finalizers": fins});
                }
            }
            ("Namespace", 3) => {}
            ("ServiceAccount", 3) => {
                let mut r = Map::new();
                for (rn, rf) in fields(bytes(&f)?)? {
                    if rn == 1 {
                        r.insert("name".into(), json!(string(&rf)?));
                    }
                }
                if !obj["imagePullSecrets"].is_array() {
                    obj["imagePullSecrets"] = json!([]);
                }
                if let Some(a) = obj["imagePullSecrets"].as_array_mut() {
                    a.push(Value::Object(r));
                }
            }
            ("ServiceAccount", 4) => {
                if let Field::Varint(v) = f {
                    obj["automountServiceAccountToken"] = json!(v != 0);
                }
            }
            ("ConfigMap" | "Secret" | "Namespace" | "ServiceAccount", _) if is_empty(&f) => {}
            ("ConfigMap" | "Secret" | "Namespace" | "ServiceAccount", n) => {
                return Err(unsupported(format!("{kind} field {n} is not supported")));
            }
            _ => {
                return Err(unsupported(format!(
                    "kind {kind:?} is not supported in protobuf"
                )));
            }
        }
    }
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured from `kubectl create configmap cmx --from-literal=a=b -n default`.
    const CONFIGMAP: &[u8] = b"k8s\0\x0a\x0f\x0a\x02v1\x12\x09ConfigMap\x12\x24\x0a\x1a\x0a\x03cmx\x12\x00\x1a\x07default\x22\x00\x2a\x00\x32\x00\x38\x00\x42\x00\x12\x06\x0a\x01a\x12\x01b\x1a\x00\x22\x00";
    // `kubectl create secret generic sx --from-literal=k=v --type=foo/bar`.
    const SECRET: &[u8] = b"k8s\0\x0a\x0c\x0a\x02v1\x12\x06Secret\x12\x25\x0a\x12\x0a\x02sx\x12\x00\x1a\x00\x22\x00\x2a\x00\x32\x00\x38\x00\x42\x00\x12\x06\x0a\x01k\x12\x01v\x1a\x07foo/bar\x1a\x00\x22\x00";

    #[test]
    fn kubectl_create_bodies() {
        assert_eq!(
            decode(CONFIGMAP).expect("configmap"),
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": "cmx", "namespace": "default"}, "data": {"a": "b"}})
        );
        assert_eq!(
            decode(SECRET).expect("secret"),
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "sx"},
                   "data": {"k": "dg=="}, "type": "foo/bar"})
        );
        assert_eq!(decode(b"k8s\0\x0a").expect_err("truncated").code, 415);
        assert_eq!(decode(b"{}").expect_err("not protobuf").code, 415);
    }
}
