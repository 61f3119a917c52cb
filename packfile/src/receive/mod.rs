//! receive-pack (protocol v0), server side: the ref advertisement, the
//! command list and push options, streaming the pack into a staging
//! directory while indexing it, fsck-class validation and connectivity of
//! the new objects, the pure compare-and-swap plan of ref updates, and the
//! report-status answer.
//!
//! The caller (the storage node, or the `receive_stdio` example) drives the
//! steps in order: [`advertise`], [`read_request`], [`ingest`],
//! [`plan_updates`], apply the planned updates durably, then
//! [`write_report`]. Nothing here touches committed state: a staged pack is
//! only moved into place by the caller once the ref updates are decided.

mod advertise;
mod ancestry;
mod connectivity;
mod error;
mod fsck;
mod gitmodules;
mod ingest;
mod plan;
mod refname;
mod report;
mod request;

pub use crate::refs::MAX_REF_NAME_LEN;
pub use advertise::{advertise, CAPABILITIES};
pub use ancestry::is_ancestor;
pub use connectivity::MISSING_OBJECTS;
pub use error::{FsckId, ReceiveError};
pub use fsck::{check_object, FsckError};
pub use ingest::{ingest, Ingested, StagedPack};
pub use plan::{plan_updates, ATOMIC_FAILED};
pub use refname::{check_ref_name, check_ref_name_length};
pub use report::{write_progress, write_report};
pub use request::{read_request, Command, PushRequest, ReceiveCaps};

/// Resource limits for one push; everything a client controls is bounded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Most ref update commands accepted in one push.
    pub max_commands: usize,
    /// Most push options accepted in one push.
    pub max_push_options: usize,
    /// Longest push option accepted, in bytes: options are kept with the
    /// push's event.
    pub max_push_option_bytes: usize,
    /// Largest pack (as sent, trailer included) accepted; reading stops there.
    pub max_pack_bytes: u64,
    /// Most objects a pack header may announce.
    pub max_objects: u32,
    /// Largest single allocation gix may make while resolving deltas.
    pub alloc_limit_bytes: usize,
    /// Threads used to resolve deltas while indexing; `None` means all cores.
    pub index_threads: Option<usize>,
    /// Refuse a push whose pack is followed by more bytes (git's
    /// index-pack: "pack has junk at the end"). Right where the pack ends
    /// the client's input, as a smart-HTTP request body does. A
    /// bidirectional session (SSH, `git://`) must turn it off: the client
    /// keeps its side open after the pack while it waits for the report,
    /// so looking for more input would block until it gives up.
    pub require_eof_after_pack: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_commands: 10_000,
            max_push_options: 100,
            max_push_option_bytes: 1024,
            max_pack_bytes: 2 << 30,
            max_objects: 10_000_000,
            alloc_limit_bytes: 512 << 20,
            index_threads: None,
            require_eof_after_pack: true,
        }
    }
}
