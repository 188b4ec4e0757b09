//! The manifest parser (`membrane_store::parse_documents`): multi-document
//! YAML or JSON from a watched directory or `membrane apply`.
//!
//! Besides "never panics", every object it accepts must survive a round trip
//! through its JSON and its YAML form unchanged: the store serialises objects
//! (`get`, status) and users re-apply them, so what it wrote must read back as
//! itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use membrane_store::{Object, parse_documents, parse_documents_lenient};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let lenient = parse_documents_lenient(text);
    let strict = parse_documents(text);
    // The strict parse is the lenient one with the first error returned.
    match &strict {
        Ok(objects) => assert_eq!(objects.len(), lenient.len()),
        Err(e) => {
            let first = lenient.iter().find_map(|r| r.as_ref().err());
            assert_eq!(first.map(ToString::to_string), Some(e.to_string()));
        }
    }
    for object in lenient.into_iter().flatten() {
        let key = object.key();
        let value = object.to_value();
        let again = Object::from_value(value.clone())
            .unwrap_or_else(|e| panic!("{key}: its own JSON does not parse again: {e}\n{value:#}"));
        assert_eq!(again.key(), key);
        assert!(again == object, "{key}: changed in a round trip\n{value:#}");
        // The same through YAML (`membrane get -o yaml | membrane apply -f -`).
        let yaml = serde_yaml_ng::to_string(&value).expect("JSON values serialise as YAML");
        let from_yaml = parse_documents(&yaml)
            .unwrap_or_else(|e| panic!("{key}: its own YAML does not parse again: {e}\n{yaml}"));
        assert!(
            from_yaml.len() == 1 && from_yaml[0] == object,
            "{key}: changed in a YAML round trip\n{yaml}"
        );
    }
});
