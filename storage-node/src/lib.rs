//! A Cairn storage node: hosts repositories (immutable packs on disk, refs
//! and pack lists in its shards' Raft groups) and serves them over gRPC.
//!
//! Layers, lowest first: `names` and `repo` (what a repository is),
//! `shard` and `meta` (what the replicated state of a shard and of the
//! cluster directory means), `host` (this node's Raft groups), `packs`
//! (pack replication), `repos` (the repository operations services call),
//! `cluster` (membership and moves between nodes), `service` (gRPC), and
//! `server` (wiring). The git protocol itself lives in `cairn-packfile`.
//! It must not depend on the router.

pub mod cluster;
pub mod config;
pub mod host;
pub mod layout;
pub mod meta;
pub mod names;
pub mod packs;
pub mod repo;
pub mod repos;
pub mod server;
pub mod service;
pub mod shard;
pub mod status;

pub use config::Config;
pub use server::StorageNode;
