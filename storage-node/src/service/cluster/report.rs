//! `Cluster.ClusterStatus`: every node's view of every replica, gathered
//! into one report per group.

use cairn_proto::cluster::*;
use tonic::{Request, Response, Status};

use super::*;

pub(super) async fn cluster_status(
    svc: &ClusterService,
    _request: Request<ClusterStatusRequest>,
) -> Result<Response<ClusterStatusResponse>, Status> {
    let (host, _) = svc.replicated()?;
    let d = svc.directory().await?;
    let reports = gather(svc, &d).await;
    let shards = d
        .shards
        .iter()
        .map(|shard| shard_report(shard, &reports, &d))
        .collect();
    let meta = d.meta.as_ref().map(|m| shard_report(m, &reports, &d));
    let (meta_voters, meta_leader) = match &meta {
        Some(m) if !m.voters.is_empty() => (m.voters.clone(), m.leader_id),
        _ => (
            host.meta_nodes(),
            host.leader(crate::host::META_GROUP).unwrap_or(0),
        ),
    };
    Ok(Response::new(ClusterStatusResponse {
        map_epoch: d.epoch,
        nodes: d.nodes.iter().map(node_msg).collect(),
        shards,
        meta_voters,
        meta_leader,
        meta,
    }))
}

/// Every live node's view of its replicas (errors per node).
pub(super) async fn gather(
    svc: &ClusterService,
    d: &Directory,
) -> BTreeMap<u64, Result<Vec<ShardReplicaStatus>, String>> {
    let calls = d
        .nodes
        .iter()
        .filter(|n| n.state != MetaNodeState::Removed)
        .map(|n| {
            let peers = svc.inner.peers.clone();
            let (id, addr) = (n.id, n.addr.clone());
            async move {
                let result = async {
                    let mut client = peers.admin(&addr)?;
                    let mut request = Request::new(ShardStatusRequest {
                        include_meta: true,
                        ..Default::default()
                    });
                    request.set_timeout(Duration::from_secs(5));
                    Ok::<_, Status>(client.shard_status(request).await?.into_inner().replicas)
                }
                .await
                .map_err(|s| s.message().to_owned());
                (id, result)
            }
        });
    futures::future::join_all(calls).await.into_iter().collect()
}

/// One shard's (or the meta group's) report from every node's answers.
fn shard_report(
    shard: &ShardRecord,
    reports: &BTreeMap<u64, Result<Vec<ShardReplicaStatus>, String>>,
    d: &Directory,
) -> ShardReport {
    // Every replica this shard has on any node, by node.
    let mut seen: BTreeMap<u64, &ShardReplicaStatus> = BTreeMap::new();
    for (node, result) in reports {
        if let Ok(list) = result {
            if let Some(r) = list.iter().find(|r| r.shard_id == shard.id) {
                seen.insert(*node, r);
            }
        }
    }
    let leader_id = seen
        .values()
        .filter(|r| r.leader_id != 0)
        .max_by_key(|r| r.term)
        .map_or(0, |r| r.leader_id);
    let leader = seen.get(&leader_id).copied();
    let reference = leader.or_else(|| seen.values().max_by_key(|r| r.applied_index).copied());
    let (voters, learners) = reference
        .map(|r| (r.voters.clone(), r.learners.clone()))
        .unwrap_or_default();
    let leader_last = leader.map(|r| r.last_log_index);
    let mut nodes: BTreeSet<u64> = shard.replicas.iter().copied().collect();
    nodes.extend(voters.iter().copied());
    nodes.extend(learners.iter().copied());
    let replicas = nodes
        .iter()
        .map(|node| match seen.get(node) {
            Some(r) => ReplicaReport {
                node_id: *node,
                role: if r.leader_id == *node {
                    "leader"
                } else if learners.contains(node) {
                    "learner"
                } else if voters.contains(node) {
                    "follower"
                } else {
                    "leaving"
                }
                .into(),
                applied_index: r.applied_index,
                lag: leader_last.map_or(0, |l| l.saturating_sub(r.applied_index)),
                error: String::new(),
            },
            None => ReplicaReport {
                node_id: *node,
                role: "unreachable".into(),
                applied_index: 0,
                lag: 0,
                error: match reports.get(node) {
                    Some(Err(e)) => e.clone(),
                    Some(Ok(_)) => "replica not open (catching up or moved)".into(),
                    None => "node not registered".into(),
                },
            },
        })
        .collect();
    let repos = reference
        .map(|r| {
            r.repos
                .iter()
                .map(|u| RepoUsage {
                    repo_id: u.repo_id,
                    workspace: u.workspace.clone(),
                    slug: u.slug.clone(),
                    bytes: u.bytes,
                })
                .collect()
        })
        .unwrap_or_default();
    ShardReport {
        placement: Some(ShardPlacement {
            shard_id: shard.id,
            replicas: shard.replicas.clone(),
            epoch: shard.epoch,
        }),
        leader_id,
        voters,
        learners,
        replicas,
        bytes: reference.map_or(0, |r| r.bytes),
        repos,
        moving: d
            .moves
            .iter()
            .find(|m| m.shard == shard.id)
            .map(|m| format!("{} -> {}", m.from, m.to))
            .unwrap_or_default(),
    }
}
