//! Scenarios against a real `membrane up` with a real Envoy: apply → first
//! 200, and the control plane's resident memory.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

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
        let mut filter = std::env::var("MEMBRANE_BENCH_LOG").unwrap_or_else(|_| "warn".into());
        if args.timeline {
            filter.push_str(TIMELINE_LOG);
        }
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
            .env("MEMBRANE_LOG", filter)
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
/// The pause between two probes. Tokio's timer ticks in whole
/// milliseconds (a 1 ms sleep lasted ≈ 2.2 ms here, which alone added up to
/// 2 ms to a measured change), so the gap is slept on a blocking thread,
/// whose sleep has microsecond precision.
const PROBE_GAP: Duration = Duration::from_micros(200);

async fn probe_gap() {
    // A failed join only means the runtime is shutting down.
    let _ = tokio::task::spawn_blocking(|| std::thread::sleep(PROBE_GAP)).await;
}

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
         until a GET of the new path (fresh connection per probe, 0.2 ms apart, read to \
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
    // Per counted change: Ingress name, POST sent, first 200 (wall clock,
    // the log's clock).
    let mut windows: Vec<(String, SystemTime, SystemTime)> = Vec::new();
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
        let wall = SystemTime::now();
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
            probe_gap().await;
        }
        let took = start.elapsed();
        if k >= warmup {
            samples.push(took);
            api_times.push(api);
            windows.push((w.ingress_name(i), wall, wall + took));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    println!("apply → first 200:        {}", summary(&samples));
    println!("  of which POST /v1/apply: {}", summary(&api_times));
    if args.timeline {
        let log = std::fs::read_to_string(live.dir.join("membrane.log")).unwrap_or_default();
        print_timeline(&timeline::events(&log), &windows, &INGRESS_STEPS);
    }
    println!(
        "membrane RSS after the changes: {:.1} MiB",
        procfs::rss(live.pid()).map(procfs::mib).unwrap_or(0.0)
    );
    Ok(())
}

/// Log filters for `--timeline`: the agent's timeline events, the API's
/// commits, the xDS server's responses and the requests answering them.
const TIMELINE_LOG: &str = ",membrane_timeline=debug,membrane_apiserver::store=debug,membrane_xds::cache=debug,membrane_xds::server=trace";

/// The steps of one change, in order: each is the first matching event
/// after the previous step (the POST for the first).
/// The steps of an Ingress change (`apply`). (The controller's CEC write
/// is committed while its pass goes on: the pass's own time is
/// `operator_ms` in the agent's debug log.)
const INGRESS_STEPS: [(&str, timeline::Step); 8] = [
    (
        "Ingress committed by the API",
        timeline::Step::IngressCommit,
    ),
    (
        "agent pass starts on the Ingress",
        timeline::Step::PassStart,
    ),
    ("CEC committed by the API", timeline::Step::CecCommit),
    ("pipeline starts on the CEC", timeline::Step::PipelineStart),
    ("snapshot published", timeline::Step::Published),
    ("first xDS response sent", timeline::Step::Sent),
    ("first ACK from Envoy", timeline::Step::Ack),
    ("agent finds the CEC ACKed", timeline::Step::Acked),
];

/// The steps of an EndpointSlice change (`endpoints`).
const SLICE_STEPS: [(&str, timeline::Step); 4] = [
    (
        "EndpointSlice committed by the API",
        timeline::Step::SliceCommit,
    ),
    ("snapshot published", timeline::Step::Published),
    ("first xDS response sent", timeline::Step::Sent),
    ("first ACK from Envoy", timeline::Step::Ack),
];

fn print_timeline(
    events: &[timeline::Event],
    windows: &[(String, SystemTime, SystemTime)],
    steps: &[(&str, timeline::Step)],
) {
    use timeline::Step;
    let mut segments: Vec<Vec<Duration>> = vec![Vec::new(); steps.len() + 1];
    let mut to_200 = Vec::new();
    // POST sent → the last step, for the changes that reached it.
    let mut whole = Vec::new();
    for (ingress, start, end) in windows {
        let mut at = *start;
        let mut sent = None;
        for (j, (_, step)) in steps.iter().enumerate() {
            let found = events
                .iter()
                .find(|e| e.at >= at && step.matches(e, ingress));
            let Some(e) = found else {
                break;
            };
            if let Ok(d) = e.at.duration_since(at) {
                segments[j].push(d);
            }
            at = e.at;
            if *step == Step::Sent {
                sent = Some(e.at);
            }
            if j + 1 == steps.len()
                && let Ok(d) = e.at.duration_since(*start)
            {
                whole.push(d);
            }
        }
        if let Some(sent) = sent
            && let Ok(d) = end.duration_since(sent)
        {
            to_200.push(d);
        }
    }
    println!(
        "timeline (each step from the one before; p50, p90 over the changes that reached it):"
    );
    let mut from = "POST sent";
    for (j, (name, _)) in steps.iter().enumerate() {
        let v = &segments[j];
        if v.is_empty() {
            println!("  {from:>34} → {name:<34} (not seen)");
        } else {
            let q = |p: f64| membrane_agent::bench::quantile(&mut v.clone(), p).as_secs_f64() * 1e3;
            println!(
                "  {from:>34} → {name:<34} p50 {:7.2} ms  p90 {:7.2} ms  (n={})",
                q(0.5),
                q(0.9),
                v.len()
            );
        }
        from = name;
    }
    if !to_200.is_empty() {
        let q =
            |p: f64| membrane_agent::bench::quantile(&mut to_200.clone(), p).as_secs_f64() * 1e3;
        println!(
            "  {:>34} → {:<34} p50 {:7.2} ms  p90 {:7.2} ms  (n={})",
            "first xDS response sent",
            "first 200",
            q(0.5),
            q(0.9),
            to_200.len()
        );
    }
    if let (false, Some((last, _))) = (whole.is_empty(), steps.last()) {
        let q = |p: f64| membrane_agent::bench::quantile(&mut whole.clone(), p).as_secs_f64() * 1e3;
        println!(
            "  whole path: {:>22} → {:<34} p50 {:7.2} ms  p90 {:7.2} ms  (n={})",
            "POST sent",
            last,
            q(0.5),
            q(0.9),
            whole.len()
        );
    }
}

/// The `membrane up` log read back for `--timeline`.
mod timeline {
    use std::time::SystemTime;

    #[derive(Debug)]
    pub struct Event {
        pub at: SystemTime,
        /// The line without its timestamp and colours.
        pub text: String,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Step {
        IngressCommit,
        SliceCommit,
        PassStart,
        CecCommit,
        PipelineStart,
        Published,
        Sent,
        Ack,
        Acked,
    }

    impl Step {
        /// `ingress`: the name of the changed object (Ingress or EndpointSlice).
        pub fn matches(self, e: &Event, ingress: &str) -> bool {
            let t = e.text.as_str();
            let key = field(t, "key").unwrap_or_default();
            let keys = field(t, "keys").unwrap_or_default();
            let cec = format!("-{ingress}");
            match self {
                Step::IngressCommit => {
                    t.contains(" commit")
                        && key.contains("/ingresses/")
                        && key.ends_with(&format!("/{ingress}"))
                }
                Step::SliceCommit => {
                    t.contains(" commit")
                        && key.contains("/endpointslices/")
                        && key.ends_with(&format!("/{ingress}"))
                }
                Step::PassStart => {
                    t.contains("membrane_timeline: pass start")
                        && keys.split(',').any(|k| k.ends_with(&format!("/{ingress}")))
                }
                Step::CecCommit => {
                    t.contains(" commit")
                        && key.contains("/ciliumenvoyconfigs/")
                        && key.ends_with(&cec)
                }
                Step::PipelineStart => {
                    t.contains("membrane_timeline: pipeline start")
                        && keys.split(',').any(|k| k.ends_with(&cec))
                }
                Step::Published => t.contains("membrane_timeline: published"),
                Step::Sent => t.contains("xds: sending"),
                Step::Ack => t.contains("xds: request") && t.contains("kind=Ack"),
                Step::Acked => {
                    t.contains("membrane_timeline: acked")
                        && keys.split(',').any(|k| k.ends_with(&cec))
                }
            }
        }
    }

    /// `name=value` or `name="value"`.
    fn field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
        let at = text.find(&format!(" {name}="))? + name.len() + 2;
        let rest = &text[at..];
        match rest.strip_prefix('"') {
            Some(quoted) => quoted.split('"').next(),
            None => rest.split(' ').next(),
        }
    }

    fn strip_ansi(line: &str) -> String {
        let mut out = String::with_capacity(line.len());
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                // ESC [ ... final byte in @..~
                for d in chars.by_ref() {
                    if ('@'..='~').contains(&d) && d != '[' {
                        break;
                    }
                }
                continue;
            }
            out.push(c);
        }
        out
    }

    pub fn events(log: &str) -> Vec<Event> {
        log.lines()
            .filter_map(|l| {
                let l = strip_ansi(l);
                let (ts, rest) = l.split_once(' ')?;
                let at = humantime::parse_rfc3339_weak(ts.trim()).ok()?;
                Some(Event {
                    at,
                    text: format!(" {}", rest.trim()),
                })
            })
            .collect()
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// Lines as `membrane up` writes them (colours included) are read
        /// back with their time and matched to the change's objects only.
        #[test]
        fn log_lines_match_the_steps_of_their_change() {
            let log = "\u{1b}[2m2026-12-02T06:49:11.170823Z\u{1b}[0m \u{1b}[34mDEBUG\u{1b}[0m \u{1b}[2mmembrane_apiserver::store\u{1b}[0m\u{1b}[2m:\u{1b}[0m commit \u{1b}[3mkey\u{1b}[0m\u{1b}[2m=\u{1b}[0m\"networking.k8s.io/ingresses/bench/ing-210\" rv=2573\n\
                       2026-12-02T06:49:11.175413Z DEBUG membrane_timeline: pipeline start keys=\"CiliumEnvoyConfig bench/cilium-ingress-bench-ing-210,CiliumEnvoyConfig bench/x\"\n\
                       not a log line\n";
            let ev = events(log);
            assert_eq!(ev.len(), 2);
            assert!(ev[0].at < ev[1].at);
            assert!(Step::IngressCommit.matches(&ev[0], "ing-210"));
            assert!(!Step::IngressCommit.matches(&ev[0], "ing-21"));
            assert!(Step::PipelineStart.matches(&ev[1], "ing-210"));
            assert!(!Step::PipelineStart.matches(&ev[1], "ing-10"));
            assert!(!Step::CecCommit.matches(&ev[0], "ing-210"));
        }
    }
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
         POST until a GET through Envoy (fresh connection per probe, 0.2 ms apart) is answered by \
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
    let mut windows: Vec<(String, SystemTime, SystemTime)> = Vec::new();
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
        let slice_name = slice["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let wall = SystemTime::now();
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
            probe_gap().await;
        }
        let took = start.elapsed();
        pod_of.insert(s, next);
        if k >= warmup {
            samples.push(took);
            api_times.push(api);
            windows.push((slice_name, wall, wall + took));
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
    if args.timeline {
        let log = std::fs::read_to_string(live.dir.join("membrane.log")).unwrap_or_default();
        print_timeline(&timeline::events(&log), &windows, &SLICE_STEPS);
    }
    println!(
        "membrane RSS after the changes: {:.1} MiB",
        procfs::rss(live.pid()).map(procfs::mib).unwrap_or(0.0)
    );
    Ok(())
}
