//! The repository operations the git and admin services need, served by
//! the replicated shards instead of the single-node `RepoStore`.
//!
//! Writes go through the shard leader: a push's pack is staged on a quorum
//! of the shard's replicas before the small `Push` entry that moves refs is
//! proposed (see the design's write path). Reads are linearizable: the
//! leader confirms its leadership with a read index before reading rows.
//!
//! A workspace's shard comes from the cluster directory (`directory`): a
//! node asked about a workspace whose shard it does not hold answers
//! `WrongShard`, and the router looks the workspace up again. A
//! repository's id names its shard, so pushes need no lookup.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cairn_packfile::receive::{self, Command, StagedPack};
use cairn_packfile::store::PackSet;
use cairn_packfile::ObjectId;
use cairn_proto::pack::pack_transfer_client::PackTransferClient;
use cairn_raft::{NodeId, StateView};
use tonic::transport::{Channel, Endpoint};
use tracing::Instrument;

use crate::host::case_migration::CaseMigrationWorker;
use crate::host::write_gate::WriteGuard;
use crate::host::{ProposeError, ShardHost, ShardHostConfig};
use crate::meta::client::{DirectoryError, MetaClient};
use crate::meta::state::{MetaAnswer, MetaQuery, MetaRequest};
use crate::names;
use crate::packs::transfer::{stage_pack, StagingArea};
use crate::repo::{exists_error, RepoRecord, RepoSnapshot, StoreError};
use crate::shard::entry::Entry;
use crate::shard::restrictions;
use crate::shard::state::{
    git_kinds, keys, refs_from_rows, shard_of_repo, CreateRepo, DeleteRepo, LoggedUpdate, PackRef,
    Push, Refusal, ShardRequest, ShardResponse, UpdateRepo,
};
use cairn_identity::restriction::BranchRestriction;

/// How long a push whose entry's fate is unknown waits for a linearizable
/// read (a new leader) to settle it.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(8);

/// How long a push waits for a quorum of replicas to stage its pack.
const STAGE_TIMEOUT: Duration = Duration::from_secs(60);

/// What a push carries besides its commands and pack.
#[derive(Debug, Clone, Default)]
pub struct PushExtras {
    /// `git push -o` options, bounded by the protocol limits.
    pub push_options: Vec<String>,
    /// Who pushes (see `cairn_proto::metadata::ACTOR`).
    pub actor: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicatedError {
    /// This node does not lead the shard; retry at the hinted node if any.
    #[error("not the leader of the shard (leader: {leader_hint:?})")]
    NotLeader {
        leader_hint: Option<(NodeId, String)>,
    },
    /// A proposal may or may not have committed; the caller must not assume
    /// either (a retry must reuse the push id).
    #[error("outcome of the proposal unknown (push id: {push_id:?}, leader: {leader_hint:?})")]
    Indeterminate {
        push_id: Option<String>,
        leader_hint: Option<(NodeId, String)>,
    },
    /// The push's entry was lost with its leader: a linearizable read after
    /// the change shows it was never applied, and it never will be.
    #[error("leadership changed before push {push_id} committed; nothing was applied")]
    NotApplied { push_id: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("staging pack {pack} on a quorum of shard {shard}: {acked} of {needed} replicas hold it; {errors}")]
    Transfer {
        shard: u64,
        pack: String,
        acked: usize,
        needed: usize,
        errors: String,
    },
    #[error("staging pack locally: I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("shard {0} is not hosted on this node")]
    UnknownShard(u64),
    #[error("reading shard state: {0}")]
    State(#[from] cairn_raft::StoreError),
    #[error("raft: {0}")]
    Raft(String),
    #[error("workspace {0} not found")]
    WorkspaceNotFound(String),
    /// This node holds no replica of the workspace's shard.
    #[error("wrong shard: shard {shard} is not on this node (map epoch {epoch})")]
    WrongShard { shard: u64, epoch: u64 },
    #[error(transparent)]
    Directory(#[from] DirectoryError),
}

impl From<ProposeError> for ReplicatedError {
    fn from(e: ProposeError) -> Self {
        match e {
            ProposeError::NotLeader { leader_hint } => ReplicatedError::NotLeader { leader_hint },
            // `push` settles its own unknown outcomes by push id.
            ProposeError::Indeterminate { leader_hint } => ReplicatedError::Indeterminate {
                push_id: None,
                leader_hint,
            },
            ProposeError::UnknownShard(s) => ReplicatedError::UnknownShard(s),
            ProposeError::Raft(m) => ReplicatedError::Raft(m),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Only caches live behind these locks; a poisoned one is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn corrupt(key: &[u8], message: impl ToString) -> ReplicatedError {
    ReplicatedError::Store(StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        message: message.to_string(),
    })
}

fn decode_record(key: &[u8], value: &[u8]) -> Result<RepoRecord, ReplicatedError> {
    crate::shard::rows::read_json(key, value).map_err(|e| corrupt(key, e))
}

/// Repositories served from this node's shard replicas.
pub struct ReplicatedStore {
    host: Arc<ShardHost>,
    area: StagingArea,
    directory: Arc<MetaClient>,
    /// One lazily connected channel per peer, shared by all transfers.
    channels: Mutex<HashMap<u64, Channel>>,
    /// Open pack sets by repository, with the pack list they were opened for.
    packs: Mutex<HashMap<u64, (Vec<String>, PackSet)>>,
    next_push: AtomicU64,
}

impl std::fmt::Debug for ReplicatedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicatedStore")
            .field("node", &self.host.node_id())
            .field("shards", &self.host.shards())
            .finish()
    }
}

impl ReplicatedStore {
    /// `config` must be the one `host` was started with and `area` the
    /// staging area it places packs from.
    ///
    /// On meta nodes this also starts proposing the configured first
    /// layout to the directory until it is bootstrapped.
    pub fn new(
        host: Arc<ShardHost>,
        _config: &ShardHostConfig,
        area: StagingArea,
    ) -> Result<Self, ReplicatedError> {
        let directory = MetaClient::new(host.clone());
        directory.spawn_bootstrap();
        CaseMigrationWorker::new(&host).spawn();
        Ok(ReplicatedStore {
            host,
            area,
            directory,
            channels: Mutex::new(HashMap::new()),
            packs: Mutex::new(HashMap::new()),
            next_push: AtomicU64::new(0),
        })
    }

    /// This node's access to the cluster directory.
    pub fn directory(&self) -> &Arc<MetaClient> {
        &self.directory
    }

    /// The shard holding `workspace`'s repositories, if this node holds a
    /// replica of it.
    pub async fn shard_of(&self, workspace: &str) -> Result<u64, ReplicatedError> {
        let record = self
            .directory
            .workspace(workspace)
            .await?
            .ok_or_else(|| ReplicatedError::WorkspaceNotFound(workspace.to_owned()))?;
        self.hosted(record.shard)
    }

    fn hosted(&self, shard: u64) -> Result<u64, ReplicatedError> {
        if self.host.hosts(shard) {
            Ok(shard)
        } else {
            Err(ReplicatedError::WrongShard {
                shard,
                epoch: self.directory.known_epoch(),
            })
        }
    }

    fn node_id(&self) -> NodeId {
        self.host.node_id()
    }

    fn hint_for(&self, node: Option<NodeId>) -> Option<(NodeId, String)> {
        let id = node?;
        Some((id, self.host.peers().get(id)?))
    }

    /// Fails fast with the known leader when this node does not lead the
    /// shard of `workspace` (writes go there, before any expensive work);
    /// otherwise the write is under way until the guard drops, and a
    /// planned leader transfer waits for it.
    pub async fn begin_write(&self, workspace: &str) -> Result<WriteGuard, ReplicatedError> {
        let shard = self.shard_of(workspace).await?;
        self.require_leader(shard)?;
        self.host
            .writes()
            .enter(shard)
            .map_err(|to| ReplicatedError::NotLeader {
                leader_hint: self.hint_for(Some(to)),
            })
    }

    fn require_leader(&self, shard: u64) -> Result<(), ReplicatedError> {
        match self.host.leader(shard) {
            Some(l) if l == self.node_id() => Ok(()),
            other => Err(ReplicatedError::NotLeader {
                leader_hint: self.hint_for(other),
            }),
        }
    }

    /// A linearizable view of `shard`'s rows, on the leader or on a
    /// follower that has applied the leader's read index.
    async fn read_view(&self, shard: u64) -> Result<StateView, ReplicatedError> {
        self.host.linearizable_read(shard).await?;
        Ok(self.host.state_view(shard)?)
    }

    pub async fn create_repo(
        &self,
        workspace: &str,
        slug: &str,
        is_private: bool,
        description: &str,
    ) -> Result<RepoRecord, ReplicatedError> {
        self.create_repo_as(workspace, slug, is_private, description, None)
            .await
    }

    /// Creates a repository, its entry naming `actor`.
    #[tracing::instrument(skip(self, description), fields(node = self.node_id()))]
    pub async fn create_repo_as(
        &self,
        workspace: &str,
        slug: &str,
        is_private: bool,
        description: &str,
        actor: Option<String>,
    ) -> Result<RepoRecord, ReplicatedError> {
        let (ws, sl) = (names::canonical(workspace), names::canonical(slug));
        names::validate("workspace", &ws).map_err(StoreError::from)?;
        names::validate("repository slug", &sl).map_err(StoreError::from)?;
        names::validate_description(description).map_err(StoreError::from)?;
        let placed = self.directory.create_workspace(workspace).await?;
        let shard = self.hosted(placed.shard)?;
        // A repository stored under a legacy name of another case counts.
        if let Ok(view) = self.read_view(shard).await {
            if Self::record_in(&view, workspace, slug).is_ok() {
                return Err(exists_error(workspace, slug).into());
            }
        }
        let req = ShardRequest::Entry(Entry::new(
            git_kinds::CREATE,
            1,
            actor,
            &CreateRepo {
                workspace: ws.clone(),
                slug: sl.clone(),
                is_private,
                description: description.to_owned(),
            },
        ));
        let record = match self.host.propose(shard, req).await? {
            ShardResponse::Repo(record) => record,
            ShardResponse::Refused(Refusal::RepoExists) => {
                // Also repairs a directory entry lost to a crash between
                // the shard's create and the directory's record.
                if let Ok(view) = self.read_view(shard).await {
                    if let Ok(existing) = Self::record_in(&view, &ws, &sl) {
                        let _ = self
                            .directory
                            .write(MetaRequest::RecordRepo(existing))
                            .await;
                    }
                }
                return Err(exists_error(workspace, slug).into());
            }
            other => return Err(self.refused(&ws, &sl, other)),
        };
        self.directory
            .write(MetaRequest::RecordRepo(record.clone()))
            .await?;
        Ok(record)
    }

    /// Changes a repository's visibility, description or main branch
    /// (`None`: unchanged), through the shard leader.
    pub async fn update_repo_as(
        &self,
        workspace: &str,
        slug: &str,
        change: (Option<bool>, Option<String>, Option<String>),
        actor: Option<String>,
    ) -> Result<RepoRecord, ReplicatedError> {
        let (is_private, description, head) = change;
        let shard = self.shard_of(workspace).await?;
        self.require_leader(shard)?;
        let stored = Self::record_in(&self.read_view(shard).await?, workspace, slug)?;
        let req = ShardRequest::Entry(Entry::new(
            git_kinds::UPDATE,
            1,
            actor,
            &UpdateRepo {
                workspace: stored.workspace.clone(),
                slug: stored.slug.clone(),
                is_private,
                description,
                head,
            },
        ));
        match self.host.propose(shard, req).await? {
            ShardResponse::Repo(record) => {
                self.directory
                    .write(MetaRequest::RecordRepo(record.clone()))
                    .await?;
                Ok(record)
            }
            ShardResponse::Refused(Refusal::InvalidName(why)) => {
                Err(StoreError::InvalidArgument(why).into())
            }
            other => Err(self.refused(&stored.workspace, &stored.slug, other)),
        }
    }

    /// The repository's branch restrictions (a linearizable read).
    pub async fn branch_restrictions(
        &self,
        workspace: &str,
        slug: &str,
    ) -> Result<Vec<BranchRestriction>, ReplicatedError> {
        let view = self.read_view(self.shard_of(workspace).await?).await?;
        let record = Self::record_in(&view, workspace, slug)?;
        restrictions::list(&view, record.id).map_err(|e| ReplicatedError::Raft(e.to_string()))
    }

    /// The branch restrictions of a repository just read (its snapshot
    /// came after a read barrier): this replica's rows, no second barrier.
    pub fn branch_restrictions_of(
        &self,
        record: &RepoRecord,
    ) -> Result<Vec<BranchRestriction>, ReplicatedError> {
        let view = self
            .host
            .state_view(self.hosted(shard_of_repo(record.id))?)?;
        restrictions::list(&view, record.id).map_err(|e| ReplicatedError::Raft(e.to_string()))
    }

    /// Stores (`id` 0: creates) a branch restriction through the shard
    /// leader. `Ok(Err(why))` is a refusal; nothing changed.
    pub async fn set_branch_restriction(
        &self,
        workspace: &str,
        slug: &str,
        restriction: BranchRestriction,
        actor: Option<String>,
    ) -> Result<Result<BranchRestriction, String>, ReplicatedError> {
        let shard = self.shard_of(workspace).await?;
        self.require_leader(shard)?;
        let record = Self::record_in(&self.read_view(shard).await?, workspace, slug)?;
        let entry = Entry::new(
            restrictions::kinds::SET,
            1,
            actor,
            &restrictions::Set {
                repo_id: record.id,
                restriction,
            },
        );
        match self.restriction_entry(shard, entry).await? {
            restrictions::Answer::Stored(r) => Ok(Ok(r)),
            restrictions::Answer::Refused(why) => Ok(Err(why)),
            restrictions::Answer::NotFound => Ok(Err("no such branch restriction".into())),
            restrictions::Answer::Deleted => Err(ReplicatedError::Raft("unexpected answer".into())),
        }
    }

    /// Deletes a branch restriction; `Ok(false)` if there was none.
    pub async fn delete_branch_restriction(
        &self,
        workspace: &str,
        slug: &str,
        id: u64,
        actor: Option<String>,
    ) -> Result<bool, ReplicatedError> {
        let shard = self.shard_of(workspace).await?;
        self.require_leader(shard)?;
        let record = Self::record_in(&self.read_view(shard).await?, workspace, slug)?;
        let entry = Entry::new(
            restrictions::kinds::DELETE,
            1,
            actor,
            &restrictions::Delete {
                repo_id: record.id,
                id,
            },
        );
        Ok(matches!(
            self.restriction_entry(shard, entry).await?,
            restrictions::Answer::Deleted
        ))
    }

    async fn restriction_entry(
        &self,
        shard: u64,
        entry: Entry,
    ) -> Result<restrictions::Answer, ReplicatedError> {
        match self.host.propose(shard, ShardRequest::Entry(entry)).await? {
            ShardResponse::Entry(bytes) => postcard::from_bytes(&bytes)
                .map_err(|e| ReplicatedError::Raft(format!("decoding an answer: {e}"))),
            other => Err(ReplicatedError::Raft(format!(
                "unexpected answer {other:?}"
            ))),
        }
    }

    pub async fn delete_repo(&self, workspace: &str, slug: &str) -> Result<(), ReplicatedError> {
        self.delete_repo_as(workspace, slug, None).await
    }

    /// Deletes a repository, its entry naming `actor`.
    #[tracing::instrument(skip(self), fields(node = self.node_id()))]
    pub async fn delete_repo_as(
        &self,
        workspace: &str,
        slug: &str,
        actor: Option<String>,
    ) -> Result<(), ReplicatedError> {
        let shard = self.shard_of(workspace).await?;
        // Entries name the repository by its stored key.
        let stored = Self::record_in(&self.read_view(shard).await?, workspace, slug)?;
        let (workspace, slug) = (stored.workspace.as_str(), stored.slug.as_str());
        let req = ShardRequest::Entry(Entry::new(
            git_kinds::DELETE,
            1,
            actor,
            &DeleteRepo {
                workspace: workspace.to_owned(),
                slug: slug.to_owned(),
            },
        ));
        let forget = MetaRequest::ForgetRepo {
            workspace: workspace.to_owned(),
            slug: slug.to_owned(),
        };
        match self.host.propose(shard, req).await? {
            ShardResponse::Deleted(_) => {}
            ShardResponse::Refused(Refusal::RepoNotFound) => {
                // Gone from the shard: the directory must not keep it.
                let _ = self.directory.write(forget).await;
                return Err(self.refused(
                    workspace,
                    slug,
                    ShardResponse::Refused(Refusal::RepoNotFound),
                ));
            }
            other => return Err(self.refused(workspace, slug, other)),
        }
        self.directory.write(forget).await?;
        Ok(())
    }

    fn refused(&self, workspace: &str, slug: &str, response: ShardResponse) -> ReplicatedError {
        let names = || (workspace.to_owned(), slug.to_owned());
        match response {
            ShardResponse::Refused(Refusal::RepoExists) => exists_error(workspace, slug).into(),
            ShardResponse::Refused(Refusal::RepoNotFound) => {
                let (workspace, slug) = names();
                StoreError::RepoNotFound { workspace, slug }.into()
            }
            ShardResponse::Refused(Refusal::InvalidName(reason)) => {
                // Apply checks names with the same rule; rerun it for the
                // structured error, which says which of the two it was.
                names::validate("workspace", workspace)
                    .and_then(|()| names::validate("repository slug", slug))
                    .map_err(StoreError::from)
                    .err()
                    .unwrap_or(StoreError::Corrupt {
                        key: format!("{workspace}/{slug}"),
                        message: reason,
                    })
                    .into()
            }
            other => ReplicatedError::Raft(format!("unexpected shard response {other:?}")),
        }
    }

    /// Repositories of `workspace`, as of a linearizable read.
    #[tracing::instrument(skip(self), fields(node = self.node_id()))]
    pub async fn list_repos(&self, workspace: &str) -> Result<Vec<RepoRecord>, ReplicatedError> {
        if workspace.is_empty() {
            // Every workspace: the directory has them all, whichever shard.
            return match self.directory.read(MetaQuery::Repos(String::new())).await? {
                MetaAnswer::Repos(records) => Ok(records),
                other => Err(ReplicatedError::Raft(format!(
                    "unexpected answer {other:?}"
                ))),
            };
        }
        let view = self.read_view(self.shard_of(workspace).await?).await?;
        let mut out = Vec::new();
        for ws in names::lookup_forms(workspace) {
            for (k, v) in view.scan_prefix(&keys::repos_of(&ws))? {
                out.push(decode_record(&k, &v)?);
            }
        }
        Ok(out)
    }

    /// The record stored under `workspace/slug` as given, else under its
    /// canonical form.
    fn record_in(
        view: &StateView,
        workspace: &str,
        slug: &str,
    ) -> Result<RepoRecord, ReplicatedError> {
        for full in names::lookup_forms(&format!("{workspace}/{slug}")) {
            let (ws, sl) = full.split_once('/').unwrap_or((&full, ""));
            let key = keys::repo(ws, sl);
            if let Some(v) = view.get(&key)? {
                return decode_record(&key, &v);
            }
        }
        Err(StoreError::RepoNotFound {
            workspace: workspace.to_owned(),
            slug: slug.to_owned(),
        }
        .into())
    }

    /// The repository's record, as of a linearizable read.
    pub async fn require_repo(
        &self,
        workspace: &str,
        slug: &str,
    ) -> Result<RepoRecord, ReplicatedError> {
        let view = self.read_view(self.shard_of(workspace).await?).await?;
        Self::record_in(&view, workspace, slug)
    }

    /// Refs and packs of one repository, as of a linearizable read.
    #[tracing::instrument(skip(self), fields(node = self.node_id()))]
    pub async fn snapshot(
        &self,
        workspace: &str,
        slug: &str,
    ) -> Result<RepoSnapshot, ReplicatedError> {
        let view = self.read_view(self.shard_of(workspace).await?).await?;
        let record = Self::record_in(&view, workspace, slug)?;
        // Packs before refs: apply writes a pack row in the same batch as
        // the refs needing it, so no ref read second lacks its objects.
        let prefix = keys::packs_of(record.id);
        let names: Vec<String> = view
            .scan_prefix(&prefix)?
            .into_iter()
            .map(|(k, _)| String::from_utf8_lossy(&k[prefix.len()..]).into_owned())
            .collect();
        let packs = self.pack_set(record.id, names).await?;
        let prefix = keys::refs_of(record.id);
        let refs = refs_from_rows(
            prefix.len(),
            view.scan_prefix(&prefix)?,
            record.head.clone(),
        )
        .map_err(|e| {
            ReplicatedError::Store(StoreError::Corrupt {
                key: String::from_utf8_lossy(&prefix).into_owned(),
                message: e.to_string(),
            })
        })?;
        Ok(RepoSnapshot {
            record,
            refs,
            packs,
        })
    }

    /// The repository's pack set for exactly `names`, reopened only when
    /// the list changed.
    async fn pack_set(&self, repo: u64, names: Vec<String>) -> Result<PackSet, ReplicatedError> {
        if let Some((cached, set)) = lock(&self.packs).get(&repo) {
            if *cached == names {
                return Ok(set.clone());
            }
        }
        let mut paths = Vec::with_capacity(names.len());
        for name in &names {
            let id = crate::packs::transfer::parse_pack_id(name)
                .ok_or_else(|| corrupt(&keys::pack(repo, name), "not a pack id"))?;
            paths.push(self.area.committed_paths(repo, &id).1);
        }
        let set = tokio::task::spawn_blocking(move || PackSet::open(&paths))
            .await
            .map_err(|e| ReplicatedError::Raft(format!("pack open task failed: {e}")))?
            .map_err(StoreError::from)?;
        lock(&self.packs).insert(repo, (names, set.clone()));
        Ok(set)
    }

    /// Stages `staged` on a quorum of the repository's shard, then proposes
    /// the ref updates; returns the per-command results as applied. Only
    /// the shard leader accepts pushes.
    #[tracing::instrument(skip_all, fields(node = self.node_id(), repo = record.id, push_id))]
    pub async fn push(
        &self,
        record: &RepoRecord,
        commands: &[Command],
        atomic: bool,
        prior: &[Option<String>],
        staged: Option<StagedPack>,
        extras: PushExtras,
    ) -> Result<Vec<Result<(), String>>, ReplicatedError> {
        let PushExtras {
            push_options,
            actor,
        } = extras;
        let shard = self.hosted(shard_of_repo(record.id))?;
        self.require_leader(shard)?;
        if let Some(refused) = self
            .refused_as_of_now(shard, record, commands, atomic, prior)
            .await?
        {
            return Ok(refused);
        }
        let push_id = self.fresh_push_id();
        tracing::Span::current().record("push_id", push_id.as_str());

        let pack = match staged {
            Some(staged) => Some(self.replicate_pack(shard, record.id, staged).await?),
            None => None,
        };
        let req = ShardRequest::Entry(Entry::new(
            git_kinds::PUSH,
            1,
            actor,
            &Push {
                repo_id: record.id,
                push_id: push_id.clone(),
                pack,
                updates: commands.iter().map(LoggedUpdate::from_command).collect(),
                atomic,
                prior: prior.to_vec(),
                push_options,
            },
        ));
        match self.host.propose(shard, req).await {
            Ok(ShardResponse::Pushed(results)) => Ok(results),
            Ok(other) => Err(ReplicatedError::Raft(format!(
                "unexpected shard response {other:?}"
            ))),
            Err(ProposeError::Indeterminate { leader_hint }) => {
                self.settle(shard, push_id, leader_hint).await
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The answer to a push every command of which fails against the refs
    /// as they are now (stale old ids, refs that exist, earlier
    /// rejections): given without replicating its pack, which nothing would
    /// keep, or proposing an entry. Checked on this replica's state, then
    /// again after a read barrier, so a ref moved meanwhile is not missed;
    /// `None` when some command may apply.
    async fn refused_as_of_now(
        &self,
        shard: u64,
        record: &RepoRecord,
        commands: &[Command],
        atomic: bool,
        prior: &[Option<String>],
    ) -> Result<Option<Vec<Result<(), String>>>, ReplicatedError> {
        let plan = |view: &StateView| -> Result<Vec<Result<(), String>>, ReplicatedError> {
            // HEAD as of this state: deleting the current branch is refused.
            let head = match view.get(&keys::repo(&record.workspace, &record.slug))? {
                Some(v) => decode_record(&keys::repo(&record.workspace, &record.slug), &v)?.head,
                None => record.head.clone(),
            };
            let prefix = keys::refs_of(record.id);
            let current = refs_from_rows(prefix.len(), view.scan_prefix(&prefix)?, head)
                .map_err(|e| corrupt(&prefix, e))?;
            let mut prior = prior.to_vec();
            prior.resize(commands.len(), None);
            Ok(receive::plan_updates(&current, commands, atomic, &prior))
        };
        if plan(&self.host.state_view(shard)?)?
            .iter()
            .any(Result::is_ok)
        {
            return Ok(None);
        }
        // No barrier (no quorum, leadership lost): no early answer; the
        // push takes its normal way and fails there with its own reason.
        let Ok(view) = self.read_view(shard).await else {
            return Ok(None);
        };
        let results = plan(&view)?;
        Ok((!results.iter().any(Result::is_ok)).then_some(results))
    }

    /// After an unknown outcome, a linearizable read (here, through
    /// whichever node leads now) decides it: the push's result row is there
    /// if the entry was applied. If it is absent, the entry was not in the
    /// log the current leader committed from, so it can never commit: the
    /// push definitely did nothing. Only when no read succeeds in time does
    /// the outcome stay unknown; re-proposing could apply the push twice.
    async fn settle(
        &self,
        shard: u64,
        push_id: String,
        leader_hint: Option<(NodeId, String)>,
    ) -> Result<Vec<Result<(), String>>, ReplicatedError> {
        let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
        let view = loop {
            match self.read_view(shard).await {
                Ok(view) => break view,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    tracing::warn!(push_id, error = %e, "cannot settle the push's outcome");
                    let leader_hint = match e {
                        ReplicatedError::NotLeader { leader_hint: h } => h.or(leader_hint),
                        _ => self.hint_for(self.host.leader(shard)).or(leader_hint),
                    };
                    return Err(ReplicatedError::Indeterminate {
                        push_id: Some(push_id),
                        leader_hint,
                    });
                }
                // An election is likely under way: wait for its winner.
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        let key = keys::push(&push_id);
        match view.get(&key)? {
            Some(v) => crate::shard::rows::read_json(&key, &v).map_err(|e| corrupt(&key, e)),
            None => Err(ReplicatedError::NotApplied { push_id }),
        }
    }

    fn fresh_push_id(&self) -> String {
        // Node id + wall clock + counter: unique across restarts of this
        // node and across nodes, which is all the result rows need.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let n = self.next_push.fetch_add(1, Ordering::Relaxed);
        format!("{}-{nanos:x}-{n}", self.node_id())
    }

    /// Moves the validated pack into this node's shard staging directory and
    /// stages it on the other replicas until a majority (this node
    /// included) holds it.
    async fn replicate_pack(
        &self,
        shard: u64,
        repo: u64,
        staged: StagedPack,
    ) -> Result<PackRef, ReplicatedError> {
        let pack_ref = PackRef {
            id: staged.id.to_string(),
            objects: staged.objects,
            bytes: staged.bytes,
        };
        let (pack_path, index_path) = {
            let area = self.area.clone();
            tokio::task::spawn_blocking(move || stage_locally(&area, shard, repo, &staged))
                .await
                .map_err(|e| ReplicatedError::Raft(format!("staging task failed: {e}")))??
        };
        let id = ObjectId::from_hex(pack_ref.id.as_bytes())
            .map_err(|e| ReplicatedError::Raft(format!("pack id: {e}")))?;
        // Every member gets the pack (a learner too, sparing it a fetch);
        // a majority of each voter set must hold it, two sets while a
        // joint configuration is in force.
        let voter_sets = self.host.membership().voter_sets(shard)?;
        let (voters, learners) = self.host.membership().members(shard)?;
        let mut others: Vec<u64> = voters.into_iter().chain(learners).collect();
        others.sort_unstable();
        others.dedup();
        others.retain(|&n| n != self.node_id());
        let quorum = |holders: &BTreeSet<u64>| {
            voter_sets
                .iter()
                .all(|set| set.intersection(holders).count() > set.len() / 2)
        };
        let mut holders = BTreeSet::from([self.node_id()]);
        let needed = voter_sets
            .iter()
            .map(|s| s.len() / 2 + 1)
            .max()
            .unwrap_or(1);
        let mut errors = Vec::new();

        // Each transfer runs as its own task, so a slow follower keeps
        // receiving the pack after the quorum is met (sparing it a fetch at
        // apply time) without holding up the push.
        let (tx, mut rx) = tokio::sync::mpsc::channel(others.len().max(1));
        for peer in others {
            let channel = match self.channel(peer) {
                Ok(c) => c,
                Err(e) => {
                    errors.push(format!("node {peer}: {e}"));
                    continue;
                }
            };
            let (tx, pack_path, index_path) = (tx.clone(), pack_path.clone(), index_path.clone());
            let span = tracing::debug_span!("stage_on_peer", peer);
            tokio::spawn(
                async move {
                    let mut client = PackTransferClient::new(channel);
                    let res =
                        stage_pack(&mut client, shard, repo, &pack_path, &index_path, id).await;
                    if let Err(e) = &res {
                        tracing::warn!(error = %e, "staging on a replica failed");
                    }
                    // The push may have returned already; nobody listens then.
                    let _ = tx.send((peer, res)).await;
                }
                .instrument(span),
            );
        }
        drop(tx);

        let collect = async {
            while !quorum(&holders) {
                match rx.recv().await {
                    Some((peer, Ok(_))) => {
                        holders.insert(peer);
                    }
                    Some((peer, Err(e))) => errors.push(format!("node {peer}: {e}")),
                    None => break,
                }
            }
        };
        if tokio::time::timeout(STAGE_TIMEOUT, collect).await.is_err() {
            errors.push(format!("timed out after {STAGE_TIMEOUT:?}"));
        }
        let acked = holders.len();
        if !quorum(&holders) {
            // The local staged copy is left to the staging TTL cleanup.
            return Err(ReplicatedError::Transfer {
                shard,
                pack: pack_ref.id,
                acked,
                needed,
                errors: errors.join("; "),
            });
        }
        tracing::debug!(acked, needed, "pack staged on a quorum");
        Ok(pack_ref)
    }

    fn channel(&self, peer: u64) -> Result<Channel, ReplicatedError> {
        let mut channels = lock(&self.channels);
        if let Some(c) = channels.get(&peer) {
            return Ok(c.clone());
        }
        let addr = self
            .host
            .peers()
            .get(peer)
            .ok_or_else(|| ReplicatedError::Raft(format!("node {peer} has no address")))?;
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| ReplicatedError::Raft(format!("address of node {peer}: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .connect_lazy();
        channels.insert(peer, channel.clone());
        Ok(channel)
    }
}

/// Moves (or, across file systems, copies) the pack and its index to
/// `staging/transfer/<shard>/<repo>/`, durably, where apply and `Fetch` look.
fn stage_locally(
    area: &StagingArea,
    shard: u64,
    repo: u64,
    staged: &StagedPack,
) -> Result<(PathBuf, PathBuf), ReplicatedError> {
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| ReplicatedError::Io { path, source }
    };
    let dir = area.staged_dir(shard, repo);
    let (pack_dst, idx_dst) = area.staged_paths(shard, repo, &staged.id);
    // Held so the cleanup worker does not sweep the directory mid-move.
    let _guard = area.hold();
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    // The index last: a staged pack counts once its index exists. Ingest
    // fsynced both files, so a rename needs only the directory's fsync
    // below; a copy (another file system) needs its own.
    for (src, dst) in [
        (&staged.pack_path, &pack_dst),
        (&staged.index_path, &idx_dst),
    ] {
        if fs::rename(src, dst).is_err() {
            fs::copy(src, dst).map_err(io_err(dst))?;
            fs::File::open(dst)
                .and_then(|f| f.sync_all())
                .map_err(io_err(dst))?;
            fs::remove_file(src).map_err(io_err(src))?;
        }
    }
    fs::File::open(&dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err(&dir))?;
    Ok((pack_dst, idx_dst))
}
