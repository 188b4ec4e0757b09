//! Membrane's Ingress conformance runner: executes the upstream
//! kubernetes-sigs/ingress-controller-conformance feature files, unmodified, against a
//! running Membrane. It is a black box tester: it talks to Membrane only through the local
//! API (docs/local-api.md) and real HTTP(S) to the Ingress address, and runs the echo
//! backends ("pods") in process on loopback addresses.
//!
//! [`run`] is the entry point; [`echo`] is the backend on its own.

pub mod api;
pub mod assertions;
pub mod backends;
pub mod certs;
pub mod client;
pub mod echo;
pub mod features;
pub mod objects;
pub mod report;
pub mod steps;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cucumber::{gherkin, parser, runner, writer};
use futures::stream;

pub use client::Ports;
pub use report::{ScenarioOutcome, StepFailure};

use api::{ApiError, LocalApi};
use features::FeatureError;
use report::{Out, Reporter, SharedBuf, SharedOut, say};
use steps::{ConformanceWorld, RunContext};

/// upstream's wait for a foreign-class Ingress to (not) get an address.
pub const DEFAULT_INGRESS_CLASS_WAIT: Duration = Duration::from_secs(300);
/// upstream's sleep after scaling the load-balancing backend to 10 pods.
pub const DEFAULT_SCALE_SETTLE: Duration = Duration::from_secs(60);
/// docs/local-api.md default socket.
pub const DEFAULT_API_SOCKET: &str = "/run/membrane/api.sock";

#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Directory of `*.feature` files (read in place, never copied). Relative paths that do
    /// not exist from the current directory are tried from the workspace root.
    pub features: PathBuf,
    /// Set as `spec.ingressClassName` when a scenario's Ingress has none; an IngressClass
    /// of this name (controller `cilium.io/ingress-controller`) is created if missing.
    pub ingress_class: String,
    pub ingress_class_wait: Duration,
    pub scale_settle: Duration,
    /// Where to write the cucumber JSON report.
    pub report: Option<PathBuf>,
    pub api_socket: PathBuf,
    pub http_port: u16,
    pub https_port: u16,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            features: PathBuf::from(features::DEFAULT_FEATURES),
            ingress_class: "cilium".to_owned(),
            ingress_class_wait: DEFAULT_INGRESS_CLASS_WAIT,
            scale_settle: DEFAULT_SCALE_SETTLE,
            report: None,
            api_socket: PathBuf::from(DEFAULT_API_SOCKET),
            http_port: 80,
            https_port: 443,
        }
    }
}

impl RunOptions {
    /// One line per setting that differs from upstream's behaviour; printed with the results
    /// so a shortened run is never mistaken for a faithful one.
    pub fn non_default_notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if self.ingress_class_wait != DEFAULT_INGRESS_CLASS_WAIT {
            notes.push(format!(
                "ingress_class_wait = {:?} (upstream waits {:?})",
                self.ingress_class_wait, DEFAULT_INGRESS_CLASS_WAIT
            ));
        }
        if self.scale_settle != DEFAULT_SCALE_SETTLE {
            notes.push(format!(
                "scale_settle = {:?} (upstream sleeps {:?})",
                self.scale_settle, DEFAULT_SCALE_SETTLE
            ));
        }
        if self.http_port != 80 || self.https_port != 443 {
            notes.push(format!(
                "Ingress ports {}/{} (upstream uses 80/443)",
                self.http_port, self.https_port
            ));
        }
        notes
    }
}

#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub passed: usize,
    pub failed: usize,
    pub scenarios: Vec<ScenarioOutcome>,
    /// Failures outside any scenario.
    pub errors: Vec<String>,
    /// Non-default settings this run used.
    pub notes: Vec<String>,
    pub features_dir: PathBuf,
    pub report: Option<PathBuf>,
    /// Wall time of the scenarios.
    pub elapsed: Duration,
}

impl Summary {
    /// Every scenario passed and at least one ran.
    pub fn success(&self) -> bool {
        self.failed == 0 && self.passed > 0
    }

    /// The closing line.
    pub fn counts_line(&self) -> String {
        format!("{} passed, {} failed", self.passed, self.failed)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConformanceError {
    #[error(transparent)]
    Features(#[from] FeatureError),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("setting up the run: {0}")]
    Setup(String),
    #[error("writing the report {path}: {source}")]
    Report {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("conformance runner: {0}")]
    Runner(String),
}

/// Runs every scenario and prints progress and results to stdout.
pub async fn run(opts: RunOptions) -> Result<Summary, ConformanceError> {
    run_with_output(opts, Box::new(std::io::stdout())).await
}

/// [`run`] with the progress output sent to `out`.
pub async fn run_with_output(opts: RunOptions, out: Out) -> Result<Summary, ConformanceError> {
    let out: SharedOut = Arc::new(std::sync::Mutex::new(out));
    let features_dir = features::resolve_dir(&opts.features);
    let feats = features::load_dir(&features_dir)?;
    let notes = opts.non_default_notes();
    let scenario_count: usize = feats.iter().map(|f| f.scenarios.len()).sum();
    say(
        &out,
        &format!(
            "Ingress conformance: {} features, {scenario_count} scenarios from {}",
            feats.len(),
            features_dir.display()
        ),
    );
    for n in &notes {
        say(&out, &format!("NOTE: non-default setting: {n}"));
    }

    let api = LocalApi::new(&opts.api_socket);
    let mut notes = notes;
    if let Some(n) = ensure_ingress_class(&api, &opts.ingress_class).await? {
        say(&out, &format!("NOTE: {n}"));
        notes.push(n);
    }
    cleanup_leftover_namespaces(&api).await?;

    let ctx = Arc::new(RunContext {
        api,
        ingress_class: opts.ingress_class.clone(),
        ingress_class_wait: opts.ingress_class_wait,
        scale_settle: opts.scale_settle,
        ports: Ports {
            http: opts.http_port,
            https: opts.https_port,
        },
    });
    let json = opts.report.as_ref().map(|_| SharedBuf::default());
    let started = std::time::Instant::now();
    let (outcomes, errors) = execute_on_own_thread(feats, ctx, out.clone(), json.clone()).await?;
    let elapsed = started.elapsed();

    let failed_scenarios: Vec<&ScenarioOutcome> = outcomes.iter().filter(|o| !o.passed).collect();
    let summary = Summary {
        passed: outcomes.len() - failed_scenarios.len(),
        failed: failed_scenarios.len() + errors.len(),
        scenarios: outcomes.clone(),
        errors: errors.clone(),
        notes,
        features_dir,
        report: opts.report.clone(),
        elapsed,
    };

    if let (Some(path), Some(buf)) = (&opts.report, &json) {
        let bytes = buf
            .0
            .lock()
            .map(|b| b.clone())
            .map_err(|_| ConformanceError::Runner("report buffer poisoned".into()))?;
        std::fs::write(path, bytes).map_err(|source| ConformanceError::Report {
            path: path.clone(),
            source,
        })?;
    }

    let mut text = String::from("\n");
    if !failed_scenarios.is_empty() || !errors.is_empty() {
        text.push_str("Failures:\n");
        for o in &failed_scenarios {
            text.push_str(&format!("  {} \"{}\"\n", o.location, o.scenario));
            if let Some(f) = &o.failure {
                text.push_str(&format!(
                    "    step {} \"{}\"\n    {}\n",
                    f.location,
                    f.step,
                    f.reason.replace('\n', "\n    ")
                ));
            }
        }
        for e in &errors {
            text.push_str(&format!("  {e}\n"));
        }
    }
    for n in &summary.notes {
        text.push_str(&format!("NOTE: non-default setting: {n}\n"));
    }
    if let Some(p) = &summary.report {
        text.push_str(&format!("cucumber JSON report: {}\n", p.display()));
    }
    text.push_str(&format!("ran in {:.1}s\n", elapsed.as_secs_f64()));
    text.push_str(&summary.counts_line());
    say(&out, &text);
    Ok(summary)
}

/// cucumber's step futures are `!Send`; running them on a dedicated current-thread runtime
/// keeps [`run`]'s future `Send` so callers can spawn it.
async fn execute_on_own_thread(
    feats: Vec<gherkin::Feature>,
    ctx: Arc<RunContext>,
    out: SharedOut,
    json: Option<SharedBuf>,
) -> Result<(Vec<ScenarioOutcome>, Vec<String>), ConformanceError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("membrane-conformance".into())
        .spawn(move || {
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| ConformanceError::Runner(format!("starting the runtime: {e}")))
                .and_then(|rt| rt.block_on(execute(feats, ctx, out, json)));
            let _ = tx.send(result);
        })
        .map_err(|e| ConformanceError::Runner(format!("starting the runner thread: {e}")))?;
    rx.await
        .map_err(|_| ConformanceError::Runner("the runner thread ended without a result".into()))?
}

/// Hands already parsed (and Go-style expanded) features to cucumber.
struct Preparsed;

impl parser::Parser<Vec<gherkin::Feature>> for Preparsed {
    type Cli = cucumber::cli::Empty;
    type Output = stream::Iter<std::vec::IntoIter<parser::Result<gherkin::Feature>>>;

    fn parse(self, input: Vec<gherkin::Feature>, _: Self::Cli) -> Self::Output {
        stream::iter(input.into_iter().map(Ok).collect::<Vec<_>>())
    }
}

async fn execute(
    feats: Vec<gherkin::Feature>,
    ctx: Arc<RunContext>,
    out: SharedOut,
    json: Option<SharedBuf>,
) -> Result<(Vec<ScenarioOutcome>, Vec<String>), ConformanceError> {
    let collection =
        steps::collection().map_err(|e| ConformanceError::Runner(format!("step regex: {e}")))?;
    let runner = runner::Basic::default()
        .max_concurrent_scenarios(1)
        // "Concurrent" capped at one scenario at a time: one after another in file order
        // (cucumber queues each feature's Serial scenarios in front of earlier ones).
        .which_scenario(|_, _, _| runner::ScenarioType::Concurrent)
        .steps(collection)
        .before(move |_, _, _, world: &mut ConformanceWorld| {
            let ctx = ctx.clone();
            Box::pin(async move {
                world.ctx = Some(ctx);
            })
        })
        .after(|_, _, _, _, world: Option<&mut ConformanceWorld>| {
            Box::pin(async move {
                if let Some(w) = world {
                    w.cleanup().await;
                }
            })
        });
    let reporter = writer::Normalize::new(Reporter::new(out, json));
    let cli: cucumber::cli::Opts<_, _, _, cucumber::cli::Empty> = cucumber::cli::Opts::default();
    let done = cucumber::Cucumber::<_, _, _, _, _, cucumber::cli::Empty>::custom(
        Preparsed, runner, reporter,
    )
    .with_cli(cli)
    .run(feats)
    .await;
    let reporter = done.inner_writer();
    Ok((reporter.outcomes.clone(), reporter.errors.clone()))
}

/// Creates the suite's IngressClass when missing; returns a note when an existing one
/// names another controller.
async fn ensure_ingress_class(api: &LocalApi, name: &str) -> Result<Option<String>, ApiError> {
    match api.get("ingressclass", None, name).await? {
        Some(existing) => {
            let controller = existing
                .pointer("/spec/controller")
                .and_then(serde_json::Value::as_str)
                .unwrap_or_default();
            if controller != objects::CILIUM_CONTROLLER {
                return Ok(Some(format!(
                    "IngressClass {name} exists with controller {controller:?}, not {:?}",
                    objects::CILIUM_CONTROLLER
                )));
            }
            Ok(None)
        }
        None => {
            api.apply(&objects::ingress_class_manifest(name).to_string())
                .await?;
            Ok(None)
        }
    }
}

/// upstream `CleanupNamespaces`: remove namespaces a previous run left behind.
async fn cleanup_leftover_namespaces(api: &LocalApi) -> Result<(), ApiError> {
    let (key, value) = objects::NAMESPACE_LABEL;
    for ns in api.list("namespace", None).await? {
        let labelled = ns
            .pointer("/metadata/labels")
            .and_then(|l| l.get(key))
            .and_then(serde_json::Value::as_str)
            == Some(value);
        if let (true, Some(name)) = (
            labelled,
            ns.pointer("/metadata/name").and_then(|n| n.as_str()),
        ) {
            tracing::info!(namespace = name, "deleting leftover conformance namespace");
            api.delete(&objects::namespace_manifest(name).to_string())
                .await?;
        }
    }
    Ok(())
}
