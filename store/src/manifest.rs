//! A directory of manifest files as a [`Source`].

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind, MetadataKind, ModifyKind};
use notify::{Event, PollWatcher, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::store::ScopeUpdate;
use crate::{Kind, Source, SourceWriter, StoreError, parse_documents_lenient};

/// Reads every `*.yaml`, `*.yml` and `*.json` file under a directory
/// (recursively, skipping hidden files and directories) and keeps the store
/// in line with them while running.
///
/// Each file is a scope named `file <path>`. A file with bad documents still
/// applies its good ones; the errors become the scope's problem and the
/// objects the file declared before stay as they were, so a bad edit never
/// takes down what is serving. Removing a file deletes its objects. Kinds the
/// store does not hold (a Deployment next to the Ingress) are ignored.
#[derive(Clone, Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    force_polling: bool,
    poll_interval: Duration,
    debounce: Duration,
}

/// Longest time a burst of events may postpone a reload.
const MAX_DEBOUNCE: Duration = Duration::from_millis(500);

impl ManifestDir {
    pub fn new(dir: PathBuf) -> Self {
        ManifestDir {
            dir,
            force_polling: false,
            poll_interval: Duration::from_millis(500),
            debounce: Duration::from_millis(50),
        }
    }

    /// Poll the directory instead of using inotify (for file systems that do
    /// not deliver events; also used when inotify cannot be set up).
    pub fn with_polling(mut self, force: bool) -> Self {
        self.force_polling = force;
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The scope (and problem origin) name of a file.
    pub fn scope_of(path: &Path) -> String {
        format!("file {}", path.display())
    }

    /// Reads the whole directory once and makes the store match it: every
    /// file's objects applied, scopes of files that are gone released.
    /// `membrane up` calls this before serving so it starts complete;
    /// [`Source::run`] does it again after its watcher is in place.
    pub fn load_once(&self, writer: &SourceWriter) -> Result<(), StoreError> {
        let files = list_files(&self.dir)?;
        let mut updates = Vec::new();
        let mut problems = Vec::new();
        let mut present = BTreeSet::new();
        for file in &files {
            let (update, problem) = read_file(file);
            present.insert(update.scope.clone());
            problems.push((update.scope.clone(), problem));
            updates.push(update);
        }
        // Files that went away since the last load: their objects and problems.
        let mut stale: BTreeSet<String> = writer
            .scopes()
            .into_iter()
            .filter(|s| self.owns_scope(s))
            .collect();
        stale.extend(
            writer
                .store()
                .problems()
                .into_keys()
                .filter(|s| self.owns_scope(s)),
        );
        for scope in stale.difference(&present) {
            updates.push(ScopeUpdate {
                scope: scope.clone(),
                objects: Vec::new(),
                keep_missing: false,
            });
            problems.push((scope.clone(), None));
        }
        writer.update_scopes(updates);
        for (scope, problem) in problems {
            writer.set_problem(&scope, problem);
        }
        tracing::debug!(dir = %self.dir.display(), files = files.len(), "manifest directory loaded");
        Ok(())
    }

    /// Re-reads the given files (present or removed) as one store change.
    fn reload_files(&self, writer: &SourceWriter, files: &BTreeSet<PathBuf>) {
        let mut updates = Vec::new();
        let mut problems = Vec::new();
        for file in files {
            let (update, problem) = read_file(file);
            problems.push((update.scope.clone(), problem));
            updates.push(update);
        }
        writer.update_scopes(updates);
        for (scope, problem) in problems {
            writer.set_problem(&scope, problem);
        }
    }

    /// True if `scope` names a file under this directory.
    fn owns_scope(&self, scope: &str) -> bool {
        scope
            .strip_prefix("file ")
            .is_some_and(|p| Path::new(p).strip_prefix(&self.dir).is_ok())
    }

    /// True for a path this source reads: a manifest file, not hidden.
    fn is_manifest(&self, path: &Path) -> bool {
        let Ok(rel) = path.strip_prefix(&self.dir) else {
            return false;
        };
        !rel.as_os_str().is_empty() && !is_hidden(rel) && has_manifest_ext(rel)
    }

    fn start_watcher(
        &self,
        tx: mpsc::UnboundedSender<notify::Result<Event>>,
    ) -> Result<Box<dyn Watcher + Send>, StoreError> {
        let handler = move |tx: mpsc::UnboundedSender<notify::Result<Event>>| {
            move |res: notify::Result<Event>| {
                // The receiver is gone only when the source stopped.
                let _ = tx.send(res);
            }
        };
        if !self.force_polling {
            let attempt = RecommendedWatcher::new(handler(tx.clone()), notify::Config::default())
                .and_then(|mut w| w.watch(&self.dir, RecursiveMode::Recursive).map(|_| w));
            match attempt {
                Ok(w) => return Ok(Box::new(w)),
                Err(e) => tracing::warn!(
                    dir = %self.dir.display(),
                    error = %e,
                    "file events unavailable, polling every {:?}",
                    self.poll_interval
                ),
            }
        }
        // The poller compares mtimes in whole seconds, which misses quick
        // successive edits; comparing contents is cheap for manifest files.
        let config = notify::Config::default()
            .with_poll_interval(self.poll_interval)
            .with_compare_contents(true);
        let mut w = PollWatcher::new(handler(tx), config).map_err(|e| self.watch_error(e))?;
        w.watch(&self.dir, RecursiveMode::Recursive)
            .map_err(|e| self.watch_error(e))?;
        Ok(Box::new(w))
    }

    fn watch_error(&self, e: notify::Error) -> StoreError {
        StoreError::Watch {
            path: self.dir.clone(),
            message: e.to_string(),
        }
    }

    /// Folds one watcher event into the pending work.
    fn note_event(&self, res: notify::Result<Event>, pending: &mut Pending) {
        let event = match res {
            Ok(event) => event,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "watch error, rescanning");
                pending.rescan = true;
                return;
            }
        };
        match event.kind {
            // Opening and reading (our own reads included) change nothing.
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
            EventKind::Access(_) => return,
            EventKind::Modify(ModifyKind::Metadata(MetadataKind::AccessTime)) => return,
            _ => {}
        }
        if event.need_rescan() {
            pending.rescan = true;
        }
        for path in event.paths {
            if self.is_manifest(&path) {
                pending.files.insert(path);
            } else {
                // A directory, a hidden entry (ConfigMap mounts swap a hidden
                // `..data` link), an editor's temp file: re-reading all is cheap
                // and unchanged files cause no store change.
                pending.rescan = true;
            }
        }
    }

    async fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, StoreError> {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| StoreError::Watch {
                path: self.dir.clone(),
                message: format!("reading manifests failed: {e}"),
            })
    }
}

#[derive(Default)]
struct Pending {
    rescan: bool,
    files: BTreeSet<PathBuf>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        !self.rescan && self.files.is_empty()
    }
}

impl Source for ManifestDir {
    fn name(&self) -> String {
        format!("manifests {}", self.dir.display())
    }

    async fn run(self, writer: SourceWriter) -> Result<(), StoreError> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        // Watch first, then read: a change made during the read is still seen.
        let _watcher = self.start_watcher(tx)?;
        {
            let (this, w) = (self.clone(), writer.clone());
            self.blocking(move || this.load_once(&w)).await??;
        }
        let dir_origin = format!("dir {}", self.dir.display());
        loop {
            let Some(first) = rx.recv().await else {
                return Err(StoreError::Watch {
                    path: self.dir.clone(),
                    message: "watcher stopped".into(),
                });
            };
            let mut pending = Pending::default();
            self.note_event(first, &mut pending);
            // Debounce: an editor's save or a `cp -r` comes as a burst.
            let deadline = Instant::now() + MAX_DEBOUNCE;
            loop {
                let wait = self
                    .debounce
                    .min(deadline.saturating_duration_since(Instant::now()));
                if wait.is_zero() {
                    break;
                }
                match tokio::time::timeout(wait, rx.recv()).await {
                    Ok(Some(res)) => self.note_event(res, &mut pending),
                    Ok(None) | Err(_) => break,
                }
            }
            if pending.is_empty() {
                continue;
            }
            let (this, w) = (self.clone(), writer.clone());
            let result = self
                .blocking(move || {
                    if pending.rescan {
                        this.load_once(&w)
                    } else {
                        this.reload_files(&w, &pending.files);
                        Ok(())
                    }
                })
                .await?;
            match result {
                Ok(()) => writer.set_problem(&dir_origin, None),
                Err(e) => {
                    // The directory itself is unreadable; keep what is loaded.
                    tracing::warn!(error = %e, "manifest directory rescan failed");
                    writer.set_problem(&dir_origin, Some(e.to_string()));
                }
            }
        }
    }
}

/// Reads and parses one file into its scope update and problem text.
fn read_file(path: &Path) -> (ScopeUpdate, Option<String>) {
    let scope = ManifestDir::scope_of(path);
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let update = ScopeUpdate {
                scope,
                objects: Vec::new(),
                keep_missing: false,
            };
            return (update, None);
        }
        Err(e) => {
            let update = ScopeUpdate {
                scope,
                objects: Vec::new(),
                keep_missing: true,
            };
            return (update, Some(format!("cannot read: {e}")));
        }
    };
    let mut objects = Vec::new();
    let mut problems = Vec::new();
    for result in parse_documents_lenient(&text) {
        match result {
            Ok(obj) => objects.push(obj),
            Err(e) => match e.root() {
                StoreError::UnknownKind { kind, api_version }
                    if !Kind::all().iter().any(|k| k.kind_name() == kind) =>
                {
                    tracing::debug!(file = %path.display(), %kind, %api_version, "ignoring kind");
                }
                // A known kind in the wrong version is a mistake worth reporting.
                _ => problems.push(e.to_string()),
            },
        }
    }
    let keep_missing = !problems.is_empty();
    if keep_missing {
        tracing::warn!(file = %path.display(), problems = %problems.join("; "), "bad manifest");
    }
    let problem = keep_missing.then(|| problems.join("; "));
    let update = ScopeUpdate {
        scope,
        objects,
        keep_missing,
    };
    (update, problem)
}

/// Manifest files under `dir`, recursively, sorted, hidden entries skipped.
/// Symlinked files are followed; symlinked directories are not (no loops).
fn list_files(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |error| StoreError::Io { path, error }
    };
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    let mut first = true;
    while let Some(d) = stack.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(entries) => entries,
            // The top directory must be readable; a subdirectory removed
            // while walking is simply gone.
            Err(e) if !first && e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io(&d)(e)),
        };
        first = false;
        for entry in entries {
            let entry = entry.map_err(io(&d))?;
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let Ok(file_type) = entry.file_type() else {
                continue;
            };
            if file_type.is_dir() {
                stack.push(path);
            } else if has_manifest_ext(&path) && std::fs::metadata(&path).is_ok_and(|m| m.is_file())
            {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn is_hidden(rel: &Path) -> bool {
    rel.components()
        .any(|c| c.as_os_str().to_string_lossy().starts_with('.'))
}

fn has_manifest_ext(path: &Path) -> bool {
    path.extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .is_some_and(|e| matches!(e.as_str(), "yaml" | "yml" | "json"))
}
