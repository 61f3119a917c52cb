//! Readers racing writers: clones and fetches that run while pushes land
//! must always see a consistent repository — every advertised ref's
//! objects servable, every received pack complete.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::ensure;
use cairn_tests::*;

#[test]
fn fetches_during_pushes_always_succeed() -> Result<()> {
    let c = Cluster::shared();
    let git = Git::new()?;
    let full = c.new_repo("rdw")?;
    let url = c.repo_url(&full);
    let work = git.init(git.scratch("writer"))?;
    work.commit_n("seed.txt", 2, "seed")?;
    work.run(["push", "-q", &url, "main"])?;

    let done = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = [0u8, 2]
        .into_iter()
        .map(|proto| {
            let git = git.with_protocol(proto);
            let url = url.clone();
            let done = done.clone();
            std::thread::spawn(move || -> Result<usize> {
                let reader = git.clone_repo(&url, git.scratch(&format!("reader-v{proto}")), &[])?;
                let mut fetches = 0;
                while !done.load(Ordering::Acquire) {
                    reader.run(["fetch", "-q", "origin"])?;
                    fetches += 1;
                }
                reader.run(["fetch", "-q", "origin"])?;
                reader.assert_fsck_clean()?;
                Ok(fetches)
            })
        })
        .collect();

    // Each push adds a new pack and moves main; a reader that saw the new
    // ref without the new pack would fail its fetch.
    for i in 0..25 {
        work.commit_file("seed.txt", &format!("round {i}\n"), &format!("round {i}"))?;
        work.run(["push", "-q", &url, "main"])?;
    }
    done.store(true, Ordering::Release);
    let expected = work.head()?;
    for r in readers {
        let fetches = r.join().expect("reader thread")?;
        ensure!(fetches > 0, "a reader never fetched");
    }
    let server = git.remote_refs(&url)?;
    ensure!(
        server.get("refs/heads/main") == Some(&expected),
        "server main {:?} != {expected}",
        server.get("refs/heads/main")
    );
    Ok(())
}
