//! SQLite storage: the current objects, one global monotonically increasing
//! resourceVersion, and a bounded window of change events that watchers
//! resume from (like etcd's revision history under kine).
//!
//! Every write is one transaction committed before the caller sees its
//! result, and its event is broadcast to live watchers only after the
//! commit, so a watcher never sees a change that a restart loses.
//!
//! Durability is WAL with `synchronous=NORMAL`, as k3s's kine runs SQLite
//! (its default DSN sets only the WAL journal, and the go-sqlite3 driver
//! issues `PRAGMA synchronous = NORMAL` on every connection): a commit is
//! in the WAL file before the caller is answered, so it survives the
//! process being killed at any point; only an OS crash or power loss can
//! lose the last commits (never corrupt the database). With `FULL` every
//! write waited for an fsync of the WAL (3–6 ms on an idle disk, tens of
//! milliseconds while other processes write), which was most of a write's
//! time and capped status writes at start-up to tens per second.
//!
//! Checkpoints (copying the WAL into the database, with an fsync) run from
//! a background thread every 500 ms after commits, a few frames at a time,
//! not inside whichever commit crossed SQLite's auto-checkpoint threshold:
//! that commit used to wait 0.2–4 s for a thousand pages and the fsync.
//! (A second connection checkpointing alongside the writer made writers
//! wait on SQLite's WAL locks instead, and cost the exclusive locking mode
//! that keeps a commit at ~0.05 ms.)

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;
use tokio::sync::broadcast;

use crate::Error;
use crate::error::ApiError;

/// Type of a change event, as in a Kubernetes watch stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }

    fn parse(s: &str) -> EventType {
        match s {
            "ADDED" => EventType::Added,
            "DELETED" => EventType::Deleted,
            _ => EventType::Modified,
        }
    }
}

/// One committed change. `object` carries the resourceVersion `rv`.
#[derive(Clone, Debug)]
pub struct Event {
    pub rv: u64,
    pub kind: EventType,
    pub key: String,
    pub object: Value,
    /// `object` as stored (JSON text): watchers serving the stored form
    /// send it as is instead of serialising the object again each.
    pub text: Arc<str>,
    /// The object before this change; lets selector watches see objects
    /// leave their selection.
    pub prev: Option<Value>,
}

/// What a read-modify-write closure decided.
pub enum Mutation {
    /// Store this object (create or replace); its resourceVersion is set here.
    Put(Value),
    /// Remove the object; the event carries this final state.
    Delete(Value),
    /// Change nothing (no new resourceVersion).
    Keep,
}

/// Result of [`Store::mutate`].
#[derive(Debug)]
pub enum Outcome {
    Created(Value),
    Updated(Value),
    Deleted(Value),
    Unchanged(Option<Value>),
}

/// When a commit is durable (SQLite's `synchronous` in WAL mode).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SyncMode {
    /// `NORMAL`: in the WAL before the caller is answered; survives the
    /// process being killed, not an OS crash or power loss (kine's choice).
    #[default]
    Normal,
    /// `FULL`: fsync'd before the caller is answered; survives power loss,
    /// at one fsync per write.
    Full,
}

/// The persistent object store.
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    events: broadcast::Sender<Arc<Event>>,
    /// How many events are kept for watchers to resume from.
    window: u64,
    checkpointer: Checkpointer,
    /// resourceVersion of the last commit that can give the garbage
    /// collector work (see [`gc_relevant`]).
    gc_rv: AtomicU64,
}

/// How often the checkpointer looks for committed WAL frames.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// The background checkpoint thread; stops when dropped.
struct Checkpointer {
    /// Dropping the sender wakes the thread and ends it.
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Commits since the last checkpoint started.
    commits: Arc<AtomicU64>,
    /// Checkpoints that copied frames (for tests and logs).
    done: Arc<AtomicU64>,
}

impl Checkpointer {
    /// Checkpoints the store's database every [`CHECKPOINT_EVERY`] after
    /// commits, on the store's own connection: a write arriving meanwhile
    /// waits for the few frames of one interval, not for a thousand pages.
    fn start(conn: Arc<Mutex<Connection>>) -> Checkpointer {
        let (stop, wake) = mpsc::channel::<()>();
        let commits = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicU64::new(0));
        let (c, d) = (commits.clone(), done.clone());
        let thread = std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = wake.recv_timeout(CHECKPOINT_EVERY)
                {
                    if c.swap(0, Ordering::Relaxed) == 0 {
                        continue;
                    }
                    let t = std::time::Instant::now();
                    let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
                    let result = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                        Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
                    });
                    drop(conn);
                    match result {
                        Ok((frames, copied)) => {
                            if copied > 0 {
                                d.fetch_add(1, Ordering::Relaxed);
                            }
                            tracing::debug!(
                                frames,
                                copied,
                                ms = t.elapsed().as_secs_f64() * 1e3,
                                "checkpoint"
                            );
                        }
                        Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed"),
                    }
                }
            })
            .ok();
        Checkpointer {
            stop: Some(stop),
            thread,
            commits,
            done,
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS objects (key TEXT PRIMARY KEY, rv INTEGER NOT NULL, object TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (rv INTEGER PRIMARY KEY, type TEXT NOT NULL, key TEXT NOT NULL, object TEXT NOT NULL, prev TEXT);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (name, value) VALUES ('rv', 1), ('compacted', 1);
";

impl Store {
    /// Open (or create) the database `dir/state.db`, keeping `window` events.
    pub fn open(dir: &Path, window: u64) -> Result<Store, Error> {
        Store::open_with(dir, window, SyncMode::default())
    }

    /// [`Store::open`] with the given commit durability.
    pub fn open_with(dir: &Path, window: u64, sync: SyncMode) -> Result<Store, Error> {
        std::fs::create_dir_all(dir).map_err(|e| Error::Io(dir.display().to_string(), e))?;
        let path = dir.join("state.db");
        let conn = Connection::open(&path)?;
        let init = || -> Result<(), rusqlite::Error> {
            // One server per data directory: the exclusive lock is taken by
            // the first write below and held for the life of the connection,
            // so a second server fails here instead of interleaving
            // resourceVersions with this one.
            conn.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
            conn.busy_timeout(std::time::Duration::from_millis(500))?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            // NORMAL (see the module docs): a commit is in the WAL before
            // the client gets its answer; checkpoints still fsync.
            let level = match sync {
                SyncMode::Normal => "NORMAL",
                SyncMode::Full => "FULL",
            };
            conn.pragma_update(None, "synchronous", level)?;
            // Checkpoints belong to the checkpointer, not to a commit.
            conn.pragma_update(None, "wal_autocheckpoint", 0)?;
            conn.execute_batch(SCHEMA)?;
            conn.execute("UPDATE meta SET value = value WHERE name = 'rv'", [])?;
            Ok(())
        };
        init().map_err(|e| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                Error::InUse(dir.display().to_string())
            }
            _ => Error::Db(e),
        })?;
        let (events, _) = broadcast::channel(4096);
        let conn = Arc::new(Mutex::new(conn));
        Ok(Store {
            checkpointer: Checkpointer::start(conn.clone()),
            conn,
            events,
            window: window.max(1),
            // Whatever is stored may hold work a crash interrupted.
            gc_rv: AtomicU64::new(u64::MAX),
        })
    }

    /// resourceVersion of the last commit that may have given the garbage
    /// collector work; `u64::MAX` until the first collection after opening
    /// has been told the store's contents are clean ([`Store::gc_clean`]).
    pub fn gc_relevant_rv(&self) -> u64 {
        self.gc_rv.load(Ordering::Acquire)
    }

    /// A collection pass that started at `rv` found nothing to do: only
    /// commits after it can give the collector work.
    pub fn gc_clean(&self, rv: u64) {
        // Keep a relevant commit that raced with the pass.
        let _ = self
            .gc_rv
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                (cur == u64::MAX || cur <= rv).then_some(0)
            });
    }

    /// Checkpoints so far that copied WAL frames into the database.
    pub fn checkpoints(&self) -> u64 {
        self.checkpointer.done.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-written
        // transaction (it rolls back on drop), so poisoning is harmless.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Subscribe to changes committed from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.events.subscribe()
    }

    /// The current resourceVersion.
    pub fn current_rv(&self) -> Result<u64, Error> {
        let conn = self.lock();
        Ok(meta(&conn, "rv")?)
    }

    /// One object.
    pub fn get(&self, key: &str) -> Result<Option<Value>, Error> {
        let conn = self.lock();
        get_obj(&conn, key)
    }

    /// Whether `key` exists (without reading the object).
    pub fn contains(&self, key: &str) -> Result<bool, Error> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached("SELECT 1 FROM objects WHERE key = ?1")?;
        Ok(stmt.exists(params![key])?)
    }

    /// Every object whose key starts with `prefix`, sorted by key, and the
    /// resourceVersion the list is consistent with.
    pub fn list(&self, prefix: &str) -> Result<(Vec<Value>, u64), Error> {
        let (items, rv) = self.list_keyed(prefix)?;
        Ok((items.into_iter().map(|(_, o)| o).collect(), rv))
    }

    /// The keys under `prefix`, sorted.
    pub fn keys(&self, prefix: &str) -> Result<Vec<String>, Error> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached("SELECT key FROM objects WHERE key >= ?1 AND key < ?2 ORDER BY key")?;
        let rows = stmt.query_map(params![prefix, prefix_end(prefix)], |r| {
            r.get::<_, String>(0)
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Like [`Store::list`], with each object's key.
    pub fn list_keyed(&self, prefix: &str) -> Result<(Vec<(String, Value)>, u64), Error> {
        let (rows, rv) = {
            let conn = self.lock();
            let rv = meta(&conn, "rv")?;
            let mut stmt = conn.prepare_cached(
                "SELECT key, object FROM objects WHERE key >= ?1 AND key < ?2 ORDER BY key",
            )?;
            let rows = stmt
                .query_map(params![prefix, prefix_end(prefix)], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            (rows, rv)
        };
        // Parsed after the lock is released: a list of every object (the
        // garbage collector's, a relist) must not hold up writes meanwhile.
        let mut out = Vec::with_capacity(rows.len());
        for (key, text) in rows {
            out.push((key, serde_json::from_str(&text)?));
        }
        Ok((out, rv))
    }

    /// Events after `rv` whose key starts with `prefix`, oldest first; 410
    /// Gone when `rv` is older than the kept window.
    pub fn events_since(&self, rv: u64, prefix: &str) -> Result<Vec<Event>, Error> {
        let conn = self.lock();
        let compacted = meta(&conn, "compacted")?;
        let current = meta(&conn, "rv")?;
        if rv > current {
            // From another history (e.g. a replaced data directory): the
            // client must relist rather than wait for versions to catch up.
            return Err(ApiError::expired(format!(
                "too large resource version: {rv}, current: {current}"
            ))
            .into());
        }
        if rv < compacted {
            return Err(
                ApiError::expired(format!("too old resource version: {rv} ({compacted})")).into(),
            );
        }
        let mut stmt = conn.prepare_cached(
            "SELECT rv, type, key, object, prev FROM events WHERE rv > ?1 AND key >= ?2 AND key < ?3 ORDER BY rv",
        )?;
        let rows = stmt
            .query_map(params![rv as i64, prefix, prefix_end(prefix)], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Option<String>>(4)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        drop(stmt);
        // Parsed without holding up writes (as in `list_keyed`).
        drop(conn);
        let mut out = Vec::with_capacity(rows.len());
        for (rv, ty, key, obj, prev) in rows {
            out.push(Event {
                rv: rv as u64,
                kind: EventType::parse(&ty),
                key,
                object: serde_json::from_str(&obj)?,
                text: obj.into(),
                prev: match prev {
                    Some(p) => Some(serde_json::from_str(&p)?),
                    None => None,
                },
            });
        }
        Ok(out)
    }

    /// Atomically read `key`, let `f` decide, and commit the result with a
    /// new resourceVersion. `f` may fail with an API error (nothing written).
    pub fn mutate<F>(&self, key: &str, f: F) -> Result<Outcome, Error>
    where
        F: FnOnce(Option<Value>) -> Result<Mutation, Error>,
    {
        let started = std::time::Instant::now();
        let mut conn = self.lock();
        let locked = started.elapsed();
        // The stored text doubles as the event's `prev` (not serialised again).
        let (current, current_text) = match get_text(&conn, key)? {
            Some(t) => (Some(serde_json::from_str::<Value>(&t)?), Some(t)),
            None => (None, None),
        };
        let existed = current.is_some();
        let mutation = f(current.clone())?;
        let (kind, mut object) = match mutation {
            Mutation::Keep => return Ok(Outcome::Unchanged(current)),
            Mutation::Put(obj) if existed => (EventType::Modified, obj),
            Mutation::Put(obj) => (EventType::Added, obj),
            Mutation::Delete(_) if !existed => return Ok(Outcome::Unchanged(None)),
            Mutation::Delete(obj) => (EventType::Deleted, obj),
        };
        let decided = started.elapsed();
        let tx = conn.transaction()?;
        let rv = meta(&tx, "rv")? + 1;
        tx.prepare_cached("UPDATE meta SET value = ?1 WHERE name = 'rv'")?
            .execute(params![rv as i64])?;
        set_rv(&mut object, rv);
        let text: Arc<str> = serde_json::to_string(&object)?.into();
        match kind {
            EventType::Deleted => {
                tx.prepare_cached("DELETE FROM objects WHERE key = ?1")?
                    .execute(params![key])?;
            }
            _ => {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO objects (key, rv, object) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![key, rv as i64, &*text])?;
            }
        }
        let prev_text = match kind {
            EventType::Modified => current_text,
            _ => None,
        };
        tx.prepare_cached(
            "INSERT INTO events (rv, type, key, object, prev) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![rv as i64, kind.as_str(), key, &*text, prev_text])?;
        if rv % 64 == 0 && rv > self.window {
            // Compact: drop events older than the window; a watch from
            // before it gets 410 Gone and relists.
            let floor = rv - self.window;
            tx.execute("DELETE FROM events WHERE rv <= ?1", params![floor as i64])?;
            tx.execute(
                "UPDATE meta SET value = ?1 WHERE name = 'compacted'",
                params![floor as i64],
            )?;
        }
        let written = started.elapsed();
        tx.commit()?;
        self.checkpointer.commits.fetch_add(1, Ordering::Relaxed);
        let committed = started.elapsed();
        let event = Arc::new(Event {
            rv,
            kind,
            key: key.to_string(),
            object: object.clone(),
            text,
            prev: current,
        });
        if gc_relevant(&event) {
            // Never lowers u64::MAX (the first collection not yet run).
            self.gc_rv.fetch_max(rv, Ordering::AcqRel);
        }
        // No receivers is fine.
        let _ = self.events.send(event);
        // Where a write's time goes (lock wait, read + the caller's merge,
        // statements, commit), for `membrane_apiserver=debug`.
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        tracing::debug!(
            key,
            rv,
            kind = kind.as_str(),
            lock_ms = ms(locked),
            decide_ms = ms(decided - locked),
            write_ms = ms(written - decided),
            commit_ms = ms(committed - written),
            "commit"
        );
        Ok(match kind {
            EventType::Added => Outcome::Created(object),
            EventType::Modified => Outcome::Updated(object),
            EventType::Deleted => Outcome::Deleted(object),
        })
    }
}

/// Whether a commit can give the garbage collector work: a deletion (an
/// owner gone, a dependent gone that a foreground deletion waits for), an
/// object being deleted (finalizers to complete), or owner references
/// added or changed (the owner may not exist). Other updates, such as an
/// EndpointSlice's endpoints changing, cannot, and a pass reads every
/// object.
fn gc_relevant(e: &Event) -> bool {
    if e.kind == EventType::Deleted {
        return true;
    }
    let meta = &e.object["metadata"];
    if !meta["deletionTimestamp"].is_null() {
        return true;
    }
    let refs = &meta["ownerReferences"];
    !refs.is_null() && e.prev.as_ref().map(|p| &p["metadata"]["ownerReferences"]) != Some(refs)
}

fn meta(conn: &Connection, name: &str) -> Result<u64, rusqlite::Error> {
    conn.prepare_cached("SELECT value FROM meta WHERE name = ?1")?
        .query_row(params![name], |r| r.get::<_, i64>(0))
        .map(|v| v as u64)
}

fn get_text(conn: &Connection, key: &str) -> Result<Option<String>, Error> {
    let mut stmt = conn.prepare_cached("SELECT object FROM objects WHERE key = ?1")?;
    Ok(stmt.query_row(params![key], |r| r.get(0)).optional()?)
}

fn get_obj(conn: &Connection, key: &str) -> Result<Option<Value>, Error> {
    Ok(match get_text(conn, key)? {
        Some(t) => Some(serde_json::from_str(&t)?),
        None => None,
    })
}

fn set_rv(obj: &mut Value, rv: u64) {
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
    }
}

/// The smallest string greater than every string starting with `prefix`
/// (keys are ASCII; `\u{10FFFF}` sorts after all of them).
fn prefix_end(prefix: &str) -> String {
    format!("{prefix}\u{10FFFF}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(name: &str) -> Value {
        json!({"metadata": {"name": name}})
    }

    #[test]
    fn versions_grow_and_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rv1;
        {
            let s = Store::open(dir.path(), 100).expect("open");
            let out = s
                .mutate("g/r/ns/a", |_| Ok(Mutation::Put(obj("a"))))
                .expect("put");
            assert!(matches!(out, Outcome::Created(_)));
            rv1 = s.current_rv().expect("rv");
            s.mutate("g/r/ns/b", |_| Ok(Mutation::Put(obj("b"))))
                .expect("put");
        }
        let s = Store::open(dir.path(), 100).expect("reopen");
        assert_eq!(s.current_rv().expect("rv"), rv1 + 1);
        let (items, _) = s.list("g/r/ns/").expect("list");
        assert_eq!(items.len(), 2);
        let ev = s.events_since(rv1, "g/r/").expect("events");
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].key, "g/r/ns/b");
    }

    #[test]
    fn old_versions_expire() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(dir.path(), 10).expect("open");
        for i in 0..200 {
            s.mutate(&format!("g/r/ns/o{i}"), |_| Ok(Mutation::Put(obj("x"))))
                .expect("put");
        }
        let err = s.events_since(2, "g/r/").expect_err("expired");
        assert!(matches!(err, Error::Api(ref e) if e.code == 410));
        let rv = s.current_rv().expect("rv");
        assert_eq!(s.events_since(rv - 5, "").expect("recent").len(), 5);
        assert!(s.events_since(rv, "").expect("current").is_empty());
        let err = s.events_since(rv + 1, "").expect_err("future");
        assert!(matches!(err, Error::Api(ref e) if e.code == 410));
    }

    /// The durability kine runs SQLite with (see the module docs).
    #[test]
    fn wal_with_synchronous_normal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(dir.path(), 10).expect("open");
        let conn = s.lock();
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .expect("journal_mode");
        assert_eq!(mode, "wal");
        let sync: i64 = conn
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .expect("synchronous");
        assert_eq!(sync, 1, "NORMAL");
        drop(conn);
        drop(s);
        let s = Store::open_with(dir.path(), 10, SyncMode::Full).expect("reopen");
        let sync: i64 = s
            .lock()
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .expect("synchronous");
        assert_eq!(sync, 2, "FULL");
    }

    #[test]
    fn one_server_per_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = Store::open(dir.path(), 10).expect("open");
        let second = Store::open(dir.path(), 10);
        assert!(matches!(second, Err(Error::InUse(_))), "{:?}", second.err());
        drop(first);
        Store::open(dir.path(), 10).expect("free again");
    }

    /// Commits leave the WAL to the checkpointer: none is copied by a
    /// commit (auto-checkpoint off), the background thread copies them.
    #[test]
    fn checkpoints_run_in_the_background() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(dir.path(), 10).expect("open");
        let auto: i64 = s
            .lock()
            .pragma_query_value(None, "wal_autocheckpoint", |r| r.get(0))
            .expect("wal_autocheckpoint");
        assert_eq!(auto, 0);
        for i in 0..50 {
            s.mutate(&format!("g/r/ns/o{i}"), |_| Ok(Mutation::Put(obj("x"))))
                .expect("put");
        }
        // Bounded wait: the thread looks every 500 ms.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while s.checkpoints() == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(s.checkpoints() >= 1, "no checkpoint within 20 s");
        // What was checkpointed is in the database file itself.
        drop(s);
        let s = Store::open(dir.path(), 10).expect("reopen");
        assert_eq!(s.list("g/r/").expect("list").0.len(), 50);
    }

    /// Only commits that can give the garbage collector work ask for a
    /// pass; endpoint or status churn does not.
    #[test]
    fn garbage_collection_is_asked_for_only_by_relevant_commits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(dir.path(), 100).expect("open");
        assert_eq!(s.gc_relevant_rv(), u64::MAX, "first pass after opening");
        s.gc_clean(s.current_rv().expect("rv"));
        assert_eq!(s.gc_relevant_rv(), 0);
        let put = |key: &str, v: Value| {
            s.mutate(key, |_| Ok(Mutation::Put(v))).expect("put");
            s.current_rv().expect("rv")
        };
        let owned = |spec: u32| json!({"metadata": {"name": "d", "ownerReferences": [{"uid": "u1"}]}, "spec": spec});
        put("g/r/ns/plain", obj("plain"));
        assert_eq!(s.gc_relevant_rv(), 0, "no owner references");
        let rv = put("g/r/ns/d", owned(1));
        assert_eq!(s.gc_relevant_rv(), rv, "new owner references");
        s.gc_clean(rv);
        put("g/r/ns/d", owned(2));
        assert_eq!(s.gc_relevant_rv(), 0, "same owner references");
        // A commit racing with a pass that started before it is kept.
        let before = s.current_rv().expect("rv");
        let rv = put(
            "g/r/ns/d",
            json!({"metadata": {"name": "d", "deletionTimestamp": "2026-01-01T00:00:00Z"}}),
        );
        assert_eq!(s.gc_relevant_rv(), rv, "being deleted");
        s.gc_clean(before);
        assert_eq!(s.gc_relevant_rv(), rv);
        s.gc_clean(rv);
        s.mutate("g/r/ns/plain", |c| Ok(Mutation::Delete(c.expect("exists"))))
            .expect("delete");
        assert_eq!(
            s.gc_relevant_rv(),
            s.current_rv().expect("rv"),
            "a deletion"
        );
    }

    #[test]
    fn prefixes_do_not_overlap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(dir.path(), 10).expect("open");
        s.mutate("g/r/a/x", |_| Ok(Mutation::Put(obj("x"))))
            .expect("put");
        s.mutate("g/r/ab/x", |_| Ok(Mutation::Put(obj("x"))))
            .expect("put");
        assert_eq!(s.list("g/r/a/").expect("list").0.len(), 1);
        assert_eq!(s.list("g/r/").expect("list").0.len(), 2);
    }
}
