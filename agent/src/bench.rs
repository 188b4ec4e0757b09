//! Synthetic workloads for the control-plane benchmarks (`membrane bench
//! xds`, `cargo bench -p membrane-agent`). Not part of the agent's
//! behaviour; kept here so the command and the cargo benches measure the
//! same objects.

use std::time::{Duration, Instant};

use membrane_store::{Object, StoreError};
use serde_json::{Value, json};

use crate::{AgentState, Reconciler};

/// Shape of a synthetic cluster: `ingresses × paths` routes spread over
/// `services` Services with `endpoints` ready endpoints each.
#[derive(Debug, Clone)]
pub struct Workload {
    pub ingresses: usize,
    pub paths: usize,
    pub services: usize,
    pub endpoints: usize,
    /// Annotate every Ingress `ingress.cilium.io/loadbalancer-mode: shared`.
    pub shared: bool,
    pub namespace: String,
    /// Port the endpoints listen on (the Services' targetPort).
    pub target_port: u16,
}

impl Workload {
    /// `routes` routes in Ingresses of 10 paths, one Service per two routes,
    /// two endpoints per Service.
    pub fn routes(routes: usize) -> Self {
        let paths = 10;
        Self {
            ingresses: routes.div_ceil(paths),
            paths,
            services: routes.div_ceil(2).max(1),
            endpoints: 2,
            shared: false,
            namespace: "bench".into(),
            target_port: 3000,
        }
    }

    pub fn total_routes(&self) -> usize {
        self.ingresses * self.paths
    }

    pub fn ingress_name(&self, i: usize) -> String {
        format!("ing-{i}")
    }

    pub fn service_name(&self, s: usize) -> String {
        format!("svc-{s}")
    }

    /// The Service route `j` of Ingress `i` goes to.
    pub fn service_of(&self, i: usize, j: usize) -> usize {
        (i * self.paths + j) % self.services.max(1)
    }

    /// Path of route `j` of Ingress `i`; unique across Ingresses so that
    /// shared mode (one virtual host for all) has no conflicts.
    pub fn path(&self, i: usize, j: usize) -> String {
        format!("/i{i}/r{j}")
    }

    /// The `k`-th path added after start, to Ingress `i`.
    pub fn extra_path(i: usize, k: usize) -> String {
        format!("/i{i}/added-{k}")
    }

    /// Ingress `i` with its routes plus `extra` (path, service index) routes.
    pub fn ingress(&self, i: usize, extra: &[(String, usize)]) -> Value {
        let mut paths: Vec<Value> = (0..self.paths)
            .map(|j| self.http_path(&self.path(i, j), self.service_of(i, j)))
            .collect();
        paths.extend(extra.iter().map(|(p, s)| self.http_path(p, *s)));
        let mut metadata = json!({"name": self.ingress_name(i), "namespace": self.namespace});
        if self.shared {
            metadata["annotations"] = json!({"ingress.cilium.io/loadbalancer-mode": "shared"});
        }
        json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "Ingress",
            "metadata": metadata,
            "spec": {
                "ingressClassName": "cilium",
                "rules": [{"http": {"paths": paths}}],
            },
        })
    }

    fn http_path(&self, path: &str, service: usize) -> Value {
        json!({
            "path": path,
            "pathType": "Prefix",
            "backend": {"service": {"name": self.service_name(service), "port": {"number": 80}}},
        })
    }

    /// Service `s` and its EndpointSlice; endpoint `e` has address `ip(s, e)`.
    pub fn service(&self, s: usize, ip: &dyn Fn(usize, usize) -> String) -> [Value; 2] {
        let name = self.service_name(s);
        let endpoints: Vec<Value> = (0..self.endpoints)
            .map(|e| json!({"addresses": [ip(s, e)], "conditions": {"ready": true}}))
            .collect();
        [
            json!({
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "namespace": self.namespace},
                "spec": {"ports": [{"port": 80, "targetPort": self.target_port}]},
            }),
            json!({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": format!("{name}-1"),
                    "namespace": self.namespace,
                    "labels": {"kubernetes.io/service-name": name},
                },
                "addressType": "IPv4",
                "ports": [{"port": self.target_port}],
                "endpoints": endpoints,
            }),
        ]
    }

    /// Everything: the IngressClass, every Service with its slice, every
    /// Ingress. Endpoint addresses come from `ip(service, endpoint)`.
    pub fn objects(&self, ip: &dyn Fn(usize, usize) -> String) -> Vec<Value> {
        let mut out = vec![json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "IngressClass",
            "metadata": {"name": "cilium"},
            "spec": {"controller": "cilium.io/ingress-controller"},
        })];
        for s in 0..self.services {
            out.extend(self.service(s, ip));
        }
        for i in 0..self.ingresses {
            out.push(self.ingress(i, &[]));
        }
        out
    }

    /// [`Self::objects`] as store objects.
    pub fn store_objects(
        &self,
        ip: &dyn Fn(usize, usize) -> String,
    ) -> Result<Vec<Object>, StoreError> {
        self.objects(ip)
            .into_iter()
            .map(Object::from_value)
            .collect()
    }
}

/// Distinct addresses in 10.0.0.0/8 for synthetic endpoints.
pub fn pod_ip(service: usize, endpoint: usize) -> String {
    let n = service * 16 + endpoint + 1;
    format!("10.{}.{}.{}", (n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff)
}

/// Figures of [`translation`].
#[derive(Debug, Clone)]
pub struct TranslationReport {
    pub routes: usize,
    pub services: usize,
    pub ingresses: usize,
    pub resources: usize,
    /// Pure `membrane_ingress::translate` of every Ingress.
    pub translate_all: Duration,
    /// `ConfigPipeline::run` over every generated CEC, from cold caches.
    pub pipeline_cold: Duration,
    /// Building the xDS snapshot from the pass's resources.
    pub snapshot_build: Duration,
    /// First full agent pass (LB IPAM, Ingress controller, pipeline,
    /// snapshot) on a fresh store, until the store settles.
    pub first_pass: Duration,
    /// Full agent pass after one Ingress gained a path (samples).
    pub ingress_change: Vec<Duration>,
    /// Of that pass, the config pipeline with its bookkeeping (snapshot
    /// update, served state, ACK check and report) for the one changed
    /// CEC: the agent's part, without the Ingress controller (samples).
    pub cec_change: Vec<Duration>,
    /// Full agent pass after one EndpointSlice changed (samples).
    pub endpoint_change: Vec<Duration>,
    /// Full agent pass with nothing changed (samples).
    pub noop: Vec<Duration>,
}

/// Quantile `q` (0..=1) of `samples` (sorted in place), nearest rank.
pub fn quantile(samples: &mut [Duration], q: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort();
    let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
    samples[rank - 1]
}

/// The agent with everything but Envoy: a store, the xDS cache (no
/// streams) and the reconciler the live loop runs.
pub struct Harness {
    pub state: AgentState,
    pub reconciler: Reconciler,
}

impl Harness {
    /// `controller`: the operator's pass (as `membrane up` runs it), so
    /// Ingresses in the store become CECs.
    pub fn new(
        lb_pool: &str,
        controller: Option<Box<dyn crate::Controller>>,
    ) -> Result<Self, crate::lb_ipam::PoolError> {
        let config = crate::AgentConfig {
            run_dir: std::env::temp_dir(),
            api_socket: std::env::temp_dir().join("membrane-bench.sock"),
            envoy_bin: None,
            envoy_admin_port: None,
            envoy_concurrency: 1,
            envoy_log_level: "warning".into(),
            xds_protocol: crate::XdsProtocol::Delta,
            lb_pool: lb_pool.parse()?,
            ports: crate::PortMap::default(),
            node_name: "bench".into(),
            node_labels: Default::default(),
            node_uid: None,
            node_labels_updates: None,
            proxy_ports: None,
            datapath: None,
            cni: None,
        };
        let (_tx, envoy) = tokio::sync::watch::channel(crate::EnvoyState::default());
        let state = AgentState {
            store: membrane_store::Store::new(),
            cache: membrane_xds::SnapshotCache::new(),
            node_id: config.node_id(),
            envoy,
            rejections: Default::default(),
            nacks_isolated: Default::default(),
            warnings: Default::default(),
            datapath: None,
            endpoints: None,
            policy: None,
        };
        Ok(Self {
            reconciler: Reconciler::new(&config, controller),
            state,
        })
    }

    /// One store pass, as the live loop runs it on a store change.
    pub fn pass(&mut self) -> Duration {
        let t = Instant::now();
        self.reconciler.store_pass(&self.state);
        t.elapsed()
    }

    /// Passes until a pass changes nothing in the store (LB addresses and
    /// generated objects are written by passes themselves); total time.
    pub fn settle(&mut self) -> Duration {
        let mut total = Duration::ZERO;
        for _ in 0..10 {
            let before = self.state.store.revision();
            total += self.pass();
            if self.state.store.revision() == before {
                break;
            }
        }
        total
    }
}

/// Error of a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Pool(#[from] crate::lb_ipam::PoolError),
    #[error("translating {0}: {1}")]
    Translate(String, String),
}

/// Translation + pipeline + snapshot for `w`, then `samples` incremental
/// passes of each kind.
pub fn translation(
    w: &Workload,
    samples: usize,
    controller: Box<dyn crate::Controller>,
) -> Result<TranslationReport, BenchError> {
    use k8s_openapi::api::networking::v1::Ingress;
    let objects = w.store_objects(&pod_ip)?;
    let ingresses: Vec<Ingress> = objects
        .iter()
        .filter_map(|o| match o {
            Object::Ingress(i) => Some(i.clone()),
            _ => None,
        })
        .collect();
    let opts = membrane_ingress::TranslateOptions::default();

    // Pure parts, from cold.
    let t = Instant::now();
    let mut cecs = Vec::new();
    for ing in &ingresses {
        let tr = membrane_ingress::translate(ing, &opts).map_err(|e| {
            BenchError::Translate(ing.metadata.name.clone().unwrap_or_default(), e.to_string())
        })?;
        cecs.push(Object::CiliumEnvoyConfig(tr.cec));
        cecs.push(Object::Service(tr.service));
        cecs.push(Object::EndpointSlice(tr.endpoint_slice));
    }
    let translate_all = t.elapsed();
    let pure = membrane_store::Store::new();
    pure.apply_all(objects.clone());
    pure.apply_all(cecs);
    let snap = pure.snapshot();
    let mut pipeline =
        crate::configs::ConfigPipeline::new(crate::PortMap::default(), Default::default());
    let t = Instant::now();
    let pass = pipeline.run(&snap);
    let pipeline_cold = t.elapsed();
    let t = Instant::now();
    let snapshot = crate::build_snapshot(&pass.resources);
    let snapshot_build = t.elapsed();
    drop(snapshot);

    // The live path: the agent's pass on a store.
    let mut h = Harness::new("127.100.0.0/16", Some(controller))?;
    h.state.store.apply_all(objects);
    let first_pass = h.settle();
    let resources = h.reconciler.xds_snapshot.len();
    let mut noop = Vec::new();
    let mut ingress_change = Vec::new();
    let mut cec_change = Vec::new();
    let mut endpoint_change = Vec::new();
    for k in 0..samples {
        noop.push(h.pass());
        let i = (k * 7919) % w.ingresses.max(1);
        let ing = w.ingress(i, &[(Workload::extra_path(i, k), k % w.services.max(1))]);
        h.state.store.apply(Object::from_value(ing)?);
        ingress_change.push(h.pass());
        let t = Instant::now();
        if h.reconciler.ack_pass(&h.state) {
            std::hint::black_box(crate::report::build(
                &h.reconciler,
                &h.reconciler.acks.acked,
            ));
        }
        cec_change.push(h.reconciler.pipeline_time + t.elapsed());
        h.settle();
        let s = (k * 104_729) % w.services.max(1);
        let [_, slice] = w.service(s, &|s, e| pod_ip(s + 1 + k, e));
        h.state.store.apply(Object::from_value(slice)?);
        endpoint_change.push(h.pass());
        h.settle();
    }
    Ok(TranslationReport {
        routes: w.total_routes(),
        services: w.services,
        ingresses: w.ingresses,
        resources,
        translate_all,
        pipeline_cold,
        snapshot_build,
        first_pass,
        ingress_change,
        cec_change,
        endpoint_change,
        noop,
    })
}

impl std::fmt::Display for TranslationReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let q = |v: &[Duration], p: f64| ms(quantile(&mut v.to_vec(), p));
        writeln!(
            f,
            "workload: {} routes in {} Ingresses, {} Services; {} xDS resources",
            self.routes, self.ingresses, self.services, self.resources
        )?;
        writeln!(
            f,
            "  translate every Ingress (pure)        {:9.2} ms",
            ms(self.translate_all)
        )?;
        writeln!(
            f,
            "  ConfigPipeline::run, cold caches      {:9.2} ms",
            ms(self.pipeline_cold)
        )?;
        writeln!(
            f,
            "  snapshot build                        {:9.2} ms",
            ms(self.snapshot_build)
        )?;
        writeln!(
            f,
            "  first agent pass until settled        {:9.2} ms",
            ms(self.first_pass)
        )?;
        for (what, v) in [
            ("agent pass, one Ingress changed", &self.ingress_change),
            ("  of it pipeline + bookkeeping", &self.cec_change),
            (
                "agent pass, one EndpointSlice changed",
                &self.endpoint_change,
            ),
            ("agent pass, nothing changed", &self.noop),
        ] {
            writeln!(
                f,
                "  {what:<37} p50 {:8.2} ms  p99 {:8.2} ms  (n={})",
                q(v, 0.5),
                q(v, 0.99),
                v.len()
            )?;
        }
        Ok(())
    }
}
