//! Checks of the test kit itself that need no Cairn server: the history
//! generator, the raw receive-pack bodies (run through stock git's
//! `receive-pack --stateless-rpc`, the way `git http-backend` serves them)
//! and the received-pack measurement.

use anyhow::ensure;
use cairn_tests::*;

#[test]
fn history_generator_is_deterministic_and_deltified() -> Result<()> {
    let git = Git::new()?;
    let mut heads = Vec::new();
    for _ in 0..2 {
        let repo = git.init_bare(git.scratch("gen"))?;
        let mut gen = HistoryGen::new(7, 5, 200);
        gen.import(&repo, "main", 150)?;
        let first_head = repo.rev_parse("refs/heads/main")?;
        gen.import(&repo, "main", 20)?;
        ensure!(repo.run(["rev-list", "--count", "main"])? == "170");
        // The continuation is a fast-forward of the first stream.
        ensure!(repo.rev_parse("main~20")? == first_head);
        ensure!(repo.run(["rev-list", "--count", "--merges", "main"])? == "0");
        repo.assert_fsck_clean()?;
        heads.push(repo.rev_parse("main")?);
        if heads.len() == 2 {
            // Consecutive versions of a file differ by a few lines: after a
            // repack most blobs are stored as deltas.
            repo.run(["repack", "-adq"])?;
            let (pack, _) = repo
                .pack_files()?
                .into_iter()
                .next()
                .ok_or_else(|| anyhow::anyhow!("no pack"))?;
            let idx = pack.with_extension("idx");
            let stats = repo.run(["verify-pack", "-s", &idx.display().to_string()])?;
            ensure!(stats.contains("chain length"), "no deltas: {stats}");
        }
    }
    ensure!(
        heads[0] == heads[1],
        "generator not deterministic: {heads:?}"
    );
    Ok(())
}

/// A source repo with two commits on main, and an empty bare target.
fn source_and_target(git: &Git) -> Result<(Repo, Repo, String, String)> {
    let src = git.init(git.scratch("src"))?;
    let c1 = src.commit_file("a.txt", "one\n", "first")?;
    let c2 = src.commit_file("b/c.txt", "two\n", "second")?;
    let dst = git.init_bare(git.scratch("dst"))?;
    Ok((src, dst, c1, c2))
}

#[test]
fn receive_pack_bodies_are_accepted_by_stock_git() -> Result<()> {
    let git = Git::new()?;
    let (src, dst, c1, c2) = source_and_target(&git)?;
    // Create main at c1.
    let pack = src.pack_objects(&format!("{c1}\n"), true, false)?;
    let body = receive_pack_body(
        &[RefUpdate::new(ZERO_OID, &c1, "refs/heads/main")],
        "report-status agent=cairn-tests",
        &pack,
    );
    let out = stock_stateless_rpc(&dst, "receive-pack", &body, false)?;
    let rep = PushReport::parse(&out.stdout_bytes);
    ensure!(
        rep.unpack.as_deref() == Some("ok") && rep.refs.get("refs/heads/main") == Some(&None),
        "{rep:?} {out}"
    );
    // Update it with a thin pack, side-band reporting.
    let pack = src.pack_objects(&format!("{c2}\n^{c1}\n"), true, true)?;
    let body = receive_pack_body(
        &[RefUpdate::new(&c1, &c2, "refs/heads/main")],
        "report-status side-band-64k",
        &pack,
    );
    let out = stock_stateless_rpc(&dst, "receive-pack", &body, false)?;
    let rep = PushReport::parse(&out.stdout_bytes);
    ensure!(
        rep.any_ok() && rep.unpack.as_deref() == Some("ok"),
        "{rep:?}"
    );
    ensure!(dst.rev_parse("main")? == c2);
    dst.assert_fsck_clean()?;
    Ok(())
}

#[test]
fn broken_receive_pack_bodies_are_rejected_by_stock_git() -> Result<()> {
    let git = Git::new()?;
    let (src, dst, c1, c2) = source_and_target(&git)?;
    let pack = src.pack_objects(&format!("{c1}\n"), true, false)?;
    let body = receive_pack_body(
        &[RefUpdate::new(ZERO_OID, &c1, "refs/heads/main")],
        "report-status",
        &pack,
    );
    ensure!(PushReport::parse(
        &stock_stateless_rpc(&dst, "receive-pack", &body, false)?.stdout_bytes
    )
    .any_ok());
    let before = dst.refs()?;
    let update = [RefUpdate::new(&c1, &c2, "refs/heads/main")];
    let good = src.pack_objects(&format!("{c2}\n^{c1}\n"), true, false)?;

    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    cases.push(("truncated", good[..good.len() / 2].to_vec()));
    let mut corrupt = good.clone();
    let at = first_object_data_offset(&corrupt)? + 4;
    corrupt[at] ^= 0x55;
    cases.push(("corrupt byte, stale trailer", corrupt.clone()));
    fix_pack_trailer(&mut corrupt)?;
    cases.push(("corrupt byte, fixed trailer", corrupt));
    // Only the commit: its tree and blob are missing.
    cases.push((
        "commit without tree",
        src.pack_objects(&format!("{c2}\n"), false, false)?,
    ));
    for (what, pack) in cases {
        let body = receive_pack_body(&update, "report-status", &pack);
        let out = stock_stateless_rpc(&dst, "receive-pack", &body, false)?;
        let rep = PushReport::parse(&out.stdout_bytes);
        ensure!(!rep.any_ok(), "{what}: stock git accepted it: {rep:?}");
        ensure!(dst.refs()? == before, "{what}: refs changed");
    }
    // Garbage instead of pkt-lines.
    let out = stock_stateless_rpc(&dst, "receive-pack", b"this is not a pkt-line", false)?;
    ensure!(!out.success(), "{out}");
    ensure!(dst.refs()? == before);
    Ok(())
}

#[test]
fn dot_git_tree_is_rejected_by_stock_git_fsck() -> Result<()> {
    let git = Git::new()?;
    let (src, dst, c1, _) = source_and_target(&git)?;
    dst.run(["config", "receive.fsckObjects", "true"])?;
    let commit = commit_with_dot_git_tree(&src, ".git", &c1)?;
    let url = format!("file://{}", dst.path.display());
    src.run(["push", "-q", &url, &format!("{c1}:refs/heads/main")])?;
    let o = src
        .cmd()
        .args(["push", &url, &format!("{commit}:refs/heads/main")])
        .fails()?;
    ensure!(o.stderr.to_lowercase().contains("dotgit"), "{o}");
    ensure!(dst.rev_parse("main")? == c1);
    Ok(())
}

#[test]
fn received_pack_size_matches_the_kept_clone_pack() -> Result<()> {
    let git = Git::new()?;
    let src = git.init_bare(git.scratch("src"))?;
    let mut gen = HistoryGen::new(3, 3, 100);
    gen.import(&src, "main", 60)?;
    let url = format!("file://{}", src.path.display());
    let dest = git.scratch("clone");
    let cmd = git.with_protocol(2).cmd(git.home()).args([
        "clone",
        "-q",
        "--bare",
        &url,
        &dest.display().to_string(),
    ]);
    let (_, size) = received_pack_size(&git, cmd)?;
    let clone = git.repo(&dest);
    let packs = clone.pack_files()?;
    ensure!(packs.len() == 1, "{packs:?}");
    ensure!(packs[0].1 == size, "trace {size} vs pack {:?}", packs[0]);
    // Incremental fetch: a thin pack, measured as received.
    gen.import(&src, "main", 5)?;
    let cmd = clone
        .cmd()
        .args(["fetch", "-q", "origin", "+refs/heads/*:refs/heads/*"]);
    let (_, fetched) = received_pack_size(&git, cmd)?;
    ensure!(
        fetched > 32 && fetched < size / 4,
        "fetch pack {fetched} vs clone {size}"
    );
    ensure!(clone.rev_parse("main")? == src.rev_parse("main")?);
    clone.assert_fsck_clean()?;
    Ok(())
}
