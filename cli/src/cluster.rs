//! `cairn cluster`, `cairn node` and `cairn shard`: the operator's view of
//! the cluster directory and the tools that grow it and move replicas,
//! over the storage nodes' `Cluster` gRPC service.
//!
//! Any node answers; a move runs on the node the command reaches first
//! (`--node` picks it), and running the same move again resumes it.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use cairn_proto::cluster::cluster_client::ClusterClient;
use cairn_proto::cluster::{
    AddNodeRequest, ClusterStatusRequest, ClusterStatusResponse, DrainNodeRequest,
    MoveReplicaRequest, NodeState as NodeStateMsg, RemoveNodeRequest, ShardReport,
    TransferShardLeaderRequest, VerifyShardRequest,
};
use clap::{Args, Subcommand};
use tonic::transport::Channel;

use crate::plan::{self, NodeState, NodeView, ShardView, Step};

#[derive(Args, Clone)]
pub struct Target {
    /// Data folder of a running `cairn dev` (node addresses are read from there).
    #[arg(
        long,
        default_value = "cairn-data",
        conflicts_with = "node",
        global = true
    )]
    data_dir: PathBuf,
    /// gRPC URL of a storage node, e.g. http://127.0.0.1:7410; it runs
    /// the command (and any move).
    #[arg(long, global = true)]
    node: Option<String>,
}

#[derive(Args)]
pub struct ClusterArgs {
    #[command(flatten)]
    target: Target,
    #[command(subcommand)]
    command: ClusterCommand,
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Nodes, shards, leaders, applied index and lag per replica, bytes.
    Status {
        /// Print JSON (for tools) instead of tables.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct NodeArgs {
    /// Run a storage node from this config file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    target: Target,
    #[command(subcommand)]
    pub command: Option<NodeCommand>,
}

#[derive(Subcommand)]
pub enum NodeCommand {
    /// Register a running storage node (it must answer at ADDR as node ID).
    Add {
        id: u64,
        /// Its gRPC host:port.
        #[arg(long)]
        addr: String,
    },
    /// Mark a node draining and move every replica off it.
    Drain {
        id: u64,
        /// Only mark it; move nothing now.
        #[arg(long)]
        no_rebalance: bool,
    },
    /// Remove a node that holds no replica any more.
    Remove { id: u64 },
}

#[derive(Args)]
pub struct ShardArgs {
    #[command(flatten)]
    target: Target,
    #[command(subcommand)]
    command: ShardCommand,
}

/// A shard id, or `meta` (also `0`) for the meta group.
fn parse_shard(s: &str) -> std::result::Result<u64, String> {
    if s.eq_ignore_ascii_case("meta") {
        return Ok(plan::META_SHARD);
    }
    s.parse()
        .map_err(|_| format!("{s:?} is neither a shard id nor `meta`"))
}

#[derive(Subcommand)]
enum ShardCommand {
    /// Move one replica of SHARD (`meta`: of the meta group), online.
    Move {
        #[arg(value_parser = parse_shard)]
        shard: u64,
        #[arg(long)]
        from: u64,
        #[arg(long)]
        to: u64,
    },
    /// Even out replicas, leaders and bytes across the active nodes.
    Rebalance {
        /// Print the plan and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Hand SHARD's (or `meta`'s) leadership to another voter.
    Leader {
        #[arg(value_parser = parse_shard)]
        shard: u64,
        #[arg(long)]
        to: u64,
    },
    /// Compare the state checksums of every replica of SHARD (or of one
    /// repository in it) at one applied index.
    Verify {
        #[arg(value_parser = parse_shard)]
        shard: u64,
        /// WORKSPACE/REPO to check alone.
        #[arg(long)]
        repo: Option<String>,
    },
}

pub(crate) fn node_urls(target: &Target) -> Result<Vec<String>> {
    if let Some(u) = &target.node {
        return Ok(vec![u.clone()]);
    }
    let cluster = crate::dev::read_cluster_file(&target.data_dir)?;
    anyhow::ensure!(
        !cluster.nodes.is_empty(),
        "dev-cluster.json lists no storage node"
    );
    Ok(cluster
        .nodes
        .iter()
        .map(|n| format!("http://{}", n.grpc_addr))
        .collect())
}

/// A client of the first node that accepts a connection.
pub(crate) async fn connect(urls: &[String]) -> Result<ClusterClient<Channel>> {
    let mut last = None;
    for url in urls {
        match ClusterClient::connect(url.clone()).await {
            Ok(c) => return Ok(c),
            Err(e) => last = Some(format!("{url}: {e}")),
        }
    }
    bail!(
        "no storage node reachable ({})",
        last.unwrap_or_else(|| "none given".into())
    )
}

fn fail(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}

pub async fn run_cluster(args: ClusterArgs) -> Result<()> {
    let mut client = connect(&node_urls(&args.target)?).await?;
    match args.command {
        ClusterCommand::Status { json } => {
            let status = client
                .cluster_status(ClusterStatusRequest {})
                .await
                .map_err(fail)?
                .into_inner();
            if json {
                println!("{:#}", status_json(&status));
            } else {
                print!("{}", render_status(&status));
            }
            Ok(())
        }
    }
}

pub async fn run_node(args: NodeArgs) -> Result<()> {
    let Some(command) = args.command else {
        bail!("no node command given");
    };
    let mut client = connect(&node_urls(&args.target)?).await?;
    match command {
        NodeCommand::Add { id, addr } => {
            let n = client
                .add_node(AddNodeRequest { id, addr })
                .await
                .map_err(fail)?
                .into_inner();
            println!("node {} at {} is {}", n.id, n.addr, state_name(n.state));
            println!("run `cairn shard rebalance` to give it replicas");
        }
        NodeCommand::Drain { id, no_rebalance } => {
            let n = client
                .drain_node(DrainNodeRequest { id })
                .await
                .map_err(fail)?
                .into_inner();
            println!("node {} is {}", n.id, state_name(n.state));
            if !no_rebalance {
                rebalance(&mut client, false).await?;
            }
        }
        NodeCommand::Remove { id } => {
            let n = client
                .remove_node(RemoveNodeRequest { id })
                .await
                .map_err(fail)?
                .into_inner();
            println!("node {} is {}", n.id, state_name(n.state));
        }
    }
    Ok(())
}

pub async fn run_shard(args: ShardArgs) -> Result<()> {
    let mut client = connect(&node_urls(&args.target)?).await?;
    match args.command {
        ShardCommand::Move { shard, from, to } => move_replica(&mut client, shard, from, to).await,
        ShardCommand::Rebalance { dry_run } => rebalance(&mut client, dry_run).await,
        ShardCommand::Leader { shard, to } => {
            client
                .transfer_shard_leader(TransferShardLeaderRequest {
                    shard_id: shard,
                    to_node: to,
                })
                .await
                .map_err(fail)?;
            println!(
                "asked the leader of {} to hand over to node {to}",
                group_name(shard)
            );
            Ok(())
        }
        ShardCommand::Verify { shard, repo } => {
            let (workspace, slug) = match &repo {
                Some(full) => crate::split_full_name(full)?,
                None => (String::new(), String::new()),
            };
            let v = client
                .verify_shard(VerifyShardRequest {
                    shard_id: shard,
                    workspace,
                    slug,
                })
                .await
                .map_err(fail)?
                .into_inner();
            let what = repo.map_or(group_name(shard), |r| format!("{r} (shard {shard})"));
            for r in &v.replicas {
                if r.error.is_empty() {
                    println!(
                        "node {:<4} applied {:<8} {}",
                        r.node_id, r.applied_index, r.checksum
                    );
                } else {
                    println!("node {:<4} error: {}", r.node_id, r.error);
                }
            }
            if v.consistent {
                println!(
                    "{what}: {} replicas agree at applied index {}",
                    v.replicas.len(),
                    v.applied_index
                );
                Ok(())
            } else if v.applied_index == 0 {
                bail!("{what}: the replicas never reported one applied index (writes kept coming, or a replica is down); try again")
            } else {
                bail!(
                    "{what}: replicas DIFFER at applied index {}",
                    v.applied_index
                )
            }
        }
    }
}

/// Runs one move, printing its steps as they happen.
async fn move_replica(
    client: &mut ClusterClient<Channel>,
    shard: u64,
    from: u64,
    to: u64,
) -> Result<()> {
    let mut stream = client
        .move_replica(MoveReplicaRequest {
            shard_id: shard,
            from_node: from,
            to_node: to,
        })
        .await
        .map_err(fail)?
        .into_inner();
    let mut last_matched = None;
    let mut done = false;
    while let Some(p) = stream.message().await.map_err(fail)? {
        if p.step == "catch-up" {
            // One line per change, not per poll.
            if last_matched == Some(p.matched) {
                continue;
            }
            last_matched = Some(p.matched);
        }
        println!("  {:<9} {}", p.step, p.message);
        done |= p.step == "done";
    }
    if !done {
        bail!(
            "the move of {} stopped before it finished; run it again to resume",
            group_name(shard)
        );
    }
    Ok(())
}

fn shard_view(s: &ShardReport) -> ShardView {
    ShardView {
        id: s.placement.as_ref().map_or(0, |p| p.shard_id),
        // The voters are the truth; the directory's list only while no
        // replica answered.
        replicas: if s.voters.is_empty() {
            s.placement
                .as_ref()
                .map(|p| p.replicas.clone())
                .unwrap_or_default()
        } else {
            s.voters.clone()
        },
        leader: (s.leader_id != 0).then_some(s.leader_id),
        bytes: s.bytes,
    }
}

/// The planner's view: nodes, data shards, and the meta group if the
/// directory records its placement.
fn views(status: &ClusterStatusResponse) -> (Vec<NodeView>, Vec<ShardView>, Option<ShardView>) {
    let nodes = status
        .nodes
        .iter()
        .map(|n| NodeView {
            id: n.id,
            state: match NodeStateMsg::try_from(n.state) {
                Ok(NodeStateMsg::Draining) => NodeState::Draining,
                Ok(NodeStateMsg::Removed) => NodeState::Removed,
                _ => NodeState::Active,
            },
        })
        .collect();
    let shards = status.shards.iter().map(shard_view).collect();
    (nodes, shards, status.meta.as_ref().map(shard_view))
}

fn print_summary(title: &str, nodes: &[NodeView], shards: &[ShardView]) {
    println!("{title}");
    println!(
        "  {:<5} {:<9} {:>8} {:>6} {:>10}",
        "NODE", "STATE", "REPLICAS", "LEADS", "BYTES"
    );
    for (id, replicas, leads, bytes) in plan::summarize(nodes, shards) {
        let state = nodes
            .iter()
            .find(|n| n.id == id)
            .map_or("?", |n| match n.state {
                NodeState::Active => "active",
                NodeState::Draining => "draining",
                NodeState::Removed => "removed",
            });
        println!(
            "  {:<5} {:<9} {:>8} {:>6} {:>10}",
            id,
            state,
            replicas,
            leads,
            human_bytes(bytes)
        );
    }
}

async fn rebalance(client: &mut ClusterClient<Channel>, dry_run: bool) -> Result<()> {
    let status = client
        .cluster_status(ClusterStatusRequest {})
        .await
        .map_err(fail)?
        .into_inner();
    if let Some(m) = status.meta.as_ref().filter(|m| !m.moving.is_empty()) {
        bail!(
            "the meta group has a move under way ({}); run `cairn shard move meta` for it first",
            m.moving
        );
    }
    if let Some(s) = status.shards.iter().find(|s| !s.moving.is_empty()) {
        bail!(
            "shard {} has a move under way ({}); run `cairn shard move` for it first",
            s.placement.as_ref().map_or(0, |p| p.shard_id),
            s.moving
        );
    }
    let (nodes, shards, meta) = views(&status);
    print_summary("before:", &nodes, &shards);
    // The directory first: it must stay on active nodes whatever else moves.
    let mut steps = meta
        .map(|m| plan::plan_meta(&nodes, &m, &shards))
        .unwrap_or_default();
    steps.extend(plan::plan(&nodes, &shards));
    if steps.is_empty() {
        println!("nothing to do: replicas and leaders are even");
        return Ok(());
    }
    println!("plan ({} steps):", steps.len());
    for (i, step) in steps.iter().enumerate() {
        println!("  {:>2}. {step}", i + 1);
    }
    if dry_run {
        println!("dry run: nothing changed");
        return Ok(());
    }
    let total = steps.len();
    for (i, step) in steps.iter().enumerate() {
        println!("[{}/{total}] {step}", i + 1);
        match *step {
            Step::Move { shard, from, to } => move_replica(client, shard, from, to)
                .await
                .with_context(|| format!("step {} of {total}", i + 1))?,
            Step::TransferLeader { shard, to, .. } => {
                transfer_and_wait(client, shard, to).await?;
            }
        }
    }
    let status = client
        .cluster_status(ClusterStatusRequest {})
        .await
        .map_err(fail)?
        .into_inner();
    let (nodes, shards, _) = views(&status);
    print_summary("after:", &nodes, &shards);
    Ok(())
}

/// Asks for a leadership transfer and waits (briefly) until it shows.
async fn transfer_and_wait(client: &mut ClusterClient<Channel>, shard: u64, to: u64) -> Result<()> {
    for _ in 0..20 {
        let _ = client
            .transfer_shard_leader(TransferShardLeaderRequest {
                shard_id: shard,
                to_node: to,
            })
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let status = client
            .cluster_status(ClusterStatusRequest {})
            .await
            .map_err(fail)?
            .into_inner();
        let leader = status
            .meta
            .iter()
            .chain(&status.shards)
            .find(|s| s.placement.as_ref().is_some_and(|p| p.shard_id == shard))
            .map(|s| s.leader_id);
        if leader == Some(to) {
            println!("  leader    node {to} leads {}", group_name(shard));
            return Ok(());
        }
    }
    // Leadership is a preference, not a correctness matter.
    println!(
        "  leader    node {to} did not take {} over yet; left as is",
        group_name(shard)
    );
    Ok(())
}

fn group_name(shard: u64) -> String {
    if shard == plan::META_SHARD {
        "the meta group".into()
    } else {
        format!("shard {shard}")
    }
}

fn state_name(state: i32) -> &'static str {
    match NodeStateMsg::try_from(state) {
        Ok(NodeStateMsg::Active) => "active",
        Ok(NodeStateMsg::Draining) => "draining",
        Ok(NodeStateMsg::Removed) => "removed",
        _ => "unknown",
    }
}

pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn ids(v: &[u64]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
    }
}

/// The `cairn cluster status` tables.
/// The status as JSON, with the same names the tables use.
pub fn status_json(s: &ClusterStatusResponse) -> serde_json::Value {
    use serde_json::json;
    let nodes: Vec<_> = s
        .nodes
        .iter()
        .map(|n| json!({"id": n.id, "addr": n.addr, "state": state_name(n.state)}))
        .collect();
    let shard_json = |sh: &ShardReport| {
        let p = sh.placement.clone().unwrap_or_default();
        let replicas: Vec<_> = sh
            .replicas
            .iter()
            .map(|r| {
                json!({"node": r.node_id, "role": r.role, "applied": r.applied_index,
                           "lag": r.lag, "error": r.error})
            })
            .collect();
        let repos: Vec<_> = sh
            .repos
            .iter()
            .map(|r| json!({"workspace": r.workspace, "slug": r.slug, "bytes": r.bytes}))
            .collect();
        json!({
            "shard": p.shard_id,
            "epoch": p.epoch,
            // null when no replica knows a leader
            "leader": (sh.leader_id != 0).then_some(sh.leader_id),
            "voters": sh.voters,
            "learners": sh.learners,
            "bytes": sh.bytes,
            "moving": sh.moving,
            "replicas": replicas,
            "repos": repos,
        })
    };
    let shards: Vec<_> = s.shards.iter().map(shard_json).collect();
    json!({
        "map_epoch": s.map_epoch,
        "meta_voters": s.meta_voters,
        "meta_leader": (s.meta_leader != 0).then_some(s.meta_leader),
        // The meta group, shaped like a shard (null if not recorded yet).
        "meta": s.meta.as_ref().map(shard_json),
        "nodes": nodes,
        "shards": shards,
    })
}

pub fn render_status(s: &ClusterStatusResponse) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "shard map epoch {} · meta nodes {} (leader {})",
        s.map_epoch,
        ids(&s.meta_voters),
        if s.meta_leader == 0 {
            "unknown".to_owned()
        } else {
            s.meta_leader.to_string()
        }
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<5} {:<9} {:<22} {:>8} {:>6} {:>10}  META",
        "NODE", "STATE", "ADDRESS", "REPLICAS", "LEADS", "BYTES"
    );
    for n in &s.nodes {
        let holds: Vec<_> = s
            .shards
            .iter()
            .filter(|sh| {
                sh.replicas
                    .iter()
                    .any(|r| r.node_id == n.id && r.role != "unreachable")
            })
            .collect();
        let leads = s.shards.iter().filter(|sh| sh.leader_id == n.id).count();
        let bytes: u64 = holds.iter().map(|sh| sh.bytes).sum();
        let meta = s
            .meta
            .as_ref()
            .and_then(|m| m.replicas.iter().find(|r| r.node_id == n.id))
            .map_or("-", |r| r.role.as_str());
        let _ = writeln!(
            out,
            "{:<5} {:<9} {:<22} {:>8} {:>6} {:>10}  {}",
            n.id,
            state_name(n.state),
            n.addr,
            holds.len(),
            leads,
            human_bytes(bytes),
            meta
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<6} {:>5} {:>6} {:<10} {:<9} {:>10} {:>6}  MOVING",
        "SHARD", "EPOCH", "LEADER", "VOTERS", "LEARNERS", "BYTES", "REPOS"
    );
    let label = |sh: &ShardReport| {
        let id = sh.placement.as_ref().map_or(0, |p| p.shard_id);
        if id == plan::META_SHARD {
            "meta".to_owned()
        } else {
            id.to_string()
        }
    };
    for sh in s.meta.iter().chain(&s.shards) {
        let p = sh.placement.clone().unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<6} {:>5} {:>6} {:<10} {:<9} {:>10} {:>6}  {}",
            label(sh),
            p.epoch,
            if sh.leader_id == 0 {
                "-".to_owned()
            } else {
                sh.leader_id.to_string()
            },
            ids(&sh.voters),
            ids(&sh.learners),
            human_bytes(sh.bytes),
            sh.repos.len(),
            if sh.moving.is_empty() {
                "-"
            } else {
                &sh.moving
            }
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<6} {:<5} {:<11} {:>8} {:>6}  ERROR",
        "SHARD", "NODE", "ROLE", "APPLIED", "LAG"
    );
    for sh in s.meta.iter().chain(&s.shards) {
        let shard = label(sh);
        for r in &sh.replicas {
            let _ = writeln!(
                out,
                "{:<6} {:<5} {:<11} {:>8} {:>6}  {}",
                shard, r.node_id, r.role, r.applied_index, r.lag, r.error
            );
        }
    }
    let repos: Vec<_> = s
        .shards
        .iter()
        .flat_map(|sh| {
            let shard = sh.placement.as_ref().map_or(0, |p| p.shard_id);
            sh.repos.iter().map(move |r| (shard, r))
        })
        .collect();
    if !repos.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(out, "{:<40} {:>6} {:>10}", "REPOSITORY", "SHARD", "BYTES");
        for (shard, r) in repos {
            let _ = writeln!(
                out,
                "{:<40} {:>6} {:>10}",
                format!("{}/{}", r.workspace, r.slug),
                shard,
                human_bytes(r.bytes)
            );
        }
    }
    out
}
