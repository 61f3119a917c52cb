//! The workloads. Every scenario runs the same git operations against each
//! server; iterations are interleaved (iteration i on every server, the
//! order rotating) so a ratio compares measurements taken moments apart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cairn_bench::repogen::{self, Generated};

use crate::git;
use crate::net::{self, CountingProxy, Url};
use crate::report::{median, Row};
use crate::target::{Kind, Target};
use cairn_bench::procs::RssSampler;

const CLONE_LIMIT: Duration = Duration::from_secs(1800);
const OP_LIMIT: Duration = Duration::from_secs(300);

/// Repositories per server for the concurrent-push scenario, and clients.
pub const CONCURRENT_REPOS: usize = 100;
pub const CONCURRENT_CLIENTS: usize = 32;
const CONCURRENT_WORKSPACES: usize = 10;

/// A repository (by index) and the commits a client pushes to it, in order.
type Chain = (usize, Vec<String>);

pub struct Bench {
    pub targets: Vec<Target>,
    /// Scratch space for clones.
    pub work: PathBuf,
    pub rows: Vec<Row>,
    /// Peak RSS per server kind, per process.
    pub rss: BTreeMap<String, BTreeMap<String, u64>>,
}

/// The targets in the order of iteration `i` (rotating which goes first).
fn order(n: usize, i: usize) -> Vec<usize> {
    (0..n).map(|k| (k + i) % n).collect()
}

fn fresh_dir(path: &Path) -> Result<()> {
    if path.exists() {
        std::fs::remove_dir_all(path)?;
    }
    std::fs::create_dir_all(path)?;
    Ok(())
}

fn progress(msg: &str) {
    eprintln!("· {msg}");
}

/// `git fetch` in `reader`, whose origin goes through `proxy`: seconds and
/// bytes both ways.
fn counted_fetch(reader: &Path, proxy: &CountingProxy) -> Result<(f64, f64)> {
    proxy.reset();
    let s = git::timed(reader, &["fetch", "--quiet", "origin"], OP_LIMIT)?;
    let (down, up) = proxy.counts();
    Ok((s, (down + up) as f64))
}

/// A local clone of `from` (hard links, no transfer) whose origin is `url`.
fn local_clone(from: &Path, dest: &Path, url: &str, mirror: bool) -> Result<()> {
    if dest.exists() {
        std::fs::remove_dir_all(dest)?;
    }
    let parent = dest.parent().context("clone parent")?;
    std::fs::create_dir_all(parent)?;
    let from_s = from.to_string_lossy();
    let dest_s = dest.to_string_lossy();
    let mode = if mirror { "--mirror" } else { "--no-checkout" };
    git::run(
        parent,
        &["clone", "--quiet", mode, &from_s, &dest_s],
        CLONE_LIMIT,
    )?;
    git::run(dest, &["remote", "set-url", "origin", url], OP_LIMIT)
}

impl Bench {
    fn kinds(&self) -> Vec<Kind> {
        self.targets.iter().map(Target::kind).collect()
    }

    fn empty_samples(&self) -> BTreeMap<Kind, Vec<f64>> {
        self.kinds().into_iter().map(|k| (k, Vec::new())).collect()
    }

    /// Loads `gen` into every server as `repo`.
    pub fn load(&self, repo: &str, gen: &Generated) -> Result<()> {
        for t in &self.targets {
            let start = Instant::now();
            t.load(repo, &gen.path)
                .with_context(|| format!("loading {repo} into {}", t.kind().key()))?;
            progress(&format!(
                "loaded {repo} ({} commits, {:.1} MB pack) into {} in {:.1} s",
                gen.commits,
                gen.pack_bytes as f64 / 1e6,
                t.kind().key(),
                start.elapsed().as_secs_f64()
            ));
        }
        Ok(())
    }

    /// `git clone` end to end (with checkout), `iters` times per server;
    /// with `rss`, every server process's peak RSS is sampled meanwhile.
    pub fn full_clone(&mut self, repo: &str, label: &str, iters: usize, rss: bool) -> Result<()> {
        progress(&format!("full clone of {label} ×{iters}"));
        let mut samples = self.empty_samples();
        for i in 0..iters {
            for ti in order(self.targets.len(), i) {
                let t = &self.targets[ti];
                let dest = self.work.join(format!("clone-{}", t.kind().key()));
                if dest.exists() {
                    std::fs::remove_dir_all(&dest)?;
                }
                let sampler = rss.then(|| RssSampler::start(t.server_pids(), t.labels()));
                let url = t.url(repo);
                let dest_s = dest.to_string_lossy().into_owned();
                let secs = git::timed(
                    &self.work,
                    &["clone", "--quiet", &url, &dest_s],
                    CLONE_LIMIT,
                )?;
                if let Some(s) = sampler {
                    let peaks = s.finish();
                    let e = self.rss.entry(t.kind().key().to_owned()).or_default();
                    for (name, bytes) in peaks {
                        let v = e.entry(name).or_insert(0);
                        *v = (*v).max(bytes);
                    }
                }
                std::fs::remove_dir_all(&dest)?;
                samples.entry(t.kind()).or_default().push(secs);
            }
        }
        self.rows.push(Row::new(
            "full clone (git clone)",
            label,
            "s",
            true,
            &samples,
        ));
        Ok(())
    }

    /// The server's side of a clone alone: an upload-pack v2 client asks
    /// for every ref and discards the pack.
    pub fn throughput(&mut self, repo: &str, label: &str, iters: usize) -> Result<()> {
        progress(&format!("pack throughput of {label} ×{iters}"));
        let mut mbps = self.empty_samples();
        let mut cpu = self.empty_samples();
        let mut sizes: BTreeMap<Kind, u64> = BTreeMap::new();
        for i in 0..iters {
            for ti in order(self.targets.len(), i) {
                let t = &self.targets[ti];
                let pids = t.server_pids();
                let before = t.cpu_seconds(&pids);
                let fetch = net::discard_clone(&t.metered_url(repo))
                    .with_context(|| format!("discard clone from {}", t.kind().key()))?;
                if fetch.objects == 0 {
                    bail!("{} served an empty pack", t.kind().key());
                }
                // The baseline's git processes are counted once reaped.
                std::thread::sleep(Duration::from_millis(150));
                let after = t.cpu_seconds(&pids);
                mbps.entry(t.kind())
                    .or_default()
                    .push(fetch.pack_bytes as f64 / 1e6 / fetch.seconds);
                cpu.entry(t.kind()).or_default().push(after - before);
                sizes.insert(t.kind(), fetch.pack_bytes);
            }
        }
        let note = sizes
            .iter()
            .map(|(k, b)| format!("{} {:.1} MB", k.key(), *b as f64 / 1e6))
            .collect::<Vec<_>>()
            .join(", ");
        self.rows.push(
            Row::new(
                "pack throughput (upload-pack v2, pack discarded)",
                label,
                "MB/s",
                false,
                &mbps,
            )
            .with_note(format!("pack served: {note}")),
        );
        self.rows
            .push(Row::new("server CPU per clone", label, "CPU s", true, &cpu));
        Ok(())
    }

    /// `git fetch` of `commits` new commits (pushed by another clone just
    /// before), and the bytes it moved.
    pub fn incremental_fetch(
        &mut self,
        repo: &str,
        gen: &Generated,
        commits: u32,
        iters: usize,
    ) -> Result<()> {
        progress(&format!(
            "incremental fetch of {commits} commits on {} ×{iters}",
            gen.name
        ));
        let mut secs = self.empty_samples();
        let mut bytes = self.empty_samples();
        let mut setup = Vec::new();
        for t in &self.targets {
            let key = t.kind().key();
            let url = t.url(repo);
            let proxy = CountingProxy::start(Url::parse(&url)?.addr)?;
            let writer = self.work.join(format!("fetch-writer-{key}"));
            let reader = self.work.join(format!("fetch-reader-{key}"));
            local_clone(&gen.path, &writer, &url, false)?;
            local_clone(&gen.path, &reader, &Url::via(&url, proxy.addr)?, false)?;
            setup.push((writer, reader, proxy));
        }
        for i in 0..iters {
            for ti in order(self.targets.len(), i) {
                let t = &self.targets[ti];
                let (writer, reader, proxy) = &setup[ti];
                repogen::add_commits(writer, "main", commits, 1000 + i as u64)?;
                git::run(writer, &["push", "--quiet", "origin", "main"], OP_LIMIT)?;
                let (s, b) = counted_fetch(reader, proxy)?;
                secs.entry(t.kind()).or_default().push(s);
                bytes.entry(t.kind()).or_default().push(b);
            }
        }
        let label = format!("{} +{commits} commits", gen.name);
        self.rows
            .push(Row::new("incremental fetch", &label, "s", true, &secs));
        self.rows.push(Row::new(
            "incremental fetch: bytes on the wire",
            &label,
            "bytes",
            true,
            &bytes,
        ));
        for (w, r, _) in setup {
            let _ = std::fs::remove_dir_all(w);
            let _ = std::fs::remove_dir_all(r);
        }
        Ok(())
    }

    /// `git fetch` with nothing to fetch: the ref advertisement alone.
    pub fn noop_fetch(&mut self, repo: &str, gen: &Generated, iters: usize) -> Result<()> {
        progress(&format!("no-op fetch with {} refs ×{iters}", gen.refs));
        let mut secs = self.empty_samples();
        let mut bytes = self.empty_samples();
        let mut setup = Vec::new();
        for t in &self.targets {
            let url = t.url(repo);
            let proxy = CountingProxy::start(Url::parse(&url)?.addr)?;
            let reader = self
                .work
                .join(format!("noop-{}-{}", gen.refs, t.kind().key()));
            local_clone(&gen.path, &reader, &Url::via(&url, proxy.addr)?, true)?;
            setup.push((reader, proxy));
        }
        for i in 0..iters {
            for ti in order(self.targets.len(), i) {
                let t = &self.targets[ti];
                let (reader, proxy) = &setup[ti];
                let (s, b) = counted_fetch(reader, proxy)?;
                secs.entry(t.kind()).or_default().push(s);
                bytes.entry(t.kind()).or_default().push(b);
            }
        }
        let label = format!("{} refs", gen.refs);
        self.rows
            .push(Row::new("no-op fetch", &label, "s", true, &secs));
        self.rows.push(Row::new(
            "no-op fetch: bytes on the wire",
            &label,
            "bytes",
            true,
            &bytes,
        ));
        for (r, _) in setup {
            let _ = std::fs::remove_dir_all(r);
        }
        Ok(())
    }

    /// `git push` of one commit changing one file.
    pub fn small_push(&mut self, repo: &str, gen: &Generated, iters: usize) -> Result<()> {
        progress(&format!("small push ×{iters}"));
        let mut secs = self.empty_samples();
        let mut clones = Vec::new();
        for t in &self.targets {
            let dir = self.work.join(format!("push-{}", t.kind().key()));
            local_clone(&gen.path, &dir, &t.url(repo), false)?;
            clones.push(dir);
        }
        for i in 0..iters {
            for ti in order(self.targets.len(), i) {
                let t = &self.targets[ti];
                let dir = &clones[ti];
                repogen::add_commits(dir, "main", 1, 2000 + i as u64)?;
                let s = git::timed(dir, &["push", "--quiet", "origin", "main"], OP_LIMIT)?;
                secs.entry(t.kind()).or_default().push(s);
            }
        }
        self.rows.push(Row::new(
            "small push (1 commit, 1 file)",
            &gen.name,
            "s",
            true,
            &secs,
        ));
        for d in clones {
            let _ = std::fs::remove_dir_all(d);
        }
        Ok(())
    }

    /// Names of the concurrent scenario's repositories, spread over
    /// workspaces (so over Cairn's shards).
    pub fn concurrent_repos() -> Vec<String> {
        (0..CONCURRENT_REPOS)
            .map(|r| {
                format!(
                    "conc{}/r{}",
                    r % CONCURRENT_WORKSPACES,
                    r / CONCURRENT_WORKSPACES
                )
            })
            .collect()
    }

    /// 32 clients push `rounds` commits to each of 100 repositories (each
    /// repository has one client, so no push is refused as stale).
    pub fn concurrent_pushes(&mut self, rounds: u32) -> Result<()> {
        let repos = Self::concurrent_repos();
        progress(&format!(
            "{} pushes from {CONCURRENT_CLIENTS} clients to {CONCURRENT_REPOS} repositories, per server",
            rounds as usize * repos.len()
        ));
        // One local repository per client, holding a chain of commits per
        // repository it owns; the same commits go to every server.
        let base = self.work.join("concurrent");
        fresh_dir(&base)?;
        let mut plans: Vec<(PathBuf, Vec<Chain>)> = Vec::new();
        for c in 0..CONCURRENT_CLIENTS {
            let dir = base.join(format!("client-{c}"));
            std::fs::create_dir_all(&dir)?;
            git::run(&dir, &["init", "--quiet", "-b", "main"], OP_LIMIT)?;
            git::run(
                &dir,
                &["commit", "--quiet", "--allow-empty", "-m", "root"],
                OP_LIMIT,
            )?;
            let mut owned = Vec::new();
            for r in (c..repos.len()).step_by(CONCURRENT_CLIENTS) {
                let branch = format!("r{r}");
                git::run(&dir, &["branch", &branch, "main"], OP_LIMIT)?;
                repogen::add_commits(&dir, &branch, rounds, 3000 + r as u64)?;
                let list =
                    git::output(&dir, &["rev-list", "--reverse", &branch, "^main"], OP_LIMIT)?;
                owned.push((r, list.lines().map(str::to_owned).collect()));
            }
            plans.push((dir, owned));
        }
        let mut rate = self.empty_samples();
        let mut latency = self.empty_samples();
        let mut failures: BTreeMap<Kind, usize> = BTreeMap::new();
        for t in &self.targets {
            let urls: Arc<Vec<String>> = Arc::new(repos.iter().map(|r| t.url(r)).collect());
            let barrier = Arc::new(Barrier::new(CONCURRENT_CLIENTS + 1));
            let lat: Arc<Mutex<Vec<f64>>> = Arc::default();
            let failed: Arc<Mutex<Vec<String>>> = Arc::default();
            let mut handles = Vec::new();
            for (dir, owned) in plans.clone() {
                let (urls, barrier, lat, failed) =
                    (urls.clone(), barrier.clone(), lat.clone(), failed.clone());
                handles.push(std::thread::spawn(move || {
                    barrier.wait();
                    for k in 0..rounds as usize {
                        for (r, chain) in &owned {
                            let spec = format!("{}:refs/heads/main", chain[k]);
                            let start = Instant::now();
                            match git::run(&dir, &["push", "--quiet", &urls[*r], &spec], OP_LIMIT) {
                                Ok(()) => lat
                                    .lock()
                                    .unwrap_or_else(PoisonError::into_inner)
                                    .push(start.elapsed().as_secs_f64()),
                                Err(e) => failed
                                    .lock()
                                    .unwrap_or_else(PoisonError::into_inner)
                                    .push(format!("{e:#}")),
                            }
                        }
                    }
                }));
            }
            barrier.wait();
            let start = Instant::now();
            for h in handles {
                let _ = h.join();
            }
            let wall = start.elapsed().as_secs_f64();
            let ok = lat.lock().unwrap_or_else(PoisonError::into_inner).clone();
            let failed = failed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            if let Some(first) = failed.first() {
                eprintln!(
                    "  {}: {} pushes failed; first: {first}",
                    t.kind().key(),
                    failed.len()
                );
            }
            progress(&format!(
                "{}: {} pushes in {wall:.1} s",
                t.kind().key(),
                ok.len()
            ));
            rate.entry(t.kind())
                .or_default()
                .push(ok.len() as f64 / wall);
            latency.entry(t.kind()).or_default().extend(ok);
            failures.insert(t.kind(), failed.len());
        }
        let label = format!("{CONCURRENT_REPOS} repos × {CONCURRENT_CLIENTS} clients");
        let failed_note = failures
            .iter()
            .map(|(k, n)| format!("{} {n}", k.key()))
            .collect::<Vec<_>>()
            .join(", ");
        self.rows.push(
            Row::new("concurrent small pushes", &label, "pushes/s", false, &rate)
                .with_note(format!("failed pushes: {failed_note}")),
        );
        // Latencies are not paired by iteration; the ratio of medians says
        // more here.
        let mut lat_row = Row::new("concurrent push latency", &label, "s", true, &latency);
        if let Some(base) = latency.get(&Kind::Baseline).map(|v| median(v)) {
            for kind in [Kind::CairnSingle, Kind::Cairn] {
                if let Some(ours) = latency.get(&kind).filter(|v| !v.is_empty()) {
                    lat_row
                        .ratios
                        .insert(kind.key().to_owned(), median(ours) / base);
                }
            }
        }
        self.rows
            .push(lat_row.with_note("ratio of medians (pushes are not paired)".to_owned()));
        let _ = std::fs::remove_dir_all(&base);
        Ok(())
    }

    /// SIGKILL of the leader of the repository's shard, then pushes until
    /// one succeeds: the time a developer waits. Replicated Cairn only.
    pub fn failover(&mut self, iters: usize) -> Result<()> {
        let Some(ti) = self.targets.iter().position(|t| t.kind() == Kind::Cairn) else {
            return Ok(());
        };
        progress(&format!("failover ×{iters}"));
        let repo = "failover/repo";
        let dir = self.work.join("failover");
        fresh_dir(&dir)?;
        let url = self.targets[ti].url(repo);
        self.targets[ti].create_empty(repo)?;
        git::run(&dir, &["init", "--quiet", "-b", "main"], OP_LIMIT)?;
        git::run(
            &dir,
            &["commit", "--quiet", "--allow-empty", "-m", "root"],
            OP_LIMIT,
        )?;
        git::run(&dir, &["push", "--quiet", &url, "main"], OP_LIMIT)?;
        let mut secs: BTreeMap<Kind, Vec<f64>> = BTreeMap::new();
        let mut attempts_total = 0usize;
        for i in 0..iters {
            let Target::Cairn(cairn) = &mut self.targets[ti] else {
                bail!("not a Cairn target");
            };
            let leader = cairn.leader_of(repo)?;
            repogen::add_commits(&dir, "main", 1, 4100 + i as u64)?;
            cairn.kill_node(leader)?;
            let start = Instant::now();
            let mut attempts = 0;
            loop {
                attempts += 1;
                match git::run(
                    &dir,
                    &["push", "--quiet", &url, "main"],
                    Duration::from_secs(60),
                ) {
                    Ok(()) => break,
                    Err(e) if start.elapsed() < Duration::from_secs(180) => {
                        verbose(&format!("push after the kill failed: {e:#}"));
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => return Err(e.context("no push succeeded within 180 s")),
                }
            }
            let s = start.elapsed().as_secs_f64();
            attempts_total += attempts;
            progress(&format!(
                "killed node {leader}; a push succeeded after {s:.2} s ({attempts} attempts)"
            ));
            secs.entry(Kind::Cairn).or_default().push(s);
            cairn.restart_node(leader)?;
        }
        self.rows.push(
            Row::new(
                "failover: leader SIGKILL → next push",
                "1 commit",
                "s",
                true,
                &secs,
            )
            .with_note(format!(
                "replicated Cairn only; {attempts_total} push attempts in {iters} failovers"
            )),
        );
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    /// Creates the concurrent scenario's empty repositories on every server.
    pub fn concurrent_setup(&self) -> Result<()> {
        let repos = Self::concurrent_repos();
        for t in &self.targets {
            for r in &repos {
                t.create_empty(r)?;
            }
        }
        Ok(())
    }
}

/// Failed attempts during a failover are expected; shown only when asked.
fn verbose(msg: &str) {
    if std::env::var_os("CAIRN_BENCH_VERBOSE").is_some() {
        eprintln!("  {msg}");
    }
}
