//! Cilium's etcd client config file (`--kvstore-opt etcd.config=FILE`, and
//! one per remote cluster in `--clustermesh-config DIR`) and that directory's
//! layout: one file per remote cluster, named after it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::MeshError;
use crate::types::validate_cluster_name;

/// The subset of etcd's client YAML that Cilium's config files use. Unknown
/// keys are ignored, as etcd's own loader does.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct EtcdConfig {
    #[serde(default)]
    pub endpoints: Vec<String>,
    #[serde(
        rename = "trusted-ca-file",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub trusted_ca_file: Option<PathBuf>,
    #[serde(rename = "cert-file", default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    #[serde(rename = "key-file", default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

impl EtcdConfig {
    /// Parses a config file's text; `path` names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<EtcdConfig, MeshError> {
        let bad = |field: &str, reason: String| MeshError::InvalidEtcdConfig {
            path: path.to_path_buf(),
            field: field.to_string(),
            reason,
        };
        let c: EtcdConfig = serde_yaml_ng::from_str(text).map_err(|e| bad("", e.to_string()))?;
        if c.endpoints.is_empty() {
            return Err(bad("endpoints", "no endpoint is listed".into()));
        }
        for e in &c.endpoints {
            let Some(rest) = e
                .strip_prefix("https://")
                .or_else(|| e.strip_prefix("http://"))
            else {
                return Err(bad(
                    "endpoints",
                    format!("{e:?} is not an http:// or https:// URL"),
                ));
            };
            if rest.is_empty() {
                return Err(bad("endpoints", format!("{e:?} has no host")));
            }
        }
        // Mutual TLS needs both halves of the client identity.
        if c.cert_file.is_some() != c.key_file.is_some() {
            return Err(bad(
                if c.cert_file.is_some() {
                    "key-file"
                } else {
                    "cert-file"
                },
                "cert-file and key-file must be given together".into(),
            ));
        }
        Ok(c)
    }

    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<EtcdConfig, MeshError> {
        let text = std::fs::read_to_string(path).map_err(|e| MeshError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        EtcdConfig::parse(path, &text)
    }

    pub fn uses_tls(&self) -> bool {
        self.endpoints.iter().any(|e| e.starts_with("https://")) || self.trusted_ca_file.is_some()
    }

    /// YAML in the same layout Cilium's Helm chart renders.
    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(self).unwrap_or_default()
    }
}

/// Whether a directory entry is a remote cluster's config: not hidden (a
/// Secret volume's `..data` and friends), and with an `endpoints:` key (the
/// same directory also holds the certificates the configs point at).
fn is_cluster_file(name: &str, text: &str) -> bool {
    !name.starts_with('.') && text.contains("endpoints:")
}

/// Outcome of reading a `--clustermesh-config` directory.
#[derive(Debug, Default)]
pub struct MeshDir {
    /// Remote cluster name → its etcd config.
    pub clusters: BTreeMap<String, EtcdConfig>,
    /// Files that look like cluster configs but are not usable.
    pub errors: Vec<MeshError>,
}

/// Reads every remote cluster config in `dir`, skipping `local` (Cilium's
/// chart mounts every cluster's file, this one's too).
pub fn read_mesh_dir(dir: &Path, local: &str) -> Result<MeshDir, MeshError> {
    let io = |e| MeshError::Io {
        path: dir.to_path_buf(),
        source: e,
    };
    let mut out = MeshDir::default();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        // Follows symlinks (Secret volumes link every file).
        if !path.is_file() {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        if !is_cluster_file(&name, &text) || name == local {
            continue;
        }
        if let Err(reason) = validate_cluster_name(&name) {
            out.errors.push(MeshError::InvalidEtcdConfig {
                path,
                field: "file name".into(),
                reason,
            });
            continue;
        }
        match EtcdConfig::parse(&path, &text) {
            Ok(c) => {
                out.clusters.insert(name, c);
            }
            Err(e) => out.errors.push(e),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CILIUM_FILE: &str = "endpoints:\n- https://cluster2.mesh.cilium.io:2379\ntrusted-ca-file: /var/lib/cilium/clustermesh/cluster2.etcd-client-ca.crt\nkey-file: /var/lib/cilium/clustermesh/cluster2.etcd-client.key\ncert-file: /var/lib/cilium/clustermesh/cluster2.etcd-client.crt\n";

    #[test]
    fn parses_the_file_ciliums_chart_renders() {
        let c = EtcdConfig::parse(Path::new("cluster2"), CILIUM_FILE).unwrap();
        assert_eq!(c.endpoints, ["https://cluster2.mesh.cilium.io:2379"]);
        assert_eq!(
            c.trusted_ca_file.as_deref(),
            Some(Path::new(
                "/var/lib/cilium/clustermesh/cluster2.etcd-client-ca.crt"
            ))
        );
        assert!(c.uses_tls());
        let again = EtcdConfig::parse(Path::new("x"), &c.to_yaml()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn errors_name_file_and_field() {
        let e = EtcdConfig::parse(Path::new("/d/c2"), "endpoints: []\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "etcd config /d/c2: endpoints: no endpoint is listed"
        );
        let e =
            EtcdConfig::parse(Path::new("/d/c2"), "endpoints: [\"127.0.0.1:2379\"]\n").unwrap_err();
        assert!(
            e.to_string()
                .contains("endpoints: \"127.0.0.1:2379\" is not"),
            "{e}"
        );
        let e = EtcdConfig::parse(
            Path::new("/d/c2"),
            "endpoints: [\"https://a:1\"]\ncert-file: /x\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("key-file"), "{e}");
    }

    #[test]
    fn directory_layout() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        std::fs::write(p.join("cluster2"), CILIUM_FILE).unwrap();
        std::fs::write(
            p.join("cluster2.etcd-client.crt"),
            "-----BEGIN CERTIFICATE-----\n",
        )
        .unwrap();
        std::fs::write(p.join("local1"), CILIUM_FILE).unwrap();
        std::fs::write(p.join(".hidden"), CILIUM_FILE).unwrap();
        std::fs::write(p.join("Bad_Name"), CILIUM_FILE).unwrap();
        std::fs::write(p.join("cluster3"), "endpoints: []\n").unwrap();
        std::fs::create_dir(p.join("..data")).unwrap();
        let m = read_mesh_dir(p, "local1").unwrap();
        assert_eq!(m.clusters.keys().collect::<Vec<_>>(), ["cluster2"]);
        let errs: Vec<String> = m.errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(
            errs.iter()
                .any(|e| e.contains("Bad_Name") && e.contains("file name"))
        );
        assert!(
            errs.iter()
                .any(|e| e.contains("cluster3") && e.contains("endpoints"))
        );
    }
}
