//! What a shard's replicated state means: repositories, refs and pack
//! lists, and how each Raft entry changes them (`state`); versioned entries
//! and the registry services add their kinds to (`entry`); the row formats
//! (`rows`); the event log consumers follow (`events`); branch
//! restrictions (`restrictions`).

pub mod entry;
pub mod events;
pub mod restrictions;
pub mod rows;
pub mod state;
