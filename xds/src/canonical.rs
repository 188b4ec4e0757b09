//! Deterministic protobuf bytes for messages with map fields.
//!
//! prost-reflect keeps a map field in a `HashMap` and encodes its entries
//! in iteration order, which differs between two decodes of the same JSON.
//! A resource's hash is taken over its bytes ("equal hash ⇔ same content"),
//! so identical CECs would look changed and be pushed again. This pass
//! re-emits the encoding with every map's entries sorted by their bytes,
//! recursing into messages and into `Any` payloads of every type the
//! resolver knows (whether or not some pool already loaded it, so the
//! result does not depend on what other threads decoded first). Everything
//! else is copied as encoded.

use prost::bytes::Buf;
use prost::encoding::{WireType, decode_key, decode_varint, encode_key, encode_varint};
use std::collections::HashMap;

use prost_reflect::{Kind, MessageDescriptor};

use crate::codec::message_name;

const ANY: &str = "google.protobuf.Any";
/// Protobuf's own nesting bound; a deeper input is left as it is.
const MAX_DEPTH: u32 = 100;

/// `bytes` (an encoded `desc`) with map entries in a canonical order, or
/// `None` when they cannot be parsed as `desc` (the caller keeps them).
pub(crate) fn canonical(
    resolve: &dyn Fn(&str) -> Option<MessageDescriptor>,
    desc: &MessageDescriptor,
    bytes: &[u8],
) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut types = Types {
        resolve,
        seen: HashMap::new(),
    };
    message(&mut types, desc, bytes, &mut out, 0)?;
    Some(out)
}

/// `Any` payload types by message name, resolved once per call.
struct Types<'a> {
    resolve: &'a dyn Fn(&str) -> Option<MessageDescriptor>,
    seen: HashMap<String, Option<MessageDescriptor>>,
}

impl Types<'_> {
    fn get(&mut self, name: &str) -> Option<MessageDescriptor> {
        if let Some(d) = self.seen.get(name) {
            return d.clone();
        }
        let d = (self.resolve)(name);
        self.seen.insert(name.to_owned(), d.clone());
        d
    }
}

fn message(
    pool: &mut Types<'_>,
    desc: &MessageDescriptor,
    bytes: &[u8],
    out: &mut Vec<u8>,
    depth: u32,
) -> Option<()> {
    if depth > MAX_DEPTH {
        return None;
    }
    if desc.full_name() == ANY {
        return any(pool, bytes, out, depth);
    }
    // Entries of the map field being collected: (field number, entries).
    let mut map: Option<(u32, Vec<Vec<u8>>)> = None;
    let mut buf = bytes;
    while buf.has_remaining() {
        let start = bytes.len() - buf.len();
        let (number, wire) = decode_key(&mut buf).ok()?;
        let field = desc.get_field(number);
        match wire {
            WireType::LengthDelimited => {
                let len = usize::try_from(decode_varint(&mut buf).ok()?).ok()?;
                if len > buf.len() {
                    return None;
                }
                let (payload, rest) = buf.split_at(len);
                buf = rest;
                let sub = field.as_ref().and_then(|f| match f.kind() {
                    Kind::Message(m) => Some((f.is_map(), m)),
                    _ => None,
                });
                match sub {
                    Some((true, entry)) => {
                        let mut e = Vec::with_capacity(len);
                        message(pool, &entry, payload, &mut e, depth + 1)?;
                        match &mut map {
                            Some((n, entries)) if *n == number => entries.push(e),
                            _ => {
                                flush(map.take(), out);
                                map = Some((number, vec![e]));
                            }
                        }
                    }
                    Some((false, m)) => {
                        flush(map.take(), out);
                        let mut e = Vec::with_capacity(len);
                        message(pool, &m, payload, &mut e, depth + 1)?;
                        length_delimited(number, &e, out);
                    }
                    None => {
                        flush(map.take(), out);
                        out.extend_from_slice(&bytes[start..bytes.len() - buf.len()]);
                    }
                }
            }
            WireType::Varint => {
                flush(map.take(), out);
                decode_varint(&mut buf).ok()?;
                out.extend_from_slice(&bytes[start..bytes.len() - buf.len()]);
            }
            WireType::SixtyFourBit | WireType::ThirtyTwoBit => {
                flush(map.take(), out);
                let n = if wire == WireType::SixtyFourBit { 8 } else { 4 };
                if buf.len() < n {
                    return None;
                }
                buf = &buf[n..];
                out.extend_from_slice(&bytes[start..bytes.len() - buf.len()]);
            }
            // Groups are proto2 only; Envoy's API has none.
            WireType::StartGroup | WireType::EndGroup => return None,
        }
    }
    flush(map, out);
    Some(())
}

/// Writes a map field's entries, sorted.
fn flush(map: Option<(u32, Vec<Vec<u8>>)>, out: &mut Vec<u8>) {
    if let Some((number, mut entries)) = map {
        entries.sort_unstable();
        for e in &entries {
            length_delimited(number, e, out);
        }
    }
}

fn length_delimited(number: u32, payload: &[u8], out: &mut Vec<u8>) {
    encode_key(number, WireType::LengthDelimited, out);
    encode_varint(payload.len() as u64, out);
    out.extend_from_slice(payload);
}

/// An `Any`: its payload made canonical as the type it names, when the
/// resolver knows that type.
fn any(pool: &mut Types<'_>, bytes: &[u8], out: &mut Vec<u8>, depth: u32) -> Option<()> {
    let mut type_url: Option<&[u8]> = None;
    let mut value: Option<&[u8]> = None;
    let mut buf = bytes;
    while buf.has_remaining() {
        let (number, wire) = decode_key(&mut buf).ok()?;
        if wire != WireType::LengthDelimited || !(1..=2).contains(&number) {
            return None;
        }
        let len = usize::try_from(decode_varint(&mut buf).ok()?).ok()?;
        if len > buf.len() {
            return None;
        }
        let (payload, rest) = buf.split_at(len);
        buf = rest;
        if number == 1 {
            type_url = Some(payload);
        } else {
            value = Some(payload);
        }
    }
    if let Some(url) = type_url {
        length_delimited(1, url, out);
    }
    if let Some(v) = value {
        let inner = type_url
            .and_then(|u| std::str::from_utf8(u).ok())
            .and_then(|u| pool.get(message_name(u)));
        match inner {
            Some(desc) => {
                let mut e = Vec::with_capacity(v.len());
                message(pool, &desc, v, &mut e, depth + 1)?;
                length_delimited(2, &e, out);
            }
            None => length_delimited(2, v, out),
        }
    }
    Some(())
}
