use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::*;

const CHECK_VECTOR: &str = "2(2),1(2),2(1),3(1),2(2),1(1),3(3),2(2),3(1),1(3),3(1),2(2),3(1),1(1),3(1),1(1),2(3),1(3),3(1),2(1),3(2),1(1),2(1),1(1),2(2),3(1),2(1),1(3),2(1),3(4),1(1),2(1),1(2),2(2),1(2),2(1),3(3),1(2),2(1),1(1),2(2),3(1),1(2),3(4),2(1),1(1),2(1),1(1),2(2),3(2),1(1),3(3),1(1),2(3),1(1),2(2),3(2),1(2),3(2),1(1),2(2),1(2),2(1),3(3),2(1),1(1),3(1),2(1),1(1),2(2),3(1),1(1),2(1),3(2),2(1),3(1),1(1),3(1),1(2),2(2),3(1),1(1),2(1),1(1),3(1),2(1),3(2),1(3),2(1),1(1),3(1),2(2),1(1),3(1),2(1),3(2),2(1),1(2),2(1),1(1),2(2),1(2),3(3),2(2),1(2),2(1),1(1),2(2),3(1),1(1),3(3),2(3),1(3),2(2),3(1),1(1),2(1),3(2),2(1),1(1),2(1),1(3),2(1),3(3),2(1),3(1),1(1),2(1),1(1),2(2),1(2),2(1),3(5),1(3),2(2),1(2),2(1),3(4),1(4),2(1),3(2),1(1),2(1),3(2),2(1),3(1),2(1),1(3),2(1),3(2),2(1),1(1),3(3),2(1)";

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

fn default_cfg(m: u32) -> MaglevConfig {
    MaglevConfig::from_seed_b64(m, DEFAULT_HASH_SEED).unwrap()
}

/// Cilium's test helper `mkAddr(i)`: IPv4 from the big-endian u32 `i`,
/// port `i % 65535`, TCP.
fn cilium_mk_addr(i: u32, weight: u16, id: u32) -> MaglevBackend {
    MaglevBackend {
        weight,
        ..MaglevBackend::new(IpAddr::V4(Ipv4Addr::from(i)), (i % 65535) as u16, id)
    }
}

/// A literal port of Cilium's `GetLookupTable` + `computeLookupTable` +
/// `getPermutation`: materialises the N×M permutation and fills with the
/// sentinel/`next[]` bookkeeping, so it is independent of the fast path.
fn cilium_reference(m: u32, seed: u32, backends: &[MaglevBackend]) -> Vec<u32> {
    let mut infos: Vec<(String, &MaglevBackend)> =
        backends.iter().map(|b| (b.hash_string(), b)).collect();
    infos.sort_by(|a, b| a.0.cmp(&b.0));
    let m = u64::from(m);
    let mu = m as usize;
    let l = infos.len();

    let mut weight_sum = 0u64;
    let mut weight_cntr = vec![0f64; l];
    for (i, (_, b)) in infos.iter().enumerate() {
        weight_sum += u64::from(b.weight);
        weight_cntr[i] = f64::from(b.weight) / l as f64;
    }
    let weights_used = weight_sum / l as u64 > 1;

    let mut perm = vec![0u64; l * mu];
    for (i, (s, _)) in infos.iter().enumerate() {
        let (h1, h2) = crate::murmur3::hash128(s.as_bytes(), seed);
        let offset = h1 % m;
        let skip = (h2 % (m - 1)) + 1;
        let start = i * mu;
        perm[start] = offset;
        for j in 1..mu {
            perm[start + j] = (perm[start + j - 1] + skip) % m;
        }
    }

    const SENTINEL: i64 = -1;
    let mut next = vec![0usize; l];
    let mut entry = vec![SENTINEL; mu];
    for n in 0..m {
        let mut i = (n as usize) % l;
        loop {
            let info = infos[i].1;
            if weights_used {
                if (n + 1) * u64::from(info.weight) < weight_cntr[i] as u64 {
                    i = (i + 1) % l;
                    continue;
                }
                weight_cntr[i] += weight_sum as f64;
            }
            let mut c = perm[i * mu + next[i]] as usize;
            while entry[c] != SENTINEL {
                next[i] += 1;
                c = perm[i * mu + next[i]] as usize;
            }
            entry[c] = i64::from(info.id);
            next[i] += 1;
            break;
        }
    }
    entry.into_iter().map(|e| e as u32).collect()
}

/// xorshift64*: deterministic randomness without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn random_backends(rng: &mut Rng, n: usize, weighted: bool) -> Vec<MaglevBackend> {
    let mut out: Vec<MaglevBackend> = Vec::with_capacity(n);
    while out.len() < n {
        let addr = if rng.below(3) == 0 {
            IpAddr::V6(Ipv6Addr::from(
                (0xfd00u128 << 112) | u128::from(rng.below(1 << 20)),
            ))
        } else {
            IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | rng.below(1 << 16) as u32))
        };
        let b = MaglevBackend {
            addr,
            port: [80, 443, 8080][rng.below(3) as usize],
            proto: [Protocol::Tcp, Protocol::Udp, Protocol::Sctp][rng.below(3) as usize],
            cluster_id: [0, 0, 1, 255][rng.below(4) as usize],
            weight: if weighted {
                1 + rng.below(200) as u16
            } else {
                DEFAULT_BACKEND_WEIGHT
            },
            state: BackendState::Active,
            id: out.len() as u32 + 1,
        };
        // Distinct hash strings, as distinct Cilium backends always have.
        if out.iter().all(|o| o.hash_string() != b.hash_string()) {
            out.push(b);
        }
    }
    out
}

fn counts(table: &[u32]) -> HashMap<u32, usize> {
    let mut c = HashMap::new();
    for &id in table {
        *c.entry(id).or_insert(0) += 1;
    }
    c
}

#[test]
fn check_vector_m251() {
    let backends: Vec<_> = (1..=3)
        .map(|i| MaglevBackend::new(v4(10, 0, 0, i), 80, u32::from(i)))
        .collect();
    let table = build_table(&default_cfg(251), &backends);
    assert_eq!(rle(&table), CHECK_VECTOR);
    // Weight 1 everywhere (weights unused) gives the same table as Cilium's
    // default weight 100 (weights used but equal).
    let ones: Vec<_> = backends
        .iter()
        .map(|b| MaglevBackend {
            weight: 1,
            ..b.clone()
        })
        .collect();
    assert_eq!(rle(&build_table(&default_cfg(251), &ones)), CHECK_VECTOR);
}

/// Cilium's `TestReproducible` (pkg/maglev/maglev_test.go), weights 2/13/111/10.
#[test]
fn cilium_test_reproducible() {
    let expected = "2(5),3(1),2(3),1(1),2(2),0(1),2(1),3(1),2(1),3(1),2(1),1(1),2(7),1(1),2(14),3(1),2(1),\
        1(2),2(12),3(1),2(3),1(1),2(4),3(1),2(8),3(1),2(2),1(1),2(16),1(2),2(3),3(1),2(11),1(2),2(4),3(1),2(3),\
        1(1),2(4),3(1),2(1),0(1),1(1),2(8),1(1),2(7),1(1),2(4),3(1),2(1),3(1),2(9),1(2),2(5),1(1),2(7),3(1),2(1),\
        3(1),1(1),2(8),1(1),2(4),0(1),2(1),1(1),2(5),3(1),2(3),1(1),2(4),3(1),2(3),1(1),2(12),0(1),3(1),2(3),3(1),\
        2(4),3(1),2(2),1(1),2(7)";
    let backends = [
        cilium_mk_addr(1, 2, 0),
        cilium_mk_addr(3, 13, 1),
        cilium_mk_addr(4, 111, 2),
        cilium_mk_addr(5, 10, 3),
    ];
    assert_eq!(rle(&build_table(&default_cfg(251), &backends)), expected);
}

/// Cilium's `TestWeightedBackendWithRemoval`: exact per-backend counts and
/// under 1% disruption when the lightest backend goes.
#[test]
fn cilium_weighted_backend_with_removal() {
    let cfg = default_cfg(1021);
    let backends = [
        cilium_mk_addr(1, 2, 1),
        cilium_mk_addr(2, 13, 2),
        cilium_mk_addr(3, 111, 3),
        cilium_mk_addr(4, 10, 4),
    ];
    let before = build_table(&cfg, &backends);
    let after = build_table(&cfg, &backends[1..]);
    let c = counts(&before);
    assert_eq!(
        (c[&1], c[&2], c[&3], c[&4]),
        (16, 98, 832, 75),
        "counts {c:?}"
    );
    let mut changed = 0;
    for (b, a) in before.iter().zip(&after) {
        assert!(*a != 1);
        if *b != 1 && a != b {
            changed += 1;
        }
    }
    assert!(
        f64::from(changed) / 1021.0 * 100.0 < 1.0,
        "changed {changed}"
    );
}

/// Cilium's `TestBackendRemoval`.
#[test]
fn cilium_backend_removal() {
    let cfg = default_cfg(1021);
    let backends: Vec<_> = (1..=3).map(|i| cilium_mk_addr(i, 1, i)).collect();
    let before = build_table(&cfg, &backends);
    let after = build_table(&cfg, &backends[..2]);
    let mut changed = 0;
    for (b, a) in before.iter().zip(&after) {
        assert!(*a == 1 || *a == 2);
        if *b != 3 && a != b {
            changed += 1;
        }
    }
    assert!(
        f64::from(changed) / 1021.0 * 100.0 < 1.0,
        "changed {changed}"
    );
}

#[test]
fn hash_strings() {
    let mut b = MaglevBackend::new(v4(10, 0, 0, 1), 80, 1);
    assert_eq!(b.hash_string(), "[10.0.0.1:80/TCP,State:active]");
    b.cluster_id = 3;
    assert_eq!(b.hash_string(), "[10.0.0.1@3:80/TCP,State:active]");
    b.proto = Protocol::Udp;
    b.state = BackendState::Terminating;
    // Cilium always writes State:active.
    assert_eq!(b.hash_string(), "[10.0.0.1@3:80/UDP,State:active]");

    let mut b = MaglevBackend::new("fd00::1".parse().unwrap(), 80, 1);
    assert_eq!(b.hash_string(), "[[fd00::1]:80/TCP,State:active]");
    b.cluster_id = 3;
    assert_eq!(b.hash_string(), "[[fd00::1@3]:80/TCP,State:active]");
    // Go's netip formatting: RFC 5952, first longest zero run compressed,
    // IPv4-mapped in dotted form.
    for (ip, s) in [
        ("2001:db8:0:0:1:0:0:1", "2001:db8::1:0:0:1"),
        ("2001:db8:0:1:1:1:1:1", "2001:db8:0:1:1:1:1:1"),
        ("::ffff:10.0.0.1", "::ffff:10.0.0.1"),
        ("FD00::ABCD", "fd00::abcd"),
    ] {
        let b = MaglevBackend::new(ip.parse().unwrap(), 8080, 1);
        assert_eq!(b.hash_string(), format!("[[{s}]:8080/TCP,State:active]"));
    }
}

/// offset/skip of the check vector's backends, computed by hand from the
/// definition (h1 mod M, h2 mod (M-1) + 1) rather than through the table.
#[test]
fn offset_and_skip_definition() {
    let seed = seed_from_b64(DEFAULT_HASH_SEED).unwrap();
    assert_eq!(seed, 0x24b7_ef82);
    assert_eq!(MaglevConfig::default(), default_cfg(DEFAULT_M));
    let s = b"[10.0.0.1:80/TCP,State:active]";
    let (h1, h2) = crate::murmur3::hash128(s, seed);
    let (o, k) = offset_and_skip(s, 251, seed);
    assert_eq!(u64::from(o), h1 % 251);
    assert_eq!(u64::from(k), h2 % 250 + 1);
    assert!(o < 251 && (1..251).contains(&k));
}

#[test]
fn agrees_with_literal_cilium_port() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut sizes: Vec<u32> = ALLOWED_M.to_vec();
    sizes.extend([2, 3, 5, 7, 13, 65537]);
    for &m in &sizes {
        let trials = if m > 40_000 { 3 } else { 8 };
        for t in 0..trials {
            let n = 1 + rng.below(if m < 20 { 30 } else { 25 }) as usize;
            let weighted = t % 2 == 1;
            let backends = random_backends(&mut rng, n, weighted);
            let seed = rng.next() as u32;
            let cfg = MaglevConfig::new(m, seed).unwrap();
            let fast = lookup_table(&cfg, &backends);
            let reference = cilium_reference(m, seed, &backends);
            assert_eq!(
                fast, reference,
                "m={m} n={n} weighted={weighted} seed={seed:#x}"
            );
        }
    }
}

#[test]
fn agrees_with_literal_cilium_port_skewed_weights() {
    let mut rng = Rng(42);
    for &m in &[251u32, 1021, 4093] {
        for _ in 0..5 {
            let mut backends = random_backends(&mut rng, 12, true);
            // Extreme spreads, weight 1 next to 65535, and a weight-0 backend
            // (Cilium's algorithm gives it one slot if it is ever asked).
            backends[0].weight = 65535;
            backends[1].weight = 1;
            backends[2].weight = 0;
            let cfg = MaglevConfig::new(m, 0x24b7_ef82).unwrap();
            assert_eq!(
                lookup_table(&cfg, &backends),
                cilium_reference(m, 0x24b7_ef82, &backends),
                "m={m}"
            );
        }
    }
}

#[test]
fn every_allowed_m_fills_evenly() {
    for &m in &ALLOWED_M {
        let n = (m / 100).clamp(2, 1000);
        let backends: Vec<_> = (0..n)
            .map(|i| MaglevBackend::new(IpAddr::V4(Ipv4Addr::from(0x0a01_0000 + i)), 8080, i + 1))
            .collect();
        let table = build_table(&default_cfg(m), &backends);
        assert_eq!(table.len(), m as usize);
        let c = counts(&table);
        assert_eq!(c.len(), n as usize, "m={m}: every backend gets slots");
        // Round-robin turns with one slot per turn: shares differ by at most 1.
        let (lo, hi) = ((m / n) as usize, (m / n + 1) as usize);
        for (&id, &k) in &c {
            assert!((1..=n).contains(&id), "m={m}: unknown id {id}");
            assert!(
                (lo..=hi).contains(&k),
                "m={m}: id {id} has {k} slots, want {lo}..={hi}"
            );
        }
    }
}

#[test]
fn weighted_shares_are_proportional() {
    let m = 16381;
    let weights = [100u16, 200, 300, 400, 50, 950];
    let backends: Vec<_> = weights
        .iter()
        .enumerate()
        .map(|(i, &w)| MaglevBackend {
            weight: w,
            ..MaglevBackend::new(v4(10, 0, 1, i as u8 + 1), 80, i as u32 + 1)
        })
        .collect();
    let table = build_table(&default_cfg(m), &backends);
    let c = counts(&table);
    let sum: u32 = weights.iter().map(|&w| u32::from(w)).sum();
    for (i, &w) in weights.iter().enumerate() {
        let want = f64::from(m) * f64::from(w) / f64::from(sum);
        let got = c[&(i as u32 + 1)] as f64;
        assert!(
            (got - want).abs() <= 2.0,
            "weight {w}: got {got}, want {want:.1}"
        );
    }
}

#[test]
fn minimal_disruption_removing_one_of_100() {
    let m = 16381;
    let cfg = default_cfg(m);
    let backends: Vec<_> = (0..100u32)
        .map(|i| MaglevBackend::new(IpAddr::V4(Ipv4Addr::from(0x0a02_0000 + i)), 80, i + 1))
        .collect();
    let before = build_table(&cfg, &backends);
    let mut worst = 0;
    for removed in [1u32, 42, 77, 100] {
        let rest: Vec<_> = backends
            .iter()
            .filter(|b| b.id != removed)
            .cloned()
            .collect();
        let after = build_table(&cfg, &rest);
        let mut moved_other = 0;
        let mut removed_slots = 0;
        for (b, a) in before.iter().zip(&after) {
            assert_ne!(*a, removed);
            if *b == removed {
                removed_slots += 1;
            } else if a != b {
                moved_other += 1;
            }
        }
        assert!((163..=164).contains(&removed_slots));
        worst = worst.max(moved_other);
    }
    // The removed backend's ~1/N of the slots move by necessity; Maglev moves
    // about as many again elsewhere (the paper's "minimal disruption" is
    // approximate). Bound it at 1.5% of M, i.e. ~1/N.
    assert!(worst * 1000 <= m * 15, "{worst} other slots moved");
    assert!(
        worst > 0,
        "Maglev is not perfectly stable; zero would be suspicious"
    );
}

#[test]
fn participants_follow_cilium() {
    let mk = |i: u8, state, weight| MaglevBackend {
        state,
        weight,
        ..MaglevBackend::new(v4(10, 0, 0, i), 80, u32::from(i))
    };
    let cfg = default_cfg(251);
    let all = [
        mk(1, BackendState::Active, 100),
        mk(2, BackendState::Terminating, 100),
        mk(3, BackendState::Quarantined, 100),
        mk(4, BackendState::Maintenance, 100),
        mk(5, BackendState::Active, 0),
    ];
    let ids = |v: Vec<&MaglevBackend>| v.iter().map(|b| b.id).collect::<Vec<_>>();
    assert_eq!(ids(participants(&all)), vec![1]);
    assert!(build_table(&cfg, &all).iter().all(|&id| id == 1));
    // No active backend: terminating ones take over (KEP-1669).
    assert_eq!(ids(participants(&all[1..])), vec![2]);
    assert!(build_table(&cfg, &all[1..]).iter().all(|&id| id == 2));
    // Nothing usable: no table.
    assert!(build_table(&cfg, &all[2..]).is_empty());
    assert!(build_table(&cfg, &[]).is_empty());
}

#[test]
fn independent_of_input_order_and_ids_are_values() {
    let cfg = default_cfg(1021);
    let mut rng = Rng(7);
    let backends = random_backends(&mut rng, 20, true);
    let table = build_table(&cfg, &backends);
    let mut reversed = backends.clone();
    reversed.reverse();
    assert_eq!(build_table(&cfg, &reversed), table);
    // Renumbering ids renumbers the table and nothing else.
    let shifted: Vec<_> = backends
        .iter()
        .map(|b| MaglevBackend {
            id: b.id + 1000,
            ..b.clone()
        })
        .collect();
    let t2 = build_table(&cfg, &shifted);
    assert!(table.iter().zip(&t2).all(|(a, b)| a + 1000 == *b));
}

#[test]
fn config_validation() {
    assert_eq!(MaglevConfig::new(65537, 1).map(|c| c.m()), Ok(65537));
    assert_eq!(MaglevConfig::new(2, 1).map(|c| c.m()), Ok(2));
    for bad in [0, 1, 4, 65535, 16383, 251 * 509] {
        assert_eq!(MaglevConfig::new(bad, 0), Err(MaglevError::NotPrime(bad)));
    }
    assert_eq!(
        MaglevConfig::new(u32::MAX, 0),
        Err(MaglevError::TooLarge(u32::MAX))
    );
    assert_eq!(
        MaglevConfig::from_seed_b64(251, "AAAA"),
        Err(MaglevError::SeedLength(3))
    );
    assert!(matches!(
        MaglevConfig::from_seed_b64(251, "%%%"),
        Err(MaglevError::SeedBase64 { .. })
    ));
    let cfg = MaglevConfig::from_seed_b64(251, "AQIDBAUGBwgJCgsM").unwrap();
    assert_eq!(cfg.seed(), 0x0102_0304);
}

#[test]
fn more_backends_than_slots() {
    // N > M: the first M backends in hash-string order get one slot each.
    let cfg = MaglevConfig::new(7, 0).unwrap();
    let backends: Vec<_> = (1..=20u8)
        .map(|i| MaglevBackend::new(v4(10, 0, 0, i), 80, u32::from(i)))
        .collect();
    let table = build_table(&cfg, &backends);
    assert_eq!(table, cilium_reference(7, 0, &backends));
    assert_eq!(counts(&table).len(), 7);
}

#[test]
fn rle_format() {
    assert_eq!(rle(&[]), "");
    assert_eq!(rle(&[5]), "5(1)");
    assert_eq!(rle(&[1, 1, 2, 1]), "1(2),2(1),1(1)");
}

#[test]
fn modular_helpers() {
    for &m in &[2u32, 3, 251, 65537, 131071, MAX_M - 1] {
        if !is_prime(m) {
            continue;
        }
        let f = Filler::new(m);
        let mut rng = Rng(u64::from(m));
        for _ in 0..200 {
            let a = 1 + rng.below(u64::from(m - 1)) as u32;
            let b = rng.below(u64::from(m)) as u32;
            let inv = mod_inverse(a, m);
            assert_eq!(
                u64::from(a) * u64::from(inv) % u64::from(m),
                1,
                "m={m} a={a}"
            );
            assert_eq!(
                u64::from(f.mul_mod(u64::from(a), u64::from(b))),
                u64::from(a) * u64::from(b) % u64::from(m)
            );
        }
    }
    // The largest prime below MAX_M exercises products near 2^62.
    let p = (0..1000)
        .map(|k| MAX_M - 1 - k)
        .find(|&m| is_prime(m))
        .unwrap();
    let f = Filler::new(p);
    assert_eq!(
        u64::from(f.mul_mod(u64::from(p - 1), u64::from(p - 1))),
        1,
        "(-1)² = 1"
    );
}

#[test]
fn decimal_formatting_edges() {
    for (addr, port, cluster, want) in [
        ("0.0.0.0", 1u16, 0u32, "[0.0.0.0:1/TCP,State:active]"),
        (
            "255.255.255.255",
            65535,
            u32::MAX,
            "[255.255.255.255@4294967295:65535/TCP,State:active]",
        ),
        ("10.100.0.9", 10, 10, "[10.100.0.9@10:10/TCP,State:active]"),
    ] {
        let b = MaglevBackend {
            cluster_id: cluster,
            ..MaglevBackend::new(addr.parse().unwrap(), port, 1)
        };
        assert_eq!(b.hash_string(), want);
    }
}
