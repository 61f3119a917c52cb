//! Moving a committed push's pack from `staging/transfer/<shard>/<repo>/` (where
//! the leader's `PackTransfer.Stage` left it) into the repository's pack
//! directory, durably and idempotently — the step a replica performs while
//! applying a `Push` entry.
//!
//! A replica that never received the pack (it was down or slow while the
//! leader staged it) fetches it from a peer first: a quorum held it before
//! the entry committed, so some peer has it staged or already placed.
//! Without peers a missing pack is an error that stops apply rather than a
//! silent gap.

use std::fs;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use cairn_packfile::ObjectId;
use cairn_proto::pack::pack_transfer_client::PackTransferClient;
use cairn_raft::GroupId;
use tonic::transport::Endpoint;

use crate::pack_transfer::{fetch_pack, fsync_dir, parse_pack_id, StagingArea};
use crate::shard_state::{PackPlacer, PackRef};

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Places packs from this node's staging area, fetching missing ones from
/// the shard's other replicas.
#[derive(Clone)]
pub struct LocalPackPlacer {
    area: StagingArea,
    /// The shard's other replicas: node id and gRPC `host:port`.
    peers: Vec<(u64, String)>,
}

impl LocalPackPlacer {
    /// A placer that never fetches: a pack not staged here is an error.
    pub fn new(area: StagingArea) -> Self {
        LocalPackPlacer {
            area,
            peers: Vec::new(),
        }
    }

    /// A placer that fetches packs it lacks from `peers`.
    pub fn with_peers(area: StagingArea, peers: Vec<(u64, String)>) -> Self {
        LocalPackPlacer { area, peers }
    }

    /// Fetches the pack into the shard's staging directory, trying every
    /// peer in turn with backoff until one serves it. Apply cannot skip
    /// the entry, and the commit guarantees a peer holds the pack, so it
    /// waits rather than fails.
    fn fetch(&self, shard: u64, repo_id: u64, id: ObjectId) -> io::Result<()> {
        let dir = self.area.staged_dir(shard, repo_id);
        self.area.create()?;
        fs::create_dir_all(&dir)?;
        // Apply runs synchronously on an async runtime of unknown flavour;
        // a thread with its own runtime neither blocks that runtime's
        // driver nor needs `block_in_place`'s multi-thread requirement.
        std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("pack-fetch".into())
                .spawn_scoped(scope, || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    runtime.block_on(self.fetch_with_retries(shard, repo_id, id, &dir));
                    Ok(())
                })?
                .join()
                .map_err(|_| io::Error::other("pack fetch thread panicked"))?
        })
    }

    async fn fetch_with_retries(
        &self,
        shard: u64,
        repo_id: u64,
        id: ObjectId,
        dir: &std::path::Path,
    ) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            for (peer, addr) in &self.peers {
                let endpoint = match Endpoint::from_shared(format!("http://{addr}")) {
                    Ok(e) => e.connect_timeout(Duration::from_secs(5)),
                    Err(e) => {
                        tracing::warn!(peer, %addr, error = %e, "bad peer address");
                        continue;
                    }
                };
                let mut client = PackTransferClient::new(endpoint.connect_lazy());
                match fetch_pack(&mut client, shard, repo_id, id, dir).await {
                    Ok(_) => {
                        tracing::info!(peer, shard, repo_id, pack = %id, "fetched missing pack");
                        return;
                    }
                    Err(e) => tracing::warn!(
                        peer, shard, repo_id, pack = %id, error = %e,
                        "cannot fetch a committed pack from this replica"
                    ),
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

impl PackPlacer for LocalPackPlacer {
    fn ensure(&self, shard: GroupId, repo_id: u64, pack: &PackRef) -> io::Result<PathBuf> {
        let id = parse_pack_id(&pack.id).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad pack id {:?}", pack.id),
            )
        })?;
        let (pack_dst, idx_dst) = self.area.committed_paths(repo_id, &id);
        let (pack_src, idx_src) = self.area.staged_paths(shard.0, repo_id, &id);
        let present = || pack_src.exists() && idx_src.exists();
        let placed = || pack_dst.exists() && idx_dst.exists();
        {
            let _guard = self.area.hold();
            if placed() {
                // Applied before (a replay after restart): already in place.
                return Ok(pack_dst);
            }
            if !present() && self.peers.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("pack {} is not staged on this replica", pack.id),
                ));
            }
        }
        // Not under the area lock: serving `Fetch` and cleanup need it.
        if !present() {
            tracing::warn!(shard = shard.0, repo_id, pack = %pack.id, "pack not staged here; fetching it from a peer");
            self.fetch(shard.0, repo_id, id)?;
        }
        // Held so the cleanup worker cannot expire the staged copy mid-move.
        let _guard = self.area.hold();
        if !present() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("pack {} vanished from staging before placing", pack.id),
            ));
        }
        let dir = pack_dst
            .parent()
            .ok_or_else(|| io::Error::other("a committed pack path has no directory"))?
            .to_owned();
        fs::create_dir_all(&dir)?;
        // The index goes last: a pack is only used once its index exists.
        fs::rename(&pack_src, &pack_dst)?;
        fs::rename(&idx_src, &idx_dst)?;
        fsync_dir(&dir)?;
        Ok(pack_dst)
    }
}
