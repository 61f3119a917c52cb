//! The ref state of one repository as the protocol layers see it.

use gix_hash::ObjectId;

/// Longest ref name (in bytes) accepted for a new or updated ref, and
/// advertised by upload-pack. It is `PATH_MAX`: no longer name can be a
/// loose ref on a client, and it keeps every advertisement line far below
/// the pkt-line limit. Older stores may hold longer names (anything a
/// pkt-line command could carry); they stay readable and deletable.
pub const MAX_REF_NAME_LEN: usize = 4096;

/// One ref: a full name (`refs/heads/main`) and the object it points to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefRecord {
    pub name: String,
    pub target: ObjectId,
}

/// All refs of a repository plus where `HEAD` points.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepoRefs {
    /// Sorted by name, no duplicates.
    pub refs: Vec<RefRecord>,
    /// The full ref name `HEAD` is a symbolic ref to (`refs/heads/main`).
    /// `HEAD` is unborn when no ref of that name exists.
    pub head: Option<String>,
}

impl RepoRefs {
    pub fn new(mut refs: Vec<RefRecord>, head: Option<String>) -> Self {
        refs.sort_by(|a, b| a.name.cmp(&b.name));
        refs.dedup_by(|a, b| a.name == b.name);
        RepoRefs { refs, head }
    }

    pub fn get(&self, name: &str) -> Option<ObjectId> {
        self.refs
            .binary_search_by(|r| r.name.as_str().cmp(name))
            .ok()
            .map(|i| self.refs[i].target)
    }

    /// The object `HEAD` resolves to, if its target ref exists.
    pub fn head_target(&self) -> Option<ObjectId> {
        self.head.as_deref().and_then(|h| self.get(h))
    }
}
