//! `CaseMigrationWorker`: after a node starts, moves names stored before
//! workspaces and repositories were compared without case to their
//! canonical keys, and reports the names that clash.
//!
//! For each group it hosts, the worker reads its own replica's state
//! (`case_status`): names that clash are logged once, with what an operator
//! should do; while anything would change, the group's leader proposes the
//! deterministic `CanonicalizeNames` entry (followers leave it to the
//! leader, which runs the same worker). It stops once no hosted group has
//! anything left to move, or after a bounded time.

use std::collections::BTreeSet;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::{ShardHost, META_GROUP};
use crate::meta::state::{self as meta_state, MetaRequest, MetaResponse};
use crate::names::{self, CaseStatus};
use crate::shard::entry::Entry;
use crate::shard::state::{self as shard_state, ShardRequest, ShardResponse};

/// Time between passes.
const INTERVAL: Duration = Duration::from_secs(2);

/// How long the worker keeps trying (leaders settle well within this).
const DEADLINE: Duration = Duration::from_secs(600);

pub struct CaseMigrationWorker {
    host: Weak<ShardHost>,
    /// Clashes already reported, by group and names.
    reported: BTreeSet<(u64, Vec<String>)>,
}

impl CaseMigrationWorker {
    pub fn new(host: &Arc<ShardHost>) -> Self {
        CaseMigrationWorker {
            host: Arc::downgrade(host),
            reported: BTreeSet::new(),
        }
    }

    pub fn spawn(mut self) {
        tokio::spawn(async move {
            let started = Instant::now();
            while started.elapsed() < DEADLINE {
                // Weak: a node shut down must not be kept alive by this loop.
                let Some(host) = self.host.upgrade().filter(|h| !h.is_shut_down()) else {
                    return;
                };
                if !self.pass(&host).await {
                    return;
                }
                drop(host);
                tokio::time::sleep(INTERVAL).await;
            }
        });
    }

    /// One look at every hosted group; `true` while some group has work.
    async fn pass(&mut self, host: &Arc<ShardHost>) -> bool {
        let mut pending = false;
        for group in host.groups() {
            let Ok(view) = host.state_view(group) else {
                continue;
            };
            let status = if group == META_GROUP {
                meta_state::case_status(&view)
            } else {
                shard_state::case_status(&view)
            };
            let status: CaseStatus = match status {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(group, error = %e, "cannot read legacy names");
                    pending = true;
                    continue;
                }
            };
            for (what, clash) in status.clashes {
                if self.reported.insert((group, clash.clone())) {
                    tracing::error!(group, "{}", names::describe_clash(what, &clash));
                }
            }
            if !status.pending {
                continue;
            }
            pending = true;
            if host.leader(group) == Some(host.node_id()) {
                propose(host, group).await;
            }
        }
        pending
    }
}

async fn propose(host: &ShardHost, group: u64) {
    let outcome = if group == META_GROUP {
        host.propose_meta(MetaRequest::CanonicalizeNames)
            .await
            .map(|r| match r {
                MetaResponse::Canonicalized { renamed, .. } => renamed,
                _ => 0,
            })
    } else {
        let entry = Entry::new(
            shard_state::git_kinds::CANONICALIZE,
            1,
            None,
            &shard_state::CanonicalizeNames,
        );
        host.propose(group, ShardRequest::Entry(entry))
            .await
            .map(|r| match r {
                ShardResponse::Canonicalized { renamed, .. } => renamed,
                _ => 0,
            })
    };
    match outcome {
        Ok(renamed) => tracing::info!(group, renamed, "names moved to their canonical form"),
        Err(e) => tracing::debug!(group, error = %e, "moving legacy names deferred"),
    }
}
