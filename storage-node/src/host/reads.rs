//! Linearizable reads on any replica: the leader's read index, a
//! follower waiting until it has applied the leader's, and the wait for
//! the packs a replica's state names.

use std::time::Duration;

use cairn_raft::network::{ReadIndexReply, READ_INDEX_TIMEOUT};
use cairn_raft::types::ReadPolicy;
use cairn_raft::{GroupId, PeerAddr};

use super::{ProposeError, ShardHost, FOLLOWER_APPLY_TIMEOUT};

impl ShardHost {
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
}
