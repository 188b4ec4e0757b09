//! `membrane bench xds`: control-plane benchmarks. Each scenario prints its
//! figures and how they were taken; docs/benchmarks.md records them.
//!
//! | scenario | what |
//! |---|---|
//! | `apply` | one Ingress change → first 200 through a real Envoy, over existing routes |
//! | `translate` | translation + pipeline + snapshot for 10,000 routes (pure, in-process) |
//! | `rss` | VmRSS of a real `membrane up` serving 1,000 and 10,000 routes |
//! | `streams` | 1,000 concurrent ADS streams against the xDS server: its RSS |
//! | `churn` | CPU and bytes sent per step while 5,000 endpoints churn |
//! | `endpoints` | one EndpointSlice change → Envoy sends to the new endpoint, over 10,000 Services |

mod ads;
mod live;
mod procfs;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;

#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// xDS / control-plane benchmarks.
    Xds(XdsArgs),
    /// Internal: the xDS server process the `streams` and `churn`
    /// scenarios measure (synthetic store, no Envoy).
    #[command(hide = true)]
    XdsServer(ads::ServerArgs),
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    All,
    Apply,
    Translate,
    Rss,
    Streams,
    Churn,
    Endpoints,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One CEC, LB Service and address per Ingress.
    Dedicated,
    /// Annotation `ingress.cilium.io/loadbalancer-mode: shared`: one CEC.
    Shared,
}

#[derive(clap::Args, Debug, Clone)]
pub struct XdsArgs {
    #[arg(long, value_enum, default_value = "all")]
    pub scenario: Scenario,
    /// Load-balancer mode of the Ingresses (`apply`, `rss`).
    #[arg(long, value_enum, default_value = "dedicated")]
    pub mode: Mode,
    /// `apply`: existing routes (in Ingresses of `--paths` paths).
    #[arg(long, default_value_t = 3000)]
    pub routes: usize,
    /// `apply`, `endpoints`: also log each change's way through membrane (API commits,
    /// the agent's passes, xDS responses and ACKs) and print the time
    /// between those steps (p50/p90 over the changes).
    #[arg(long)]
    pub timeline: bool,
    /// Paths per Ingress.
    #[arg(long, default_value_t = 10)]
    pub paths: usize,
    /// `apply`: how many changes are timed.
    #[arg(long, default_value_t = 50)]
    pub changes: usize,
    /// `rss`: route counts to measure at.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    pub rss_routes: Vec<usize>,
    /// `translate`: routes (Services: half as many).
    #[arg(long, default_value_t = 10_000)]
    pub translate_routes: usize,
    /// `streams`: concurrent ADS streams.
    #[arg(long, default_value_t = 1000)]
    pub streams: usize,
    /// `streams`: routes in the served snapshot.
    #[arg(long, default_value_t = 1000)]
    pub stream_routes: usize,
    /// `churn`: endpoints in total (Services × 10 endpoints).
    #[arg(long, default_value_t = 5000)]
    pub endpoints: usize,
    /// `churn`: steps (one endpoint changes per step).
    #[arg(long, default_value_t = 200)]
    pub churn_steps: usize,
    /// Envoy binary for `apply` and `rss` (else $MEMBRANE_ENVOY, .venv, PATH).
    #[arg(long)]
    pub envoy_bin: Option<std::path::PathBuf>,
    /// Port Ingress HTTP is served on in `apply`, `rss` and `endpoints`.
    #[arg(long, default_value_t = 18080)]
    pub http_port: u16,
    /// Load-balancer pool of the `membrane up` under test.
    #[arg(long, default_value = "127.100.0.0/16")]
    pub lb_pool: String,
    /// Port of the echo backends (the Services' targetPort).
    #[arg(long, default_value_t = 3000)]
    pub echo_port: u16,
    /// `endpoints`: Services (one Ingress with one path each).
    #[arg(long, default_value_t = 10_000)]
    pub services: usize,
}

pub async fn run(cmd: BenchCommand) -> Result<ExitCode> {
    match cmd {
        BenchCommand::Xds(args) => xds(args).await,
        BenchCommand::XdsServer(args) => ads::serve(args).await,
    }
}

async fn xds(args: XdsArgs) -> Result<ExitCode> {
    println!("machine: {}", procfs::machine());
    println!(
        "build: {}",
        if cfg!(debug_assertions) {
            "debug (figures are only meaningful in release)"
        } else {
            "release"
        }
    );
    let all = args.scenario == Scenario::All;
    if all || args.scenario == Scenario::Translate {
        translate(&args)?;
    }
    if all || args.scenario == Scenario::Apply {
        live::apply(&args).await?;
    }
    if all || args.scenario == Scenario::Rss {
        live::rss(&args).await?;
    }
    if all || args.scenario == Scenario::Streams {
        ads::streams(&args).await?;
    }
    if all || args.scenario == Scenario::Churn {
        ads::churn(&args).await?;
    }
    if all || args.scenario == Scenario::Endpoints {
        live::endpoints(&args).await?;
    }
    Ok(ExitCode::SUCCESS)
}

fn translate(args: &XdsArgs) -> Result<()> {
    println!(
        "\n== translate: {} routes, full translation + pipeline + snapshot ==",
        args.translate_routes
    );
    println!(
        "method: in-process; Ingress translation, ConfigPipeline::run and the snapshot \
         build timed from cold, then the agent's store pass (IPAM, Ingress controller, \
         pipeline, snapshot) after one change, 50 samples each"
    );
    let w = membrane_agent::bench::Workload::routes(args.translate_routes);
    let report = membrane_agent::bench::translation(
        &w,
        50,
        super::roles::in_process_operator("127.100.0.0/16".parse()?),
    )?;
    print!("{report}");
    Ok(())
}

/// `p50 … p99 … max …` of samples, in milliseconds.
pub fn summary(samples: &[Duration]) -> String {
    let q = |p: f64| membrane_agent::bench::quantile(&mut samples.to_vec(), p).as_secs_f64() * 1e3;
    format!(
        "p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms (n={})",
        q(0.5),
        q(0.9),
        q(0.99),
        q(1.0),
        samples.len()
    )
}
