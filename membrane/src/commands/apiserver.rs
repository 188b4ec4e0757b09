//! `membrane apiserver`: the embedded Kubernetes-compatible API alone, so
//! the operator and agents can run as separate processes against it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

#[derive(Args, Debug)]
pub struct ApiserverArgs {
    /// Address to serve the API on (plain HTTP).
    #[arg(long, default_value = "127.0.0.1:6443")]
    pub listen: SocketAddr,
    /// Directory of the database (objects survive restarts).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Where to write the kubeconfig (default `<data-dir>/kubeconfig`).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Change events kept for watchers to resume from; a watch from an
    /// older resourceVersion gets 410 Gone.
    #[arg(long, default_value_t = 10_000)]
    pub event_window: u64,
    /// Seconds between bookmarks on watches that allow them.
    #[arg(long, default_value_t = 5)]
    pub bookmark_interval: u64,
    /// Seconds after which an Event that has not recurred is deleted.
    #[arg(long, default_value_t = 3600)]
    pub event_ttl: u64,
    /// Append one JSON line per request to FILE: user agent, verb, API
    /// group, resource, subresource, namespace, name, response code (what
    /// an RBAC authorizer sees; the chart's RBAC test checks it).
    #[arg(long, value_name = "FILE")]
    pub audit_log: Option<PathBuf>,
    /// fsync every commit before answering (SQLite synchronous=FULL): a
    /// write also survives an OS crash or power loss, at one fsync per
    /// write. By default a write survives the process being killed, as
    /// with k3s's SQLite datastore.
    #[arg(long)]
    pub sync_commits: bool,
}

pub async fn run(args: ApiserverArgs) -> Result<ExitCode> {
    let mut config = membrane_apiserver::Config::new(args.listen, &args.data_dir);
    config.event_window = args.event_window;
    config.bookmark_interval = Duration::from_secs(args.bookmark_interval.max(1));
    config.event_ttl = Duration::from_secs(args.event_ttl);
    config.audit_log = args.audit_log.clone();
    if args.sync_commits {
        config.sync = membrane_apiserver::store::SyncMode::Full;
    }
    let server = membrane_apiserver::ApiServer::bind(config)
        .await
        .with_context(|| format!("starting the API server on {}", args.listen))?;
    let addr = server.local_addr()?;
    let kubeconfig = args
        .kubeconfig
        .unwrap_or_else(|| args.data_dir.join("kubeconfig"));
    membrane_apiserver::write_kubeconfig(&kubeconfig, addr)?;
    println!("kubeconfig: {}", kubeconfig.display());
    println!("serving the Kubernetes API on http://{addr}");
    tracing::info!(%addr, data_dir = %args.data_dir.display(), "API server ready");
    server.serve(stop_signal()).await?;
    tracing::info!("API server stopped");
    Ok(ExitCode::SUCCESS)
}

async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
