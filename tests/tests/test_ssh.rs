//! Git over SSH with the stock OpenSSH client, against a `cairn dev`
//! cluster: the core git scenarios (push to an empty repository, clone
//! v0 and v2, incremental fetch, shallow and partial clone, branch delete,
//! `--atomic`, a force push refused by a branch restriction) with `git
//! fsck --full` clean and refs matching; and who gets in — unknown keys
//! are refused by the SSH layer, a user's key acts as the user (a private
//! repository they cannot read is "not found"), a deploy key only reads,
//! a removed key stops working, and nothing but git's two commands runs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use cairn_tests::*;

fn cairn_ok(c: &Cluster, args: &[&str]) -> Result<String> {
    let out = c.cli(args)?;
    ensure!(
        out.status.success(),
        "cairn {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A fresh ed25519 key pair in `dir`; returns the private key's path.
fn keygen(dir: &Path, name: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(name);
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&path)
        .output()?;
    ensure!(
        out.status.success(),
        "ssh-keygen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(path)
}

/// `GIT_SSH_COMMAND` using only `key`, trusting the test's host key.
fn ssh_command(key: &Path) -> String {
    format!(
        "ssh -i {} -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=no \
         -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
        key.display()
    )
}

/// A git command in `dir` authenticating with `key`.
fn git_as(git: &Git, dir: &Path, key: &Path) -> GitCmd {
    git.cmd(dir).env("GIT_SSH_COMMAND", &ssh_command(key))
}

/// Polls until `ls-remote` with `key` answers as `ok` says (keys reach the
/// router within the 2 s bound).
fn until(git: &Git, key: &Path, url: &str, ok: bool) -> Result<()> {
    let start = Instant::now();
    loop {
        let out = git_as(git, git.home(), key)
            .args(["ls-remote", url])
            .output()?;
        if out.success() == ok {
            return Ok(());
        }
        ensure!(
            start.elapsed() < Duration::from_secs(4),
            "ls-remote still {out}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn git_over_openssh_core_scenarios_and_who_gets_in() -> Result<()> {
    let c = Cluster::start()?;
    let ssh = c.info().ssh_url.clone();
    ensure!(
        ssh.starts_with("ssh://git@"),
        "no SSH URL in dev-cluster.json: {ssh:?}"
    );
    let git = Git::new()?;
    let keys = git.scratch("keys");
    let full = c.new_repo("over-ssh")?;
    let url = format!("{ssh}/{full}.git");

    cairn_ok(&c, &["user", "add", "dev"])?;
    cairn_ok(&c, &["perm", "grant", "dev", &full, "write"])?;
    let dev = keygen(&keys, "dev")?;
    cairn_ok(
        &c,
        &[
            "ssh-key",
            "add",
            "dev",
            &dev.with_extension("pub").display().to_string(),
        ],
    )?;
    until(&git, &dev, &url, true)?;

    // Push to the empty repository, then clone with v0 and v2.
    let work = git.init(git.scratch("work"))?;
    let mut tips = Vec::new();
    for n in 0..5 {
        tips.push(work.commit_file("f.txt", &format!("{n}\n"), &format!("c{n}"))?);
    }
    git_as(&git, &work.path, &dev)
        .args([
            "push",
            "-q",
            &url,
            "HEAD:refs/heads/main",
            "HEAD:refs/heads/topic",
        ])
        .ok()?;
    let expected = git.ls_remote(&c.repo_url(&full))?;
    ensure!(
        expected.get("refs/heads/main") == tips.last(),
        "{expected:?}"
    );
    for v in ["0", "2"] {
        let dest = git.scratch(&format!("clone-v{v}"));
        git_as(&git, git.home(), &dev)
            .args(["-c", &format!("protocol.version={v}"), "clone", "-q", &url])
            .arg(&dest)
            .ok()?;
        let clone = git.repo(&dest);
        clone.assert_fsck_clean()?;
        assert_clone_matches(&clone, &expected)?;
    }

    // The scp-like form of a port-22 deployment (the port from ssh_config).
    let port = ssh.rsplit(':').next().context("port")?.to_owned();
    let host = ssh
        .trim_start_matches("ssh://")
        .rsplit_once(':')
        .map(|(h, _)| h.to_owned())
        .context("host")?;
    let (user, hostname) = host.split_once('@').context("user@host")?;
    let config = keys.join("ssh_config");
    std::fs::write(
        &config,
        format!(
            "Host cairn\n  HostName {hostname}\n  Port {port}\n  User {user}\n  IdentityFile {}\n  \
             IdentitiesOnly yes\n  BatchMode yes\n  StrictHostKeyChecking no\n  \
             UserKnownHostsFile /dev/null\n  LogLevel ERROR\n",
            dev.display()
        ),
    )?;
    let scp = git
        .cmd(git.home())
        .env("GIT_SSH_COMMAND", &format!("ssh -F {}", config.display()))
        .args(["ls-remote", &format!("cairn:{full}.git")])
        .ok()?;
    ensure!(
        parse_ref_listing(&scp.stdout).get("refs/heads/main") == tips.last(),
        "scp-like URL: {scp}"
    );

    // Incremental fetch.
    let dest = git.scratch("fetcher");
    git_as(&git, git.home(), &dev)
        .args(["clone", "-q", &url])
        .arg(&dest)
        .ok()?;
    let more = work.commit_file("g.txt", "more\n", "more")?;
    git_as(&git, &work.path, &dev)
        .args(["push", "-q", &url, "HEAD:refs/heads/main"])
        .ok()?;
    git_as(&git, &dest, &dev)
        .args(["fetch", "-q", "origin"])
        .ok()?;
    ensure!(
        git.repo(&dest).rev_parse("origin/main")? == more,
        "fetch missed {more}"
    );
    git.repo(&dest).assert_fsck_clean()?;

    // Shallow and partial clones.
    let shallow = git.scratch("shallow");
    git_as(&git, git.home(), &dev)
        .args(["clone", "-q", "--depth", "1", &url])
        .arg(&shallow)
        .ok()?;
    let count = git.repo(&shallow).run(["rev-list", "--count", "HEAD"])?;
    ensure!(count.trim() == "1", "a shallow clone has {count} commits");
    let partial = git.scratch("partial");
    git_as(&git, git.home(), &dev)
        .args(["clone", "-q", "--filter=blob:none", &url])
        .arg(&partial)
        .ok()?;
    ensure!(
        git.repo(&partial).rev_parse("HEAD")? == more,
        "partial clone HEAD"
    );

    // --atomic, then a branch delete.
    let atomic = work.commit_file("h.txt", "x\n", "atomic")?;
    git_as(&git, &work.path, &dev)
        .args([
            "push",
            "-q",
            "--atomic",
            &url,
            "HEAD:refs/heads/main",
            "HEAD:refs/heads/side",
        ])
        .ok()?;
    git_as(&git, &work.path, &dev)
        .args(["push", "-q", &url, "--delete", "topic"])
        .ok()?;
    let refs = git.ls_remote(&c.repo_url(&full))?;
    ensure!(
        refs.get("refs/heads/main") == Some(&atomic)
            && refs.get("refs/heads/side") == Some(&atomic)
            && !refs.contains_key("refs/heads/topic"),
        "after atomic push and delete: {refs:?}"
    );

    // A force push refused by a branch restriction, in git's words.
    let r = c
        .request(
            "POST",
            &format!("/2.0/repositories/{full}/branch-restrictions"),
        )
        .header("Content-Type", "application/json")
        .body(br#"{"kind":"force","branch_match_kind":"glob","pattern":"main"}"#)
        .send(c.http_url())?;
    ensure!(r.status == 201, "restriction: {} {}", r.status, r.text());
    work.run(["reset", "-q", "--hard", &tips[0]])?;
    work.commit_file("x.txt", "rewrite\n", "rewrite")?;
    let forced = git_as(&git, &work.path, &dev)
        .args(["push", "--force", &url, "HEAD:refs/heads/main"])
        .fails()?;
    ensure!(
        forced
            .stderr
            .contains("[remote rejected] HEAD -> main (non-fast-forward)"),
        "force push over SSH: {forced}"
    );
    ensure!(
        git.ls_remote(&c.repo_url(&full))?.get("refs/heads/main") == Some(&atomic),
        "main moved"
    );

    // An unknown key never gets past SSH authentication.
    let stranger = keygen(&keys, "stranger")?;
    let out = git_as(&git, git.home(), &stranger)
        .args(["ls-remote", &url])
        .fails()?;
    ensure!(
        out.stderr.contains("Permission denied (publickey)"),
        "unknown key: {out}"
    );

    // A user without access: the repository does not exist.
    cairn_ok(&c, &["user", "add", "nobody"])?;
    let nobody = keygen(&keys, "nobody")?;
    cairn_ok(
        &c,
        &[
            "ssh-key",
            "add",
            "nobody",
            &nobody.with_extension("pub").display().to_string(),
        ],
    )?;
    let missing = format!("{ssh}/{WORKSPACE}/no-such-repo.git");
    until(&git, &nobody, &missing, false)?;
    let start = Instant::now();
    let hidden = loop {
        let out = git_as(&git, git.home(), &nobody)
            .args(["ls-remote", &url])
            .fails()?;
        if out.stderr.contains("Repository not found") || start.elapsed() > Duration::from_secs(4) {
            break out;
        }
        thread::sleep(Duration::from_millis(100));
    };
    let absent = git_as(&git, git.home(), &nobody)
        .args(["ls-remote", &missing])
        .fails()?;
    ensure!(
        hidden.stderr.contains("Repository not found"),
        "no access: {hidden}"
    );
    ensure!(
        hidden.stderr.replace(&full, "X")
            == absent
                .stderr
                .replace(&format!("{WORKSPACE}/no-such-repo"), "X"),
        "private and missing differ:\n{hidden}\n{absent}"
    );

    // A reader cannot push.
    cairn_ok(&c, &["perm", "grant", "nobody", &full, "read"])?;
    until(&git, &nobody, &url, true)?;
    let out = git_as(&git, &work.path, &nobody)
        .args(["push", &url, "HEAD:refs/heads/reader"])
        .fails()?;
    ensure!(out.stderr.contains("ERROR"), "a reader pushing: {out}");

    // A deploy key reads its repository only.
    let deploy = keygen(&keys, "deploy")?;
    let public = std::fs::read_to_string(deploy.with_extension("pub"))?;
    let body = serde_json::json!({"key": public.trim(), "label": "ci"}).to_string();
    let r = c
        .request("POST", &format!("/2.0/repositories/{full}/deploy-keys"))
        .header("Content-Type", "application/json")
        .body(body.as_bytes())
        .send(c.http_url())?;
    ensure!(r.status == 201, "deploy key: {} {}", r.status, r.text());
    until(&git, &deploy, &url, true)?;
    let out = git_as(&git, &work.path, &deploy)
        .args(["push", &url, "HEAD:refs/heads/deploy"])
        .fails()?;
    ensure!(out.stderr.contains("ERROR"), "a deploy key pushing: {out}");
    let other = c.new_repo("other")?;
    let out = git_as(&git, git.home(), &deploy)
        .args(["ls-remote", &format!("{ssh}/{other}.git")])
        .fails()?;
    ensure!(
        out.stderr.contains("Repository not found"),
        "deploy key elsewhere: {out}"
    );

    // A removed key stops working.
    let listed = cairn_ok(&c, &["ssh-key", "list", "dev"])?;
    let fingerprint = listed
        .split_whitespace()
        .next()
        .context("dev's key")?
        .to_owned();
    cairn_ok(&c, &["ssh-key", "remove", &fingerprint])?;
    until(&git, &dev, &url, false)?;

    // Nothing but git's two commands.
    for command in [
        None,
        Some("cat /etc/passwd"),
        Some("git-upload-archive 'x/y.git'"),
    ] {
        let mut ssh_cmd = Command::new("ssh");
        ssh_cmd.args(["-i"]).arg(&nobody).args([
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-T",
            "-p",
            &port,
            &host,
        ]);
        if let Some(c) = command {
            ssh_cmd.arg(c);
        }
        let out = ssh_cmd.output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && (err.contains("no shell") || err.contains("only git")),
            "{command:?} over SSH: {:?} {err}",
            out.status
        );
    }
    Ok(())
}

/// Leader elections take 1–2 s; a node restart in a debug build a few more.
const LEADER_TIMEOUT: Duration = Duration::from_secs(60);
const REJOIN_TIMEOUT: Duration = Duration::from_secs(90);

#[test]
fn ssh_pushes_survive_leader_kills() -> Result<()> {
    const REPOS: usize = 2;
    const CLIENTS_PER_REPO: usize = 2;
    const ROUNDS: usize = 6;
    let started = Instant::now();
    let mut c = Cluster::start_with_nodes(3)?;
    c.wait_leader(LEADER_TIMEOUT)?;
    let ssh = c.info().ssh_url.clone();
    let git = Git::new()?;
    // Every git command of this environment, the pushers' included, goes
    // over SSH as `dev`.
    let key = keygen(&git.scratch("keys"), "dev")?;
    let config = git.home().join(".gitconfig");
    let mut text = std::fs::read_to_string(&config)?;
    text.push_str(&format!("[core]\n\tsshCommand = {}\n", ssh_command(&key)));
    std::fs::write(&config, text)?;
    cairn_ok(&c, &["user", "add", "dev"])?;
    cairn_ok(
        &c,
        &[
            "ssh-key",
            "add",
            "dev",
            &key.with_extension("pub").display().to_string(),
        ],
    )?;
    let repos = (0..REPOS)
        .map(|i| c.new_repo(&format!("ssh-failover{i}")))
        .collect::<Result<Vec<_>>>()?;
    for full in &repos {
        cairn_ok(&c, &["perm", "grant", "dev", full, "write"])?;
    }
    until(&git, &key, &format!("{ssh}/{}.git", repos[0]), true)?;
    let mut pushers = Vec::new();
    for (i, full) in repos.iter().enumerate() {
        for k in 0..CLIENTS_PER_REPO {
            let url = format!("{ssh}/{full}.git");
            pushers.push(BranchPusher::new(&git, &url, &format!("ssh{i}-{k}"))?);
        }
    }
    let threads = PusherThreads::start(pushers);
    threads.wait_accepted(REPOS * CLIENTS_PER_REPO, LEADER_TIMEOUT)?;
    for round in 0..ROUNDS {
        let leader = c.wait_leader(LEADER_TIMEOUT)?;
        let before = threads.accepted();
        c.kill_node(leader)?;
        let killed = Instant::now();
        wait_until("the survivors to elect a leader", LEADER_TIMEOUT, || {
            Ok(c.leader().filter(|&l| l != leader))
        })?;
        thread::sleep(Duration::from_millis(300));
        c.restart_node(leader)?;
        c.wait_rejoined(leader, REJOIN_TIMEOUT)
            .with_context(|| format!("round {round}: node {leader} did not rejoin"))?;
        println!(
            "round {round}: killed leader {leader}, back after {:?}; {} pushes accepted meanwhile",
            killed.elapsed(),
            threads.accepted() - before
        );
    }
    let pushers = threads.finish()?;
    // Every push git reported accepted is there; none refused is.
    let mut total = PushTally::default();
    let mut violations = Vec::new();
    for full in &repos {
        let clone = git.clone_repo(&c.repo_url(full), git.scratch("verify"), &[])?;
        clone.assert_fsck_clean()?;
        let url = format!("{ssh}/{full}.git");
        for p in pushers.iter().filter(|p| p.url == url) {
            match p.verify(&clone) {
                Ok(t) => total.add(&t),
                Err(e) => violations.push(format!("{full} {}: {e:#}", p.branch)),
            }
        }
    }
    print_failure_reasons(&pushers);
    ensure!(violations.is_empty(), "{}", violations.join("\n"));
    println!(
        "{ROUNDS} leader kills, {} SSH clients: {total}; took {:?}",
        pushers.len(),
        started.elapsed()
    );
    ensure!(total.accepted > 0, "no push over SSH was ever accepted");
    Ok(())
}
