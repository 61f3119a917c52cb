//! Whether a ref update is a fast-forward: is the old tip an ancestor of
//! the new one? Branch restrictions that forbid rewriting history need it.

use std::collections::{HashSet, VecDeque};

use gix_hash::{oid, ObjectId};
use gix_object::{CommitRefIter, Kind};

use crate::store::{PackSet, StoreError};

/// Commits walked before giving up: a walk that long is answered "not a
/// fast-forward", which a restricted branch refuses (safe side).
pub const MAX_WALK: usize = 1_000_000;

/// Whether `old` is reachable from `new` through commit parents, reading
/// `new`'s history from `packs` (the repository and the pushed pack).
pub fn is_ancestor(packs: &[&PackSet], old: &oid, new: &oid) -> Result<bool, StoreError> {
    if old == new {
        return Ok(true);
    }
    let readers: Vec<_> = packs.iter().map(|p| p.reader()).collect();
    let mut buf = Vec::new();
    let mut seen: HashSet<ObjectId> = HashSet::new();
    let mut queue: VecDeque<ObjectId> = VecDeque::from([new.to_owned()]);
    while let Some(id) = queue.pop_front() {
        if seen.len() >= MAX_WALK {
            return Ok(false);
        }
        if !seen.insert(id) {
            continue;
        }
        let mut found = None;
        for r in &readers {
            if let Some((kind, data)) = r.find(&id, &mut buf)? {
                found = Some((kind, data.to_vec()));
                break;
            }
        }
        let Some((kind, data)) = found else {
            continue;
        };
        if kind != Kind::Commit {
            continue;
        }
        for parent in CommitRefIter::from_bytes(&data, gix_hash::Kind::Sha1).parent_ids() {
            if parent == old {
                return Ok(true);
            }
            queue.push_back(parent);
        }
    }
    Ok(false)
}
