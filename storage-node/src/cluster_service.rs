//! The `Cluster` gRPC service: the directory as the router and operators
//! see it, and the node-to-node steps of moving a replica.
//!
//! Any node answers: directory reads and writes go to the meta group
//! through `directory::MetaClient`, leader-only steps are forwarded to the
//! shard's leader, and status is gathered from every node.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use cairn_proto::admin::{ShardReplicaStatus, ShardStatusRequest};
use cairn_proto::cluster::change_replicas_request::Change;
use cairn_proto::cluster::cluster_server::Cluster;
use cairn_proto::cluster::*;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::directory::{DirectoryError, MetaClient};
use crate::meta_state::{
    Directory, MetaAnswer, MetaCall, MetaQuery, MetaRequest, MetaResponse, NodeRecord,
    NodeState as MetaNodeState, ShardRecord, WorkspaceRecord,
};
use crate::mover::Mover;
use crate::peers::{Peers, FORWARDED};
use crate::shard_host::{ProposeError, ShardHost};
use crate::status::not_leader;
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

pub fn directory_status(e: DirectoryError) -> Status {
    match e {
        DirectoryError::Refused(m) => Status::failed_precondition(m),
        other => Status::unavailable(other.to_string()),
    }
}

pub fn propose_status(e: ProposeError) -> Status {
    match e {
        ProposeError::NotLeader { leader_hint } => not_leader(leader_hint),
        ProposeError::UnknownShard(_) => not_leader(None),
        ProposeError::Indeterminate { .. } => {
            Refusal::OutcomeUnknown.into_status(format!("outcome unknown, check and retry: {e}"))
        }
        ProposeError::Raft(m) => Status::unavailable(m),
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

    /// Every live node's view of its replicas (errors per node).
    async fn gather(
        &self,
        d: &Directory,
    ) -> BTreeMap<u64, Result<Vec<ShardReplicaStatus>, String>> {
        let calls = d
            .nodes
            .iter()
            .filter(|n| n.state != MetaNodeState::Removed)
            .map(|n| {
                let peers = self.inner.peers.clone();
                let (id, addr) = (n.id, n.addr.clone());
                async move {
                    let result = async {
                        let mut client = peers.admin(&addr)?;
                        let mut request = Request::new(ShardStatusRequest {
                            include_meta: true,
                            ..Default::default()
                        });
                        request.set_timeout(Duration::from_secs(5));
                        Ok::<_, Status>(client.shard_status(request).await?.into_inner().replicas)
                    }
                    .await
                    .map_err(|s| s.message().to_owned());
                    (id, result)
                }
            });
        futures::future::join_all(calls).await.into_iter().collect()
    }
}

type MoveStream = ReceiverStream<Result<MoveProgress, Status>>;

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn resolve_workspace(
        &self,
        request: Request<ResolveWorkspaceRequest>,
    ) -> Result<Response<ResolveWorkspaceResponse>, Status> {
        let name = request.into_inner().workspace;
        let (_, dir) = self.replicated()?;
        let record = dir
            .workspace(&name)
            .await
            .map_err(directory_status)?
            .ok_or_else(|| Status::not_found(format!("workspace {name} not found")))?;
        let d = self.directory().await?;
        let shard = d.shard(record.shard).ok_or_else(|| {
            Status::internal(format!(
                "workspace {name} is on unknown shard {}",
                record.shard
            ))
        })?;
        let replicas = shard
            .replicas
            .iter()
            .filter_map(|id| d.node(*id).map(node_msg))
            .collect();
        Ok(Response::new(ResolveWorkspaceResponse {
            workspace: Some(workspace_msg(&record)),
            placement: Some(ShardPlacement {
                shard_id: shard.id,
                replicas: shard.replicas.clone(),
                epoch: shard.epoch,
            }),
            replicas,
            map_epoch: d.epoch,
        }))
    }

    async fn create_workspace(
        &self,
        request: Request<CreateWorkspaceRequest>,
    ) -> Result<Response<Workspace>, Status> {
        let name = request.into_inner().name;
        crate::names::validate("workspace", &crate::names::canonical(&name))
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (_, dir) = self.replicated()?;
        let record = dir
            .create_workspace(&name)
            .await
            .map_err(directory_status)?;
        Ok(Response::new(workspace_msg(&record)))
    }

    async fn delete_workspace(
        &self,
        request: Request<DeleteWorkspaceRequest>,
    ) -> Result<Response<DeleteWorkspaceResponse>, Status> {
        let asked = request.into_inner().name;
        let (_, dir) = self.replicated()?;
        // Entries name the workspace by its stored key.
        let name = match dir.workspace(&asked).await.map_err(directory_status)? {
            Some(record) => record.name,
            None => return Err(Status::not_found(format!("workspace {asked} not found"))),
        };
        dir.forget(&asked);
        match dir
            .write(MetaRequest::DeleteWorkspace { name: name.clone() })
            .await
        {
            Ok(_) => {}
            Err(DirectoryError::Refused(m)) if m.ends_with("not found") => {
                return Err(Status::not_found(m))
            }
            Err(e) => return Err(directory_status(e)),
        }
        dir.forget(&name);
        Ok(Response::new(DeleteWorkspaceResponse {}))
    }

    async fn list_workspaces(
        &self,
        _request: Request<ListWorkspacesRequest>,
    ) -> Result<Response<ListWorkspacesResponse>, Status> {
        let (_, dir) = self.replicated()?;
        match dir
            .read(MetaQuery::Workspaces)
            .await
            .map_err(directory_status)?
        {
            MetaAnswer::Workspaces(list) => Ok(Response::new(ListWorkspacesResponse {
                workspaces: list.iter().map(workspace_msg).collect(),
            })),
            other => Err(Status::internal(format!("unexpected answer {other:?}"))),
        }
    }

    async fn cluster_status(
        &self,
        _request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        let (host, _) = self.replicated()?;
        let d = self.directory().await?;
        let reports = self.gather(&d).await;
        let shards = d
            .shards
            .iter()
            .map(|shard| shard_report(shard, &reports, &d))
            .collect();
        let meta = d.meta.as_ref().map(|m| shard_report(m, &reports, &d));
        let (meta_voters, meta_leader) = match &meta {
            Some(m) if !m.voters.is_empty() => (m.voters.clone(), m.leader_id),
            _ => (
                host.meta_nodes(),
                host.leader(crate::shard_host::META_GROUP).unwrap_or(0),
            ),
        };
        Ok(Response::new(ClusterStatusResponse {
            map_epoch: d.epoch,
            nodes: d.nodes.iter().map(node_msg).collect(),
            shards,
            meta_voters,
            meta_leader,
            meta,
        }))
    }

    async fn add_node(&self, request: Request<AddNodeRequest>) -> Result<Response<Node>, Status> {
        let AddNodeRequest { id, addr } = request.into_inner();
        let (_, dir) = self.replicated()?;
        if id == 0 || addr.trim().is_empty() {
            return Err(Status::invalid_argument(
                "a node needs a non-zero id and an address",
            ));
        }
        // The node must be up and be who the operator says.
        let mut client = self.inner.peers.cluster(&addr)?;
        let mut ask = Request::new(NodeIdentityRequest {});
        ask.set_timeout(Duration::from_secs(5));
        let identity = client
            .node_identity(ask)
            .await
            .map_err(|s| {
                Status::failed_precondition(format!(
                    "node at {addr} does not answer: {}",
                    s.message()
                ))
            })?
            .into_inner();
        if identity.node_id != id {
            return Err(Status::failed_precondition(format!(
                "the node at {addr} is node {}, not {id}",
                identity.node_id
            )));
        }
        match dir
            .write(MetaRequest::AddNode { id, addr })
            .await
            .map_err(directory_status)?
        {
            MetaResponse::Node(n) => Ok(Response::new(node_msg(&n))),
            other => Err(Status::internal(format!("unexpected answer {other:?}"))),
        }
    }

    async fn drain_node(
        &self,
        request: Request<DrainNodeRequest>,
    ) -> Result<Response<Node>, Status> {
        let id = request.into_inner().id;
        self.set_node_state(id, MetaNodeState::Draining).await
    }

    async fn remove_node(
        &self,
        request: Request<RemoveNodeRequest>,
    ) -> Result<Response<Node>, Status> {
        let id = request.into_inner().id;
        self.set_node_state(id, MetaNodeState::Removed).await
    }

    type MoveReplicaStream = MoveStream;

    async fn move_replica(
        &self,
        request: Request<MoveReplicaRequest>,
    ) -> Result<Response<Self::MoveReplicaStream>, Status> {
        let MoveReplicaRequest {
            shard_id,
            from_node,
            to_node,
        } = request.into_inner();
        let mover = self.mover()?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        // The move goes on if the caller goes away: every step is
        // resumable, and stopping halfway gains nothing.
        tokio::spawn(async move {
            let report = tx.clone();
            let result = mover
                .run(shard_id, from_node, to_node, move |p| {
                    let _ = report.try_send(Ok(p));
                })
                .await;
            if let Err(status) = result {
                tracing::warn!(shard = shard_id, from_node, to_node, error = %status.message(), "move stopped");
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn transfer_shard_leader(
        &self,
        request: Request<TransferShardLeaderRequest>,
    ) -> Result<Response<TransferShardLeaderResponse>, Status> {
        let forwarded = request.metadata().contains_key(FORWARDED);
        let TransferShardLeaderRequest { shard_id, to_node } = request.into_inner();
        let (host, _) = self.replicated()?;
        if forwarded || (host.hosts(shard_id) && host.leader(shard_id) == Some(host.node_id())) {
            host.transfer_leader(shard_id, to_node)
                .await
                .map_err(propose_status)?;
            return Ok(Response::new(TransferShardLeaderResponse {}));
        }
        let candidates = self.mover()?.shard_nodes(shard_id).await?;
        self.inner
            .peers
            .transfer_leader(&candidates, shard_id, to_node)
            .await
            .map(|()| Response::new(TransferShardLeaderResponse {}))
    }

    async fn verify_shard(
        &self,
        request: Request<VerifyShardRequest>,
    ) -> Result<Response<VerifyShardResponse>, Status> {
        let request = request.into_inner();
        let mover = self.mover()?;
        mover.verify(request).await.map(Response::new)
    }

    async fn open_replica(
        &self,
        request: Request<OpenReplicaRequest>,
    ) -> Result<Response<OpenReplicaResponse>, Status> {
        let OpenReplicaRequest { shard_id, members } = request.into_inner();
        let (host, _) = self.replicated()?;
        let members: Vec<(u64, String)> = members.into_iter().map(|n| (n.id, n.addr)).collect();
        host.open_replica(shard_id, &members)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(OpenReplicaResponse {}))
    }

    async fn close_replica(
        &self,
        request: Request<CloseReplicaRequest>,
    ) -> Result<Response<CloseReplicaResponse>, Status> {
        let shard = request.into_inner().shard_id;
        let (host, _) = self.replicated()?;
        host.close_replica(shard).await.map_err(propose_status)?;
        Ok(Response::new(CloseReplicaResponse {}))
    }

    async fn change_replicas(
        &self,
        request: Request<ChangeReplicasRequest>,
    ) -> Result<Response<ChangeReplicasResponse>, Status> {
        let ChangeReplicasRequest { shard_id, change } = request.into_inner();
        let (host, _) = self.replicated()?;
        match change {
            Some(Change::AddLearner(node)) => host
                .add_learner(shard_id, node.id, node.addr)
                .await
                .map_err(propose_status)?,
            Some(Change::SetVoters(set)) => {
                let voters: BTreeSet<u64> = set.voters.into_iter().collect();
                if voters.is_empty() {
                    return Err(Status::invalid_argument("a shard needs at least one voter"));
                }
                host.set_voters(shard_id, voters)
                    .await
                    .map_err(propose_status)?
            }
            None => return Err(Status::invalid_argument("no change given")),
        }
        let (voters, learners) = host.members(shard_id).map_err(propose_status)?;
        Ok(Response::new(ChangeReplicasResponse { voters, learners }))
    }

    async fn replication_progress(
        &self,
        request: Request<ReplicationProgressRequest>,
    ) -> Result<Response<ReplicationProgressResponse>, Status> {
        let shard = request.into_inner().shard_id;
        let (host, _) = self.replicated()?;
        let p = host.replication_progress(shard).map_err(propose_status)?;
        Ok(Response::new(ReplicationProgressResponse {
            leader_id: p.leader,
            last_log_index: p.last_log_index,
            matched: p
                .matched
                .iter()
                .map(|(node, matched)| MatchedIndex {
                    node_id: *node,
                    matched: *matched,
                })
                .collect(),
            voters: p.voters,
            learners: p.learners,
        }))
    }

    async fn node_identity(
        &self,
        _request: Request<NodeIdentityRequest>,
    ) -> Result<Response<NodeIdentityResponse>, Status> {
        let (host, _) = self.replicated()?;
        Ok(Response::new(NodeIdentityResponse {
            node_id: host.node_id(),
            shards: host.shards(),
        }))
    }

    async fn meta_call(
        &self,
        request: Request<MetaCallRequest>,
    ) -> Result<Response<MetaCallResponse>, Status> {
        let (host, dir) = self.replicated()?;
        if !host.hosts(crate::shard_host::META_GROUP) {
            // "Not me": the hint names a meta node, which knows the leader.
            return Err(Refusal::NotLeader {
                hint: dir.meta_hint(),
            }
            .into_status("not a meta node"));
        }
        let call: MetaCall = postcard::from_bytes(&request.into_inner().request)
            .map_err(|e| Status::invalid_argument(format!("bad directory call: {e}")))?;
        match dir.serve_local(call).await {
            Ok(reply) => {
                let bytes = postcard::to_allocvec(&reply)
                    .map_err(|e| Status::internal(format!("encoding a directory reply: {e}")))?;
                Ok(Response::new(MetaCallResponse {
                    response: bytes.into(),
                }))
            }
            Err(ProposeError::NotLeader { leader_hint }) => Err(Refusal::NotLeader {
                hint: leader_hint.map(|(_, a)| a),
            }
            .into_status("not the meta leader")),
            Err(e) => Err(Status::unavailable(e.to_string())),
        }
    }
}

impl ClusterService {
    async fn set_node_state(
        &self,
        id: u64,
        state: MetaNodeState,
    ) -> Result<Response<Node>, Status> {
        let (_, dir) = self.replicated()?;
        match dir
            .write(MetaRequest::SetNodeState { id, state })
            .await
            .map_err(directory_status)?
        {
            MetaResponse::Node(n) => Ok(Response::new(node_msg(&n))),
            other => Err(Status::internal(format!("unexpected answer {other:?}"))),
        }
    }
}

/// One shard's (or the meta group's) report from every node's answers.
fn shard_report(
    shard: &ShardRecord,
    reports: &BTreeMap<u64, Result<Vec<ShardReplicaStatus>, String>>,
    d: &Directory,
) -> ShardReport {
    // Every replica this shard has on any node, by node.
    let mut seen: BTreeMap<u64, &ShardReplicaStatus> = BTreeMap::new();
    for (node, result) in reports {
        if let Ok(list) = result {
            if let Some(r) = list.iter().find(|r| r.shard_id == shard.id) {
                seen.insert(*node, r);
            }
        }
    }
    let leader_id = seen
        .values()
        .filter(|r| r.leader_id != 0)
        .max_by_key(|r| r.term)
        .map_or(0, |r| r.leader_id);
    let leader = seen.get(&leader_id).copied();
    let reference = leader.or_else(|| seen.values().max_by_key(|r| r.applied_index).copied());
    let (voters, learners) = reference
        .map(|r| (r.voters.clone(), r.learners.clone()))
        .unwrap_or_default();
    let leader_last = leader.map(|r| r.last_log_index);
    let mut nodes: BTreeSet<u64> = shard.replicas.iter().copied().collect();
    nodes.extend(voters.iter().copied());
    nodes.extend(learners.iter().copied());
    let replicas = nodes
        .iter()
        .map(|node| match seen.get(node) {
            Some(r) => ReplicaReport {
                node_id: *node,
                role: if r.leader_id == *node {
                    "leader"
                } else if learners.contains(node) {
                    "learner"
                } else if voters.contains(node) {
                    "follower"
                } else {
                    "leaving"
                }
                .into(),
                applied_index: r.applied_index,
                lag: leader_last.map_or(0, |l| l.saturating_sub(r.applied_index)),
                error: String::new(),
            },
            None => ReplicaReport {
                node_id: *node,
                role: "unreachable".into(),
                applied_index: 0,
                lag: 0,
                error: match reports.get(node) {
                    Some(Err(e)) => e.clone(),
                    Some(Ok(_)) => "replica not open (catching up or moved)".into(),
                    None => "node not registered".into(),
                },
            },
        })
        .collect();
    let repos = reference
        .map(|r| {
            r.repos
                .iter()
                .map(|u| RepoUsage {
                    repo_id: u.repo_id,
                    workspace: u.workspace.clone(),
                    slug: u.slug.clone(),
                    bytes: u.bytes,
                })
                .collect()
        })
        .unwrap_or_default();
    ShardReport {
        placement: Some(ShardPlacement {
            shard_id: shard.id,
            replicas: shard.replicas.clone(),
            epoch: shard.epoch,
        }),
        leader_id,
        voters,
        learners,
        replicas,
        bytes: reference.map_or(0, |r| r.bytes),
        repos,
        moving: d
            .moves
            .iter()
            .find(|m| m.shard == shard.id)
            .map(|m| format!("{} -> {}", m.from, m.to))
            .unwrap_or_default(),
    }
}
