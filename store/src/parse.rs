//! Multi-document YAML/JSON parsing into [`Object`]s.

use serde_json::Value;

use crate::{Object, StoreError};

/// Parses a multi-document YAML (or JSON) text. `kind: List` (or any
/// `...List` with `items`) expands its items; empty documents are skipped.
/// The first error is returned, naming the document (1-based) and the field.
pub fn parse_documents(text: &str) -> Result<Vec<Object>, StoreError> {
    parse_documents_lenient(text).into_iter().collect()
}

/// Like [`parse_documents`] but returns one result per object (or per bad
/// document), so a source can keep the good documents of a partly bad file.
pub fn parse_documents_lenient(text: &str) -> Vec<Result<Object, StoreError>> {
    let mut out = Vec::new();
    for (index, doc) in documents(text) {
        let wrap = |error: StoreError| StoreError::Document {
            index,
            error: Box::new(error),
        };
        let value = match doc {
            Ok(v) => v,
            Err(e) => {
                out.push(Err(wrap(e)));
                continue;
            }
        };
        if value.is_null() {
            continue;
        }
        match list_items(&value) {
            Some(items) => {
                for (i, item) in items.iter().enumerate() {
                    out.push(Object::from_value(item.clone()).map_err(|e| {
                        wrap(StoreError::Item {
                            index: i,
                            error: Box::new(e),
                        })
                    }));
                }
            }
            None => out.push(Object::from_value(value).map_err(wrap)),
        }
    }
    out
}

/// The items of a `List` document, if it is one.
fn list_items(v: &Value) -> Option<&Vec<Value>> {
    let kind = v.get("kind")?.as_str()?;
    if kind == "List" || (kind.ends_with("List") && v.get("items").is_some()) {
        match v.get("items") {
            Some(Value::Array(items)) => Some(items),
            // `items: null` / absent: an empty list.
            _ => Some(EMPTY.get_or_init(Vec::new)),
        }
    } else {
        None
    }
}

static EMPTY: std::sync::OnceLock<Vec<Value>> = std::sync::OnceLock::new();

/// Splits the text into documents, each parsed into a value (or an error),
/// numbered from 1. Documents with no content (blank or comments only) are
/// neither returned nor counted.
fn documents(text: &str) -> Vec<(usize, Result<Value, StoreError>)> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        // JSON (possibly a stream of values). YAML would mostly parse it too,
        // but JSON allows tabs where YAML does not.
        let values: Result<Vec<Value>, _> = serde_json::Deserializer::from_str(text)
            .into_iter::<Value>()
            .collect();
        if let Ok(values) = values {
            let mut out = Vec::new();
            let mut index = 0;
            for v in values {
                // A bare JSON array is taken as a list of objects.
                let items = match v {
                    Value::Array(items) => items,
                    other => vec![other],
                };
                for item in items {
                    index += 1;
                    out.push((index, Ok(item)));
                }
            }
            return out;
        }
    }
    split_yaml(text)
        .into_iter()
        .enumerate()
        .map(|(i, (first_line, doc))| {
            // Each document is parsed on its own so a syntax error in one does
            // not hide the others. Leading newlines keep the line numbers in
            // parser errors relative to the whole text.
            let padded = format!("{}{}", "\n".repeat(first_line), doc);
            let parsed = serde_yaml_ng::from_str::<Value>(&padded)
                .map_err(|e| StoreError::Invalid(format!("invalid YAML: {e}")));
            (i + 1, parsed)
        })
        .collect()
}

/// Splits YAML text at `---` document markers. Returns each non-empty
/// document with the 0-based line number it starts at.
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
            // Content after the marker (`--- {a: 1}`) belongs to the new
            // document; blank the marker to keep columns.
            let rest = &line[3..];
            current.push_str("   ");
            current.push_str(rest);
            current.push('\n');
            if is_content(rest) {
                has_content = true;
            }
            continue;
        }
        if line == "..." || line.starts_with("... ") {
            // Explicit document end.
            flush(&mut current, start, &mut has_content);
            start = n + 1;
            continue;
        }
        if !has_content && current.is_empty() && line.starts_with('%') {
            // A directive (%YAML, %TAG) before the document: not content.
            start = n + 1;
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
