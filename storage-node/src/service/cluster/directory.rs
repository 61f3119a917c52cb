//! `Cluster` RPCs of the workspace directory: resolving a workspace to its
//! shard and replicas (what the router caches), creating, deleting and
//! listing workspaces.

use cairn_proto::cluster::*;
use tonic::{Request, Response, Status};

use super::*;

pub(super) async fn resolve_workspace(
    svc: &ClusterService,
    request: Request<ResolveWorkspaceRequest>,
) -> Result<Response<ResolveWorkspaceResponse>, Status> {
    let name = request.into_inner().workspace;
    let (_, dir) = svc.replicated()?;
    let record = dir
        .workspace(&name)
        .await
        .map_err(directory_status)?
        .ok_or_else(|| Status::not_found(format!("workspace {name} not found")))?;
    let d = svc.directory().await?;
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

pub(super) async fn create_workspace(
    svc: &ClusterService,
    request: Request<CreateWorkspaceRequest>,
) -> Result<Response<Workspace>, Status> {
    let name = request.into_inner().name;
    crate::names::validate("workspace", &crate::names::canonical(&name))
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let (_, dir) = svc.replicated()?;
    let record = dir
        .create_workspace(&name)
        .await
        .map_err(directory_status)?;
    Ok(Response::new(workspace_msg(&record)))
}

pub(super) async fn delete_workspace(
    svc: &ClusterService,
    request: Request<DeleteWorkspaceRequest>,
) -> Result<Response<DeleteWorkspaceResponse>, Status> {
    let asked = request.into_inner().name;
    let (_, dir) = svc.replicated()?;
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

pub(super) async fn list_workspaces(
    svc: &ClusterService,
    _request: Request<ListWorkspacesRequest>,
) -> Result<Response<ListWorkspacesResponse>, Status> {
    let (_, dir) = svc.replicated()?;
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
