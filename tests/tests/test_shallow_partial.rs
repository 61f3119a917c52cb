//! Shallow clones (depth, deepen, shallow-since, shallow-exclude, unshallow)
//! and partial clones (blob:none, tree:0) with lazy fetching.
//!
//! Every scenario also runs against stock git serving a bare repository over
//! `file://` (`*_stock_reference` tests): that checks the scenario itself, so
//! a failure only against Cairn points at the server.

use anyhow::ensure;
use cairn_tests::*;

const N_COMMITS: usize = 10;

/// Where a scenario pushes to and fetches from.
enum Server<'a> {
    Cairn(&'a Cluster),
    Stock,
}

/// A remote with a pushed 10-commit `main`, tag `old` on the 4th commit.
struct History {
    git: Git,
    url: String,
    work: Repo,
    /// Oldest first.
    commits: Vec<String>,
    /// Content of `file.txt` at each commit.
    contents: Vec<String>,
    /// Committer timestamps, oldest first.
    times: Vec<u64>,
    /// Oid of the `file.txt` blob of the oldest commit.
    oldest_blob: String,
}

fn history(server: Server<'_>, prefix: &str) -> Result<History> {
    let git = Git::new()?;
    let url = match server {
        Server::Cairn(c) => c.repo_url(&c.new_repo(prefix)?),
        Server::Stock => {
            let bare = git.init_bare(git.scratch("stock"))?;
            bare.run(["config", "uploadpack.allowFilter", "true"])?;
            bare.run(["config", "uploadpack.allowAnySHA1InWant", "true"])?;
            format!("file://{}", bare.path.display())
        }
    };
    let work = git.init(git.scratch("work"))?;
    let mut commits = Vec::new();
    let mut contents = Vec::new();
    for i in 0..N_COMMITS {
        let content: String = (0..40)
            .map(|l| format!("version {i} line {l} of the tracked file\n"))
            .collect();
        work.write_file(&format!("dir/added_{i}.txt"), format!("added in {i}\n"))?;
        commits.push(work.commit_file("file.txt", &content, &format!("commit {i}"))?);
        contents.push(content);
    }
    work.run(["tag", "-a", "-m", "old one", "old", &commits[3]])?;
    work.run(["push", "-q", &url, "main", "old"])?;
    let times = commits
        .iter()
        .map(|c| Ok(work.run(["log", "-1", "--format=%ct", c])?.parse()?))
        .collect::<Result<Vec<u64>>>()?;
    let oldest_blob = work.rev_parse(&format!("{}:file.txt", commits[0]))?;
    Ok(History {
        git,
        url,
        work,
        commits,
        contents,
        times,
        oldest_blob,
    })
}

fn count(r: &Repo, rev: &str) -> Result<usize> {
    Ok(r.run(["rev-list", "--count", rev])?.parse()?)
}

fn is_shallow(r: &Repo) -> Result<bool> {
    Ok(r.run(["rev-parse", "--is-shallow-repository"])? == "true")
}

fn shallow_scenario(h: &History, v: u8) -> Result<()> {
    let git = h.git.with_protocol(v);
    let newest = h.commits.last().cloned().unwrap_or_default();
    let clone = git.clone_repo(&h.url, git.scratch("shallow"), &["-q", "--depth", "1"])?;
    ensure!(is_shallow(&clone)?, "v{v}: --depth 1 clone is not shallow");
    ensure!(
        count(&clone, "HEAD")? == 1,
        "v{v}: depth 1 has {} commits",
        count(&clone, "HEAD")?
    );
    ensure!(clone.head()? == newest);
    let shallow_file = std::fs::read_to_string(clone.git_dir()?.join("shallow"))?;
    ensure!(
        shallow_file.trim() == newest,
        "v{v}: shallow file {shallow_file:?}"
    );
    clone.assert_fsck_clean()?;
    ensure!(std::fs::read_to_string(clone.path.join("file.txt"))? == h.contents[N_COMMITS - 1]);

    clone.run(["fetch", "-q", "--deepen=1"])?;
    ensure!(
        count(&clone, "HEAD")? == 2,
        "v{v}: after --deepen=1: {}",
        count(&clone, "HEAD")?
    );
    clone.run(["fetch", "-q", "--depth=3"])?;
    ensure!(
        count(&clone, "origin/main")? == 3,
        "v{v}: after --depth=3: {}",
        count(&clone, "origin/main")?
    );
    let since = format!("--shallow-since=@{} +0000", h.times[N_COMMITS - 6]);
    clone.run(["fetch", "-q", &since])?;
    ensure!(
        count(&clone, "origin/main")? == 6,
        "v{v}: after {since}: {}",
        count(&clone, "origin/main")?
    );
    clone.assert_fsck_clean()?;

    // New commits on the server reach the shallow clone.
    let new_head = h
        .work
        .commit_file("file.txt", "after the shallow clone\n", "new")?;
    h.work.run(["push", "-q", &h.url, "main"])?;
    clone.run(["fetch", "-q"])?;
    ensure!(clone.rev_parse("origin/main")? == new_head);
    ensure!(is_shallow(&clone)?);
    ensure!(
        count(&clone, "origin/main")? == 7,
        "v{v}: after a fetch: {}",
        count(&clone, "origin/main")?
    );
    clone.assert_fsck_clean()?;

    clone.run(["fetch", "-q", "--unshallow"])?;
    ensure!(
        !is_shallow(&clone)?,
        "v{v}: still shallow after --unshallow"
    );
    ensure!(count(&clone, "origin/main")? == N_COMMITS + 1);
    clone.run(["fetch", "-q", "origin"])?;
    let server = git.remote_refs(&h.url)?;
    assert_clone_matches(&clone, &server)?;

    // Clones cut by date and by an excluded ref.
    let c2 = git.clone_repo(&h.url, git.scratch("since"), &["-q", &since])?;
    ensure!(
        count(&c2, "HEAD")? == 7,
        "v{v}: clone {since}: {}",
        count(&c2, "HEAD")?
    );
    c2.assert_fsck_clean()?;
    let c3 = git.clone_repo(
        &h.url,
        git.scratch("exclude"),
        &["-q", "--shallow-exclude=old"],
    )?;
    // Commits after the 4th: 6 of the history, plus the new one.
    ensure!(
        count(&c3, "HEAD")? == 7,
        "v{v}: clone --shallow-exclude=old: {}",
        count(&c3, "HEAD")?
    );
    c3.assert_fsck_clean()?;
    Ok(())
}

fn partial_scenario(h: &History, v: u8, filter: &str) -> Result<()> {
    let git = h.git.with_protocol(v);
    let clone = git.clone_repo(
        &h.url,
        git.scratch("partial"),
        &["-q", &format!("--filter={filter}")],
    )?;
    ensure!(
        clone.run(["config", "remote.origin.promisor"])? == "true",
        "v{v} {filter}: not a partial clone"
    );
    let missing = clone.missing_object_count()?;
    ensure!(
        missing > 0,
        "v{v} {filter}: the server sent everything (filter ignored?)"
    );
    ensure!(
        !clone.has_object(&h.oldest_blob)?,
        "v{v} {filter}: old blob present"
    );
    ensure!(
        count(&clone, "HEAD")? == N_COMMITS,
        "v{v} {filter}: commits missing"
    );
    clone.assert_fsck_clean()?;

    // Going back in history fetches what is needed, lazily.
    clone.run(["checkout", "-q", &h.commits[0]])?;
    ensure!(std::fs::read_to_string(clone.path.join("file.txt"))? == h.contents[0]);
    ensure!(
        clone.has_object(&h.oldest_blob)?,
        "v{v} {filter}: blob not fetched"
    );
    ensure!(clone.missing_object_count()? < missing);
    clone.run(["checkout", "-q", &h.commits[5]])?;
    ensure!(std::fs::read_to_string(clone.path.join("file.txt"))? == h.contents[5]);
    // A diff over the whole history needs many blobs at once.
    let log = clone.run(["log", "-p", "--format=%H", "origin/main", "--", "file.txt"])?;
    ensure!(
        log.contains("version 0 line 0"),
        "v{v} {filter}: log -p incomplete"
    );
    clone.assert_fsck_clean()?;

    // Incremental fetch keeps the filter.
    let new_head = h
        .work
        .commit_file("file.txt", "after the partial clone\n", "new")?;
    h.work.run(["push", "-q", &h.url, "main"])?;
    clone.run(["fetch", "-q", "origin"])?;
    ensure!(clone.rev_parse("origin/main")? == new_head);
    clone.run(["checkout", "-q", "origin/main"])?;
    ensure!(std::fs::read_to_string(clone.path.join("file.txt"))? == "after the partial clone\n");
    let server = git.remote_refs(&h.url)?;
    assert_clone_matches(&clone, &server)?;
    Ok(())
}

#[test]
fn shallow_v0() -> Result<()> {
    shallow_scenario(&history(Server::Cairn(Cluster::shared()), "shallow-v0")?, 0)
}

#[test]
fn shallow_v2() -> Result<()> {
    shallow_scenario(&history(Server::Cairn(Cluster::shared()), "shallow-v2")?, 2)
}

#[test]
fn partial_blob_none_v2() -> Result<()> {
    partial_scenario(
        &history(Server::Cairn(Cluster::shared()), "blobless-v2")?,
        2,
        "blob:none",
    )
}

#[test]
fn partial_blob_none_v0() -> Result<()> {
    partial_scenario(
        &history(Server::Cairn(Cluster::shared()), "blobless-v0")?,
        0,
        "blob:none",
    )
}

#[test]
fn partial_tree_0_v2() -> Result<()> {
    partial_scenario(
        &history(Server::Cairn(Cluster::shared()), "treeless-v2")?,
        2,
        "tree:0",
    )
}

#[test]
fn scenarios_stock_reference() -> Result<()> {
    for v in [0u8, 2] {
        shallow_scenario(&history(Server::Stock, "")?, v)?;
        partial_scenario(&history(Server::Stock, "")?, v, "blob:none")?;
    }
    partial_scenario(&history(Server::Stock, "")?, 2, "tree:0")?;
    Ok(())
}
