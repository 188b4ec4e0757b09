//! The Kubernetes objects the upstream step layer creates, as JSON manifests for the local API.
//! Pure functions: no I/O.

use std::net::IpAddr;

use k8s_openapi::api::networking::v1::{Ingress, IngressSpec};
use rand::Rng;
use serde_json::{Value, json};

/// Label upstream puts on its namespaces (and uses to clean leftovers up).
pub const NAMESPACE_LABEL: (&str, &str) = ("app.kubernetes.io/name", "ingress-conformance");
/// Prefix of upstream's `generateName` for namespaces.
pub const NAMESPACE_PREFIX: &str = "ingress-conformance-";
/// Port every echo pod listens on (upstream's containerPort / targetPort).
pub const ECHO_PORT: u16 = 3000;
/// Service port when the Ingress backend names its port instead of numbering it.
pub const DEFAULT_SERVICE_PORT: i32 = 8080;
/// Controller value Cilium (and Membrane) claims IngressClasses with.
pub const CILIUM_CONTROLLER: &str = "cilium.io/ingress-controller";

/// Alphabet of Kubernetes' generated name suffixes (no vowels, no look-alikes).
const ALPHANUMS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// `n` random characters as Kubernetes uses for `generateName` and pod-name suffixes.
pub fn random_suffix(n: usize) -> String {
    let mut rng = rand::rng();
    (0..n)
        .map(|_| ALPHANUMS[rng.random_range(0..ALPHANUMS.len())] as char)
        .collect()
}

pub fn namespace_manifest(name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": name,
            "labels": { NAMESPACE_LABEL.0: NAMESPACE_LABEL.1 },
        },
    })
}

pub fn ingress_class_manifest(name: &str) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "IngressClass",
        "metadata": { "name": name },
        "spec": { "controller": CILIUM_CONTROLLER },
    })
}

fn check_namespace(namespace: &str) -> Result<(), String> {
    if namespace.is_empty() || namespace == "default" {
        return Err(format!(
            "ingress definitions in the default namespace are not allowed ({namespace})"
        ));
    }
    Ok(())
}

/// upstream `IngressFromSpec`: a doc string holding only the spec.
pub fn ingress_from_spec(
    name: &str,
    namespace: &str,
    spec_yaml: &str,
    class: &str,
) -> Result<Ingress, String> {
    check_namespace(namespace)?;
    let spec: IngressSpec = serde_yaml_ng::from_str(spec_yaml)
        .map_err(|e| format!("deserializing Ingress from spec: {e}"))?;
    let mut ingress = Ingress {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    };
    default_class(&mut ingress, class);
    Ok(ingress)
}

/// upstream `IngressFromManifest`: a doc string holding a whole Ingress.
pub fn ingress_from_manifest(
    namespace: &str,
    manifest: &str,
    class: &str,
) -> Result<Ingress, String> {
    check_namespace(namespace)?;
    let mut ingress: Ingress = serde_yaml_ng::from_str(manifest)
        .map_err(|e| format!("deserializing Ingress from manifest: {e}"))?;
    ingress.metadata.namespace = Some(namespace.to_owned());
    default_class(&mut ingress, class);
    Ok(ingress)
}

fn default_class(ingress: &mut Ingress, class: &str) {
    let spec = ingress.spec.get_or_insert_with(Default::default);
    if spec.ingress_class_name.is_none() {
        spec.ingress_class_name = Some(class.to_owned());
    }
}

/// One echo backend upstream deploys for an Ingress (`NewEchoDeployment` arguments).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendRef {
    pub service: String,
    /// Ingress backend port name ("" when numbered).
    pub port_name: String,
    /// Service port: the backend's number, or 8080 when only a name was given.
    pub port: i32,
}

impl BackendRef {
    /// upstream's Deployment name, also the selector value.
    pub fn deployment(&self, ingress: &str) -> String {
        format!("{ingress}-{}", self.service)
    }
}

/// The backends in upstream's creation order (default backend, then rules/paths); the first
/// occurrence of a service wins, as upstream skips existing Deployments.
pub fn backends_of(ingress: &Ingress) -> Result<Vec<BackendRef>, String> {
    let mut out: Vec<BackendRef> = Vec::new();
    let Some(spec) = &ingress.spec else {
        return Ok(out);
    };
    let mut add = |b: &k8s_openapi::api::networking::v1::IngressBackend| -> Result<(), String> {
        let svc = b
            .service
            .as_ref()
            .ok_or_else(|| "an Ingress backend without a service is not supported".to_string())?;
        let (port_name, number) = match &svc.port {
            Some(p) => (p.name.clone().unwrap_or_default(), p.number.unwrap_or(0)),
            None => (String::new(), 0),
        };
        if !out.iter().any(|o| o.service == svc.name) {
            out.push(BackendRef {
                service: svc.name.clone(),
                port_name,
                port: if number == 0 {
                    DEFAULT_SERVICE_PORT
                } else {
                    number
                },
            });
        }
        Ok(())
    };
    if let Some(b) = &spec.default_backend {
        add(b)?;
    }
    for rule in spec.rules.iter().flatten() {
        let Some(http) = &rule.http else { continue };
        for p in &http.paths {
            add(&p.backend)?;
        }
    }
    Ok(out)
}

/// upstream's `service.yaml.tmpl` rendered for `b`.
pub fn service_manifest(namespace: &str, ingress: &str, b: &BackendRef) -> Value {
    let mut port = json!({
        "port": b.port,
        "targetPort": ECHO_PORT,
        "protocol": "TCP",
    });
    if !b.port_name.is_empty() {
        port["name"] = json!(b.port_name);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": b.service, "namespace": namespace },
        "spec": {
            "type": "NodePort",
            "selector": { "app": b.deployment(ingress) },
            "ports": [port],
        },
    })
}

/// One echo "pod": its name and address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodAddr {
    pub name: String,
    pub ip: IpAddr,
}

/// The EndpointSlice the endpointslice controller would publish for `service`'s ready pods.
pub fn endpoint_slice_manifest(
    namespace: &str,
    slice_name: &str,
    b: &BackendRef,
    pods: &[PodAddr],
) -> Value {
    let endpoints: Vec<Value> = pods
        .iter()
        .map(|p| {
            json!({
                "addresses": [p.ip.to_string()],
                "conditions": { "ready": true, "serving": true, "terminating": false },
                "targetRef": { "kind": "Pod", "namespace": namespace, "name": p.name },
            })
        })
        .collect();
    let address_type = match pods.first().map(|p| p.ip) {
        Some(IpAddr::V6(_)) => "IPv6",
        _ => "IPv4",
    };
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": slice_name,
            "namespace": namespace,
            "labels": {
                "kubernetes.io/service-name": b.service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": address_type,
        "endpoints": endpoints,
        "ports": [{ "name": b.port_name, "port": ECHO_PORT, "protocol": "TCP" }],
    })
}

/// A `kubernetes.io/tls` Secret.
pub fn tls_secret_manifest(namespace: &str, name: &str, cert_pem: &str, key_pem: &str) -> Value {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": { "name": name, "namespace": namespace },
        "type": "kubernetes.io/tls",
        "data": {
            "tls.crt": b64.encode(cert_pem),
            "tls.key": b64.encode(key_pem),
        },
    })
}

/// upstream `getIngressAddress`: every ip, then hostname, of `status.loadBalancer.ingress`.
pub fn ingress_addresses(ingress: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let entries = ingress
        .pointer("/status/loadBalancer/ingress")
        .and_then(Value::as_array);
    for e in entries.into_iter().flatten() {
        for key in ["ip", "hostname"] {
            if let Some(s) = e.get(key).and_then(Value::as_str)
                && !s.is_empty()
            {
                out.push(s.to_owned());
            }
        }
    }
    out
}

/// Ready endpoint addresses over the slices labelled for `service`.
pub fn ready_endpoints(slices: &[Value], service: &str) -> usize {
    slices
        .iter()
        .filter(|s| {
            s.pointer("/metadata/labels/kubernetes.io~1service-name")
                .and_then(Value::as_str)
                == Some(service)
        })
        .flat_map(|s| {
            s.get("endpoints")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        })
        .filter(|e| {
            // Kubernetes: a nil "ready" means ready.
            e.pointer("/conditions/ready")
                .and_then(Value::as_bool)
                .unwrap_or(true)
        })
        .map(|e| {
            e.get("addresses")
                .and_then(Value::as_array)
                .map_or(0, Vec::len)
        })
        .sum()
}

/// Name of the namespace-scoped object a manifest describes, for messages.
pub fn describe(v: &Value) -> String {
    format!(
        "{} {}/{}",
        v["kind"].as_str().unwrap_or("?"),
        v.pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("-"),
        v.pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("?")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST_RULES: &str = r#"apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: host-rules
spec:
  tls:
    - hosts:
        - foo.bar.com
      secretName: conformance-tls
  rules:
    - host: "*.foo.com"
      http:
        paths:
          - path: /
            pathType: Prefix
            backend:
              service:
                name: wildcard-foo-com
                port:
                  number: 8080
    - host: foo.bar.com
      http:
        paths:
          - path: /
            pathType: Prefix
            backend:
              service:
                name: foo-bar-com
                port:
                  name: http
"#;

    #[test]
    fn manifest_gets_namespace_class_and_backends() {
        let ing = ingress_from_manifest("ns1", HOST_RULES, "cilium").unwrap();
        assert_eq!(ing.metadata.namespace.as_deref(), Some("ns1"));
        assert_eq!(
            ing.spec.as_ref().unwrap().ingress_class_name.as_deref(),
            Some("cilium")
        );
        let b = backends_of(&ing).unwrap();
        assert_eq!(
            b,
            vec![
                BackendRef {
                    service: "wildcard-foo-com".into(),
                    port_name: "".into(),
                    port: 8080
                },
                BackendRef {
                    service: "foo-bar-com".into(),
                    port_name: "http".into(),
                    port: 8080
                },
            ]
        );
        let svc = service_manifest("ns1", "host-rules", &b[1]);
        assert_eq!(svc["spec"]["ports"][0]["name"], "http");
        assert_eq!(svc["spec"]["ports"][0]["port"], 8080);
        assert_eq!(svc["spec"]["ports"][0]["targetPort"], 3000);
        assert_eq!(svc["spec"]["selector"]["app"], "host-rules-foo-bar-com");
        assert!(svc["spec"]["ports"][0].get("name").is_some());
        assert!(
            service_manifest("ns1", "host-rules", &b[0])["spec"]["ports"][0]
                .get("name")
                .is_none()
        );
        let json = serde_json::to_value(&ing).unwrap();
        assert_eq!(json["kind"], "Ingress");
        assert_eq!(json["apiVersion"], "networking.k8s.io/v1");
    }

    #[test]
    fn explicit_class_is_kept_and_default_namespace_refused() {
        let m = "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata:\n  name: x\nspec:\n  ingressClassName: some-invalid-class-name\n";
        let ing = ingress_from_manifest("ns", m, "cilium").unwrap();
        assert_eq!(
            ing.spec.unwrap().ingress_class_name.as_deref(),
            Some("some-invalid-class-name")
        );
        assert!(ingress_from_manifest("default", m, "cilium").is_err());
        assert!(ingress_from_spec("x", "", "{}", "cilium").is_err());
    }

    #[test]
    fn spec_doc_string_and_duplicate_services() {
        let spec = "defaultBackend:\n  service:\n    name: echo-service\n    port:\n      number: 8080\nrules:\n- http:\n    paths:\n    - path: /\n      pathType: Prefix\n      backend:\n        service:\n          name: echo-service\n          port:\n            number: 9090\n";
        let ing = ingress_from_spec("default-backend", "ns", spec, "cilium").unwrap();
        assert_eq!(ing.metadata.name.as_deref(), Some("default-backend"));
        let b = backends_of(&ing).unwrap();
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].port, 8080);
        assert_eq!(
            b[0].deployment("default-backend"),
            "default-backend-echo-service"
        );
    }

    #[test]
    fn endpoint_slice_and_readiness_count() {
        let b = BackendRef {
            service: "s".into(),
            port_name: "".into(),
            port: 8080,
        };
        let pods = vec![
            PodAddr {
                name: "p1".into(),
                ip: "127.1.0.1".parse().unwrap(),
            },
            PodAddr {
                name: "p2".into(),
                ip: "127.1.0.2".parse().unwrap(),
            },
        ];
        let es = endpoint_slice_manifest("ns", "s-abcde", &b, &pods);
        assert_eq!(es["metadata"]["labels"]["kubernetes.io/service-name"], "s");
        assert_eq!(es["endpoints"][1]["targetRef"]["name"], "p2");
        assert_eq!(es["endpoints"][0]["conditions"]["ready"], true);
        assert_eq!(es["ports"][0]["port"], 3000);
        assert_eq!(es["ports"][0]["name"], "");
        assert_eq!(ready_endpoints(std::slice::from_ref(&es), "s"), 2);
        assert_eq!(ready_endpoints(std::slice::from_ref(&es), "other"), 0);
        let mut not_ready = es.clone();
        not_ready["endpoints"][0]["conditions"]["ready"] = json!(false);
        assert_eq!(ready_endpoints(&[not_ready], "s"), 1);
    }

    #[test]
    fn addresses_from_status() {
        let v = json!({"status": {"loadBalancer": {"ingress": [{"ip": "127.0.100.1"}, {"hostname": "lb.example"}]}}});
        assert_eq!(ingress_addresses(&v), vec!["127.0.100.1", "lb.example"]);
        assert!(ingress_addresses(&json!({"status": {"loadBalancer": {}}})).is_empty());
        assert!(
            ingress_addresses(&json!({"status": {"loadBalancer": {"ingress": [{"ip": ""}]}}}))
                .is_empty()
        );
    }

    #[test]
    fn names_use_kubernetes_alphabet() {
        let s = random_suffix(5);
        assert_eq!(s.len(), 5);
        assert!(s.bytes().all(|c| ALPHANUMS.contains(&c)));
        let sec = tls_secret_manifest("ns", "conformance-tls", "C", "K");
        assert_eq!(sec["type"], "kubernetes.io/tls");
        assert_eq!(sec["data"]["tls.crt"], "Qw==");
    }
}
