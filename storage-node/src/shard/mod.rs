//! What a shard's replicated state means: repositories, refs and pack
//! lists, and how each Raft entry changes them (`state`).

pub mod state;
