//! Raft network: three in-process nodes, each with its own RocksDB and a
//! gRPC server, hosting two groups multiplexed over one channel per peer.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use cairn_raft::network::{GroupNetworkFactory, GroupRegistry, PeerPool, RaftService};
use cairn_raft::{
    ApplyLogic, Command, GroupId, GroupState, GroupStateMachine, NodeId, PeerAddr, RaftDb,
    TransportFilter, TypeConfig,
};
use openraft::async_runtime::WatchReceiver;
use openraft::{Config, ServerState};
use serde::{Deserialize, Serialize};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const G1: GroupId = GroupId(1);
const G2: GroupId = GroupId(2);
const WAIT: Duration = Duration::from_secs(10);

/// Test application: a key-value map.
#[derive(Debug, Serialize, Deserialize)]
struct Put {
    key: String,
    value: String,
}

struct KvLogic;

impl ApplyLogic for KvLogic {
    type Request = Put;
    type Response = ();
    type Error = rocksdb::Error;

    fn apply(&self, state: &mut GroupState<'_>, request: Put) -> Result<(), rocksdb::Error> {
        state.put(request.key.as_bytes(), request.value.as_bytes());
        Ok(())
    }
}

type GroupRaft = openraft::Raft<TypeConfig, GroupStateMachine<KvLogic>>;

fn test_config() -> Arc<Config> {
    let config = Config {
        cluster_name: "network-test".into(),
        heartbeat_interval: 100,
        election_timeout_min: 300,
        election_timeout_max: 600,
        // Snapshots happen only when a test asks for one.
        snapshot_policy: openraft::SnapshotPolicy::Never,
        max_in_snapshot_log_to_keep: 0,
        ..Default::default()
    };
    Arc::new(config.validate().expect("test raft config is valid"))
}

struct Node {
    id: NodeId,
    addr: PeerAddr,
    db: RaftDb,
    pool: PeerPool,
    registry: GroupRegistry,
    rafts: HashMap<GroupId, GroupRaft>,
    stop_server: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
    _dir: TempDir,
}

impl Node {
    /// Opens the node's DB and starts its gRPC server (no groups yet).
    async fn start(id: NodeId) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let db = RaftDb::open(&dir.path().join("db"), &dir.path().join("snapshots"))?;
        let registry = GroupRegistry::new();
        let service = RaftService::new(id, db.clone(), registry.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = PeerAddr {
            addr: listener.local_addr()?.to_string(),
        };
        let (stop_tx, stop_rx) = oneshot::channel();
        let server = tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .add_service(service.into_server())
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = stop_rx.await;
                    },
                )
                .await;
            if let Err(e) = result {
                eprintln!("raft server of node {id} failed: {e}");
            }
        });
        Ok(Self {
            id,
            addr,
            db,
            pool: PeerPool::default(),
            registry,
            rafts: HashMap::new(),
            stop_server: Some(stop_tx),
            server: Some(server),
            _dir: dir,
        })
    }

    /// Creates the node's replica of `group` and registers it with the
    /// server.
    async fn add_group(&mut self, group: GroupId, filter: &TransportFilter) -> Result<()> {
        let network = GroupNetworkFactory::new(group, self.id, self.pool.clone(), filter.clone());
        let raft = openraft::Raft::new(
            self.id,
            test_config(),
            network,
            self.db.log_store(group),
            self.db.state_machine(group, KvLogic)?,
        )
        .await?;
        self.registry.register(group, raft.clone());
        self.rafts.insert(group, raft);
        Ok(())
    }

    fn raft(&self, group: GroupId) -> &GroupRaft {
        &self.rafts[&group]
    }

    fn value(&self, group: GroupId, key: &str) -> Option<String> {
        self.db
            .state_view(group)
            .get(key.as_bytes())
            .expect("state read")
            .map(|v| String::from_utf8(v).expect("utf-8 value"))
    }

    /// Stops every raft instance and the server, like a crashed process.
    async fn shutdown(&mut self) -> Result<()> {
        for (group, raft) in self.rafts.drain() {
            self.registry.unregister(group);
            raft.shutdown().await.map_err(|e| anyhow!("{e}"))?;
        }
        if let Some(stop) = self.stop_server.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            if tokio::time::timeout(WAIT, server).await.is_err() {
                bail!("server of node {} did not stop", self.id);
            }
        }
        Ok(())
    }
}

struct Cluster {
    nodes: BTreeMap<NodeId, Node>,
    filter: TransportFilter,
}

impl Cluster {
    /// Starts nodes `ids` hosting `groups`; does not initialize membership.
    async fn start(ids: &[NodeId], groups: &[GroupId]) -> Result<Self> {
        let filter = TransportFilter::new();
        let mut nodes = BTreeMap::new();
        for &id in ids {
            let mut node = Node::start(id).await?;
            for &group in groups {
                node.add_group(group, &filter).await?;
            }
            nodes.insert(id, node);
        }
        Ok(Self { nodes, filter })
    }

    fn members(&self, ids: &[NodeId]) -> BTreeMap<NodeId, PeerAddr> {
        ids.iter()
            .map(|id| (*id, self.nodes[id].addr.clone()))
            .collect()
    }

    async fn initialize(&self, group: GroupId, ids: &[NodeId]) -> Result<()> {
        self.nodes[&ids[0]]
            .raft(group)
            .initialize(self.members(ids))
            .await?;
        Ok(())
    }

    fn live(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values().filter(|n| !n.rafts.is_empty())
    }

    /// Waits until a live node among `among` is leader of `group` and every
    /// other node of `among` agrees; returns the leader.
    async fn leader(&self, group: GroupId, among: &[NodeId]) -> Result<NodeId> {
        wait_until(WAIT, &format!("a leader of group {group}"), || async {
            let mut seen = None;
            for id in among {
                let m = self.nodes[id]
                    .raft(group)
                    .metrics()
                    .borrow_watched()
                    .clone();
                let leader = m.current_leader?;
                if seen.is_some_and(|s| s != leader) || !among.contains(&leader) {
                    return None;
                }
                seen = Some(leader);
            }
            let leader = seen?;
            let state = self.nodes[&leader]
                .raft(group)
                .metrics()
                .borrow_watched()
                .state;
            (state == ServerState::Leader).then_some(leader)
        })
        .await
    }

    /// Proposes a put through the leader elected among `among`.
    async fn put(&self, group: GroupId, among: &[NodeId], key: &str, value: &str) -> Result<()> {
        let cmd = Command::encode(&Put {
            key: key.into(),
            value: value.into(),
        })?;
        let deadline = Instant::now() + WAIT;
        loop {
            let leader = self.leader(group, among).await?;
            match self.nodes[&leader]
                .raft(group)
                .client_write(cmd.clone())
                .await
            {
                Ok(_) => return Ok(()),
                // Leadership moved between lookup and proposal: look again.
                Err(e) if Instant::now() < deadline => {
                    eprintln!("write to group {group} via {leader} failed, retrying: {e}");
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn wait_value(
        &self,
        group: GroupId,
        ids: &[NodeId],
        key: &str,
        value: &str,
    ) -> Result<()> {
        wait_until(
            WAIT,
            &format!("{key}={value} in group {group} on {ids:?}"),
            || async {
                ids.iter()
                    .all(|id| self.nodes[id].value(group, key).as_deref() == Some(value))
                    .then_some(())
            },
        )
        .await
    }
}

/// Polls `check` every 20 ms until it yields a value or `timeout` passes.
async fn wait_until<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_groups_replicate_over_shared_channels_and_survive_leader_shutdown() -> Result<()> {
    let all = [1, 2, 3];
    let mut cluster = Cluster::start(&all, &[G1, G2]).await?;
    cluster.initialize(G1, &all).await?;
    cluster.initialize(G2, &all).await?;

    for group in [G1, G2] {
        cluster.put(group, &all, "a", &format!("a-{group}")).await?;
    }
    for group in [G1, G2] {
        cluster
            .wait_value(group, &all, "a", &format!("a-{group}"))
            .await?;
    }
    // Groups do not leak into each other's state.
    assert_eq!(cluster.nodes[&1].value(G1, "a").as_deref(), Some("a-1"));
    assert_eq!(cluster.nodes[&1].value(G2, "a").as_deref(), Some("a-2"));
    // Make one node lead both groups (this also exercises TransferLeader):
    // it then replicates two groups to two peers over two channels.
    let l1 = cluster.leader(G1, &all).await?;
    let l2 = cluster.leader(G2, &all).await?;
    if l2 != l1 {
        cluster.nodes[&l2]
            .raft(G2)
            .trigger()
            .transfer_leader(l1)
            .await?;
        wait_until(WAIT, "leadership of group 2 moves", || async {
            (cluster.leader(G2, &all).await.ok()? == l1).then_some(())
        })
        .await?;
    }
    cluster.put(G2, &all, "shared", "yes").await?;
    cluster.wait_value(G2, &all, "shared", "yes").await?;
    assert_eq!(cluster.nodes[&l1].pool.len(), 2, "one channel per peer");
    for node in cluster.live() {
        assert!(node.pool.len() <= 2, "node {} has extra channels", node.id);
    }

    let old = cluster.leader(G1, &all).await?;
    cluster
        .nodes
        .get_mut(&old)
        .context("leader node")?
        .shutdown()
        .await?;
    let rest: Vec<NodeId> = all.iter().copied().filter(|id| *id != old).collect();
    let new = cluster.leader(G1, &rest).await?;
    assert_ne!(new, old);
    for group in [G1, G2] {
        cluster
            .put(group, &rest, "b", &format!("b-{group}"))
            .await?;
        cluster
            .wait_value(group, &rest, "b", &format!("b-{group}"))
            .await?;
    }
    for node in cluster.nodes.values_mut() {
        node.shutdown().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn isolated_leader_cannot_commit_and_catches_up_after_heal() -> Result<()> {
    let all = [1, 2, 3];
    let mut cluster = Cluster::start(&all, &[G1, G2]).await?;
    cluster.initialize(G1, &all).await?;
    cluster.initialize(G2, &all).await?;
    cluster.put(G1, &all, "k", "before").await?;
    cluster.wait_value(G1, &all, "k", "before").await?;

    let old = cluster.leader(G1, &all).await?;
    let majority: Vec<NodeId> = all.iter().copied().filter(|id| *id != old).collect();
    cluster.filter.isolate(old);

    // The isolated leader cannot reach a quorum, so its proposal never
    // commits (it either hangs or fails once the leader steps down).
    let lost = Command::encode(&Put {
        key: "k".into(),
        value: "lost".into(),
    })?;
    let attempt = tokio::time::timeout(
        Duration::from_millis(1500),
        cluster.nodes[&old].raft(G1).client_write(lost),
    )
    .await;
    assert!(
        !matches!(attempt, Ok(Ok(_))),
        "isolated leader committed a write"
    );

    let new = cluster.leader(G1, &majority).await?;
    assert_ne!(new, old);
    cluster.put(G1, &majority, "k", "after").await?;
    cluster.wait_value(G1, &majority, "k", "after").await?;
    assert_eq!(
        cluster.nodes[&old].value(G1, "k").as_deref(),
        Some("before"),
        "the isolated node must not see writes while cut off"
    );

    cluster.filter.heal();
    cluster.wait_value(G1, &all, "k", "after").await?;
    // All three agree on one leader again (any term, any node).
    cluster.leader(G1, &all).await?;
    // The group that was not disturbed keeps working too.
    cluster.put(G2, &all, "k", "g2").await?;
    cluster.wait_value(G2, &all, "k", "g2").await?;
    for node in cluster.nodes.values_mut() {
        node.shutdown().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn new_learner_receives_a_streamed_snapshot_after_log_purge() -> Result<()> {
    let mut cluster = Cluster::start(&[1, 2, 3], &[G1]).await?;
    cluster.initialize(G1, &[1, 2]).await?;
    for i in 0..50 {
        cluster
            .put(G1, &[1, 2], &format!("key-{i:03}"), &format!("value-{i}"))
            .await?;
    }
    let leader = cluster.leader(G1, &[1, 2]).await?;
    let raft = cluster.nodes[&leader].raft(G1).clone();
    let applied = raft
        .metrics()
        .borrow_watched()
        .last_applied
        .context("leader applied entries")?
        .index;
    raft.trigger().snapshot().await?;
    raft.wait(Some(WAIT))
        .metrics(
            |m| m.snapshot.is_some_and(|s| s.index >= applied),
            "leader snapshot",
        )
        .await?;
    raft.trigger().purge_log(applied).await?;
    raft.wait(Some(WAIT))
        .metrics(
            |m| m.purged.is_some_and(|p| p.index >= applied),
            "leader purged its log",
        )
        .await?;

    // Node 3 has an empty log: the purged entries can only reach it as a
    // snapshot, streamed in chunks over the network.
    raft.add_learner(3, cluster.nodes[&3].addr.clone(), true)
        .await?;
    cluster.wait_value(G1, &[3], "key-049", "value-49").await?;
    let learner = cluster.nodes[&3]
        .raft(G1)
        .metrics()
        .borrow_watched()
        .clone();
    assert!(
        learner.snapshot.is_some_and(|s| s.index >= applied),
        "learner installed a snapshot: {:?}",
        learner.snapshot
    );
    for i in 0..50 {
        assert_eq!(
            cluster.nodes[&3].value(G1, &format!("key-{i:03}")),
            Some(format!("value-{i}"))
        );
    }
    for node in cluster.nodes.values_mut() {
        node.shutdown().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_group_is_not_found() -> Result<()> {
    let mut node = Node::start(1).await?;
    let mut client =
        cairn_proto::raft::raft_client::RaftClient::connect(format!("http://{}", node.addr.addr))
            .await?;
    let status = client
        .vote(cairn_proto::raft::GroupMessage {
            group: 42,
            payload: Default::default(),
        })
        .await
        .expect_err("group 42 is not hosted");
    assert_eq!(status.code(), tonic::Code::NotFound);
    node.shutdown().await?;
    Ok(())
}
