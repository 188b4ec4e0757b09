use std::path::Path;
use std::time::Duration;

use membrane_store::{Kind, ManifestDir, ObjectKey, Store, StoreError};

fn svc_key(name: &str) -> ObjectKey {
    ObjectKey::new(Kind::Service, "demo", name)
}

fn port(store: &Store, name: &str) -> Option<i64> {
    let o = store.get(&svc_key(name))?;
    o.to_value()["spec"]["ports"][0]["port"].as_i64()
}

fn service(name: &str, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: demo\nspec:\n  ports:\n  - port: {port}\n"
    )
}

/// Waits (bounded) until `pred` holds, waking on store changes.
async fn wait_for(store: &Store, what: &str, pred: impl Fn(&Store) -> bool) {
    let mut rx = store.subscribe();
    let done = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if pred(store) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(done.is_ok() && pred(store), "timed out waiting for {what}");
}

fn write(path: &Path, text: &str) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(path, text).unwrap();
}

async fn live_updates(polling: bool) {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.yaml");
    let b = dir.path().join("sub/b.yml");
    write(
        &a,
        &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: demo}}\n---\n{}---\n{}---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: ignored}}\n",
            service("one", 80),
            service("two", 80)
        ),
    );
    write(&dir.path().join(".hidden.yaml"), &service("hidden", 1));
    write(&dir.path().join("notes.txt"), "not a manifest");

    let store = Store::new();
    let source = ManifestDir::new(dir.path().to_path_buf()).with_polling(polling);
    let task = store.spawn_source(source);

    wait_for(&store, "initial load", |s| {
        port(s, "one") == Some(80) && port(s, "two") == Some(80)
    })
    .await;
    assert!(
        store.get(&svc_key("hidden")).is_none(),
        "hidden files are skipped"
    );
    assert!(
        store.problems().is_empty(),
        "unknown kinds are ignored: {:?}",
        store.problems()
    );

    // Add a file in a new subdirectory.
    write(&b, &service("three", 80));
    wait_for(&store, "added file", |s| port(s, "three") == Some(80)).await;

    // Edit.
    write(
        &a,
        &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: demo}}\n---\n{}---\n{}",
            service("one", 81),
            service("two", 80)
        ),
    );
    wait_for(&store, "edited file", |s| port(s, "one") == Some(81)).await;

    // Bad edit: document 3 breaks, document 2 changes. The good change
    // applies, the bad document's object keeps its previous version.
    write(
        &a,
        &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: demo}}\n---\n{}---\n{}",
            service("one", 82),
            "apiVersion: v1\nkind: Service\nmetadata: {name: two, namespace: demo}\nspec:\n  ports:\n  - port: [eighty]\n"
        ),
    );
    let origin = ManifestDir::scope_of(&a);
    wait_for(&store, "problem reported", |s| {
        s.problems().contains_key(&origin)
    })
    .await;
    let problem = store.problems()[&origin].clone();
    assert!(
        problem.starts_with("document 3: spec.ports[0].port: invalid type"),
        "{problem}"
    );
    assert_eq!(port(&store, "one"), Some(82));
    assert_eq!(
        port(&store, "two"),
        Some(80),
        "bad document keeps the old object"
    );
    assert!(
        store
            .get(&ObjectKey::new(Kind::Namespace, "", "demo"))
            .is_some()
    );

    // Fix it: problem clears, and "two" (now gone from the file) is deleted.
    write(
        &a,
        &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: demo}}\n---\n{}",
            service("one", 82)
        ),
    );
    wait_for(&store, "problem cleared", |s| {
        !s.problems().contains_key(&origin) && s.get(&svc_key("two")).is_none()
    })
    .await;
    assert_eq!(port(&store, "one"), Some(82));

    // Remove a file: its objects go.
    std::fs::remove_file(&b).unwrap();
    wait_for(&store, "removed file", |s| {
        s.get(&svc_key("three")).is_none()
    })
    .await;
    assert_eq!(port(&store, "one"), Some(82));

    // Removing the file holding the Namespace deletes it, and "one" with it.
    std::fs::remove_file(&a).unwrap();
    wait_for(&store, "all gone", |s| s.snapshot().is_empty()).await;

    assert!(!task.is_finished(), "source keeps running");
    task.abort();
}

#[tokio::test]
async fn manifest_dir_live_updates_inotify() {
    live_updates(false).await;
}

#[tokio::test]
async fn manifest_dir_live_updates_polling() {
    live_updates(true).await;
}

#[test]
fn load_once_reads_everything_and_drops_stale_scopes() {
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("x.json"),
        r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"x","namespace":"demo"}}"#,
    );
    write(&dir.path().join("y.yaml"), &service("y", 80));
    write(
        &dir.path().join("bad.yaml"),
        "apiVersion: extensions/v1beta1\nkind: Ingress\nmetadata: {name: old}\n",
    );
    let store = Store::new();
    let source = ManifestDir::new(dir.path().to_path_buf());
    let writer = store.writer("manifests");
    source.load_once(&writer).unwrap();
    assert!(store.get(&svc_key("x")).is_some());
    assert!(store.get(&svc_key("y")).is_some());
    // A known kind in an unserved version is reported, not silently ignored.
    let origin = ManifestDir::scope_of(&dir.path().join("bad.yaml"));
    assert_eq!(
        store.problems()[&origin],
        "document 1: no matches for kind \"Ingress\" in version \"extensions/v1beta1\""
    );

    std::fs::remove_file(dir.path().join("y.yaml")).unwrap();
    std::fs::remove_file(dir.path().join("bad.yaml")).unwrap();
    source.load_once(&writer).unwrap();
    assert!(store.get(&svc_key("x")).is_some());
    assert!(store.get(&svc_key("y")).is_none());
    assert!(store.problems().is_empty());

    let missing = ManifestDir::new(dir.path().join("nope")).load_once(&writer);
    assert!(matches!(missing, Err(StoreError::Io { .. })));
}

#[tokio::test]
async fn renaming_a_file_keeps_its_objects() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.yaml");
    write(&a, &service("one", 80));
    let store = Store::new();
    let task = store.spawn_source(ManifestDir::new(dir.path().to_path_buf()));
    wait_for(&store, "initial load", |s| port(s, "one") == Some(80)).await;
    let uid = store
        .get(&svc_key("one"))
        .unwrap()
        .meta()
        .resource_version
        .clone();

    let b = dir.path().join("b.yaml");
    std::fs::rename(&a, &b).unwrap();
    // Touch another file afterwards so there is an event to wait for that
    // comes after the rename has been handled.
    write(&dir.path().join("z.yaml"), &service("marker", 1));
    wait_for(&store, "marker", |s| s.get(&svc_key("marker")).is_some()).await;
    let one = store
        .get(&svc_key("one"))
        .expect("object survives a rename");
    assert_eq!(one.meta().resource_version, uid, "a rename is no change");
    task.abort();
}
