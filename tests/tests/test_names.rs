//! Names and free text over REST, in Bitbucket's error shape: workspace ids
//! and repository slugs are one name whatever their case (a case-only
//! clash is a 409), over-long fields are a 400 naming the field, bodies are
//! bounded, and links never come from the request's `Host` header.

use anyhow::{ensure, Context};
use cairn_tests::*;
use serde_json::Value;

fn post_json(c: &Cluster, full: &str, body: &[u8]) -> Result<HttpResponse> {
    c.request("POST", &format!("/2.0/repositories/{full}"))
        .header("Content-Type", "application/json")
        .body(body)
        .send(c.http_url())
}

/// Bitbucket's `{"type":"error","error":{"message":…}}`.
fn error_json(r: &HttpResponse) -> Result<Value> {
    let v = r.json()?;
    ensure!(v["type"] == "error", "not an error object: {v}");
    ensure!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "no message: {v}"
    );
    Ok(v)
}

#[test]
fn names_that_differ_only_in_case_are_one_name() -> Result<()> {
    let c = Cluster::shared();
    let slug = unique_name("Case");
    let canonical = slug.to_lowercase();
    let v = c.create_repo(&format!("{WORKSPACE}/{slug}"))?;
    ensure!(
        v["slug"] == canonical.as_str(),
        "stored in canonical form: {v}"
    );
    ensure!(
        v["full_name"] == format!("{WORKSPACE}/{canonical}").as_str(),
        "{v}"
    );
    let uuid = v["uuid"].clone();

    // The exact name again: Bitbucket's 400. Another case: 409.
    let r = post_json(c, &format!("{WORKSPACE}/{canonical}"), b"{}")?;
    ensure!(
        r.status == 400,
        "exact duplicate: {} {}",
        r.status,
        r.text()
    );
    error_json(&r)?;
    for other in [slug.to_uppercase(), slug.clone()] {
        let r = post_json(c, &format!("{WORKSPACE}/{other}"), b"{}")?;
        ensure!(r.status == 409, "{other}: {} {}", r.status, r.text());
        let e = error_json(&r)?;
        ensure!(
            e["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(&canonical)),
            "the message names the repository taken: {e}"
        );
    }
    // Every spelling reaches the one repository, over REST and git.
    let upper = format!("{}/{}", WORKSPACE.to_uppercase(), slug.to_uppercase());
    let r = c
        .request("GET", &format!("/2.0/repositories/{upper}"))
        .send(c.http_url())?;
    ensure!(r.status == 200, "GET {upper}: {} {}", r.status, r.text());
    ensure!(r.json()?["uuid"] == uuid, "{}", r.text());
    let git = Git::new()?;
    let work = git.init(git.scratch("case"))?;
    let tip = work.commit_file("a.txt", "a\n", "a")?;
    work.run(["push", "-q", &c.repo_url(&upper), "main"])?;
    for spelling in [
        format!("{WORKSPACE}/{canonical}"),
        format!("{WORKSPACE}/{slug}"),
    ] {
        let refs = git.remote_refs(&c.repo_url(&spelling))?;
        ensure!(
            refs.get("refs/heads/main") == Some(&tip),
            "{spelling}: {refs:?}"
        );
    }
    // Listing shows it once.
    let r = c
        .request("GET", &format!("/2.0/repositories/{WORKSPACE}"))
        .send(c.http_url())?;
    let listed = r.json()?["values"]
        .as_array()
        .context("values")?
        .iter()
        .filter(|v| {
            v["slug"]
                .as_str()
                .is_some_and(|s| s.eq_ignore_ascii_case(&slug))
        })
        .count();
    ensure!(listed == 1, "listed {listed} times");
    Ok(())
}

#[test]
fn workspaces_that_differ_only_in_case_are_one_workspace() -> Result<()> {
    let c = Cluster::shared();
    let ws = unique_name("Team");
    let v = c.create_repo(&format!("{ws}/app"))?;
    ensure!(
        v["workspace"]["slug"] == ws.to_lowercase().as_str(),
        "workspace stored in canonical form: {v}"
    );
    let r = post_json(c, &format!("{}/App", ws.to_uppercase()), b"{}")?;
    ensure!(r.status == 409, "{} {}", r.status, r.text());
    error_json(&r)?;
    let r = post_json(c, &format!("{}/other", ws.to_uppercase()), b"{}")?;
    ensure!(r.status == 201, "{} {}", r.status, r.text());
    let listed = c
        .request("GET", &format!("/2.0/repositories/{ws}"))
        .send(c.http_url())?
        .json()?;
    let slugs: Vec<&str> = listed["values"]
        .as_array()
        .context("values")?
        .iter()
        .filter_map(|v| v["slug"].as_str())
        .collect();
    ensure!(
        slugs == ["app", "other"],
        "one workspace holds both: {slugs:?}"
    );
    Ok(())
}

#[test]
fn descriptions_and_bodies_are_bounded() -> Result<()> {
    let c = Cluster::shared();
    let at_limit = format!(r#"{{"description":"{}"}}"#, "d".repeat(2048));
    let full = format!("{WORKSPACE}/{}", unique_name("desc"));
    let r = post_json(c, &full, at_limit.as_bytes())?;
    ensure!(r.status == 201, "2048 bytes: {} {}", r.status, r.text());

    let over = format!(r#"{{"description":"{}"}}"#, "d".repeat(2049));
    let full = format!("{WORKSPACE}/{}", unique_name("desc"));
    let r = post_json(c, &full, over.as_bytes())?;
    ensure!(r.status == 400, "2049 bytes: {} {}", r.status, r.text());
    let e = error_json(&r)?;
    ensure!(
        e["error"]["fields"]["description"].is_array(),
        "the error names the field: {e}"
    );
    let r = c
        .request("GET", &format!("/2.0/repositories/{full}"))
        .send(c.http_url())?;
    ensure!(r.status == 404, "nothing was created: {}", r.status);

    // The admin CLI goes to the storage nodes directly: they refuse too.
    let o = c.admin(&["repo", "create", &full, "--description", &"d".repeat(2049)])?;
    ensure!(
        !o.status.success(),
        "admin create with a long description: {}",
        String::from_utf8_lossy(&o.stdout)
    );

    let huge = format!(r#"{{"description":"{}"}}"#, "d".repeat(100 << 10));
    let r = post_json(c, &full, huge.as_bytes())?;
    ensure!(r.status == 413, "a 100 KiB body: {} {}", r.status, r.text());
    error_json(&r)?;
    Ok(())
}

#[test]
fn links_never_come_from_the_host_header() -> Result<()> {
    let c = Cluster::shared();
    let full = c.new_repo("links")?;
    let path = format!("/2.0/repositories/{full}");
    let r = c
        .request("GET", &path)
        .header("Host", "evil.example:666")
        .send(c.http_url())?;
    ensure!(r.status == 200, "{} {}", r.status, r.text());
    let text = r.text();
    ensure!(!text.contains("evil.example"), "Host header echoed: {text}");
    let v: Value = r.json()?;
    let href = v["links"]["clone"][0]["href"].as_str().context("href")?;
    ensure!(
        href == format!("{}/{full}.git", c.http_url().trim_end_matches('/')),
        "clone link names the listen address: {href}"
    );
    Ok(())
}
