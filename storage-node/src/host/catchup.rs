//! Catch-up and compaction: snapshots built on demand, the log purged
//! behind them, and how many packs this node fetched from peers.

use std::time::Duration;

use cairn_raft::types::WatchReceiver;

use super::{ProposeError, ShardHost};

/// This node's snapshot and compaction work (`ShardHost::catchup`).
pub struct Catchup<'a>(&'a ShardHost);

impl ShardHost {
    /// Snapshots, log purges, fetched packs: see [`Catchup`].
    pub fn catchup(&self) -> Catchup<'_> {
        Catchup(self)
    }
}

impl Catchup<'_> {
    /// Packs this node fetched from peers since it started, over all of its
    /// shards: while applying a push it missed, and while completing the
    /// state of an installed snapshot or of a restart.
    pub fn packs_fetched(&self) -> u64 {
        self.0
            .packs_fetched
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Builds a snapshot of `shard` on this replica now and waits until it
    /// covers everything applied when called; returns its last index. The
    /// log it covers is then purged as `max-in-snapshot-log-to-keep` allows.
    pub async fn build_snapshot(&self, shard: u64, timeout: Duration) -> Result<u64, ProposeError> {
        let raft = self.0.raft(shard)?;
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
        let raft = self.0.raft(shard)?;
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

    /// The last log index this replica of `shard` purged, if any.
    pub fn purged_index(&self, shard: u64) -> Option<u64> {
        let raft = self.0.raft(shard).ok()?;
        let purged = raft.metrics().borrow_watched().purged;
        purged.map(|p| p.index)
    }
}
