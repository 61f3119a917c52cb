//! The cluster directory: what the meta group (raft group 0) replicates.
//!
//! * the node registry — id, address, state (active / draining / removed);
//! * the shard map — shard → replica nodes, each change stamped with the
//!   map's epoch, which only grows;
//! * the workspace directory — workspace → shard; a new workspace gets the
//!   next workspace id and the shard at `id % shard count` (shards sorted),
//!   and the entry, not the formula, is the truth from then on;
//! * the repository directory — workspace/slug → repository (its id names
//!   its shard in the high bits);
//! * moves under way — one per shard at most, so a move interrupted by a
//!   crash is found and finished by the next run;
//! * the meta group's own placement, kept as the record of shard 0 (the
//!   meta group's raft group id): its replicas move like a shard's, and
//!   nodes outside the group learn from it where the directory lives.
//!
//! Like the shard state, applying reads only the group's rows and the
//! entry, so every meta replica computes the same directory.

use cairn_raft::{GroupState, StateView, StoreError};
use serde::{Deserialize, Serialize};

use crate::names::{self, CasePlan};
use crate::repo::RepoRecord;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    Active,
    Draining,
    Removed,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Active => "active",
            NodeState::Draining => "draining",
            NodeState::Removed => "removed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: u64,
    /// gRPC `host:port`.
    pub addr: String,
    pub state: NodeState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRecord {
    pub id: u64,
    /// Nodes the router may send the shard's traffic to.
    pub replicas: Vec<u64>,
    /// Map epoch of the last change to this shard.
    pub epoch: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceRecord {
    pub id: u64,
    pub name: String,
    pub shard: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveRecord {
    pub shard: u64,
    pub from: u64,
    pub to: u64,
}

/// A meta group entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaRequest {
    /// The first layout, from the nodes' configuration; applied only to an
    /// empty directory, so every meta replica may propose it at start.
    /// `shards` includes the meta group itself as shard 0.
    Bootstrap {
        nodes: Vec<NodeRecord>,
        shards: Vec<(u64, Vec<u64>)>,
    },
    AddNode {
        id: u64,
        addr: String,
    },
    SetNodeState {
        id: u64,
        state: NodeState,
    },
    CreateWorkspace {
        name: String,
    },
    DeleteWorkspace {
        name: String,
    },
    /// A repository its shard created (the record as created).
    RecordRepo(RepoRecord),
    ForgetRepo {
        workspace: String,
        slug: String,
    },
    /// Sets the nodes the router sends a shard's traffic to (for shard 0:
    /// the nodes holding the meta group, recorded on first use); bumps the
    /// map epoch.
    SetReplicas {
        shard: u64,
        replicas: Vec<u64>,
    },
    BeginMove(MoveRecord),
    EndMove {
        shard: u64,
    },
    /// Moves workspaces and repository entries stored under a legacy name
    /// (kept before names were compared without case) to their canonical
    /// key, and records the workspace names that clash. Deterministic from
    /// the state alone, idempotent.
    CanonicalizeNames,
    /// A change to users, credentials, permissions or the audit log (see
    /// `cairn_identity::change`).
    Identity(Box<cairn_identity::change::Request>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaResponse {
    Done,
    Node(NodeRecord),
    Workspace(WorkspaceRecord),
    Shard(ShardRecord),
    Move(MoveRecord),
    /// Refused as a whole, nothing changed; a human reason.
    Refused(String),
    /// `CanonicalizeNames`: how many rows moved, and the workspace and
    /// repository names that clash.
    Canonicalized {
        renamed: u64,
        workspace_clashes: Vec<Vec<String>>,
        repo_clashes: Vec<Vec<String>>,
    },
    Identity(cairn_identity::change::Outcome),
}

/// Row keys of the meta group.
mod keys {
    pub const BOOTSTRAPPED: &[u8] = b"b";
    pub const EPOCH: &[u8] = b"e";
    pub const NEXT_WORKSPACE: &[u8] = b"wn";

    fn with_id(tag: &[u8], id: u64) -> Vec<u8> {
        let mut k = tag.to_vec();
        k.extend_from_slice(&id.to_be_bytes());
        k
    }

    pub const NODES: &[u8] = b"n/";
    pub fn node(id: u64) -> Vec<u8> {
        with_id(NODES, id)
    }

    pub const SHARDS: &[u8] = b"s/";
    pub fn shard(id: u64) -> Vec<u8> {
        with_id(SHARDS, id)
    }

    pub const MOVES: &[u8] = b"m/";
    pub fn move_(shard: u64) -> Vec<u8> {
        with_id(MOVES, shard)
    }

    pub const WORKSPACES: &[u8] = b"w/";
    pub fn workspace(name: &str) -> Vec<u8> {
        let mut k = WORKSPACES.to_vec();
        k.extend_from_slice(name.as_bytes());
        k
    }

    /// Legacy workspace names that differ only in case, by canonical form:
    /// JSON list of the stored names. While one exists, no workspace of
    /// that name can be created.
    pub const WORKSPACE_CLASHES: &[u8] = b"wc/";
    pub fn workspace_clash(canonical: &str) -> Vec<u8> {
        let mut k = WORKSPACE_CLASHES.to_vec();
        k.extend_from_slice(canonical.as_bytes());
        k
    }

    pub const REPOS: &[u8] = b"r/";
    pub fn repos_of(workspace: &str) -> Vec<u8> {
        let mut k = REPOS.to_vec();
        k.extend_from_slice(workspace.as_bytes());
        k.push(b'/');
        k
    }
    pub fn repo(workspace: &str, slug: &str) -> Vec<u8> {
        let mut k = repos_of(workspace);
        k.extend_from_slice(slug.as_bytes());
        k
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("corrupt directory row {key}: {message}")]
    Corrupt { key: String, message: String },
}

fn corrupt(key: &[u8], message: impl ToString) -> MetaError {
    MetaError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        message: message.to_string(),
    }
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("directory rows serialize")
}

fn decode<T: for<'de> Deserialize<'de>>(key: &[u8], value: &[u8]) -> Result<T, MetaError> {
    serde_json::from_slice(value).map_err(|e| corrupt(key, e))
}

fn decode_u64(key: &[u8], value: Option<Vec<u8>>) -> Result<u64, MetaError> {
    match value {
        None => Ok(0),
        Some(v) => Ok(u64::from_be_bytes(
            v.as_slice()
                .try_into()
                .map_err(|_| corrupt(key, "not 8 bytes"))?,
        )),
    }
}

/// A refusal that lasts only until the meta nodes have proposed the
/// configured layout, moments after the cluster's first start.
pub const NOT_BOOTSTRAPPED: &str = "the cluster directory is not bootstrapped yet";

/// The meta group's `ApplyLogic`.
#[derive(Debug, Default)]
pub struct MetaLogic;

impl MetaLogic {
    fn get<T: for<'de> Deserialize<'de>>(
        state: &GroupState<'_>,
        key: &[u8],
    ) -> Result<Option<T>, MetaError> {
        state.get(key)?.map(|v| decode(key, &v)).transpose()
    }

    fn bump_epoch(state: &mut GroupState<'_>) -> Result<u64, MetaError> {
        let epoch = decode_u64(keys::EPOCH, state.get(keys::EPOCH)?)? + 1;
        state.put(keys::EPOCH, &epoch.to_be_bytes());
        Ok(epoch)
    }

    /// The data shards, sorted (the meta group's record excluded).
    fn shard_ids(state: &GroupState<'_>) -> Result<Vec<u64>, MetaError> {
        let mut ids = Vec::new();
        for (k, v) in state.scan_prefix(keys::SHARDS)? {
            let id = decode::<ShardRecord>(&k, &v)?.id;
            if id != META_SHARD {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    pub fn apply_request(
        &self,
        state: &mut GroupState<'_>,
        request: MetaRequest,
    ) -> Result<MetaResponse, MetaError> {
        use MetaResponse::{Done, Refused};
        Ok(match request {
            MetaRequest::Bootstrap { nodes, shards } => {
                if state.get(keys::BOOTSTRAPPED)?.is_some() {
                    return Ok(Done);
                }
                let epoch = Self::bump_epoch(state)?;
                for node in &nodes {
                    state.put(&keys::node(node.id), &json(node));
                }
                for (id, replicas) in shards {
                    let record = ShardRecord {
                        id,
                        replicas,
                        epoch,
                    };
                    state.put(&keys::shard(id), &json(&record));
                }
                state.put(keys::BOOTSTRAPPED, b"1");
                Done
            }
            MetaRequest::AddNode { id, addr } => {
                if let Some(existing) = Self::get::<NodeRecord>(state, &keys::node(id))? {
                    if existing.addr != addr {
                        return Ok(Refused(format!(
                            "node {id} is registered at {}; not {addr}",
                            existing.addr
                        )));
                    }
                    if existing.state != NodeState::Removed {
                        return Ok(MetaResponse::Node(existing));
                    }
                }
                let record = NodeRecord {
                    id,
                    addr,
                    state: NodeState::Active,
                };
                state.put(&keys::node(id), &json(&record));
                MetaResponse::Node(record)
            }
            MetaRequest::SetNodeState { id, state: to } => {
                let Some(mut record) = Self::get::<NodeRecord>(state, &keys::node(id))? else {
                    return Ok(Refused(format!("node {id} is not registered")));
                };
                if to == NodeState::Removed {
                    for (k, v) in state.scan_prefix(keys::SHARDS)? {
                        let shard: ShardRecord = decode(&k, &v)?;
                        if shard.replicas.contains(&id) {
                            let what = if shard.id == META_SHARD {
                                "the meta group".to_owned()
                            } else {
                                format!("shard {}", shard.id)
                            };
                            return Ok(Refused(format!(
                                "node {id} still holds a replica of {what}; drain it first"
                            )));
                        }
                    }
                }
                record.state = to;
                state.put(&keys::node(id), &json(&record));
                MetaResponse::Node(record)
            }
            MetaRequest::CreateWorkspace { name } => {
                if let Err(e) = names::validate("workspace", &name) {
                    return Ok(Refused(e.to_string()));
                }
                let key = keys::workspace(&name);
                if let Some(existing) = Self::get::<WorkspaceRecord>(state, &key)? {
                    return Ok(MetaResponse::Workspace(existing));
                }
                let canonical = names::canonical(&name);
                if let Some(clash) =
                    Self::get::<Vec<String>>(state, &keys::workspace_clash(&canonical))?
                {
                    return Ok(Refused(names::describe_clash("workspace", &clash)));
                }
                if state.get(keys::BOOTSTRAPPED)?.is_none() {
                    return Ok(Refused(NOT_BOOTSTRAPPED.into()));
                }
                let shards = Self::shard_ids(state)?;
                if shards.is_empty() {
                    return Ok(Refused("the cluster has no shards".into()));
                }
                let id = decode_u64(keys::NEXT_WORKSPACE, state.get(keys::NEXT_WORKSPACE)?)?;
                let record = WorkspaceRecord {
                    id,
                    shard: shards[(id % shards.len() as u64) as usize],
                    name,
                };
                state.put(keys::NEXT_WORKSPACE, &(id + 1).to_be_bytes());
                state.put(&key, &json(&record));
                MetaResponse::Workspace(record)
            }
            MetaRequest::DeleteWorkspace { name } => {
                let key = keys::workspace(&name);
                if state.get(&key)?.is_none() {
                    return Ok(Refused(format!("workspace {name} not found")));
                }
                if !state
                    .scan_prefix_limit(&keys::repos_of(&name), 1)?
                    .is_empty()
                {
                    return Ok(Refused(format!("workspace {name} still has repositories")));
                }
                state.delete(&key);
                Self::settle_workspace_clash(state, &name)?;
                Done
            }
            MetaRequest::RecordRepo(record) => {
                state.put(&keys::repo(&record.workspace, &record.slug), &json(&record));
                Done
            }
            MetaRequest::ForgetRepo { workspace, slug } => {
                state.delete(&keys::repo(&workspace, &slug));
                Done
            }
            MetaRequest::SetReplicas { shard, replicas } => {
                let key = keys::shard(shard);
                if replicas.is_empty() {
                    return Ok(Refused(format!("shard {shard} needs a replica")));
                }
                let existing = Self::get::<ShardRecord>(state, &key)?;
                // The meta group's record is written on first use: a
                // directory bootstrapped before it was kept starts without.
                let mut record = match existing {
                    Some(r) => r,
                    None if shard == META_SHARD => ShardRecord {
                        id: META_SHARD,
                        replicas: Vec::new(),
                        epoch: 0,
                    },
                    None => return Ok(Refused(format!("shard {shard} does not exist"))),
                };
                if record.replicas != replicas {
                    record.replicas = replicas;
                    record.epoch = Self::bump_epoch(state)?;
                    state.put(&key, &json(&record));
                }
                MetaResponse::Shard(record)
            }
            MetaRequest::BeginMove(m) => {
                let key = keys::move_(m.shard);
                if let Some(existing) = Self::get::<MoveRecord>(state, &key)? {
                    if existing != m {
                        return Ok(Refused(format!(
                            "shard {} is already moving from node {} to node {}; run that move again to finish it",
                            existing.shard, existing.from, existing.to
                        )));
                    }
                    return Ok(MetaResponse::Move(existing));
                }
                state.put(&key, &json(&m));
                MetaResponse::Move(m)
            }
            MetaRequest::EndMove { shard } => {
                state.delete(&keys::move_(shard));
                Done
            }
            MetaRequest::CanonicalizeNames => Self::canonicalize_names(state)?,
            MetaRequest::Identity(request) => super::identity::apply(state, *request)?,
        })
    }

    fn rename_workspace(state: &mut GroupState<'_>, from: &str, to: &str) -> Result<(), MetaError> {
        let (from_key, to_key) = (keys::workspace(from), keys::workspace(to));
        // `to` is free: no other stored name has its canonical form (reads
        // here see the state before the entry, so do not ask the state).
        if from_key == to_key {
            return Ok(());
        }
        let Some(mut record) = Self::get::<WorkspaceRecord>(state, &from_key)? else {
            return Ok(());
        };
        record.name = to.to_owned();
        state.delete(&from_key);
        state.put(&to_key, &json(&record));
        Ok(())
    }

    /// After workspace `deleted` is gone: if it was one of a clash, the
    /// clash shrinks, and its last name takes the canonical key.
    fn settle_workspace_clash(state: &mut GroupState<'_>, deleted: &str) -> Result<(), MetaError> {
        let canonical = names::canonical(deleted);
        let clash_key = keys::workspace_clash(&canonical);
        let Some(mut left) = Self::get::<Vec<String>>(state, &clash_key)? else {
            return Ok(());
        };
        left.retain(|n| n != deleted);
        if left.len() > 1 {
            state.put(&clash_key, &json(&left));
            return Ok(());
        }
        state.delete(&clash_key);
        if let Some(last) = left.pop() {
            Self::rename_workspace(state, &last, &canonical)?;
        }
        Ok(())
    }

    fn canonicalize_names(state: &mut GroupState<'_>) -> Result<MetaResponse, MetaError> {
        let suffix =
            |prefix: &[u8], k: &[u8]| String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
        let stored: Vec<String> = state
            .scan_prefix(keys::WORKSPACES)?
            .into_iter()
            .map(|(k, _)| suffix(keys::WORKSPACES, &k))
            .collect();
        let CasePlan { renames, clashes } = names::plan_case_migration(stored);
        for (from, to) in &renames {
            Self::rename_workspace(state, from, to)?;
        }
        for (k, _) in state.scan_prefix(keys::WORKSPACE_CLASHES)? {
            if !clashes.contains_key(&suffix(keys::WORKSPACE_CLASHES, &k)) {
                state.delete(&k);
            }
        }
        for (canonical, names) in &clashes {
            state.put(&keys::workspace_clash(canonical), &json(names));
        }
        let mut renamed = renames.len() as u64;

        // Repository entries mirror their shards' records; they move alike.
        let stored: Vec<String> = state
            .scan_prefix(keys::REPOS)?
            .into_iter()
            .map(|(k, _)| suffix(keys::REPOS, &k))
            .collect();
        let repos = names::plan_case_migration(stored);
        for (from, to) in &repos.renames {
            let from_key = [keys::REPOS, from.as_bytes()].concat();
            let to_key = [keys::REPOS, to.as_bytes()].concat();
            let (Some(mut record), None) = (
                Self::get::<RepoRecord>(state, &from_key)?,
                state.get(&to_key)?,
            ) else {
                continue;
            };
            let (ws, slug) = to.split_once('/').unwrap_or((to, ""));
            record.workspace = ws.to_owned();
            record.slug = slug.to_owned();
            state.delete(&from_key);
            state.put(&to_key, &json(&record));
            renamed += 1;
        }
        Ok(MetaResponse::Canonicalized {
            renamed,
            workspace_clashes: clashes.into_values().collect(),
            repo_clashes: repos.clashes.into_values().collect(),
        })
    }
}

impl cairn_raft::ApplyLogic for MetaLogic {
    type Request = MetaRequest;
    type Response = MetaResponse;
    type Error = MetaError;

    fn apply(
        &self,
        state: &mut GroupState<'_>,
        request: MetaRequest,
    ) -> Result<MetaResponse, MetaError> {
        self.apply_request(state, request)
    }
}

/// The legacy names of one replica's directory (see `names`).
pub fn case_status(view: &StateView) -> Result<names::CaseStatus, cairn_raft::StoreError> {
    let tail = |prefix: &[u8], rows: Vec<(Vec<u8>, Vec<u8>)>| -> Vec<String> {
        rows.into_iter()
            .map(|(k, _)| String::from_utf8_lossy(&k[prefix.len()..]).into_owned())
            .collect()
    };
    let workspaces = tail(keys::WORKSPACES, view.scan_prefix(keys::WORKSPACES)?);
    let recorded = tail(
        keys::WORKSPACE_CLASHES,
        view.scan_prefix(keys::WORKSPACE_CLASHES)?,
    );
    let repos = tail(keys::REPOS, view.scan_prefix(keys::REPOS)?);
    let mut status = names::CaseStatus::default();
    status.add("workspace", workspaces, Some(recorded));
    // Repository clashes are the shards' to report and guard.
    let repo_part = names::plan_case_migration(repos);
    status.pending |= !repo_part.renames.is_empty();
    Ok(status)
}

/// The shard id under which the meta group's placement is kept (its raft
/// group id); never a data shard.
pub const META_SHARD: u64 = 0;

/// The directory as one replica has applied it; linearizable only after a
/// read barrier on the meta group.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Directory {
    pub bootstrapped: bool,
    pub epoch: u64,
    pub nodes: Vec<NodeRecord>,
    /// Data shards only.
    pub shards: Vec<ShardRecord>,
    /// The meta group's placement (absent until first recorded).
    pub meta: Option<ShardRecord>,
    pub moves: Vec<MoveRecord>,
}

impl Directory {
    pub fn node(&self, id: u64) -> Option<&NodeRecord> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// A data shard's record, or the meta group's for [`META_SHARD`].
    pub fn shard(&self, id: u64) -> Option<&ShardRecord> {
        if id == META_SHARD {
            return self.meta.as_ref();
        }
        self.shards.iter().find(|s| s.id == id)
    }

    pub fn addr(&self, id: u64) -> Option<&str> {
        self.node(id).map(|n| n.addr.as_str())
    }
}

/// Reads of the directory rows.
pub mod read {
    use super::*;

    fn all<T: for<'de> Deserialize<'de>>(
        view: &StateView,
        prefix: &[u8],
    ) -> Result<Vec<T>, MetaError> {
        view.scan_prefix(prefix)?
            .iter()
            .map(|(k, v)| decode(k, v))
            .collect()
    }

    pub fn directory(view: &StateView) -> Result<Directory, MetaError> {
        let (meta, shards): (Vec<ShardRecord>, Vec<ShardRecord>) = all(view, keys::SHARDS)?
            .into_iter()
            .partition(|s: &ShardRecord| s.id == META_SHARD);
        Ok(Directory {
            bootstrapped: view.get(keys::BOOTSTRAPPED)?.is_some(),
            epoch: decode_u64(keys::EPOCH, view.get(keys::EPOCH)?)?,
            nodes: all(view, keys::NODES)?,
            shards,
            meta: meta.into_iter().next(),
            moves: all(view, keys::MOVES)?,
        })
    }

    /// The workspace stored under `name` as given, else under its
    /// canonical form.
    pub fn workspace(view: &StateView, name: &str) -> Result<Option<WorkspaceRecord>, MetaError> {
        for form in names::lookup_forms(name) {
            let key = keys::workspace(&form);
            if let Some(v) = view.get(&key)? {
                return decode(&key, &v).map(Some);
            }
        }
        Ok(None)
    }

    pub fn workspaces(view: &StateView) -> Result<Vec<WorkspaceRecord>, MetaError> {
        all(view, keys::WORKSPACES)
    }

    /// Repository entries of `workspace`, or of every workspace when empty.
    pub fn repos(view: &StateView, workspace: &str) -> Result<Vec<RepoRecord>, MetaError> {
        if workspace.is_empty() {
            return all(view, keys::REPOS);
        }
        let mut out = Vec::new();
        for form in names::lookup_forms(workspace) {
            out.extend(all(view, &keys::repos_of(&form))?);
        }
        Ok(out)
    }
}

/// A directory read, answered by a meta replica after a read barrier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaQuery {
    Directory,
    Workspace(String),
    Workspaces,
    Repos(String),
    /// The identity snapshot, unless the caller's version is current.
    IdentitySnapshot {
        known_version: u64,
    },
    /// One user, password hash included (for sign-in).
    IdentityUser(String),
    /// Audit records after `after`, oldest first.
    Audit {
        after: u64,
        limit: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaAnswer {
    Directory(Directory),
    Workspace(Option<WorkspaceRecord>),
    Workspaces(Vec<WorkspaceRecord>),
    Repos(Vec<RepoRecord>),
    Identity(Box<cairn_identity::Snapshot>),
    IdentityUnchanged(u64),
    IdentityUser(Option<Box<cairn_identity::User>>),
    Audit(Vec<cairn_identity::change::AuditEvent>),
}

impl MetaQuery {
    pub fn answer(&self, view: &StateView) -> Result<MetaAnswer, MetaError> {
        Ok(match self {
            MetaQuery::Directory => MetaAnswer::Directory(read::directory(view)?),
            MetaQuery::Workspace(name) => MetaAnswer::Workspace(read::workspace(view, name)?),
            MetaQuery::Workspaces => MetaAnswer::Workspaces(read::workspaces(view)?),
            MetaQuery::Repos(ws) => MetaAnswer::Repos(read::repos(view, ws)?),
            MetaQuery::IdentitySnapshot { .. }
            | MetaQuery::IdentityUser(_)
            | MetaQuery::Audit { .. } => super::identity::answer(view, self)?,
        })
    }
}

/// What travels in `Cluster.MetaCall`, node to node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaCall {
    Read(MetaQuery),
    Write(MetaRequest),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaReply {
    Read(MetaAnswer),
    Write(MetaResponse),
}
