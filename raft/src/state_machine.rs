//! Generic RocksDB-backed state machine for one group.
//!
//! The raft layer owns the bookkeeping (applied log id, membership,
//! snapshots); what a command *does* is an [`ApplyLogic`] supplied by the
//! application. Each entry is applied in one `WriteBatch` holding both the
//! application's writes and the new applied log id, so a crash can never
//! leave one without the other. Batches are written without sync: the log
//! entries they come from are durable, and the WAL prefix argument in
//! `log_store` covers the rest (a lost apply is re-applied from the log).

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use rocksdb::{ColumnFamily, Direction, IteratorMode, ReadOptions, WriteBatch, WriteOptions, DB};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
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
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, rocksdb::Error> {
        self.db.get_cf(self.cf, app_key(self.group, key))
    }

    /// Rows whose key starts with `prefix`, as of before this entry.
    pub fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<Row>, rocksdb::Error> {
        scan_app_prefix(self.db, self.cf, self.group, prefix)
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
    let start = app_key(group, prefix);
    let (_, group_end) = app_range(group);
    let mut opts = ReadOptions::default();
    opts.set_iterate_upper_bound(group_end.to_vec());
    let skip = app_prefix(group).len();
    let mut rows = Vec::new();
    for item in db.iterator_cf_opt(cf, opts, IteratorMode::From(&start, Direction::Forward)) {
        let (key, value) = item?;
        if !key.starts_with(&start) {
            break;
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

/// State shared by a state machine and the snapshot builders it hands out.
struct Shared {
    db: RaftDb,
    group: GroupId,
    dir: PathBuf,
    /// Serialises snapshot pointer updates (a build finishing while a newer
    /// snapshot is installed must not roll the pointer back).
    snapshot_lock: Mutex<()>,
    next_file: AtomicU64,
}

/// State machine of one group: applies entries with `A`, builds and
/// installs snapshots of the group's application rows.
pub struct GroupStateMachine<A> {
    shared: Arc<Shared>,
    logic: Arc<A>,
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
            next_file: AtomicU64::new(0),
        });
        let current = shared
            .current_snapshot()
            .map_err(|source| OpenError::State {
                group,
                source: Box::new(source),
            })?;
        shared
            .remove_files_except(current.as_ref().map(|c| c.file_name.as_str()))
            .map_err(|source| OpenError::SnapshotDir {
                path: shared.dir.clone(),
                source,
            })?;
        Ok(Self {
            shared,
            logic: Arc::new(logic),
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

    fn remove_files_except(&self, keep: Option<&str>) -> io::Result<()> {
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            if keep.is_some_and(|k| entry.file_name() == k) {
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
        // same instant: they were committed in the same batches.
        let view = db.snapshot();
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
        let group = self.group;
        let cf = self.db.cf_state();

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

        // Verify the whole file while staging its rows; nothing is written
        // unless the trailer checks out.
        // TODO(snapshot streaming): the batch holds every row in memory; for
        // very large groups install in chunks behind an "installing" marker.
        let mut batch = WriteBatch::default();
        let (start, end) = app_range(group);
        batch.delete_range_cf(cf, start, end);
        {
            let file = File::open(&path).map_err(|source| self.io_err(&path, source))?;
            let mut reader = SnapshotReader::new(file, &path).map_err(|e| {
                let _ = std::fs::remove_file(&path);
                self.snapshot_err(e)
            })?;
            loop {
                match reader.next_row() {
                    Ok(Some((key, value))) => batch.put_cf(cf, app_key(group, &key), value),
                    Ok(None) => break,
                    Err(e) => {
                        let _ = std::fs::remove_file(&path);
                        return Err(self.snapshot_err(e));
                    }
                }
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
        let file_name = file_name(&path);
        let pointer = CurrentSnapshot {
            meta: meta.clone(),
            file_name: file_name.clone(),
        };
        batch.put_cf(
            cf,
            state_key(group, StateKey::CurrentSnapshot),
            encode(group, "snapshot pointer", &pointer)?,
        );

        let _guard = self
            .snapshot_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let previous = self.current_snapshot()?;
        self.write_synced(batch, "install snapshot")?;
        self.remove_previous(previous, &file_name);
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
        let shared = self.shared.clone();
        let meta = meta.clone();
        Ok(blocking(self.shared.group, "install snapshot", move || {
            shared.install(&meta, snapshot)
        })
        .await?)
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<SnapshotFile>>, io::Error> {
        Ok(self.shared.open_current()?)
    }
}
