//! Routing a workspace's requests to its shard's replicas, and following
//! the shard leader among them.
//!
//! The node list for a request is the workspace's replicas as the cluster
//! directory says (see [`crate::directory`]; the configured nodes when
//! there is no directory). Storage nodes are Raft-replicated: a node that is
//! not the leader answers writes with `FailedPrecondition` and the leader's
//! `host:port` in the `x-cairn-leader` metadata when it knows it. Reads may
//! go to any replica (it checks with the leader's read index), so they
//! rotate over the replicas. Writes go to the leader cached for the
//! workspace (a workspace lives on one shard) when it is one of the
//! replicas, else to the first replica, and follow hints from there (a
//! hint is authoritative, even naming a node outside the list).
//!
//! A node that does not hold the workspace's shard (it moved) refuses with
//! "wrong shard" before reading anything: the directory entry is stale, so
//! it is dropped and resolved again, and the request continues on the new
//! replica set. A pass finding every replica unreachable resolves once too.
//!
//! [`decide`] is the pure policy (which node next, after how long, or give
//! up); [`Cluster::call`] runs it against real channels.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use tonic::transport::Channel;

use crate::directory::{Directory, Route};
pub use crate::policy::{
    decide, hint_url, is_connect_failure, Decision, Failure, NodePool, RetryPolicy,
};

/// The node believed to lead the shard of each placement key (the
/// workspace: a workspace lives on one shard). Without a directory, a key
/// it has not seen starts from the leader last confirmed for any key, and
/// its own entry follows that shard's leader from then on.
pub struct LeaderCache {
    inner: Mutex<Leaders>,
}

struct Leaders {
    last: String,
    by_key: HashMap<String, String>,
}

/// Keys remembered before the map starts over: bounded memory against
/// requests naming endless workspaces; forgetting only costs a hop.
const MAX_CACHED_KEYS: usize = 100_000;

impl LeaderCache {
    pub fn new(initial: String) -> Self {
        LeaderCache {
            inner: Mutex::new(Leaders {
                last: initial,
                by_key: HashMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Leaders> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn get(&self, key: &str) -> String {
        let l = self.lock();
        l.by_key.get(key).unwrap_or(&l.last).clone()
    }

    /// The leader confirmed (or moved to) for `key` itself, if any.
    pub fn known(&self, key: &str) -> Option<String> {
        self.lock().by_key.get(key).cloned()
    }

    /// Moves `key` from `failed` to `next` unless another request already
    /// moved it: concurrent failures must not race it round-robin.
    pub fn replace(&self, key: &str, failed: &str, next: &str) {
        let mut l = self.lock();
        let cur = l.by_key.get(key).unwrap_or(&l.last).clone();
        if cur == failed {
            Self::set(&mut l, key, next);
        }
    }

    /// `node` answered a leader-only request for `key`: it leads that shard.
    pub fn confirm(&self, key: &str, node: &str) {
        let mut l = self.lock();
        if l.by_key.get(key).map(String::as_str) != Some(node) {
            tracing::info!(leader = node, key, "storage leader changed");
        }
        Self::set(&mut l, key, node);
        if l.last != node {
            l.last = node.to_owned();
        }
    }

    fn set(l: &mut Leaders, key: &str, node: &str) {
        if l.by_key.len() >= MAX_CACHED_KEYS && !l.by_key.contains_key(key) {
            l.by_key.clear();
        }
        l.by_key.insert(key.to_owned(), node.to_owned());
    }
}

/// A failed attempt, and whether the request can be sent again.
pub struct Attempt {
    pub status: tonic::Status,
    pub replayable: bool,
}

impl Attempt {
    /// A failed call that changes state. It may be sent again only when the
    /// node certainly did not act on it: it refused as a non-leader or as
    /// not holding the shard, or no connection was ever made. A connection lost mid-call leaves the
    /// outcome unknown (a create may have happened), so the caller answers.
    pub fn mutation(status: tonic::Status) -> Self {
        let replayable = refused_before_acting(&status);
        Attempt { status, replayable }
    }
}

/// Whether the node certainly did not act on the request: it refused as a
/// non-leader or as not holding the shard (both before reading any request
/// byte), or the connection was never made. Anything else (a connection
/// lost mid-call, a node killed after its commit) may have applied it.
pub fn refused_before_acting(status: &tonic::Status) -> bool {
    matches!(
        Failure::classify(status),
        Failure::NotLeader { .. } | Failure::WrongShard { .. }
    ) || is_connect_failure(status)
}

impl From<tonic::Status> for Attempt {
    fn from(status: tonic::Status) -> Self {
        Attempt {
            status,
            replayable: true,
        }
    }
}

/// Runs `call` on the leader among `candidates` (node URLs) — of a shard,
/// or of the directory — following not-leader hints and moving past
/// unreachable nodes within `policy`'s bounds, as [`Cluster`] does for a
/// workspace; for callers that already know which nodes to ask (the CLI,
/// one node calling another). Returns the answer and the node that gave it.
pub async fn follow_leader<T, F, Fut>(
    pool: &NodePool,
    policy: &RetryPolicy,
    candidates: &[String],
    mut call: F,
) -> Result<(T, String), tonic::Status>
where
    F: FnMut(Channel) -> Fut,
    Fut: Future<Output = Result<T, Attempt>>,
{
    let Some(first) = candidates.first() else {
        return Err(tonic::Status::unavailable("no node to ask"));
    };
    let mut node = first.clone();
    let mut attempts = 0u32;
    loop {
        let result = match pool.channel(&node) {
            Ok(channel) => call(channel).await,
            Err(e) => Err(Attempt::from(tonic::Status::unavailable(format!(
                "bad node address {node}: {e}"
            )))),
        };
        let failed = match result {
            Ok(v) => return Ok((v, node)),
            Err(a) => a,
        };
        attempts += 1;
        let failure = Failure::classify(&failed.status);
        if !failed.replayable && failure != Failure::Other {
            return Err(failed.status);
        }
        match decide(policy, candidates, &node, &failure, attempts) {
            Decision::GiveUp => return Err(failed.status),
            Decision::Retry {
                node: next,
                backoff,
            } => {
                if !backoff.is_zero() {
                    tokio::time::sleep(backoff).await;
                }
                node = next;
            }
        }
    }
}

/// The storage cluster as the router sees it.
pub struct Cluster {
    pool: NodePool,
    leader: LeaderCache,
    directory: Directory,
    policy: RetryPolicy,
    /// Where the next read starts: reads rotate over the replicas.
    next_read: std::sync::atomic::AtomicUsize,
}

impl Cluster {
    /// `nodes` must not be empty (the config validation ensures it).
    pub fn new(nodes: Vec<String>, policy: RetryPolicy) -> Arc<Self> {
        Self::build(nodes, policy, false)
    }

    /// Like [`Cluster::new`], sending every request to `nodes` (and where
    /// their not-leader answers point) without asking the directory: a
    /// router pinned to some nodes.
    pub fn pinned(nodes: Vec<String>, policy: RetryPolicy) -> Arc<Self> {
        Self::build(nodes, policy, true)
    }

    fn build(nodes: Vec<String>, policy: RetryPolicy, pinned: bool) -> Arc<Self> {
        let first = nodes.first().cloned().unwrap_or_default();
        let directory = Directory::new(nodes.into(), &policy);
        Arc::new(Cluster {
            // The configured nodes are the directory's seeds, and the route
            // when there is no directory.
            directory: if pinned {
                directory.pinned()
            } else {
                directory
            },
            pool: NodePool::default(),
            leader: LeaderCache::new(first),
            policy,
            next_read: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// The node believed to lead the shard of `workspace`.
    pub fn leader(&self, workspace: &str) -> String {
        self.leader.get(workspace)
    }

    /// The workspace directory and its cache.
    pub fn directory(&self) -> &Directory {
        &self.directory
    }

    /// Where `workspace`'s requests go (cached). `NOT_FOUND` when the
    /// directory does not know it; an empty name means the configured
    /// nodes.
    pub async fn route(&self, workspace: &str) -> Result<Route, tonic::Status> {
        self.directory.route(&self.pool, workspace).await
    }

    /// Makes sure the directory knows `workspace`, creating it if not.
    pub async fn ensure_workspace(&self, workspace: &str) -> Result<(), tonic::Status> {
        match self.route(workspace).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::NotFound => {
                self.directory.create_workspace(&self.pool, workspace).await
            }
            Err(s) => Err(s),
        }
    }

    /// Runs `call` against the leader of `workspace`'s shard, following
    /// hints, stale directory entries and unreachable nodes while the
    /// failure allows it and the attempt says it is replayable. Callers
    /// return `Ok` as soon as response bytes may flow: nothing after that
    /// is retried. `NOT_FOUND` without any call when the workspace does
    /// not exist.
    pub async fn call<T, F, Fut>(&self, workspace: &str, call: F) -> Result<T, tonic::Status>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<T, Attempt>>,
    {
        self.run(workspace, true, call).await
    }

    /// Runs a read that any replica can serve linearizably (storage nodes
    /// check with the leader's read index): starts at the next replica of
    /// `workspace` in rotation, spreading clones over them, and fails over
    /// like [`Cluster::call`] without moving the leader cache. An empty
    /// `workspace` (a cluster-wide read) rotates over the configured nodes.
    pub async fn call_read<T, F, Fut>(&self, workspace: &str, call: F) -> Result<T, tonic::Status>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<T, Attempt>>,
    {
        self.run(workspace, false, call).await
    }

    /// The first node of a request on `route`.
    fn start(&self, key: &str, route: &Route, tracks_leader: bool) -> String {
        let nodes = route.nodes();
        if tracks_leader {
            return match route {
                // Without a directory, as before: the key's leader, else
                // the last one seen (it may be a hinted, unlisted node).
                Route::Configured { .. } => self.leader.get(key),
                Route::Placed(_) => self
                    .leader
                    .known(key)
                    .filter(|l| nodes.contains(l))
                    .or_else(|| nodes.first().cloned())
                    .unwrap_or_default(),
            };
        }
        let i = self
            .next_read
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        nodes
            .get(i % nodes.len().max(1))
            .cloned()
            .unwrap_or_default()
    }

    async fn run<T, F, Fut>(
        &self,
        key: &str,
        tracks_leader: bool,
        mut call: F,
    ) -> Result<T, tonic::Status>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<T, Attempt>>,
    {
        let mut route = self.route(key).await?;
        let mut node = self.start(key, &route, tracks_leader);
        let mut attempts = 0u32;
        // Nodes of `route` found unreachable; all of them → resolve again,
        // once per request.
        let mut unreachable: HashSet<String> = HashSet::new();
        let mut refreshed_unreachable = false;
        loop {
            let result = match self.pool.channel(&node) {
                Ok(channel) => call(channel).await,
                Err(e) => Err(Attempt::from(tonic::Status::unavailable(format!(
                    "bad storage node address {node}: {e}"
                )))),
            };
            let failed = match result {
                Ok(v) => {
                    if tracks_leader {
                        self.leader.confirm(key, &node);
                    }
                    return Ok(v);
                }
                Err(a) => a,
            };
            attempts += 1;
            let failure = Failure::classify(&failed.status);
            if failure == Failure::Other {
                return Err(failed.status);
            }
            if !failed.replayable {
                if matches!(failure, Failure::WrongShard { .. }) {
                    // The client's retry must not meet the same entry.
                    self.directory.cache().invalidate_if(key, &route);
                }
                tracing::warn!(
                    node,
                    ?failure,
                    "storage node failed after the request body was consumed; not retrying"
                );
                return Err(tonic::Status::unavailable(
                    "storage leader changed mid-request",
                ));
            }
            let stale = match &failure {
                Failure::WrongShard { epoch } => {
                    tracing::info!(
                        node,
                        workspace = key,
                        node_epoch = ?epoch,
                        cached = ?route,
                        "storage node does not hold the workspace's shard; resolving again"
                    );
                    true
                }
                // Only a placement can have moved; without one the seeds
                // are the very nodes just found unreachable.
                Failure::Unreachable => {
                    unreachable.insert(node.clone());
                    let all = route.nodes().iter().all(|n| unreachable.contains(n));
                    let refresh =
                        all && !refreshed_unreachable && matches!(route, Route::Placed(_));
                    refreshed_unreachable |= refresh;
                    refresh
                }
                _ => {
                    unreachable.remove(&node);
                    false
                }
            };
            if stale
                && route.refreshable()
                && attempts < self.policy.max_attempts(route.nodes().len())
            {
                let fresh = self.directory.refresh(&self.pool, key, &route).await?;
                let moved = fresh.nodes() != route.nodes();
                route = fresh;
                if moved {
                    unreachable.clear();
                    let next = self.start(key, &route, tracks_leader);
                    tracing::debug!(
                        from = node,
                        to = next,
                        "workspace moved; retrying on its replicas"
                    );
                    node = next;
                    continue;
                }
            }
            match decide(&self.policy, route.nodes(), &node, &failure, attempts) {
                Decision::GiveUp => {
                    tracing::warn!(node, attempts, ?failure, "no storage leader found");
                    return Err(tonic::Status::unavailable("no storage leader available"));
                }
                Decision::Retry {
                    node: next,
                    backoff,
                } => {
                    tracing::debug!(
                        from = node,
                        to = next,
                        ?failure,
                        ?backoff,
                        "retrying on another storage node"
                    );
                    if tracks_leader {
                        self.leader.replace(key, &node, &next);
                    }
                    if !backoff.is_zero() {
                        tokio::time::sleep(backoff).await;
                    }
                    node = next;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_proto::routing::Refusal;
    use std::time::Duration;

    fn nodes() -> Vec<String> {
        vec![
            "http://a:1".into(),
            "http://b:1".into(),
            "http://c:1".into(),
        ]
    }

    fn retry(node: &str, ms: u64) -> Decision {
        Decision::Retry {
            node: node.into(),
            backoff: Duration::from_millis(ms),
        }
    }

    /// Round numbers, independent of the tuned defaults.
    fn policy() -> RetryPolicy {
        RetryPolicy {
            rounds: 6,
            base_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(800),
        }
    }

    #[test]
    fn decisions() {
        let p = policy();
        let hint = |h: &str| Failure::NotLeader {
            hint: Some(h.into()),
        };
        let nohint = Failure::NotLeader { hint: None };
        let cases: Vec<(&str, Failure, u32, Decision)> = vec![
            // hint present → go there, even outside the configured nodes
            ("http://a:1", hint("c:1"), 1, retry("http://c:1", 0)),
            ("http://a:1", hint("d:9"), 1, retry("http://d:9", 0)),
            // hint naming the refusing node itself → as if absent
            ("http://a:1", hint("a:1"), 1, retry("http://b:1", 0)),
            // hint absent → next node round-robin
            ("http://a:1", nohint.clone(), 1, retry("http://b:1", 0)),
            ("http://b:1", nohint.clone(), 2, retry("http://c:1", 0)),
            // wrapping to a new round waits, longer each round, capped
            ("http://c:1", nohint.clone(), 3, retry("http://a:1", 100)),
            (
                "http://c:1",
                Failure::Unreachable,
                6,
                retry("http://a:1", 200),
            ),
            (
                "http://c:1",
                Failure::Unreachable,
                12,
                retry("http://a:1", 800),
            ),
            // unreachable → next node; from a hinted node → first configured
            (
                "http://b:1",
                Failure::Unreachable,
                1,
                retry("http://c:1", 0),
            ),
            (
                "http://d:9",
                Failure::Unreachable,
                2,
                retry("http://a:1", 0),
            ),
            // other codes → give up
            ("http://a:1", Failure::Other, 1, Decision::GiveUp),
            // bounded: rounds × nodes attempts
            ("http://a:1", nohint.clone(), 18, Decision::GiveUp),
            ("http://a:1", hint("b:1"), 18, Decision::GiveUp),
        ];
        for (current, failure, attempts, want) in cases {
            assert_eq!(
                decide(&p, &nodes(), current, &failure, attempts),
                want,
                "{current} {failure:?} after {attempts}"
            );
        }
    }

    #[test]
    fn single_node_retries_itself_with_backoff() {
        let p = policy();
        let one = vec!["http://a:1".to_owned()];
        assert_eq!(
            decide(&p, &one, "http://a:1", &Failure::Unreachable, 1),
            retry("http://a:1", 100)
        );
        assert_eq!(
            decide(&p, &one, "http://a:1", &Failure::Unreachable, 6),
            Decision::GiveUp
        );
    }

    #[test]
    fn worst_case_wait_spans_an_election() {
        let p = RetryPolicy::default();
        let nodes = nodes();
        let mut total = Duration::ZERO;
        let mut cur = nodes[0].clone();
        for attempts in 1.. {
            match decide(&p, &nodes, &cur, &Failure::Unreachable, attempts) {
                Decision::Retry { node, backoff } => {
                    total += backoff;
                    cur = node;
                }
                Decision::GiveUp => break,
            }
        }
        // Longer than two elections at the 1.5 s maximum timeout (a split
        // vote), short enough to answer the client within a few seconds.
        assert!(
            total >= Duration::from_secs(3) && total <= Duration::from_secs(5),
            "{total:?}"
        );
    }

    #[test]
    fn a_connection_broken_mid_call_fails_over_reads_but_never_replays_writes() {
        let broken = tonic::Status::unknown("transport error");
        assert_eq!(Failure::classify(&broken), Failure::Unreachable);
        assert!(!refused_before_acting(&broken), "may have been applied");
        assert!(Attempt::from(tonic::Status::unknown("transport error")).replayable);
        let answered = tonic::Status::unknown("the node said something odd");
        assert_eq!(Failure::classify(&answered), Failure::Other);
    }

    #[test]
    fn classify_statuses() {
        let refused = |r: Refusal| r.into_status("whatever the words");
        assert_eq!(
            Failure::classify(&refused(Refusal::NotLeader { hint: None })),
            Failure::NotLeader { hint: None }
        );
        assert_eq!(
            Failure::classify(&refused(Refusal::NotLeader {
                hint: Some("10.0.0.2:7410".into())
            })),
            Failure::NotLeader {
                hint: Some("10.0.0.2:7410".into())
            }
        );
        assert_eq!(
            Failure::classify(&tonic::Status::unavailable("tcp connect error")),
            Failure::Unreachable
        );
        assert_eq!(
            Failure::classify(&refused(Refusal::OutcomeUnknown)),
            Failure::Other
        );
        // Words alone route nothing: only the typed refusal does.
        for s in [
            tonic::Status::failed_precondition("not the shard leader"),
            tonic::Status::failed_precondition("stale ref"),
            tonic::Status::not_found("no repo"),
        ] {
            assert_eq!(Failure::classify(&s), Failure::Other, "{s:?}");
        }
    }

    #[test]
    fn cache_moves_only_from_the_failed_node() {
        let c = LeaderCache::new("http://a:1".into());
        c.replace("w", "http://b:1", "http://c:1");
        assert_eq!(c.get("w"), "http://a:1");
        c.replace("w", "http://a:1", "http://b:1");
        assert_eq!(c.get("w"), "http://b:1");
        c.confirm("w", "http://c:1");
        assert_eq!(c.get("w"), "http://c:1");
    }

    #[test]
    fn each_workspace_follows_its_own_shard_leader() {
        let c = LeaderCache::new("http://a:1".into());
        c.confirm("team-x", "http://b:1");
        c.confirm("team-y", "http://c:1");
        assert_eq!(c.get("team-x"), "http://b:1", "not moved by team-y");
        assert_eq!(c.get("team-y"), "http://c:1");
        // An unseen workspace starts from the last leader confirmed.
        assert_eq!(c.get("team-z"), "http://c:1");
        c.replace("team-x", "http://b:1", "http://a:1");
        assert_eq!(c.get("team-x"), "http://a:1");
        assert_eq!(c.get("team-y"), "http://c:1");
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_failure_and_replayable() {
        // A port that was free a moment ago: nothing listens there.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port");
        let pool = NodePool::default();
        let channel = pool.channel(&format!("http://{addr}")).expect("channel");
        let status = cairn_proto::admin::admin_client::AdminClient::new(channel)
            .list_repositories(cairn_proto::admin::ListRepositoriesRequest::default())
            .await
            .expect_err("nothing listens");
        assert!(is_connect_failure(&status), "{status:?}");
        assert!(Attempt::mutation(status).replayable);

        let lost = tonic::Status::unavailable("error reading a body from connection");
        assert!(!is_connect_failure(&lost));
        assert!(!Attempt::mutation(lost).replayable);
        let refused = super::tests::not_leader_status();
        assert!(Attempt::mutation(refused).replayable);
    }

    fn wrong_shard_status(epoch: Option<u64>) -> tonic::Status {
        Refusal::WrongShard { epoch }.into_status("wrong shard: workspace w is on shard 3")
    }

    #[test]
    fn wrong_shard_is_a_replayable_routing_failure() {
        assert_eq!(
            Failure::classify(&wrong_shard_status(Some(12))),
            Failure::WrongShard { epoch: Some(12) }
        );
        assert_eq!(
            Failure::classify(&wrong_shard_status(None)),
            Failure::WrongShard { epoch: None }
        );
        assert!(refused_before_acting(&wrong_shard_status(Some(3))));
        assert!(Attempt::mutation(wrong_shard_status(None)).replayable);
        // Not refused for the shard: the request's own answer.
        assert_eq!(
            Failure::classify(&tonic::Status::failed_precondition("shard is read-only")),
            Failure::Other
        );
        // The list did not change after resolving again: next replica.
        assert_eq!(
            decide(
                &policy(),
                &nodes(),
                "http://a:1",
                &Failure::WrongShard { epoch: Some(3) },
                1
            ),
            retry("http://b:1", 0)
        );
    }

    fn placed(replicas: &[&str]) -> Route {
        Route::Placed(crate::directory::Placement {
            shard_id: 1,
            epoch: 1,
            map_epoch: 1,
            replicas: replicas.iter().map(|s| (*s).to_owned()).collect(),
        })
    }

    #[test]
    fn writes_start_at_the_cached_leader_only_among_the_replicas() {
        let cluster = Cluster::new(nodes(), policy());
        let route = placed(&["http://b:1", "http://c:1"]);
        assert_eq!(
            cluster.start("w", &route, true),
            "http://b:1",
            "first replica"
        );
        cluster.leader.confirm("w", "http://c:1");
        assert_eq!(
            cluster.start("w", &route, true),
            "http://c:1",
            "cached leader"
        );
        // The shard moved off the cached leader: first replica again.
        cluster.leader.confirm("w", "http://a:1");
        assert_eq!(cluster.start("w", &route, true), "http://b:1");
        // Another workspace's leader (the last seen) is no hint here.
        assert_eq!(cluster.start("v", &route, true), "http://b:1");
        // Without a directory, as before: the last leader seen.
        let configured = Route::Configured {
            nodes: nodes().into(),
            why: crate::directory::Fallback::NoDirectory,
        };
        assert_eq!(cluster.start("v", &configured, true), "http://a:1");
    }

    #[test]
    fn reads_rotate_over_the_route() {
        let cluster = Cluster::new(nodes(), policy());
        let route = placed(&["http://b:1", "http://c:1"]);
        let starts: Vec<String> = (0..4).map(|_| cluster.start("w", &route, false)).collect();
        assert_eq!(
            starts,
            ["http://b:1", "http://c:1", "http://b:1", "http://c:1"]
        );
    }

    fn not_leader_status() -> tonic::Status {
        Refusal::NotLeader { hint: None }.into_status("not the shard leader")
    }
}
