//! The index of an encoded `FileDescriptorSet`: where each file's bytes
//! are, what each file imports, and which file defines each message.
//!
//! Built at compile time by `build.rs` (which includes this file) from the
//! set envoy-types ships, and emitted as static tables, so a process reads
//! only the files it decodes instead of walking all 3.4 MB of the set at
//! start-up; the library's tests check the tables against a fresh index.

use prost::Message;
use prost::bytes::Buf;
use prost::encoding::{WireType, decode_key, decode_varint};

/// Field number of `FileDescriptorSet.file`.
const SET_FILE: u32 = 1;
/// Field number of `FileDescriptorProto.source_code_info`.
const FILE_SOURCE_INFO: u32 = 9;

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

#[derive(Debug, PartialEq)]
pub struct Index {
    /// Offset and length of each file's `FileDescriptorProto` in the set.
    pub files: Vec<(u32, u32)>,
    /// Each file's imports, as indexes into `files`.
    pub deps: Vec<Vec<u32>>,
    /// Fully qualified message name → the file defining it, sorted by name.
    pub messages: Vec<(String, u32)>,
}

/// The set with every file's `source_code_info` (comments and source
/// spans, ~80 % of envoy-types' set) left out: nothing here reads comments,
/// and a pool decoding them holds them in memory. Every other field keeps
/// its bytes.
pub fn strip_source_info(set: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(set.len());
    for field in fields(set)? {
        if field.number != SET_FILE || field.wire != WireType::LengthDelimited {
            out.extend_from_slice(&set[field.start..field.value.end]);
            continue;
        }
        let body = &set[field.value];
        let mut file = Vec::with_capacity(body.len());
        for f in fields(body)? {
            if f.number != FILE_SOURCE_INFO {
                file.extend_from_slice(&body[f.start..f.value.end]);
            }
        }
        prost::encoding::encode_key(SET_FILE, WireType::LengthDelimited, &mut out);
        prost::encoding::encode_varint(file.len() as u64, &mut out);
        out.extend_from_slice(&file);
    }
    Ok(out)
}

/// One top-level field of an encoded message.
struct RawField {
    number: u32,
    wire: WireType,
    /// Where its key starts.
    start: usize,
    value: std::ops::Range<usize>,
}

/// The top-level fields of an encoded message, in order.
fn fields(msg: &[u8]) -> Result<Vec<RawField>, String> {
    let mut out = Vec::new();
    let mut buf = msg;
    while buf.has_remaining() {
        let start = msg.len() - buf.len();
        let (field, wire) = decode_key(&mut buf).map_err(|e| e.to_string())?;
        let len = match wire {
            WireType::Varint => {
                let before = buf.len();
                decode_varint(&mut buf).map_err(|e| e.to_string())?;
                let end = msg.len() - buf.len();
                out.push(RawField {
                    number: field,
                    wire,
                    start,
                    value: end - (before - buf.len())..end,
                });
                continue;
            }
            WireType::SixtyFourBit => 8,
            WireType::ThirtyTwoBit => 4,
            WireType::LengthDelimited => {
                usize::try_from(decode_varint(&mut buf).map_err(|e| e.to_string())?)
                    .map_err(|e| e.to_string())?
            }
            other => return Err(format!("descriptor: field {field} is {other:?}")),
        };
        if len > buf.len() {
            return Err(format!("descriptor: field {field} truncated"));
        }
        let value = msg.len() - buf.len();
        out.push(RawField {
            number: field,
            wire,
            start,
            value: value..value + len,
        });
        buf = &buf[len..];
    }
    Ok(out)
}

/// Indexes an encoded `FileDescriptorSet` without building descriptors.
pub fn index(set: &[u8]) -> Result<Index, String> {
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
        let offset = set.len() - buf.len();
        if field == SET_FILE {
            let span = (
                u32::try_from(offset).map_err(|e| e.to_string())?,
                u32::try_from(len).map_err(|e| e.to_string())?,
            );
            files.push(span);
        }
        buf = &buf[len..];
    }
    let heads = files
        .iter()
        .map(|&(o, l)| {
            FileHead::decode(&set[o as usize..(o + l) as usize]).map_err(|e| e.to_string())
        })
        .collect::<Result<Vec<_>, _>>()?;
    let by_name: std::collections::HashMap<&str, u32> = heads
        .iter()
        .zip(0u32..)
        .filter_map(|(h, i)| Some((h.name.as_deref()?, i)))
        .collect();
    let mut messages = Vec::new();
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
    messages.sort();
    messages.dedup_by(|a, b| a.0 == b.0);
    Ok(Index {
        files,
        deps,
        messages,
    })
}

fn collect_names(scope: &str, m: &MessageHead, file: u32, out: &mut Vec<(String, u32)>) {
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
    out.push((full, file));
}

/// Rust source defining `FILES`, `DEPS` and `MESSAGES` for `index`.
pub fn render(index: &Index) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "pub(crate) static FILES: &[(u32, u32)] = &[");
    for (o, l) in &index.files {
        let _ = writeln!(s, "({o}, {l}),");
    }
    let _ = writeln!(s, "];\npub(crate) static DEPS: &[&[u32]] = &[");
    for d in &index.deps {
        let _ = writeln!(s, "&{d:?},");
    }
    let _ = writeln!(s, "];\npub(crate) static MESSAGES: &[(&str, u32)] = &[");
    for (name, file) in &index.messages {
        let _ = writeln!(s, "({name:?}, {file}),");
    }
    let _ = writeln!(s, "];");
    s
}
