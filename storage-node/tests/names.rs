//! Names compared without case: a node started on state written before the
//! rule (workspaces and repositories keyed by names of any case) moves the
//! lone legacy names to their canonical key and keeps the clashing ones
//! reachable by their exact names, refusing new names of that form, until
//! all but one are deleted. Nothing is merged or lost.

mod common;
use common::{wait_until, wait_until_db_released, Node};

use std::collections::BTreeMap;
use std::time::Duration;

use cairn_raft::TransportFilter;
use cairn_storage_node::host::{ShardHost, ShardHostConfig, ShardSpec, META_GROUP};
use cairn_storage_node::meta::state::{self as meta_state, MetaRequest, MetaResponse};
use cairn_storage_node::repo::StoreError;
use cairn_storage_node::repos::ReplicatedError;
use cairn_storage_node::shard::state::{self as shard_state, keys, ShardRequest, ShardResponse};
use tokio::net::TcpListener;

const SHARD: u64 = 1;
const WAIT: Duration = Duration::from_secs(20);

fn config(peers: &BTreeMap<u64, String>) -> ShardHostConfig {
    ShardHostConfig {
        meta: vec![1],
        node_id: 1,
        peers: peers.clone(),
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
    }
}

async fn leads_both(host: &ShardHost) {
    wait_until("leadership of both groups", WAIT, || async {
        (host.leader(SHARD) == Some(1) && host.leader(META_GROUP) == Some(1)).then_some(())
    })
    .await;
}

async fn meta(host: &ShardHost, req: MetaRequest) -> MetaResponse {
    host.propose_meta(req).await.expect("meta proposal")
}

async fn shard(host: &ShardHost, req: ShardRequest) -> ShardResponse {
    host.propose(SHARD, req).await.expect("shard proposal")
}

fn create(workspace: &str, slug: &str) -> ShardRequest {
    ShardRequest::CreateRepo {
        workspace: workspace.into(),
        slug: slug.into(),
        is_private: true,
        description: String::new(),
        created_at: 0,
    }
}

/// Writes what an earlier release could write: names of any case, side by
/// side. Its entries are the same ones logged then.
async fn write_legacy_state(dir: &tempfile::TempDir, listener: TcpListener) -> TcpListener {
    let addr = listener.local_addr().expect("addr");
    let peers = BTreeMap::from([(1, addr.to_string())]);
    let host = ShardHost::start(config(&peers), dir.path(), TransportFilter::new())
        .await
        .expect("shard host starts");
    leads_both(&host).await;
    // Bootstrap the directory as the node's own store would.
    meta(
        &host,
        MetaRequest::Bootstrap {
            nodes: vec![meta_state::NodeRecord {
                id: 1,
                addr: addr.to_string(),
                state: meta_state::NodeState::Active,
            }],
            shards: vec![(0, vec![1]), (SHARD, vec![1])],
        },
    )
    .await;
    for ws in ["Solo", "Sec", "sec"] {
        let r = meta(&host, MetaRequest::CreateWorkspace { name: ws.into() }).await;
        assert!(matches!(r, MetaResponse::Workspace(_)), "{r:?}");
    }
    for (ws, slug) in [
        ("Solo", "Repo"),
        ("Sec", "App"),
        ("sec", "app"),
        ("sec", "Case1"),
        ("sec", "CASE1"),
        ("sec", "plain"),
    ] {
        let r = shard(&host, create(ws, slug)).await;
        assert!(matches!(r, ShardResponse::Repo(_)), "{ws}/{slug}: {r:?}");
    }
    host.shutdown().await;
    drop(host);
    wait_until_db_released(dir.path()).await;
    listener
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_names_move_to_canonical_form_and_clashes_stay_apart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let listener = write_legacy_state(&dir, listener).await;

    // The node starts as a storage node does: its worker finds the names.
    let peers = BTreeMap::from([(1, listener.local_addr().expect("addr").to_string())]);
    let node = Node::start(config(&peers), listener, dir, TransportFilter::new()).await;
    // State views hold the database: all of them must be gone before the
    // node's database is released.
    check_names(&node).await;
    node.into_dir().await;
}

async fn check_names(node: &Node) {
    let host = node.host.clone();
    leads_both(&host).await;
    wait_until("the names settled", WAIT, || async {
        let shard_view = host.state_view(SHARD).ok()?;
        let meta_view = host.state_view(META_GROUP).ok()?;
        let s = shard_state::case_status(&shard_view).ok()?;
        let m = meta_state::case_status(&meta_view).ok()?;
        (!s.pending && !m.pending).then_some(())
    })
    .await;

    let view = host.state_view(SHARD).expect("view");
    let status = shard_state::case_status(&view).expect("status");
    let clashes: Vec<Vec<String>> = status.clashes.into_iter().map(|(_, n)| n).collect();
    assert_eq!(
        clashes,
        vec![
            vec!["Sec/App".to_owned(), "sec/app".into()],
            vec!["sec/CASE1".to_owned(), "sec/Case1".into()],
        ]
    );
    // The lone legacy names moved; the clashing ones stayed where they were.
    for (key, present) in [
        (keys::repo("solo", "repo"), true),
        (keys::repo("Solo", "Repo"), false),
        (keys::repo("Sec", "App"), true),
        (keys::repo("sec", "app"), true),
        (keys::repo("sec", "Case1"), true),
        (keys::repo("sec", "CASE1"), true),
        (keys::repo("sec", "case1"), false),
        (keys::repo("sec", "plain"), true),
    ] {
        assert_eq!(
            view.get(&key).expect("read").is_some(),
            present,
            "{}",
            String::from_utf8_lossy(&key)
        );
    }
    let meta_view = host.state_view(META_GROUP).expect("view");
    let m = meta_state::case_status(&meta_view).expect("status");
    assert_eq!(
        m.clashes,
        vec![("workspace", vec!["Sec".to_owned(), "sec".into()])]
    );

    // Lookups: exact name first, then the canonical form.
    let store = &node.store;
    let solo = store.require_repo("SOLO", "REPO").await.expect("solo");
    assert_eq!(
        (solo.workspace.as_str(), solo.slug.as_str()),
        ("solo", "repo")
    );
    let a = store.require_repo("Sec", "App").await.expect("Sec/App");
    let b = store.require_repo("sec", "app").await.expect("sec/app");
    assert_ne!(a.id, b.id, "two repositories, never merged");
    let c1 = store.require_repo("sec", "Case1").await.expect("Case1");
    let c2 = store.require_repo("sec", "CASE1").await.expect("CASE1");
    assert_ne!(c1.id, c2.id);
    assert!(matches!(
        store.require_repo("sec", "case1").await,
        Err(ReplicatedError::Store(StoreError::RepoNotFound { .. }))
    ));

    // No name of a clashing form can be created meanwhile; others can.
    for slug in ["case1", "Case1", "CaSe1"] {
        let e = store
            .create_repo("sec", slug, true, "")
            .await
            .expect_err("clashing create refused");
        assert!(
            matches!(
                e,
                ReplicatedError::Store(
                    StoreError::RepoExists { .. } | StoreError::RepoCaseClash { .. }
                )
            ),
            "{slug}: {e:?}"
        );
    }
    let fresh = store
        .create_repo("SEC", "Fresh", true, "")
        .await
        .expect("create");
    assert_eq!(fresh.slug, "fresh");
    assert!(matches!(
        store.create_repo("sec", "FRESH", true, "").await,
        Err(ReplicatedError::Store(StoreError::RepoCaseClash { .. }))
    ));
    assert!(matches!(
        store.create_repo("sec", "fresh", true, "").await,
        Err(ReplicatedError::Store(StoreError::RepoExists { .. }))
    ));

    // Deleting all but one of a clash gives the last its canonical name.
    store
        .delete_repo("sec", "CASE1")
        .await
        .expect("delete CASE1");
    let moved = store.require_repo("sec", "case1").await.expect("case1");
    assert_eq!(moved.id, c1.id);
    assert_eq!(moved.slug, "case1");
    let view = host.state_view(SHARD).expect("view");
    assert!(view
        .get(&keys::repo("sec", "Case1"))
        .expect("read")
        .is_none());
    assert!(view
        .get(&keys::case_clash("sec/case1"))
        .expect("read")
        .is_none());
    assert!(store.create_repo("sec", "Case1", true, "").await.is_err());
    // Also when the one deleted held the canonical name already.
    store
        .delete_repo("sec", "app")
        .await
        .expect("delete sec/app");
    let moved = store.require_repo("sec", "app").await.expect("now sec/app");
    assert_eq!((moved.id, moved.workspace.as_str()), (a.id, "sec"));
    let view = host.state_view(SHARD).expect("view");
    assert!(view.get(&keys::repo("Sec", "App")).expect("read").is_none());

    // The same for workspaces in the directory.
    let r = meta(&host, MetaRequest::CreateWorkspace { name: "sec".into() }).await;
    assert!(
        matches!(r, MetaResponse::Workspace(ref w) if w.name == "sec"),
        "{r:?}"
    );
    let r = meta(&host, MetaRequest::CreateWorkspace { name: "SEC".into() }).await;
    assert!(
        matches!(r, MetaResponse::Refused(ref m) if m.contains("differ only in case")),
        "{r:?}"
    );
    store
        .delete_repo("SEC", "fresh")
        .await
        .expect("delete fresh");
    let r = meta(&host, MetaRequest::DeleteWorkspace { name: "Sec".into() }).await;
    assert!(matches!(r, MetaResponse::Done), "{r:?}");
    let meta_view = host.state_view(META_GROUP).expect("view");
    let m = meta_state::case_status(&meta_view).expect("status");
    assert!(m.clashes.is_empty() && !m.pending, "{m:?}");
    let ws = meta_state::read::workspace(&meta_view, "SEC")
        .expect("read")
        .expect("sec stays");
    assert_eq!(ws.name, "sec");
}
