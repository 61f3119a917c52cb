//! Generic RocksDB-backed state machine for one group.
//!
//! The raft layer owns the bookkeeping (applied log id, membership,
//! snapshots); what a command *does* is an [`ApplyLogic`] supplied by the
//! application. Each entry is applied in one `WriteBatch` holding both the
//! application's writes and the new applied log id, so a crash can never
//! leave one without the other. Batches are written without sync: the log
//! entries they come from are durable, and the WAL prefix argument in
//! `log_store` covers the rest (a lost apply is re-applied from the log).
//!
//! Rows that arrive by snapshot rather than by entries are followed by
//! [`ApplyLogic::reconcile`], which brings state the application keeps
//! outside the rows (files they name) in line before the install returns; the
//! same pass runs whenever the group opens. [`StateView::is_complete`] says
//! whether such a pass is still running.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use futures::{Stream, StreamExt};
use rocksdb::{ColumnFamily, Direction, IteratorMode, ReadOptions, WriteBatch, WriteOptions, DB};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::instrument;

use crate::db::{decode, encode, RaftDb};
use crate::error::{blocking, OpenError, SnapshotError, StoreError};
use crate::keys::{app_key, app_prefix, app_range, state_key, GroupId, StateKey};
use crate::snapshot::{SnapshotFile, SnapshotReader, SnapshotWriter};
use crate::types::{
    CommandResponse, Entry, EntryPayload, EntryResponder, LogId, RaftSnapshotBuilder,
    RaftStateMachine, Snapshot, SnapshotMeta, StoredMembership, TypeConfig,
};

/// One application row: key (relative to the group) and value.
pub type Row = (Vec<u8>, Vec<u8>);

/// What applying a command means for one kind of group.
///
/// Implemented by the storage node (ref compare-and-swap, repo manifests)
/// and the meta group. `apply` must be deterministic: every replica applies
/// the same entries to the same state and must end in the same state.
/// Business outcomes (a rejected compare-and-swap) belong in `Response`;
/// `Err` is for failures that leave this replica unable to go on (a disk
/// error), and stops the group.
pub trait ApplyLogic: Send + Sync + 'static {
    /// The request carried by a [`Command`](crate::Command) (postcard-encoded).
    type Request: DeserializeOwned + Send;
    /// The answer returned to the proposer in a [`CommandResponse`].
    type Response: Serialize + Send;
    /// A failure to apply.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Applies `request` by staging writes in `state`.
    fn apply(
        &self,
        state: &mut GroupState<'_>,
        request: Self::Request,
    ) -> Result<Self::Response, Self::Error>;

    /// Whether [`ApplyLogic::reconcile`] has anything to do. Only then does
    /// opening the group start a reconcile pass, so logic without outside
    /// state costs no thread at open.
    fn reconciles(&self) -> bool {
        false
    }

    /// Brings what the application keeps outside the replicated rows (files
    /// the rows name) in line with the rows in `view`.
    ///
    /// Runs after a snapshot's rows are durably installed, before the
    /// install returns: entries after the snapshot, and reads behind the
    /// applied index, then see complete state. When [`reconciles`] is true
    /// it also runs on a background thread each time the group is opened
    /// (a crash between install and reconcile, or outside state lost while
    /// the rows survived); entries wait for that pass before they apply.
    /// Rows do not change while it runs. Once `stop` is raised the result
    /// is no longer wanted: return soon, with anything.
    ///
    /// [`reconciles`]: ApplyLogic::reconciles
    fn reconcile(&self, view: &StateView, stop: &StopSignal) -> Result<(), Self::Error> {
        let _ = (view, stop);
        Ok(())
    }
}

/// Raised when a long-running [`ApplyLogic::reconcile`] pass is no longer
/// wanted (its group stopped, or a snapshot install superseded it).
#[derive(Debug, Clone, Default)]
pub struct StopSignal(Arc<AtomicBool>);

impl StopSignal {
    /// A signal not raised yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Raises the signal.
    pub fn stop(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether the signal was raised.
    pub fn is_stopped(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The application's view of its group's state while applying one entry.
///
/// Keys are relative to the group: the raft layer adds the group prefix, so
/// the application cannot write into another group, and everything it writes
/// is inside what a snapshot of the group carries. Reads see the state as of
/// before this entry; writes become visible together with the applied log id
/// when the entry's batch commits.
pub struct GroupState<'a> {
    db: &'a DB,
    cf: &'a ColumnFamily,
    batch: &'a mut WriteBatch,
    group: GroupId,
    log_id: &'a LogId,
}

impl GroupState<'_> {
    /// The group being applied to.
    pub fn group(&self) -> GroupId {
        self.group
    }

    /// Log id of the entry being applied (useful as a version stamp).
    pub fn log_id(&self) -> &LogId {
        self.log_id
    }

    /// Reads a row as of before this entry.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.db
            .get_cf(self.cf, app_key(self.group, key))
            .map_err(|source| StoreError::Db {
                group: self.group,
                op: "read a row",
                source,
            })
    }

    /// Rows whose key starts with `prefix`, as of before this entry.
    pub fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<Row>, StoreError> {
        scan_app_prefix(self.db, self.cf, self.group, prefix).map_err(|source| StoreError::Db {
            group: self.group,
            op: "scan rows",
            source,
        })
    }

    /// The first `limit` rows whose key starts with `prefix`, as of before
    /// this entry: bounded work per entry for housekeeping in key order.
    pub fn scan_prefix_limit(&self, prefix: &[u8], limit: usize) -> Result<Vec<Row>, StoreError> {
        scan_app_prefix_page(self.db, self.cf, self.group, prefix, None, limit).map_err(|source| {
            StoreError::Db {
                group: self.group,
                op: "scan rows",
                source,
            }
        })
    }

    /// At most `limit` rows under `prefix` whose key sorts after `after`,
    /// as of before this entry.
    pub fn scan_prefix_page(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Row>, StoreError> {
        scan_app_prefix_page(self.db, self.cf, self.group, prefix, after, limit).map_err(|source| {
            StoreError::Db {
                group: self.group,
                op: "scan rows",
                source,
            }
        })
    }

    /// Stages a write.
    pub fn put(&mut self, key: &[u8], value: &[u8]) {
        self.batch.put_cf(self.cf, app_key(self.group, key), value);
    }

    /// Stages a deletion.
    pub fn delete(&mut self, key: &[u8]) {
        self.batch.delete_cf(self.cf, app_key(self.group, key));
    }
}

fn scan_app_prefix(
    db: &DB,
    cf: &ColumnFamily,
    group: GroupId,
    prefix: &[u8],
) -> Result<Vec<Row>, rocksdb::Error> {
    scan_app_prefix_page(db, cf, group, prefix, None, usize::MAX)
}

/// At most `limit` rows under `prefix` whose key sorts after `after`.
fn scan_app_prefix_page(
    db: &DB,
    cf: &ColumnFamily,
    group: GroupId,
    prefix: &[u8],
    after: Option<&[u8]>,
    limit: usize,
) -> Result<Vec<Row>, rocksdb::Error> {
    let bound = app_key(group, prefix);
    let start = match after {
        Some(after) if after > prefix => app_key(group, after),
        _ => bound.clone(),
    };
    let (_, group_end) = app_range(group);
    let mut opts = ReadOptions::default();
    opts.set_iterate_upper_bound(group_end.to_vec());
    let skip = app_prefix(group).len();
    let mut rows = Vec::new();
    for item in db.iterator_cf_opt(cf, opts, IteratorMode::From(&start, Direction::Forward)) {
        if rows.len() >= limit {
            break;
        }
        let (key, value) = item?;
        if !key.starts_with(&bound) {
            break;
        }
        if after.is_some_and(|after| &key[skip..] <= after) {
            continue;
        }
        rows.push((key[skip..].to_vec(), value.to_vec()));
    }
    Ok(rows)
}

/// Read-only access to a group's replicated application state, for serving
/// reads outside of `apply` (ref advertisement once the read index allows).
#[derive(Debug, Clone)]
pub struct StateView {
    db: RaftDb,
    group: GroupId,
}

impl StateView {
    pub(crate) fn new(db: RaftDb, group: GroupId) -> Self {
        Self { db, group }
    }

    /// The group this view reads.
    pub fn group(&self) -> GroupId {
        self.group
    }

    /// Reads one application row.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.db
            .db()
            .get_cf(self.db.cf_state(), app_key(self.group, key))
            .map_err(|source| StoreError::Db {
                group: self.group,
                op: "state get",
                source,
            })
    }

    /// Application rows whose key starts with `prefix`.
    pub fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<Row>, StoreError> {
        scan_app_prefix(self.db.db(), self.db.cf_state(), self.group, prefix).map_err(|source| {
            StoreError::Db {
                group: self.group,
                op: "state scan",
                source,
            }
        })
    }

    /// At most `limit` rows under `prefix` whose key sorts after `after`
    /// (from the start of `prefix` without one): walks a large prefix a page
    /// at a time instead of loading it whole.
    pub fn scan_prefix_page(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Row>, StoreError> {
        scan_app_prefix_page(
            self.db.db(),
            self.db.cf_state(),
            self.group,
            prefix,
            after,
            limit,
        )
        .map_err(|source| StoreError::Db {
            group: self.group,
            op: "state scan",
            source,
        })
    }

    /// Whether what the application keeps outside the rows is complete for
    /// them: false while a reconcile pass (after a snapshot install, or at
    /// open) has not finished. A read that needs that outside state (files
    /// the rows name) must not be served before.
    pub fn is_complete(&self) -> bool {
        *self.db.completeness(self.group).borrow()
    }

    /// Waits up to `timeout` for [`StateView::is_complete`]; returns it.
    pub async fn wait_complete(&self, timeout: std::time::Duration) -> bool {
        let mut complete = self.db.completeness(self.group).subscribe();
        let waited = tokio::time::timeout(timeout, complete.wait_for(|c| *c)).await;
        matches!(waited, Ok(Ok(_)))
    }

    /// The last applied log id of the group.
    pub fn applied(&self) -> Result<Option<LogId>, StoreError> {
        self.db.get_decoded(
            self.group,
            self.db.cf_state(),
            &state_key(self.group, StateKey::Applied),
            "applied log id",
        )
    }
}

/// Pointer to the group's current snapshot file, stored in `raft_state`.
#[derive(Debug, Serialize, Deserialize)]
struct CurrentSnapshot {
    meta: SnapshotMeta,
    file_name: String,
}

/// Application rows written per batch while installing a snapshot: bounds
/// the memory an install takes, however large the group.
const INSTALL_BATCH_BYTES: usize = 4 << 20;

/// An install in progress, stored in `raft_state` while its rows are
/// written in several batches: a crash in between leaves old and new rows
/// mixed, and opening the group completes the install from the file.
#[derive(Debug, Serialize, Deserialize)]
struct Installing {
    meta: SnapshotMeta,
    file_name: String,
}

/// State shared by a state machine and the snapshot builders it hands out.
struct Shared {
    db: RaftDb,
    group: GroupId,
    dir: PathBuf,
    /// Serialises snapshot pointer updates (a build finishing while a newer
    /// snapshot is installed must not roll the pointer back).
    snapshot_lock: Mutex<()>,
    /// Held for writing while an install replaces the rows batch by batch;
    /// a build takes its point-in-time view under a read hold, so it never
    /// sees half an install.
    install_lock: RwLock<()>,
    next_file: AtomicU64,
}

/// State machine of one group: applies entries with `A`, builds and
/// installs snapshots of the group's application rows.
pub struct GroupStateMachine<A> {
    shared: Arc<Shared>,
    logic: Arc<A>,
    /// The reconcile pass started at open, until an apply saw it succeed
    /// or an install superseded it.
    open_pass: Option<OpenPass>,
}

impl<A> Drop for GroupStateMachine<A> {
    fn drop(&mut self) {
        // A pass waiting on unreachable peers must not outlive the group
        // (it holds the database open).
        if let Some(pass) = &self.open_pass {
            pass.stop.stop();
        }
    }
}

/// A reconcile pass running on its own thread. A thread, not a task: the
/// application's reconcile blocks (file I/O, waiting for peers), and the
/// group may be opened outside any runtime.
struct OpenPass {
    group: GroupId,
    stop: StopSignal,
    done: watch::Receiver<bool>,
    failure: Arc<Mutex<Option<StoreError>>>,
    failed: bool,
}

impl OpenPass {
    fn start<A: ApplyLogic>(logic: Arc<A>, view: StateView) -> Self {
        let group = view.group();
        let complete = view.db.completeness(group);
        complete.send_replace(false);
        let stop = StopSignal::new();
        let (done_tx, done) = watch::channel(false);
        let failure = Arc::new(Mutex::new(None));
        let (thread_stop, thread_failure) = (stop.clone(), failure.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("reconcile-{group}"))
            .spawn(move || {
                match logic.reconcile(&view, &thread_stop) {
                    // A stopped pass may have returned early.
                    Ok(()) if !thread_stop.is_stopped() => {
                        complete.send_replace(true);
                    }
                    Ok(()) => {}
                    Err(e) => {
                        tracing::error!(%group, error = %e, "reconciling the group's state failed");
                        *lock(&thread_failure) = Some(StoreError::Reconcile {
                            group,
                            source: Box::new(e),
                        });
                    }
                }
                done_tx.send_replace(true);
            });
        if let Err(e) = spawned {
            // The first apply reports it; the closure and its sender are
            // gone, so waiting ends at once.
            *lock(&failure) = Some(StoreError::Reconcile {
                group,
                source: Box::new(e),
            });
        }
        OpenPass {
            group,
            stop,
            done,
            failure,
            failed: false,
        }
    }

    /// Waits for the pass to end.
    async fn ended(&mut self) -> bool {
        self.done.wait_for(|done| *done).await.is_ok()
    }

    /// Waits for the pass and returns its outcome; a failure is returned to
    /// every later caller too.
    async fn finish(&mut self) -> Result<(), StoreError> {
        let ended = self.ended().await;
        if let Some(e) = lock(&self.failure).take() {
            self.failed = true;
            return Err(e);
        }
        if self.failed || !ended {
            self.failed = true;
            return Err(StoreError::Reconcile {
                group: self.group,
                source: "the reconcile pass started at open did not complete".into(),
            });
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Holds a result slot only; a panic elsewhere leaves it usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Builds a snapshot of one group from a RocksDB point-in-time view.
pub struct GroupSnapshotBuilder {
    shared: Arc<Shared>,
}

impl<A: ApplyLogic> GroupStateMachine<A> {
    pub(crate) fn open(db: RaftDb, group: GroupId, logic: A) -> Result<Self, OpenError> {
        let dir = db.group_snapshot_dir(group);
        std::fs::create_dir_all(&dir).map_err(|source| OpenError::SnapshotDir {
            path: dir.clone(),
            source,
        })?;
        let shared = Arc::new(Shared {
            db,
            group,
            dir,
            snapshot_lock: Mutex::new(()),
            install_lock: RwLock::new(()),
            next_file: AtomicU64::new(0),
        });
        let state_err = |source| OpenError::State {
            group,
            source: Box::new(source),
        };
        let current = shared.current_snapshot().map_err(state_err)?;
        let installing: Option<Installing> = shared
            .state_get(StateKey::Installing, "install marker")
            .map_err(state_err)?;
        let keep: Vec<&str> = [
            &current.as_ref().map(|c| &c.file_name),
            &installing.as_ref().map(|i| &i.file_name),
        ]
        .into_iter()
        .flatten()
        .map(|name| name.as_str())
        .collect();
        shared
            .remove_files_except(&keep)
            .map_err(|source| OpenError::SnapshotDir {
                path: shared.dir.clone(),
                source,
            })?;
        if let Some(installing) = installing {
            // A crash in the middle of an install: the file was verified
            // and synced before the first batch, so finish from it.
            tracing::warn!(%group, last = ?installing.meta.last_log_id, "completing an interrupted snapshot install");
            shared
                .load(&installing.meta, &installing.file_name)
                .map_err(state_err)?;
        }
        let logic = Arc::new(logic);
        // In the background: reconciling may wait for peers that are down,
        // and the group must still start, vote and take entries meanwhile
        // (blocking here could also deadlock replicas that each wait for
        // another's files). Reads wait instead: applying waits for the pass,
        // so a leader's read index (which covers its first blank entry)
        // does; a read at an index already applied checks
        // `StateView::is_complete`.
        let open_pass = logic
            .reconciles()
            .then(|| OpenPass::start(logic.clone(), StateView::new(shared.db.clone(), group)));
        Ok(Self {
            shared,
            logic,
            open_pass,
        })
    }

    /// The group this state machine belongs to.
    pub fn group(&self) -> GroupId {
        self.shared.group
    }

    /// A fresh, empty file to receive a snapshot from a leader into; hand
    /// it to `install_snapshot` once complete. Deleted if dropped unused.
    pub fn incoming_snapshot(&self) -> Result<SnapshotFile, StoreError> {
        let path = self.shared.new_file_path("incoming");
        SnapshotFile::create_incoming(path).map_err(|source| StoreError::Snapshot {
            group: self.shared.group,
            source,
        })
    }

    /// Applies one entry in its own batch: the batch holds the applied log
    /// id and the entry's effects, so the next entry's reads see them.
    fn apply_one(&self, entry: &Entry) -> Result<CommandResponse, StoreError> {
        let log_id = &entry.log_id;
        let shared = &self.shared;
        let group = shared.group;
        let cf = shared.db.cf_state();
        let mut batch = WriteBatch::default();
        batch.put_cf(
            cf,
            state_key(group, StateKey::Applied),
            encode(group, "applied log id", log_id)?,
        );
        let apply_err = |source: Box<dyn std::error::Error + Send + Sync>| StoreError::Apply {
            group,
            index: log_id.index,
            source,
        };
        let response = match &entry.payload {
            EntryPayload::Blank => CommandResponse::default(),
            EntryPayload::Membership(membership) => {
                let stored = StoredMembership::new(Some(*log_id), membership.clone());
                batch.put_cf(
                    cf,
                    state_key(group, StateKey::Membership),
                    encode(group, "membership", &stored)?,
                );
                CommandResponse::default()
            }
            EntryPayload::Normal(command) => {
                let request: A::Request = command.decode().map_err(|e| apply_err(Box::new(e)))?;
                let mut state = GroupState {
                    db: shared.db.db(),
                    cf,
                    batch: &mut batch,
                    group,
                    log_id,
                };
                let response = self
                    .logic
                    .apply(&mut state, request)
                    .map_err(|e| apply_err(Box::new(e)))?;
                CommandResponse::encode(&response).map_err(|e| apply_err(Box::new(e)))?
            }
        };
        shared
            .db
            .db()
            .write_opt(batch, &WriteOptions::default())
            .map_err(|source| StoreError::Db {
                group,
                op: "apply",
                source,
            })?;
        Ok(response)
    }
}

impl Shared {
    fn state_get<T: DeserializeOwned>(
        &self,
        tag: StateKey,
        what: &'static str,
    ) -> Result<Option<T>, StoreError> {
        self.db.get_decoded(
            self.group,
            self.db.cf_state(),
            &state_key(self.group, tag),
            what,
        )
    }

    fn applied_state(&self) -> Result<(Option<LogId>, StoredMembership), StoreError> {
        let applied = self.state_get(StateKey::Applied, "applied log id")?;
        let membership = self
            .state_get(StateKey::Membership, "membership")?
            .unwrap_or_default();
        Ok((applied, membership))
    }

    fn current_snapshot(&self) -> Result<Option<CurrentSnapshot>, StoreError> {
        self.state_get(StateKey::CurrentSnapshot, "snapshot pointer")
    }

    fn snapshot_err(&self, source: SnapshotError) -> StoreError {
        StoreError::Snapshot {
            group: self.group,
            source,
        }
    }

    fn io_err(&self, path: &Path, source: io::Error) -> StoreError {
        self.snapshot_err(SnapshotError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// A file name unique within this process run; names from earlier runs
    /// are removed at open, so a restart cannot collide with them.
    fn new_file_path(&self, kind: &str) -> PathBuf {
        let n = self.next_file.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        self.dir.join(format!("{kind}-{nanos:x}-{n}.snap"))
    }

    fn remove_files_except(&self, keep: &[&str]) -> io::Result<()> {
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            if keep.iter().any(|k| entry.file_name() == *k) {
                continue;
            }
            std::fs::remove_file(entry.path())?;
        }
        Ok(())
    }

    fn sync_dir(&self) -> Result<(), StoreError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| self.io_err(&self.dir, source))
    }

    /// Writes a snapshot of the current state to a new file and makes it
    /// the group's current snapshot. Runs on a blocking thread.
    fn build(&self) -> Result<Snapshot<SnapshotFile>, StoreError> {
        let group = self.group;
        let db = self.db.db();
        let cf = self.db.cf_state();
        // One RocksDB snapshot gives rows, applied id and membership of the
        // same instant: they were committed in the same batches (or, for an
        // install, under the install lock).
        let view = {
            let _no_install = self
                .install_lock
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            db.snapshot()
        };
        let read = |tag| {
            view.get_cf(cf, state_key(group, tag))
                .map_err(|source| StoreError::Db {
                    group,
                    op: "snapshot read",
                    source,
                })
        };
        let last_log_id: Option<LogId> = read(StateKey::Applied)?
            .map(|b| decode(group, "applied log id", &b))
            .transpose()?;
        let last_membership: StoredMembership = read(StateKey::Membership)?
            .map(|b| decode(group, "membership", &b))
            .transpose()?
            .unwrap_or_default();

        let path = self.new_file_path("snap");
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|source| self.io_err(&path, source))?;
        let mut writer = SnapshotWriter::new(file).map_err(|source| self.io_err(&path, source))?;
        let (start, end) = app_range(group);
        let mut opts = ReadOptions::default();
        opts.set_iterate_lower_bound(start.to_vec());
        opts.set_iterate_upper_bound(end.to_vec());
        let skip = start.len();
        for item in view.iterator_cf_opt(cf, opts, IteratorMode::Start) {
            let (key, value) = item.map_err(|source| StoreError::Db {
                group,
                op: "snapshot scan",
                source,
            })?;
            writer
                .push(&key[skip..], &value)
                .map_err(|source| self.io_err(&path, source))?;
        }
        let file = writer
            .finish()
            .map_err(|source| self.io_err(&path, source))?;
        file.sync_all()
            .map_err(|source| self.io_err(&path, source))?;
        drop(file);
        self.sync_dir()?;

        let meta = SnapshotMeta {
            last_log_id,
            last_membership,
        };
        self.adopt(&meta, &path)?;
        let data = SnapshotFile::open(path).map_err(|e| self.snapshot_err(e))?;
        Ok(Snapshot {
            meta,
            snapshot: data,
        })
    }

    /// Points the group's current snapshot at `path` unless a newer one is
    /// already current, and removes the file it replaces.
    fn adopt(&self, meta: &SnapshotMeta, path: &Path) -> Result<(), StoreError> {
        let _guard = self
            .snapshot_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let previous = self.current_snapshot()?;
        if let Some(prev) = &previous {
            if prev.meta.last_log_id > meta.last_log_id {
                // A newer snapshot was installed while this one was built.
                let _ = std::fs::remove_file(path);
                return Ok(());
            }
        }
        let file_name = file_name(path);
        let pointer = CurrentSnapshot {
            meta: meta.clone(),
            file_name: file_name.clone(),
        };
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.db.cf_state(),
            state_key(self.group, StateKey::CurrentSnapshot),
            encode(self.group, "snapshot pointer", &pointer)?,
        );
        self.write_synced(batch, "snapshot pointer")?;
        self.remove_previous(previous, &file_name);
        Ok(())
    }

    fn remove_previous(&self, previous: Option<CurrentSnapshot>, current: &str) {
        if let Some(prev) = previous {
            if prev.file_name != current {
                // Best effort: a leftover is removed when the group is opened.
                let _ = std::fs::remove_file(self.dir.join(prev.file_name));
            }
        }
    }

    fn write_synced(&self, batch: WriteBatch, op: &'static str) -> Result<(), StoreError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db
            .db()
            .write_opt(batch, &opts)
            .map_err(|source| StoreError::Db {
                group: self.group,
                op,
                source,
            })
    }

    /// Replaces the group's application rows with the snapshot's and makes
    /// it the current snapshot. Runs on a blocking thread.
    fn install(&self, meta: &SnapshotMeta, mut data: SnapshotFile) -> Result<(), StoreError> {
        // Keep a copy of the snapshot in this group's directory first: once
        // the pointer commits, the file must exist.
        let path = self.new_file_path("snap");
        data.rewind().map_err(|e| self.snapshot_err(e))?;
        if data.path().parent() == Some(self.dir.as_path()) {
            std::fs::rename(data.path(), &path).map_err(|source| self.io_err(&path, source))?;
            data.keep();
        } else {
            let mut copy = File::options()
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(|source| self.io_err(&path, source))?;
            io::copy(data.file_mut(), &mut copy).map_err(|source| self.io_err(&path, source))?;
            copy.flush().map_err(|source| self.io_err(&path, source))?;
            copy.sync_all()
                .map_err(|source| self.io_err(&path, source))?;
        }
        self.sync_dir()?;

        // Verify the whole file before touching the rows: they are replaced
        // in several batches, and a bad trailer found halfway could not be
        // undone.
        if let Err(e) = verify_file(&path) {
            let _ = std::fs::remove_file(&path);
            return Err(self.snapshot_err(e));
        }
        let file_name = file_name(&path);
        let marker = Installing {
            meta: meta.clone(),
            file_name: file_name.clone(),
        };
        let _installing = self
            .install_lock
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.db.cf_state(),
            state_key(self.group, StateKey::Installing),
            encode(self.group, "install marker", &marker)?,
        );
        self.write_synced(batch, "begin snapshot install")?;
        self.load(meta, &file_name)
    }

    /// Replaces the application rows with those of the snapshot file
    /// `file_name`, a bounded batch at a time, and ends the install: the
    /// last batch sets applied id, membership and snapshot pointer and
    /// removes the install marker.
    fn load(&self, meta: &SnapshotMeta, file_name: &str) -> Result<(), StoreError> {
        let group = self.group;
        let cf = self.db.cf_state();
        let path = self.dir.join(file_name);
        let file = File::open(&path).map_err(|source| self.io_err(&path, source))?;
        let mut reader = SnapshotReader::new(file, &path).map_err(|e| self.snapshot_err(e))?;
        let mut batch = WriteBatch::default();
        let (start, end) = app_range(group);
        batch.delete_range_cf(cf, start, end);
        let mut pending = 0usize;
        while let Some((key, value)) = reader.next_row().map_err(|e| self.snapshot_err(e))? {
            pending += key.len() + value.len();
            batch.put_cf(cf, app_key(group, &key), value);
            if pending >= INSTALL_BATCH_BYTES {
                // Not synced: the synced last batch makes the whole write-
                // ahead log before it durable.
                self.db
                    .db()
                    .write_opt(std::mem::take(&mut batch), &WriteOptions::default())
                    .map_err(|source| StoreError::Db {
                        group,
                        op: "install snapshot rows",
                        source,
                    })?;
                pending = 0;
            }
        }
        let applied_key = state_key(group, StateKey::Applied);
        match &meta.last_log_id {
            Some(id) => batch.put_cf(cf, applied_key, encode(group, "applied log id", id)?),
            None => batch.delete_cf(cf, applied_key),
        }
        batch.put_cf(
            cf,
            state_key(group, StateKey::Membership),
            encode(group, "membership", &meta.last_membership)?,
        );
        let pointer = CurrentSnapshot {
            meta: meta.clone(),
            file_name: file_name.to_owned(),
        };
        batch.put_cf(
            cf,
            state_key(group, StateKey::CurrentSnapshot),
            encode(group, "snapshot pointer", &pointer)?,
        );
        batch.delete_cf(cf, state_key(group, StateKey::Installing));

        let _guard = self
            .snapshot_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let previous = self.current_snapshot()?;
        self.write_synced(batch, "install snapshot")?;
        self.remove_previous(previous, file_name);
        Ok(())
    }

    fn open_current(&self) -> Result<Option<Snapshot<SnapshotFile>>, StoreError> {
        let Some(current) = self.current_snapshot()? else {
            return Ok(None);
        };
        let data = SnapshotFile::open(self.dir.join(&current.file_name))
            .map_err(|e| self.snapshot_err(e))?;
        Ok(Some(Snapshot {
            meta: current.meta,
            snapshot: data,
        }))
    }
}

/// Reads a snapshot file through its trailer without keeping any row.
fn verify_file(path: &Path) -> Result<(), SnapshotError> {
    let file = File::open(path).map_err(|source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut reader = SnapshotReader::new(file, path)?;
    while reader.next_row()?.is_some() {}
    Ok(())
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .expect("snapshot paths are built as dir.join(name)")
        .to_string_lossy()
        .into_owned()
}

impl RaftSnapshotBuilder<TypeConfig> for GroupSnapshotBuilder {
    type SnapshotData = SnapshotFile;

    #[instrument(level = "debug", skip_all, fields(group = %self.shared.group))]
    async fn build_snapshot(&mut self) -> Result<Snapshot<SnapshotFile>, io::Error> {
        let shared = self.shared.clone();
        Ok(blocking(self.shared.group, "build snapshot", move || shared.build()).await?)
    }
}

impl<A: ApplyLogic> RaftStateMachine<TypeConfig> for GroupStateMachine<A> {
    type SnapshotData = SnapshotFile;
    type SnapshotBuilder = GroupSnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        Ok(self.shared.applied_state()?)
    }

    #[instrument(level = "debug", skip_all, fields(group = %self.shared.group))]
    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + Send,
    {
        if let Some(pass) = &mut self.open_pass {
            pass.finish().await?;
            self.open_pass = None;
        }
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let response = self.apply_one(&entry)?;
            if let Some(responder) = responder {
                responder.send(response);
            }
        }
        Ok(())
    }

    async fn try_create_snapshot_builder(&mut self, _force: bool) -> Option<Self::SnapshotBuilder> {
        // Building reads a RocksDB point-in-time view and never blocks
        // apply, so there is no reason to defer.
        Some(GroupSnapshotBuilder {
            shared: self.shared.clone(),
        })
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        GroupSnapshotBuilder {
            shared: self.shared.clone(),
        }
    }

    #[instrument(level = "debug", skip_all, fields(group = %self.shared.group, last = ?meta.last_log_id))]
    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotFile,
    ) -> Result<(), io::Error> {
        if let Some(mut pass) = self.open_pass.take() {
            // The snapshot replaces the rows that pass worked for; the
            // install reconciles its own.
            pass.stop.stop();
            pass.ended().await;
        }
        let group = self.shared.group;
        let shared = self.shared.clone();
        let logic = self.logic.clone();
        let meta = meta.clone();
        Ok(blocking(group, "install snapshot", move || {
            // Before the rows change: a reader checking completeness must
            // not meet the new rows with the old flag.
            let complete = shared.db.completeness(group);
            complete.send_replace(false);
            shared.install(&meta, snapshot)?;
            // After the rows are durable, so a crash in between leaves them
            // for the pass at the next open to complete.
            let view = StateView::new(shared.db.clone(), group);
            logic
                .reconcile(&view, &StopSignal::new())
                .map_err(|e| StoreError::Reconcile {
                    group,
                    source: Box::new(e),
                })?;
            complete.send_replace(true);
            Ok(())
        })
        .await?)
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<SnapshotFile>>, io::Error> {
        Ok(self.shared.open_current()?)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tempfile::TempDir;

    use super::*;
    use crate::types::RaftEntry;

    /// Records the number of rows every reconcile pass saw; a pass waits
    /// while `hold` is set, until stopped.
    #[derive(Clone, Default)]
    struct Recording {
        passes: Arc<Mutex<Vec<usize>>>,
        hold: Arc<AtomicBool>,
    }

    impl Recording {
        fn passes(&self) -> Vec<usize> {
            lock(&self.passes).clone()
        }
    }

    impl ApplyLogic for Recording {
        type Request = ();
        type Response = ();
        type Error = io::Error;

        fn apply(&self, _: &mut GroupState<'_>, _: ()) -> Result<(), io::Error> {
            Ok(())
        }

        fn reconciles(&self) -> bool {
            true
        }

        fn reconcile(&self, view: &StateView, stop: &StopSignal) -> Result<(), io::Error> {
            while self.hold.load(Ordering::Relaxed) && !stop.is_stopped() {
                std::thread::sleep(Duration::from_millis(5));
            }
            let rows = view.scan_prefix(b"").map_err(io::Error::other)?;
            lock(&self.passes).push(rows.len());
            Ok(())
        }
    }

    const GROUP: GroupId = GroupId(5);

    fn open_db(dir: &Path) -> RaftDb {
        RaftDb::open(&dir.join("rocksdb"), &dir.join("snapshots")).expect("open raft db")
    }

    fn meta(index: u64) -> SnapshotMeta {
        SnapshotMeta {
            last_log_id: Some(openraft::testing::log_id::<crate::TypeConfig>(1, 1, index)),
            last_membership: StoredMembership::default(),
        }
    }

    fn row(n: usize, value_len: usize) -> Row {
        (format!("k{n:06}").into_bytes(), vec![n as u8; value_len])
    }

    /// A snapshot file of `rows` rows of `value_len` bytes at `path`.
    fn write_snapshot(path: &Path, rows: usize, value_len: usize) {
        let file = File::create(path).expect("create");
        let mut writer = SnapshotWriter::new(file).expect("writer");
        for n in 0..rows {
            let (k, v) = row(n, value_len);
            writer.push(&k, &v).expect("row");
        }
        writer.finish().expect("finish").sync_all().expect("sync");
    }

    async fn blank(sm: &mut GroupStateMachine<Recording>, index: u64) -> io::Result<()> {
        let entry = crate::types::Entry::new_blank(openraft::testing::log_id::<crate::TypeConfig>(
            1, 1, index,
        ));
        sm.apply(futures::stream::iter([Ok((entry, None))])).await
    }

    #[tokio::test]
    async fn a_large_install_is_written_in_batches_and_reconciled_before_it_returns() {
        let dir = TempDir::new().expect("tempdir");
        let db = open_db(dir.path());
        let logic = Recording::default();
        let mut sm = db.state_machine(GROUP, logic.clone()).expect("sm");
        // Rows older than the snapshot must go.
        db.db()
            .put_cf(db.cf_state(), app_key(GROUP, b"stale"), b"x")
            .expect("put");
        // Over two batches' worth of rows.
        let rows = 2 * INSTALL_BATCH_BYTES / 2048 + 10;
        let path = dir.path().join("incoming.snap");
        write_snapshot(&path, rows, 2048);
        let data = SnapshotFile::open(path).expect("open");
        sm.install_snapshot(&meta(40), data).await.expect("install");

        let view = db.state_view(GROUP);
        assert!(view.is_complete());
        let all = view.scan_prefix(b"").expect("scan");
        assert_eq!(all.len(), rows);
        assert_eq!(all[17], row(17, 2048));
        assert_eq!(view.applied().expect("applied"), meta(40).last_log_id);
        // The pass at open saw the empty group (or was superseded); the
        // install's own pass saw every row.
        assert_eq!(logic.passes().last(), Some(&rows));
        let current = sm.get_current_snapshot().await.expect("current");
        assert_eq!(current.expect("a snapshot").meta, meta(40));
    }

    #[tokio::test]
    async fn an_interrupted_install_is_completed_when_the_group_opens() {
        let dir = TempDir::new().expect("tempdir");
        let logic = Recording::default();
        let path;
        {
            let db = open_db(dir.path());
            let sm = db.state_machine(GROUP, logic.clone()).expect("sm");
            let shared = sm.shared.clone();
            path = shared.new_file_path("snap");
            write_snapshot(&path, 100, 10);
            // What a crash after the marker and part of the rows leaves.
            let marker = Installing {
                meta: meta(9),
                file_name: file_name(&path),
            };
            let mut batch = WriteBatch::default();
            batch.put_cf(
                db.cf_state(),
                state_key(GROUP, StateKey::Installing),
                encode(GROUP, "install marker", &marker).expect("encode"),
            );
            batch.delete_range_cf(db.cf_state(), app_range(GROUP).0, app_range(GROUP).1);
            let (k, v) = row(3, 10);
            batch.put_cf(db.cf_state(), app_key(GROUP, &k), v);
            batch.put_cf(db.cf_state(), app_key(GROUP, b"zz-left-over"), b"old");
            shared.write_synced(batch, "test").expect("write");
            drop(sm);
            drop(shared);
            // The open pass thread may still hold the database briefly.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while Arc::strong_count(db.db()) > 1 && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let db = open_db(dir.path());
        let mut sm = db.state_machine(GROUP, logic.clone()).expect("reopen");
        let view = db.state_view(GROUP);
        let all = view.scan_prefix(b"").expect("scan");
        assert_eq!(all, (0..100).map(|n| row(n, 10)).collect::<Vec<_>>());
        assert_eq!(view.applied().expect("applied"), meta(9).last_log_id);
        assert!(sm
            .shared
            .state_get::<Installing>(StateKey::Installing, "install marker")
            .expect("read")
            .is_none());
        assert!(path.exists(), "the installed file is the current snapshot");
        let current = sm.get_current_snapshot().await.expect("current");
        assert_eq!(current.expect("a snapshot").meta, meta(9));
        // Entries wait for the pass at open, which sees the completed rows.
        blank(&mut sm, 10).await.expect("apply");
        assert_eq!(logic.passes().last(), Some(&100));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn entries_and_reads_wait_for_the_pass_at_open() {
        let dir = TempDir::new().expect("tempdir");
        let db = open_db(dir.path());
        let logic = Recording::default();
        logic.hold.store(true, Ordering::Relaxed);
        let mut sm = db.state_machine(GROUP, logic.clone()).expect("sm");
        let view = db.state_view(GROUP);
        assert!(!view.is_complete());
        assert!(!view.wait_complete(Duration::from_millis(50)).await);

        let applying = tokio::spawn(async move {
            blank(&mut sm, 1).await.expect("apply");
            sm
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!applying.is_finished(), "applied before the pass ended");
        logic.hold.store(false, Ordering::Relaxed);
        let sm = applying.await.expect("task");
        assert!(view.wait_complete(Duration::from_secs(5)).await);
        assert_eq!(logic.passes(), vec![0]);
        drop(sm);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_install_supersedes_a_pass_still_running_at_open() {
        let dir = TempDir::new().expect("tempdir");
        let db = open_db(dir.path());
        let logic = Recording::default();
        logic.hold.store(true, Ordering::Relaxed);
        let mut sm = db.state_machine(GROUP, logic.clone()).expect("sm");
        let path = dir.path().join("incoming.snap");
        write_snapshot(&path, 7, 3);
        let data = SnapshotFile::open(path).expect("open");
        // The install's own pass would wait on `hold` too: release it once
        // the open pass was stopped.
        let release = {
            let logic = logic.clone();
            tokio::spawn(async move {
                while logic.passes().is_empty() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                logic.hold.store(false, Ordering::Relaxed);
            })
        };
        tokio::time::timeout(Duration::from_secs(10), sm.install_snapshot(&meta(3), data))
            .await
            .expect("the install does not wait for the stuck pass")
            .expect("install");
        release.await.expect("release");
        let view = db.state_view(GROUP);
        assert!(view.is_complete());
        assert_eq!(logic.passes().last(), Some(&7));
        // Applying after the install does not wait for the stopped pass.
        blank(&mut sm, 4).await.expect("apply");
    }

    #[test]
    fn pages_resume_after_the_last_key() {
        let dir = TempDir::new().expect("tempdir");
        let db = open_db(dir.path());
        for key in [&b"a"[..], b"p/1", b"p/2", b"p/3", b"q"] {
            db.db()
                .put_cf(db.cf_state(), app_key(GROUP, key), key)
                .expect("put");
        }
        let view = db.state_view(GROUP);
        let keys = |rows: Vec<Row>| rows.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        let first = view.scan_prefix_page(b"p/", None, 2).expect("page");
        assert_eq!(keys(first), vec![b"p/1".to_vec(), b"p/2".to_vec()]);
        let next = view.scan_prefix_page(b"p/", Some(b"p/2"), 2).expect("page");
        assert_eq!(keys(next), vec![b"p/3".to_vec()]);
        let done = view.scan_prefix_page(b"p/", Some(b"p/3"), 2).expect("page");
        assert!(done.is_empty());
    }
}
