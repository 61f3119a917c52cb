//! Cairn's front door: smart HTTP for git clients and the Bitbucket-style
//! REST API, forwarding to storage nodes over gRPC.
//!
//! The router holds no repository data and never buffers a whole pack: git
//! request and response bodies are streamed through to the storage node.
//! To follow a changing shard leader (see `leader`) it reads ahead a bounded
//! prefix of a request body so a refused request can be sent again.
//! It must not depend on the storage node crate; it speaks only the gRPC
//! contracts in `cairn-proto`.

pub mod auth;
pub mod config;
pub mod git_http;
pub mod leader;
pub mod rest;
pub mod server;

pub use config::Config;
pub use server::Router;
