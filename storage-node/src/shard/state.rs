//! What a shard's replicated state machine means: repositories, refs and
//! pack lists, and how each Raft entry changes them.
//!
//! Entries are versioned (`entry::Entry`: a kind and its format version);
//! the git kinds (`GIT_KINDS`) are built in, services register theirs
//! (`entry::EntryKinds`), the event log's among them. The unversioned
//! `ShardRequest` variants of earlier releases still apply, exactly as they
//! did, for logs written before: their rows keep the unversioned format
//! (`rows`) and they record no events.
//!
//! Applying is deterministic on every replica: it reads only the shard's
//! own state (as of before the entry) and the entry itself — the leader's
//! clock and choices travel inside the entry. Results are logged, never
//! requests' intentions: a `Push` entry carries the per-command rejections
//! the leader found while validating the pack, and apply adds the
//! compare-and-swap outcome against this replica's refs. Results are kept
//! by push id, so a proposal retried after an unknown outcome returns the
//! original answer instead of applying twice.
//!
//! Where packs live is not this module's business: before an accepted push
//! commits, [`PackPlacer::ensure`] must make the pack durable in the
//! replica's pack directory (moving a staged copy or fetching it from a
//! peer). Rows that arrive without their entries — an installed snapshot —
//! get the same promise from `reconcile`: every pack the pack lists name is
//! made present ([`PackPlacer::ensure_all`]) before the install returns, and
//! again whenever the shard is opened.

use std::path::PathBuf;

use cairn_packfile::receive::{self, Command};
use cairn_packfile::refs::{RefRecord, RepoRefs};
use cairn_packfile::ObjectId;
use cairn_raft::{ApplyLogic, GroupId, GroupState, StateView, StopSignal};
use serde::{Deserialize, Serialize};

use std::sync::Arc;

use super::entry::{Entry, EntryKinds, Registry};
use super::events::{self, Event, EventKind, EventKinds, RefChange};
use super::rows::{self, Format, RowError};
use crate::names::{self, CasePlan};
use crate::repo::RepoRecord;

pub const DEFAULT_HEAD: &str = "refs/heads/main";

/// Bits of a repository id below its shard's.
const REPO_ID_SHARD_SHIFT: u32 = 40;

/// Repository ids are unique across shards: the shard id in the high bits,
/// the shard's own counter below.
fn repo_id(shard: u64, counter: u64) -> u64 {
    (shard << REPO_ID_SHARD_SHIFT) | counter
}

/// The shard a repository lives on, from its id.
pub fn shard_of_repo(repo_id: u64) -> u64 {
    repo_id >> REPO_ID_SHARD_SHIFT
}

/// Row keys, relative to the shard (the raft layer adds the shard prefix).
pub mod keys {
    pub const NEXT_REPO: &[u8] = b"n";

    pub fn repo(workspace: &str, slug: &str) -> Vec<u8> {
        let mut k = b"r/".to_vec();
        k.extend_from_slice(workspace.as_bytes());
        k.push(b'/');
        k.extend_from_slice(slug.as_bytes());
        k
    }

    /// Prefix of every repository record.
    pub const REPOS: &[u8] = b"r/";

    pub fn repos_of(workspace: &str) -> Vec<u8> {
        if workspace.is_empty() {
            REPOS.to_vec()
        } else {
            repo(workspace, "")
        }
    }

    /// Repository id → `workspace/slug`, for entries that name a repo by id.
    pub fn repo_by_id(id: u64) -> Vec<u8> {
        with_id(b"i/", id, b"")
    }

    pub fn refs_of(id: u64) -> Vec<u8> {
        with_id(b"f/", id, b"")
    }

    pub fn ref_(id: u64, name: &str) -> Vec<u8> {
        with_id(b"f/", id, name.as_bytes())
    }

    /// Prefix of every repository's pack list.
    pub const PACKS: &[u8] = b"p/";

    pub fn packs_of(id: u64) -> Vec<u8> {
        with_id(PACKS, id, b"")
    }

    pub fn pack(id: u64, pack_hex: &str) -> Vec<u8> {
        with_id(PACKS, id, pack_hex.as_bytes())
    }

    /// The repository id and pack id of a key made by [`pack`].
    pub fn parse_pack(key: &[u8]) -> Option<(u64, &str)> {
        let rest = key.strip_prefix(PACKS)?;
        let (id, pack) = rest.split_first_chunk::<8>()?;
        Some((u64::from_be_bytes(*id), std::str::from_utf8(pack).ok()?))
    }

    /// Legacy repository names (`workspace/slug`) that differ only in case,
    /// by their canonical form: JSON list of the stored names. While one
    /// exists, no repository of that name can be created.
    pub const CASE_CLASHES: &[u8] = b"c/";

    pub fn case_clash(canonical: &str) -> Vec<u8> {
        let mut k = CASE_CLASHES.to_vec();
        k.extend_from_slice(canonical.as_bytes());
        k
    }

    pub fn push(push_id: &str) -> Vec<u8> {
        let mut k = b"u/".to_vec();
        k.extend_from_slice(push_id.as_bytes());
        k
    }

    /// Push results in the order their entries were applied (log index
    /// first), so the oldest can be pruned without a full scan.
    pub const PUSHES_BY_AGE: &[u8] = b"t/";

    pub fn push_by_age(index: u64, push_id: &str) -> Vec<u8> {
        with_id(PUSHES_BY_AGE, index, push_id.as_bytes())
    }

    /// Every prefix above: the git rows, which no service's rows may
    /// overlap.
    pub const GIT_ROWS: &[&[u8]] = &[
        NEXT_REPO,
        REPOS,
        b"i/",
        b"f/",
        PACKS,
        CASE_CLASHES,
        b"u/",
        PUSHES_BY_AGE,
    ];

    fn with_id(tag: &[u8], id: u64, rest: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(tag.len() + 8 + rest.len());
        k.extend_from_slice(tag);
        k.extend_from_slice(&id.to_be_bytes());
        k.extend_from_slice(rest);
        k
    }
}

/// A validated pack a push commits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackRef {
    /// The pack checksum, lower-case hex; names `pack-<id>.{pack,idx}`.
    pub id: String,
    pub objects: u64,
    pub bytes: u64,
}

/// One ref update as logged: a compare-and-swap from `old` to `new`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoggedUpdate {
    pub name: String,
    pub old: [u8; 20],
    pub new: [u8; 20],
}

impl LoggedUpdate {
    pub fn from_command(c: &Command) -> Self {
        let mut old = [0u8; 20];
        old.copy_from_slice(c.old.as_bytes());
        let mut new = [0u8; 20];
        new.copy_from_slice(c.new.as_bytes());
        LoggedUpdate {
            name: c.name.clone(),
            old,
            new,
        }
    }

    fn command(&self) -> Command {
        Command {
            old: ObjectId::from_bytes_or_panic(&self.old),
            new: ObjectId::from_bytes_or_panic(&self.new),
            name: self.name.clone(),
        }
    }
}

/// A Raft entry of a shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardRequest {
    CreateRepo {
        workspace: String,
        slug: String,
        is_private: bool,
        description: String,
        /// Leader's clock, seconds since the epoch.
        created_at: i64,
    },
    DeleteRepo {
        workspace: String,
        slug: String,
    },
    Push {
        repo_id: u64,
        /// Chosen by the proposer; identifies the push across retries.
        push_id: String,
        pack: Option<PackRef>,
        updates: Vec<LoggedUpdate>,
        atomic: bool,
        /// Per-update rejections found while validating the pack.
        prior: Vec<Option<String>>,
    },
    /// Moves repositories stored under a legacy name (written before names
    /// were compared without case) to their canonical key, and records the
    /// names that clash. Deterministic from the state alone, idempotent.
    CanonicalizeNames,
    /// A versioned entry; every proposal of this release is one.
    Entry(Entry),
}

/// The built-in git kinds and the newest version each reads.
pub mod git_kinds {
    pub const CREATE: &str = "repo.create";
    pub const DELETE: &str = "repo.delete";
    pub const PUSH: &str = "git.push";
    pub const UPDATE: &str = "repo.update";
    pub const CANONICALIZE: &str = "repo.canonicalize-names";
}

pub const GIT_KINDS: &[(&str, u16)] = &[
    (git_kinds::CREATE, 1),
    (git_kinds::DELETE, 1),
    (git_kinds::PUSH, 1),
    (git_kinds::CANONICALIZE, 1),
    (git_kinds::UPDATE, 1),
];

/// `repo.update` v1: what changes (`None`: unchanged).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateRepo {
    pub workspace: String,
    pub slug: String,
    pub is_private: Option<bool>,
    pub description: Option<String>,
    /// Full ref name, `refs/heads/…`.
    pub head: Option<String>,
}

/// `repo.create` v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateRepo {
    pub workspace: String,
    pub slug: String,
    pub is_private: bool,
    pub description: String,
}

/// `repo.delete` v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteRepo {
    pub workspace: String,
    pub slug: String,
}

/// `git.push` v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Push {
    pub repo_id: u64,
    /// Chosen by the proposer; identifies the push across retries.
    pub push_id: String,
    pub pack: Option<PackRef>,
    pub updates: Vec<LoggedUpdate>,
    pub atomic: bool,
    /// Per-update rejections found while validating the pack.
    pub prior: Vec<Option<String>>,
    pub push_options: Vec<String>,
}

/// `repo.canonicalize-names` v1 (no fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanonicalizeNames;

/// What applying an entry answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardResponse {
    Repo(RepoRecord),
    Deleted(RepoRecord),
    /// Per update, `Err(reason)` if refused.
    Pushed(Vec<Result<(), String>>),
    /// The request was refused as a whole, with a short human reason.
    Refused(Refusal),
    /// `CanonicalizeNames`: how many repositories moved, and the names that
    /// clash (by canonical form).
    Canonicalized {
        renamed: u64,
        clashes: Vec<Vec<String>>,
    },
    /// A registered kind's own encoding of its answer.
    Entry(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    RepoExists,
    RepoNotFound,
    InvalidName(String),
}

/// The legacy names of one replica's shard state (see `names`).
pub fn case_status(view: &StateView) -> Result<names::CaseStatus, cairn_raft::StoreError> {
    let tail = |prefix: &[u8], rows: Vec<(Vec<u8>, Vec<u8>)>| -> Vec<String> {
        rows.into_iter()
            .map(|(k, _)| String::from_utf8_lossy(&k[prefix.len()..]).into_owned())
            .collect()
    };
    let stored = tail(keys::REPOS, view.scan_prefix(keys::REPOS)?);
    let recorded = tail(keys::CASE_CLASHES, view.scan_prefix(keys::CASE_CLASHES)?);
    let mut status = names::CaseStatus::default();
    status.add("repository", stored, Some(recorded));
    Ok(status)
}

/// Makes a committed push's pack durable in the replica's pack directory.
pub trait PackPlacer: Send + Sync + 'static {
    /// Must not return until `pack-<id>.{pack,idx}` are fsynced under the
    /// repository's pack directory; retries as long as it takes (a quorum
    /// held the pack before the entry was proposed). An error stops apply.
    fn ensure(
        &self,
        shard: GroupId,
        repo_id: u64,
        pack: &PackRef,
    ) -> Result<PathBuf, std::io::Error>;

    /// Makes every `(repo id, pack)` of `packs` present like
    /// [`PackPlacer::ensure`], leaving packs already in place untouched.
    /// Once `stop` is raised it may return early, with anything.
    fn ensure_all(
        &self,
        shard: GroupId,
        packs: &[(u64, PackRef)],
        stop: &StopSignal,
    ) -> Result<(), std::io::Error> {
        for (repo_id, pack) in packs {
            if stop.is_stopped() {
                break;
            }
            self.ensure(shard, *repo_id, pack)?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("reading shard state: {0}")]
    State(#[from] cairn_raft::StoreError),
    #[error("corrupt row {key:?}: {message}")]
    Corrupt { key: String, message: String },
    #[error("placing pack {pack} of repository {repo_id}: {source}")]
    Pack {
        repo_id: u64,
        pack: String,
        source: std::io::Error,
    },
    #[error("making the packs of shard {shard} present: {source}")]
    Packs { shard: u64, source: std::io::Error },
    #[error(transparent)]
    Row(#[from] RowError),
    /// No registered kind reads this entry: the replica must not guess.
    #[error("entry kind {kind:?} version {version} is not known here (newest known: {newest:?}); upgrade this node")]
    UnknownEntry {
        kind: String,
        version: u16,
        newest: Option<u16>,
    },
    #[error("entry kind {0:?} is registered twice")]
    DuplicateKind(String),
    #[error("rows {prefix:?} of {family} overlap rows {taken:?} of {by}")]
    OverlappingRows {
        prefix: String,
        family: &'static str,
        taken: String,
        by: &'static str,
    },
    #[error("entry of kind {kind:?} does not decode: {message}")]
    Payload { kind: String, message: String },
}

/// Pack rows handed to the placer at once: bounds memory however many packs
/// a shard holds, and lets fetches of one page run concurrently.
const RECONCILE_PAGE: usize = 256;

/// The `ApplyLogic` of every shard group.
pub struct ShardLogic<P> {
    placer: P,
    /// Kinds beyond the built-in git ones.
    registry: Registry,
}

impl<P: PackPlacer> ShardLogic<P> {
    /// The git kinds and the event log's.
    pub fn new(placer: P) -> Self {
        Self::with_kinds(placer, Vec::new()).expect("the built-in kinds do not clash")
    }

    /// Also the kinds of `services` (see `entry`).
    pub fn with_kinds(placer: P, services: Vec<Arc<dyn EntryKinds>>) -> Result<Self, ApplyError> {
        let mut registry = Registry::default();
        registry.reserve_rows("git", keys::GIT_ROWS)?;
        let built_in: [Arc<dyn EntryKinds>; 2] = [
            Arc::new(EventKinds),
            Arc::new(super::restrictions::RestrictionKinds),
        ];
        for kinds in built_in.into_iter().chain(services) {
            if let Some((kind, _)) = kinds
                .kinds()
                .iter()
                .find(|(k, _)| GIT_KINDS.iter().any(|(g, _)| g == k))
            {
                return Err(ApplyError::DuplicateKind((*kind).to_owned()));
            }
            registry.register(kinds)?;
        }
        Ok(ShardLogic { placer, registry })
    }

    /// Every kind this shard applies, with the newest version of each.
    pub fn kinds(&self) -> Vec<(&'static str, u16)> {
        GIT_KINDS
            .iter()
            .copied()
            .chain(self.registry.kinds())
            .collect()
    }
}

fn corrupt(key: &[u8], message: impl ToString) -> ApplyError {
    ApplyError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        message: message.to_string(),
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(
    state: &GroupState<'_>,
    key: &[u8],
) -> Result<Option<T>, ApplyError> {
    match state.get(key)? {
        Some(v) => Ok(Some(rows::read_json(key, &v)?)),
        None => Ok(None),
    }
}

/// Reads a repository's refs from rows `(key, value)` under `keys::refs_of`.
pub fn refs_from_rows(
    prefix_len: usize,
    rows: Vec<(Vec<u8>, Vec<u8>)>,
    head: String,
) -> Result<RepoRefs, ApplyError> {
    let mut refs = Vec::with_capacity(rows.len());
    for (k, v) in rows {
        let name = String::from_utf8(k[prefix_len..].to_vec()).map_err(|e| corrupt(&k, e))?;
        let target = rows::read_oid(&k, &v)?;
        refs.push(RefRecord { name, target });
    }
    Ok(RepoRefs::new(refs, Some(head)))
}

impl<P: PackPlacer> ShardLogic<P> {
    fn update_repo(
        state: &mut GroupState<'_>,
        fmt: Format,
        u: UpdateRepo,
    ) -> Result<ShardResponse, ApplyError> {
        let key = keys::repo(&u.workspace, &u.slug);
        let Some(row) = state.get(&key)? else {
            return Ok(ShardResponse::Refused(Refusal::RepoNotFound));
        };
        let mut record: RepoRecord = rows::read_json(&key, &row)?;
        if let Some(d) = u.description {
            if let Err(e) = names::validate_description(&d) {
                return Ok(ShardResponse::Refused(Refusal::InvalidName(e.to_string())));
            }
            record.description = d;
        }
        if let Some(head) = u.head {
            let valid = head.starts_with("refs/heads/")
                && head.len() <= cairn_packfile::receive::MAX_REF_NAME_LEN
                && cairn_packfile::receive::check_ref_name(&head).is_ok();
            if !valid {
                return Ok(ShardResponse::Refused(Refusal::InvalidName(format!(
                    "invalid main branch {head:?}"
                ))));
            }
            record.head = head;
        }
        if let Some(p) = u.is_private {
            record.is_private = p;
        }
        state.put(&key, &rows::json(fmt, &record));
        Ok(ShardResponse::Repo(record))
    }

    #[allow(clippy::too_many_arguments)]
    fn create_repo(
        &self,
        state: &mut GroupState<'_>,
        fmt: Format,
        workspace: String,
        slug: String,
        is_private: bool,
        description: String,
        created_at: i64,
    ) -> Result<ShardResponse, ApplyError> {
        for (what, value) in [("workspace", &workspace), ("repository slug", &slug)] {
            if let Err(e) = names::validate(what, value) {
                return Ok(ShardResponse::Refused(Refusal::InvalidName(e.to_string())));
            }
        }
        let key = keys::repo(&workspace, &slug);
        let clash = keys::case_clash(&names::canonical(&format!("{workspace}/{slug}")));
        if state.get(&key)?.is_some() || state.get(&clash)?.is_some() {
            return Ok(ShardResponse::Refused(Refusal::RepoExists));
        }
        let counter = match state.get(keys::NEXT_REPO)? {
            Some(v) => u64::from_be_bytes(
                v.as_slice()
                    .try_into()
                    .map_err(|_| corrupt(keys::NEXT_REPO, "not 8 bytes"))?,
            ),
            None => 1,
        };
        let id = repo_id(state.group().0, counter);
        let record = RepoRecord {
            id,
            workspace,
            slug,
            head: DEFAULT_HEAD.to_owned(),
            is_private,
            description,
            created_at,
        };
        // The counter is a bare number in every format: nothing else reads it.
        state.put(keys::NEXT_REPO, &(counter + 1).to_be_bytes());
        state.put(&key, &rows::json(fmt, &record));
        state.put(
            &keys::repo_by_id(id),
            &rows::text(fmt, &format!("{}/{}", record.workspace, record.slug)),
        );
        Ok(ShardResponse::Repo(record))
    }

    fn delete_repo(
        &self,
        state: &mut GroupState<'_>,
        fmt: Format,
        workspace: &str,
        slug: &str,
    ) -> Result<(ShardResponse, Vec<RefChange>), ApplyError> {
        let key = keys::repo(workspace, slug);
        let Some(record) = read_json::<RepoRecord>(state, &key)? else {
            return Ok((ShardResponse::Refused(Refusal::RepoNotFound), Vec::new()));
        };
        state.delete(&key);
        state.delete(&keys::repo_by_id(record.id));
        let refs = keys::refs_of(record.id);
        let mut removed = Vec::new();
        for (k, v) in state.scan_prefix(&refs)? {
            removed.push(RefChange {
                name: String::from_utf8_lossy(&k[refs.len()..]).into_owned(),
                old: rows::read_oid(&k, &v)?.to_string(),
                new: ObjectId::null(gix_hash::Kind::Sha1).to_string(),
            });
            state.delete(&k);
        }
        for (k, _) in state.scan_prefix(&keys::packs_of(record.id))? {
            state.delete(&k);
        }
        self.settle_clash(state, fmt, &format!("{workspace}/{slug}"))?;
        Ok((ShardResponse::Deleted(record), removed))
    }

    /// After `deleted` (a stored `workspace/slug`) is gone: if it was one of
    /// a clash, the clash shrinks, and its last name takes the canonical key.
    fn settle_clash(
        &self,
        state: &mut GroupState<'_>,
        fmt: Format,
        deleted: &str,
    ) -> Result<(), ApplyError> {
        let canonical = names::canonical(deleted);
        let clash_key = keys::case_clash(&canonical);
        let Some(mut left) = read_json::<Vec<String>>(state, &clash_key)? else {
            return Ok(());
        };
        left.retain(|n| n != deleted);
        if left.len() > 1 {
            state.put(&clash_key, &rows::json(fmt, &left));
            return Ok(());
        }
        state.delete(&clash_key);
        if let Some(last) = left.pop() {
            self.rename_repo(state, fmt, &last, &canonical)?;
        }
        Ok(())
    }

    /// Moves the repository stored as `from` (`workspace/slug`) to `to`,
    /// which no other repository may hold.
    fn rename_repo(
        &self,
        state: &mut GroupState<'_>,
        fmt: Format,
        from: &str,
        to: &str,
    ) -> Result<(), ApplyError> {
        let split = |name: &str| -> Option<(String, String)> {
            name.split_once('/')
                .map(|(w, s)| (w.to_owned(), s.to_owned()))
        };
        let (Some((from_ws, from_slug)), Some((to_ws, to_slug))) = (split(from), split(to)) else {
            return Err(corrupt(from.as_bytes(), "not workspace/slug"));
        };
        let from_key = keys::repo(&from_ws, &from_slug);
        let to_key = keys::repo(&to_ws, &to_slug);
        // `to` is free: no other stored name has its canonical form (reads
        // here see the state before the entry, so do not ask the state).
        if from_key == to_key {
            return Ok(());
        }
        let Some(mut record) = read_json::<RepoRecord>(state, &from_key)? else {
            return Ok(());
        };
        record.workspace = to_ws;
        record.slug = to_slug;
        state.delete(&from_key);
        state.put(&to_key, &rows::json(fmt, &record));
        state.put(&keys::repo_by_id(record.id), &rows::text(fmt, to));
        Ok(())
    }

    fn canonicalize_names(
        &self,
        state: &mut GroupState<'_>,
        fmt: Format,
    ) -> Result<ShardResponse, ApplyError> {
        let stored: Vec<String> = state
            .scan_prefix(keys::REPOS)?
            .into_iter()
            .map(|(k, _)| String::from_utf8_lossy(&k[keys::REPOS.len()..]).into_owned())
            .collect();
        let CasePlan { renames, clashes } = names::plan_case_migration(stored);
        for (from, to) in &renames {
            self.rename_repo(state, fmt, from, to)?;
        }
        for (k, _) in state.scan_prefix(keys::CASE_CLASHES)? {
            let canonical = String::from_utf8_lossy(&k[keys::CASE_CLASHES.len()..]).into_owned();
            if !clashes.contains_key(&canonical) {
                state.delete(&k);
            }
        }
        for (canonical, names) in &clashes {
            state.put(&keys::case_clash(canonical), &rows::json(fmt, names));
        }
        Ok(ShardResponse::Canonicalized {
            renamed: renames.len() as u64,
            clashes: clashes.into_values().collect(),
        })
    }

    fn record_by_id(
        &self,
        state: &GroupState<'_>,
        id: u64,
    ) -> Result<Option<(Vec<u8>, RepoRecord)>, ApplyError> {
        let Some(name) = state.get(&keys::repo_by_id(id))? else {
            return Ok(None);
        };
        let name = rows::read_text(&keys::repo_by_id(id), &name)?;
        let (ws, slug) = name
            .split_once('/')
            .ok_or_else(|| corrupt(&keys::repo_by_id(id), "not workspace/slug"))?;
        let key = keys::repo(ws, slug);
        Ok(read_json::<RepoRecord>(state, &key)?.map(|r| (key, r)))
    }

    /// A push; with `entry` (a versioned one), its event too.
    fn push(
        &self,
        state: &mut GroupState<'_>,
        fmt: Format,
        push: &Push,
        entry: Option<&Entry>,
    ) -> Result<ShardResponse, ApplyError> {
        let Push {
            repo_id,
            push_id,
            pack,
            updates,
            atomic,
            prior,
            push_options,
        } = push;
        let (repo_id, atomic) = (*repo_id, *atomic);
        let push_key = keys::push(push_id);
        if let Some(done) = read_json::<Vec<Result<(), String>>>(state, &push_key)? {
            return Ok(ShardResponse::Pushed(done));
        }
        let Some((record_key, record)) = self.record_by_id(state, repo_id)? else {
            let gone = vec![Err("repository no longer exists".to_owned()); updates.len()];
            return Ok(ShardResponse::Pushed(gone));
        };
        let prefix = keys::refs_of(repo_id);
        let current = refs_from_rows(
            prefix.len(),
            state.scan_prefix(&prefix)?,
            record.head.clone(),
        )?;
        let commands: Vec<Command> = updates.iter().map(LoggedUpdate::command).collect();
        let mut prior = prior.to_vec();
        prior.resize(commands.len(), None);
        let results = receive::plan_updates(&current, &commands, atomic, &prior);

        if results.iter().any(|r| r.is_ok()) {
            if let Some(pack) = pack {
                self.placer
                    .ensure(state.group(), repo_id, pack)
                    .map_err(|source| ApplyError::Pack {
                        repo_id,
                        pack: pack.id.clone(),
                        source,
                    })?;
                state.put(&keys::pack(repo_id, &pack.id), &rows::json(fmt, pack));
            }
            let mut created_branch = None;
            for (cmd, res) in commands.iter().zip(&results) {
                if res.is_err() {
                    continue;
                }
                let key = keys::ref_(repo_id, &cmd.name);
                if cmd.new.is_null() {
                    state.delete(&key);
                } else {
                    state.put(&key, &rows::oid(fmt, &cmd.new));
                    if cmd.old.is_null() && cmd.name.starts_with("refs/heads/") {
                        created_branch.get_or_insert(cmd.name.clone());
                    }
                }
            }
            // HEAD follows the first branch pushed while its target is
            // missing, so a clone checks out what was pushed.
            let head_exists_after = current.get(&record.head).is_some()
                || commands
                    .iter()
                    .zip(&results)
                    .any(|(c, r)| r.is_ok() && c.name == record.head && !c.new.is_null());
            if let (false, Some(branch)) = (head_exists_after, created_branch) {
                let mut updated = record.clone();
                updated.head = branch;
                state.put(&record_key, &rows::json(fmt, &updated));
            }
            if let Some(entry) = entry {
                let changes = commands
                    .iter()
                    .zip(&results)
                    .filter(|(_, r)| r.is_ok())
                    .map(|(c, _)| RefChange {
                        name: c.name.clone(),
                        old: c.old.to_string(),
                        new: c.new.to_string(),
                    })
                    .collect();
                events::record(
                    state,
                    &Event {
                        index: state.log_id().index(),
                        at_ms: entry.at_ms,
                        kind: EventKind::Push,
                        repo_id,
                        repository: format!("{}/{}", record.workspace, record.slug),
                        changes,
                        actor: entry.actor.clone(),
                        push_options: push_options.clone(),
                    },
                )?;
            }
        }
        state.put(&push_key, &rows::json(fmt, &results));
        let index = state.log_id().index();
        state.put(&keys::push_by_age(index, push_id), &rows::marker(fmt));
        prune_push_results(state, index)?;
        Ok(ShardResponse::Pushed(results))
    }
}

/// How many log entries a push result outlives its push. It answers a push
/// whose leader was lost mid-commit; that is settled within seconds, so a
/// window this long is generous even on a busy shard.
pub const PUSH_RESULT_RETENTION: u64 = 100_000;

/// Most results removed per applied push: bounded work per entry, still
/// faster than pushes add them.
const PRUNE_BATCH: usize = 4;

/// Deletes the oldest push results whose entries are more than
/// [`PUSH_RESULT_RETENTION`] entries before `index`. Deterministic (it
/// depends only on the state and the log index), so every replica prunes
/// the same rows.
fn prune_push_results(state: &mut GroupState<'_>, index: u64) -> Result<(), ApplyError> {
    let Some(horizon) = index.checked_sub(PUSH_RESULT_RETENTION) else {
        return Ok(());
    };
    let prefix = keys::PUSHES_BY_AGE;
    for (key, _) in state.scan_prefix_limit(prefix, PRUNE_BATCH)? {
        let Some(rest) = key.get(prefix.len()..) else {
            continue;
        };
        let Some((at, push_id)) = rest.split_first_chunk::<8>() else {
            continue;
        };
        if u64::from_be_bytes(*at) >= horizon {
            break;
        }
        state.delete(&keys::push(&String::from_utf8_lossy(push_id)));
        state.delete(&key);
    }
    Ok(())
}

impl<P: PackPlacer> ShardLogic<P> {
    /// A versioned entry: a git kind, or a registered one.
    fn apply_entry(
        &self,
        state: &mut GroupState<'_>,
        entry: &Entry,
    ) -> Result<ShardResponse, ApplyError> {
        let git = GIT_KINDS
            .iter()
            .find(|(k, _)| *k == entry.kind)
            .map(|(_, newest)| *newest);
        let Some(newest) = git else {
            let handler = self.registry.handler(&entry.kind, entry.version)?;
            return Ok(ShardResponse::Entry(handler.apply(state, entry)?));
        };
        if entry.version > newest {
            let err = ApplyError::UnknownEntry {
                kind: entry.kind.clone(),
                version: entry.version,
                newest: Some(newest),
            };
            tracing::error!(error = %err, "cannot apply a shard entry; this replica stops applying");
            return Err(err);
        }
        let fmt = Format::V1;
        let index = state.log_id().index();
        let event = |kind, record: &RepoRecord, changes| Event {
            index,
            at_ms: entry.at_ms,
            kind,
            repo_id: record.id,
            repository: format!("{}/{}", record.workspace, record.slug),
            changes,
            actor: entry.actor.clone(),
            push_options: Vec::new(),
        };
        match entry.kind.as_str() {
            git_kinds::CREATE => {
                let c: CreateRepo = entry.decode()?;
                let created_at = entry.at_ms.div_euclid(1000);
                let response = self.create_repo(
                    state,
                    fmt,
                    c.workspace,
                    c.slug,
                    c.is_private,
                    c.description,
                    created_at,
                )?;
                if let ShardResponse::Repo(record) = &response {
                    let e = event(EventKind::RepoCreated, record, Vec::new());
                    events::record(state, &e)?;
                }
                Ok(response)
            }
            git_kinds::DELETE => {
                let d: DeleteRepo = entry.decode()?;
                let (response, removed) = self.delete_repo(state, fmt, &d.workspace, &d.slug)?;
                if let ShardResponse::Deleted(record) = &response {
                    let e = event(EventKind::RepoDeleted, record, removed);
                    events::record(state, &e)?;
                }
                Ok(response)
            }
            git_kinds::PUSH => {
                let p: Push = entry.decode()?;
                self.push(state, fmt, &p, Some(entry))
            }
            git_kinds::UPDATE => {
                let u: UpdateRepo = entry.decode()?;
                let response = Self::update_repo(state, fmt, u)?;
                if let ShardResponse::Repo(record) = &response {
                    let e = event(EventKind::RepoUpdated, record, Vec::new());
                    events::record(state, &e)?;
                }
                Ok(response)
            }
            _ => {
                let _: CanonicalizeNames = entry.decode()?;
                self.canonicalize_names(state, fmt)
            }
        }
    }
}

impl<P: PackPlacer> ApplyLogic for ShardLogic<P> {
    type Request = ShardRequest;
    type Response = ShardResponse;
    type Error = ApplyError;

    fn apply(
        &self,
        state: &mut GroupState<'_>,
        request: ShardRequest,
    ) -> Result<ShardResponse, ApplyError> {
        match request {
            ShardRequest::CreateRepo {
                workspace,
                slug,
                is_private,
                description,
                created_at,
            } => self.create_repo(
                state,
                Format::Legacy,
                workspace,
                slug,
                is_private,
                description,
                created_at,
            ),
            ShardRequest::DeleteRepo { workspace, slug } => Ok(self
                .delete_repo(state, Format::Legacy, &workspace, &slug)?
                .0),
            ShardRequest::Push {
                repo_id,
                push_id,
                pack,
                updates,
                atomic,
                prior,
            } => {
                let push = Push {
                    repo_id,
                    push_id,
                    pack,
                    updates,
                    atomic,
                    prior,
                    push_options: Vec::new(),
                };
                self.push(state, Format::Legacy, &push, None)
            }
            ShardRequest::CanonicalizeNames => self.canonicalize_names(state, Format::Legacy),
            ShardRequest::Entry(entry) => self.apply_entry(state, &entry),
        }
    }

    fn reconciles(&self) -> bool {
        true
    }

    /// Every pack any repository's pack list names must be on disk before
    /// refs that need it are served.
    fn reconcile(&self, view: &StateView, stop: &StopSignal) -> Result<(), ApplyError> {
        let shard = view.group();
        let mut after: Option<Vec<u8>> = None;
        let mut checked = 0usize;
        loop {
            if stop.is_stopped() {
                return Ok(());
            }
            let rows = view.scan_prefix_page(keys::PACKS, after.as_deref(), RECONCILE_PAGE)?;
            let Some((last, _)) = rows.last() else {
                break;
            };
            after = Some(last.clone());
            let mut packs = Vec::with_capacity(rows.len());
            for (key, value) in &rows {
                let (repo_id, pack_hex) =
                    keys::parse_pack(key).ok_or_else(|| corrupt(key, "not a pack key"))?;
                let pack: PackRef = rows::read_json(key, value)?;
                if pack.id != pack_hex {
                    return Err(corrupt(key, "pack row names another pack"));
                }
                packs.push((repo_id, pack));
            }
            checked += packs.len();
            match self.placer.ensure_all(shard, &packs, stop) {
                Ok(()) => {}
                Err(_) if stop.is_stopped() => return Ok(()),
                Err(source) => {
                    return Err(ApplyError::Packs {
                        shard: shard.0,
                        source,
                    })
                }
            }
        }
        tracing::info!(
            shard = shard.0,
            packs = checked,
            "every referenced pack is present"
        );
        Ok(())
    }
}
