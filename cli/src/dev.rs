//! `cairn dev`: the local cluster — storage-node processes (three by
//! default, every shard replicated on three of them; `--nodes 1` runs
//! one-voter groups through the same code) and a router process on
//! localhost, data in one folder, kept across restarts.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};

#[derive(Args)]
pub struct DevArgs {
    /// Folder for all cluster data.
    #[arg(long, default_value = "cairn-data")]
    pub data_dir: PathBuf,
    /// Router HTTP address (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// Storage nodes. Each node and the router runs as its own process,
    /// every shard replicated on three of them (on all of them with fewer).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=7))]
    pub nodes: u64,
    /// Shards (raft groups) the repositories spread over, by workspace.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub shards: u64,
    /// Let the nodes' `Admin.SetFaults` RPC cut raft traffic (for
    /// partition tests; needs --nodes > 1).
    #[arg(long)]
    pub fault_injection: bool,
}

/// What `cairn dev` writes to `<data-dir>/dev-cluster.json` once it serves.
#[derive(Debug, Serialize, Deserialize)]
pub struct DevCluster {
    pub http_url: String,
    /// `ssh://git@host:port`, for `git clone ssh://git@host:port/ws/repo.git`.
    #[serde(default)]
    pub ssh_url: String,
    pub username: String,
    pub token: String,
    pub nodes: Vec<DevNode>,
    pub router: DevProcess,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DevNode {
    pub id: u64,
    pub grpc_addr: SocketAddr,
    pub pid: u32,
    pub data_dir: PathBuf,
    /// The config file to start this node again with (multi-process mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DevProcess {
    pub pid: u32,
    pub http_addr: SocketAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<PathBuf>,
}

pub const CLUSTER_FILE: &str = "dev-cluster.json";

pub(crate) fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

pub fn read_cluster_file(data_dir: &Path) -> Result<DevCluster> {
    let path = data_dir.join(CLUSTER_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} (is `cairn dev --data-dir {}` running?)",
            path.display(),
            data_dir.display()
        )
    })?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// What a person needs to use the cluster: URLs and credentials.
pub fn print_banner(data_dir: &Path, cluster: &DevCluster) {
    let http_url = &cluster.http_url;
    let token = &cluster.token;
    let host = http_url.trim_start_matches("http://");
    println!("Cairn dev cluster is running (Ctrl-C stops it).");
    println!("  data dir:      {}", data_dir.display());
    for n in &cluster.nodes {
        println!(
            "  storage node:  {} at {} (pid {})",
            n.id, n.grpc_addr, n.pid
        );
    }
    println!("  router:        {http_url}");
    println!("  clone URL:     {http_url}/<workspace>/<repo>.git");
    if !cluster.ssh_url.is_empty() {
        println!(
            "  SSH clone URL: {}/<workspace>/<repo>.git",
            cluster.ssh_url
        );
    }
    println!("  username:      {} (site administrator)", cluster.username);
    println!("  password:      {token}");
    println!(
        "                 (an API token, kept in {}/dev-token)",
        data_dir.display()
    );
    println!();
    println!("Create a repository and push to it:");
    println!(
        "  curl -u {}:{token} -X POST {http_url}/2.0/repositories/myteam/hello",
        cluster.username
    );
    println!(
        "  (or: cairn admin --data-dir {} repo create myteam/hello)",
        data_dir.display()
    );
    println!(
        "  git push http://{}:{token}@{host}/myteam/hello.git main",
        cluster.username
    );
    println!("Add users and tokens: cairn user add NAME; cairn token create --user NAME");
    let _ = std::io::stdout().flush();
}
