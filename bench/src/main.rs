//! `cairn-bench`: one invocation sets up Cairn (replicated and single
//! replica) and the baseline (nginx + fcgiwrap + `git http-backend`) on
//! this machine, loads the same repositories into each, runs the same git
//! workloads and prints the results with Cairn/baseline ratios.

mod git;
mod net;
mod report;
mod scenarios;
mod target;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use cairn_bench::baseline::{self, Baseline};
use cairn_bench::procs;
use cairn_bench::repogen::{self, Generated, Size};
use clap::Parser;
use serde::Serialize;

use scenarios::{Bench, CONCURRENT_CLIENTS};
use target::{Cairn, Target};

#[derive(Parser)]
#[command(name = "cairn-bench", version, about)]
struct Args {
    /// The short profile (small repository, few iterations; < 5 minutes).
    #[arg(long)]
    quick: bool,
    /// Benchmark this bare repository instead of the generated sizes.
    #[arg(long, value_name = "PATH")]
    repo: Option<PathBuf>,
    /// Where the JSON results go.
    #[arg(long, default_value = "bench-results.json")]
    out: PathBuf,
    /// The `cairn` binary (default: next to this one, so build both with
    /// the same profile: `cargo build --release -p cairn -p cairn-bench`).
    #[arg(long)]
    cairn: Option<PathBuf>,
    /// Generated repositories are cached here.
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Scratch folder for the servers' data and clones (default: a new
    /// temporary folder, removed at the end).
    #[arg(long)]
    work: Option<PathBuf>,
    /// Run only these scenarios (comma-separated): noop, push, fetch,
    /// clone, throughput, concurrent, failover.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

/// How much of everything a run does.
struct Profile {
    name: &'static str,
    clone_iters: fn(Size) -> usize,
    throughput_iters: fn(Size) -> usize,
    fetch_iters: usize,
    fetch_commits: u32,
    noop_iters: usize,
    push_iters: usize,
    concurrent_rounds: u32,
    failover_iters: usize,
}

const QUICK: Profile = Profile {
    name: "quick",
    clone_iters: |_| 3,
    throughput_iters: |_| 3,
    fetch_iters: 5,
    fetch_commits: 10,
    noop_iters: 5,
    push_iters: 10,
    concurrent_rounds: 2,
    failover_iters: 1,
};

const FULL: Profile = Profile {
    name: "full",
    clone_iters: |s| if s == Size::Large { 3 } else { 5 },
    throughput_iters: |s| if s == Size::Large { 3 } else { 5 },
    fetch_iters: 10,
    fetch_commits: 10,
    noop_iters: 10,
    push_iters: 20,
    concurrent_rounds: 5,
    failover_iters: 3,
};

#[derive(Serialize)]
struct Machine {
    cpu: String,
    cores: usize,
    memory_gib: f64,
    kernel: String,
    git: String,
    nginx: String,
    cairn_commit: String,
}

#[derive(Serialize)]
struct Output<'a> {
    profile: &'a str,
    machine: Machine,
    started_unix: u64,
    seconds: f64,
    repos: Vec<Generated>,
    results: &'a [report::Row],
    peak_rss_bytes: &'a BTreeMap<String, BTreeMap<String, u64>>,
}

fn command_line(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text).trim().to_owned()
        })
        .unwrap_or_default()
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kb: f64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    Machine {
        cpu,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_gib: kb / 1024.0 / 1024.0,
        kernel: command_line("uname", &["-r"]),
        git: command_line("git", &["--version"]),
        nginx: command_line("nginx", &["-v"]),
        cairn_commit: command_line(
            "git",
            &[
                "-C",
                env!("CARGO_MANIFEST_DIR"),
                "rev-parse",
                "--short",
                "HEAD",
            ],
        ),
    }
}

fn cairn_binary(given: Option<PathBuf>) -> Result<PathBuf> {
    let path = match given {
        Some(p) => p,
        None => std::env::current_exe()?
            .parent()
            .context("the binary's folder")?
            .join("cairn"),
    };
    if !path.is_file() {
        bail!(
            "no cairn binary at {}: build it with `cargo build --release -p cairn` or pass --cairn",
            path.display()
        );
    }
    Ok(path)
}

fn default_cache() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(".cache")
        .join("cairn-bench")
}

/// Run by fcgiwrap in place of `git http-backend` on the baseline's
/// metered route: runs the backend, waits for it (so its CPU time and its
/// children's reach this process), and appends that time to the log.
fn meter(log: &std::ffi::OsStr) -> Result<()> {
    let exec = std::env::var_os("CAIRN_BENCH_METER_EXEC").context("CAIRN_BENCH_METER_EXEC")?;
    let status = std::process::Command::new(exec).status()?;
    let seconds = procs::waited_children_cpu(std::process::id());
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    f.write_all(format!("{seconds}\n").as_bytes())?;
    std::process::exit(status.code().unwrap_or(1));
}

fn main() -> Result<()> {
    if let Some(log) = std::env::var_os("CAIRN_BENCH_METER_LOG") {
        return meter(&log);
    }
    let args = Args::parse();
    let started = Instant::now();
    let profile = if args.quick { &QUICK } else { &FULL };
    let wants = |s: &str| args.only.is_empty() || args.only.iter().any(|o| o == s);
    let cairn_bin = cairn_binary(args.cairn.clone())?;
    baseline::setup().context("installing the baseline (nginx, fcgiwrap)")?;

    let cache = args.cache.clone().unwrap_or_else(default_cache);
    std::fs::create_dir_all(&cache)?;
    let tmp;
    let work: PathBuf = match &args.work {
        Some(w) => {
            std::fs::create_dir_all(w)?;
            w.clone()
        }
        None => {
            tmp = tempfile::Builder::new().prefix("cairn-bench-").tempdir()?;
            tmp.path().to_owned()
        }
    };

    // Repositories first: generation is cached, and failing here costs
    // nothing.
    let mut sized: Vec<(Size, Generated)> = Vec::new();
    let user_repo = match &args.repo {
        Some(path) => {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().trim_end_matches(".git").to_owned())
                .unwrap_or_else(|| "repo".to_owned());
            Some(repogen::describe(&name, path)?)
        }
        None => None,
    };
    let sizes: &[Size] = if args.quick {
        &[Size::Small]
    } else {
        &[Size::Small, Size::Medium, Size::Large]
    };
    for &size in sizes {
        sized.push((size, repogen::ensure(size, &cache)?));
    }
    let refs10 = repogen::ensure_refs(10, &cache)?;
    let refs10k = repogen::ensure_refs(10_000, &cache)?;
    let small = sized
        .iter()
        .find(|(s, _)| *s == Size::Small)
        .map(|(_, g)| g.clone())
        .context("the small repository")?;
    // The repositories cloned: the user's, or every generated size.
    let cloned: Vec<(Size, Generated)> = match &user_repo {
        Some(g) => vec![(Size::Large, g.clone())],
        None => sized.clone(),
    };
    // Incremental fetches run on the largest repository short of "large".
    let fetch_repo = match &user_repo {
        Some(g) => g.clone(),
        None => sized
            .iter()
            .rev()
            .find(|(s, _)| *s != Size::Large)
            .map(|(_, g)| g.clone())
            .unwrap_or_else(|| small.clone()),
    };

    eprintln!(
        "cairn-bench: {} profile, work dir {}",
        profile.name,
        work.display()
    );
    let targets = vec![
        Target::Baseline(Baseline::start_with(
            &work.join("baseline"),
            CONCURRENT_CLIENTS as u32,
            Some(&std::env::current_exe()?),
        )?),
        Target::Cairn(Cairn::start(&cairn_bin, &work.join("cairn-1"), 1)?),
        Target::Cairn(Cairn::start(&cairn_bin, &work.join("cairn-3"), 3)?),
    ];
    let mut bench = Bench {
        targets,
        work: work.join("clients"),
        rows: Vec::new(),
        rss: BTreeMap::new(),
    };
    std::fs::create_dir_all(&bench.work)?;
    let result = run(
        &mut bench,
        profile,
        &cloned,
        &fetch_repo,
        &small,
        &refs10,
        &refs10k,
        &wants,
    );
    for t in &mut bench.targets {
        t.stop();
    }
    result?;

    let mut repos: Vec<Generated> = cloned.iter().map(|(_, g)| g.clone()).collect();
    for g in [&fetch_repo, &small, &refs10, &refs10k] {
        if !repos.iter().any(|r| r.name == g.name) {
            repos.push(g.clone());
        }
    }
    let table = report::markdown(&bench.rows, &bench.rss);
    println!("{table}");
    let output = Output {
        profile: profile.name,
        machine: machine(),
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            .saturating_sub(started.elapsed().as_secs()),
        seconds: started.elapsed().as_secs_f64(),
        repos,
        results: &bench.rows,
        peak_rss_bytes: &bench.rss,
    };
    std::fs::write(&args.out, serde_json::to_string_pretty(&output)?)
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!(
        "cairn-bench: done in {:.0} s; results in {}",
        started.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run(
    bench: &mut Bench,
    profile: &Profile,
    cloned: &[(Size, Generated)],
    fetch_repo: &Generated,
    small: &Generated,
    refs10: &Generated,
    refs10k: &Generated,
    wants: &dyn Fn(&str) -> bool,
) -> Result<()> {
    // Loading: every server gets the same repositories.
    let slug = |g: &Generated| format!("bench/{}", g.name);
    let mut loaded: Vec<String> = Vec::new();
    let mut load = |bench: &Bench, g: &Generated| -> Result<()> {
        if !loaded.contains(&g.name) {
            bench.load(&slug(g), g)?;
            loaded.push(g.name.clone());
        }
        Ok(())
    };
    if wants("noop") {
        load(bench, refs10)?;
        load(bench, refs10k)?;
    }
    if wants("push") {
        bench.load(&format!("push/{}", small.name), small)?;
    }
    if wants("fetch") {
        load(bench, fetch_repo)?;
    }
    if wants("clone") || wants("throughput") {
        for (_, g) in cloned {
            load(bench, g)?;
        }
    }
    if wants("concurrent") {
        bench.concurrent_setup()?;
    }

    if wants("noop") {
        bench.noop_fetch(&slug(refs10), refs10, profile.noop_iters)?;
        bench.noop_fetch(&slug(refs10k), refs10k, profile.noop_iters)?;
    }
    if wants("push") {
        bench.small_push(&format!("push/{}", small.name), small, profile.push_iters)?;
    }
    if wants("fetch") {
        bench.incremental_fetch(
            &slug(fetch_repo),
            fetch_repo,
            profile.fetch_commits,
            profile.fetch_iters,
        )?;
    }
    let largest = cloned.last().map(|(_, g)| g.name.clone());
    if wants("clone") {
        for (size, g) in cloned {
            let rss = largest.as_deref() == Some(g.name.as_str());
            bench.full_clone(&slug(g), &g.name, (profile.clone_iters)(*size), rss)?;
        }
    }
    if wants("throughput") {
        for (size, g) in cloned {
            bench.throughput(&slug(g), &g.name, (profile.throughput_iters)(*size))?;
        }
    }
    if wants("concurrent") {
        bench.concurrent_pushes(profile.concurrent_rounds)?;
    }
    // Last: it kills and restarts nodes.
    if wants("failover") {
        bench.failover(profile.failover_iters)?;
    }
    Ok(())
}
