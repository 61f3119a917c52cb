//! The account, workspace, permission, key and token REST endpoints in
//! Bitbucket's shapes, against a `cairn dev` cluster: who sees what, that
//! changes made over REST take effect on git within seconds, that keys
//! are fingerprinted as `ssh-keygen` does, that a token never gives more
//! than the credential that made it, and that the audit log records who
//! did what from where.

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use cairn_tests::*;
use serde_json::Value;

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

fn basic(user: &str, token: &str) -> String {
    format!("Basic {}", base64(format!("{user}:{token}").as_bytes()))
}

fn call(
    c: &Cluster,
    auth: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<HttpResponse> {
    let mut r = HttpRequest::new(method, path);
    if let Some(a) = auth {
        r = r.header("Authorization", a);
    }
    if let Some(b) = body {
        r = r
            .header("Content-Type", "application/json")
            .body(b.as_bytes());
    }
    r.send(c.http_url())
}

/// Polls `path` as `auth` until it answers `status` (changes reach the
/// routers within the 2 s bound).
fn until_status(c: &Cluster, auth: &str, path: &str, status: u16) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let r = call(c, Some(auth), "GET", path, None)?;
        if r.status == status {
            return Ok(start.elapsed());
        }
        ensure!(
            start.elapsed() < Duration::from_secs(3),
            "GET {path}: still {} {} after 3 s, waiting for {status}",
            r.status,
            r.text()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

fn names(v: &Value, field: &str) -> Vec<String> {
    v["values"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.pointer(field).and_then(Value::as_str).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn accounts_workspaces_permissions_keys_and_tokens_over_rest() -> Result<()> {
    let c = Cluster::start()?;
    let git = Git::new()?;
    let ws = unique_name("acct");
    let other_ws = unique_name("elsewhere");
    let full = format!("{ws}/repo");
    c.create_repo(&full)?;
    c.create_repo(&format!("{other_ws}/hidden"))?;
    for u in ["bob", "carol"] {
        cairn_ok(
            &c,
            &[
                "user",
                "add",
                u,
                "--display-name",
                &format!("{u} the tester"),
            ],
        )?;
    }
    cairn_ok(&c, &["perm", "role", &ws, "carol", "owner"])?;
    cairn_ok(&c, &["perm", "grant", "bob", &full, "read"])?;
    let bob = cairn_ok(&c, &["token", "create", "--user", "bob"])?;
    let carol = cairn_ok(&c, &["token", "create", "--user", "carol"])?;
    let bob_auth = basic("bob", &bob);
    let carol_auth = basic("carol", &carol);
    until_status(&c, &bob_auth, "/2.0/user", 200)?;
    until_status(&c, &carol_auth, "/2.0/user", 200)?;

    // /2.0/user and /2.0/users/{user}.
    let me = call(&c, Some(&bob_auth), "GET", "/2.0/user", None)?.json()?;
    ensure!(me["type"] == "user" && me["username"] == "bob", "{me}");
    ensure!(me["display_name"] == "bob the tester", "{me}");
    ensure!(
        me["uuid"].as_str().is_some_and(|u| u.starts_with('{')),
        "{me}"
    );
    let anon = call(&c, None, "GET", "/2.0/user", None)?;
    ensure!(anon.status == 401, "anonymous /2.0/user: {}", anon.status);
    let narrow = cairn_ok(
        &c,
        &["token", "create", "--user", "bob", "--scope", "repository"],
    )?;
    let narrow_auth = basic("bob", &narrow);
    until_status(&c, &narrow_auth, &format!("/2.0/repositories/{full}"), 200)?;
    let r = call(&c, Some(&narrow_auth), "GET", "/2.0/user", None)?;
    ensure!(
        r.status == 403,
        "/2.0/user without `account`: {} {}",
        r.status,
        r.text()
    );
    let profile = call(&c, Some(&bob_auth), "GET", "/2.0/users/carol", None)?.json()?;
    ensure!(profile["username"] == "carol", "{profile}");

    // Workspaces: each sees their own; members and permissions.
    let listed = call(&c, Some(&bob_auth), "GET", "/2.0/workspaces", None)?.json()?;
    ensure!(
        names(&listed, "/slug") == [ws.clone()],
        "bob's workspaces: {listed}"
    );
    let hidden = call(
        &c,
        Some(&bob_auth),
        "GET",
        &format!("/2.0/workspaces/{other_ws}"),
        None,
    )?;
    ensure!(
        hidden.status == 404,
        "another workspace: {} {}",
        hidden.status,
        hidden.text()
    );
    let members = call(
        &c,
        Some(&bob_auth),
        "GET",
        &format!("/2.0/workspaces/{ws}/members"),
        None,
    )?
    .json()?;
    ensure!(
        names(&members, "/user/username") == ["carol"],
        "members: {members}"
    );
    let perms = call(
        &c,
        Some(&bob_auth),
        "GET",
        &format!("/2.0/workspaces/{ws}/permissions"),
        None,
    )?;
    ensure!(
        perms.status == 403,
        "bob reads workspace permissions: {}",
        perms.status
    );
    let perms = call(
        &c,
        Some(&carol_auth),
        "GET",
        &format!("/2.0/workspaces/{ws}/permissions"),
        None,
    )?
    .json()?;
    ensure!(
        perms["values"][0]["permission"] == "owner",
        "permissions: {perms}"
    );
    let mine = call(
        &c,
        Some(&bob_auth),
        "GET",
        "/2.0/user/permissions/repositories",
        None,
    )?
    .json()?;
    ensure!(
        names(&mine, "/repository/full_name") == [full.clone()]
            && mine["values"][0]["permission"] == "read",
        "bob's repositories: {mine}"
    );

    // permissions-config: the owner gives bob write; bob pushes.
    let cfg = format!("/2.0/repositories/{full}/permissions-config/users");
    let r = call(&c, Some(&bob_auth), "GET", &cfg, None)?;
    ensure!(
        r.status == 403,
        "bob reads permissions-config: {}",
        r.status
    );
    let r = call(
        &c,
        Some(&carol_auth),
        "PUT",
        &format!("{cfg}/bob"),
        Some(r#"{"permission":"write"}"#),
    )?;
    ensure!(r.status == 200, "PUT bob write: {} {}", r.status, r.text());
    ensure!(r.json()?["permission"] == "write", "{}", r.text());
    let listed = call(&c, Some(&carol_auth), "GET", &cfg, None)?.json()?;
    ensure!(names(&listed, "/user/username") == ["bob"], "{listed}");
    let work = git.init(git.scratch("acct"))?;
    work.commit_file("a", "1\n", "one")?;
    let host = c.http_url().trim_start_matches("http://");
    let bob_url = format!("http://bob:{}@{host}/{full}.git", percent_encode(&bob));
    let start = Instant::now();
    loop {
        let push = work
            .cmd()
            .args(["push", "-q", &bob_url, "HEAD:refs/heads/main"])
            .output()?;
        if push.success() {
            break;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(3),
            "bob cannot push: {push}"
        );
        thread::sleep(Duration::from_millis(100));
    }
    let r = call(&c, Some(&carol_auth), "DELETE", &format!("{cfg}/bob"), None)?;
    ensure!(r.status == 204, "DELETE bob: {} {}", r.status, r.text());
    let took = until_status(&c, &bob_auth, &format!("/2.0/repositories/{full}"), 404)?;
    println!("a revoked grant stopped reading after {took:?}");

    // SSH keys, fingerprinted as ssh-keygen does.
    let keydir = git.scratch("keys");
    std::fs::create_dir_all(&keydir)?;
    let keyfile = keydir.join("id_ed25519");
    let gen = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "bob@test", "-f"])
        .arg(&keyfile)
        .output()?;
    ensure!(
        gen.status.success(),
        "ssh-keygen: {}",
        String::from_utf8_lossy(&gen.stderr)
    );
    let public = std::fs::read_to_string(keyfile.with_extension("pub"))?;
    let expected = String::from_utf8_lossy(
        &Command::new("ssh-keygen")
            .arg("-lf")
            .arg(keyfile.with_extension("pub"))
            .output()?
            .stdout,
    )
    .split_whitespace()
    .nth(1)
    .context("ssh-keygen -l output")?
    .to_owned();
    let body = serde_json::json!({"key": public.trim(), "label": "laptop"}).to_string();
    let r = call(
        &c,
        Some(&bob_auth),
        "POST",
        "/2.0/users/bob/ssh-keys",
        Some(&body),
    )?;
    ensure!(r.status == 201, "add key: {} {}", r.status, r.text());
    let key = r.json()?;
    ensure!(
        key["fingerprint"] == expected.as_str(),
        "fingerprint {key} vs {expected}"
    );
    ensure!(
        key["type"] == "ssh_key" && key["comment"] == "bob@test",
        "{key}"
    );
    let again = call(
        &c,
        Some(&bob_auth),
        "POST",
        "/2.0/users/bob/ssh-keys",
        Some(&body),
    )?;
    ensure!(
        again.status == 400,
        "duplicate key: {} {}",
        again.status,
        again.text()
    );
    let theirs = call(
        &c,
        Some(&carol_auth),
        "GET",
        "/2.0/users/bob/ssh-keys",
        None,
    )?;
    ensure!(
        theirs.status == 403,
        "carol lists bob's keys: {}",
        theirs.status
    );
    let dsa = r#"{"key":"ssh-dss AAAAB3NzaC1kc3MAAAABAQ== x"}"#;
    let r = call(
        &c,
        Some(&bob_auth),
        "POST",
        "/2.0/users/bob/ssh-keys",
        Some(dsa),
    )?;
    ensure!(r.status == 400, "a DSA key: {} {}", r.status, r.text());
    let uuid = key["uuid"].as_str().context("uuid")?;
    let r = call(
        &c,
        Some(&bob_auth),
        "DELETE",
        &format!("/2.0/users/bob/ssh-keys/{}", percent_encode(uuid)),
        None,
    )?;
    ensure!(r.status == 204, "delete key: {} {}", r.status, r.text());

    // Deploy keys: the repository's admins only.
    let deploy = format!("/2.0/repositories/{full}/deploy-keys");
    let r = call(&c, Some(&carol_auth), "POST", &deploy, Some(&body))?;
    ensure!(r.status == 201, "deploy key: {} {}", r.status, r.text());
    let id = r.json()?["id"].as_u64().context("deploy key id")?;
    let r = call(&c, Some(&narrow_auth), "GET", &deploy, None)?;
    ensure!(
        r.status == 404,
        "bob (no longer a reader) lists deploy keys: {}",
        r.status
    );
    let r = call(
        &c,
        Some(&carol_auth),
        "DELETE",
        &format!("{deploy}/{id}"),
        None,
    )?;
    ensure!(
        r.status == 204,
        "delete deploy key: {} {}",
        r.status,
        r.text()
    );

    // Tokens over REST: shown once, never more than their maker.
    let r = call(
        &c,
        Some(&narrow_auth),
        "POST",
        "/2.0/user/tokens",
        Some(r#"{"scopes":["repository:write"]}"#),
    )?;
    ensure!(
        r.status == 403,
        "escalating scopes: {} {}",
        r.status,
        r.text()
    );
    let r = call(
        &c,
        Some(&carol_auth),
        "POST",
        "/2.0/user/tokens",
        Some(r#"{"label":"ci","scopes":["repository"],"expires_in":3600}"#),
    )?;
    ensure!(r.status == 201, "create token: {} {}", r.status, r.text());
    let made = r.json()?;
    let secret = made["token"]
        .as_str()
        .context("token shown once")?
        .to_owned();
    let made_id = made["id"].as_str().context("id")?.to_owned();
    let ci_auth = format!("Bearer {secret}");
    until_status(&c, &ci_auth, &format!("/2.0/repositories/{full}"), 200)?;
    let listed = call(&c, Some(&carol_auth), "GET", "/2.0/user/tokens", None)?;
    ensure!(!listed.text().contains(&secret), "a listing shows a secret");
    ensure!(
        names(&listed.json()?, "/id").contains(&made_id),
        "{}",
        listed.text()
    );
    let r = call(
        &c,
        Some(&bob_auth),
        "DELETE",
        &format!("/2.0/user/tokens/{made_id}"),
        None,
    )?;
    ensure!(r.status == 404, "bob revokes carol's token: {}", r.status);
    let r = call(
        &c,
        Some(&carol_auth),
        "DELETE",
        &format!("/2.0/user/tokens/{made_id}"),
        None,
    )?;
    ensure!(r.status == 204, "revoke: {} {}", r.status, r.text());
    until_status(&c, &ci_auth, &format!("/2.0/repositories/{full}"), 401)?;

    // Visibility and main branch: admins only; anonymous readers follow.
    let repo_path = format!("/2.0/repositories/{full}");
    let r = call(
        &c,
        Some(&carol_auth),
        "PUT",
        &repo_path,
        Some(r#"{"is_private":false,"mainbranch":{"name":"develop"}}"#),
    )?;
    ensure!(r.status == 200, "PUT repository: {} {}", r.status, r.text());
    let v = r.json()?;
    ensure!(
        v["is_private"] == false && v["mainbranch"]["name"] == "develop",
        "{v}"
    );
    let start = Instant::now();
    while call(&c, None, "GET", &repo_path, None)?.status != 200 {
        ensure!(
            start.elapsed() < Duration::from_secs(3),
            "anonymous cannot read a public repository"
        );
        thread::sleep(Duration::from_millis(50));
    }
    let r = call(
        &c,
        Some(&carol_auth),
        "PUT",
        &repo_path,
        Some(r#"{"is_private":true}"#),
    )?;
    ensure!(r.status == 200, "PUT private: {} {}", r.status, r.text());
    let start = Instant::now();
    while call(&c, None, "GET", &repo_path, None)?.status != 401 {
        ensure!(
            start.elapsed() < Duration::from_secs(3),
            "a private repository stays readable"
        );
        thread::sleep(Duration::from_millis(50));
    }
    println!(
        "a repository made private stopped answering anonymous callers after {:?}",
        start.elapsed()
    );
    let r = call(
        &c,
        Some(&carol_auth),
        "PUT",
        &repo_path,
        Some(r#"{"mainbranch":{"name":"bad..name"}}"#),
    )?;
    ensure!(
        r.status == 400,
        "a bad main branch: {} {}",
        r.status,
        r.text()
    );
    let reader = cairn_ok(
        &c,
        &[
            "token",
            "create",
            "--user",
            "carol",
            "--scope",
            "repository",
        ],
    )?;
    let reader_auth = basic("carol", &reader);
    until_status(&c, &reader_auth, &repo_path, 200)?;
    let r = call(
        &c,
        Some(&reader_auth),
        "PUT",
        &repo_path,
        Some(r#"{"is_private":false}"#),
    )?;
    ensure!(
        r.status == 403,
        "PUT without repository:admin: {} {}",
        r.status,
        r.text()
    );

    // The audit log: who, what, when, from where.
    let bad = call(
        &c,
        Some(&basic("bob", "cnp_0000000000000000_nope")),
        "GET",
        "/2.0/user",
        None,
    )?;
    ensure!(bad.status == 401, "bad credential: {}", bad.status);
    let start = Instant::now();
    loop {
        let out = cairn_ok(&c, &["audit", "tail", "--json"])?;
        let records: Vec<Value> = out
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let has = |action: &str, actor: &str, from: &str| {
            records.iter().any(|r| {
                r["action"] == action
                    && (actor.is_empty() || r["actor"] == actor)
                    && (from.is_empty() || r["from"] == from)
                    && r["at"].as_i64().is_some_and(|t| t > 0)
            })
        };
        let all = [
            has("user:add", "operator", ""),
            has("perm:grant", "carol", "127.0.0.1"),
            has("perm:revoke", "carol", "127.0.0.1"),
            has("token:create", "carol", "127.0.0.1"),
            has("token:revoke", "carol", "127.0.0.1"),
            has("key:add", "bob", "127.0.0.1"),
            has("repo:create", "admin", "127.0.0.1"),
            has("repo:visibility", "carol", "127.0.0.1"),
            has("signin:failed", "", "127.0.0.1"),
        ];
        if all.iter().all(|x| *x) {
            break;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "audit records missing ({all:?}):\n{out}"
        );
        thread::sleep(Duration::from_millis(250));
    }
    Ok(())
}
