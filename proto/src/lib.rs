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
