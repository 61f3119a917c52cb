//! Git formats and the git wire protocol, server side, on gix.
//!
//! This crate owns everything a storage node needs to speak git without
//! shelling out to `git`: pkt-line framing, the upload-pack (v0/v1 and v2)
//! and receive-pack state machines, reading objects from immutable packs,
//! indexing and validating received packs (fsck-class checks and
//! connectivity), and generating packs with delta reuse.
//!
//! It must not depend on tokio, tonic or RocksDB: every state machine works on
//! `std::io::Read`/`Write`, so it is tested with byte transcripts alone.

pub mod pktline;
pub mod refs;
pub mod store;

pub mod upload;

pub mod receive;

pub use gix_hash::ObjectId;
