//! Shard entries that can grow: each names its kind and the kind's format
//! version, and carries what every kind shares (the leader's clock, the
//! acting identity) beside its own payload.
//!
//! The git kinds are built into the shard (`GIT_KINDS`); a service adds its
//! own by implementing [`EntryKinds`] and registering it when the shard
//! logic is built — no enum elsewhere is edited. Applying an entry whose
//! kind no one registered, or whose version is newer than its kind reads,
//! fails: the replica stops applying (the raft layer treats an apply error
//! as fatal) rather than misapply it, and says why in its log.

use std::collections::BTreeMap;
use std::sync::Arc;

use cairn_raft::GroupState;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::state::ApplyError;

/// One versioned shard entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Registered kind, e.g. `git.push`.
    pub kind: String,
    /// The kind's format version of `payload`.
    pub version: u16,
    /// The proposing leader's clock, milliseconds since the epoch.
    pub at_ms: i64,
    /// Who asked for it; `None` until identities exist.
    pub actor: Option<String>,
    /// The kind's own encoding (postcard).
    pub payload: Vec<u8>,
}

impl Entry {
    pub fn new<T: Serialize>(kind: &str, version: u16, actor: Option<String>, payload: &T) -> Self {
        Entry {
            kind: kind.to_owned(),
            version,
            at_ms: now_ms(),
            actor,
            payload: postcard::to_allocvec(payload).expect("entry payloads always encode"),
        }
    }

    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, ApplyError> {
        postcard::from_bytes(&self.payload).map_err(|e| ApplyError::Payload {
            kind: self.kind.clone(),
            message: e.to_string(),
        })
    }
}

/// Milliseconds since the epoch by this node's clock.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A family of entry kinds a service adds to every shard.
pub trait EntryKinds: Send + Sync + 'static {
    /// The kinds handled, each with the newest format version it reads.
    fn kinds(&self) -> &'static [(&'static str, u16)];

    /// Key prefixes of the row families its kinds write; no two families
    /// may overlap (one prefix starting another), the git rows included.
    fn row_prefixes(&self) -> &'static [&'static [u8]];

    /// Applies `entry` (one of [`EntryKinds::kinds`], at a version it
    /// reads): reads and writes only `state`, deterministically; returns
    /// the kind's own encoding of its answer.
    fn apply(&self, state: &mut GroupState<'_>, entry: &Entry) -> Result<Vec<u8>, ApplyError>;
}

/// The registered kinds of a shard.
#[derive(Default, Clone)]
pub struct Registry {
    by_kind: BTreeMap<&'static str, (u16, Arc<dyn EntryKinds>)>,
    /// Row prefixes taken, each with the family that took it.
    rows: Vec<(&'static [u8], &'static str)>,
}

impl Registry {
    /// Takes `prefixes` for `family`'s rows; one that overlaps a prefix
    /// already taken is a wiring mistake, answered by the error naming both.
    pub fn reserve_rows(
        &mut self,
        family: &'static str,
        prefixes: &[&'static [u8]],
    ) -> Result<(), ApplyError> {
        for &p in prefixes {
            if let Some((taken, by)) = self
                .rows
                .iter()
                .find(|(t, _)| t.starts_with(p) || p.starts_with(t))
            {
                return Err(ApplyError::OverlappingRows {
                    prefix: String::from_utf8_lossy(p).into_owned(),
                    family,
                    taken: String::from_utf8_lossy(taken).into_owned(),
                    by,
                });
            }
            self.rows.push((p, family));
        }
        Ok(())
    }

    /// Adds `kinds` and reserves their rows; a kind registered twice is a
    /// wiring mistake, answered by the error naming it.
    pub fn register(&mut self, kinds: Arc<dyn EntryKinds>) -> Result<(), ApplyError> {
        let family = kinds.kinds().first().map_or("(no kinds)", |(k, _)| *k);
        for &(kind, _) in kinds.kinds() {
            if self.by_kind.contains_key(kind) {
                return Err(ApplyError::DuplicateKind(kind.to_owned()));
            }
        }
        self.reserve_rows(family, kinds.row_prefixes())?;
        for &(kind, version) in kinds.kinds() {
            self.by_kind.insert(kind, (version, kinds.clone()));
        }
        Ok(())
    }

    /// The handler of `kind` if it reads `version`.
    pub fn handler(&self, kind: &str, version: u16) -> Result<&Arc<dyn EntryKinds>, ApplyError> {
        match self.by_kind.get(kind) {
            Some((newest, h)) if version <= *newest => Ok(h),
            found => {
                let err = ApplyError::UnknownEntry {
                    kind: kind.to_owned(),
                    version,
                    newest: found.map(|(v, _)| *v),
                };
                tracing::error!(error = %err, "cannot apply a shard entry; this replica stops applying");
                Err(err)
            }
        }
    }

    pub fn kinds(&self) -> impl Iterator<Item = (&'static str, u16)> + '_ {
        self.by_kind.iter().map(|(k, (v, _))| (*k, *v))
    }
}
