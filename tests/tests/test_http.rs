//! Smart-HTTP details a git client or a proxy depends on: content types,
//! no-cache headers, the `# service=` preamble (absent for v2), gzip and
//! chunked request bodies, and refusals before anything reaches storage.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{ensure, Context};
use cairn_tests::*;
use flate2::write::GzEncoder;

/// A repository with one pushed commit on main; returns (full name, main oid).
fn pushed_repo(c: &Cluster) -> Result<(String, String)> {
    let git = Git::new()?;
    let full = c.new_repo("http")?;
    let work = git.init(git.scratch("work"))?;
    let ids = work.commit_n("a.txt", 2, "main")?;
    work.run(["push", "-q", &c.repo_url(&full), "main"])?;
    Ok((full, ids[1].clone()))
}

fn v2_ls_refs_body() -> Vec<u8> {
    let mut body = pkt_line(b"command=ls-refs\n");
    body.extend_from_slice(&pkt_line(b"object-format=sha1\n"));
    body.extend_from_slice(DELIM_PKT);
    body.extend_from_slice(&pkt_line(b"symrefs\n"));
    body.extend_from_slice(FLUSH_PKT);
    body
}

fn assert_no_cache(r: &HttpResponse) -> Result<()> {
    let cc = r.header("cache-control").unwrap_or_default();
    ensure!(cc.contains("no-cache"), "cache-control {cc:?}");
    ensure!(r.header("expires").is_some(), "no Expires header");
    Ok(())
}

#[test]
fn info_refs_v0_and_v2_headers_and_preamble() -> Result<()> {
    let c = Cluster::shared();
    let (full, main) = pushed_repo(c)?;
    let path = format!("/{full}.git/info/refs?service=git-upload-pack");
    let auth = c.basic_auth();

    let r = c.request("GET", &path).send(c.http_url())?;
    ensure!(r.status == 200, "v0 info/refs: {} {}", r.status, r.text());
    ensure!(
        r.header("content-type") == Some("application/x-git-upload-pack-advertisement"),
        "content-type {:?}",
        r.header("content-type")
    );
    assert_no_cache(&r)?;
    ensure!(
        r.body.starts_with(b"001e# service=git-upload-pack\n0000"),
        "v0 preamble missing: {:?}",
        r.text()
    );
    ensure!(
        r.text().contains(&format!("{main} refs/heads/main")),
        "{}",
        r.text()
    );

    let r = HttpRequest::new("GET", &path)
        .header("Authorization", &auth)
        .header("Git-Protocol", "version=2")
        .send(c.http_url())?;
    ensure!(r.status == 200, "v2 info/refs: {}", r.status);
    ensure!(
        r.body.starts_with(b"000eversion 2\n"),
        "v2 advertisement must start with the version line: {:?}",
        r.text()
    );

    let rp = format!("/{full}.git/info/refs?service=git-receive-pack");
    let r = c.request("GET", &rp).send(c.http_url())?;
    ensure!(r.status == 200, "receive-pack info/refs: {}", r.status);
    ensure!(
        r.header("content-type") == Some("application/x-git-receive-pack-advertisement"),
        "content-type {:?}",
        r.header("content-type")
    );
    ensure!(r.body.starts_with(b"001f# service=git-receive-pack\n0000"));
    Ok(())
}

#[test]
fn gzip_request_body_is_decoded() -> Result<()> {
    let c = Cluster::shared();
    let (full, main) = pushed_repo(c)?;
    let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&v2_ls_refs_body())?;
    let body = gz.finish()?;
    let path = format!("/{full}.git/git-upload-pack");
    let r = c
        .request("POST", &path)
        .header("Content-Type", "application/x-git-upload-pack-request")
        .header("Content-Encoding", "gzip")
        .header("Git-Protocol", "version=2")
        .body(&body)
        .send(c.http_url())?;
    ensure!(r.status == 200, "gzip POST: {} {}", r.status, r.text());
    ensure!(
        r.header("content-type") == Some("application/x-git-upload-pack-result"),
        "content-type {:?}",
        r.header("content-type")
    );
    assert_no_cache(&r)?;
    let text = pkt_text(&r.body);
    ensure!(
        text.contains(&format!("{main} refs/heads/main")),
        "ls-refs over a gzip body: {text}"
    );
    Ok(())
}

#[test]
fn chunked_request_body_is_accepted() -> Result<()> {
    let c = Cluster::shared();
    let (full, main) = pushed_repo(c)?;
    let authority = c.http_url().trim_start_matches("http://").to_owned();
    let body = v2_ls_refs_body();
    let mut s = TcpStream::connect(&authority).context("connect")?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!(
        "POST /{full}.git/git-upload-pack HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\
         Authorization: {}\r\nContent-Type: application/x-git-upload-pack-request\r\n\
         Git-Protocol: version=2\r\nTransfer-Encoding: chunked\r\n\r\n",
        c.basic_auth()
    )
    .into_bytes();
    // Two chunks, split inside a pkt-line.
    let (a, b) = body.split_at(7);
    for part in [a, b] {
        req.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        req.extend_from_slice(part);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    s.write_all(&req)?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp);
    ensure!(text.starts_with("HTTP/1.1 200"), "chunked POST: {text}");
    ensure!(text.contains(&format!("{main} refs/heads/main")), "{text}");
    Ok(())
}

#[test]
fn refusals_before_storage() -> Result<()> {
    let c = Cluster::shared();
    let (full, _) = pushed_repo(c)?;
    // Dumb HTTP (no service parameter) is not offered.
    let r = c
        .request("GET", &format!("/{full}.git/info/refs"))
        .send(c.http_url())?;
    ensure!(r.status == 403, "dumb info/refs: {}", r.status);
    // Wrong content type.
    let body = v2_ls_refs_body();
    let r = c
        .request("POST", &format!("/{full}.git/git-upload-pack"))
        .header("Content-Type", "text/plain")
        .body(&body)
        .send(c.http_url())?;
    ensure!(r.status == 415, "wrong content type: {}", r.status);
    // Unknown content encoding.
    let r = c
        .request("POST", &format!("/{full}.git/git-upload-pack"))
        .header("Content-Type", "application/x-git-upload-pack-request")
        .header("Content-Encoding", "br")
        .body(&body)
        .send(c.http_url())?;
    ensure!(r.status == 415, "unknown encoding: {}", r.status);
    // No credentials on a git endpoint: 401 with a Basic challenge.
    let r = HttpRequest::new(
        "GET",
        &format!("/{full}.git/info/refs?service=git-upload-pack"),
    )
    .send(c.http_url())?;
    ensure!(r.status == 401, "anonymous info/refs: {}", r.status);
    ensure!(
        r.header("www-authenticate")
            .is_some_and(|v| v.starts_with("Basic")),
        "no Basic challenge"
    );
    Ok(())
}
