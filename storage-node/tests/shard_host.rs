//! Shard host: three in-process nodes replicate one shard over gRPC, elect
//! a leader, route proposals, serve linearizable reads and fail over.

mod common;
use common::wait_until;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cairn_raft::TransportFilter;
use cairn_storage_node::host::{ProposeError, ShardHost, ShardHostConfig, ShardSpec, META_GROUP};
use cairn_storage_node::meta::state::{MetaRequest, MetaResponse};
use cairn_storage_node::repo::RepoRecord;
use cairn_storage_node::shard::state::{keys, Refusal, ShardRequest, ShardResponse};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const SHARD: u64 = 1;
const WAIT: Duration = Duration::from_secs(8);

struct Node {
    host: ShardHost,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn stop(&mut self) {
        self.host.shutdown().await;
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            tokio::time::timeout(WAIT, server)
                .await
                .expect("server stops")
                .expect("server task");
        }
    }
}

/// Binds the listeners first: every node's config needs every address.
async fn start_cluster(ids: &[u64]) -> BTreeMap<u64, Node> {
    start_cluster_with_meta(ids, &[]).await
}

async fn start_cluster_with_meta(ids: &[u64], meta: &[u64]) -> BTreeMap<u64, Node> {
    let mut listeners = BTreeMap::new();
    for &id in ids {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        listeners.insert(id, l);
    }
    let peers: BTreeMap<u64, String> = listeners
        .iter()
        .map(|(id, l)| (*id, l.local_addr().expect("addr").to_string()))
        .collect();
    let filter = TransportFilter::new();
    let mut nodes = BTreeMap::new();
    for (id, listener) in listeners {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = ShardHostConfig {
            meta: meta.to_vec(),
            node_id: id,
            peers: peers.clone(),
            shards: vec![ShardSpec {
                id: SHARD,
                replicas: ids.to_vec(),
            }],
            replication_factor: ids.len(),
            heartbeat_ms: 50,
            election_timeout_min_ms: 200,
            election_timeout_max_ms: 400,
            snapshot_logs_since_last: 5000,
            max_in_snapshot_log_to_keep: 1000,
        };
        let host = ShardHost::start(config, dir.path(), filter.clone())
            .await
            .expect("shard host starts");
        let service = host.raft_service().into_server();
        let (stop_tx, stop_rx) = oneshot::channel();
        let server = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = stop_rx.await;
                    },
                )
                .await
                .expect("raft server");
        });
        nodes.insert(
            id,
            Node {
                host,
                stop: Some(stop_tx),
                server: Some(server),
                _dir: dir,
            },
        );
    }
    nodes
}

/// A leader among `among` that all of them agree on.
async fn leader(nodes: &BTreeMap<u64, Node>, among: &[u64]) -> u64 {
    wait_until("an agreed leader", WAIT, || async {
        let first = nodes[&among[0]].host.leader(SHARD)?;
        (among.contains(&first)
            && among
                .iter()
                .all(|id| nodes[id].host.leader(SHARD) == Some(first)))
        .then_some(first)
    })
    .await
}

fn create(slug: &str) -> ShardRequest {
    ShardRequest::CreateRepo {
        workspace: "w".into(),
        slug: slug.into(),
        is_private: true,
        description: String::new(),
        created_at: 1_700_000_000,
    }
}

fn repo_row(node: &Node, slug: &str) -> Option<RepoRecord> {
    node.host
        .state_view(SHARD)
        .expect("hosted shard")
        .get(&keys::repo("w", slug))
        .expect("read")
        .map(|v| serde_json::from_slice(&v).expect("record"))
}

/// Proposes through the leader among `among`, retrying only while the
/// leadership is still settling (NotLeader: nothing was appended).
async fn propose_via_leader(
    nodes: &BTreeMap<u64, Node>,
    among: &[u64],
    req: ShardRequest,
) -> (u64, ShardResponse) {
    let deadline = Instant::now() + WAIT;
    loop {
        let l = leader(nodes, among).await;
        match nodes[&l].host.propose(SHARD, req.clone()).await {
            Ok(resp) => return (l, resp),
            Err(ProposeError::NotLeader { .. }) if Instant::now() < deadline => {}
            Err(e) => panic!("proposal via {l} failed: {e}"),
        }
    }
}

/// A directory on five nodes keeps taking writes with two of them down.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_five_node_meta_group_survives_two_failures() {
    let all = [1, 2, 3, 4, 5];
    let mut nodes = start_cluster_with_meta(&all, &all).await;
    let meta_leader = |nodes: &BTreeMap<u64, Node>, among: &[u64]| {
        let first = nodes[&among[0]].host.leader(META_GROUP)?;
        (among.contains(&first)
            && among
                .iter()
                .all(|id| nodes[id].host.leader(META_GROUP) == Some(first)))
        .then_some(first)
    };
    let l = wait_until("an agreed meta leader", WAIT, || async {
        meta_leader(&nodes, &all)
    })
    .await;
    let (voters, _) = nodes[&l]
        .host
        .membership()
        .members(META_GROUP)
        .expect("meta members");
    assert_eq!(voters, all.to_vec());
    for id in all {
        // A follower may hear of the leader before it has the membership.
        wait_until("every node a meta voter", WAIT, || async {
            nodes[&id].host.serves_meta().then_some(())
        })
        .await;
        assert_eq!(nodes[&id].host.meta_nodes(), all.to_vec());
    }
    let bootstrap = MetaRequest::Bootstrap {
        nodes: Vec::new(),
        shards: vec![(0, all.to_vec()), (SHARD, all.to_vec())],
    };
    // Five voters on a loaded machine may elect again right after the
    // first election: follow the leader until the bootstrap is taken.
    let l = wait_until("the bootstrap taken", WAIT, || async {
        let l = meta_leader(&nodes, &all)?;
        match nodes[&l].host.propose_meta(bootstrap.clone()).await {
            Ok(_) => Some(l),
            Err(ProposeError::NotLeader { .. }) => None,
            Err(e) => panic!("bootstrap via {l}: {e}"),
        }
    })
    .await;

    // Two nodes down, the leader among them: three of five still decide.
    let down: Vec<u64> = std::iter::once(l)
        .chain(all.iter().copied().filter(|id| *id != l).take(1))
        .collect();
    for id in &down {
        nodes.get_mut(id).expect("node").stop().await;
    }
    let up: Vec<u64> = all
        .iter()
        .copied()
        .filter(|id| !down.contains(id))
        .collect();
    let deadline = Instant::now() + WAIT * 2;
    let record = loop {
        let l = wait_until("a new meta leader", WAIT * 2, || async {
            meta_leader(&nodes, &up)
        })
        .await;
        let create = MetaRequest::CreateWorkspace {
            name: "five".into(),
        };
        match nodes[&l].host.propose_meta(create).await {
            Ok(MetaResponse::Workspace(w)) => break w,
            Err(ProposeError::NotLeader { .. }) if Instant::now() < deadline => {}
            other => panic!("create workspace with {down:?} down: {other:?}"),
        }
    };
    // The meta group's own record never hosts a workspace.
    assert_eq!(record.shard, SHARD);
    for id in up {
        nodes.get_mut(&id).expect("node").stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shard_replicates_routes_reads_and_fails_over() {
    let started = Instant::now();
    let all = [1, 2, 3];
    let mut nodes = start_cluster(&all).await;

    let l = leader(&nodes, &all).await;
    let follower = *all.iter().find(|id| **id != l).expect("a follower");
    let err = nodes[&follower]
        .host
        .propose(SHARD, create("a"))
        .await
        .expect_err("a follower refuses proposals");
    match err {
        ProposeError::NotLeader {
            leader_hint: Some((hint, addr)),
        } => {
            assert_eq!(hint, l);
            assert!(!addr.is_empty());
        }
        other => panic!("expected NotLeader with a hint, got {other:?}"),
    }
    assert_eq!(
        nodes[&l].host.propose(99, create("a")).await,
        Err(ProposeError::UnknownShard(99))
    );

    let (l, resp) = propose_via_leader(&nodes, &all, create("a")).await;
    let ShardResponse::Repo(record) = resp else {
        panic!("expected Repo, got {resp:?}");
    };

    // The leader's read barrier covers the commit; followers serve the same
    // read once they have applied its index.
    let index = nodes[&l].host.read_index(SHARD).await.expect("read index");
    assert_eq!(repo_row(&nodes[&l], "a").as_ref(), Some(&record));
    for id in all {
        nodes[&id]
            .host
            .wait_applied(SHARD, index, WAIT)
            .await
            .expect("applied");
        assert_eq!(
            repo_row(&nodes[&id], "a").as_ref(),
            Some(&record),
            "node {id}"
        );
    }
    assert!(matches!(
        nodes[&follower].host.read_index(SHARD).await,
        Err(ProposeError::NotLeader { .. })
    ));

    nodes.get_mut(&l).expect("leader node").stop().await;
    let rest: Vec<u64> = all.iter().copied().filter(|id| *id != l).collect();
    let (new, resp) = propose_via_leader(&nodes, &rest, create("b")).await;
    assert_ne!(new, l);
    assert!(matches!(resp, ShardResponse::Repo(_)), "{resp:?}");
    let (_, dup) = propose_via_leader(&nodes, &rest, create("b")).await;
    assert_eq!(dup, ShardResponse::Refused(Refusal::RepoExists));
    let index = nodes[&new]
        .host
        .read_index(SHARD)
        .await
        .expect("read index");
    for id in &rest {
        nodes[id]
            .host
            .wait_applied(SHARD, index, WAIT)
            .await
            .expect("applied");
        assert!(repo_row(&nodes[id], "b").is_some(), "node {id}");
    }

    for node in nodes.values_mut() {
        node.stop().await;
    }
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn config_validation() {
    let peers: BTreeMap<u64, String> = (1..=3).map(|i| (i, format!("n{i}:7400"))).collect();
    let json = serde_json::json!({
        "node-id": 1,
        "peers": {"1": "n1:7400", "2": "n2:7400", "3": "n3:7400"},
        "shards": [{"id": 1, "replicas": [1, 2, 3]}],
    });
    let config: ShardHostConfig = serde_json::from_value(json).expect("parses with defaults");
    assert_eq!(config.peers, peers);
    assert_eq!(config.replication_factor, 3);
    config.validate().expect("valid");

    let with = |shards: Vec<ShardSpec>| ShardHostConfig {
        meta: Vec::new(),
        shards,
        ..config.clone()
    };
    let spec = |id, replicas: &[u64]| ShardSpec {
        id,
        replicas: replicas.to_vec(),
    };
    use cairn_storage_node::host::ShardConfigError as E;
    assert_eq!(
        with(vec![spec(0, &[1, 2, 3])]).validate(),
        Err(E::ReservedShard)
    );
    assert!(matches!(
        with(vec![spec(1, &[1, 2])]).validate(),
        Err(E::ReplicaCount { .. })
    ));
    assert!(matches!(
        with(vec![spec(1, &[1, 2, 2])]).validate(),
        Err(E::DuplicateReplica { .. })
    ));
    assert!(matches!(
        with(vec![spec(1, &[1, 2, 4])]).validate(),
        Err(E::UnknownReplica { .. })
    ));
    assert!(matches!(
        with(vec![spec(1, &[1, 2, 3]), spec(1, &[1, 2, 3])]).validate(),
        Err(E::DuplicateShard(1))
    ));
    let single = ShardHostConfig {
        meta: Vec::new(),
        replication_factor: 1,
        shards: vec![spec(5, &[2])],
        ..config.clone()
    };
    single.validate().expect("a test may run one replica");
    let bad_timeouts = ShardHostConfig {
        meta: Vec::new(),
        heartbeat_ms: 500,
        election_timeout_min_ms: 400,
        ..config.clone()
    };
    assert_eq!(bad_timeouts.validate(), Err(E::Timeouts));
    let stranger = ShardHostConfig {
        meta: Vec::new(),
        node_id: 9,
        ..config
    };
    assert_eq!(stranger.validate(), Err(E::SelfNotAPeer(9)));
}

/// Restarting the bootstrap replica on its data must not re-initialize the
/// group: `initialize` is refused as already done, and the state survives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_the_group_and_its_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = ShardHostConfig {
        meta: Vec::new(),
        node_id: 1,
        peers: BTreeMap::from([(1, "127.0.0.1:1".to_string())]),
        shards: vec![ShardSpec {
            id: SHARD,
            replicas: vec![1],
        }],
        replication_factor: 1,
        heartbeat_ms: 50,
        election_timeout_min_ms: 200,
        election_timeout_max_ms: 400,
        snapshot_logs_since_last: 5000,
        max_in_snapshot_log_to_keep: 1000,
    };
    for round in 0..2 {
        // In one process, openraft's tasks of the previous instance may drop
        // their database handle a moment after shutdown returns, holding
        // RocksDB's lock until then; a restarted process never sees that.
        let deadline = Instant::now() + WAIT;
        let host = loop {
            match ShardHost::start(config.clone(), dir.path(), TransportFilter::new()).await {
                Ok(host) => break host,
                Err(e)
                    if e.to_string().contains("cannot open raft database")
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("round {round}: starts, also on existing data: {e}"),
            }
        };
        let resp = loop {
            match host.propose(SHARD, create("r")).await {
                Ok(resp) => break resp,
                Err(ProposeError::NotLeader { .. }) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("round {round}: {e}"),
            }
        };
        let want = if round == 0 {
            matches!(resp, ShardResponse::Repo(_))
        } else {
            resp == ShardResponse::Refused(Refusal::RepoExists)
        };
        assert!(want, "round {round}: {resp:?}");
        host.shutdown().await;
    }
}

/// Without a `shards` section a node is a cluster of its own: one shard
/// and the directory, each a one-voter group it leads, and the `Raft`
/// service next to Git and Admin — the same code as a replicated node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_shards_config_is_a_cluster_of_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = cairn_storage_node::Config::new(dir.path().join("node"));
    config.grpc_addr = "127.0.0.1:0".parse().expect("addr");
    let node = cairn_storage_node::StorageNode::start(config)
        .await
        .expect("node");
    let host = node.shard_host.clone();
    wait_until("its one replica of each group leads", WAIT, || async {
        (host.leader(SHARD) == Some(1) && host.leader(META_GROUP) == Some(1)).then_some(())
    })
    .await;
    assert_eq!(host.groups(), vec![META_GROUP, SHARD]);
    let record = node
        .repos
        .create_repo("team", "app", true, "")
        .await
        .expect("create");
    assert_eq!(
        node.repos.require_repo("team", "app").await.expect("get"),
        record
    );
    // Served: an unknown group is NotFound rather than Unimplemented.
    let status = raft_probe(node.grpc_addr).await;
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    host.shutdown().await;
}

async fn raft_probe(addr: std::net::SocketAddr) -> tonic::Status {
    let mut client = cairn_proto::raft::raft_client::RaftClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    client
        .vote(cairn_proto::raft::GroupMessage {
            group: 42,
            payload: Default::default(),
        })
        .await
        .expect_err("group 42 is not hosted")
}
