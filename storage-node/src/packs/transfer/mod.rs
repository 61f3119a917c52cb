//! `PackTransfer`: moving immutable packs between the replicas of a shard.
//!
//! Packs never travel inside the Raft log. The leader stages a validated pack
//! on its followers ([`stage_pack`] → `Stage`) and proposes the entry that
//! moves refs only after a quorum holds it durably; a replica that must apply
//! an entry without the pack, or one rebuilt from a snapshot, pulls it from a
//! peer ([`fetch_pack`] → `Fetch`).
//!
//! Both directions use one chunk format and one receiver ([`receiver`]):
//! per-chunk CRC-32, contiguous offsets, declared sizes, the pack trailer
//! equal to the pack id and to the SHA-1 of the pack, the index's own
//! checksum and the pack it names; files are fsynced before they are renamed
//! into place and the directory after.
//!
//! On disk (under the node's data dir; see `layout`):
//!
//! ```text
//! staging/transfer/tmp-<pid>-<n>/pack-<id>.{pack,idx}   one transfer in flight
//! staging/transfer/<shard>/<repo>/pack-<id>.{pack,idx}  staged, awaiting commit
//! packs/<repo>/pack-<id>.{pack,idx}                     committed
//! ```
//!
//! This module knows nothing of Raft or RocksDB: moving a staged pack into
//! `packs/<repo>/` belongs to the commit step.

mod client;
mod receiver;
mod service;
mod source;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use cairn_packfile::ObjectId;

use crate::layout;
use crate::repo::RepoId;

pub use client::{fetch_pack, stage_pack, FetchError, StageError, StageOutcome};
pub use receiver::{ReceiveError, TransferFile};
pub use service::{PackTransferService, TransferLimits};

/// Largest `data` of one chunk; far below gRPC's 4 MiB message limit.
pub const MAX_CHUNK_BYTES: usize = 1 << 20;

/// Shard ids as they appear in the staging layout.
pub type ShardId = u64;

/// Name of the directory under `staging/` that this module owns.
const TRANSFER_DIR: &str = "transfer";
/// Prefix of in-flight transfer directories; shard directories are numeric,
/// so the two never collide.
pub(crate) const TEMP_PREFIX: &str = "tmp-";

/// Parses a pack id as it appears in file names: exactly 40 lowercase hex
/// digits, so that one pack has exactly one path.
pub fn parse_pack_id(value: &str) -> Option<ObjectId> {
    let canonical = value.len() == 40
        && value
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    canonical
        .then(|| ObjectId::from_hex(value.as_bytes()).ok())
        .flatten()
}

/// `pack-<id>.pack` and `pack-<id>.idx` inside `dir`.
pub fn pack_file_paths(dir: &Path, pack_id: &ObjectId) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("pack-{pack_id}.pack")),
        dir.join(format!("pack-{pack_id}.idx")),
    )
}

/// The node's `staging/transfer/` area, shared by the `PackTransfer` service,
/// the cleanup worker and (later) the commit step.
///
/// Cheap to clone. One lock serialises the short steps that must not
/// interleave: installing a verified pack, confirming an already staged one,
/// opening one for `Fetch`, and the cleanup worker's removal, so a pack
/// acknowledged as staged is never deleted by a cleanup pass that listed it
/// just before.
#[derive(Clone)]
pub struct StagingArea {
    inner: Arc<AreaInner>,
}

struct AreaInner {
    data_dir: PathBuf,
    root: PathBuf,
    lock: Mutex<()>,
}

impl StagingArea {
    /// The area of the node whose data dir is `data_dir`; no I/O.
    pub fn at(data_dir: &Path) -> Self {
        StagingArea {
            inner: Arc::new(AreaInner {
                data_dir: data_dir.to_owned(),
                root: layout::staging_dir(data_dir).join(TRANSFER_DIR),
                lock: Mutex::new(()),
            }),
        }
    }

    /// `staging/transfer/`.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Where staged packs of `repo` in `shard` wait for their commit. Per
    /// repo, because two repos may receive byte-identical packs at once
    /// (forks, mirrors) and each commit moves its own copy.
    pub fn staged_dir(&self, shard: ShardId, repo: RepoId) -> PathBuf {
        self.inner
            .root
            .join(shard.to_string())
            .join(repo.to_string())
    }

    /// Paths of a staged pack and its index.
    pub fn staged_paths(
        &self,
        shard: ShardId,
        repo: RepoId,
        pack_id: &ObjectId,
    ) -> (PathBuf, PathBuf) {
        pack_file_paths(&self.staged_dir(shard, repo), pack_id)
    }

    /// Paths of a committed pack and its index.
    pub fn committed_paths(&self, repo: RepoId, pack_id: &ObjectId) -> (PathBuf, PathBuf) {
        pack_file_paths(&layout::pack_dir(&self.inner.data_dir, repo), pack_id)
    }

    /// Excludes installs, `Fetch` opens and cleanup removals while held; the
    /// commit step holds it while moving a staged pack out.
    pub fn hold(&self) -> MutexGuard<'_, ()> {
        // The guarded state is the file system, not the `()`: a panic while
        // holding it leaves nothing inconsistent in memory.
        self.inner.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Removes every pack staged for `shard` (its replica left this node).
    pub fn remove_shard(&self, shard: ShardId) -> io::Result<()> {
        let _guard = self.hold();
        match fs::remove_dir_all(self.inner.root.join(shard.to_string())) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Creates `staging/transfer/` (and makes its creation durable).
    pub fn create(&self) -> io::Result<()> {
        if !self.inner.root.is_dir() {
            fs::create_dir_all(&self.inner.root)?;
            if let Some(parent) = self.inner.root.parent() {
                fsync_dir(parent)?;
            }
        }
        Ok(())
    }

    /// A fresh directory for one incoming transfer.
    fn temp_dir(&self) -> io::Result<TempDir> {
        TempDir::create_in(&self.inner.root)
    }
}

/// A directory removed with its contents when dropped, unless it was
/// removed already.
pub(crate) struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// A new, uniquely named `tmp-<pid>-<n>` directory inside `parent`.
    pub(crate) fn create_in(parent: &Path) -> io::Result<TempDir> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        fs::create_dir_all(parent)?;
        loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = parent.join(format!("{TEMP_PREFIX}{}-{n}", std::process::id()));
            match fs::create_dir(&path) {
                Ok(()) => return Ok(TempDir { path }),
                // A leftover of an earlier process with the same pid.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove transfer temp dir");
            }
        }
    }
}

pub(crate) fn fsync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_ids_must_be_canonical_hex() {
        let hex = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(
            parse_pack_id(hex).map(|id| id.to_string()),
            Some(hex.into())
        );
        for bad in [
            "",
            "0123456789ABCDEF0123456789abcdef01234567",
            "0123456789abcdef0123456789abcdef0123456",
            "0123456789abcdef0123456789abcdef012345678",
            "../23456789abcdef0123456789abcdef01234567",
        ] {
            assert!(parse_pack_id(bad).is_none(), "{bad:?} accepted");
        }
    }

    #[test]
    fn layout_of_staged_and_committed_packs() {
        let area = StagingArea::at(Path::new("/data"));
        let id = parse_pack_id("0123456789abcdef0123456789abcdef01234567").expect("valid id");
        assert_eq!(
            area.staged_paths(7, 3, &id).0,
            Path::new(
                "/data/staging/transfer/7/3/pack-0123456789abcdef0123456789abcdef01234567.pack"
            )
        );
        assert_eq!(
            area.committed_paths(3, &id).1,
            Path::new("/data/packs/3/pack-0123456789abcdef0123456789abcdef01234567.idx")
        );
    }
}
