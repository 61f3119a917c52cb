//! The `Admin` gRPC service: create, delete, get and list repositories.

use cairn_proto::admin::admin_server::Admin;
use cairn_proto::admin::{
    CreateRepositoryRequest, DeleteRepositoryRequest, DeleteRepositoryResponse,
    GetRepositoryRequest, ListRepositoriesRequest, ListRepositoriesResponse, Repository,
};
use tonic::{Request, Response, Status};

use crate::backend::{status_of, RepoBackend};
use crate::repo_store::RepoRecord;

pub struct AdminService {
    backend: RepoBackend,
}

impl AdminService {
    pub fn new(backend: RepoBackend) -> Self {
        AdminService { backend }
    }
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
        let r = request.into_inner();
        let rec = self
            .backend
            .create_repo(&r.workspace, &r.slug, r.is_private, &r.description)
            .await
            .map_err(status_of)?;
        tracing::info!(repo = rec.id, workspace = %rec.workspace, slug = %rec.slug, "repository created");
        Ok(Response::new(to_proto(rec)))
    }

    #[tracing::instrument(skip_all)]
    async fn delete_repository(
        &self,
        request: Request<DeleteRepositoryRequest>,
    ) -> Result<Response<DeleteRepositoryResponse>, Status> {
        let r = request.into_inner();
        self.backend
            .delete_repo(&r.workspace, &r.slug)
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
        let rec = self
            .backend
            .require_repo(&r.workspace, &r.slug)
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
        let recs = self
            .backend
            .list_repos(&r.workspace)
            .await
            .map_err(status_of)?;
        Ok(Response::new(ListRepositoriesResponse {
            repositories: recs.into_iter().map(to_proto).collect(),
        }))
    }
}
