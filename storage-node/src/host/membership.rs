//! Replicas coming and going while the node runs: opening and closing a
//! replica, learners and voter changes (joint consensus), replication
//! progress, leader hand-over, and letting a wiped replica rejoin.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use cairn_raft::types::WatchReceiver;
use cairn_raft::types::{ClientWriteError, RaftError};
use cairn_raft::{GroupId, NodeId, PeerAddr, TypeConfig};

use super::{ProposeError, ShardHost, ShardHostError, META_GROUP, PROPOSE_TIMEOUT};
use crate::packs::transfer::StagingArea;

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

/// This node's membership work on its groups (`ShardHost::membership`).
pub struct Membership<'a>(pub(super) &'a ShardHost);

impl ShardHost {
    /// Replicas coming and going: see [`Membership`].
    pub fn membership(&self) -> Membership<'_> {
        Membership(self)
    }
}

impl Membership<'_> {
    /// Voters and learners of `shard` in this replica's latest membership
    /// (joint configurations: every voter of either side).
    pub fn members(&self, shard: u64) -> Result<(Vec<NodeId>, Vec<NodeId>), ProposeError> {
        let raft = self.0.raft(shard)?;
        let metrics = raft.metrics().borrow_watched().clone();
        let membership = metrics.membership_config.membership();
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        let learners: Vec<NodeId> = membership.learner_ids().collect();
        Ok((voters, learners))
    }

    /// Voter sets of `shard`'s latest membership: one, or two while a
    /// joint configuration is in force (a write needs a majority of each).
    pub fn voter_sets(&self, shard: u64) -> Result<Vec<BTreeSet<NodeId>>, ProposeError> {
        let raft = self.0.raft(shard)?;
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
        let _guard = self.0.membership_lock.lock().await;
        for (id, addr) in members {
            self.0.peers.insert(*id, addr.clone());
        }
        if self.0.hosts(shard) {
            return Ok(());
        }
        self.0.start_group(shard, None).await?;
        self.0.persist_hosted()?;
        tracing::info!(shard, "opened an empty replica");
        Ok(())
    }

    /// Stops this node's replica of `shard` (or of the meta group) and
    /// deletes its log, rows, snapshots and the packs of its repositories.
    /// Only for a replica that is no longer a member (the caller checked
    /// with the leader). Idempotent.
    pub async fn close_replica(&self, shard: u64) -> Result<(), ProposeError> {
        let _guard = self.0.membership_lock.lock().await;
        if let Ok(raft) = self.0.raft(shard) {
            if self.0.leader(shard) == Some(self.0.node_id) {
                return Err(ProposeError::Raft(format!(
                    "this node still leads shard {shard}; transfer its leadership first"
                )));
            }
            self.0.registry.unregister(GroupId(shard));
            self.0.rafts_mut().remove(&shard);
            if let Err(e) = raft.shutdown().await {
                tracing::warn!(shard, error = %e, "shard group did not stop cleanly");
            }
            drop(raft);
            self.0
                .persist_hosted()
                .map_err(|e| ProposeError::Raft(e.to_string()))?;
        }
        // Also after a crash between forgetting the shard and deleting it.
        self.0
            .db
            .drop_group(GroupId(shard))
            .map_err(|e| ProposeError::Raft(e.to_string()))?;
        if shard == META_GROUP {
            tracing::info!("closed the meta replica and deleted its data");
            return Ok(());
        }
        let data_dir = self.0.data_dir.clone();
        let area = self.0.area.clone();
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
        let raft = self.0.raft(shard)?;
        self.0.peers.insert(node, addr.clone());
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
        let raft = self.0.raft(shard)?;
        let change = raft.change_membership(voters, false);
        match tokio::time::timeout(PROPOSE_TIMEOUT, change).await {
            Err(_) => Err(ProposeError::Indeterminate {
                leader_hint: self.0.known_leader(shard),
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
                leader_hint: self.0.hint(&f),
            },
            RaftError::APIError(ClientWriteError::LogEntryDiscarded(f)) => {
                ProposeError::Indeterminate {
                    leader_hint: self.0.hint(&f),
                }
            }
            e => ProposeError::Raft(e.to_string()),
        }
    }

    /// On `shard`'s leader: its members and how far each matches its log.
    pub fn replication_progress(&self, shard: u64) -> Result<ReplicationProgress, ProposeError> {
        let raft = self.0.raft(shard)?;
        let metrics = raft.metrics().borrow_watched().clone();
        if metrics.current_leader != Some(self.0.node_id) {
            return Err(ProposeError::NotLeader {
                leader_hint: self.0.peer_hint(metrics.current_leader),
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
        matched.insert(self.0.node_id, last_log_index);
        Ok(ReplicationProgress {
            leader: self.0.node_id,
            last_log_index,
            voters: membership.voter_ids().collect(),
            learners: membership.learner_ids().collect(),
            matched,
        })
    }

    /// Asks `shard`'s leader (this node) to hand leadership to `to`.
    pub async fn transfer_leader(&self, shard: u64, to: NodeId) -> Result<(), ProposeError> {
        let raft = self.0.raft(shard)?;
        let metrics = raft.metrics().borrow_watched().clone();
        if metrics.current_leader != Some(self.0.node_id) {
            return Err(ProposeError::NotLeader {
                leader_hint: self.0.peer_hint(metrics.current_leader),
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
            .0
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
            let me = self.0.node_id;
            let _ = raft
                .wait(Some(TRANSFER_SETTLE_TIMEOUT))
                .metrics(|m| m.current_leader != Some(me), "leadership handed over")
                .await;
        }
        self.0.writes.reopen(shard);
        transferred
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
        let raft = self.0.raft(shard)?;
        match raft.trigger().allow_next_revert(&node, true).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(cairn_raft::types::AllowNextRevertError::ForwardToLeader(f))) => {
                Err(ProposeError::NotLeader {
                    leader_hint: self.0.hint(&f),
                })
            }
            Ok(Err(e)) => Err(ProposeError::Raft(e.to_string())),
            Err(e) => Err(ProposeError::Raft(e.to_string())),
        }
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
        if crate::shard::state::shard_of_repo(repo_id) == shard {
            std::fs::remove_dir_all(entry.path())?;
        }
    }
    area.remove_shard(shard)
}

/// How long a leader transfer waits for the pushes being validated.
const TRANSFER_DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// How long new pushes are turned away while leadership moves.
const TRANSFER_SETTLE_TIMEOUT: Duration = Duration::from_secs(5);
