//! `membrane`: the command line of Membrane.

mod client;
mod commands;
mod table;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Default local API socket of a running Membrane.
pub const DEFAULT_API_SOCKET: &str = "/tmp/membrane/api.sock";

#[derive(Parser, Debug)]
#[command(
    name = "membrane",
    version,
    about = "Kubernetes Ingress and CiliumEnvoyConfig on a real Envoy, Cilium-compatible"
)]
struct Cli {
    /// Local API socket of the running instance.
    #[arg(long, global = true, env = "MEMBRANE_API_SOCKET", default_value = DEFAULT_API_SOCKET)]
    api_socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run Membrane in the foreground on a directory of manifests (watched).
    Up(Box<commands::up::UpArgs>),
    /// Serve the embedded Kubernetes-compatible API alone (kubectl works
    /// against it); objects persist in `--data-dir`.
    Apiserver(commands::apiserver::ApiserverArgs),
    /// Kubernetes mode, one per cluster (leader-elected): Ingress
    /// controller, LB IPAM, CEC/Service/EndpointSlice writer, secret sync,
    /// Ingress status, Warning Events.
    Operator(Box<commands::roles::OperatorArgs>),
    /// Kubernetes mode, one per node: CEC/CCEC processing, xDS, its Envoy,
    /// the datapath; reports ACKs in its ProxyNodeStatus.
    Agent(Box<commands::roles::AgentArgs>),
    /// Create or update the objects in a file (`-` for stdin).
    Apply {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Delete the objects named in a file (`-` for stdin).
    Delete {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Show objects: ingress, service, endpointslice, secret, cec, ccec, ...
    Get {
        kind: String,
        name: Option<String>,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// json, yaml or table (default).
        #[arg(short = 'o', long)]
        output: Option<String>,
    },
    /// Envoy process and readiness, xDS ACK/NACK per type and every rejected
    /// object; exits non-zero when Envoy is down or something is rejected.
    Status {
        #[arg(short = 'o', long)]
        output: Option<String>,
    },
    /// Print the CiliumEnvoyConfig(s) an Ingress file translates to. No I/O.
    Translate {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Load-balancer mode of Ingresses without the annotation.
        #[arg(long, default_value = "dedicated")]
        ingress_default_lb_mode: membrane_ingress::LoadBalancerMode,
        #[command(flatten)]
        ingress: commands::up::IngressFlags,
    },
    /// Run the conformance echo backend.
    Echo(commands::echo::EchoArgs),
    /// Print the CustomResourceDefinitions Membrane serves.
    Crds,
    /// Service load balancing of the eBPF datapath (`up --datapath ebpf`).
    Service {
        #[command(subcommand)]
        command: commands::service::ServiceCommand,
    },
    /// Pod endpoints set up through `membrane-cni` (`up --enable-cni`).
    Endpoint {
        #[command(subcommand)]
        command: commands::endpoint::EndpointCommand,
    },
    /// Load-balancing tools (Maglev tables identical to Cilium's).
    Lb {
        #[command(subcommand)]
        command: commands::lb::LbCommand,
    },
    /// Benchmarks (`membrane bench xds`); figures go to docs/benchmarks.md.
    Bench {
        #[command(subcommand)]
        command: commands::bench::BenchCommand,
    },
    /// Network policy: `membrane policy get` (in force on this node's
    /// endpoints) and `membrane policy trace`.
    Policy {
        #[command(subcommand)]
        command: commands::policy::PolicyCommand,
    },
    /// Run a conformance suite against a Membrane started for the purpose.
    Conformance {
        #[command(subcommand)]
        suite: commands::conformance::Suite,
    },
}

// jemalloc packs objects by size class and hands freed pages back to the
// OS after a short decay; glibc's arenas kept about twice the live heap
// resident after start-up (docs/benchmarks.md, "Control-plane RSS").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main`: a background thread returns
/// pages unused for a second (jemalloc's default waits 10 s and only on
/// allocation activity), and two arenas suffice on the nodes' few cores.
/// `_RJEM_MALLOC_CONF` in the environment still overrides them.
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: Option<&'static std::ffi::c_char> = Some(
    // SAFETY: a pointer to the first byte of a 'static NUL-terminated string.
    unsafe { &*c"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0,narenas:2".as_ptr() },
);

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MEMBRANE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let api = cli.api_socket;
    match cli.command {
        Command::Up(args) => commands::up::run(*args, api).await,
        Command::Apiserver(args) => commands::apiserver::run(args).await,
        Command::Operator(args) => commands::roles::operator(*args).await,
        Command::Agent(args) => commands::roles::agent(*args, api).await,
        Command::Apply { file } => commands::objects::apply(&api, &file, "/v1/apply").await,
        Command::Delete { file } => commands::objects::apply(&api, &file, "/v1/delete").await,
        Command::Get {
            kind,
            name,
            namespace,
            all_namespaces,
            output,
        } => {
            let ns = if all_namespaces {
                None
            } else {
                Some(namespace.unwrap_or_else(|| "default".into()))
            };
            commands::objects::get(
                &api,
                &kind,
                name.as_deref(),
                ns.as_deref(),
                output.as_deref(),
            )
            .await
        }
        Command::Status { output } => commands::status::run(&api, output.as_deref()).await,
        Command::Translate {
            file,
            ingress_default_lb_mode,
            ingress,
        } => commands::translate::run(&file, ingress_default_lb_mode, &ingress.options()?),
        Command::Echo(args) => commands::echo::run(args).await,
        Command::Crds => {
            print!("{}", membrane_crds::all_crds_yaml());
            Ok(ExitCode::SUCCESS)
        }
        Command::Lb { command } => commands::lb::run(command),
        Command::Policy { command } => commands::policy::run(&api, command).await,
        Command::Endpoint { command } => commands::endpoint::run(&api, command).await,
        Command::Service { command } => commands::service::run(&api, command).await,
        Command::Conformance { suite } => commands::conformance::run(suite).await,
        Command::Bench { command } => commands::bench::run(command).await,
    }
}
