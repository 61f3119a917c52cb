//! Push, clone and fetch with the real git client, protocols v0 and v2.

use std::collections::BTreeMap;

use anyhow::ensure;
use cairn_tests::*;

/// A work repo with `main` (3 commits), `feature` (2 more), a lightweight
/// tag on main~1 and an annotated tag on main, pushed to a new repository.
struct Pushed {
    git: Git,
    full: String,
    url: String,
    work: Repo,
}

fn push_initial(c: &Cluster, prefix: &str) -> Result<Pushed> {
    let git = Git::new()?;
    let full = c.new_repo(prefix)?;
    let url = c.repo_url(&full);
    let work = git.init(git.scratch("work"))?;
    work.commit_n("README.md", 3, "main")?;
    work.run(["checkout", "-q", "-b", "feature"])?;
    work.commit_n("feature.txt", 2, "feature")?;
    work.run(["checkout", "-q", "main"])?;
    work.run(["tag", "light", "main~1"])?;
    work.run(["tag", "-a", "-m", "release 1.0", "v1.0", "main"])?;
    work.run(["remote", "add", "origin", &url])?;
    work.run([
        "push",
        "-q",
        "origin",
        "refs/heads/*:refs/heads/*",
        "refs/tags/*:refs/tags/*",
    ])?;
    Ok(Pushed {
        git,
        full,
        url,
        work,
    })
}

/// Local branches and tags of a work repo, as the server should have them.
fn pushable_refs(work: &Repo) -> Result<BTreeMap<String, String>> {
    Ok(work
        .refs()?
        .into_iter()
        .filter(|(k, _)| k.starts_with("refs/heads/") || k.starts_with("refs/tags/"))
        .collect())
}

#[test]
fn push_to_empty_then_clone_v0_and_v2() -> Result<()> {
    let c = Cluster::shared();
    let p = push_initial(c, "push-clone")?;
    let expected = pushable_refs(&p.work)?;
    let server = p.git.remote_refs(&p.url)?;
    ensure!(
        server == expected,
        "server refs {server:?} != pushed {expected:?}"
    );
    // Annotated tags are advertised peeled too.
    let peeled = p.git.ls_remote(&p.url)?;
    ensure!(
        peeled.get("refs/tags/v1.0^{}") == expected.get("refs/heads/main"),
        "peeled tag missing or wrong: {peeled:?}"
    );
    let symref = p
        .git
        .cmd(p.git.home())
        .args(["ls-remote", "--symref", &p.url, "HEAD"])
        .ok()?;
    ensure!(
        symref.stdout.contains("ref: refs/heads/main\tHEAD"),
        "HEAD is not advertised as a symref to main: {symref}"
    );
    for v in [0u8, 2] {
        let git = p.git.with_protocol(v);
        let clone = git.clone_repo(&p.url, git.scratch(&format!("clone-v{v}")), &["-q"])?;
        assert_clone_matches(&clone, &server)?;
        ensure!(
            clone.run(["symbolic-ref", "HEAD"])? == "refs/heads/main",
            "v{v}: clone did not check out main"
        );
        ensure!(clone.head()? == expected["refs/heads/main"]);
        ensure!(
            clone.run(["cat-file", "-t", "v1.0"])? == "tag",
            "v{v}: v1.0 not annotated"
        );
        ensure!(clone.run(["cat-file", "-t", "light"])? == "commit");
        ensure!(clone.run(["rev-list", "--count", "origin/feature"])? == "5");
        // Content round-trips.
        ensure!(
            std::fs::read_to_string(clone.path.join("README.md"))?
                == std::fs::read_to_string(p.work.path.join("README.md"))?
        );
    }
    Ok(())
}

#[test]
fn bare_and_mirror_clones_copy_every_ref() -> Result<()> {
    let c = Cluster::shared();
    let p = push_initial(c, "mirror")?;
    let expected = pushable_refs(&p.work)?;
    for v in [0u8, 2] {
        let git = p.git.with_protocol(v);
        let m = git.clone_repo(&p.url, git.scratch("mirror"), &["-q", "--mirror"])?;
        m.assert_fsck_clean()?;
        ensure!(m.refs()? == expected, "v{v} mirror refs {:?}", m.refs()?);
    }
    Ok(())
}

#[test]
fn incremental_fetch_both_protocols() -> Result<()> {
    let c = Cluster::shared();
    let p = push_initial(c, "fetch")?;
    let mut clones = Vec::new();
    for v in [0u8, 2] {
        let git = p.git.with_protocol(v);
        clones.push(git.clone_repo(&p.url, git.scratch(&format!("clone-v{v}")), &["-q"])?);
    }
    // Round 1: new commits on main and feature, a new branch, a new tag.
    p.work.commit_n("README.md", 2, "more")?;
    p.work.run(["checkout", "-q", "-b", "topic", "main~1"])?;
    p.work.commit_n("topic.txt", 3, "topic")?;
    p.work.run(["checkout", "-q", "feature"])?;
    p.work.commit_n("feature.txt", 1, "feature-more")?;
    p.work.run(["checkout", "-q", "main"])?;
    p.work
        .run(["tag", "-a", "-m", "release 2.0", "v2.0", "main"])?;
    p.work
        .run(["push", "-q", "origin", "main", "feature", "topic", "v2.0"])?;
    let server = p.git.remote_refs(&p.url)?;
    ensure!(server == pushable_refs(&p.work)?);
    for clone in &clones {
        clone.run(["fetch", "-q", "origin"])?;
        assert_clone_matches(clone, &server)?;
    }

    // Round 2: a tag on a commit every clone already has is still followed.
    p.work
        .run(["tag", "-a", "-m", "late tag", "late", "main~3"])?;
    p.work.run(["tag", "late-light", "main~4"])?;
    p.work.run(["push", "-q", "origin", "late", "late-light"])?;
    let server = p.git.remote_refs(&p.url)?;
    for clone in &clones {
        clone.run(["fetch", "-q", "origin"])?;
        assert_clone_matches(clone, &server)?;
        ensure!(clone.rev_parse("late^{commit}")? == p.work.rev_parse("main~3")?);
    }

    // Round 3: include-tag: an annotated tag on a new commit comes with a
    // fetch of just that branch.
    let new_head = p.work.commit_file("README.md", "rewritten\n", "rewrite")?;
    p.work
        .run(["tag", "-a", "-m", "release 3.0", "v3.0", "main"])?;
    p.work.run(["push", "-q", "origin", "main", "v3.0"])?;
    let server = p.git.remote_refs(&p.url)?;
    for clone in &clones {
        clone.run(["fetch", "-q", "origin", "main:refs/remotes/origin/main"])?;
        ensure!(clone.rev_parse("origin/main")? == new_head);
        ensure!(
            clone.rev_parse("refs/tags/v3.0")? == server["refs/tags/v3.0"],
            "tag v3.0 not followed"
        );
        assert_clone_matches(clone, &server)?;
    }
    // Nothing new: a fetch is a no-op and refs stay put.
    for clone in &clones {
        let o = clone.cmd().args(["fetch", "origin"]).ok()?;
        ensure!(o.stderr.trim().is_empty(), "no-op fetch printed: {o}");
        assert_clone_matches(clone, &server)?;
    }
    Ok(())
}

#[test]
fn delete_branch_and_force_push() -> Result<()> {
    let c = Cluster::shared();
    let p = push_initial(c, "force")?;
    let git = p.git.with_protocol(2);
    let other = git.clone_repo(&p.url, git.scratch("other"), &["-q"])?;

    // Delete a branch.
    p.work.run(["push", "-q", "origin", ":feature"])?;
    let server = p.git.remote_refs(&p.url)?;
    ensure!(!server.contains_key("refs/heads/feature"), "{server:?}");
    ensure!(server.contains_key("refs/heads/main"));
    other.run(["fetch", "-q", "--prune", "origin"])?;
    assert_clone_matches(&other, &server)?;

    // Rewrite main: a plain push is refused, a forced one goes through.
    let old_main = p.work.rev_parse("main")?;
    p.work.run(["reset", "-q", "--hard", "main~2"])?;
    let rewritten = p
        .work
        .commit_file("README.md", "another past\n", "rewrite history")?;
    let o = p.work.cmd().args(["push", "origin", "main"]).fails()?;
    ensure!(o.all_lower().contains("rejected"), "{o}");
    ensure!(p.git.remote_refs(&p.url)?["refs/heads/main"] == old_main);
    p.work.run(["push", "-q", "origin", "+main"])?;
    let server = p.git.remote_refs(&p.url)?;
    ensure!(server["refs/heads/main"] == rewritten);

    // Another clone sees the forced update.
    let o = other.cmd().args(["fetch", "origin"]).ok()?;
    ensure!(o.stderr.contains("forced update"), "{o}");
    assert_clone_matches(&other, &server)?;
    // And a fresh clone has the rewritten history only.
    let fresh = git.clone_repo(&p.url, git.scratch("fresh"), &["-q"])?;
    assert_clone_matches(&fresh, &server)?;
    ensure!(fresh.run(["rev-list", "--count", "HEAD"])? == "2");
    // Tag deletion, too.
    p.work.run(["push", "-q", "origin", ":refs/tags/light"])?;
    ensure!(!p.git.remote_refs(&p.url)?.contains_key("refs/tags/light"));
    Ok(())
}

#[test]
fn push_options_are_accepted() -> Result<()> {
    let c = Cluster::shared();
    let p = push_initial(c, "pushopt")?;
    let head = p
        .work
        .commit_file("ci.txt", "skip me\n", "with push options")?;
    p.work
        .cmd()
        .args(["push", "-q", "-o", "ci.skip", "-o", "x=y", "origin", "main"])
        .ok()?;
    ensure!(p.git.remote_refs(&p.url)?["refs/heads/main"] == head);
    // Also on a branch creation and with the atomic flag.
    p.work.run(["branch", "opt-branch", "main~1"])?;
    p.work
        .cmd()
        .args(["push", "-q", "--atomic", "-o", "a", "origin", "opt-branch"])
        .ok()?;
    let server = p.git.remote_refs(&p.url)?;
    ensure!(server == pushable_refs(&p.work)?, "{server:?}");
    let _ = &p.full;
    Ok(())
}

#[test]
fn push_of_many_refs_and_deep_paths() -> Result<()> {
    let c = Cluster::shared();
    let git = Git::new()?;
    let full = c.new_repo("many-refs")?;
    let url = c.repo_url(&full);
    let work = git.init(git.scratch("work"))?;
    work.write_file("deep/a/b/c/d/e/f.txt", "deep\n")?;
    work.write_file(
        "bin.dat",
        (0u8..=255).cycle().take(70_000).collect::<Vec<u8>>(),
    )?;
    work.write_file("empty", "")?;
    work.run(["add", "-A"])?;
    work.run(["commit", "-q", "-m", "tree shapes"])?;
    for i in 0..60 {
        work.run(["branch", &format!("b/{i:03}")])?;
    }
    work.run(["push", "-q", &url, "refs/heads/*:refs/heads/*"])?;
    let server = git.remote_refs(&url)?;
    ensure!(server.len() == 61, "{} refs on the server", server.len());
    for v in [0u8, 2] {
        let g = git.with_protocol(v);
        let clone = g.clone_repo(&url, g.scratch("clone"), &["-q"])?;
        assert_clone_matches(&clone, &server)?;
        ensure!(
            std::fs::read(clone.path.join("bin.dat"))? == std::fs::read(work.path.join("bin.dat"))?
        );
    }
    Ok(())
}

#[test]
fn data_survives_a_restart() -> Result<()> {
    let mut c = Cluster::start()?;
    let p = push_initial(&c, "restart")?;
    let before = p.git.remote_refs(&p.url)?;
    c.restart()?;
    // The port may change: rebuild the URL.
    let url = c.repo_url(&p.full);
    ensure!(
        p.git.remote_refs(&url)? == before,
        "refs changed across a restart"
    );
    for v in [0u8, 2] {
        let git = p.git.with_protocol(v);
        let clone = git.clone_repo(&url, git.scratch("after-restart"), &["-q"])?;
        assert_clone_matches(&clone, &before)?;
    }
    // Still writable, and the write survives a second restart.
    p.work.run(["remote", "set-url", "origin", &url])?;
    let head = p
        .work
        .commit_file("after.txt", "after restart\n", "after restart")?;
    p.work.run(["push", "-q", "origin", "main"])?;
    c.restart()?;
    let url = c.repo_url(&p.full);
    let after = p.git.remote_refs(&url)?;
    ensure!(after["refs/heads/main"] == head);
    let clone = p
        .git
        .clone_repo(&url, p.git.scratch("after-second"), &["-q"])?;
    assert_clone_matches(&clone, &after)?;
    // A repository created before the restarts is still listed as existing.
    let r = c
        .request("POST", &format!("/2.0/repositories/{}", p.full))
        .send(c.http_url())?;
    ensure!(
        r.status == 400 || r.status == 409,
        "re-create after restart: {}",
        r.status
    );
    Ok(())
}

#[test]
fn clone_of_an_empty_repository_then_push_from_it() -> Result<()> {
    let c = Cluster::shared();
    let git = Git::new()?;
    for v in [0u8, 2] {
        let g = git.with_protocol(v);
        let full = c.new_repo(&format!("empty-v{v}"))?;
        let url = c.repo_url(&full);
        let dest = g.scratch("empty");
        let out = g
            .cmd(g.home())
            .args(["clone", &url, &dest.display().to_string()])
            .ok()?;
        ensure!(out.stderr.contains("empty repository"), "v{v}: {out}");
        let clone = g.repo(&dest);
        ensure!(clone.refs()?.is_empty());
        let head = clone.commit_file("first.txt", "first\n", "first commit")?;
        clone.run(["push", "-q", "origin", "main"])?;
        let server = g.remote_refs(&url)?;
        ensure!(
            server.get("refs/heads/main") == Some(&head),
            "v{v}: {server:?}"
        );
        clone.run(["fetch", "-q", "origin"])?;
        assert_clone_matches(&clone, &server)?;
    }
    Ok(())
}

#[test]
fn merges_orphan_roots_and_a_large_blob() -> Result<()> {
    let c = Cluster::shared();
    let git = Git::new()?;
    let full = c.new_repo("shapes")?;
    let url = c.repo_url(&full);
    let work = git.init(git.scratch("work"))?;
    work.commit_n("a.txt", 2, "main")?;
    work.run(["checkout", "-q", "-b", "topic"])?;
    work.commit_n("b.txt", 2, "topic")?;
    work.run(["checkout", "-q", "main"])?;
    work.commit_n("c.txt", 1, "main-more")?;
    work.run(["merge", "-q", "--no-ff", "-m", "merge topic", "topic"])?;
    ensure!(work.run(["rev-list", "--count", "--merges", "HEAD"])? == "1");
    // A second root.
    work.run(["switch", "-q", "--orphan", "pages"])?;
    // 6 MiB that does not compress: exercises streaming in both directions.
    let mut rng = Rng::new(99);
    let big: Vec<u8> = (0..6 * 1024 * 1024 / 8)
        .flat_map(|_| rng.next_u64().to_le_bytes())
        .collect();
    work.write_file("big.bin", &big)?;
    work.run(["add", "big.bin"])?;
    work.run(["commit", "-q", "-m", "orphan root with a big blob"])?;
    work.run(["checkout", "-q", "main"])?;
    work.run(["push", "-q", &url, "main", "topic", "pages"])?;
    let server = git.remote_refs(&url)?;
    ensure!(server == pushable_refs(&work)?, "{server:?}");
    for v in [0u8, 2] {
        let g = git.with_protocol(v);
        let clone = g.clone_repo(&url, g.scratch("clone"), &["-q"])?;
        assert_clone_matches(&clone, &server)?;
        ensure!(clone.run(["rev-list", "--count", "--merges", "origin/main"])? == "1");
        clone.run(["checkout", "-q", "pages"])?;
        ensure!(
            std::fs::read(clone.path.join("big.bin"))? == big,
            "v{v}: big blob differs"
        );
    }
    Ok(())
}
