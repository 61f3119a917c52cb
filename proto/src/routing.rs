//! The routing contract between storage nodes and everything that calls
//! them (router, CLI, other nodes): how a node says "not me" so the caller
//! knows where to go, and whether the request may be sent again.
//!
//! A refusal is a gRPC status whose `x-cairn-refusal` metadata names its
//! kind; nothing is read from the human message. Any other status is the
//! request's own answer.

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

/// Metadata key naming the kind of refusal (see [`Refusal`]).
pub const REFUSAL: &str = "x-cairn-refusal";

/// Metadata key of a not-leader refusal: the leader's gRPC `host:port`.
pub const LEADER: &str = "x-cairn-leader";

/// Metadata key of a wrong-shard refusal: the shard map epoch the refusing
/// node knows (decimal), so a client can tell its directory entry is stale.
pub const SHARD_EPOCH: &str = "x-cairn-shard-epoch";

/// Why a node did not serve a request, as far as routing is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not the leader of the group the request needs (a shard's, or the
    /// directory's); `hint` is the leader's `host:port` when known. Sent
    /// before acting: the request may go to another node.
    NotLeader { hint: Option<String> },
    /// The node holds no replica of the workspace's shard: the caller's
    /// directory entry is stale. Sent before acting.
    WrongShard { epoch: Option<u64> },
    /// A write was handed to Raft and its fate is unknown: sending it again
    /// could apply it twice, so the caller must check rather than retry.
    OutcomeUnknown,
}

impl Refusal {
    const NOT_LEADER: &'static str = "not-leader";
    const WRONG_SHARD: &'static str = "wrong-shard";
    const OUTCOME_UNKNOWN: &'static str = "outcome-unknown";

    /// The status carrying this refusal, with a human `message`.
    pub fn into_status(self, message: impl Into<String>) -> Status {
        let (code, kind) = match &self {
            Refusal::NotLeader { .. } => (Code::FailedPrecondition, Self::NOT_LEADER),
            Refusal::WrongShard { .. } => (Code::FailedPrecondition, Self::WRONG_SHARD),
            Refusal::OutcomeUnknown => (Code::Unavailable, Self::OUTCOME_UNKNOWN),
        };
        let mut status = Status::new(code, message);
        let md = status.metadata_mut();
        md.insert(REFUSAL, MetadataValue::from_static(kind));
        match self {
            Refusal::NotLeader { hint: Some(hint) } => {
                if let Ok(v) = MetadataValue::try_from(hint) {
                    md.insert(LEADER, v);
                }
            }
            Refusal::WrongShard { epoch: Some(epoch) } => {
                md.insert(SHARD_EPOCH, MetadataValue::from(epoch));
            }
            _ => {}
        }
        status
    }

    /// The refusal `status` carries, if it is one.
    pub fn of(status: &Status) -> Option<Refusal> {
        let md = status.metadata();
        let text = |key: &str| {
            md.get(key)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
        };
        match text(REFUSAL)? {
            Self::NOT_LEADER => Some(Refusal::NotLeader {
                hint: text(LEADER).map(str::to_owned),
            }),
            Self::WRONG_SHARD => Some(Refusal::WrongShard {
                epoch: text(SHARD_EPOCH).and_then(|v| v.parse().ok()),
            }),
            Self::OUTCOME_UNKNOWN => Some(Refusal::OutcomeUnknown),
            _ => None,
        }
    }

    /// Whether the node certainly did not act on the request.
    pub fn before_acting(&self) -> bool {
        !matches!(self, Refusal::OutcomeUnknown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_round_trip_through_a_status() {
        for refusal in [
            Refusal::NotLeader { hint: None },
            Refusal::NotLeader {
                hint: Some("10.0.0.2:7410".into()),
            },
            Refusal::WrongShard { epoch: None },
            Refusal::WrongShard { epoch: Some(17) },
            Refusal::OutcomeUnknown,
        ] {
            let status = refusal.clone().into_status("some words");
            assert_eq!(Refusal::of(&status), Some(refusal));
        }
    }

    #[test]
    fn messages_mean_nothing() {
        for status in [
            Status::failed_precondition("not the shard leader"),
            Status::failed_precondition("wrong shard: shard 3"),
            Status::unavailable("outcome unknown, check and retry"),
        ] {
            assert_eq!(Refusal::of(&status), None, "{status:?}");
        }
        let mut odd = Status::failed_precondition("x");
        odd.metadata_mut()
            .insert(REFUSAL, MetadataValue::from_static("something-new"));
        assert_eq!(Refusal::of(&odd), None);
    }
}
