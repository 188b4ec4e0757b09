//! The YAML form of generated CECs, shared by `membrane translate` and the
//! golden tests so the two can never drift apart.

use membrane_crds::CiliumEnvoyConfig;
use serde_json::Value;

use crate::IngressError;

/// Rebuild maps with keys in sorted order, so the YAML is the same whether
/// or not serde_json's `preserve_order` is enabled in the build.
fn sort_keys(v: Value) -> Value {
    match v {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k, sort_keys(v)))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sort_keys).collect()),
        other => other,
    }
}

/// CECs as a multi-document YAML stream (`---` between documents), keys sorted.
pub fn cecs_to_yaml(cecs: &[CiliumEnvoyConfig]) -> Result<String, IngressError> {
    to_yaml(cecs)
}

/// Any generated objects (Services, EndpointSlices) as a multi-document
/// YAML stream, keys sorted.
pub fn to_yaml<T: serde::Serialize>(objects: &[T]) -> Result<String, IngressError> {
    let mut docs = Vec::with_capacity(objects.len());
    for object in objects {
        let value =
            serde_json::to_value(object).map_err(|e| IngressError::Render(e.to_string()))?;
        docs.push(
            serde_yaml_ng::to_string(&sort_keys(value))
                .map_err(|e| IngressError::Render(e.to_string()))?,
        );
    }
    Ok(docs.join("---\n"))
}
