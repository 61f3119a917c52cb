//! What the git and admin services serve from: the single-node `RepoStore`,
//! or the replicated shards when the node is configured with `shards`.
//!
//! Also the error contract towards the router: on a replica that does not
//! lead the repository's shard, every operation fails with
//! `FAILED_PRECONDITION` and, when the leader is known, its gRPC address in
//! the `x-cairn-leader` metadata key; on a node that holds no replica of
//! the workspace's shard, with `FAILED_PRECONDITION`, a message starting
//! `wrong shard` and the map epoch in `x-cairn-shard-epoch`.

use std::sync::Arc;

use cairn_packfile::receive::{Command, StagedPack};
use cairn_proto::metadata;
use cairn_raft::NodeId;
use tonic::metadata::MetadataValue;
use tonic::Status;

use crate::directory::DirectoryError;
use crate::replicated_store::{ReplicatedError, ReplicatedStore};
use crate::repo_store::{RepoRecord, RepoSnapshot, RepoStore, StagingDir, StoreError};
use crate::write_gate::WriteGuard;

/// Metadata key naming the shard leader's gRPC `host:port`.
pub const LEADER_METADATA: &str = "x-cairn-leader";

/// Metadata key of a wrong-shard refusal: the shard map epoch the node
/// knows, so the router can tell its cached directory entry is stale.
pub const WRONG_SHARD_METADATA: &str = "x-cairn-shard-epoch";

/// Ref-status reasons of a replicated push that did not apply normally.
pub const NG_NOT_LEADER: &str = "not the shard leader, nothing changed";
pub const NG_UNKNOWN: &str = "outcome unknown, please fetch and retry";
pub const NG_REPLICAS: &str = "replicas unavailable, nothing changed";
pub const NG_INTERNAL: &str = "internal storage error, nothing changed";
pub const NG_LEADER_LOST: &str = "shard leader changed mid-push, nothing changed; push again";

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Replicated(#[from] ReplicatedError),
    #[error("storage task failed: {0}")]
    Task(String),
}

/// How a push's apply step failed, as the client's report will say it.
#[derive(Debug, thiserror::Error)]
pub enum ApplyFailure {
    /// No ref moved.
    #[error("{reason}: {source}")]
    NothingChanged {
        reason: &'static str,
        #[source]
        source: BackendError,
    },
    /// Refs may or may not have moved.
    #[error("{NG_UNKNOWN}: {0}")]
    Unknown(#[source] BackendError),
}

impl ApplyFailure {
    /// The `ng` reason reported for every ref.
    pub fn reason(&self) -> &'static str {
        match self {
            ApplyFailure::NothingChanged { reason, .. } => reason,
            ApplyFailure::Unknown(_) => NG_UNKNOWN,
        }
    }
}

/// The repository store behind the services.
#[derive(Clone)]
pub enum RepoBackend {
    Single(Arc<RepoStore>),
    Replicated {
        shards: Arc<ReplicatedStore>,
        /// Only for per-push staging directories under the same data dir.
        local: Arc<RepoStore>,
    },
}

impl RepoBackend {
    pub fn replicated(&self) -> Option<&Arc<ReplicatedStore>> {
        match self {
            RepoBackend::Single(_) => None,
            RepoBackend::Replicated { shards, .. } => Some(shards),
        }
    }

    fn local(&self) -> &Arc<RepoStore> {
        match self {
            RepoBackend::Single(s) => s,
            RepoBackend::Replicated { local, .. } => local,
        }
    }

    /// Runs a blocking `RepoStore` call off the async runtime.
    async fn blocking<T, F>(store: &Arc<RepoStore>, f: F) -> Result<T, BackendError>
    where
        T: Send + 'static,
        F: FnOnce(&RepoStore) -> Result<T, StoreError> + Send + 'static,
    {
        let store = store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| BackendError::Task(e.to_string()))?
            .map_err(BackendError::from)
    }

    // The replicated futures are boxed: openraft's are deep enough to
    // overflow the compiler's layout recursion limit inside the services.

    /// Refuses (with the leader's address) on a replica that cannot accept
    /// writes to `workspace`; otherwise the write is under way until the
    /// guard drops (none on a single node).
    pub async fn begin_write(&self, workspace: &str) -> Result<Option<WriteGuard>, BackendError> {
        match self {
            RepoBackend::Single(_) => Ok(None),
            RepoBackend::Replicated { shards, .. } => {
                Ok(Some(Box::pin(shards.begin_write(workspace)).await?))
            }
        }
    }

    /// Refs and packs of a repository, as of a linearizable read (on any
    /// replica, when replicated).
    pub async fn snapshot(
        &self,
        workspace: &str,
        slug: &str,
    ) -> Result<RepoSnapshot, BackendError> {
        match self {
            RepoBackend::Single(s) => {
                let (w, sl) = (workspace.to_owned(), slug.to_owned());
                Self::blocking(s, move |s| s.snapshot(&w, &sl)).await
            }
            RepoBackend::Replicated { shards, .. } => {
                Ok(Box::pin(shards.snapshot(workspace, slug)).await?)
            }
        }
    }

    pub async fn create_repo(
        &self,
        workspace: &str,
        slug: &str,
        is_private: bool,
        description: &str,
    ) -> Result<RepoRecord, BackendError> {
        match self {
            RepoBackend::Single(s) => {
                let (w, sl, d) = (
                    workspace.to_owned(),
                    slug.to_owned(),
                    description.to_owned(),
                );
                Self::blocking(s, move |s| s.create_repo(&w, &sl, is_private, &d)).await
            }
            RepoBackend::Replicated { shards, .. } => {
                Ok(Box::pin(shards.create_repo(workspace, slug, is_private, description)).await?)
            }
        }
    }

    pub async fn delete_repo(&self, workspace: &str, slug: &str) -> Result<(), BackendError> {
        match self {
            RepoBackend::Single(s) => {
                let (w, sl) = (workspace.to_owned(), slug.to_owned());
                Self::blocking(s, move |s| s.delete_repo(&w, &sl)).await
            }
            RepoBackend::Replicated { shards, .. } => {
                Ok(Box::pin(shards.delete_repo(workspace, slug)).await?)
            }
        }
    }

    pub async fn require_repo(
        &self,
        workspace: &str,
        slug: &str,
    ) -> Result<RepoRecord, BackendError> {
        match self {
            RepoBackend::Single(s) => {
                let (w, sl) = (workspace.to_owned(), slug.to_owned());
                Self::blocking(s, move |s| s.require_repo(&w, &sl)).await
            }
            RepoBackend::Replicated { shards, .. } => {
                Ok(Box::pin(shards.require_repo(workspace, slug)).await?)
            }
        }
    }

    pub async fn list_repos(&self, workspace: &str) -> Result<Vec<RepoRecord>, BackendError> {
        match self {
            RepoBackend::Single(s) => {
                let w = workspace.to_owned();
                Self::blocking(s, move |s| s.list_repos(&w)).await
            }
            RepoBackend::Replicated { shards, .. } => {
                Ok(Box::pin(shards.list_repos(workspace)).await?)
            }
        }
    }

    /// A fresh directory for one push's incoming pack (blocking).
    pub fn push_staging(&self) -> Result<StagingDir, StoreError> {
        self.local().push_staging()
    }

    /// Applies a validated push (blocking: call from a blocking thread;
    /// `runtime` drives the replicated path). Returns per-command results.
    pub fn apply_push(
        &self,
        runtime: &tokio::runtime::Handle,
        record: &RepoRecord,
        commands: &[Command],
        atomic: bool,
        prior: &[Option<String>],
        staged: Option<StagedPack>,
    ) -> Result<Vec<Result<(), String>>, ApplyFailure> {
        match self {
            RepoBackend::Single(s) => s
                .apply_push(record, commands, atomic, prior, staged)
                .map_err(|e| ApplyFailure::NothingChanged {
                    reason: NG_INTERNAL,
                    source: e.into(),
                }),
            RepoBackend::Replicated { shards, .. } => {
                // A push nobody can accept needs no pack on any replica.
                let staged = if prior.iter().all(Option::is_some) {
                    None
                } else {
                    staged
                };
                runtime
                    .block_on(Box::pin(
                        shards.push(record, commands, atomic, prior, staged),
                    ))
                    .map_err(classify_push_error)
            }
        }
    }
}

fn classify_push_error(e: ReplicatedError) -> ApplyFailure {
    let reason = match &e {
        // Refused before proposing: nothing was appended anywhere.
        ReplicatedError::NotLeader { .. } => NG_NOT_LEADER,
        ReplicatedError::Transfer { .. } => NG_REPLICAS,
        ReplicatedError::NotApplied { .. } => NG_LEADER_LOST,
        ReplicatedError::Store(_)
        | ReplicatedError::Io { .. }
        | ReplicatedError::UnknownShard(_)
        | ReplicatedError::WorkspaceNotFound(_)
        | ReplicatedError::Directory(_) => NG_INTERNAL,
        ReplicatedError::WrongShard { .. } => NG_NOT_LEADER,
        // A raft failure may strike after the entry was appended.
        ReplicatedError::Indeterminate { .. }
        | ReplicatedError::Raft(_)
        | ReplicatedError::State(_) => return ApplyFailure::Unknown(e.into()),
    };
    ApplyFailure::NothingChanged {
        reason,
        source: e.into(),
    }
}

/// `FAILED_PRECONDITION` naming the leader, for the router to retry there.
pub fn not_leader(leader_hint: Option<(NodeId, String)>) -> Status {
    let mut status = Status::failed_precondition("not the shard leader");
    if let Some(value) = leader_hint.and_then(|(_, addr)| MetadataValue::try_from(addr).ok()) {
        status.metadata_mut().insert(LEADER_METADATA, value);
    }
    status
}

/// Maps store errors onto stable gRPC codes.
pub fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::RepoNotFound { .. } => Status::not_found(e.to_string()),
        StoreError::RepoExists { .. } => Status::already_exists(e.to_string()),
        StoreError::RepoCaseClash { .. } => {
            let mut status = Status::already_exists(e.to_string());
            status.metadata_mut().insert(
                metadata::NAME_CONFLICT,
                MetadataValue::from_static(metadata::NAME_CONFLICT_CASE),
            );
            status
        }
        StoreError::InvalidName(_) => Status::invalid_argument(e.to_string()),
        other => {
            tracing::error!(error = %other, "storage failure");
            Status::internal(other.to_string())
        }
    }
}

/// Maps backend errors onto stable gRPC codes.
pub fn status_of(e: BackendError) -> Status {
    match e {
        BackendError::Store(e) => store_status(e),
        BackendError::Task(m) => Status::internal(format!("storage task failed: {m}")),
        BackendError::Replicated(e) => match e {
            ReplicatedError::NotLeader { leader_hint } => not_leader(leader_hint),
            ReplicatedError::Store(e) => store_status(e),
            ReplicatedError::Indeterminate { .. } => {
                Status::unavailable(format!("outcome unknown, check and retry: {e}"))
            }
            ReplicatedError::NotApplied { .. } => Status::aborted(e.to_string()),
            ReplicatedError::WorkspaceNotFound(_) => Status::not_found(e.to_string()),
            ReplicatedError::WrongShard { epoch, .. } => {
                let mut status = Status::failed_precondition(e.to_string());
                status
                    .metadata_mut()
                    .insert(WRONG_SHARD_METADATA, MetadataValue::from(epoch));
                status
            }
            ReplicatedError::Directory(DirectoryError::Refused(m)) => {
                Status::failed_precondition(m)
            }
            ReplicatedError::Directory(_) => Status::unavailable(e.to_string()),
            ReplicatedError::Transfer { .. } | ReplicatedError::Raft(_) => {
                tracing::warn!(error = %e, "shard unavailable");
                Status::unavailable(e.to_string())
            }
            other => {
                tracing::error!(error = %other, "replicated storage failure");
                Status::internal(other.to_string())
            }
        },
    }
}
