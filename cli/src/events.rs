//! `cairn events`: follow the shards' event logs (`tail`), as a named
//! consumer that resumes where it acknowledged, and set their retention.
//!
//! `tail` streams each shard from one of its replicas (any replica serves
//! after a read barrier) and moves to another when that one fails,
//! resuming after the last position it printed; with `--consumer` it
//! starts at the consumer's cursor and acknowledges each batch once
//! printed, so a restarted tail repeats at most what it printed after its
//! last acknowledgement (at-least-once; events carry their index).

use std::io::Write as _;
use std::time::Duration;

use anyhow::{Context, Result};
use cairn_client::{follow_leader, Attempt, NodePool, RetryPolicy};
use cairn_proto::cluster::{ClusterStatusRequest, ResolveWorkspaceRequest};
use cairn_proto::events::events_client::EventsClient;
use cairn_proto::events::{
    AckRequest, ConsumerRequest, Event, EventBatch, RetentionRequest, SubscribeRequest,
};
use clap::{Args, Subcommand};
use serde_json::json;

use crate::cluster::{connect, node_urls, Target};

#[derive(Args)]
pub struct EventsArgs {
    #[command(flatten)]
    target: Target,
    #[command(subcommand)]
    command: EventsCommand,
}

#[derive(Subcommand)]
enum EventsCommand {
    /// Print events as they apply: of a workspace or a repository
    /// (WS or WS/REPO), else of every shard.
    Tail {
        scope: Option<String>,
        /// Follow as this named consumer: start at its cursor (registering
        /// it at the end of the log the first time) and acknowledge what
        /// was printed.
        #[arg(long)]
        consumer: Option<String>,
        /// Start after this log index (without --consumer).
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Stop once no event came for this many milliseconds.
        #[arg(long)]
        idle_ms: Option<u32>,
    },
    /// Set a shard's retention: events every consumer passed stay
    /// MIN_AGE_MS; beyond MAX_EVENTS or MAX_BYTES the oldest go anyway.
    Retention {
        shard: u64,
        #[arg(long)]
        min_age_ms: i64,
        #[arg(long)]
        max_events: u64,
        #[arg(long)]
        max_bytes: u64,
    },
}

/// A shard to follow: its id and its replicas' URLs.
struct ShardNodes {
    id: u64,
    urls: Vec<String>,
}

/// The shards `scope` lives on (every shard without one).
async fn shards(urls: &[String], scope: Option<&str>) -> Result<Vec<ShardNodes>> {
    let mut client = connect(urls).await?;
    let url = |addr: &str| format!("http://{addr}");
    if let Some(scope) = scope {
        let workspace = scope.split('/').next().unwrap_or(scope);
        let r = client
            .resolve_workspace(ResolveWorkspaceRequest {
                workspace: workspace.to_owned(),
            })
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?
            .into_inner();
        let id = r.placement.map(|p| p.shard_id).unwrap_or_default();
        let urls = r.replicas.iter().map(|n| url(&n.addr)).collect();
        return Ok(vec![ShardNodes { id, urls }]);
    }
    let status = client
        .cluster_status(ClusterStatusRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    let addr = |id: u64| {
        status
            .nodes
            .iter()
            .find(|n| n.id == id)
            .map(|n| url(&n.addr))
    };
    Ok(status
        .shards
        .iter()
        .filter_map(|s| s.placement.as_ref())
        .map(|p| ShardNodes {
            id: p.shard_id,
            urls: p.replicas.iter().filter_map(|&id| addr(id)).collect(),
        })
        .collect())
}

pub async fn run(args: EventsArgs) -> Result<()> {
    let urls = node_urls(&args.target)?;
    match args.command {
        EventsCommand::Tail {
            scope,
            consumer,
            after,
            json,
            idle_ms,
        } => {
            // A cluster moments old lists its shards once its directory
            // is bootstrapped: wait a little for that.
            let until = std::time::Instant::now() + Duration::from_secs(15);
            let mut shards = shards(&urls, scope.as_deref()).await?;
            while shards.is_empty() && std::time::Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(200)).await;
                shards = self::shards(&urls, scope.as_deref()).await?;
            }
            anyhow::ensure!(
                !shards.is_empty(),
                "no shard to follow: the cluster directory lists none yet (is the cluster still starting?)"
            );
            let tasks: Vec<_> = shards
                .into_iter()
                .map(|shard| {
                    let tail = Tail {
                        filter: scope.clone().unwrap_or_default(),
                        consumer: consumer.clone(),
                        json,
                        idle_ms: idle_ms.unwrap_or(0),
                        pool: NodePool::default(),
                        cluster: urls.clone(),
                    };
                    tokio::spawn(async move { tail.follow(shard, after).await })
                })
                .collect();
            for t in tasks {
                t.await.context("tail task")??;
            }
            Ok(())
        }
        EventsCommand::Retention {
            shard,
            min_age_ms,
            max_events,
            max_bytes,
        } => {
            let nodes = shards(&urls, None).await?;
            let target = nodes
                .iter()
                .find(|s| s.id == shard)
                .with_context(|| format!("no shard {shard}"))?;
            let pool = NodePool::default();
            let request = RetentionRequest {
                shard_id: shard,
                min_age_ms,
                max_events,
                max_bytes,
            };
            follow_leader(
                &pool,
                &RetryPolicy::default(),
                &target.urls,
                |ch| async move {
                    EventsClient::new(ch)
                        .set_retention(request)
                        .await
                        .map_err(Attempt::mutation)
                },
            )
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
            println!(
                "shard {shard}: events kept {min_age_ms} ms once passed, at most {max_events} \
                 events and {max_bytes} bytes"
            );
            Ok(())
        }
    }
}

struct Tail {
    filter: String,
    consumer: Option<String>,
    json: bool,
    idle_ms: u32,
    pool: NodePool,
    /// Where to ask again for a shard's replicas once none answers.
    cluster: Vec<String>,
}

impl Tail {
    /// Follows one shard until the stream goes idle (`--idle-ms`), moving
    /// to another replica when one fails.
    async fn follow(&self, mut shard: ShardNodes, after: u64) -> Result<()> {
        if let Some(consumer) = &self.consumer {
            let request = ConsumerRequest {
                shard_id: shard.id,
                consumer: consumer.clone(),
            };
            self.on_leader(&shard, |mut c| {
                let request = request.clone();
                async move { c.register(request).await }
            })
            .await?;
        }
        // Known once the first batch came (with a consumer, the server
        // starts at its cursor).
        let mut position = (self.consumer.is_none()).then_some(after);
        let mut acked = 0;
        let mut turn = 0usize;
        loop {
            if turn > 0 && turn.is_multiple_of(shard.urls.len().max(1)) {
                // Every replica failed once: the shard may have moved.
                if let Ok(now) = shards(&self.cluster, None).await {
                    if let Some(moved) = now.into_iter().find(|s| s.id == shard.id) {
                        shard = moved;
                    }
                }
            }
            anyhow::ensure!(!shard.urls.is_empty(), "shard {} has no replicas", shard.id);
            let url = &shard.urls[turn % shard.urls.len()];
            turn += 1;
            let request = SubscribeRequest {
                shard_id: shard.id,
                after: position.unwrap_or(0),
                consumer: self.consumer.clone().unwrap_or_default(),
                filter: self.filter.clone(),
                idle_ms: self.idle_ms,
            };
            let stream = match self.pool.channel(url) {
                Ok(ch) => EventsClient::new(ch).subscribe(request).await,
                Err(e) => Err(tonic::Status::unavailable(e.to_string())),
            };
            let mut stream = match stream {
                Ok(s) => s.into_inner(),
                // Asking again cannot help.
                Err(status)
                    if matches!(
                        status.code(),
                        tonic::Code::InvalidArgument
                            | tonic::Code::NotFound
                            | tonic::Code::PermissionDenied
                            | tonic::Code::Unauthenticated
                    ) =>
                {
                    anyhow::bail!("shard {}: {}", shard.id, status.message())
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            loop {
                match stream.message().await {
                    Ok(Some(batch)) => {
                        self.print(shard.id, &batch)?;
                        position = Some(batch.position);
                        // A failed ack only means more repeats after a
                        // restart; the next batch acks again.
                        if self.consumer.is_some() && batch.position > acked {
                            match self.ack(&shard, batch.position).await {
                                Ok(()) => acked = batch.position,
                                Err(e) => eprintln!("shard {}: ack failed: {e:#}", shard.id),
                            }
                        }
                    }
                    // The stream went idle: done.
                    Ok(None) => return Ok(()),
                    // The replica failed: go on from another.
                    Err(_) => break,
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn on_leader<T, F, Fut>(&self, shard: &ShardNodes, mut call: F) -> Result<T>
    where
        F: FnMut(EventsClient<tonic::transport::Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        // Cursors outlive elections: keep following the leader for long.
        let policy = RetryPolicy {
            rounds: 200,
            ..RetryPolicy::default()
        };
        follow_leader(&self.pool, &policy, &shard.urls, |ch| {
            let answer = call(EventsClient::new(ch));
            async move { answer.await.map(|r| r.into_inner()).map_err(Attempt::from) }
        })
        .await
        .map(|(v, _)| v)
        .map_err(|s| anyhow::anyhow!("shard {}: {}", shard.id, s.message()))
    }

    async fn ack(&self, shard: &ShardNodes, position: u64) -> Result<()> {
        let request = AckRequest {
            shard_id: shard.id,
            consumer: self.consumer.clone().unwrap_or_default(),
            position,
        };
        self.on_leader(shard, |mut c| {
            let request = request.clone();
            async move { c.ack(request).await }
        })
        .await
        .map(|_| ())
    }

    /// Prints `batch` in one write and flushes, so what is acknowledged
    /// was printed, and a tail killed midway leaves whole lines.
    fn print(&self, shard: u64, batch: &EventBatch) -> Result<()> {
        let mut text = String::new();
        if let Some(gap) = &batch.gap {
            let line = if self.json {
                json!({"shard": shard, "gap": {"from": gap.from, "to": gap.to}}).to_string()
            } else {
                format!(
                    "shard {shard} gap: events {}-{} are gone; reconcile from the current state",
                    gap.from, gap.to
                )
            };
            text.push_str(&line);
            text.push('\n');
        }
        for e in &batch.events {
            text.push_str(&self.line(e));
            text.push('\n');
        }
        if text.is_empty() {
            return Ok(());
        }
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes())?;
        out.flush()?;
        Ok(())
    }

    fn line(&self, e: &Event) -> String {
        if self.json {
            return json!({
                "shard": e.shard_id,
                "index": e.index,
                "at_ms": e.at_ms,
                "kind": e.kind,
                "repo_id": e.repo_id,
                "repository": e.repository,
                "changes": e.changes.iter().map(|c| json!({
                    "name": c.name, "old": c.old, "new": c.new,
                })).collect::<Vec<_>>(),
                "actor": (!e.actor.is_empty()).then_some(&e.actor),
                "push_options": e.push_options,
            })
            .to_string();
        }
        let short = |id: &str| id.get(..7).unwrap_or(id).to_owned();
        let changes: Vec<String> = e
            .changes
            .iter()
            .map(|c| format!("{} {}..{}", c.name, short(&c.old), short(&c.new)))
            .collect();
        let mut line = format!(
            "shard {} #{} {} {} {}",
            e.shard_id,
            e.index,
            cairn_router::rest::rfc3339(e.at_ms.div_euclid(1000)),
            e.kind,
            e.repository
        );
        if !changes.is_empty() {
            line.push(' ');
            line.push_str(&changes.join(", "));
        }
        if !e.actor.is_empty() {
            line.push_str(&format!(" by {}", e.actor));
        }
        if !e.push_options.is_empty() {
            line.push_str(&format!(" [{}]", e.push_options.join(" ")));
        }
        line
    }
}
