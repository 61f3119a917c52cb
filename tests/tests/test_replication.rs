//! A replicated cluster (`cairn dev --nodes 3`: three storage-node
//! processes holding one shard as a Raft group, and a router process)
//! driven by the real git client while nodes are SIGKILLed and restarted.
//! Every push git reports as accepted must be there afterwards, on a clone
//! that is fsck-clean.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use cairn_tests::*;

/// Pushes `main` until git reports success, for at most `limit`.
fn push_until_accepted(work: &Repo, url: &str, limit: Duration) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let out = work.cmd().args(["push", "-q", url, "main"]).output()?;
        if out.success() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            bail!("push not accepted within {limit:?}: {}", out.stderr);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn pushes_survive_killing_any_node_and_restarted_nodes_catch_up() -> Result<()> {
    let mut c = Cluster::start_with_nodes(3)?;
    let git = Git::new()?;
    let full = c.new_repo("repl")?;
    let url = c.repo_url(&full);
    let work = git.init(git.scratch("work"))?;
    work.commit_n("a.txt", 3, "base")?;
    push_until_accepted(&work, &url, Duration::from_secs(20))?;

    let mut failovers = Vec::new();
    // Each round kills a different node; the push after it needs the node
    // restarted in the previous round, so that node must have caught up
    // (including the pack it missed) to form the quorum.
    for round in 0..3u64 {
        let victim = round + 1;
        c.kill_node(victim)?;
        work.commit_n("a.txt", 1, &format!("round{round}"))?;
        let took = push_until_accepted(&work, &url, Duration::from_secs(30))?;
        failovers.push(took);
        c.restart_node(victim)?;
        // A push with every node back, so the restarted one applies it too.
        work.commit_n("b.txt", 1, &format!("after{round}"))?;
        push_until_accepted(&work, &url, Duration::from_secs(30))?;
    }
    eprintln!("push accepted after node kill: {failovers:?}");

    let clone = git.clone_repo(&url, git.scratch("clone"), &[])?;
    clone.assert_fsck_clean()?;
    let tip = work.head()?;
    ensure!(
        clone.head()? == tip,
        "clone has {} not {tip}",
        clone.head()?
    );
    let server = git.remote_refs(&url)?;
    ensure!(
        server.get("refs/heads/main") == Some(&tip),
        "server main {:?}",
        server.get("refs/heads/main")
    );
    Ok(())
}
