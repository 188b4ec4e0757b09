//! Envoy resources as JSON/YAML (protojson with `@type`) ↔ protobuf `Any`.
//!
//! Uses the descriptor set shipped by `envoy-types`, so every Envoy v3 message
//! type known to that crate can be decoded, including nested `typed_config`
//! payloads, without hand-written conversions.

use std::fmt::Write as _;
use std::sync::LazyLock;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, VirtualHost};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, Value as PValue};
use serde_json::Value;

use crate::descriptors::Descriptors;

/// Well-known type URLs of the xDS resource types.
pub mod type_url {
    pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
    pub const VIRTUAL_HOST: &str = "type.googleapis.com/envoy.config.route.v3.VirtualHost";
    pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
    pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
}

const ANY_NAME: &str = "google.protobuf.Any";

static DESCRIPTOR_SET: &[u8] = include_bytes!(env!("ENVOY_TYPES_BIN"));

// The whole set decodes into ~33 MB of descriptors while a process uses a
// few dozen of its ~1,000 files, so files join the pool as the types they
// define are first needed (`Descriptors`).
static DESCRIPTORS: LazyLock<Result<Descriptors, String>> =
    LazyLock::new(|| Descriptors::new(DESCRIPTOR_SET));

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("envoy descriptor set is unusable: {0}")]
    Descriptors(String),
    #[error("{path}: missing \"@type\"")]
    MissingType { path: String },
    #[error("{path}: unknown type URL \"{type_url}\" (not an Envoy v3 type known to this build)")]
    UnknownType { path: String, type_url: String },
    #[error("{path}: {message}")]
    Json { path: String, message: String },
    #[error("invalid YAML: {0}")]
    Yaml(String),
    #[error("cannot decode {type_url}: {message}")]
    Decode { type_url: String, message: String },
    #[error("expected {expected}, got {actual}")]
    TypeMismatch { expected: String, actual: String },
    #[error("cannot encode {type_url} as JSON: {message}")]
    Encode { type_url: String, message: String },
}

fn descriptors() -> Result<&'static Descriptors, CodecError> {
    DESCRIPTORS
        .as_ref()
        .map_err(|e| CodecError::Descriptors(e.clone()))
}

/// The descriptor of message `name`, loading its file if needed.
fn resolve_type(name: &str) -> Option<MessageDescriptor> {
    descriptors()
        .ok()?
        .pool_for([name])
        .ok()?
        .get_message_by_name(name)
}

fn any_descriptor(pool: &DescriptorPool) -> Result<MessageDescriptor, CodecError> {
    pool.get_message_by_name(ANY_NAME)
        .ok_or_else(|| CodecError::Descriptors(format!("{ANY_NAME} missing")))
}

/// Fully qualified message name of a type URL (the part after the last `/`).
pub fn message_name(type_url: &str) -> &str {
    type_url.rsplit('/').next().unwrap_or(type_url)
}

/// Whether the descriptor pool knows the message type of `type_url`.
pub fn is_known_type(type_url: &str) -> bool {
    descriptors().is_ok_and(|d| d.defines(message_name(type_url)))
}

/// Decodes a protojson object with an `@type` field into an `Any`.
///
/// Field names may be camelCase (protojson) or snake_case (proto). Errors name
/// the JSON path of the offending field, e.g.
/// `filterChains[0].filters[0].typedConfig.foo: unrecognized field name 'foo'`.
pub fn any_from_json(v: &Value) -> Result<Any, CodecError> {
    let Some(obj) = v.as_object() else {
        return Err(CodecError::Json {
            path: ".".into(),
            message: "expected an object with \"@type\"".into(),
        });
    };
    if !obj.contains_key("@type") {
        return Err(CodecError::MissingType { path: ".".into() });
    }
    let mut types = vec![ANY_NAME];
    let mut path = String::new();
    let normalized = type_first(v, &mut types, &mut path)?;
    let pool = descriptors()?.pool_for(types)?;
    let desc = any_descriptor(&pool)?;
    let mut track = serde_path_to_error::Track::new();
    let de = serde_path_to_error::Deserializer::new(&normalized, &mut track);
    match DynamicMessage::deserialize(desc.clone(), de) {
        Ok(msg) => {
            // Map entries in a fixed order, so equal JSON gives equal bytes.
            let bytes = msg.encode_to_vec();
            let bytes = crate::canonical::canonical(&resolve_type, &desc, &bytes).unwrap_or(bytes);
            Any::decode(bytes.as_slice()).map_err(|e| CodecError::Decode {
                type_url: ANY_NAME.into(),
                message: e.to_string(),
            })
        }
        Err(e) => {
            let path = track.path();
            let message = e.to_string();
            let path_str = path.to_string();
            if message.starts_with("message '") && message.ends_with("' not found") {
                let type_url = lookup(&normalized, &path)
                    .and_then(|v| v.get("@type"))
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .unwrap_or_else(|| {
                        message
                            .trim_start_matches("message '")
                            .trim_end_matches("' not found")
                            .to_owned()
                    });
                return Err(CodecError::UnknownType {
                    path: path_str,
                    type_url,
                });
            }
            if message == "expected '@type' field" {
                return Err(CodecError::MissingType { path: path_str });
            }
            Err(CodecError::Json {
                path: path_str,
                message,
            })
        }
    }
}

/// Same as [`any_from_json`] for a YAML document.
pub fn any_from_yaml(s: &str) -> Result<Any, CodecError> {
    let v: Value = serde_yaml_ng::from_str(s).map_err(|e| CodecError::Yaml(e.to_string()))?;
    any_from_json(&v)
}

/// Encodes an `Any` as protojson (camelCase field names, `@type` included).
pub fn any_to_json(any: &Any) -> Result<Value, CodecError> {
    let pool = descriptors()?.pool_for_any(any)?;
    let desc = any_descriptor(&pool)?;
    let msg = DynamicMessage::decode(desc, any.encode_to_vec().as_slice()).map_err(|e| {
        CodecError::Decode {
            type_url: any.type_url.clone(),
            message: e.to_string(),
        }
    })?;
    serde_json::to_value(&msg).map_err(|e| CodecError::Encode {
        type_url: any.type_url.clone(),
        message: e.to_string(),
    })
}

/// Decodes an `Any` into the message type `T`, checking the type URL.
pub fn decode<T: Message + prost::Name + Default>(any: &Any) -> Result<T, CodecError> {
    let expected = T::full_name();
    if message_name(&any.type_url) != expected {
        return Err(CodecError::TypeMismatch {
            expected,
            actual: any.type_url.clone(),
        });
    }
    T::decode(any.value.as_slice()).map_err(|e| CodecError::Decode {
        type_url: any.type_url.clone(),
        message: e.to_string(),
    })
}

/// Packs a message into an `Any` with its canonical type URL.
pub fn encode<T: Message + prost::Name>(msg: &T) -> Any {
    canonical_any(Any {
        type_url: T::type_url(),
        value: msg.encode_to_vec(),
    })
}

/// `any` with the entries of every map field (prost and prost-reflect
/// encode them in `HashMap` order) sorted, so equal content gives equal
/// bytes and equal resource hashes. Unchanged when its type is unknown.
pub fn canonical_any(any: Any) -> Any {
    let Some(desc) = resolve_type(message_name(&any.type_url)) else {
        return any;
    };
    match crate::canonical::canonical(&resolve_type, &desc, &any.value) {
        Some(value) => Any {
            type_url: any.type_url,
            value,
        },
        None => any,
    }
}

/// The xDS resource name of `any`: `.name` for most types,
/// `.cluster_name` for `ClusterLoadAssignment`.
pub fn resource_name(any: &Any) -> Result<String, CodecError> {
    let url = any.type_url.as_str();
    let bytes = any.value.as_slice();
    let de = |e: prost::DecodeError| CodecError::Decode {
        type_url: url.to_owned(),
        message: e.to_string(),
    };
    match url {
        type_url::LISTENER => Ok(Listener::decode(bytes).map_err(de)?.name),
        type_url::CLUSTER => Ok(Cluster::decode(bytes).map_err(de)?.name),
        type_url::ROUTE => Ok(RouteConfiguration::decode(bytes).map_err(de)?.name),
        type_url::ENDPOINT => Ok(ClusterLoadAssignment::decode(bytes)
            .map_err(de)?
            .cluster_name),
        type_url::SECRET => Ok(Secret::decode(bytes).map_err(de)?.name),
        type_url::VIRTUAL_HOST => Ok(VirtualHost::decode(bytes).map_err(de)?.name),
        _ => {
            // Other resource types (scoped routes, runtime, …) also carry `name`.
            let name = message_name(url);
            let desc = descriptors()?
                .pool_for([name])?
                .get_message_by_name(name)
                .ok_or_else(|| CodecError::UnknownType {
                    path: ".".into(),
                    type_url: url.to_owned(),
                })?;
            let msg = DynamicMessage::decode(desc, bytes).map_err(|e| CodecError::Decode {
                type_url: url.to_owned(),
                message: e.to_string(),
            })?;
            match msg.get_field_by_name("name").as_deref() {
                Some(PValue::String(s)) => Ok(s.clone()),
                _ => Err(CodecError::Decode {
                    type_url: url.to_owned(),
                    message: "resource type has no `name` field".into(),
                }),
            }
        }
    }
}

/// Copies `v`, collecting the message names of its `@type`s, and rejects
/// keys that sort before `@type` in an object that has one.
///
/// Objects iterate in key order, and prost-reflect buffers the keys it meets
/// before an `Any`'s `@type` in a hash map: which unknown one it reported
/// would vary from call to call, without a path. No protojson field name
/// sorts before `@type` (names start with a letter, `_` or `[`), so such a
/// key is unrecognized whatever the type.
fn type_first<'a>(
    v: &'a Value,
    types: &mut Vec<&'a str>,
    path: &mut String,
) -> Result<Value, CodecError> {
    match v {
        Value::Object(m) => {
            if let Some(t) = m.get("@type") {
                if let Some(url) = t.as_str() {
                    types.push(message_name(url));
                }
                if let Some(first) = m.keys().next().filter(|k| k.as_str() < "@type") {
                    return Err(CodecError::Json {
                        path: if path.is_empty() {
                            ".".into()
                        } else {
                            path.clone()
                        },
                        message: format!("unrecognized field name '{first}'"),
                    });
                }
            }
            let mut out = serde_json::Map::new();
            for (k, val) in m {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
                out.insert(k.clone(), type_first(val, types, path)?);
                path.truncate(len);
            }
            Ok(Value::Object(out))
        }
        Value::Array(a) => {
            let mut out = Vec::with_capacity(a.len());
            for (i, v) in a.iter().enumerate() {
                let len = path.len();
                let _ = write!(path, "[{i}]");
                out.push(type_first(v, types, path)?);
                path.truncate(len);
            }
            Ok(Value::Array(out))
        }
        other => Ok(other.clone()),
    }
}

/// Follows a serde path into a JSON value, to recover the `@type` an error
/// points at.
fn lookup<'a>(root: &'a Value, path: &serde_path_to_error::Path) -> Option<&'a Value> {
    use serde_path_to_error::Segment;
    let mut cur = root;
    for seg in path.iter() {
        cur = match seg {
            Segment::Seq { index } => cur.get(*index)?,
            Segment::Map { key } => cur.get(key.as_str())?,
            Segment::Enum { .. } | Segment::Unknown => return Some(cur),
        };
    }
    Some(cur)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn listener_json() -> Value {
        json!({
            "@type": type_url::LISTENER,
            "name": "listener",
            "filterChains": [{
                "filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typedConfig": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "statPrefix": "ingress",
                        "rds": {"routeConfigName": "listener-insecure"},
                        "httpFilters": [{
                            "name": "envoy.filters.http.router",
                            "typedConfig": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
                        }]
                    }
                }]
            }]
        })
    }

    #[test]
    fn index_knows_every_message_and_pool_loads_only_what_is_used() {
        let d = Descriptors::new(DESCRIPTOR_SET).unwrap();
        assert!(d.message_count() > 1500, "{}", d.message_count());
        assert!(d.defines("envoy.config.listener.v3.Listener"));
        assert!(!d.defines("nope.Nope"));
        let pool = d
            .pool_for([ANY_NAME, "envoy.config.listener.v3.Listener"])
            .unwrap();
        let loaded = pool.files().len();
        assert!(
            pool.get_message_by_name("envoy.config.listener.v3.Listener")
                .is_some()
        );
        // Dependencies came along; most of the set did not.
        assert!(
            pool.get_message_by_name("envoy.config.core.v3.Address")
                .is_some()
        );
        assert!(
            loaded * 4 < d.file_count(),
            "{loaded} of {}",
            d.file_count()
        );
        assert!(
            pool.get_message_by_name("envoy.extensions.filters.http.router.v3.Router")
                .is_none()
        );
        // A second request for loaded types adds nothing.
        let again = d.pool_for(["envoy.config.listener.v3.Listener"]).unwrap();
        assert_eq!(again.files().len(), loaded);
    }

    #[test]
    fn to_json_loads_nested_types_first_seen_in_bytes() {
        let any = any_from_json(&listener_json()).unwrap();
        // A fresh index has never seen the nested HttpConnectionManager.
        let d = Descriptors::new(DESCRIPTOR_SET).unwrap();
        let pool = d.pool_for_any(&any).unwrap();
        for name in [
            "envoy.config.listener.v3.Listener",
            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "envoy.extensions.filters.http.router.v3.Router",
        ] {
            assert!(pool.get_message_by_name(name).is_some(), "{name}");
        }
    }

    #[test]
    fn roundtrip_listener_with_nested_typed_config() {
        let any = any_from_json(&listener_json()).unwrap();
        assert_eq!(any.type_url, type_url::LISTENER);
        let l: Listener = decode(&any).unwrap();
        assert_eq!(l.name, "listener");
        let tc = l.filter_chains[0].filters[0].config_type.clone().unwrap();
        let envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(tc) = tc
        else {
            panic!("expected typed config")
        };
        assert!(tc.type_url.ends_with("HttpConnectionManager"));
        assert_eq!(resource_name(&any).unwrap(), "listener");

        let back = any_to_json(&any).unwrap();
        assert_eq!(back, listener_json());
    }

    #[test]
    fn keys_sorting_before_type_are_named_with_their_path() {
        // Both keys sort before `@type`; prost-reflect would buffer them in a
        // hash map and report either one.
        let top = json!({
            "@type": type_url::CLUSTER, "2ype": "EDS", "2ypedOptions": {}, "name": "c"
        });
        for _ in 0..4 {
            let e = any_from_json(&top).unwrap_err().to_string();
            assert_eq!(e, ".: unrecognized field name '2ype'");
        }
        let mut nested = listener_json();
        nested["filterChains"][0]["filters"][0]["typedConfig"]["#x"] = json!(1);
        let e = any_from_json(&nested).unwrap_err().to_string();
        assert_eq!(
            e,
            "filterChains[0].filters[0].typedConfig: unrecognized field name '#x'"
        );
    }

    /// Map fields (here a Struct in filter metadata, and one inside a
    /// nested typed config) encode the same way on every decode.
    #[test]
    fn equal_json_gives_equal_bytes_with_maps() {
        let mut v = listener_json();
        v["metadata"] = json!({"filterMetadata": {
            "a": {"x": 1.5}, "b": {"y": true}, "c": {}, "d": {"k": "v", "k2": "v2", "k3": 3.25}
        }});
        v["filterChains"][0]["filters"][0]["typedConfig"]["upgradeConfigs"] =
            json!([{"upgradeType": "websocket"}]);
        let first = any_from_json(&v).unwrap();
        for _ in 0..40 {
            assert_eq!(any_from_json(&v).unwrap().value, first.value);
        }
        // The canonical bytes are still the same message.
        let l: Listener = decode(&first).unwrap();
        assert_eq!(l.metadata.unwrap().filter_metadata.len(), 4);
        assert_eq!(any_to_json(&first).unwrap(), v);
    }

    #[test]
    fn snake_case_accepted() {
        let v = json!({
            "@type": type_url::CLUSTER,
            "name": "c1",
            "type": "EDS",
            "connect_timeout": "5s",
            "eds_cluster_config": {"service_name": "default/svc:80", "eds_config": {"ads": {}}}
        });
        let c: Cluster = decode(&any_from_json(&v).unwrap()).unwrap();
        assert_eq!(c.name, "c1");
        assert_eq!(c.eds_cluster_config.unwrap().service_name, "default/svc:80");
    }

    #[test]
    fn unknown_field_names_path() {
        let mut v = listener_json();
        v["filterChains"][0]["filters"][0]["typedConfig"]["bogusField"] = json!(1);
        let err = any_from_json(&v).unwrap_err().to_string();
        assert_eq!(
            err,
            "filterChains[0].filters[0].typedConfig: unrecognized field name 'bogusField'"
        );
        // A bad value deeper down names the full path.
        let mut v = listener_json();
        v["filterChains"][0]["filters"][0]["typedConfig"]["rds"]["routeConfigName"] = json!(5);
        let err = any_from_json(&v).unwrap_err().to_string();
        assert!(
            err.starts_with("filterChains[0].filters[0].typedConfig.rds.routeConfigName:"),
            "{err}"
        );
    }

    #[test]
    fn unknown_type_url_is_named() {
        let mut v = listener_json();
        v["filterChains"][0]["filters"][0]["typedConfig"] =
            json!({"@type": "type.googleapis.com/cilium.network.BogusFilter", "x": 1});
        let err = any_from_json(&v).unwrap_err();
        match &err {
            CodecError::UnknownType { path, type_url } => {
                assert_eq!(type_url, "type.googleapis.com/cilium.network.BogusFilter");
                assert!(
                    path.contains("filterChains[0].filters[0].typedConfig"),
                    "{path}"
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        let top = any_from_json(&json!({"@type": "type.googleapis.com/nope.Nope"})).unwrap_err();
        assert!(top.to_string().contains("nope.Nope"), "{top}");
    }

    #[test]
    fn missing_type() {
        let err = any_from_json(&json!({"name": "x"})).unwrap_err();
        assert!(matches!(err, CodecError::MissingType { .. }), "{err:?}");
    }

    #[test]
    fn yaml_and_endpoint_name() {
        let any = any_from_yaml(
            r#"
"@type": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment
cluster_name: default/svc:80
endpoints:
- lb_endpoints:
  - endpoint:
      address:
        socket_address: {address: 10.0.0.1, port_value: 8080}
"#,
        )
        .unwrap();
        assert_eq!(resource_name(&any).unwrap(), "default/svc:80");
        let cla: ClusterLoadAssignment = decode(&any).unwrap();
        assert_eq!(cla.endpoints[0].lb_endpoints.len(), 1);
        assert!(decode::<Cluster>(&any).is_err());
    }

    #[test]
    fn encode_decode() {
        let s = Secret {
            name: "ns/sec".into(),
            ..Default::default()
        };
        let any = encode(&s);
        assert_eq!(any.type_url, type_url::SECRET);
        assert_eq!(resource_name(&any).unwrap(), "ns/sec");
    }
}
