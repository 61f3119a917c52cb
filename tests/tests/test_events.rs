//! The shard event log end to end: `cairn events tail` as a named
//! consumer, the real git client pushing, storage nodes SIGKILLed.
//!
//! The consumer is a `cairn events tail --consumer` process whose output
//! goes to one file per run; it is killed with the shard leader and started
//! again each round, so it resumes from the cursor the shard replicated.
//! Its runs together must hold the whole log after de-duplication by
//! index, in log order, and the events of each branch must be exactly the
//! moves of that branch: each event's `old` is the previous event's `new`,
//! and the last `new` is the branch's final tip. With that, an
//! acknowledged push has exactly one event, a refused one none, and one of
//! unknown outcome has one exactly when the branch held it.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use cairn_tests::*;
use serde_json::Value;

const LEADER_TIMEOUT: Duration = Duration::from_secs(60);
const REJOIN_TIMEOUT: Duration = Duration::from_secs(90);
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(120);
const ZERO: &str = "0000000000000000000000000000000000000000";

/// One cluster of this file at a time: each is four processes.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `cairn events tail --json` runs of one consumer, each writing its own
/// file.
struct ConsumerRuns {
    dir: PathBuf,
    name: String,
    running: Option<Child>,
    runs: usize,
}

impl ConsumerRuns {
    fn new(dir: &Path, name: &str) -> Result<Self> {
        fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            name: name.to_owned(),
            running: None,
            runs: 0,
        })
    }

    fn command(&self, c: &Cluster, extra: &[&str]) -> Result<Command> {
        let mut cmd = Command::new(cairn_bin()?);
        cmd.args(["events", "tail", "--json", "--consumer", &self.name])
            .args(extra)
            .arg("--data-dir")
            .arg(c.data_dir())
            .stdin(Stdio::null());
        Ok(cmd)
    }

    fn next_file(&mut self, suffix: &str) -> Result<fs::File> {
        let f = fs::File::create(self.dir.join(format!("run-{:03}.{suffix}", self.runs)))?;
        Ok(f)
    }

    /// Starts a run that follows the log until killed.
    fn start(&mut self, c: &Cluster) -> Result<()> {
        ensure!(self.running.is_none(), "a run is going");
        let out = self.next_file("jsonl")?;
        let err = self.next_file("err")?;
        self.runs += 1;
        let child = self
            .command(c, &[])?
            .stdout(out)
            .stderr(err)
            .spawn()
            .context("start cairn events tail")?;
        self.running = Some(child);
        Ok(())
    }

    /// SIGKILLs the running run.
    fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.running.take() {
            if let Some(status) = child.try_wait()? {
                bail!("the consumer had exited by itself ({status}); see its .err file");
            }
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// A run that stops once the log has been quiet for `idle_ms`.
    fn drain(&mut self, c: &Cluster, idle_ms: u32) -> Result<()> {
        let out = self.next_file("jsonl")?;
        let err = self.dir.join(format!("run-{:03}.err", self.runs));
        self.runs += 1;
        let status = self
            .command(c, &["--idle-ms", &idle_ms.to_string()])?
            .stdout(out)
            .stderr(fs::File::create(&err)?)
            .status()?;
        ensure!(
            status.success(),
            "cairn events tail: {status}: {}",
            fs::read_to_string(&err)?
        );
        Ok(())
    }

    /// Every run's lines, run by run.
    fn lines(&self) -> Result<Vec<Vec<Value>>> {
        (0..self.runs)
            .map(|n| {
                let path = self.dir.join(format!("run-{n:03}.jsonl"));
                parse_lines(&fs::read_to_string(&path)?)
                    .with_context(|| format!("{}", path.display()))
            })
            .collect()
    }
}

impl Drop for ConsumerRuns {
    fn drop(&mut self) {
        if let Some(mut child) = self.running.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn parse_lines(text: &str) -> Result<Vec<Value>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("not a JSON line: {l:?}")))
        .collect()
}

/// One event as `cairn events tail --json` prints it.
#[derive(Debug, Clone, PartialEq)]
struct Ev {
    shard: u64,
    index: u64,
    kind: String,
    repository: String,
    /// `(name, old, new)`.
    changes: Vec<(String, String, String)>,
    push_options: Vec<String>,
}

fn event(v: &Value) -> Result<Ev> {
    let s = |k: &str| -> Result<String> {
        Ok(v[k]
            .as_str()
            .with_context(|| format!("no {k} in {v}"))?
            .to_owned())
    };
    let n = |k: &str| v[k].as_u64().with_context(|| format!("no {k} in {v}"));
    ensure!(v.get("gap").is_none(), "a gap: {v}");
    let changes = v["changes"]
        .as_array()
        .with_context(|| format!("no changes in {v}"))?
        .iter()
        .map(|c| {
            let f = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
            (f("name"), f("old"), f("new"))
        })
        .collect();
    Ok(Ev {
        shard: n("shard")?,
        index: n("index")?,
        kind: s("kind")?,
        repository: s("repository")?,
        changes,
        push_options: v["push_options"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|o| o.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
    })
}

/// Checks that each run printed every shard's events in increasing index
/// order, that runs agree on what an index holds, and that the first
/// sightings of indexes are in log order; returns the de-duplicated log
/// per shard and how many lines were repeats.
fn merge_runs(runs: &[Vec<Value>]) -> Result<(BTreeMap<u64, Vec<Ev>>, usize)> {
    let mut seen: BTreeMap<(u64, u64), Ev> = BTreeMap::new();
    let mut log: BTreeMap<u64, Vec<Ev>> = BTreeMap::new();
    let mut repeats = 0;
    for (n, run) in runs.iter().enumerate() {
        let mut last: BTreeMap<u64, u64> = BTreeMap::new();
        for v in run {
            let e = event(v).with_context(|| format!("run {n}"))?;
            let prev = last.insert(e.shard, e.index).unwrap_or(0);
            ensure!(
                e.index > prev,
                "run {n}: shard {} printed index {} after {prev}",
                e.shard,
                e.index
            );
            match seen.get(&(e.shard, e.index)) {
                Some(earlier) => {
                    ensure!(
                        earlier == &e,
                        "run {n}: index {} differs from an earlier run: {earlier:?} vs {e:?}",
                        e.index
                    );
                    repeats += 1;
                }
                None => {
                    let shard_log = log.entry(e.shard).or_default();
                    if let Some(newest) = shard_log.last() {
                        ensure!(
                            e.index > newest.index,
                            "run {n}: new index {} of shard {} after {}: out of log order",
                            e.index,
                            e.shard,
                            newest.index
                        );
                    }
                    seen.insert((e.shard, e.index), e.clone());
                    shard_log.push(e);
                }
            }
        }
    }
    Ok((log, repeats))
}

/// Checks one branch's events against its pusher's attempts and the
/// branch's final history.
fn check_branch(
    events: &[&Ev],
    branch: &str,
    pusher: &BranchPusher,
    tip: Option<&str>,
    on_branch: &HashSet<String>,
) -> Result<()> {
    let refname = format!("refs/heads/{branch}");
    let moves: Vec<(&str, &str)> = events
        .iter()
        .flat_map(|e| e.changes.iter())
        .filter(|(name, _, _)| *name == refname)
        .map(|(_, old, new)| (old.as_str(), new.as_str()))
        .collect();
    let mut value = ZERO;
    for (i, (old, new)) in moves.iter().enumerate() {
        ensure!(
            *old == value,
            "{refname}: event {i} moves it from {old}, but it was at {value}"
        );
        value = new;
    }
    ensure!(
        tip.unwrap_or(ZERO) == value,
        "{refname}: the events leave it at {value}, the server has {tip:?}"
    );
    let events_of = |commit: &str| moves.iter().filter(|(_, new)| *new == commit).count();
    for (i, a) in pusher.attempts().iter().enumerate() {
        let n = events_of(&a.commit);
        match &a.outcome {
            PushOutcome::Accepted => ensure!(
                n == 1,
                "{refname}: accepted attempt {i} ({}) has {n} events",
                a.commit
            ),
            PushOutcome::Rejected(why) => ensure!(
                n == 0,
                "{refname}: refused attempt {i} ({}, {why}) has {n} events",
                a.commit
            ),
            PushOutcome::Unknown(_) => {
                // An event means the branch held it (the chain above);
                // the branch holding it means an event.
                let held = a.seen_applied || on_branch.contains(&a.commit);
                ensure!(
                    n <= 1 && (!held || n == 1),
                    "{refname}: unknown-outcome attempt {i} ({}) has {n} events, branch held \
                     it: {held}",
                    a.commit
                );
            }
        }
    }
    Ok(())
}

/// `(url, commit, outcome)` of a push the server must refuse.
type Refused = (String, String, PushOutcome);

/// Pushes the server always refuses (a `.gitmodules` that attacks
/// whoever clones), one a second to a new branch of one of `urls`, until
/// stopped; returns `(url, commit, outcome)` of each.
fn refused_pushes(
    git: &Git,
    urls: Vec<String>,
    stop: Arc<AtomicBool>,
) -> Result<thread::JoinHandle<Result<Vec<Refused>>>> {
    let work = git.init(git.scratch("refused"))?;
    let root = work.commit_file("README", "root\n", "root")?;
    Ok(thread::spawn(move || {
        let mut done = Vec::new();
        let mut n = 0;
        while !stop.load(Ordering::SeqCst) {
            work.run(["reset", "-q", "--hard", &root])?;
            let gitmodules = format!("[submodule \"sub\"]\n\tpath = sub\n\turl = -u./payload{n}\n");
            let commit = work.commit_file(".gitmodules", &gitmodules, "hostile")?;
            let url = urls[n % urls.len()].clone();
            let (outcome, _) = PushOutcome::run(
                work.cmd()
                    .args(GIT_HTTP_STALL_LIMITS)
                    .args(["push", "-q", &url])
                    .arg(format!("{commit}:refs/heads/refused-{n}"))
                    .timeout(Duration::from_secs(60)),
            )?;
            done.push((url, commit, outcome));
            n += 1;
            thread::sleep(Duration::from_secs(1));
        }
        Ok(done)
    }))
}

#[test]
fn checker_consumer_gets_every_push_once_across_leader_kills() -> Result<()> {
    let _serial = one_at_a_time();
    const REPOS: usize = 3;
    const CLIENTS_PER_REPO: usize = 2;
    const ROUNDS: usize = 10;

    let started = Instant::now();
    let mut c = Cluster::start_with_nodes(3)?;
    c.wait_leader(LEADER_TIMEOUT)?;
    let git = Git::new()?;
    let mut consumer = ConsumerRuns::new(&git.scratch("events"), "chaos")?;
    // Registered before anything happens: it must see the whole log.
    consumer.drain(&c, 500)?;
    let repos = (0..REPOS)
        .map(|i| c.new_repo(&format!("events{i}")))
        .collect::<Result<Vec<_>>>()?;
    let mut pushers = Vec::new();
    for (i, full) in repos.iter().enumerate() {
        for k in 0..CLIENTS_PER_REPO {
            let mut p = BranchPusher::new(&git, &c.repo_url(full), &format!("client{i}-{k}"))?;
            p.large_every = (5, 256 << 10);
            pushers.push(p);
        }
    }
    consumer.start(&c)?;
    let stop_refused = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let refused = refused_pushes(
        &git,
        repos.iter().map(|r| c.repo_url(r)).collect(),
        stop_refused.0.clone(),
    )?;
    let threads = PusherThreads::start(pushers);
    threads.wait_accepted(REPOS * CLIENTS_PER_REPO, LEADER_TIMEOUT)?;

    let mut rng = Rng::new(0xe7e7_0013);
    for round in 0..ROUNDS {
        let leader = c.wait_leader(LEADER_TIMEOUT)?;
        let before = threads.accepted();
        c.kill_node(leader)?;
        consumer.kill()?;
        let killed = Instant::now();
        if round % 4 == 3 {
            // Back before an election: the same leader, same term.
            thread::sleep(Duration::from_millis(100 + rng.below(400) as u64));
        } else {
            wait_until("the survivors to elect a leader", LEADER_TIMEOUT, || {
                Ok(c.leader().filter(|&l| l != leader))
            })
            .with_context(|| format!("round {round}: {}", c.describe_all()))?;
        }
        // The consumer comes back while the old leader is still down in
        // most rounds, after it in the others.
        if round % 2 == 0 {
            consumer.start(&c)?;
        }
        c.restart_node(leader)?;
        c.wait_rejoined(leader, REJOIN_TIMEOUT)
            .with_context(|| format!("round {round}: node {leader} did not rejoin"))?;
        if round % 2 == 1 {
            consumer.start(&c)?;
        }
        threads.wait_accepted(CLIENTS_PER_REPO, LEADER_TIMEOUT)?;
        println!(
            "round {round:2}: killed leader {leader} and the consumer; back after {:?}; {} \
             pushes accepted meanwhile",
            killed.elapsed(),
            threads.accepted() - before,
        );
    }

    let pushers = threads.finish()?;
    drop(stop_refused);
    let refused = refused
        .join()
        .map_err(|_| anyhow::anyhow!("refusing pusher panicked"))??;
    c.wait_converged(CONVERGE_TIMEOUT)?;
    // The running consumer may be mid-batch; the last run picks up from
    // its cursor and stops once it has caught up.
    thread::sleep(Duration::from_secs(1));
    consumer.kill()?;
    consumer.drain(&c, 3000)?;
    let total = verify_pushers(&c, &git, &pushers, &repos)?;

    let (log, repeats) = merge_runs(&consumer.lines()?)?;
    // What a fresh reader finds in the log, from its start.
    let out = c.cli(&["events", "tail", "--json", "--idle-ms", "2000"])?;
    ensure!(
        out.status.success(),
        "cairn events tail: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (full, _) = merge_runs(&[parse_lines(&String::from_utf8_lossy(&out.stdout))?])?;
    ensure!(
        log == full,
        "the consumer's runs hold {} events, the log {}",
        log.values().map(Vec::len).sum::<usize>(),
        full.values().map(Vec::len).sum::<usize>()
    );
    let events: Vec<&Ev> = log.values().flatten().collect();
    let created = events.iter().filter(|e| e.kind == "repo:created").count();
    ensure!(created == REPOS, "{created} repo:created events");

    let mut violations = Vec::new();
    for full_name in &repos {
        let url = c.repo_url(full_name);
        let clone = git.clone_repo(&url, git.scratch("events-verify"), &[])?;
        let of_repo: Vec<&Ev> = events
            .iter()
            .copied()
            .filter(|e| e.repository.eq_ignore_ascii_case(full_name) && e.kind == "push")
            .collect();
        for p in pushers.iter().filter(|p| p.url == url) {
            let tip = clone
                .cmd()
                .args(["rev-parse", "--verify", "-q"])
                .arg(format!("refs/remotes/origin/{}", p.branch))
                .output()?;
            let tip = tip.success().then(|| tip.out().to_owned());
            let on_branch: HashSet<String> = match &tip {
                Some(t) => clone
                    .run(["rev-list", t.as_str()])?
                    .lines()
                    .map(str::to_owned)
                    .collect(),
                None => HashSet::new(),
            };
            if let Err(e) = check_branch(&of_repo, &p.branch, p, tip.as_deref(), &on_branch) {
                violations.push(format!("{full_name}: {e:#}"));
            }
        }
    }
    // The server refused these whatever git could tell: no event, ever.
    let mut refusals = PushTally::default();
    for (url, commit, outcome) in &refused {
        match outcome {
            PushOutcome::Accepted => violations.push(format!("{url}: hostile {commit} accepted")),
            PushOutcome::Rejected(_) => refusals.rejected += 1,
            PushOutcome::Unknown(_) => refusals.unknown += 1,
        }
        let n = events
            .iter()
            .flat_map(|e| e.changes.iter())
            .filter(|(_, _, new)| new == commit)
            .count();
        if n > 0 {
            violations.push(format!(
                "{url}: refused {commit} ({outcome:?}) has {n} events"
            ));
        }
    }
    ensure!(violations.is_empty(), "{}", violations.join("\n"));
    ensure!(refusals.rejected > 0, "no push was refused: {refusals}");
    println!(
        "{ROUNDS} leader and consumer kills, {} consumer runs: {} events ({repeats} lines \
         repeated across restarts, de-duplicated by index); pushes: {total}; hostile pushes: \
         {refusals}; took {:?}",
        consumer.runs,
        events.len(),
        started.elapsed()
    );
    ensure!(total.accepted > 0, "no push was ever accepted");
    Ok(())
}

#[test]
fn a_slow_consumer_holds_nothing_back_at_the_bound_and_learns_of_its_gap() -> Result<()> {
    let _serial = one_at_a_time();
    let c = Cluster::start_with_nodes(3)?;
    c.wait_leader(LEADER_TIMEOUT)?;
    // The first tail registers on every shard the directory lists.
    c.wait_directory(LEADER_TIMEOUT)?;
    let git = Git::new()?;
    let json = |args: &[&str]| -> Result<Vec<Value>> {
        let out = c.cli(&[&["events", "tail", "--json", "--idle-ms", "1500"], args].concat())?;
        ensure!(
            out.status.success(),
            "cairn events tail {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        parse_lines(&String::from_utf8_lossy(&out.stdout))
    };
    // Registered at the end of the (empty) log; it never reads again
    // until the end.
    ensure!(json(&["--consumer", "slow"])?.is_empty());
    let a = c.new_repo("bound")?;
    let b = c.new_repo("other")?;
    let shard = event(&json(&[])?[0])?.shard.to_string();
    let set = c.cli(&[
        "events",
        "retention",
        &shard,
        "--min-age-ms",
        "3600000",
        "--max-events",
        "3",
        "--max-bytes",
        "1000000",
    ])?;
    ensure!(
        set.status.success(),
        "cairn events retention: {}",
        String::from_utf8_lossy(&set.stderr)
    );
    // Refused bounds change nothing.
    let bad = c.cli(&[
        "events",
        "retention",
        &shard,
        "--min-age-ms",
        "0",
        "--max-events",
        "0",
        "--max-bytes",
        "1",
    ])?;
    ensure!(!bad.status.success(), "max-events 0 was accepted");

    let work = git.init(git.scratch("bound"))?;
    let mut pushed = Vec::new();
    for n in 0..6 {
        let commit = work.commit_file("f.txt", &format!("{n}\n"), &format!("c{n}"))?;
        let url = c.repo_url(if n % 2 == 0 { &a } else { &b });
        // The slow consumer never holds a push up.
        work.cmd()
            .args(["push", "-q", "-o", &format!("n={n}"), &url])
            .arg(format!("{commit}:refs/heads/main"))
            .ok()?;
        pushed.push(commit);
    }

    // A fresh reader from the start: told what it missed, then the
    // newest three.
    let from_start = json(&[])?;
    let gap = &from_start[0]["gap"];
    ensure!(gap.is_object(), "no gap first: {from_start:?}");
    let kept: Vec<Ev> = from_start[1..].iter().map(event).collect::<Result<_>>()?;
    ensure!(kept.len() == 3, "kept {kept:?}");
    let gap_to = gap["to"].as_u64().context("gap.to")?;
    ensure!(
        gap["from"].as_u64() == Some(1) && gap_to < kept[0].index,
        "gap {gap} then {}",
        kept[0].index
    );
    let news: Vec<&str> = kept.iter().map(|e| e.changes[0].2.as_str()).collect();
    ensure!(news == pushed[3..].iter().map(String::as_str).collect::<Vec<_>>());
    ensure!(
        kept[2].push_options == ["n=5"],
        "{:?}",
        kept[2].push_options
    );

    // The slow consumer gets the same gap, from where its cursor was.
    let slow = json(&["--consumer", "slow"])?;
    ensure!(slow.len() == 4, "{slow:?}");
    ensure!(slow[0]["gap"]["to"].as_u64() == Some(gap_to), "{slow:?}");
    ensure!(
        slow[1..].iter().map(event).collect::<Result<Vec<_>>>()? == kept,
        "{slow:?}"
    );
    // It acknowledged what it printed: a restart repeats nothing.
    ensure!(json(&["--consumer", "slow"])?.is_empty());

    // A repository's own events only.
    let only_b = json(&[&b])?;
    ensure!(only_b.len() > 1 && only_b[0]["gap"] == *gap, "{only_b:?}");
    for v in &only_b[1..] {
        let e = event(v)?;
        ensure!(e.repository.eq_ignore_ascii_case(&b), "{e:?} under {b}");
    }

    // Bad consumer names are refused before anything is stored.
    let bad = c.cli(&[
        "events",
        "tail",
        "--consumer",
        "no spaces",
        "--idle-ms",
        "500",
    ])?;
    ensure!(!bad.status.success());
    ensure!(
        String::from_utf8_lossy(&bad.stderr).contains("invalid consumer name"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    Ok(())
}
