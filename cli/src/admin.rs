//! `cairn admin`: repository administration over the storage nodes' gRPC
//! `Admin` service, following the shard leader like the router does.

use std::path::PathBuf;

use anyhow::Result;
use cairn_client::{Attempt, Cluster, RetryPolicy};
use cairn_proto::admin::admin_client::AdminClient;
use cairn_proto::admin::{
    CreateRepositoryRequest, DeleteRepositoryRequest, ListRepositoriesRequest, ShardStatusRequest,
};
use clap::{Args, Subcommand};

use crate::split_full_name;

#[derive(Args)]
pub struct AdminArgs {
    /// Data folder of a running `cairn dev` (its node address is read from there).
    #[arg(long, default_value = "cairn-data", conflicts_with = "node")]
    data_dir: PathBuf,
    /// gRPC URL of a storage node, e.g. http://127.0.0.1:7410.
    #[arg(long)]
    node: Option<String>,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Repository commands.
    Repo {
        #[command(subcommand)]
        command: RepoCommand,
    },
    /// Shard replica commands.
    Shard {
        #[command(subcommand)]
        command: ShardCommand,
    },
}

#[derive(Subcommand)]
enum ShardCommand {
    /// Every replica on every node: role, term, indexes, state checksum.
    Status,
}

#[derive(Subcommand)]
enum RepoCommand {
    /// Create an empty repository WORKSPACE/REPO.
    Create {
        full_name: String,
        #[arg(long)]
        public: bool,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Delete WORKSPACE/REPO with all its data.
    Delete { full_name: String },
    /// List repositories, optionally of one workspace.
    List { workspace: Option<String> },
}

pub async fn run(args: AdminArgs) -> Result<()> {
    // Bad arguments are reported before looking for a cluster.
    if let AdminCommand::Repo {
        command: RepoCommand::Create { full_name, .. } | RepoCommand::Delete { full_name },
    } = &args.command
    {
        split_full_name(full_name)?;
    }
    let nodes = match args.node {
        Some(u) => vec![u],
        None => {
            let cluster = crate::dev::read_cluster_file(&args.data_dir)?;
            anyhow::ensure!(
                !cluster.nodes.is_empty(),
                "dev-cluster.json lists no storage node"
            );
            cluster
                .nodes
                .iter()
                .map(|n| format!("http://{}", n.grpc_addr))
                .collect()
        }
    };
    match args.command {
        AdminCommand::Repo { command } => repo(nodes, command).await,
        AdminCommand::Shard {
            command: ShardCommand::Status,
        } => shard_status(&nodes).await,
    }
}

/// Asks every node for its replicas and prints one row per replica.
async fn shard_status(nodes: &[String]) -> Result<()> {
    println!(
        "{:<6} {:<5} {:<9} {:>5} {:>8} {:>8} {:>8} {:>8} {:>6}  STATE",
        "SHARD", "NODE", "ROLE", "TERM", "APPLIED", "LAST-LOG", "SNAPSHOT", "PURGED", "REPOS"
    );
    for url in nodes {
        let answer = match AdminClient::connect(url.clone()).await {
            Ok(mut c) => c
                .shard_status(ShardStatusRequest::default())
                .await
                .map(|r| r.into_inner().replicas)
                .map_err(|s| s.message().to_owned()),
            Err(e) => Err(e.to_string()),
        };
        let replicas = match answer {
            Ok(r) => r,
            Err(e) => {
                println!("{url}: unreachable ({e})");
                continue;
            }
        };
        for r in replicas {
            let role = match r.leader_id {
                0 => "no leader",
                l if l == r.node_id => "leader",
                _ => "follower",
            };
            println!(
                "{:<6} {:<5} {:<9} {:>5} {:>8} {:>8} {:>8} {:>8} {:>6}  {}",
                r.shard_id,
                r.node_id,
                role,
                r.term,
                r.applied_index,
                r.last_log_index,
                r.snapshot_index,
                r.purged_index,
                r.repositories,
                r.state_checksum.get(..16).unwrap_or(&r.state_checksum),
            );
        }
    }
    Ok(())
}

async fn repo(nodes: Vec<String>, command: RepoCommand) -> Result<()> {
    let cluster = Cluster::new(nodes, RetryPolicy::default());
    let fail = |s: tonic::Status| anyhow::anyhow!("{}", s.message());
    match command {
        RepoCommand::Create {
            full_name,
            public,
            description,
        } => {
            let (workspace, slug) = split_full_name(&full_name)?;
            let request = CreateRepositoryRequest {
                workspace,
                slug,
                is_private: !public,
                description,
            };
            // A new workspace gets its directory entry (its shard) first.
            cluster
                .ensure_workspace(&request.workspace)
                .await
                .map_err(fail)?;
            let repo = cluster
                .call(&request.workspace, |ch| {
                    let request = request.clone();
                    async move {
                        AdminClient::new(ch)
                            .create_repository(request)
                            .await
                            .map(|r| r.into_inner())
                            .map_err(Attempt::mutation)
                    }
                })
                .await
                .map_err(fail)?;
            println!("created {}/{} (id {})", repo.workspace, repo.slug, repo.id);
        }
        RepoCommand::Delete { full_name } => {
            let (workspace, slug) = split_full_name(&full_name)?;
            let request = DeleteRepositoryRequest { workspace, slug };
            cluster
                .call(&request.workspace, |ch| {
                    let request = request.clone();
                    async move {
                        AdminClient::new(ch)
                            .delete_repository(request)
                            .await
                            .map_err(Attempt::mutation)
                    }
                })
                .await
                .map_err(fail)?;
            println!("deleted {full_name}");
        }
        RepoCommand::List { workspace } => {
            let request = ListRepositoriesRequest {
                workspace: workspace.unwrap_or_default(),
            };
            let repos = cluster
                .call_read(&request.workspace, |ch| {
                    let request = request.clone();
                    async move {
                        AdminClient::new(ch)
                            .list_repositories(request)
                            .await
                            .map(|r| r.into_inner().repositories)
                            .map_err(Attempt::from)
                    }
                })
                .await
                .map_err(fail)?;
            for r in repos {
                println!("{}/{}\t{}\t{}", r.workspace, r.slug, r.id, r.head);
            }
        }
    }
    Ok(())
}
