//! Full translation + snapshot build for 10,000 routes / 5,000 Services,
//! then incremental agent passes. `cargo bench -p membrane-agent`.
//! Plain `Instant` timing; the same code backs
//! `membrane bench xds --scenario translate`.

use membrane_agent::bench::{Workload, translation};

fn main() {
    // MEMBRANE_LOG=membrane_agent=debug prints where each pass spends time.
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("MEMBRANE_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();
    }
    let routes = std::env::var("BENCH_ROUTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let w = Workload::routes(routes);
    match translation(&w, 50) {
        Ok(report) => print!("{report}"),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
