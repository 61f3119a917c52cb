//! Replicated store: three in-process nodes serving `Raft` and
//! `PackTransfer`; pushes stage their pack on a quorum, commit through the
//! shard and land on every replica; reads are linearizable on any replica.

mod common;
use common::{git, wait_until, Node};

use std::collections::BTreeMap;
use std::io::{BufReader, Write};
use std::path::PathBuf;
use std::process::{Command as Process, Stdio};
use std::time::Duration;

use cairn_packfile::receive::{self, Command, Limits, PushRequest, ReceiveCaps, StagedPack};
use cairn_packfile::store::PackSet;
use cairn_packfile::ObjectId;
use cairn_raft::TransportFilter;
use cairn_storage_node::host::{ShardHostConfig, ShardSpec};
use cairn_storage_node::packs::transfer::StagingArea;
use cairn_storage_node::repo::RepoRecord;
use cairn_storage_node::repos::ReplicatedError;
use cairn_storage_node::shard::rows;
use cairn_storage_node::shard::state::keys;
use tokio::net::TcpListener;

const SHARD: u64 = 1;
const WAIT: Duration = Duration::from_secs(10);

/// Like `StorageNode::start` with shards, minus git/admin, plus a way to
/// stop: `Raft` and `PackTransfer` over one listener and one staging area.
async fn start_cluster(ids: &[u64]) -> BTreeMap<u64, Node> {
    start_cluster_with_peers(ids).await.0
}

/// [`start_cluster`], also returning every node's address.
async fn start_cluster_with_peers(ids: &[u64]) -> (BTreeMap<u64, Node>, BTreeMap<u64, String>) {
    start_cluster_filtered(ids, TransportFilter::new()).await
}

/// [`start_cluster_with_peers`] with every node consulting `filter`.
async fn start_cluster_filtered(
    ids: &[u64],
    filter: TransportFilter,
) -> (BTreeMap<u64, Node>, BTreeMap<u64, String>) {
    let mut listeners = BTreeMap::new();
    for &id in ids {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        listeners.insert(id, l);
    }
    let peers: BTreeMap<u64, String> = listeners
        .iter()
        .map(|(id, l)| (*id, l.local_addr().expect("addr").to_string()))
        .collect();
    let mut nodes = BTreeMap::new();
    for (id, listener) in listeners {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = shard_config(id, &peers, ids);
        nodes.insert(id, Node::start(config, listener, dir, filter.clone()).await);
    }
    (nodes, peers)
}

fn shard_config(id: u64, peers: &BTreeMap<u64, String>, ids: &[u64]) -> ShardHostConfig {
    ShardHostConfig {
        meta: Vec::new(),
        node_id: id,
        peers: peers.clone(),
        shards: vec![ShardSpec {
            id: SHARD,
            replicas: ids.to_vec(),
        }],
        replication_factor: ids.len(),
        // Loose enough that a loaded debug build does not see spurious
        // elections while several three-node clusters run in parallel.
        heartbeat_ms: 100,
        election_timeout_min_ms: 500,
        election_timeout_max_ms: 1000,
        snapshot_logs_since_last: 5000,
        max_in_snapshot_log_to_keep: 1000,
    }
}

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

/// A client-side repository to make commits and packs from.
struct Client {
    _dir: tempfile::TempDir,
    repo: PathBuf,
}

impl Client {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = dir.path().join("repo");
        std::fs::create_dir(&repo).expect("mkdir");
        git(&repo, &["init", "-q", "-b", "main"]);
        Client { _dir: dir, repo }
    }

    fn commit(&self, file: &str, content: &str) -> ObjectId {
        std::fs::write(self.repo.join(file), content).expect("write");
        git(&self.repo, &["add", "."]);
        git(&self.repo, &["commit", "-q", "-m", file]);
        let hex = git(&self.repo, &["rev-parse", "HEAD"]);
        ObjectId::from_hex(hex.trim().as_bytes()).expect("commit id")
    }

    /// What `git push` would send: objects of `revs` (e.g. `new ^old`).
    fn pack(&self, revs: &str) -> Vec<u8> {
        let mut child = Process::new("git")
            .args(["pack-objects", "-q", "--revs", "--stdout"])
            .current_dir(&self.repo)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn pack-objects");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(format!("{revs}\n").as_bytes())
            .expect("feed pack-objects");
        let out = child.wait_with_output().expect("pack-objects");
        assert!(out.status.success());
        out.stdout
    }
}

fn update(name: &str, old: Option<ObjectId>, new: ObjectId) -> Command {
    Command {
        old: old.unwrap_or_else(|| ObjectId::null(gix_hash::Kind::Sha1)),
        new,
        name: name.to_owned(),
    }
}

/// Validates `pack` against the repository's current packs, like
/// receive-pack does, into a staging dir under the node's data dir.
fn ingest(node: &Node, commands: &[Command], packs: &PackSet, pack: &[u8]) -> StagedPack {
    let request = PushRequest {
        commands: commands.to_vec(),
        caps: ReceiveCaps::default(),
        push_options: Vec::new(),
    };
    let staging = node.dir.path().join("ingest");
    std::fs::create_dir_all(&staging).expect("mkdir");
    let ingested = receive::ingest(
        &request,
        &mut BufReader::new(pack),
        packs,
        &staging,
        &Limits::default(),
    )
    .expect("ingest");
    assert!(ingested.command_errors.iter().all(Option::is_none));
    ingested.pack.expect("a pack")
}

/// After the leader's latest commit is applied on `node`: the ref and the
/// pack files are there.
async fn assert_replicated(
    node: &Node,
    index: u64,
    record: &RepoRecord,
    tip: ObjectId,
    pack: &str,
) {
    node.host
        .wait_applied(SHARD, index, WAIT)
        .await
        .expect("applied");
    let view = node.host.state_view(SHARD).expect("view");
    let row = view
        .get(&keys::ref_(record.id, "refs/heads/main"))
        .expect("read")
        .expect("ref row");
    let key = keys::ref_(record.id, "refs/heads/main");
    assert_eq!(rows::read_oid(&key, &row).expect("an id row"), tip);
    let dir = node.dir.path().join("packs").join(record.id.to_string());
    for ext in ["pack", "idx"] {
        let path = dir.join(format!("pack-{pack}.{ext}"));
        assert!(path.is_file(), "{} missing", path.display());
    }
    let (staged, _) = node.area.staged_paths(
        SHARD,
        record.id,
        &ObjectId::from_hex(pack.as_bytes()).expect("id"),
    );
    assert!(!staged.exists(), "staged copy left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_replicate_to_a_quorum_and_every_replica_reads_them() {
    let ids = [1, 2, 3];
    let mut nodes = start_cluster(&ids).await;
    let lead = leader(&nodes, &ids).await;
    let followers: Vec<u64> = ids.iter().copied().filter(|&n| n != lead).collect();
    let store = &nodes[&lead].store;
    assert!(matches!(
        store.shard_of("w").await,
        Err(ReplicatedError::WorkspaceNotFound(_))
    ));

    let record = store
        .create_repo("w", "r", true, "demo")
        .await
        .expect("create");
    // The directory placed the new workspace on the only shard.
    assert_eq!(store.shard_of("w").await.expect("placed"), SHARD);
    assert!(matches!(
        store.create_repo("w", "r", true, "").await,
        Err(ReplicatedError::Store(
            cairn_storage_node::repo::StoreError::RepoExists { .. }
        ))
    ));
    assert_eq!(
        store.list_repos("w").await.expect("list"),
        vec![record.clone()]
    );

    // First push: a new branch with a whole pack.
    let client = Client::new();
    let c1 = client.commit("a.txt", "one\n");
    let snap = store.snapshot("w", "r").await.expect("snapshot");
    let cmds = [update("refs/heads/main", None, c1)];
    let staged = ingest(
        &nodes[&lead],
        &cmds,
        &snap.packs,
        &client.pack(&c1.to_string()),
    );
    let pack1 = staged.id.to_string();
    let results = store
        .push(
            &snap.record,
            &cmds,
            false,
            &[None],
            Some(staged),
            Default::default(),
        )
        .await
        .expect("push");
    assert_eq!(results, vec![Ok(())]);
    let index = nodes[&lead]
        .host
        .read_index(SHARD)
        .await
        .expect("read index");
    for node in nodes.values() {
        assert_replicated(node, index, &record, c1, &pack1).await;
    }
    let snap = store.snapshot("w", "r").await.expect("snapshot");
    assert_eq!(snap.refs.get("refs/heads/main"), Some(c1));
    assert_eq!(snap.packs.bundles().len(), 1);

    // A stale compare-and-swap is refused and moves nothing.
    let stale = [update("refs/heads/main", None, c1)];
    let results = store
        .push(
            &snap.record,
            &stale,
            false,
            &[None],
            None,
            Default::default(),
        )
        .await
        .expect("push");
    assert!(results[0].is_err(), "stale push accepted: {results:?}");

    // A follower serves the same state: it waits for the leader's read
    // index, so the acknowledged push is there.
    let snap_f = nodes[&followers[0]]
        .store
        .snapshot("w", "r")
        .await
        .expect("follower snapshot");
    assert_eq!(snap_f.refs.get("refs/heads/main"), Some(c1));
    assert_eq!(snap_f.packs.bundles().len(), 1);

    // One follower down: the pack reaches the leader and the other
    // follower, which is a quorum.
    let down = followers[1];
    nodes.get_mut(&down).expect("node").stop().await;
    let store = &nodes[&lead].store;
    let c2 = client.commit("b.txt", "two\n");
    let cmds = [update("refs/heads/main", Some(c1), c2)];
    let staged = ingest(
        &nodes[&lead],
        &cmds,
        &snap.packs,
        &client.pack(&format!("{c2}\n^{c1}")),
    );
    let pack2 = staged.id.to_string();
    let results = store
        .push(
            &snap.record,
            &cmds,
            false,
            &[None],
            Some(staged),
            Default::default(),
        )
        .await
        .expect("push with one follower down");
    assert_eq!(results, vec![Ok(())]);
    let index = nodes[&lead]
        .host
        .read_index(SHARD)
        .await
        .expect("read index");
    for id in [lead, followers[0]] {
        assert_replicated(&nodes[&id], index, &record, c2, &pack2).await;
    }
    let snap = store.snapshot("w", "r").await.expect("snapshot");
    assert_eq!(snap.refs.get("refs/heads/main"), Some(c2));
    assert_eq!(snap.packs.bundles().len(), 2);

    store.delete_repo("w", "r").await.expect("delete");
    assert!(store.list_repos("w").await.expect("list").is_empty());

    // Both followers down: no quorum holds the pack, nothing is proposed.
    nodes.get_mut(&followers[0]).expect("node").stop().await;
    let store = &nodes[&lead].store;
    let c3 = client.commit("c.txt", "three\n");
    let cmds = [update("refs/heads/main", Some(c2), c3)];
    let staged = ingest(
        &nodes[&lead],
        &cmds,
        &snap.packs,
        &client.pack(&format!("{c3}\n^{c2}")),
    );
    match store
        .push(
            &snap.record,
            &cmds,
            false,
            &[None],
            Some(staged),
            Default::default(),
        )
        .await
    {
        Err(ReplicatedError::Transfer { acked, needed, .. }) => {
            assert_eq!((acked, needed), (1, 2))
        }
        other => panic!("push without a quorum: {other:?}"),
    }

    for node in nodes.values_mut() {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_follower_fetches_the_pack_it_missed() {
    let ids = [1, 2, 3];
    let (mut nodes, peers) = start_cluster_with_peers(&ids).await;
    let lead = leader(&nodes, &ids).await;
    let down = *ids.iter().find(|&&n| n != lead).expect("a follower");
    let record = nodes[&lead]
        .store
        .create_repo("w", "r", true, "")
        .await
        .expect("create");

    // The follower misses the staging of the pack and the commit.
    nodes.get_mut(&down).expect("node").stop().await;
    let store = &nodes[&lead].store;
    let client = Client::new();
    let c1 = client.commit("a.txt", "one\n");
    let snap = store.snapshot("w", "r").await.expect("snapshot");
    let cmds = [update("refs/heads/main", None, c1)];
    let staged = ingest(
        &nodes[&lead],
        &cmds,
        &snap.packs,
        &client.pack(&c1.to_string()),
    );
    let pack = staged.id.to_string();
    let results = store
        .push(
            &snap.record,
            &cmds,
            false,
            &[None],
            Some(staged),
            Default::default(),
        )
        .await
        .expect("push with one follower down");
    assert_eq!(results, vec![Ok(())]);

    // Same data dir, same address: it catches up on the log and, applying
    // the push, fetches the pack from a peer.
    let dir = nodes.remove(&down).expect("node").into_dir().await;
    let pack_id = ObjectId::from_hex(pack.as_bytes()).expect("id");
    let (staged_path, _) =
        StagingArea::at(dir.path()).staged_paths(SHARD, snap.record.id, &pack_id);
    assert!(!staged_path.exists(), "the stopped follower got the pack");
    let listener = TcpListener::bind(peers[&down].as_str())
        .await
        .expect("rebind the follower's address");
    let restarted = Node::start(
        shard_config(down, &peers, &ids),
        listener,
        dir,
        TransportFilter::new(),
    )
    .await;
    nodes.insert(down, restarted);
    let index = nodes[&lead]
        .host
        .read_index(SHARD)
        .await
        .expect("read index");
    assert_replicated(&nodes[&down], index, &record, c1, &pack).await;
    let leader_view = nodes[&lead].host.state_view(SHARD).expect("view");
    let follower_view = nodes[&down].host.state_view(SHARD).expect("view");
    let prefix = keys::refs_of(record.id);
    assert_eq!(
        leader_view.scan_prefix(&prefix).expect("scan"),
        follower_view.scan_prefix(&prefix).expect("scan"),
    );

    for node in nodes.values_mut() {
        node.stop().await;
    }
}

/// One commit pushed to `w/r` through the leader's store.
async fn push_commit(node: &Node, client: &Client, file: &str) -> ObjectId {
    let store = &node.store;
    let snap = store.snapshot("w", "r").await.expect("snapshot");
    let old = snap.refs.get("refs/heads/main");
    let tip = client.commit(file, "content\n");
    let cmds = [update("refs/heads/main", old, tip)];
    let staged = ingest(node, &cmds, &snap.packs, &client.pack(&tip.to_string()));
    let results = store
        .push(
            &snap.record,
            &cmds,
            false,
            &[None],
            Some(staged),
            Default::default(),
        )
        .await
        .expect("push");
    assert_eq!(results, vec![Ok(())]);
    tip
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_cut_off_from_the_leader_never_serves_a_stale_read() {
    let ids = [1, 2, 3];
    let filter = TransportFilter::new();
    let (mut nodes, _) = start_cluster_filtered(&ids, filter.clone()).await;
    let lead = leader(&nodes, &ids).await;
    let cut = *ids.iter().find(|&&n| n != lead).expect("a follower");
    nodes[&lead]
        .store
        .create_repo("w", "r", true, "")
        .await
        .expect("create");
    let client = Client::new();
    let c1 = push_commit(&nodes[&lead], &client, "a.txt").await;
    let seen = nodes[&cut].store.snapshot("w", "r").await.expect("read");
    assert_eq!(seen.refs.get("refs/heads/main"), Some(c1));

    // Cut off, the follower still holds c1 as main; the leader and the
    // other follower (a quorum) move main on.
    filter.isolate(cut);
    let c2 = push_commit(&nodes[&lead], &client, "b.txt").await;
    match nodes[&cut].store.snapshot("w", "r").await {
        Err(_) => {}
        Ok(snap) => panic!(
            "a cut-off follower served main = {:?} after {c2} was acknowledged",
            snap.refs.get("refs/heads/main")
        ),
    }

    // Healed, it catches up and serves the new state.
    filter.heal();
    wait_until("the healed follower to serve c2", WAIT, || async {
        match nodes[&cut].store.snapshot("w", "r").await {
            Ok(s) if s.refs.get("refs/heads/main") == Some(c2) => Some(()),
            _ => None,
        }
    })
    .await;
    for node in nodes.values_mut() {
        node.stop().await;
    }
}
