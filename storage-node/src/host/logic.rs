//! What an entry means in any group this node hosts: a shard's
//! (`ShardLogic`) or the directory's (`MetaLogic`), one raft type for both.

use cairn_raft::{ApplyLogic, GroupState, StateView, StopSignal};
use serde::{Deserialize, Serialize};

use crate::meta::state::{MetaError, MetaLogic, MetaRequest, MetaResponse};
use crate::packs::placer::LocalPackPlacer;
use crate::shard::state::{ApplyError, ShardLogic, ShardRequest, ShardResponse};

/// A raft entry of any group this node hosts. Shards and the meta group
/// share one raft type, so the read barrier, leadership and membership
/// tools serve both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupRequest {
    Shard(ShardRequest),
    Meta(MetaRequest),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupResponse {
    Shard(ShardResponse),
    Meta(MetaResponse),
}

/// The `ApplyLogic` of every group: a shard's or the directory's.
pub enum NodeLogic {
    Shard(ShardLogic<LocalPackPlacer>),
    Meta(MetaLogic),
}

#[derive(Debug, thiserror::Error)]
pub enum NodeApplyError {
    #[error(transparent)]
    Shard(#[from] ApplyError),
    #[error(transparent)]
    Meta(#[from] MetaError),
}

impl ApplyLogic for NodeLogic {
    type Request = GroupRequest;
    type Response = GroupResponse;
    type Error = NodeApplyError;

    fn apply(
        &self,
        state: &mut GroupState<'_>,
        request: GroupRequest,
    ) -> Result<GroupResponse, NodeApplyError> {
        match (self, request) {
            (NodeLogic::Shard(logic), GroupRequest::Shard(r)) => {
                Ok(GroupResponse::Shard(logic.apply(state, r)?))
            }
            (NodeLogic::Meta(logic), GroupRequest::Meta(r)) => {
                Ok(GroupResponse::Meta(logic.apply_request(state, r)?))
            }
            // Proposers pick the request by the group; a mismatch changes
            // nothing rather than stopping the group.
            _ => Ok(GroupResponse::Meta(MetaResponse::Refused(
                "entry for another kind of group".into(),
            ))),
        }
    }

    fn reconciles(&self) -> bool {
        match self {
            NodeLogic::Shard(logic) => logic.reconciles(),
            NodeLogic::Meta(_) => false,
        }
    }

    fn reconcile(&self, view: &StateView, stop: &StopSignal) -> Result<(), NodeApplyError> {
        match self {
            NodeLogic::Shard(logic) => Ok(logic.reconcile(view, stop)?),
            NodeLogic::Meta(_) => Ok(()),
        }
    }
}
