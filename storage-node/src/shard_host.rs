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

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cairn_raft::network::{
    GroupNetworkFactory, GroupRegistry, PeerPool, RaftService, ReadIndexReply, READ_INDEX_TIMEOUT,
};
use cairn_raft::{
    ApplyLogic, Command, GroupId, GroupState, GroupStateMachine, NodeId, PeerAddr, RaftDb,
    StateView, StopSignal, TransportFilter, TypeConfig,
};
use openraft::async_runtime::WatchReceiver;
use openraft::error::{ClientWriteError, ForwardToLeader, InitializeError, RaftError};
use openraft::ReadPolicy;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::meta_state::{MetaError, MetaLogic, MetaRequest, MetaResponse};
use crate::pack_placer::{LocalPackPlacer, PeerBook};
use crate::pack_transfer::StagingArea;
use crate::shard_state::{ApplyError, ShardLogic, ShardRequest, ShardResponse};
use crate::write_gate::WriteGate;

/// Group id of the meta directory; no shard may use it.
pub const META_GROUP: u64 = 0;

/// One shard and the nodes holding its replicas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ShardSpec {
    pub id: u64,
    /// Node ids; all of them are voters.
    pub replicas: Vec<u64>,
}

/// The `[shards]` section of a storage node's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ShardHostConfig {
    /// This node's id in every group.
    pub node_id: u64,
    /// Every node of the cluster (this one included): id → gRPC `host:port`
    /// of its `Raft` service.
    pub peers: BTreeMap<u64, String>,
    /// The shards of the cluster's first layout. Read once, when the meta
    /// group's directory is bootstrapped and when this node first starts;
    /// from then on the directory and each group's membership are the truth.
    #[serde(default)]
    pub shards: Vec<ShardSpec>,
    /// Nodes holding the meta group (the directory) at the cluster's first
    /// start. Empty: the three lowest peer ids (fewer if the cluster has
    /// fewer nodes). A node that joins later lists meta nodes among its
    /// peers to reach them; once running, each node follows the meta
    /// group's placement in the directory instead (it moves like a shard).
    #[serde(default)]
    pub meta: Vec<u64>,
    /// Replicas every shard must list. 3 in production (a push is durable
    /// on two nodes once acknowledged); tests may lower it.
    #[serde(default = "default_replication_factor")]
    pub replication_factor: usize,
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    #[serde(default = "default_election_timeout_min_ms")]
    pub election_timeout_min_ms: u64,
    #[serde(default = "default_election_timeout_max_ms")]
    pub election_timeout_max_ms: u64,
    /// A replica builds a snapshot once this many entries were committed
    /// since its last one (openraft's `SnapshotPolicy::LogsSinceLast`).
    #[serde(default = "default_snapshot_logs_since_last")]
    pub snapshot_logs_since_last: u64,
    /// Entries already in a snapshot kept in the log, so a follower a
    /// little behind catches up from the log instead of a snapshot.
    #[serde(default = "default_max_in_snapshot_log_to_keep")]
    pub max_in_snapshot_log_to_keep: u64,
}

fn default_replication_factor() -> usize {
    3
}

// openraft's voters refuse any candidate until `election-timeout-max` has
// passed since they last heard the leader (its lease), so a leader loss
// takes about two election timeouts to repair: the first follower to time
// out is refused, its next attempt wins. These keep that near 1.5 s, under
// the 3 s write-resumption goal with the router's retries, while five
// missed heartbeats still tolerate a slow fsync.
fn default_heartbeat_ms() -> u64 {
    100
}

fn default_election_timeout_min_ms() -> u64 {
    500
}

// openraft's own defaults: small entries make 5000 a few MB of log, and
// a thousand kept entries cover a follower's short absence.
fn default_snapshot_logs_since_last() -> u64 {
    5000
}

fn default_max_in_snapshot_log_to_keep() -> u64 {
    1000
}

fn default_election_timeout_max_ms() -> u64 {
    900
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardConfigError {
    #[error("shards: node-id {0} is not among the peers")]
    SelfNotAPeer(u64),
    #[error("shards: peer {0} has an empty address")]
    EmptyPeerAddr(u64),
    #[error("shards: replication-factor must be between 1 and the number of peers ({peers})")]
    ReplicationFactor { peers: usize },
    #[error("shards: shard id 0 is reserved for the meta group")]
    ReservedShard,
    #[error("shards: shard {0} is listed twice")]
    DuplicateShard(u64),
    #[error("shards: shard {shard} lists {got} replicas, replication-factor is {want}")]
    ReplicaCount { shard: u64, got: usize, want: usize },
    #[error("shards: shard {shard} lists node {node} twice")]
    DuplicateReplica { shard: u64, node: u64 },
    #[error("shards: shard {shard} lists node {node}, which is not a peer")]
    UnknownReplica { shard: u64, node: u64 },
    #[error("shards: need 0 < heartbeat-ms < election-timeout-min-ms < election-timeout-max-ms")]
    Timeouts,
    #[error("shards: meta node {0} is not a peer")]
    UnknownMetaNode(u64),
}

impl ShardHostConfig {
    pub fn validate(&self) -> Result<(), ShardConfigError> {
        if !self.peers.contains_key(&self.node_id) {
            return Err(ShardConfigError::SelfNotAPeer(self.node_id));
        }
        if let Some((id, _)) = self.peers.iter().find(|(_, a)| a.trim().is_empty()) {
            return Err(ShardConfigError::EmptyPeerAddr(*id));
        }
        if self.replication_factor == 0 || self.replication_factor > self.peers.len() {
            return Err(ShardConfigError::ReplicationFactor {
                peers: self.peers.len(),
            });
        }
        if !(self.heartbeat_ms > 0
            && self.heartbeat_ms < self.election_timeout_min_ms
            && self.election_timeout_min_ms < self.election_timeout_max_ms)
        {
            return Err(ShardConfigError::Timeouts);
        }
        if let Some(&id) = self.meta.iter().find(|id| !self.peers.contains_key(id)) {
            return Err(ShardConfigError::UnknownMetaNode(id));
        }
        let mut seen = BTreeSet::new();
        for shard in &self.shards {
            if shard.id == META_GROUP {
                return Err(ShardConfigError::ReservedShard);
            }
            if !seen.insert(shard.id) {
                return Err(ShardConfigError::DuplicateShard(shard.id));
            }
            if shard.replicas.len() != self.replication_factor {
                return Err(ShardConfigError::ReplicaCount {
                    shard: shard.id,
                    got: shard.replicas.len(),
                    want: self.replication_factor,
                });
            }
            let mut nodes = BTreeSet::new();
            for &node in &shard.replicas {
                if !nodes.insert(node) {
                    return Err(ShardConfigError::DuplicateReplica {
                        shard: shard.id,
                        node,
                    });
                }
                if !self.peers.contains_key(&node) {
                    return Err(ShardConfigError::UnknownReplica {
                        shard: shard.id,
                        node,
                    });
                }
            }
        }
        Ok(())
    }

    /// A cluster of one node at `addr`: one shard and the directory, each
    /// a one-voter group, through the same code as a replicated cluster.
    pub fn single_node(addr: std::net::SocketAddr) -> Self {
        ShardHostConfig {
            node_id: 1,
            peers: BTreeMap::from([(1, addr.to_string())]),
            shards: vec![ShardSpec {
                id: 1,
                replicas: vec![1],
            }],
            meta: vec![1],
            replication_factor: 1,
            heartbeat_ms: default_heartbeat_ms(),
            election_timeout_min_ms: default_election_timeout_min_ms(),
            election_timeout_max_ms: default_election_timeout_max_ms(),
            snapshot_logs_since_last: default_snapshot_logs_since_last(),
            max_in_snapshot_log_to_keep: default_max_in_snapshot_log_to_keep(),
        }
    }

    /// The nodes holding the meta group.
    pub fn meta_voters(&self) -> Vec<u64> {
        if self.meta.is_empty() {
            self.peers.keys().copied().take(3).collect()
        } else {
            let mut ids = self.meta.clone();
            ids.sort_unstable();
            ids.dedup();
            ids
        }
    }

    fn raft_config(&self) -> Result<Arc<openraft::Config>, ShardHostError> {
        let config = openraft::Config {
            cluster_name: "cairn-shards".into(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_logs_since_last),
            max_in_snapshot_log_to_keep: self.max_in_snapshot_log_to_keep,
            // Bounds one whole snapshot stream (openraft's default, 200 ms,
            // fits only tiny shards); the receiver's install also places
            // the packs the rows name, and a leader that gives up earlier
            // just sends it again.
            install_snapshot_timeout: 30_000,
            // A follower that lost touch (a pause, a partition) asks before
            // raising its term, so rejoining cannot depose a healthy leader.
            enable_pre_vote: Some(true),
            ..Default::default()
        };
        config
            .validate()
            .map(Arc::new)
            .map_err(|e| ShardHostError::RaftConfig(e.to_string()))
    }
}

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

/// A raft entry of any group this node hosts. Shards and the meta group
/// share one raft type, so the read barrier, leadership and membership
/// tools serve both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupRequest {
    Shard(ShardRequest),
    Meta(MetaRequest),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupResponse {
    Shard(ShardResponse),
    Meta(MetaResponse),
}

/// The `ApplyLogic` of every group: a shard's or the directory's.
pub enum NodeLogic {
    Shard(ShardLogic<LocalPackPlacer>),
    Meta(MetaLogic),
}

#[derive(Debug, thiserror::Error)]
pub enum NodeApplyError {
    #[error(transparent)]
    Shard(#[from] ApplyError),
    #[error(transparent)]
    Meta(#[from] MetaError),
}

impl ApplyLogic for NodeLogic {
    type Request = GroupRequest;
    type Response = GroupResponse;
    type Error = NodeApplyError;

    fn apply(
        &self,
        state: &mut GroupState<'_>,
        request: GroupRequest,
    ) -> Result<GroupResponse, NodeApplyError> {
        match (self, request) {
            (NodeLogic::Shard(logic), GroupRequest::Shard(r)) => {
                Ok(GroupResponse::Shard(logic.apply(state, r)?))
            }
            (NodeLogic::Meta(logic), GroupRequest::Meta(r)) => {
                Ok(GroupResponse::Meta(logic.apply_request(state, r)?))
            }
            // Proposers pick the request by the group; a mismatch changes
            // nothing rather than stopping the group.
            _ => Ok(GroupResponse::Meta(MetaResponse::Refused(
                "entry for another kind of group".into(),
            ))),
        }
    }

    fn reconciles(&self) -> bool {
        match self {
            NodeLogic::Shard(logic) => logic.reconciles(),
            NodeLogic::Meta(_) => false,
        }
    }

    fn reconcile(&self, view: &StateView, stop: &StopSignal) -> Result<(), NodeApplyError> {
        match self {
            NodeLogic::Shard(logic) => Ok(logic.reconcile(view, stop)?),
            NodeLogic::Meta(_) => Ok(()),
        }
    }
}

type GroupRaft = openraft::Raft<TypeConfig, GroupStateMachine<NodeLogic>>;

/// How long a proposal may wait for its commit before its outcome is
/// reported unknown: several election timeouts, far beyond a healthy commit.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a follower may take to apply up to a leader's read index
/// before it gives the read up (to another replica): a healthy follower is
/// a heartbeat behind; one this far behind should not serve.
const FOLLOWER_APPLY_TIMEOUT: Duration = Duration::from_secs(3);

/// The groups this node holds a replica of and the meta nodes it knows,
/// kept next to the raft database: written when a replica is opened or
/// closed or the meta group moves, read at start. Absent on a node's first
/// start, which takes the configured layout.
const HOSTED_FILE: &str = "hosted-shards.json";

/// What [`HOSTED_FILE`] holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Hosted {
    /// Groups with a replica here, the meta group (0) included.
    groups: Vec<u64>,
    /// The meta group's nodes and addresses as last read from the
    /// directory (how a node outside the group finds it after a restart).
    #[serde(default)]
    meta_nodes: Vec<(u64, String)>,
}

/// The file's two forms: the current one, and the bare list of shard ids
/// written before the meta group could move (meta membership then came
/// from the configuration).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum HostedFile {
    Current(Hosted),
    ShardsOnly(Vec<u64>),
}

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
    raft_config: Arc<openraft::Config>,
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

/// What a node with data folder `data_dir` recorded of its groups: `None`
/// if it never started with shards; otherwise the meta nodes it last knew
/// (empty if the file predates that record).
pub fn recorded_meta_nodes(data_dir: &Path) -> Result<Option<Vec<u64>>, ShardHostError> {
    let path = data_dir.join("raft").join(HOSTED_FILE);
    Ok(read_hosted(&path)?.map(|file| match file {
        HostedFile::Current(h) => h.meta_nodes.iter().map(|(id, _)| *id).collect(),
        HostedFile::ShardsOnly(_) => Vec::new(),
    }))
}

fn read_hosted(path: &Path) -> Result<Option<HostedFile>, ShardHostError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| ShardHostError::Hosted(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ShardHostError::Hosted(format!("{}: {e}", path.display()))),
    }
}

fn write_hosted(path: &Path, hosted: &Hosted) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("json.tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&serde_json::to_vec(hosted).map_err(std::io::Error::other)?)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
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
        let raft = openraft::Raft::new(
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
        if let Ok((voters, _)) = self.members(META_GROUP) {
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
        self.members(META_GROUP)
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

    /// Linearizable read barrier on the leader: confirms leadership with a
    /// quorum and waits until this replica has applied everything committed
    /// before the call. Returns that read index, which a follower can pass
    /// to [`ShardHost::wait_applied`] to serve the same read.
    #[tracing::instrument(level = "debug", skip(self), fields(node = self.node_id))]
    pub async fn read_index(&self, shard: u64) -> Result<u64, ProposeError> {
        let raft = self.raft(shard)?;
        // A leader that cannot reach a quorum would wait here forever; a
        // timely refusal lets the router try the other replicas.
        let Ok(confirmed) = tokio::time::timeout(
            READ_INDEX_TIMEOUT,
            raft.ensure_linearizable(ReadPolicy::ReadIndex),
        )
        .await
        else {
            return Err(ProposeError::Raft(format!(
                "shard {shard}: leadership not confirmed by a quorum within {READ_INDEX_TIMEOUT:?}"
            )));
        };
        match confirmed {
            Ok(read) => Ok(read.index()),
            Err(e) => match e.forward_to_leader() {
                Some(f) => Err(ProposeError::NotLeader {
                    leader_hint: self.hint(f),
                }),
                None => Err(ProposeError::Raft(e.to_string())),
            },
        }
    }

    /// Waits until this replica of `shard` has applied `index`.
    pub async fn wait_applied(
        &self,
        shard: u64,
        index: u64,
        timeout: Duration,
    ) -> Result<(), ProposeError> {
        self.raft(shard)?
            .wait(Some(timeout))
            .applied_index_at_least(Some(index), "read index applied")
            .await
            .map(|_| ())
            .map_err(|e| ProposeError::Raft(e.to_string()))?;
        // Applied rows may still lack the pack files they name (a snapshot
        // being completed, or the check at start); a read needs both.
        self.wait_state_complete(shard, timeout).await
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
}

/// One replica of a shard as this node sees it (the `ShardStatus` answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaStatus {
    pub shard: u64,
    pub node: NodeId,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub applied_index: u64,
    pub last_log_index: u64,
    pub voters: Vec<NodeId>,
    /// SHA-256 over every replicated row of the shard, read at
    /// `applied_index`; hex.
    pub state_checksum: String,
    pub repositories: u64,
    pub snapshot_index: Option<u64>,
    pub purged_index: Option<u64>,
    pub learners: Vec<NodeId>,
    /// Bytes of the packs the shard's rows name (the meta group: of its rows).
    pub bytes: u64,
    /// Per repository: id, workspace, slug, pack bytes.
    pub repos: Vec<RepoUsage>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoUsage {
    pub id: u64,
    pub workspace: String,
    pub slug: String,
    pub bytes: u64,
}

/// Pack bytes per repository, from a shard's rows.
fn repo_usage(rows: &[(Vec<u8>, Vec<u8>)]) -> Vec<RepoUsage> {
    use crate::shard_state::{keys, PackRef};
    let mut bytes: BTreeMap<u64, u64> = BTreeMap::new();
    let mut repos = Vec::new();
    let records = keys::repos_of("");
    for (k, v) in rows {
        if let Some((id, _)) = keys::parse_pack(k) {
            if let Ok(pack) = serde_json::from_slice::<PackRef>(v) {
                *bytes.entry(id).or_default() += pack.bytes;
            }
        } else if k.starts_with(&records) {
            if let Ok(r) = serde_json::from_slice::<crate::repo::RepoRecord>(v) {
                repos.push(RepoUsage {
                    id: r.id,
                    workspace: r.workspace,
                    slug: r.slug,
                    bytes: 0,
                });
            }
        }
    }
    for repo in &mut repos {
        repo.bytes = bytes.get(&repo.id).copied().unwrap_or(0);
    }
    repos
}

/// Attempts at reading rows and applied index without an apply in between
/// before the status reports the last (possibly torn) read as unavailable.
const CHECKSUM_ATTEMPTS: usize = 20;

impl ShardHost {
    /// This node's replica of `shard`: role, indexes and a checksum of its
    /// state that replicas at the same applied index must agree on.
    pub fn replica_status(&self, shard: u64) -> Result<ReplicaStatus, ProposeError> {
        self.replica_status_scoped(shard, None)
    }

    /// As [`ShardHost::replica_status`], with the checksum over one
    /// repository's rows only (its record, refs and pack list) when
    /// `repo` names one.
    pub fn replica_status_scoped(
        &self,
        shard: u64,
        repo: Option<(&str, &str)>,
    ) -> Result<ReplicaStatus, ProposeError> {
        use openraft::async_runtime::WatchReceiver as _;
        use sha2::Digest as _;
        let raft = self.raft(shard)?;
        let view = self.db.state_view(GroupId(shard));
        let applied = || -> Result<u64, ProposeError> {
            Ok(view
                .applied()
                .map_err(|e| ProposeError::Raft(e.to_string()))?
                .map_or(0, |l| l.index()))
        };
        // Apply only moves the applied index forward, in the same batch as
        // its rows: equal indexes before and after the scan mean the rows
        // are exactly the state at that index.
        // While a snapshot install or the start-up check is still fetching
        // packs, the rows are ahead of what this replica can serve: it is
        // catching up, not at that index.
        let catching_up = || {
            ProposeError::Raft(format!(
                "shard {shard}: replica is catching up (fetching packs)"
            ))
        };
        let mut consistent = None;
        for _ in 0..CHECKSUM_ATTEMPTS {
            if !view.is_complete() {
                return Err(catching_up());
            }
            let before = applied()?;
            let rows = view
                .scan_prefix(b"")
                .map_err(|e| ProposeError::Raft(e.to_string()))?;
            if !view.is_complete() {
                return Err(catching_up());
            }
            if applied()? == before {
                consistent = Some((before, rows));
                break;
            }
        }
        let (applied_index, rows) = consistent.ok_or_else(|| {
            ProposeError::Raft("the shard kept applying; no consistent read".into())
        })?;
        // The meta group's rows name repositories too (the directory), but
        // hold none of their data.
        let usage = if shard == META_GROUP {
            Vec::new()
        } else {
            repo_usage(&rows)
        };
        let scope: Option<Vec<Vec<u8>>> = match repo {
            None => None,
            Some((workspace, slug)) => {
                let id = usage
                    .iter()
                    .find(|u| u.workspace == workspace && u.slug == slug)
                    .map(|u| u.id)
                    .ok_or_else(|| {
                        ProposeError::Raft(format!("repository {workspace}/{slug} not found"))
                    })?;
                use crate::shard_state::keys;
                Some(vec![
                    keys::repo(workspace, slug),
                    keys::repo_by_id(id),
                    keys::refs_of(id),
                    keys::packs_of(id),
                ])
            }
        };
        let in_scope = |k: &[u8]| {
            scope.as_ref().is_none_or(|prefixes| {
                prefixes.iter().any(|p| {
                    // The record key is exact: `ws/slug` must not match `ws/slug2`.
                    if p.starts_with(b"r/") {
                        k == p.as_slice()
                    } else {
                        k.starts_with(p)
                    }
                })
            })
        };
        let mut hash = sha2::Sha256::new();
        for (k, v) in rows.iter().filter(|(k, _)| in_scope(k)) {
            // Length-prefixed so row boundaries cannot shift between rows.
            hash.update((k.len() as u64).to_be_bytes());
            hash.update(k);
            hash.update((v.len() as u64).to_be_bytes());
            hash.update(v);
        }
        let digest = hash.finalize();
        let state_checksum = digest.iter().map(|b| format!("{b:02x}")).collect();
        let metrics = raft.metrics().borrow_watched().clone();
        let repo_rows = crate::shard_state::keys::repos_of("");
        Ok(ReplicaStatus {
            shard,
            node: self.node_id,
            leader: metrics.current_leader,
            term: metrics.current_term,
            applied_index,
            last_log_index: metrics.last_log_index.unwrap_or(0),
            voters: metrics.membership_config.membership().voter_ids().collect(),
            state_checksum,
            repositories: if shard == META_GROUP {
                0
            } else {
                rows.iter()
                    .filter(|(k, _)| k.starts_with(&repo_rows))
                    .count() as u64
            },
            snapshot_index: metrics.snapshot.map(|s| s.index),
            purged_index: metrics.purged.map(|p| p.index),
            learners: metrics
                .membership_config
                .membership()
                .learner_ids()
                .collect(),
            // The directory's size is its rows'; a shard's, its packs'.
            bytes: if shard == META_GROUP {
                rows.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum()
            } else {
                usage.iter().map(|u| u.bytes).sum()
            },
            repos: usage,
        })
    }

    /// A linearizable read barrier on any replica: the leader confirms its
    /// leadership with a quorum; a follower gets that read index from the
    /// leader and waits until it has applied it. Afterwards this replica's
    /// [`ShardHost::state_view`] reflects every write acknowledged before
    /// the call, and the packs those writes name are in place (apply
    /// places them first).
    pub async fn linearizable_read(&self, shard: u64) -> Result<u64, ProposeError> {
        self.raft(shard)?;
        let leader = match self.leader(shard) {
            Some(id) if id == self.node_id => return self.read_index(shard).await,
            Some(id) => id,
            None => return Err(ProposeError::NotLeader { leader_hint: None }),
        };
        let Some(addr) = self.peers.get(leader) else {
            return Err(ProposeError::NotLeader { leader_hint: None });
        };
        if !self.filter.allows(self.node_id, leader) {
            return Err(ProposeError::Raft(format!(
                "cut off from the leader (node {leader})"
            )));
        }
        let reply = self
            .pool
            .read_index(
                GroupId(shard),
                leader,
                &PeerAddr { addr },
                READ_INDEX_TIMEOUT + Duration::from_secs(1),
            )
            .await
            .map_err(|s| {
                ProposeError::Raft(format!("read index from node {leader}: {}", s.message()))
            })?;
        match reply {
            ReadIndexReply::Index(index) => {
                self.wait_applied(shard, index, FOLLOWER_APPLY_TIMEOUT)
                    .await?;
                Ok(index)
            }
            ReadIndexReply::NotLeader { leader } => Err(ProposeError::NotLeader {
                leader_hint: self.peer_hint(leader),
            }),
            ReadIndexReply::Unavailable(m) => Err(ProposeError::Raft(m)),
        }
    }

    /// Asks `shard`'s leader (this node) to hand leadership to `to`.
    pub async fn transfer_leader(&self, shard: u64, to: NodeId) -> Result<(), ProposeError> {
        let raft = self.raft(shard)?;
        let metrics = raft.metrics().borrow_watched().clone();
        if metrics.current_leader != Some(self.node_id) {
            return Err(ProposeError::NotLeader {
                leader_hint: self.peer_hint(metrics.current_leader),
            });
        }
        if !metrics
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == to)
        {
            return Err(ProposeError::Raft(format!(
                "node {to} is not a voter of shard {shard}"
            )));
        }
        // A planned transfer is invisible to pushes: those validating
        // finish first, new ones go to the new leader.
        let left = self
            .writes
            .close_and_drain(shard, to, TRANSFER_DRAIN_TIMEOUT)
            .await;
        if left > 0 {
            tracing::warn!(
                shard,
                left,
                "handing leadership over with pushes still under way"
            );
        }
        let transferred = raft
            .trigger()
            .transfer_leader(to)
            .await
            .map_err(|e| ProposeError::Raft(e.to_string()));
        if transferred.is_ok() {
            let me = self.node_id;
            let _ = raft
                .wait(Some(TRANSFER_SETTLE_TIMEOUT))
                .metrics(|m| m.current_leader != Some(me), "leadership handed over")
                .await;
        }
        self.writes.reopen(shard);
        transferred
    }

    /// Pushes under way on this node's shards.
    pub fn writes(&self) -> &Arc<WriteGate> {
        &self.writes
    }
}

/// How long a leader transfer waits for the pushes being validated.
const TRANSFER_DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// How long new pushes are turned away while leadership moves.
const TRANSFER_SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Catch-up: pack fetching and log compaction.
impl ShardHost {
    /// Packs this node fetched from peers since it started, over all of its
    /// shards: while applying a push it missed, and while completing the
    /// state of an installed snapshot or of a restart.
    pub fn packs_fetched(&self) -> u64 {
        self.packs_fetched
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Builds a snapshot of `shard` on this replica now and waits until it
    /// covers everything applied when called; returns its last index. The
    /// log it covers is then purged as `max-in-snapshot-log-to-keep` allows.
    pub async fn build_snapshot(&self, shard: u64, timeout: Duration) -> Result<u64, ProposeError> {
        let raft = self.raft(shard)?;
        let applied = raft.metrics().borrow_watched().last_applied;
        let Some(applied) = applied else {
            return Err(ProposeError::Raft(format!(
                "shard {shard}: nothing applied to snapshot"
            )));
        };
        raft.trigger()
            .snapshot()
            .await
            .map_err(|e| ProposeError::Raft(e.to_string()))?;
        let metrics = raft
            .wait(Some(timeout))
            .metrics(
                |m| {
                    m.snapshot
                        .as_ref()
                        .is_some_and(|s| s.index >= applied.index)
                },
                "snapshot built",
            )
            .await
            .map_err(|e| ProposeError::Raft(e.to_string()))?;
        Ok(metrics.snapshot.map(|s| s.index).unwrap_or(applied.index))
    }

    /// Snapshots this replica of `shard` now and purges its log up to the
    /// snapshot; returns the snapshot's last index. A replica behind that
    /// index catches up by snapshot from then on.
    pub async fn compact(&self, shard: u64, timeout: Duration) -> Result<u64, ProposeError> {
        let index = self.build_snapshot(shard, timeout).await?;
        let raft = self.raft(shard)?;
        raft.trigger()
            .purge_log(index)
            .await
            .map_err(|e| ProposeError::Raft(e.to_string()))?;
        raft.wait(Some(timeout))
            .metrics(
                |m| m.purged.as_ref().is_some_and(|p| p.index >= index),
                "log purged",
            )
            .await
            .map_err(|e| ProposeError::Raft(e.to_string()))?;
        Ok(index)
    }

    /// Lets a wiped replica `node` of `shard` rejoin: on the leader, the
    /// next time `node` answers with a log behind what it acknowledged
    /// before, replication starts over for it (a snapshot and the packs it
    /// names) instead of being refused as a broken follower. An operator
    /// step, between stopping the node and restarting it empty: a replica
    /// losing acknowledged entries unannounced may lose committed writes,
    /// which is why this is not automatic.
    pub async fn allow_rejoin_after_wipe(
        &self,
        shard: u64,
        node: NodeId,
    ) -> Result<(), ProposeError> {
        let raft = self.raft(shard)?;
        match raft.trigger().allow_next_revert(&node, true).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(openraft::error::AllowNextRevertError::ForwardToLeader(f))) => {
                Err(ProposeError::NotLeader {
                    leader_hint: self.hint(&f),
                })
            }
            Ok(Err(e)) => Err(ProposeError::Raft(e.to_string())),
            Err(e) => Err(ProposeError::Raft(e.to_string())),
        }
    }

    /// Waits up to `timeout` until every pack `shard`'s rows name is on this
    /// node: false only while a snapshot install or the check at start is
    /// still fetching packs from peers. Starting does not wait for it
    /// (peers may be down, and the group must still vote and take entries),
    /// so reads do: `wait_applied` checks it, and on a leader applying its
    /// first entry waits for the same check.
    pub async fn wait_state_complete(
        &self,
        shard: u64,
        timeout: Duration,
    ) -> Result<(), ProposeError> {
        self.raft(shard)?;
        if self
            .db
            .state_view(GroupId(shard))
            .wait_complete(timeout)
            .await
        {
            Ok(())
        } else {
            Err(ProposeError::Raft(format!(
                "shard {shard}: this replica is still fetching packs its state names"
            )))
        }
    }

    /// The last log index this replica of `shard` purged, if any.
    pub fn purged_index(&self, shard: u64) -> Option<u64> {
        let raft = self.raft(shard).ok()?;
        let purged = raft.metrics().borrow_watched().purged;
        purged.map(|p| p.index)
    }
}

/// A shard's members as its leader sees them, and how far each has
/// replicated the leader's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationProgress {
    pub leader: NodeId,
    pub last_log_index: u64,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    /// Per member: the last log index known to match the leader's.
    pub matched: BTreeMap<NodeId, u64>,
}

/// Membership: replicas moving in and out while the node runs.
impl ShardHost {
    /// Voters and learners of `shard` in this replica's latest membership
    /// (joint configurations: every voter of either side).
    pub fn members(&self, shard: u64) -> Result<(Vec<NodeId>, Vec<NodeId>), ProposeError> {
        let raft = self.raft(shard)?;
        let metrics = raft.metrics().borrow_watched().clone();
        let membership = metrics.membership_config.membership();
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        let learners: Vec<NodeId> = membership.learner_ids().collect();
        Ok((voters, learners))
    }

    /// Voter sets of `shard`'s latest membership: one, or two while a
    /// joint configuration is in force (a write needs a majority of each).
    pub fn voter_sets(&self, shard: u64) -> Result<Vec<BTreeSet<NodeId>>, ProposeError> {
        let raft = self.raft(shard)?;
        let metrics = raft.metrics().borrow_watched().clone();
        Ok(metrics
            .membership_config
            .membership()
            .get_joint_config()
            .clone())
    }

    /// Starts an empty replica of `shard` here, to be added as a learner by
    /// its leader; `members` are the shard's nodes and addresses (so this
    /// replica can fetch packs and find the leader). Idempotent; the shard
    /// is recorded as hosted before this returns, so a restart reopens it.
    pub async fn open_replica(
        &self,
        shard: u64,
        members: &[(u64, String)],
    ) -> Result<(), ShardHostError> {
        let _guard = self.membership_lock.lock().await;
        for (id, addr) in members {
            self.peers.insert(*id, addr.clone());
        }
        if self.hosts(shard) {
            return Ok(());
        }
        self.start_group(shard, None).await?;
        self.persist_hosted()?;
        tracing::info!(shard, "opened an empty replica");
        Ok(())
    }

    /// Stops this node's replica of `shard` (or of the meta group) and
    /// deletes its log, rows, snapshots and the packs of its repositories.
    /// Only for a replica that is no longer a member (the caller checked
    /// with the leader). Idempotent.
    pub async fn close_replica(&self, shard: u64) -> Result<(), ProposeError> {
        let _guard = self.membership_lock.lock().await;
        if let Ok(raft) = self.raft(shard) {
            if self.leader(shard) == Some(self.node_id) {
                return Err(ProposeError::Raft(format!(
                    "this node still leads shard {shard}; transfer its leadership first"
                )));
            }
            self.registry.unregister(GroupId(shard));
            self.rafts_mut().remove(&shard);
            if let Err(e) = raft.shutdown().await {
                tracing::warn!(shard, error = %e, "shard group did not stop cleanly");
            }
            drop(raft);
            self.persist_hosted()
                .map_err(|e| ProposeError::Raft(e.to_string()))?;
        }
        // Also after a crash between forgetting the shard and deleting it.
        self.db
            .drop_group(GroupId(shard))
            .map_err(|e| ProposeError::Raft(e.to_string()))?;
        if shard == META_GROUP {
            tracing::info!("closed the meta replica and deleted its data");
            return Ok(());
        }
        let data_dir = self.data_dir.clone();
        let area = self.area.clone();
        tokio::task::spawn_blocking(move || remove_shard_files(&data_dir, &area, shard))
            .await
            .map_err(|e| ProposeError::Raft(e.to_string()))?
            .map_err(|e| ProposeError::Raft(format!("removing the packs of shard {shard}: {e}")))?;
        tracing::info!(shard, "closed the replica and deleted its data");
        Ok(())
    }

    /// On `shard`'s leader: adds `node` (at `addr`) as a learner and starts
    /// replicating to it; returns at once. Re-adding a member is harmless.
    pub async fn add_learner(
        &self,
        shard: u64,
        node: NodeId,
        addr: String,
    ) -> Result<(), ProposeError> {
        let raft = self.raft(shard)?;
        self.peers.insert(node, addr.clone());
        match raft.add_learner(node, PeerAddr { addr }, false).await {
            Ok(_) => Ok(()),
            Err(e) => Err(self.membership_error(e)),
        }
    }

    /// On `shard`'s leader: makes `voters` the voter set, through a joint
    /// configuration when it changes voters; members left out are removed
    /// (learners included). Waits for the change to commit.
    pub async fn set_voters(
        &self,
        shard: u64,
        voters: BTreeSet<NodeId>,
    ) -> Result<(), ProposeError> {
        let raft = self.raft(shard)?;
        let change = raft.change_membership(voters, false);
        match tokio::time::timeout(PROPOSE_TIMEOUT, change).await {
            Err(_) => Err(ProposeError::Indeterminate {
                leader_hint: self.known_leader(shard),
            }),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(self.membership_error(e)),
        }
    }

    fn membership_error(
        &self,
        e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>,
    ) -> ProposeError {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => ProposeError::NotLeader {
                leader_hint: self.hint(&f),
            },
            RaftError::APIError(ClientWriteError::LogEntryDiscarded(f)) => {
                ProposeError::Indeterminate {
                    leader_hint: self.hint(&f),
                }
            }
            e => ProposeError::Raft(e.to_string()),
        }
    }

    /// On `shard`'s leader: its members and how far each matches its log.
    pub fn replication_progress(&self, shard: u64) -> Result<ReplicationProgress, ProposeError> {
        let raft = self.raft(shard)?;
        let metrics = raft.metrics().borrow_watched().clone();
        if metrics.current_leader != Some(self.node_id) {
            return Err(ProposeError::NotLeader {
                leader_hint: self.peer_hint(metrics.current_leader),
            });
        }
        let membership = metrics.membership_config.membership();
        let last_log_index = metrics.last_log_index.unwrap_or(0);
        let mut matched: BTreeMap<NodeId, u64> = metrics
            .replication
            .iter()
            .flatten()
            .map(|(id, log)| (*id, log.as_ref().map_or(0, |l| l.index())))
            .collect();
        matched.insert(self.node_id, last_log_index);
        Ok(ReplicationProgress {
            leader: self.node_id,
            last_log_index,
            voters: membership.voter_ids().collect(),
            learners: membership.learner_ids().collect(),
            matched,
        })
    }
}

/// Deletes the packs of `shard`'s repositories (a repository id carries
/// its shard in the high bits) and the shard's staged transfers.
fn remove_shard_files(data_dir: &Path, area: &StagingArea, shard: u64) -> std::io::Result<()> {
    let packs = data_dir.join("packs");
    let entries = match std::fs::read_dir(&packs) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let Some(repo_id) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        if crate::shard_state::shard_of_repo(repo_id) == shard {
            std::fs::remove_dir_all(entry.path())?;
        }
    }
    area.remove_shard(shard)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosted_file_reads_both_forms_and_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(HOSTED_FILE);
        assert!(read_hosted(&path).expect("absent is fine").is_none());

        // Written before the meta group could move: shard ids only.
        std::fs::write(&path, b"[1,3]").expect("write");
        match read_hosted(&path).expect("reads") {
            Some(HostedFile::ShardsOnly(ids)) => assert_eq!(ids, vec![1, 3]),
            other => panic!("old form read as {other:?}"),
        }

        let hosted = Hosted {
            groups: vec![META_GROUP, 2, 4],
            meta_nodes: vec![(1, "127.0.0.1:7410".into()), (4, "127.0.0.1:7413".into())],
        };
        write_hosted(&path, &hosted).expect("write");
        match read_hosted(&path).expect("reads") {
            Some(HostedFile::Current(h)) => assert_eq!(h, hosted),
            other => panic!("current form read as {other:?}"),
        }

        std::fs::write(&path, b"{\"groups\": \"nope\"}").expect("write");
        assert!(read_hosted(&path).is_err(), "a corrupt file is an error");
    }
}
