//! A few thousand commits with real deltas: push in one go, clone with both
//! protocols, and compare the bytes Cairn sends with what stock git sends
//! for the same history (full clone and incremental fetch).

use std::time::{Duration, Instant};

use anyhow::ensure;
use cairn_tests::*;

const COMMITS: usize = 3000;
const MORE: usize = 50;
/// Cairn may send at most this much more than stock git.
const MAX_RATIO: f64 = 1.1;

fn long(cmd: GitCmd) -> GitCmd {
    cmd.timeout(Duration::from_secs(600))
}

#[test]
fn big_history_push_clone_and_pack_sizes() -> Result<()> {
    let c = Cluster::shared();
    let git = Git::new()?;
    let t = Instant::now();
    let src = git.init_bare(git.scratch("src"))?;
    let mut gen = HistoryGen::new(42, 6, 300);
    gen.import(&src, "main", COMMITS)?;
    // fast-import deltifies only against the previous blob it stored; a
    // repack gives the well-deltified pack a real client would push.
    src.run(["repack", "-adfq"])?;
    src.run(["branch", "release", "main~1000"])?;
    src.run(["tag", "-a", "-m", "v1", "v1", "main~2000"])?;
    eprintln!("generated {COMMITS} commits in {:?}", t.elapsed());

    // The same push to Cairn and to a stock bare repository.
    let full = c.new_repo("big")?;
    let url = c.repo_url(&full);
    let stock = git.init_bare(git.scratch("stock"))?;
    let stock_url = format!("file://{}", stock.path.display());
    let t = Instant::now();
    long(
        src.cmd()
            .args(["push", "-q", &url, "main", "release", "v1"]),
    )
    .ok()?;
    eprintln!("push of {COMMITS} commits to Cairn took {:?}", t.elapsed());
    long(
        src.cmd()
            .args(["push", "-q", &stock_url, "main", "release", "v1"]),
    )
    .ok()?;
    let server = git.remote_refs(&url)?;
    ensure!(
        server == git.remote_refs(&stock_url)?,
        "Cairn and stock refs differ"
    );
    ensure!(server.len() == 3, "{server:?}");

    // Full clones, measured as received.
    let mut cairn_clone_sizes = Vec::new();
    let mut clones = Vec::new();
    for v in [0u8, 2] {
        let g = git.with_protocol(v);
        let dest = g.scratch(&format!("cairn-v{v}"));
        let t = Instant::now();
        let cmd = long(
            g.cmd(g.home())
                .args(["clone", "-q", &url, &dest.display().to_string()]),
        );
        let (_, size) = received_pack_size(&g, cmd)?;
        eprintln!("clone v{v} from Cairn: {size} bytes in {:?}", t.elapsed());
        let clone = g.repo(&dest);
        assert_clone_matches(&clone, &server)?;
        ensure!(clone.run(["rev-list", "--count", "HEAD"])? == COMMITS.to_string());
        let packs = clone.pack_files()?;
        ensure!(
            packs.len() == 1 && packs[0].1 == size,
            "v{v}: received {size} bytes but kept {packs:?}"
        );
        cairn_clone_sizes.push(size);
        clones.push(clone);
    }
    let g2 = git.with_protocol(2);
    let stock_dest = g2.scratch("stock-clone");
    let cmd = long(g2.cmd(g2.home()).args([
        "clone",
        "-q",
        "--no-local",
        &stock_url,
        &stock_dest.display().to_string(),
    ]));
    let (_, stock_clone_size) = received_pack_size(&g2, cmd)?;
    let stock_clone = g2.repo(&stock_dest);
    assert_clone_matches(&stock_clone, &server)?;

    // Incremental: 50 more commits pushed to both, then fetched.
    gen.import(&src, "main", MORE)?;
    long(src.cmd().args(["push", "-q", &url, "main"])).ok()?;
    long(src.cmd().args(["push", "-q", &stock_url, "main"])).ok()?;
    let server = git.remote_refs(&url)?;
    ensure!(server["refs/heads/main"] == src.rev_parse("main")?);
    let mut cairn_fetch_sizes = Vec::new();
    for clone in &clones {
        let cmd = long(clone.cmd().args(["fetch", "-q", "origin"]));
        let (_, size) = received_pack_size(&clone.git, cmd)?;
        assert_clone_matches(clone, &server)?;
        ensure!(clone.run(["rev-list", "--count", "origin/main"])? == (COMMITS + MORE).to_string());
        cairn_fetch_sizes.push(size);
    }
    let cmd = long(stock_clone.cmd().args(["fetch", "-q", "origin"]));
    let (_, stock_fetch_size) = received_pack_size(&stock_clone.git, cmd)?;
    assert_clone_matches(&stock_clone, &server)?;

    for (what, cairn, stock) in [
        ("full clone v0", cairn_clone_sizes[0], stock_clone_size),
        ("full clone v2", cairn_clone_sizes[1], stock_clone_size),
        (
            "fetch of 50 commits v0",
            cairn_fetch_sizes[0],
            stock_fetch_size,
        ),
        (
            "fetch of 50 commits v2",
            cairn_fetch_sizes[1],
            stock_fetch_size,
        ),
    ] {
        eprintln!(
            "pack size, {what}: Cairn {cairn} bytes, stock git {stock} bytes, ratio {:.3}",
            cairn as f64 / stock as f64
        );
    }
    for (what, cairn, stock) in [
        ("full clone v0", cairn_clone_sizes[0], stock_clone_size),
        ("full clone v2", cairn_clone_sizes[1], stock_clone_size),
        ("fetch v0", cairn_fetch_sizes[0], stock_fetch_size),
        ("fetch v2", cairn_fetch_sizes[1], stock_fetch_size),
    ] {
        ensure!(
            cairn as f64 <= stock as f64 * MAX_RATIO,
            "{what}: Cairn sent {cairn} bytes, more than {MAX_RATIO}x stock git's {stock}"
        );
    }
    Ok(())
}
