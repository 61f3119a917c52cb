//! Malformed and malicious input: raw smart-HTTP requests with broken
//! pkt-lines or packs, pushes of unconnected objects or of trees with a
//! `.git` entry, unknown repositories. Each must be refused with an error,
//! leave the repository's refs as they were, and leave the server serving
//! normal clones.

use anyhow::ensure;
use cairn_tests::*;

#[test]
fn garbage_pkt_lines_are_refused() -> Result<()> {
    let c = Cluster::shared();
    let b = base(c, "bad-pkt")?;
    let head = b.before["refs/heads/main"].clone();
    let zero_want = format!("want {ZERO_OID}\n");
    let mut oversized = format!("{:04x}", 65524).into_bytes();
    oversized.extend(std::iter::repeat_n(b'a', 65520));
    let mut claims_more = b"ffff".to_vec();
    claims_more.extend(std::iter::repeat_n(b'a', 200));
    let generic: Vec<(&str, Vec<u8>)> = vec![
        ("not pkt-lines", b"this is not a pkt-line at all\n".to_vec()),
        ("non-hex length", b"zzzz0000".to_vec()),
        ("length 3", b"0003".to_vec()),
        ("length beyond the body", claims_more),
        ("oversized pkt-line", oversized),
        ("truncated pkt-line", b"00ffwant 1234".to_vec()),
    ];
    for service in ["git-upload-pack", "git-receive-pack"] {
        for v2 in [false, true] {
            for (what, body) in &generic {
                let r = post(c, &b.full, service, body, v2)?;
                eprintln!("{service} v2={v2} {what}: {}", describe(&r));
                ensure!(is_error(&r), "{service} v2={v2} {what}: {}", describe(&r));
            }
        }
    }
    // Protocol-level nonsense that is well-formed pkt-lines.
    let upload_v0: Vec<(&str, Vec<u8>)> = vec![
        (
            "want of a missing object",
            [
                pkt_line(format!("{} side-band-64k\n", zero_want.trim_end()).as_bytes()),
                FLUSH_PKT.to_vec(),
                pkt_line(b"done\n"),
            ]
            .concat(),
        ),
        (
            "not a want line",
            [
                pkt_line(b"gimme everything\n"),
                FLUSH_PKT.to_vec(),
                pkt_line(b"done\n"),
            ]
            .concat(),
        ),
    ];
    for (what, body) in &upload_v0 {
        let r = post(c, &b.full, "git-upload-pack", body, false)?;
        eprintln!("upload-pack v0 {what}: {}", describe(&r));
        ensure!(is_error(&r), "upload-pack v0 {what}: {}", describe(&r));
    }
    let upload_v2: Vec<(&str, Vec<u8>)> = vec![
        (
            "unknown command",
            [pkt_line(b"command=bogus\n"), FLUSH_PKT.to_vec()].concat(),
        ),
        (
            "fetch of a missing object",
            [
                pkt_line(b"command=fetch\n"),
                DELIM_PKT.to_vec(),
                pkt_line(zero_want.as_bytes()),
                pkt_line(b"done\n"),
                FLUSH_PKT.to_vec(),
            ]
            .concat(),
        ),
        (
            "fetch with a bad argument",
            [
                pkt_line(b"command=fetch\n"),
                DELIM_PKT.to_vec(),
                pkt_line(format!("want {head}\n").as_bytes()),
                pkt_line(b"frobnicate 12\n"),
                pkt_line(b"done\n"),
                FLUSH_PKT.to_vec(),
            ]
            .concat(),
        ),
    ];
    for (what, body) in &upload_v2 {
        let r = post(c, &b.full, "git-upload-pack", body, true)?;
        eprintln!("upload-pack v2 {what}: {}", describe(&r));
        ensure!(is_error(&r), "upload-pack v2 {what}: {}", describe(&r));
    }
    // Commands that are not `old new ref`.
    let r = post(
        c,
        &b.full,
        "git-receive-pack",
        &[
            pkt_line(b"delete everything please\0report-status\n"),
            FLUSH_PKT.to_vec(),
        ]
        .concat(),
        false,
    )?;
    ensure!(is_error(&r), "receive-pack bad command: {}", describe(&r));
    // An unknown service.
    let r = c
        .request(
            "GET",
            &format!("/{}.git/info/refs?service=git-bogus", b.full),
        )
        .send(c.http_url())?;
    ensure!(r.status >= 400, "unknown service: {}", describe(&r));
    assert_intact(c, &b)
}

#[test]
fn truncated_and_corrupted_packs_are_rejected() -> Result<()> {
    let c = Cluster::shared();
    let b = base(c, "bad-pack")?;
    let (update, pack) = new_commit_and_pack(&b, "broken")?;
    push_raw(
        c,
        &b,
        "truncated pack",
        std::slice::from_ref(&update),
        &pack[..pack.len() / 2],
    )?;
    push_raw(
        c,
        &b,
        "pack cut before its trailer",
        std::slice::from_ref(&update),
        &pack[..pack.len() - 10],
    )?;

    let at = first_object_data_offset(&pack)? + 6;
    let mut corrupt = pack.clone();
    corrupt[at] ^= 0x5a;
    push_raw(
        c,
        &b,
        "corrupted byte, stale trailer",
        std::slice::from_ref(&update),
        &corrupt,
    )?;
    fix_pack_trailer(&mut corrupt)?;
    push_raw(
        c,
        &b,
        "corrupted byte, valid trailer",
        std::slice::from_ref(&update),
        &corrupt,
    )?;

    // The header claims one object more than the pack holds.
    let mut more = pack.clone();
    more[11] = more[11].wrapping_add(1);
    fix_pack_trailer(&mut more)?;
    push_raw(
        c,
        &b,
        "object count too high",
        std::slice::from_ref(&update),
        &more,
    )?;

    // Not a pack at all after the commands.
    push_raw(
        c,
        &b,
        "no pack signature",
        std::slice::from_ref(&update),
        b"KCAP and some bytes",
    )?;

    assert_intact(c, &b)?;

    // The same request with the untouched pack is accepted: the rejections
    // above were caused by the damage alone.
    let body = receive_pack_body(std::slice::from_ref(&update), "report-status", &pack);
    let r = post(c, &b.full, "git-receive-pack", &body, false)?;
    let rep = PushReport::parse(&r.body);
    ensure!(
        r.status == 200 && rep.unpack.as_deref() == Some("ok") && rep.any_ok(),
        "valid raw push: {}",
        describe(&r)
    );
    ensure!(b.git.remote_refs(&b.url)?["refs/heads/main"] == update.new);
    Ok(())
}

#[test]
fn unconnected_pushes_are_rejected() -> Result<()> {
    let c = Cluster::shared();
    let b = base(c, "unconnected")?;
    let old = b.before["refs/heads/main"].clone();

    // A pack with only the commit: its tree and blob are missing.
    let (update, _) = new_commit_and_pack(&b, "no-tree")?;
    let only_commit = b
        .work
        .pack_objects(&format!("{}\n", update.new), false, false)?;
    push_raw(
        c,
        &b,
        "commit without its tree",
        std::slice::from_ref(&update),
        &only_commit,
    )?;

    // A pack with a commit whose parent is missing.
    b.work.run(["reset", "-q", "--hard", &old])?;
    let parent = b.work.commit_file("p.txt", "parent\n", "missing parent")?;
    let child = b.work.commit_file("c.txt", "child\n", "child")?;
    let pack = b
        .work
        .pack_objects(&format!("{child}\n^{parent}\n"), true, false)?;
    push_raw(
        c,
        &b,
        "commit without its parent",
        &[RefUpdate::new(&old, &child, "refs/heads/main")],
        &pack,
    )?;

    // A new ref to an object that exists nowhere, with an empty pack.
    let empty = b.work.pack_objects("", false, false)?;
    push_raw(
        c,
        &b,
        "new ref to a missing object",
        &[RefUpdate::new(
            ZERO_OID,
            "1234567890abcdef1234567890abcdef12345678",
            "refs/heads/ghost",
        )],
        &empty,
    )?;
    // An annotated tag whose target is missing.
    let tag_body = format!(
        "object {child}\ntype commit\ntag dangling\ntagger T <t@cairn.invalid> {CLOCK_BASE} +0000\n\ndangling\n"
    );
    let tag = b.work.hash_object_literally("tag", tag_body.as_bytes())?;
    let tag_pack = b.work.pack_objects(&format!("{tag}\n"), false, false)?;
    push_raw(
        c,
        &b,
        "tag to a missing commit",
        &[RefUpdate::new(ZERO_OID, &tag, "refs/tags/dangling")],
        &tag_pack,
    )?;
    // A wrong old id for an existing ref.
    let (update, pack) = new_commit_and_pack(&b, "stale-old")?;
    push_raw(
        c,
        &b,
        "stale old id",
        &[RefUpdate::new(
            &b.before["refs/heads/side"],
            &update.new,
            "refs/heads/main",
        )],
        &pack,
    )?;
    // Creating a ref that exists.
    push_raw(
        c,
        &b,
        "create over an existing ref",
        &[RefUpdate::new(ZERO_OID, &update.new, "refs/heads/side")],
        &pack,
    )?;
    assert_intact(c, &b)
}

#[test]
fn trees_with_a_dot_git_entry_are_rejected() -> Result<()> {
    let c = Cluster::shared();
    let b = base(c, "dotgit")?;
    let old = b.before["refs/heads/main"].clone();
    for (name, target) in [
        (".git", "refs/heads/main"),
        (".GIT", "refs/heads/evil"),
        (".Git", "refs/heads/main"),
    ] {
        let commit = commit_with_dot_git_tree(&b.work, name, &old)?;
        let packs = c.pack_files(&b.full)?;
        let o = b
            .work
            .cmd()
            .args(["push", "origin", &format!("{commit}:{target}")])
            .fails()?;
        eprintln!("{name}: {}", o.stderr.trim());
        let lower = o.stderr.to_lowercase();
        ensure!(
            [
                ".git",
                "dotgit",
                "reserved",
                "invalid path",
                "disallowed",
                "forbidden"
            ]
            .iter()
            .any(|w| lower.contains(w)),
            "{name}: the rejection does not say why: {o}"
        );
        let now = b.git.remote_refs(&b.url)?;
        ensure!(now == b.before, "{name}: refs changed: {now:?}");
        c.assert_pack_files(&b.full, &packs, name)?;
    }
    assert_intact(c, &b)
}

#[test]
fn unknown_repositories_are_not_found() -> Result<()> {
    let c = Cluster::shared();
    let git = Git::new()?;
    for full in [
        format!("{WORKSPACE}/{}", unique_name("missing")),
        format!("{}/repo", unique_name("no-such-workspace")),
    ] {
        let url = c.repo_url(&full);
        for v in [0u8, 2] {
            let g = git.with_protocol(v);
            let o = g
                .cmd(g.home())
                .args(["clone", &url, &g.scratch("nf").display().to_string()])
                .fails()?;
            ensure!(
                o.all_lower().contains("not found"),
                "clone v{v} {full}: {o}"
            );
        }
        let work = git.init(git.scratch("nf-push"))?;
        work.commit_file("a", "a\n", "a")?;
        let o = work.cmd().args(["push", &url, "main"]).fails()?;
        ensure!(o.all_lower().contains("not found"), "push {full}: {o}");
        for service in ["git-upload-pack", "git-receive-pack"] {
            let r = c
                .request("GET", &format!("/{full}.git/info/refs?service={service}"))
                .send(c.http_url())?;
            ensure!(
                r.status == 404,
                "info/refs {service} for {full}: {}",
                describe(&r)
            );
            let r = post(c, &full, service, FLUSH_PKT, false)?;
            ensure!(
                r.status == 404,
                "POST {service} for {full}: {}",
                describe(&r)
            );
        }
        // Pushing did not create it.
        let r = c
            .request(
                "GET",
                &format!("/{full}.git/info/refs?service=git-upload-pack"),
            )
            .send(c.http_url())?;
        ensure!(r.status == 404);
    }
    Ok(())
}
