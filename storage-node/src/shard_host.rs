//! Runs this node's shard replicas as raft groups.
//!
//! Opt-in: a node only starts a `ShardHost` when its configuration has a
//! `[shards]` section; the git and admin services then serve through it
//! (see `backend`), otherwise from `RepoStore`. The host owns one RocksDB
//! for all of its groups, one channel pool to the peers (shared by every
//! group, so many shards multiplex over one connection per peer) and the
//! registry the node's `Raft` gRPC service dispatches to.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cairn_raft::network::{
    GroupNetworkFactory, GroupRegistry, PeerPool, RaftService, ReadIndexReply, READ_INDEX_TIMEOUT,
};
use cairn_raft::{
    Command, GroupId, GroupStateMachine, NodeId, PeerAddr, RaftDb, StateView, TransportFilter,
    TypeConfig,
};
use openraft::async_runtime::WatchReceiver;
use openraft::error::{ClientWriteError, ForwardToLeader, InitializeError, RaftError};
use openraft::ReadPolicy;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::pack_placer::LocalPackPlacer;
use crate::pack_transfer::StagingArea;
use crate::shard_state::{ShardLogic, ShardRequest, ShardResponse};

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
    #[serde(default)]
    pub shards: Vec<ShardSpec>,
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

type ShardRaft = openraft::Raft<TypeConfig, GroupStateMachine<ShardLogic<LocalPackPlacer>>>;

/// How long a proposal may wait for its commit before its outcome is
/// reported unknown: several election timeouts, far beyond a healthy commit.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a follower may take to apply up to a leader's read index
/// before it gives the read up (to another replica): a healthy follower is
/// a heartbeat behind; one this far behind should not serve.
const FOLLOWER_APPLY_TIMEOUT: Duration = Duration::from_secs(3);

/// This node's shard replicas, each a running raft group.
pub struct ShardHost {
    node_id: NodeId,
    peers: BTreeMap<u64, String>,
    db: RaftDb,
    registry: GroupRegistry,
    pool: PeerPool,
    /// Also consulted by follower reads, which ask the leader directly.
    filter: TransportFilter,
    rafts: BTreeMap<u64, ShardRaft>,
    /// Packs this node fetched from peers, over all shards.
    packs_fetched: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for ShardHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardHost")
            .field("node_id", &self.node_id)
            .field("shards", &self.rafts.keys().collect::<Vec<_>>())
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

    /// Opens the raft database and starts every shard that lists this
    /// node; the lowest-id replica initializes a new group.
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
            // A RocksDB of its own, apart from RepoStore's, while shards are
            // opt-in: nothing here may disturb the single-node store. They
            // merge once the shard path serves git traffic.
            let raft_dir = data_dir.join("raft");
            let db = {
                let (db_path, snap_path) = (raft_dir.join("rocksdb"), raft_dir.join("snapshots"));
                tokio::task::spawn_blocking(move || RaftDb::open(&db_path, &snap_path))
                    .await
                    .map_err(|e| ShardHostError::RaftConfig(format!("open task failed: {e}")))??
            };
            area.create().map_err(ShardHostError::Staging)?;
            let registry = GroupRegistry::new();
            let pool = PeerPool::default();
            let mut host = ShardHost {
                node_id: config.node_id,
                peers: config.peers.clone(),
                db,
                registry,
                pool,
                filter: filter.clone(),
                rafts: BTreeMap::new(),
                packs_fetched: Arc::default(),
            };
            for shard in config
                .shards
                .iter()
                .filter(|s| s.replicas.contains(&config.node_id))
            {
                let raft = host
                    .start_shard(shard, raft_config.clone(), &area, &filter)
                    .await?;
                host.rafts.insert(shard.id, raft);
            }
            tracing::info!(shards = ?host.rafts.keys().collect::<Vec<_>>(), "shard host started");
            Ok(host)
        }
        .instrument(span)
        .await
    }

    async fn start_shard(
        &self,
        shard: &ShardSpec,
        raft_config: Arc<openraft::Config>,
        area: &StagingArea,
        filter: &TransportFilter,
    ) -> Result<ShardRaft, ShardHostError> {
        let group = GroupId(shard.id);
        let start_err = |message: String| ShardHostError::Start {
            shard: shard.id,
            message,
        };
        let network =
            GroupNetworkFactory::new(group, self.node_id, self.pool.clone(), filter.clone());
        // Where apply fetches a committed pack this replica never received.
        let others: Vec<(u64, String)> = shard
            .replicas
            .iter()
            .filter(|&&id| id != self.node_id)
            .filter_map(|id| Some((*id, self.peers.get(id)?.clone())))
            .collect();
        let sm = self.db.state_machine(
            group,
            ShardLogic::new(
                LocalPackPlacer::with_peers(area.clone(), others)
                    .with_fetch_counter(self.packs_fetched.clone()),
            ),
        )?;
        let raft = openraft::Raft::new(
            self.node_id,
            raft_config,
            network,
            self.db.log_store(group),
            sm,
        )
        .await
        .map_err(|e| start_err(e.to_string()))?;
        self.registry.register(group, raft.clone());

        // One replica bootstraps, so two nodes never form competing
        // single-term memberships of the same group.
        let bootstrap = shard.replicas.iter().min() == Some(&self.node_id);
        if bootstrap {
            let members: BTreeMap<NodeId, PeerAddr> = shard
                .replicas
                .iter()
                .map(|id| {
                    let addr = self.peers.get(id).cloned().unwrap_or_default();
                    (*id, PeerAddr { addr })
                })
                .collect();
            match raft.initialize(members).await {
                Ok(()) => tracing::info!(shard = shard.id, "initialized shard group"),
                // A restart: the group already has a vote or a log.
                Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {
                    tracing::debug!(shard = shard.id, "shard group already initialized")
                }
                Err(e) => {
                    return Err(ShardHostError::Initialize {
                        shard: shard.id,
                        message: e.to_string(),
                    })
                }
            }
        }
        Ok(raft)
    }

    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// Shards hosted here.
    pub fn shards(&self) -> Vec<u64> {
        self.rafts.keys().copied().collect()
    }

    /// The registry of this node's groups (what the `Raft` service serves).
    pub fn registry(&self) -> &GroupRegistry {
        &self.registry
    }

    /// The `Raft` gRPC service for the node's tonic server.
    pub fn raft_service(&self) -> RaftService {
        RaftService::new(self.node_id, self.db.clone(), self.registry.clone())
    }

    fn raft(&self, shard: u64) -> Result<&ShardRaft, ProposeError> {
        self.rafts
            .get(&shard)
            .ok_or(ProposeError::UnknownShard(shard))
    }

    /// Proposes `req` to `shard` and returns its applied result. Only the
    /// leader accepts proposals.
    #[tracing::instrument(level = "debug", skip(self, req), fields(node = self.node_id))]
    pub async fn propose(
        &self,
        shard: u64,
        req: ShardRequest,
    ) -> Result<ShardResponse, ProposeError> {
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
                .decode::<ShardResponse>()
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
        let raft = self.rafts.get(&shard)?;
        let leader = raft.metrics().borrow_watched().current_leader;
        leader
    }

    /// Stops every group (in-flight proposals fail); the host answers
    /// nothing afterwards.
    pub async fn shutdown(&self) {
        for (shard, raft) in &self.rafts {
            self.registry.unregister(GroupId(*shard));
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
        Some((id, self.peers.get(&id)?.clone()))
    }

    fn hint(&self, f: &ForwardToLeader<TypeConfig>) -> Option<(NodeId, String)> {
        let id = f.leader_id?;
        let addr = match &f.leader_node {
            Some(node) if !node.addr.is_empty() => node.addr.clone(),
            _ => self.peers.get(&id)?.clone(),
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
}

/// Attempts at reading rows and applied index without an apply in between
/// before the status reports the last (possibly torn) read as unavailable.
const CHECKSUM_ATTEMPTS: usize = 20;

impl ShardHost {
    /// This node's replica of `shard`: role, indexes and a checksum of its
    /// state that replicas at the same applied index must agree on.
    pub fn replica_status(&self, shard: u64) -> Result<ReplicaStatus, ProposeError> {
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
        let mut hash = sha2::Sha256::new();
        for (k, v) in &rows {
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
            repositories: rows
                .iter()
                .filter(|(k, _)| k.starts_with(&repo_rows))
                .count() as u64,
            snapshot_index: metrics.snapshot.map(|s| s.index),
            purged_index: metrics.purged.map(|p| p.index),
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
        let Some(addr) = self.peers.get(&leader).cloned() else {
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
        raft.trigger()
            .transfer_leader(to)
            .await
            .map_err(|e| ProposeError::Raft(e.to_string()))
    }
}

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
        let raft = self.rafts.get(&shard)?;
        let purged = raft.metrics().borrow_watched().purged;
        purged.map(|p| p.index)
    }
}
