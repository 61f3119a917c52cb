//! Branch restrictions end to end: created, read, changed and deleted over
//! Bitbucket's REST paths by a repository admin, and enforced by
//! receive-pack against the real git client with git's own wording —
//! force pushes and deletions of `main` refused, pushes to `release/*`
//! only by the users the restriction names — while nothing a refused push
//! sent changes the repository. Pushes and repository creation carry
//! their actor into the event log.

use std::thread;
use std::time::Duration;

use anyhow::{ensure, Context};
use cairn_tests::*;
use serde_json::Value;

/// Grants and tokens reach the router within this.
const PROPAGATION: Duration = Duration::from_millis(2500);

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

/// `http://USER:TOKEN@host/FULL.git`.
fn url_as(c: &Cluster, user: &str, token: &str, full: &str) -> String {
    let host = c.http_url().trim_start_matches("http://");
    format!(
        "http://{}:{}@{host}/{full}.git",
        percent_encode(user),
        percent_encode(token)
    )
}

fn basic(user: &str, token: &str) -> String {
    format!("Basic {}", base64(format!("{user}:{token}").as_bytes()))
}

fn rest(
    c: &Cluster,
    auth: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<HttpResponse> {
    let mut r = HttpRequest::new(method, path).header("Authorization", auth);
    if let Some(b) = body {
        r = r
            .header("Content-Type", "application/json")
            .body(b.as_bytes());
    }
    r.send(c.http_url())
}

#[test]
fn branch_restrictions_refuse_force_pushes_and_deletions_in_gits_words() -> Result<()> {
    let c = Cluster::start()?;
    let git = Git::new()?;
    let full = c.new_repo("restricted")?;
    let admin = c.basic_auth();

    // A developer with write access.
    cairn_ok(&c, &["user", "add", "dev"])?;
    cairn_ok(&c, &["perm", "grant", "dev", &full, "write"])?;
    let dev_token = cairn_ok(&c, &["token", "create", "--user", "dev"])?;
    cairn_ok(&c, &["user", "add", "outsider"])?;
    let outsider_token = cairn_ok(&c, &["token", "create", "--user", "outsider"])?;
    thread::sleep(PROPAGATION);
    let dev_url = url_as(&c, "dev", &dev_token, &full);

    let work = git.init(git.scratch("restricted"))?;
    let first = work.commit_file("a.txt", "1\n", "first")?;
    let second = work.commit_file("a.txt", "2\n", "second")?;
    work.cmd()
        .args([
            "push",
            "-q",
            &dev_url,
            "HEAD:refs/heads/main",
            "HEAD:refs/heads/topic",
        ])
        .ok()?;

    // Only an admin of the repository sees or changes restrictions; to
    // one who cannot read it, the repository does not exist.
    let path = format!("/2.0/repositories/{full}/branch-restrictions");
    let as_dev = rest(&c, &basic("dev", &dev_token), "GET", &path, None)?;
    ensure!(
        as_dev.status == 403,
        "dev lists restrictions: {} {}",
        as_dev.status,
        as_dev.text()
    );
    let as_outsider = rest(&c, &basic("outsider", &outsider_token), "GET", &path, None)?;
    ensure!(
        as_outsider.status == 404,
        "outsider lists restrictions: {} {}",
        as_outsider.status,
        as_outsider.text()
    );

    let mut ids = Vec::new();
    for body in [
        r#"{"kind":"force","branch_match_kind":"glob","pattern":"main"}"#,
        r#"{"kind":"delete","branch_match_kind":"branching_model","branch_type":"development"}"#,
        r#"{"kind":"push","branch_match_kind":"glob","pattern":"release/*","users":[{"username":"admin"}]}"#,
    ] {
        let r = rest(&c, &admin, "POST", &path, Some(body))?;
        ensure!(r.status == 201, "POST {body}: {} {}", r.status, r.text());
        let v = r.json()?;
        ensure!(v["type"] == "branchrestriction", "shape: {v}");
        ids.push(v["id"].as_u64().context("id")?);
    }
    // Bad input is refused with the field named, and stores nothing.
    let bad = rest(
        &c,
        &admin,
        "POST",
        &path,
        Some(r#"{"kind":"sideways","pattern":"x"}"#),
    )?;
    ensure!(bad.status == 400, "bad kind: {} {}", bad.status, bad.text());
    let listed = rest(&c, &admin, "GET", &path, None)?.json()?;
    ensure!(listed["size"] == 3, "three restrictions: {listed}");
    let kinds: Vec<&str> = listed["values"]
        .as_array()
        .context("values")?
        .iter()
        .filter_map(|v| v["kind"].as_str())
        .collect();
    ensure!(kinds == ["force", "delete", "push"], "kinds {kinds:?}");
    thread::sleep(Duration::from_millis(200));

    // A force push to main: refused with git's words, main unchanged.
    work.run(["reset", "-q", "--hard", &first])?;
    let rewritten = work.commit_file("b.txt", "other\n", "rewritten")?;
    let forced = work
        .cmd()
        .args(["push", "--force", &dev_url, "HEAD:refs/heads/main"])
        .fails()?;
    ensure!(
        forced
            .stderr
            .contains("[remote rejected] HEAD -> main (non-fast-forward)"),
        "force push: {forced}"
    );
    // The same rewrite of an unrestricted branch goes through.
    work.cmd()
        .args(["push", "-q", "--force", &dev_url, "HEAD:refs/heads/topic"])
        .ok()?;
    let deleted = work
        .cmd()
        .args(["push", &dev_url, "--delete", "main"])
        .fails()?;
    ensure!(
        deleted
            .stderr
            .contains("[remote rejected] main (deletion prohibited)"),
        "delete: {deleted}"
    );
    let refs = git.ls_remote(&c.repo_url(&full))?;
    ensure!(
        refs.get("refs/heads/main") == Some(&second),
        "main moved: {refs:?}"
    );
    ensure!(
        refs.get("refs/heads/topic") == Some(&rewritten),
        "topic: {refs:?}"
    );

    // A fast-forward is still fine.
    work.run(["reset", "-q", "--hard", &second])?;
    let third = work.commit_file("a.txt", "3\n", "third")?;
    work.cmd()
        .args(["push", "-q", &dev_url, "HEAD:refs/heads/main"])
        .ok()?;

    // release/*: only the named user pushes.
    let release = work
        .cmd()
        .args(["push", &dev_url, "HEAD:refs/heads/release/1"])
        .fails()?;
    ensure!(
        release
            .stderr
            .contains("[remote rejected] HEAD -> release/1")
            && release.stderr.contains("branch restriction"),
        "dev pushing release/1: {release}"
    );
    work.cmd()
        .args([
            "push",
            "-q",
            &c.repo_url(&full),
            "HEAD:refs/heads/release/1",
        ])
        .ok()?;

    // An atomic push with one refused ref changes nothing.
    let fourth = work.commit_file("a.txt", "4\n", "fourth")?;
    let atomic = work
        .cmd()
        .args([
            "push",
            "--atomic",
            &dev_url,
            "HEAD:refs/heads/main",
            "HEAD:refs/heads/release/2",
        ])
        .fails()?;
    let refs = git.ls_remote(&c.repo_url(&full))?;
    ensure!(
        refs.get("refs/heads/main") == Some(&third) && !refs.contains_key("refs/heads/release/2"),
        "atomic push half applied ({atomic}): {refs:?}"
    );
    let _ = fourth;

    // Changing and deleting restrictions over REST.
    let one = format!("{path}/{}", ids[0]);
    let put = rest(&c, &admin, "PUT", &one, Some(r#"{"pattern":"mai*"}"#))?;
    ensure!(put.status == 200, "PUT: {} {}", put.status, put.text());
    ensure!(put.json()?["pattern"] == "mai*", "PUT kept: {}", put.text());
    let del = rest(&c, &admin, "DELETE", &one, None)?;
    ensure!(del.status == 204, "DELETE: {} {}", del.status, del.text());
    let gone = rest(&c, &admin, "GET", &one, None)?;
    ensure!(
        gone.status == 404,
        "deleted restriction: {} {}",
        gone.status,
        gone.text()
    );
    work.run(["reset", "-q", "--hard", &first])?;
    work.commit_file("c.txt", "again\n", "rewritten again")?;
    work.cmd()
        .args(["push", "-q", "--force", &dev_url, "HEAD:refs/heads/main"])
        .ok()
        .context("force push after the restriction was deleted")?;

    // Every accepted push names its pusher in the event log.
    let out = c.cli(&["events", "tail", &full, "--json", "--idle-ms", "1500"])?;
    ensure!(
        out.status.success(),
        "events tail: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect();
    let created = events.iter().find(|v| v["kind"] == "repo:created");
    ensure!(
        created.is_some_and(|v| v["actor"] == "admin"),
        "the creation names its creator: {created:?}"
    );
    let actors: Vec<String> = events
        .iter()
        .filter(|v| v["kind"] == "push")
        .map(|v| v["actor"].as_str().unwrap_or_default().to_owned())
        .collect();
    ensure!(
        actors.iter().any(|a| a == "dev") && actors.iter().any(|a| a == "admin"),
        "push actors {actors:?}"
    );
    ensure!(
        actors.iter().all(|a| !a.is_empty()),
        "a push without actor: {actors:?}"
    );
    Ok(())
}
