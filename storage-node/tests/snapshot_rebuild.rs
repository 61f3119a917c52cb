//! Catch-up through snapshots: a replica that installs a shard snapshot (a
//! wiped node, or a follower behind the leader's purged log) ends up with
//! the rows and every pack they name, fetching only the packs it lacks; a
//! replica that lost pack files while its rows survived fetches them when
//! it starts, without waiting for its peers to start.

mod common;
use common::{git, wait_until, Node};

use std::collections::BTreeMap;
use std::io::{BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};

use cairn_packfile::receive::{self, Command, Limits, PushRequest, ReceiveCaps, StagedPack};
use cairn_packfile::store::PackSet;
use cairn_packfile::ObjectId;
use cairn_raft::{StateView, TransportFilter};
use cairn_storage_node::host::{ShardHostConfig, ShardSpec};
use cairn_storage_node::packs::transfer::StagingArea;
use cairn_storage_node::shard::rows;
use cairn_storage_node::shard::state::{keys, PackRef};
use tokio::net::TcpListener;

const SHARD: u64 = 1;
const IDS: [u64; 3] = [1, 2, 3];
const WAIT: Duration = Duration::from_secs(30);

/// How the leader compacts its log in a test.
#[derive(Clone, Copy)]
enum Compaction {
    /// Snapshots only when asked, then purges everything they cover.
    OnDemand,
    /// Snapshots every few entries by policy and purges what they cover.
    EveryFewEntries,
}

struct Cluster {
    nodes: BTreeMap<u64, Node>,
    peers: BTreeMap<u64, String>,
    compaction: Compaction,
}

fn shard_config(id: u64, peers: &BTreeMap<u64, String>, compaction: Compaction) -> ShardHostConfig {
    let snapshot_logs_since_last = match compaction {
        // Far beyond what a test writes: only explicit snapshots.
        Compaction::OnDemand => 5000,
        Compaction::EveryFewEntries => 3,
    };
    ShardHostConfig {
        meta: Vec::new(),
        node_id: id,
        peers: peers.clone(),
        shards: vec![ShardSpec {
            id: SHARD,
            replicas: IDS.to_vec(),
        }],
        replication_factor: IDS.len(),
        // Loose enough that a loaded debug build does not see spurious
        // elections while several three-node clusters run in parallel.
        heartbeat_ms: 100,
        election_timeout_min_ms: 500,
        election_timeout_max_ms: 1000,
        snapshot_logs_since_last,
        max_in_snapshot_log_to_keep: 0,
    }
}

impl Cluster {
    async fn start(compaction: Compaction) -> Cluster {
        let mut listeners = BTreeMap::new();
        for id in IDS {
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            listeners.insert(id, l);
        }
        let peers: BTreeMap<u64, String> = listeners
            .iter()
            .map(|(id, l)| (*id, l.local_addr().expect("addr").to_string()))
            .collect();
        let mut cluster = Cluster {
            nodes: BTreeMap::new(),
            peers,
            compaction,
        };
        for (id, listener) in listeners {
            let dir = tempfile::tempdir().expect("tempdir");
            let node = cluster.start_node(id, listener, dir).await;
            cluster.nodes.insert(id, node);
        }
        cluster
    }

    /// `Raft` and `PackTransfer` of node `id` on `listener`, data in `dir`.
    async fn start_node(&self, id: u64, listener: TcpListener, dir: tempfile::TempDir) -> Node {
        let config = shard_config(id, &self.peers, self.compaction);
        Node::start(config, listener, dir, TransportFilter::new()).await
    }

    /// Stops node `id` and hands back its data dir once released.
    async fn stop(&mut self, id: u64) -> tempfile::TempDir {
        self.nodes.remove(&id).expect("node").into_dir().await
    }

    /// Starts node `id` again at its address, with data in `dir`.
    async fn restart(&mut self, id: u64, dir: tempfile::TempDir) {
        let listener = TcpListener::bind(self.peers[&id].as_str())
            .await
            .expect("rebind the node's address");
        let node = self.start_node(id, listener, dir).await;
        self.nodes.insert(id, node);
    }

    fn node(&self, id: u64) -> &Node {
        &self.nodes[&id]
    }

    async fn leader(&self) -> u64 {
        let among: Vec<u64> = self.nodes.keys().copied().collect();
        wait_until("an agreed leader", WAIT, || async {
            let first = self.nodes[&among[0]].host.leader(SHARD)?;
            (among.contains(&first)
                && among
                    .iter()
                    .all(|id| self.nodes[id].host.leader(SHARD) == Some(first)))
            .then_some(first)
        })
        .await
    }

    /// Builds a snapshot on the leader and waits until its log holds
    /// nothing the snapshot covers: a replica behind it can only catch up
    /// by installing the snapshot.
    async fn compact_leader_log(&self, lead: u64) -> u64 {
        let host = &self.node(lead).host;
        let index = host
            .catchup()
            .build_snapshot(SHARD, WAIT)
            .await
            .expect("snapshot built");
        wait_until("the leader purged its log", WAIT, || async {
            (host.catchup().purged_index(SHARD) >= Some(index)).then_some(())
        })
        .await;
        index
    }

    async fn shutdown(mut self) {
        for node in self.nodes.values_mut() {
            node.stop().await;
        }
    }
}

/// A client-side repository pushed to one server repository.
struct Repo {
    slug: String,
    _dir: tempfile::TempDir,
    path: PathBuf,
    tip: Option<ObjectId>,
    commits: usize,
}

impl Repo {
    fn new(slug: &str) -> Repo {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("repo");
        std::fs::create_dir(&path).expect("mkdir");
        git(&path, &["init", "-q", "-b", "main"]);
        Repo {
            slug: slug.to_owned(),
            _dir: dir,
            path,
            tip: None,
            commits: 0,
        }
    }

    fn commit(&mut self) -> ObjectId {
        self.commits += 1;
        let file = format!("f{}.txt", self.commits);
        let content = format!("{} commit {}\n", self.slug, self.commits);
        std::fs::write(self.path.join(&file), content).expect("write");
        git(&self.path, &["add", "."]);
        git(&self.path, &["commit", "-q", "-m", &file]);
        let hex = git(&self.path, &["rev-parse", "HEAD"]);
        ObjectId::from_hex(hex.trim().as_bytes()).expect("commit id")
    }

    /// What `git push` would send for `tip` on top of the last pushed tip.
    fn pack(&self, tip: ObjectId) -> Vec<u8> {
        let revs = match self.tip {
            Some(old) => format!("{tip}\n^{old}\n"),
            None => format!("{tip}\n"),
        };
        let mut child = Process::new("git")
            .args(["pack-objects", "-q", "--revs", "--stdout"])
            .current_dir(&self.path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn pack-objects");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(revs.as_bytes())
            .expect("feed pack-objects");
        let out = child.wait_with_output().expect("pack-objects");
        assert!(out.status.success());
        out.stdout
    }
}

/// Validates `pack` like receive-pack does, into a staging dir of `node`.
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

/// One new commit on `main` of `repo`, pushed through the leader with a
/// pack of its own; returns the pack id.
async fn push(leader: &Node, repo: &mut Repo) -> String {
    let tip = repo.commit();
    let snap = leader
        .store
        .snapshot("w", &repo.slug)
        .await
        .expect("snapshot");
    let cmds = [Command {
        old: repo
            .tip
            .unwrap_or_else(|| ObjectId::null(gix_hash::Kind::Sha1)),
        new: tip,
        name: "refs/heads/main".to_owned(),
    }];
    let staged = ingest(leader, &cmds, &snap.packs, &repo.pack(tip));
    let pack = staged.id.to_string();
    let results = leader
        .store
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
    repo.tip = Some(tip);
    pack
}

/// Every `(repo id, pack)` the rows of `view` name.
fn referenced_packs(view: &StateView) -> Vec<(u64, PackRef)> {
    view.scan_prefix(keys::PACKS)
        .expect("scan")
        .into_iter()
        .map(|(key, value)| {
            let (repo, _) = keys::parse_pack(&key).expect("pack key");
            (repo, rows::read_json(&key, &value).expect("pack row"))
        })
        .collect()
}

fn pack_files(dir: &Path, repo: u64, pack: &str) -> [PathBuf; 2] {
    let base = dir.join("packs").join(repo.to_string());
    ["pack", "idx"].map(|ext| base.join(format!("pack-{pack}.{ext}")))
}

/// `follower` holds exactly the leader's rows, and every pack they name,
/// byte for byte; returns the number of packs.
async fn assert_rebuilt(cluster: &Cluster, lead: u64, follower: u64) -> usize {
    let index = cluster
        .node(lead)
        .host
        .read_index(SHARD)
        .await
        .expect("read index");
    let node = cluster.node(follower);
    node.host
        .wait_applied(SHARD, index, WAIT)
        .await
        .expect("the follower applies up to the leader's read index");
    let leader_view = cluster.node(lead).host.state_view(SHARD).expect("view");
    let follower_view = node.host.state_view(SHARD).expect("view");
    let rows = leader_view.scan_prefix(b"").expect("scan");
    assert!(!rows.is_empty());
    assert_eq!(rows, follower_view.scan_prefix(b"").expect("scan"));
    let packs = referenced_packs(&follower_view);
    for (repo, pack) in &packs {
        let theirs = pack_files(cluster.node(lead).dir.path(), *repo, &pack.id);
        let ours = pack_files(node.dir.path(), *repo, &pack.id);
        for (theirs, ours) in theirs.iter().zip(&ours) {
            let want = std::fs::read(theirs).expect("the leader's copy");
            let got = std::fs::read(ours)
                .unwrap_or_else(|e| panic!("{} on the rebuilt node: {e}", ours.display()));
            assert!(want == got, "{} differs from the leader's", ours.display());
        }
    }
    packs.len()
}

/// The follower to take down: never the lowest id, which bootstraps the
/// group when it starts with an empty log.
fn pick_follower(lead: u64) -> u64 {
    IDS.iter()
        .copied()
        .filter(|&id| id != lead)
        .max()
        .expect("a follower")
}

async fn create_repos(leader: &Node, slugs: &[&str]) -> Vec<Repo> {
    let mut repos = Vec::new();
    for slug in slugs {
        leader
            .store
            .create_repo("w", slug, true, "")
            .await
            .expect("create");
        repos.push(Repo::new(slug));
    }
    repos
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wiped_replica_installs_a_snapshot_and_fetches_every_pack() {
    let mut cluster = Cluster::start(Compaction::OnDemand).await;
    let lead = cluster.leader().await;
    let down = pick_follower(lead);
    let mut repos = create_repos(cluster.node(lead), &["one", "two"]).await;
    let mut pushed = Vec::new();
    for round in 0..3 {
        for repo in &mut repos {
            if round == 2 && repo.slug == "two" {
                continue;
            }
            pushed.push(push(cluster.node(lead), repo).await);
        }
    }
    assert_eq!(pushed.len(), 5);

    // Everything the node had is gone: rows, log and packs. The leader is
    // told first, as an operator would.
    drop(cluster.stop(down).await);
    cluster
        .node(lead)
        .host
        .membership()
        .allow_rejoin_after_wipe(SHARD, down)
        .await
        .expect("allow the wiped replica back");
    let snapshot = cluster.compact_leader_log(lead).await;
    cluster
        .restart(down, tempfile::tempdir().expect("tempdir"))
        .await;

    let packs = assert_rebuilt(&cluster, lead, down).await;
    assert_eq!(packs, pushed.len());
    let node = cluster.node(down);
    assert!(
        node.host.catchup().purged_index(SHARD) >= Some(snapshot),
        "caught up through the snapshot, not the log"
    );
    assert_eq!(node.host.catchup().packs_fetched(), pushed.len() as u64);
    let staging = StagingArea::at(node.dir.path())
        .root()
        .join(SHARD.to_string());
    assert_eq!(walk(&staging), Vec::<PathBuf>::new(), "left in staging");

    // The rebuilt replica takes part in later pushes as usual.
    push(cluster.node(lead), &mut repos[1]).await;
    let packs = assert_rebuilt(&cluster, lead, down).await;
    assert_eq!(packs, pushed.len() + 1);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_that_kept_its_packs_fetches_only_the_ones_it_missed() {
    let mut cluster = Cluster::start(Compaction::OnDemand).await;
    let lead = cluster.leader().await;
    let down = pick_follower(lead);
    let mut repos = create_repos(cluster.node(lead), &["one", "two"]).await;
    for repo in &mut repos {
        push(cluster.node(lead), repo).await;
    }
    push(cluster.node(lead), &mut repos[0]).await;
    assert_eq!(assert_rebuilt(&cluster, lead, down).await, 3);

    // Down for the last K pushes, and then its raft database is lost; the
    // pack files it had survive.
    let dir = cluster.stop(down).await;
    let kept: Vec<(PathBuf, u64)> = walk(&dir.path().join("packs"))
        .into_iter()
        .map(|path| {
            let inode = std::fs::metadata(&path).expect("stat").ino();
            (path, inode)
        })
        .collect();
    assert_eq!(kept.len(), 6, "three packs with their indexes");
    const K: u64 = 2;
    for repo in repos.iter_mut().take(K as usize) {
        push(cluster.node(lead), repo).await;
    }
    cluster.compact_leader_log(lead).await;
    cluster
        .node(lead)
        .host
        .membership()
        .allow_rejoin_after_wipe(SHARD, down)
        .await
        .expect("allow the wiped replica back");
    std::fs::remove_dir_all(dir.path().join("raft")).expect("lose the raft database");
    cluster.restart(down, dir).await;

    assert_eq!(assert_rebuilt(&cluster, lead, down).await, 5);
    let node = cluster.node(down);
    assert_eq!(
        node.host.catchup().packs_fetched(),
        K,
        "only the missing packs travel"
    );
    for (path, inode) in kept {
        let now = std::fs::metadata(&path)
            .expect("kept pack still there")
            .ino();
        assert_eq!(now, inode, "{} was replaced", path.display());
    }
    cluster.shutdown().await;
}

/// The snapshot knobs alone make the leader compact: a follower away for a
/// few pushes finds the entries it missed purged and catches up through a
/// snapshot, fetching just the packs of those pushes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_behind_the_purged_log_catches_up_by_snapshot() {
    let mut cluster = Cluster::start(Compaction::EveryFewEntries).await;
    let lead = cluster.leader().await;
    let down = pick_follower(lead);
    let mut repos = create_repos(cluster.node(lead), &["one"]).await;
    push(cluster.node(lead), &mut repos[0]).await;
    assert_eq!(assert_rebuilt(&cluster, lead, down).await, 1);
    let applied_before = cluster
        .node(down)
        .host
        .state_view(SHARD)
        .expect("view")
        .applied()
        .expect("applied")
        .expect("something applied")
        .index;

    let dir = cluster.stop(down).await;
    const K: u64 = 4;
    for _ in 0..K {
        push(cluster.node(lead), &mut repos[0]).await;
    }
    let host = &cluster.node(lead).host;
    wait_until("the policy purged the missed entries", WAIT, || async {
        (host.catchup().purged_index(SHARD) > Some(applied_before)).then_some(())
    })
    .await;
    cluster.restart(down, dir).await;

    assert_eq!(assert_rebuilt(&cluster, lead, down).await, 1 + K as usize);
    let node = cluster.node(down);
    assert_eq!(node.host.catchup().packs_fetched(), K);
    assert!(
        node.host.catchup().purged_index(SHARD) > Some(applied_before),
        "caught up through a snapshot, not the log"
    );
    cluster.shutdown().await;
}

/// Rows survived, pack files did not: the replica fetches them when it
/// starts. Its peers are down at that moment; starting does not wait for
/// them, the packs arrive once they are back, and entries apply after.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_that_lost_its_pack_files_fetches_them_at_start() {
    let mut cluster = Cluster::start(Compaction::OnDemand).await;
    let lead = cluster.leader().await;
    let down = pick_follower(lead);
    let mut repos = create_repos(cluster.node(lead), &["one", "two"]).await;
    for repo in &mut repos {
        push(cluster.node(lead), repo).await;
    }
    push(cluster.node(lead), &mut repos[1]).await;
    assert_eq!(assert_rebuilt(&cluster, lead, down).await, 3);

    let mut dirs = BTreeMap::new();
    for id in IDS {
        dirs.insert(id, cluster.stop(id).await);
    }
    let lost = dirs[&down].path().join("packs");
    std::fs::remove_dir_all(&lost).expect("lose the pack files");

    let started = Instant::now();
    cluster
        .restart(down, dirs.remove(&down).expect("dir"))
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "start waited for unreachable peers"
    );
    let host = &cluster.node(down).host;
    let applied = host
        .state_view(SHARD)
        .expect("view")
        .applied()
        .expect("applied")
        .expect("rows survived")
        .index;
    // The rows are there, the packs are not: reads wait, and give up.
    let short = Duration::from_millis(500);
    assert!(host.wait_state_complete(SHARD, short).await.is_err());
    assert!(host.wait_applied(SHARD, applied, short).await.is_err());
    assert_eq!(host.catchup().packs_fetched(), 0);

    for (id, dir) in dirs {
        cluster.restart(id, dir).await;
    }
    let node = cluster.node(down);
    wait_until("the lost packs are fetched", WAIT, || async {
        (node.host.catchup().packs_fetched() == 3).then_some(())
    })
    .await;
    node.host
        .wait_applied(SHARD, applied, WAIT)
        .await
        .expect("reads go ahead once the packs are back");
    let lead = cluster.leader().await;
    push(cluster.node(lead), &mut repos[0]).await;
    // Either way round, the two copies of every pack must match.
    let packs = if lead == down {
        assert_rebuilt(&cluster, down, pick_follower(down)).await
    } else {
        assert_rebuilt(&cluster, lead, down).await
    };
    assert_eq!(packs, 4);
    cluster.shutdown().await;
}

#[test]
fn snapshot_knobs_default_to_openraft_behaviour() {
    let json = serde_json::json!({
        "node-id": 1,
        "peers": {"1": "n1:7400"},
        "snapshot-logs-since-last": 10,
    });
    let config: ShardHostConfig = serde_json::from_value(json).expect("parses");
    assert_eq!(config.snapshot_logs_since_last, 10);
    assert_eq!(config.max_in_snapshot_log_to_keep, 1000);
    let json = serde_json::json!({"node-id": 1, "peers": {"1": "n1:7400"}});
    let config: ShardHostConfig = serde_json::from_value(json).expect("parses");
    assert_eq!(config.snapshot_logs_since_last, 5000);
}

/// Every file under `dir`, sorted.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                todo.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}
