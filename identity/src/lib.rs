//! Who may do what: the identity model and the authorization decision.
//!
//! * `model` — users, grants, workspace roles, credentials (API tokens,
//!   repository and workspace access tokens, SSH and deploy keys) as the
//!   meta group stores them, and the snapshot a router caches;
//! * `token` — the token format (a recognisable prefix, an id, a random
//!   secret) and the keyed hash that is all the cluster keeps of it;
//! * `password` — the slow salted hash of web sign-in passwords;
//! * `policy` — the one function that decides whether a principal may
//!   read, write or administer a repository, with Bitbucket's scopes;
//! * `sshkey` — SSH public keys: parsed, checked, fingerprinted;
//! * `restriction` — branch restrictions and which ref updates they
//!   refuse;
//! * `change` — the identity changes the meta group applies, each checked
//!   here so that every replica refuses the same ones.
//!
//! Pure: no I/O, no clock. Callers pass "now" in, so replicas applying a
//! logged change agree and tests choose the time.

pub mod change;
pub mod model;
pub mod password;
pub mod policy;
pub mod restriction;
pub mod sshkey;
pub mod token;

pub use change::{Change, ChangeError};
pub use model::*;
pub use policy::{Action, Decision, Principal, RepoRef};
