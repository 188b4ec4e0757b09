//! Ingress translation (membrane_ingress): arbitrary Ingress, Service and
//! Secret manifests → CECs, LB Services and EndpointSlices, dedicated and
//! shared, plus reference validation.
//!
//! Properties beyond "never panics": every CEC the translation produces
//! renders as YAML, that YAML applies again through the manifest parser, and
//! the agent's CEC parse accepts it (an Ingress that translates must never
//! yield a CEC the agent rejects). Ingresses that did not pass the manifest
//! parser's validation (a bare `Ingress` document) are exempt from the
//! "applies" check: their names may be anything.
#![no_main]

use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::networking::v1::Ingress;
use libfuzzer_sys::fuzz_target;
use membrane_agent::cec::parse_cec;
use membrane_crds::CiliumEnvoyConfig;
use membrane_ingress::{
    LoadBalancerMode, Lookup, TranslateOptions, cecs_to_yaml, translate_all, translate_cluster,
    translate_shared, validate_references,
};
use membrane_store::{Object, parse_documents, parse_documents_lenient};

#[derive(Default)]
struct Objects {
    ingresses: Vec<Ingress>,
    services: Vec<Service>,
    secrets: Vec<Secret>,
}

impl Lookup for Objects {
    fn service(&self, namespace: &str, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| {
            s.metadata.namespace.as_deref() == Some(namespace)
                && s.metadata.name.as_deref() == Some(name)
        })
    }
    fn secret(&self, namespace: &str, name: &str) -> Option<&Secret> {
        self.secrets.iter().find(|s| {
            s.metadata.namespace.as_deref() == Some(namespace)
                && s.metadata.name.as_deref() == Some(name)
        })
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut objects = Objects::default();
    for object in parse_documents_lenient(text).into_iter().flatten() {
        match object {
            Object::Ingress(i) => objects.ingresses.push(i),
            Object::Service(s) => objects.services.push(s),
            Object::Secret(s) => objects.secrets.push(s),
            _ => {}
        }
    }
    // Objects from the manifest parser passed the API server's validation
    // (names, unknown fields); only those must render to YAML that applies.
    let validated = !objects.ingresses.is_empty();
    if objects.ingresses.is_empty() {
        // A bare Ingress without the store's validation (names, unknown
        // fields): translation must cope with anything the type can hold.
        if let Ok(i) = serde_yaml_ng::from_str::<Ingress>(text) {
            objects.ingresses.push(i);
        }
    }
    if objects.ingresses.is_empty() {
        return;
    }

    let dedicated = TranslateOptions::default();
    let shared = TranslateOptions {
        enforce_https_default: false,
        default_lb_mode: LoadBalancerMode::Shared,
        ..TranslateOptions::default()
    };
    for opts in [&dedicated, &shared] {
        // translate_cluster covers both modes; the single-mode entry points
        // build the same CECs, so they are only run, not checked again.
        let _ = translate_all(&objects.ingresses, opts);
        let _ = translate_shared(&objects.ingresses, opts);
        let cluster = translate_cluster(&objects.ingresses, opts);
        check_cecs(&cluster.cecs(), validated);
    }
    for ing in &objects.ingresses {
        let _ = validate_references(ing, &objects);
    }
});

fn check_cecs(cecs: &[CiliumEnvoyConfig], validated: bool) {
    for cec in cecs {
        let namespace = cec.metadata.namespace.as_deref().unwrap_or_default();
        let name = cec.metadata.name.as_deref().unwrap_or_default();
        let object = format!("CiliumEnvoyConfig {namespace}/{name}");
        if let Err(e) = parse_cec(&object, namespace, name, &cec.spec) {
            panic!("translation produced a CEC the agent rejects: {e}");
        }
    }
    let yaml = cecs_to_yaml(cecs).unwrap_or_else(|e| panic!("{e}"));
    if !validated {
        return;
    }
    let parsed = parse_documents(&yaml)
        .unwrap_or_else(|e| panic!("rendered CECs do not apply: {e}\n{yaml}"));
    assert_eq!(parsed.len(), cecs.len());
}
