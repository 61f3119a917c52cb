//! Runs this node's replicas as raft groups: its shards and, on the meta
//! nodes, the directory (group 0).
//!
//! Every node runs one (a node configured without `[shards]` runs a
//! cluster of its own: one-voter groups). The host owns the node's one
//! RocksDB for all of its groups, one channel pool to the peers (shared by every
//! group, so many shards multiplex over one connection per peer) and the
//! registry the node's `Raft` gRPC service dispatches to. Replicas come and
//! go while the node runs (a shard or the meta group moving in or out); the
//! list of groups it holds, and the meta nodes it last knew of, are kept on
//! disk so a restart opens the same ones and finds the directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cairn_raft::network::{GroupNetworkFactory, GroupRegistry, PeerPool, RaftService};
use cairn_raft::types::WatchReceiver;
use cairn_raft::types::{ClientWriteError, ForwardToLeader, InitializeError, RaftError};
use cairn_raft::{
    Command, GroupId, GroupStateMachine, NodeId, PeerAddr, RaftDb, StateView, TransportFilter,
    TypeConfig,
};
use tracing::Instrument;

use crate::meta::state::{MetaLogic, MetaRequest, MetaResponse};
use crate::packs::placer::{LocalPackPlacer, PeerBook};
use crate::packs::transfer::StagingArea;
use crate::shard::state::{ShardLogic, ShardRequest, ShardResponse};
use write_gate::WriteGate;

mod catchup;
mod config;
mod hosted;
mod logic;
mod membership;
mod reads;
mod status;

pub mod case_migration;
pub mod write_gate;

pub use catchup::Catchup;
pub use config::{ShardConfigError, ShardHostConfig, ShardSpec};
pub use hosted::recorded_meta_nodes;
pub use logic::{GroupRequest, GroupResponse, NodeApplyError, NodeLogic};
pub use membership::{Membership, ReplicationProgress};
pub use status::{ReplicaStatus, RepoUsage};

use hosted::{read_hosted, write_hosted, Hosted, HostedFile, HOSTED_FILE};

/// Group id of the meta directory; no shard may use it.
pub const META_GROUP: u64 = 0;

#[derive(Debug, thiserror::Error)]
pub enum ShardHostError {
    #[error(transparent)]
    Config(#[from] ShardConfigError),
    #[error("invalid raft configuration: {0}")]
    RaftConfig(String),
    #[error("opening the raft database: {0}")]
    Db(#[from] cairn_raft::OpenError),
    #[error("preparing the pack staging area: {0}")]
    Staging(#[source] std::io::Error),
    #[error("starting shard {shard}: {message}")]
    Start { shard: u64, message: String },
    #[error("initializing shard {shard}: {message}")]
    Initialize { shard: u64, message: String },
    #[error("the list of hosted shards: {0}")]
    Hosted(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// This replica is not the leader; retry at the hinted node if any.
    #[error("not the leader of the shard (leader: {leader_hint:?})")]
    NotLeader {
        leader_hint: Option<(NodeId, String)>,
    },
    /// The entry was appended here but dropped when this node lost its
    /// leadership: it may still commit elsewhere, so a retry must be
    /// idempotent (a push retries under the same push id).
    #[error("leadership changed mid-proposal; outcome unknown (leader: {leader_hint:?})")]
    Indeterminate {
        leader_hint: Option<(NodeId, String)>,
    },
    #[error("shard {0} is not hosted on this node")]
    UnknownShard(u64),
    #[error("raft: {0}")]
    Raft(String),
}

type GroupRaft = cairn_raft::types::Raft<TypeConfig, GroupStateMachine<NodeLogic>>;

/// How long a proposal may wait for its commit before its outcome is
/// reported unknown: several election timeouts, far beyond a healthy commit.
pub(super) const PROPOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a follower may take to apply up to a leader's read index
/// before it gives the read up (to another replica): a healthy follower is
/// a heartbeat behind; one this far behind should not serve.
pub(super) const FOLLOWER_APPLY_TIMEOUT: Duration = Duration::from_secs(3);

/// This node's replicas — shards and, on meta nodes, the directory — each
/// a running raft group.
pub struct ShardHost {
    node_id: NodeId,
    peers: PeerBook,
    db: RaftDb,
    registry: GroupRegistry,
    pool: PeerPool,
    /// Also consulted by follower reads, which ask the leader directly.
    filter: TransportFilter,
    rafts: std::sync::RwLock<BTreeMap<u64, GroupRaft>>,
    raft_config: Arc<cairn_raft::types::RaftConfig>,
    area: StagingArea,
    data_dir: PathBuf,
    /// The meta group's nodes as this node last learnt them (the
    /// configuration's on a first start).
    known_meta: std::sync::RwLock<Vec<u64>>,
    /// Serializes writes of the hosted file.
    hosted_write: std::sync::Mutex<()>,
    /// The configured first layout, proposed to an empty directory.
    seed: ShardHostConfig,
    /// Orders opening and closing replicas (and writing the hosted list).
    membership_lock: tokio::sync::Mutex<()>,
    /// Packs this node fetched from peers, over all shards.
    packs_fetched: Arc<std::sync::atomic::AtomicU64>,
    shut_down: std::sync::atomic::AtomicBool,
    /// Pushes under way on the shards this node leads (see `write_gate`).
    writes: Arc<WriteGate>,
}

impl std::fmt::Debug for ShardHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardHost")
            .field("node_id", &self.node_id)
            .field("groups", &self.groups())
            .finish()
    }
}

impl ShardHost {
    /// Starts the host with its own staging area under `data_dir`. A node
    /// that also serves `PackTransfer` must use [`ShardHost::start_with_area`]
    /// with the same area, whose lock orders placing against cleanup.
    pub async fn start(
        config: ShardHostConfig,
        data_dir: &Path,
        filter: TransportFilter,
    ) -> Result<Self, ShardHostError> {
        let area = StagingArea::at(data_dir);
        Self::start_with_area(config, data_dir, area, filter).await
    }

    /// Opens the raft database and starts every group this node holds: on
    /// its first start the meta group (if configured here) and the
    /// configured shards that list it, afterwards the ones it recorded. On
    /// a first start the lowest-id member initializes each group.
    pub async fn start_with_area(
        config: ShardHostConfig,
        data_dir: &Path,
        area: StagingArea,
        filter: TransportFilter,
    ) -> Result<Self, ShardHostError> {
        config.validate()?;
        let span = tracing::info_span!("shard_host", node = config.node_id);
        async move {
            let raft_config = config.raft_config()?;
            let raft_dir = data_dir.join("raft");
            let db = {
                let (db_path, snap_path) = (raft_dir.join("rocksdb"), raft_dir.join("snapshots"));
                tokio::task::spawn_blocking(move || RaftDb::open(&db_path, &snap_path))
                    .await
                    .map_err(|e| ShardHostError::RaftConfig(format!("open task failed: {e}")))??
            };
            area.create().map_err(ShardHostError::Staging)?;
            let me = config.node_id;
            let hosted = read_hosted(&raft_dir.join(HOSTED_FILE))?;
            let first_start = hosted.is_none();
            let configured_meta = config.meta_voters();
            let meta_here = configured_meta.contains(&me);
            let peers = PeerBook::from_map(config.peers.clone());
            let mut known_meta = configured_meta.clone();
            let group_ids: Vec<u64> = match hosted {
                Some(HostedFile::Current(h)) => {
                    if !h.meta_nodes.is_empty() {
                        known_meta = h.meta_nodes.iter().map(|(id, _)| *id).collect();
                        for (id, addr) in h.meta_nodes {
                            peers.insert(id, addr);
                        }
                    }
                    h.groups
                }
                Some(HostedFile::ShardsOnly(ids)) => meta_here
                    .then_some(META_GROUP)
                    .into_iter()
                    .chain(ids)
                    .collect(),
                None => meta_here
                    .then_some(META_GROUP)
                    .into_iter()
                    .chain(
                        config
                            .shards
                            .iter()
                            .filter(|s| s.replicas.contains(&me))
                            .map(|s| s.id),
                    )
                    .collect(),
            };
            let host = ShardHost {
                node_id: me,
                peers,
                db,
                registry: GroupRegistry::new(),
                pool: PeerPool::default(),
                filter,
                rafts: std::sync::RwLock::default(),
                raft_config,
                area,
                data_dir: data_dir.to_path_buf(),
                known_meta: std::sync::RwLock::new(known_meta),
                hosted_write: std::sync::Mutex::new(()),
                seed: config,
                membership_lock: tokio::sync::Mutex::new(()),
                packs_fetched: Arc::default(),
                shut_down: Default::default(),
                writes: Default::default(),
            };
            let initial = |replicas: &[u64]| -> Option<BTreeMap<u64, String>> {
                (first_start && replicas.iter().min() == Some(&me)).then(|| {
                    replicas
                        .iter()
                        .map(|id| (*id, host.peers.get(*id).unwrap_or_default()))
                        .collect()
                })
            };
            for id in &group_ids {
                let members = if *id == META_GROUP {
                    initial(&configured_meta)
                } else {
                    let spec = host.seed.shards.iter().find(|s| s.id == *id);
                    spec.and_then(|s| initial(&s.replicas))
                };
                host.start_group(*id, members).await?;
            }
            if first_start {
                host.persist_hosted()?;
            }
            tracing::info!(groups = ?host.groups(), "shard host started");
            Ok(host)
        }
        .instrument(span)
        .await
    }

    /// Starts `group` and registers it; `initialize` (on a group's first
    /// start, on one member only) makes those nodes its first voters.
    async fn start_group(
        &self,
        group_id: u64,
        initialize: Option<BTreeMap<u64, String>>,
    ) -> Result<GroupRaft, ShardHostError> {
        let group = GroupId(group_id);
        let start_err = |message: String| ShardHostError::Start {
            shard: group_id,
            message,
        };
        let network =
            GroupNetworkFactory::new(group, self.node_id, self.pool.clone(), self.filter.clone());
        let logic = if group_id == META_GROUP {
            NodeLogic::Meta(MetaLogic)
        } else {
            // Apply fetches a committed pack this replica never received
            // from whichever node has it.
            NodeLogic::Shard(ShardLogic::new(
                LocalPackPlacer::with_book(
                    self.area.clone(),
                    self.peers.clone(),
                    Some(self.node_id),
                )
                .with_fetch_counter(self.packs_fetched.clone()),
            ))
        };
        let sm = self.db.state_machine(group, logic)?;
        let raft = cairn_raft::types::Raft::new(
            self.node_id,
            self.raft_config.clone(),
            network,
            self.db.log_store(group),
            sm,
        )
        .await
        .map_err(|e| start_err(e.to_string()))?;
        self.registry.register(group, raft.clone());
        self.rafts_mut().insert(group_id, raft.clone());
        self.follow_member_addresses(&raft);

        // One replica bootstraps, so two nodes never form competing
        // single-term memberships of the same group.
        if let Some(members) = initialize {
            let members: BTreeMap<NodeId, PeerAddr> = members
                .into_iter()
                .map(|(id, addr)| (id, PeerAddr { addr }))
                .collect();
            match raft.initialize(members).await {
                Ok(()) => tracing::info!(group = group_id, "initialized group"),
                // A restart: the group already has a vote or a log.
                Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {
                    tracing::debug!(group = group_id, "group already initialized")
                }
                Err(e) => {
                    return Err(ShardHostError::Initialize {
                        shard: group_id,
                        message: e.to_string(),
                    })
                }
            }
        }
        Ok(raft)
    }

    /// Keeps the address book in step with the group's membership: a
    /// member added elsewhere (a move run by another node, this node
    /// elected later) is reached for pack staging and fetches by the
    /// address its membership records. Ends when the group stops.
    fn follow_member_addresses(&self, raft: &GroupRaft) {
        let peers = self.peers.clone();
        let mut metrics = raft.metrics();
        let me = self.node_id;
        tokio::spawn(async move {
            let mut seen = None;
            loop {
                let learnt: Vec<(u64, String)> = {
                    let m = metrics.borrow_watched();
                    let config = &m.membership_config;
                    if seen.as_ref() == Some(config.log_id()) {
                        Vec::new()
                    } else {
                        seen = Some(*config.log_id());
                        config
                            .nodes()
                            .filter(|(id, _)| **id != me)
                            .map(|(id, node)| (*id, node.addr.clone()))
                            .collect()
                    }
                };
                for (id, addr) in learnt {
                    if peers.get(id).as_deref() != Some(addr.as_str()) {
                        peers.insert(id, addr);
                    }
                }
                if metrics.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    fn rafts_mut(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<u64, GroupRaft>> {
        self.rafts
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn rafts_read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u64, GroupRaft>> {
        self.rafts
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn persist_hosted(&self) -> Result<(), ShardHostError> {
        let _guard = self
            .hosted_write
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let hosted = Hosted {
            groups: self.groups(),
            meta_nodes: self
                .known_meta()
                .into_iter()
                .filter_map(|id| self.peers.get(id).map(|addr| (id, addr)))
                .collect(),
        };
        let path = self.data_dir.join("raft").join(HOSTED_FILE);
        write_hosted(&path, &hosted)
            .map_err(|e| ShardHostError::Hosted(format!("{}: {e}", path.display())))
    }

    fn known_meta(&self) -> Vec<u64> {
        self.known_meta
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Records where the meta group lives, as the directory says (its
    /// nodes' addresses must be in the address book); kept on disk so a
    /// restart finds it even if every configured meta node has left.
    pub fn learn_meta_nodes(&self, nodes: &[u64]) {
        let mut sorted = nodes.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.is_empty() || sorted == self.known_meta() {
            return;
        }
        *self
            .known_meta
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = sorted;
        if let Err(e) = self.persist_hosted() {
            tracing::warn!(error = %e, "could not record the meta nodes");
        }
    }

    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// Whether [`ShardHost::shutdown`] ran.
    pub fn is_shut_down(&self) -> bool {
        self.shut_down.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Shards hosted here (the meta group excluded).
    pub fn shards(&self) -> Vec<u64> {
        self.rafts_read()
            .keys()
            .copied()
            .filter(|&g| g != META_GROUP)
            .collect()
    }

    /// Every group hosted here, the meta group included.
    pub fn groups(&self) -> Vec<u64> {
        self.rafts_read().keys().copied().collect()
    }

    /// Whether this node holds a replica of `shard` (or of the directory).
    pub fn hosts(&self, shard: u64) -> bool {
        self.rafts_read().contains_key(&shard)
    }

    /// Nodes holding the meta group: what the directory last said, and
    /// the voters this node's own meta replica knows of (newer while a
    /// move of the group is under way).
    pub fn meta_nodes(&self) -> Vec<u64> {
        let mut nodes = self.known_meta();
        if let Ok((voters, _)) = self.membership().members(META_GROUP) {
            nodes.extend(voters);
        }
        nodes.sort_unstable();
        nodes.dedup();
        nodes
    }

    /// Whether this node's meta replica may answer directory calls: it is
    /// running and a voter in its own view of the group. (A replica moved
    /// away while this node was down may not have seen its removal; its
    /// reads then time out rather than answer, and callers go elsewhere.)
    pub fn serves_meta(&self) -> bool {
        self.membership()
            .members(META_GROUP)
            .is_ok_and(|(voters, _)| voters.contains(&self.node_id))
    }

    /// The configured first layout.
    pub fn seed(&self) -> &ShardHostConfig {
        &self.seed
    }

    /// The address book shared with this node's placers and stores.
    pub fn peers(&self) -> &PeerBook {
        &self.peers
    }

    /// The registry of this node's groups (what the `Raft` service serves).
    pub fn registry(&self) -> &GroupRegistry {
        &self.registry
    }

    /// The `Raft` gRPC service for the node's tonic server.
    pub fn raft_service(&self) -> RaftService {
        RaftService::new(self.node_id, self.db.clone(), self.registry.clone())
    }

    fn raft(&self, shard: u64) -> Result<GroupRaft, ProposeError> {
        self.rafts_read()
            .get(&shard)
            .cloned()
            .ok_or(ProposeError::UnknownShard(shard))
    }

    /// Proposes `req` to `shard` and returns its applied result. Only the
    /// leader accepts proposals.
    pub async fn propose(
        &self,
        shard: u64,
        req: ShardRequest,
    ) -> Result<ShardResponse, ProposeError> {
        match self.propose_group(shard, GroupRequest::Shard(req)).await? {
            GroupResponse::Shard(r) => Ok(r),
            GroupResponse::Meta(m) => Err(ProposeError::Raft(format!("{m:?}"))),
        }
    }

    /// Proposes a directory change to the meta group; only its leader
    /// accepts it.
    pub async fn propose_meta(&self, req: MetaRequest) -> Result<MetaResponse, ProposeError> {
        match self
            .propose_group(META_GROUP, GroupRequest::Meta(req))
            .await?
        {
            GroupResponse::Meta(r) => Ok(r),
            GroupResponse::Shard(r) => Err(ProposeError::Raft(format!("{r:?}"))),
        }
    }

    #[tracing::instrument(level = "debug", skip(self, req), fields(node = self.node_id))]
    async fn propose_group(
        &self,
        shard: u64,
        req: GroupRequest,
    ) -> Result<GroupResponse, ProposeError> {
        let raft = self.raft(shard)?;
        let cmd = Command::encode(&req).map_err(|e| ProposeError::Raft(e.to_string()))?;
        // A leader cut off from its quorum keeps waiting for a commit that
        // may never come (or may come through a new leader): past the
        // deadline the outcome is unknown, and the caller settles it.
        let Ok(written) = tokio::time::timeout(PROPOSE_TIMEOUT, raft.client_write(cmd)).await
        else {
            tracing::warn!(shard, "proposal not committed in time; outcome unknown");
            return Err(ProposeError::Indeterminate {
                leader_hint: self.known_leader(shard),
            });
        };
        match written {
            Ok(resp) => resp
                .data
                .decode::<GroupResponse>()
                .map_err(|e| ProposeError::Raft(e.to_string())),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(ProposeError::NotLeader {
                    leader_hint: self.hint(&f),
                })
            }
            Err(RaftError::APIError(ClientWriteError::LogEntryDiscarded(f))) => {
                Err(ProposeError::Indeterminate {
                    leader_hint: self.hint(&f),
                })
            }
            Err(e) => Err(ProposeError::Raft(e.to_string())),
        }
    }

    /// This replica's view of `shard`'s state; linearizable only after
    /// [`ShardHost::read_index`] (or `wait_applied` with a leader's index).
    pub fn state_view(&self, shard: u64) -> Result<StateView, ProposeError> {
        self.raft(shard)?;
        Ok(self.db.state_view(GroupId(shard)))
    }

    /// The leader this replica knows of, if any.
    pub fn leader(&self, shard: u64) -> Option<NodeId> {
        let raft = self.raft(shard).ok()?;
        let leader = raft.metrics().borrow_watched().current_leader;
        leader
    }

    /// Stops every group (in-flight proposals fail); the host answers
    /// nothing afterwards.
    pub async fn shutdown(&self) {
        self.shut_down
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let rafts: Vec<(u64, GroupRaft)> = self
            .rafts_read()
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        for (shard, raft) in rafts {
            self.registry.unregister(GroupId(shard));
            if let Err(e) = raft.shutdown().await {
                tracing::warn!(shard, error = %e, "shard group did not stop cleanly");
            }
        }
    }

    /// The leader this replica knows of, with its address.
    fn known_leader(&self, shard: u64) -> Option<(NodeId, String)> {
        self.peer_hint(self.leader(shard))
    }

    /// `leader` with its address, as a hint to send callers elsewhere:
    /// none for this node itself or an unknown peer.
    fn peer_hint(&self, leader: Option<NodeId>) -> Option<(NodeId, String)> {
        let id = leader.filter(|&id| id != self.node_id)?;
        Some((id, self.peers.get(id)?))
    }

    fn hint(&self, f: &ForwardToLeader<TypeConfig>) -> Option<(NodeId, String)> {
        let id = f.leader_id?;
        let addr = match &f.leader_node {
            Some(node) if !node.addr.is_empty() => node.addr.clone(),
            _ => self.peers.get(id)?,
        };
        Some((id, addr))
    }

    /// Pushes under way on this node's shards.
    pub fn writes(&self) -> &Arc<WriteGate> {
        &self.writes
    }
}
