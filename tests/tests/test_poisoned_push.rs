//! Pushes meant to poison a repository for everyone else: over-long ref
//! names (which no advertisement could carry), `.gitmodules` files that
//! attack whoever clones (CVE-2018-11235 / CVE-2018-17456 class), and a
//! valid pack with junk after its trailer. Each is refused by the real
//! `git` client's push with a clear message, stores nothing, and leaves the
//! repository fully usable: clone v0 and v2, push.

use anyhow::ensure;
use cairn_tests::*;

/// The longest ref name Cairn accepts, in bytes.
const MAX_REF_NAME: usize = 4096;

/// A name under `prefix` of exactly `len` bytes, in components short
/// enough for any file system.
fn long_ref(prefix: &str, len: usize) -> String {
    let mut name = prefix.to_owned();
    while name.len() < len {
        if !name.ends_with('/') && (name.len() + 1).is_multiple_of(200) {
            name.push('/');
        } else {
            name.push('x');
        }
    }
    name.truncate(len);
    if name.ends_with('/') {
        name.pop();
        name.push('y');
    }
    name
}

/// Pushes `spec` with the real client; it must fail, say why (one of
/// `words`), and change nothing.
fn refused_push(c: &Cluster, b: &Base, spec: &str, words: &[&str]) -> Result<GitOutput> {
    let packs = c.pack_files(&b.full)?;
    let o = b.work.cmd().args(["push", &b.url, spec]).fails()?;
    let text = o.all_lower();
    ensure!(
        words.iter().any(|w| text.contains(&w.to_lowercase())),
        "the refusal of {} does not say why ({words:?}): {o}",
        &spec[..spec.len().min(120)]
    );
    let now = b.git.remote_refs(&b.url)?;
    ensure!(now == b.before, "refs changed: {now:?}");
    c.assert_pack_files(&b.full, &packs, spec.get(..60).unwrap_or(spec))?;
    Ok(o)
}

/// The repository still takes pushes, and the new branch is there.
fn still_takes_pushes(b: &Base, name: &str) -> Result<()> {
    let tip = b.before["refs/heads/main"].clone();
    b.work
        .run(["push", "-q", &b.url, &format!("{tip}:refs/heads/{name}")])?;
    let refs = b.git.remote_refs(&b.url)?;
    ensure!(
        refs.get(&format!("refs/heads/{name}")) == Some(&tip),
        "{refs:?}"
    );
    b.work
        .run(["push", "-q", &b.url, &format!(":refs/heads/{name}")])?;
    Ok(())
}

#[test]
fn over_long_ref_names_are_refused() -> Result<()> {
    let c = Cluster::shared();
    let b = base(c, "long-ref")?;
    let tip = b.before["refs/heads/main"].clone();
    // At the limit: accepted, advertised, and deletable.
    let ok_name = long_ref("refs/heads/", MAX_REF_NAME);
    b.work
        .run(["push", "-q", &b.url, &format!("{tip}:{ok_name}")])?;
    ensure!(b.git.remote_refs(&b.url)?.get(&ok_name) == Some(&tip));
    b.work.run(["push", "-q", &b.url, &format!(":{ok_name}")])?;

    // One byte over, and far over (what broke every later push), as a
    // branch and as an annotated tag (what broke v2 clones).
    let tag_body = format!(
        "object {tip}\ntype commit\ntag poison\ntagger T <t@cairn.invalid> {CLOCK_BASE} +0000\n\npoison\n"
    );
    let tag = b.work.hash_object_literally("tag", tag_body.as_bytes())?;
    for len in [MAX_REF_NAME + 1, 60_000] {
        let branch = long_ref("refs/heads/", len);
        let o = refused_push(c, &b, &format!("{tip}:{branch}"), &["too long"])?;
        eprintln!("branch of {len} bytes: {}", o.stderr.trim());
        let tag_ref = long_ref("refs/tags/", len);
        refused_push(c, &b, &format!("{tag}:{tag_ref}"), &["too long"])?;
    }
    still_takes_pushes(&b, "after-long-refs")?;
    assert_intact(c, &b)
}

/// A commit on top of main whose `.gitmodules` says `gitmodules`.
fn commit_with_gitmodules(b: &Base, gitmodules: &str) -> Result<String> {
    let old = b.before["refs/heads/main"].clone();
    b.work.run(["reset", "-q", "--hard", &old])?;
    b.work.write_file(".gitmodules", gitmodules)?;
    b.work.run(["add", ".gitmodules"])?;
    b.work.run(["commit", "-q", "-m", "submodules"])?;
    b.work.rev_parse("HEAD")
}

#[test]
fn hostile_gitmodules_are_refused_in_gits_words() -> Result<()> {
    let c = Cluster::shared();
    let b = base(c, "gitmodules")?;
    let attacks = [
        (
            "[submodule \"../../../../../hooks\"]\n\tpath = sub\n\turl = https://example.com/sub.git\n",
            "gitmodulesName",
            "disallowed submodule name: ../../../../../hooks",
        ),
        (
            "[submodule \"sub\"]\n\tpath = -evil\n\turl = https://example.com/sub.git\n",
            "gitmodulesPath",
            "disallowed submodule path: -evil",
        ),
        (
            "[submodule \"sub\"]\n\tpath = sub\n\turl = -u./payload\n",
            "gitmodulesUrl",
            "disallowed submodule url: -u./payload",
        ),
        (
            "[submodule \"sub\"]\n\tpath = sub\n\turl = https://example.com/sub.git\n\tupdate = !rm -rf /\n",
            "gitmodulesUpdate",
            "disallowed submodule update setting",
        ),
        ("[submodule \"sub\"\n\tpath = sub\n", "gitmodulesParse", ""),
    ];
    for (content, id, message) in attacks {
        let commit = commit_with_gitmodules(&b, content)?;
        let o = refused_push(c, &b, &format!("{commit}:refs/heads/main"), &[id])?;
        ensure!(
            o.stderr.contains(message),
            "{id}: git's wording missing: {o}"
        );
        eprintln!("{id}: {}", o.stderr.trim());
    }
    // A symlink named .gitmodules (git's own index refuses one, so the
    // tree is made by hand).
    let old = b.before["refs/heads/main"].clone();
    let target = b
        .work
        .cmd()
        .args(["hash-object", "-w", "--stdin"])
        .stdin(b"README".to_vec())
        .ok()?
        .out()
        .to_owned();
    let mut tree = b"120000 .gitmodules\0".to_vec();
    tree.extend_from_slice(&oid_bytes(&target)?);
    let tree = b.work.hash_object_literally("tree", &tree)?;
    let commit = b
        .work
        .run(["commit-tree", &tree, "-p", &old, "-m", "symlink"])?;
    refused_push(
        c,
        &b,
        &format!("{commit}:refs/heads/main"),
        &["gitmodulesSymlink"],
    )?;

    // An honest .gitmodules goes through.
    let honest = commit_with_gitmodules(
        &b,
        "[submodule \"lib\"]\n\tpath = lib\n\turl = ../lib.git\n",
    )?;
    b.work
        .run(["push", "-q", &b.url, &format!("{honest}:refs/heads/honest")])?;
    ensure!(b.git.remote_refs(&b.url)?.get("refs/heads/honest") == Some(&honest));
    b.work.run(["push", "-q", &b.url, ":refs/heads/honest"])?;
    assert_intact(c, &b)
}

#[test]
fn junk_after_the_pack_trailer_is_refused() -> Result<()> {
    let c = Cluster::shared();
    let b = base(c, "pack-junk")?;
    let (update, pack) = new_commit_and_pack(&b, "junk")?;
    for junk in [vec![0u8], vec![b'J'; 70], pack[..40].to_vec()] {
        let mut with_junk = pack.clone();
        with_junk.extend_from_slice(&junk);
        let r = push_raw(
            c,
            &b,
            &format!("pack + {} junk bytes", junk.len()),
            std::slice::from_ref(&update),
            &with_junk,
        )?;
        ensure!(
            r.text().contains("junk"),
            "the refusal does not say why: {}",
            describe(&r)
        );
    }
    assert_intact(c, &b)?;
    // The same pack without the junk is taken.
    let body = receive_pack_body(std::slice::from_ref(&update), "report-status", &pack);
    let r = post(c, &b.full, "git-receive-pack", &body, false)?;
    ensure!(PushReport::parse(&r.body).any_ok(), "{}", describe(&r));
    Ok(())
}
