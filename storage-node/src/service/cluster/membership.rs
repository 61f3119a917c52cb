//! `Cluster` RPCs operators run: adding, draining and removing nodes,
//! moving a replica, handing a shard's leadership over, verifying that
//! replicas agree.

use cairn_proto::cluster::*;
use tonic::{Request, Response, Status};

use super::*;

pub(super) async fn add_node(
    svc: &ClusterService,
    request: Request<AddNodeRequest>,
) -> Result<Response<Node>, Status> {
    let AddNodeRequest { id, addr } = request.into_inner();
    let (_, dir) = svc.replicated()?;
    if id == 0 || addr.trim().is_empty() {
        return Err(Status::invalid_argument(
            "a node needs a non-zero id and an address",
        ));
    }
    // The node must be up and be who the operator says.
    let mut client = svc.inner.peers.cluster(&addr)?;
    let mut ask = Request::new(NodeIdentityRequest {});
    ask.set_timeout(Duration::from_secs(5));
    let identity = client
        .node_identity(ask)
        .await
        .map_err(|s| {
            Status::failed_precondition(format!("node at {addr} does not answer: {}", s.message()))
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

pub(super) async fn drain_node(
    svc: &ClusterService,
    request: Request<DrainNodeRequest>,
) -> Result<Response<Node>, Status> {
    let id = request.into_inner().id;
    set_node_state(svc, id, MetaNodeState::Draining).await
}

pub(super) async fn remove_node(
    svc: &ClusterService,
    request: Request<RemoveNodeRequest>,
) -> Result<Response<Node>, Status> {
    let id = request.into_inner().id;
    set_node_state(svc, id, MetaNodeState::Removed).await
}

pub(super) async fn move_replica(
    svc: &ClusterService,
    request: Request<MoveReplicaRequest>,
) -> Result<Response<MoveStream>, Status> {
    let MoveReplicaRequest {
        shard_id,
        from_node,
        to_node,
    } = request.into_inner();
    let mover = svc.mover()?;
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

pub(super) async fn transfer_shard_leader(
    svc: &ClusterService,
    request: Request<TransferShardLeaderRequest>,
) -> Result<Response<TransferShardLeaderResponse>, Status> {
    let forwarded = request.metadata().contains_key(FORWARDED);
    let TransferShardLeaderRequest { shard_id, to_node } = request.into_inner();
    let (host, _) = svc.replicated()?;
    if forwarded || (host.hosts(shard_id) && host.leader(shard_id) == Some(host.node_id())) {
        host.membership()
            .transfer_leader(shard_id, to_node)
            .await
            .map_err(propose_status)?;
        return Ok(Response::new(TransferShardLeaderResponse {}));
    }
    let candidates = svc.mover()?.shard_nodes(shard_id).await?;
    svc.inner
        .peers
        .transfer_leader(&candidates, shard_id, to_node)
        .await
        .map(|()| Response::new(TransferShardLeaderResponse {}))
}

pub(super) async fn verify_shard(
    svc: &ClusterService,
    request: Request<VerifyShardRequest>,
) -> Result<Response<VerifyShardResponse>, Status> {
    let request = request.into_inner();
    let mover = svc.mover()?;
    mover.verify(request).await.map(Response::new)
}

async fn set_node_state(
    svc: &ClusterService,
    id: u64,
    state: MetaNodeState,
) -> Result<Response<Node>, Status> {
    let (_, dir) = svc.replicated()?;
    match dir
        .write(MetaRequest::SetNodeState { id, state })
        .await
        .map_err(directory_status)?
    {
        MetaResponse::Node(n) => Ok(Response::new(node_msg(&n))),
        other => Err(Status::internal(format!("unexpected answer {other:?}"))),
    }
}
