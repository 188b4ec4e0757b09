//! Object semantics of the embedded API, exercised through `Api` on a
//! temporary data directory (no network): metadata rules, status
//! subresources, patches, server-side apply, finalizers, garbage
//! collection, CRD registration and persistence.

use membrane_apiserver::Api;
use membrane_apiserver::api::{DeleteOpts, PatchType, Propagation, WriteOpts};
use membrane_apiserver::resources::Resource;
use membrane_apiserver::selectors::{FieldSelector, LabelSelector};
use serde_json::{Value, json};

fn opts(manager: &str) -> WriteOpts {
    WriteOpts {
        manager: manager.into(),
        ..WriteOpts::default()
    }
}

fn res(api: &Api, group: &str, version: &str, plural: &str) -> Resource {
    api.find(group, version, plural).expect("resource")
}

fn code(e: membrane_apiserver::Error) -> u16 {
    e.to_api().code
}

#[test]
fn create_fills_metadata_and_refuses_duplicates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = Api::open(dir.path(), 1000).expect("open");
    let cm = res(&api, "", "v1", "configmaps");
    let obj = api
        .create(
            &cm,
            Some("default"),
            json!({"metadata": {"generateName": "gen-"}, "data": {"a": "b"}}),
            &opts("t"),
        )
        .expect("create");
    let name = obj["metadata"]["name"].as_str().expect("name");
    assert!(name.starts_with("gen-") && name.len() == 9, "{name}");
    assert_eq!(obj["kind"], "ConfigMap");
    assert_eq!(obj["apiVersion"], "v1");
    assert_eq!(obj["metadata"]["namespace"], "default");
    assert_eq!(obj["metadata"]["uid"].as_str().map(str::len), Some(36));
    assert!(obj["metadata"]["creationTimestamp"].is_string());
    assert_eq!(obj["metadata"]["managedFields"][0]["manager"], "t");

    let dup = json!({"metadata": {"name": name}});
    assert_eq!(
        code(
            api.create(&cm, Some("default"), dup, &opts("t"))
                .expect_err("dup")
        ),
        409
    );
    let bad = json!({"metadata": {"name": "Bad_Name"}});
    assert_eq!(
        code(
            api.create(&cm, Some("default"), bad, &opts("t"))
                .expect_err("invalid")
        ),
        422
    );
    let nons = json!({"metadata": {"name": "x"}});
    assert_eq!(
        code(
            api.create(&cm, Some("nowhere"), nons, &opts("t"))
                .expect_err("no ns")
        ),
        404
    );
    let wrong_kind = json!({"kind": "Secret", "metadata": {"name": "x"}});
    assert_eq!(
        code(
            api.create(&cm, Some("default"), wrong_kind, &opts("t"))
                .expect_err("kind")
        ),
        400
    );
    let ns = res(&api, "", "v1", "namespaces");
    let err = api
        .delete(&ns, None, "default", &DeleteOpts::default())
        .expect_err("protected");
    assert_eq!(code(err), 403);
    // Dry run stores nothing.
    let dry = WriteOpts {
        dry_run: true,
        ..opts("t")
    };
    api.create(
        &cm,
        Some("default"),
        json!({"metadata": {"name": "dry"}}),
        &dry,
    )
    .expect("dry run");
    assert_eq!(
        code(
            api.get(&cm, Some("default"), "dry")
                .expect_err("not stored")
        ),
        404
    );
}

#[test]
fn status_subresource_generation_and_conflicts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = Api::open(dir.path(), 1000).expect("open");
    let ing = res(&api, "networking.k8s.io", "v1", "ingresses");
    let created = api
        .create(
            &ing,
            Some("default"),
            json!({"metadata": {"name": "i"}, "spec": {"ingressClassName": "cilium"}, "status": {"x": 1}}),
            &opts("t"),
        )
        .expect("create");
    assert!(
        created.get("status").is_none(),
        "status is dropped on create"
    );
    assert_eq!(created["metadata"]["generation"], 1);

    // The main endpoint ignores status; a spec change bumps generation.
    let mut upd = created.clone();
    upd["spec"]["ingressClassName"] = json!("other");
    upd["status"] = json!({"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}});
    let updated = api
        .update(&ing, Some("default"), "i", upd, "", &opts("t"))
        .expect("update");
    assert_eq!(updated["metadata"]["generation"], 2);
    assert!(updated.get("status").is_none());

    // The status subresource changes only status, and not generation.
    let mut st = updated.clone();
    st["spec"]["ingressClassName"] = json!("ignored");
    st["status"] = json!({"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}});
    let after = api
        .update(&ing, Some("default"), "i", st, "status", &opts("ctl"))
        .expect("status");
    assert_eq!(
        after["status"]["loadBalancer"]["ingress"][0]["ip"],
        "1.2.3.4"
    );
    assert_eq!(after["spec"]["ingressClassName"], "other");
    assert_eq!(after["metadata"]["generation"], 2);

    // A stale resourceVersion is a conflict.
    let stale = updated.clone();
    let err = api
        .update(&ing, Some("default"), "i", stale, "", &opts("t"))
        .expect_err("stale");
    assert_eq!(code(err), 409);

    // A no-op write keeps the resourceVersion.
    let same = api
        .patch(
            &ing,
            Some("default"),
            "i",
            PatchType::Merge,
            json!({"spec": {"ingressClassName": "other"}}),
            "",
            &opts("t"),
        )
        .expect("noop")
        .0;
    assert_eq!(
        same["metadata"]["resourceVersion"],
        after["metadata"]["resourceVersion"]
    );
}

#[test]
fn patches_of_every_type() {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = Api::open(dir.path(), 1000).expect("open");
    let pods = res(&api, "", "v1", "pods");
    api.create(
        &pods,
        Some("default"),
        json!({"metadata": {"name": "p", "labels": {"a": "1"}},
               "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i1", "ports": [{"containerPort": 80}]}]}}),
        &opts("t"),
    )
    .expect("create");
    let (p, _) = api
        .patch(&pods, Some("default"), "p", PatchType::Strategic,
            json!({"spec": {"containers": [{"name": "c", "image": "i2"}, {"name": "d", "image": "j"}]}}), "", &opts("t"))
        .expect("smp");
    assert_eq!(p["spec"]["containers"][0]["image"], "i2");
    assert_eq!(
        p["spec"]["containers"][0]["ports"][0]["protocol"], "TCP",
        "defaulted"
    );
    assert_eq!(p["spec"]["containers"][1]["name"], "d");
    let (p, _) = api
        .patch(
            &pods,
            Some("default"),
            "p",
            PatchType::Json,
            json!([{"op": "replace", "path": "/metadata/labels/a", "value": "2"}]),
            "",
            &opts("t"),
        )
        .expect("json patch");
    assert_eq!(p["metadata"]["labels"]["a"], "2");
    let (p, _) = api
        .patch(
            &pods,
            Some("default"),
            "p",
            PatchType::Merge,
            json!({"metadata": {"labels": {"a": null}}}),
            "",
            &opts("t"),
        )
        .expect("merge");
    assert!(p["metadata"]["labels"].get("a").is_none());
    let err = api
        .patch(
            &pods,
            Some("default"),
            "missing",
            PatchType::Merge,
            json!({}),
            "",
            &opts("t"),
        )
        .expect_err("missing");
    assert_eq!(code(err), 404);

    // Field and label selectors.
    let all = api
        .list(
            &pods,
            None,
            &LabelSelector::default(),
            &FieldSelector::parse("spec.nodeName=n1").expect("sel"),
        )
        .expect("list");
    assert_eq!(all["items"].as_array().map(Vec::len), Some(1));
    assert_eq!(all["kind"], "PodList");
    let none = api
        .list(
            &pods,
            Some("default"),
            &LabelSelector::parse("a").expect("sel"),
            &FieldSelector::default(),
        )
        .expect("list");
    assert_eq!(none["items"].as_array().map(Vec::len), Some(0));
}

#[test]
fn server_side_apply_creates_then_merges() {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = Api::open(dir.path(), 1000).expect("open");
    let cec = res(&api, "cilium.io", "v2", "ciliumenvoyconfigs");
    let cfg = json!({"apiVersion": "cilium.io/v2", "kind": "CiliumEnvoyConfig",
        "metadata": {"name": "e", "namespace": "default"}, "spec": {"services": [{"name": "s"}]}});
    let (o, created) = api
        .patch(
            &cec,
            Some("default"),
            "e",
            PatchType::Apply,
            cfg.clone(),
            "",
            &opts("op"),
        )
        .expect("apply create");
    assert!(created);
    assert_eq!(o["metadata"]["managedFields"][0]["operation"], "Apply");
    // Status through the status endpoint by another manager stays apart.
    let status = json!({"apiVersion": "cilium.io/v2", "kind": "CiliumEnvoyConfig",
        "metadata": {"name": "e", "namespace": "default"}, "status": {"ok": true}});
    // (CECs have no status subresource: served on the main endpoint.)
    let (o, _) = api
        .patch(
            &cec,
            Some("default"),
            "e",
            PatchType::Apply,
            status,
            "",
            &opts("agent"),
        )
        .expect("apply status");
    assert_eq!(o["status"]["ok"], true);
    assert_eq!(o["spec"]["services"][0]["name"], "s");
    let cfg2 = json!({"apiVersion": "cilium.io/v2", "kind": "CiliumEnvoyConfig",
        "metadata": {"name": "e", "namespace": "default"}, "spec": {"services": [{"name": "t"}]}});
    let err = api
        .patch(
            &cec,
            Some("default"),
            "e",
            PatchType::Apply,
            cfg2.clone(),
            "",
            &opts("intruder"),
        )
        .expect_err("conflict");
    assert_eq!(code(err), 409);
    let (o, created) = api
        .patch(
            &cec,
            Some("default"),
            "e",
            PatchType::Apply,
            cfg2,
            "",
            &opts("op"),
        )
        .expect("owner changes its own field");
    assert!(!created);
    assert_eq!(o["spec"]["services"][0]["name"], "t");
    assert_eq!(o["status"]["ok"], true, "other manager's field kept");
}

fn owner_ref(o: &Value) -> Value {
    json!({"apiVersion": o["apiVersion"], "kind": o["kind"], "name": o["metadata"]["name"], "uid": o["metadata"]["uid"]})
}

#[test]
fn foreground_deletion_waits_for_dependents() {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = Api::open(dir.path(), 1000).expect("open");
    let svc = res(&api, "", "v1", "services");
    let cm = res(&api, "", "v1", "configmaps");
    let owner = api
        .create(
            &svc,
            Some("default"),
            json!({"metadata": {"name": "o"}, "spec": {"ports": [{"port": 1}]}}),
            &opts("t"),
        )
        .expect("owner");
    let mut blocking_ref = owner_ref(&owner);
    blocking_ref["blockOwnerDeletion"] = json!(true);
    api.create(
        &cm,
        Some("default"),
        json!({"metadata": {"name": "d", "ownerReferences": [blocking_ref], "finalizers": ["x/hold"]}}),
        &opts("t"),
    )
    .expect("dependent");
    // A dependent that does not block its owner is deleted too, but the
    // owner does not wait for its finalizer.
    api.create(
        &cm,
        Some("default"),
        json!({"metadata": {"name": "n", "ownerReferences": [owner_ref(&owner)], "finalizers": ["x/hold"]}}),
        &opts("t"),
    )
    .expect("non-blocking dependent");
    let fg = DeleteOpts {
        propagation: Propagation::Foreground,
        ..DeleteOpts::default()
    };
    let marked = api.delete(&svc, Some("default"), "o", &fg).expect("delete");
    assert_eq!(
        marked["metadata"]["finalizers"],
        json!(["foregroundDeletion"])
    );
    api.collect_garbage().expect("gc");
    // The dependent is terminating but held by its own finalizer, so the
    // owner waits.
    let d = api.get(&cm, Some("default"), "d").expect("dependent");
    assert!(d["metadata"]["deletionTimestamp"].is_string());
    assert!(api.get(&svc, Some("default"), "o").is_ok());
    api.patch(
        &cm,
        Some("default"),
        "d",
        PatchType::Merge,
        json!({"metadata": {"finalizers": null}}),
        "",
        &opts("t"),
    )
    .expect("release");
    api.collect_garbage().expect("gc");
    assert_eq!(
        code(api.get(&cm, Some("default"), "d").expect_err("gone")),
        404
    );
    assert_eq!(
        code(api.get(&svc, Some("default"), "o").expect_err("gone")),
        404
    );
}

#[test]
fn crds_register_resources_that_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let api = Api::open(dir.path(), 1000).expect("open");
        let crds = res(
            &api,
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
        );
        let crd = json!({"metadata": {"name": "widgets.example.com"}, "spec": {
            "group": "example.com", "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": ["wd"]},
            "versions": [{"name": "v1", "served": true, "storage": true, "subresources": {"status": {}}}]}});
        let stored = api.create(&crds, None, crd, &opts("t")).expect("crd");
        assert_eq!(stored["status"]["conditions"][1]["type"], "Established");
        let widgets = res(&api, "example.com", "v1", "widgets");
        assert!(widgets.status);
        api.create(
            &widgets,
            Some("default"),
            json!({"metadata": {"name": "w"}, "spec": {"size": 3}}),
            &opts("t"),
        )
        .expect("widget");
    }
    let api = Api::open(dir.path(), 1000).expect("reopen");
    let widgets = res(&api, "example.com", "v1", "widgets");
    let w = api
        .get(&widgets, Some("default"), "w")
        .expect("widget persisted");
    assert_eq!(w["spec"]["size"], 3);
    assert_eq!(w["apiVersion"], "example.com/v1");
}

#[test]
fn hostile_bodies_are_client_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = Api::open(dir.path(), 1000).expect("open");
    let pods = res(&api, "", "v1", "pods");
    let o = opts("t");
    for body in [
        json!("just a string"),
        json!({"metadata": "x"}),
        json!([1, 2]),
    ] {
        let err = api
            .create(&pods, Some("default"), body.clone(), &o)
            .expect_err("bad body");
        assert_eq!(code(err), 400, "{body}");
    }
    // Odd shapes that are objects are stored, not a crash.
    api.create(
        &pods,
        Some("default"),
        json!({"metadata": {"name": "odd"}, "spec": "x"}),
        &o,
    )
    .expect("odd spec");
    for (kind, patch) in [
        (
            PatchType::Json,
            json!([{"op": "replace", "path": "", "value": "x"}]),
        ),
        (PatchType::Json, json!({"not": "a list"})),
        (
            PatchType::Json,
            json!([{"op": "move", "from": "/nope", "path": "/x"}]),
        ),
        (PatchType::Merge, json!({"metadata": "x"})),
        (PatchType::Strategic, json!({"spec": {"$patch": "bogus"}})),
        (PatchType::Apply, json!("scalar")),
        (
            PatchType::Apply,
            json!({"kind": "Pod", "apiVersion": "v1", "metadata": {"name": "other"}}),
        ),
    ] {
        let err = api
            .patch(&pods, Some("default"), "odd", kind, patch.clone(), "", &o)
            .expect_err("bad patch");
        let c = code(err);
        assert!((400..500).contains(&c), "{kind:?} {patch}: {c}");
    }
    // The object is untouched and the API still serves.
    let odd = api.get(&pods, Some("default"), "odd").expect("still there");
    assert_eq!(odd["spec"], "x");
    // A keyed list element without its key is refused.
    api.create(
        &pods,
        Some("default"),
        json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]}}),
        &o,
    )
    .expect("pod");
    let err = api
        .patch(
            &pods,
            Some("default"),
            "p",
            PatchType::Strategic,
            json!({"spec": {"containers": [{"image": "no merge key"}]}}),
            "",
            &o,
        )
        .expect_err("no merge key");
    assert_eq!(code(err), 400);
    let p = api.get(&pods, Some("default"), "p").expect("pod");
    assert!(
        p["spec"].get("initContainers").is_none(),
        "defaults add nothing: {p}"
    );
}

#[test]
fn lists_page_with_continue_tokens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = Api::open(dir.path(), 1000).expect("open");
    let cm = res(&api, "", "v1", "configmaps");
    for i in 0..5 {
        api.create(
            &cm,
            Some("default"),
            json!({"metadata": {"name": format!("c{i}")}}),
            &opts("t"),
        )
        .expect("create");
    }
    let (l, f) = (LabelSelector::default(), FieldSelector::default());
    let mut names = Vec::new();
    let mut token: Option<String> = None;
    let mut rvs = Vec::new();
    for round in 0..5 {
        let page = api
            .list_page(&cm, Some("default"), &l, &f, Some(2), token.as_deref())
            .expect("page");
        rvs.push(page["metadata"]["resourceVersion"].clone());
        for item in page["items"].as_array().expect("items") {
            names.push(item["metadata"]["name"].as_str().expect("name").to_string());
        }
        // A change between pages (before the position reached) does not
        // move the list's version; a watch from it replays the change.
        api.create(
            &cm,
            Some("default"),
            json!({"metadata": {"name": format!("a{round}")}}),
            &opts("t"),
        )
        .expect("create between pages");
        token = page["metadata"]["continue"].as_str().map(String::from);
        if token.is_none() {
            break;
        }
        assert!(
            page["metadata"]["remainingItemCount"]
                .as_u64()
                .is_some_and(|n| n > 0)
        );
    }
    assert_eq!(names, ["c0", "c1", "c2", "c3", "c4"]);
    assert!(rvs.windows(2).all(|w| w[0] == w[1]), "{rvs:?}");
    let err = api
        .list_page(&cm, Some("default"), &l, &f, Some(2), Some("garbage!"))
        .expect_err("bad token");
    assert_eq!(code(err), 400);
}

#[test]
fn events_expire_after_their_ttl() {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = Api::open(dir.path(), 1000).expect("open");
    let ev = res(&api, "", "v1", "events");
    let now = membrane_apiserver::table::parse_time(&membrane_apiserver::util::now_rfc3339())
        .expect("now");
    // "recurring" was seen again half an hour after it was created.
    let later = membrane_apiserver::util::rfc3339((now + 1800) as u64);
    for (name, last) in [("once", None), ("recurring", Some(later))] {
        let mut e = json!({"metadata": {"name": name}, "reason": "R", "message": "m",
                           "involvedObject": {"kind": "Pod", "name": "p"}});
        if let Some(t) = last {
            e["lastTimestamp"] = json!(t);
        }
        api.create(&ev, Some("default"), e, &opts("t"))
            .expect("event");
    }
    assert_eq!(api.expire_events(3600, now + 1800).expect("expire"), 0);
    assert_eq!(api.expire_events(3600, now + 3600 + 60).expect("expire"), 1);
    assert_eq!(
        code(api.get(&ev, Some("default"), "once").expect_err("expired")),
        404
    );
    assert!(api.get(&ev, Some("default"), "recurring").is_ok());
    assert_eq!(
        api.expire_events(3600, now + 1800 + 3600 + 60)
            .expect("expire"),
        1
    );
}

/// An apply to `/status` of a missing object is 404 (as Kubernetes): a
/// status write never creates an object without its spec; once the object
/// exists the same apply lands.
#[test]
fn status_apply_of_a_missing_object_is_not_found() {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = Api::open(dir.path(), 1000).expect("open");
    let svc = res(&api, "", "v1", "services");
    let status = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "s", "namespace": "default"},
        "status": {"loadBalancer": {"ingress": [{"ip": "10.0.0.1"}]}}});
    let err = api
        .patch(
            &svc,
            Some("default"),
            "s",
            PatchType::Apply,
            status.clone(),
            "status",
            &opts("op"),
        )
        .expect_err("status of a missing object");
    assert_eq!(code(err), 404);
    assert!(
        api.get(&svc, Some("default"), "s").is_err(),
        "nothing created"
    );
    api.create(
        &svc,
        Some("default"),
        json!({"metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}]}}),
        &opts("op"),
    )
    .expect("create");
    let (o, created) = api
        .patch(
            &svc,
            Some("default"),
            "s",
            PatchType::Apply,
            status,
            "status",
            &opts("op"),
        )
        .expect("status apply");
    assert!(!created);
    assert_eq!(o["status"]["loadBalancer"]["ingress"][0]["ip"], "10.0.0.1");
    assert_eq!(o["spec"]["ports"][0]["port"], 80);
}

/// An apply that changes nothing (the same configuration again, as a
/// controller repeats its writes) is no write at all, as in Kubernetes: no
/// new resourceVersion, no watch event. A changed one is committed once,
/// with one event carrying the object exactly as stored.
#[test]
fn an_identical_apply_is_no_write_and_no_event() {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = Api::open(dir.path(), 1000).expect("open");
    let cec = res(&api, "cilium.io", "v2", "ciliumenvoyconfigs");
    let cfg = |port: u16| {
        json!({"apiVersion": "cilium.io/v2", "kind": "CiliumEnvoyConfig",
            "metadata": {"name": "e", "namespace": "default", "labels": {"a": "b"}},
            "spec": {"services": [{"name": "s"}], "resources": [{"@type": "x", "port": port}]}})
    };
    let apply = |c: Value| {
        api.patch(
            &cec,
            Some("default"),
            "e",
            PatchType::Apply,
            c,
            "",
            &opts("op"),
        )
        .expect("apply")
        .0
    };
    let first = apply(cfg(80));
    let rv = first["metadata"]["resourceVersion"].clone();
    let mut events = api.store.subscribe();
    let store_rv = api.store.current_rv().expect("rv");
    for _ in 0..3 {
        let again = apply(cfg(80));
        assert_eq!(again["metadata"]["resourceVersion"], rv);
        assert_eq!(
            again, first,
            "the stored object, managedFields time included"
        );
    }
    assert_eq!(api.store.current_rv().expect("rv"), store_rv);
    assert!(
        matches!(
            events.try_recv(),
            Err(tokio::sync::broadcast::error::TryRecvError::Empty)
        ),
        "an identical apply sent a watch event"
    );
    let changed = apply(cfg(81));
    assert_ne!(changed["metadata"]["resourceVersion"], rv);
    assert_eq!(changed["metadata"]["generation"], 2);
    let ev = events.try_recv().expect("one event for the change");
    assert_eq!(ev.object, changed);
    let text: Value = serde_json::from_str(&ev.text).expect("event text");
    assert_eq!(text, changed, "the event's text is the stored object");
    assert_eq!(ev.prev.as_ref(), Some(&first));
    assert!(events.try_recv().is_err(), "exactly one event");
}
