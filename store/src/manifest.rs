//! A directory of manifest files as a [`Source`].

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind, MetadataKind, ModifyKind};
use notify::{Event, PollWatcher, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::store::ScopeUpdate;
use crate::{
    Kind, MAX_INPUT_BYTES, Source, SourceWriter, StoreError, parse_documents_lenient, run_parse,
};

/// Reads every `*.yaml`, `*.yml` and `*.json` file under a directory
/// (recursively, skipping hidden files and directories) and keeps the store
/// in line with them while running.
///
/// Each file is a scope named `file <path>`. A file with bad documents still
/// applies its good ones; the errors become the scope's problem and the
/// objects the file declared before stay as they were, so a bad edit never
/// takes down what is serving. Removing a file deletes its objects. Kinds the
/// store does not hold (a Deployment next to the Ingress) are ignored, and so
/// are files that hold no Kubernetes object at all (no `apiVersion`/`kind`:
/// a `package.json`, Envoy's bootstrap) and anything that is not a regular
/// file (a FIFO, a socket), which is never opened.
///
/// Files are read and parsed off the async workers and concurrently, and
/// their results applied as they come, so one big file does not hold up a
/// change to the others.
#[derive(Clone, Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    /// Absolute directories never read (Membrane's own run directory).
    ignored: Vec<PathBuf>,
    force_polling: bool,
    poll_interval: Duration,
    debounce: Duration,
    /// Debug notes already logged, per file: each is logged once, so an
    /// unchanged reload logs nothing.
    noted: Arc<Mutex<BTreeSet<(PathBuf, String)>>>,
}

/// Longest time a burst of events may postpone a reload.
const MAX_DEBOUNCE: Duration = Duration::from_millis(500);

/// How long the results of one burst of changes wait for each other, so a
/// rename (one file gone, another new) is one store change; after this,
/// each file's result is applied as soon as it is parsed.
const BATCH_WAIT: Duration = Duration::from_millis(200);

impl ManifestDir {
    pub fn new(dir: PathBuf) -> Self {
        ManifestDir {
            dir,
            ignored: Vec::new(),
            force_polling: false,
            poll_interval: Duration::from_millis(500),
            debounce: Duration::from_millis(50),
            noted: Arc::default(),
        }
    }

    /// Poll the directory instead of using inotify (for file systems that do
    /// not deliver events; also used when inotify cannot be set up).
    pub fn with_polling(mut self, force: bool) -> Self {
        self.force_polling = force;
        self
    }

    /// Never read `path` or anything under it, and ignore its file events
    /// (Membrane's run directory when it lies inside the watched one: its
    /// Envoy bootstrap is JSON, and its writes must not wake the watcher).
    /// A path that contains the watched directory itself is not ignored.
    pub fn ignoring(mut self, path: &Path) -> Self {
        let abs = absolute(path);
        if !absolute(&self.dir).starts_with(&abs) {
            self.ignored.push(abs);
        }
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
        let (files, stale) = self.scan(writer)?;
        let mut reads: Vec<FileRead> = files.iter().map(|f| read_file(f)).collect();
        reads.extend(stale.into_iter().map(FileRead::gone));
        self.apply_reads(writer, reads);
        tracing::debug!(dir = %self.dir.display(), files = files.len(), "manifest directory loaded");
        Ok(())
    }

    /// The manifest files present, and the scopes (objects or problems) of
    /// files that are gone since the store last heard of them.
    fn scan(&self, writer: &SourceWriter) -> Result<(Vec<PathBuf>, Vec<String>), StoreError> {
        let files = list_files(&self.dir, &|p: &Path| self.is_ignored(p))?;
        let present: BTreeSet<String> = files.iter().map(|f| Self::scope_of(f)).collect();
        let mut known: BTreeSet<String> = writer
            .scopes()
            .into_iter()
            .filter(|s| self.owns_scope(s))
            .collect();
        known.extend(
            writer
                .store()
                .problems()
                .into_keys()
                .filter(|s| self.owns_scope(s)),
        );
        let stale = known.difference(&present).cloned().collect();
        Ok((files, stale))
    }

    /// Applies file results as one store change. Problems are logged only
    /// when they change, so a reload that changes nothing logs nothing.
    fn apply_reads(&self, writer: &SourceWriter, reads: Vec<FileRead>) {
        let before = writer.store().problems();
        let mut updates = Vec::with_capacity(reads.len());
        let mut problems = Vec::with_capacity(reads.len());
        for read in reads {
            let scope = read.update.scope.clone();
            if let Some(path) = &read.path {
                for note in read.notes {
                    let first = self
                        .noted
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert((path.clone(), note.clone()));
                    if first {
                        tracing::debug!(file = %path.display(), "{note}");
                    }
                }
            }
            if let Some(problem) = &read.problem
                && before.get(&scope) != Some(problem)
            {
                tracing::warn!(%scope, problems = %problem, "bad manifest");
            }
            problems.push((scope, read.problem));
            updates.push(read.update);
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

    fn is_ignored(&self, path: &Path) -> bool {
        !self.ignored.is_empty() && {
            let abs = absolute(path);
            self.ignored.iter().any(|i| abs.starts_with(i))
        }
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
            if self.is_ignored(&path) {
                continue;
            }
            if self.is_manifest(&path) {
                pending.files.insert(path);
                continue;
            }
            match std::fs::symlink_metadata(&path) {
                // A log, a socket, an editor's temp file: not read, so its
                // changes change nothing (a rename onto a manifest name comes
                // with that name).
                Ok(m) if !m.is_dir() && !m.file_type().is_symlink() => {}
                // A directory came or went, a ConfigMap mount swapped its
                // hidden `..data` link: re-reading all is cheap and unchanged
                // files cause no store change.
                _ => pending.rescan = true,
            }
        }
    }

    /// Reads and parses `path` on a blocking thread; the result arrives on
    /// `done`. A file already being read is read again once that finishes,
    /// so results of one file are applied in order.
    fn start_read(
        &self,
        path: PathBuf,
        reads: &mut Reads,
        done: &mpsc::UnboundedSender<(PathBuf, FileRead)>,
    ) {
        if reads.in_flight.contains(&path) {
            reads.again.insert(path);
            return;
        }
        reads.in_flight.insert(path.clone());
        let done = done.clone();
        tokio::spawn(async move {
            let len = tokio::fs::metadata(&path)
                .await
                .map_or(0, |m| usize::try_from(m.len()).unwrap_or(usize::MAX));
            let p = path.clone();
            let read = match run_parse(len, move || read_file(&p)).await {
                Ok(read) => read,
                Err(e) => FileRead::failed(&path, e.to_string()),
            };
            // The receiver is gone only when the source stopped.
            let _ = done.send((path, read));
        });
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

/// Files being read, and results waiting to be applied together.
#[derive(Default)]
struct Reads {
    in_flight: BTreeSet<PathBuf>,
    /// Changed again while being read.
    again: BTreeSet<PathBuf>,
    ready: Vec<FileRead>,
    /// When waiting results are applied even though others are still
    /// being parsed.
    flush_at: Option<Instant>,
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
        let (done_tx, mut done_rx) = mpsc::unbounded_channel();
        let mut reads = Reads::default();
        // The burst being debounced: an editor's save or a `cp -r` comes as
        // many events. Debouncing is part of this loop (not a wait inside
        // it), so parse results keep being applied meanwhile.
        let mut pending = Pending::default();
        let mut quiet_at: Option<Instant> = None;
        let mut burst_ends: Option<Instant> = None;
        loop {
            let flush_at = reads.flush_at.filter(|_| !reads.ready.is_empty());
            let mut dispatch = false;
            tokio::select! {
                event = rx.recv() => {
                    let Some(event) = event else {
                        return Err(StoreError::Watch {
                            path: self.dir.clone(),
                            message: "watcher stopped".into(),
                        });
                    };
                    self.note_event(event, &mut pending);
                    // Events that change nothing (our own reads) start no burst.
                    if !pending.is_empty() {
                        let now = Instant::now();
                        let cap = *burst_ends.get_or_insert(now + MAX_DEBOUNCE);
                        quiet_at = Some((now + self.debounce).min(cap));
                    }
                }
                () = tokio::time::sleep_until(quiet_at.unwrap_or_else(Instant::now)), if quiet_at.is_some() => {
                    dispatch = true;
                }
                Some((path, read)) = done_rx.recv() => {
                    reads.in_flight.remove(&path);
                    reads.ready.push(read);
                    if reads.again.remove(&path) {
                        self.start_read(path, &mut reads, &done_tx);
                    }
                }
                () = tokio::time::sleep_until(flush_at.unwrap_or_else(Instant::now)), if flush_at.is_some() => {}
            }
            if dispatch {
                (quiet_at, burst_ends) = (None, None);
                let burst = std::mem::take(&mut pending);
                let mut files = burst.files;
                if burst.rescan {
                    let (this, w) = (self.clone(), writer.clone());
                    match self.blocking(move || this.scan(&w)).await? {
                        Ok((all, stale)) => {
                            writer.set_problem(&dir_origin, None);
                            files.extend(all);
                            reads.ready.extend(stale.into_iter().map(FileRead::gone));
                        }
                        Err(e) => {
                            // The directory itself is unreadable; keep what is loaded.
                            tracing::warn!(error = %e, "manifest directory rescan failed");
                            writer.set_problem(&dir_origin, Some(e.to_string()));
                        }
                    }
                }
                if reads.in_flight.is_empty() {
                    reads.flush_at = Some(Instant::now() + BATCH_WAIT);
                }
                for file in files {
                    self.start_read(file, &mut reads, &done_tx);
                }
            }
            let due = reads.flush_at.is_none_or(|t| Instant::now() >= t);
            if !reads.ready.is_empty() && (reads.in_flight.is_empty() || due) {
                self.apply_reads(&writer, std::mem::take(&mut reads.ready));
            }
            if reads.in_flight.is_empty() && reads.ready.is_empty() {
                reads.flush_at = None;
            }
        }
    }
}

/// One file's contribution: its scope update, its problem, debug notes.
struct FileRead {
    path: Option<PathBuf>,
    update: ScopeUpdate,
    problem: Option<String>,
    notes: Vec<String>,
}

impl FileRead {
    /// A file that is gone (or not a manifest any more): its objects go.
    fn gone(scope: String) -> FileRead {
        FileRead {
            path: None,
            update: ScopeUpdate {
                scope,
                objects: Vec::new(),
                keep_missing: false,
            },
            problem: None,
            notes: Vec::new(),
        }
    }

    /// A file that could not be read: what it declared before stays.
    fn failed(path: &Path, problem: String) -> FileRead {
        FileRead {
            path: Some(path.to_path_buf()),
            update: ScopeUpdate {
                scope: ManifestDir::scope_of(path),
                objects: Vec::new(),
                keep_missing: true,
            },
            problem: Some(problem),
            notes: Vec::new(),
        }
    }
}

/// Reads and parses one file.
fn read_file(path: &Path) -> FileRead {
    let scope = ManifestDir::scope_of(path);
    let text = match read_text(path) {
        Ok(Some(text)) => text,
        Ok(None) => {
            let mut read = FileRead::gone(scope);
            read.path = Some(path.to_path_buf());
            return read;
        }
        Err(e) => return FileRead::failed(path, e),
    };
    let results = parse_documents_lenient(&text);
    drop(text);
    let mut read = FileRead::gone(scope);
    read.path = Some(path.to_path_buf());
    // A file with no Kubernetes object in it (Envoy's bootstrap, a
    // package.json) is not a manifest: ignored, not a problem.
    if !results.is_empty()
        && results
            .iter()
            .all(|r| r.as_ref().is_err_and(StoreError::is_not_manifest))
    {
        read.notes
            .push("ignoring file: it holds no Kubernetes object (no apiVersion and kind)".into());
        return read;
    }
    let mut problems = Vec::new();
    for result in results {
        match result {
            Ok(obj) => read.update.objects.push(obj),
            Err(e) => match e.root() {
                StoreError::UnknownKind { kind, api_version }
                    if !Kind::all().iter().any(|k| k.kind_name() == kind) =>
                {
                    read.notes
                        .push(format!("ignoring kind {kind} ({api_version})"));
                }
                // A known kind in the wrong version is a mistake worth reporting.
                _ => problems.push(e.to_string()),
            },
        }
    }
    if !problems.is_empty() {
        read.update.keep_missing = true;
        read.problem = Some(problems.join("; "));
    }
    read
}

/// The text of a regular file of at most [`MAX_INPUT_BYTES`]; `None` when
/// the path is gone or is not a regular file. Nothing else is opened:
/// opening a FIFO blocks until a writer comes, which would hang the watcher.
fn read_text(path: &Path) -> Result<Option<String>, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;

    let too_large = |size: u64| {
        StoreError::TooLarge {
            what: "file",
            size: usize::try_from(size).unwrap_or(usize::MAX),
            limit: MAX_INPUT_BYTES,
        }
        .to_string()
    };
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read: {e}")),
    };
    if !meta.is_file() {
        return Ok(None);
    }
    if meta.len() > MAX_INPUT_BYTES as u64 {
        return Err(too_large(meta.len()));
    }
    // O_NONBLOCK: should the path become a FIFO between the check and the
    // open, the open returns at once instead of waiting for a writer.
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read: {e}")),
    };
    match file.metadata() {
        Ok(m) if m.is_file() => {}
        _ => return Ok(None),
    }
    let mut text = String::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    let limit = MAX_INPUT_BYTES as u64 + 1;
    file.take(limit)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read: {e}"))?;
    if text.len() > MAX_INPUT_BYTES {
        return Err(too_large(text.len() as u64));
    }
    Ok(Some(text))
}

/// `path` made absolute (lexically: no file system access but the current
/// directory), for comparing with ignored directories.
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Manifest files under `dir`, recursively, sorted, hidden entries skipped.
/// Symlinked files are followed; symlinked directories are not (no loops).
fn list_files(dir: &Path, ignored: &dyn Fn(&Path) -> bool) -> Result<Vec<PathBuf>, StoreError> {
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
            if entry.file_name().to_string_lossy().starts_with('.') || ignored(&path) {
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
