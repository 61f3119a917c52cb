//! The cluster directory: what the meta group's entries mean (`state`) and
//! a node's access to it, reading on its own replica or forwarding to the
//! meta leader (`client`).

pub mod client;
pub mod state;
