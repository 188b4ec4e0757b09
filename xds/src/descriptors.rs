//! The Envoy descriptor set, loaded into a `DescriptorPool` one file (and
//! its imports) at a time, when a type it defines is first needed.
//!
//! Decoding the whole set of envoy-types costs ~33 MB of heap for ~1,000
//! files, of which a process serving Ingresses and CECs touches a few dozen.
//! The index of the set (which file defines a message, what it imports,
//! where its bytes are) is built at compile time (`descriptor_index.rs`),
//! so the set's bytes stay in the binary's read-only data and only the
//! files decoded are ever read.

use std::sync::RwLock;

use prost::encoding::{WireType, encode_key, encode_varint};
use prost_reflect::{DescriptorPool, DynamicMessage, ReflectMessage, Value as PValue};

use crate::codec::{CodecError, message_name};

mod generated {
    include!(concat!(env!("OUT_DIR"), "/descriptor_index.rs"));
}
use generated::{DEPS, FILES, MESSAGES};

const ANY: &str = "google.protobuf.Any";
/// Field number of `FileDescriptorSet.file`.
const SET_FILE: u32 = 1;
/// Bound on the rounds of [`Descriptors::pool_for_any`]: each round adds at
/// least one type, and no Envoy resource nests this many distinct `Any`s.
const MAX_ROUNDS: usize = 64;

pub(crate) struct Descriptors {
    /// The encoded set the compile-time index describes.
    set: &'static [u8],
    loaded: RwLock<Loaded>,
}

struct Loaded {
    pool: DescriptorPool,
    /// Whether file `i` is in `pool`.
    files: Vec<bool>,
}

impl Descriptors {
    /// The set `build.rs` indexed; checked against the index's extent.
    pub(crate) fn new(set: &'static [u8]) -> Result<Descriptors, String> {
        let end = FILES
            .iter()
            .map(|&(o, l)| o as usize + l as usize)
            .max()
            .unwrap_or(0);
        if end > set.len() || FILES.len() != DEPS.len() {
            return Err(format!(
                "descriptor set of {} bytes does not match its compile-time index",
                set.len()
            ));
        }
        Ok(Descriptors {
            set,
            loaded: RwLock::new(Loaded {
                pool: DescriptorPool::new(),
                files: vec![false; FILES.len()],
            }),
        })
    }

    /// File `i`'s encoded `FileDescriptorProto`.
    fn file(&self, i: u32) -> &'static [u8] {
        let (o, l) = FILES[i as usize];
        &self.set[o as usize..o as usize + l as usize]
    }

    /// The file defining message `name`.
    fn file_of(name: &str) -> Option<u32> {
        MESSAGES
            .binary_search_by(|(n, _)| (*n).cmp(name))
            .ok()
            .map(|i| MESSAGES[i].1)
    }

    #[cfg(test)]
    pub(crate) fn file_count(&self) -> usize {
        FILES.len()
    }

    #[cfg(test)]
    pub(crate) fn message_count(&self) -> usize {
        MESSAGES.len()
    }

    /// Whether the set defines message `name` (loaded or not).
    pub(crate) fn defines(&self, name: &str) -> bool {
        Self::file_of(name).is_some()
    }

    /// A pool holding every message of `names` that the set defines (names
    /// it does not define are left for the caller's lookup to report).
    pub(crate) fn pool_for<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<DescriptorPool, CodecError> {
        let wanted: Vec<u32> = names.into_iter().filter_map(Self::file_of).collect();
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
                .map(|&f| FILES[f as usize].1 as usize + 8)
                .sum(),
        );
        for &f in &order {
            let body = self.file(f);
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
            let deps = DEPS[*f as usize];
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::descriptor_index::{index, render, strip_source_info};

    /// The tables build.rs generated are the index of the set embedded.
    #[test]
    fn compile_time_index_matches_the_embedded_set() {
        let set = include_bytes!(env!("ENVOY_TYPES_BIN"));
        let fresh = index(set).expect("index");
        let generated = include_str!(concat!(env!("OUT_DIR"), "/descriptor_index.rs"));
        assert_eq!(render(&fresh), generated);
        assert_eq!(fresh.files, FILES);
        assert_eq!(fresh.messages.len(), MESSAGES.len());
        let d = Descriptors::new(set).expect("descriptors");
        assert!(d.defines("envoy.config.route.v3.RouteConfiguration"));
        assert!(d.defines("envoy.config.route.v3.RouteAction.HashPolicy.Header"));
    }

    /// The embedded set is envoy-types' own minus source comments: every
    /// file decodes to the same descriptor with `source_code_info` unset.
    #[test]
    fn embedded_set_is_the_shipped_one_without_comments() {
        let shipped = std::fs::read(env!("ENVOY_TYPES_SOURCE_BIN")).expect("shipped set");
        let embedded: &[u8] = include_bytes!(env!("ENVOY_TYPES_BIN"));
        assert_eq!(strip_source_info(&shipped).expect("strip"), embedded);
        assert!(embedded.len() < shipped.len() / 2, "{}", embedded.len());
        let shipped = DescriptorPool::decode(shipped.as_slice()).expect("shipped");
        let embedded = DescriptorPool::decode(embedded).expect("embedded");
        assert_eq!(shipped.files().len(), embedded.files().len());
        let mut with_comments = 0;
        for (a, b) in shipped.files().zip(embedded.files()) {
            let mut want = a.file_descriptor_proto().clone();
            with_comments += usize::from(want.source_code_info.take().is_some());
            assert!(b.file_descriptor_proto().source_code_info.is_none());
            assert_eq!(&want, b.file_descriptor_proto(), "{}", a.name());
        }
        assert!(with_comments > 0);
    }
}
