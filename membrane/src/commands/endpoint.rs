//! `membrane endpoint list [-o json]`: the pod endpoints set up through
//! `membrane-cni`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;
use hyper::Method;
use serde_json::Value;

use crate::client::ApiClient;

#[derive(clap::Subcommand, Debug)]
pub enum EndpointCommand {
    /// Every endpoint: id, pod, IPs, host interface, node, state, policy
    /// identity and enforcement per direction.
    List {
        /// json, yaml or table (default).
        #[arg(short = 'o', long)]
        output: Option<String>,
    },
}

pub async fn run(api: &Path, command: EndpointCommand) -> Result<ExitCode> {
    let EndpointCommand::List { output } = command;
    let list = ApiClient::new(api)
        .ok(Method::GET, "/v1/endpoints", None)
        .await?;
    match output.as_deref() {
        Some("json") => println!("{}", serde_json::to_string_pretty(&list)?),
        Some("yaml") => print!("{}", serde_yaml_ng::to_string(&list)?),
        None | Some("table") => print!("{}", table(&list)),
        Some(other) => anyhow::bail!("-o {other}: expected json, yaml or table"),
    }
    Ok(ExitCode::SUCCESS)
}

fn table(list: &Value) -> String {
    let rows: Vec<[String; 9]> = list
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let ips: Vec<&str> = e["ips"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            [
                e["id"].to_string(),
                e["pod"].as_str().unwrap_or("").to_string(),
                ips.join(","),
                e["interface"].as_str().unwrap_or("").to_string(),
                e["node"].as_str().unwrap_or("").to_string(),
                e["state"].as_str().unwrap_or("").to_string(),
                match &e["identity"] {
                    Value::Null => "-".into(),
                    v => v.to_string(),
                },
                enforcement(&e["ingressEnforcement"]),
                enforcement(&e["egressEnforcement"]),
            ]
        })
        .collect();
    let head = [
        "ID",
        "POD",
        "IPS",
        "INTERFACE",
        "NODE",
        "STATE",
        "IDENTITY",
        "INGRESS-ENFORCEMENT",
        "EGRESS-ENFORCEMENT",
    ]
    .map(String::from);
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
    out
}

/// Cilium's column values: policy enforced in that direction or not.
fn enforcement(v: &Value) -> String {
    match v.as_bool() {
        Some(true) => "Enabled".into(),
        Some(false) => "Disabled".into(),
        None => "-".into(),
    }
}
