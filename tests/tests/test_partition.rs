//! Network partitions of a replicated cluster (`cairn dev --nodes 3
//! --fault-injection`), cut with the nodes' `Admin.SetFaults`, driven by the
//! real git client. A leader cut off from the majority must not acknowledge
//! a push, the majority must elect another leader and accept pushes, and
//! after healing every replica must converge on the majority's history.

use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context};
use cairn_tests::*;

const LEADER_TIMEOUT: Duration = Duration::from_secs(60);
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(120);

/// Limit of the git push through the isolated leader: long enough for the
/// server to give up on its own; a timeout counts as not acknowledged.
const ISOLATED_PUSH_TIMEOUT: Duration = Duration::from_secs(60);

/// Limit of the push cut off mid-way, which may only end once the
/// partition heals.
const MID_PUSH_TIMEOUT: Duration = Duration::from_secs(180);

/// A receive-pack request creating `ref_name` at a new commit on top of a
/// pusher's last acknowledged commit, carrying a blob of `blob_bytes`
/// incompressible bytes.
struct RawPush {
    ref_name: String,
    commit: String,
    path: String,
    auth: String,
    body: Vec<u8>,
}

impl RawPush {
    fn new(c: &Cluster, base: &BranchPusher, ref_name: &str, blob_bytes: usize) -> Result<Self> {
        let parent = base
            .last_known()
            .ok_or_else(|| anyhow!("the pusher has no acknowledged commit"))?;
        let work = &base.work;
        let mut rng = Rng::new(blob_bytes as u64);
        let data: Vec<u8> = (0..blob_bytes.div_ceil(8))
            .flat_map(|_| rng.next_u64().to_le_bytes())
            .collect();
        let blob = work
            .cmd()
            .args(["hash-object", "-w", "--stdin"])
            .stdin(data)
            .ok()?
            .out()
            .to_owned();
        let tree = work
            .cmd()
            .arg("mktree")
            .stdin(format!("100644 blob {blob}\traw.bin\n"))
            .ok()?
            .out()
            .to_owned();
        let commit = work.run([
            "commit-tree",
            &tree,
            "-p",
            parent,
            "-m",
            &format!("raw push to {ref_name}"),
        ])?;
        let pack = work.pack_objects(&format!("{commit}\n^{parent}\n"), true, false)?;
        let body = receive_pack_body(
            &[RefUpdate::new(ZERO_OID, &commit, ref_name)],
            "report-status agent=cairn-tests",
            &pack,
        );
        let full = base
            .url
            .rsplit_once('@')
            .and_then(|(_, rest)| rest.split_once('/'))
            .map(|(_, path)| path.trim_end_matches(".git").to_owned())
            .ok_or_else(|| anyhow!("unexpected repository URL {}", base.url))?;
        Ok(RawPush {
            ref_name: ref_name.to_owned(),
            commit,
            path: format!("/{full}.git/git-receive-pack"),
            auth: c.basic_auth(),
            body,
        })
    }

    fn request(&self, timeout: Duration) -> HttpRequest<'_> {
        HttpRequest::new("POST", &self.path)
            .header("Authorization", &self.auth)
            .header("Content-Type", "application/x-git-receive-pack-request")
            .header("Accept", "application/x-git-receive-pack-result")
            .body(&self.body)
            .timeout(timeout)
    }

    /// Whether the response acknowledged the ref update; prints it.
    fn acknowledged(&self, result: &Result<HttpResponse>, took: Duration) -> bool {
        match result {
            Ok(r) => {
                let report = PushReport::parse(&r.body);
                println!(
                    "raw push {}: HTTP {} after {took:?}: {:?}",
                    self.ref_name,
                    r.status,
                    report.text.trim()
                );
                r.status == 200 && report.refs.get(&self.ref_name) == Some(&None)
            }
            Err(e) => {
                println!("raw push {}: {e:#} after {took:?}", self.ref_name);
                false
            }
        }
    }
}

#[test]
fn isolated_leader_cannot_acknowledge_and_majority_moves_on() -> Result<()> {
    let started = Instant::now();
    let mut c = Cluster::start_with(ClusterOptions {
        nodes: 3,
        fault_injection: true,
        ..ClusterOptions::default()
    })?;
    let git = Git::new()?;
    let full = c.new_repo("partition")?;
    let url = c.repo_url(&full);

    let mut majority = BranchPusher::new(&git, &url, "main")?;
    majority.push_timeout = Duration::from_secs(30);
    wait_until("a first accepted push", LEADER_TIMEOUT, || {
        Ok(majority.push_next()?.outcome.is_accepted().then_some(()))
    })?;
    // Every replica holds the repository before the cut.
    c.wait_converged(CONVERGE_TIMEOUT)?;

    let old_leader = c.wait_leader(LEADER_TIMEOUT)?;
    let others: Vec<u64> = c
        .node_ids()
        .into_iter()
        .filter(|&n| n != old_leader)
        .collect();
    let lonely = c.start_router(&[old_leader])?;
    let lonely_url = c.repo_url_at(&lonely.http_url, &full);

    // A push the old leader has already begun when the cut comes (its
    // linearizable read done, the pack streaming in). It is larger than
    // what the router reads ahead before calling a node, so the node is at
    // work before the rest of the body is sent.
    let mid = Arc::new(RawPush::new(
        &c,
        &majority,
        "refs/heads/cut-mid-push",
        3 << 20,
    )?);
    let (prefix_sent, on_prefix) = mpsc::channel::<()>();
    let (resume, on_resume) = mpsc::channel::<()>();
    let mid_push = {
        let (mid, url) = (Arc::clone(&mid), lonely.http_url.clone());
        thread::spawn(move || {
            let t = Instant::now();
            let r = mid.request(MID_PUSH_TIMEOUT).send_split(&url, 2 << 20, || {
                let _ = prefix_sent.send(());
                let _ = on_resume.recv_timeout(Duration::from_secs(60));
            });
            (r, t.elapsed())
        })
    };
    let cut_result = on_prefix
        .recv_timeout(Duration::from_secs(60))
        .context("the mid-push request never sent its first part")
        .and_then(|()| {
            thread::sleep(Duration::from_millis(1500));
            c.partition(&[old_leader])
        });
    // Resumed on every path, so the thread always ends.
    let _ = resume.send(());
    cut_result?;
    let cut = Instant::now();
    println!("isolated leader {old_leader} from {others:?}");

    // The real client through the isolated leader: git's ref advertisement
    // needs a linearizable read first.
    let mut isolated = BranchPusher::new(&git, &lonely_url, "isolated")?;
    isolated.push_timeout = ISOLATED_PUSH_TIMEOUT;
    isolated.read_after_failure = false;
    let isolated_push = thread::spawn(move || -> Result<BranchPusher> {
        isolated.push_next()?;
        Ok(isolated)
    });

    let mut majority_accepted = 0;
    let new_leader_push = wait_until(
        "a push accepted by the majority",
        Duration::from_secs(180),
        || {
            let ok = majority.push_next()?.outcome.is_accepted();
            Ok(ok.then(|| cut.elapsed()))
        },
    )
    .with_context(|| {
        format!(
            "replicas: {}; last attempts: {:?}",
            c.describe_all(),
            majority.attempts().iter().rev().take(3).collect::<Vec<_>>()
        )
    })?;
    majority_accepted += 1;
    let new_leader = c.leader();
    println!(
        "majority accepted a push {new_leader_push:?} after the cut; leader now {new_leader:?}"
    );
    ensure!(
        new_leader != Some(old_leader),
        "the isolated node {old_leader} still counts as the established leader: {}",
        c.describe_all()
    );
    for _ in 0..3 {
        if majority.push_next()?.outcome.is_accepted() {
            majority_accepted += 1;
        }
    }

    let isolated = isolated_push
        .join()
        .map_err(|_| anyhow!("isolated push thread panicked"))??;
    let isolated_attempt = isolated
        .attempts()
        .first()
        .ok_or_else(|| anyhow!("no isolated push attempt"))?
        .clone();
    println!(
        "git push through the isolated leader: {:?} after {:?}",
        isolated_attempt.outcome, isolated_attempt.took
    );
    ensure!(
        !isolated_attempt.outcome.is_accepted(),
        "a leader cut off from the majority acknowledged push {}",
        isolated_attempt.commit
    );
    // A log longer than what it applied shows the mid-push entry was
    // appended: the case only the quorum can decide.
    println!(
        "isolated leader before healing: {}",
        c.replica_status(old_leader)
            .map(|r| describe_replicas(&[r]))
            .unwrap_or_else(|e| format!("{e:#}"))
    );

    c.heal()?;
    let healed = Instant::now();
    // The mid-push request may end only once the old leader hears of the
    // new term; whenever it ends, its entry was superseded.
    let (mid_result, mid_took) = mid_push
        .join()
        .map_err(|_| anyhow!("mid-push thread panicked"))?;
    ensure!(
        !mid.acknowledged(&mid_result, mid_took),
        "push {} cut off mid-way from the majority was acknowledged",
        mid.commit
    );
    c.stop_router(&lonely)?;
    let replicas = c.wait_converged(CONVERGE_TIMEOUT)?;
    println!(
        "converged {:?} after healing: {}",
        healed.elapsed(),
        describe_replicas(&replicas)
    );
    // A write after healing, so that the old leader's log is settled by a
    // leader of the new term, and a second convergence over it.
    wait_until("a push after healing", LEADER_TIMEOUT, || {
        Ok(majority.push_next()?.outcome.is_accepted().then_some(()))
    })?;
    majority_accepted += 1;
    let replicas = c.wait_converged(CONVERGE_TIMEOUT)?;
    println!("converged again: {}", describe_replicas(&replicas));

    let clone = git.clone_repo(&url, git.scratch("verify"), &[])?;
    clone.assert_fsck_clean()?;
    let server = git.remote_refs(&url)?;
    ensure!(
        !server.contains_key("refs/heads/isolated"),
        "the isolated push's branch exists: {server:?}"
    );
    ensure!(
        !clone.has_object(&isolated_attempt.commit)?,
        "the isolated push's commit {} is on the server",
        isolated_attempt.commit
    );
    ensure!(
        !server.contains_key(&mid.ref_name) && !clone.has_object(&mid.commit)?,
        "the push cut off mid-way, {}, is on the server: {server:?}",
        mid.commit
    );
    let majority_tally = majority.verify(&clone)?;
    let isolated_tally = isolated.verify(&clone)?;
    println!(
        "majority: {majority_tally} ({majority_accepted} during/after the partition); \
         isolated: {isolated_tally}; took {:?}",
        started.elapsed()
    );
    Ok(())
}

#[test]
fn set_faults_is_refused_without_fault_injection() -> Result<()> {
    let c = Cluster::start_with_nodes(3)?;
    let err = c
        .set_faults(1, &[2])
        .err()
        .ok_or_else(|| anyhow!("SetFaults was accepted on a cluster without fault injection"))?;
    ensure!(
        grpc_code(&err) == Some(tonic::Code::PermissionDenied),
        "expected PERMISSION_DENIED, got {err:#}"
    );
    Ok(())
}
