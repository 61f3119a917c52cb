//! Repositories on one node: immutable packs on disk, everything mutable
//! (repository records, refs, HEAD, the pack list) in RocksDB.
//!
//! A push is applied as one synced `WriteBatch` after a compare-and-swap of
//! every ref's old value under the repository's apply lock, so `--atomic`
//! is all-or-nothing and two racing pushes to one ref cannot both win.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cairn_packfile::receive::{self, Command, StagedPack};
use cairn_packfile::refs::{RefRecord, RepoRefs};
use cairn_packfile::store::PackSet;
use cairn_packfile::ObjectId;
use rocksdb::{
    ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB,
};
use serde::{Deserialize, Serialize};

use crate::names::{self, NameError};

const CF_REPOS: &str = "repos";
const CF_REFS: &str = "refs";
const CF_PACKS: &str = "packs";
const CF_META: &str = "meta";
const NEXT_REPO_ID: &[u8] = b"next_repo_id";
/// In `meta`: legacy names that differ only in case, by canonical form
/// (see `names`); no repository of that name can be created meanwhile.
const CASE_CLASH: &[u8] = b"case_clash/";
const DEFAULT_HEAD: &str = "refs/heads/main";

pub type RepoId = u64;

/// What a repository is, as stored under its `workspace/slug` key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoRecord {
    pub id: RepoId,
    pub workspace: String,
    pub slug: String,
    pub head: String,
    pub is_private: bool,
    pub description: String,
    pub created_at: i64,
}

/// One committed pack of a repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PackRecord {
    objects: u64,
    bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("repository {workspace}/{slug} not found")]
    RepoNotFound { workspace: String, slug: String },
    #[error("repository {workspace}/{slug} already exists")]
    RepoExists { workspace: String, slug: String },
    /// The requested name differs from a taken one only in case.
    #[error("repository {existing} already exists; names are compared without regard to case, so {requested} is taken too")]
    RepoCaseClash { requested: String, existing: String },
    #[error(transparent)]
    InvalidName(#[from] NameError),
    #[error("rocksdb: {0}")]
    Db(#[from] rocksdb::Error),
    #[error("I/O on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("corrupt record under key {key:?}: {message}")]
    Corrupt { key: String, message: String },
    #[error("pack store: {0}")]
    Packs(#[from] cairn_packfile::store::StoreError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A consistent view of one repository for serving a request.
#[derive(Clone)]
pub struct RepoSnapshot {
    pub record: RepoRecord,
    pub refs: RepoRefs,
    pub packs: PackSet,
}

/// All repositories of this node.
pub struct RepoStore {
    db: DB,
    data_dir: PathBuf,
    /// Open pack sets by repository; replaced (never mutated) on each push.
    packs: Mutex<HashMap<RepoId, PackSet>>,
    /// Serialises ref compare-and-swap per repository; indexing runs outside it.
    apply_locks: Mutex<HashMap<RepoId, Arc<Mutex<()>>>>,
    /// Serialises repository creation (name check + id allocation).
    create_lock: Mutex<()>,
}

fn repo_key(workspace: &str, slug: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(workspace.len() + slug.len() + 1);
    k.extend_from_slice(workspace.as_bytes());
    k.push(b'/');
    k.extend_from_slice(slug.as_bytes());
    k
}

fn prefixed(id: RepoId, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + rest.len());
    k.extend_from_slice(&id.to_be_bytes());
    k.extend_from_slice(rest);
    k
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain maps behind, still
    // consistent, so poisoning carries no information worth failing on.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RepoStore {
    /// Opens (or creates) the store under `data_dir`, removing leftovers of
    /// interrupted pushes: everything in `staging/` and pack files no
    /// committed pack list names.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        for sub in ["rocksdb", "packs", "staging"] {
            let p = data_dir.join(sub);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let cfs = [CF_REPOS, CF_REFS, CF_PACKS, CF_META]
            .into_iter()
            .map(|name| ColumnFamilyDescriptor::new(name, Options::default()));
        let db = DB::open_cf_descriptors(&opts, data_dir.join("rocksdb"), cfs)?;
        let store = RepoStore {
            db,
            data_dir: data_dir.to_owned(),
            packs: Mutex::new(HashMap::new()),
            apply_locks: Mutex::new(HashMap::new()),
            create_lock: Mutex::new(()),
        };
        store.canonicalize_names()?;
        store.clean_leftovers()?;
        Ok(store)
    }

    /// Moves repositories stored under a legacy name (kept before names
    /// were compared without case) to their canonical key; names that clash
    /// stay and are reported, each with what to do.
    fn canonicalize_names(&self) -> Result<(), StoreError> {
        let stored = self
            .list_repos("")?
            .into_iter()
            .map(|r| format!("{}/{}", r.workspace, r.slug));
        let plan = names::plan_case_migration(stored);
        let mut batch = WriteBatch::default();
        for (from, to) in &plan.renames {
            let Some(v) = self.db.get_cf(self.cf(CF_REPOS), from.as_bytes())? else {
                continue;
            };
            let mut record = decode_record(from.as_bytes(), &v)?;
            let (ws, slug) = to.split_once('/').unwrap_or((to, ""));
            record.workspace = ws.to_owned();
            record.slug = slug.to_owned();
            batch.delete_cf(self.cf(CF_REPOS), from.as_bytes());
            batch.put_cf(
                self.cf(CF_REPOS),
                to.as_bytes(),
                serde_json::to_vec(&record).expect("a repo record always serialises"),
            );
            tracing::info!(from = %from, to = %to, "repository moved to its canonical name");
        }
        let stale: Vec<Box<[u8]>> = self
            .db
            .prefix_iterator_cf(self.cf(CF_META), CASE_CLASH)
            .map_while(|item| item.ok().filter(|(k, _)| k.starts_with(CASE_CLASH)))
            .map(|(k, _)| k)
            .collect();
        for k in stale {
            batch.delete_cf(self.cf(CF_META), k);
        }
        for (canonical, clash) in &plan.clashes {
            batch.put_cf(
                self.cf(CF_META),
                [CASE_CLASH, canonical.as_bytes()].concat(),
                serde_json::to_vec(clash).expect("names always serialise"),
            );
            tracing::error!("{}", names::describe_clash("repository", clash));
        }
        self.sync_write(batch)
    }

    /// Adds to `batch` what deleting `deleted` does to a clash it was part
    /// of: the clash shrinks, and its last name takes the canonical key.
    fn settle_clash(&self, batch: &mut WriteBatch, deleted: &RepoRecord) -> Result<(), StoreError> {
        let full = format!("{}/{}", deleted.workspace, deleted.slug);
        let canonical = names::canonical(&full);
        let key = [CASE_CLASH, canonical.as_bytes()].concat();
        let Some(v) = self.db.get_cf(self.cf(CF_META), &key)? else {
            return Ok(());
        };
        let mut left: Vec<String> =
            serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                key: String::from_utf8_lossy(&key).into_owned(),
                message: e.to_string(),
            })?;
        left.retain(|n| *n != full);
        if left.len() > 1 {
            batch.put_cf(
                self.cf(CF_META),
                &key,
                serde_json::to_vec(&left).expect("names always serialise"),
            );
            return Ok(());
        }
        batch.delete_cf(self.cf(CF_META), &key);
        if let Some(last) = left.pop() {
            if let Some(v) = self.db.get_cf(self.cf(CF_REPOS), last.as_bytes())? {
                let mut record = decode_record(last.as_bytes(), &v)?;
                let (ws, slug) = canonical.split_once('/').unwrap_or((&canonical, ""));
                record.workspace = ws.to_owned();
                record.slug = slug.to_owned();
                batch.delete_cf(self.cf(CF_REPOS), last.as_bytes());
                batch.put_cf(
                    self.cf(CF_REPOS),
                    canonical.as_bytes(),
                    serde_json::to_vec(&record).expect("a repo record always serialises"),
                );
            }
        }
        Ok(())
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column families are created when the store opens")
    }

    fn sync_write(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(batch, &wo)?;
        Ok(())
    }

    pub fn staging_dir(&self) -> PathBuf {
        Self::staging_dir_at(&self.data_dir)
    }

    /// `staging/` of the node whose data dir is `data_dir`.
    pub fn staging_dir_at(data_dir: &Path) -> PathBuf {
        data_dir.join("staging")
    }

    /// Where repository `id`'s committed pack files live under `data_dir`.
    pub fn pack_dir_at(data_dir: &Path, id: RepoId) -> PathBuf {
        data_dir.join("packs").join(id.to_string())
    }

    /// A fresh directory under `staging/` for one push, so concurrent pushes
    /// of identical packs (same checksum, same file names) never collide.
    /// Removed when the returned guard drops.
    pub fn push_staging(&self) -> Result<StagingDir, StoreError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = self
            .staging_dir()
            .join(format!("push-{}-{n}", std::process::id()));
        fs::create_dir_all(&path).map_err(io_err(&path))?;
        Ok(StagingDir { path })
    }

    fn pack_dir(&self, id: RepoId) -> PathBuf {
        Self::pack_dir_at(&self.data_dir, id)
    }

    fn clean_leftovers(&self) -> Result<(), StoreError> {
        let staging = self.staging_dir();
        for entry in fs::read_dir(&staging).map_err(io_err(&staging))? {
            let path = entry.map_err(io_err(&staging))?.path();
            // Packs a leader transferred here were acknowledged as durable;
            // they stay until committed or expired by the cleanup worker.
            if path.file_name().is_some_and(|n| n == "transfer") {
                continue;
            }
            let res = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            res.map_err(io_err(&path))?;
        }
        for record in self.list_repos("")? {
            let listed: Vec<String> = self.pack_names(record.id)?;
            let dir = self.pack_dir(record.id);
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries {
                let path = entry.map_err(io_err(&dir))?.path();
                let stem = path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .and_then(|s| s.strip_prefix("pack-"))
                    .unwrap_or_default();
                if !listed.iter().any(|l| l == stem) {
                    tracing::info!(path = %path.display(), "removing uncommitted pack file");
                    fs::remove_file(&path).map_err(io_err(&path))?;
                }
            }
        }
        Ok(())
    }

    pub fn create_repo(
        &self,
        workspace: &str,
        slug: &str,
        is_private: bool,
        description: &str,
    ) -> Result<RepoRecord, StoreError> {
        let (ws, sl) = (names::canonical(workspace), names::canonical(slug));
        names::validate("workspace", &ws)?;
        names::validate("repository slug", &sl)?;
        names::validate_description(description)?;
        let _guard = lock(&self.create_lock);
        let full = format!("{ws}/{sl}");
        let clash = [CASE_CLASH, full.as_bytes()].concat();
        if self.get_repo(workspace, slug)?.is_some()
            || self.db.get_cf(self.cf(CF_META), &clash)?.is_some()
        {
            return Err(exists_error(workspace, slug));
        }
        let next = match self.db.get_cf(self.cf(CF_META), NEXT_REPO_ID)? {
            Some(v) => {
                u64::from_be_bytes(v.as_slice().try_into().map_err(|_| StoreError::Corrupt {
                    key: "next_repo_id".into(),
                    message: "not 8 bytes".into(),
                })?)
            }
            None => 1,
        };
        let record = RepoRecord {
            id: next,
            workspace: ws,
            slug: sl,
            head: DEFAULT_HEAD.to_owned(),
            is_private,
            description: description.to_owned(),
            created_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or_default(),
        };
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_META), NEXT_REPO_ID, (next + 1).to_be_bytes());
        batch.put_cf(
            self.cf(CF_REPOS),
            repo_key(&record.workspace, &record.slug),
            serde_json::to_vec(&record).expect("a repo record always serialises"),
        );
        self.sync_write(batch)?;
        Ok(record)
    }

    /// The repository stored under `workspace/slug` as given, else under its
    /// canonical form.
    pub fn get_repo(&self, workspace: &str, slug: &str) -> Result<Option<RepoRecord>, StoreError> {
        for full in names::lookup_forms(&format!("{workspace}/{slug}")) {
            if let Some(v) = self.db.get_cf(self.cf(CF_REPOS), full.as_bytes())? {
                return Ok(Some(decode_record(full.as_bytes(), &v)?));
            }
        }
        Ok(None)
    }

    pub fn require_repo(&self, workspace: &str, slug: &str) -> Result<RepoRecord, StoreError> {
        self.get_repo(workspace, slug)?
            .ok_or_else(|| StoreError::RepoNotFound {
                workspace: workspace.to_owned(),
                slug: slug.to_owned(),
            })
    }

    /// Repositories of `workspace` (all when empty), sorted by key.
    pub fn list_repos(&self, workspace: &str) -> Result<Vec<RepoRecord>, StoreError> {
        let prefixes: Vec<Vec<u8>> = if workspace.is_empty() {
            vec![Vec::new()]
        } else {
            names::lookup_forms(workspace)
                .map(|w| repo_key(&w, ""))
                .collect()
        };
        let mut out = Vec::new();
        for prefix in prefixes {
            for item in self.db.iterator_cf(
                self.cf(CF_REPOS),
                IteratorMode::From(&prefix, Direction::Forward),
            ) {
                let (k, v) = item?;
                if !k.starts_with(&prefix) {
                    break;
                }
                out.push(decode_record(&k, &v)?);
            }
        }
        Ok(out)
    }

    pub fn delete_repo(&self, workspace: &str, slug: &str) -> Result<(), StoreError> {
        let record = self.require_repo(workspace, slug)?;
        let apply = self.apply_lock(record.id);
        let _guard = lock(&apply);
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(CF_REPOS), repo_key(&record.workspace, &record.slug));
        self.settle_clash(&mut batch, &record)?;
        let from = prefixed(record.id, b"");
        let to = prefixed(record.id + 1, b"");
        batch.delete_range_cf(self.cf(CF_REFS), &from, &to);
        batch.delete_range_cf(self.cf(CF_PACKS), &from, &to);
        self.sync_write(batch)?;
        lock(&self.packs).remove(&record.id);
        let dir = self.pack_dir(record.id);
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
        }
        Ok(())
    }

    fn apply_lock(&self, id: RepoId) -> Arc<Mutex<()>> {
        lock(&self.apply_locks).entry(id).or_default().clone()
    }

    fn read_refs(&self, record: &RepoRecord) -> Result<RepoRefs, StoreError> {
        let prefix = prefixed(record.id, b"");
        let mut refs = Vec::new();
        for item in self.db.iterator_cf(
            self.cf(CF_REFS),
            IteratorMode::From(&prefix, Direction::Forward),
        ) {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            let name = String::from_utf8_lossy(&k[8..]).into_owned();
            let target = ObjectId::try_from(v.as_ref()).map_err(|_| StoreError::Corrupt {
                key: name.clone(),
                message: "ref value is not a 20-byte object id".into(),
            })?;
            refs.push(RefRecord { name, target });
        }
        Ok(RepoRefs::new(refs, Some(record.head.clone())))
    }

    fn pack_names(&self, id: RepoId) -> Result<Vec<String>, StoreError> {
        let prefix = prefixed(id, b"");
        let mut names = Vec::new();
        for item in self.db.iterator_cf(
            self.cf(CF_PACKS),
            IteratorMode::From(&prefix, Direction::Forward),
        ) {
            let (k, _) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            names.push(String::from_utf8_lossy(&k[8..]).into_owned());
        }
        Ok(names)
    }

    fn pack_set(&self, id: RepoId) -> Result<PackSet, StoreError> {
        if let Some(p) = lock(&self.packs).get(&id) {
            return Ok(p.clone());
        }
        let dir = self.pack_dir(id);
        let paths: Vec<PathBuf> = self
            .pack_names(id)?
            .iter()
            .map(|n| dir.join(format!("pack-{n}.idx")))
            .collect();
        let set = PackSet::open(&paths)?;
        lock(&self.packs).insert(id, set.clone());
        Ok(set)
    }

    /// Refs and packs of one repository as of now.
    pub fn snapshot(&self, workspace: &str, slug: &str) -> Result<RepoSnapshot, StoreError> {
        let record = self.require_repo(workspace, slug)?;
        // Packs first: a pack is committed in the same batch as the refs that
        // need it, so reading refs second never yields a ref whose objects
        // are missing from the pack set.
        let packs = self.pack_set(record.id)?;
        let refs = self.read_refs(&record)?;
        Ok(RepoSnapshot {
            record,
            refs,
            packs,
        })
    }

    /// Compare-and-swap `commands` against the current refs and commit the
    /// accepted ones together with `staged` in one synced batch.
    /// `prior` carries per-command rejections found while validating the pack.
    pub fn apply_push(
        &self,
        record: &RepoRecord,
        commands: &[Command],
        atomic: bool,
        prior: &[Option<String>],
        staged: Option<StagedPack>,
    ) -> Result<Vec<Result<(), String>>, StoreError> {
        let apply = self.apply_lock(record.id);
        let _guard = lock(&apply);
        // Re-read the record: HEAD may have moved since the snapshot.
        let record = self.require_repo(&record.workspace, &record.slug)?;
        let current = self.read_refs(&record)?;
        let results = receive::plan_updates(&current, commands, atomic, prior);
        if results.iter().all(|r| r.is_err()) {
            if let Some(staged) = staged {
                let path = staged.pack_path.clone();
                staged.discard().map_err(io_err(&path))?;
            }
            return Ok(results);
        }

        let mut batch = WriteBatch::default();
        let mut new_packs = None;
        if let Some(staged) = staged {
            let name = staged.id.to_string();
            let dir = self.pack_dir(record.id);
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
            let pack_dst = dir.join(format!("pack-{name}.pack"));
            let idx_dst = dir.join(format!("pack-{name}.idx"));
            let key = prefixed(record.id, name.as_bytes());
            if self.db.get_cf(self.cf(CF_PACKS), &key)?.is_some() {
                // The same pack (same checksum) is already committed: its
                // objects are all present, so this copy adds nothing.
                let path = staged.pack_path.clone();
                staged.discard().map_err(io_err(&path))?;
            } else {
                fs::rename(&staged.pack_path, &pack_dst).map_err(io_err(&pack_dst))?;
                fs::rename(&staged.index_path, &idx_dst).map_err(io_err(&idx_dst))?;
                fsync_dir(&dir)?;
                let rec = PackRecord {
                    objects: staged.objects,
                    bytes: staged.bytes,
                };
                batch.put_cf(
                    self.cf(CF_PACKS),
                    key,
                    serde_json::to_vec(&rec).expect("a pack record always serialises"),
                );
                let bundle = cairn_packfile::store::open_bundle(&idx_dst)?;
                new_packs = Some(self.pack_set(record.id)?.with_bundle(Arc::new(bundle)));
            }
        }
        let mut head_created = None;
        for (cmd, res) in commands.iter().zip(&results) {
            if res.is_err() {
                continue;
            }
            let key = prefixed(record.id, cmd.name.as_bytes());
            if cmd.new.is_null() {
                batch.delete_cf(self.cf(CF_REFS), key);
            } else {
                batch.put_cf(self.cf(CF_REFS), key, cmd.new.as_bytes());
                if cmd.old.is_null() && cmd.name.starts_with("refs/heads/") {
                    head_created.get_or_insert(cmd.name.clone());
                }
            }
        }
        // Like hosted git services: when HEAD names a branch that does not
        // exist and this push creates one, HEAD follows the first branch
        // pushed, so a clone checks out what was pushed.
        if current.get(&record.head).is_none() {
            let head_now_exists = commands
                .iter()
                .zip(&results)
                .any(|(c, r)| r.is_ok() && c.name == record.head && !c.new.is_null());
            if let (false, Some(branch)) = (head_now_exists, head_created) {
                let mut updated = record.clone();
                updated.head = branch;
                batch.put_cf(
                    self.cf(CF_REPOS),
                    repo_key(&record.workspace, &record.slug),
                    serde_json::to_vec(&updated).expect("a repo record always serialises"),
                );
            }
        }
        // Readers take the pack set before the refs (see `snapshot`), so the
        // new pack must be visible before the refs that need it are.
        let previous = new_packs.map(|set| lock(&self.packs).insert(record.id, set));
        if let Err(e) = self.sync_write(batch) {
            // Not committed: hide the pack again so no later push relies on
            // objects that restart cleanup will delete.
            if let Some(prev) = previous {
                let mut cache = lock(&self.packs);
                match prev {
                    Some(p) => cache.insert(record.id, p),
                    None => cache.remove(&record.id),
                };
            }
            return Err(e);
        }
        Ok(results)
    }
}

/// One push's staging directory; removed with whatever is left in it.
pub struct StagingDir {
    path: PathBuf,
}

impl StagingDir {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove staging dir");
            }
        }
    }
}

/// The refusal of a create whose name is taken: exactly, or by a name that
/// differs only in case.
pub fn exists_error(workspace: &str, slug: &str) -> StoreError {
    let requested = format!("{workspace}/{slug}");
    let canonical = names::canonical(&requested);
    if requested == canonical {
        StoreError::RepoExists {
            workspace: workspace.to_owned(),
            slug: slug.to_owned(),
        }
    } else {
        StoreError::RepoCaseClash {
            requested,
            existing: canonical,
        }
    }
}

fn decode_record(key: &[u8], value: &[u8]) -> Result<RepoRecord, StoreError> {
    serde_json::from_slice(value).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        message: e.to_string(),
    })
}

fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    crate::pack_transfer::fsync_dir(dir).map_err(io_err(dir))
}
