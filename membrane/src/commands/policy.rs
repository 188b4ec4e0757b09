//! `membrane policy get`: the policies in force on the agent's endpoints,
//! per endpoint identity and enforcement per direction.
//! `membrane policy trace`: the verdict of one packet under the policies
//! of a manifest file or directory, and the rule that decided it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use hyper::Method;
use membrane_policy::manifest::{Manifests, parse_dport, parse_party, trace_report};
use serde_json::Value;

use super::read_input;
use crate::client::ApiClient;

#[derive(clap::Subcommand, Debug)]
pub enum PolicyCommand {
    /// Policies in force per endpoint: identity, enforcement per direction.
    Get {
        /// json, yaml or table (default).
        #[arg(short = 'o', long)]
        output: Option<String>,
    },
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
    /// Manifest files or directories (`-` for stdin); without any, the
    /// agent traces under the policies and endpoints in force on its node.
    #[arg(short = 'f', long = "filename")]
    pub files: Vec<PathBuf>,
}

pub async fn run(api: &Path, cmd: PolicyCommand) -> Result<ExitCode> {
    match cmd {
        PolicyCommand::Get { output } => get(api, output.as_deref()).await,
        PolicyCommand::Trace(a) if a.files.is_empty() => live_trace(api, a).await,
        PolicyCommand::Trace(a) => trace(a),
    }
}

async fn get(api: &Path, output: Option<&str>) -> Result<ExitCode> {
    let report = ApiClient::new(api)
        .ok(Method::GET, "/v1/policy", None)
        .await?;
    match output {
        Some("json") => println!("{}", serde_json::to_string_pretty(&report)?),
        Some("yaml") => print!("{}", serde_yaml_ng::to_string(&report)?),
        None | Some("table") => print!("{}", table(&report)),
        Some(other) => anyhow::bail!("-o {other}: expected json, yaml or table"),
    }
    Ok(ExitCode::SUCCESS)
}

fn table(report: &Value) -> String {
    let head = [
        "ENDPOINT", "POD", "IDENTITY", "INGRESS", "EGRESS", "ENTRIES", "POLICIES",
    ]
    .map(String::from);
    let rows: Vec<[String; 7]> = report["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let s = |k: &str| match &e[k] {
                Value::String(s) => s.clone(),
                Value::Null => "-".into(),
                v => v.to_string(),
            };
            let pols: Vec<&str> = e["policies"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            [
                s("id"),
                s("pod"),
                s("identity"),
                s("ingress"),
                s("egress"),
                s("entries"),
                if pols.is_empty() {
                    "-".into()
                } else {
                    pols.join(", ")
                },
            ]
        })
        .collect();
    let mut widths = head.clone().map(|h| h.len());
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    for r in std::iter::once(&head).chain(&rows) {
        let cells: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("   ").trim_end());
        out.push('\n');
    }
    for e in report["errors"].as_array().into_iter().flatten() {
        if let Some(e) = e.as_str() {
            out.push_str(&format!("warning: {e}\n"));
        }
    }
    out
}

async fn live_trace(api: &Path, a: TraceArgs) -> Result<ExitCode> {
    // Checked here too, so a typo is reported without a round trip.
    parse_party(&a.src).map_err(anyhow::Error::msg)?;
    parse_party(&a.dst).map_err(anyhow::Error::msg)?;
    parse_dport(&a.dport).map_err(anyhow::Error::msg)?;
    let body = serde_json::json!({"src": a.src, "dst": a.dst, "dport": a.dport});
    let r = ApiClient::new(api)
        .ok(Method::POST, "/v1/policy/trace", Some(body.to_string()))
        .await?;
    print!("{}", r["report"].as_str().unwrap_or_default());
    Ok(ExitCode::SUCCESS)
}

fn trace(a: TraceArgs) -> Result<ExitCode> {
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
