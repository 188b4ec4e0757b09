//! `membrane conformance ingress`: start a Membrane of our own (real Envoy,
//! ports 80/443 on the status address) on an empty manifest directory and
//! run the Ingress conformance suite against it through its local API.

use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hyper::Method;
use tokio::process::Command;

use crate::client::ApiClient;

#[derive(clap::Subcommand, Debug)]
pub enum Suite {
    /// The upstream Kubernetes Ingress conformance suite (30 scenarios).
    Ingress(IngressArgs),
}

#[derive(clap::Args, Debug)]
pub struct IngressArgs {
    /// Directory of .feature files.
    #[arg(long, default_value = "../shared/conformance/ingress")]
    pub features: PathBuf,
    #[arg(long, default_value = "cilium")]
    pub ingress_class: String,
    /// How long the foreign-class scenario waits for a status that must not come.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub ingress_class_wait: Duration,
    /// Pause after scaling a backend to 10 pods.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub scale_settle: Duration,
    /// Cucumber JSON report file.
    #[arg(long)]
    pub report: Option<PathBuf>,
    #[arg(long, default_value_t = 80)]
    pub http_port: u16,
    #[arg(long, default_value_t = 443)]
    pub https_port: u16,
    /// Envoy binary for the Membrane under test.
    #[arg(long)]
    pub envoy_bin: Option<PathBuf>,
    /// Extra arguments for `membrane up`, e.g. `--xds-protocol delta`.
    #[arg(long, allow_hyphen_values = true)]
    pub up_arg: Vec<String>,
}

pub async fn run(suite: Suite) -> Result<ExitCode> {
    let Suite::Ingress(args) = suite;
    let work = std::env::temp_dir().join(format!("membrane-conformance-{}", std::process::id()));
    let manifests = work.join("manifests");
    std::fs::create_dir_all(&manifests)
        .with_context(|| format!("creating {}", manifests.display()))?;
    let api_socket = work.join("api.sock");
    let exe = std::env::current_exe().context("locating the membrane binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("--api-socket")
        .arg(&api_socket)
        .arg("up")
        .arg(&manifests)
        .arg("--run-dir")
        .arg(work.join("run"))
        .arg("--envoy-admin-port")
        .arg("0")
        .arg("--http-port")
        .arg(args.http_port.to_string())
        .arg("--https-port")
        .arg(args.https_port.to_string())
        .args(&args.up_arg)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(bin) = &args.envoy_bin {
        cmd.arg("--envoy-bin").arg(bin);
    }
    // SAFETY: prctl in the child only; no parent memory is touched.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting membrane up")?;
    let client = ApiClient::new(&api_socket);
    let mut ready = false;
    // Bounded wait for the API socket (Envoy starts in the background).
    for _ in 0..300 {
        if client.ok(Method::GET, "/v1/status", None).await.is_ok() {
            ready = true;
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!("membrane up exited during start-up: {status}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !ready {
        bail!(
            "membrane up did not open {} within 30 s",
            api_socket.display()
        );
    }
    let opts = membrane_conformance::RunOptions {
        features: args.features,
        ingress_class: args.ingress_class,
        ingress_class_wait: args.ingress_class_wait,
        scale_settle: args.scale_settle,
        report: args.report,
        api_socket: api_socket.clone(),
        http_port: args.http_port,
        https_port: args.https_port,
    };
    let result = membrane_conformance::run(opts).await;
    if let Some(pid) = child.id() {
        // SAFETY: signalling our own child by PID.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    let _ = child.kill().await;
    let _ = std::fs::remove_dir_all(&work);
    let summary = result?;
    Ok(if summary.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
