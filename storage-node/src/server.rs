//! Starting a storage node: check its data folder, open its shards, bind
//! gRPC, serve.

use std::net::SocketAddr;
use std::sync::Arc;

use cairn_packfile::receive::Limits;
use cairn_proto::admin::admin_server::AdminServer;
use cairn_proto::git::git_server::GitServer;
use cairn_proto::pack::pack_transfer_server::PackTransferServer;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::host::{ShardHost, ShardHostConfig, ShardHostError};
use crate::layout::LayoutError;
use crate::packs::staging_cleanup::{CleanupOptions, StagingCleanupWorker};
use crate::packs::transfer::{PackTransferService, StagingArea, TransferLimits};
use crate::repos::{ReplicatedError, ReplicatedStore};
use crate::service::admin::AdminService;
use crate::service::cluster::ClusterService;
use crate::service::git::GitService;
use crate::service::identity::IdentityService;
use cairn_proto::cluster::cluster_server::ClusterServer;
use cairn_proto::events::events_server::EventsServer;
use cairn_proto::identity::identity_server::IdentityServer;

use crate::service::events::EventsService;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    DataDir(#[from] LayoutError),
    #[error("preparing {path}: {source}")]
    Staging {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
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
    pub shard_host: Arc<ShardHost>,
    /// The repositories of the shards this node holds.
    pub repos: Arc<ReplicatedStore>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl StorageNode {
    /// Opens the data folder and starts serving gRPC in the background. A
    /// config without `shards` runs a cluster of this one node: one shard
    /// and the directory, each a one-voter Raft group.
    pub async fn start(config: Config) -> Result<Self, StartError> {
        config.validate()?;
        let data_dir = config.data_dir.clone();
        {
            let dir = data_dir.clone();
            tokio::task::spawn_blocking(move || crate::layout::check_data_dir(&dir))
                .await
                .expect("checking the data folder does not panic")?;
        }
        crate::layout::clean_push_staging(&data_dir).map_err(|source| StartError::Staging {
            path: crate::layout::staging_dir(&data_dir),
            source,
        })?;
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
        let staging = StagingArea::at(&data_dir);
        let pack_transfer = PackTransferService::with_area(
            staging.clone(),
            TransferLimits {
                max_pack_bytes: config.max_pack_bytes,
            },
        )
        .map_err(|source| StartError::Staging {
            path: crate::layout::staging_dir(&data_dir),
            source,
        })?;
        // Same staging area (and so the same lock) as PackTransfer and the
        // cleanup worker: placing a pack must not race their removals.
        let filter = cairn_raft::TransportFilter::new();
        let shards = config
            .shards
            .clone()
            .unwrap_or_else(|| ShardHostConfig::single_node(grpc_addr));
        let shard_host = Arc::new(
            ShardHost::start_with_area(shards.clone(), &data_dir, staging.clone(), filter.clone())
                .await?,
        );
        let repos = Arc::new(ReplicatedStore::new(
            shard_host.clone(),
            &shards,
            staging.clone(),
        )?);
        let git = GitServer::new(GitService::new(repos.clone(), data_dir.clone(), limits))
            .max_decoding_message_size(16 << 20);
        let faults = config.fault_injection.then_some(filter);
        let admin = AdminServer::new(AdminService::new(repos.clone(), shard_host.clone(), faults));
        StagingCleanupWorker::new(staging, CleanupOptions::default()).spawn();
        let raft = shard_host.raft_service().into_server();
        let move_step_pause = if config.fault_injection {
            std::env::var(crate::cluster::mover::STEP_PAUSE_ENV)
                .ok()
                .and_then(|v| v.parse().ok())
                .map_or(std::time::Duration::ZERO, std::time::Duration::from_millis)
        } else {
            std::time::Duration::ZERO
        };
        let cluster = ClusterServer::new(ClusterService::new(
            shard_host.clone(),
            repos.directory().clone(),
            move_step_pause,
        ));
        let task = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(git)
                .add_service(admin)
                .add_service(cluster)
                .add_service(EventsServer::new(EventsService::new(shard_host.clone())))
                .add_service(IdentityServer::new(IdentityService::new(
                    repos.directory().clone(),
                )))
                .add_service(PackTransferServer::new(pack_transfer))
                .add_service(raft)
                // Accepted streams get TCP_NODELAY: under Nagle a response's
                // small HTTP/2 frames wait out the peer's delayed ACK (40 ms).
                .serve_with_incoming(
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                ),
        );
        tracing::info!(addr = %grpc_addr, data_dir = %data_dir.display(), "storage node serving");
        Ok(StorageNode {
            grpc_addr,
            shard_host,
            repos,
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
