//! upload-pack (v0/v1 and v2): ref advertisement, negotiation, pack generation.
//!
//! The entry points work on plain `Read`/`Write` streams so the same code
//! serves `git://`-style bidirectional connections (ssh, the test harness)
//! and smart HTTP (`stateless_rpc`, one request body per call).

mod advertise;
mod delta;
mod error;
mod filter;
mod generate;
mod negotiate;
mod objects;
mod request;
mod send;
mod shallow;
mod v0;
mod v2;
mod walk;

pub use advertise::{advertise_v0, advertise_v2};
pub use error::UploadError;
pub use filter::{Filter, FilterError};
pub use generate::{write_pack, PackOptions, PackStats};
pub use v0::serve_v0;
pub use v2::serve_v2;
pub use walk::{plan_objects, ObjectPlan, WalkInput};

use crate::refs::RepoRefs;
use crate::store::PackSet;

/// Everything upload-pack needs to know about one repository.
#[derive(Clone, Copy)]
pub struct UploadContext<'a> {
    pub refs: &'a RepoRefs,
    pub packs: &'a PackSet,
    /// Our `agent=` value, e.g. `cairn/0.1.0`.
    pub agent: &'a str,
}
