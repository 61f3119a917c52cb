//! Where a node keeps things in its data folder, and what it does with
//! folders laid out by earlier releases.
//!
//! ```text
//! raft/rocksdb/                   the node's one RocksDB (every group)
//! raft/snapshots/, raft/hosted-shards.json
//! packs/<repo id>/pack-<id>.{pack,idx}   committed packs
//! staging/push-<pid>-<n>/         one push being received
//! staging/transfer/…              packs staged by a leader (pack_transfer)
//! ```

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Name prefix of a push's directory under `staging/`.
pub const PUSH_STAGING_PREFIX: &str = "push-";

pub fn staging_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("staging")
}

/// Where repository `id`'s committed pack files live (a `repo::RepoId`).
pub fn pack_dir(data_dir: &Path, id: u64) -> PathBuf {
    data_dir.join("packs").join(id.to_string())
}

/// Removes what pushes interrupted by a stop left under `staging/` (packs a
/// leader staged for others stay: the cleanup worker expires them).
pub fn clean_push_staging(data_dir: &Path) -> io::Result<()> {
    let staging = staging_dir(data_dir);
    fs::create_dir_all(&staging)?;
    for entry in fs::read_dir(&staging)? {
        let entry = entry?;
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(PUSH_STAGING_PREFIX)
        {
            fs::remove_dir_all(entry.path())?;
        }
    }
    Ok(())
}

/// A folder written by a release whose single node kept repositories in a
/// store of its own (`rocksdb/` beside `raft/`), which this release cannot
/// read.
#[derive(Debug, thiserror::Error)]
#[error(
    "{path} holds repositories of a single-node store written by an earlier Cairn ({repos} \
     repositories); this release keeps every repository in a Raft group and cannot read it. \
     Start the earlier release on this folder and copy each repository out with \
     `git clone --mirror` and `git push --mirror` into a cluster of this release (or move the \
     folder away if its data is not needed)"
)]
pub struct OldSingleNodeStore {
    pub path: PathBuf,
    pub repos: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error(transparent)]
    OldStore(#[from] OldSingleNodeStore),
    #[error("reading {path}: {message}")]
    Unreadable { path: PathBuf, message: String },
    #[error("I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Checks the data folder before the node opens it: a single-node store of
/// an earlier release is refused if it holds repositories (never misread
/// as empty); an empty one, which every node of such a release kept for
/// its staging, is removed.
pub fn check_data_dir(data_dir: &Path) -> Result<(), LayoutError> {
    let old = data_dir.join("rocksdb");
    if !old.join("CURRENT").exists() {
        return Ok(());
    }
    let unreadable = |e: rocksdb::Error| LayoutError::Unreadable {
        path: old.clone(),
        message: e.to_string(),
    };
    let cfs = rocksdb::DB::list_cf(&rocksdb::Options::default(), &old).map_err(unreadable)?;
    let repos = if cfs.iter().any(|c| c == "repos") {
        let db =
            rocksdb::DB::open_cf_for_read_only(&rocksdb::Options::default(), &old, &cfs, false)
                .map_err(unreadable)?;
        let cf = db
            .cf_handle("repos")
            .ok_or_else(|| LayoutError::Unreadable {
                path: old.clone(),
                message: "no repos column family".into(),
            })?;
        db.iterator_cf(cf, rocksdb::IteratorMode::Start).count()
    } else {
        0
    };
    if repos > 0 {
        return Err(OldSingleNodeStore { path: old, repos }.into());
    }
    tracing::info!(path = %old.display(), "removing the empty single-node store of an earlier release");
    fs::remove_dir_all(&old).map_err(|source| LayoutError::Io { path: old, source })
}
