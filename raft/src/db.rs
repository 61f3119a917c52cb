//! The node's raft database: one RocksDB shared by all groups.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, Options, DB};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::watch;

use crate::error::{OpenError, StoreError};
use crate::keys::{GroupId, CF_LOG, CF_META, CF_STATE, COLUMN_FAMILIES};
use crate::log_store::GroupLogStore;
use crate::state_machine::{ApplyLogic, GroupStateMachine, StateView};

/// Handle on the node's RocksDB plus the directory of snapshot files.
///
/// Cheap to clone; every group's log store and state machine holds one.
#[derive(Clone)]
pub struct RaftDb {
    db: Arc<DB>,
    snapshot_dir: PathBuf,
    /// Per group: whether what the application keeps outside the rows is
    /// complete for them (see `ApplyLogic::reconcile`). Absent is complete.
    complete: Arc<Mutex<HashMap<GroupId, watch::Sender<bool>>>>,
}

impl std::fmt::Debug for RaftDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftDb")
            .field("path", &self.db.path())
            .field("snapshot_dir", &self.snapshot_dir)
            .finish()
    }
}

/// Descriptors of the column families this crate needs, for a caller that
/// opens the node's DB itself together with its own column families.
pub fn column_family_descriptors() -> Vec<ColumnFamilyDescriptor> {
    COLUMN_FAMILIES
        .iter()
        .map(|name| ColumnFamilyDescriptor::new(*name, Options::default()))
        .collect()
}

impl RaftDb {
    /// Opens (creating if needed) a RocksDB at `db_path` with only the raft
    /// column families, keeping snapshot files under `snapshot_dir`.
    pub fn open(db_path: &Path, snapshot_dir: &Path) -> Result<Self, OpenError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let db = DB::open_cf_descriptors(&opts, db_path, column_family_descriptors()).map_err(
            |source| OpenError::Db {
                path: db_path.to_path_buf(),
                source,
            },
        )?;
        Self::with_db(Arc::new(db), snapshot_dir)
    }

    /// Uses a DB the caller opened with (at least) [`COLUMN_FAMILIES`].
    pub fn with_db(db: Arc<DB>, snapshot_dir: &Path) -> Result<Self, OpenError> {
        for name in COLUMN_FAMILIES {
            if db.cf_handle(name).is_none() {
                return Err(OpenError::MissingColumnFamily { name });
            }
        }
        std::fs::create_dir_all(snapshot_dir).map_err(|source| OpenError::SnapshotDir {
            path: snapshot_dir.to_path_buf(),
            source,
        })?;
        Ok(Self {
            db,
            snapshot_dir: snapshot_dir.to_path_buf(),
            complete: Arc::default(),
        })
    }

    /// The underlying RocksDB.
    pub fn db(&self) -> &Arc<DB> {
        &self.db
    }

    /// The raft log store of `group`.
    pub fn log_store(&self, group: GroupId) -> GroupLogStore {
        GroupLogStore::new(self.clone(), group)
    }

    /// The state machine of `group`, applying commands with `logic`.
    ///
    /// Removes snapshot files of the group that no committed pointer names
    /// (left by a crash mid-build or mid-install).
    pub fn state_machine<A: ApplyLogic>(
        &self,
        group: GroupId,
        logic: A,
    ) -> Result<GroupStateMachine<A>, OpenError> {
        GroupStateMachine::open(self.clone(), group, logic)
    }

    /// A read-only view of `group`'s replicated application state.
    pub fn state_view(&self, group: GroupId) -> StateView {
        StateView::new(self.clone(), group)
    }

    /// The completeness flag of `group`'s state, shared by its state
    /// machine (which sets it) and its views (which wait for it).
    pub(crate) fn completeness(&self, group: GroupId) -> watch::Sender<bool> {
        self.complete
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(group)
            .or_insert_with(|| watch::Sender::new(true))
            .clone()
    }

    /// Deletes everything `group` keeps on this node: its log, vote and
    /// replicated rows, and its snapshot files. Only for a group that is
    /// shut down and will not be opened again with its old state (a
    /// replica moved away); opening it later starts from nothing.
    pub fn drop_group(&self, group: GroupId) -> Result<(), StoreError> {
        let from = group.prefix().to_vec();
        let to = match group.0.checked_add(1) {
            Some(next) => GroupId(next).prefix().to_vec(),
            None => vec![0xff; 9],
        };
        let mut batch = rocksdb::WriteBatch::default();
        for cf in [self.cf_log(), self.cf_meta(), self.cf_state()] {
            batch.delete_range_cf(cf, &from, &to);
        }
        let mut opts = rocksdb::WriteOptions::default();
        opts.set_sync(true);
        self.db
            .write_opt(batch, &opts)
            .map_err(|source| StoreError::Db {
                group,
                op: "drop group",
                source,
            })?;
        let dir = self.group_snapshot_dir(group);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(StoreError::Snapshot {
                    group,
                    source: crate::error::SnapshotError::Io { path: dir, source },
                })
            }
        }
        self.complete
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&group);
        Ok(())
    }

    /// Directory holding `group`'s snapshot files.
    pub(crate) fn group_snapshot_dir(&self, group: GroupId) -> PathBuf {
        self.snapshot_dir.join(format!("{:016x}", group.0))
    }

    pub(crate) fn cf_log(&self) -> &ColumnFamily {
        self.cf(CF_LOG)
    }

    pub(crate) fn cf_meta(&self) -> &ColumnFamily {
        self.cf(CF_META)
    }

    pub(crate) fn cf_state(&self) -> &ColumnFamily {
        self.cf(CF_STATE)
    }

    fn cf(&self, name: &'static str) -> &ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column families are checked when the RaftDb is built and never dropped")
    }

    /// Reads and decodes one value.
    pub(crate) fn get_decoded<T: DeserializeOwned>(
        &self,
        group: GroupId,
        cf: &ColumnFamily,
        key: &[u8],
        what: &'static str,
    ) -> Result<Option<T>, StoreError> {
        let raw = self
            .db
            .get_pinned_cf(cf, key)
            .map_err(|source| StoreError::Db {
                group,
                op: "get",
                source,
            })?;
        raw.map(|bytes| decode(group, what, &bytes)).transpose()
    }
}

pub(crate) fn encode<T: Serialize>(
    group: GroupId,
    what: &'static str,
    value: &T,
) -> Result<Vec<u8>, StoreError> {
    postcard::to_allocvec(value).map_err(|source| StoreError::Encode {
        group,
        what,
        source,
    })
}

pub(crate) fn decode<T: DeserializeOwned>(
    group: GroupId,
    what: &'static str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|source| StoreError::Decode {
        group,
        what,
        source,
    })
}
