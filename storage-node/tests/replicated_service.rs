//! A storage node started with `shards` serves git and admin traffic
//! through its shard replicas: the leader takes writes, and followers
//! refuse them with `FAILED_PRECONDITION` naming the leader before
//! streaming anything; reads are served linearizably by any replica.

mod common;
use common::{git, wait_until};

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command as Process, Stdio};
use std::time::Duration;

use cairn_proto::admin::admin_client::AdminClient;
use cairn_proto::admin::{CreateRepositoryRequest, ListRepositoriesRequest};
use cairn_proto::git::git_client::GitClient;
use cairn_proto::git::{AdvertiseRefsRequest, GitService, ReceivePackRequest, RepoPath};
use cairn_proto::routing::Refusal;
use cairn_storage_node::host::{ShardHostConfig, ShardSpec};
use cairn_storage_node::{Config, StorageNode};
use tonic::Code;

const SHARD: u64 = 1;
const WAIT: Duration = Duration::from_secs(10);

/// A one-commit repository and the pack `git push` would send for it.
fn commit_and_pack(dir: &Path) -> (String, Vec<u8>) {
    git(dir, &["init", "-q", "-b", "main"]);
    std::fs::write(dir.join("a.txt"), "one\n").expect("write");
    git(dir, &["add", "."]);
    git(dir, &["commit", "-q", "-m", "one"]);
    let tip = git(dir, &["rev-parse", "HEAD"]).trim().to_owned();
    let mut child = Process::new("git")
        .args(["pack-objects", "-q", "--revs", "--stdout"])
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn pack-objects");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{tip}\n").as_bytes())
        .expect("feed pack-objects");
    let out = child.wait_with_output().expect("pack-objects");
    assert!(out.status.success());
    (tip, out.stdout)
}

fn pkt(line: &str) -> Vec<u8> {
    let mut v = format!("{:04x}", line.len() + 4).into_bytes();
    v.extend_from_slice(line.as_bytes());
    v
}

fn repo() -> Option<RepoPath> {
    Some(RepoPath {
        workspace: "w".into(),
        slug: "r".into(),
    })
}

async fn collect(mut stream: tonic::Streaming<cairn_proto::git::Chunk>) -> String {
    let mut out = Vec::new();
    while let Some(chunk) = stream.message().await.expect("stream") {
        out.extend_from_slice(&chunk.data);
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_go_to_the_shard_leader_and_any_replica_reads() {
    let ids = [1u64, 2, 3];
    // Free ports for every node, known before any starts (peers need them).
    let mut peers = BTreeMap::new();
    for &id in &ids {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        peers.insert(id, l.local_addr().expect("addr").to_string());
    }
    let mut dirs = Vec::new();
    let mut nodes = BTreeMap::new();
    for &id in &ids {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::new(dir.path().to_owned());
        config.grpc_addr = peers[&id].parse().expect("addr");
        config.shards = Some(ShardHostConfig {
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
        });
        let node = StorageNode::start(config).await.expect("node starts");
        nodes.insert(id, node);
        dirs.push(dir);
    }
    let host = |id: u64| nodes[&id].shard_host.clone();
    let lead = wait_until("an agreed leader", WAIT, || async {
        let first = host(1).leader(SHARD)?;
        ids.iter()
            .all(|&id| host(id).leader(SHARD) == Some(first))
            .then_some(first)
    })
    .await;
    let follower = *ids.iter().find(|&&n| n != lead).expect("a follower");
    let leader_addr = peers[&lead].clone();
    let store = nodes[&lead].repos.clone();
    store
        .create_repo("w", "r", false, "")
        .await
        .expect("create");

    // A push through the leader's ReceivePack.
    let work = tempfile::tempdir().expect("tempdir");
    let (tip, pack) = commit_and_pack(work.path());
    let zero = "0".repeat(40);
    let mut body = pkt(&format!("{zero} {tip} refs/heads/main\0report-status\n"));
    body.extend_from_slice(b"0000");
    body.extend_from_slice(&pack);
    let mut git_leader = GitClient::connect(format!("http://{leader_addr}"))
        .await
        .expect("connect");
    let push = ReceivePackRequest {
        repo: repo(),
        git_protocol: String::new(),
        data: body.clone().into(),
    };
    let report = collect(
        git_leader
            .receive_pack(tokio_stream::iter(vec![push]))
            .await
            .expect("receive-pack")
            .into_inner(),
    )
    .await;
    assert!(report.contains("unpack ok"), "report: {report:?}");
    assert!(report.contains("ok refs/heads/main"), "report: {report:?}");

    // The leader advertises the pushed ref.
    let advertise = AdvertiseRefsRequest {
        repo: repo(),
        service: GitService::UploadPack as i32,
        git_protocol: String::new(),
    };
    let refs = collect(
        git_leader
            .advertise_refs(advertise.clone())
            .await
            .expect("advertise")
            .into_inner(),
    )
    .await;
    assert!(
        refs.contains(&format!("{tip} refs/heads/main")),
        "refs: {refs:?}"
    );

    // A follower serves reads, as of the leader's read index: the push
    // acknowledged above is visible there at once.
    let follower_url = format!("http://{}", peers[&follower]);
    let mut git_follower = GitClient::connect(follower_url.clone())
        .await
        .expect("connect");
    let refs = collect(
        git_follower
            .advertise_refs(advertise.clone())
            .await
            .expect("a follower advertises")
            .into_inner(),
    )
    .await;
    assert!(
        refs.contains(&format!("{tip} refs/heads/main")),
        "follower refs: {refs:?}"
    );
    let mut admin = AdminClient::connect(follower_url).await.expect("connect");
    let listed = admin
        .list_repositories(ListRepositoriesRequest {
            workspace: "w".into(),
        })
        .await
        .expect("a follower lists repositories")
        .into_inner()
        .repositories;
    assert_eq!(listed.len(), 1, "{listed:?}");

    // It refuses writes, naming the leader, before reading any pack data.
    let check = |status: tonic::Status| {
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert_eq!(
            Refusal::of(&status),
            Some(Refusal::NotLeader {
                hint: Some(leader_addr.clone())
            }),
            "{status:?}"
        );
    };
    let push = ReceivePackRequest {
        repo: repo(),
        git_protocol: String::new(),
        data: body.into(),
    };
    check(
        git_follower
            .receive_pack(tokio_stream::iter(vec![push]))
            .await
            .expect_err("a follower accepted a push"),
    );
    check(
        admin
            .create_repository(CreateRepositoryRequest {
                workspace: "w".into(),
                slug: "other".into(),
                ..Default::default()
            })
            .await
            .expect_err("a follower created a repository"),
    );
}
