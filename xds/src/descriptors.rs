//! The Envoy descriptor set, loaded into a `DescriptorPool` one file (and
//! its imports) at a time, when a type it defines is first needed.
//!
//! Decoding the whole set of envoy-types costs ~33 MB of heap for ~1,000
//! files, of which a process serving Ingresses and CECs touches a few dozen.
//! An index of message names → file is all that is kept for the rest; the
//! file bytes stay in the binary's read-only data.

use std::collections::HashMap;
use std::sync::RwLock;

use prost::Message;
use prost::bytes::Buf;
use prost::encoding::{WireType, decode_key, decode_varint, encode_key, encode_varint};
use prost_reflect::{DescriptorPool, DynamicMessage, ReflectMessage, Value as PValue};

use crate::codec::{CodecError, message_name};

const ANY: &str = "google.protobuf.Any";
/// Field number of `FileDescriptorSet.file`.
const SET_FILE: u32 = 1;
/// Bound on the rounds of [`Descriptors::pool_for_any`]: each round adds at
/// least one type, and no Envoy resource nests this many distinct `Any`s.
const MAX_ROUNDS: usize = 64;

/// The parts of a `FileDescriptorProto` the index needs; every other field
/// is skipped while decoding.
#[derive(Clone, PartialEq, prost::Message)]
struct FileHead {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(string, optional, tag = "2")]
    package: Option<String>,
    #[prost(string, repeated, tag = "3")]
    dependency: Vec<String>,
    #[prost(message, repeated, tag = "4")]
    message_type: Vec<MessageHead>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct MessageHead {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(message, repeated, tag = "3")]
    nested_type: Vec<MessageHead>,
}

pub(crate) struct Descriptors {
    /// Each file's encoded `FileDescriptorProto`, borrowed from the set.
    pub(crate) files: Vec<&'static [u8]>,
    /// Each file's imports, as indexes into `files`.
    deps: Vec<Vec<u32>>,
    /// Fully qualified message name → the file defining it.
    pub(crate) messages: HashMap<Box<str>, u32>,
    loaded: RwLock<Loaded>,
}

struct Loaded {
    pool: DescriptorPool,
    /// Whether `files[i]` is in `pool`.
    files: Vec<bool>,
}

impl Descriptors {
    /// Indexes an encoded `FileDescriptorSet` without building descriptors.
    pub(crate) fn index(set: &'static [u8]) -> Result<Descriptors, String> {
        let mut files = Vec::new();
        let mut buf = set;
        while buf.has_remaining() {
            let (field, wire) = decode_key(&mut buf).map_err(|e| e.to_string())?;
            let len = match wire {
                WireType::LengthDelimited => {
                    usize::try_from(decode_varint(&mut buf).map_err(|e| e.to_string())?)
                        .map_err(|e| e.to_string())?
                }
                other => return Err(format!("descriptor set: field {field} is {other:?}")),
            };
            if len > buf.len() {
                return Err("descriptor set: truncated".into());
            }
            let (body, rest) = buf.split_at(len);
            if field == SET_FILE {
                files.push(body);
            }
            buf = rest;
        }
        let heads = files
            .iter()
            .map(|f| FileHead::decode(*f).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        let by_name: HashMap<&str, u32> = heads
            .iter()
            .zip(0u32..)
            .filter_map(|(h, i)| Some((h.name.as_deref()?, i)))
            .collect();
        let mut messages = HashMap::new();
        let mut deps = Vec::with_capacity(heads.len());
        for (h, i) in heads.iter().zip(0u32..) {
            let package = h.package.as_deref().unwrap_or_default();
            for m in &h.message_type {
                collect_names(package, m, i, &mut messages);
            }
            let mut d = Vec::with_capacity(h.dependency.len());
            for dep in &h.dependency {
                let Some(&j) = by_name.get(dep.as_str()) else {
                    return Err(format!(
                        "descriptor set: {} imports {dep}, which it lacks",
                        h.name.as_deref().unwrap_or("?")
                    ));
                };
                d.push(j);
            }
            deps.push(d);
        }
        let count = files.len();
        Ok(Descriptors {
            files,
            deps,
            messages,
            loaded: RwLock::new(Loaded {
                pool: DescriptorPool::new(),
                files: vec![false; count],
            }),
        })
    }

    /// Whether the set defines message `name` (loaded or not).
    pub(crate) fn defines(&self, name: &str) -> bool {
        self.messages.contains_key(name)
    }

    /// A pool holding every message of `names` that the set defines (names
    /// it does not define are left for the caller's lookup to report).
    pub(crate) fn pool_for<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<DescriptorPool, CodecError> {
        let wanted: Vec<u32> = names
            .into_iter()
            .filter_map(|n| self.messages.get(n).copied())
            .collect();
        {
            let loaded = self.loaded.read().unwrap_or_else(|p| p.into_inner());
            if wanted.iter().all(|&f| loaded.files[f as usize]) {
                return Ok(loaded.pool.clone());
            }
        }
        let mut loaded = self.loaded.write().unwrap_or_else(|p| p.into_inner());
        // Imports before importers, each file once.
        let mut order = Vec::new();
        let mut seen = loaded.files.clone();
        for f in wanted {
            self.post_order(f, &mut seen, &mut order);
        }
        if order.is_empty() {
            return Ok(loaded.pool.clone());
        }
        // The selected files re-framed as a `FileDescriptorSet`, so the pool
        // decodes them itself and keeps their options.
        let mut set = Vec::with_capacity(
            order
                .iter()
                .map(|&f| self.files[f as usize].len() + 8)
                .sum(),
        );
        for &f in &order {
            let body = self.files[f as usize];
            encode_key(SET_FILE, WireType::LengthDelimited, &mut set);
            encode_varint(body.len() as u64, &mut set);
            set.extend_from_slice(body);
        }
        loaded
            .pool
            .decode_file_descriptor_set(set.as_slice())
            .map_err(|e| CodecError::Descriptors(e.to_string()))?;
        for f in order {
            loaded.files[f as usize] = true;
        }
        Ok(loaded.pool.clone())
    }

    /// Depth-first over imports with an explicit stack (import chains are
    /// acyclic; `seen` also guards against a malformed set).
    fn post_order(&self, root: u32, seen: &mut [bool], order: &mut Vec<u32>) {
        if seen[root as usize] {
            return;
        }
        seen[root as usize] = true;
        let mut stack = vec![(root, 0usize)];
        while let Some((f, next)) = stack.last_mut() {
            let deps = &self.deps[*f as usize];
            if let Some(&d) = deps.get(*next) {
                *next += 1;
                if !seen[d as usize] {
                    seen[d as usize] = true;
                    stack.push((d, 0));
                }
            } else {
                order.push(*f);
                stack.pop();
            }
        }
    }

    /// A pool that can encode `any` as JSON: its type and the type of every
    /// `Any` nested in it, which only its bytes reveal.
    pub(crate) fn pool_for_any(
        &self,
        any: &envoy_types::pb::google::protobuf::Any,
    ) -> Result<DescriptorPool, CodecError> {
        let mut names: Vec<String> = vec![ANY.into(), message_name(&any.type_url).into()];
        for _ in 0..MAX_ROUNDS {
            let pool = self.pool_for(names.iter().map(String::as_str))?;
            let mut missing = Vec::new();
            if let Some(desc) = pool.get_message_by_name(message_name(&any.type_url))
                && let Ok(msg) = DynamicMessage::decode(desc, any.value.as_slice())
            {
                self.missing_nested(&pool, &msg, &mut missing);
            }
            if missing.is_empty() {
                return Ok(pool);
            }
            names.extend(missing);
        }
        Err(CodecError::Descriptors(format!(
            "{}: more than {MAX_ROUNDS} rounds of nested types",
            any.type_url
        )))
    }

    /// Types of nested `Any`s that the set defines but `pool` lacks.
    fn missing_nested(&self, pool: &DescriptorPool, msg: &DynamicMessage, out: &mut Vec<String>) {
        if msg.descriptor().full_name() == ANY {
            let url = match msg.get_field_by_name("type_url").as_deref() {
                Some(PValue::String(s)) => s.clone(),
                _ => return,
            };
            let name = message_name(&url);
            match pool.get_message_by_name(name) {
                Some(desc) => {
                    if let Some(PValue::Bytes(b)) = msg.get_field_by_name("value").as_deref()
                        && let Ok(inner) = DynamicMessage::decode(desc, b.as_ref())
                    {
                        self.missing_nested(pool, &inner, out);
                    }
                }
                None if self.defines(name) => out.push(name.to_owned()),
                None => {}
            }
            return;
        }
        for (_, value) in msg.fields() {
            self.missing_in_value(pool, value, out);
        }
    }

    fn missing_in_value(&self, pool: &DescriptorPool, value: &PValue, out: &mut Vec<String>) {
        match value {
            PValue::Message(m) => self.missing_nested(pool, m, out),
            PValue::List(items) => {
                for v in items {
                    self.missing_in_value(pool, v, out);
                }
            }
            PValue::Map(entries) => {
                for v in entries.values() {
                    self.missing_in_value(pool, v, out);
                }
            }
            _ => {}
        }
    }
}

fn collect_names(scope: &str, m: &MessageHead, file: u32, out: &mut HashMap<Box<str>, u32>) {
    let Some(name) = m.name.as_deref() else {
        return;
    };
    let full = if scope.is_empty() {
        name.to_owned()
    } else {
        format!("{scope}.{name}")
    };
    for n in &m.nested_type {
        collect_names(&full, n, file, out);
    }
    out.insert(full.into_boxed_str(), file);
}
