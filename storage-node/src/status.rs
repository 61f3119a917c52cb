//! How repository errors cross gRPC: stable codes, and the typed refusals
//! callers route on (`cairn_proto::routing`): a replica that does not lead
//! the repository's shard refuses writes as not-leader (with the leader's
//! address when known), a node that holds no replica of the workspace's
//! shard as wrong-shard (with its map epoch), and a write whose fate is
//! unknown says so.

use cairn_proto::metadata;
use cairn_proto::routing::Refusal;
use cairn_raft::NodeId;
use tonic::metadata::MetadataValue;
use tonic::Status;

use crate::host::ProposeError;
use crate::meta::client::DirectoryError;
use crate::repo::StoreError;
use crate::repos::ReplicatedError;

/// The not-leader refusal, naming the leader when known.
pub fn not_leader(leader_hint: Option<(NodeId, String)>) -> Status {
    Refusal::NotLeader {
        hint: leader_hint.map(|(_, addr)| addr),
    }
    .into_status("not the shard leader")
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
        StoreError::InvalidName(_) | StoreError::InvalidArgument(_) => {
            Status::invalid_argument(e.to_string())
        }
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
            Refusal::OutcomeUnknown.into_status(format!("outcome unknown, check and retry: {e}"))
        }
        ReplicatedError::NotApplied { .. } => Status::aborted(e.to_string()),
        ReplicatedError::WorkspaceNotFound(_) => Status::not_found(e.to_string()),
        ReplicatedError::WrongShard { epoch, .. } => {
            Refusal::WrongShard { epoch: Some(epoch) }.into_status(e.to_string())
        }
        // The replica was closed (moved away) while the request ran: the
        // caller finds where the shard is now, as for a wrong shard.
        ReplicatedError::UnknownShard(shard) => Refusal::WrongShard { epoch: None }.into_status(
            format!("wrong shard: shard {shard} is no longer on this node"),
        ),
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

/// A directory call's failure as the `Cluster` service answers it.
pub fn directory_status(e: DirectoryError) -> Status {
    match e {
        DirectoryError::Refused(m) => Status::failed_precondition(m),
        other => Status::unavailable(other.to_string()),
    }
}

/// A proposal's failure as the services answer it.
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
