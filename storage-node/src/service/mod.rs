//! The node's gRPC services: `Git` (`git`, with `bridge` between tonic
//! streams and the blocking protocol code), `Admin` (`admin`) and
//! `Cluster` (`cluster`) and `Events` (`events`). They translate; the work
//! is done below them.

pub mod admin;
pub mod bridge;
pub mod cluster;
pub mod events;
pub mod git;
