//! The chart's RBAC grants every API call the roles make, and nothing is
//! waved through: membrane-k8s's `KubeSource` and `Writer`, run with the
//! roles' User-Agents (`membrane-operator/<v>`, `membrane-agent/<v>`)
//! against `membrane apiserver --audit-log`, produce a real audit log that
//! the checker (helm_support::rbac) matches against the ClusterRoles/Roles
//! the chart renders for each role's ServiceAccount. With a rule removed
//! from the rendered chart, the checker reports exactly the calls that rule
//! granted.
//!
//! Ports 22100–22101.

mod common;
mod helm_support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{BIN, wait_until};
use helm_support::rbac::{AuditEntry, Rbac, chart_roles, check, read_audit_log};
use helm_support::{NAMESPACE, render};
use hyper::header::{HeaderValue, USER_AGENT};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Secret};
use kube::api::{Api, DynamicObject, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use membrane_k8s::{AGENT_MANAGER, KubeSource, OPERATOR_MANAGER, Writer, api_resource};
use membrane_store::{Kind, Object, ObjectKey, Store};
use serde_json::{Value, json};
use tokio_stream::StreamExt;

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// `membrane apiserver` with an audit log, killed by PID on drop.
struct ApiServer {
    child: Child,
    dir: tempfile::TempDir,
}

impl ApiServer {
    fn start(port: u16) -> ApiServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = std::fs::File::create(dir.path().join("apiserver.log")).expect("log");
        let child = Command::new(BIN)
            .args(["apiserver", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--audit-log")
            .arg(dir.path().join("audit.log"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn membrane apiserver");
        let server = ApiServer { child, dir };
        let ready = wait_until(Duration::from_secs(30), || {
            server.kubeconfig().is_file() && readyz(port)
        });
        assert!(ready, "apiserver not ready:\n{}", server.log());
        server
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("data/kubeconfig")
    }

    fn audit_log(&self) -> PathBuf {
        self.dir.path().join("audit.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("apiserver.log")).unwrap_or_default()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn readyz(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /readyz HTTP/1.0\r\nHost: x\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.1 200") || out.starts_with("HTTP/1.0 200")
}

/// A client of the kubeconfig's API that identifies itself as `agent`.
async fn client(kubeconfig: &Path, agent: &str) -> kube::Client {
    let kc = Kubeconfig::read_from(kubeconfig).expect("kubeconfig");
    let mut config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("config");
    config
        .headers
        .push((USER_AGENT, HeaderValue::from_str(agent).expect("header")));
    kube::Client::try_from(config).expect("client")
}

fn object(v: Value) -> Object {
    Object::from_value(v).expect("object")
}

/// Creates (as a test client, which the checker ignores) what the roles
/// read: namespaces, an Ingress with its Service and TLS Secret.
async fn seed(kubeconfig: &Path) {
    let c = client(kubeconfig, "membrane-rbac-test/1").await;
    let objects = [
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "app"}}),
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "cilium-secrets"}}),
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}),
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
               "metadata": {"name": "cilium"},
               "spec": {"controller": "cilium.io/ingress-controller"}}),
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "web", "namespace": "app"},
               "spec": {"ports": [{"port": 80, "targetPort": 3000}]}}),
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "tls", "namespace": "app"},
               "type": "Opaque", "data": {"k": "dg=="}}),
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
               "metadata": {"name": "web", "namespace": "app"},
               "spec": {"ingressClassName": "cilium", "rules": [{"http": {"paths": [
                   {"path": "/", "pathType": "Prefix",
                    "backend": {"service": {"name": "web", "port": {"number": 80}}}}]}}]}}),
        // An agent's CiliumNode (the agent creates it; the operator adds
        // pod CIDRs).
        json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNode",
               "metadata": {"name": "node-a"},
               "spec": {"addresses": [{"type": "InternalIP", "ip": "192.0.2.1"}]}}),
    ];
    for v in objects {
        let obj = object(v.clone());
        let key = obj.key();
        let ar = api_resource(key.kind);
        let api: Api<DynamicObject> = if key.kind.namespaced() {
            Api::namespaced_with(c.clone(), &key.namespace, &ar)
        } else {
            Api::all_with(c.clone(), &ar)
        };
        let data: DynamicObject = serde_json::from_value(v).expect("dynamic object");
        match api.create(&PostParams::default(), &data).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => panic!("seeding {key}: {e}"),
        }
    }
}

/// Waits (bounded) for `source`'s initial listing; the task keeps watching.
async fn sync(store: &Store, source: KubeSource) -> tokio::task::JoinHandle<()> {
    let mut synced = source.synced();
    let task = store.spawn_source(source);
    let ok = tokio::time::timeout(Duration::from_secs(30), synced.wait())
        .await
        .unwrap_or(false);
    assert!(ok, "the watchers never completed their initial listing");
    tokio::spawn(async move {
        let _ = task.await;
    })
}

/// What the operator does through membrane-k8s: watch its kinds, apply the
/// generated CEC, Service and EndpointSlice (first apply creates), copy a
/// TLS Secret into the secrets namespace, write Ingress status, delete.
async fn drive_operator(kubeconfig: &Path) -> Vec<tokio::task::JoinHandle<()>> {
    let c = client(kubeconfig, &format!("membrane-operator/{VERSION}")).await;
    let store = Store::new();
    let watch = sync(
        &store,
        KubeSource::with_kinds(
            c.clone(),
            vec![
                Kind::Ingress,
                Kind::IngressClass,
                Kind::Service,
                Kind::EndpointSlice,
                Kind::Secret,
                Kind::CiliumEnvoyConfig,
                Kind::CiliumClusterwideEnvoyConfig,
                Kind::CiliumNode,
            ],
        ),
    )
    .await;
    let w = Writer::new(c.clone(), OPERATOR_MANAGER);
    // Cluster-pool IPAM: pod CIDRs on an existing CiliumNode.
    w.apply(&object(
        json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNode",
        "metadata": {"name": "node-a"},
        "spec": {"addresses": [{"type": "InternalIP", "ip": "192.0.2.1"}],
                 "ipam": {"podCIDRs": ["10.244.0.0/24"]}}}),
    ))
    .await
    .expect("operator applies pod CIDRs");
    let generated = [
        object(
            json!({"apiVersion": "cilium.io/v2", "kind": "CiliumEnvoyConfig",
            "metadata": {"name": "cilium-ingress-app-web", "namespace": "app"},
            "spec": {"services": [{"name": "cilium-ingress-web", "namespace": "app", "ports": [80]}],
                     "resources": []}}),
        ),
        object(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "cilium-ingress-web", "namespace": "app",
                         "labels": {"cilium.io/ingress": "true"}},
            "spec": {"type": "LoadBalancer", "ports": [{"name": "http", "port": 80}]}})),
        object(
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "cilium-ingress-web", "namespace": "app",
                         "labels": {"kubernetes.io/service-name": "cilium-ingress-web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["192.192.192.192"]}],
            "ports": [{"name": "http", "port": 80}]}),
        ),
        object(json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "app-tls", "namespace": "cilium-secrets"},
            "type": "Opaque", "data": {"k": "dg=="}})),
    ];
    for obj in &generated {
        w.apply(obj).await.expect("operator apply");
    }
    // Applying again is an update of an existing object (200, no create).
    w.apply(&generated[0]).await.expect("operator re-apply");
    w.apply_status(
        &ObjectKey::new(Kind::Ingress, "app", "web"),
        json!({"loadBalancer": {"ingress": [{"ip": "127.22.0.1"}]}}),
    )
    .await
    .expect("operator status");
    w.apply_status(
        &ObjectKey::new(Kind::Service, "app", "cilium-ingress-web"),
        json!({"loadBalancer": {"ingress": [{"ip": "127.22.0.1"}]}}),
    )
    .await
    .expect("LB IPAM status");
    for obj in &generated {
        w.delete(&obj.key()).await.expect("operator delete");
    }
    leader_election_and_events(&c).await;
    vec![watch]
}

/// The operator's Lease (get, create when missing, then renew by update)
/// and a Warning Event (create, then a merge patch raising its count), as
/// membrane-k8s's lease and event recorder do.
async fn leader_election_and_events(c: &kube::Client) {
    let leases: Api<Lease> = Api::namespaced(c.clone(), NAMESPACE);
    let name = "cilium-operator-resource-lock";
    assert!(leases.get_opt(name).await.expect("get lease").is_none());
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"holderIdentity": "op-1", "leaseDurationSeconds": 15},
    }))
    .expect("lease");
    let mut held = leases
        .create(&PostParams::default(), &lease)
        .await
        .expect("create lease");
    if let Some(spec) = held.spec.as_mut() {
        spec.lease_transitions = Some(1);
    }
    leases
        .replace(name, &PostParams::default(), &held)
        .await
        .expect("renew lease");

    let ar = kube::api::ApiResource::from_gvk_with_plural(
        &kube::api::GroupVersionKind::gvk("events.k8s.io", "v1", "Event"),
        "events",
    );
    let events: Api<DynamicObject> = Api::namespaced_with(c.clone(), "app", &ar);
    let event: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "events.k8s.io/v1", "kind": "Event",
        "metadata": {"name": "web.1", "namespace": "app"},
        "eventTime": "2026-12-01T00:00:00.000000Z",
        "reportingController": "membrane.io/operator",
        "reportingInstance": "op-1",
        "action": "Translate", "reason": "InvalidIngress", "type": "Warning",
        "note": "spec.rules[0]: bad",
        "regarding": {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
                      "namespace": "app", "name": "web"},
    }))
    .expect("event");
    events
        .create(&PostParams::default(), &event)
        .await
        .expect("create event");
    events
        .patch(
            "web.1",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(
                json!({"series": {"count": 2, "lastObservedTime": "2026-12-01T00:00:01.000000Z"}}),
            ),
        )
        .await
        .expect("patch event");
}

/// What the agent does: watch what its Envoy and datapath serve, the synced
/// TLS Secrets in the secrets namespace only, and read its Node; with the
/// CNI (the chart's default `cni.install`) also watch Pods and CiliumNodes,
/// publish its CiliumNode's addresses (creating it on a first start) and
/// report its pod CIDR states in the CiliumNode's status, as
/// `membrane_agent::cni` does through the agent's writer.
async fn drive_agent(kubeconfig: &Path) -> Vec<tokio::task::JoinHandle<()>> {
    let c = client(kubeconfig, &format!("membrane-agent/{VERSION}")).await;
    let store = Store::new();
    let watch = sync(
        &store,
        KubeSource::with_kinds(
            c.clone(),
            vec![
                Kind::Service,
                Kind::EndpointSlice,
                Kind::CiliumEnvoyConfig,
                Kind::CiliumClusterwideEnvoyConfig,
                Kind::Pod,
                Kind::CiliumNode,
            ],
        ),
    )
    .await;
    let w = Writer::new(c.clone(), AGENT_MANAGER);
    for (node, ip) in [("node-a", "192.0.2.1"), ("node-b", "192.0.2.2")] {
        // node-a exists (an update), node-b not yet (the apply creates it).
        w.apply(&object(
            json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNode",
            "metadata": {"name": node},
            "spec": {"addresses": [{"type": "InternalIP", "ip": ip},
                                   {"type": "InternalIP", "ip": "2001:db8::1"}]}}),
        ))
        .await
        .expect("agent publishes its CiliumNode addresses");
    }
    w.apply_status(
        &ObjectKey::new(Kind::CiliumNode, "", "node-a"),
        json!({"ipam": {"pod-cidrs": {"10.244.0.0/24": {"status": "in-use"}}}}),
    )
    .await
    .expect("agent reports pod CIDR states");
    let secrets: Api<Secret> = Api::namespaced(c.clone(), "cilium-secrets");
    let secrets_watch = tokio::spawn(async move {
        let mut events = Box::pin(kube::runtime::watcher(secrets, Default::default()));
        while events.next().await.is_some() {}
    });
    let nodes: Api<Node> = Api::all(c.clone());
    nodes.get_opt("node-a").await.expect("get own Node");
    vec![watch, secrets_watch]
}

/// Runs both roles against a fresh apiserver and returns its audit log
/// once every watch of both roles has been opened.
fn audit_of_both_roles(port: u16) -> Vec<AuditEntry> {
    let server = ApiServer::start(port);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let tasks = runtime.block_on(async {
        seed(&server.kubeconfig()).await;
        let mut t = drive_operator(&server.kubeconfig()).await;
        t.extend(drive_agent(&server.kubeconfig()).await);
        t
    });
    // 8 operator kinds, 6 agent kinds plus the Secrets of one namespace.
    let watches = |prefix: &str| {
        read_audit_log(&server.audit_log())
            .iter()
            .filter(|e| e.user_agent.starts_with(prefix) && e.verb == "watch")
            .map(|e| (e.resource.clone(), e.namespace.clone()))
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    };
    let all_watching = wait_until(Duration::from_secs(30), || {
        watches("membrane-operator/") >= 8 && watches("membrane-agent/") >= 7
    });
    assert!(
        all_watching,
        "not every watch was opened:\n{}",
        server.log()
    );
    for t in tasks {
        t.abort();
    }
    drop(runtime);
    read_audit_log(&server.audit_log())
}

fn has(entries: &[AuditEntry], agent: &str, verb: &str, resource: &str, code: u16) -> bool {
    entries.iter().any(|e| {
        e.user_agent.starts_with(agent)
            && e.verb == verb
            && e.combined_resource() == resource
            && e.code == code
    })
}

#[test]
fn the_chart_grants_every_call_the_roles_make() {
    let Some(chart) = render(&json!({})) else {
        return;
    };
    let entries = audit_of_both_roles(22100);

    // The log is the real thing: the calls the checker must judge are in it.
    let op = "membrane-operator/";
    assert!(has(&entries, op, "list", "ingresses", 200));
    assert!(has(&entries, op, "watch", "secrets", 200));
    assert!(
        has(&entries, op, "patch", "ciliumenvoyconfigs", 201),
        "the first apply creates"
    );
    assert!(has(&entries, op, "patch", "ciliumenvoyconfigs", 200));
    assert!(has(&entries, op, "patch", "ingresses/status", 200));
    assert!(has(&entries, op, "patch", "services/status", 200));
    assert!(has(&entries, op, "delete", "endpointslices", 200));
    assert!(has(&entries, op, "get", "leases", 404));
    assert!(has(&entries, op, "create", "leases", 201));
    assert!(has(&entries, op, "update", "leases", 200));
    assert!(has(&entries, op, "create", "events", 201));
    assert!(has(&entries, op, "patch", "events", 200));
    let ag = "membrane-agent/";
    assert!(has(
        &entries,
        ag,
        "watch",
        "ciliumclusterwideenvoyconfigs",
        200
    ));
    assert!(entries.iter().any(|e| e.user_agent.starts_with(ag)
        && e.verb == "watch"
        && e.resource == "secrets"
        && e.namespace == "cilium-secrets"));
    assert!(has(&entries, ag, "get", "nodes", 404));
    assert!(has(&entries, ag, "watch", "pods", 200));
    assert!(has(&entries, ag, "watch", "ciliumnodes", 200));
    assert!(
        has(&entries, ag, "patch", "ciliumnodes", 201),
        "the first apply of a CiliumNode creates it"
    );
    assert!(has(&entries, ag, "patch", "ciliumnodes", 200));
    assert!(has(&entries, ag, "patch", "ciliumnodes/status", 200));

    let rbac = Rbac::from_objects(&chart.objects, NAMESPACE);
    let report = check(&rbac, &entries, &chart_roles(NAMESPACE));
    assert_eq!(report.checked.len(), 2, "{report}");
    assert!(report.violations.is_empty(), "{report}");
}

/// Removes `verb` from every rule of `kind`/`name` that grants it on
/// `resource`.
fn remove_verb(objects: &mut [Value], kind: &str, name: &str, resource: &str, verb: &str) {
    let mut removed = false;
    for o in objects.iter_mut() {
        if o["kind"] != kind || o["metadata"]["name"] != name {
            continue;
        }
        for rule in o["rules"].as_array_mut().into_iter().flatten() {
            let names_resource = rule["resources"]
                .as_array()
                .is_some_and(|r| r.iter().any(|x| x == resource));
            if let (true, Some(verbs)) = (names_resource, rule["verbs"].as_array_mut()) {
                let before = verbs.len();
                verbs.retain(|v| v != verb);
                removed |= verbs.len() < before;
            }
        }
    }
    assert!(removed, "{kind} {name} grants no {verb} on {resource}");
}

#[test]
fn a_rule_removed_from_the_chart_is_reported() {
    let Some(chart) = render(&json!({})) else {
        return;
    };
    let entries = audit_of_both_roles(22101);
    let mut objects = chart.objects.clone();
    remove_verb(
        &mut objects,
        "ClusterRole",
        "membrane-operator",
        "ciliumenvoyconfigs",
        "create",
    );
    remove_verb(
        &mut objects,
        "Role",
        "membrane-agent-secrets",
        "secrets",
        "watch",
    );
    // The CNI's rules are exercised too: the agent's first apply of its
    // CiliumNode creates it.
    remove_verb(
        &mut objects,
        "ClusterRole",
        "membrane-agent",
        "ciliumnodes",
        "create",
    );
    let rbac = Rbac::from_objects(&objects, NAMESPACE);
    let report = check(&rbac, &entries, &chart_roles(NAMESPACE));
    let found: std::collections::BTreeSet<(String, String, String)> = report
        .violations
        .iter()
        .map(|v| {
            (
                v.service_account.name.clone(),
                v.missing_verb.clone(),
                v.entry.combined_resource(),
            )
        })
        .collect();
    let want = std::collections::BTreeSet::from([
        // Only the apply that created the CEC needed create.
        (
            "membrane-operator".to_string(),
            "create".to_string(),
            "ciliumenvoyconfigs".to_string(),
        ),
        (
            "membrane-agent".to_string(),
            "watch".to_string(),
            "secrets".to_string(),
        ),
        (
            "membrane-agent".to_string(),
            "create".to_string(),
            "ciliumnodes".to_string(),
        ),
    ]);
    assert_eq!(found, want, "{report}");
    let creates = report
        .violations
        .iter()
        .filter(|v| v.missing_verb == "create")
        .count();
    assert_eq!(
        creates, 2,
        "one CEC and one CiliumNode were created: {report}"
    );
}

/// Kubernetes RBAC semantics the checker must get right, on the chart's
/// rules: a RoleBinding grants only in its namespace, resourceNames only
/// match named requests, discovery is open to every user.
#[test]
fn role_bindings_are_namespaced_and_resource_names_need_a_name() {
    let Some(chart) = render(&json!({})) else {
        return;
    };
    let rbac = Rbac::from_objects(&chart.objects, NAMESPACE);
    let roles = chart_roles(NAMESPACE);
    let entry =
        |agent: &str, verb: &str, group: &str, resource: &str, ns: &str, name: &str| AuditEntry {
            user_agent: format!("{agent}/{VERSION}"),
            verb: verb.into(),
            api_group: group.into(),
            resource: resource.into(),
            subresource: String::new(),
            namespace: ns.into(),
            name: name.into(),
            non_resource_url: None,
            code: 200,
        };
    let violations = |e: AuditEntry| check(&rbac, &[e], &roles).violations.len();
    // The agent reads Secrets only in the secrets namespace.
    assert_eq!(
        violations(entry(
            "membrane-agent",
            "list",
            "",
            "secrets",
            "cilium-secrets",
            ""
        )),
        0
    );
    assert_eq!(
        violations(entry("membrane-agent", "list", "", "secrets", "app", "")),
        1
    );
    assert_eq!(
        violations(entry("membrane-agent", "list", "", "secrets", "", "")),
        1
    );
    // The operator writes Secrets only there.
    assert_eq!(
        violations(entry(
            "membrane-operator",
            "patch",
            "",
            "secrets",
            "cilium-secrets",
            "x"
        )),
        0
    );
    assert_eq!(
        violations(entry(
            "membrane-operator",
            "patch",
            "",
            "secrets",
            "app",
            "x"
        )),
        1
    );
    // Its Lease: by name for get/update, in the release namespace only.
    let lease = |verb: &str, ns: &str, name: &str| {
        entry(
            "membrane-operator",
            verb,
            "coordination.k8s.io",
            "leases",
            ns,
            name,
        )
    };
    assert_eq!(
        violations(lease("get", NAMESPACE, "cilium-operator-resource-lock")),
        0
    );
    assert_eq!(violations(lease("update", NAMESPACE, "other-lock")), 1);
    assert_eq!(
        violations(lease("get", "app", "cilium-operator-resource-lock")),
        1
    );
    assert_eq!(violations(lease("create", NAMESPACE, "")), 0);
    // Discovery is allowed, arbitrary non-resource URLs are not.
    let url = |verb: &str, path: &str| AuditEntry {
        non_resource_url: Some(path.into()),
        ..entry("membrane-agent", verb, "", "", "", "")
    };
    assert_eq!(violations(url("get", "/apis/cilium.io/v2")), 0);
    assert_eq!(violations(url("get", "/metrics")), 1);
    // Clients other than the roles are not judged.
    assert_eq!(
        violations(entry("kubectl", "delete", "", "nodes", "", "a")),
        0
    );
}
