//! The node's gRPC services: `Git` (`git`, with `bridge` between tonic
//! streams and the blocking protocol code), `Admin` (`admin`), `Cluster`
//! (`cluster`), `Events` (`events`) and `Identity` (`identity`). They
//! translate; the work is done below them.

pub mod admin;
pub mod bridge;
pub mod cluster;
pub mod events;
pub mod git;
pub mod identity;
