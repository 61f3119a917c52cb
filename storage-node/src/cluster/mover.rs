//! Moving one replica of a shard from one node to another, online.
//!
//! The steps, each checked against the shard's actual membership (asked
//! of its leader) before it runs, so running the same move again after a
//! crash — of the mover, the leader, the source or the target — picks up
//! where it stopped:
//!
//! 1. record the move in the directory (one move per shard at a time);
//! 2. open an empty replica on the target;
//! 3. add it as a learner; it catches up by snapshot (with the packs the
//!    rows name) and log;
//! 4. once it has matched the leader's log, list it in the directory (the
//!    router may send it reads) and promote it to voter — a joint
//!    configuration from three voters to four;
//! 5. if the source leads, hand leadership to the target;
//! 6. remove the source — joint configuration from four voters to three;
//! 7. list the new voters in the directory, delete the source's replica,
//!    clear the move record.
//!
//! The shard never has fewer voters than it started with. The meta group
//! (the directory itself, shard id 0) moves the same way: its placement is
//! kept as shard 0's record, and it stays writable throughout (a joint
//! configuration commits with a majority of both voter sets).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_proto::admin::ShardStatusRequest;
use cairn_proto::cluster::change_replicas_request::Change;
use cairn_proto::cluster::{
    ChangeReplicasRequest, CloseReplicaRequest, MoveProgress, Node, OpenReplicaRequest,
    ReplicaChecksum, ReplicationProgressRequest, ReplicationProgressResponse, VerifyShardRequest,
    VerifyShardResponse, VoterSet,
};
use tonic::{Request, Status};

use crate::cluster::peers::Peers;
use crate::host::ShardHost;
use crate::meta::client::MetaClient;
use crate::meta::state::{Directory, MetaRequest, MoveRecord, NodeState, META_SHARD};
use crate::status::directory_status;

/// How long catch-up may go without the target's matched index moving
/// before the move gives up (to be run again).
const STALL_TIMEOUT: Duration = Duration::from_secs(120);

/// A pause after each step, for tests that interrupt a move halfway; only
/// honoured on a node configured with `fault-injection = true`.
pub const STEP_PAUSE_ENV: &str = "CAIRN_MOVE_STEP_PAUSE_MS";

pub struct Mover {
    host: Arc<ShardHost>,
    dir: Arc<MetaClient>,
    peers: Peers,
    step_pause: Duration,
}

/// "shard N", or "the meta group" for its id.
fn group_name(shard: u64) -> String {
    if shard == META_SHARD {
        "the meta group".into()
    } else {
        format!("shard {shard}")
    }
}

fn set(ids: &[u64]) -> BTreeSet<u64> {
    ids.iter().copied().collect()
}

fn list(ids: &BTreeSet<u64>) -> String {
    let v: Vec<String> = ids.iter().map(u64::to_string).collect();
    format!("{{{}}}", v.join(", "))
}

impl Mover {
    pub fn new(
        host: Arc<ShardHost>,
        dir: Arc<MetaClient>,
        peers: Peers,
        step_pause: Duration,
    ) -> Self {
        Mover {
            host,
            dir,
            peers,
            step_pause,
        }
    }

    async fn directory(&self) -> Result<Directory, Status> {
        self.dir.directory().await.map_err(directory_status)
    }

    fn addr(&self, d: &Directory, node: u64) -> Result<String, Status> {
        d.addr(node)
            .map(str::to_owned)
            .or_else(|| self.host.peers().get(node))
            .ok_or_else(|| Status::failed_precondition(format!("node {node} is not registered")))
    }

    /// Addresses of the nodes the directory lists for `shard`.
    pub async fn shard_nodes(&self, shard: u64) -> Result<Vec<String>, Status> {
        let d = self.directory().await?;
        let record = d
            .shard(shard)
            .ok_or_else(|| Status::not_found(format!("{} does not exist", group_name(shard))))?;
        let mut nodes: BTreeSet<u64> = set(&record.replicas);
        if let Some(m) = d.moves.iter().find(|m| m.shard == shard) {
            nodes.insert(m.to);
            nodes.insert(m.from);
        }
        Ok(nodes
            .into_iter()
            .filter_map(|id| self.addr(&d, id).ok())
            .collect())
    }

    async fn progress(
        &self,
        candidates: &[String],
        shard: u64,
    ) -> Result<ReplicationProgressResponse, Status> {
        self.peers
            .on_leader(candidates, move |mut c| async move {
                c.replication_progress(ReplicationProgressRequest { shard_id: shard })
                    .await
                    .map(|r| r.into_inner())
            })
            .await
    }

    async fn change(
        &self,
        candidates: &[String],
        shard: u64,
        change: Change,
    ) -> Result<(), Status> {
        self.peers
            .on_leader(candidates, move |mut c| {
                let change = change.clone();
                async move {
                    c.change_replicas(ChangeReplicasRequest {
                        shard_id: shard,
                        change: Some(change),
                    })
                    .await
                    .map(|_| ())
                }
            })
            .await
    }

    async fn set_replicas(&self, shard: u64, replicas: &BTreeSet<u64>) -> Result<(), Status> {
        self.dir
            .write(MetaRequest::SetReplicas {
                shard,
                replicas: replicas.iter().copied().collect(),
            })
            .await
            .map(|_| ())
            .map_err(directory_status)
    }

    /// A call to one node, retried while it is unreachable (a restart).
    async fn on_node<T, F, Fut>(&self, addr: &str, mut call: F) -> Result<T, Status>
    where
        F: FnMut(
            cairn_proto::cluster::cluster_client::ClusterClient<tonic::transport::Channel>,
        ) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let mut last = Status::unavailable(format!("{addr} unreachable"));
        for _ in 0..40 {
            match call(self.peers.cluster(addr)?).await {
                Ok(v) => return Ok(v),
                Err(s) if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown) => {
                    last = s;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(s) => return Err(s),
            }
        }
        Err(last)
    }

    /// Runs (or resumes) the move, reporting each step.
    pub async fn run(
        &self,
        shard: u64,
        from: u64,
        to: u64,
        report: impl Fn(MoveProgress),
    ) -> Result<(), Status> {
        let step = |name: &str, message: String| {
            tracing::info!(shard, from, to, step = name, "{message}");
            report(MoveProgress {
                step: name.into(),
                message,
                matched: 0,
                last_log: 0,
            });
        };
        if from == to {
            return Err(Status::invalid_argument(
                "source and target are the same node",
            ));
        }
        let d = self.directory().await?;
        let record = d
            .shard(shard)
            .ok_or_else(|| Status::not_found(format!("{} does not exist", group_name(shard))))?
            .clone();
        let this_move = MoveRecord { shard, from, to };
        let resuming = match d.moves.iter().find(|m| m.shard == shard) {
            Some(m) if *m == this_move => true,
            Some(m) => {
                return Err(Status::failed_precondition(format!(
                "{} is already moving from node {} to node {}; run that move again to finish it",
                group_name(shard),
                m.from,
                m.to
            )))
            }
            None => false,
        };
        let target = d
            .node(to)
            .ok_or_else(|| Status::failed_precondition(format!("node {to} is not registered")))?;
        if target.state != NodeState::Active && !resuming {
            return Err(Status::failed_precondition(format!(
                "node {to} is {}; it takes no new replicas",
                target.state.as_str()
            )));
        }
        let to_addr = target.addr.clone();
        let mut candidates = self.shard_nodes(shard).await?;
        if !candidates.contains(&to_addr) {
            candidates.push(to_addr.clone());
        }
        let p = self.progress(&candidates, shard).await?;
        let (voters, learners) = (set(&p.voters), set(&p.learners));
        let raft_done =
            voters.contains(&to) && !voters.contains(&from) && !learners.contains(&from);
        if !raft_done && !voters.contains(&from) {
            return Err(Status::failed_precondition(format!(
                "node {from} is not a voter of {} (voters {})",
                group_name(shard),
                list(&voters)
            )));
        }
        if !resuming {
            self.dir
                .write(MetaRequest::BeginMove(this_move.clone()))
                .await
                .map_err(directory_status)?;
        }
        step(
            "start",
            format!(
                "{} {}: node {from} -> node {to} (voters {})",
                if resuming {
                    "resuming move of"
                } else {
                    "moving"
                },
                group_name(shard),
                list(&voters)
            ),
        );
        self.pause().await;

        if !raft_done {
            if !voters.contains(&to) {
                self.add_and_catch_up(
                    shard,
                    to,
                    &to_addr,
                    &d,
                    &candidates,
                    &voters,
                    &learners,
                    &step,
                    &report,
                )
                .await?;
                // Caught up: the router may use it from now on.
                let mut routed = set(&record.replicas);
                routed.insert(to);
                self.set_replicas(shard, &routed).await?;
                let mut promoted = voters.clone();
                promoted.insert(to);
                self.change(
                    &candidates,
                    shard,
                    Change::SetVoters(VoterSet {
                        voters: promoted.iter().copied().collect(),
                    }),
                )
                .await?;
                step(
                    "promote",
                    format!(
                        "node {to} is a voter: {} -> {}",
                        list(&voters),
                        list(&promoted)
                    ),
                );
                self.pause().await;
            }
            self.move_leadership(shard, from, to, &candidates, &step)
                .await?;
            let p = self.progress(&candidates, shard).await?;
            let mut remaining = set(&p.voters);
            remaining.remove(&from);
            self.change(
                &candidates,
                shard,
                Change::SetVoters(VoterSet {
                    voters: remaining.iter().copied().collect(),
                }),
            )
            .await?;
            step(
                "remove",
                format!("node {from} removed: voters {}", list(&remaining)),
            );
            self.pause().await;
        }

        // The directory follows the membership; then the source's copy goes.
        let p = self.progress(&candidates, shard).await?;
        let voters = set(&p.voters);
        self.set_replicas(shard, &voters).await?;
        match self.addr(&d, from) {
            Ok(from_addr) => {
                let closed = self
                    .on_node(&from_addr, |mut c| async move {
                        c.close_replica(CloseReplicaRequest { shard_id: shard })
                            .await
                    })
                    .await;
                match closed {
                    Ok(_) => step("close", format!("replica on node {from} deleted")),
                    // Not a member any more: harmless until it is deleted.
                    Err(e) => step(
                        "close",
                        format!(
                            "replica on node {from} not deleted yet ({}); run the move again to delete it",
                            e.message()
                        ),
                    ),
                }
            }
            Err(e) => step("close", e.message().to_owned()),
        }
        self.dir
            .write(MetaRequest::EndMove { shard })
            .await
            .map_err(directory_status)?;
        step(
            "done",
            format!("{} is on {}", group_name(shard), list(&voters)),
        );
        Ok(())
    }

    async fn pause(&self) {
        if !self.step_pause.is_zero() {
            tokio::time::sleep(self.step_pause).await;
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn add_and_catch_up(
        &self,
        shard: u64,
        to: u64,
        to_addr: &str,
        d: &Directory,
        candidates: &[String],
        voters: &BTreeSet<u64>,
        learners: &BTreeSet<u64>,
        step: &impl Fn(&str, String),
        report: &impl Fn(MoveProgress),
    ) -> Result<(), Status> {
        let members: Vec<Node> = voters
            .iter()
            .chain(learners)
            .chain(std::iter::once(&to))
            .filter_map(|id| {
                self.addr(d, *id).ok().map(|addr| Node {
                    id: *id,
                    addr,
                    state: 0,
                })
            })
            .collect();
        self.on_node(to_addr, |mut c| {
            let members = members.clone();
            async move {
                c.open_replica(OpenReplicaRequest {
                    shard_id: shard,
                    members,
                })
                .await
            }
        })
        .await?;
        step("open", format!("empty replica opened on node {to}"));
        if !learners.contains(&to) {
            self.change(
                candidates,
                shard,
                Change::AddLearner(Node {
                    id: to,
                    addr: to_addr.to_owned(),
                    state: 0,
                }),
            )
            .await?;
        }
        step("learner", format!("node {to} is a learner, catching up"));
        self.pause().await;

        let goal = self.progress(candidates, shard).await?.last_log_index;
        let (mut best, mut since) = (0u64, Instant::now());
        loop {
            let p = self.progress(candidates, shard).await?;
            let matched = p
                .matched
                .iter()
                .find(|m| m.node_id == to)
                .map_or(0, |m| m.matched);
            report(MoveProgress {
                step: "catch-up".into(),
                message: format!("node {to} matched {matched} of {}", p.last_log_index),
                matched,
                last_log: p.last_log_index,
            });
            if matched >= goal && self.target_serves(to_addr, shard, goal).await {
                return Ok(());
            }
            if matched > best {
                (best, since) = (matched, Instant::now());
            } else if since.elapsed() > STALL_TIMEOUT {
                return Err(Status::deadline_exceeded(format!(
                    "node {to} made no progress catching up {} for {STALL_TIMEOUT:?}; run the move again",
                    group_name(shard)
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The target has applied `index` and holds every pack its rows name
    /// (its status is refused while it still fetches them).
    async fn target_serves(&self, addr: &str, shard: u64, index: u64) -> bool {
        let Ok(mut admin) = self.peers.admin(addr) else {
            return false;
        };
        match admin
            .shard_status(ShardStatusRequest {
                shard_ids: vec![shard],
                ..Default::default()
            })
            .await
        {
            Ok(r) => r
                .into_inner()
                .replicas
                .iter()
                .any(|r| r.applied_index >= index),
            Err(_) => false,
        }
    }

    async fn move_leadership(
        &self,
        shard: u64,
        from: u64,
        to: u64,
        candidates: &[String],
        step: &impl Fn(&str, String),
    ) -> Result<(), Status> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let p = self.progress(candidates, shard).await?;
            if p.leader_id != from {
                if p.leader_id == to {
                    step("leader", format!("node {to} leads {}", group_name(shard)));
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Status::deadline_exceeded(format!(
                    "node {from} still leads {}; run the move again",
                    group_name(shard)
                )));
            }
            let transferred = self.peers.transfer_leader(candidates, shard, to).await;
            if let Err(e) = transferred {
                tracing::debug!(shard, error = %e.message(), "leader transfer not taken yet");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Checksums of every member of the shard (or of one repository's rows)
    /// at one applied index.
    pub async fn verify(&self, request: VerifyShardRequest) -> Result<VerifyShardResponse, Status> {
        let shard = request.shard_id;
        let candidates = self.shard_nodes(shard).await?;
        let p = self.progress(&candidates, shard).await?;
        let d = self.directory().await?;
        let members: BTreeSet<u64> = set(&p.voters).union(&set(&p.learners)).copied().collect();
        let mut last = Vec::new();
        for _ in 0..50 {
            let mut answers = Vec::new();
            for node in &members {
                let answer = async {
                    let addr = self.addr(&d, *node)?;
                    let mut req = Request::new(ShardStatusRequest {
                        shard_ids: vec![shard],
                        workspace: request.workspace.clone(),
                        slug: request.slug.clone(),
                        include_meta: false,
                    });
                    req.set_timeout(Duration::from_secs(5));
                    let r = self.peers.admin(&addr)?.shard_status(req).await?;
                    r.into_inner()
                        .replicas
                        .into_iter()
                        .next()
                        .ok_or_else(|| Status::not_found("no replica"))
                }
                .await;
                answers.push(match answer {
                    Ok(r) => ReplicaChecksum {
                        node_id: *node,
                        applied_index: r.applied_index,
                        checksum: r.state_checksum,
                        pack_checksum: r.pack_checksum,
                        error: String::new(),
                    },
                    Err(e) => ReplicaChecksum {
                        node_id: *node,
                        applied_index: 0,
                        checksum: String::new(),
                        pack_checksum: String::new(),
                        error: e.message().to_owned(),
                    },
                });
            }
            let indexes: BTreeSet<u64> = answers.iter().map(|a| a.applied_index).collect();
            let all_ok = answers.iter().all(|a| a.error.is_empty());
            if all_ok && indexes.len() == 1 {
                let checksums: BTreeSet<(&str, &str)> = answers
                    .iter()
                    .map(|a| (a.checksum.as_str(), a.pack_checksum.as_str()))
                    .collect();
                return Ok(VerifyShardResponse {
                    shard_id: shard,
                    applied_index: indexes.into_iter().next().unwrap_or(0),
                    consistent: checksums.len() == 1,
                    replicas: answers,
                });
            }
            last = answers;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(VerifyShardResponse {
            shard_id: shard,
            applied_index: 0,
            replicas: last,
            consistent: false,
        })
    }
}
