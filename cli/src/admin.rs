//! `cairn admin`: repository administration over a storage node's gRPC
//! `Admin` service.

use std::path::PathBuf;

use anyhow::{Context, Result};
use cairn_proto::admin::admin_client::AdminClient;
use cairn_proto::admin::{
    CreateRepositoryRequest, DeleteRepositoryRequest, ListRepositoriesRequest,
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
    let AdminCommand::Repo { command } = &args.command;
    if let RepoCommand::Create { full_name, .. } | RepoCommand::Delete { full_name } = command {
        split_full_name(full_name)?;
    }
    let url = match args.node {
        Some(u) => u,
        None => {
            let cluster = crate::dev::read_cluster_file(&args.data_dir)?;
            let node = cluster
                .nodes
                .first()
                .context("dev-cluster.json lists no storage node")?;
            format!("http://{}", node.grpc_addr)
        }
    };
    let mut client = AdminClient::connect(url.clone())
        .await
        .with_context(|| format!("connecting to storage node {url}"))?;
    let AdminCommand::Repo { command } = args.command;
    match command {
        RepoCommand::Create {
            full_name,
            public,
            description,
        } => {
            let (workspace, slug) = split_full_name(&full_name)?;
            let repo = client
                .create_repository(CreateRepositoryRequest {
                    workspace,
                    slug,
                    is_private: !public,
                    description,
                })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner();
            println!("created {}/{} (id {})", repo.workspace, repo.slug, repo.id);
        }
        RepoCommand::Delete { full_name } => {
            let (workspace, slug) = split_full_name(&full_name)?;
            client
                .delete_repository(DeleteRepositoryRequest { workspace, slug })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
            println!("deleted {full_name}");
        }
        RepoCommand::List { workspace } => {
            let repos = client
                .list_repositories(ListRepositoriesRequest {
                    workspace: workspace.unwrap_or_default(),
                })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner()
                .repositories;
            for r in repos {
                println!("{}/{}\t{}\t{}", r.workspace, r.slug, r.id, r.head);
            }
        }
    }
    Ok(())
}
