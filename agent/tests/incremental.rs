//! The incremental pipeline (`ConfigPipeline::run_changes` fed by the
//! store's change log) must serve exactly what a pass over the whole store
//! serves, step by step, whatever the change: slices (valid, invalid,
//! relabelled, deleted), legacy Endpoints, Services, Secrets and CECs
//! (including a first-come conflict within one creation second).

use std::collections::{BTreeMap, BTreeSet};

use membrane_agent::configs::{ConfigPipeline, PassOutcome, PipelineChanges};
use membrane_agent::incremental::{self, AckState, acked_in_full};
use membrane_agent::placement::PortMap;
use membrane_store::{Kind, ObjectKey, Store, parse_documents};
use membrane_xds::{ResourceMap, Snapshot};

fn apply(store: &Store, yaml: &str) {
    for obj in parse_documents(yaml).expect("valid YAML") {
        store.apply(obj);
    }
}

fn cec(name: &str, port: u16, services: &[&str]) -> String {
    let backends: Vec<String> = services
        .iter()
        .map(|s| format!("{{name: {s}, number: [\"80\"]}}"))
        .collect();
    let clusters: String = services
        .iter()
        .map(|s| {
            format!(
                r#"  - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
    name: {name}-{s}
    type: EDS
    edsClusterConfig: {{serviceName: default/{s}:80}}
"#
            )
        })
        .collect();
    format!(
        r#"apiVersion: cilium.io/v2
kind: CiliumEnvoyConfig
metadata: {{name: {name}, namespace: default, creationTimestamp: "2026-12-01T10:00:00Z"}}
spec:
  backendServices: [{}]
  resources:
  - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
    name: l
    address: {{socketAddress: {{address: 127.0.0.1, portValue: {port}}}}}
    filterChains:
    - filters:
      - name: tcp
        typedConfig:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          statPrefix: t
          cluster: {name}-{}
{clusters}"#,
        backends.join(", "),
        services.first().copied().unwrap_or("none"),
    )
}

fn service(name: &str, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  ports:\n  - {{name: http, port: {port}, targetPort: 8080}}\n"
    )
}

fn slice(name: &str, svc: &str, ips: &[&str]) -> String {
    let eps: String = ips
        .iter()
        .map(|ip| format!("- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n"))
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: default\n  labels: {{kubernetes.io/service-name: {svc}}}\naddressType: IPv4\nports:\n- {{name: http, port: 8080}}\nendpoints:\n{eps}"
    )
}

/// What a pass serves, comparable: resources by (type, name, hash),
/// rejections by object.
type View = (BTreeSet<(String, String, u64)>, BTreeMap<ObjectKey, String>);

/// Served lists and warnings by object.
type Extra = (
    BTreeMap<ObjectKey, Vec<(&'static str, String)>>,
    BTreeMap<ObjectKey, String>,
);

/// The incremental side, kept as the agent keeps it.
struct Incremental {
    pipeline: ConfigPipeline,
    seen: Option<u64>,
    resources: BTreeMap<(String, String), (u64, String)>,
    rejected: BTreeMap<ObjectKey, String>,
    served: BTreeMap<ObjectKey, Vec<(&'static str, String)>>,
    warnings: BTreeMap<ObjectKey, String>,
    /// How each step was handled: "unchanged", "endpoints", "configs" or
    /// "full".
    outcomes: Vec<&'static str>,
    /// The xDS snapshot and the ACK state, kept as the agent keeps them.
    snapshot: Snapshot,
    acks: AckState,
}

impl Incremental {
    fn new(pipeline: ConfigPipeline) -> Self {
        Self {
            pipeline,
            seen: None,
            resources: BTreeMap::new(),
            rejected: BTreeMap::new(),
            served: BTreeMap::new(),
            warnings: BTreeMap::new(),
            outcomes: Vec::new(),
            snapshot: Snapshot::new(),
            acks: AckState::default(),
        }
    }

    fn step(&mut self, store: &Store) -> View {
        let changes = match self.seen {
            None => PipelineChanges::resync(),
            Some(rev) => PipelineChanges::from_store(&store.changes_since(rev).1),
        };
        self.seen = Some(store.revision());
        match self.pipeline.run_changes(&store.snapshot(), &changes) {
            PassOutcome::Unchanged => self.outcomes.push("unchanged"),
            PassOutcome::Endpoints(eds) => {
                self.outcomes.push("endpoints");
                let published = incremental::publish_delta(
                    &mut self.snapshot,
                    eds.updated.iter().map(|(_, new)| new.clone()).collect(),
                    Vec::new(),
                );
                self.acks.published(published);
                for (old, new) in eds.updated {
                    let slot = self
                        .resources
                        .get_mut(&(old.type_url.clone(), old.name.clone()))
                        .expect("an updated resource was served");
                    assert_eq!(slot.0, old.hash, "replaces what was served");
                    *slot = (new.hash, new.name.clone());
                }
                for (key, why) in eds.rejected {
                    match why {
                        Some(w) => self.rejected.insert(key, w),
                        None => self.rejected.remove(&key),
                    };
                }
            }
            PassOutcome::Configs(pass) => {
                self.outcomes.push("configs");
                let published = incremental::publish_delta(
                    &mut self.snapshot,
                    pass.upserts.clone(),
                    pass.removals.clone(),
                );
                self.acks.published(published);
                self.acks.touch(pass.served.iter().map(|(k, _)| k.clone()));
                for (t, n) in pass.removals {
                    assert!(
                        self.resources.remove(&(t.clone(), n.clone())).is_some(),
                        "removes what was served: {t} {n}"
                    );
                }
                for r in pass.upserts {
                    self.resources.insert(
                        (r.type_url.clone(), r.name.clone()),
                        (r.hash, r.name.clone()),
                    );
                }
                for (key, why) in pass.rejected {
                    match why {
                        Some(w) => self.rejected.insert(key, w),
                        None => self.rejected.remove(&key),
                    };
                }
                for (key, w) in pass.warnings {
                    match w {
                        Some(w) => self.warnings.insert(key, w),
                        None => self.warnings.remove(&key),
                    };
                }
                for (key, s) in pass.served {
                    match s {
                        Some(s) => self.served.insert(key, s),
                        None => self.served.remove(&key),
                    };
                }
            }
            PassOutcome::Full(pass) => {
                self.outcomes.push("full");
                incremental::publish_full(&mut self.snapshot, pass.resources.clone());
                self.acks.reset();
                self.served = pass.served;
                self.warnings = pass.warnings;
                self.resources = pass
                    .resources
                    .iter()
                    .map(|r| {
                        (
                            (r.type_url.clone(), r.name.clone()),
                            (r.hash, r.name.clone()),
                        )
                    })
                    .collect();
                self.rejected = pass.rejected;
            }
        }
        (
            self.resources
                .iter()
                .map(|((t, n), (h, _))| (t.clone(), n.clone(), *h))
                .collect(),
            self.rejected.clone(),
        )
    }
}

fn full(pipeline: &mut ConfigPipeline, store: &Store) -> View {
    full_extra(pipeline, store).0
}

fn full_extra(pipeline: &mut ConfigPipeline, store: &Store) -> (View, Extra) {
    let pass = pipeline.run(&store.snapshot());
    (
        (
            pass.resources
                .iter()
                .map(|r| (r.type_url.clone(), r.name.clone(), r.hash))
                .collect(),
            pass.rejected,
        ),
        (pass.served, pass.warnings),
    )
}

/// A full pass's resources by content (the encoded bytes, not the hash: a
/// joined shared route configuration carries a hash of its pieces).
type ContentView = (Vec<(String, String, Vec<u8>)>, BTreeMap<ObjectKey, String>);

fn full_content(pipeline: &mut ConfigPipeline, store: &Store) -> ContentView {
    let pass = pipeline.run(&store.snapshot());
    let mut resources: Vec<(String, String, Vec<u8>)> = pass
        .resources
        .iter()
        .map(|r| (r.type_url.clone(), r.name.clone(), r.body.value.clone()))
        .collect();
    resources.sort();
    (resources, pass.rejected)
}

/// What a step does, how the incremental side must handle it, the change.
type Step = (&'static str, &'static str, Box<dyn Fn(&Store)>);

#[test]
fn incremental_passes_serve_what_full_passes_serve() {
    let store = Store::new();
    apply(&store, &service("a", 80));
    apply(&store, &service("b", 80));
    apply(&store, &slice("a-1", "a", &["10.0.0.1"]));
    apply(&store, &slice("b-1", "b", &["10.0.1.1"]));
    apply(&store, &cec("one", 21101, &["a", "b"]));

    let mut incr = Incremental::new(ConfigPipeline::new(PortMap::default(), BTreeMap::new()));
    let mut reference = ConfigPipeline::new(PortMap::default(), BTreeMap::new());
    let steps: Vec<Step> = vec![
        ("start", "full", Box::new(|_| {})),
        ("nothing", "unchanged", Box::new(|_| {})),
        (
            "slice endpoint changes",
            "endpoints",
            Box::new(|s| apply(s, &slice("a-1", "a", &["10.0.0.2", "10.0.0.3"]))),
        ),
        (
            "second slice of a",
            "endpoints",
            Box::new(|s| apply(s, &slice("a-2", "a", &["10.0.0.4"]))),
        ),
        (
            "invalid slice: rejected, last good serves",
            "endpoints",
            Box::new(|s| apply(s, &slice("a-2", "a", &["not-an-ip"]))),
        ),
        (
            "fixed again",
            "endpoints",
            Box::new(|s| apply(s, &slice("a-2", "a", &["10.0.0.5"]))),
        ),
        (
            "slice moves from a to b",
            "endpoints",
            Box::new(|s| apply(s, &slice("a-2", "b", &["10.0.0.5"]))),
        ),
        (
            "slice deleted",
            "endpoints",
            Box::new(|s| {
                s.delete(&ObjectKey::new(Kind::EndpointSlice, "default", "a-1"));
            }),
        ),
        (
            "slice of a Service nobody wants",
            "endpoints",
            Box::new(|s| apply(s, &slice("z-1", "z", &["10.0.9.1"]))),
        ),
        (
            "an Ingress (not read by the pipeline)",
            "unchanged",
            Box::new(|s| {
                apply(
                    s,
                    "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: i}\nspec: {}\n",
                )
            }),
        ),
        (
            "Service port change (the names its assignments publish change)",
            "configs",
            Box::new(|s| apply(s, &service("a", 81))),
        ),
        (
            "a contested address within the same second",
            "configs",
            Box::new(|s| apply(s, &cec("aa-two", 21101, &["b"]))),
        ),
        (
            "a CEC on its own address",
            "configs",
            Box::new(|s| apply(s, &cec("three", 21102, &["b"]))),
        ),
        (
            "slice change with three CECs",
            "endpoints",
            Box::new(|s| apply(s, &slice("b-1", "b", &["10.0.1.9"]))),
        ),
        (
            "the first CEC goes",
            "configs",
            Box::new(|s| {
                s.delete(&ObjectKey::new(Kind::CiliumEnvoyConfig, "default", "one"));
            }),
        ),
        (
            "slice change after it",
            "endpoints",
            Box::new(|s| apply(s, &slice("b-1", "b", &["10.0.1.10"]))),
        ),
        (
            "a slice moves while a CEC changes (one pass over the CEC)",
            "configs",
            Box::new(|s| {
                apply(s, &slice("a-2", "a", &["10.0.0.6"]));
                apply(s, &cec("three", 21103, &["b"]));
            }),
        ),
        (
            "a bad TLS Secret",
            "full",
            Box::new(|s| {
                apply(
                    s,
                    "apiVersion: v1\nkind: Secret\nmetadata: {name: tls}\ntype: kubernetes.io/tls\ndata: {tls.crt: eA==, tls.key: eA==}\n",
                )
            }),
        ),
    ];
    for (what, expected, change) in &steps {
        change(&store);
        let got = incr.step(&store);
        let want = full(&mut reference, &store);
        assert_eq!(got, want, "after: {what}");
        assert_eq!(
            incr.outcomes.last().copied(),
            Some(*expected),
            "after: {what}"
        );
        if what.starts_with("a contested") {
            let newcomer = ObjectKey::new(Kind::CiliumEnvoyConfig, "default", "aa-two");
            let why = got.1.get(&newcomer).expect("the newcomer is rejected");
            assert!(why.contains("already used by"), "{why}");
        }
    }
    // The steps are not vacuous: rejections and fallbacks were seen.
    let slice_key = ObjectKey::new(Kind::EndpointSlice, "default", "a-2");
    store.apply(
        parse_documents(&slice("a-2", "b", &["bad"]))
            .expect("yaml")
            .remove(0),
    );
    let (_, rejected) = incr.step(&store);
    assert!(rejected.contains_key(&slice_key), "{rejected:?}");
    assert_eq!(incr.outcomes.last().copied(), Some("endpoints"));
}

/// A shared CEC split into parts (as `membrane_ingress::split_shared_cec`
/// writes them, route configuration fragments included) serves exactly
/// what the unsplit CEC serves; a change to one part is seen.
#[test]
fn split_shared_cec_parts_serve_what_the_whole_cec_serves() {
    use membrane_ingress::{TranslateOptions, merge_shared, shared_part, split_shared_cec};
    use membrane_store::Object;

    let opts = TranslateOptions::default();
    let mut shared_parts = Vec::new();
    for i in 0..40 {
        let paths: String = (0..5)
            .map(|j| {
                format!(
                    "{{path: /i{i}/r{j}, pathType: Prefix, backend: {{service: {{name: svc-{}, port: {{number: 80}}}}}}}}, ",
                    (i * 5 + j) % 30
                )
            })
            .collect();
        let yaml = format!(
            "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: ing-{i}, namespace: bench, annotations: {{ingress.cilium.io/loadbalancer-mode: shared}}}}\nspec: {{ingressClassName: cilium, rules: [{{http: {{paths: [{paths}]}}}}]}}\n"
        );
        let Object::Ingress(ing) = parse_documents(&yaml).expect("yaml").remove(0) else {
            panic!("not an Ingress");
        };
        shared_parts.push(shared_part(&ing, &opts).expect("translates"));
    }
    let whole = merge_shared(&shared_parts, &opts).cec;
    let split = split_shared_cec(&whole, 8 * 1024).expect("splits");
    assert!(split.len() > 3, "{} parts", split.len());
    let fragments = split
        .iter()
        .flat_map(|c| &c.spec.config.resources)
        .filter(|r| {
            r.name_and_type()
                .0
                .is_some_and(|n| n.contains("~membrane-part-"))
        })
        .count();
    assert!(fragments > 0, "the route configuration is fragmented");

    let one = Store::new();
    one.apply(Object::CiliumEnvoyConfig(whole.clone()));
    let many = Store::new();
    many.apply_all(split.into_iter().map(Object::CiliumEnvoyConfig).collect());
    let mut p1 = ConfigPipeline::new(PortMap::default(), BTreeMap::new());
    let mut p2 = ConfigPipeline::new(PortMap::default(), BTreeMap::new());
    // By content: the joined route configuration's hash is one of its
    // pieces' hashes, not of its bytes.
    let a = full_content(&mut p1, &one);
    let b = full_content(&mut p2, &many);
    assert!(a.1.is_empty(), "{:?}", a.1);
    assert!(a == b, "the joined parts serve other content");
    let served = p2.run(&many.snapshot()).served;
    assert!(
        served.contains_key(&ObjectKey::new(
            Kind::CiliumEnvoyConfig,
            "kube-system",
            "cilium-ingress"
        )),
        "the first part answers for the whole: {:?}",
        served.keys().collect::<Vec<_>>()
    );

    // One part changes (a cluster's timeout): the joined config follows.
    let is_cluster = |r: &membrane_crds::EnvoyResource| {
        r.name_and_type().1.is_some_and(|t| t.ends_with(".Cluster"))
    };
    let mut part = many
        .snapshot()
        .typed::<membrane_crds::CiliumEnvoyConfig>(Some("kube-system"))
        .find(|c| {
            c.metadata.name.as_deref() != Some("cilium-ingress")
                && c.spec.config.resources.iter().any(is_cluster)
        })
        .cloned()
        .expect("a later part holds clusters");
    let cluster = part
        .spec
        .config
        .resources
        .iter_mut()
        .find(|r| is_cluster(r))
        .expect("a cluster");
    let mut changed = cluster.to_value();
    changed["connectTimeout"] = "7s".into();
    *cluster = changed.into();
    many.apply(Object::CiliumEnvoyConfig(part));
    let c = full_content(&mut p2, &many);
    assert!(c != b, "the change is served");
    assert!(c.1.is_empty(), "{:?}", c.1);
}

/// A small deterministic generator (xorshift), so a failing seed replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// A random CEC: contested listener names, addresses (wildcards too),
/// cluster, route and assignment names, EDS clusters on known and unknown
/// Services, RDS names that may be missing, now and then a nodeSelector
/// that does not match or a resource that does not decode.
fn random_cec(rng: &mut Rng, name: &str, created: u64, version: u64) -> serde_json::Value {
    use serde_json::json;
    let pick = |rng: &mut Rng, v: &[&str]| v[rng.below(v.len() as u64) as usize].to_owned();
    let mut resources = Vec::new();
    let listener_name = pick(rng, &["l", "shared/l0", "shared/l1"]);
    // 127.9.0.x is the LB pool: bound explicitly, only by a CEC that lists
    // the Service holding that address.
    let ip = pick(rng, &["127.0.0.1", "127.0.0.2", "0.0.0.0", "127.9.0.1"]);
    // Listeners without an address sit on the frontends of the Services
    // in `spec.services` (as the Ingress controller's CECs do).
    let on_frontends = rng.chance(30);
    let port = 21201 + rng.below(3);
    let cluster = pick(rng, &["c", "shared/c0", "shared/c1"]);
    let filter = if rng.chance(50) {
        json!({
            "name": "envoy.filters.network.http_connection_manager",
            "typedConfig": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "statPrefix": "h",
                "rds": {"routeConfigName": pick(rng, &["shared/r0", "shared/r1"])},
                "httpFilters": [{"name": "envoy.filters.http.router", "typedConfig": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]
            }
        })
    } else {
        json!({
            "name": "tcp",
            "typedConfig": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                "statPrefix": "t",
                "cluster": cluster,
            }
        })
    };
    let mut listener = json!({
        "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
        "name": listener_name,
        "address": {"socketAddress": {"address": ip, "portValue": port}},
        "filterChains": [{"filters": [filter]}],
    });
    if on_frontends && let Some(l) = listener.as_object_mut() {
        l.remove("address");
    }
    resources.push(listener);
    let eds = pick(
        rng,
        &[
            "default/s0:80",
            "default/s1:80",
            "default/s2:http",
            "other/x:80",
            "plain",
        ],
    );
    resources.push(json!({
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": cluster,
        "type": "EDS",
        "connectTimeout": format!("{}s", 1 + version % 3),
        "edsClusterConfig": {"serviceName": eds},
    }));
    if rng.chance(40) {
        resources.push(json!({
            "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            "name": pick(rng, &["shared/r0", "shared/r1", "r"]),
            "virtualHosts": [{"name": "v", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}]}],
        }));
    }
    if rng.chance(20) {
        resources.push(json!({
            "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
            "clusterName": pick(rng, &["default/s0:80", "plain"]),
            "endpoints": [],
        }));
    }
    if rng.chance(5) {
        resources.push(
            json!({"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": 7}),
        );
    }
    let backends: Vec<serde_json::Value> = (0..3)
        .filter(|_| rng.chance(40))
        .map(|s| json!({"name": format!("s{s}"), "number": ["80"]}))
        .collect();
    let mut spec = json!({"resources": resources});
    if !backends.is_empty() {
        spec["backendServices"] = backends.into();
    }
    if on_frontends || rng.chance(30) {
        let fronts: Vec<serde_json::Value> = (0..3)
            .filter(|_| rng.chance(50))
            .map(|s| json!({"name": format!("s{s}")}))
            .collect();
        if !fronts.is_empty() {
            spec["services"] = fronts.into();
        }
    }
    if rng.chance(5) {
        spec["nodeSelector"] = json!({"matchLabels": {"elsewhere": "yes"}});
    }
    json!({
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumEnvoyConfig",
        "metadata": {
            "name": name,
            "namespace": "default",
            "creationTimestamp": format!("2026-12-01T10:00:0{created}Z"),
        },
        "spec": spec,
    })
}

/// Random sequences of CEC creates, updates and deletes (contested names
/// and addresses, ties in creation time), Service, slice and Secret
/// changes, NACK quarantines and retries: after every step the incremental
/// side serves, rejects and warns exactly what a full pass does, and its
/// ACK state (Envoy ACKing some types, part of a type, or reconnecting)
/// finds ACKed exactly the objects a check of every served object finds.
#[test]
fn random_changes_serve_what_full_passes_serve() {
    for seed in (1u64..=20).chain([1234, 99991]) {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let store = Store::new();
        for s in 0..3 {
            apply(&store, &service(&format!("s{s}"), 80));
            apply(
                &store,
                &slice(&format!("s{s}-1"), &format!("s{s}"), &["10.0.0.1"]),
            );
        }
        let pool = || {
            let mut p = ConfigPipeline::new(PortMap::default(), BTreeMap::new());
            p.set_lb_pool(Some("127.9.0.0/24".parse().expect("pool")));
            p
        };
        let mut incr = Incremental::new(pool());
        let mut reference = pool();
        let mut created: BTreeMap<usize, u64> = BTreeMap::new();
        let mut version = 0u64;
        // What Envoy ACKed, by type, on which stream.
        let mut envoy: BTreeMap<String, std::sync::Arc<ResourceMap>> = BTreeMap::new();
        let mut stream = 1u64;
        let mut acked_before: BTreeSet<ObjectKey> = BTreeSet::new();
        for step in 0..150 {
            version += 1;
            let what = match rng.below(100) {
                0..=54 => {
                    let i = rng.below(8) as usize;
                    let c = *created.entry(i).or_insert_with(|| rng.below(3));
                    let cec = random_cec(&mut rng, &format!("c{i}"), c, version);
                    store.apply(membrane_store::Object::from_value(cec).expect("a CEC"));
                    format!("apply c{i}")
                }
                55..=69 => {
                    let i = rng.below(8) as usize;
                    created.remove(&i);
                    store.delete(&ObjectKey::new(
                        Kind::CiliumEnvoyConfig,
                        "default",
                        &format!("c{i}"),
                    ));
                    format!("delete c{i}")
                }
                70..=79 => {
                    // Envoy NACKs what a served CEC serves now.
                    let served: Vec<ObjectKey> = incr
                        .served
                        .keys()
                        .filter(|k| k.kind == Kind::CiliumEnvoyConfig)
                        .cloned()
                        .collect();
                    if served.is_empty() {
                        continue;
                    }
                    let key = served[rng.below(served.len() as u64) as usize].clone();
                    let a = incr.pipeline.quarantine(&key, "NACK".into());
                    let b = reference.quarantine(&key, "NACK".into());
                    assert_eq!(a, b, "seed {seed} step {step}: quarantine {key}");
                    format!("quarantine {key}")
                }
                80..=84 => {
                    let now = std::time::Instant::now();
                    incr.pipeline.retry_all_now();
                    reference.retry_all_now();
                    incr.pipeline.retry_due(now);
                    reference.retry_due(now);
                    "retry".to_owned()
                }
                85..=87 => {
                    let s = rng.below(3);
                    if rng.chance(25) {
                        store.delete(&ObjectKey::new(Kind::Service, "default", &format!("s{s}")));
                        format!("delete service s{s}")
                    } else {
                        // Port 0 is invalid: the Service is rejected.
                        let port = [80, 81, 0][rng.below(3) as usize];
                        apply(&store, &service(&format!("s{s}"), port));
                        format!("service s{s}")
                    }
                }
                88..=89 => {
                    // LB IPAM hands out, moves or withdraws an address.
                    let s = rng.below(3);
                    let key = ObjectKey::new(Kind::Service, "default", &format!("s{s}"));
                    let status = match rng.below(4) {
                        0 => serde_json::json!({"loadBalancer": {}}),
                        n => {
                            serde_json::json!({"loadBalancer": {"ingress": [{"ip": format!("127.9.0.{n}")}]}})
                        }
                    };
                    store.update_status(&key, status);
                    format!("service s{s} LB address")
                }
                90..=95 => {
                    let s = rng.below(3);
                    let ip = format!("10.0.{}.{}", s, 1 + rng.below(5));
                    apply(&store, &slice(&format!("s{s}-1"), &format!("s{s}"), &[&ip]));
                    format!("slice s{s}")
                }
                _ => {
                    apply(
                        &store,
                        &format!(
                            "apiVersion: v1\nkind: Secret\nmetadata: {{name: tls, annotations: {{v: \"{version}\"}}}}\ntype: kubernetes.io/tls\ndata: {{tls.crt: eA==, tls.key: eA==}}\n"
                        ),
                    );
                    "secret".to_owned()
                }
            };
            let got = incr.step(&store);
            let (want, (served, warnings)) = full_extra(&mut reference, &store);
            let ctx = format!(
                "seed {seed} step {step} ({what}, {:?})",
                incr.outcomes.last()
            );
            assert_eq!(got.1, want.1, "rejections after {ctx}");
            assert_eq!(got.0, want.0, "resources after {ctx}");
            assert_eq!(incr.served, served, "served after {ctx}");
            assert_eq!(incr.warnings, warnings, "warnings after {ctx}");
            // Envoy ACKs what it was sent, type by type, now and then
            // only part of a type (names it follows), or reconnects.
            match rng.below(10) {
                0 => {
                    stream += 1;
                    envoy.clear();
                }
                1..=7 => {
                    for t in incr.snapshot.type_urls() {
                        if rng.chance(70) {
                            let mut m: ResourceMap = incr.snapshot.resources(t).clone();
                            if rng.chance(20) {
                                m = m.into_iter().filter(|_| rng.chance(80)).collect();
                            }
                            envoy.insert(t.to_owned(), std::sync::Arc::new(m));
                        }
                    }
                }
                _ => {}
            }
            let mut marked = BTreeSet::new();
            incr.acks
                .check(&incr.served, &incr.snapshot, &envoy, Some(stream), |k| {
                    marked.insert(k.clone());
                });
            let acked = acked_in_full(&served, &incr.snapshot, &envoy);
            assert_eq!(incr.acks.acked, acked, "ACKed after {ctx}");
            assert!(
                acked
                    .iter()
                    .all(|k| marked.contains(k) || acked_before.contains(k)),
                "every newly ACKed object is marked after {ctx}"
            );
            for key in &acked {
                reference.mark_acked(key);
            }
            for key in &marked {
                incr.pipeline.mark_acked(key);
            }
            acked_before = acked;
        }
        let configs = incr.outcomes.iter().filter(|o| **o == "configs").count();
        assert!(
            configs > 40,
            "seed {seed}: most CEC changes take the incremental pass: {:?}",
            incr.outcomes
        );
    }
}

/// The shared CEC laid out by Ingress (`membrane_ingress::SharedLayout`,
/// as the operator writes it: a first part plus parts per Ingress group,
/// only changed parts rewritten) serves exactly what the whole CEC serves,
/// after each change, with the parts decoded one by one between passes.
#[test]
fn split_shared_cec_parts_by_ingress_serve_what_the_whole_cec_serves() {
    use membrane_ingress::{
        SharedLayout, SharedPart, TranslateOptions, merge_shared_preferring, shared_part,
    };
    use membrane_store::Object;

    let opts = TranslateOptions::default();
    let ingress = |i: usize, extra: usize| -> SharedPart {
        let paths: String = (0..5 + extra)
            .map(|j| {
                format!(
                    "{{path: /i{i}/r{j}, pathType: Prefix, backend: {{service: {{name: svc-{}, port: {{number: 80}}}}}}}}, ",
                    (i * 5 + j) % 30
                )
            })
            .collect();
        let host = if i.is_multiple_of(3) {
            "host: a.example.com, "
        } else {
            ""
        };
        let yaml = format!(
            "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: ing-{i}, namespace: bench, creationTimestamp: \"2026-01-01T00:00:{:02}Z\", annotations: {{ingress.cilium.io/loadbalancer-mode: shared}}}}\nspec: {{ingressClassName: cilium, rules: [{{{host}http: {{paths: [{paths}]}}}}]}}\n",
            i % 7
        );
        let Object::Ingress(ing) = parse_documents(&yaml).expect("yaml").remove(0) else {
            panic!("not an Ingress");
        };
        shared_part(&ing, &opts).expect("translates")
    };
    let mut parts: Vec<SharedPart> = (0..40).map(|i| ingress(i, 0)).collect();
    let serving = BTreeSet::new();
    let mut layout = SharedLayout::default();
    let one = Store::new();
    let many = Store::new();
    let mut p1 = ConfigPipeline::new(PortMap::default(), BTreeMap::new());
    let mut p2 = ConfigPipeline::new(PortMap::default(), BTreeMap::new());
    let mut written = Vec::new();
    for change in 0..12 {
        if change > 0 {
            let i = (change * 7) % 40;
            parts[i] = ingress(i, change);
        }
        let out = layout
            .render(&parts, &serving, &opts, 32 * 1024)
            .expect("lays out");
        assert!(
            membrane_ingress::is_by_ingress(&out.translation.cec),
            "laid out by Ingress"
        );
        written.push(out.parts.len() + usize::from(out.head_changed));
        let mut objects: Vec<Object> = out
            .parts
            .into_iter()
            .map(Object::CiliumEnvoyConfig)
            .collect();
        if out.head_changed {
            objects.push(Object::CiliumEnvoyConfig(out.translation.cec.clone()));
        }
        many.apply_all(objects);
        for c in many
            .snapshot()
            .typed::<membrane_crds::CiliumEnvoyConfig>(Some("kube-system"))
        {
            let name = c.metadata.name.clone().unwrap_or_default();
            if !out.names.contains(&name) {
                many.delete(&ObjectKey::new(
                    Kind::CiliumEnvoyConfig,
                    "kube-system",
                    &name,
                ));
            }
        }
        let whole = merge_shared_preferring(&parts, &serving, &opts).cec;
        one.apply(Object::CiliumEnvoyConfig(whole));
        let a = full_content(&mut p1, &one);
        let b = full_content(&mut p2, &many);
        assert!(a.1.is_empty(), "change {change}: {:?}", a.1);
        assert!(
            a == b,
            "change {change}: the joined parts serve other content"
        );
    }
    assert!(
        written[0] > 3,
        "first: every object (several) written: {written:?}"
    );
    // One part per change; two when the Ingress outgrew its part and moved.
    assert!(
        written[1..].iter().all(|&w| (1..=2).contains(&w)),
        "one or two objects written per change: {written:?}"
    );
}
