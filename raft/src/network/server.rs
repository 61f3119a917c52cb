//! Receiving side: the tonic `Raft` service that dispatches each message
//! to the raft instance of the group it names.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use cairn_proto::raft::raft_server::{Raft as RaftRpc, RaftServer};
use cairn_proto::raft::{GroupMessage, GroupReply, SnapshotChunk};
use futures::future::BoxFuture;
use futures::FutureExt;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Request, Response, Status, Streaming};
use tracing::instrument;

use crate::db::RaftDb;
use crate::keys::GroupId;
use crate::snapshot::SnapshotFile;
use crate::types::{NodeId, RaftStateMachine, Snapshot, SnapshotMeta, TypeConfig, Vote};

/// What the service needs from one group's raft instance. Object-safe so
/// groups with different state machines (meta group, shards) share one
/// registry.
trait GroupEndpoint: Send + Sync {
    fn append_entries(
        &self,
        rpc: AppendEntriesRequest<TypeConfig>,
    ) -> BoxFuture<'_, Result<AppendEntriesResponse<TypeConfig>, String>>;
    fn vote(
        &self,
        rpc: VoteRequest<TypeConfig>,
    ) -> BoxFuture<'_, Result<VoteResponse<TypeConfig>, String>>;
    fn pre_vote(
        &self,
        rpc: VoteRequest<TypeConfig>,
    ) -> BoxFuture<'_, Result<VoteResponse<TypeConfig>, String>>;
    fn install_full_snapshot(
        &self,
        vote: Vote,
        snapshot: Snapshot<SnapshotFile>,
    ) -> BoxFuture<'_, Result<SnapshotResponse<TypeConfig>, String>>;
    fn transfer_leader(
        &self,
        req: TransferLeaderRequest<TypeConfig>,
    ) -> BoxFuture<'_, Result<TransferLeaderResponse<TypeConfig>, String>>;
    fn read_index(&self) -> BoxFuture<'_, ReadIndexReply>;
}

// Errors become strings here because the only error a raft instance
// returns for these calls is "fatal: stopped", which the service reports
// as `Unavailable` either way.
impl<SM> GroupEndpoint for openraft::Raft<TypeConfig, SM>
where
    SM: RaftStateMachine<TypeConfig, SnapshotData = SnapshotFile>,
{
    fn append_entries(
        &self,
        rpc: AppendEntriesRequest<TypeConfig>,
    ) -> BoxFuture<'_, Result<AppendEntriesResponse<TypeConfig>, String>> {
        async move {
            openraft::Raft::append_entries(self, rpc)
                .await
                .map_err(|e| e.to_string())
        }
        .boxed()
    }

    fn vote(
        &self,
        rpc: VoteRequest<TypeConfig>,
    ) -> BoxFuture<'_, Result<VoteResponse<TypeConfig>, String>> {
        async move {
            openraft::Raft::vote(self, rpc)
                .await
                .map_err(|e| e.to_string())
        }
        .boxed()
    }

    fn pre_vote(
        &self,
        rpc: VoteRequest<TypeConfig>,
    ) -> BoxFuture<'_, Result<VoteResponse<TypeConfig>, String>> {
        async move {
            openraft::Raft::pre_vote(self, rpc)
                .await
                .map_err(|e| e.to_string())
        }
        .boxed()
    }

    fn install_full_snapshot(
        &self,
        vote: Vote,
        snapshot: Snapshot<SnapshotFile>,
    ) -> BoxFuture<'_, Result<SnapshotResponse<TypeConfig>, String>> {
        async move {
            openraft::Raft::install_full_snapshot(self, vote, snapshot)
                .await
                .map_err(|e| e.to_string())
        }
        .boxed()
    }

    fn transfer_leader(
        &self,
        req: TransferLeaderRequest<TypeConfig>,
    ) -> BoxFuture<'_, Result<TransferLeaderResponse<TypeConfig>, String>> {
        async move {
            openraft::Raft::handle_transfer_leader(self, req)
                .await
                .map_err(|e| e.to_string())
        }
        .boxed()
    }

    fn read_index(&self) -> BoxFuture<'_, ReadIndexReply> {
        async move {
            let confirmed = tokio::time::timeout(
                READ_INDEX_TIMEOUT,
                self.ensure_linearizable(openraft::ReadPolicy::ReadIndex),
            )
            .await;
            match confirmed {
                Ok(Ok(read)) => ReadIndexReply::Index(read.index()),
                Ok(Err(e)) => match e.forward_to_leader() {
                    Some(f) => ReadIndexReply::NotLeader {
                        leader: f.leader_id,
                    },
                    None => ReadIndexReply::Unavailable(e.to_string()),
                },
                Err(_) => ReadIndexReply::Unavailable(format!(
                    "leadership not confirmed by a quorum within {READ_INDEX_TIMEOUT:?}"
                )),
            }
        }
        .boxed()
    }
}

/// How long a leader may take to confirm its leadership with a quorum for
/// a read index before it answers `Unavailable`: a leader cut off from its
/// quorum would otherwise keep the reader waiting until it steps down.
pub const READ_INDEX_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// A leader's answer to `ReadIndex`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub enum ReadIndexReply {
    /// Confirmed leader; a replica that has applied this index may serve a
    /// linearizable read.
    Index(u64),
    /// Not the leader; the one it knows of, if any.
    NotLeader { leader: Option<NodeId> },
    /// Leader, but could not confirm it in time (no quorum, shutting down).
    Unavailable(String),
}

/// The raft instances a node hosts, by group. Groups come and go at run
/// time (a shard replica is added or moved away); cheap to clone.
#[derive(Clone, Default)]
pub struct GroupRegistry {
    groups: Arc<RwLock<HashMap<GroupId, Arc<dyn GroupEndpoint>>>>,
}

impl std::fmt::Debug for GroupRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupRegistry")
            .field("groups", &self.groups())
            .finish()
    }
}

impl GroupRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Routes messages for `group` to `raft`. Returns whether an earlier
    /// instance of the group was replaced.
    pub fn register<SM>(&self, group: GroupId, raft: openraft::Raft<TypeConfig, SM>) -> bool
    where
        SM: RaftStateMachine<TypeConfig, SnapshotData = SnapshotFile>,
    {
        self.write().insert(group, Arc::new(raft)).is_some()
    }

    /// Stops routing messages to `group`; later messages get `NotFound`.
    /// Returns whether the group was registered.
    pub fn unregister(&self, group: GroupId) -> bool {
        self.write().remove(&group).is_some()
    }

    /// Whether `group` is registered.
    pub fn contains(&self, group: GroupId) -> bool {
        self.read().contains_key(&group)
    }

    /// The registered groups, sorted.
    pub fn groups(&self) -> Vec<GroupId> {
        let mut groups: Vec<_> = self.read().keys().copied().collect();
        groups.sort();
        groups
    }

    fn get(&self, group: GroupId) -> Result<Arc<dyn GroupEndpoint>, Status> {
        self.read().get(&group).cloned().ok_or_else(|| {
            // NotFound (not Unavailable): the node is up but does not host
            // the group, which the sender treats as "unreachable for now".
            Status::not_found(format!("raft group {group} is not hosted on this node"))
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<GroupId, Arc<dyn GroupEndpoint>>> {
        self.groups.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<GroupId, Arc<dyn GroupEndpoint>>> {
        self.groups.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// The gRPC `Raft` service of one node.
#[derive(Debug, Clone)]
pub struct RaftService {
    node: NodeId,
    db: RaftDb,
    registry: GroupRegistry,
    next_incoming: Arc<AtomicU64>,
}

impl RaftService {
    /// Service of node `node`, receiving snapshots into `db`'s snapshot
    /// directories and dispatching to the groups in `registry`.
    pub fn new(node: NodeId, db: RaftDb, registry: GroupRegistry) -> Self {
        Self {
            node,
            db,
            registry,
            next_incoming: Arc::default(),
        }
    }

    /// The registry this service dispatches to.
    pub fn registry(&self) -> &GroupRegistry {
        &self.registry
    }

    /// The tonic server wrapper, ready for `Server::add_service`.
    pub fn into_server(self) -> RaftServer<Self> {
        RaftServer::new(self)
    }

    /// A new file in the group's snapshot directory to receive into. Being
    /// in that directory lets the state machine adopt it by rename; a
    /// leftover from a crash is removed when the group is opened next.
    fn incoming_file(&self, group: GroupId) -> Result<SnapshotFile, Status> {
        let dir = self.db.group_snapshot_dir(group);
        std::fs::create_dir_all(&dir).map_err(|e| {
            tracing::warn!(%group, error = %e, "cannot create snapshot directory");
            Status::internal("cannot store the incoming snapshot")
        })?;
        let n = self.next_incoming.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        SnapshotFile::create_incoming(dir.join(format!("recv-{nanos:x}-{n}.snap"))).map_err(|e| {
            tracing::warn!(%group, error = %e, "cannot create incoming snapshot file");
            Status::internal("cannot store the incoming snapshot")
        })
    }
}

fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, Status> {
    postcard::from_bytes(bytes)
        .map_err(|e| Status::invalid_argument(format!("cannot decode {what}: {e}")))
}

fn reply<T: Serialize>(value: &T) -> Result<Response<GroupReply>, Status> {
    let payload = postcard::to_allocvec(value)
        .map_err(|e| Status::internal(format!("cannot encode raft response: {e}")))?;
    Ok(Response::new(GroupReply {
        payload: Bytes::from(payload),
    }))
}

fn stopped(group: GroupId, e: String) -> Status {
    // Safe to retry: the message had no effect on a stopped group.
    Status::unavailable(format!("raft group {group} is stopped: {e}"))
}

/// Runs a blocking file operation off the async executor.
async fn blocking_io<T, F>(group: GroupId, f: F) -> Result<T, Status>
where
    T: Send + 'static,
    F: FnOnce() -> std::io::Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| {
            tracing::warn!(%group, error = %e, "snapshot write task failed");
            Status::internal("snapshot write task failed")
        })?
        .map_err(|e| {
            tracing::warn!(%group, error = %e, "cannot write incoming snapshot");
            Status::internal("cannot store the incoming snapshot")
        })
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    #[instrument(level = "debug", skip_all, fields(node = self.node, group = request.get_ref().group))]
    async fn append_entries(
        &self,
        request: Request<GroupMessage>,
    ) -> Result<Response<GroupReply>, Status> {
        let msg = request.into_inner();
        let group = GroupId(msg.group);
        let raft = self.registry.get(group)?;
        let rpc = decode(&msg.payload, "append-entries request")?;
        let resp = raft
            .append_entries(rpc)
            .await
            .map_err(|e| stopped(group, e))?;
        reply(&resp)
    }

    #[instrument(level = "debug", skip_all, fields(node = self.node, group = request.get_ref().group))]
    async fn vote(&self, request: Request<GroupMessage>) -> Result<Response<GroupReply>, Status> {
        let msg = request.into_inner();
        let group = GroupId(msg.group);
        let raft = self.registry.get(group)?;
        let rpc = decode(&msg.payload, "vote request")?;
        let resp = raft.vote(rpc).await.map_err(|e| stopped(group, e))?;
        reply(&resp)
    }

    #[instrument(level = "debug", skip_all, fields(node = self.node, group = request.get_ref().group))]
    async fn pre_vote(
        &self,
        request: Request<GroupMessage>,
    ) -> Result<Response<GroupReply>, Status> {
        let msg = request.into_inner();
        let group = GroupId(msg.group);
        let raft = self.registry.get(group)?;
        let rpc = decode(&msg.payload, "pre-vote request")?;
        let resp = raft.pre_vote(rpc).await.map_err(|e| stopped(group, e))?;
        reply(&resp)
    }

    #[instrument(level = "debug", skip_all, fields(node = self.node, group))]
    async fn install_snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<GroupReply>, Status> {
        let mut stream = request.into_inner();
        let mut chunk = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        let group = GroupId(chunk.group);
        tracing::Span::current().record("group", group.0);
        let raft = self.registry.get(group)?;
        let (vote, meta): (Vote, SnapshotMeta) = decode(&chunk.header, "snapshot header")?;
        let mut file = self.incoming_file(group)?;
        let mut received: u64 = 0;
        loop {
            if chunk.group != group.0 {
                return Err(Status::invalid_argument(
                    "snapshot chunks name different groups",
                ));
            }
            if !chunk.data.is_empty() {
                received += chunk.data.len() as u64;
                let data = chunk.data;
                file = blocking_io(group, move || {
                    file.write_all(&data)?;
                    Ok(file)
                })
                .await?;
            }
            if chunk.done {
                break;
            }
            // A stream that ends without `done` is a broken transfer; the
            // incoming file is removed when dropped.
            chunk = stream.message().await?.ok_or_else(|| {
                Status::invalid_argument("snapshot stream ended before its last chunk")
            })?;
        }
        let file = blocking_io(group, move || {
            file.flush()?;
            file.file_mut().sync_all()?;
            Ok(file)
        })
        .await?;
        tracing::debug!(bytes = received, last = ?meta.last_log_id, "snapshot received");
        let resp = raft
            .install_full_snapshot(
                vote,
                Snapshot {
                    meta,
                    snapshot: file,
                },
            )
            .await
            .map_err(|e| stopped(group, e))?;
        reply(&resp)
    }

    #[instrument(level = "debug", skip_all, fields(node = self.node, group = request.get_ref().group))]
    async fn read_index(
        &self,
        request: Request<GroupMessage>,
    ) -> Result<Response<GroupReply>, Status> {
        let group = GroupId(request.into_inner().group);
        let raft = self.registry.get(group)?;
        reply(&raft.read_index().await)
    }

    #[instrument(level = "debug", skip_all, fields(node = self.node, group = request.get_ref().group))]
    async fn transfer_leader(
        &self,
        request: Request<GroupMessage>,
    ) -> Result<Response<GroupReply>, Status> {
        let msg = request.into_inner();
        let group = GroupId(msg.group);
        let raft = self.registry.get(group)?;
        let req = decode(&msg.payload, "transfer-leader request")?;
        let resp = raft
            .transfer_leader(req)
            .await
            .map_err(|e| stopped(group, e))?;
        reply(&resp)
    }
}
