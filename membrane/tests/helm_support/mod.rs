//! The Helm chart `charts/membrane`, linted and rendered offline by Helm's
//! own SDK (PyPI `helm-python-sdk` in `.venv/`, through
//! `scripts/helm_chart.py`), as parsed Kubernetes objects; and the RBAC
//! checker ([`rbac`]) that matches audited API requests against the rules the
//! chart grants.
//!
//! Use from another test file with `mod helm_support;`.

#![allow(dead_code)]

pub mod rbac;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

pub fn chart_dir() -> PathBuf {
    repo_root().join("charts/membrane")
}

/// The release namespace the tests render into (Cilium's).
pub const NAMESPACE: &str = "kube-system";

/// One lint and render of the chart.
pub struct Rendered {
    /// Helm lint's report: `{"messages": [{"severity", "path", "error"}], "errors": [..]}`.
    pub lint: Value,
    /// Every rendered object, in template order (empty documents dropped).
    pub objects: Vec<Value>,
    /// The chart's `crds/` files as objects.
    pub crds: Vec<Value>,
}

impl Rendered {
    /// The object of this kind and name (panics naming it when absent).
    pub fn get(&self, kind: &str, name: &str) -> &Value {
        self.find(kind, name)
            .unwrap_or_else(|| panic!("the chart renders no {kind} {name}"))
    }

    pub fn find(&self, kind: &str, name: &str) -> Option<&Value> {
        self.objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
    }

    pub fn of_kind(&self, kind: &str) -> Vec<&Value> {
        self.objects.iter().filter(|o| o["kind"] == kind).collect()
    }

    /// Lint findings of severity warning (2) or error (3), plus errors.
    pub fn lint_problems(&self) -> Vec<String> {
        let mut out: Vec<String> = self.lint["messages"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| m["severity"].as_u64().unwrap_or(0) >= 2)
            .map(|m| format!("{}: {}", m["path"], m["error"]))
            .collect();
        out.extend(
            self.lint["errors"]
                .as_array()
                .into_iter()
                .flatten()
                .map(Value::to_string),
        );
        out
    }
}

/// The Python of `.venv/` (where scripts/setup.sh installs helm-python-sdk).
fn python() -> PathBuf {
    repo_root().join(".venv/bin/python")
}

/// Whether a missing prerequisite must fail (CI) rather than skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Lints and renders the chart with `values` (a JSON object of Helm values).
/// `None` (after saying why) when helm-python-sdk is missing outside CI; in
/// CI that fails the test.
pub fn render(values: &Value) -> Option<Rendered> {
    let py = python();
    let missing = |why: String| -> Option<Rendered> {
        assert!(
            !in_ci(),
            "{why}: run scripts/setup.sh (CI=true: a missing prerequisite fails)"
        );
        eprintln!("SKIPPED: {why}: run scripts/setup.sh");
        None
    };
    if !py.is_file() {
        return missing(format!("{} is missing", py.display()));
    }
    let out = Command::new(&py)
        .arg(repo_root().join("scripts/helm_chart.py"))
        .arg(chart_dir())
        .arg(values.to_string())
        .arg(NAMESPACE)
        .output()
        .expect("run scripts/helm_chart.py");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(2) {
        return missing(format!("helm-python-sdk is not usable: {stderr}"));
    }
    assert!(
        out.status.success(),
        "rendering charts/membrane with {values} failed: {stderr}"
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("helm_chart.py prints JSON");
    let mut templates: Vec<(&String, &Value)> = report["manifests"]
        .as_object()
        .expect("manifests")
        .iter()
        .collect();
    templates.sort_by_key(|(path, _)| path.as_str());
    let mut objects = Vec::new();
    // NOTES.txt is what `helm install` prints, not a manifest.
    for (path, text) in templates
        .into_iter()
        .filter(|(p, _)| !p.ends_with("NOTES.txt"))
    {
        objects.extend(parse_documents(
            text.as_str().unwrap_or_default(),
            &format!("template {path}"),
        ));
    }
    let crds = report["crds"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| {
            parse_documents(
                c["data"].as_str().unwrap_or_default(),
                &format!("chart file {}", c["name"]),
            )
        })
        .collect();
    Some(Rendered {
        lint: report["lint"].clone(),
        objects,
        crds,
    })
}

/// The objects of a multi-document YAML text (documents separated by
/// `---` lines, as Helm writes them).
pub fn parse_documents(text: &str, origin: &str) -> Vec<Value> {
    let mut docs = vec![String::new()];
    for line in text.lines() {
        if line.trim_end() == "---" {
            docs.push(String::new());
        } else if let Some(doc) = docs.last_mut() {
            doc.push_str(line);
            doc.push('\n');
        }
    }
    docs.iter()
        .map(|d| {
            serde_yaml_ng::from_str::<Value>(d)
                .unwrap_or_else(|e| panic!("{origin}: invalid YAML: {e}"))
        })
        .filter(|v| !v.is_null())
        .collect()
}
