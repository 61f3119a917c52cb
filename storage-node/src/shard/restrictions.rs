//! Branch restrictions, kept as rows of the repository's shard (a shard
//! move carries them) and changed by entries of their own kinds; the
//! leader reads them when it validates a push.

use cairn_identity::restriction::{BranchRestriction, MAX_PER_REPO};
use cairn_raft::{GroupState, StateView};
use serde::{Deserialize, Serialize};

use super::entry::{Entry, EntryKinds};
use super::rows::{self, Format};
use super::state::ApplyError;

pub mod kinds {
    pub const SET: &str = "restrictions.set";
    pub const DELETE: &str = "restrictions.delete";
}

mod keys {
    pub const RESTRICTIONS: &[u8] = b"b/";
    pub const NEXT: &[u8] = b"b#";

    pub fn of_repo(repo: u64) -> Vec<u8> {
        [RESTRICTIONS, &repo.to_be_bytes()].concat()
    }

    pub fn restriction(repo: u64, id: u64) -> Vec<u8> {
        [RESTRICTIONS, &repo.to_be_bytes(), &id.to_be_bytes()].concat()
    }

    pub fn next(repo: u64) -> Vec<u8> {
        [NEXT, &repo.to_be_bytes()].concat()
    }
}

/// `restrictions.set`: creates (`id` 0) or replaces a restriction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Set {
    pub repo_id: u64,
    pub restriction: BranchRestriction,
}

/// `restrictions.delete`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delete {
    pub repo_id: u64,
    pub id: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    Stored(BranchRestriction),
    Deleted,
    Refused(String),
    NotFound,
}

pub struct RestrictionKinds;

fn get<T: for<'de> Deserialize<'de>>(
    state: &GroupState<'_>,
    key: &[u8],
) -> Result<Option<T>, ApplyError> {
    state
        .get(key)?
        .map(|v| rows::read_json(key, &v).map_err(ApplyError::from))
        .transpose()
}

impl EntryKinds for RestrictionKinds {
    fn kinds(&self) -> &'static [(&'static str, u16)] {
        &[(kinds::SET, 1), (kinds::DELETE, 1)]
    }

    fn row_prefixes(&self) -> &'static [&'static [u8]] {
        &[keys::RESTRICTIONS, keys::NEXT]
    }

    fn apply(&self, state: &mut GroupState<'_>, entry: &Entry) -> Result<Vec<u8>, ApplyError> {
        let answer = match entry.kind.as_str() {
            kinds::SET => {
                let Set {
                    repo_id,
                    mut restriction,
                } = entry.decode()?;
                if let Err(why) = restriction.validate() {
                    Answer::Refused(why)
                } else if restriction.id == 0 {
                    let held = state
                        .scan_prefix_limit(&keys::of_repo(repo_id), MAX_PER_REPO)?
                        .len();
                    if held >= MAX_PER_REPO {
                        Answer::Refused(format!(
                            "a repository holds at most {MAX_PER_REPO} branch restrictions"
                        ))
                    } else {
                        let id = get::<u64>(state, &keys::next(repo_id))?.unwrap_or(1);
                        restriction.id = id;
                        state.put(&keys::next(repo_id), &rows::json(Format::V1, &(id + 1)));
                        state.put(
                            &keys::restriction(repo_id, id),
                            &rows::json(Format::V1, &restriction),
                        );
                        Answer::Stored(restriction)
                    }
                } else {
                    let key = keys::restriction(repo_id, restriction.id);
                    if state.get(&key)?.is_none() {
                        Answer::NotFound
                    } else {
                        state.put(&key, &rows::json(Format::V1, &restriction));
                        Answer::Stored(restriction)
                    }
                }
            }
            kinds::DELETE => {
                let Delete { repo_id, id } = entry.decode()?;
                let key = keys::restriction(repo_id, id);
                if state.get(&key)?.is_none() {
                    Answer::NotFound
                } else {
                    state.delete(&key);
                    Answer::Deleted
                }
            }
            other => {
                return Err(ApplyError::UnknownEntry {
                    kind: other.to_owned(),
                    version: entry.version,
                    newest: None,
                })
            }
        };
        Ok(postcard::to_allocvec(&answer).expect("answers always encode"))
    }
}

/// The repository's restrictions, by id.
pub fn list(view: &StateView, repo_id: u64) -> Result<Vec<BranchRestriction>, ApplyError> {
    view.scan_prefix(&keys::of_repo(repo_id))?
        .iter()
        .map(|(k, v)| rows::read_json(k, v).map_err(ApplyError::from))
        .collect()
}
