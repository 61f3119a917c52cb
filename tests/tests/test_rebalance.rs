//! Growing, draining and rebalancing a sharded cluster (`cairn dev --nodes 3
//! --shards 4`) with the operator CLI, while the real git client keeps
//! pushing and fetching: `cairn node add`, `cairn shard rebalance`,
//! `cairn node drain|remove`, and a `cairn shard move` whose mover is
//! SIGKILLed halfway and that is then run again to completion.
//!
//! Layouts are checked through the `Cluster.ClusterStatus` RPC (and the
//! nodes' own `Admin.ShardStatus`), repositories through fresh clones that
//! must carry exactly the refs pushed and be `git fsck --full` clean, and
//! replica contents with `cairn shard verify`. Timings are printed, never
//! asserted.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context};
use cairn_tests::*;

const SHARDS: u64 = 4;
/// Time for the cluster to settle (elections, a restarted node rejoining).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Limit of one git command of the background traffic.
const TRAFFIC_GIT_TIMEOUT: Duration = Duration::from_secs(90);

/// One test of this file at a time: each runs a cluster of five or six
/// processes plus git clients.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

fn sharded(fault_injection: bool, env: Vec<(String, String)>) -> Result<Cluster> {
    Cluster::start_with(ClusterOptions {
        nodes: 3,
        shards: Some(SHARDS),
        fault_injection,
        env,
    })
}

/// A CLI's stderr without the backtrace anyhow appends when
/// `RUST_BACKTRACE` is set.
fn without_backtrace(stderr: &str) -> &str {
    stderr
        .split("\nStack backtrace:")
        .next()
        .unwrap_or_default()
        .trim_end()
}

fn text(o: &std::process::Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).trim_end(),
        without_backtrace(&String::from_utf8_lossy(&o.stderr))
    )
}

/// Runs `cairn ARGS --data-dir DATA`, requiring exit 0; returns stdout.
fn cli_ok(c: &Cluster, args: &[&str]) -> Result<String> {
    let t = Instant::now();
    let o = c.cli(args)?;
    println!(
        "$ cairn {} ({:.1?})\n{}",
        args.join(" "),
        t.elapsed(),
        String::from_utf8_lossy(&o.stdout).trim_end()
    );
    ensure!(
        o.status.success(),
        "`cairn {}` failed: {}",
        args.join(" "),
        text(&o)
    );
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// The refs of a local repository the seeding pushed: branches and tags.
fn pushed_refs(work: &Repo) -> Result<BTreeMap<String, String>> {
    Ok(work
        .refs()?
        .into_iter()
        .filter(|(k, _)| k.starts_with("refs/heads/") || k.starts_with("refs/tags/"))
        .collect())
}

/// Creates `full` and pushes a history to it: `main` of a few generated
/// commits over several files, a `topic` branch and an annotated tag.
/// Returns the refs pushed.
fn seed_repo(c: &Cluster, git: &Git, full: &str, seed: u64) -> Result<BTreeMap<String, String>> {
    c.create_repo(full)?;
    let work = git.init(git.scratch("seed"))?;
    let mut gen = HistoryGen::new(seed, 5, 40);
    gen.import(&work, "main", 5)?;
    work.run(["reset", "-q", "--hard", "main"])?;
    work.run(["branch", "topic", "main~2"])?;
    work.run(["tag", "-a", "v1", "-m", "release v1", "main~1"])?;
    work.commit_n("notes.txt", 2, "notes")?;
    work.cmd()
        .args([
            "push",
            "-q",
            &c.repo_url(full),
            "refs/heads/*:refs/heads/*",
            "refs/tags/*:refs/tags/*",
        ])
        .ok()?;
    pushed_refs(&work)
}

/// Creates `workspaces` new workspaces (in order, so on consecutive
/// shards) with `per_workspace` seeded repositories each; returns
/// `full name → refs pushed`, in creation order.
fn seed_workspaces(
    c: &Cluster,
    git: &Git,
    workspaces: usize,
    per_workspace: usize,
) -> Result<Vec<(String, BTreeMap<String, String>)>> {
    let mut repos = Vec::new();
    for w in 0..workspaces {
        let ws = unique_name("ws");
        for r in 0..per_workspace {
            let full = format!("{ws}/{}", unique_name("repo"));
            let refs = seed_repo(c, git, &full, (w * 10 + r) as u64 + 1)?;
            repos.push((full, refs));
        }
    }
    Ok(repos)
}

/// Requires a fresh clone of every repository (through the router) to
/// hold exactly the expected refs, `git ls-remote` to list them, and the
/// clone to be fsck-clean.
fn check_repos(c: &Cluster, git: &Git, repos: &[(String, BTreeMap<String, String>)]) -> Result<()> {
    for (full, expected) in repos {
        let url = c.repo_url(full);
        let listed = git.remote_refs(&url)?;
        let listed: BTreeMap<String, String> =
            listed.into_iter().filter(|(k, _)| k != "HEAD").collect();
        ensure!(
            &listed == expected,
            "{full}: ls-remote differs from what was pushed:\n listed:   {listed:?}\n expected: \
             {expected:?}"
        );
        let clone = git
            .clone_repo(&url, git.scratch("check"), &[])
            .with_context(|| format!("clone {full}"))?;
        assert_clone_matches(&clone, expected).with_context(|| format!("clone of {full}"))?;
    }
    println!(
        "{} repositories clone with the refs pushed, fsck-clean",
        repos.len()
    );
    Ok(())
}

/// `cairn shard verify S` must succeed for every shard.
fn verify_shards(c: &Cluster, shards: impl IntoIterator<Item = u64>) -> Result<()> {
    for s in shards {
        cli_ok(c, &["shard", "verify", &s.to_string()])?;
    }
    Ok(())
}

/// The shards node `node` itself reports holding a replica of.
fn shards_on_node(c: &Cluster, node: u64) -> Result<BTreeSet<u64>> {
    Ok(c.shard_status(node)?.iter().map(|r| r.shard_id).collect())
}

/// Waits until `check` accepts a `ClusterStatus` answer; on timeout the
/// error carries the last answer and the last complaint.
fn wait_status(
    c: &Cluster,
    what: &str,
    timeout: Duration,
    mut check: impl FnMut(&ClusterStatusResponse) -> Result<()>,
) -> Result<ClusterStatusResponse> {
    let mut last = String::from("no answer yet");
    let res = wait_until(what, timeout, || match c.cluster_status_any() {
        Ok(s) => match check(&s) {
            Ok(()) => Ok(Some(s)),
            Err(e) => {
                last = format!("{e:#}\n{}", describe_cluster_status(&s));
                Ok(None)
            }
        },
        Err(e) => {
            last = format!("{e:#}");
            Ok(None)
        }
    });
    res.with_context(|| format!("last seen: {last}"))
}

/// A settled shard: known leader, exactly `replication` voters on distinct
/// nodes that all answer as leader or follower, no learner, no move, and
/// the directory's placement equal to the voters.
fn check_shard_settled(s: &ShardReport) -> Result<()> {
    let id = shard_id_of(s);
    let voters: BTreeSet<u64> = s.voters.iter().copied().collect();
    ensure!(
        s.voters.len() == 3 && voters.len() == 3,
        "shard {id}: voters {:?}, expected 3 distinct nodes",
        s.voters
    );
    ensure!(
        s.learners.is_empty(),
        "shard {id}: learners {:?}",
        s.learners
    );
    ensure!(
        s.moving.is_empty(),
        "shard {id}: move under way {:?}",
        s.moving
    );
    ensure!(
        s.leader_id != 0 && voters.contains(&s.leader_id),
        "shard {id}: leader {} is not one of the voters {voters:?}",
        s.leader_id
    );
    let placement: BTreeSet<u64> = s
        .placement
        .as_ref()
        .map(|p| p.replicas.iter().copied().collect())
        .unwrap_or_default();
    ensure!(
        placement == voters,
        "shard {id}: the directory places it on {placement:?}, the voters are {voters:?}"
    );
    for r in &s.replicas {
        ensure!(
            voters.contains(&r.node_id) && (r.role == "leader" || r.role == "follower"),
            "shard {id}: replica on node {} is {} {}",
            r.node_id,
            r.role,
            r.error
        );
    }
    ensure!(
        s.replicas.len() == 3,
        "shard {id}: {} replicas reported",
        s.replicas.len()
    );
    Ok(())
}

/// Every node's own view: it holds a replica of exactly the shards whose
/// voters name it (a moved-away replica was deleted).
fn check_nodes_hold_their_voters(
    c: &Cluster,
    status: &ClusterStatusResponse,
    nodes: &[u64],
) -> Result<()> {
    for &n in nodes {
        let expected: BTreeSet<u64> = status
            .shards
            .iter()
            .filter(|s| s.voters.contains(&n))
            .map(shard_id_of)
            .collect();
        let held = shards_on_node(c, n)?;
        ensure!(
            held == expected,
            "node {n} reports replicas of shards {held:?}, it is a voter of {expected:?}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Background git traffic
// ---------------------------------------------------------------------------

/// Git clients, one thread per repository, that until stopped alternately
/// push a fast-forward commit to `main` and fetch into a second clone,
/// checking the fetched tip is the commit just pushed. Every failure is
/// recorded with the git output.
struct Traffic {
    stop: StopOnDrop,
    ops: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    handles: Vec<thread::JoinHandle<Result<(String, String)>>>,
}

impl Traffic {
    fn start(c: &Cluster, git: &Git, repos: &[String]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let started = Instant::now();
        let handles = repos
            .iter()
            .map(|full| {
                let (stop, ops, failures) = (stop.clone(), ops.clone(), failures.clone());
                let (full, url, git) = (full.clone(), c.repo_url(full), git.clone());
                thread::spawn(move || -> Result<(String, String)> {
                    let fail = |what: String| {
                        let line = format!(
                            "{full} at {} UTC (+{:.1?}): {what}",
                            utc_time_of_day(),
                            started.elapsed()
                        );
                        println!("TRAFFIC FAILURE {line}");
                        failures
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(line);
                    };
                    let work = git.clone_repo(&url, git.scratch("traffic-work"), &[])?;
                    let reader = git.clone_repo(&url, git.scratch("traffic-read"), &[])?;
                    let mut last = work.head()?;
                    let mut n = 0usize;
                    while !stop.load(Ordering::SeqCst) {
                        n += 1;
                        let file = format!("traffic/f{}.txt", n % 3);
                        let commit = work.commit_file(
                            &file,
                            &format!("traffic change {n}\n"),
                            &format!("traffic {n}"),
                        )?;
                        let pushed = work
                            .cmd()
                            .args(GIT_HTTP_STALL_LIMITS)
                            .args(["push", "-q", "origin", "HEAD:refs/heads/main"])
                            .timeout(TRAFFIC_GIT_TIMEOUT)
                            .output();
                        match pushed {
                            Ok(o) if o.success() => {
                                last = commit;
                                ops.fetch_add(1, Ordering::SeqCst);
                            }
                            Ok(o) => fail(format!("push of {commit} failed: {o}")),
                            Err(e) => fail(format!("push of {commit}: {e:#}")),
                        }
                        let fetched = reader
                            .cmd()
                            .args(GIT_HTTP_STALL_LIMITS)
                            .args(["fetch", "-q", "origin"])
                            .timeout(TRAFFIC_GIT_TIMEOUT)
                            .output();
                        match fetched {
                            Ok(o) if o.success() => {
                                let tip = reader.rev_parse("refs/remotes/origin/main")?;
                                if tip == last {
                                    ops.fetch_add(1, Ordering::SeqCst);
                                } else {
                                    fail(format!(
                                        "fetch after pushing {last} got main at {tip}: {o}"
                                    ));
                                }
                            }
                            Ok(o) => fail(format!("fetch failed: {o}")),
                            Err(e) => fail(format!("fetch: {e:#}")),
                        }
                    }
                    Ok((full, last))
                })
            })
            .collect();
        Self {
            stop: StopOnDrop(stop),
            ops,
            failures,
            handles,
        }
    }

    /// Successful operations (pushes and checked fetches) so far.
    fn ops(&self) -> usize {
        self.ops.load(Ordering::SeqCst)
    }

    fn wait_ops(&self, more: usize, timeout: Duration) -> Result<()> {
        let target = self.ops() + more;
        wait_until(&format!("{more} more git operations"), timeout, || {
            Ok((self.ops() >= target).then_some(()))
        })
        .with_context(|| format!("failures so far: {:?}", self.failures()))
    }

    fn failures(&self) -> Vec<String> {
        self.failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Stops the clients after their current operation; returns each
    /// repository's last pushed `main`.
    fn finish(self) -> Result<BTreeMap<String, String>> {
        drop(self.stop);
        self.handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("traffic thread panicked"))?)
            .collect()
    }
}

// ---------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------

#[test]
fn rebalance_onto_a_new_node_under_git_traffic() -> Result<()> {
    let _serial = one_at_a_time();
    let t0 = Instant::now();
    let mut c = sharded(false, Vec::new())?;
    let git = Git::new()?;

    let mut repos = seed_workspaces(&c, &git, 4, 2)?;
    let status = c.cluster_status_any()?;
    let on: BTreeSet<Option<u64>> = repos
        .iter()
        .map(|(full, _)| shard_of_repo(&status, full))
        .collect();
    ensure!(
        on == (1..=SHARDS).map(Some).collect(),
        "4 workspaces should spread over the 4 shards, their repositories are on {on:?}\n{}",
        describe_cluster_status(&status)
    );
    println!("seeded {} repositories ({:.1?})", repos.len(), t0.elapsed());

    // Traffic on the first repository of three workspaces (three shards).
    let traffic_repos: Vec<String> = repos
        .iter()
        .step_by(2)
        .take(3)
        .map(|r| r.0.clone())
        .collect();
    let traffic = Traffic::start(&c, &git, &traffic_repos);
    traffic.wait_ops(3, Duration::from_secs(60))?;

    c.add_node(4)?;
    let before = traffic.ops();
    let t = Instant::now();
    let out = c.cli(&["shard", "rebalance"])?;
    let during = traffic.ops() - before;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    println!(
        "$ cairn shard rebalance ({:.1?}, {during} git operations meanwhile)\n{}",
        t.elapsed(),
        stdout.trim_end()
    );
    ensure!(
        out.status.success(),
        "cairn shard rebalance failed: {}\ngit traffic failures so far: {:#?}",
        text(&out),
        traffic.failures()
    );
    ensure!(
        stdout.contains("plan (") && stdout.contains("move shard") && stdout.contains("after:"),
        "the rebalance output lacks a plan with moves or the after: summary:\n{stdout}"
    );

    traffic.wait_ops(6, Duration::from_secs(60))?;
    let failures = traffic.failures();
    let total_ops = traffic.ops();
    let last_pushed = traffic.finish()?;
    println!(
        "git traffic: {total_ops} operations, {} failed",
        failures.len()
    );
    ensure!(
        failures.is_empty(),
        "{} git operations failed during the rebalance:\n{}",
        failures.len(),
        failures.join("\n")
    );
    ensure!(
        during >= 3,
        "only {during} git operations completed while the rebalance ran"
    );

    let status = wait_status(&c, "the rebalanced layout", SETTLE_TIMEOUT, |s| {
        for shard in &s.shards {
            check_shard_settled(shard)?;
        }
        let per_node = voters_per_node(s);
        ensure!(
            per_node == (1..=4).map(|n| (n, 3)).collect(),
            "voters per node {per_node:?}, expected 3 on each of nodes 1-4"
        );
        Ok(())
    })?;
    print!("{}", describe_cluster_status(&status));
    check_nodes_hold_their_voters(&c, &status, &[1, 2, 3, 4])?;

    for (full, refs) in &mut repos {
        if let Some(tip) = last_pushed.get(full) {
            refs.insert("refs/heads/main".into(), tip.clone());
        }
    }
    check_repos(&c, &git, &repos)?;
    verify_shards(&c, 1..=SHARDS)?;
    println!("test took {:.1?}", t0.elapsed());
    Ok(())
}

#[test]
fn draining_a_node_moves_everything_away_and_removing_it_loses_nothing() -> Result<()> {
    let _serial = one_at_a_time();
    let t0 = Instant::now();
    let mut c = sharded(false, Vec::new())?;
    let git = Git::new()?;
    let mut repos = seed_workspaces(&c, &git, 4, 1)?;
    c.add_node(4)?;

    let out = cli_ok(&c, &["node", "drain", "2"])?;
    ensure!(out.contains("draining"), "drain output:\n{out}");

    let status = wait_status(&c, "node 2 drained", SETTLE_TIMEOUT, |s| {
        ensure!(
            directory_node_state(s, 2) == Some(DirectoryNodeState::Draining),
            "node 2 is {:?}",
            directory_node_state(s, 2)
        );
        // Node 2 was one of the three meta nodes: the directory moved too.
        let meta = shard_report(s, 0)?;
        check_shard_settled(meta)?;
        let meta_voters: BTreeSet<u64> = meta.voters.iter().copied().collect();
        ensure!(
            meta_voters == BTreeSet::from([1, 3, 4]),
            "meta group on {meta_voters:?}"
        );
        for shard in &s.shards {
            check_shard_settled(shard)?;
            ensure!(
                !shard.voters.contains(&2) && shard.replicas.iter().all(|r| r.node_id != 2),
                "shard {} still has a replica on node 2",
                shard_id_of(shard)
            );
        }
        Ok(())
    })?;
    print!("{}", describe_cluster_status(&status));
    let held = c.groups_on_node(2)?;
    ensure!(
        held.is_empty(),
        "drained node 2 still reports replicas of groups {held:?}"
    );
    ensure!(
        c.groups_on_node(4)?.contains(&0),
        "node 4 does not report a meta replica"
    );
    check_nodes_hold_their_voters(&c, &status, &[1, 3, 4])?;

    // Node 3 still holds replicas: removing it is refused.
    let o = c.cli(&["node", "remove", "3"])?;
    println!("$ cairn node remove 3\n{}", text(&o));
    ensure!(
        !o.status.success(),
        "removing node 3, which holds replicas, succeeded"
    );
    let s = c.cluster_status_any()?;
    ensure!(
        directory_node_state(&s, 3) == Some(DirectoryNodeState::Active),
        "node 3 is {:?} after the refused removal",
        directory_node_state(&s, 3)
    );

    let out = cli_ok(&c, &["node", "remove", "2"])?;
    ensure!(out.contains("removed"), "remove output:\n{out}");
    let s = c.cluster_status_any()?;
    ensure!(
        directory_node_state(&s, 2) == Some(DirectoryNodeState::Removed),
        "node 2 is {:?} after its removal",
        directory_node_state(&s, 2)
    );
    c.kill_node(2)?;

    // The same status for tools: node 2 removed, no shard lists it, and
    // every repository is on one shard.
    let json: serde_json::Value =
        serde_json::from_str(&cli_ok(&c, &["cluster", "status", "--json"])?)
            .context("cluster status --json is JSON")?;
    let node2 = json["nodes"]
        .as_array()
        .and_then(|n| n.iter().find(|n| n["id"] == 2))
        .ok_or_else(|| anyhow!("node 2 missing from {json}"))?;
    ensure!(node2["state"] == "removed", "node 2 in JSON: {node2}");
    let shards = json["shards"]
        .as_array()
        .ok_or_else(|| anyhow!("no shards: {json}"))?;
    ensure!(shards.len() == SHARDS as usize, "shards in JSON: {json}");
    let meta_voters = json["meta"]["voters"]
        .as_array()
        .ok_or_else(|| anyhow!("no meta group in JSON: {json}"))?;
    ensure!(
        meta_voters.len() == 3 && !meta_voters.contains(&2.into()),
        "meta group after drain: {}",
        json["meta"]
    );
    for sh in shards {
        let voters = sh["voters"]
            .as_array()
            .ok_or_else(|| anyhow!("voters: {sh}"))?;
        ensure!(
            voters.len() == 3 && !voters.contains(&2.into()),
            "shard after drain: {sh}"
        );
        ensure!(sh["leader"].is_u64(), "shard without leader: {sh}");
    }
    let listed: usize = shards
        .iter()
        .map(|sh| sh["repos"].as_array().map_or(0, Vec::len))
        .sum();
    ensure!(
        listed == repos.len(),
        "{listed} repositories in JSON, {} created",
        repos.len()
    );

    check_repos(&c, &git, &repos)?;
    // A new push to every workspace's repository, with node 2 gone.
    for (full, refs) in &mut repos {
        let url = c.repo_url(full);
        let work = git.clone_repo(&url, git.scratch("after"), &[])?;
        let tip = work.commit_file("after-drain.txt", "pushed after node 2 left\n", "after")?;
        work.cmd()
            .args(["push", "-q", "origin", "HEAD:refs/heads/main"])
            .ok()
            .with_context(|| format!("push to {full} after removing node 2"))?;
        refs.insert("refs/heads/main".into(), tip);
    }
    check_repos(&c, &git, &repos)?;
    verify_shards(&c, 1..=SHARDS)?;

    // Nothing depends on node 2 any more: with node 1 down as well, the
    // directory (had it stayed on 1, 2, 3) would have lost its majority.
    // A new workspace is a directory write; its repository takes a push.
    c.kill_node(1)?;
    let full = format!("{}/{}", unique_name("ws"), unique_name("repo"));
    let refs = seed_repo(&c, &git, &full, 99).context("a new workspace with nodes 1 and 2 down")?;
    repos.push((full, refs));
    check_repos(&c, &git, &repos)?;
    c.restart_node(1)?;

    // Node 4's meta replica came by a move; a restart opens it again.
    c.kill_node(4)?;
    c.restart_node(4)?;
    let status = wait_status(&c, "nodes 1 and 4 back", SETTLE_TIMEOUT, |s| {
        let meta = shard_report(s, 0)?;
        check_shard_settled(meta)?;
        for shard in &s.shards {
            check_shard_settled(shard)?;
        }
        Ok(())
    })?;
    print!("{}", describe_cluster_status(&status));
    ensure!(
        c.groups_on_node(4)?.contains(&0),
        "node 4 lost its meta replica in a restart"
    );
    check_repos(&c, &git, &repos)?;
    verify_shards(&c, 0..=SHARDS)?;
    println!("test took {:.1?}", t0.elapsed());
    Ok(())
}

/// Reads a child's stdout lines into a channel (until EOF).
fn line_reader(stdout: std::process::ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Runs `cairn ARGS` on node `node` (which runs the move there), SIGKILLs
/// that node once the move prints its learner step, and waits for the CLI
/// to exit; returns its exit status and every line it printed.
fn kill_mover_halfway(
    c: &mut Cluster,
    node: u64,
    args: &[&str],
) -> Result<(std::process::ExitStatus, Vec<String>)> {
    let mut mover = c.spawn_cli_at(node, args)?;
    let lines = line_reader(mover.stdout.take().ok_or_else(|| anyhow!("no stdout"))?);
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                println!("mover: {line}");
                let halfway = line.contains("learner") || line.contains("catch-up");
                seen.push(line);
                if halfway {
                    break;
                }
            }
            Err(e) => {
                let _ = mover.kill();
                let o = mover.wait_with_output()?;
                bail!(
                    "the move never reached the learner step ({e}); printed {seen:?}, {}",
                    text(&o)
                );
            }
        }
    }
    c.kill_node(node)?;
    println!(
        "killed node {node} (the mover) at {} UTC",
        utc_time_of_day()
    );
    let exited = wait_until("the move CLI to exit", Duration::from_secs(60), || {
        Ok(mover.try_wait()?)
    });
    let exit = match exited {
        Ok(s) => s,
        Err(e) => {
            let _ = mover.kill();
            let _ = mover.wait();
            return Err(e);
        }
    };
    seen.extend(lines.try_iter());
    let mut stderr = String::new();
    if let Some(mut e) = mover.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
    }
    println!(
        "interrupted move exited with {exit}: {seen:?}\n{}",
        without_backtrace(&stderr)
    );
    Ok((exit, seen))
}

#[test]
fn a_move_interrupted_by_killing_its_mover_completes_when_run_again() -> Result<()> {
    let _serial = one_at_a_time();
    let t0 = Instant::now();
    let mut c = sharded(
        true,
        vec![("CAIRN_MOVE_STEP_PAUSE_MS".into(), "1500".into())],
    )?;
    let git = Git::new()?;
    // The first workspace created lands on shard 1.
    let mut repos = seed_workspaces(&c, &git, 1, 2)?;
    let status = c.cluster_status_any()?;
    for (full, _) in &repos {
        ensure!(
            shard_of_repo(&status, full) == Some(1),
            "{full} is on shard {:?}, expected 1\n{}",
            shard_of_repo(&status, full),
            describe_cluster_status(&status)
        );
    }
    c.add_node(4)?;

    // Node 1 runs the move (it also leads the meta group and the shards).
    let (exit, seen) = kill_mover_halfway(
        &mut c,
        1,
        &["shard", "move", "1", "--from", "2", "--to", "4"],
    )?;
    ensure!(
        !exit.success() || !seen.iter().any(|l| l.trim_start().starts_with("done")),
        "the move finished although its mover was killed: {seen:?}"
    );

    // Nodes 2 and 3 carry on without the mover: they elect leaders of the
    // meta group and of shard 1, and the directory still records the move.
    let status = wait_status(&c, "nodes 2 and 3 to take over", SETTLE_TIMEOUT, |s| {
        ensure!(
            s.meta_leader == 2 || s.meta_leader == 3,
            "meta leader {}",
            s.meta_leader
        );
        let shard = shard_report(s, 1)?;
        ensure!(
            shard.leader_id == 2 || shard.leader_id == 3,
            "shard 1 leader {}",
            shard.leader_id
        );
        ensure!(
            shard.moving == "2 -> 4",
            "shard 1 moving {:?}",
            shard.moving
        );
        Ok(())
    })?;
    print!("node 1 down: {}", describe_cluster_status(&status));

    c.restart_node(1)?;
    let status = wait_status(
        &c,
        "the cluster to serve with node 1 back",
        SETTLE_TIMEOUT,
        |s| {
            let shard = shard_report(s, 1)?;
            ensure!(shard.leader_id != 0, "shard 1 has no leader");
            ensure!(
                shard
                    .replicas
                    .iter()
                    .any(|r| r.node_id == 1 && r.role != "unreachable"),
                "node 1 does not serve shard 1 yet"
            );
            Ok(())
        },
    )?;
    print!("halfway: {}", describe_cluster_status(&status));
    let shard = shard_report(&status, 1)?;
    ensure!(
        shard.moving == "2 -> 4",
        "the interrupted move is not recorded: moving {:?}",
        shard.moving
    );
    ensure!(
        shard.voters.contains(&2) && (shard.learners.contains(&4) || shard.voters.contains(&4)),
        "shard 1 halfway: voters {:?} learners {:?}, expected node 2 still a voter and node 4 \
         joining",
        shard.voters,
        shard.learners
    );

    let out = cli_ok(&c, &["shard", "move", "1", "--from", "2", "--to", "4"])?;
    ensure!(
        out.contains("resuming") && out.lines().any(|l| l.trim_start().starts_with("done")),
        "the second run did not resume and finish the move:\n{out}"
    );

    let status = wait_status(&c, "shard 1 on nodes 1, 3, 4", SETTLE_TIMEOUT, |s| {
        let shard = shard_report(s, 1)?;
        check_shard_settled(shard)?;
        let voters: BTreeSet<u64> = shard.voters.iter().copied().collect();
        ensure!(
            voters == BTreeSet::from([1, 3, 4]),
            "shard 1 voters {voters:?}"
        );
        Ok(())
    })?;
    print!("{}", describe_cluster_status(&status));
    let held = shards_on_node(&c, 2)?;
    ensure!(
        !held.contains(&1),
        "node 2 still reports a replica of shard 1 (it holds {held:?})"
    );
    check_nodes_hold_their_voters(&c, &status, &[1, 2, 3, 4])?;

    check_repos(&c, &git, &repos)?;
    // Writes go through the new membership too.
    let (full, refs) = &mut repos[0];
    let work = git.clone_repo(&c.repo_url(full), git.scratch("after"), &[])?;
    let tip = work.commit_file("after-move.txt", "pushed after the move\n", "after")?;
    work.cmd()
        .args(["push", "-q", "origin", "HEAD:refs/heads/main"])
        .ok()?;
    refs.insert("refs/heads/main".into(), tip);
    check_repos(&c, &git, &repos)?;
    verify_shards(&c, [1])?;
    println!("test took {:.1?}", t0.elapsed());
    Ok(())
}

#[test]
fn a_meta_group_move_interrupted_by_killing_its_leader_finishes_from_another_node() -> Result<()> {
    let _serial = one_at_a_time();
    let t0 = Instant::now();
    let mut c = sharded(
        true,
        vec![("CAIRN_MOVE_STEP_PAUSE_MS".into(), "1500".into())],
    )?;
    let git = Git::new()?;
    let mut repos = seed_workspaces(&c, &git, 1, 1)?;
    c.add_node(4)?;

    // Node 1 runs the move of its own meta replica, which leads the group.
    let (_, seen) = kill_mover_halfway(
        &mut c,
        1,
        &["shard", "move", "meta", "--from", "1", "--to", "4"],
    )?;
    ensure!(
        !seen.iter().any(|l| l.trim_start().starts_with("done")),
        "the move finished although its mover was killed: {seen:?}"
    );

    // The directory carries on on nodes 2 and 3 and remembers the move.
    let status = wait_status(
        &c,
        "nodes 2 and 3 to lead the directory",
        SETTLE_TIMEOUT,
        |s| {
            let meta = shard_report(s, 0)?;
            ensure!(
                meta.leader_id == 2 || meta.leader_id == 3,
                "meta leader {}",
                meta.leader_id
            );
            ensure!(meta.moving == "1 -> 4", "meta moving {:?}", meta.moving);
            Ok(())
        },
    )?;
    print!("node 1 down: {}", describe_cluster_status(&status));

    // Run again from node 3 while node 1 is still down: it finishes.
    let o = c.cli_at(3, &["shard", "move", "meta", "--from", "1", "--to", "4"])?;
    println!(
        "$ cairn shard move meta --from 1 --to 4 (on node 3)\n{}",
        text(&o)
    );
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    ensure!(
        o.status.success()
            && out.contains("resuming")
            && out.lines().any(|l| l.trim_start().starts_with("done")),
        "the second run did not resume and finish the move:\n{}",
        text(&o)
    );
    let status = wait_status(&c, "the meta group on nodes 2, 3, 4", SETTLE_TIMEOUT, |s| {
        let meta = shard_report(s, 0)?;
        check_shard_settled(meta)?;
        let voters: BTreeSet<u64> = meta.voters.iter().copied().collect();
        ensure!(
            voters == BTreeSet::from([2, 3, 4]),
            "meta voters {voters:?}"
        );
        Ok(())
    })?;
    print!("{}", describe_cluster_status(&status));

    // Directory writes work in the new membership (a new workspace).
    let full = format!("{}/{}", unique_name("ws"), unique_name("repo"));
    let refs = seed_repo(&c, &git, &full, 7)?;
    repos.push((full, refs));
    check_repos(&c, &git, &repos)?;

    // Node 1 comes back with a copy it was not there to delete; running
    // the move once more deletes it.
    c.restart_node(1)?;
    wait_until("node 1 to answer", SETTLE_TIMEOUT, || {
        Ok(c.groups_on_node(1).ok())
    })?;
    let out = cli_ok(&c, &["shard", "move", "meta", "--from", "1", "--to", "4"])?;
    ensure!(
        out.contains("replica on node 1 deleted"),
        "the third run did not delete node 1's copy:\n{out}"
    );
    let held = c.groups_on_node(1)?;
    ensure!(
        !held.contains(&0),
        "node 1 still holds a meta replica ({held:?})"
    );
    ensure!(
        c.groups_on_node(4)?.contains(&0),
        "node 4 holds no meta replica"
    );
    let status = wait_status(&c, "a settled cluster", SETTLE_TIMEOUT, |s| {
        check_shard_settled(shard_report(s, 0)?)?;
        for shard in &s.shards {
            check_shard_settled(shard)?;
        }
        Ok(())
    })?;
    print!("{}", describe_cluster_status(&status));
    check_repos(&c, &git, &repos)?;
    verify_shards(&c, 0..=SHARDS)?;
    println!("test took {:.1?}", t0.elapsed());
    Ok(())
}

#[test]
fn cairn_dev_with_more_nodes_grows_the_local_cluster() -> Result<()> {
    let _serial = one_at_a_time();
    let t0 = Instant::now();
    let mut c = sharded(false, Vec::new())?;
    let git = Git::new()?;
    let repos = seed_workspaces(&c, &git, 2, 1)?;

    // The same folder with `--nodes 4`: node 4 starts empty and joins.
    c.restart_with_nodes(4)?;
    ensure!(
        c.log_tail().contains("node 4 joined the cluster"),
        "cairn dev did not report node 4 joining:\n{}",
        c.log_tail()
    );
    let status = wait_status(&c, "node 4 registered", SETTLE_TIMEOUT, |s| {
        ensure!(
            directory_node_state(s, 4) == Some(DirectoryNodeState::Active),
            "node 4 is {:?}",
            directory_node_state(s, 4)
        );
        for shard in &s.shards {
            check_shard_settled(shard)?;
        }
        Ok(())
    })?;
    ensure!(
        c.groups_on_node(4)?.is_empty(),
        "the joining node opened replicas of its own"
    );
    print!("{}", describe_cluster_status(&status));

    let out = cli_ok(&c, &["shard", "rebalance"])?;
    ensure!(
        out.contains("node 4"),
        "rebalance gave node 4 nothing:\n{out}"
    );
    let status = wait_status(&c, "the rebalanced layout", SETTLE_TIMEOUT, |s| {
        for shard in &s.shards {
            check_shard_settled(shard)?;
        }
        let per_node = voters_per_node(s);
        ensure!(
            per_node == (1..=4).map(|n| (n, 3)).collect(),
            "voters per node {per_node:?}, expected 3 on each of nodes 1-4"
        );
        Ok(())
    })?;
    check_nodes_hold_their_voters(&c, &status, &[1, 2, 3, 4])?;
    check_repos(&c, &git, &repos)?;

    // Restarted once more, node 4 is a member like the others.
    c.restart_with_nodes(4)?;
    wait_status(
        &c,
        "the cluster back after a restart",
        SETTLE_TIMEOUT,
        |s| {
            for shard in &s.shards {
                check_shard_settled(shard)?;
            }
            ensure!(
                voters_per_node(s) == (1..=4).map(|n| (n, 3)).collect(),
                "voters per node {:?}",
                voters_per_node(s)
            );
            Ok(())
        },
    )?;
    check_repos(&c, &git, &repos)?;
    verify_shards(&c, 0..=SHARDS)?;
    println!("test took {:.1?}", t0.elapsed());
    Ok(())
}
