//! gRPC contracts between Cairn's processes: the `.proto` files under
//! `proto/` and the tonic/prost code generated from them.
//!
//! Depends on nothing else in the workspace; everything else may depend on it.

#![allow(clippy::all, clippy::unwrap_used)]

pub mod git {
    tonic::include_proto!("cairn.git.v1");
}

pub mod admin {
    tonic::include_proto!("cairn.admin.v1");
}

pub mod pack {
    tonic::include_proto!("cairn.pack.v1");
}

pub mod raft {
    tonic::include_proto!("cairn.raft.v1");
}

pub mod cluster {
    tonic::include_proto!("cairn.cluster.v1");
}

pub mod events {
    tonic::include_proto!("cairn.events.v1");
}

pub mod identity {
    tonic::include_proto!("cairn.identity.v1");
}

/// Bounds on what clients may store, shared by the router (which answers
/// with the offending field) and the storage nodes (which enforce them).
pub mod limits {
    /// Longest repository description, in bytes.
    pub const MAX_DESCRIPTION_BYTES: usize = 2048;
}

pub mod routing;

/// gRPC metadata with a meaning between Cairn's processes.
pub mod metadata {
    /// On an `ALREADY_EXISTS` answer to a create: the name taken differs
    /// from the requested one only in case (value `case`).
    pub const NAME_CONFLICT: &str = "x-cairn-name-conflict";
    pub const NAME_CONFLICT_CASE: &str = "case";
    /// The identity a router authenticated for the request (a username,
    /// `token:<id>`, or absent for anonymous): recorded in log entries and
    /// events, and checked against branch restrictions.
    pub const ACTOR: &str = "x-cairn-actor";
}
