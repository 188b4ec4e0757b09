//! Which Ingresses Membrane manages (the `cilium` Ingress class).

use k8s_openapi::api::networking::v1::{Ingress, IngressClass};

/// `spec.controller` of the `cilium` IngressClass.
pub const CONTROLLER_NAME: &str = "cilium.io/ingress-controller";
/// The Ingress class Membrane answers to.
pub const CLASS_NAME: &str = "cilium";
/// Legacy class annotation; it takes precedence over `spec.ingressClassName`.
pub const CLASS_ANNOTATION: &str = "kubernetes.io/ingress.class";
/// Marks an IngressClass as the cluster default.
pub const DEFAULT_CLASS_ANNOTATION: &str = "ingressclass.kubernetes.io/is-default-class";

/// The Ingress's class: the `kubernetes.io/ingress.class` annotation first,
/// else `spec.ingressClassName`. Empty values count as unset.
pub fn ingress_class_of(ing: &Ingress) -> Option<String> {
    let from_annotation = ing
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(CLASS_ANNOTATION))
        .filter(|v| !v.is_empty());
    let from_spec = ing
        .spec
        .as_ref()
        .and_then(|s| s.ingress_class_name.as_ref())
        .filter(|v| !v.is_empty());
    from_annotation.or(from_spec).cloned()
}

/// Whether Membrane should serve this Ingress: its class is `cilium`, or it
/// has no class and the IngressClass `cilium` is marked as the default.
pub fn is_managed(ing: &Ingress, classes: &[IngressClass]) -> bool {
    match ingress_class_of(ing) {
        Some(class) => class == CLASS_NAME,
        None => classes.iter().any(|c| {
            c.metadata.name.as_deref() == Some(CLASS_NAME)
                && c.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(DEFAULT_CLASS_ANNOTATION))
                    .is_some_and(|v| v == "true")
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::networking::v1::IngressSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use std::collections::BTreeMap;

    fn ingress(annotation: Option<&str>, class_name: Option<&str>) -> Ingress {
        Ingress {
            metadata: ObjectMeta {
                name: Some("i".into()),
                annotations: annotation
                    .map(|v| BTreeMap::from([(CLASS_ANNOTATION.to_string(), v.to_string())])),
                ..Default::default()
            },
            spec: Some(IngressSpec {
                ingress_class_name: class_name.map(str::to_string),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn class(name: &str, default: Option<&str>) -> IngressClass {
        IngressClass {
            metadata: ObjectMeta {
                name: Some(name.into()),
                annotations: default.map(|v| {
                    BTreeMap::from([(DEFAULT_CLASS_ANNOTATION.to_string(), v.to_string())])
                }),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn annotation_wins_over_spec() {
        assert_eq!(
            ingress_class_of(&ingress(Some("nginx"), Some("cilium"))).as_deref(),
            Some("nginx")
        );
        assert_eq!(
            ingress_class_of(&ingress(None, Some("cilium"))).as_deref(),
            Some("cilium")
        );
        assert_eq!(
            ingress_class_of(&ingress(Some(""), Some("cilium"))).as_deref(),
            Some("cilium")
        );
        assert_eq!(ingress_class_of(&ingress(None, None)), None);
    }

    #[test]
    fn managed_by_class() {
        assert!(is_managed(&ingress(None, Some("cilium")), &[]));
        assert!(is_managed(&ingress(Some("cilium"), Some("other")), &[]));
        assert!(!is_managed(&ingress(Some("other"), Some("cilium")), &[]));
        assert!(!is_managed(
            &ingress(None, Some("some-invalid-class-name")),
            &[class("cilium", Some("true"))]
        ));
    }

    #[test]
    fn classless_ingress_needs_default_cilium_class() {
        let ing = ingress(None, None);
        assert!(!is_managed(&ing, &[]));
        assert!(!is_managed(&ing, &[class("cilium", None)]));
        assert!(!is_managed(&ing, &[class("cilium", Some("false"))]));
        assert!(!is_managed(&ing, &[class("nginx", Some("true"))]));
        assert!(is_managed(
            &ing,
            &[class("nginx", None), class("cilium", Some("true"))]
        ));
    }
}
