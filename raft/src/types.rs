//! The one place that names openraft's types.
//!
//! openraft 0.10 is pinned to an alpha whose API still moves between
//! releases, so every other module (and every crate that later builds on this
//! one) imports openraft's types from here. An upgrade then changes this file
//! and the trait impls, not the storage node.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use openraft::entry::RaftEntry;
pub use openraft::storage::{
    ApplyResponder, EntryResponder, IOFlushed, LogState, RaftLogReader, RaftLogStorage,
    RaftSnapshotBuilder, RaftStateMachine,
};
pub use openraft::{EntryPayload, Membership, StorageError};

// What the storage node drives its groups with: it names these paths, never
// openraft's own.
pub use openraft::async_runtime::WatchReceiver;
pub use openraft::error::{
    AllowNextRevertError, ClientWriteError, ForwardToLeader, InitializeError, RaftError,
};
pub use openraft::testing::log_id;
pub use openraft::{Config as RaftConfig, Raft, ReadPolicy, SnapshotPolicy};

/// A node's id inside every raft group it takes part in.
pub type NodeId = u64;

/// What a group's membership records about a peer: where to reach it.
///
/// Kept as our own type (rather than openraft's `BasicNode`) so it can grow
/// fields (zone, rack) without touching openraft, and because openraft's
/// storage suite needs `Default`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerAddr {
    /// gRPC address of the peer's raft service, e.g. `10.0.0.7:7400`.
    pub addr: String,
}

/// One replicated application command, opaque to the raft layer.
///
/// The payload is a postcard-encoded request of the group's `ApplyLogic`.
/// Keeping it opaque gives every group (the meta group and all shards) the
/// same type configuration, so one network layer and one raft RPC service
/// can carry all of them.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command(pub Vec<u8>);

/// The answer of applying one [`Command`], opaque like the command.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResponse(pub Vec<u8>);

/// Failure to encode or decode a typed request or response.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The value could not be serialised.
    #[error("cannot encode {what}")]
    Encode {
        what: &'static str,
        #[source]
        source: postcard::Error,
    },
    /// The bytes are not a valid encoding of the expected type.
    #[error("cannot decode {what}")]
    Decode {
        what: &'static str,
        #[source]
        source: postcard::Error,
    },
}

impl Command {
    /// Encodes a typed request for proposal.
    pub fn encode<T: Serialize>(request: &T) -> Result<Self, CodecError> {
        postcard::to_allocvec(request)
            .map(Self)
            .map_err(|source| CodecError::Encode {
                what: "command",
                source,
            })
    }

    /// Decodes the typed request this command carries.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, CodecError> {
        postcard::from_bytes(&self.0).map_err(|source| CodecError::Decode {
            what: "command",
            source,
        })
    }
}

impl CommandResponse {
    /// Encodes a typed response.
    pub fn encode<T: Serialize>(response: &T) -> Result<Self, CodecError> {
        postcard::to_allocvec(response)
            .map(Self)
            .map_err(|source| CodecError::Encode {
                what: "command response",
                source,
            })
    }

    /// Decodes the typed response; an empty response (blank or membership
    /// entry) does not decode into most types.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, CodecError> {
        postcard::from_bytes(&self.0).map_err(|source| CodecError::Decode {
            what: "command response",
            source,
        })
    }
}

// openraft logs entries with `Display`/`Debug`: show the size, never the
// bytes (a command can carry ref names and object ids of private repos).
impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Command({} bytes)", self.0.len())
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl fmt::Debug for CommandResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CommandResponse({} bytes)", self.0.len())
    }
}

openraft::declare_raft_types!(
    /// openraft type configuration shared by every Cairn raft group.
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        NodeId = NodeId,
        Node = PeerAddr,
        AsyncRuntime = openraft_rt_tokio::TokioRuntime,
);

/// A raft log entry.
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
/// Identifies a log entry: leader (term, node) and index.
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
/// A persisted vote.
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
/// Membership together with the log id that introduced it.
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
/// Metadata that travels with a snapshot.
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;
/// A snapshot: metadata plus a handle to its data.
pub type Snapshot<SD> = openraft::type_config::alias::SnapshotOf<TypeConfig, SD>;
/// Log state of one group's log store.
pub type GroupLogState = LogState<TypeConfig>;
/// Callback that a log append must fire once the entries are durable.
pub type AppendCallback = IOFlushed<TypeConfig>;

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::entry::RaftEntry;

    fn log_id(term: u64, node: u64, index: u64) -> LogId {
        openraft::testing::log_id::<TypeConfig>(term, node, index)
    }

    /// postcard is not self-describing: prove openraft's serde derives
    /// round-trip through it for everything this crate persists.
    #[test]
    fn persisted_types_round_trip_through_postcard() {
        let entries = [
            Entry::new_blank(log_id(3, 2, 7)),
            Entry::new_normal(log_id(3, 2, 8), Command(vec![1, 2, 3])),
            Entry::new_membership(
                log_id(4, 1, 9),
                Membership::new_with_defaults(vec![[1u64, 2, 3].into()], [4u64]),
            ),
        ];
        for entry in entries {
            let bytes = postcard::to_allocvec(&entry).expect("encode");
            let back: Entry = postcard::from_bytes(&bytes).expect("decode");
            assert_eq!(back, entry);
        }

        let vote = Vote::new_committed(5, 3);
        let back: Vote =
            postcard::from_bytes(&postcard::to_allocvec(&vote).expect("encode")).expect("decode");
        assert_eq!(back, vote);

        let membership = StoredMembership::new(
            Some(log_id(2, 1, 4)),
            Membership::new_with_defaults(vec![[1u64, 2].into()], []),
        );
        let back: StoredMembership =
            postcard::from_bytes(&postcard::to_allocvec(&membership).expect("encode"))
                .expect("decode");
        assert_eq!(back, membership);
    }

    #[test]
    fn a_blank_entry_is_small() {
        // Compactness is why postcard was chosen over JSON: a blank entry
        // must stay a handful of bytes.
        let bytes = postcard::to_allocvec(&Entry::new_blank(log_id(3, 2, 7))).expect("encode");
        assert!(bytes.len() <= 8, "{} bytes", bytes.len());
    }

    #[test]
    fn command_round_trips_a_typed_request() {
        let cmd = Command::encode(&("refs/heads/main", 7u32)).expect("encode");
        let back: (String, u32) = cmd.decode().expect("decode");
        assert_eq!(back, ("refs/heads/main".to_string(), 7));
        assert_eq!(format!("{cmd}"), format!("Command({} bytes)", cmd.0.len()));
    }
}
