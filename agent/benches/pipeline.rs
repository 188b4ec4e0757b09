//! Full translation + snapshot build for 10,000 routes / 5,000 Services,
//! then incremental agent passes. `cargo bench -p membrane-agent`.
//! Plain `Instant` timing; the same code backs
//! `membrane bench xds --scenario translate`.

use membrane_agent::bench::{Workload, translation};
use membrane_agent::{Controller, ControllerPass};
use membrane_k8s::StoreSink;
use membrane_operator::{Operator, OperatorConfig};
use membrane_store::Store;

/// The operator's pass in the agent's loop, as `membrane up` runs it.
struct InProcess(Operator);

impl Controller for InProcess {
    fn pass(&mut self, store: &Store) -> ControllerPass {
        let pass = self.0.pass(store, &StoreSink(store.clone()));
        ControllerPass {
            rejected: pass.rejected,
            generated: Some(
                pass.managed
                    .iter()
                    .map(|m| (m.ingress.clone(), m.cec.clone()))
                    .collect(),
            ),
        }
    }
}

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
    let operator = Operator::new(&OperatorConfig {
        lb_pool: "127.100.0.0/16".parse().expect("pool"),
        secrets_namespace: "cilium-secrets".into(),
        ingress_default_lb_mode: Default::default(),
        ingress: Default::default(),
        cluster_pool: Vec::new(),
    });
    match translation(&w, 50, Box::new(InProcess(operator))) {
        Ok(report) => print!("{report}"),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
