use membrane_store::k8s_openapi::api::core::v1::Secret;
use membrane_store::k8s_openapi::api::networking::v1::Ingress;
use membrane_store::{
    Kind, Object, ObjectKey, StoreError, Typed, parse_documents, parse_documents_lenient,
};
use serde_json::json;

const MULTI: &str = r#"
# leading comment, not a document
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: web
spec:
  ingressClassName: cilium
  rules:
  - host: foo.example.com
    http:
      paths:
      - path: /
        pathType: Prefix
        backend:
          service: {name: web, port: {number: 80}}
---
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: web, namespace: shop}
  spec:
    ports: [{port: 80}]
- apiVersion: v1
  kind: Namespace
  metadata: {name: shop, namespace: ignored}
---
apiVersion: v1
kind: Secret
metadata: {name: tls}
type: kubernetes.io/tls
data:
  tls.key: a2V5
stringData:
  tls.crt: cert
  tls.key: newkey
"#;

#[test]
fn multi_document_list_and_string_data() {
    let objs = parse_documents(MULTI).unwrap();
    let keys: Vec<String> = objs.iter().map(|o| o.key().to_string()).collect();
    assert_eq!(
        keys,
        [
            "Ingress default/web",
            "Service shop/web",
            "Namespace shop",
            "Secret default/tls"
        ]
    );
    let ing = Ingress::from_object(&objs[0]).unwrap();
    assert_eq!(
        ing.spec.as_ref().unwrap().ingress_class_name.as_deref(),
        Some("cilium")
    );
    // Namespace of a cluster-scoped object is dropped.
    assert_eq!(objs[2].meta().namespace, None);
    let secret = Secret::from_object(&objs[3]).unwrap();
    assert!(secret.string_data.is_none());
    let data = secret.data.as_ref().unwrap();
    assert_eq!(data["tls.crt"].0, b"cert");
    // stringData wins over data, as in Kubernetes.
    assert_eq!(data["tls.key"].0, b"newkey");
    // to_value: apiVersion/kind present, data base64.
    let v = objs[3].to_value();
    assert_eq!(v["apiVersion"], "v1");
    assert_eq!(v["kind"], "Secret");
    assert_eq!(v["data"]["tls.crt"], "Y2VydA==");
    assert!(v.get("stringData").is_none());
}

#[test]
fn json_input_and_round_trip() {
    let text = r#"{"apiVersion":"cilium.io/v2","kind":"CiliumEnvoyConfig","metadata":{"name":"cec","namespace":"x"},
        "spec":{"services":[{"name":"svc","ports":[80]}],"resources":[{"@type":"type.googleapis.com/envoy.config.listener.v3.Listener","name":"l"}]}}
        {"apiVersion":"cilium.io/v2","kind":"CiliumClusterwideEnvoyConfig","metadata":{"name":"cc"},"spec":{"resources":[]}}"#;
    let objs = parse_documents(text).unwrap();
    assert_eq!(objs.len(), 2);
    assert_eq!(
        objs[0].key(),
        ObjectKey::new(Kind::CiliumEnvoyConfig, "x", "cec")
    );
    assert_eq!(objs[1].key().to_string(), "CiliumClusterwideEnvoyConfig cc");
    let v = objs[0].to_value();
    assert_eq!(v["spec"]["resources"][0]["name"], "l");
    assert_eq!(Object::from_value(v).unwrap(), objs[0]);
}

#[test]
fn errors_name_document_and_field() {
    let text = "apiVersion: v1\nkind: Service\nmetadata: {name: ok}\n---\napiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: bad}\nspec:\n  rules:\n  - host: [1]\n";
    let err = parse_documents(text).unwrap_err().to_string();
    assert!(
        err.starts_with("document 2: spec.rules[0].host: invalid type"),
        "{err}"
    );

    let lenient = parse_documents_lenient(text);
    assert_eq!(lenient.len(), 2);
    assert!(lenient[0].is_ok());
    assert!(lenient[1].is_err());

    let missing = parse_documents("apiVersion: v1\nkind: Service\nmetadata: {namespace: x}\n")
        .unwrap_err()
        .to_string();
    assert_eq!(
        missing,
        "document 1: metadata.name: required field is missing"
    );

    let typo = parse_documents(
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: a}\nspec: {ingressClasName: cilium}\n",
    )
    .unwrap_err()
    .to_string();
    assert_eq!(typo, "document 1: unknown field \"spec.ingressClasName\"");

    let bad_name = parse_documents("apiVersion: v1\nkind: Service\nmetadata: {name: Web_1}\n")
        .unwrap_err()
        .to_string();
    assert!(
        bad_name.contains("metadata.name: invalid value \"Web_1\""),
        "{bad_name}"
    );
}

#[test]
fn yaml_syntax_error_keeps_other_documents_and_absolute_line() {
    let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\nkind: [unclosed\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n";
    let results = parse_documents_lenient(text);
    assert_eq!(results.len(), 3);
    assert_eq!(results[0].as_ref().unwrap().key().name, "a");
    let err = results[1].as_ref().unwrap_err().to_string();
    assert!(err.starts_with("document 2: invalid YAML"), "{err}");
    assert!(err.contains("line 5") || err.contains("line 6"), "{err}");
    assert_eq!(results[2].as_ref().unwrap().key().name, "b");
}

#[test]
fn unknown_kind_and_list_item_errors() {
    let err = Object::from_value(
        json!({"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"x"}}),
    )
    .unwrap_err();
    assert!(matches!(err, StoreError::UnknownKind { .. }));
    assert_eq!(
        err.to_string(),
        "no matches for kind \"Deployment\" in version \"apps/v1\""
    );

    let list = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Namespace\n  metadata: {name: a}\n- apiVersion: apps/v1\n  kind: Deployment\n  metadata: {name: d}\n";
    let results = parse_documents_lenient(list);
    assert_eq!(results.len(), 2);
    let err = results[1].as_ref().unwrap_err();
    assert!(err.is_unknown_kind());
    assert!(
        err.to_string()
            .starts_with("document 1: items[1]: no matches"),
        "{err}"
    );

    assert!(parse_documents("").unwrap().is_empty());
    assert!(
        parse_documents("---\n# only a comment\n---\n")
            .unwrap()
            .is_empty()
    );
    let not_object = parse_documents("- a\n- b\n").unwrap_err().to_string();
    assert!(not_object.contains("expected an object"), "{not_object}");
}

#[test]
fn kind_names() {
    for (s, k) in [
        ("ing", Kind::Ingress),
        ("Ingresses", Kind::Ingress),
        ("ingressclass", Kind::IngressClass),
        ("svc", Kind::Service),
        ("endpointslices", Kind::EndpointSlice),
        ("ep", Kind::Endpoints),
        ("secret", Kind::Secret),
        ("NS", Kind::Namespace),
        ("cec", Kind::CiliumEnvoyConfig),
        (
            "ciliumclusterwideenvoyconfigs",
            Kind::CiliumClusterwideEnvoyConfig,
        ),
        ("ccec", Kind::CiliumClusterwideEnvoyConfig),
        ("ingresses.networking.k8s.io", Kind::Ingress),
    ] {
        assert_eq!(Kind::parse(s).unwrap(), k, "{s}");
    }
    assert!(Kind::parse("deployment").is_err());
    for k in Kind::all() {
        assert_eq!(Kind::from_type(k.api_version(), k.kind_name()), Some(*k));
        assert_eq!(Kind::parse(k.kind_name()).unwrap(), *k);
        assert_eq!(Kind::parse(k.plural()).unwrap(), *k);
    }
    assert_eq!(Kind::from_type("extensions/v1beta1", "Ingress"), None);
    assert!(!Kind::Namespace.namespaced());
    assert!(!Kind::IngressClass.namespaced());
    assert!(Kind::Secret.namespaced());
}

/// Found by fuzz/ (api_request): a double-quoted scalar whose last byte is a
/// backslash made the flow-nesting pre-scan index past the end of the text.
#[test]
fn trailing_backslash_in_double_quotes_is_an_error_not_a_panic() {
    for text in ["a: \"x\\", "a: [\"x\\", "\"\\"] {
        assert!(parse_documents(text).is_err(), "{text:?}");
    }
}
