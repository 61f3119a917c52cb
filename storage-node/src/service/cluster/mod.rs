//! The `Cluster` gRPC service, one file per job: the workspace directory
//! as the router sees it (`directory`), the cluster's state for operators
//! (`report`), operators' changes — nodes, moves, leaders, verification
//! (`membership`) — and the steps nodes ask of each other (`internal`).
//!
//! Any node answers: directory reads and writes go to the meta group
//! through `meta::client::MetaClient`, leader-only steps are forwarded to
//! the shard's leader, and status is gathered from every node.

mod directory;
mod internal;
mod membership;
mod report;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use cairn_proto::admin::{ShardReplicaStatus, ShardStatusRequest};
use cairn_proto::cluster::change_replicas_request::Change;
use cairn_proto::cluster::cluster_server::Cluster;
use cairn_proto::cluster::*;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::cluster::mover::Mover;
use crate::cluster::peers::{Peers, FORWARDED};
use crate::host::{ProposeError, ShardHost};
use crate::meta::client::{DirectoryError, MetaClient};
use crate::meta::state::{
    Directory, MetaAnswer, MetaCall, MetaQuery, MetaRequest, MetaResponse, NodeRecord,
    NodeState as MetaNodeState, ShardRecord, WorkspaceRecord,
};
use crate::status::{directory_status, propose_status};
use cairn_proto::routing::Refusal;

pub fn node_state(state: MetaNodeState) -> NodeState {
    match state {
        MetaNodeState::Active => NodeState::Active,
        MetaNodeState::Draining => NodeState::Draining,
        MetaNodeState::Removed => NodeState::Removed,
    }
}

pub fn node_msg(n: &NodeRecord) -> Node {
    Node {
        id: n.id,
        addr: n.addr.clone(),
        state: node_state(n.state) as i32,
    }
}

fn workspace_msg(w: &WorkspaceRecord) -> Workspace {
    Workspace {
        id: w.id,
        name: w.name.clone(),
        shard_id: w.shard,
    }
}

/// What a node needs to answer `Cluster` calls.
#[derive(Clone)]
pub struct ClusterService {
    inner: Arc<Inner>,
}

struct Inner {
    host: Arc<ShardHost>,
    directory: Arc<MetaClient>,
    peers: Peers,
    /// Pause after each move step (tests only; zero otherwise).
    move_step_pause: Duration,
}

impl ClusterService {
    pub fn new(
        host: Arc<ShardHost>,
        directory: Arc<MetaClient>,
        move_step_pause: Duration,
    ) -> Self {
        ClusterService {
            inner: Arc::new(Inner {
                host,
                directory,
                peers: Peers::default(),
                move_step_pause,
            }),
        }
    }

    fn replicated(&self) -> Result<(&Arc<ShardHost>, &Arc<MetaClient>), Status> {
        Ok((&self.inner.host, &self.inner.directory))
    }

    async fn directory(&self) -> Result<Directory, Status> {
        let (_, dir) = self.replicated()?;
        dir.directory().await.map_err(directory_status)
    }

    fn mover(&self) -> Result<Mover, Status> {
        let (host, dir) = self.replicated()?;
        Ok(Mover::new(
            host.clone(),
            dir.clone(),
            self.inner.peers.clone(),
            self.inner.move_step_pause,
        ))
    }
}

type MoveStream = ReceiverStream<Result<MoveProgress, Status>>;

#[tonic::async_trait]
impl Cluster for ClusterService {
    type MoveReplicaStream = MoveStream;

    async fn resolve_workspace(
        &self,
        request: Request<ResolveWorkspaceRequest>,
    ) -> Result<Response<ResolveWorkspaceResponse>, Status> {
        directory::resolve_workspace(self, request).await
    }

    async fn create_workspace(
        &self,
        request: Request<CreateWorkspaceRequest>,
    ) -> Result<Response<Workspace>, Status> {
        directory::create_workspace(self, request).await
    }

    async fn delete_workspace(
        &self,
        request: Request<DeleteWorkspaceRequest>,
    ) -> Result<Response<DeleteWorkspaceResponse>, Status> {
        directory::delete_workspace(self, request).await
    }

    async fn list_workspaces(
        &self,
        request: Request<ListWorkspacesRequest>,
    ) -> Result<Response<ListWorkspacesResponse>, Status> {
        directory::list_workspaces(self, request).await
    }

    async fn cluster_status(
        &self,
        request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        report::cluster_status(self, request).await
    }

    async fn add_node(&self, request: Request<AddNodeRequest>) -> Result<Response<Node>, Status> {
        membership::add_node(self, request).await
    }

    async fn drain_node(
        &self,
        request: Request<DrainNodeRequest>,
    ) -> Result<Response<Node>, Status> {
        membership::drain_node(self, request).await
    }

    async fn remove_node(
        &self,
        request: Request<RemoveNodeRequest>,
    ) -> Result<Response<Node>, Status> {
        membership::remove_node(self, request).await
    }

    async fn move_replica(
        &self,
        request: Request<MoveReplicaRequest>,
    ) -> Result<Response<Self::MoveReplicaStream>, Status> {
        membership::move_replica(self, request).await
    }

    async fn transfer_shard_leader(
        &self,
        request: Request<TransferShardLeaderRequest>,
    ) -> Result<Response<TransferShardLeaderResponse>, Status> {
        membership::transfer_shard_leader(self, request).await
    }

    async fn verify_shard(
        &self,
        request: Request<VerifyShardRequest>,
    ) -> Result<Response<VerifyShardResponse>, Status> {
        membership::verify_shard(self, request).await
    }

    async fn open_replica(
        &self,
        request: Request<OpenReplicaRequest>,
    ) -> Result<Response<OpenReplicaResponse>, Status> {
        internal::open_replica(self, request).await
    }

    async fn close_replica(
        &self,
        request: Request<CloseReplicaRequest>,
    ) -> Result<Response<CloseReplicaResponse>, Status> {
        internal::close_replica(self, request).await
    }

    async fn change_replicas(
        &self,
        request: Request<ChangeReplicasRequest>,
    ) -> Result<Response<ChangeReplicasResponse>, Status> {
        internal::change_replicas(self, request).await
    }

    async fn replication_progress(
        &self,
        request: Request<ReplicationProgressRequest>,
    ) -> Result<Response<ReplicationProgressResponse>, Status> {
        internal::replication_progress(self, request).await
    }

    async fn node_identity(
        &self,
        request: Request<NodeIdentityRequest>,
    ) -> Result<Response<NodeIdentityResponse>, Status> {
        internal::node_identity(self, request).await
    }

    async fn meta_call(
        &self,
        request: Request<MetaCallRequest>,
    ) -> Result<Response<MetaCallResponse>, Status> {
        internal::meta_call(self, request).await
    }
}
