//! Kubernetes mode end to end, every role its own process: `membrane
//! apiserver`, two `membrane operator`s (leader-elected) and two `membrane
//! agent`s (node labels role=a / role=b, each with its own Envoy, run
//! directory and admin port). kubectl is the client.
//!
//! - a CEC with `nodeSelector: {role: a}` is served by node a's Envoy only;
//! - an Ingress gets its address only once both agents report an ACK of
//!   its CEC's current generation, and is served at that address at once;
//! - SIGKILL of the leading operator hands the Lease over within the lease
//!   time, and status keeps being written (a second Ingress gets an address);
//! - a TLS Ingress's Secret is synced into cilium-secrets;
//! - deleting an Ingress removes its CEC, Service and EndpointSlice;
//! - `kubectl describe` of a bad Ingress shows a Warning Event naming the field,
//!   and of a CEC an agent rejected one naming the node;
//! - relabelling a Node moves the CECs its agent serves;
//! - an agent stopped with SIGTERM withdraws its ProxyNodeStatus, and a
//!   deleted Node's report is garbage-collected.
//!
//! Ports 20000-20999 and addresses in 127.20.0.0/16 only.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
mod kubectl_support;

use common::{
    Backends, INGRESS_CLASS, envoy_bin, http_get, ingress_yaml, require_envoy, service_yaml,
    stop_child, wait_until,
};
use kubectl_support::{ApiServer, BIN};

const API_PORT: u16 = 20001;
const HTTP_PORT: u16 = 20080;
const HTTPS_PORT: u16 = 20443;
const POOL: &str = "127.20.0.0/24";
const BACKEND_IP: &str = "127.20.200.1";
const NODE_A_ONLY: &str = "127.20.1.200:20081";
/// Short leases so the handover is quick; the same code paths as Cilium's
/// 15 s / 10 s / 2 s defaults.
const LEASE: Duration = Duration::from_secs(4);
const RETRY: Duration = Duration::from_millis(500);

/// A role process, killed by PID on drop.
struct Role {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Role {
    fn spawn(name: &str, dir: &Path, args: &[String]) -> Role {
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(BIN)
            .args(args)
            .env("MEMBRANE_LOG", "info,membrane_k8s=debug")
            .stdin(Stdio::null())
            .stdout(
                std::fs::File::create(dir.join(format!("{name}.out")))
                    .map(Stdio::from)
                    .expect("stdout"),
            )
            .stderr(std::fs::File::create(&log).map(Stdio::from).expect("log"))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Role {
            name: name.to_owned(),
            child: Some(child),
            log,
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or_default()
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c);
        }
    }

    fn kill_hard(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGKILL by PID: no chance to release the Lease.
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        format!(
            "---- {} ----\n{}",
            self.name,
            std::fs::read_to_string(&self.log).unwrap_or_default()
        )
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c);
        }
    }
}

/// Agents share this machine's loopback, so each gets its own proxy ports
/// (in a cluster every node has its own).
fn agent(
    api: &ApiServer,
    dir: &Path,
    node: &str,
    labels: &str,
    admin_port: u16,
    proxy_ports: &str,
) -> Role {
    let run = dir.join(node);
    std::fs::create_dir_all(&run).expect("run dir");
    let args: Vec<String> = [
        "agent",
        "--api-socket",
        &run.join("api.sock").display().to_string(),
        "--kubeconfig",
        &api.kubeconfig.display().to_string(),
        "--node-name",
        node,
        "--node-labels",
        labels,
        "--run-dir",
        &run.display().to_string(),
        "--envoy-bin",
        &envoy_bin().display().to_string(),
        "--envoy-admin-port",
        &admin_port.to_string(),
        "--lb-pool",
        POOL,
        "--http-port",
        &HTTP_PORT.to_string(),
        "--https-port",
        &HTTPS_PORT.to_string(),
        "--proxy-ports",
        proxy_ports,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Role::spawn(node, dir, &args)
}

fn operator(api: &ApiServer, dir: &Path, identity: &str) -> Role {
    let args: Vec<String> = [
        "operator",
        "--kubeconfig",
        &api.kubeconfig.display().to_string(),
        "--identity",
        identity,
        "--lb-pool",
        POOL,
        "--leader-election-lease-duration",
        &format!("{}s", LEASE.as_secs()),
        "--leader-election-renew-deadline",
        "3s",
        "--leader-election-retry-period",
        &format!("{}ms", RETRY.as_millis()),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Role::spawn(identity, dir, &args)
}

fn logs(roles: &[&Role], api: &ApiServer) -> String {
    let mut out: String = roles.iter().map(|r| r.log()).collect::<Vec<_>>().join("\n");
    let api_log = api.log();
    let tail: Vec<&str> = api_log.lines().rev().take(40).collect();
    out.push_str("\n---- apiserver (tail) ----\n");
    out.push_str(&tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
    out
}

fn get(api: &ApiServer, args: &[&str]) -> Option<String> {
    let out = api.kubectl(args);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn ingress_ip(api: &ApiServer, name: &str) -> Option<String> {
    get(
        api,
        &[
            "get",
            "ingress",
            name,
            "-o",
            "jsonpath={.status.loadBalancer.ingress[0].ip}",
        ],
    )
    .filter(|s| !s.is_empty())
}

/// Every entry of node `node`'s report (spread over the objects labelled
/// with the node).
fn report_entries(api: &ApiServer, node: &str) -> Vec<serde_json::Value> {
    let selector = format!("membrane.io/node={node}");
    let json = get(
        api,
        &["get", "proxynodestatus", "-l", &selector, "-o", "json"],
    );
    let v: serde_json::Value = json
        .and_then(|j| serde_json::from_str(&j).ok())
        .unwrap_or_default();
    v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|item| {
            item["status"]["configs"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect()
}

/// How many report objects node `node` has; `None` when the API does not
/// answer.
fn report_objects(api: &ApiServer, node: &str) -> Option<usize> {
    let selector = format!("membrane.io/node={node}");
    let json = get(
        api,
        &["get", "proxynodestatus", "-l", &selector, "-o", "json"],
    )?;
    let v: serde_json::Value = serde_json::from_str(&json).ok()?;
    Some(v["items"].as_array()?.len())
}

/// The state node `node` reports for a CEC, with the generation it is about.
fn reported(api: &ApiServer, node: &str, cec: &str) -> Option<(String, i64)> {
    report_entries(api, node)
        .into_iter()
        .find(|c| c["name"] == cec)
        .map(|c| {
            (
                c["state"].as_str().unwrap_or_default().to_owned(),
                c["generation"].as_i64().unwrap_or(-1),
            )
        })
}

fn generation(api: &ApiServer, kind: &str, name: &str) -> Option<i64> {
    get(
        api,
        &["get", kind, name, "-o", "jsonpath={.metadata.generation}"],
    )?
    .parse()
    .ok()
}

fn lease_holder(api: &ApiServer) -> Option<String> {
    get(
        api,
        &[
            "get",
            "lease",
            "-n",
            "kube-system",
            "cilium-operator-resource-lock",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ],
    )
    .filter(|s| !s.is_empty())
}

fn exists(api: &ApiServer, kind: &str, name: &str) -> bool {
    api.kubectl(&["get", kind, name]).status.success()
}

fn exists_in(api: &ApiServer, namespace: &str, kind: &str, name: &str) -> bool {
    api.kubectl(&["get", "-n", namespace, kind, name])
        .status
        .success()
}

fn admin_listeners(port: u16) -> String {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    http_get(addr, "admin", "/listeners")
        .map(|(_, b)| b)
        .unwrap_or_default()
}

#[test]
fn operator_and_agents_as_separate_processes() {
    require_envoy();
    let api = ApiServer::start(API_PORT);
    let dir = tempfile::tempdir().expect("tempdir");
    let backends = Backends::new();
    backends.start(BACKEND_IP, "echo");
    api.ok_stdin(&["apply", "-f", "-"], INGRESS_CLASS);
    api.ok_stdin(
        &["apply", "-f", "-"],
        &service_yaml("echo", 80, None, BACKEND_IP),
    );

    let node_a = agent(&api, dir.path(), "node-a", "role=a", 20901, "20100-20199");
    let node_b = agent(&api, dir.path(), "node-b", "role=b", 20902, "20200-20299");
    let mut op1 = operator(&api, dir.path(), "op-1");
    let mut op2 = operator(&api, dir.path(), "op-2");
    let all = |extra: &[&Role]| {
        let mut v: Vec<&Role> = vec![&node_a, &node_b];
        v.extend_from_slice(extra);
        logs(&v, &api)
    };

    // The agents registered their Nodes with the labels they were given.
    let labelled = wait_until(Duration::from_secs(60), || {
        get(
            &api,
            &[
                "get",
                "node",
                "node-a",
                "-o",
                "jsonpath={.metadata.labels.role}",
            ],
        )
        .as_deref()
            == Some("a")
            && get(
                &api,
                &[
                    "get",
                    "node",
                    "node-b",
                    "-o",
                    "jsonpath={.metadata.labels.role}",
                ],
            )
            .as_deref()
                == Some("b")
    });
    assert!(labelled, "Nodes not registered\n{}", all(&[&op1, &op2]));

    // A CEC for role=a nodes only: node a serves it, node b does not.
    api.ok_stdin(
        &["apply", "-f", "-"],
        &format!(
            r#"apiVersion: cilium.io/v2
kind: CiliumEnvoyConfig
metadata: {{name: only-a, namespace: default}}
spec:
  nodeSelector: {{matchLabels: {{role: a}}}}
  resources:
  - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
    name: direct
    address: {{socketAddress: {{address: {ip}, portValue: {port}}}}}
    filterChains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typedConfig:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          statPrefix: direct
          routeConfig:
            virtualHosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: /}}
                directResponse: {{status: 200, body: {{inlineString: served-by-a}}}}
          httpFilters:
          - name: envoy.filters.http.router
            typedConfig: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
"#,
            ip = NODE_A_ONLY.split(':').next().unwrap_or_default(),
            port = NODE_A_ONLY.split(':').nth(1).unwrap_or_default(),
        ),
    );
    let addr: SocketAddr = NODE_A_ONLY.parse().expect("addr");
    let served = wait_until(
        Duration::from_secs(60),
        || matches!(http_get(addr, "x", "/"), Ok((200, body)) if body == "served-by-a"),
    );
    assert!(served, "CEC only-a not served\n{}", all(&[&op1, &op2]));
    let gen_a = generation(&api, "cec", "only-a").expect("generation");
    let acked = wait_until(Duration::from_secs(30), || {
        reported(&api, "node-a", "only-a") == Some(("Acked".into(), gen_a))
    });
    assert!(acked, "node-a does not report only-a ACKed\n{}", all(&[]));
    assert!(
        admin_listeners(20901).contains("only-a/direct"),
        "{}",
        admin_listeners(20901)
    );
    assert!(
        !admin_listeners(20902).contains("only-a/direct"),
        "node b serves only-a:\n{}",
        admin_listeners(20902)
    );
    assert_eq!(
        reported(&api, "node-b", "only-a"),
        None,
        "node b reports a CEC it does not select"
    );

    // An Ingress: its address appears only after both agents ACKed, and is
    // served the moment it appears.
    api.ok_stdin(
        &["apply", "-f", "-"],
        &ingress_yaml("web", &[("/", "echo", 80)]),
    );
    let mut ip = None;
    let appeared = wait_until(Duration::from_secs(60), || {
        ip = ingress_ip(&api, "web");
        ip.is_some()
    });
    assert!(
        appeared,
        "Ingress web got no address\n{}",
        all(&[&op1, &op2])
    );
    let ip = ip.unwrap_or_default();
    let at: SocketAddr = format!("{ip}:{HTTP_PORT}")
        .parse()
        .expect("ingress address");
    let first = http_get(at, "web.example", "/");
    assert!(
        matches!(&first, Ok((200, _))),
        "address written before it serves: {first:?}\n{}",
        all(&[&op1, &op2])
    );
    let cec = "cilium-ingress-default-web";
    let gen_web = generation(&api, "cec", cec).expect("generation of the generated CEC");
    for node in ["node-a", "node-b"] {
        assert_eq!(
            reported(&api, node, cec),
            Some(("Acked".into(), gen_web)),
            "{node}"
        );
    }
    // Generated objects are owned by the Ingress and managed by the operator.
    let owners = get(
        &api,
        &[
            "get",
            "cec",
            cec,
            "-o",
            "jsonpath={.metadata.ownerReferences[0].kind}/{.metadata.ownerReferences[0].name}",
        ],
    );
    assert_eq!(owners.as_deref(), Some("Ingress/web"));
    let managers = get(
        &api,
        &[
            "get",
            "svc",
            "cilium-ingress-web",
            "-o",
            "jsonpath={.metadata.managedFields[*].manager}",
        ],
    )
    .unwrap_or_default();
    assert!(
        managers.contains("membrane-operator"),
        "managers: {managers}"
    );

    // TLS: the operator copies the Secret into cilium-secrets for SDS, and
    // the Ingress gets its address once both agents ACKed the TLS chain.
    api.ok(&["create", "namespace", "cilium-secrets"]);
    let (crt, key) = membrane_certs::self_signed(&["tls.example"]).expect("certificate");
    let (crt_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&crt_path, crt).expect("write cert");
    std::fs::write(&key_path, key).expect("write key");
    api.ok(&[
        "create",
        "secret",
        "tls",
        "web-tls",
        "--cert",
        crt_path.to_str().unwrap_or_default(),
        "--key",
        key_path.to_str().unwrap_or_default(),
    ]);
    api.ok_stdin(
        &["apply", "-f", "-"],
        r#"apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: secure, namespace: default}
spec:
  ingressClassName: cilium
  tls: [{hosts: [tls.example], secretName: web-tls}]
  rules:
  - host: tls.example
    http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: echo, port: {number: 80}}}}
"#,
    );
    let synced = wait_until(Duration::from_secs(60), || {
        exists_in(&api, "cilium-secrets", "secret", "default-web-tls")
            && ingress_ip(&api, "secure").is_some()
    });
    assert!(
        synced,
        "TLS Secret not synced or Ingress secure not addressed\n{}",
        all(&[&op1, &op2])
    );

    // Failover: SIGKILL the leader; the other takes the Lease within the
    // lease time (plus retry and polling slack) and keeps writing status.
    let leader = lease_holder(&api).expect("a leader holds the Lease");
    let (dead, survivor) = if leader == "op-1" {
        (&mut op1, "op-2")
    } else {
        (&mut op2, "op-1")
    };
    eprintln!("leader {leader} (pid {}) killed", dead.pid());
    dead.kill_hard();
    let killed = Instant::now();
    let killed_at = k8s_openapi::jiff::Timestamp::now();
    api.ok_stdin(
        &["apply", "-f", "-"],
        &ingress_yaml("second", &[("/", "echo", 80)]),
    );
    let handed_over = wait_until(LEASE * 3, || {
        lease_holder(&api).as_deref() == Some(survivor)
    });
    assert!(
        handed_over,
        "no handover to {survivor}\n{}",
        all(&[&op1, &op2])
    );
    // When the survivor took the Lease, by the Lease's own acquireTime: at
    // most the lease duration after the kill, plus one retry period for the
    // candidate to notice (and one of slack).
    let acquired = get(
        &api,
        &[
            "get",
            "lease",
            "-n",
            "kube-system",
            "cilium-operator-resource-lock",
            "-o",
            "jsonpath={.spec.acquireTime}",
        ],
    )
    .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
    .expect("acquireTime");
    let handover = Duration::try_from(acquired.duration_since(killed_at)).unwrap_or_default();
    eprintln!(
        "handover to {survivor} {handover:?} after the kill (lease {LEASE:?}, retry {RETRY:?}); seen by kubectl after {:?}",
        killed.elapsed()
    );
    assert!(handover <= LEASE + RETRY * 2, "handover took {handover:?}");
    let second = wait_until(Duration::from_secs(60), || {
        ingress_ip(&api, "second").is_some()
    });
    assert!(
        second,
        "Ingress second got no address after failover\n{}",
        all(&[&op1, &op2])
    );

    // A leader stopped cleanly (SIGTERM) releases the Lease: a third
    // operator takes over at its next attempt, not a lease duration later.
    let op3 = operator(&api, dir.path(), "op-3");
    let campaigning = wait_until(Duration::from_secs(30), || {
        op3.log().contains("operator: caches synced")
    });
    assert!(campaigning, "op-3 did not start\n{}", op3.log());
    let leader_role = if survivor == "op-1" {
        &mut op1
    } else {
        &mut op2
    };
    let stopped_at = k8s_openapi::jiff::Timestamp::now();
    leader_role.stop();
    let released = wait_until(LEASE * 2, || lease_holder(&api).as_deref() == Some("op-3"));
    assert!(
        released,
        "op-3 never took over\n{}",
        all(&[&op1, &op2, &op3])
    );
    let acquired = get(
        &api,
        &[
            "get",
            "lease",
            "-n",
            "kube-system",
            "cilium-operator-resource-lock",
            "-o",
            "jsonpath={.spec.acquireTime}",
        ],
    )
    .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
    .expect("acquireTime");
    let clean_handover =
        Duration::try_from(acquired.duration_since(stopped_at)).unwrap_or_default();
    eprintln!("clean handover to op-3 {clean_handover:?} after SIGTERM");
    assert!(
        clean_handover < LEASE / 2,
        "the Lease was not released: handover took {clean_handover:?}"
    );

    // Deleting the Ingress removes what was generated for it.
    api.ok(&["delete", "ingress", "web"]);
    let gone = wait_until(Duration::from_secs(60), || {
        !exists(&api, "cec", cec)
            && !exists(&api, "svc", "cilium-ingress-web")
            && !exists(&api, "endpointslice", "cilium-ingress-web")
    });
    assert!(
        gone,
        "generated objects of web remain\n{}",
        all(&[&op1, &op2])
    );
    assert!(exists(&api, "cec", "cilium-ingress-default-second"));

    // A bad Ingress: a Warning Event on it names the field.
    api.ok_stdin(
        &["apply", "-f", "-"],
        &ingress_yaml("bad", &[("/", "missing", 80)]),
    );
    let mut described = String::new();
    let warned = wait_until(Duration::from_secs(60), || {
        described = get(&api, &["describe", "ingress", "bad"]).unwrap_or_default();
        described.contains("Warning") && described.contains("MissingBackend")
    });
    assert!(
        warned,
        "no Warning Event:\n{described}\n{}",
        all(&[&op1, &op2])
    );
    assert!(
        described.contains("backend.service.name"),
        "the Event does not name the field:\n{described}"
    );
    // Deduplicated: one Event for the problem, however many passes ran.
    let events = get(
        &api,
        &[
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=bad",
            "-o",
            "name",
        ],
    )
    .unwrap_or_default();
    assert_eq!(events.lines().count(), 1, "events: {events}");

    // A CEC the agent cannot take: a Warning Event on it names the node.
    api.ok_stdin(
        &["apply", "-f", "-"],
        r#"apiVersion: cilium.io/v2
kind: CiliumEnvoyConfig
metadata: {name: broken, namespace: default}
spec:
  nodeSelector: {matchLabels: {role: a}}
  resources:
  - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
    name: broken
    noSuchField: 1
"#,
    );
    let mut described = String::new();
    let warned = wait_until(Duration::from_secs(60), || {
        described = get(&api, &["describe", "cec", "broken"]).unwrap_or_default();
        described.contains("ConfigRejected") && described.contains("node node-a")
    });
    assert!(warned, "no Warning Event on the CEC:\n{described}");

    // Relabelling a Node moves CECs: node b now matches only-a's selector.
    api.ok(&["label", "node", "node-b", "role=a", "--overwrite"]);
    let moved = wait_until(Duration::from_secs(30), || {
        reported(&api, "node-b", "only-a") == Some(("Acked".into(), gen_a))
            && admin_listeners(20902).contains("only-a/direct")
    });
    assert!(
        moved,
        "node b does not serve only-a after relabelling\n{}",
        node_b.log()
    );
    let labels = get(
        &api,
        &[
            "get",
            "proxynodestatus",
            "node-b",
            "-o",
            "jsonpath={.spec.nodeLabels.role}",
        ],
    );
    assert_eq!(
        labels.as_deref(),
        Some("a"),
        "the report carries the new labels"
    );

    // An agent stopped cleanly withdraws its report, every object of it.
    // Its entries sit in the objects their keys hash to (plus the one
    // named after the node); an object emptied by the relabelling stays.
    let shards: std::collections::BTreeSet<u32> = report_entries(&api, "node-b")
        .iter()
        .map(|c| {
            membrane_crds::report_shard(
                c["kind"].as_str().unwrap_or_default(),
                c["namespace"].as_str().unwrap_or_default(),
                c["name"].as_str().unwrap_or_default(),
            )
        })
        .chain([0])
        .collect();
    let objects = report_objects(&api, "node-b");
    assert!(
        objects.is_some_and(|n| n >= shards.len()),
        "node-b's report: {objects:?} objects for entries in {shards:?}"
    );
    drop(node_b);
    let withdrawn = wait_until(Duration::from_secs(30), || {
        !exists(&api, "proxynodestatus", "node-b") && report_objects(&api, "node-b") == Some(0)
    });
    assert!(withdrawn, "node-b's ProxyNodeStatus remains after SIGTERM");

    // A Node removed from the cluster takes its agent's report with it
    // (the report is owned by the Node; garbage collection).
    api.ok(&["delete", "node", "node-a"]);
    let collected = wait_until(Duration::from_secs(30), || {
        !exists(&api, "proxynodestatus", "node-a") && report_objects(&api, "node-a") == Some(0)
    });
    assert!(collected, "node-a's ProxyNodeStatus outlives its Node");
}

/// Issue 9 in Kubernetes mode: 100 Ingresses × 10 paths applied with
/// kubectl, one operator, one agent. Once the agent reports every CEC
/// ACKed and every LB Service has its address, nothing else changes: the
/// only work left is the operator's status writes, so an ACK → status
/// wake-up lost anywhere would leave Ingresses without an address for
/// good. The operator's check runs after every wake-up against current
/// state, so every Ingress gets its address; the time this takes is
/// printed (it is bounded by the API server's write rate, here a
/// debug-build SQLite server fsyncing every write on a shared machine).
#[test]
fn many_ingresses_get_addresses_after_the_final_ack() {
    const INGRESSES: usize = 100;
    const PATHS: usize = 10;
    /// Generous: the point is that the addresses come at all, with no
    /// unrelated event to wake the operator.
    const BOUND: Duration = Duration::from_secs(30);
    require_envoy();
    let api = ApiServer::start(20002);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut docs = vec![INGRESS_CLASS.to_owned()];
    for s in 0..INGRESSES {
        docs.push(service_yaml(
            &format!("svc-{s}"),
            80,
            None,
            &format!("10.1.{}.{}", s / 250, s % 250 + 1),
        ));
    }
    for i in 0..INGRESSES {
        let routes: Vec<(String, String)> = (0..PATHS)
            .map(|j| {
                (
                    format!("/i{i}/r{j}"),
                    format!("svc-{}", (i + j) % INGRESSES),
                )
            })
            .collect();
        let routes: Vec<(&str, &str, u16)> = routes
            .iter()
            .map(|(p, s)| (p.as_str(), s.as_str(), 80))
            .collect();
        docs.push(ingress_yaml(&format!("ing-{i}"), &routes));
    }
    let manifest = dir.path().join("many.yaml");
    std::fs::write(&manifest, docs.join("\n---\n")).expect("write");
    api.ok(&["apply", "-f", manifest.to_str().unwrap_or_default()]);

    let run = dir.path().join("node-m");
    std::fs::create_dir_all(&run).expect("run dir");
    let node_args: Vec<String> = [
        "agent",
        "--api-socket",
        &run.join("api.sock").display().to_string(),
        "--kubeconfig",
        &api.kubeconfig.display().to_string(),
        "--node-name",
        "node-m",
        "--run-dir",
        &run.display().to_string(),
        "--envoy-bin",
        &envoy_bin().display().to_string(),
        "--lb-pool",
        "127.20.2.0/24",
        "--http-port",
        "20180",
        "--https-port",
        "20543",
        "--proxy-ports",
        "20300-20599",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let node = Role::spawn("node-m", dir.path(), &node_args);
    let op_args: Vec<String> = [
        "operator",
        "--kubeconfig",
        &api.kubeconfig.display().to_string(),
        "--lb-pool",
        "127.20.2.0/24",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let op = Role::spawn("op-m", dir.path(), &op_args);

    let count = |kind: &str, pointer: &str, want: &str| {
        let out = get(&api, &["get", kind, "-o", "json"]).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|i| match i.pointer(pointer) {
                Some(x) if want.is_empty() => !x.is_null(),
                Some(x) => x == want,
                None => false,
            })
            .count()
    };
    let acks = || {
        report_entries(&api, "node-m")
            .iter()
            .filter(|c| c["state"] == "Acked")
            .count()
    };
    // Bounded polls, slow enough not to starve the roles of CPU.
    let poll = |limit: Duration, f: &mut dyn FnMut() -> bool| {
        let deadline = Instant::now() + limit;
        loop {
            if f() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    };
    let started = Instant::now();
    let settled = poll(Duration::from_secs(300), &mut || {
        acks() == INGRESSES
            && count("services", "/status/loadBalancer/ingress/0/ip", "") == INGRESSES
    });
    assert!(
        settled,
        "agent never reported every CEC ACKed with every LB address given\n{}",
        logs(&[&node, &op], &api)
    );
    let acked_at = Instant::now();
    eprintln!(
        "every CEC ACKed, every LB address given after {:?}",
        acked_at - started
    );
    let mut addressed = 0;
    let done = poll(BOUND, &mut || {
        addressed = count("ingresses", "/status/loadBalancer/ingress/0/ip", "");
        addressed == INGRESSES
    });
    eprintln!(
        "{addressed}/{INGRESSES} Ingresses addressed {:?} after the final ACK",
        acked_at.elapsed()
    );
    assert!(
        done,
        "only {addressed} of {INGRESSES} Ingresses have an address {BOUND:?} after the final ACK\n{}",
        logs(&[&node, &op], &api)
    );
}
