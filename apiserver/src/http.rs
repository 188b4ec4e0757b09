//! The HTTP layer: routing of Kubernetes API paths, request decoding,
//! `Status` errors, and watch streams (replay from the events table, then
//! live changes, bookmarks, timeouts).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode, header};
use serde_json::{Value, json};
use tokio::sync::{Notify, broadcast, mpsc};

use crate::api::{Api, DeleteOpts, PatchType, Propagation, WriteOpts, parse_body};
use crate::error::{ApiError, Error};
use crate::resources::Resource;
use crate::selectors::{FieldSelector, LabelSelector};
use crate::store::{Event, EventType};
use crate::{convert, discovery, table};

pub type Body = BoxBody<Bytes, Infallible>;

/// Where a watch starts: events to send first, the resourceVersion they
/// bring the watcher to, or the `Status` that ends it (410 Gone).
type Start = (Vec<Event>, u64, Option<Value>);

/// Stored form → served form of an object.
type Conv = Arc<dyn Fn(&Value) -> Value + Send + Sync>;

/// Objects (and the list's resourceVersion) → a `meta.k8s.io/v1` Table.
type TableView = Arc<dyn Fn(&[Value], &str) -> Value + Send + Sync>;

/// Largest accepted request body (the Kubernetes default).
const MAX_BODY: usize = 3 * 1024 * 1024;

/// Shared state of the HTTP handlers.
pub struct Http {
    pub api: Arc<Api>,
    /// `host:port` clients reach the server at (for /api).
    pub server_addr: String,
    pub bookmark_interval: Duration,
    pub gc: Arc<Notify>,
    /// `--audit-log`: one line per request.
    pub audit: Option<Arc<crate::audit::AuditLog>>,
}

enum Route {
    Version,
    Health,
    Api,
    Apis,
    Group(String),
    GroupVersion(String, String),
    OpenApiV3Root,
    OpenApiV3(String),
    Object {
        res: Resource,
        ns: Option<String>,
        name: Option<String>,
        sub: String,
    },
}

fn json_response(code: u16, v: &Value) -> Response<Body> {
    let body = serde_json::to_vec(v).unwrap_or_default();
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

fn error_response(e: &ApiError) -> Response<Body> {
    json_response(e.code, &e.status())
}

fn percent_decode(s: &str) -> String {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(q: Option<&str>) -> HashMap<String, String> {
    q.unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
        .collect()
}

fn truthy(q: &HashMap<String, String>, k: &str) -> bool {
    q.get(k)
        .is_some_and(|v| v == "true" || v == "1" || v.is_empty())
}

impl Http {
    fn route(&self, path: &str) -> Result<Route, ApiError> {
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let nf = || {
            ApiError::new(
                404,
                "NotFound",
                "the server could not find the requested resource",
            )
        };
        match segs.as_slice() {
            ["version"] => Ok(Route::Version),
            ["healthz" | "readyz" | "livez", ..] => Ok(Route::Health),
            ["openapi", "v3"] => Ok(Route::OpenApiV3Root),
            ["openapi", "v3", rest @ ..] => Ok(Route::OpenApiV3(rest.join("/"))),
            ["api"] => Ok(Route::Api),
            ["apis"] => Ok(Route::Apis),
            ["apis", g] => Ok(Route::Group(g.to_string())),
            ["api", v] => Ok(Route::GroupVersion(String::new(), v.to_string())),
            ["apis", g, v] => Ok(Route::GroupVersion(g.to_string(), v.to_string())),
            ["api", v, rest @ ..] => self.object_route("", v, rest).ok_or_else(nf),
            ["apis", g, v, rest @ ..] => self.object_route(g, v, rest).ok_or_else(nf),
            _ => Err(nf()),
        }
    }

    fn object_route(&self, g: &str, v: &str, rest: &[&str]) -> Option<Route> {
        let (res, ns, tail) = match rest {
            ["namespaces", ns, plural, tail @ ..]
                if self.api.find(g, v, plural).is_some_and(|r| r.namespaced) =>
            {
                (self.api.find(g, v, plural)?, Some(ns.to_string()), tail)
            }
            [plural, tail @ ..] => (self.api.find(g, v, plural)?, None, tail),
            [] => return None,
        };
        let (name, sub) = match tail {
            [] => (None, String::new()),
            [name] => (Some(name.to_string()), String::new()),
            [name, "status"] if res.status => (Some(name.to_string()), "status".into()),
            _ => return None,
        };
        Some(Route::Object { res, ns, name, sub })
    }

    /// Answer one request.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, Infallible> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let started = std::time::Instant::now();
        // Attributes are taken before dispatch consumes the request.
        let audit = self.audit.clone().map(|log| {
            let attrs = crate::audit::attributes(method.as_str(), &path, req.uri().query());
            let agent = req
                .headers()
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            (log, attrs, agent)
        });
        let resp = match self.clone().dispatch(req).await {
            Ok(r) => r,
            Err(e) => {
                let e = e.to_api();
                if e.code >= 500 {
                    tracing::warn!(%method, %path, error = %e.message, "request failed");
                }
                error_response(&e)
            }
        };
        // How long the answer took (a watch answers when it ends).
        tracing::debug!(
            %method,
            %path,
            status = resp.status().as_u16(),
            ms = started.elapsed().as_secs_f64() * 1e3,
            "request"
        );
        if let Some((log, attrs, agent)) = audit {
            log.record(&agent, &attrs, resp.status().as_u16());
        }
        Ok(resp)
    }

    async fn dispatch(self: Arc<Self>, req: Request<Incoming>) -> Result<Response<Body>, Error> {
        let query = parse_query(req.uri().query());
        let route = self.route(req.uri().path())?;
        let all = self.api.resources();
        let get_only = |m: &Method| -> Result<(), Error> {
            if m == Method::GET {
                Ok(())
            } else {
                Err(ApiError::method_not_allowed(format!(
                    "the server does not allow this method: {m}"
                ))
                .into())
            }
        };
        match route {
            Route::Version => {
                get_only(req.method())?;
                Ok(json_response(200, &discovery::version()))
            }
            Route::Health => Ok(Response::new(Full::new(Bytes::from_static(b"ok")).boxed())),
            Route::Api => Ok(json_response(
                200,
                &discovery::api_versions(&self.server_addr),
            )),
            Route::Apis => Ok(json_response(200, &discovery::api_group_list(&all))),
            Route::Group(g) => discovery::api_group(&all, &g)
                .map(|d| json_response(200, &d))
                .ok_or_else(|| {
                    ApiError::new(
                        404,
                        "NotFound",
                        "the server could not find the requested resource",
                    )
                    .into()
                }),
            Route::GroupVersion(g, v) => discovery::resource_list(&all, &g, &v)
                .map(|d| json_response(200, &d))
                .ok_or_else(|| {
                    ApiError::new(
                        404,
                        "NotFound",
                        "the server could not find the requested resource",
                    )
                    .into()
                }),
            Route::OpenApiV3Root => {
                let hash = format!("{:016x}", all.len());
                Ok(json_response(200, &discovery::openapi_v3_root(&all, &hash)))
            }
            Route::OpenApiV3(p) => discovery::openapi_v3_gv(&all, &p)
                .map(|d| json_response(200, &d))
                .ok_or_else(|| {
                    ApiError::new(
                        404,
                        "NotFound",
                        "the server could not find the requested resource",
                    )
                    .into()
                }),
            Route::Object { res, ns, name, sub } => {
                self.object(req, query, res, ns, name, sub).await
            }
        }
    }

    async fn object(
        self: Arc<Self>,
        req: Request<Incoming>,
        query: HashMap<String, String>,
        res: Resource,
        ns: Option<String>,
        name: Option<String>,
        sub: String,
    ) -> Result<Response<Body>, Error> {
        let method = req.method().clone();
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json")
            .to_string();
        let accept = req
            .headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let agent = req
            .headers()
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("unknown")
            .to_string();
        let manager = query
            .get("fieldManager")
            .cloned()
            .unwrap_or_else(|| agent.split('/').next().unwrap_or("unknown").to_string());
        let dry_run = query.get("dryRun").is_some_and(|v| v == "All");
        let opts = WriteOpts {
            manager,
            dry_run,
            force: truthy(&query, "force"),
        };
        let body = if matches!(
            method,
            Method::POST | Method::PUT | Method::PATCH | Method::DELETE
        ) {
            let collected = http_body_util::Limited::new(req.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| {
                    ApiError::new(
                        413,
                        "RequestEntityTooLarge",
                        format!("reading the request body: {e}"),
                    )
                })?;
            collected.to_bytes()
        } else {
            Bytes::new()
        };
        if content_type.contains("cbor") {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!("the body of the request was in an unsupported format ({content_type}): this server accepts JSON, YAML and (for a few kinds) protobuf"),
            )
            .into());
        }
        let protobuf = content_type.contains("protobuf");
        let parse = |body: &[u8]| -> Result<Value, ApiError> {
            if protobuf {
                crate::protobuf::decode(body)
            } else {
                parse_body(body, content_type.contains("yaml"))
            }
        };
        // events.k8s.io/v1 Events live in the core/v1 Event storage.
        let events_v1 = res.group == "events.k8s.io" && res.plural == "events";
        let conv: Conv = if events_v1 {
            Arc::new(convert::event_from_core)
        } else {
            Arc::new(Value::clone)
        };
        let to_core = |v: Value| {
            if events_v1 {
                convert::event_to_core(&v)
            } else {
                v
            }
        };
        let list_kind = (format!("{}List", res.kind), res.api_version());
        let res = if events_v1 {
            self.api
                .find("", "v1", "events")
                .ok_or_else(|| ApiError::internal("core/v1 events are not served"))?
        } else {
            res
        };
        let selector = |k: &str| -> String {
            let raw = query.get(k).cloned().unwrap_or_default();
            if events_v1 && k == "fieldSelector" {
                convert::event_selector_to_core(&raw)
            } else {
                raw
            }
        };
        let list_conv = conv.clone();
        let convert_list = move |mut list: Value| -> Value {
            if let Some(items) = list["items"].as_array_mut() {
                for item in items.iter_mut() {
                    *item = list_conv(item);
                }
            }
            list["kind"] = json!(list_kind.0);
            list["apiVersion"] = json!(list_kind.1);
            list
        };
        // Server-side printing for `kubectl get` (from the stored form).
        let table_view: Option<TableView> = if method == Method::GET && accept.contains("as=Table")
        {
            let include = table::Include::parse(query.get("includeObject").map(String::as_str));
            let crd = self.printer_columns(&res);
            let res = res.clone();
            Some(Arc::new(move |objs: &[Value], rv: &str| {
                table::table(&res, objs, rv, crd.as_ref(), include, unix_now())
            }))
        } else {
            None
        };
        let api = self.api.clone();
        match (method, name) {
            (Method::GET, name) if truthy(&query, "watch") => {
                let mut fields = selector("fieldSelector");
                if let Some(n) = name {
                    fields = format!("metadata.name={n},{fields}");
                }
                // None: the stored form is served as is (its stored text).
                let conv: Option<Conv> = match table_view {
                    Some(t) => Some(Arc::new(move |o: &Value| {
                        let rv = o["metadata"]["resourceVersion"]
                            .as_str()
                            .unwrap_or_default();
                        t(std::slice::from_ref(o), rv)
                    })),
                    None if events_v1 => Some(conv),
                    None => None,
                };
                self.watch(res, ns, &query, &fields, conv).await
            }
            (Method::GET, None) => {
                let labels = LabelSelector::parse(&selector("labelSelector"))?;
                let fields = FieldSelector::parse(&selector("fieldSelector"))?;
                let limit = match query.get("limit").map(String::as_str) {
                    None | Some("") | Some("0") => None,
                    Some(l) => Some(
                        l.parse::<usize>()
                            .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?,
                    ),
                };
                let cont = query.get("continue").cloned();
                let list = blocking(move || {
                    api.list_page(
                        &res,
                        ns.as_deref(),
                        &labels,
                        &fields,
                        limit,
                        cont.as_deref(),
                    )
                })
                .await?;
                if let Some(t) = table_view {
                    let items = list["items"].as_array().cloned().unwrap_or_default();
                    let rv = list["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap_or_default();
                    let mut tbl = t(&items, rv);
                    // kubectl pages Tables too.
                    for k in ["continue", "remainingItemCount"] {
                        if let Some(v) = list["metadata"].get(k) {
                            tbl["metadata"][k] = v.clone();
                        }
                    }
                    return Ok(json_response(200, &tbl));
                }
                Ok(json_response(200, &convert_list(list)))
            }
            (Method::GET, Some(name)) => {
                let obj = blocking(move || api.get(&res, ns.as_deref(), &name)).await?;
                if let Some(t) = table_view {
                    let rv = obj["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap_or_default();
                    return Ok(json_response(200, &t(std::slice::from_ref(&obj), rv)));
                }
                Ok(json_response(200, &conv(&obj)))
            }
            (Method::POST, None) => {
                let obj = to_core(parse(&body)?);
                let warnings = field_validation(&res, &obj, &query)?;
                let created = blocking(move || api.create(&res, ns.as_deref(), obj, &opts)).await?;
                Ok(with_warnings(
                    json_response(201, &conv(&created)),
                    &warnings,
                ))
            }
            (Method::PUT, Some(name)) => {
                let obj = to_core(parse(&body)?);
                let warnings = field_validation(&res, &obj, &query)?;
                let updated =
                    blocking(move || api.update(&res, ns.as_deref(), &name, obj, &sub, &opts))
                        .await?;
                self.wake_gc(&updated);
                Ok(with_warnings(
                    json_response(200, &conv(&updated)),
                    &warnings,
                ))
            }
            (Method::PATCH, Some(name)) => {
                let kind = match content_type.split(';').next().unwrap_or_default().trim() {
                    "application/merge-patch+json" => PatchType::Merge,
                    "application/strategic-merge-patch+json" => PatchType::Strategic,
                    "application/json-patch+json" => PatchType::Json,
                    "application/apply-patch+yaml" => PatchType::Apply,
                    other => {
                        return Err(ApiError::new(
                            415,
                            "UnsupportedMediaType",
                            format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {other:?})"),
                        )
                        .into());
                    }
                };
                if kind == PatchType::Apply && !query.contains_key("fieldManager") {
                    return Err(ApiError::bad_request("PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch").into());
                }
                if kind == PatchType::Strategic
                    && res.group.contains('.')
                    && !res.group.ends_with("k8s.io")
                {
                    return Err(ApiError::new(
                        415,
                        "UnsupportedMediaType",
                        format!(
                            "strategic merge patch is not supported for {}; use a merge patch",
                            res.qualified()
                        ),
                    )
                    .into());
                }
                let patch = parse_body(&body, kind == PatchType::Apply)?;
                let warnings = if kind == PatchType::Json {
                    Vec::new()
                } else if events_v1 {
                    field_validation(&res, &convert::event_to_core(&patch), &query)?
                } else {
                    field_validation(&res, &patch, &query)?
                };
                let (obj, created) = if events_v1 && kind != PatchType::Apply {
                    // Patch the events.k8s.io form, store the core form.
                    blocking(move || {
                        let cur = api.get(&res, ns.as_deref(), &name)?;
                        let mut v1 = convert::event_from_core(&cur);
                        match kind {
                            PatchType::Merge => crate::patch::merge_patch(&mut v1, &patch),
                            PatchType::Strategic => {
                                crate::patch::strategic_merge_patch(&mut v1, &patch)?
                            }
                            _ => crate::patch::json_patch(&mut v1, &patch)?,
                        }
                        let mut core = convert::event_to_core(&v1);
                        if patch["metadata"]["resourceVersion"].is_null() {
                            core["metadata"]["resourceVersion"] =
                                cur["metadata"]["resourceVersion"].clone();
                        }
                        Ok((
                            api.update(&res, ns.as_deref(), &name, core, &sub, &opts)?,
                            false,
                        ))
                    })
                    .await?
                } else {
                    let patch = if kind == PatchType::Apply {
                        to_core(patch)
                    } else {
                        patch
                    };
                    blocking(move || {
                        api.patch(&res, ns.as_deref(), &name, kind, patch, &sub, &opts)
                    })
                    .await?
                };
                self.wake_gc(&obj);
                Ok(with_warnings(
                    json_response(if created { 201 } else { 200 }, &conv(&obj)),
                    &warnings,
                ))
            }
            (Method::DELETE, Some(name)) => {
                let dopts = delete_opts(&query, &body)?;
                let obj = blocking(move || api.delete(&res, ns.as_deref(), &name, &dopts)).await?;
                self.gc.notify_one();
                Ok(json_response(200, &conv(&obj)))
            }
            (Method::DELETE, None) => {
                let dopts = delete_opts(&query, &body)?;
                let labels = LabelSelector::parse(&selector("labelSelector"))?;
                let fields = FieldSelector::parse(&selector("fieldSelector"))?;
                let list = blocking(move || {
                    let mut list = api.list(&res, ns.as_deref(), &labels, &fields)?;
                    let mut deleted = Vec::new();
                    for item in list["items"].as_array().cloned().unwrap_or_default() {
                        let n = item["metadata"]["name"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string();
                        let ons = item["metadata"]["namespace"].as_str().map(String::from);
                        match api.delete(&res, ons.as_deref(), &n, &dopts) {
                            Ok(o) => deleted.push(o),
                            Err(Error::Api(e)) if e.code == 404 => {}
                            Err(e) => return Err(e),
                        }
                    }
                    list["items"] = Value::Array(deleted);
                    Ok(list)
                })
                .await?;
                self.gc.notify_one();
                Ok(json_response(200, &convert_list(list)))
            }
            (m, _) => Err(ApiError::method_not_allowed(format!(
                "the server does not allow this method on the requested resource: {m}"
            ))
            .into()),
        }
    }

    /// The stored CRD of a resource (for its printer columns).
    fn printer_columns(&self, res: &Resource) -> Option<Value> {
        if res.group.is_empty() {
            return None;
        }
        let crds = self
            .api
            .find("apiextensions.k8s.io", "v1", "customresourcedefinitions")?;
        // A single-row read; cheap enough for the async thread.
        self.api
            .store
            .get(&crds.key(None, &format!("{}.{}", res.plural, res.group)))
            .ok()
            .flatten()
    }

    /// Garbage collection only has work after a write to an object being
    /// deleted (a finalizer removed); deletes always wake it.
    fn wake_gc(&self, obj: &Value) {
        if !obj["metadata"]["deletionTimestamp"].is_null() {
            self.gc.notify_one();
        }
    }

    async fn watch(
        self: Arc<Self>,
        res: Resource,
        ns: Option<String>,
        query: &HashMap<String, String>,
        fields: &str,
        conv: Option<Conv>,
    ) -> Result<Response<Body>, Error> {
        let labels =
            LabelSelector::parse(query.get("labelSelector").map(String::as_str).unwrap_or(""))?;
        let fields = FieldSelector::parse(fields)?;
        let timeout = query
            .get("timeoutSeconds")
            .and_then(|t| t.parse::<u64>().ok())
            .map(Duration::from_secs)
            .unwrap_or(Duration::from_secs(1800));
        let bookmarks = truthy(query, "allowWatchBookmarks");
        let send_initial = truthy(query, "sendInitialEvents");
        let from: Option<u64> = match query.get("resourceVersion").map(String::as_str) {
            None | Some("") | Some("0") => None,
            Some(v) => Some(
                v.parse()
                    .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {v:?}")))?,
            ),
        };
        let prefix = res.prefix(ns.as_deref());
        // Subscribe before reading so nothing committed in between is lost;
        // duplicates are skipped by resourceVersion.
        let mut live = self.api.store.subscribe();
        let api = self.api.clone();
        let prefix2 = prefix.clone();
        let initial = blocking(move || -> Result<Start, Error> {
            match from {
                Some(rv) if !send_initial => match api.store.events_since(rv, &prefix2) {
                    Ok(events) => {
                        let last = events.last().map(|e| e.rv).unwrap_or(rv);
                        Ok((events, last.max(rv), None))
                    }
                    Err(Error::Api(e)) if e.code == 410 => Ok((Vec::new(), 0, Some(e.status()))),
                    Err(e) => Err(e),
                },
                _ => {
                    let (items, rv) = api.store.list(&prefix2)?;
                    Ok((
                        items
                            .into_iter()
                            .map(|o| Event {
                                rv,
                                kind: EventType::Added,
                                key: String::new(),
                                // Empty: serialised from `object` when sent.
                                text: Arc::from(""),
                                object: o,
                                prev: None,
                            })
                            .collect(),
                        rv,
                        None,
                    ))
                }
            }
        })
        .await?;
        let (events, mut last, expired) = initial;
        let (tx, rx) = mpsc::channel::<Bytes>(256);
        let interval = self.bookmark_interval;
        let kind = res.kind.clone();
        let api_version = res.api_version();
        tokio::spawn(async move {
            let line = |ty: &str, obj: &Value| {
                let mut b =
                    serde_json::to_vec(&json!({"type": ty, "object": obj})).unwrap_or_default();
                b.push(b'\n');
                Bytes::from(b)
            };
            // An event's line: from the stored text when the stored form is
            // served (no clone, no second serialisation of the object).
            let event_line = |ty: &str, ev: &Event| match &conv {
                None if !ev.text.is_empty() => {
                    let mut b = Vec::with_capacity(ev.text.len() + 32);
                    b.extend_from_slice(b"{\"type\":\"");
                    b.extend_from_slice(ty.as_bytes());
                    b.extend_from_slice(b"\",\"object\":");
                    b.extend_from_slice(ev.text.as_bytes());
                    b.extend_from_slice(b"}\n");
                    Bytes::from(b)
                }
                None => line(ty, &ev.object),
                Some(c) => line(ty, &c(&ev.object)),
            };
            let matches = |o: &Value| labels.matches(o) && fields.matches(o);
            if let Some(status) = expired {
                let _ = tx.send(line("ERROR", &status)).await;
                return;
            }
            for ev in &events {
                let Some(ty) =
                    transition(ev.kind, ev.prev.as_ref().map(&matches), matches(&ev.object))
                else {
                    continue;
                };
                if tx.send(event_line(ty, ev)).await.is_err() {
                    return;
                }
            }
            let bookmark = |rv: u64, initial_end: bool| {
                let mut meta = json!({"resourceVersion": rv.to_string()});
                if initial_end {
                    meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
                }
                line(
                    "BOOKMARK",
                    &json!({"kind": kind, "apiVersion": api_version, "metadata": meta}),
                )
            };
            if send_initial && bookmarks && tx.send(bookmark(last, true)).await.is_err() {
                return;
            }
            let deadline = tokio::time::sleep(timeout);
            tokio::pin!(deadline);
            let mut ticker = tokio::time::interval(interval);
            ticker.tick().await;
            loop {
                tokio::select! {
                    ev = live.recv() => match ev {
                        Ok(ev) => {
                            if ev.rv <= last {
                                continue;
                            }
                            last = ev.rv;
                            if !ev.key.starts_with(&prefix) {
                                continue;
                            }
                            let Some(ty) = transition(ev.kind, ev.prev.as_ref().map(&matches), matches(&ev.object)) else {
                                continue;
                            };
                            if tx.send(event_line(ty, &ev)).await.is_err() {
                                return;
                            }
                        }
                        // Fell behind or shutting down: end the stream; the
                        // client resumes from its last resourceVersion.
                        Err(broadcast::error::RecvError::Lagged(_)) | Err(broadcast::error::RecvError::Closed) => return,
                    },
                    _ = ticker.tick(), if bookmarks => {
                        if tx.send(bookmark(last, false)).await.is_err() {
                            return;
                        }
                    }
                    _ = &mut deadline => return,
                    _ = tx.closed() => return,
                }
            }
        });
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
        });
        Response::builder()
            .status(200)
            .header(header::CONTENT_TYPE, "application/json")
            .body(BodyExt::boxed(StreamBody::new(stream)))
            .map_err(|e| ApiError::internal(e.to_string()).into())
    }
}

/// The watch event a selector-filtered watcher sees for a change, given
/// whether the object matched before (unknown for replayed events) and
/// after: objects entering the selection are ADDED, leaving it DELETED.
pub fn transition(kind: EventType, before: Option<bool>, after: bool) -> Option<&'static str> {
    match (kind, before, after) {
        (EventType::Added, _, true) => Some("ADDED"),
        (EventType::Deleted, _, true) => Some("DELETED"),
        (EventType::Modified, Some(false), true) => Some("ADDED"),
        (EventType::Modified, Some(true) | None, true) => Some("MODIFIED"),
        (EventType::Modified, Some(true), false) => Some("DELETED"),
        _ => None,
    }
}

/// `fieldValidation`: unknown top-level fields of a built-in kind are an
/// error (Strict, kubectl's default), warnings (Warn, the API default) or
/// nothing (Ignore). Returns the warnings.
fn field_validation(
    res: &Resource,
    obj: &Value,
    query: &HashMap<String, String>,
) -> Result<Vec<String>, ApiError> {
    let unknown = crate::resources::unknown_fields(&res.group, &res.kind, obj);
    if unknown.is_empty() {
        return Ok(Vec::new());
    }
    let messages: Vec<String> = unknown
        .iter()
        .map(|f| format!("unknown field \"{f}\""))
        .collect();
    match query.get("fieldValidation").map(String::as_str) {
        Some("Ignore") => Ok(Vec::new()),
        Some("Strict") => Err(ApiError::bad_request(format!(
            "{} in version \"{}\" cannot be handled as a {}: strict decoding error: {}",
            res.kind,
            res.version,
            res.kind,
            messages.join(", ")
        ))),
        _ => Ok(messages),
    }
}

/// Kubernetes warnings: `Warning: 299 - "text"` headers, which kubectl prints.
fn with_warnings(mut resp: Response<Body>, warnings: &[String]) -> Response<Body> {
    for w in warnings {
        let text = format!("299 - \"{}\"", w.replace('"', "\\\""));
        if let Ok(v) = header::HeaderValue::from_str(&text) {
            resp.headers_mut().append(header::WARNING, v);
        }
    }
    resp
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn delete_opts(query: &HashMap<String, String>, body: &[u8]) -> Result<DeleteOpts, ApiError> {
    let b: Value = if body.is_empty() {
        Value::Null
    } else {
        parse_body(body, false)?
    };
    let policy = query
        .get("propagationPolicy")
        .map(String::as_str)
        .or_else(|| b["propagationPolicy"].as_str());
    let propagation = match policy {
        None | Some("Background") => Propagation::Background,
        Some("Foreground") => Propagation::Foreground,
        Some("Orphan") => Propagation::Orphan,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "DeleteOptions: propagationPolicy {other:?} is not one of Background, Foreground, Orphan"
            )));
        }
    };
    let orphan = b["orphanDependents"].as_bool() == Some(true);
    Ok(DeleteOpts {
        propagation: if orphan {
            Propagation::Orphan
        } else {
            propagation
        },
        precondition_uid: b["preconditions"]["uid"].as_str().map(String::from),
        precondition_rv: b["preconditions"]["resourceVersion"]
            .as_str()
            .map(String::from),
        dry_run: query.get("dryRun").is_some_and(|v| v == "All")
            || b["dryRun"]
                .as_array()
                .is_some_and(|a| a.iter().any(|v| v == "All")),
    })
}

/// Run storage work on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Api(ApiError::internal(format!("worker: {e}"))))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding() {
        let q = parse_query(Some("labelSelector=app%3Dweb%2Ctier+in+%28a%29&watch=1&x"));
        assert_eq!(q["labelSelector"], "app=web,tier in (a)");
        assert!(truthy(&q, "watch"));
        assert!(truthy(&q, "x"));
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
