//! The shared CEC laid out by Ingress (`SharedLayout`): every object within
//! the limit, a change re-rendering only the parts it touches, and the
//! parts joining back to exactly the CEC a from-scratch merge gives.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::networking::v1::Ingress;
use membrane_crds::CiliumEnvoyConfig;
use membrane_ingress::{
    LayoutOutput, MAX_OBJECT_BYTES, SHARED_PART_OF_LABEL, SharedLayout, SharedPart,
    TranslateOptions, is_by_ingress, join_shared_cecs, merge_shared_preferring, shared_part,
};
use serde_json::Value;

/// Ingress `name` created at second `created`, with `(host, path, service)`
/// Prefix routes and TLS for `tls` hosts (Secret `cert`, or the Secret
/// after a `=`: `host=secret`).
fn ingress(
    name: &str,
    created: u32,
    routes: &[(String, String, usize)],
    tls: &[String],
) -> Ingress {
    let mut rules = String::new();
    for (host, path, svc) in routes {
        let host = if host.is_empty() {
            String::new()
        } else {
            format!("host: \"{host}\", ")
        };
        rules.push_str(&format!(
            "  - {{{host}http: {{paths: [{{path: {path}, pathType: Prefix, backend: {{service: {{name: svc-{svc}, port: {{number: 80}}}}}}}}]}}}}\n"
        ));
    }
    let tls = if tls.is_empty() {
        String::new()
    } else {
        let entries: Vec<String> = tls
            .iter()
            .map(|t| {
                let (host, secret) = t.split_once('=').unwrap_or((t, "cert"));
                format!("{{hosts: [{host}], secretName: {secret}}}")
            })
            .collect();
        format!("  tls: [{}]\n", entries.join(", "))
    };
    serde_yaml_ng::from_str(&format!(
        "metadata:\n  name: {name}\n  namespace: bench\n  creationTimestamp: \"2026-01-01T00:{:02}:{:02}Z\"\n  annotations: {{ingress.cilium.io/loadbalancer-mode: shared}}\nspec:\n  ingressClassName: cilium\n  rules:\n{rules}{tls}",
        created / 60 % 60,
        created % 60
    ))
    .expect("valid Ingress YAML")
}

/// The objects as written: what each render returned, applied in turn.
#[derive(Default)]
struct Written(BTreeMap<String, CiliumEnvoyConfig>);

impl Written {
    fn apply(&mut self, out: &LayoutOutput) -> usize {
        let mut writes = 0;
        for p in &out.parts {
            self.0
                .insert(p.metadata.name.clone().expect("named"), p.clone());
            writes += 1;
        }
        if out.head_changed {
            let head = &out.translation.cec;
            self.0
                .insert(head.metadata.name.clone().expect("named"), head.clone());
            writes += 1;
        }
        self.0.retain(|n, _| out.names.contains(n));
        writes
    }

    fn joined(&self) -> CiliumEnvoyConfig {
        let mut parts: Vec<CiliumEnvoyConfig> = self.0.values().cloned().collect();
        parts.sort_by_key(|c| {
            let is_head = c
                .metadata
                .labels
                .as_ref()
                .is_none_or(|l| !l.contains_key(SHARED_PART_OF_LABEL));
            let name = c.metadata.name.clone().unwrap_or_default();
            let k: usize = name
                .rsplit_once('-')
                .and_then(|(_, k)| k.parse().ok())
                .unwrap_or(0);
            (!is_head, k)
        });
        join_shared_cecs(&parts).expect("parts join")
    }
}

fn json(c: &CiliumEnvoyConfig) -> Value {
    serde_json::to_value(c).expect("json")
}

/// The first place two JSON values differ, briefly (they are megabytes).
fn diff(a: &Value, b: &Value, at: &str) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for k in x.keys().chain(y.keys()) {
                let (Some(p), Some(q)) = (x.get(k), y.get(k)) else {
                    return Some(format!("{at}.{k}: only on one side"));
                };
                if let Some(d) = diff(p, q, &format!("{at}.{k}")) {
                    return Some(d);
                }
            }
            None
        }
        (Value::Array(x), Value::Array(y)) => {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                if let Some(d) = diff(p, q, &format!("{at}[{i}]")) {
                    return Some(d);
                }
            }
            (x.len() != y.len()).then(|| format!("{at}: {} vs {} items", x.len(), y.len()))
        }
        _ => (a != b).then(|| format!("{at}: {a} vs {b}")),
    }
}

fn assert_same(joined: &CiliumEnvoyConfig, whole: &CiliumEnvoyConfig, what: &str) {
    if let Some(d) = diff(&json(joined), &json(whole), "") {
        panic!("{what}: the joined parts differ from the whole CEC at {d}");
    }
}

fn assert_sizes(w: &Written, max: usize) {
    for (name, c) in &w.0 {
        let bytes = serde_json::to_vec(c).expect("json").len();
        assert!(bytes <= max, "{name}: {bytes} bytes > {max}");
    }
}

/// An Ingress's creation second, `(host, path, service)` routes and TLS hosts.
type Spec = (u32, Vec<(String, String, usize)>, Vec<String>);

/// A tiny deterministic generator (no dependency for one test).
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % n.max(1)
    }
}

#[test]
fn parts_join_to_the_from_scratch_merge_over_random_changes() {
    let opts = TranslateOptions::default();
    const MAX: usize = 12 * 1024;
    let hosts = ["", "a.example.com", "b.example.com", "*.w.example.com"];
    let mut conflicts_seen = 0;
    for seed in 1..=6u64 {
        let mut rng = Rng(seed);
        // Given every part each time, and given only the changed one.
        let mut layout = SharedLayout::default();
        let mut written = Written::default();
        let mut by_change = SharedLayout::default();
        let mut written_by_change = Written::default();
        let mut ingresses: BTreeMap<String, Spec> = BTreeMap::new();
        let mut serving: BTreeSet<(String, String)> = BTreeSet::new();
        let mut split_seen = false;
        for step in 0..80 {
            let name = format!("ing-{}", rng.below(30));
            match rng.below(10) {
                // Delete.
                0 => {
                    ingresses.remove(&name);
                }
                // Recreate or create with a few routes; paths collide
                // across Ingresses now and then (a conflict).
                1..=3 => {
                    let routes = (0..1 + rng.below(6))
                        .map(|_| {
                            (
                                hosts[rng.below(hosts.len())].to_owned(),
                                format!("/p{}", rng.below(200)),
                                rng.below(7),
                            )
                        })
                        .collect();
                    // TLS hosts, now and then with another Secret (an
                    // SNI conflict).
                    let tls = if rng.below(4) == 0 {
                        let secret = ["cert", "other"][rng.below(3) / 2];
                        vec![format!("{}={secret}", hosts[1 + rng.below(2)])]
                    } else {
                        Vec::new()
                    };
                    ingresses.insert(name.clone(), (rng.below(20) as u32, routes, tls));
                }
                // One more path on an existing Ingress (the benchmark's change).
                _ => {
                    if let Some((_, routes, _)) = ingresses.get_mut(&name) {
                        routes.push((
                            hosts[rng.below(hosts.len())].to_owned(),
                            format!("/q{step}"),
                            rng.below(7),
                        ));
                    }
                }
            }
            let parts: Vec<SharedPart> = ingresses
                .iter()
                .map(|(n, (created, routes, tls))| {
                    shared_part(&ingress(n, *created, routes, tls), &opts).expect("translates")
                })
                .collect();
            if parts.is_empty() {
                // No shared Ingress: the operator deletes the shared CEC
                // and starts the layout afresh.
                by_change = SharedLayout::default();
                written_by_change = Written::default();
                continue;
            }
            let whole = merge_shared_preferring(&parts, &serving, &opts);
            let out = layout
                .render(&parts, &serving, &opts, MAX)
                .expect("lays out");
            let changed = parts
                .iter()
                .find(|p| p.name() == name)
                .map(|p| (("bench".to_owned(), name.clone()), Some(p)));
            let out_by_change = by_change
                .render_changes(
                    [changed.unwrap_or((("bench".to_owned(), name.clone()), None))],
                    &serving,
                    &opts,
                    MAX,
                )
                .expect("lays out");
            let at = format!("seed {seed} step {step}");
            for out in [&out, &out_by_change] {
                assert_eq!(out.translation.included, whole.included, "{at}");
                assert_eq!(out.translation.conflicts, whole.conflicts, "{at}");
            }
            serving = whole.included.iter().cloned().collect();
            conflicts_seen += whole.conflicts.len();
            written.apply(&out);
            written_by_change.apply(&out_by_change);
            split_seen |= written.0.len() > 1;
            assert_sizes(&written, MAX);
            assert_sizes(&written_by_change, MAX);
            assert_same(&written.joined(), &whole.cec, &at);
            assert_same(&written_by_change.joined(), &whole.cec, &at);
        }
        assert!(split_seen, "seed {seed}: the CEC was split at some point");
    }
    assert!(conflicts_seen > 0, "some changes made conflicts");
}

/// The benchmark's shape: Ingress `i` with `paths` Prefix paths.
fn bench_ingress(i: usize, paths: usize, extra: usize) -> Ingress {
    let routes: Vec<(String, String, usize)> = (0..paths + extra)
        .map(|j| (String::new(), format!("/i{i}/r{j}"), (i * paths + j) % 5000))
        .collect();
    ingress(&format!("ing-{i}"), (i % 3000) as u32, &routes, &[])
}

#[test]
fn ten_thousand_routes_fit_in_parts_and_one_change_rewrites_one_part() {
    let opts = TranslateOptions::default();
    let max = MAX_OBJECT_BYTES - 64 * 1024;
    let mut parts: Vec<SharedPart> = (0..2000)
        .map(|i| shared_part(&bench_ingress(i, 5, 0), &opts).expect("translates"))
        .collect();
    let serving = BTreeSet::new();
    let mut layout = SharedLayout::default();
    let mut written = Written::default();
    let out = layout
        .render(&parts, &serving, &opts, max)
        .expect("lays out");
    assert!(is_by_ingress(&out.translation.cec));
    assert_eq!(written.apply(&out), out.names.len(), "first: all written");
    assert!(out.names.len() >= 4, "{} objects", out.names.len());
    assert_sizes(&written, max);
    let whole = merge_shared_preferring(&parts, &serving, &opts);
    assert!(
        serde_json::to_vec(&whole.cec).expect("json").len() > 4 * max,
        "the whole CEC is far over the limit"
    );
    assert_same(&written.joined(), &whole.cec, "first");

    // One more path on one Ingress, 10 times over: one part rewritten each
    // time, never the first.
    let mut writes = Vec::new();
    for k in 0..10 {
        let i = (k * 37) % 2000;
        parts[i] = shared_part(&bench_ingress(i, 5, k + 1), &opts).expect("translates");
        let out = layout
            .render(&parts, &serving, &opts, max)
            .expect("lays out");
        assert!(!out.head_changed, "change {k}: the first part is unchanged");
        writes.push(written.apply(&out));
    }
    assert!(
        writes.iter().all(|&w| w == 1),
        "writes per change: {writes:?}"
    );
    assert_sizes(&written, max);

    // An Ingress that grows past its part's room moves: its old and new
    // parts are written, every object stays within the limit.
    let big = shared_part(&bench_ingress(0, 5, 700), &opts).expect("translates");
    parts[0] = big;
    let out = layout
        .render(&parts, &serving, &opts, max)
        .expect("lays out");
    let w = written.apply(&out);
    assert!((1..=2).contains(&w), "{w} writes");
    assert_sizes(&written, max);
    let whole = merge_shared_preferring(&parts, &serving, &opts);
    assert_same(&written.joined(), &whole.cec, "after the move");
}
