//! The watched directory against special files, foreign files and big
//! files (issue 14 items 3 and 7, issue 8 item 4).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use membrane_store::{Kind, ManifestDir, ObjectKey, Store};

fn svc_key(name: &str) -> ObjectKey {
    ObjectKey::new(Kind::Service, "default", name)
}

fn service(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  ports:\n  - port: 80\n"
    )
}

/// Waits (bounded) until `pred` holds, waking on store changes.
async fn wait_for(store: &Store, what: &str, pred: impl Fn(&Store) -> bool) {
    let mut rx = store.subscribe();
    let done = tokio::time::timeout(Duration::from_secs(60), async {
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
    assert!(
        done.is_ok() && pred(store),
        "timed out waiting for {what}; problems: {:?}",
        store.problems()
    );
}

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("run mkfifo");
    assert!(status.success(), "mkfifo {}", path.display());
}

/// Issue 14.7: a FIFO in the watched directory hung the watcher (opening it
/// blocks) and later changes were never applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_does_not_hang_the_watcher() {
    let dir = tempfile::tempdir().expect("tempdir");
    // One FIFO present from the start (the initial load), one created later
    // (a file event for a manifest-looking name).
    mkfifo(&dir.path().join("early.yaml"));
    std::fs::write(dir.path().join("a.yaml"), service("a")).expect("write");
    let store = Store::new();
    let task = store.spawn_source(ManifestDir::new(dir.path().to_path_buf()));
    wait_for(&store, "initial load", |s| s.get(&svc_key("a")).is_some()).await;

    mkfifo(&dir.path().join("late.yaml"));
    std::fs::write(dir.path().join("b.yaml"), service("b")).expect("write");
    wait_for(&store, "a change after the FIFO", |s| {
        s.get(&svc_key("b")).is_some()
    })
    .await;
    // And the one after that, in a separate burst.
    tokio::time::sleep(Duration::from_millis(100)).await;
    std::fs::write(dir.path().join("c.yaml"), service("c")).expect("write");
    wait_for(&store, "another change", |s| s.get(&svc_key("c")).is_some()).await;
    assert!(store.problems().is_empty(), "{:?}", store.problems());
    assert!(!task.is_finished(), "the source must keep running");
    task.abort();
}

/// Issue 8.4: JSON/YAML that is not a Kubernetes manifest (Envoy's
/// bootstrap, a package.json) is not a problem, and an ignored directory
/// (Membrane's run directory) is never read.
#[tokio::test]
async fn foreign_files_and_ignored_dirs_are_not_problems() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("bootstrap.json"),
        r#"{"node": {"id": "membrane~local"}, "static_resources": {}}"#,
    )
    .expect("write");
    std::fs::write(
        dir.path().join("compose.yml"),
        "services:\n  web: {image: x}\n",
    )
    .expect("write");
    std::fs::write(dir.path().join("a.yaml"), service("a")).expect("write");
    let run = dir.path().join("run");
    std::fs::create_dir(&run).expect("mkdir");
    std::fs::write(run.join("bad.yaml"), "apiVersion: v1\nkind: [\n").expect("write");
    std::fs::write(run.join("x.yaml"), service("from-run-dir")).expect("write");

    let store = Store::new();
    let source = ManifestDir::new(dir.path().to_path_buf()).ignoring(&run);
    let task = store.spawn_source(source);
    wait_for(&store, "initial load", |s| s.get(&svc_key("a")).is_some()).await;
    assert!(store.problems().is_empty(), "{:?}", store.problems());
    assert!(store.get(&svc_key("from-run-dir")).is_none());

    // Writes in the run directory and to a log wake nothing: the revision
    // stays put while a later manifest change still lands.
    let revision = store.revision();
    std::fs::write(run.join("y.yaml"), service("late-run")).expect("write");
    std::fs::write(dir.path().join("membrane.log"), "line\n").expect("write");
    std::fs::write(dir.path().join("b.yaml"), service("b")).expect("write");
    wait_for(&store, "b", |s| s.get(&svc_key("b")).is_some()).await;
    assert!(store.get(&svc_key("late-run")).is_none());
    assert!(store.problems().is_empty(), "{:?}", store.problems());
    assert!(store.revision() > revision);

    // A manifest missing only one of apiVersion/kind is still a mistake.
    std::fs::write(
        dir.path().join("c.yaml"),
        "kind: Service\nmetadata: {name: c}\n",
    )
    .expect("write");
    wait_for(&store, "problem for c.yaml", |s| {
        s.problems().keys().any(|k| k.ends_with("c.yaml"))
    })
    .await;
    task.abort();
}

/// Issue 14.3: the watcher handled files one after another, so one big file
/// delayed every other change. A small file written with a big one is
/// applied while the big one is still being parsed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_file_does_not_hold_up_small_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::new();
    let task = store.spawn_source(ManifestDir::new(dir.path().to_path_buf()));
    std::fs::write(dir.path().join("start.yaml"), service("start")).expect("write");
    wait_for(&store, "start", |s| s.get(&svc_key("start")).is_some()).await;

    // ~4 MiB of small Services: a second or more of parsing in any build.
    let mut big = String::new();
    let mut i = 0;
    while big.len() < 4 << 20 {
        big.push_str("---\n");
        big.push_str(&service(&format!("big-{i}")));
        i += 1;
    }
    let last = format!("big-{}", i - 1);
    // Written whole under another name and renamed in, as editors do, so
    // the watcher never sees half of it.
    let tmp = dir.path().join(".big.tmp");
    std::fs::write(&tmp, &big).expect("write");
    std::fs::rename(&tmp, dir.path().join("big.yaml")).expect("rename");
    std::fs::write(dir.path().join("small.yaml"), service("small")).expect("write");

    wait_for(&store, "small", |s| s.get(&svc_key("small")).is_some()).await;
    assert!(
        store.get(&svc_key(&last)).is_none(),
        "the small file waited for the big one"
    );
    wait_for(&store, "big", |s| s.get(&svc_key(&last)).is_some()).await;
    assert!(store.problems().is_empty(), "{:?}", store.problems());
    task.abort();
}
