//! Raft transport between nodes over gRPC (`cairn.raft.v1.Raft`).
//!
//! * [`PeerPool`] — one lazily connected tonic channel per peer node; every
//!   group replicating to that node shares it, so many groups travel over
//!   one HTTP/2 connection. Each message names its group.
//! * [`GroupNetworkFactory`] / [`GroupNetwork`] — openraft's network for
//!   one group on one node. openraft request and response structures are
//!   carried postcard-encoded; snapshots are streamed in chunks.
//! * [`RaftService`] + [`GroupRegistry`] — the server: dispatches each
//!   message to the group's raft instance, `NotFound` for a group this node
//!   does not host.
//! * [`TransportFilter`] — fault injection for cluster tests (drop,
//!   isolate, partition), consulted before every RPC; off by default.
//!
//! Error mapping: connection failures, `Unavailable` and `NotFound` answers
//! and filtered messages are openraft `Unreachable` (long back-off); an
//! expired deadline is `Timeout`; anything else (a message that does not
//! decode) is a `NetworkError`.

mod client;
pub mod filter;
mod server;

pub use client::{GroupNetwork, GroupNetworkFactory, InvalidPeerAddr, NetworkOptions, PeerPool};
pub use filter::TransportFilter;
pub use server::{GroupRegistry, RaftService, ReadIndexReply, READ_INDEX_TIMEOUT};
