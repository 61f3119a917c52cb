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
//!
//! The same steps, for every pack a shard's rows name at once, complete a
//! replica rebuilt from a snapshot or one that lost pack files
//! ([`PackPlacer::ensure_all`]): packs already in place are left alone,
//! only missing ones travel, each streamed from a peer to disk.

use std::fs;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cairn_packfile::ObjectId;
use cairn_proto::pack::pack_transfer_client::PackTransferClient;
use cairn_raft::{GroupId, StopSignal};
use futures::{StreamExt, TryStreamExt};
use tonic::transport::{Channel, Endpoint};

use crate::packs::transfer::{fetch_pack, fsync_dir, parse_pack_id, StagingArea};
use crate::shard::state::{PackPlacer, PackRef};

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Packs fetched at once while catching up: enough to hide one stream's
/// round trips, few enough not to starve the peers' own traffic.
const FETCH_CONCURRENCY: usize = 4;

/// Places packs from this node's staging area, fetching missing ones from
/// the shard's other replicas.
#[derive(Clone)]
pub struct LocalPackPlacer {
    area: StagingArea,
    /// The shard's other replicas: node id and gRPC `host:port`.
    peers: PeerBook,
    /// This node, never fetched from.
    me: Option<u64>,
    /// Packs fetched from peers, for observing catch-up.
    fetched: Arc<AtomicU64>,
}

/// Where a pack is on this replica.
enum Location {
    Placed(PathBuf),
    Staged,
    Missing,
}

/// A peer to fetch from, with one channel shared by all fetches of a run.
struct Peer {
    id: u64,
    client: PackTransferClient<Channel>,
}

fn bad_pack_id(pack: &PackRef) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("bad pack id {:?}", pack.id),
    )
}

fn stopped() -> io::Error {
    io::Error::new(io::ErrorKind::Interrupted, "pack fetching was stopped")
}

impl LocalPackPlacer {
    /// A placer that never fetches: a pack not staged here is an error.
    pub fn new(area: StagingArea) -> Self {
        Self::with_peers(area, Vec::new())
    }

    /// A placer that fetches packs it lacks from `peers`.
    pub fn with_peers(area: StagingArea, peers: Vec<(u64, String)>) -> Self {
        let book = PeerBook::default();
        for (id, addr) in peers {
            book.insert(id, addr);
        }
        Self::with_book(area, book, None)
    }

    /// A placer that fetches packs it lacks from every node in `book` but
    /// `me`, as the book is when it fetches: replicas come and go as
    /// shards move, and a node without the pack just answers not found.
    pub fn with_book(area: StagingArea, book: PeerBook, me: Option<u64>) -> Self {
        LocalPackPlacer {
            area,
            peers: book,
            me,
            fetched: Arc::default(),
        }
    }

    fn peers(&self) -> Vec<(u64, String)> {
        self.peers
            .all()
            .into_iter()
            .filter(|(id, _)| Some(*id) != self.me)
            .collect()
    }

    /// Counts fetched packs into `counter`, so one counter can cover every
    /// shard of a node.
    pub fn with_fetch_counter(mut self, counter: Arc<AtomicU64>) -> Self {
        self.fetched = counter;
        self
    }

    /// Packs fetched from peers through this placer's counter.
    pub fn packs_fetched(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }

    fn locate(&self, shard: u64, repo_id: u64, id: &ObjectId) -> Location {
        let (pack_dst, idx_dst) = self.area.committed_paths(repo_id, id);
        let (pack_src, idx_src) = self.area.staged_paths(shard, repo_id, id);
        let _guard = self.area.hold();
        if pack_dst.exists() && idx_dst.exists() {
            Location::Placed(pack_dst)
        } else if pack_src.exists() && idx_src.exists() {
            Location::Staged
        } else {
            Location::Missing
        }
    }

    /// Moves a staged pack into the repository's pack directory.
    fn place_staged(&self, shard: u64, repo_id: u64, id: &ObjectId) -> io::Result<PathBuf> {
        let (pack_dst, idx_dst) = self.area.committed_paths(repo_id, id);
        let (pack_src, idx_src) = self.area.staged_paths(shard, repo_id, id);
        // Held so the cleanup worker cannot expire the staged copy mid-move.
        let _guard = self.area.hold();
        if !(pack_src.exists() && idx_src.exists()) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("pack {id} vanished from staging before placing"),
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

    /// Runs `work` on a thread of its own with a current-thread runtime.
    /// Callers run synchronously on an async runtime of unknown flavour
    /// (apply) or on a plain thread (reconcile); a separate thread neither
    /// blocks that runtime's driver nor needs `block_in_place`'s
    /// multi-thread requirement.
    fn on_fetch_thread<T, F, Fut>(&self, work: F) -> io::Result<T>
    where
        T: Send,
        F: FnOnce(Vec<Peer>) -> Fut + Send,
        Fut: std::future::Future<Output = io::Result<T>>,
    {
        std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("pack-fetch".into())
                .spawn_scoped(scope, || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    runtime.block_on(async { work(self.connect()).await })
                })?
                .join()
                .map_err(|_| io::Error::other("pack fetch thread panicked"))?
        })
    }

    /// Lazily connected clients, one per peer; needs a runtime.
    fn connect(&self) -> Vec<Peer> {
        self.peers()
            .into_iter()
            .filter_map(
                |(id, addr)| match Endpoint::from_shared(format!("http://{addr}")) {
                    Ok(e) => Some(Peer {
                        id,
                        client: PackTransferClient::new(
                            e.connect_timeout(Duration::from_secs(5)).connect_lazy(),
                        ),
                    }),
                    Err(e) => {
                        tracing::warn!(peer = id, %addr, error = %e, "bad peer address");
                        None
                    }
                },
            )
            .collect()
    }

    /// Fetches the pack into the shard's staging directory, trying every
    /// peer in turn (from `first` on, so concurrent fetches spread over
    /// the peers) with backoff until one serves it. The commit guarantees
    /// a peer holds the pack, so this waits rather than fails, until
    /// `stop` is raised.
    async fn fetch_with_retries(
        &self,
        peers: &[Peer],
        shard: u64,
        repo_id: u64,
        id: ObjectId,
        first: usize,
        stop: &StopSignal,
    ) -> io::Result<()> {
        if peers.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("pack {id} is not on this replica and no peer address is usable"),
            ));
        }
        let dir = self.area.staged_dir(shard, repo_id);
        let mut backoff = FIRST_BACKOFF;
        loop {
            for n in 0..peers.len() {
                if stop.is_stopped() {
                    return Err(stopped());
                }
                let peer = &peers[(first + n) % peers.len()];
                let mut client = peer.client.clone();
                match fetch_pack(&mut client, shard, repo_id, id, &dir).await {
                    Ok(_) => {
                        self.fetched.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(
                            peer = peer.id, shard, repo = repo_id, pack = %id,
                            "fetched pack from peer"
                        );
                        return Ok(());
                    }
                    Err(e) => tracing::warn!(
                        peer = peer.id, shard, repo = repo_id, pack = %id, error = %e,
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
        let id = parse_pack_id(&pack.id).ok_or_else(|| bad_pack_id(pack))?;
        match self.locate(shard.0, repo_id, &id) {
            // Applied before (a replay after restart): already in place.
            Location::Placed(path) => return Ok(path),
            Location::Staged => {}
            Location::Missing if self.peers().is_empty() => {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("pack {} is not staged on this replica", pack.id),
                ));
            }
            Location::Missing => {
                // Not under the area lock: serving `Fetch` and cleanup need it.
                tracing::warn!(shard = shard.0, repo_id, pack = %pack.id, "pack not staged here; fetching it from a peer");
                self.area.create()?;
                self.on_fetch_thread(|peers| async move {
                    self.fetch_with_retries(&peers, shard.0, repo_id, id, 0, &StopSignal::new())
                        .await
                })?;
            }
        }
        self.place_staged(shard.0, repo_id, &id)
    }

    fn ensure_all(
        &self,
        shard: GroupId,
        packs: &[(u64, PackRef)],
        stop: &StopSignal,
    ) -> io::Result<()> {
        let mut missing = Vec::new();
        for (repo_id, pack) in packs {
            let id = parse_pack_id(&pack.id).ok_or_else(|| bad_pack_id(pack))?;
            match self.locate(shard.0, *repo_id, &id) {
                Location::Placed(_) => {}
                Location::Staged => {
                    self.place_staged(shard.0, *repo_id, &id)?;
                }
                Location::Missing => missing.push((*repo_id, id)),
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        if self.peers().is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{} packs of shard {shard} are missing here and there are no peers",
                    missing.len()
                ),
            ));
        }
        tracing::info!(
            shard = shard.0,
            missing = missing.len(),
            "fetching packs this replica lacks from peers"
        );
        self.area.create()?;
        self.on_fetch_thread(|peers| async move {
            let peers = &peers;
            futures::stream::iter(missing.into_iter().enumerate())
                .map(|(n, (repo_id, id))| async move {
                    self.fetch_with_retries(peers, shard.0, repo_id, id, n, stop)
                        .await?;
                    self.place_staged(shard.0, repo_id, &id).map(|_| ())
                })
                .buffer_unordered(FETCH_CONCURRENCY)
                .try_collect::<()>()
                .await
        })
    }
}

/// Node id → gRPC `host:port` of every node this one knows, shared by the
/// shard host, its placers and the replicated store; grows as nodes join.
#[derive(Debug, Clone, Default)]
pub struct PeerBook {
    inner: Arc<std::sync::RwLock<std::collections::BTreeMap<u64, String>>>,
}

impl PeerBook {
    pub fn from_map(map: std::collections::BTreeMap<u64, String>) -> Self {
        PeerBook {
            inner: Arc::new(std::sync::RwLock::new(map)),
        }
    }

    pub fn get(&self, id: u64) -> Option<String> {
        self.read().get(&id).cloned()
    }

    /// Records `id`'s address; a changed address replaces the old one.
    pub fn insert(&self, id: u64, addr: String) {
        if addr.is_empty() {
            return;
        }
        self.inner
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id, addr);
    }

    pub fn all(&self) -> Vec<(u64, String)> {
        self.read().iter().map(|(k, v)| (*k, v.clone())).collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, std::collections::BTreeMap<u64, String>> {
        self.inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
