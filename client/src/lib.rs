//! How Cairn's processes call storage nodes: find where a workspace lives
//! (`directory`: the cluster directory, cached) and follow the leader of
//! its shard among the replicas (`policy`: the pure classification and
//! `decide`; `leader`: the leader cache and the loops that run the policy),
//! reading the nodes' typed refusals (`cairn_proto::routing`).
//!
//! One client for the router, the CLI and node-to-node calls. Depends on
//! `cairn-proto` only: nothing here knows how a node stores anything.

pub mod directory;
pub mod leader;
pub mod policy;

pub use leader::{follow_leader, Attempt, Cluster, NodePool, RetryPolicy};
