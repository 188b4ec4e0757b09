//! The eBPF service datapath from the command line: `membrane up`'s
//! `--datapath` flags, `membrane service list` and `membrane service update`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Result, bail};
use hyper::Method;
use membrane_agent::datapath::{DEFAULT_MAX_SERVICES, DatapathOptions};
use membrane_lb::service::Algorithm;
use serde_json::{Value, json};

use crate::client::ApiClient;
use crate::commands::objects::text;

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatapathMode {
    /// No service datapath (Envoy only).
    None,
    /// eBPF tc service load balancing (root; bpffs).
    Ebpf,
}

/// `membrane up` flags of the service datapath.
#[derive(clap::Args, Debug, Clone)]
pub struct DatapathArgs {
    /// Service datapath: none, or ebpf (tc programs replacing kube-proxy).
    #[arg(long, value_enum, default_value = "none")]
    pub datapath: DatapathMode,
    /// Interfaces to attach the tc program to (pod veths' host sides and
    /// external devices), in the namespace membrane runs in.
    #[arg(long, value_delimiter = ',')]
    pub datapath_devices: Vec<String>,
    /// bpffs directory for maps and links; left pinned on exit so forwarding
    /// survives restarts (remove it to detach).
    #[arg(long, default_value = "/sys/fs/bpf/membrane")]
    pub bpf_pin_dir: PathBuf,
    /// Default algorithm; per Service: annotation service.cilium.io/lb-algorithm.
    #[arg(long, default_value = "random")]
    pub lb_algorithm: Algorithm,
    /// Maglev table size M (251, 509, 1021, 2039, 4093, 8191, 16381, 32749,
    /// 65521 or 131071).
    #[arg(long, default_value_t = membrane_lb::maglev::DEFAULT_M,
          value_parser = membrane_lb::cli::parse_table_size)]
    pub maglev_table_size: u32,
    /// Most frontends the maps hold (the Maglev array is (N+1)×M entries).
    #[arg(long, default_value_t = DEFAULT_MAX_SERVICES)]
    pub max_services: u32,
    /// Node addresses NodePort Services are exposed on.
    #[arg(long, value_delimiter = ',')]
    pub node_addresses: Vec<IpAddr>,
    /// Forward pod traffic through the host stack instead of eBPF host
    /// routing (which is used when the kernel has bpf_redirect_peer,
    /// bpf_redirect_neigh and bpf_fib_lookup).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub enable_host_legacy_routing: bool,
    /// Socket LB: translate services at connect/sendmsg for the processes
    /// under --cgroup-root, so host-network processes reach ClusterIPs and
    /// this node's NodePorts.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub enable_socket_lb: bool,
    /// cgroup v2 directory the socket LB programs attach to (mounted there
    /// when missing, as Cilium does).
    #[arg(long, default_value = membrane_agent::datapath::DEFAULT_CGROUP_ROOT)]
    pub cgroup_root: PathBuf,
    /// Cluster Mesh (global services across clusters).
    #[command(flatten)]
    pub mesh: super::clustermesh::ClusterMeshArgs,
}

impl DatapathArgs {
    /// With `cni`, pod interfaces are attached as pods come, so no device
    /// needs to be named.
    pub fn options_for(&self, cni: bool) -> Result<Option<DatapathOptions>> {
        let mesh = self.mesh.config()?;
        match self.datapath {
            DatapathMode::None => {
                if !self.datapath_devices.is_empty() {
                    bail!("--datapath-devices needs --datapath ebpf");
                }
                if mesh.is_some() {
                    bail!("Cluster Mesh (--cluster-id) needs --datapath ebpf");
                }
                if self.enable_socket_lb {
                    bail!("--enable-socket-lb needs --datapath ebpf");
                }
                Ok(None)
            }
            DatapathMode::Ebpf => {
                if self.datapath_devices.is_empty() && !cni {
                    bail!("--datapath ebpf needs --datapath-devices IF[,IF...] (or --enable-cni)");
                }
                Ok(Some(DatapathOptions {
                    pin_dir: self.bpf_pin_dir.clone(),
                    devices: self.datapath_devices.clone(),
                    default_algorithm: self.lb_algorithm,
                    maglev_table_size: self.maglev_table_size,
                    max_services: self.max_services,
                    node_addresses: self.node_addresses.clone(),
                    mesh,
                    host_legacy_routing: self.enable_host_legacy_routing,
                    socket_lb: self.enable_socket_lb.then(|| self.cgroup_root.clone()),
                }))
            }
        }
    }
}

#[derive(clap::Subcommand, Debug)]
pub enum ServiceCommand {
    /// List frontends and their backends (like `cilium service list`).
    #[command(alias = "ls")]
    List {
        /// json, or a table (default).
        #[arg(short = 'o', long)]
        output: Option<String>,
        /// Mark the backends Cluster Mesh affinity prefers `(preferred)`.
        #[arg(long)]
        clustermesh_affinity: bool,
    },
    /// Set backends' state: active, quarantined or maintenance (persisted in
    /// the pinned maps, so it survives a restart).
    Update {
        /// IP:PORT[/PROTO], comma separated.
        #[arg(long, value_delimiter = ',', required = true)]
        backends: Vec<String>,
        /// active, quarantined or maintenance.
        #[arg(long)]
        states: String,
    },
}

pub async fn run(api: &Path, command: ServiceCommand) -> Result<ExitCode> {
    let client = ApiClient::new(api);
    match command {
        ServiceCommand::List {
            output,
            clustermesh_affinity,
        } => {
            let v = client.ok(Method::GET, "/v1/services", None).await?;
            let services = v["services"].as_array().cloned().unwrap_or_default();
            match output.as_deref() {
                Some("json") => println!("{}", serde_json::to_string_pretty(&services)?),
                None | Some("table") => print!("{}", table(&services, clustermesh_affinity)),
                Some(other) => bail!("unknown output format {other:?} (json or table)"),
            }
        }
        ServiceCommand::Update { backends, states } => {
            let body = json!({"backends": backends, "state": states}).to_string();
            let v = client
                .ok(Method::POST, "/v1/services/backends", Some(body))
                .await?;
            for b in v["updated"].as_array().into_iter().flatten() {
                println!("{}: {}", b.as_str().unwrap_or_default(), text(&v, "/state"));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `cilium service list`'s table: one row per frontend, one line per
/// backend as `N => IP:PORT/PROTO (state)`, plus ` (preferred)` with
/// `--clustermesh-affinity` on backends the service's affinity prefers.
fn table(services: &[Value], clustermesh_affinity: bool) -> String {
    let mut rows: Vec<[String; 4]> = vec![[
        "ID".into(),
        "Frontend".into(),
        "Service Type".into(),
        "Backend".into(),
    ]];
    for s in services {
        let backends: Vec<String> = s["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
            .map(|(i, b)| {
                let preferred = clustermesh_affinity && b["preferred"].as_bool() == Some(true);
                format!(
                    "{} => {} ({}){}",
                    i + 1,
                    text(b, "/address"),
                    text(b, "/state"),
                    if preferred { " (preferred)" } else { "" }
                )
            })
            .collect();
        let kind = match text(s, "/type") {
            t if t.is_empty() => "(restored)".to_string(),
            t => t,
        };
        let mut first = true;
        let lines = if backends.is_empty() {
            vec![String::new()]
        } else {
            backends
        };
        for b in lines {
            if first {
                rows.push([text(s, "/id"), text(s, "/frontend"), kind.clone(), b]);
                first = false;
            } else {
                rows.push([String::new(), String::new(), String::new(), b]);
            }
        }
    }
    // Go's tabwriter as Cilium configures it: cells padded by 3, min 5.
    let widths: Vec<usize> = (0..4)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .map(|w| (w + 3).max(5))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: String = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_lists_backends_like_cilium() {
        let services = vec![
            json!({"id": 1, "frontend": "10.96.0.10:80/TCP", "type": "ClusterIP",
                   "backends": [
                       {"id": 1, "address": "10.244.11.2:8080/TCP", "state": "active"},
                       {"id": 2, "address": "10.244.12.2:8080/TCP", "state": "quarantined"}]}),
            json!({"id": 2, "frontend": "10.96.0.11:53/UDP", "type": "ClusterIP", "backends": []}),
        ];
        let t = table(&services, false);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines,
            vec![
                "ID   Frontend            Service Type   Backend",
                "1    10.96.0.10:80/TCP   ClusterIP      1 => 10.244.11.2:8080/TCP (active)",
                "                                        2 => 10.244.12.2:8080/TCP (quarantined)",
                "2    10.96.0.11:53/UDP   ClusterIP",
            ]
        );
    }

    #[test]
    fn clustermesh_affinity_marks_preferred_backends() {
        let services = vec![
            json!({"id": 1, "frontend": "10.96.0.10:80/TCP", "type": "ClusterIP",
            "clustermesh_affinity": "local",
            "backends": [
                {"id": 1, "address": "10.244.11.2:8080/TCP", "state": "active", "cluster_id": 0, "preferred": true},
                {"id": 2, "address": "10.245.11.2:8080/TCP", "state": "active", "cluster_id": 2, "preferred": false}]}),
        ];
        let lines: Vec<String> = table(&services, true).lines().map(str::to_string).collect();
        assert_eq!(
            lines,
            vec![
                "ID   Frontend            Service Type   Backend",
                "1    10.96.0.10:80/TCP   ClusterIP      1 => 10.244.11.2:8080/TCP (active) (preferred)",
                "                                        2 => 10.245.11.2:8080/TCP (active)",
            ]
        );
        // Without the flag, the plain table.
        assert!(!table(&services, false).contains("preferred"));
    }

    #[test]
    fn datapath_flags_are_checked() {
        let mut a = DatapathArgs {
            datapath: DatapathMode::Ebpf,
            datapath_devices: vec![],
            bpf_pin_dir: PathBuf::from("/sys/fs/bpf/membrane"),
            lb_algorithm: Algorithm::Maglev,
            maglev_table_size: 251,
            max_services: 16,
            node_addresses: vec![],
            enable_host_legacy_routing: false,
            enable_socket_lb: false,
            cgroup_root: PathBuf::from("/run/cilium/cgroupv2"),
            mesh: Default::default(),
        };
        assert!(a.options_for(false).is_err());
        // With the CNI, pod interfaces are attached as they come.
        assert!(a.options_for(true).unwrap().is_some());
        a.datapath_devices = vec!["eth0".into()];
        let o = a.options_for(false).unwrap().unwrap();
        assert_eq!(o.default_algorithm, Algorithm::Maglev);
        assert_eq!(o.maglev_table_size, 251);
        a.datapath = DatapathMode::None;
        assert!(a.options_for(false).is_err());
        a.datapath_devices.clear();
        assert!(a.options_for(false).unwrap().is_none());
        a.enable_socket_lb = true;
        let e = a.options_for(true).unwrap_err().to_string();
        assert!(e.contains("--enable-socket-lb"), "{e}");
    }

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        dp: DatapathArgs,
    }

    #[test]
    fn host_routing_and_socket_lb_flags_as_cilium() {
        use clap::Parser;
        let c = Cli::try_parse_from(["x", "--datapath", "ebpf"]).unwrap();
        let o = c.dp.options_for(true).unwrap().unwrap();
        assert!(!o.host_legacy_routing);
        assert_eq!(o.socket_lb, None);
        assert_eq!(c.dp.cgroup_root, PathBuf::from("/run/cilium/cgroupv2"));

        let c = Cli::try_parse_from([
            "x",
            "--datapath",
            "ebpf",
            "--enable-host-legacy-routing",
            "--enable-socket-lb=true",
            "--cgroup-root",
            "/sys/fs/cgroup/x",
        ])
        .unwrap();
        let o = c.dp.options_for(true).unwrap().unwrap();
        assert!(o.host_legacy_routing);
        assert_eq!(o.socket_lb, Some(PathBuf::from("/sys/fs/cgroup/x")));

        let c = Cli::try_parse_from([
            "x",
            "--datapath",
            "ebpf",
            "--enable-host-legacy-routing=false",
            "--enable-socket-lb",
        ])
        .unwrap();
        let o = c.dp.options_for(true).unwrap().unwrap();
        assert!(!o.host_legacy_routing);
        assert_eq!(o.socket_lb, Some(PathBuf::from("/run/cilium/cgroupv2")));
    }
}
