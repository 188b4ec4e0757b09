//! `membrane up`'s Cluster Mesh flags, named as Cilium's agent names them.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use membrane_clustermesh::MeshConfig;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct ClusterMeshArgs {
    /// Name of this cluster (at most 32 lower case alphanumerics and '-').
    #[arg(long, default_value = "default")]
    pub cluster_name: String,
    /// Unique id of this cluster in the mesh, 1–255 (0: no Cluster Mesh).
    #[arg(long, default_value_t = 0)]
    pub cluster_id: u32,
    /// Key-value store this cluster's global services are exported to: etcd.
    #[arg(long)]
    pub kvstore: Option<String>,
    /// Key-value store options, KEY=VALUE: etcd.config=FILE (Cilium's etcd
    /// config file format).
    #[arg(long)]
    pub kvstore_opt: Vec<String>,
    /// Directory with one etcd config file per remote cluster, named after it
    /// (adding a file connects, removing one disconnects).
    #[arg(long)]
    pub clustermesh_config: Option<PathBuf>,
    /// How long a disconnected cluster's backends are kept (e.g. 30s, 5m);
    /// 0s or unset: until it comes back.
    #[arg(long, value_parser = parse_go_duration)]
    pub clustermesh_cache_ttl: Option<Duration>,
    /// Longest wait for remote clusters' initial sync before programming
    /// services.
    #[arg(long, default_value = "1m", value_parser = parse_go_duration)]
    pub clustermesh_sync_timeout: Duration,
}

impl ClusterMeshArgs {
    /// `None` when no Cluster Mesh flag is given.
    pub fn config(&self) -> Result<Option<MeshConfig>> {
        let kvstore_config = match self.kvstore.as_deref() {
            None | Some("") => {
                if !self.kvstore_opt.is_empty() {
                    bail!("--kvstore-opt needs --kvstore etcd");
                }
                None
            }
            Some("etcd") => {
                let mut file = None;
                for o in &self.kvstore_opt {
                    match o.split_once('=') {
                        Some(("etcd.config", v)) if !v.is_empty() => file = Some(PathBuf::from(v)),
                        _ => bail!("--kvstore-opt {o:?}: expected etcd.config=FILE"),
                    }
                }
                let Some(f) = file else {
                    bail!("--kvstore etcd needs --kvstore-opt etcd.config=FILE");
                };
                Some(f)
            }
            Some(other) => bail!("--kvstore {other:?}: only etcd is supported"),
        };
        if self.cluster_id == 0 {
            if kvstore_config.is_some() || self.clustermesh_config.is_some() {
                bail!("--cluster-id: Cluster Mesh needs a cluster id in 1..255 (0 is reserved)");
            }
            return Ok(None);
        }
        if let Err(e) = membrane_clustermesh::validate_cluster_id(self.cluster_id) {
            bail!("--cluster-id: {e}");
        }
        if let Err(e) = membrane_clustermesh::validate_cluster_name(&self.cluster_name) {
            bail!("--cluster-name: {e}");
        }
        if self.cluster_name == "default" {
            bail!("--cluster-name: cannot use the default cluster name with --cluster-id");
        }
        let mut cfg = MeshConfig::new(&self.cluster_name, self.cluster_id);
        cfg.kvstore_config = kvstore_config;
        cfg.mesh_dir = self.clustermesh_config.clone();
        cfg.cache_ttl = self.clustermesh_cache_ttl.filter(|d| !d.is_zero());
        cfg.sync_timeout = self.clustermesh_sync_timeout;
        Ok(Some(cfg))
    }
}

/// Go's `time.ParseDuration` for the units flags use: `1m`, `30s`,
/// `1m30s`, `500ms`, `1h`, `0`.
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let bad = || format!("{s:?} is not a duration (e.g. 30s, 1m, 1m30s, 500ms)");
    let mut total = Duration::ZERO;
    let mut rest = s;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let n_end = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if n_end == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..n_end].parse().map_err(|_| bad())?;
        rest = &rest[n_end..];
        let u_end = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let d = match &rest[..u_end] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            _ => return Err(bad()),
        };
        total += d;
        rest = &rest[u_end..];
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> ClusterMeshArgs {
        ClusterMeshArgs {
            cluster_name: "default".into(),
            clustermesh_sync_timeout: Duration::from_secs(60),
            ..Default::default()
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_go_duration("1m").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_go_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(
            parse_go_duration("500ms").unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(parse_go_duration("0").unwrap(), Duration::ZERO);
        for bad in ["", "m", "10", "1x", "-1s"] {
            assert!(parse_go_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn no_flags_no_mesh() {
        assert!(args().config().unwrap().is_none());
    }

    #[test]
    fn flags_are_validated() {
        let mut a = args();
        a.kvstore = Some("etcd".into());
        a.kvstore_opt = vec!["etcd.config=/etc/c1.yaml".into()];
        let e = a.config().unwrap_err().to_string();
        assert!(e.contains("--cluster-id") && e.contains("reserved"), "{e}");
        a.cluster_id = 256;
        assert!(a.config().unwrap_err().to_string().contains("--cluster-id"));
        a.cluster_id = 3;
        assert!(
            a.config()
                .unwrap_err()
                .to_string()
                .contains("--cluster-name")
        );
        a.cluster_name = "Bad_Name".into();
        assert!(
            a.config()
                .unwrap_err()
                .to_string()
                .contains("--cluster-name")
        );
        a.cluster_name = "c1".into();
        a.clustermesh_cache_ttl = Some(Duration::ZERO);
        let c = a.config().unwrap().unwrap();
        assert_eq!((c.cluster_name.as_str(), c.cluster_id), ("c1", 3));
        assert_eq!(
            c.kvstore_config.as_deref(),
            Some(std::path::Path::new("/etc/c1.yaml"))
        );
        assert_eq!(c.cache_ttl, None);
        a.kvstore_opt = vec!["etcd.cfg=/x".into()];
        assert!(
            a.config()
                .unwrap_err()
                .to_string()
                .contains("etcd.config=FILE")
        );
        a.kvstore = Some("consul".into());
        assert!(a.config().unwrap_err().to_string().contains("only etcd"));
    }
}
