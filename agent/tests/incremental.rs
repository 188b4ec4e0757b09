//! The incremental pipeline (`ConfigPipeline::run_changes` fed by the
//! store's change log) must serve exactly what a pass over the whole store
//! serves, step by step, whatever the change: slices (valid, invalid,
//! relabelled, deleted), legacy Endpoints, Services, Secrets and CECs
//! (including a first-come conflict within one creation second).

use std::collections::{BTreeMap, BTreeSet};

use membrane_agent::configs::{ConfigPipeline, PassOutcome, PipelineChanges};
use membrane_agent::placement::PortMap;
use membrane_store::{Kind, ObjectKey, Store, parse_documents};

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

/// The incremental side, kept as the agent keeps it.
struct Incremental {
    pipeline: ConfigPipeline,
    seen: Option<u64>,
    resources: BTreeMap<(String, String), (u64, String)>,
    rejected: BTreeMap<ObjectKey, String>,
    /// How each step was handled: "unchanged", "endpoints" or "full".
    outcomes: Vec<&'static str>,
}

impl Incremental {
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
            PassOutcome::Full(pass) => {
                self.outcomes.push("full");
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
    let pass = pipeline.run(&store.snapshot());
    (
        pass.resources
            .iter()
            .map(|r| (r.type_url.clone(), r.name.clone(), r.hash))
            .collect(),
        pass.rejected,
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

    let mut incr = Incremental {
        pipeline: ConfigPipeline::new(PortMap::default(), BTreeMap::new()),
        seen: None,
        resources: BTreeMap::new(),
        rejected: BTreeMap::new(),
        outcomes: Vec::new(),
    };
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
            "Service port change",
            "full",
            Box::new(|s| apply(s, &service("a", 81))),
        ),
        (
            "a contested address within the same second",
            "full",
            Box::new(|s| apply(s, &cec("aa-two", 21101, &["b"]))),
        ),
        (
            "a CEC on its own address",
            "full",
            Box::new(|s| apply(s, &cec("three", 21102, &["b"]))),
        ),
        (
            "slice change with three CECs",
            "endpoints",
            Box::new(|s| apply(s, &slice("b-1", "b", &["10.0.1.9"]))),
        ),
        (
            "the first CEC goes",
            "full",
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
            "a slice moves while a CEC changes (one full pass)",
            "full",
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
            r["name"]
                .as_str()
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
    let is_cluster =
        |r: &serde_json::Value| r["@type"].as_str().is_some_and(|t| t.ends_with(".Cluster"));
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
    cluster["connectTimeout"] = "7s".into();
    many.apply(Object::CiliumEnvoyConfig(part));
    let c = full_content(&mut p2, &many);
    assert!(c != b, "the change is served");
    assert!(c.1.is_empty(), "{:?}", c.1);
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
