//! Connectivity of a push: every new ref tip must reach only objects that
//! are in the repository or in the new pack. Objects already in the
//! repository are complete by invariant (every accepted push was checked),
//! so the walk stops at them and only the new pack's objects are decoded.

use std::collections::{HashMap, HashSet};

use gix_hash::ObjectId;
use gix_object::Kind;

use super::fsck::{references, Reference};
use super::{FsckId, PushRequest, ReceiveError};
use crate::store::PackSet;

/// git's wording for an unconnected tip.
pub const MISSING_OBJECTS: &str = "missing necessary objects";
const NON_COMMIT_BRANCH: &str = "cannot point a branch at a non-commit object";

/// Checks every creating or updating command; `new` holds the staged pack
/// and `kinds` the kind of each of its objects.
pub(super) fn check(
    request: &PushRequest,
    repo: &PackSet,
    new: Option<&PackSet>,
    kinds: &HashMap<ObjectId, Kind>,
) -> Result<Vec<Option<String>>, ReceiveError> {
    // Pack objects proven connected by an earlier command's walk.
    let mut connected: HashSet<ObjectId> = HashSet::new();
    let repo_reader = repo.reader();
    let new_reader = new.map(PackSet::reader);
    let mut buf = Vec::new();
    let mut refs: Vec<Reference> = Vec::new();
    let mut results = Vec::with_capacity(request.commands.len());

    for cmd in &request.commands {
        if cmd.new.is_null() {
            results.push(None);
            continue;
        }
        let tip_kind = match kinds.get(&cmd.new) {
            Some(k) => Some(*k),
            None => repo_reader.kind(&cmd.new)?,
        };
        let Some(tip_kind) = tip_kind else {
            results.push(Some(MISSING_OBJECTS.to_owned()));
            continue;
        };
        // git refuses to store anything but a commit under refs/heads/.
        if cmd.name.starts_with("refs/heads/") && tip_kind != Kind::Commit {
            results.push(Some(NON_COMMIT_BRANCH.to_owned()));
            continue;
        }

        let mut visited: HashSet<ObjectId> = HashSet::new();
        let mut stack: Vec<(ObjectId, Option<Kind>)> = vec![(cmd.new, None)];
        let mut ok = true;
        while let Some((id, want)) = stack.pop() {
            if connected.contains(&id) || visited.contains(&id) {
                continue;
            }
            let Some(&kind) = kinds.get(&id) else {
                if repo.contains(&id) {
                    continue;
                }
                ok = false;
                break;
            };
            if let Some(want) = want {
                if want != kind {
                    return Err(ReceiveError::Fsck {
                        id,
                        kind,
                        msg_id: FsckId::WrongObjectType,
                        detail: format!("referenced as a {want}"),
                    });
                }
            }
            visited.insert(id);
            if kind == Kind::Blob {
                continue;
            }
            let Some(reader) = &new_reader else {
                ok = false;
                break;
            };
            let (kind, data) = reader.get(&id, &mut buf)?;
            refs.clear();
            references(kind, data, &mut refs);
            stack.extend(refs.iter().map(|(id, k)| (*id, Some(*k))));
        }
        if ok {
            connected.extend(visited);
            results.push(None);
        } else {
            results.push(Some(MISSING_OBJECTS.to_owned()));
        }
    }
    Ok(results)
}
