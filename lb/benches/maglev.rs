//! Maglev table build times, plain `Instant` timing (no criterion).
//! Run: `cargo bench -p membrane-lb`.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use membrane_lb::maglev::{
    DEFAULT_BACKEND_WEIGHT, DEFAULT_HASH_SEED, MaglevBackend, MaglevConfig, build_table,
};

const RUNS: usize = 50;

fn backends(n: u32, weight: u16) -> Vec<MaglevBackend> {
    (0..n)
        .map(|i| MaglevBackend {
            weight,
            // Pod-like addresses, 10.244.x.y:8080.
            ..MaglevBackend::new(
                IpAddr::V4(Ipv4Addr::new(10, 244, (i / 200) as u8, (i % 200 + 2) as u8)),
                8080,
                i + 1,
            )
        })
        .collect()
}

fn bench(label: &str, m: u32, n: u32, weight: u16) {
    // `cargo bench -p membrane-lb -- 65537` runs only matching cases.
    let filter = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    if let Some(f) = filter
        && !format!("{label} M={m} N={n}").contains(&f)
    {
        return;
    }
    let cfg = match MaglevConfig::from_seed_b64(m, DEFAULT_HASH_SEED) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("{label}: {e}");
            return;
        }
    };
    let bes = backends(n, weight);
    // Warm-up: page in the allocator and caches.
    for _ in 0..5 {
        black_box(build_table(black_box(&cfg), black_box(&bes)));
    }
    let mut times: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            let table = build_table(black_box(&cfg), black_box(&bes));
            let elapsed = start.elapsed();
            assert_eq!(table.len(), m as usize);
            black_box(table);
            elapsed
        })
        .collect();
    times.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{label:<34} N={n:<5} M={m:<6} w={weight:<3}  best {:>8.1} µs  median {:>8.1} µs  ({RUNS} runs)",
        us(times[0]),
        us(times[RUNS / 2]),
    );
}

fn main() {
    let w = DEFAULT_BACKEND_WEIGHT;
    bench("goal (<= 1 ms)", 16381, 1000, w);
    bench("Cilium max-but-one", 65521, 1000, w);
    bench("paper M (<= 1.5 ms)", 65537, 1000, w);
    bench("Cilium max", 131071, 1000, w);
    bench("N=100", 16381, 100, w);
    bench("N=100", 65521, 100, w);
    bench("weights unused (all 1)", 16381, 1000, 1);
    bench("weights unused (all 1)", 65537, 1000, 1);
}
