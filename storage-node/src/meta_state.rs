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

use crate::repo_store::{validate_name, RepoRecord};

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
    Db(#[from] rocksdb::Error),
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
                if let Err(e) = validate_name("workspace", &name) {
                    return Ok(Refused(e.to_string()));
                }
                let key = keys::workspace(&name);
                if let Some(existing) = Self::get::<WorkspaceRecord>(state, &key)? {
                    return Ok(MetaResponse::Workspace(existing));
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

    pub fn workspace(view: &StateView, name: &str) -> Result<Option<WorkspaceRecord>, MetaError> {
        let key = keys::workspace(name);
        view.get(&key)?.map(|v| decode(&key, &v)).transpose()
    }

    pub fn workspaces(view: &StateView) -> Result<Vec<WorkspaceRecord>, MetaError> {
        all(view, keys::WORKSPACES)
    }

    /// Repository entries of `workspace`, or of every workspace when empty.
    pub fn repos(view: &StateView, workspace: &str) -> Result<Vec<RepoRecord>, MetaError> {
        if workspace.is_empty() {
            all(view, keys::REPOS)
        } else {
            all(view, &keys::repos_of(workspace))
        }
    }
}

/// A directory read, answered by a meta replica after a read barrier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaQuery {
    Directory,
    Workspace(String),
    Workspaces,
    Repos(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaAnswer {
    Directory(Directory),
    Workspace(Option<WorkspaceRecord>),
    Workspaces(Vec<WorkspaceRecord>),
    Repos(Vec<RepoRecord>),
}

impl MetaQuery {
    pub fn answer(&self, view: &StateView) -> Result<MetaAnswer, MetaError> {
        Ok(match self {
            MetaQuery::Directory => MetaAnswer::Directory(read::directory(view)?),
            MetaQuery::Workspace(name) => MetaAnswer::Workspace(read::workspace(view, name)?),
            MetaQuery::Workspaces => MetaAnswer::Workspaces(read::workspaces(view)?),
            MetaQuery::Repos(ws) => MetaAnswer::Repos(read::repos(view, ws)?),
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
