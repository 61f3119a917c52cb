//! Moving a committed push's pack from `staging/transfer/<shard>/` (where
//! the leader's `PackTransfer.Stage` left it) into the repository's pack
//! directory, durably and idempotently — the step a replica performs while
//! applying a `Push` entry.
//!
//! Fetching a pack this replica never received from a peer is the next
//! step of replication; until then a missing pack is an error that stops
//! apply rather than a silent gap.

use std::fs;
use std::io;
use std::path::PathBuf;

use cairn_raft::GroupId;

use crate::pack_transfer::{parse_pack_id, StagingArea};
use crate::shard_state::{PackPlacer, PackRef};

/// Places packs from this node's staging area.
#[derive(Clone)]
pub struct LocalPackPlacer {
    area: StagingArea,
}

impl LocalPackPlacer {
    pub fn new(area: StagingArea) -> Self {
        LocalPackPlacer { area }
    }
}

fn fsync_dir(dir: &std::path::Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

impl PackPlacer for LocalPackPlacer {
    fn ensure(&self, shard: GroupId, repo_id: u64, pack: &PackRef) -> io::Result<PathBuf> {
        let id = parse_pack_id(&pack.id).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad pack id {:?}", pack.id),
            )
        })?;
        // Held so the cleanup worker cannot expire the staged copy mid-move.
        let _guard = self.area.hold();
        let (pack_dst, idx_dst) = self.area.committed_paths(repo_id, &id);
        if pack_dst.exists() && idx_dst.exists() {
            // Applied before (a replay after restart): already in place.
            return Ok(pack_dst);
        }
        let (pack_src, idx_src) = self.area.staged_paths(shard.0, &id);
        if !pack_src.exists() || !idx_src.exists() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("pack {} is not staged on this replica", pack.id),
            ));
        }
        let dir = pack_dst
            .parent()
            .expect("a committed pack path has a repository directory")
            .to_owned();
        fs::create_dir_all(&dir)?;
        // The index goes last: a pack is only used once its index exists.
        fs::rename(&pack_src, &pack_dst)?;
        fs::rename(&idx_src, &idx_dst)?;
        fsync_dir(&dir)?;
        Ok(pack_dst)
    }
}
