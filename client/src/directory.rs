//! Where a workspace lives: the cluster directory, cached.
//!
//! Workspaces live on shards and shards move between nodes, so the router
//! can no longer send a workspace's requests to just any node. It asks a
//! seed node (the configured `storage-nodes`) with `ResolveWorkspace` —
//! any node answers, forwarding to the meta group itself — and caches the
//! answer: the shard, its placement epoch and its replicas' URLs.
//!
//! An entry has no expiry because staleness is cheap to detect: a node that
//! does not hold the shard refuses with "wrong shard" before reading any
//! request byte, and the client (`Cluster`) then drops the entry
//! ([`Directory::refresh`]) and asks again. It does the same once when every
//! replica of an entry is unreachable (the shard may have moved off them).
//! Unknown workspaces are not cached: one created through another router
//! must be visible at once.
//!
//! Fallbacks keep older setups working. Seeds answering `UNIMPLEMENTED`
//! predate the directory, so every node holds every workspace: the
//! configured nodes are the route (cached like a placement, so old clusters
//! pay no lookup per request, and dropped on a wrong-shard refusal, which
//! only a directory-aware node sends). When no seed answers at all, the
//! configured nodes are tried too (shards may still serve while the meta
//! group is down), without caching.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use cairn_proto::cluster::cluster_client::ClusterClient;
use cairn_proto::cluster::{
    CreateWorkspaceRequest, ResolveWorkspaceRequest, ResolveWorkspaceResponse,
};
use tonic::transport::Channel;

use crate::policy::{decide, hint_url, Decision, Failure, NodePool, RetryPolicy};

/// Where a workspace's shard lives, as the directory said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub shard_id: u64,
    /// The map epoch at which this shard's placement last changed.
    pub epoch: u64,
    /// The map epoch of the answer (for logs: compare with a refusal's).
    pub map_epoch: u64,
    /// `http://host:port` of each replica, in the directory's order; never
    /// empty.
    pub replicas: Arc<[String]>,
}

/// Why a request goes to the configured nodes instead of a placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// No workspace named: a cluster-wide call (the CLI listing everything).
    NoWorkspace,
    /// The seeds predate the directory (`UNIMPLEMENTED`).
    NoDirectory,
    /// No seed answered within the retry budget.
    DirectoryUnreachable,
    /// The router is pinned to its configured nodes (`pinned = true`).
    Pinned,
}

/// The nodes a workspace's requests go to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Placed(Placement),
    Configured { nodes: Arc<[String]>, why: Fallback },
}

impl Route {
    pub fn nodes(&self) -> &[String] {
        match self {
            Route::Placed(p) => &p.replicas,
            Route::Configured { nodes, .. } => nodes,
        }
    }

    /// Worth remembering across requests.
    fn cacheable(&self) -> bool {
        matches!(
            self,
            Route::Placed(_)
                | Route::Configured {
                    why: Fallback::NoDirectory,
                    ..
                }
        )
    }

    /// Worth asking the directory again within the same request: not when
    /// it just failed to answer (that would spend its whole retry budget
    /// again) or when there is nothing to ask about.
    pub fn refreshable(&self) -> bool {
        !matches!(
            self,
            Route::Configured {
                why: Fallback::NoWorkspace | Fallback::DirectoryUnreachable,
                ..
            }
        )
    }
}

/// Workspaces remembered before the cache starts over: bounded memory
/// against requests naming endless workspaces; forgetting costs one lookup.
pub const MAX_CACHED_WORKSPACES: usize = 100_000;

/// The workspace → route cache, bounded like the leader cache.
pub struct DirectoryCache {
    entries: Mutex<HashMap<String, Route>>,
    cap: usize,
}

impl DirectoryCache {
    pub fn new(cap: usize) -> Self {
        DirectoryCache {
            entries: Mutex::new(HashMap::new()),
            cap: cap.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Route>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn get(&self, workspace: &str) -> Option<Route> {
        self.lock().get(workspace).cloned()
    }

    pub fn insert(&self, workspace: &str, route: Route) {
        let mut m = self.lock();
        if m.len() >= self.cap && !m.contains_key(workspace) {
            m.clear();
        }
        m.insert(workspace.to_owned(), route);
    }

    /// Drops `workspace`'s entry if it is still `stale`: a request that saw
    /// it fail must not throw away a fresher entry another one just cached.
    pub fn invalidate_if(&self, workspace: &str, stale: &Route) {
        let mut m = self.lock();
        if m.get(workspace) == Some(stale) {
            m.remove(workspace);
        }
    }

    pub fn invalidate(&self, workspace: &str) {
        self.lock().remove(workspace);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One directory call's bound: a seed that accepted the connection but
/// hangs must not hold the request; the next seed gets a turn.
const DIRECTORY_CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// The outcome of a call on the seeds.
enum Asked<T> {
    Answer(T, String),
    /// A seed answered with an error that is the request's own answer.
    Refused(tonic::Status),
    /// No seed answered within the retry budget.
    NoAnswer,
}

/// The directory as the router sees it: seeds to ask, and the cache.
pub struct Directory {
    seeds: Arc<[String]>,
    policy: RetryPolicy,
    cache: DirectoryCache,
    /// The seed that answered last: asked first next time.
    next_seed: AtomicUsize,
    /// Never ask: the configured nodes are every route.
    pinned: bool,
}

impl Directory {
    /// `policy` is the storage calls' policy; lookups use half its rounds
    /// (a lookup that fails still leaves the configured nodes to try, which
    /// get the full budget).
    pub fn new(seeds: Arc<[String]>, policy: &RetryPolicy) -> Self {
        Directory {
            seeds,
            policy: RetryPolicy {
                rounds: policy.rounds.div_ceil(2).max(1),
                ..policy.clone()
            },
            cache: DirectoryCache::new(MAX_CACHED_WORKSPACES),
            next_seed: AtomicUsize::new(0),
            pinned: false,
        }
    }

    /// A directory that is never asked: every request goes to the
    /// configured nodes (and where their not-leader answers point).
    pub fn pinned(mut self) -> Self {
        self.pinned = true;
        self
    }

    pub fn cache(&self) -> &DirectoryCache {
        &self.cache
    }

    fn configured(&self, why: Fallback) -> Route {
        Route::Configured {
            nodes: Arc::clone(&self.seeds),
            why,
        }
    }

    /// The route for `workspace`, from the cache or the directory.
    /// `NOT_FOUND` when the directory does not know the workspace.
    pub async fn route(&self, pool: &NodePool, workspace: &str) -> Result<Route, tonic::Status> {
        if workspace.is_empty() {
            return Ok(self.configured(Fallback::NoWorkspace));
        }
        if self.pinned {
            return Ok(self.configured(Fallback::Pinned));
        }
        if let Some(r) = self.cache.get(workspace) {
            return Ok(r);
        }
        let route = self.resolve(pool, workspace).await?;
        if route.cacheable() {
            self.cache.insert(workspace, route.clone());
        }
        Ok(route)
    }

    /// Drops `stale` (the route a request just saw refused) and resolves
    /// again.
    pub async fn refresh(
        &self,
        pool: &NodePool,
        workspace: &str,
        stale: &Route,
    ) -> Result<Route, tonic::Status> {
        self.cache.invalidate_if(workspace, stale);
        self.route(pool, workspace).await
    }

    async fn resolve(&self, pool: &NodePool, workspace: &str) -> Result<Route, tonic::Status> {
        let req = ResolveWorkspaceRequest {
            workspace: workspace.to_owned(),
        };
        let asked = self
            .ask(pool, |ch| {
                let req = req.clone();
                async move {
                    ClusterClient::new(ch)
                        .resolve_workspace(req)
                        .await
                        .map(tonic::Response::into_inner)
                }
            })
            .await;
        match asked {
            Asked::Answer(resp, seed) => {
                let p = placement(&seed, workspace, resp)?;
                tracing::debug!(
                    workspace,
                    shard = p.shard_id,
                    epoch = p.epoch,
                    replicas = ?p.replicas,
                    "workspace resolved"
                );
                Ok(Route::Placed(p))
            }
            Asked::Refused(s) if s.code() == tonic::Code::NotFound => Err(
                tonic::Status::not_found(format!("workspace {workspace} not found")),
            ),
            Asked::Refused(s) if s.code() == tonic::Code::Unimplemented => {
                Ok(self.configured(Fallback::NoDirectory))
            }
            Asked::Refused(s) => Err(s),
            Asked::NoAnswer => {
                tracing::warn!(
                    workspace,
                    "no seed node answered the directory lookup; trying the configured nodes"
                );
                Ok(self.configured(Fallback::DirectoryUnreachable))
            }
        }
    }

    /// Registers `name` in the directory (idempotent on the nodes' side,
    /// so replaying it on another seed is safe). Without a directory there
    /// is nothing to register.
    pub async fn create_workspace(&self, pool: &NodePool, name: &str) -> Result<(), tonic::Status> {
        let req = CreateWorkspaceRequest {
            name: name.to_owned(),
        };
        let asked = self
            .ask(pool, |ch| {
                let req = req.clone();
                async move {
                    ClusterClient::new(ch)
                        .create_workspace(req)
                        .await
                        .map(tonic::Response::into_inner)
                }
            })
            .await;
        match asked {
            Asked::Answer(ws, _) => {
                tracing::info!(
                    workspace = name,
                    id = ws.id,
                    shard = ws.shard_id,
                    "workspace created"
                );
                self.cache.invalidate(name);
                Ok(())
            }
            Asked::Refused(s) if s.code() == tonic::Code::Unimplemented => Ok(()),
            Asked::Refused(s) => Err(s),
            Asked::NoAnswer => Err(tonic::Status::unavailable(
                "no storage node reachable to create the workspace",
            )),
        }
    }

    /// Runs `call` on the seeds: from the one that answered last, to the
    /// next on unreachable, in bounded passes with backoff. Leader hints are
    /// not followed (the node forwards to the meta group itself).
    async fn ask<T, F, Fut>(&self, pool: &NodePool, mut call: F) -> Asked<T>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let Some(first) = self
            .seeds
            .get(self.next_seed.load(Ordering::Relaxed) % self.seeds.len().max(1))
        else {
            return Asked::NoAnswer;
        };
        let mut seed = first.clone();
        let mut attempts = 0u32;
        loop {
            let result = match pool.channel(&seed) {
                Ok(ch) => tokio::time::timeout(DIRECTORY_CALL_TIMEOUT, call(ch))
                    .await
                    .unwrap_or_else(|_| {
                        Err(tonic::Status::unavailable("directory lookup timed out"))
                    }),
                Err(e) => Err(tonic::Status::unavailable(format!(
                    "bad storage node address {seed}: {e}"
                ))),
            };
            let status = match result {
                Ok(v) => {
                    if let Some(i) = self.seeds.iter().position(|s| *s == seed) {
                        self.next_seed.store(i, Ordering::Relaxed);
                    }
                    return Asked::Answer(v, seed);
                }
                Err(s) => s,
            };
            attempts += 1;
            if Failure::classify(&status) == Failure::Other {
                return Asked::Refused(status);
            }
            match decide(
                &self.policy,
                &self.seeds,
                &seed,
                &Failure::Unreachable,
                attempts,
            ) {
                Decision::GiveUp => {
                    tracing::warn!(attempts, last = %status.message(), "directory unreachable");
                    return Asked::NoAnswer;
                }
                Decision::Retry { node, backoff } => {
                    if !backoff.is_zero() {
                        tokio::time::sleep(backoff).await;
                    }
                    seed = node;
                }
            }
        }
    }
}

/// A `ResolveWorkspace` answer as a placement; replica addresses become
/// URLs with the scheme of the seed that answered.
pub fn placement(
    seed: &str,
    workspace: &str,
    resp: ResolveWorkspaceResponse,
) -> Result<Placement, tonic::Status> {
    let mut replicas: Vec<String> = Vec::with_capacity(resp.replicas.len());
    for node in &resp.replicas {
        let addr = node.addr.trim();
        if addr.is_empty() {
            continue;
        }
        let url = hint_url(seed, addr);
        if !replicas.contains(&url) {
            replicas.push(url);
        }
    }
    if replicas.is_empty() {
        return Err(tonic::Status::unavailable(format!(
            "the directory names no replica for workspace {workspace}"
        )));
    }
    let placed = resp.placement.unwrap_or_default();
    let shard_id = if placed.shard_id != 0 {
        placed.shard_id
    } else {
        resp.workspace.map_or(0, |w| w.shard_id)
    };
    Ok(Placement {
        shard_id,
        epoch: placed.epoch,
        map_epoch: resp.map_epoch,
        replicas: replicas.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_proto::cluster::{Node, ShardPlacement, Workspace};

    fn placed(epoch: u64, replicas: &[&str]) -> Route {
        Route::Placed(Placement {
            shard_id: 1,
            epoch,
            map_epoch: epoch,
            replicas: replicas.iter().map(|s| (*s).to_owned()).collect(),
        })
    }

    #[test]
    fn cache_is_bounded() {
        let c = DirectoryCache::new(3);
        for ws in ["a", "b", "c"] {
            c.insert(ws, placed(1, &["http://n:1"]));
        }
        assert_eq!(c.len(), 3);
        // Replacing a known entry at the cap keeps the others.
        c.insert("a", placed(2, &["http://n:2"]));
        assert_eq!(c.len(), 3);
        // A new one at the cap starts over.
        c.insert("d", placed(1, &["http://n:1"]));
        assert_eq!(c.len(), 1);
        assert!(c.get("a").is_none());
        assert_eq!(c.get("d"), Some(placed(1, &["http://n:1"])));
    }

    #[test]
    fn invalidate_drops_only_the_stale_entry() {
        let c = DirectoryCache::new(10);
        let old = placed(1, &["http://a:1"]);
        let new = placed(2, &["http://b:1"]);
        c.insert("w", old.clone());
        c.insert("x", old.clone());
        c.invalidate_if("w", &old);
        assert!(c.get("w").is_none());
        assert_eq!(c.get("x"), Some(old.clone()), "other workspaces kept");
        // Another request cached a fresher entry: a late invalidation of
        // the old one leaves it.
        c.insert("w", new.clone());
        c.invalidate_if("w", &old);
        assert_eq!(c.get("w"), Some(new));
        c.invalidate("w");
        assert!(c.get("w").is_none());
        assert!(!c.is_empty());
    }

    #[test]
    fn only_useful_routes_are_cached_or_refreshed() {
        let nodes: Arc<[String]> = vec!["http://a:1".to_owned()].into();
        let conf = |why| Route::Configured {
            nodes: Arc::clone(&nodes),
            why,
        };
        assert!(placed(1, &["http://a:1"]).cacheable());
        assert!(conf(Fallback::NoDirectory).cacheable());
        assert!(!conf(Fallback::DirectoryUnreachable).cacheable());
        assert!(!conf(Fallback::NoWorkspace).cacheable());
        assert!(placed(1, &["http://a:1"]).refreshable());
        assert!(conf(Fallback::NoDirectory).refreshable());
        assert!(!conf(Fallback::DirectoryUnreachable).refreshable());
        assert!(!conf(Fallback::NoWorkspace).refreshable());
    }

    #[test]
    fn answer_becomes_replica_urls() {
        let node = |id, addr: &str| Node {
            id,
            addr: addr.into(),
            state: 1,
        };
        let resp = ResolveWorkspaceResponse {
            workspace: Some(Workspace {
                id: 4,
                name: "w".into(),
                shard_id: 2,
            }),
            placement: Some(ShardPlacement {
                shard_id: 2,
                replicas: vec![3, 1],
                epoch: 7,
            }),
            replicas: vec![
                node(3, "10.0.0.3:7410"),
                node(1, "10.0.0.1:7410"),
                node(9, " "),
            ],
            map_epoch: 9,
        };
        let p = placement("https://seed:1", "w", resp).expect("placement");
        assert_eq!(
            p,
            Placement {
                shard_id: 2,
                epoch: 7,
                map_epoch: 9,
                replicas: vec![
                    "https://10.0.0.3:7410".to_owned(),
                    "https://10.0.0.1:7410".to_owned()
                ]
                .into(),
            }
        );
        let empty = ResolveWorkspaceResponse::default();
        assert_eq!(
            placement("http://seed:1", "w", empty)
                .expect_err("no replica")
                .code(),
            tonic::Code::Unavailable
        );
    }

    #[tokio::test]
    async fn no_reachable_seed_falls_back_to_the_configured_nodes_uncached() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port");
        let seeds: Arc<[String]> = vec![format!("http://{closed}")].into();
        let policy = RetryPolicy {
            rounds: 2,
            base_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(1),
        };
        let dir = Directory::new(Arc::clone(&seeds), &policy);
        let route = dir
            .route(&NodePool::default(), "w")
            .await
            .expect("fallback");
        assert_eq!(
            route,
            Route::Configured {
                nodes: seeds,
                why: Fallback::DirectoryUnreachable
            }
        );
        assert!(dir.cache().is_empty(), "a transient failure is not cached");
        assert_eq!(
            dir.create_workspace(&NodePool::default(), "w")
                .await
                .expect_err("nobody to create it")
                .code(),
            tonic::Code::Unavailable
        );
    }
}
