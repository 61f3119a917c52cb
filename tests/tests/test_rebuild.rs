//! Catch-up by snapshot with real processes (`cairn dev --nodes 3`): a
//! replica that lost its raft state, or its whole data dir, is rebuilt from
//! a snapshot of the shard and fetches from its peers only the packs it
//! lacks; afterwards it holds the same state as the others and serves it.

use std::fs;
use std::time::Duration;

use anyhow::ensure;
use cairn_proto::admin::{AllowRejoinRequest, CompactShardRequest};
use cairn_tests::*;

const SHARD: u64 = 1;
const WAIT: Duration = Duration::from_secs(60);

/// Pushes each of `n` new commits on its own, so each lands as one pack.
fn push_commits(work: &Repo, url: &str, n: usize, tag: &str) -> Result<()> {
    for i in 0..n {
        work.commit_file(&format!("{tag}-{i}.txt"), &format!("{tag} {i}\n"), tag)?;
        work.run(["push", "-q", url, "main"])?;
    }
    Ok(())
}

/// Snapshots the shard on `leader` and purges its log: `victim` cannot be
/// caught up from the log any more, only by snapshot.
fn compact(c: &Cluster, leader: u64) -> Result<u64> {
    let r = c.admin_rpc(leader, |mut a| async move {
        a.compact_shard(CompactShardRequest { shard_id: SHARD })
            .await
    })?;
    Ok(r.snapshot_index)
}

/// The operator step before bringing a wiped replica back.
fn allow_rejoin(c: &Cluster, leader: u64, victim: u64) -> Result<()> {
    c.admin_rpc(leader, |mut a| async move {
        a.allow_rejoin(AllowRejoinRequest {
            shard_id: SHARD,
            node_id: victim,
        })
        .await
    })?;
    Ok(())
}

#[test]
fn a_wiped_follower_is_rebuilt_by_snapshot_fetching_only_missing_packs() -> Result<()> {
    let mut c = Cluster::start_with_nodes(3)?;
    // Node 1 bootstraps the group on a fresh cluster and so usually leads;
    // hand leadership on, so the replica wiped below is node 1, whose empty
    // log on restart must not be mistaken for a new cluster.
    let victim = 1;
    let mut leader = c.wait_leader(WAIT)?;
    if leader == victim {
        c.transfer_leader(victim, 2)?;
        leader = wait_until("node 2 to lead", WAIT, || {
            Ok((c.leader() == Some(2)).then_some(2))
        })?;
    }
    let node_dir = c.data_dir().join(format!("node-{victim}"));

    let git = Git::new()?;
    let url = c.repo_url(&c.new_repo("rebuild")?);
    let work = git.init(git.scratch("work"))?;
    push_commits(&work, &url, 3, "before")?;
    c.wait_converged(WAIT)?;

    // 1. The node loses its raft database but keeps its packs, and misses
    //    two pushes meanwhile: it must fetch exactly those two packs.
    c.kill_node(victim)?;
    push_commits(&work, &url, 2, "while-down")?;
    let compacted = compact(&c, leader)?;
    fs::remove_dir_all(node_dir.join("raft"))?;
    allow_rejoin(&c, leader, victim)?;
    c.restart_node(victim)?;
    let replicas = c.wait_converged(WAIT)?;
    let rebuilt = replicas
        .iter()
        .find(|r| r.node_id == victim)
        .expect("victim reported");
    println!(
        "raft state lost: snapshot at {compacted}, rebuilt replica {}",
        describe_replicas(std::slice::from_ref(rebuilt))
    );
    ensure!(
        rebuilt.snapshot_index >= compacted,
        "the replica did not come back through the snapshot: {rebuilt:?}\n{}",
        c.node_log_tail(victim, 40)
    );
    ensure!(
        rebuilt.packs_fetched == 2,
        "expected exactly the 2 missed packs fetched, got {}",
        rebuilt.packs_fetched
    );

    // 2. The whole data dir is gone: every pack the state names (6 after
    //    one more push) comes from the peers.
    c.kill_node(victim)?;
    push_commits(&work, &url, 1, "after-wipe")?;
    let compacted = compact(&c, leader)?;
    fs::remove_dir_all(&node_dir)?;
    allow_rejoin(&c, leader, victim)?;
    c.restart_node(victim)?;
    let replicas = c.wait_converged(WAIT)?;
    let rebuilt = replicas
        .iter()
        .find(|r| r.node_id == victim)
        .expect("victim reported");
    println!(
        "data dir wiped: snapshot at {compacted}, rebuilt replica {}",
        describe_replicas(std::slice::from_ref(rebuilt))
    );
    ensure!(rebuilt.snapshot_index >= compacted, "{rebuilt:?}");
    ensure!(
        rebuilt.packs_fetched == 6,
        "expected all 6 packs fetched, got {}",
        rebuilt.packs_fetched
    );

    // The rebuilt node leads and serves: a push through it and a clone
    // from the cluster see everything, fsck-clean.
    c.transfer_leader(leader, victim)?;
    wait_until("the rebuilt node to lead", WAIT, || {
        Ok((c.leader() == Some(victim)).then_some(()))
    })?;
    push_commits(&work, &url, 1, "on-rebuilt-leader")?;
    let expected = git.remote_refs(&url)?;
    ensure!(
        expected.get("refs/heads/main") == Some(&work.head()?),
        "{expected:?}"
    );
    let clone = git.clone_repo(&url, git.scratch("clone"), &["-q"])?;
    assert_clone_matches(&clone, &expected)?;
    ensure!(clone.run(["rev-list", "--count", "HEAD"])? == "7");
    c.wait_converged(WAIT)?;
    Ok(())
}
