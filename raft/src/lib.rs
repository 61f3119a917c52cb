//! Raft groups for Cairn: the openraft type configuration, a RocksDB log
//! store and RocksDB state-machine plumbing for many groups (the meta group
//! and every shard) sharing one database per node.
//!
//! * [`types`] — the only module that names openraft types; everything else
//!   imports them from there, so an upgrade of the pinned alpha stays local.
//! * [`keys`] — column families and the group-prefixed key layout.
//! * [`RaftDb`] — the node's RocksDB (opened here or handed in) plus the
//!   snapshot directory; hands out per-group stores.
//! * [`GroupLogStore`] — openraft `RaftLogStorage` for one group.
//! * [`GroupStateMachine`] — openraft `RaftStateMachine` for one group:
//!   applied log id, membership and snapshots; the meaning of a command is
//!   an [`ApplyLogic`] supplied by the application.
//!
//! This crate must not depend on the storage node, the router or any git
//! crate: it knows raft, RocksDB and bytes, never refs or packs. The storage
//! modules know nothing of network transport, which lives apart in its own
//! module over `proto`.

pub mod db;
pub mod error;
pub mod keys;
pub mod log_store;
pub mod network;
pub mod snapshot;
pub mod state_machine;
pub mod types;

pub use db::{column_family_descriptors, RaftDb};
pub use error::{OpenError, SnapshotError, StoreError};
pub use keys::{GroupId, COLUMN_FAMILIES};
pub use log_store::GroupLogStore;
pub use network::{GroupNetworkFactory, GroupRegistry, PeerPool, RaftService, TransportFilter};
pub use snapshot::SnapshotFile;
pub use state_machine::{
    ApplyLogic, GroupSnapshotBuilder, GroupState, GroupStateMachine, StateView, StopSignal,
};
pub use types::{Command, CommandResponse, NodeId, PeerAddr, TypeConfig};
