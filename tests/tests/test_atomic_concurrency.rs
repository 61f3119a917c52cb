//! Atomic pushes and concurrent pushes to one ref.

use std::collections::BTreeMap;
use std::sync::{Arc, Barrier};
use std::thread;

use anyhow::{anyhow, ensure};
use cairn_tests::*;

/// A repository with `main`, `b1`, `b2`, pushed, plus two clones of it.
struct Setup {
    git: Git,
    url: String,
    full: String,
    a: Repo,
    b: Repo,
}

fn setup(c: &Cluster, prefix: &str) -> Result<Setup> {
    let git = Git::new()?;
    let full = c.new_repo(prefix)?;
    let url = c.repo_url(&full);
    let seed = git.init(git.scratch("seed"))?;
    seed.commit_n("base.txt", 2, "base")?;
    seed.run(["branch", "b1"])?;
    seed.run(["branch", "b2"])?;
    seed.run(["push", "-q", &url, "main", "b1", "b2"])?;
    let a = git.clone_repo(&url, git.scratch("a"), &["-q"])?;
    let b = git.clone_repo(&url, git.scratch("b"), &["-q"])?;
    for r in [&a, &b] {
        r.run(["branch", "-q", "b1", "origin/b1"])?;
        r.run(["branch", "-q", "b2", "origin/b2"])?;
    }
    Ok(Setup {
        git,
        url,
        full,
        a,
        b,
    })
}

/// New commits on main, b1 and b2 in `r` (on top of its local branches).
fn commit_on_three(r: &Repo, tag: &str) -> Result<BTreeMap<String, String>> {
    let mut m = BTreeMap::new();
    for br in ["main", "b1", "b2"] {
        r.run(["checkout", "-q", br])?;
        let id = r.commit_file(&format!("{br}.txt"), &format!("{tag} on {br}\n"), tag)?;
        m.insert(format!("refs/heads/{br}"), id);
    }
    r.run(["checkout", "-q", "main"])?;
    Ok(m)
}

fn assert_fresh_clone(s: &Setup, expected: &BTreeMap<String, String>) -> Result<()> {
    let clone = s.git.clone_repo(&s.url, s.git.scratch("verify"), &["-q"])?;
    assert_clone_matches(&clone, expected)
}

#[test]
fn atomic_push_with_a_stale_ref_applies_nothing() -> Result<()> {
    let c = Cluster::shared();
    let s = setup(c, "atomic-stale")?;
    // The server advertises atomic pushes.
    let adv = c
        .request(
            "GET",
            &format!("/{}.git/info/refs?service=git-receive-pack", s.full),
        )
        .send(c.http_url())?;
    ensure!(adv.status == 200, "{} {}", adv.status, adv.text());
    ensure!(
        adv.text().contains("atomic"),
        "no atomic capability: {}",
        adv.text()
    );

    // b1 moves on the server, from the second clone.
    s.b.run(["checkout", "-q", "b1"])?;
    let b_b1 = s.b.commit_file("other.txt", "from b\n", "b moves b1")?;
    s.b.run(["push", "-q", "origin", "b1"])?;
    let before = s.git.remote_refs(&s.url)?;
    ensure!(before["refs/heads/b1"] == b_b1);

    let mine = commit_on_three(&s.a, "a atomic")?;
    let o =
        s.a.cmd()
            .args(["push", "--atomic", "origin", "main", "b1", "b2"])
            .fails()?;
    let lower = o.all_lower();
    ensure!(
        lower.contains("rejected") || lower.contains("atomic") || lower.contains("failed"),
        "{o}"
    );
    let after = s.git.remote_refs(&s.url)?;
    ensure!(
        after == before,
        "atomic push applied something: {before:?} -> {after:?}"
    );
    ensure!(after["refs/heads/main"] != mine["refs/heads/main"]);
    assert_fresh_clone(&s, &after)?;
    Ok(())
}

/// A pre-push hook in clone `a` that moves b1 on the server from clone `b`:
/// it runs after `a` read the ref advertisement and before it sends its
/// commands, so the server itself must detect the stale b1.
fn install_racing_hook(s: &Setup) -> Result<()> {
    let hook = s.a.path.join(".git/hooks/pre-push");
    let script = format!(
        "#!/bin/sh\n\
         unset GIT_DIR GIT_WORK_TREE GIT_INDEX_FILE GIT_PREFIX GIT_QUARANTINE_PATH\n\
         cat >/dev/null\n\
         cd '{}' || exit 1\n\
         git push -q origin b1 >&2 || exit 1\n\
         exit 0\n",
        s.b.path.display()
    );
    std::fs::write(&hook, script)?;
    let status = std::process::Command::new("chmod")
        .arg("+x")
        .arg(&hook)
        .status()?;
    ensure!(status.success());
    Ok(())
}

#[test]
fn atomic_push_racing_a_ref_update_is_rejected_by_the_server() -> Result<()> {
    let c = Cluster::shared();
    let s = setup(c, "atomic-race")?;
    s.b.run(["checkout", "-q", "b1"])?;
    let b_b1 =
        s.b.commit_file("other.txt", "from b\n", "b moves b1 late")?;
    install_racing_hook(&s)?;
    let before = s.git.remote_refs(&s.url)?;
    let mine = commit_on_three(&s.a, "a atomic race")?;
    let o =
        s.a.cmd()
            .args(["push", "--atomic", "origin", "main", "b1", "b2"])
            .fails()?;
    let after = s.git.remote_refs(&s.url)?;
    // Only the hook's own push went through.
    let mut expected = before.clone();
    expected.insert("refs/heads/b1".into(), b_b1);
    ensure!(
        after == expected,
        "server refs {after:?}, expected {expected:?}\n{o}"
    );
    ensure!(after["refs/heads/main"] != mine["refs/heads/main"]);
    let lower = o.all_lower();
    ensure!(
        lower.contains("rejected") || lower.contains("failed") || lower.contains("stale"),
        "{o}"
    );
    assert_fresh_clone(&s, &after)?;
    Ok(())
}

#[test]
fn non_atomic_push_racing_a_ref_update_applies_the_others() -> Result<()> {
    let c = Cluster::shared();
    let s = setup(c, "nonatomic-race")?;
    s.b.run(["checkout", "-q", "b1"])?;
    let b_b1 =
        s.b.commit_file("other.txt", "from b\n", "b moves b1 late")?;
    install_racing_hook(&s)?;
    let mine = commit_on_three(&s.a, "a non-atomic race")?;
    let o =
        s.a.cmd()
            .args(["push", "origin", "main", "b1", "b2"])
            .fails()?;
    let after = s.git.remote_refs(&s.url)?;
    ensure!(after["refs/heads/main"] == mine["refs/heads/main"], "{o}");
    ensure!(after["refs/heads/b2"] == mine["refs/heads/b2"], "{o}");
    ensure!(
        after["refs/heads/b1"] == b_b1,
        "stale b1 was overwritten: {o}"
    );
    assert_fresh_clone(&s, &after)?;
    Ok(())
}

#[test]
fn raw_atomic_push_with_a_stale_old_id_applies_nothing() -> Result<()> {
    let c = Cluster::shared();
    let s = setup(c, "atomic-raw")?;
    let before = s.git.remote_refs(&s.url)?;
    let mine = commit_on_three(&s.a, "a raw")?;
    let main_old = &before["refs/heads/main"];
    let b2_old = &before["refs/heads/b2"];
    // b1's old id is wrong: the first base commit, while b1 is at the second.
    let stale = s.a.rev_parse(&format!("{main_old}~1"))?;
    ensure!(stale != before["refs/heads/b1"]);
    let pack = s.a.pack_objects(
        &format!(
            "{}\n{}\n{}\n^{main_old}\n",
            mine["refs/heads/main"], mine["refs/heads/b1"], mine["refs/heads/b2"]
        ),
        true,
        false,
    )?;
    let updates = [
        RefUpdate::new(main_old, &mine["refs/heads/main"], "refs/heads/main"),
        RefUpdate::new(&stale, &mine["refs/heads/b1"], "refs/heads/b1"),
        RefUpdate::new(b2_old, &mine["refs/heads/b2"], "refs/heads/b2"),
    ];
    let body = receive_pack_body(&updates, "report-status atomic agent=cairn-tests", &pack);
    let r = c
        .request("POST", &format!("/{}.git/git-receive-pack", s.full))
        .header("Content-Type", "application/x-git-receive-pack-request")
        .header("Accept", "application/x-git-receive-pack-result")
        .body(&body)
        .send(c.http_url())?;
    let rep = PushReport::parse(&r.body);
    ensure!(
        !rep.any_ok(),
        "atomic push reported success: {} {rep:?}",
        r.status
    );
    ensure!(
        r.status >= 400 || rep.refs.values().any(Option::is_some),
        "no error reported: {} {:?}",
        r.status,
        rep.text
    );
    let after = s.git.remote_refs(&s.url)?;
    ensure!(after == before, "atomic push applied something: {after:?}");

    // The same body without the stale command goes through.
    let body = receive_pack_body(
        &[updates[0].clone(), updates[2].clone()],
        "report-status atomic",
        &pack,
    );
    let r = c
        .request("POST", &format!("/{}.git/git-receive-pack", s.full))
        .header("Content-Type", "application/x-git-receive-pack-request")
        .header("Accept", "application/x-git-receive-pack-result")
        .body(&body)
        .send(c.http_url())?;
    let rep = PushReport::parse(&r.body);
    ensure!(
        r.status == 200
            && rep.unpack.as_deref() == Some("ok")
            && rep.refs.len() == 2
            && rep.refs.values().all(Option::is_none),
        "{} {rep:?}",
        r.status
    );
    let after = s.git.remote_refs(&s.url)?;
    ensure!(after["refs/heads/main"] == mine["refs/heads/main"]);
    ensure!(after["refs/heads/b2"] == mine["refs/heads/b2"]);
    ensure!(after["refs/heads/b1"] == before["refs/heads/b1"]);
    assert_fresh_clone(&s, &after)?;
    Ok(())
}

#[test]
fn concurrent_pushes_to_one_ref_have_exactly_one_winner() -> Result<()> {
    let c = Cluster::shared();
    let s = setup(c, "race")?;
    let rounds = 10;
    let mut wins = [0u32; 2];
    for round in 0..rounds {
        let mut heads = Vec::new();
        for (i, r) in [&s.a, &s.b].into_iter().enumerate() {
            r.run(["fetch", "-q", "origin"])?;
            r.run(["reset", "-q", "--hard", "origin/main"])?;
            heads.push(r.commit_file(
                "race.txt",
                &format!("round {round} from clone {i}\n"),
                &format!("round {round} clone {i}"),
            )?);
        }
        let barrier = Arc::new(Barrier::new(2));
        let handles: Vec<_> = [s.a.clone(), s.b.clone()]
            .into_iter()
            .map(|r| {
                let barrier = Arc::clone(&barrier);
                thread::spawn(move || {
                    let cmd = r.cmd().args(["push", "origin", "main"]);
                    barrier.wait();
                    cmd.output()
                })
            })
            .collect();
        let outs: Vec<GitOutput> = handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("push thread panicked"))?)
            .collect::<Result<_>>()?;
        let ok: Vec<usize> = (0..2).filter(|&i| outs[i].success()).collect();
        ensure!(
            ok.len() == 1,
            "round {round}: {} pushes succeeded:\n{}\n{}",
            ok.len(),
            outs[0],
            outs[1]
        );
        let winner = ok[0];
        let loser = &outs[1 - winner];
        if round == 0 {
            eprintln!("losing push of round 0: {loser}");
        }
        let lower = loser.all_lower();
        ensure!(
            [
                "rejected",
                "stale",
                "failed",
                "fetch first",
                "non-fast-forward"
            ]
            .iter()
            .any(|w| lower.contains(w)),
            "round {round}: unclear rejection: {loser}"
        );
        let server = s.git.remote_refs(&s.url)?;
        ensure!(
            server["refs/heads/main"] == heads[winner],
            "round {round}: server main {} is not the winner's {}",
            server["refs/heads/main"],
            heads[winner]
        );
        wins[winner] += 1;
    }
    eprintln!(
        "concurrent push winners over {rounds} rounds: clone a {}, clone b {}",
        wins[0], wins[1]
    );
    let server = s.git.remote_refs(&s.url)?;
    let clone = s.git.clone_repo(&s.url, s.git.scratch("final"), &["-q"])?;
    assert_clone_matches(&clone, &server)?;
    ensure!(clone.run(["rev-list", "--count", "HEAD"])? == (2 + rounds).to_string());
    Ok(())
}

#[test]
fn identical_concurrent_pushes_to_different_repositories_all_succeed() -> Result<()> {
    // The same history pushed at the same moment to several repositories
    // (forks, mirrors, CI): every push carries a byte-identical pack.
    let c = Cluster::shared();
    let git = Git::new()?;
    let src = git.init(git.scratch("src"))?;
    let head = src
        .commit_n("same.txt", 3, "same")?
        .pop()
        .unwrap_or_default();
    let per_round = 4;
    for round in 0..5 {
        let urls: Vec<String> = (0..per_round)
            .map(|i| Ok(c.repo_url(&c.new_repo(&format!("same-{round}-{i}"))?)))
            .collect::<Result<_>>()?;
        let barrier = Arc::new(Barrier::new(per_round));
        let handles: Vec<_> = urls
            .iter()
            .map(|url| {
                let cmd = src.cmd().args(["push", url, "main"]);
                let barrier = Arc::clone(&barrier);
                thread::spawn(move || {
                    barrier.wait();
                    cmd.output()
                })
            })
            .collect();
        for h in handles {
            let o = h.join().map_err(|_| anyhow!("push thread panicked"))??;
            ensure!(
                o.success(),
                "round {round}: identical concurrent push failed: {o}"
            );
        }
        for url in &urls {
            let refs = git.remote_refs(url)?;
            ensure!(
                refs.get("refs/heads/main") == Some(&head),
                "round {round}: {refs:?}"
            );
        }
    }
    Ok(())
}
