//! Multi-document YAML/JSON parsing into [`Object`]s.
//!
//! The cost is linear in the input: documents are split in one pass into
//! slices of the input (no copies, no padding), every limit is checked
//! before the expensive work, and error line numbers are shifted to the
//! whole text instead of re-parsing a padded copy.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use crate::{Kind, Object, ObjectKey, StoreError};

/// Largest text one request or one manifest file may hold (16 MiB).
pub const MAX_INPUT_BYTES: usize = 16 << 20;

/// Largest single document (an object, or a `List` of objects): 1.5 MiB,
/// the most etcd stores for one object in a default Kubernetes cluster.
pub const MAX_DOCUMENT_BYTES: usize = 1536 << 10;

/// Deepest nesting of maps and lists in one document. Kubernetes objects
/// (Envoy configs inside CECs included) stay far below it; the parsers'
/// own recursion limits (128) would only fail later and less clearly.
pub const MAX_DEPTH: usize = 100;

/// Bound on the YAML scanner's work for documents full of flow collections
/// (`[`/`{`): libyaml re-checks every open flow level for each token, so its
/// cost grows with tokens × nesting. See [`check_flow_nesting`].
/// About two seconds of libyaml in a release build at the very worst.
const FLOW_COST_BUDGET: u64 = 1_000_000_000;

/// Inputs at least this big parse in one of a few [`run_parse`] slots.
pub const LARGE_INPUT_BYTES: usize = 256 << 10;

/// Nice value of the threads that parse large inputs: bulk work yields the
/// CPU to serving (the async workers, Envoy) when the cores are contended.
const LARGE_PARSE_NICE: libc::c_int = 10;

/// Runs `parse` (of an input of `len` bytes) off the async workers that
/// serve the control plane. Small inputs run on tokio's blocking pool.
/// Large ones first wait for one of `cores - 1` (at least 1) slots, so big
/// applies cannot take every core, and run on their own thread at a lower
/// priority, so even the core they use stays available to serving.
pub async fn run_parse<R: Send + 'static>(
    len: usize,
    parse: impl FnOnce() -> R + Send + 'static,
) -> Result<R, StoreError> {
    static SLOTS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    let failed = |e: &dyn fmt::Display| StoreError::Invalid(format!("parsing failed: {e}"));
    if len < LARGE_INPUT_BYTES {
        return tokio::task::spawn_blocking(parse)
            .await
            .map_err(|e| failed(&e));
    }
    let slots = SLOTS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        tokio::sync::Semaphore::new(cores.saturating_sub(1).max(1))
    });
    // The semaphore is never closed.
    let _permit = slots.acquire().await.ok();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("membrane-parse".into())
        .spawn(move || {
            lower_thread_priority();
            // The receiver is gone only when the caller gave up.
            let _ = tx.send(parse());
        })
        .map_err(|e| failed(&e))?;
    rx.await.map_err(|e| failed(&e))
}

/// Raises the calling thread's nice value to [`LARGE_PARSE_NICE`]. Best
/// effort: parsing at normal priority is still correct.
fn lower_thread_priority() {
    // SAFETY: plain syscalls on the calling thread (Linux nice values are
    // per thread); no memory is shared with the kernel.
    let rc = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, LARGE_PARSE_NICE)
    };
    if rc != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "could not lower the priority of a parse thread"
        );
    }
}

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
        match doc {
            Ok(value) => expand(value, |r| out.push(r.map_err(wrap)), Object::from_value),
            Err(e) => out.push(Err(wrap(e))),
        }
    }
    out
}

/// The keys of the objects a text names, reading only `apiVersion`, `kind`
/// and `metadata` of each (what a delete needs; the rest may be absent).
pub fn parse_keys(text: &str) -> Result<Vec<ObjectKey>, StoreError> {
    let mut out = Vec::new();
    for (index, doc) in documents(text) {
        let wrap = |error: StoreError| StoreError::Document {
            index,
            error: Box::new(error),
        };
        let value = doc.map_err(wrap)?;
        let mut first_error = None;
        expand(
            value,
            |r| match r {
                Ok(key) => out.push(key),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            },
            key_of,
        );
        if let Some(e) = first_error {
            return Err(wrap(e));
        }
    }
    Ok(out)
}

/// Feeds `convert` of each object of a document (the items of a `List`, or
/// the document itself) to `sink`. Null documents hold nothing.
fn expand<T>(
    value: Value,
    mut sink: impl FnMut(Result<T, StoreError>),
    convert: impl Fn(Value) -> Result<T, StoreError>,
) {
    if value.is_null() {
        return;
    }
    if is_list(&value) {
        let items = match value {
            Value::Object(mut map) => map.remove("items"),
            _ => None,
        };
        // `items: null` / absent: an empty list.
        let Some(Value::Array(items)) = items else {
            return;
        };
        for (i, item) in items.into_iter().enumerate() {
            sink(convert(item).map_err(|e| StoreError::Item {
                index: i,
                error: Box::new(e),
            }));
        }
    } else {
        sink(convert(value));
    }
}

/// True for a `List` document (or any `...List` with `items`).
fn is_list(v: &Value) -> bool {
    let Some(kind) = v.get("kind").and_then(Value::as_str) else {
        return false;
    };
    kind == "List" || (kind.ends_with("List") && v.get("items").is_some())
}

/// The key of an object value, from `apiVersion`, `kind` and `metadata` only.
fn key_of(v: Value) -> Result<ObjectKey, StoreError> {
    let Some(map) = v.as_object() else {
        return Err(StoreError::NotManifest(
            "expected an object with apiVersion and kind".into(),
        ));
    };
    let text = |field: &str| map.get(field).and_then(Value::as_str).unwrap_or_default();
    let (api_version, kind_name) = (text("apiVersion"), text("kind"));
    for (field, value) in [("apiVersion", api_version), ("kind", kind_name)] {
        if value.is_empty() {
            return Err(StoreError::Invalid(format!(
                "{field}: required field is missing"
            )));
        }
    }
    let kind = Kind::from_type(api_version, kind_name).ok_or_else(|| StoreError::UnknownKind {
        api_version: api_version.to_string(),
        kind: kind_name.to_string(),
    })?;
    let meta = |field: &str| {
        map.get("metadata")
            .and_then(|m| m.get(field))
            .and_then(Value::as_str)
            .unwrap_or_default()
    };
    let name = meta("name");
    if name.is_empty() {
        return Err(StoreError::Invalid(
            "metadata.name: required field is missing".into(),
        ));
    }
    Ok(ObjectKey::new(kind, meta("namespace"), name))
}

/// Splits the text into documents, each parsed into a value (or an error),
/// numbered from 1. Documents with no content (blank or comments only) are
/// neither returned nor counted.
fn documents(text: &str) -> Vec<(usize, Result<Value, StoreError>)> {
    if text.len() > MAX_INPUT_BYTES {
        let error = StoreError::TooLarge {
            what: "input",
            size: text.len(),
            limit: MAX_INPUT_BYTES,
        };
        return vec![(1, Err(error))];
    }
    // Editors on Windows start files with a byte order mark; it is not content.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        match json_documents(text) {
            Ok(docs) => return docs,
            // Flow-style YAML (`{apiVersion: v1, ...}`) is not JSON; only when
            // it is not YAML either is the JSON error the one to report.
            Err(json_error) => {
                let yaml = yaml_documents(text);
                if yaml.iter().all(|(_, r)| r.is_ok()) {
                    return yaml;
                }
                return vec![json_error];
            }
        }
    }
    yaml_documents(text)
}

/// A JSON text: one value, a stream of values (optionally separated by YAML
/// `---` markers, as `kubectl` accepts), or an array of objects (each item a
/// document). On a syntax error, the failing document and its error, with
/// line numbers counted from the start of the whole text.
#[allow(clippy::type_complexity)]
fn json_documents(
    text: &str,
) -> Result<Vec<(usize, Result<Value, StoreError>)>, (usize, Result<Value, StoreError>)> {
    let mut out = Vec::new();
    let mut index = 0;
    let mut pos = 0;
    // Newlines before `pos`, counted incrementally so the walk stays linear.
    let mut line = 0;
    let mut counted = 0;
    loop {
        pos = skip_separators(text, pos);
        if pos >= text.len() {
            return Ok(out);
        }
        let rest = &text[pos..];
        let mut stream = serde_json::Deserializer::from_str(rest).into_iter::<Checked<true>>();
        let Some(next) = stream.next() else {
            return Ok(out);
        };
        let len = stream.byte_offset();
        let value = match next {
            Ok(Checked(v)) => v,
            Err(e) => {
                line += text[counted..pos].matches('\n').count();
                let message = shift_lines(&format!("invalid JSON: {e}"), line);
                return Err((index + 1, Err(StoreError::Invalid(message))));
            }
        };
        if len > MAX_DOCUMENT_BYTES {
            let error = StoreError::TooLarge {
                what: "document",
                size: len,
                limit: MAX_DOCUMENT_BYTES,
            };
            index += 1;
            out.push((index, Err(error)));
        } else {
            // A bare JSON array is taken as a list of objects.
            let items = match value {
                Value::Array(items) => items,
                other => vec![other],
            };
            for item in items {
                index += 1;
                out.push((index, Ok(item)));
            }
        }
        line += text[counted..pos].matches('\n').count();
        counted = pos;
        pos += len;
    }
}

/// Skips whitespace and whole `---` marker lines from `pos`.
fn skip_separators(text: &str, mut pos: usize) -> usize {
    loop {
        let rest = &text[pos..];
        let trimmed = rest.trim_start();
        pos += rest.len() - trimmed.len();
        let is_marker = trimmed.starts_with("---")
            && trimmed[3..].chars().next().is_none_or(char::is_whitespace);
        if !is_marker {
            return pos;
        }
        pos += trimmed.find('\n').map_or(trimmed.len(), |i| i + 1);
    }
}

/// A YAML stream: each document is checked and parsed on its own, so a
/// syntax error in one does not hide the others.
fn yaml_documents(text: &str) -> Vec<(usize, Result<Value, StoreError>)> {
    split_yaml(text)
        .into_iter()
        .enumerate()
        .map(|(i, doc)| (i + 1, parse_yaml_document(doc)))
        .collect()
}

fn parse_yaml_document(doc: Doc<'_>) -> Result<Value, StoreError> {
    if doc.text.len() > MAX_DOCUMENT_BYTES {
        return Err(StoreError::TooLarge {
            what: "document",
            size: doc.text.len(),
            limit: MAX_DOCUMENT_BYTES,
        });
    }
    check_flow_nesting(doc.text)?;
    serde_yaml_ng::from_str::<Checked<false>>(doc.text)
        .map(|Checked(v)| v)
        .map_err(|e| {
            let message = shift_lines(&e.to_string(), doc.first_line);
            StoreError::Invalid(format!("invalid YAML: {message}"))
        })
}

/// One document of a YAML stream: a slice of the input and the 0-based line
/// of the input it starts on.
#[derive(Clone, Copy, Debug)]
struct Doc<'a> {
    first_line: usize,
    text: &'a str,
}

/// Splits YAML text at `---` document markers (and `...` document ends) in
/// one pass. Returns each document with content, as a slice of `text`.
fn split_yaml(text: &str) -> Vec<Doc<'_>> {
    let mut docs = Vec::new();
    // Byte offset and line of the current document, once it has begun.
    let mut start: Option<(usize, usize)> = None;
    let mut has_content = false;
    let mut flush = |start: Option<(usize, usize)>, end: usize, has_content: bool| {
        if let (Some((from, first_line)), true) = (start, has_content) {
            docs.push(Doc {
                first_line,
                text: &text[from..end],
            });
        }
    };
    let mut offset = 0;
    for (n, raw) in text.split_inclusive('\n').enumerate() {
        let line_start = offset;
        offset += raw.len();
        let line = raw.trim_end_matches(['\n', '\r']);
        // Concatenated files may carry a byte order mark on any line.
        let (bom, line) = match line.strip_prefix('\u{feff}') {
            Some(rest) => ('\u{feff}'.len_utf8(), rest),
            None => (0, line),
        };
        let is_marker =
            line.starts_with("---") && line[3..].chars().next().is_none_or(char::is_whitespace);
        if is_marker {
            flush(start, line_start, has_content);
            // Content after the marker (`--- {a: 1}`) belongs to the new document.
            start = Some((line_start + bom + 3, n));
            has_content = is_content(&line[3..]);
            continue;
        }
        if line == "..." || line.starts_with("... ") {
            flush(start, line_start, has_content);
            start = None;
            has_content = false;
            continue;
        }
        if !has_content && line.starts_with('%') {
            // A directive (%YAML, %TAG) before the document: not content.
            start = None;
            continue;
        }
        if bom > 0 {
            // A byte order mark starts a document (YAML 1.2, and libyaml
            // would otherwise see a second document in this one).
            flush(start, line_start, has_content);
            start = None;
            has_content = false;
        }
        if start.is_none() {
            start = Some((line_start + bom, n));
        }
        has_content |= is_content(line);
    }
    flush(start, text.len(), has_content);
    docs
}

fn is_content(line: &str) -> bool {
    let t = line.trim();
    !t.is_empty() && !t.starts_with('#')
}

/// Adds `offset` to every `line N` in a parser message, so that line numbers
/// of a document's errors count from the start of the whole text.
fn shift_lines(message: &str, offset: usize) -> String {
    if offset == 0 {
        return message.to_string();
    }
    let mut out = String::with_capacity(message.len() + 8);
    let mut rest = message;
    while let Some(at) = rest.find("line ") {
        let (head, tail) = rest.split_at(at + "line ".len());
        out.push_str(head);
        let digits = tail.bytes().take_while(u8::is_ascii_digit).count();
        match tail[..digits].parse::<usize>() {
            Ok(n) => out.push_str(&(n + offset).to_string()),
            Err(_) => out.push_str(&tail[..digits]),
        }
        rest = &tail[digits..];
    }
    out.push_str(rest);
    out
}

/// Rejects YAML whose flow collections (`[...]`, `{...}`) nest deeper than
/// [`MAX_DEPTH`], before libyaml sees it: libyaml's scanner does work
/// proportional to the open flow levels for every token, so 100,000 nested
/// brackets (200 KB) take it tens of seconds before any recursion limit.
///
/// The scan follows YAML's lexical rules closely enough for real documents:
/// brackets inside quoted scalars, comments and tags do not count. As a
/// backstop that does not depend on those rules, a document with quotes,
/// comments or tags whose count of non-empty flow collections times its
/// length exceeds [`FLOW_COST_BUDGET`] is refused too (a megabyte with
/// more than about a thousand of them).
fn check_flow_nesting(doc: &str) -> Result<(), StoreError> {
    #[derive(PartialEq)]
    enum State {
        Plain,
        Single,
        Double,
        Comment,
        Tag,
    }
    let bytes = doc.as_bytes();
    let mut state = State::Plain;
    let (mut depth, mut max_depth, mut opens) = (0usize, 0usize, 0u64);
    // Whether any quote, comment or tag was seen: without them the depth
    // counted is exact (flow plain scalars cannot hold brackets), so the
    // backstop is only needed when they could have misled the scan.
    let mut lexical = false;
    let mut prev = b'\n';
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        // Empty `{}` / `[]` (common in generated YAML) never hold a token
        // inside, so they add nothing to the scanner's work.
        if (b == b'[' || b == b'{') && !opens_empty(&bytes[i + 1..], b) {
            opens += 1;
        }
        match state {
            State::Plain => {
                let token_start = prev.is_ascii_whitespace() || b"[]{},:?".contains(&prev);
                match b {
                    b'[' | b'{' => {
                        depth += 1;
                        max_depth = max_depth.max(depth);
                    }
                    b']' | b'}' => depth = depth.saturating_sub(1),
                    b'#' if token_start => state = State::Comment,
                    b'\'' if token_start => state = State::Single,
                    b'"' if token_start => state = State::Double,
                    b'!' if token_start => state = State::Tag,
                    _ => {}
                }
                lexical |= state != State::Plain;
            }
            State::Single if b == b'\'' => {
                if bytes.get(i + 1) == Some(&b'\'') {
                    i += 1; // '' is an escaped quote
                } else {
                    state = State::Plain;
                }
            }
            // A backslash escapes the next byte, if there is one.
            State::Double if b == b'\\' && i + 1 < bytes.len() => i += 1,
            State::Double if b == b'"' => state = State::Plain,
            State::Comment if b == b'\n' => state = State::Plain,
            State::Tag if b.is_ascii_whitespace() => state = State::Plain,
            _ => {}
        }
        prev = bytes[i];
        i += 1;
    }
    if max_depth > MAX_DEPTH {
        return Err(StoreError::TooDeep { limit: MAX_DEPTH });
    }
    // libyaml's work is at most tokens × open levels, and both are bounded
    // by what is counted here, whatever the lexical details.
    if lexical
        && opens > MAX_DEPTH as u64
        && opens.saturating_mul(doc.len() as u64) > FLOW_COST_BUDGET
    {
        return Err(StoreError::Invalid(format!(
            "{opens} flow collections ([...] or {{...}}) in a {} KiB document are more than \
             this parser takes; write it in block style or as JSON",
            doc.len() >> 10
        )));
    }
    Ok(())
}

/// True when the bracket `open` is closed right away (`{}`, `[ ]`).
fn opens_empty(rest: &[u8], open: u8) -> bool {
    let close = if open == b'[' { b']' } else { b'}' };
    rest.iter().find(|c| **c != b' ') == Some(&close)
}

/// A JSON value deserialised strictly: duplicate keys, numbers JSON cannot
/// hold (`.inf`, `.nan`) and nesting deeper than [`MAX_DEPTH`] are errors
/// naming the field, where `serde_json::Value` would keep the last key and
/// turn `.inf` into null.
///
/// `NAMED`: messages start with the field's path. serde_yaml_ng adds the
/// path itself; serde_json does not.
struct Checked<const NAMED: bool>(Value);

impl<'de, const NAMED: bool> de::Deserialize<'de> for Checked<NAMED> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        ValueSeed {
            path: &Path::Root,
            depth: 0,
            named: NAMED,
        }
        .deserialize(d)
        .map(Checked)
    }
}

/// Where a value sits in its document, for error messages
/// (`spec.ports[0].port`); built on the stack, rendered only on error.
#[derive(Clone, Copy)]
enum Path<'a> {
    Root,
    Key(&'a Path<'a>, &'a str),
    Index(&'a Path<'a>, usize),
}

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::Root => Ok(()),
            Path::Key(Path::Root, key) => write!(f, "{key}"),
            Path::Key(parent, key) => write!(f, "{parent}.{key}"),
            Path::Index(parent, i) => write!(f, "{parent}[{i}]"),
        }
    }
}

impl Path<'_> {
    /// `"<path>: "`, or nothing at the root.
    fn prefix(&self) -> String {
        match self {
            Path::Root => String::new(),
            other => format!("{other}: "),
        }
    }
}

impl ValueSeed<'_> {
    /// The message prefix naming this value's field, when the parser does not.
    fn prefix(&self) -> String {
        if self.named {
            self.path.prefix()
        } else {
            String::new()
        }
    }
}

#[derive(Clone, Copy)]
struct ValueSeed<'a> {
    path: &'a Path<'a>,
    depth: usize,
    named: bool,
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_> {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl ValueSeed<'_> {
    fn nested<E: de::Error>(self) -> Result<usize, E> {
        if self.depth >= MAX_DEPTH {
            // The path would be as long as the nesting; the location says where.
            return Err(E::custom(format!("nested deeper than {MAX_DEPTH} levels")));
        }
        Ok(self.depth + 1)
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| {
                E::custom(format!(
                    "{}{v} is not a number a Kubernetes object can hold",
                    self.prefix()
                ))
            })
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        self.deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let depth = self.nested()?;
        let mut out = Vec::new();
        loop {
            let path = Path::Index(self.path, out.len());
            let seed = ValueSeed {
                path: &path,
                depth,
                named: self.named,
            };
            match seq.next_element_seed(seed)? {
                Some(v) => out.push(v),
                None => return Ok(Value::Array(out)),
            }
        }
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let depth = self.nested()?;
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(de::Error::custom(format!(
                    "{}duplicate key {key:?}",
                    self.prefix()
                )));
            }
            let path = Path::Key(self.path, &key);
            let value = map.next_value_seed(ValueSeed {
                path: &path,
                depth,
                named: self.named,
            })?;
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_documents_between_markers() {
        let text = "{\"a\": 1}\n---\n{\"b\":\n 2}\n--- \n\n{\"c\": 3}\n---\n";
        let docs = json_documents(text)
            .map_err(|e| format!("{:?}", e.1))
            .unwrap();
        let values: Vec<Value> = docs.into_iter().filter_map(|(_, v)| v.ok()).collect();
        assert_eq!(
            values,
            [
                serde_json::json!({"a": 1}),
                serde_json::json!({"b": 2}),
                serde_json::json!({"c": 3})
            ]
        );
        // An error in the third document names its line in the whole text.
        let bad = "{\"a\": 1}\n---\n{\"b\": 2}\n---\n{\"c\": -}\n";
        let (index, err) = json_documents(bad).expect_err("syntax error");
        assert_eq!(index, 3);
        let message = err.expect_err("error").to_string();
        assert!(message.contains("line 5"), "{message}");
    }

    #[test]
    fn split_is_slices_with_lines() {
        let text = "# c\n---\na: 1\n--- {b: 2}\n...\n%YAML 1.2\n---\nc: 3\n";
        let docs = split_yaml(text);
        let got: Vec<(usize, &str)> = docs.iter().map(|d| (d.first_line, d.text)).collect();
        assert_eq!(got, [(1, "\na: 1\n"), (3, " {b: 2}\n"), (6, "\nc: 3\n")]);
    }

    #[test]
    fn shifted_lines() {
        assert_eq!(
            shift_lines("bad at line 2 column 3, while x at line 1 column 1", 10),
            "bad at line 12 column 3, while x at line 11 column 1"
        );
    }

    #[test]
    fn flow_nesting_scan() {
        let deep = format!("a: {}{}", "[".repeat(101), "]".repeat(101));
        assert!(matches!(
            check_flow_nesting(&deep),
            Err(StoreError::TooDeep { .. })
        ));
        // Brackets in strings, comments and plain scalars are not nesting.
        let fine = format!(
            "a: \"{}\"\nb: '{}'\n# {}\nc: x{}\nd: [[1], {{e: [2]}}]\n",
            "[".repeat(200),
            "{".repeat(200),
            "[".repeat(200),
            "]".repeat(200)
        );
        assert!(check_flow_nesting(&fine).is_ok());
        // A big generated document full of empty `{}` / `[]` is fine.
        let generated = "  resources: {}\n  finalizers: []\n".repeat(40_000);
        assert!(generated.len() > 1 << 20);
        assert!(check_flow_nesting(&generated).is_ok());
        // Many shallow flow collections: exact without quotes or comments;
        // with them, a big enough document exceeds the backstop's budget.
        let flowy = "  a: {b: 1}\n".repeat(100_000);
        assert!(check_flow_nesting(&flowy).is_ok());
        let quoted = "  a: {b: \"1\"}\n".repeat(100_000);
        assert!(check_flow_nesting(&quoted).is_err());
        // Closing brackets inside strings do not hide real nesting.
        let sneaky = format!("a: {}\n", "[ \"]\", ".repeat(150));
        assert!(check_flow_nesting(&sneaky).is_err());
    }
}
