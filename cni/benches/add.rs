//! CNI ADD/DEL latency and pod churn: the plugin binary run as a runtime
//! runs it (a process per call, environment + stdin) against the endpoint
//! manager serving inside a node namespace. Needs root; prints a table for
//! docs/benchmarks.md. `cargo bench -p membrane-cni --bench add`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

fn main() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the CNI benchmark needs root (network namespaces)");
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let node = Netns::new("bench");
    let agent = Agent::start(
        &node,
        &AgentSpec {
            state_dir: dir.path().join("state"),
            socket: dir.path().join("cni.sock"),
            cidrs: vec!["10.123.128.0/20", "fd00:123:80::/64"],
            unreachable_routes: false,
        },
    );
    let conf = conf(&agent.socket, "1.0.0");
    const N: usize = 100;
    let pods: Vec<Netns> = (0..N).map(|_| Netns::new("bpod")).collect();

    // One at a time: latency of a single ADD / DEL.
    let mut add = Vec::new();
    let mut del = Vec::new();
    for (i, p) in pods.iter().enumerate() {
        let t = Instant::now();
        let out = plugin("ADD", &format!("s{i}"), &p.path(), "eth0", "", &conf);
        add.push(t.elapsed());
        assert_eq!(out.code, 0, "{}", out.raw);
    }
    for (i, p) in pods.iter().enumerate() {
        let t = Instant::now();
        let out = plugin("DEL", &format!("s{i}"), &p.path(), "eth0", "", &conf);
        del.push(t.elapsed());
        assert_eq!(out.code, 0, "{}", out.raw);
    }
    add.sort();
    del.sort();

    // Churn: W workers, each ADD then DEL on its own pods, as parallel pod
    // starts and stops would.
    let mut rows = Vec::new();
    for workers in [1usize, 8, 32] {
        let rounds = 200 / workers.max(1);
        let t = Instant::now();
        let lat: Vec<Duration> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..workers)
                .map(|w| {
                    let conf = &conf;
                    let pods = &pods;
                    s.spawn(move || {
                        let mut lat = Vec::new();
                        for r in 0..rounds {
                            // A worker's pods start and stop one after
                            // the other in its own namespace.
                            let p = &pods[w];
                            let cid = format!("c{workers}-{w}-{r}");
                            let ifname = "eth0";
                            let t = Instant::now();
                            let out = plugin("ADD", &cid, &p.path(), ifname, "", conf);
                            lat.push(t.elapsed());
                            assert_eq!(out.code, 0, "{}", out.raw);
                            let out = plugin("DEL", &cid, &p.path(), ifname, "", conf);
                            assert_eq!(out.code, 0, "{}", out.raw);
                        }
                        lat
                    })
                })
                .collect();
            hs.into_iter()
                .flat_map(|h| h.join().expect("worker"))
                .collect()
        });
        let took = t.elapsed().as_secs_f64();
        let mut lat = lat;
        lat.sort();
        rows.push((
            workers,
            lat.len(),
            lat.len() as f64 / took,
            pct(&lat, 0.5),
            pct(&lat, 0.99),
        ));
    }
    agent.stop();

    println!("| measurement | p50 | p99 |");
    println!("|---|---|---|");
    println!(
        "| ADD, one at a time ({N} pods, dual stack) | {:.1} ms | {:.1} ms |",
        pct(&add, 0.5),
        pct(&add, 0.99)
    );
    println!(
        "| DEL, one at a time | {:.1} ms | {:.1} ms |",
        pct(&del, 0.5),
        pct(&del, 0.99)
    );
    println!();
    println!("| parallel workers | pods (ADD+DEL) | pods/s | ADD p50 | ADD p99 |");
    println!("|---|---|---|---|---|");
    for (w, n, rate, p50, p99) in rows {
        println!("| {w} | {n} | {rate:.0} | {p50:.1} ms | {p99:.1} ms |");
    }
}
