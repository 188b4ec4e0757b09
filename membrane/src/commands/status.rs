//! `membrane status`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;
use hyper::Method;
use serde_json::Value;

use crate::client::ApiClient;
use crate::commands::objects::text;

pub async fn run(api: &Path, output: Option<&str>) -> Result<ExitCode> {
    let report = ApiClient::new(api)
        .ok(Method::GET, "/v1/status", None)
        .await?;
    let rejected = report["rejected"].as_array().cloned().unwrap_or_default();
    match output {
        Some("json") => println!("{}", serde_json::to_string_pretty(&report)?),
        Some("yaml") => print!("{}", serde_yaml_ng::to_string(&report)?),
        _ => print!("{}", human(&report)),
    }
    Ok(if rejected.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn human(r: &Value) -> String {
    let mut out = String::new();
    let envoy = &r["envoy"];
    let running = envoy["running"].as_bool().unwrap_or(false);
    out.push_str(&format!(
        "Envoy:     {} (pid {}, restarts {}, admin {})\n",
        if running { "running" } else { "not running" },
        text(envoy, "/pid"),
        text(envoy, "/restarts"),
        text(envoy, "/admin_address"),
    ));
    out.push_str(&format!("Node:      {}\n", text(r, "/node")));
    out.push_str("xDS:\n");
    out.push_str(&xds_lines(&r["xds"]));
    let rejected = r["rejected"].as_array().cloned().unwrap_or_default();
    if rejected.is_empty() {
        out.push_str("Rejected:  none\n");
    } else {
        out.push_str(&format!("Rejected:  {}\n", rejected.len()));
        for item in rejected {
            out.push_str(&format!(
                "  {}\n    {}\n",
                text(&item, "/object"),
                text(&item, "/reason")
            ));
        }
    }
    out
}

/// The xDS part of the report is whatever the server reports; render it
/// generically as indented key/value lines.
fn xds_lines(v: &Value) -> String {
    fn walk(v: &Value, indent: usize, out: &mut String) {
        match v {
            Value::Object(m) => {
                for (k, val) in m {
                    match val {
                        Value::Object(_) | Value::Array(_) => {
                            out.push_str(&format!("{:indent$}{k}:\n", ""));
                            walk(val, indent + 2, out);
                        }
                        _ => out.push_str(&format!("{:indent$}{k}: {}\n", "", scalar(val))),
                    }
                }
            }
            Value::Array(items) => {
                for item in items {
                    out.push_str(&format!("{:indent$}-\n", ""));
                    walk(item, indent + 2, out);
                }
            }
            other => out.push_str(&format!("{:indent$}{}\n", "", scalar(other))),
        }
    }
    fn scalar(v: &Value) -> String {
        match v {
            Value::String(s) => s.clone(),
            Value::Null => "-".into(),
            other => other.to_string(),
        }
    }
    let mut out = String::new();
    walk(v, 2, &mut out);
    out
}
