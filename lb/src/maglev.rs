//! Maglev consistent hashing, identical to Cilium's `pkg/maglev`.
//!
//! Cilium facts this module reproduces (pkg/maglev/maglev.go,
//! pkg/loadbalancer/reconciler/bpf_reconciler.go):
//! - seed: the base64 hash seed must decode to 12 bytes; MurmurHash3 uses the
//!   first 4 as a big-endian `u32` (the other 8 seed the datapath's jhash);
//! - each backend is hashed as `[10.0.0.1:80/TCP,State:active]`, IPv6 as
//!   `[[fd00::1]:80/TCP,State:active]`, a non-zero cluster id as `10.0.0.1@3`.
//!   The state part is always `active`, whatever the backend's state;
//! - backends are sorted by that string (byte order), so tables do not depend
//!   on node-local backend ids;
//! - `(h1, h2) = murmur3(string, seed)`, `offset = h1 mod M`,
//!   `skip = h2 mod (M-1) + 1`, permutation `j ↦ (offset + j·skip) mod M`;
//! - the paper's round-robin fill, with Cilium's weighted turns (inspired by
//!   Envoy): weights only matter when `Σw / N > 1`; a backend whose counter is
//!   ahead gives its turn to the next one;
//! - only active backends are in the table; with none active the terminating
//!   ones are used (KEP-1669). Weight 0 means maintenance (Cilium's service
//!   API), so such backends are left out too.
//!
//! Unlike Cilium, the N×M permutation matrix is never materialised: each
//! backend keeps only its current permutation position, and occupancy is a
//! bitset, so memory is O(N + M) and the hot loop stays in L1/L2.

use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::net::IpAddr;
use std::str::FromStr;

use base64::Engine as _;

use crate::murmur3;

/// Table sizes Cilium accepts for `--bpf-lb-maglev-table-size`.
pub const ALLOWED_M: [u32; 10] = [
    251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071,
];

/// Cilium's default table size.
pub const DEFAULT_M: u32 = 16381;

/// Cilium's default `--bpf-lb-maglev-hash-seed`.
pub const DEFAULT_HASH_SEED: &str = "JLfvgnHc2kaSUFaI";

/// Cilium's `loadbalancer.DefaultBackendWeight`.
pub const DEFAULT_BACKEND_WEIGHT: u16 = 100;

/// Largest table size accepted; keeps `pos + skip` within `u32`.
pub const MAX_M: u32 = 1 << 31;

/// Errors from building a [`MaglevConfig`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MaglevError {
    #[error("Maglev table size {0} is not a prime number (M must be prime and at least 2)")]
    NotPrime(u32),
    #[error("Maglev table size {0} is too large (at most {MAX_M})")]
    TooLarge(u32),
    #[error("cannot decode base64 Maglev hash seed {seed:?}: {reason}")]
    SeedBase64 { seed: String, reason: String },
    #[error("decoded Maglev hash seed is {0} bytes (not 12 bytes)")]
    SeedLength(usize),
}

/// L4 protocol of a backend, spelled as Cilium spells it in the hash string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "SCTP" => Ok(Protocol::Sctp),
            _ => Err(format!(
                "unknown protocol {s:?} (expected TCP, UDP or SCTP)"
            )),
        }
    }
}

/// Backend state, as in Cilium's `loadbalancer.BackendState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum BackendState {
    #[default]
    Active,
    Terminating,
    Quarantined,
    Maintenance,
}

/// One backend as Maglev sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaglevBackend {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Protocol,
    /// Cluster-mesh cluster id; 0 = local cluster (not written in the hash string).
    pub cluster_id: u32,
    pub weight: u16,
    pub state: BackendState,
    /// The value stored in the table's slots.
    pub id: u32,
}

impl MaglevBackend {
    /// An active TCP backend with Cilium's default weight in the local cluster.
    pub fn new(addr: IpAddr, port: u16, id: u32) -> Self {
        MaglevBackend {
            addr,
            port,
            proto: Protocol::Tcp,
            cluster_id: 0,
            weight: DEFAULT_BACKEND_WEIGHT,
            state: BackendState::Active,
            id,
        }
    }

    /// The string Cilium hashes and sorts by, e.g. `[10.0.0.1:80/TCP,State:active]`.
    pub fn hash_string(&self) -> String {
        let mut buf = Vec::with_capacity(64);
        self.write_hash_string(&mut buf);
        // Only ASCII is ever written.
        String::from_utf8_lossy(&buf).into_owned()
    }

    fn write_hash_string(&self, buf: &mut Vec<u8>) {
        // Hand-rolled for IPv4 and the integers: `fmt` was a visible share of
        // a 1000-backend build.
        buf.push(b'[');
        match self.addr {
            IpAddr::V4(a) => {
                for (k, octet) in a.octets().into_iter().enumerate() {
                    if k > 0 {
                        buf.push(b'.');
                    }
                    push_decimal(buf, u32::from(octet));
                }
            }
            IpAddr::V6(a) => {
                buf.push(b'[');
                // Writing into a Vec cannot fail.
                let _ = write!(buf, "{a}");
            }
        }
        if self.cluster_id != 0 {
            buf.push(b'@');
            push_decimal(buf, self.cluster_id);
        }
        if self.addr.is_ipv6() {
            buf.push(b']');
        }
        buf.push(b':');
        push_decimal(buf, u32::from(self.port));
        buf.push(b'/');
        buf.extend_from_slice(self.proto.as_str().as_bytes());
        buf.extend_from_slice(b",State:active]");
    }

    /// `IP:port`, IPv6 in brackets: how the CLI prints a slot.
    pub fn endpoint(&self) -> String {
        match self.addr {
            IpAddr::V4(a) => format!("{a}:{}", self.port),
            IpAddr::V6(a) => format!("[{a}]:{}", self.port),
        }
    }
}

fn push_decimal(buf: &mut Vec<u8>, mut v: u32) {
    let mut digits = [0u8; 10];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[i..]);
}

/// Table size and MurmurHash3 seed. `m` is always a prime in `2..=MAX_M`,
/// which guarantees every backend's permutation visits every slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaglevConfig {
    m: u32,
    seed: u32,
}

impl MaglevConfig {
    /// Any prime `m` (the library is not limited to [`ALLOWED_M`], so e.g. the
    /// paper's 65537 works) and a raw MurmurHash3 seed.
    pub fn new(m: u32, seed: u32) -> Result<Self, MaglevError> {
        if m > MAX_M {
            return Err(MaglevError::TooLarge(m));
        }
        if !is_prime(m) {
            return Err(MaglevError::NotPrime(m));
        }
        Ok(MaglevConfig { m, seed })
    }

    /// Cilium's configuration: `b64` must decode (standard alphabet, padded)
    /// to exactly 12 bytes; the first 4, big-endian, are the MurmurHash3 seed.
    pub fn from_seed_b64(m: u32, b64: &str) -> Result<Self, MaglevError> {
        MaglevConfig::new(m, seed_from_b64(b64)?)
    }

    pub fn m(&self) -> u32 {
        self.m
    }

    pub fn seed(&self) -> u32 {
        self.seed
    }
}

impl Default for MaglevConfig {
    fn default() -> Self {
        MaglevConfig {
            m: DEFAULT_M,
            // 0x24b7ef82, the first 4 bytes of the decoded default seed.
            seed: 0x24b7_ef82,
        }
    }
}

/// MurmurHash3 seed from Cilium's base64 hash seed.
pub fn seed_from_b64(b64: &str) -> Result<u32, MaglevError> {
    let d = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| MaglevError::SeedBase64 {
            seed: b64.to_string(),
            reason: e.to_string(),
        })?;
    match d.as_slice() {
        [a, b, c, e, _, _, _, _, _, _, _, _] => Ok(u32::from_be_bytes([*a, *b, *c, *e])),
        _ => Err(MaglevError::SeedLength(d.len())),
    }
}

fn is_prime(m: u32) -> bool {
    if m < 2 {
        return false;
    }
    if m < 4 {
        return true;
    }
    if m.is_multiple_of(2) {
        return false;
    }
    let m = u64::from(m);
    let mut d = 3u64;
    while d * d <= m {
        if m.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// `(offset, skip)` of a hash string, exactly as Cilium's `getOffsetAndSkip`.
pub fn offset_and_skip(hash_string: &[u8], m: u32, seed: u32) -> (u32, u32) {
    let (h1, h2) = murmur3::hash128(hash_string, seed);
    let m = u64::from(m);
    let offset = h1 % m;
    // m >= 2 for a valid config; max(1) keeps a stray m of 1 from dividing by 0.
    let skip = h2 % (m - 1).max(1) + 1;
    (offset as u32, skip as u32)
}

/// The backends Cilium puts into a service's Maglev table: active ones, or
/// the terminating ones when none is active; weight 0 counts as maintenance.
pub fn participants(backends: &[MaglevBackend]) -> Vec<&MaglevBackend> {
    let pick = |state: BackendState| -> Vec<&MaglevBackend> {
        backends
            .iter()
            .filter(|b| b.state == state && b.weight > 0)
            .collect()
    };
    let active = pick(BackendState::Active);
    if active.is_empty() {
        pick(BackendState::Terminating)
    } else {
        active
    }
}

/// Cilium's Maglev table for a service's backends: slot → backend id.
/// Selects the participating backends first (see [`participants`]); empty
/// when none participates (Cilium then deletes the service's table).
pub fn build_table(cfg: &MaglevConfig, backends: &[MaglevBackend]) -> Vec<u32> {
    lookup_table(cfg, participants(backends))
}

/// The table for exactly the given backends, whatever their state or weight
/// (Cilium's `GetLookupTable`).
pub fn lookup_table<'a, I>(cfg: &MaglevConfig, backends: I) -> Vec<u32>
where
    I: IntoIterator<Item = &'a MaglevBackend>,
{
    let backends: Vec<&MaglevBackend> = backends.into_iter().collect();
    if backends.is_empty() {
        return Vec::new();
    }

    // All hash strings in one buffer: no per-backend allocation.
    let mut arena = Vec::with_capacity(backends.len() * 40);
    let mut spans = Vec::with_capacity(backends.len());
    for b in &backends {
        let start = arena.len();
        b.write_hash_string(&mut arena);
        spans.push((start, arena.len()));
    }
    let key = |i: usize| &arena[spans[i].0..spans[i].1];
    let mut order: Vec<usize> = (0..backends.len()).collect();
    // Identical strings hash identically; the id tie-break only makes the
    // result independent of input order.
    order.sort_unstable_by(|&a, &b| key(a).cmp(key(b)).then(backends[a].id.cmp(&backends[b].id)));

    let m = cfg.m;
    let mut turns: Vec<Turn> = order
        .iter()
        .map(|&i| {
            let (offset, skip) = offset_and_skip(key(i), m, cfg.seed);
            Turn {
                pos: offset,
                skip,
                inv_skip: 0,
                id: backends[i].id,
                weight: backends[i].weight,
            }
        })
        .collect();
    fill(m, &mut turns)
}

/// Per-backend fill state: the permutation's next position replaces Cilium's
/// materialised `perm[i*M + next[i]]`.
#[derive(Clone, Copy)]
struct Turn {
    pos: u32,
    skip: u32,
    /// `skip⁻¹ mod M`, computed on first use in the end game; 0 = not yet.
    inv_skip: u32,
    id: u32,
    weight: u16,
}

/// Table under construction. Most slots are claimed by walking a backend's
/// permutation against an occupancy bitset (small enough for L1). The last
/// ~√M slots would cost ~M/k probes each, so once that few are free the
/// first free slot in the backend's permutation order is computed directly:
/// slot `c` sits at index `(c − pos)·skip⁻¹ mod M` from the current
/// position, and the free slot with the smallest index is the one the walk
/// would reach first.
struct Filler {
    m: u32,
    table: Vec<u32>,
    occupied: Vec<u64>,
    remaining: u32,
    endgame_at: u32,
    free_slots: Vec<u32>,
    barrett: u64,
}

impl Filler {
    fn new(m: u32) -> Self {
        Filler {
            m,
            table: vec![0u32; m as usize],
            occupied: vec![0u64; (m as usize).div_ceil(64)],
            remaining: m,
            // Measured: √M/2 beats both √M and no end game at all.
            endgame_at: m.isqrt() / 2,
            free_slots: Vec::new(),
            // floor(2^64 / m) for Barrett reduction of products below m².
            barrett: ((1u128 << 64) / u128::from(m)) as u64,
        }
    }

    #[inline(always)]
    fn claim(&mut self, t: &mut Turn) {
        if self.remaining > self.endgame_at {
            self.claim_by_walk(t);
        } else {
            self.claim_by_index(t);
        }
        self.remaining -= 1;
    }

    #[inline(always)]
    fn claim_by_walk(&mut self, t: &mut Turn) {
        // Locals keep the loop in registers. (A four-wide walk with a
        // branch-free pick measured slower than this plain loop.)
        let m = self.m;
        let skip = t.skip;
        let occupied = self.occupied.as_mut_slice();
        let mut p = t.pos;
        let slot = loop {
            let c = p;
            p = add_mod(p, skip, m);
            if (!occupied[(c >> 6) as usize] >> (c & 63)) & 1 != 0 {
                break c;
            }
        };
        occupied[(slot >> 6) as usize] |= 1u64 << (slot & 63);
        t.pos = p;
        self.table[slot as usize] = t.id;
    }

    #[cold]
    #[inline(never)]
    fn claim_by_index(&mut self, t: &mut Turn) {
        let m = self.m;
        if self.free_slots.is_empty() {
            self.free_slots = (0..m)
                .filter(|&c| self.occupied[(c >> 6) as usize] & (1u64 << (c & 63)) == 0)
                .collect();
        }
        if t.inv_skip == 0 {
            t.inv_skip = mod_inverse(t.skip, m);
        }
        let (pos, inv) = (t.pos, u64::from(t.inv_skip));
        let mut best = (u32::MAX, 0usize);
        for (k, &c) in self.free_slots.iter().enumerate() {
            let d = if c >= pos { c - pos } else { c + m - pos };
            let j = self.mul_mod(u64::from(d), inv);
            if j < best.0 {
                best = (j, k);
            }
        }
        let slot = self.free_slots.swap_remove(best.1);
        self.occupied[(slot >> 6) as usize] |= 1u64 << (slot & 63);
        self.table[slot as usize] = t.id;
        t.pos = add_mod(slot, t.skip, m);
    }

    /// `a·b mod m` for `a, b < m` (so the product is below 2^62).
    #[inline(always)]
    fn mul_mod(&self, a: u64, b: u64) -> u32 {
        let x = a * b;
        let q = ((u128::from(x) * u128::from(self.barrett)) >> 64) as u64;
        let mut r = x - q * u64::from(self.m);
        // Barrett's quotient is at most 1 short.
        if r >= u64::from(self.m) {
            r -= u64::from(self.m);
        }
        r as u32
    }
}

/// `(a + b) mod m` for `a, b < m <= 2^31`.
#[inline(always)]
fn add_mod(a: u32, b: u32, m: u32) -> u32 {
    let x = a + b;
    if x >= m { x - m } else { x }
}

/// `a⁻¹ mod m` for prime `m` and `0 < a < m` (extended Euclid).
fn mod_inverse(a: u32, m: u32) -> u32 {
    let (mut r0, mut r1) = (i64::from(m), i64::from(a));
    let (mut t0, mut t1) = (0i64, 1i64);
    while r1 != 0 {
        let q = r0 / r1;
        (r0, r1) = (r1, r0 - q * r1);
        (t0, t1) = (t1, t0 - q * t1);
    }
    t0.rem_euclid(i64::from(m)) as u32
}

fn fill(m: u32, turns: &mut [Turn]) -> Vec<u32> {
    let l = turns.len();
    let mut filler = Filler::new(m);

    let weight_sum: u64 = turns.iter().map(|t| u64::from(t.weight)).sum();
    let weights_used = weight_sum / l as u64 > 1;

    if !weights_used {
        let mut i = 0;
        for _ in 0..m {
            filler.claim(&mut turns[i]);
            i += 1;
            if i == l {
                i = 0;
            }
        }
        return filler.table;
    }

    // Cilium keeps these counters as float64 and truncates when comparing;
    // the same IEEE operations here give the same turns.
    let mut counter: Vec<f64> = turns
        .iter()
        .map(|t| f64::from(t.weight) / l as f64)
        .collect();
    let weight_sum_f = weight_sum as f64;
    let mut start = 0;
    for n in 0..u64::from(m) {
        let mut i = start;
        // Terminates: not every backend can be ahead of its share at once.
        while (n + 1) * u64::from(turns[i].weight) < counter[i] as u64 {
            i += 1;
            if i == l {
                i = 0;
            }
        }
        counter[i] += weight_sum_f;
        filler.claim(&mut turns[i]);
        start += 1;
        if start == l {
            start = 0;
        }
    }
    filler.table
}

/// Run-length form of a table, `id(count)` joined by commas, as in Cilium's
/// `TestReproducible`.
pub fn rle(table: &[u32]) -> String {
    let mut out = String::new();
    let mut iter = table.iter();
    let Some(&first) = iter.next() else {
        return out;
    };
    let (mut current, mut count) = (first, 1usize);
    for &id in iter {
        if id == current {
            count += 1;
        } else {
            let _ = write!(out, "{current}({count}),");
            current = id;
            count = 1;
        }
    }
    let _ = write!(out, "{current}({count})");
    out
}

#[cfg(test)]
mod tests;
