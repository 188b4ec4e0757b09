//! `membrane echo --listen ADDR`: the conformance echo backend.

use std::process::ExitCode;

use anyhow::{Context, Result};
use membrane_conformance::echo::{EchoIdentity, serve};

#[derive(clap::Args, Debug)]
pub struct EchoArgs {
    /// Address to listen on, e.g. 127.0.10.1:3000.
    #[arg(long)]
    pub listen: String,
    /// Reported `namespace` (default: $NAMESPACE).
    #[arg(long)]
    pub namespace: Option<String>,
    /// Reported `ingress` (default: $INGRESS_NAME).
    #[arg(long)]
    pub ingress: Option<String>,
    /// Reported `service` (default: $SERVICE_NAME).
    #[arg(long)]
    pub service: Option<String>,
    /// Reported `pod` (default: $POD_NAME).
    #[arg(long)]
    pub pod: Option<String>,
}

pub async fn run(args: EchoArgs) -> Result<ExitCode> {
    let mut id = EchoIdentity::from_env();
    if let Some(v) = args.namespace {
        id.namespace = v;
    }
    if let Some(v) = args.ingress {
        id.ingress = v;
    }
    if let Some(v) = args.service {
        id.service = v;
    }
    if let Some(v) = args.pod {
        id.pod = v;
    }
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("--listen {}", args.listen))?;
    eprintln!("echo backend listening on {}", listener.local_addr()?);
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    serve(listener, id, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}
