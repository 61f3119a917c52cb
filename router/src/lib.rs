//! Cairn's front door: smart HTTP for git clients and the Bitbucket-style
//! REST API, forwarding to storage nodes over gRPC.
//!
//! The router holds no repository data and never buffers a whole pack: git
//! request and response bodies are streamed through to the storage node.
//! It finds each workspace's shard replicas in the cluster directory and
//! follows the shard's leader among them (both through `cairn-client`);
//! to resend a request a node refused (not the leader, or no longer holding
//! the shard) it reads ahead a bounded prefix of the request body.
//! It must not depend on the storage node crate; it speaks only the gRPC
//! contracts in `cairn-proto`.
//!
//! Every request is authenticated (`auth`) against the identity snapshot
//! it keeps (`identity`) and authorized (`authz`) before any storage node
//! sees it. Git over SSH (`ssh`) goes through the same checks and RPCs.

pub mod accounts;
pub mod answer;
pub mod auth;
pub mod authz;
pub mod config;
pub mod git_http;
pub mod identity;
pub mod keys;
pub mod rest;
pub mod restrictions;
pub mod server;
pub mod ssh;
pub mod state;
pub mod workspaces;

pub use config::Config;
pub use server::Router;
