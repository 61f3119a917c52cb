//! Starting a storage node: open the store, bind gRPC, serve.

use std::net::SocketAddr;
use std::sync::Arc;

use cairn_packfile::receive::Limits;
use cairn_proto::admin::admin_server::AdminServer;
use cairn_proto::git::git_server::GitServer;
use cairn_proto::pack::pack_transfer_server::PackTransferServer;
use tokio::net::TcpListener;

use crate::admin_service::AdminService;
use crate::backend::RepoBackend;
use crate::cluster_service::ClusterService;
use crate::config::Config;
use crate::git_service::GitService;
use crate::pack_transfer::{PackTransferService, StagingArea, TransferLimits};
use crate::replicated_store::{ReplicatedError, ReplicatedStore};
use crate::repo_store::{RepoStore, StoreError};
use crate::shard_host::{ShardHost, ShardHostError};
use crate::staging_cleanup::{CleanupOptions, StagingCleanupWorker};
use cairn_proto::cluster::cluster_server::ClusterServer;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("opening the repository store: {0}")]
    Store(#[from] StoreError),
    #[error("preparing the pack transfer staging area: {0}")]
    Staging(#[source] std::io::Error),
    #[error("starting the shard host: {0}")]
    Shards(#[from] ShardHostError),
    #[error("serving the shards: {0}")]
    Replicated(#[from] ReplicatedError),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running storage node.
pub struct StorageNode {
    pub grpc_addr: SocketAddr,
    pub store: Arc<RepoStore>,
    /// Present only when the configuration has a `shards` section.
    pub shard_host: Option<Arc<ShardHost>>,
    /// What the git and admin services serve from: `Replicated` exactly
    /// when `shard_host` is present.
    pub backend: RepoBackend,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl StorageNode {
    /// Opens the store and starts serving gRPC in the background.
    pub async fn start(config: Config) -> Result<Self, StartError> {
        config.validate()?;
        let store = {
            let dir = config.data_dir.clone();
            tokio::task::spawn_blocking(move || RepoStore::open(&dir))
                .await
                .expect("opening the store does not panic")?
        };
        let store = Arc::new(store);
        let listener = TcpListener::bind(config.grpc_addr)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.grpc_addr,
                source,
            })?;
        let grpc_addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.grpc_addr,
            source,
        })?;
        let limits = Limits {
            max_pack_bytes: config.max_pack_bytes,
            ..Limits::default()
        };
        // After `RepoStore::open`, which empties `staging/` on start.
        let staging = StagingArea::at(&config.data_dir);
        let pack_transfer = PackTransferService::with_area(
            staging.clone(),
            TransferLimits {
                max_pack_bytes: config.max_pack_bytes,
            },
        )
        .map_err(StartError::Staging)?;
        // Same staging area (and so the same lock) as PackTransfer and the
        // cleanup worker: placing a pack must not race their removals.
        let filter = cairn_raft::TransportFilter::new();
        let shard_host = match config.shards.clone() {
            Some(shards) => Some(Arc::new(
                ShardHost::start_with_area(
                    shards,
                    &config.data_dir,
                    staging.clone(),
                    filter.clone(),
                )
                .await?,
            )),
            None => None,
        };
        let backend = match (&shard_host, &config.shards) {
            (Some(host), Some(shards)) => RepoBackend::Replicated {
                shards: Arc::new(ReplicatedStore::new(host.clone(), shards, staging.clone())?),
                local: store.clone(),
            },
            _ => RepoBackend::Single(store.clone()),
        };
        let git = GitServer::new(GitService::new(backend.clone(), limits))
            .max_decoding_message_size(16 << 20);
        let faults = config.fault_injection.then_some(filter);
        let admin = AdminServer::new(
            AdminService::new(backend.clone()).with_shards(shard_host.clone(), faults),
        );
        StagingCleanupWorker::new(staging, CleanupOptions::default()).spawn();
        let raft = shard_host.as_ref().map(|h| h.raft_service().into_server());
        let directory = backend.replicated().map(|s| s.directory().clone());
        let move_step_pause = if config.fault_injection {
            std::env::var(crate::mover::STEP_PAUSE_ENV)
                .ok()
                .and_then(|v| v.parse().ok())
                .map_or(std::time::Duration::ZERO, std::time::Duration::from_millis)
        } else {
            std::time::Duration::ZERO
        };
        let cluster = ClusterServer::new(ClusterService::new(
            shard_host.clone().zip(directory),
            grpc_addr,
            move_step_pause,
        ));
        let task = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(git)
                .add_service(admin)
                .add_service(cluster)
                .add_service(PackTransferServer::new(pack_transfer))
                .add_optional_service(raft)
                // Accepted streams get TCP_NODELAY: under Nagle a response's
                // small HTTP/2 frames wait out the peer's delayed ACK (40 ms).
                .serve_with_incoming(
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                ),
        );
        tracing::info!(addr = %grpc_addr, data_dir = %config.data_dir.display(), "storage node serving");
        Ok(StorageNode {
            grpc_addr,
            store,
            shard_host,
            backend,
            task,
        })
    }

    /// Waits until the gRPC server stops (it only stops on error).
    pub async fn wait(self) -> Result<(), tonic::transport::Error> {
        match self.task.await {
            Ok(r) => r,
            Err(e) => panic!("storage node task panicked: {e}"),
        }
    }
}
