//! The servers under test: Cairn's `dev` cluster (three replicating
//! storage nodes and a router, or one node of one-voter groups) and the
//! baseline,
//! behind one interface the scenarios drive.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use cairn_bench::baseline::Baseline;
use serde::Deserialize;

use crate::git;
use crate::net;

/// Which server a measurement was taken on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Baseline,
    CairnSingle,
    Cairn,
}

impl Kind {
    pub fn key(self) -> &'static str {
        match self {
            Kind::Baseline => "baseline",
            Kind::CairnSingle => "cairn-1",
            Kind::Cairn => "cairn-3",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Kind::Baseline => "git http-backend",
            Kind::CairnSingle => "Cairn, 1 replica",
            Kind::Cairn => "Cairn, 3 replicas",
        }
    }
}

pub enum Target {
    Baseline(Baseline),
    Cairn(Cairn),
}

impl Target {
    pub fn kind(&self) -> Kind {
        match self {
            Target::Baseline(_) => Kind::Baseline,
            Target::Cairn(c) if c.nodes.len() == 1 => Kind::CairnSingle,
            Target::Cairn(_) => Kind::Cairn,
        }
    }

    /// Clone URL of `ws/slug`, with credentials where the server needs them.
    pub fn url(&self, repo: &str) -> String {
        match self {
            Target::Baseline(b) => b.url(repo),
            Target::Cairn(c) => c.url(repo),
        }
    }

    /// An empty repository that accepts pushes.
    pub fn create_empty(&self, repo: &str) -> Result<()> {
        match self {
            Target::Baseline(b) => b.create_empty(repo),
            Target::Cairn(c) => c.create(repo),
        }
    }

    /// `repo` holding every ref of the bare repository `from`: the baseline
    /// copies it to disk as an operator would; Cairn receives it as a push.
    pub fn load(&self, repo: &str, from: &Path) -> Result<()> {
        match self {
            Target::Baseline(b) => b.add_repo(repo, from),
            Target::Cairn(c) => {
                c.create(repo)?;
                push_all_refs(from, &c.url(repo))
                    .with_context(|| format!("pushing {} into {repo}", from.display()))
            }
        }
    }

    /// Long-lived server processes, with a label each.
    pub fn server_processes(&self) -> Vec<(u32, String)> {
        match self {
            Target::Baseline(b) => {
                let fcgi = b.fcgiwrap_pid();
                b.server_pids()
                    .into_iter()
                    .map(|p| {
                        let name = if p == fcgi {
                            "fcgiwrap".to_owned()
                        } else {
                            cairn_bench::procs::describe(p)
                        };
                        (p, name)
                    })
                    .collect()
            }
            Target::Cairn(c) => c.server_processes(),
        }
    }

    /// The URL whose requests are metered for CPU time: on the baseline,
    /// the route that records its CGI processes' time.
    pub fn metered_url(&self, repo: &str) -> String {
        match self {
            Target::Baseline(b) => b.metered_url(repo),
            Target::Cairn(c) => c.url(repo),
        }
    }

    /// CPU seconds used so far by the server processes `pids` and, on the
    /// baseline, by the metered route's short-lived git processes.
    pub fn cpu_seconds(&self, pids: &[u32]) -> f64 {
        let own = cairn_bench::procs::total_cpu(pids);
        match self {
            Target::Baseline(b) => own + b.metered_cpu(),
            Target::Cairn(_) => own,
        }
    }

    pub fn server_pids(&self) -> Vec<u32> {
        self.server_processes()
            .into_iter()
            .map(|(p, _)| p)
            .collect()
    }

    pub fn labels(&self) -> HashMap<u32, String> {
        self.server_processes().into_iter().collect()
    }

    pub fn stop(&mut self) {
        match self {
            Target::Baseline(b) => b.stop(),
            Target::Cairn(c) => c.stop(),
        }
    }
}

/// Pushes every ref of the bare repository `from` to `url`.
fn push_all_refs(from: &Path, url: &str) -> Result<()> {
    const BATCH: usize = 500;
    let limit = Duration::from_secs(1800);
    let listing = git::output(
        from,
        &["for-each-ref", "--format=%(objectname) %(refname)"],
        limit,
    )?;
    let refs: Vec<&str> = listing.lines().collect();
    if refs.len() <= BATCH {
        return git::run(from, &["push", "--quiet", "--mirror", url], limit);
    }
    // git's push over HTTP matches every pushed ref against every local
    // one: 10,000 refs take a minute of client CPU whatever the server.
    // Pushing from scratch repositories that borrow the objects and hold
    // one batch of refs each keeps it to seconds.
    let scratch = tempfile::Builder::new()
        .prefix("cairn-bench-refs-")
        .tempdir()?;
    let objects = from.join("objects");
    for (i, batch) in refs.chunks(BATCH).enumerate() {
        let dir = scratch.path().join(format!("batch-{i}.git"));
        let dir_s = dir.to_string_lossy().into_owned();
        git::run(
            scratch.path(),
            &["init", "--quiet", "--bare", &dir_s],
            limit,
        )?;
        std::fs::write(
            dir.join("objects/info/alternates"),
            format!("{}\n", objects.display()),
        )?;
        let mut packed = String::new();
        for line in batch {
            packed.push_str(line);
            packed.push('\n');
        }
        std::fs::write(dir.join("packed-refs"), packed)?;
        git::run(&dir, &["push", "--quiet", url, "refs/*:refs/*"], limit)?;
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
struct DevCluster {
    http_url: String,
    username: String,
    token: String,
    nodes: Vec<DevNode>,
    router: DevProcess,
}

#[derive(Debug, Deserialize)]
struct DevNode {
    id: u64,
    pid: u32,
    #[serde(default)]
    config: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
struct DevProcess {
    pid: u32,
}

/// A storage node of the cluster under test.
#[derive(Debug)]
pub struct NodeProc {
    pub id: u64,
    pub pid: u32,
    config: Option<PathBuf>,
    /// Set once the harness started it again itself.
    child: Option<Child>,
}

/// A `cairn dev` cluster started by the harness.
pub struct Cairn {
    bin: PathBuf,
    data: PathBuf,
    dev: Child,
    http: String,
    user: String,
    token: String,
    pub nodes: Vec<NodeProc>,
    router_pid: u32,
}

impl Cairn {
    /// `cairn dev --nodes N` with its data in `data`, serving once the
    /// router answers.
    pub fn start(bin: &Path, data: &Path, nodes: u64) -> Result<Cairn> {
        std::fs::create_dir_all(data)?;
        let log = std::fs::File::create(data.join("dev.log"))?;
        let dev = Command::new(bin)
            .args([
                "dev",
                "--http",
                "127.0.0.1:0",
                "--nodes",
                &nodes.to_string(),
            ])
            .arg("--data-dir")
            .arg(data)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} dev", bin.display()))?;
        let mut c = Cairn {
            bin: bin.to_owned(),
            data: data.to_owned(),
            dev,
            http: String::new(),
            user: String::new(),
            token: String::new(),
            nodes: Vec::new(),
            router_pid: 0,
        };
        let file = data.join("dev-cluster.json");
        let deadline = Instant::now() + Duration::from_secs(120);
        let cluster: DevCluster = loop {
            if let Some(status) = c.dev.try_wait()? {
                bail!(
                    "cairn dev exited ({status}); see {}",
                    data.join("dev.log").display()
                );
            }
            if let Ok(text) = std::fs::read_to_string(&file) {
                if let Ok(parsed) = serde_json::from_str(&text) {
                    break parsed;
                }
            }
            if Instant::now() > deadline {
                bail!("cairn dev did not come up in 120 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        c.http = cluster.http_url.trim_end_matches('/').to_owned();
        c.user = cluster.username;
        c.token = cluster.token;
        c.router_pid = cluster.router.pid;
        c.nodes = cluster
            .nodes
            .into_iter()
            .map(|n| NodeProc {
                id: n.id,
                pid: n.pid,
                config: n.config,
                child: None,
            })
            .collect();
        c.wait_ready()?;
        Ok(c)
    }

    fn authed_base(&self) -> String {
        let rest = self.http.trim_start_matches("http://");
        format!("http://{}:{}@{rest}", self.user, self.token)
    }

    pub fn url(&self, repo: &str) -> String {
        format!("{}/{repo}.git", self.authed_base())
    }

    /// Waits until the router answers and every shard has a leader.
    fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = net::Url::parse(&format!("{}/healthz", self.http))
                .and_then(|u| net::request(&u, "GET", "", &[], b""))
                .map(|r| r.status == 200)
                .unwrap_or(false);
            let leaders = self.nodes.len() == 1
                || self
                    .status()
                    .map(|s| s.shards.iter().all(|sh| sh.leader.is_some()))
                    .unwrap_or(false);
            if ok && leaders {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the Cairn cluster in {} is not ready", self.data.display());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Creates `ws/slug` over the REST API.
    pub fn create(&self, repo: &str) -> Result<()> {
        let url = net::Url::parse(&format!("{}/2.0/repositories/{repo}", self.authed_base()))?;
        let resp = net::request(&url, "POST", "", &[], b"")?;
        let status = resp.status;
        if status != 200 && status != 201 {
            let body = resp.text().unwrap_or_default();
            bail!("creating {repo}: HTTP {status}: {body}");
        }
        Ok(())
    }

    fn server_processes(&self) -> Vec<(u32, String)> {
        let mut out: Vec<(u32, String)> = Vec::new();
        for n in &self.nodes {
            out.push((n.pid, format!("cairn node {}", n.id)));
        }
        out.push((self.router_pid, "cairn router".to_owned()));
        out
    }

    /// `cairn cluster status --json`.
    pub fn status(&self) -> Result<Status> {
        let out = Command::new(&self.bin)
            .args(["cluster", "status", "--json", "--data-dir"])
            .arg(&self.data)
            .stderr(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!("cairn cluster status failed");
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// The node leading the shard that holds `ws/slug`.
    pub fn leader_of(&self, repo: &str) -> Result<u64> {
        let (ws, slug) = repo.split_once('/').ok_or_else(|| anyhow!("ws/slug"))?;
        let status = self.status()?;
        let shard = status
            .shards
            .iter()
            .find(|sh| sh.repos.iter().any(|r| r.workspace == ws && r.slug == slug))
            .ok_or_else(|| anyhow!("no shard lists {repo}"))?;
        shard
            .leader
            .ok_or_else(|| anyhow!("shard {} has no leader", shard.shard))
    }

    /// SIGKILLs storage node `id`.
    pub fn kill_node(&mut self, id: u64) -> Result<()> {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.id == id)
            .ok_or_else(|| anyhow!("no node {id}"))?;
        match node.child.as_mut() {
            Some(child) => {
                child.kill()?;
                child.wait()?;
            }
            None => {
                let ok = Command::new("kill")
                    .args(["-KILL", &node.pid.to_string()])
                    .stderr(Stdio::null())
                    .status()?
                    .success();
                if !ok {
                    bail!("kill -KILL {} failed", node.pid);
                }
            }
        }
        Ok(())
    }

    /// Starts node `id` again from its config and waits until every
    /// replica is back and caught up.
    pub fn restart_node(&mut self, id: u64) -> Result<()> {
        let log_path = self.data.join(format!("node-{id}-restarted.log"));
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.id == id)
            .ok_or_else(|| anyhow!("no node {id}"))?;
        let config = node
            .config
            .clone()
            .ok_or_else(|| anyhow!("node {id} has no config file"))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let child = Command::new(&self.bin)
            .arg("node")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        node.pid = child.id();
        node.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(s) = self.status() {
                let healthy = s.shards.iter().all(|sh| {
                    sh.leader.is_some()
                        && sh
                            .replicas
                            .iter()
                            .all(|r| r.error.is_empty() && r.role != "unreachable" && r.lag == 0)
                });
                if healthy {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("node {id} did not catch up within 120 s of its restart");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn stop(&mut self) {
        if matches!(self.dev.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.dev.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if matches!(self.dev.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.dev.kill();
        let _ = self.dev.wait();
        for n in &mut self.nodes {
            if let Some(mut child) = n.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for Cairn {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The parts of `cairn cluster status --json` the harness reads.
#[derive(Debug, Deserialize)]
pub struct Status {
    pub shards: Vec<ShardStatus>,
}

#[derive(Debug, Deserialize)]
pub struct ShardStatus {
    pub shard: u64,
    pub leader: Option<u64>,
    pub replicas: Vec<ReplicaStatus>,
    pub repos: Vec<RepoStatus>,
}

#[derive(Debug, Deserialize)]
pub struct ReplicaStatus {
    pub role: String,
    pub lag: u64,
    pub error: String,
}

#[derive(Debug, Deserialize)]
pub struct RepoStatus {
    pub workspace: String,
    pub slug: String,
}
