//! The `Admin` gRPC service: create, delete, get and list repositories.

use std::sync::Arc;

use cairn_proto::admin::admin_server::Admin;
use cairn_proto::admin::{
    CreateRepositoryRequest, DeleteRepositoryRequest, DeleteRepositoryResponse,
    GetRepositoryRequest, ListRepositoriesRequest, ListRepositoriesResponse, Repository,
};
use tonic::{Request, Response, Status};

use crate::git_service::status_of;
use crate::repo_store::{RepoRecord, RepoStore, StoreError};

pub struct AdminService {
    store: Arc<RepoStore>,
}

impl AdminService {
    pub fn new(store: Arc<RepoStore>) -> Self {
        AdminService { store }
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&RepoStore) -> Result<T, StoreError> + Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| Status::internal(format!("admin task failed: {e}")))?
            .map_err(status_of)
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
            .blocking(move |s| s.create_repo(&r.workspace, &r.slug, r.is_private, &r.description))
            .await?;
        tracing::info!(repo = rec.id, workspace = %rec.workspace, slug = %rec.slug, "repository created");
        Ok(Response::new(to_proto(rec)))
    }

    #[tracing::instrument(skip_all)]
    async fn delete_repository(
        &self,
        request: Request<DeleteRepositoryRequest>,
    ) -> Result<Response<DeleteRepositoryResponse>, Status> {
        let r = request.into_inner();
        self.blocking(move |s| s.delete_repo(&r.workspace, &r.slug))
            .await?;
        Ok(Response::new(DeleteRepositoryResponse {}))
    }

    #[tracing::instrument(skip_all)]
    async fn get_repository(
        &self,
        request: Request<GetRepositoryRequest>,
    ) -> Result<Response<Repository>, Status> {
        let r = request.into_inner();
        let rec = self
            .blocking(move |s| s.require_repo(&r.workspace, &r.slug))
            .await?;
        Ok(Response::new(to_proto(rec)))
    }

    #[tracing::instrument(skip_all)]
    async fn list_repositories(
        &self,
        request: Request<ListRepositoriesRequest>,
    ) -> Result<Response<ListRepositoriesResponse>, Status> {
        let r = request.into_inner();
        let recs = self.blocking(move |s| s.list_repos(&r.workspace)).await?;
        Ok(Response::new(ListRepositoriesResponse {
            repositories: recs.into_iter().map(to_proto).collect(),
        }))
    }
}
