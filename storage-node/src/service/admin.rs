//! The `Admin` gRPC service: create, delete, get and list repositories;
//! the status of this node's shard replicas, leader transfer, and (when the
//! config allows it) fault injection for partition tests.

use std::sync::Arc;

use cairn_proto::admin::admin_server::Admin;
use cairn_proto::admin::{
    AllowRejoinRequest, AllowRejoinResponse, CompactShardRequest, CompactShardResponse,
    CreateRepositoryRequest, DeleteRepositoryRequest, DeleteRepositoryResponse,
    GetRepositoryRequest, ListRepositoriesRequest, ListRepositoriesResponse, RepoBytes, Repository,
    SetFaultsRequest, SetFaultsResponse, ShardReplicaStatus, ShardStatusRequest,
    ShardStatusResponse, TransferLeaderRequest, TransferLeaderResponse,
};
use cairn_proto::admin::{
    BranchRestrictionResponse, BranchRestrictionsRequest, BranchRestrictionsResponse,
    DeleteBranchRestrictionRequest, DeleteBranchRestrictionResponse, SetBranchRestrictionRequest,
    UpdateRepositoryRequest,
};
use cairn_raft::TransportFilter;
use tonic::{Request, Response, Status};

use crate::host::{ProposeError, ShardHost};
use crate::repo::RepoRecord;
use crate::repos::ReplicatedStore;
use crate::status::{not_leader, status_of};

pub struct AdminService {
    repos: Arc<ReplicatedStore>,
    host: Arc<ShardHost>,
    /// Present only when the node's config enables fault injection.
    faults: Option<TransportFilter>,
}

impl AdminService {
    /// With `faults`, `SetFaults` works; without, it is refused.
    pub fn new(
        repos: Arc<ReplicatedStore>,
        host: Arc<ShardHost>,
        faults: Option<TransportFilter>,
    ) -> Self {
        AdminService {
            repos,
            host,
            faults,
        }
    }
}

/// Bounds building a snapshot and purging the log behind it.
const COMPACT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

fn propose_status(e: ProposeError) -> Status {
    match e {
        ProposeError::NotLeader { leader_hint } => not_leader(leader_hint),
        ProposeError::UnknownShard(s) => Status::not_found(format!("shard {s} is not hosted here")),
        other => Status::unavailable(other.to_string()),
    }
}

fn json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, Status> {
    serde_json::to_vec(v).map_err(|e| Status::internal(format!("encoding: {e}")))
}

/// The identity the router authenticated (see `metadata::ACTOR`).
pub fn actor_of<T>(request: &Request<T>) -> Option<String> {
    request
        .metadata()
        .get(cairn_proto::metadata::ACTOR)
        .and_then(|v| v.to_str().ok())
        .filter(|a| !a.is_empty() && a.len() <= 128)
        .map(str::to_owned)
}

fn to_proto(r: RepoRecord) -> Repository {
    Repository {
        id: r.id,
        workspace: r.workspace,
        slug: r.slug,
        head: r.head,
        is_private: r.is_private,
        description: r.description,
        created_at: r.created_at,
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    #[tracing::instrument(skip_all)]
    async fn create_repository(
        &self,
        request: Request<CreateRepositoryRequest>,
    ) -> Result<Response<Repository>, Status> {
        let actor = actor_of(&request);
        let r = request.into_inner();
        let rec = Box::pin(self.repos.create_repo_as(
            &r.workspace,
            &r.slug,
            r.is_private,
            &r.description,
            actor,
        ))
        .await
        .map_err(status_of)?;
        tracing::info!(repo = rec.id, workspace = %rec.workspace, slug = %rec.slug, "repository created");
        Ok(Response::new(to_proto(rec)))
    }

    #[tracing::instrument(skip_all)]
    async fn update_repository(
        &self,
        request: Request<UpdateRepositoryRequest>,
    ) -> Result<Response<Repository>, Status> {
        let actor = actor_of(&request);
        let r = request.into_inner();
        let rec = Box::pin(self.repos.update_repo_as(
            &r.workspace,
            &r.slug,
            (r.is_private, r.description, r.head),
            actor,
        ))
        .await
        .map_err(status_of)?;
        Ok(Response::new(to_proto(rec)))
    }

    #[tracing::instrument(skip_all)]
    async fn delete_repository(
        &self,
        request: Request<DeleteRepositoryRequest>,
    ) -> Result<Response<DeleteRepositoryResponse>, Status> {
        let actor = actor_of(&request);
        let r = request.into_inner();
        Box::pin(self.repos.delete_repo_as(&r.workspace, &r.slug, actor))
            .await
            .map_err(status_of)?;
        Ok(Response::new(DeleteRepositoryResponse {}))
    }

    #[tracing::instrument(skip_all)]
    async fn get_repository(
        &self,
        request: Request<GetRepositoryRequest>,
    ) -> Result<Response<Repository>, Status> {
        let r = request.into_inner();
        let rec = Box::pin(self.repos.require_repo(&r.workspace, &r.slug))
            .await
            .map_err(status_of)?;
        Ok(Response::new(to_proto(rec)))
    }

    #[tracing::instrument(skip_all)]
    async fn list_repositories(
        &self,
        request: Request<ListRepositoriesRequest>,
    ) -> Result<Response<ListRepositoriesResponse>, Status> {
        let r = request.into_inner();
        let recs = Box::pin(self.repos.list_repos(&r.workspace))
            .await
            .map_err(status_of)?;
        Ok(Response::new(ListRepositoriesResponse {
            repositories: recs.into_iter().map(to_proto).collect(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn shard_status(
        &self,
        request: Request<ShardStatusRequest>,
    ) -> Result<Response<ShardStatusResponse>, Status> {
        let host = Arc::clone(&self.host);
        let fetched = host.catchup().packs_fetched();
        let request = request.into_inner();
        let mut ids = request.shard_ids;
        if ids.is_empty() {
            ids = if request.include_meta {
                host.groups()
            } else {
                host.shards()
            };
        }
        let scope = (!request.workspace.is_empty() && !request.slug.is_empty())
            .then_some((request.workspace, request.slug));
        // Scanning a shard's rows is blocking RocksDB work.
        let replicas = tokio::task::spawn_blocking(move || {
            let scope = scope.as_ref().map(|(w, s)| (w.as_str(), s.as_str()));
            ids.into_iter()
                .map(|id| host.replica_status_scoped(id, scope))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| Status::internal(format!("status task failed: {e}")))?
        .map_err(propose_status)?;
        Ok(Response::new(ShardStatusResponse {
            replicas: replicas
                .into_iter()
                .map(|r| ShardReplicaStatus {
                    shard_id: r.shard,
                    node_id: r.node,
                    leader_id: r.leader.unwrap_or(0),
                    term: r.term,
                    applied_index: r.applied_index,
                    last_log_index: r.last_log_index,
                    voters: r.voters,
                    state_checksum: r.state_checksum,
                    pack_checksum: r.pack_checksum,
                    repositories: r.repositories,
                    snapshot_index: r.snapshot_index.unwrap_or(0),
                    purged_index: r.purged_index.unwrap_or(0),
                    packs_fetched: fetched,
                    learners: r.learners,
                    bytes: r.bytes,
                    repos: r
                        .repos
                        .into_iter()
                        .map(|u| RepoBytes {
                            repo_id: u.id,
                            workspace: u.workspace,
                            slug: u.slug,
                            bytes: u.bytes,
                        })
                        .collect(),
                })
                .collect(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn transfer_leader(
        &self,
        request: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        let r = request.into_inner();
        self.host
            .membership()
            .transfer_leader(r.shard_id, r.to_node_id)
            .await
            .map_err(propose_status)?;
        tracing::info!(
            shard = r.shard_id,
            to = r.to_node_id,
            "leadership transfer requested"
        );
        Ok(Response::new(TransferLeaderResponse {}))
    }

    #[tracing::instrument(skip_all)]
    async fn compact_shard(
        &self,
        request: Request<CompactShardRequest>,
    ) -> Result<Response<CompactShardResponse>, Status> {
        let shard = request.into_inner().shard_id;
        let snapshot_index = self
            .host
            .catchup()
            .compact(shard, COMPACT_TIMEOUT)
            .await
            .map_err(propose_status)?;
        tracing::info!(shard, snapshot_index, "shard log compacted");
        Ok(Response::new(CompactShardResponse { snapshot_index }))
    }

    #[tracing::instrument(skip_all)]
    async fn allow_rejoin(
        &self,
        request: Request<AllowRejoinRequest>,
    ) -> Result<Response<AllowRejoinResponse>, Status> {
        let r = request.into_inner();
        self.host
            .membership()
            .allow_rejoin_after_wipe(r.shard_id, r.node_id)
            .await
            .map_err(propose_status)?;
        tracing::warn!(
            shard = r.shard_id,
            node = r.node_id,
            "replica allowed to rejoin with a wiped log"
        );
        Ok(Response::new(AllowRejoinResponse {}))
    }

    #[tracing::instrument(skip_all)]
    async fn set_faults(
        &self,
        request: Request<SetFaultsRequest>,
    ) -> Result<Response<SetFaultsResponse>, Status> {
        let filter = self.faults.as_ref().ok_or_else(|| {
            Status::permission_denied("fault injection is disabled in this node's config")
        })?;
        let peers = request.into_inner().blocked_peers;
        filter.heal();
        filter.block_nodes(peers.iter().copied());
        tracing::warn!(
            ?peers,
            "fault injection: outgoing raft traffic to these peers dropped"
        );
        Ok(Response::new(SetFaultsResponse {}))
    }

    async fn list_branch_restrictions(
        &self,
        request: Request<BranchRestrictionsRequest>,
    ) -> Result<Response<BranchRestrictionsResponse>, Status> {
        let r = request.into_inner();
        let list = Box::pin(self.repos.branch_restrictions(&r.workspace, &r.slug))
            .await
            .map_err(status_of)?;
        Ok(Response::new(BranchRestrictionsResponse {
            restrictions_json: json(&list)?.into(),
        }))
    }

    async fn set_branch_restriction(
        &self,
        request: Request<SetBranchRestrictionRequest>,
    ) -> Result<Response<BranchRestrictionResponse>, Status> {
        let actor = actor_of(&request);
        let r = request.into_inner();
        let restriction = serde_json::from_slice(&r.restriction_json)
            .map_err(|e| Status::invalid_argument(format!("malformed restriction: {e}")))?;
        let stored =
            Box::pin(
                self.repos
                    .set_branch_restriction(&r.workspace, &r.slug, restriction, actor),
            )
            .await
            .map_err(status_of)?;
        match stored {
            Ok(r) => Ok(Response::new(BranchRestrictionResponse {
                restriction_json: json(&r)?.into(),
            })),
            Err(why) if why.starts_with("no such") => Err(Status::not_found(why)),
            Err(why) => Err(Status::invalid_argument(why)),
        }
    }

    async fn delete_branch_restriction(
        &self,
        request: Request<DeleteBranchRestrictionRequest>,
    ) -> Result<Response<DeleteBranchRestrictionResponse>, Status> {
        let actor = actor_of(&request);
        let r = request.into_inner();
        let deleted =
            Box::pin(
                self.repos
                    .delete_branch_restriction(&r.workspace, &r.slug, r.id, actor),
            )
            .await
            .map_err(status_of)?;
        if deleted {
            Ok(Response::new(DeleteBranchRestrictionResponse {}))
        } else {
            Err(Status::not_found("no such branch restriction"))
        }
    }
}
