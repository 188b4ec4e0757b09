//! Cluster Mesh annotations and backend affinity, as Cilium defines them.
//!
//! A service is *global* when annotated `service.cilium.io/global: "true"`
//! (legacy `io.cilium/global-service`). A global service is *shared* unless
//! `service.cilium.io/shared: "false"` (legacy `io.cilium/shared-service`).
//! Only a global service has an affinity (`service.cilium.io/affinity`,
//! legacy `io.cilium/service-affinity`): `local`, `remote` or `none`.
//!
//! Backends carry the id of the cluster they live in; 0 is the local cluster
//! (the same convention as [`crate::maglev::MaglevBackend::cluster_id`]).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

pub const ANNOTATION_GLOBAL: &str = "service.cilium.io/global";
pub const ANNOTATION_GLOBAL_LEGACY: &str = "io.cilium/global-service";
pub const ANNOTATION_SHARED: &str = "service.cilium.io/shared";
pub const ANNOTATION_SHARED_LEGACY: &str = "io.cilium/shared-service";
pub const ANNOTATION_AFFINITY: &str = "service.cilium.io/affinity";
pub const ANNOTATION_AFFINITY_LEGACY: &str = "io.cilium/service-affinity";

/// Which cluster's backends a global service prefers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Affinity {
    /// Local and remote backends alike (also every non-global service).
    #[default]
    None,
    /// Local backends; healthy remote ones only while no local one is healthy.
    Local,
    /// Remote backends; healthy local ones only while no remote one is healthy.
    Remote,
}

impl Affinity {
    pub fn as_str(self) -> &'static str {
        match self {
            Affinity::None => "none",
            Affinity::Local => "local",
            Affinity::Remote => "remote",
        }
    }

    /// Whether a backend of `cluster_id` (0 = local) is preferred.
    pub fn prefers(self, cluster_id: u32) -> bool {
        match self {
            Affinity::None => false,
            Affinity::Local => cluster_id == 0,
            Affinity::Remote => cluster_id != 0,
        }
    }
}

impl FromStr for Affinity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Cilium lower-cases the value before comparing.
        match s.to_ascii_lowercase().as_str() {
            "none" => Ok(Affinity::None),
            "local" => Ok(Affinity::Local),
            "remote" => Ok(Affinity::Remote),
            _ => Err(format!(
                "unknown affinity {s:?} (expected local, remote or none)"
            )),
        }
    }
}

impl fmt::Display for Affinity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a Service's annotations say about Cluster Mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MeshAnnotations {
    pub global: bool,
    /// Meaningful only when `global`: export own backends to other clusters.
    pub shared: bool,
    /// [`Affinity::None`] unless `global`.
    pub affinity: Affinity,
}

/// One annotation problem; the value falls back to Cilium's default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnotationProblem {
    /// `metadata.annotations[<key>]`
    pub field: String,
    pub message: String,
}

/// The first of `keys` present wins (the current name before the legacy one,
/// as Cilium's `annotation.Get`).
fn get<'a>(
    ann: &'a BTreeMap<String, String>,
    keys: [&'static str; 2],
) -> Option<(&'static str, &'a str)> {
    keys.into_iter()
        .find_map(|k| ann.get(k).map(|v| (k, v.as_str())))
}

fn parse_bool(
    ann: &BTreeMap<String, String>,
    keys: [&'static str; 2],
    default: bool,
    problems: &mut Vec<AnnotationProblem>,
) -> bool {
    match get(ann, keys) {
        None => default,
        Some((k, v)) => match v.to_ascii_lowercase().as_str() {
            "true" => true,
            "false" => false,
            _ => {
                problems.push(AnnotationProblem {
                    field: format!("metadata.annotations[{k}]"),
                    message: format!("{v:?} is not \"true\" or \"false\"; using {default}"),
                });
                default
            }
        },
    }
}

/// Reads the Cluster Mesh annotations of a Service.
pub fn mesh_annotations(
    ann: Option<&BTreeMap<String, String>>,
) -> (MeshAnnotations, Vec<AnnotationProblem>) {
    let mut problems = Vec::new();
    let empty = BTreeMap::new();
    let ann = ann.unwrap_or(&empty);
    let global = parse_bool(
        ann,
        [ANNOTATION_GLOBAL, ANNOTATION_GLOBAL_LEGACY],
        false,
        &mut problems,
    );
    if !global {
        return (MeshAnnotations::default(), problems);
    }
    let shared = parse_bool(
        ann,
        [ANNOTATION_SHARED, ANNOTATION_SHARED_LEGACY],
        true,
        &mut problems,
    );
    let affinity = match get(ann, [ANNOTATION_AFFINITY, ANNOTATION_AFFINITY_LEGACY]) {
        None => Affinity::None,
        Some((k, v)) => v.parse().unwrap_or_else(|e| {
            problems.push(AnnotationProblem {
                field: format!("metadata.annotations[{k}]"),
                message: format!("{e}; using none"),
            });
            Affinity::None
        }),
    };
    (
        MeshAnnotations {
            global,
            shared,
            affinity,
        },
        problems,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn not_global_ignores_shared_and_affinity() {
        let a = ann(&[(ANNOTATION_SHARED, "false"), (ANNOTATION_AFFINITY, "local")]);
        let (m, p) = mesh_annotations(Some(&a));
        assert_eq!(m, MeshAnnotations::default());
        assert!(p.is_empty());
        assert_eq!(mesh_annotations(None).0, MeshAnnotations::default());
    }

    #[test]
    fn current_and_legacy_names() {
        let a = ann(&[(ANNOTATION_GLOBAL, "TRUE"), (ANNOTATION_AFFINITY, "Remote")]);
        let (m, p) = mesh_annotations(Some(&a));
        assert_eq!(
            m,
            MeshAnnotations {
                global: true,
                shared: true,
                affinity: Affinity::Remote
            }
        );
        assert!(p.is_empty());

        let a = ann(&[
            (ANNOTATION_GLOBAL_LEGACY, "true"),
            (ANNOTATION_SHARED_LEGACY, "false"),
            (ANNOTATION_AFFINITY_LEGACY, "local"),
        ]);
        let (m, _) = mesh_annotations(Some(&a));
        assert_eq!(
            m,
            MeshAnnotations {
                global: true,
                shared: false,
                affinity: Affinity::Local
            }
        );
    }

    #[test]
    fn current_name_wins_over_legacy() {
        let a = ann(&[
            (ANNOTATION_GLOBAL, "true"),
            (ANNOTATION_AFFINITY, "local"),
            (ANNOTATION_AFFINITY_LEGACY, "remote"),
        ]);
        assert_eq!(mesh_annotations(Some(&a)).0.affinity, Affinity::Local);
    }

    #[test]
    fn bad_values_are_reported_with_their_field() {
        let a = ann(&[
            (ANNOTATION_GLOBAL, "true"),
            (ANNOTATION_SHARED, "nope"),
            (ANNOTATION_AFFINITY, "nearby"),
        ]);
        let (m, p) = mesh_annotations(Some(&a));
        assert!(m.global && m.shared);
        assert_eq!(m.affinity, Affinity::None);
        let fields: Vec<&str> = p.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "metadata.annotations[service.cilium.io/shared]",
                "metadata.annotations[service.cilium.io/affinity]"
            ]
        );
        assert!(p[1].message.contains("nearby"), "{p:?}");
    }

    #[test]
    fn preference() {
        assert!(Affinity::Local.prefers(0) && !Affinity::Local.prefers(2));
        assert!(Affinity::Remote.prefers(2) && !Affinity::Remote.prefers(0));
        assert!(!Affinity::None.prefers(0) && !Affinity::None.prefers(2));
    }
}
