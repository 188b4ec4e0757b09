//! CiliumEnvoyConfig decoding: Envoy resources as JSON/YAML with `@type` →
//! protobuf `Any` (membrane_xds codec), and whole CEC/CCEC manifests through
//! the store's parser into the agent's CEC parse (decode + qualify names).
//!
//! Properties beyond "never panics":
//! - a resource the codec accepts encodes back to JSON, and that JSON decodes
//!   to the same protobuf (what `membrane get`/status show can be re-applied);
//! - the agent's parse is deterministic and its errors name the object.
#![no_main]

use libfuzzer_sys::fuzz_target;
use membrane_agent::cec::parse_cec;
use membrane_crds::EnvoyConfigSpec;
use membrane_store::{Object, parse_documents_lenient};
use membrane_xds::codec;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };

    // One Envoy resource.
    if let Ok(any) = codec::any_from_yaml(text) {
        let _ = codec::resource_name(&any);
        let json = codec::any_to_json(&any)
            .unwrap_or_else(|e| panic!("decoded resource does not encode: {e}"));
        let again = codec::any_from_json(&json)
            .unwrap_or_else(|e| panic!("encoded resource does not decode: {e}\n{json:#}"));
        assert_eq!(again.type_url, any.type_url);
        let json_again = codec::any_to_json(&again).expect("re-encode");
        assert_eq!(json, json_again, "JSON changed in a round trip");
    }

    // A bare spec, as the agent gets it from a CEC it did not parse itself.
    if let Ok(spec) = serde_yaml_ng::from_str::<EnvoyConfigSpec>(text) {
        check_spec("CiliumEnvoyConfig fuzz/cec", "fuzz", "cec", &spec);
        check_spec("CiliumClusterwideEnvoyConfig ccec", "", "ccec", &spec);
    }

    // Whole manifests, through the store.
    for object in parse_documents_lenient(text).into_iter().flatten() {
        let key = object.key();
        let label = key.to_string();
        match &object {
            Object::CiliumEnvoyConfig(c) => check_spec(&label, &key.namespace, &key.name, &c.spec),
            Object::CiliumClusterwideEnvoyConfig(c) => {
                check_spec(&label, &key.namespace, &key.name, &c.spec)
            }
            _ => {}
        }
    }
});

fn check_spec(object: &str, namespace: &str, name: &str, spec: &EnvoyConfigSpec) {
    let first = parse_cec(object, namespace, name, spec);
    let second = parse_cec(object, namespace, name, spec);
    assert_eq!(first, second, "parse_cec is not deterministic");
    if let Err(e) = first {
        assert_eq!(e.object, object);
        assert!(!e.field.is_empty(), "error without a field: {e}");
    }
}
