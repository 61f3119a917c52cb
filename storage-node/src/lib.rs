//! A Cairn storage node: hosts repositories (immutable packs on disk, refs
//! and pack lists in RocksDB) and serves them over gRPC — the `Git` service
//! (ref advertisement, upload-pack, receive-pack) and the `Admin` service.
//!
//! The git protocol itself lives in `cairn-packfile`; this crate supplies
//! storage, concurrency and transport. It must not depend on the router.

pub mod admin_service;
pub mod bridge;
pub mod case_migration;
pub mod cluster_service;
pub mod config;
pub mod directory;
pub mod git_service;
pub mod layout;
pub mod meta_state;
pub mod mover;
pub mod names;
pub mod pack_placer;
pub mod pack_transfer;
pub mod peers;
pub mod replicated_store;
pub mod repo;
pub mod server;
pub mod shard_host;
pub mod shard_state;
pub mod staging_cleanup;
pub mod status;
pub mod write_gate;

pub use config::Config;
pub use server::StorageNode;
