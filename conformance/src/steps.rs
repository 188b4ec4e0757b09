//! The upstream step sentences (regexes copied from
//! kubernetes-sigs/ingress-controller-conformance `test/conformance/*/feature.go`) and their
//! implementation against Membrane's local API and Ingress address.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cucumber::World;
use cucumber::step::Context;
use futures::future::LocalBoxFuture;
use k8s_openapi::api::networking::v1::Ingress;
use regex::Regex;
use serde_json::{Value, json};

use crate::api::{ApiError, LocalApi};
use crate::assertions::{self, ResultStatus};
use crate::backends::Deployment;
use crate::client::{self, CapturedRequest, CapturedResponse, Ports};
use crate::objects::{self, NAMESPACE_PREFIX};

/// upstream `WaitForIngressAddressTimeout` / `WaitForEndpointsTimeout`.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(300);
pub const ENDPOINTS_TIMEOUT: Duration = Duration::from_secs(300);
/// Upstream polls every 5 s; Membrane answers from memory, so poll faster.
const POLL: Duration = Duration::from_millis(250);

/// Run-wide settings every scenario's world gets (via the before hook).
#[derive(Debug)]
pub struct RunContext {
    pub api: LocalApi,
    pub ingress_class: String,
    pub ingress_class_wait: Duration,
    pub scale_settle: Duration,
    pub ports: Ports,
}

/// Per-scenario state (upstream `state.Scenario` plus the echo pods it deployed).
#[derive(Debug, Default)]
pub struct ConformanceWorld {
    pub ctx: Option<Arc<RunContext>>,
    pub namespace: Option<String>,
    pub ingress_name: Option<String>,
    pub secret_name: Option<String>,
    pub ip_or_fqdn: Option<String>,
    pub request: Option<CapturedRequest>,
    pub response: Option<CapturedResponse>,
    pub result_status: ResultStatus,
    pub deployments: Vec<Deployment>,
}

impl World for ConformanceWorld {
    type Error = Infallible;

    async fn new() -> Result<Self, Infallible> {
        Ok(ConformanceWorld::default())
    }
}

type StepResult = Result<(), String>;

/// Fails the running step. `resume_unwind` skips the panic hook, so a failing assertion
/// does not print a panic backtrace; cucumber catches it and reports the `String`.
pub fn fail(reason: String) -> ! {
    std::panic::resume_unwind(Box::new(reason))
}

impl ConformanceWorld {
    fn ctx(&self) -> Result<Arc<RunContext>, String> {
        self.ctx
            .clone()
            .ok_or_else(|| "internal: scenario started without run context".to_owned())
    }

    fn namespace(&self) -> Result<String, String> {
        // upstream would create objects in "" and be refused; say so directly.
        self.namespace.clone().ok_or_else(|| {
            "no namespace: \"a new random namespace\" did not run or failed".to_owned()
        })
    }

    fn address(&self) -> Result<String, String> {
        self.ip_or_fqdn.clone().ok_or_else(|| {
            "the Ingress address is unknown: the Ingress status step did not succeed".to_owned()
        })
    }

    /// AfterScenario: delete the namespace (and with it every object of the scenario), then
    /// stop the echo pods.
    pub async fn cleanup(&mut self) {
        if let (Some(ns), Some(ctx)) = (&self.namespace, &self.ctx) {
            let body = objects::namespace_manifest(ns).to_string();
            if let Err(e) = ctx.api.delete(&body).await {
                tracing::warn!(namespace = %ns, error = %e, "deleting the scenario namespace failed");
            }
        }
        for d in &mut self.deployments {
            d.stop().await;
        }
        self.deployments.clear();
    }
}

// ---------------------------------------------------------------------------------------
// Kubernetes-side steps

async fn new_namespace(w: &mut ConformanceWorld) -> StepResult {
    let ctx = w.ctx()?;
    // generateName semantics: retry on the (unlikely) collision with an existing namespace.
    for _ in 0..8 {
        let name = format!("{NAMESPACE_PREFIX}{}", objects::random_suffix(5));
        let results = ctx
            .api
            .apply(&objects::namespace_manifest(&name).to_string())
            .await
            .map_err(|e| format!("unable to create namespace: {e}"))?;
        if results.iter().any(|r| r.result == "created") {
            w.namespace = Some(name);
            return Ok(());
        }
    }
    Err("unable to create namespace: every generated name already existed".to_owned())
}

/// upstream `DeploymentsFromIngress` + `NewIngress`.
async fn create_ingress(w: &mut ConformanceWorld, ingress: Ingress) -> StepResult {
    let ctx = w.ctx()?;
    let ns = w.namespace()?;
    let name = ingress
        .metadata
        .name
        .clone()
        .ok_or_else(|| "the Ingress has no metadata.name".to_owned())?;
    for backend in objects::backends_of(&ingress)? {
        let mut d = Deployment::new(&ns, &name, backend);
        let started = d.scale(1).await;
        let pods = d.pod_addrs();
        let svc = objects::service_manifest(&ns, &name, &d.backend);
        let slice = objects::endpoint_slice_manifest(&ns, &d.slice_name, &d.backend, &pods);
        let service = d.backend.service.clone();
        w.deployments.push(d);
        started.map_err(|e| format!("starting the echo pod for service {service}: {e}"))?;
        apply(&ctx.api, vec![svc, slice])
            .await
            .map_err(|e| format!("creating service ({service}): {e}"))?;
    }
    let doc = serde_json::to_value(&ingress).map_err(|e| format!("encoding the Ingress: {e}"))?;
    apply(&ctx.api, vec![doc]).await?;
    w.ingress_name = Some(name);
    Ok(())
}

async fn apply(api: &LocalApi, items: Vec<Value>) -> StepResult {
    let what: Vec<String> = items.iter().map(objects::describe).collect();
    let body = json!({ "apiVersion": "v1", "kind": "List", "items": items }).to_string();
    api.apply(&body)
        .await
        .map_err(|e| format!("applying {}: {e}", what.join(", ")))?;
    Ok(())
}

async fn ingress_named_with_spec(w: &mut ConformanceWorld, c: Context) -> StepResult {
    let name = arg(&c, 1)?;
    let ns = w.namespace()?;
    let class = w.ctx()?.ingress_class.clone();
    let ingress = objects::ingress_from_spec(&name, &ns, &docstring(&c)?, &class)?;
    create_ingress(w, ingress).await?;
    // upstream records the step's name even if the manifest were to differ.
    w.ingress_name = Some(name);
    Ok(())
}

async fn ingress_resource(w: &mut ConformanceWorld, c: Context) -> StepResult {
    let ns = w.namespace()?;
    let class = w.ctx()?.ingress_class.clone();
    let ingress = objects::ingress_from_manifest(&ns, &docstring(&c)?, &class)?;
    create_ingress(w, ingress).await
}

async fn ingress_in_new_namespace(w: &mut ConformanceWorld, c: Context) -> StepResult {
    new_namespace(w).await?;
    ingress_resource(w, c).await
}

async fn self_signed_secret(w: &mut ConformanceWorld, c: Context) -> StepResult {
    let (secret, host) = (arg(&c, 1)?, arg(&c, 2)?);
    let ns = w.namespace()?;
    let ctx = w.ctx()?;
    // RSA key generation takes seconds in debug builds; keep the echo pods responsive.
    let hosts = vec![host];
    let cert = tokio::task::spawn_blocking(move || crate::certs::self_signed_rsa(&hosts))
        .await
        .map_err(|e| format!("generating the certificate: {e}"))?
        .map_err(|e| e.to_string())?;
    let doc = objects::tls_secret_manifest(&ns, &secret, &cert.cert_pem, &cert.key_pem);
    apply(&ctx.api, vec![doc]).await?;
    w.secret_name = Some(secret);
    Ok(())
}

/// Current addresses of the scenario's Ingress; `Ok(None)` when it does not exist.
async fn ingress_addresses(
    api: &LocalApi,
    ns: &str,
    name: &str,
) -> Result<Option<Vec<String>>, ApiError> {
    Ok(api
        .get("ingress", Some(ns), name)
        .await?
        .map(|v| objects::ingress_addresses(&v)))
}

async fn status_shows_address(w: &mut ConformanceWorld) -> StepResult {
    let ctx = w.ctx()?;
    let ns = w.namespace()?;
    let name = w
        .ingress_name
        .clone()
        .ok_or_else(|| "no Ingress was created in this scenario".to_owned())?;
    let start = Instant::now();
    loop {
        match ingress_addresses(&ctx.api, &ns, &name).await {
            Ok(Some(addrs)) => {
                if let Some(first) = addrs.into_iter().next() {
                    w.ip_or_fqdn = Some(first);
                    return Ok(());
                }
            }
            // upstream: NotFound is not retryable.
            Ok(None) => {
                return Err(format!(
                    "waiting for ingress status update: ingresses.networking.k8s.io \"{name}\" not found"
                ));
            }
            Err(ApiError::Transport { detail, .. }) => {
                tracing::debug!(%detail, "retrying Ingress status read");
            }
            Err(e) => return Err(format!("waiting for ingress status update: {e}")),
        }
        if start.elapsed() >= STATUS_TIMEOUT {
            return Err(format!(
                "waiting for ingress status update: timed out after {STATUS_TIMEOUT:?}: \
                 Ingress {ns}/{name} has no status.loadBalancer.ingress ip or hostname"
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn status_has_no_address(w: &mut ConformanceWorld) -> StepResult {
    let ctx = w.ctx()?;
    let ns = w.namespace()?;
    let name = w
        .ingress_name
        .clone()
        .ok_or_else(|| "no Ingress was created in this scenario".to_owned())?;
    let start = Instant::now();
    // Upstream passes once its 5 minute wait for an address times out; an address showing up
    // at any point fails it, so stop as soon as one does.
    loop {
        match ingress_addresses(&ctx.api, &ns, &name).await {
            Ok(Some(addrs)) if !addrs.is_empty() => {
                return Err(format!(
                    "waiting for Ingress status should not return an IP address or FQDN \
                     (got {} after {:.1}s)",
                    addrs.join(", "),
                    start.elapsed().as_secs_f64()
                ));
            }
            Ok(_) => {}
            // Unlike upstream (where any API error ends the wait "successfully"), an
            // unobservable status is not evidence of a correct controller.
            Err(ApiError::Transport { detail, .. }) => {
                tracing::debug!(%detail, "retrying Ingress status read");
            }
            Err(e) => return Err(format!("reading the Ingress status: {e}")),
        }
        let elapsed = start.elapsed();
        if elapsed >= ctx.ingress_class_wait {
            return Ok(());
        }
        tokio::time::sleep(POLL.min(ctx.ingress_class_wait - elapsed)).await;
    }
}

async fn scale_backend(w: &mut ConformanceWorld, c: Context) -> StepResult {
    let service = arg(&c, 1)?;
    let replicas: usize = int_arg(&c, 2)?;
    let ctx = w.ctx()?;
    let ns = w.namespace()?;
    let ingress = w.ingress_name.clone().unwrap_or_default();
    let d = w
        .deployments
        .iter_mut()
        .find(|d| d.backend.service == service)
        .ok_or_else(|| format!("deployments.apps \"{ingress}-{service}\" not found"))?;
    d.scale(replicas)
        .await
        .map_err(|e| format!("scaling {}: {e}", d.name()))?;
    let slice = objects::endpoint_slice_manifest(&ns, &d.slice_name, &d.backend, &d.pod_addrs());
    apply(&ctx.api, vec![slice]).await?;
    // upstream waitForEndpoints: until the API shows exactly `replicas` ready endpoints.
    let start = Instant::now();
    loop {
        let slices = ctx
            .api
            .list("endpointslice", Some(&ns))
            .await
            .map_err(|e| format!("waiting for service ({service}) endpoints available: {e}"))?;
        let ready = objects::ready_endpoints(&slices, &service);
        if ready == replicas {
            break;
        }
        if start.elapsed() >= ENDPOINTS_TIMEOUT {
            return Err(format!(
                "waiting for service ({service}) endpoints available: {ready} of {replicas} \
                 ready after {ENDPOINTS_TIMEOUT:?}"
            ));
        }
        tokio::time::sleep(POLL).await;
    }
    // upstream sleeps a fixed 60 s here for the controller to pick the endpoints up.
    tokio::time::sleep(ctx.scale_settle).await;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// HTTP steps

async fn capture(
    w: &mut ConformanceWorld,
    method: &str,
    scheme: &str,
    hostname: &str,
    path: &str,
) -> StepResult {
    let ctx = w.ctx()?;
    let location = w.address()?;
    w.request = None;
    w.response = None;
    let (req, resp) =
        client::capture_round_trip(method, scheme, hostname, path, &location, ctx.ports).await?;
    w.request = Some(req);
    w.response = Some(resp);
    Ok(())
}

async fn send_to_host_path(w: &mut ConformanceWorld, c: Context) -> StepResult {
    let (method, host, path) = (arg(&c, 1)?, arg(&c, 2)?, arg(&c, 3)?);
    capture(w, &method, "http", &host, &path).await
}

async fn send_to_url(w: &mut ConformanceWorld, c: Context) -> StepResult {
    let (method, raw) = (arg(&c, 1)?, arg(&c, 2)?);
    let u = client::parse_url(&raw)?;
    capture(w, &method, &u.scheme, &u.host, &u.path).await
}

async fn send_many(w: &mut ConformanceWorld, c: Context) -> StepResult {
    let n: usize = int_arg(&c, 1)?;
    let u = client::parse_url(&arg(&c, 2)?)?;
    let ctx = w.ctx()?;
    let location = w.address()?;
    for i in 1..=n {
        let (req, resp) =
            client::capture_round_trip("GET", &u.scheme, &u.host, &u.path, &location, ctx.ports)
                .await
                .map_err(|e| format!("request {i} of {n}: {e}"))?;
        w.result_status
            .entry(resp.status_code)
            .or_default()
            .insert(req.pod);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Assertion steps

async fn status_code(w: &mut ConformanceWorld, c: Context) -> StepResult {
    assertions::status_code(w.response.as_ref(), int_arg(&c, 1)?)
}
async fn served_by(w: &mut ConformanceWorld, c: Context) -> StepResult {
    assertions::served_by(w.request.as_ref(), &arg(&c, 1)?)
}
async fn response_proto(w: &mut ConformanceWorld, c: Context) -> StepResult {
    assertions::response_proto(w.response.as_ref(), &arg(&c, 1)?)
}
async fn request_proto(w: &mut ConformanceWorld, c: Context) -> StepResult {
    assertions::request_proto(w.request.as_ref(), &arg(&c, 1)?)
}
async fn request_method(w: &mut ConformanceWorld, c: Context) -> StepResult {
    assertions::method(w.request.as_ref(), &arg(&c, 1)?)
}
async fn request_path(w: &mut ConformanceWorld, c: Context) -> StepResult {
    assertions::request_path(w.request.as_ref(), &arg(&c, 1)?)
}
async fn request_host(w: &mut ConformanceWorld, c: Context) -> StepResult {
    assertions::request_host(w.request.as_ref(), &arg(&c, 1)?)
}
async fn secure_connection(w: &mut ConformanceWorld, c: Context) -> StepResult {
    assertions::secure_connection(w.response.as_ref(), &arg(&c, 1)?)
}
async fn response_headers(w: &mut ConformanceWorld, c: Context) -> StepResult {
    let resp = w.response.as_ref();
    assertions::header_table(table(&c), |k, v| assertions::response_header(resp, k, v))
}
async fn request_headers(w: &mut ConformanceWorld, c: Context) -> StepResult {
    let req = w.request.as_ref();
    assertions::header_table(table(&c), |k, v| assertions::request_header(req, k, v))
}
async fn distinct_pods(w: &mut ConformanceWorld, c: Context) -> StepResult {
    assertions::distinct_pods(&w.result_status, int_arg(&c, 1)?, int_arg(&c, 2)?)
}

// ---------------------------------------------------------------------------------------
// Step arguments

fn arg(c: &Context, i: usize) -> Result<String, String> {
    c.matches
        .get(i)
        .map(|(_, v)| v.clone())
        .ok_or_else(|| format!("internal: step has no capture group {i}"))
}

fn int_arg<T: std::str::FromStr>(c: &Context, i: usize) -> Result<T, String> {
    let s = arg(c, i)?;
    s.parse()
        .map_err(|_| format!("cannot convert argument {i} {s:?} to a number"))
}

fn docstring(c: &Context) -> Result<String, String> {
    c.step
        .docstring
        .clone()
        .ok_or_else(|| "this step needs a doc string (\"\"\")".to_owned())
}

fn table(c: &Context) -> Option<&[Vec<String>]> {
    c.step.table.as_ref().map(|t| t.rows.as_slice())
}

// ---------------------------------------------------------------------------------------
// Registration

type StepFn = cucumber::Step<ConformanceWorld>;

macro_rules! step_fn {
    // steps that use the context
    (ctx $f:path) => {{
        fn wrapped(w: &mut ConformanceWorld, c: Context) -> LocalBoxFuture<'_, ()> {
            Box::pin(async move {
                if let Err(e) = $f(w, c).await {
                    fail(e);
                }
            })
        }
        wrapped as StepFn
    }};
    (noctx $f:path) => {{
        fn wrapped(w: &mut ConformanceWorld, _c: Context) -> LocalBoxFuture<'_, ()> {
            Box::pin(async move {
                if let Err(e) = $f(w).await {
                    fail(e);
                }
            })
        }
        wrapped as StepFn
    }};
}

/// Every upstream step sentence with its implementation. Upstream registers them per
/// feature; the sentences mean the same everywhere, so one union set serves all features.
pub fn step_table() -> Vec<(&'static str, StepFn)> {
    vec![
        (r"^a new random namespace$", step_fn!(noctx new_namespace)),
        (
            r#"^an Ingress resource named "([^"]*)" with this spec:$"#,
            step_fn!(ctx ingress_named_with_spec),
        ),
        (r"^an Ingress resource$", step_fn!(ctx ingress_resource)),
        (
            r"^an Ingress resource in a new random namespace$",
            step_fn!(ctx ingress_in_new_namespace),
        ),
        (
            r#"^a self-signed TLS secret named "([^"]*)" for the "([^"]*)" hostname$"#,
            step_fn!(ctx self_signed_secret),
        ),
        (
            r"^The Ingress status shows the IP address or FQDN where it is exposed$",
            step_fn!(noctx status_shows_address),
        ),
        (
            r"^The Ingress status should not contain the IP address or FQDN$",
            step_fn!(noctx status_has_no_address),
        ),
        (
            r#"^The backend deployment "([^"]*)" for the ingress resource is scaled to (\d+)$"#,
            step_fn!(ctx scale_backend),
        ),
        (
            r#"^I send a "([^"]*)" request to http:\/\/"([^"]*)"\/"([^"]*)"$"#,
            step_fn!(ctx send_to_host_path),
        ),
        (
            r#"^I send a "([^"]*)" request to "([^"]*)"$"#,
            step_fn!(ctx send_to_url),
        ),
        (
            r#"^I send (\d+) requests to "([^"]*)"$"#,
            step_fn!(ctx send_many),
        ),
        (
            r"^the response status-code must be (\d+)$",
            step_fn!(ctx status_code),
        ),
        (
            r#"^the response must be served by the "([^"]*)" service$"#,
            step_fn!(ctx served_by),
        ),
        (
            r#"^the response proto must be "([^"]*)"$"#,
            step_fn!(ctx response_proto),
        ),
        (
            r"^the response headers must contain <key> with matching <value>$",
            step_fn!(ctx response_headers),
        ),
        (
            r#"^the request method must be "([^"]*)"$"#,
            step_fn!(ctx request_method),
        ),
        (
            r#"^the request path must be "([^"]*)"$"#,
            step_fn!(ctx request_path),
        ),
        (
            r#"^the request proto must be "([^"]*)"$"#,
            step_fn!(ctx request_proto),
        ),
        (
            r"^the request headers must contain <key> with matching <value>$",
            step_fn!(ctx request_headers),
        ),
        (
            r#"^the secure connection must verify the "([^"]*)" hostname$"#,
            step_fn!(ctx secure_connection),
        ),
        (
            r#"^the request host must be "([^"]*)"$"#,
            step_fn!(ctx request_host),
        ),
        (
            r"^all the responses status-code must be (\d+) and the response body should contain the IP address of (\d+) different Kubernetes pods$",
            step_fn!(ctx distinct_pods),
        ),
    ]
}

/// The step collection: godog matches a sentence whatever its keyword, so each sentence is
/// registered as Given, When and Then.
pub fn collection() -> Result<cucumber::step::Collection<ConformanceWorld>, regex::Error> {
    let mut c = cucumber::step::Collection::new();
    for (re, f) in step_table() {
        let re = Regex::new(re)?;
        c = c
            .given(None, re.clone(), f)
            .when(None, re.clone(), f)
            .then(None, re, f);
    }
    Ok(c)
}

/// Which registered sentence matches `text` (for tests and diagnostics).
pub fn matching_steps(text: &str) -> Vec<&'static str> {
    step_table()
        .into_iter()
        .filter(|(re, _)| Regex::new(re).is_ok_and(|r| r.is_match(text)))
        .map(|(re, _)| re)
        .collect()
}
