//! Cluster membership work between nodes: moving a replica (`mover`) and
//! calling peers (`peers`).

pub mod mover;
pub mod peers;
