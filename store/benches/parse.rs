//! Parsing cost against input size (issue 14 item 3), old and new side by
//! side in one run. Plain `Instant` timing (no criterion), like the Maglev
//! bench. Run: `cargo bench -p membrane-store --bench parse` (release).
//! A filter argument runs matching cases only: `... -- nesting`.
//!
//! "old" is the splitter this crate had before (kept here only): each
//! document re-parsed from a copy padded with one newline per line before
//! it, and a failed JSON parse retried as YAML with no depth check.

use std::hint::black_box;
use std::time::{Duration, Instant};

use membrane_store::{Object, StoreError, parse_documents_lenient};
use serde_json::Value;

fn service(i: usize) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: s{i}\n  namespace: default\nspec:\n  ports:\n  - port: 80\n    targetPort: 3000\n"
    )
}

fn documents(n: usize) -> String {
    (0..n).map(service).collect()
}

fn nested_json(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

/// Best of `runs`, and what the parse returned (objects, errors).
fn time(runs: usize, f: impl Fn() -> (usize, usize)) -> (Duration, (usize, usize)) {
    let mut best = Duration::MAX;
    let mut out = (0, 0);
    for _ in 0..runs {
        let t = Instant::now();
        out = black_box(f());
        best = best.min(t.elapsed());
    }
    (best, out)
}

fn new(text: &str) -> (usize, usize) {
    let results = parse_documents_lenient(text);
    let ok = results.iter().filter(|r| r.is_ok()).count();
    (ok, results.len() - ok)
}

fn old(text: &str) -> (usize, usize) {
    let mut ok = 0;
    let mut bad = 0;
    for (_, doc) in old::documents(text) {
        match doc.and_then(Object::from_value) {
            Ok(_) => ok += 1,
            Err(_) => bad += 1,
        }
    }
    (ok, bad)
}

fn row(case: &str, bytes: usize, runs_new: usize, run_old: bool, text: &str) {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    if filter.is_some_and(|f| !case.contains(&f)) {
        return;
    }
    let (t_new, r_new) = time(runs_new, || new(text));
    let old_cell = if run_old {
        let (t_old, r_old) = time(1, || old(text));
        format!("{:>10.1} ms  {r_old:?}", t_old.as_secs_f64() * 1e3)
    } else {
        format!("{:>10}", "skipped")
    };
    println!(
        "| {case:<28} | {:>8.1} KiB | {:>9.1} ms  {r_new:?} | {old_cell} |",
        bytes as f64 / 1024.0,
        t_new.as_secs_f64() * 1e3,
    );
}

fn main() {
    println!(
        "build: {}",
        if cfg!(debug_assertions) {
            "debug (figures are only meaningful in release)"
        } else {
            "release"
        }
    );
    println!("| case | input | new: best of 3 (ok, errors) | old: one run (ok, errors) |");
    println!("|---|---|---|---|");
    for n in [1_000, 8_000, 32_000] {
        let text = documents(n);
        row(&format!("documents {n}"), text.len(), 3, true, &text);
    }
    // New only: the largest input accepted (16 MiB).
    let mut max = String::new();
    let mut i = 0;
    while max.len() + 200 < membrane_store::MAX_INPUT_BYTES {
        max.push_str(&service(i));
        i += 1;
    }
    row(
        &format!("documents {i} (16 MiB)"),
        max.len(),
        3,
        false,
        &max,
    );
    for depth in [1_000, 10_000, 30_000, 100_000] {
        let text = nested_json(depth);
        row(
            &format!("nesting {depth} (JSON)"),
            text.len(),
            3,
            true,
            &text,
        );
    }
    let yaml = format!("a: {}", nested_json(100_000));
    row("nesting 100000 (YAML flow)", yaml.len(), 3, true, &yaml);
}

/// The parser as it was before (store/src/parse.rs at main before this
/// change), reduced to what it did to split and decode.
mod old {
    use super::*;

    pub fn documents(text: &str) -> Vec<(usize, Result<Value, StoreError>)> {
        let trimmed = text.trim_start();
        if trimmed.starts_with('{') || trimmed.starts_with('[') {
            let values: Result<Vec<Value>, _> = serde_json::Deserializer::from_str(text)
                .into_iter::<Value>()
                .collect();
            if let Ok(values) = values {
                return values
                    .into_iter()
                    .enumerate()
                    .map(|(i, v)| (i + 1, Ok(v)))
                    .collect();
            }
        }
        split_yaml(text)
            .into_iter()
            .enumerate()
            .map(|(i, (first_line, doc))| {
                let padded = format!("{}{}", "\n".repeat(first_line), doc);
                let parsed = serde_yaml_ng::from_str::<Value>(&padded)
                    .map_err(|e| StoreError::Invalid(format!("invalid YAML: {e}")));
                (i + 1, parsed)
            })
            .collect()
    }

    fn split_yaml(text: &str) -> Vec<(usize, String)> {
        let mut docs = Vec::new();
        let mut current = String::new();
        let mut start = 0;
        let mut has_content = false;
        let mut flush = |current: &mut String, start: usize, has_content: &mut bool| {
            if *has_content {
                docs.push((start, std::mem::take(current)));
            } else {
                current.clear();
            }
            *has_content = false;
        };
        for (n, line) in text.lines().enumerate() {
            let is_marker =
                line.starts_with("---") && line[3..].chars().next().is_none_or(char::is_whitespace);
            if is_marker {
                flush(&mut current, start, &mut has_content);
                start = n;
                let rest = &line[3..];
                current.push_str("   ");
                current.push_str(rest);
                current.push('\n');
                if is_content(rest) {
                    has_content = true;
                }
                continue;
            }
            if current.is_empty() {
                start = n;
            }
            if is_content(line) {
                has_content = true;
            }
            current.push_str(line);
            current.push('\n');
        }
        flush(&mut current, start, &mut has_content);
        docs
    }

    fn is_content(line: &str) -> bool {
        let t = line.trim();
        !t.is_empty() && !t.starts_with('#')
    }
}
