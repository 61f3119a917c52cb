//! A node's access to the cluster directory (the meta group).
//!
//! A meta node reads its own replica after a read barrier and proposes to
//! the meta leader (forwarding over `Cluster.MetaCall` when that is another
//! node); any other node asks the meta nodes — those the directory last
//! named (the meta group moves like a shard), and failing those any peer,
//! which points it at a meta node it knows. Workspace placements are
//! cached for the node's life: once made, a workspace's shard does not
//! change (moving a workspace between shards is not built), so only the
//! first request for a workspace costs a directory read.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use cairn_proto::cluster::MetaCallRequest;

use crate::cluster::peers::Peers;
use crate::host::{ProposeError, ShardHost, META_GROUP};
use crate::meta::state::{
    Directory, MetaAnswer, MetaCall, MetaQuery, MetaReply, MetaRequest, MetaResponse, NodeRecord,
    NodeState, WorkspaceRecord, META_SHARD, NOT_BOOTSTRAPPED,
};
use cairn_proto::routing::Refusal;

/// Passes over the meta nodes before a directory call gives up: spans a
/// meta leader election with room to spare.
const ATTEMPTS: u32 = 40;
const BACKOFF: Duration = Duration::from_millis(150);
const CALL_TIMEOUT: Duration = Duration::from_secs(12);

#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error("the cluster directory is unavailable: {0}")]
    Unavailable(String),
    #[error("corrupt directory message: {0}")]
    Codec(String),
    #[error("{0}")]
    Refused(String),
}

/// Where a directory call goes next.
enum Target {
    Local,
    Remote(String),
}

/// The directory as this node reaches it.
pub struct MetaClient {
    host: Arc<ShardHost>,
    peers: Peers,
    placements: Mutex<HashMap<String, WorkspaceRecord>>,
    /// Highest map epoch this node has read.
    epoch: AtomicU64,
}

impl std::fmt::Debug for MetaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaClient")
            .field("node", &self.host.node_id())
            .finish()
    }
}

/// Cached placements before the map starts over (bounded memory).
const MAX_PLACEMENTS: usize = 100_000;

impl MetaClient {
    pub fn new(host: Arc<ShardHost>) -> Arc<Self> {
        Arc::new(MetaClient {
            host,
            peers: Peers::default(),
            placements: Mutex::new(HashMap::new()),
            epoch: AtomicU64::new(0),
        })
    }

    pub fn host(&self) -> &Arc<ShardHost> {
        &self.host
    }

    /// The highest shard map epoch this node has seen.
    pub fn known_epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }

    /// Runs `call` on this node's meta replica: the read after a barrier,
    /// the write only if this node leads the meta group.
    pub async fn serve_local(&self, call: MetaCall) -> Result<MetaReply, ProposeError> {
        match call {
            MetaCall::Read(query) => {
                self.host.linearizable_read(META_GROUP).await?;
                let view = self.host.state_view(META_GROUP)?;
                let answer = query
                    .answer(&view)
                    .map_err(|e| ProposeError::Raft(e.to_string()))?;
                Ok(MetaReply::Read(answer))
            }
            MetaCall::Write(request) => {
                Ok(MetaReply::Write(self.host.propose_meta(request).await?))
            }
        }
    }

    async fn remote(&self, addr: &str, call: &MetaCall) -> Result<MetaReply, tonic::Status> {
        let request = postcard::to_allocvec(call)
            .map_err(|e| tonic::Status::internal(format!("encoding a directory call: {e}")))?;
        let mut call = tonic::Request::new(MetaCallRequest {
            request: request.into(),
        });
        call.set_timeout(CALL_TIMEOUT);
        let reply = self
            .peers
            .cluster(addr)?
            .meta_call(call)
            .await?
            .into_inner();
        postcard::from_bytes(&reply.response)
            .map_err(|e| tonic::Status::internal(format!("decoding a directory reply: {e}")))
    }

    /// The targets to try in order: this node first when it holds a meta
    /// replica, then every meta node it knows of, then every other peer (a
    /// node that is not a meta node answers with a hint to one it knows).
    fn targets(&self) -> Vec<Target> {
        let host = &self.host;
        let mut targets = Vec::new();
        let meta = host.meta_nodes();
        if host.serves_meta() {
            targets.push(Target::Local);
        }
        let others = host
            .peers()
            .all()
            .into_iter()
            .map(|(id, _)| id)
            .filter(|id| !meta.contains(id));
        for id in meta.iter().copied().chain(others) {
            if id == host.node_id() {
                continue;
            }
            if let Some(addr) = host.peers().get(id) {
                targets.push(Target::Remote(addr));
            }
        }
        targets
    }

    /// An address of a meta node other than this one, for a caller that
    /// asked this node by mistake.
    pub fn meta_hint(&self) -> Option<String> {
        let host = &self.host;
        host.meta_nodes()
            .into_iter()
            .filter(|id| *id != host.node_id())
            .find_map(|id| host.peers().get(id))
    }

    /// Runs `call` wherever it can be answered: reads on any meta replica,
    /// writes on the meta leader, following its hints, across elections.
    pub async fn call(&self, call: MetaCall) -> Result<MetaReply, DirectoryError> {
        let targets = self.targets();
        if targets.is_empty() {
            return Err(DirectoryError::Unavailable(
                "this node knows no meta node".into(),
            ));
        }
        let mut last = String::new();
        let mut hint: Option<String> = None;
        for attempt in 0..ATTEMPTS {
            // A stopped node answers nothing; holding on would keep its
            // database open.
            if self.host.is_shut_down() {
                return Err(DirectoryError::Unavailable(
                    "this node is shutting down".into(),
                ));
            }
            let target = match hint.take() {
                Some(addr) => Target::Remote(addr),
                None => match &targets[attempt as usize % targets.len()] {
                    Target::Local => Target::Local,
                    Target::Remote(a) => Target::Remote(a.clone()),
                },
            };
            let outcome = match &target {
                Target::Local => match self.serve_local(call.clone()).await {
                    Ok(reply) => Ok(reply),
                    Err(ProposeError::NotLeader { leader_hint }) => {
                        hint = leader_hint.map(|(_, addr)| addr);
                        Err("not the meta leader".to_owned())
                    }
                    Err(e) => Err(e.to_string()),
                },
                Target::Remote(addr) => match self.remote(addr, &call).await {
                    Ok(reply) => Ok(reply),
                    Err(status) => {
                        hint = match Refusal::of(&status) {
                            Some(Refusal::NotLeader { hint }) => hint.filter(|h| h != addr),
                            _ => None,
                        };
                        Err(format!("{addr}: {}", status.message()))
                    }
                },
            };
            match outcome {
                Ok(reply) => return Ok(reply),
                Err(e) => last = e,
            }
            if hint.is_none() && ((attempt + 1) as usize).is_multiple_of(targets.len()) {
                tokio::time::sleep(BACKOFF).await;
            }
        }
        Err(DirectoryError::Unavailable(last))
    }

    pub async fn read(&self, query: MetaQuery) -> Result<MetaAnswer, DirectoryError> {
        match self.call(MetaCall::Read(query)).await? {
            MetaReply::Read(answer) => Ok(answer),
            MetaReply::Write(w) => Err(DirectoryError::Codec(format!("{w:?}"))),
        }
    }

    /// Proposes `request`; a refusal comes back as [`DirectoryError::Refused`].
    pub async fn write(&self, request: MetaRequest) -> Result<MetaResponse, DirectoryError> {
        let mut waited = Duration::ZERO;
        loop {
            match self.call(MetaCall::Write(request.clone())).await? {
                // Moments after a first start: the layout is on its way.
                MetaReply::Write(MetaResponse::Refused(reason))
                    if reason == NOT_BOOTSTRAPPED && waited < CALL_TIMEOUT =>
                {
                    tokio::time::sleep(BACKOFF).await;
                    waited += BACKOFF;
                }
                MetaReply::Write(MetaResponse::Refused(reason)) => {
                    return Err(DirectoryError::Refused(reason))
                }
                MetaReply::Write(response) => return Ok(response),
                MetaReply::Read(r) => return Err(DirectoryError::Codec(format!("{r:?}"))),
            }
        }
    }

    /// The node registry, shard map and moves; also teaches this node's
    /// address book every registered node.
    pub async fn directory(&self) -> Result<Directory, DirectoryError> {
        match self.read(MetaQuery::Directory).await? {
            MetaAnswer::Directory(d) => {
                for node in &d.nodes {
                    if node.state != NodeState::Removed {
                        self.host.peers().insert(node.id, node.addr.clone());
                    }
                }
                if let Some(meta) = &d.meta {
                    self.host.learn_meta_nodes(&meta.replicas);
                }
                self.epoch.fetch_max(d.epoch, Ordering::Relaxed);
                Ok(d)
            }
            other => Err(DirectoryError::Codec(format!("{other:?}"))),
        }
    }

    fn cached(&self, name: &str) -> Option<WorkspaceRecord> {
        self.placements
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    fn remember(&self, record: &WorkspaceRecord) {
        let mut map = self
            .placements
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if map.len() >= MAX_PLACEMENTS {
            map.clear();
        }
        map.insert(record.name.clone(), record.clone());
    }

    /// Forgets a workspace's placement (it was deleted).
    pub fn forget(&self, name: &str) {
        self.placements
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
    }

    /// The workspace's directory entry; `None` if it does not exist.
    pub async fn workspace(&self, name: &str) -> Result<Option<WorkspaceRecord>, DirectoryError> {
        if let Some(record) = self.cached(name) {
            return Ok(Some(record));
        }
        match self.read(MetaQuery::Workspace(name.to_owned())).await? {
            MetaAnswer::Workspace(Some(record)) => {
                self.remember(&record);
                Ok(Some(record))
            }
            MetaAnswer::Workspace(None) => Ok(None),
            other => Err(DirectoryError::Codec(format!("{other:?}"))),
        }
    }

    /// The workspace's entry, placing it first (under its canonical name)
    /// if it is new.
    pub async fn create_workspace(&self, name: &str) -> Result<WorkspaceRecord, DirectoryError> {
        if let Some(record) = self.workspace(name).await? {
            return Ok(record);
        }
        match self
            .write(MetaRequest::CreateWorkspace {
                name: crate::names::canonical(name),
            })
            .await?
        {
            MetaResponse::Workspace(record) => {
                self.remember(&record);
                Ok(record)
            }
            other => Err(DirectoryError::Codec(format!("{other:?}"))),
        }
    }

    /// On meta nodes: proposes the configured first layout until the
    /// directory reports it bootstrapped. Every meta node runs it; apply
    /// takes only the first.
    pub fn spawn_bootstrap(self: &Arc<Self>) {
        if !self.host.hosts(META_GROUP) {
            return;
        }
        // Weak: a node shut down before its directory came up must not be
        // kept alive (its database open) by this loop.
        let weak = Arc::downgrade(self);
        let seed = self.host.seed().clone();
        tokio::spawn(async move {
            let nodes: Vec<NodeRecord> = seed
                .peers
                .iter()
                .map(|(id, addr)| NodeRecord {
                    id: *id,
                    addr: addr.clone(),
                    state: NodeState::Active,
                })
                .collect();
            let meta = seed.meta_voters();
            let shards: Vec<(u64, Vec<u64>)> = std::iter::once((META_SHARD, meta.clone()))
                .chain(seed.shards.iter().map(|s| (s.id, s.replicas.clone())))
                .collect();
            loop {
                let Some(me) = weak.upgrade().filter(|m| !m.host.is_shut_down()) else {
                    return;
                };
                match me.directory().await {
                    Ok(d) if d.bootstrapped && d.meta.is_some() => {
                        tracing::debug!(epoch = d.epoch, "directory bootstrapped");
                        return;
                    }
                    Ok(d) if d.bootstrapped => {
                        // Bootstrapped before the meta group's placement
                        // was kept: record where it is now.
                        let replicas = me.host.meta_nodes();
                        let request = MetaRequest::SetReplicas {
                            shard: META_SHARD,
                            replicas,
                        };
                        if let Err(e) = me.write(request).await {
                            tracing::debug!(error = %e, "recording the meta placement deferred");
                        }
                    }
                    Ok(_) => {
                        let request = MetaRequest::Bootstrap {
                            nodes: nodes.clone(),
                            shards: shards.clone(),
                        };
                        match me.write(request).await {
                            Ok(_) => tracing::info!("bootstrapped the cluster directory"),
                            Err(e) => tracing::debug!(error = %e, "directory bootstrap deferred"),
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "directory not reachable yet"),
                }
                drop(me);
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        });
    }
}
