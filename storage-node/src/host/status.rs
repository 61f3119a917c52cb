//! What this node reports of its replicas (`Admin.ShardStatus`): role,
//! indexes, members, a checksum of the state at one applied index, and
//! bytes per repository.

use std::collections::BTreeMap;
use std::path::Path;

use cairn_raft::{GroupId, NodeId};

use super::{ProposeError, ShardHost, META_GROUP};

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
    /// SHA-256 over the pack files the rows name, as found on this node's
    /// disk (see [`pack_checksum`]): replicas holding the same packs agree.
    pub pack_checksum: String,
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
    use crate::shard::state::{keys, PackRef};
    let mut bytes: BTreeMap<u64, u64> = BTreeMap::new();
    let mut repos = Vec::new();
    let records = keys::repos_of("");
    for (k, v) in rows {
        if let Some((id, _)) = keys::parse_pack(k) {
            if let Ok(pack) = crate::shard::rows::read_json::<PackRef>(k, v) {
                *bytes.entry(id).or_default() += pack.bytes;
            }
        } else if k.starts_with(&records) {
            if let Ok(r) = crate::shard::rows::read_json::<crate::repo::RepoRecord>(k, v) {
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

/// A digest of the packs `named` (repository id, pack id) as this node has
/// them: per pack, whether both files are there, their sizes, and the
/// checksum trailer each file ends with (a pack's names the pack; an
/// index's covers it). Reading 40 bytes a pack keeps it cheap; a missing,
/// truncated or rewritten file changes it.
fn pack_checksum<'a>(data_dir: &Path, named: impl Iterator<Item = (u64, &'a str)>) -> String {
    use sha2::Digest as _;
    let mut hash = sha2::Sha256::new();
    for (repo, pack) in named {
        hash.update(repo.to_be_bytes());
        hash.update(pack.as_bytes());
        let dir = crate::layout::pack_dir(data_dir, repo);
        for ext in ["pack", "idx"] {
            match file_tail(&dir.join(format!("pack-{pack}.{ext}"))) {
                Ok((len, trailer)) => {
                    hash.update([1]);
                    hash.update(len.to_be_bytes());
                    hash.update(trailer);
                }
                Err(_) => hash.update([0]),
            }
        }
    }
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// A file's length and its last 20 bytes.
fn file_tail(path: &Path) -> std::io::Result<(u64, [u8; 20])> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let mut tail = [0u8; 20];
    f.seek(SeekFrom::End(-20))?;
    f.read_exact(&mut tail)?;
    Ok((len, tail))
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
        use cairn_raft::types::WatchReceiver as _;
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
                use crate::shard::state::keys;
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
        let pack_checksum = pack_checksum(
            &self.data_dir,
            rows.iter()
                .filter(|(k, _)| in_scope(k))
                .filter_map(|(k, _)| crate::shard::state::keys::parse_pack(k)),
        );
        let metrics = raft.metrics().borrow_watched().clone();
        let repo_rows = crate::shard::state::keys::repos_of("");
        Ok(ReplicaStatus {
            shard,
            node: self.node_id,
            leader: metrics.current_leader,
            term: metrics.current_term,
            applied_index,
            last_log_index: metrics.last_log_index.unwrap_or(0),
            voters: metrics.membership_config.membership().voter_ids().collect(),
            state_checksum,
            pack_checksum,
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
}
