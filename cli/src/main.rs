//! `cairn`: the one operator binary. `cairn dev` runs a local cluster;
//! `cairn node` and `cairn router` run one process each from a config file;
//! `cairn admin` manages repositories on a storage node.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod admin;
mod cluster;
mod dev;
mod dev_cluster;
mod events;
mod identity;
mod plan;

#[derive(Parser)]
#[command(name = "cairn", version, about = "Cairn distributed git hosting")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a local cluster (storage node + router) with data in one folder.
    Dev(dev::DevArgs),
    /// Run a storage node (`--config`), or `cairn node add|drain|remove`.
    Node(cluster::NodeArgs),
    /// Run the HTTP router.
    Router {
        #[arg(long)]
        config: PathBuf,
    },
    /// Administer repositories.
    Admin(admin::AdminArgs),
    /// The cluster as a whole (`cairn cluster status`).
    Cluster(cluster::ClusterArgs),
    /// Shard replicas: `cairn shard move|rebalance|leader|verify`.
    Shard(cluster::ShardArgs),
    /// The shards' event logs: `cairn events tail|retention`.
    Events(events::EventsArgs),
    /// Users: `cairn user add|list`.
    User(identity::UserArgs),
    /// API and access tokens: `cairn token create|list|revoke`.
    Token(identity::TokenArgs),
    /// Permissions and workspace roles: `cairn perm grant|revoke|role|list`.
    Perm(identity::PermArgs),
    /// SSH public keys: `cairn ssh-key add|list|remove`.
    SshKey(identity::SshKeyArgs),
    /// The audit log: `cairn audit tail`.
    Audit(identity::AuditArgs),
}

fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CAIRN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,cairn=info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    init_tracing();
    match cli.command {
        Command::Dev(args) => dev_cluster::start(args).await,
        Command::Node(args) if args.command.is_some() => cluster::run_node(args).await,
        Command::Node(args) => {
            let Some(config) = args.config else {
                bail!("`cairn node` needs --config FILE to run a node, or a subcommand (add, drain, remove)");
            };
            let cfg: cairn_storage_node::Config = read_toml(&config)?;
            let node = cairn_storage_node::StorageNode::start(cfg).await?;
            eprintln!("storage node listening on {}", node.grpc_addr);
            tokio::select! {
                r = node.wait() => r.context("storage node stopped")?,
                _ = tokio::signal::ctrl_c() => {}
            }
            Ok(())
        }
        Command::Router { config } => {
            let cfg: cairn_router::Config = read_toml(&config)?;
            let router = cairn_router::Router::start(cfg).await?;
            eprintln!("router listening on http://{}", router.http_addr);
            tokio::select! {
                r = router.wait() => r.context("router stopped")?,
                _ = tokio::signal::ctrl_c() => {}
            }
            Ok(())
        }
        Command::Admin(args) => admin::run(args).await,
        Command::Cluster(args) => cluster::run_cluster(args).await,
        Command::Shard(args) => cluster::run_shard(args).await,
        Command::Events(args) => events::run(args).await,
        Command::User(args) => identity::run_user(args).await,
        Command::Token(args) => identity::run_token(args).await,
        Command::Perm(args) => identity::run_perm(args).await,
        Command::SshKey(args) => identity::run_ssh_key(args).await,
        Command::Audit(args) => identity::run_audit(args).await,
    }
}

/// Splits `workspace/slug`.
fn split_full_name(full: &str) -> Result<(String, String)> {
    match full.split_once('/') {
        Some((w, s)) if !w.is_empty() && !s.is_empty() && !s.contains('/') => {
            Ok((w.to_owned(), s.trim_end_matches(".git").to_owned()))
        }
        _ => bail!("expected WORKSPACE/REPO, got {full:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_configs_parse_and_validate() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
        let node: cairn_storage_node::Config =
            read_toml(&root.join("node.example.toml")).expect("node example parses");
        node.validate().expect("node example is valid");
        let router: cairn_router::Config =
            read_toml(&root.join("router.example.toml")).expect("router example parses");
        router.validate().expect("router example is valid");
    }

    #[test]
    fn full_names() {
        assert_eq!(
            split_full_name("ws/repo.git").expect("valid"),
            ("ws".to_owned(), "repo".to_owned())
        );
        assert!(split_full_name("ws").is_err());
        assert!(split_full_name("a/b/c").is_err());
        assert!(split_full_name("/b").is_err());
    }
}
