//! Scenarios against the xDS server alone: many concurrent ADS streams, and
//! endpoint churn. The server runs in a child process (`membrane bench
//! xds-server`) holding a synthetic store and the agent's reconciler, so its
//! memory and CPU are measured without the clients'.

use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use membrane_agent::bench::{Harness, Workload, pod_ip};
use membrane_store::Object;
use membrane_xds::type_url;
use prost::Message;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{XdsArgs, procfs, summary};

/// Subscription order of a real Envoy.
const TYPES: [&str; 4] = [
    type_url::CLUSTER,
    type_url::ENDPOINT,
    type_url::LISTENER,
    type_url::ROUTE,
];

#[derive(clap::Args, Debug, Clone)]
pub struct ServerArgs {
    #[arg(long, default_value_t = 1000)]
    pub routes: usize,
    #[arg(long, default_value_t = 500)]
    pub services: usize,
    #[arg(long, default_value_t = 2)]
    pub endpoints: usize,
}

fn server_workload(a: &ServerArgs) -> Workload {
    let mut w = Workload::routes(a.routes);
    w.services = a.services.max(1);
    w.endpoints = a.endpoints.max(1);
    w
}

fn churn_ip(step: usize) -> String {
    let n = step + 1;
    format!("10.250.{}.{}", (n >> 8) & 0xff, n & 0xff)
}

/// The child process: serve ADS over TCP for a synthetic store; on stdin,
/// `churn N` changes one endpoint (of Service N mod services) and runs the
/// agent's store pass; each command is answered `ok` on stdout.
pub async fn serve(args: ServerArgs) -> Result<ExitCode> {
    let w = server_workload(&args);
    let mut h = Harness::new(
        "127.100.0.0/16",
        Some(super::super::roles::in_process_operator(
            "127.100.0.0/16".parse()?,
        )),
    )?;
    h.state.store.apply_all(w.store_objects(&pod_ip)?);
    h.settle();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let cache = h.state.cache.clone();
    tokio::spawn(membrane_xds::serve_tcp_listener(
        listener,
        cache,
        std::future::pending(),
    ));
    let mut out = tokio::io::stdout();
    let snapshot = &h.reconciler.xds_snapshot;
    let total_bytes: usize = snapshot.iter().map(|r| r.body.encoded_len()).sum();
    out.write_all(
        format!(
            "listening {addr} resources {} bytes {total_bytes}\n",
            snapshot.len()
        )
        .as_bytes(),
    )
    .await?;
    out.flush().await?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["churn", step] => {
                let step: usize = step.parse().context("churn step")?;
                let s = step % w.services;
                let changed = step % w.endpoints;
                let [_, slice] = w.service(s, &|svc, e| {
                    if e == changed {
                        churn_ip(step)
                    } else {
                        pod_ip(svc, e)
                    }
                });
                h.state.store.apply(Object::from_value(slice)?);
                h.pass();
            }
            ["quit"] => break,
            _ => {}
        }
        out.write_all(b"ok\n").await?;
        out.flush().await?;
    }
    Ok(ExitCode::SUCCESS)
}

/// A running `membrane bench xds-server`.
struct ServerProc {
    child: Child,
    stdin: ChildStdin,
    stdout: tokio::io::Lines<BufReader<ChildStdout>>,
    addr: String,
    resources: usize,
    bytes: usize,
}

impl ServerProc {
    async fn start(args: &ServerArgs) -> Result<ServerProc> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .args(["bench", "xds-server"])
            .args(["--routes", &args.routes.to_string()])
            .args(["--services", &args.services.to_string()])
            .args(["--endpoints", &args.endpoints.to_string()])
            .env("MEMBRANE_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting the xDS server process")?;
        let stdin = child.stdin.take().context("child stdin")?;
        let stdout = child.stdout.take().context("child stdout")?;
        let mut stdout = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(600), stdout.next_line())
            .await
            .context("xDS server start-up timed out")??
            .context("xDS server exited")?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let ["listening", addr, "resources", resources, "bytes", bytes] = words.as_slice() else {
            bail!("unexpected xDS server output: {line}");
        };
        Ok(ServerProc {
            addr: (*addr).to_owned(),
            resources: resources.parse()?,
            bytes: bytes.parse()?,
            child,
            stdin,
            stdout,
        })
    }

    fn pid(&self) -> Result<u32> {
        self.child.id().context("xDS server exited")
    }

    async fn command(&mut self, cmd: &str) -> Result<()> {
        self.stdin.write_all(format!("{cmd}\n").as_bytes()).await?;
        self.stdin.flush().await?;
        let line = self
            .stdout
            .next_line()
            .await?
            .context("xDS server exited")?;
        anyhow::ensure!(line == "ok", "xDS server answered {line:?} to {cmd:?}");
        Ok(())
    }
}

/// What the synthetic clients received.
#[derive(Default)]
struct Counters {
    responses: AtomicU64,
    resources: AtomicU64,
    bytes: AtomicU64,
    /// Streams that have received a response for every type.
    synced: AtomicUsize,
}

impl Counters {
    /// Count one response; a stream is synced once it has seen every type.
    fn record(
        &self,
        seen: &mut std::collections::BTreeSet<String>,
        type_url: &str,
        resources: usize,
        bytes: usize,
    ) {
        self.responses.fetch_add(1, Ordering::Relaxed);
        self.resources
            .fetch_add(resources as u64, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        if seen.insert(type_url.to_owned()) && seen.len() == TYPES.len() {
            self.synced.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One Envoy-like delta ADS stream: subscribes to clusters, endpoints,
/// listeners and routes (wildcard), ACKs every response.
async fn delta_client(
    channel: tonic::transport::Channel,
    node: String,
    counters: Arc<Counters>,
) -> Result<()> {
    let mut grpc = AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(membrane_xds::server::MAX_MESSAGE_SIZE);
    let (tx, rx) = mpsc::channel(16);
    for (i, t) in TYPES.iter().enumerate() {
        let wildcard = *t == type_url::ENDPOINT || *t == type_url::ROUTE;
        tx.send(DeltaDiscoveryRequest {
            node: (i == 0).then(|| Node {
                id: node.clone(),
                ..Default::default()
            }),
            type_url: (*t).to_owned(),
            resource_names_subscribe: if wildcard { vec!["*".into()] } else { vec![] },
            ..Default::default()
        })
        .await?;
    }
    let mut inbound = grpc
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut seen = std::collections::BTreeSet::new();
    while let Some(resp) = inbound.message().await? {
        counters.record(
            &mut seen,
            &resp.type_url,
            resp.resources.len(),
            resp.encoded_len(),
        );
        tx.send(DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            ..Default::default()
        })
        .await?;
    }
    Ok(())
}

/// One state-of-the-world ADS stream (wildcard everywhere), ACKing.
async fn sotw_client(
    channel: tonic::transport::Channel,
    node: String,
    counters: Arc<Counters>,
) -> Result<()> {
    let mut grpc = AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(membrane_xds::server::MAX_MESSAGE_SIZE);
    let (tx, rx) = mpsc::channel(16);
    for (i, t) in TYPES.iter().enumerate() {
        let named = *t == type_url::ENDPOINT || *t == type_url::ROUTE;
        tx.send(DiscoveryRequest {
            node: (i == 0).then(|| Node {
                id: node.clone(),
                ..Default::default()
            }),
            type_url: (*t).to_owned(),
            resource_names: if named { vec!["*".into()] } else { vec![] },
            ..Default::default()
        })
        .await?;
    }
    let mut inbound = grpc
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut seen = std::collections::BTreeSet::new();
    while let Some(resp) = inbound.message().await? {
        counters.record(
            &mut seen,
            &resp.type_url,
            resp.resources.len(),
            resp.encoded_len(),
        );
        let named = resp.type_url == type_url::ENDPOINT || resp.type_url == type_url::ROUTE;
        tx.send(DiscoveryRequest {
            type_url: resp.type_url.clone(),
            version_info: resp.version_info.clone(),
            response_nonce: resp.nonce.clone(),
            resource_names: if named { vec!["*".into()] } else { vec![] },
            ..Default::default()
        })
        .await?;
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    Delta,
    Sotw,
}

async fn connect(addr: &str) -> Result<tonic::transport::Channel> {
    Ok(
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await?,
    )
}

fn spawn_client(
    proto: Proto,
    channel: tonic::transport::Channel,
    node: String,
    counters: Arc<Counters>,
) {
    tokio::spawn(async move {
        let r = match proto {
            Proto::Delta => delta_client(channel, node, counters).await,
            Proto::Sotw => sotw_client(channel, node, counters).await,
        };
        if let Err(e) = r {
            tracing::debug!(error = %e, "bench ADS client ended");
        }
    });
}

/// Scenario `streams`.
pub async fn streams(args: &XdsArgs) -> Result<()> {
    let server_args = ServerArgs {
        routes: args.stream_routes,
        services: args.stream_routes.div_ceil(2).max(1),
        endpoints: 2,
    };
    println!(
        "\n== streams: {} concurrent delta ADS streams, {} routes in the snapshot ==",
        args.streams, server_args.routes
    );
    println!(
        "method: the xDS server runs in its own process (synthetic store + agent reconciler, \
         no Envoy); one HTTP/2 connection per stream, each an Envoy-like client subscribing to \
         clusters, endpoints, listeners, routes and ACKing; VmRSS/VmHWM of the server process \
         once every stream has received every type, after 2 s idle"
    );
    let mut server = ServerProc::start(&server_args).await?;
    let pid = server.pid()?;
    let before = procfs::rss(pid).unwrap_or(0);
    println!(
        "server: {} resources, {:.1} MiB encoded; idle RSS {:.1} MiB",
        server.resources,
        procfs::mib(server.bytes as u64),
        procfs::mib(before)
    );
    let counters = Arc::new(Counters::default());
    let start = Instant::now();
    for n in 0..args.streams {
        let channel = connect(&server.addr).await?;
        spawn_client(
            Proto::Delta,
            channel,
            format!("bench-node-{n}"),
            counters.clone(),
        );
    }
    while counters.synced.load(Ordering::Relaxed) < args.streams {
        if start.elapsed() > Duration::from_secs(600) {
            bail!(
                "only {} of {} streams synced after 600 s",
                counters.synced.load(Ordering::Relaxed),
                args.streams
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let synced = start.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = procfs::rss(pid).unwrap_or(0);
    let hwm = procfs::hwm(pid).unwrap_or(0);
    println!(
        "{} streams synced in {:.2} s ({} responses, {:.1} MiB received)",
        args.streams,
        synced.as_secs_f64(),
        counters.responses.load(Ordering::Relaxed),
        procfs::mib(counters.bytes.load(Ordering::Relaxed))
    );
    println!(
        "server VmRSS {:.1} MiB (peak VmHWM {:.1} MiB); {:.1} KiB per stream above idle",
        procfs::mib(rss),
        procfs::mib(hwm),
        rss.saturating_sub(before) as f64 / 1024.0 / args.streams.max(1) as f64
    );
    // One change with every stream connected: how long until all have it.
    let responses = counters.responses.load(Ordering::Relaxed);
    let cpu0 = procfs::cpu(pid).unwrap_or_default();
    let t = Instant::now();
    server.command("churn 0").await?;
    while counters.responses.load(Ordering::Relaxed) < responses + args.streams as u64 {
        if t.elapsed() > Duration::from_secs(120) {
            bail!("not every stream received the endpoint change");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    println!(
        "one endpoint change fanned out to all {} streams in {:.1} ms (server CPU {:.0} ms)",
        args.streams,
        t.elapsed().as_secs_f64() * 1e3,
        (procfs::cpu(pid).unwrap_or_default().saturating_sub(cpu0)).as_secs_f64() * 1e3
    );
    let _ = server.command("quit").await;
    Ok(())
}

/// Scenario `churn`.
pub async fn churn(args: &XdsArgs) -> Result<()> {
    let endpoints_per_service = 10;
    let services = args.endpoints.div_ceil(endpoints_per_service).max(1);
    let server_args = ServerArgs {
        routes: services * 2,
        services,
        endpoints: endpoints_per_service,
    };
    println!(
        "\n== churn: {} endpoints ({} Services × {}), one endpoint changes per step, {} steps ==",
        services * endpoints_per_service,
        services,
        endpoints_per_service,
        args.churn_steps
    );
    println!(
        "method: xDS server process as in `streams`, one delta and one state-of-the-world \
         client; each step changes one endpoint of one Service's EndpointSlice and runs the \
         agent's store pass; per step: resources and bytes each client received (until its \
         ACK), server CPU time (utime+stime from /proc/PID/stat, 10 ms ticks, so the mean \
         over all steps)"
    );
    let mut server = ServerProc::start(&server_args).await?;
    let pid = server.pid()?;
    let mut per_proto = Vec::new();
    for proto in [Proto::Delta, Proto::Sotw] {
        let counters = Arc::new(Counters::default());
        spawn_client(
            proto,
            connect(&server.addr).await?,
            format!("churn-{proto:?}"),
            counters.clone(),
        );
        let t = Instant::now();
        while counters.synced.load(Ordering::Relaxed) < 1 {
            if t.elapsed() > Duration::from_secs(60) {
                bail!("{proto:?} client did not sync");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        per_proto.push((proto, counters));
    }
    // Let the initial pushes and ACKs finish.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu0 = procfs::cpu(pid).unwrap_or_default();
    let mut step_times = Vec::new();
    let mut stats: Vec<(u64, u64, u64)> = vec![(0, 0, 0); per_proto.len()];
    let offset = 1; // step 0 was not used; keep churn addresses fresh
    for step in 0..args.churn_steps {
        let before: Vec<(u64, u64, u64)> = per_proto
            .iter()
            .map(|(_, c)| {
                (
                    c.responses.load(Ordering::Relaxed),
                    c.resources.load(Ordering::Relaxed),
                    c.bytes.load(Ordering::Relaxed),
                )
            })
            .collect();
        let t = Instant::now();
        server.command(&format!("churn {}", step + offset)).await?;
        // Every client gets exactly one endpoints response per step.
        for ((_, c), b) in per_proto.iter().zip(&before) {
            while c.responses.load(Ordering::Relaxed) <= b.0 {
                if t.elapsed() > Duration::from_secs(10) {
                    bail!("a client received nothing for churn step {step}");
                }
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        }
        step_times.push(t.elapsed());
        for (i, ((_, c), b)) in per_proto.iter().zip(&before).enumerate() {
            stats[i].0 += c.responses.load(Ordering::Relaxed) - b.0;
            stats[i].1 += c.resources.load(Ordering::Relaxed) - b.1;
            stats[i].2 += c.bytes.load(Ordering::Relaxed) - b.2;
        }
    }
    let cpu = procfs::cpu(pid).unwrap_or_default().saturating_sub(cpu0);
    let steps = args.churn_steps.max(1) as u64;
    println!(
        "snapshot: {} resources, {:.1} KiB encoded",
        server.resources,
        server.bytes as f64 / 1024.0
    );
    for ((proto, _), (responses, resources, bytes)) in per_proto.iter().zip(&stats) {
        println!(
            "{proto:?} client: per step {:.2} responses, {:.2} resources, {:.0} bytes \
             ({:.3}% of the snapshot's bytes)",
            *responses as f64 / steps as f64,
            *resources as f64 / steps as f64,
            *bytes as f64 / steps as f64,
            100.0 * (*bytes as f64 / steps as f64) / server.bytes.max(1) as f64
        );
    }
    println!(
        "server CPU: {:.2} ms per step ({:.0} ms over {} steps, both clients connected)",
        cpu.as_secs_f64() * 1e3 / steps as f64,
        cpu.as_secs_f64() * 1e3,
        steps
    );
    println!(
        "change → both clients received it: {}",
        summary(&step_times)
    );
    let _ = server.command("quit").await;
    Ok(())
}
