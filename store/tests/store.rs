use membrane_store::k8s_openapi::api::core::v1::Service;
use membrane_store::k8s_openapi::api::networking::v1::Ingress;
use membrane_store::{
    CHANGE_LOG_CAPACITY, Change, Changes, KeyChangeKind, Kind, Object, ObjectKey, Store,
    parse_documents,
};
use serde_json::json;

fn obj(yaml: &str) -> Object {
    let mut objs = parse_documents(yaml).unwrap();
    assert_eq!(objs.len(), 1);
    objs.remove(0)
}

fn ingress(host: &str, annotation: &str) -> Object {
    obj(&format!(
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata:\n  name: web\n  annotations: {{a: '{annotation}'}}\nspec:\n  rules: [{{host: {host}}}]\n"
    ))
}

fn meta_of(store: &Store, key: &ObjectKey) -> (i64, String, String) {
    let o = store.get(key).unwrap();
    let m = o.meta();
    (
        m.generation.unwrap(),
        m.resource_version.clone().unwrap(),
        m.uid.clone().unwrap(),
    )
}

#[test]
fn apply_sets_metadata_and_tracks_generation() {
    let store = Store::new();
    let mut rx = store.subscribe();
    let key = ObjectKey::new(Kind::Ingress, "", "web");
    assert_eq!(key.to_string(), "Ingress default/web");

    assert_eq!(store.apply(ingress("a.com", "1")), Change::Created);
    let (generation, rv1, uid) = meta_of(&store, &key);
    assert_eq!(generation, 1);
    assert!(rx.has_changed().unwrap());
    rx.borrow_and_update();
    let stored = store.get(&key).unwrap();
    assert_eq!(stored.meta().namespace.as_deref(), Some("default"));
    assert!(stored.meta().creation_timestamp.is_some());

    // Same content again: nothing changes, nobody is woken.
    assert_eq!(store.apply(ingress("a.com", "1")), Change::Unchanged);
    assert!(!rx.has_changed().unwrap());
    // Re-applying what `get` returned (server fields included) is unchanged too.
    assert_eq!(store.apply((*stored).clone()), Change::Unchanged);

    // Metadata-only change: new resourceVersion, same generation.
    assert_eq!(store.apply(ingress("a.com", "2")), Change::Configured);
    let (generation, rv2, uid2) = meta_of(&store, &key);
    assert_eq!(generation, 1);
    assert_ne!(rv1, rv2);
    assert_eq!(uid, uid2);
    assert!(rx.has_changed().unwrap());

    // Spec change: generation + 1.
    assert_eq!(store.apply(ingress("b.com", "2")), Change::Configured);
    let (generation, rv3, _) = meta_of(&store, &key);
    assert_eq!(generation, 2);
    assert!(rv3.parse::<u64>().unwrap() > rv2.parse::<u64>().unwrap());
    assert_eq!(store.revision().to_string(), rv3);

    // uid is stable per key: delete and recreate gives the same uid.
    store.delete(&key).unwrap();
    assert_eq!(store.apply(ingress("b.com", "2")), Change::Created);
    assert_eq!(meta_of(&store, &key).2, uid);
}

#[test]
fn status_is_preserved_and_updated_separately() {
    let store = Store::new();
    let key = ObjectKey::new(Kind::Ingress, "default", "web");
    store.apply(ingress("a.com", "1"));
    let status = json!({"loadBalancer": {"ingress": [{"ip": "10.0.0.1"}]}});
    let rev = store.revision();
    assert!(store.update_status(&key, status.clone()));
    assert!(store.revision() > rev);
    let (generation, _, _) = meta_of(&store, &key);
    assert_eq!(generation, 1, "status updates do not bump generation");
    // Equal status: no-op.
    let rev = store.revision();
    assert!(store.update_status(&key, status.clone()));
    assert_eq!(store.revision(), rev);

    // Apply without status keeps it.
    assert_eq!(store.apply(ingress("b.com", "1")), Change::Configured);
    let ing: Ingress = store.get_typed("default", "web").unwrap();
    let lb = ing.status.unwrap().load_balancer.unwrap().ingress.unwrap();
    assert_eq!(lb[0].ip.as_deref(), Some("10.0.0.1"));

    // Wrong shape and missing objects are refused.
    assert!(!store.update_status(&key, json!({"loadBalancer": 5})));
    assert!(!store.update_status(&ObjectKey::new(Kind::Ingress, "default", "nope"), status));
    let secret = ObjectKey::new(Kind::Secret, "default", "s");
    store.apply(obj("apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n"));
    assert!(
        !store.update_status(&secret, json!({})),
        "Secrets have no status"
    );
}

#[test]
fn namespace_delete_cascades() {
    let store = Store::new();
    for y in [
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n",
        "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: shop}\n",
        "apiVersion: v1\nkind: Secret\nmetadata: {name: b, namespace: shop}\n",
        "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: other}\n",
        "apiVersion: cilium.io/v2\nkind: CiliumClusterwideEnvoyConfig\nmetadata: {name: shop}\nspec: {resources: []}\n",
    ] {
        assert_eq!(store.apply(obj(y)), Change::Created);
    }
    let ns = store
        .get(&ObjectKey::new(Kind::Namespace, "", "shop"))
        .unwrap();
    assert_eq!(
        ns.to_value()["status"]["phase"],
        "Active",
        "namespaces are Active like in a cluster"
    );
    let deleted = store
        .delete(&ObjectKey::new(Kind::Namespace, "", "shop"))
        .unwrap();
    assert_eq!(deleted.key().name, "shop");
    let left: Vec<String> = store
        .snapshot()
        .iter()
        .map(|(k, _)| k.to_string())
        .collect();
    assert_eq!(
        left,
        ["Service other/a", "CiliumClusterwideEnvoyConfig shop"]
    );
    assert!(
        store
            .delete(&ObjectKey::new(Kind::Namespace, "", "shop"))
            .is_none()
    );
}

#[test]
fn snapshots_are_consistent_and_lists_sorted() {
    let store = Store::new();
    for (ns, name) in [("b", "z"), ("a", "y"), ("b", "a"), ("a", "x")] {
        store.apply(obj(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\n"
        )));
    }
    store.apply(obj("apiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata: {name: cilium}\nspec: {controller: cilium.io/ingress-controller}\n"));
    let snap = store.snapshot();
    let rev = snap.revision();

    let names = |it: Vec<String>| it;
    assert_eq!(
        names(
            store
                .list(Kind::Service, None)
                .iter()
                .map(|o| o.key().to_string())
                .collect()
        ),
        ["Service a/x", "Service a/y", "Service b/a", "Service b/z"]
    );
    assert_eq!(
        names(
            snap.list(Kind::Service, Some("b"))
                .map(|o| o.key().name.clone())
                .collect()
        ),
        ["a", "z"]
    );
    // Namespace filter is ignored for cluster-scoped kinds.
    assert_eq!(snap.list(Kind::IngressClass, Some("a")).count(), 1);
    assert_eq!(snap.typed::<Service>(Some("a")).count(), 2);
    assert!(snap.get_typed::<Service>("b", "z").is_some());

    // Later writes do not show in the earlier snapshot.
    store.delete(&ObjectKey::new(Kind::Service, "b", "z"));
    store.apply(obj(
        "apiVersion: v1\nkind: Service\nmetadata: {name: new, namespace: a}\n",
    ));
    assert_eq!(snap.revision(), rev);
    assert!(snap.get_typed::<Service>("b", "z").is_some());
    assert!(snap.get_typed::<Service>("a", "new").is_none());
    let now = store.snapshot();
    assert!(now.revision() > rev);
    assert!(now.get_typed::<Service>("b", "z").is_none());
    assert!(now.get_typed::<Service>("a", "new").is_some());
}

#[test]
fn problems_notify() {
    let store = Store::new();
    let mut rx = store.subscribe();
    store.set_problem("file x.yaml", Some("document 1: bad".into()));
    assert!(rx.has_changed().unwrap());
    rx.borrow_and_update();
    store.set_problem("file x.yaml", Some("document 1: bad".into()));
    assert!(
        !rx.has_changed().unwrap(),
        "same problem again is no change"
    );
    assert_eq!(store.problems()["file x.yaml"], "document 1: bad");
    store.set_problem("file x.yaml", None);
    assert!(store.problems().is_empty());
    assert!(rx.has_changed().unwrap());
}

#[test]
fn source_scopes_own_objects() {
    let store = Store::new();
    let w = store.writer("test");
    let svc = |name: &str, port: u16| {
        obj(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{ports: [{{port: {port}}}]}}\n"
        ))
    };
    let key = |name: &str| ObjectKey::new(Kind::Service, "default", name);
    w.replace_scope("a", vec![svc("one", 80), svc("two", 80)]);
    w.replace_scope("b", vec![svc("two", 81)]);
    assert_eq!(w.scopes(), ["a", "b"]);
    // Last write wins for an object declared twice.
    let port =
        |name: &str| store.get(&key(name)).unwrap().to_value()["spec"]["ports"][0]["port"].clone();
    assert_eq!(port("two"), 81);

    // Scope b lets go of "two": a's version comes back instead of a delete.
    w.replace_scope("b", vec![]);
    assert_eq!(port("two"), 80);
    assert_eq!(w.scopes(), ["a"]);

    // upsert keeps what is missing, replace drops it.
    w.upsert_scope("a", vec![svc("three", 80)]);
    assert!(store.get(&key("one")).is_some());
    w.replace_scope("a", vec![svc("three", 80)]);
    assert!(store.get(&key("one")).is_none());
    assert!(store.get(&key("two")).is_none());

    // Moving an object between scopes in one update never deletes it.
    let mut rx = store.subscribe();
    rx.borrow_and_update();
    w.update_scopes(vec![
        membrane_store::ScopeUpdate {
            scope: "a".into(),
            objects: vec![],
            keep_missing: false,
        },
        membrane_store::ScopeUpdate {
            scope: "c".into(),
            objects: vec![svc("three", 80)],
            keep_missing: false,
        },
    ]);
    assert!(store.get(&key("three")).is_some());
    assert!(!rx.has_changed().unwrap(), "a pure move is no change");

    w.delete(&key("three"));
    assert!(store.get(&key("three")).is_none());
    assert!(w.scopes().is_empty());
}

#[test]
fn batch_apply_and_delete_notify_once() {
    let store = Store::new();
    let mut rx = store.subscribe();
    let a = obj("apiVersion: v1\nkind: Service\nmetadata: {name: a}\n");
    let b = obj("apiVersion: v1\nkind: Service\nmetadata: {name: b}\n");
    let changes = store.apply_all(vec![a.clone(), b.clone()]);
    assert_eq!(changes, [Change::Created, Change::Created]);
    assert_eq!(*rx.borrow_and_update(), store.revision());
    assert_eq!(
        store.apply_all(vec![a, b]),
        [Change::Unchanged, Change::Unchanged]
    );
    assert!(!rx.has_changed().unwrap());
    let keys = [
        ObjectKey::new(Kind::Service, "default", "a"),
        ObjectKey::new(Kind::Service, "default", "nope"),
    ];
    let deleted = store.delete_all(&keys);
    assert!(deleted[0].is_some() && deleted[1].is_none());
    assert_eq!(store.list(Kind::Service, None).len(), 1);
}

fn change_kinds(changes: &Changes) -> Vec<(u64, String, KeyChangeKind)> {
    match changes {
        Changes::Keys(k) => k
            .iter()
            .map(|c| (c.revision, c.key.to_string(), c.kind))
            .collect(),
        Changes::Resync => panic!("unexpected resync"),
    }
}

#[test]
fn change_log_carries_keys_in_order() {
    let store = Store::new();
    let key = ObjectKey::new(Kind::Ingress, "", "web");
    let (start, none) = store.changes_since(0);
    assert_eq!((start, none), (0, Changes::Keys(Vec::new())));

    store.apply(ingress("a.com", "1"));
    store.apply(ingress("a.com", "1")); // unchanged: no entry
    store.apply(ingress("b.com", "1"));
    store.set_problem("file x", Some("bad".into())); // no key, only a revision
    assert!(store.update_status(
        &key,
        json!({"loadBalancer": {"ingress": [{"ip": "10.0.0.1"}]}})
    ));
    store.delete(&key);
    let (rev, changes) = store.changes_since(start);
    assert_eq!(rev, store.revision());
    assert_eq!(
        change_kinds(&changes),
        vec![
            (1, "Ingress default/web".into(), KeyChangeKind::Created),
            (2, "Ingress default/web".into(), KeyChangeKind::Updated),
            (
                4,
                "Ingress default/web".into(),
                KeyChangeKind::StatusUpdated
            ),
            (5, "Ingress default/web".into(), KeyChangeKind::Deleted),
        ]
    );
    // Reading from a later revision gives only what came after it.
    assert_eq!(change_kinds(&store.changes_since(3).1).len(), 2);
    assert!(store.changes_since(rev).1.is_empty());
}

#[test]
fn change_log_names_objects_a_namespace_delete_removes() {
    let store = Store::new();
    store.apply_all(vec![
        obj("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n"),
        obj("apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: shop}\n"),
    ]);
    let (rev, _) = store.changes_since(0);
    store.delete(&ObjectKey::new(Kind::Namespace, "", "shop"));
    let keys: Vec<String> = change_kinds(&store.changes_since(rev).1)
        .into_iter()
        .map(|(_, k, kind)| {
            assert_eq!(kind, KeyChangeKind::Deleted);
            k
        })
        .collect();
    assert_eq!(keys, vec!["Service shop/a", "Namespace shop"]);
}

#[test]
fn change_log_is_bounded_and_asks_laggards_to_resync() {
    let store = Store::new();
    let n = CHANGE_LOG_CAPACITY + 10;
    for i in 0..n {
        store.apply(ingress("a.com", &i.to_string()));
    }
    assert_eq!(store.changes_since(0).1, Changes::Resync);
    assert_eq!(store.changes_since(9).1, Changes::Resync);
    // Exactly the oldest revision still covered works.
    let (_, changes) = store.changes_since(10);
    assert_eq!(change_kinds(&changes).len(), CHANGE_LOG_CAPACITY);
    let recent = store.changes_since(n as u64 - 1).1;
    assert_eq!(change_kinds(&recent).len(), 1);
}

/// A scope's claim is the object the store holds, not a second copy; and
/// when another scope lets go, the claim comes back as declared: without a
/// status of its own it keeps the status the object has now.
#[test]
fn claims_share_the_stored_object_and_release_keeps_status() {
    let store = Store::new();
    let w = store.writer("test");
    let svc = |port: u16| {
        obj(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{ports: [{{port: {port}}}]}}\n"
        ))
    };
    let key = ObjectKey::new(Kind::Service, "default", "web");
    w.replace_scope("a", vec![svc(80)]);
    let held = store.get(&key).expect("applied");
    // The store and the scope share one allocation: 2 = map + `held`, with
    // the claim a third.
    assert_eq!(std::sync::Arc::strong_count(&held), 3);

    w.replace_scope("b", vec![svc(81)]);
    let lb = json!({"loadBalancer": {"ingress": [{"ip": "10.0.0.9"}]}});
    assert!(store.update_status(&key, lb.clone()));
    w.replace_scope("b", vec![]);
    let now = store.get(&key).expect("a's version back").to_value();
    assert_eq!(now["spec"]["ports"][0]["port"], 80);
    assert_eq!(now["status"], lb, "the current status stays");
}
