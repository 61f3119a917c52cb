//! Common-commit bookkeeping during negotiation: which `have`s we share
//! with the client and whether every want is already covered by them
//! (git's `ok_to_give_up`).

use std::collections::HashSet;

use gix_hash::ObjectId;
use gix_object::Kind;

use super::objects::{peel, CommitCache};
use super::UploadError;

/// What we learned from one `have` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Have {
    /// We do not have the object.
    Unknown,
    /// We have it; `new` is false if it was already known to be common.
    Common { new: bool },
}

#[derive(Default)]
pub(crate) struct Negotiation {
    /// Commits the client has: its common haves and their parents.
    they_have: HashSet<ObjectId>,
    /// Common haves in the order received; these become the uninteresting tips.
    pub common: Vec<ObjectId>,
    /// Committer time of the oldest common commit; bounds reachability checks.
    oldest_have: Option<i64>,
    /// Wants already known to reach a common commit.
    satisfied: HashSet<ObjectId>,
}

impl Negotiation {
    pub fn got_have(
        &mut self,
        cache: &mut CommitCache<'_>,
        id: ObjectId,
    ) -> Result<Have, UploadError> {
        if !cache.reader.packs().contains(&id) {
            return Ok(Have::Unknown);
        }
        let mut knew = false;
        if let Some(c) = cache.get(&id)? {
            let (time, parents) = (c.time, c.parents.clone());
            knew = !self.they_have.insert(id);
            self.oldest_have = Some(self.oldest_have.map_or(time, |t| t.min(time)));
            self.they_have.extend(parents);
        }
        if !knew {
            self.common.push(id);
        }
        Ok(Have::Common { new: !knew })
    }

    /// True once every commit want can reach a commit the client has.
    pub fn ok_to_give_up(
        &mut self,
        cache: &mut CommitCache<'_>,
        wants: &[ObjectId],
    ) -> Result<bool, UploadError> {
        if self.common.is_empty() {
            return Ok(false);
        }
        let min_time = self.oldest_have.unwrap_or(i64::MIN);
        for want in wants {
            if self.satisfied.contains(want) {
                continue;
            }
            let Some((commit, kind)) = peel(cache.reader, want)? else {
                continue;
            };
            // Reachability of trees and blobs is not decidable from history.
            if kind != Kind::Commit || self.reaches_common(cache, commit, min_time)? {
                self.satisfied.insert(*want);
                continue;
            }
            return Ok(false);
        }
        Ok(true)
    }

    fn reaches_common(
        &self,
        cache: &mut CommitCache<'_>,
        start: ObjectId,
        min_time: i64,
    ) -> Result<bool, UploadError> {
        let mut seen = HashSet::new();
        let mut stack = vec![start];
        seen.insert(start);
        while let Some(id) = stack.pop() {
            if self.they_have.contains(&id) {
                return Ok(true);
            }
            let Some(c) = cache.get(&id)? else { continue };
            let parents = c.parents.clone();
            for p in parents {
                if !seen.insert(p) {
                    continue;
                }
                if self.they_have.contains(&p) {
                    return Ok(true);
                }
                match cache.get(&p)? {
                    Some(pc) if pc.time >= min_time => stack.push(p),
                    _ => {}
                }
            }
        }
        Ok(false)
    }
}
