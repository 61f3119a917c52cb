//! Writes under way on a shard leader, so that a planned leader transfer
//! is invisible to git clients.
//!
//! A push is checked for leadership before its pack is read, then spends
//! seconds validating before it proposes; a transfer in that window would
//! make it fail with "not the shard leader" although nothing was wrong. So
//! each push holds a [`WriteGuard`] from the leadership check to its
//! proposal, and a transfer first closes the gate (new pushes are turned
//! away with a hint before reading anything, which the router follows),
//! waits — bounded — for the pushes inside to finish, and reopens it once
//! leadership has moved.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

#[derive(Debug, Default)]
struct ShardGate {
    in_flight: usize,
    /// The node leadership is being handed to, while the gate is closed.
    handing_to: Option<u64>,
}

#[derive(Debug, Default)]
pub struct WriteGate {
    shards: Mutex<HashMap<u64, ShardGate>>,
    changed: Notify,
}

/// One write inside the gate of its shard; leaves on drop.
#[derive(Debug)]
pub struct WriteGuard {
    gate: Arc<WriteGate>,
    shard: u64,
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        let mut shards = self.gate.lock();
        if let Some(s) = shards.get_mut(&self.shard) {
            s.in_flight = s.in_flight.saturating_sub(1);
            if s.in_flight == 0 && s.handing_to.is_none() {
                shards.remove(&self.shard);
            }
        }
        drop(shards);
        self.gate.changed.notify_waiters();
    }
}

impl WriteGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, ShardGate>> {
        // Counters only; a panic elsewhere leaves them usable.
        self.shards.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Enters `shard`'s gate; `Err(to)` while leadership is being handed
    /// to node `to`.
    pub fn enter(self: &Arc<Self>, shard: u64) -> Result<WriteGuard, u64> {
        let mut shards = self.lock();
        let s = shards.entry(shard).or_default();
        if let Some(to) = s.handing_to {
            return Err(to);
        }
        s.in_flight += 1;
        Ok(WriteGuard {
            gate: self.clone(),
            shard,
        })
    }

    /// Closes `shard`'s gate for a transfer to `to` and waits until the
    /// writes inside have left, or `timeout` passed (they then find out
    /// that leadership moved, as they would without the gate). Returns the
    /// writes still inside.
    pub async fn close_and_drain(&self, shard: u64, to: u64, timeout: Duration) -> usize {
        self.lock().entry(shard).or_default().handing_to = Some(to);
        let wait = async {
            loop {
                let notified = self.changed.notified();
                if self.lock().get(&shard).map_or(0, |s| s.in_flight) == 0 {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(timeout, wait).await;
        self.lock().get(&shard).map_or(0, |s| s.in_flight)
    }

    /// Opens `shard`'s gate again.
    pub fn reopen(&self, shard: u64) {
        let mut shards = self.lock();
        if let Some(s) = shards.get_mut(&shard) {
            s.handing_to = None;
            if s.in_flight == 0 {
                shards.remove(&shard);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_transfer_waits_for_writes_inside_and_turns_new_ones_away() {
        let gate = Arc::new(WriteGate::default());
        let inside = gate.enter(1).expect("open");
        let other_shard = gate.enter(2).expect("open");
        let closing = {
            let gate = gate.clone();
            tokio::spawn(async move { gate.close_and_drain(1, 7, Duration::from_secs(10)).await })
        };
        // The gate closes at once; the write inside keeps it waiting.
        tokio::time::timeout(Duration::from_secs(5), async {
            while gate.enter(1).is_ok() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("closed");
        assert_eq!(gate.enter(1).map(|_| ()), Err(7));
        assert!(!closing.is_finished());
        drop(inside);
        assert_eq!(closing.await.expect("drained"), 0);
        // Other shards are not concerned.
        assert!(gate.enter(2).is_ok());
        drop(other_shard);
        gate.reopen(1);
        assert!(gate.enter(1).is_ok());
        assert!(gate.lock().is_empty(), "nothing kept for idle shards");
    }

    #[tokio::test]
    async fn draining_is_bounded() {
        let gate = Arc::new(WriteGate::default());
        let _stuck = gate.enter(1).expect("open");
        let left = gate.close_and_drain(1, 2, Duration::from_millis(50)).await;
        assert_eq!(left, 1);
    }
}
