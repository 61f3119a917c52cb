//! Smoke test of the baseline server with the real git client: a protocol
//! v2 clone, ls-remote, pushes (small, large enough to be chunked, and 32
//! at once), then a clean shutdown.

use std::path::Path;
use std::process::{Command, Output};
use std::thread;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use cairn_bench::baseline::{self, Baseline};

fn main() -> Result<()> {
    let t0 = Instant::now();
    baseline::setup()?;
    println!("setup ok ({:.1?})", t0.elapsed());

    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let t = Instant::now();
    let mut server = Baseline::start(&root.join("work"), 32)?;
    println!(
        "started ({:.1?}), url {}",
        t.elapsed(),
        server.url("bench/small")
    );

    // Source: a few commits, two packs, so add_repo has to repack.
    let src = root.join("src");
    git(root, &["init", "-q", "-b", "main", path_str(&src)?])?;
    for i in 0..3 {
        std::fs::write(src.join(format!("f{i}.txt")), format!("file {i}\n"))?;
        git(&src, &["add", "."])?;
        git(&src, &["commit", "-q", "-m", &format!("commit {i}")])?;
        if i == 1 {
            git(&src, &["repack", "-q", "-d"])?;
        }
    }
    git(&src, &["repack", "-q", "-d"])?;
    let bare = root.join("src.git");
    git(
        root,
        &["clone", "-q", "--bare", path_str(&src)?, path_str(&bare)?],
    )?;
    let source_packs = count_packs(&bare.join("objects/pack"))?;
    server.add_repo("bench/small", &bare)?;
    let packs = count_packs(&root.join("work/repos/bench/small.git/objects/pack"))?;
    println!("add_repo ok: source had {source_packs} packs, {packs} served");

    // Protocol v2 clone.
    let url = server.url("bench/small");
    let clone = root.join("clone");
    let out = run(Command::new("git")
        .current_dir(root)
        .env("GIT_TRACE_PACKET", "1")
        .args(["-c", "protocol.version=2", "clone", "-q", &url])
        .arg(&clone))?;
    let trace = String::from_utf8_lossy(&out.stderr);
    let v2 = trace.lines().any(|l| l.contains("git< version 2"));
    if !v2 {
        bail!("clone did not use protocol v2:\n{trace}");
    }
    println!("clone over protocol v2 ok");

    let out = run(Command::new("git").args(["ls-remote", &url]))?;
    let refs = String::from_utf8_lossy(&out.stdout);
    if !refs.contains("refs/heads/main") {
        bail!("ls-remote lacks main: {refs}");
    }
    println!("ls-remote ok: {} ref(s)", refs.lines().count());

    // Push a new commit back.
    std::fs::write(clone.join("new.txt"), "pushed\n")?;
    git(&clone, &["add", "."])?;
    git(&clone, &["commit", "-q", "-m", "pushed commit"])?;
    git(&clone, &["push", "-q", "origin", "main"])?;
    let head = rev_parse(&clone, "HEAD")?;
    let remote = remote_main(&url)?;
    if head != remote {
        bail!("server main {remote} != pushed {head}");
    }
    println!("push to existing repo ok ({head})");

    // Push into an empty repository.
    server.create_empty("bench/empty")?;
    let empty_url = server.url("bench/empty");
    git(&clone, &["push", "-q", &empty_url, "main"])?;
    if remote_main(&empty_url)? != head {
        bail!("empty repo push not visible");
    }
    println!("push to empty repo ok");

    // 32 concurrent pushes to 32 distinct empty repositories.
    let urls: Vec<String> = (0..32)
        .map(|i| {
            let name = format!("conc/r{i}");
            server.create_empty(&name)?;
            Ok(server.url(&name))
        })
        .collect::<Result<_>>()?;
    let t = Instant::now();
    let results: Vec<Result<()>> = thread::scope(|s| {
        let handles: Vec<_> = urls
            .iter()
            .map(|u| {
                let clone = &clone;
                s.spawn(move || git(clone, &["push", "-q", u, "main"]))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| bail!("push thread panicked")))
            .collect()
    });
    let failed = results.iter().filter(|r| r.is_err()).count();
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        eprintln!("push failed: {r:#}");
    }
    for u in &urls {
        if remote_main(u)? != head {
            bail!("{u} does not have the pushed main");
        }
    }
    if failed > 0 {
        bail!("{failed} of 32 concurrent pushes failed");
    }
    println!("32 concurrent pushes ok ({:.1?})", t.elapsed());

    // Above http.postBuffer (1 MiB) git sends the pack chunked, with no
    // Content-Length; make sure that path streams through too.
    write_noise(&clone.join("big.bin"), 8 << 20)?;
    git(&clone, &["add", "."])?;
    git(&clone, &["commit", "-q", "-m", "big blob"])?;
    server.create_empty("bench/big")?;
    let big_url = server.url("bench/big");
    let t = Instant::now();
    git(&clone, &["push", "-q", &big_url, "main"])?;
    let head = rev_parse(&clone, "HEAD")?;
    if remote_main(&big_url)? != head {
        bail!("big push not visible");
    }
    println!("8 MiB (chunked) push ok ({:.1?})", t.elapsed());

    let pids = server.server_pids();
    println!(
        "server pids ({}): {:?}; fcgiwrap main pid {}",
        pids.len(),
        pids,
        server.fcgiwrap_pid()
    );

    let t = Instant::now();
    server.stop();
    println!("stopped ({:.1?})", t.elapsed());
    let left: Vec<u32> = pids
        .iter()
        .copied()
        .filter(|p| Path::new(&format!("/proc/{p}")).exists() && !is_zombie(*p))
        .collect();
    let pgrep = Command::new("pgrep")
        .args(["-fa", "nginx|fcgiwrap"])
        .output()?;
    let stray = String::from_utf8_lossy(&pgrep.stdout);
    if !left.is_empty() || !stray.trim().is_empty() {
        bail!("processes left after stop: {left:?}\n{stray}");
    }
    println!(
        "no nginx/fcgiwrap processes left; all ok ({:.1?} total)",
        t0.elapsed()
    );
    Ok(())
}

fn count_packs(dir: &Path) -> Result<usize> {
    let mut n = 0;
    for e in std::fs::read_dir(dir)? {
        if e?.path().extension().is_some_and(|x| x == "pack") {
            n += 1;
        }
    }
    Ok(n)
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rfind(')')
                .map(|i| s[i + 1..].trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("non-UTF-8 path")
}

fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .env("GIT_AUTHOR_NAME", "Bench")
        .env("GIT_AUTHOR_EMAIL", "bench@example.com")
        .env("GIT_COMMITTER_NAME", "Bench")
        .env("GIT_COMMITTER_EMAIL", "bench@example.com")
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

fn git(dir: &Path, args: &[&str]) -> Result<()> {
    run(Command::new("git").current_dir(dir).args(args)).map(drop)
}

fn rev_parse(dir: &Path, rev: &str) -> Result<String> {
    let out = run(Command::new("git")
        .current_dir(dir)
        .args(["rev-parse", rev]))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn remote_main(url: &str) -> Result<String> {
    let out = run(Command::new("git").args(["ls-remote", url, "refs/heads/main"]))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// Incompressible bytes (xorshift), so the pack really is that large.
fn write_noise(path: &Path, len: usize) -> Result<()> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        buf.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(path, buf)?;
    Ok(())
}
