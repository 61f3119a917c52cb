//! `Cluster` RPCs nodes ask of each other: opening, closing and changing a
//! group's replicas, replication progress, identity, directory calls
//! forwarded to the meta group.

use cairn_proto::cluster::*;
use tonic::{Request, Response, Status};

use super::*;

pub(super) async fn open_replica(
    svc: &ClusterService,
    request: Request<OpenReplicaRequest>,
) -> Result<Response<OpenReplicaResponse>, Status> {
    let OpenReplicaRequest { shard_id, members } = request.into_inner();
    let (host, _) = svc.replicated()?;
    let members: Vec<(u64, String)> = members.into_iter().map(|n| (n.id, n.addr)).collect();
    host.membership()
        .open_replica(shard_id, &members)
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    Ok(Response::new(OpenReplicaResponse {}))
}

pub(super) async fn close_replica(
    svc: &ClusterService,
    request: Request<CloseReplicaRequest>,
) -> Result<Response<CloseReplicaResponse>, Status> {
    let shard = request.into_inner().shard_id;
    let (host, _) = svc.replicated()?;
    host.membership()
        .close_replica(shard)
        .await
        .map_err(propose_status)?;
    Ok(Response::new(CloseReplicaResponse {}))
}

pub(super) async fn change_replicas(
    svc: &ClusterService,
    request: Request<ChangeReplicasRequest>,
) -> Result<Response<ChangeReplicasResponse>, Status> {
    let ChangeReplicasRequest { shard_id, change } = request.into_inner();
    let (host, _) = svc.replicated()?;
    match change {
        Some(Change::AddLearner(node)) => host
            .membership()
            .add_learner(shard_id, node.id, node.addr)
            .await
            .map_err(propose_status)?,
        Some(Change::SetVoters(set)) => {
            let voters: BTreeSet<u64> = set.voters.into_iter().collect();
            if voters.is_empty() {
                return Err(Status::invalid_argument("a shard needs at least one voter"));
            }
            host.membership()
                .set_voters(shard_id, voters)
                .await
                .map_err(propose_status)?
        }
        None => return Err(Status::invalid_argument("no change given")),
    }
    let (voters, learners) = host
        .membership()
        .members(shard_id)
        .map_err(propose_status)?;
    Ok(Response::new(ChangeReplicasResponse { voters, learners }))
}

pub(super) async fn replication_progress(
    svc: &ClusterService,
    request: Request<ReplicationProgressRequest>,
) -> Result<Response<ReplicationProgressResponse>, Status> {
    let shard = request.into_inner().shard_id;
    let (host, _) = svc.replicated()?;
    let p = host
        .membership()
        .replication_progress(shard)
        .map_err(propose_status)?;
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

pub(super) async fn node_identity(
    svc: &ClusterService,
    _request: Request<NodeIdentityRequest>,
) -> Result<Response<NodeIdentityResponse>, Status> {
    let (host, _) = svc.replicated()?;
    Ok(Response::new(NodeIdentityResponse {
        node_id: host.node_id(),
        shards: host.shards(),
    }))
}

pub(super) async fn meta_call(
    svc: &ClusterService,
    request: Request<MetaCallRequest>,
) -> Result<Response<MetaCallResponse>, Status> {
    let (host, dir) = svc.replicated()?;
    if !host.hosts(crate::host::META_GROUP) {
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
