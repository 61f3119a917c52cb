//! Errors of the raft storage layer.
//!
//! openraft's storage traits speak `std::io::Error`; these enums carry the
//! structure (group, operation, path) and are wrapped into an `io::Error`
//! only at that boundary, so a caller can still downcast them.

use std::io;
use std::path::PathBuf;

use crate::keys::GroupId;

/// Opening the raft database or attaching to one.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// RocksDB refused to open the database.
    #[error("cannot open raft database at {path}")]
    Db {
        path: PathBuf,
        #[source]
        source: rocksdb::Error,
    },
    /// A database handed in was opened without one of our column families.
    #[error("column family {name} is missing; open the DB with cairn_raft::COLUMN_FAMILIES")]
    MissingColumnFamily { name: &'static str },
    /// The snapshot directory could not be created or cleaned.
    #[error("snapshot directory {path} is not usable")]
    SnapshotDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Reading a group's persisted state at start-up failed.
    #[error("cannot read persisted state of group {group}")]
    State {
        group: GroupId,
        #[source]
        source: Box<StoreError>,
    },
}

/// A failed read or write of one group's log, metadata or state.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A RocksDB operation failed.
    #[error("rocksdb {op} failed for group {group}")]
    Db {
        group: GroupId,
        op: &'static str,
        #[source]
        source: rocksdb::Error,
    },
    /// A persisted value did not decode: corruption or a format change.
    #[error("cannot decode {what} of group {group}")]
    Decode {
        group: GroupId,
        what: &'static str,
        #[source]
        source: postcard::Error,
    },
    /// A value could not be encoded for storage.
    #[error("cannot encode {what} of group {group}")]
    Encode {
        group: GroupId,
        what: &'static str,
        #[source]
        source: postcard::Error,
    },
    /// The log has a missing index inside a requested range.
    #[error("log of group {group} has a hole: expected index {expected}, found {found}")]
    LogHole {
        group: GroupId,
        expected: u64,
        found: u64,
    },
    /// The application failed to apply a committed entry. The replica cannot
    /// go on without diverging, so openraft stops the group.
    #[error("applying entry {index} of group {group} failed")]
    Apply {
        group: GroupId,
        index: u64,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The application could not bring what it keeps outside the rows
    /// (files they name) in line with them after an install or at open.
    /// Serving the rows without it would break their promises, so the
    /// group stops.
    #[error("reconciling the state of group {group} failed")]
    Reconcile {
        group: GroupId,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Reading, writing or verifying a snapshot file failed.
    #[error("snapshot of group {group}")]
    Snapshot {
        group: GroupId,
        #[source]
        source: SnapshotError,
    },
    /// A blocking task (fsync, snapshot I/O) panicked or was cancelled.
    #[error("blocking {op} task of group {group} did not complete")]
    Task {
        group: GroupId,
        op: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
}

/// A snapshot file that cannot be read, written or trusted.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// File system error on the snapshot file.
    #[error("snapshot file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file's framing or checksum is wrong.
    #[error("snapshot file {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: &'static str },
}

impl From<StoreError> for io::Error {
    fn from(e: StoreError) -> Self {
        io::Error::other(e)
    }
}

/// Runs blocking I/O (fsync, file copies, large scans) off the async
/// executor so one slow disk operation does not stall other groups' tasks.
pub(crate) async fn blocking<T, F>(group: GroupId, op: &'static str, f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|source| StoreError::Task { group, op, source })?
}
