//! Scenarios against a real `membrane up` with a real Envoy: apply → first
//! 200, and the control plane's resident memory.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hyper::Method;
use membrane_agent::bench::Workload;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Mode, XdsArgs, procfs, summary};
use crate::client::ApiClient;

/// Echo "pods" the Services' endpoints point at (`127.1.0.1-4`, port
/// `--echo-port`).
const ECHO_PODS: usize = 4;

fn echo_ip(service: usize, endpoint: usize) -> String {
    format!("127.1.0.{}", (service + endpoint) % ECHO_PODS + 1)
}

fn workload(args: &XdsArgs, routes: usize, paths: usize, mode: Mode) -> Workload {
    let paths = paths.max(1);
    let ingresses = routes.div_ceil(paths).max(1);
    Workload {
        ingresses,
        paths,
        services: ingresses,
        endpoints: 1,
        shared: mode == Mode::Shared,
        namespace: "bench".into(),
        target_port: args.echo_port,
    }
}

/// A `membrane up` started for the benchmark; stopped (by PID) on drop.
struct Live {
    child: Child,
    dir: PathBuf,
    api: ApiClient,
}

impl Live {
    async fn start(args: &XdsArgs, w: &Workload) -> Result<Live> {
        let dir = std::env::temp_dir().join(format!("membrane-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let manifests = dir.join("manifests");
        std::fs::create_dir_all(&manifests)?;
        let docs: Vec<String> = w
            .objects(&echo_ip)
            .iter()
            .map(serde_json::to_string)
            .collect::<Result<_, _>>()?;
        std::fs::write(manifests.join("workload.yaml"), docs.join("\n---\n"))?;
        let api = dir.join("api.sock");
        let log = std::fs::File::create(dir.join("membrane.log"))?;
        let exe = std::env::current_exe().context("locating the membrane binary")?;
        let mut cmd = Command::new(exe);
        cmd.arg("--api-socket")
            .arg(&api)
            .arg("up")
            .arg(&manifests)
            .arg("--run-dir")
            .arg(dir.join("run"))
            .args(["--envoy-admin-port", "0", "--lb-pool", &args.lb_pool])
            .args(["--http-port", &args.http_port.to_string()])
            .args(["--https-port", &(args.http_port + 1).to_string()])
            // MEMBRANE_BENCH_LOG=membrane_agent=debug shows where passes spend time.
            .env(
                "MEMBRANE_LOG",
                std::env::var("MEMBRANE_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(bin) = &args.envoy_bin {
            cmd.arg("--envoy-bin").arg(bin);
        }
        let child = cmd.spawn().context("starting membrane up")?;
        Ok(Live {
            child,
            api: ApiClient::new(&api),
            dir,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("membrane.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Ingress name → status address, for those that have one.
    async fn ingress_ips(&self, ns: &str) -> Result<BTreeMap<String, String>> {
        let v = self
            .api
            .ok(
                Method::GET,
                &format!("/v1/objects/ingress?namespace={ns}"),
                None,
            )
            .await?;
        Ok(v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| {
                let name = i.pointer("/metadata/name")?.as_str()?.to_owned();
                let ip = i
                    .pointer("/status/loadBalancer/ingress/0/ip")?
                    .as_str()?
                    .to_owned();
                Some((name, ip))
            })
            .collect())
    }

    /// Waits until every Ingress has its address, i.e. Envoy ACKed all of
    /// its resources. Returns the addresses and how long that took.
    async fn wait_ready(
        &self,
        w: &Workload,
        limit: Duration,
    ) -> Result<(BTreeMap<String, String>, Duration)> {
        let start = Instant::now();
        loop {
            if let Ok(ips) = self.ingress_ips(&w.namespace).await
                && ips.len() >= w.ingresses
            {
                return Ok((ips, start.elapsed()));
            }
            if start.elapsed() > limit {
                bail!(
                    "membrane up did not serve every Ingress within {limit:?}; log tail:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Live {
    /// Removes the run directory, unless a debug log was asked for: then the
    /// log is what the run is for, and its path is printed.
    fn clean_up(&self) {
        if std::env::var_os("MEMBRANE_BENCH_LOG").is_some() {
            eprintln!(
                "membrane log kept: {}",
                self.dir.join("membrane.log").display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        // SAFETY: signalling our own child by PID; it stops Envoy on SIGTERM.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                self.clean_up();
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.clean_up();
    }
}

/// One HTTP/1.1 GET on a fresh connection, read up to Content-Length (not
/// EOF: Envoy delays closing after local replies by 1 s). Status and body.
async fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: bench.example\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]);
        let length = head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        });
        if length.is_some_and(|len| buf.len() - end - 4 >= len) {
            break;
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// 200 from an echo backend that saw `path`.
async fn served(addr: SocketAddr, path: &str) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(2), get(addr, path)).await,
        Ok(Ok((200, body))) if body.contains(path)
    )
}

async fn start_echo_pods(port: u16) -> Result<()> {
    for p in 1..=ECHO_PODS {
        let ip = format!("127.1.0.{p}");
        let listener = tokio::net::TcpListener::bind(format!("{ip}:{port}"))
            .await
            .with_context(|| format!("binding echo backend {ip}:{port}"))?;
        let id = membrane_conformance::echo::EchoIdentity {
            namespace: "bench".into(),
            ingress: "bench".into(),
            service: "echo".into(),
            pod: format!("echo-{p}"),
        };
        tokio::spawn(membrane_conformance::echo::serve(
            listener,
            id,
            std::future::pending(),
        ));
    }
    Ok(())
}

/// Scenario `apply`.
pub async fn apply(args: &XdsArgs) -> Result<()> {
    let w = workload(args, args.routes, args.paths, args.mode);
    println!(
        "\n== apply: one Ingress change → first 200 through Envoy, {} existing routes ({} Ingresses × {} paths, {:?} mode) ==",
        w.total_routes(),
        w.ingresses,
        w.paths,
        args.mode
    );
    println!(
        "method: real `membrane up` + Envoy (delta xDS); each change POSTs one Ingress with one \
         more path (to an existing Service) to /v1/apply; the clock runs from before the POST \
         until a GET of the new path (fresh connection per probe, 1 ms apart, read to \
         Content-Length) returns 200 from an in-process echo backend. 5 warm-up changes are not \
         counted; 300 ms pause between changes so status writes from the previous change are done."
    );
    start_echo_pods(args.echo_port).await?;
    let live = Live::start(args, &w).await?;
    let (ips, ready) = live.wait_ready(&w, Duration::from_secs(600)).await?;
    println!(
        "start-up: every Ingress served (address in status) after {:.1} s; membrane RSS {:.1} MiB",
        ready.as_secs_f64(),
        procfs::rss(live.pid()).map(procfs::mib).unwrap_or(0.0)
    );
    let mut extras: BTreeMap<usize, Vec<(String, usize)>> = BTreeMap::new();
    let mut samples = Vec::new();
    let mut api_times = Vec::new();
    let warmup = 5;
    for k in 0..args.changes + warmup {
        let i = (k * 37) % w.ingresses;
        let ip = ips
            .get(&w.ingress_name(i))
            .context("Ingress without address")?;
        let addr: SocketAddr = format!("{ip}:{}", args.http_port).parse()?;
        let path = Workload::extra_path(i, k);
        if served(addr, &path).await {
            bail!("{path} answered 200 before it was added");
        }
        let list = extras.entry(i).or_default();
        list.push((path.clone(), w.service_of(i, 0)));
        let body = serde_json::to_string(&w.ingress(i, list))?;
        let start = Instant::now();
        live.api
            .ok(Method::POST, "/v1/apply", Some(body))
            .await
            .context("POST /v1/apply")?;
        let api = start.elapsed();
        loop {
            if served(addr, &path).await {
                break;
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!(
                    "{path} on {addr} not served 30 s after apply; log tail:\n{}",
                    live.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let took = start.elapsed();
        if k >= warmup {
            samples.push(took);
            api_times.push(api);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    println!("apply → first 200:        {}", summary(&samples));
    println!("  of which POST /v1/apply: {}", summary(&api_times));
    println!(
        "membrane RSS after the changes: {:.1} MiB",
        procfs::rss(live.pid()).map(procfs::mib).unwrap_or(0.0)
    );
    Ok(())
}

/// Scenario `rss`.
pub async fn rss(args: &XdsArgs) -> Result<()> {
    println!("\n== rss: resident memory of the control plane ==");
    println!(
        "method: real `membrane up` + Envoy on a manifest directory with the workload; once \
         every Ingress has its address (Envoy ACKed everything), VmRSS and VmHWM of the \
         membrane process (not Envoy) from /proc/PID/status, after 2 s idle"
    );
    for &routes in &args.rss_routes {
        let w = workload(args, routes, args.paths, args.mode);
        let live = Live::start(args, &w).await?;
        let (_, ready) = live.wait_ready(&w, Duration::from_secs(1200)).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let pid = live.pid();
        println!(
            "{routes} routes ({} Ingresses × {} paths, {:?}): VmRSS {:.1} MiB, VmHWM {:.1} MiB, ready after {:.1} s, CPU {:.1} s",
            w.ingresses,
            w.paths,
            args.mode,
            procfs::rss(pid).map(procfs::mib).unwrap_or(0.0),
            procfs::hwm(pid).map(procfs::mib).unwrap_or(0.0),
            ready.as_secs_f64(),
            procfs::cpu(pid).map(|d| d.as_secs_f64()).unwrap_or(0.0),
        );
        drop(live);
    }
    Ok(())
}

/// Scenario `endpoints`.
pub async fn endpoints(args: &XdsArgs) -> Result<()> {
    let w = workload(args, args.services, 1, args.mode);
    println!(
        "\n== endpoints: one EndpointSlice change → Envoy sends to the new endpoint, {} Services \
         ({} Ingresses × 1 path, {:?} mode) ==",
        w.services, w.ingresses, args.mode
    );
    println!(
        "method: real `membrane up` + Envoy (delta xDS); each change POSTs one EndpointSlice that \
         moves its Service's only endpoint to another echo pod; the clock runs from before the \
         POST until a GET through Envoy (fresh connection per probe, 1 ms apart) is answered by \
         the new pod. 5 warm-up changes are not counted; 300 ms pause between changes."
    );
    start_echo_pods(args.echo_port).await?;
    let live = Live::start(args, &w).await?;
    let (ips, ready) = live.wait_ready(&w, Duration::from_secs(1200)).await?;
    println!(
        "start-up: every Ingress served (address in status) after {:.1} s; membrane RSS {:.1} MiB",
        ready.as_secs_f64(),
        procfs::rss(live.pid()).map(procfs::mib).unwrap_or(0.0)
    );
    // Service s currently points at pod `echo_ip(s, 0)`.
    let mut pod_of: BTreeMap<usize, usize> = BTreeMap::new();
    let mut samples = Vec::new();
    let mut api_times = Vec::new();
    let warmup = 5;
    for k in 0..args.changes + warmup {
        let i = (k * 7919) % w.ingresses;
        let s = w.service_of(i, 0);
        let ip = ips
            .get(&w.ingress_name(i))
            .context("Ingress without address")?;
        let addr: SocketAddr = format!("{ip}:{}", args.http_port).parse()?;
        let path = w.path(i, 0);
        let current = *pod_of.entry(s).or_insert_with(|| (s % ECHO_PODS) + 1);
        let next = current % ECHO_PODS + 1;
        let [_, slice] = w.service(s, &|_, _| format!("127.1.0.{next}"));
        let want = format!("echo-{next}\"");
        let start = Instant::now();
        live.api
            .ok(
                Method::POST,
                "/v1/apply",
                Some(serde_json::to_string(&slice)?),
            )
            .await
            .context("POST /v1/apply")?;
        let api = start.elapsed();
        loop {
            let answer = tokio::time::timeout(Duration::from_secs(2), get(addr, &path)).await;
            if matches!(&answer, Ok(Ok((200, body))) if body.contains(&want)) {
                break;
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!(
                    "{path} on {addr} not served by pod {next} 30 s after the change; last answer \
                     {answer:?}; log tail:\n{}",
                    live.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let took = start.elapsed();
        pod_of.insert(s, next);
        if k >= warmup {
            samples.push(took);
            api_times.push(api);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    println!(
        "EndpointSlice change → new endpoint answers: {}",
        summary(&samples)
    );
    println!(
        "  of which POST /v1/apply:                 {}",
        summary(&api_times)
    );
    println!(
        "membrane RSS after the changes: {:.1} MiB",
        procfs::rss(live.pid()).map(procfs::mib).unwrap_or(0.0)
    );
    Ok(())
}
