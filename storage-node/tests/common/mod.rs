//! Helpers shared by the storage-node integration tests.

#![allow(dead_code)]

use std::future::Future;
use std::path::Path;

use cairn_packfile::ObjectId;
use cairn_raft::types::{Entry, LogId, RaftEntry, RaftStateMachine};
use cairn_raft::{GroupId, RaftDb, StateView, TypeConfig};
use cairn_storage_node::packs::placer::LocalPackPlacer;
use cairn_storage_node::packs::transfer::StagingArea;
use cairn_storage_node::repo::RepoRecord;
use cairn_storage_node::shard::entry::EntryKinds;
use cairn_storage_node::shard::rows;
use cairn_storage_node::shard::state::{keys, ShardLogic, ShardRequest};

/// The shard id of a [`StateFixture`].
pub const FIXTURE_SHARD: GroupId = GroupId(3);
use std::process::Command;
use std::time::{Duration, Instant};

/// Runs the real `git` in `dir` with a pinned identity and clock; panics
/// with git's stderr on failure; returns stdout.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_DATE", "2024-01-01T00:00:00Z")
        .env("GIT_COMMITTER_DATE", "2024-01-01T00:00:00Z")
        .env("GIT_AUTHOR_NAME", "Test")
        .env("GIT_AUTHOR_EMAIL", "test@example.com")
        .env("GIT_COMMITTER_NAME", "Test")
        .env("GIT_COMMITTER_EMAIL", "test@example.com")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// Polls `check` every 20 ms until it yields a value; panics after `timeout`.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One in-process replicated node: `Raft` and `PackTransfer` served on one
/// listener from one data dir and staging area (like `StorageNode::start`
/// with shards, minus git/admin), with a way to stop it.
pub struct Node {
    pub host: std::sync::Arc<cairn_storage_node::host::ShardHost>,
    pub store: cairn_storage_node::repos::ReplicatedStore,
    pub area: cairn_storage_node::packs::transfer::StagingArea,
    pub stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub server: Option<tokio::task::JoinHandle<()>>,
    pub dir: tempfile::TempDir,
}

/// Waits until the raft database under `dir` can be opened again.
pub async fn wait_until_db_released(dir: &Path) {
    let raft = dir.join("raft");
    if !raft.exists() {
        return;
    }
    let deadline = Instant::now() + NODE_STOP_WAIT;
    loop {
        match cairn_raft::RaftDb::open(&raft.join("rocksdb"), &raft.join("snapshots")) {
            Ok(db) => {
                drop(db);
                return;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "raft database stays locked: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// How long a stopping node's server may take to wind down.
const NODE_STOP_WAIT: Duration = Duration::from_secs(30);

impl Node {
    /// Starts the node of `config` on `listener` with its data in `dir`.
    pub async fn start(
        config: cairn_storage_node::host::ShardHostConfig,
        listener: tokio::net::TcpListener,
        dir: tempfile::TempDir,
        filter: cairn_raft::TransportFilter,
    ) -> Node {
        use cairn_proto::pack::pack_transfer_server::PackTransferServer;
        use cairn_storage_node::packs::transfer::{
            PackTransferService, StagingArea, TransferLimits,
        };
        let area = StagingArea::at(dir.path());
        let transfer = PackTransferService::with_area(area.clone(), TransferLimits::default())
            .expect("transfer service");
        let host = std::sync::Arc::new(
            cairn_storage_node::host::ShardHost::start_with_area(
                config.clone(),
                dir.path(),
                area.clone(),
                filter,
            )
            .await
            .expect("shard host starts"),
        );
        let store =
            cairn_storage_node::repos::ReplicatedStore::new(host.clone(), &config, area.clone())
                .expect("store");
        let raft = host.raft_service().into_server();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let server = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(raft)
                .add_service(PackTransferServer::new(transfer))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = stop_rx.await;
                    },
                )
                .await
                .expect("node server");
        });
        Node {
            host,
            store,
            area,
            stop: Some(stop_tx),
            server: Some(server),
            dir,
        }
    }

    /// Stops the node and hands back its data dir once nothing of the old
    /// instance holds its raft database. In one process openraft's tasks
    /// may drop their handle a moment after shutdown returns; a restarted
    /// process never sees that.
    pub async fn into_dir(mut self) -> tempfile::TempDir {
        self.stop().await;
        // Moved out whole: a partial move would keep the host (and its
        // database) alive until the end of this function.
        let Node {
            dir, host, store, ..
        } = self;
        drop(store);
        drop(host);
        wait_until_db_released(dir.path()).await;
        dir
    }

    /// Stops the raft groups, then the server; idempotent.
    pub async fn stop(&mut self) {
        if self.server.is_none() {
            return;
        }
        self.host.shutdown().await;
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            tokio::time::timeout(NODE_STOP_WAIT, server)
                .await
                .expect("server stops")
                .expect("server task");
        }
    }
}

/// One shard's state machine over real RocksDB in a temp dir, fed entries
/// by hand (log index 1, 2, …), as the raft layer would apply them.
pub struct StateFixture {
    pub dir: tempfile::TempDir,
    pub db: RaftDb,
    pub sm: cairn_raft::GroupStateMachine<ShardLogic<LocalPackPlacer>>,
    pub next: u64,
}

impl StateFixture {
    pub fn new() -> Self {
        Self::with_kinds(Vec::new())
    }

    /// With the entry kinds of `services` registered too.
    pub fn with_kinds(services: Vec<std::sync::Arc<dyn EntryKinds>>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = RaftDb::open(&dir.path().join("rocksdb"), &dir.path().join("snapshots"))
            .expect("open raft db");
        let area = StagingArea::at(dir.path());
        area.create().expect("staging area");
        let logic =
            ShardLogic::with_kinds(LocalPackPlacer::new(area), services).expect("kinds register");
        let sm = db
            .state_machine(FIXTURE_SHARD, logic)
            .expect("state machine");
        StateFixture {
            dir,
            db,
            sm,
            next: 1,
        }
    }

    pub fn view(&self) -> StateView {
        self.db.state_view(FIXTURE_SHARD)
    }

    pub async fn apply(&mut self, req: &ShardRequest) -> std::io::Result<()> {
        let log_id: LogId = cairn_raft::types::log_id::<TypeConfig>(1, 1, self.next);
        self.next += 1;
        let entry = Entry::new_normal(log_id, cairn_raft::Command::encode(req).expect("encode"));
        let stream = futures::stream::iter([Ok((entry, None))]);
        self.sm.apply(stream).await
    }

    pub fn repo(&self, ws: &str, slug: &str) -> Option<RepoRecord> {
        self.view()
            .get(&keys::repo(ws, slug))
            .expect("read")
            .map(|v| rows::read_json(&keys::repo(ws, slug), &v).expect("record"))
    }

    pub fn refs(&self, id: u64) -> Vec<(String, ObjectId)> {
        let prefix = keys::refs_of(id);
        self.view()
            .scan_prefix(&prefix)
            .expect("scan")
            .into_iter()
            .map(|(k, v)| {
                (
                    String::from_utf8(k[prefix.len()..].to_vec()).expect("utf8"),
                    rows::read_oid(&k, &v).expect("oid"),
                )
            })
            .collect()
    }

    pub fn push_result(&self, push_id: &str) -> Vec<Result<(), String>> {
        let v = self
            .view()
            .get(&keys::push(push_id))
            .expect("read")
            .expect("recorded");
        rows::read_json(&keys::push(push_id), &v).expect("results")
    }
}
