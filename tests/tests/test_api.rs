//! REST API, authentication and the admin CLI against a `cairn dev` cluster.

use anyhow::{ensure, Context};
use cairn_tests::*;
use serde_json::Value;

#[test]
fn healthz_needs_no_credentials() -> Result<()> {
    let c = Cluster::shared();
    let r = HttpRequest::new("GET", "/healthz").send(c.http_url())?;
    ensure!(r.status == 200, "GET /healthz: {} {}", r.status, r.text());
    Ok(())
}

#[test]
fn create_repository_returns_bitbucket_shaped_json() -> Result<()> {
    let c = Cluster::shared();
    let slug = unique_name("api-shape");
    let full = format!("{WORKSPACE}/{slug}");
    let v = c.create_repo(&full)?;
    ensure!(v["type"] == "repository", "type: {v}");
    ensure!(v["full_name"] == full.as_str(), "full_name: {v}");
    ensure!(v["slug"] == slug.as_str(), "slug: {v}");
    let clone_links = v["links"]["clone"]
        .as_array()
        .context("links.clone is not an array")?;
    let https = clone_links
        .iter()
        .find(|l| l["name"] == "https")
        .with_context(|| format!("no https clone link: {v}"))?;
    let href = https["href"].as_str().context("href")?;
    ensure!(
        href.ends_with(&format!("/{full}.git")) && href.starts_with("http"),
        "clone href {href:?}"
    );
    // The advertised link (with credentials added) is clonable.
    let git = Git::new()?;
    let with_creds = href.replacen(
        "://",
        &format!(
            "://{}:{}@",
            percent_encode(&c.info().username),
            percent_encode(&c.info().token)
        ),
        1,
    );
    let refs = git.remote_refs(&with_creds)?;
    ensure!(refs.is_empty(), "new repository is not empty: {refs:?}");
    Ok(())
}

#[test]
fn duplicate_repository_is_an_error() -> Result<()> {
    let c = Cluster::shared();
    let full = c.new_repo("api-dup")?;
    let path = format!("/2.0/repositories/{full}");
    let r = c
        .request("POST", &path)
        .header("Content-Type", "application/json")
        .body(br#"{"scm":"git"}"#)
        .send(c.http_url())?;
    ensure!(
        r.status == 400 || r.status == 409,
        "duplicate create: {} {}",
        r.status,
        r.text()
    );
    let v: Value = r.json()?;
    ensure!(v["type"] == "error", "error shape: {v}");
    ensure!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "error.message: {v}"
    );
    Ok(())
}

#[test]
fn create_without_body_and_with_bearer_token() -> Result<()> {
    let c = Cluster::shared();
    let full = format!("{WORKSPACE}/{}", unique_name("api-bearer"));
    let path = format!("/2.0/repositories/{full}");
    let r = HttpRequest::new("POST", &path)
        .header("Authorization", &format!("Bearer {}", c.info().token))
        .send(c.http_url())?;
    ensure!(r.status == 201, "bearer create: {} {}", r.status, r.text());
    ensure!(r.json()?["full_name"] == full.as_str());
    Ok(())
}

#[test]
fn requests_without_valid_credentials_are_refused() -> Result<()> {
    let c = Cluster::shared();
    let full = c.new_repo("api-auth")?;
    // REST without, and with wrong, credentials.
    let path = format!(
        "/2.0/repositories/{WORKSPACE}/{}",
        unique_name("api-noauth")
    );
    let r = HttpRequest::new("POST", &path).send(c.http_url())?;
    ensure!(r.status == 401, "no credentials: {} {}", r.status, r.text());
    let r = HttpRequest::new("POST", &path)
        .header(
            "Authorization",
            &format!("Basic {}", base64(b"x-token-auth:wrong-token")),
        )
        .send(c.http_url())?;
    ensure!(
        r.status == 401 || r.status == 403,
        "wrong token: {} {}",
        r.status,
        r.text()
    );
    // Smart HTTP discovery without credentials.
    let r = HttpRequest::new(
        "GET",
        &format!("/{full}.git/info/refs?service=git-upload-pack"),
    )
    .send(c.http_url())?;
    ensure!(r.status == 401, "info/refs unauthenticated: {}", r.status);
    ensure!(
        r.header("www-authenticate")
            .is_some_and(|h| h.to_lowercase().starts_with("basic")),
        "401 without a Basic challenge: {:?}",
        r.headers
    );
    // git with no or a wrong token fails without prompting.
    let git = Git::new()?;
    let o = git
        .cmd(git.home())
        .args(["ls-remote", &c.repo_url_anonymous(&full)])
        .fails()?;
    ensure!(
        o.all_lower().contains("authentication")
            || o.all_lower().contains("401")
            || o.all_lower().contains("could not read username"),
        "{o}"
    );
    let bad = c.repo_url(&full).replace(&c.info().token, "wrong-token");
    let o = git
        .cmd(git.home())
        .args(["clone", &bad, &git.scratch("bad").display().to_string()])
        .fails()?;
    ensure!(
        o.all_lower().contains("authentication failed") || o.all_lower().contains("403"),
        "{o}"
    );
    Ok(())
}

fn admin_ok(c: &Cluster, args: &[&str]) -> Result<String> {
    let o = c.admin(args)?;
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    ensure!(
        o.status.success(),
        "cairn admin {args:?} failed with {}:\n{stdout}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(stdout)
}

#[test]
fn admin_cli_creates_lists_and_deletes() -> Result<()> {
    let c = Cluster::shared();
    let full = format!("{WORKSPACE}/{}", unique_name("admin"));
    admin_ok(c, &["repo", "create", &full])?;
    let list = admin_ok(c, &["repo", "list"])?;
    ensure!(list.contains(&full), "repo list lacks {full}:\n{list}");
    // Usable through git.
    let git = Git::new()?;
    let work = git.init(git.scratch("admin-work"))?;
    let head = work.commit_file("f", "x\n", "admin repo")?;
    let url = c.repo_url(&full);
    work.run(["push", "-q", &url, "main"])?;
    ensure!(git.remote_refs(&url)?.get("refs/heads/main") == Some(&head));
    // Creating it again is refused.
    let o = c.admin(&["repo", "create", &full])?;
    ensure!(!o.status.success(), "duplicate admin create succeeded");
    admin_ok(c, &["repo", "delete", &full])?;
    let list = admin_ok(c, &["repo", "list"])?;
    ensure!(!list.contains(&full), "deleted repo still listed:\n{list}");
    let o = git.cmd(git.home()).args(["ls-remote", &url]).fails()?;
    ensure!(o.all_lower().contains("not found"), "{o}");
    Ok(())
}
