//! How repository errors cross gRPC: stable codes, and the metadata the
//! router routes on. On a replica that does not lead the repository's
//! shard, every write fails with `FAILED_PRECONDITION` and, when the leader
//! is known, its gRPC address in the `x-cairn-leader` metadata key; on a
//! node that holds no replica of the workspace's shard, with
//! `FAILED_PRECONDITION`, a message starting `wrong shard` and the map epoch
//! in `x-cairn-shard-epoch`.

use cairn_proto::metadata;
use cairn_raft::NodeId;
use tonic::metadata::MetadataValue;
use tonic::Status;

use crate::directory::DirectoryError;
use crate::replicated_store::ReplicatedError;
use crate::repo::StoreError;

/// Metadata key naming the shard leader's gRPC `host:port`.
pub const LEADER_METADATA: &str = "x-cairn-leader";

/// Metadata key of a wrong-shard refusal: the shard map epoch the node
/// knows, so the router can tell its cached directory entry is stale.
pub const WRONG_SHARD_METADATA: &str = "x-cairn-shard-epoch";

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

/// Maps repository errors onto stable gRPC codes.
pub fn status_of(e: ReplicatedError) -> Status {
    match e {
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
        ReplicatedError::Directory(DirectoryError::Refused(m)) => Status::failed_precondition(m),
        ReplicatedError::Directory(_) => Status::unavailable(e.to_string()),
        ReplicatedError::Transfer { .. } | ReplicatedError::Raft(_) => {
            tracing::warn!(error = %e, "shard unavailable");
            Status::unavailable(e.to_string())
        }
        other => {
            tracing::error!(error = %other, "replicated storage failure");
            Status::internal(other.to_string())
        }
    }
}
