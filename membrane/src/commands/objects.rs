//! `apply`, `delete` and `get`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Result, bail};
use hyper::Method;
use serde_json::{Value, json};

use super::read_input;
use crate::client::ApiClient;
use crate::table;

/// `apply -f` / `delete -f`: print one kubectl-style line per object.
pub async fn apply(api: &Path, file: &Path, endpoint: &str) -> Result<ExitCode> {
    // The server refuses bodies over the limit; say so before reading it all.
    let limit = membrane_store::MAX_INPUT_BYTES;
    if let Ok(meta) = std::fs::metadata(file)
        && meta.is_file()
        && meta.len() > limit as u64
    {
        bail!(
            "{}: {:.1} MiB is more than the limit of {} MiB per apply; split it into several files",
            file.display(),
            meta.len() as f64 / f64::from(1 << 20),
            limit >> 20
        );
    }
    let body = read_input(file)?;
    let answer = ApiClient::new(api)
        .ok(Method::POST, endpoint, Some(body))
        .await?;
    let mut missing = false;
    for r in answer["results"].as_array().into_iter().flatten() {
        let kind = r["kind"].as_str().unwrap_or_default().to_lowercase();
        let result = r["result"].as_str().unwrap_or_default();
        missing |= result == "not found";
        let ns = r["namespace"].as_str().unwrap_or_default();
        let name = r["name"].as_str().unwrap_or_default();
        if ns.is_empty() {
            println!("{kind}/{name} {result}");
        } else {
            println!("{kind}/{name} {result} (namespace {ns})");
        }
    }
    Ok(if missing {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// `get KIND [NAME] [-n NS] [-o json|yaml]`.
pub async fn get(
    api: &Path,
    kind: &str,
    name: Option<&str>,
    namespace: Option<&str>,
    output: Option<&str>,
) -> Result<ExitCode> {
    let mut path = format!("/v1/objects/{kind}");
    let mut query = Vec::new();
    if let Some(ns) = namespace {
        query.push(format!("namespace={ns}"));
    }
    if let Some(n) = name {
        query.push(format!("name={n}"));
    }
    if !query.is_empty() {
        path = format!("{path}?{}", query.join("&"));
    }
    let answer = ApiClient::new(api).ok(Method::GET, &path, None).await?;
    let items = answer["items"].as_array().cloned().unwrap_or_default();
    let doc = if name.is_some() && items.len() == 1 {
        items[0].clone()
    } else {
        json!({"apiVersion": "v1", "kind": "List", "items": items})
    };
    match output {
        Some("json") => println!("{}", serde_json::to_string_pretty(&doc)?),
        Some("yaml") => print!("{}", serde_yaml_ng::to_string(&doc)?),
        None | Some("wide") | Some("table") => {
            if items.is_empty() {
                eprintln!("No resources found.");
            } else {
                print!("{}", table::render(kind, &items, namespace.is_none()));
            }
        }
        Some(other) => bail!("-o {other}: expected json, yaml or table"),
    }
    Ok(ExitCode::SUCCESS)
}

/// A field of an object as text, "" when absent.
pub fn text(v: &Value, pointer: &str) -> String {
    match v.pointer(pointer) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}
