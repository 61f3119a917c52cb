//! The cluster directory: what the meta group's entries mean (`state`) and
//! a node's access to it, reading on its own replica or forwarding to the
//! meta leader (`client`); users, credentials and permissions live there
//! too (`identity`).

pub mod client;
pub mod identity;
pub mod state;
