//! The `[shards]` section of a node's configuration: the cluster's first
//! layout, this node's peers, and the Raft timings, validated.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{ShardHostError, META_GROUP};

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

    pub(super) fn raft_config(&self) -> Result<Arc<cairn_raft::types::RaftConfig>, ShardHostError> {
        let config = cairn_raft::types::RaftConfig {
            cluster_name: "cairn-shards".into(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            snapshot_policy: cairn_raft::types::SnapshotPolicy::LogsSinceLast(
                self.snapshot_logs_since_last,
            ),
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
