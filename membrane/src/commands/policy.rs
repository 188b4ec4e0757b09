//! `membrane policy trace`: the verdict of one packet under the policies
//! of a manifest file or directory, and the rule that decided it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use membrane_policy::manifest::{Manifests, parse_dport, parse_party, trace_report};

use super::read_input;

#[derive(clap::Subcommand, Debug)]
pub enum PolicyCommand {
    /// Trace a packet through the policies of manifests (Pods, Namespaces,
    /// CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy, NetworkPolicy).
    Trace(TraceArgs),
}

#[derive(clap::Args, Debug)]
pub struct TraceArgs {
    /// Source: an IP address, or labels `k8s:app=x,k8s:io.kubernetes.pod.namespace=ns`.
    #[arg(long)]
    pub src: String,
    /// Destination: an IP address or labels, as --src.
    #[arg(long)]
    pub dst: String,
    /// Destination port and protocol, e.g. 80/TCP, 53/UDP, 8/ICMP (type).
    #[arg(long, default_value = "0/TCP")]
    pub dport: String,
    /// Manifest files or directories (`-` for stdin).
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<PathBuf>,
}

pub fn run(cmd: PolicyCommand) -> Result<ExitCode> {
    let PolicyCommand::Trace(a) = cmd;
    let src = parse_party(&a.src).map_err(anyhow::Error::msg)?;
    let dst = parse_party(&a.dst).map_err(anyhow::Error::msg)?;
    let (proto, port) = parse_dport(&a.dport).map_err(anyhow::Error::msg)?;
    let mut values = Vec::new();
    for f in &a.files {
        for path in manifest_files(f)? {
            let text = read_input(&path)?;
            for doc in serde_yaml_ng::Deserializer::from_str(&text) {
                let v: serde_json::Value = serde::Deserialize::deserialize(doc)
                    .with_context(|| format!("parsing {}", path.display()))?;
                if !v.is_null() {
                    values.push(v);
                }
            }
        }
    }
    let m = Manifests::from_values(&values);
    for e in &m.errors {
        eprintln!("error: {e}");
    }
    for e in &m.policies.errors {
        eprintln!("warning: {e}");
    }
    let (_, report) = trace_report(&m, &src, &dst, proto, port);
    print!("{report}");
    Ok(ExitCode::SUCCESS)
}

/// A file, or the YAML/JSON files under a directory (sorted, recursive).
fn manifest_files(p: &Path) -> Result<Vec<PathBuf>> {
    if p == Path::new("-") || !p.is_dir() {
        return Ok(vec![p.to_path_buf()]);
    }
    let mut out = Vec::new();
    let mut stack = vec![p.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = e?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path
                .extension()
                .and_then(|x| x.to_str())
                .is_some_and(|x| matches!(x, "yaml" | "yml" | "json"))
            {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}
