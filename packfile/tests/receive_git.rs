//! receive-pack against the real `git` client: pushes go through the
//! `receive_stdio` example (built by cargo before tests run) into a
//! test-only store, which is then checked by reading objects back through
//! `PackSet` and by `git fsck --full --strict` on a bare repository built
//! from the store's packs and refs.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use cairn_packfile::pktline::{Pkt, PktReader, PktWriter, MAX_DATA_LEN};
use cairn_packfile::receive::MAX_REF_NAME_LEN;
use cairn_packfile::store::PackSet;
use cairn_packfile::ObjectId;

fn example_bin() -> PathBuf {
    // target/<profile>/deps/<test> -> target/<profile>/examples/receive_stdio
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile> directory");
    let bin = profile_dir.join("examples").join("receive_stdio");
    // A plain `cargo test` builds examples first; a filtered run
    // (`--test receive_git`) does not, so build it then.
    static BUILD: std::sync::Once = std::sync::Once::new();
    BUILD.call_once(|| {
        if !bin.exists() {
            let status = Command::new(env!("CARGO"))
                .args([
                    "build",
                    "-q",
                    "-p",
                    "cairn-packfile",
                    "--example",
                    "receive_stdio",
                ])
                .status()
                .expect("run cargo");
            assert!(status.success(), "building receive_stdio failed");
        }
    });
    assert!(bin.exists(), "{} not built", bin.display());
    bin
}

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    client: PathBuf,
    store: PathBuf,
    home: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().to_owned();
        let home = root.join("home");
        let client = root.join("client");
        let store = root.join("store");
        fs::create_dir_all(&home).unwrap();
        fs::create_dir_all(&store).unwrap();
        let f = Fixture {
            _tmp: tmp,
            root,
            client,
            store,
            home,
        };
        f.git_in(&f.root, &["init", "-q", "-b", "main", "client"]);
        f
    }

    fn cmd(&self, dir: &Path, args: &[&str]) -> Command {
        let mut c = Command::new("git");
        c.args(args)
            .current_dir(dir)
            .env("HOME", &self.home)
            .env("XDG_CONFIG_HOME", self.home.join(".config"))
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_AUTHOR_NAME", "A U Thor")
            .env("GIT_AUTHOR_EMAIL", "author@example.com")
            .env("GIT_AUTHOR_DATE", "1112911993 -0700")
            .env("GIT_COMMITTER_NAME", "C O Mitter")
            .env("GIT_COMMITTER_EMAIL", "committer@example.com")
            .env("GIT_COMMITTER_DATE", "1112911993 -0700")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("LC_ALL", "C")
            .env_remove("GIT_DIR")
            .env_remove("GIT_WORK_TREE")
            .env_remove("GIT_INDEX_FILE")
            .env_remove("GIT_OBJECT_DIRECTORY");
        c
    }

    fn git_in(&self, dir: &Path, args: &[&str]) -> String {
        let out = self.cmd(dir, args).output().expect("run git");
        assert!(
            out.status.success(),
            "git {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim_end().to_owned()
    }

    fn git(&self, args: &[&str]) -> String {
        self.git_in(&self.client, args)
    }

    fn git_stdin(&self, args: &[&str], input: &[u8]) -> Vec<u8> {
        let mut child = self
            .cmd(&self.client, args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "git {args:?} failed");
        out.stdout
    }

    fn commit(&self, file: &str, content: &str, msg: &str) -> String {
        fs::write(self.client.join(file), content).unwrap();
        self.git(&["add", file]);
        self.git(&["commit", "-q", "-m", msg]);
        self.git(&["rev-parse", "HEAD"])
    }

    fn push_cmd(&self, args: &[&str]) -> Command {
        let rp = format!("--receive-pack={}", example_bin().display());
        let store = self.store.to_str().unwrap().to_owned();
        let mut full: Vec<&str> = vec!["push", &rp];
        full.extend(args.iter().filter(|a| a.starts_with('-')));
        full.push(&store);
        full.extend(args.iter().filter(|a| !a.starts_with('-')));
        self.cmd(&self.client, &full)
    }

    fn push(&self, args: &[&str]) -> Output {
        self.push_cmd(args).output().expect("run git push")
    }

    fn push_ok(&self, args: &[&str]) -> String {
        let out = self.push(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "push {args:?} failed: {stderr}");
        self.assert_staging_empty();
        stderr
    }

    fn push_err(&self, args: &[&str]) -> String {
        let out = self.push(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "push {args:?} should fail: {stderr}");
        self.assert_staging_empty();
        stderr
    }

    fn refs_text(&self) -> String {
        fs::read_to_string(self.store.join("refs")).unwrap_or_default()
    }

    fn store_refs(&self) -> Vec<(String, String)> {
        self.refs_text()
            .lines()
            .filter(|l| !l.starts_with("HEAD "))
            .map(|l| {
                let (id, name) = l.split_once(' ').unwrap();
                (name.to_owned(), id.to_owned())
            })
            .collect()
    }

    fn store_ref(&self, name: &str) -> Option<String> {
        self.store_refs()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, id)| id)
    }

    fn pack_indices(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(self.store.join("packs"))
            .map(|rd| {
                rd.map(|e| e.unwrap().path())
                    .filter(|p| p.extension().is_some_and(|x| x == "idx"))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    fn assert_staging_empty(&self) {
        let staging = self.store.join("staging");
        if let Ok(rd) = fs::read_dir(&staging) {
            let left: Vec<_> = rd.map(|e| e.unwrap().file_name()).collect();
            assert!(left.is_empty(), "staging not empty: {left:?}");
        }
    }

    /// Builds a bare repository from the store and runs a strict fsck; also
    /// checks every pack is self-contained (no thin bases left).
    fn fsck_store(&self) {
        let check = self.root.join("check.git");
        let _ = fs::remove_dir_all(&check);
        self.git_in(&self.root, &["init", "-q", "--bare", "check.git"]);
        let pack_dir = check.join("objects").join("pack");
        for idx in self.pack_indices() {
            let pack = idx.with_extension("pack");
            fs::copy(&idx, pack_dir.join(idx.file_name().unwrap())).unwrap();
            fs::copy(&pack, pack_dir.join(pack.file_name().unwrap())).unwrap();
            // Fails on unresolved (thin) delta bases.
            self.git_in(&check, &["verify-pack", idx.to_str().unwrap()]);
        }
        let mut packed = String::new();
        for (name, id) in self.store_refs() {
            packed.push_str(&format!("{id} {name}\n"));
        }
        fs::write(check.join("packed-refs"), packed).unwrap();
        self.git_in(&check, &["fsck", "--full", "--strict", "--no-dangling"]);
    }

    /// Every object reachable from the client's `refs` is readable from the
    /// store through `PackSet`, with the right content.
    fn assert_store_has(&self, revs: &[&str]) {
        let packs = PackSet::open(&self.pack_indices()).unwrap();
        let reader = packs.reader();
        let mut args = vec!["rev-list", "--objects"];
        args.extend(revs);
        let list = self.git(&args);
        let mut buf = Vec::new();
        let mut n = 0;
        for line in list.lines() {
            let hex = &line[..40];
            let id = ObjectId::from_hex(hex.as_bytes()).unwrap();
            let (kind, data) = reader.get(&id, &mut buf).unwrap();
            let again = gix_object::compute_hash(gix_hash::Kind::Sha1, kind, data).unwrap();
            assert_eq!(again, id);
            n += 1;
        }
        assert!(n > 0);
    }

    /// A hand-rolled push: advertisement, one command line with `caps`, a
    /// flush, then `pack` raw; returns the report lines.
    fn raw_push(&self, commands: &[String], caps: &str, pack: &[u8]) -> Vec<String> {
        let mut child = Command::new(example_bin())
            .arg(&self.store)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        {
            let mut r = PktReader::new(&mut stdout);
            while r.expect_pkt().unwrap() != Pkt::Flush {}
        }
        let mut w = PktWriter::new(Vec::new());
        for (i, c) in commands.iter().enumerate() {
            if i == 0 {
                w.data(format!("{c}\0 {caps}").as_bytes()).unwrap();
            } else {
                w.data(c.as_bytes()).unwrap();
            }
        }
        w.flush_pkt().unwrap();
        let mut bytes = w.into_inner();
        bytes.extend_from_slice(pack);
        stdin.write_all(&bytes).unwrap();
        drop(stdin);
        let mut rest = Vec::new();
        stdout.read_to_end(&mut rest).unwrap();
        assert!(child.wait().unwrap().success());
        let mut r = PktReader::new(&rest[..]);
        let mut lines = Vec::new();
        while let Some(p) = r.read_pkt().unwrap() {
            if let Some(t) = p.text() {
                lines.push(String::from_utf8_lossy(t).into_owned());
            }
        }
        self.assert_staging_empty();
        lines
    }

    /// `git pack-objects --stdout` over an explicit object list.
    fn pack_of(&self, objects: &[String]) -> Vec<u8> {
        let mut list = objects.join("\n");
        if !list.is_empty() {
            list.push('\n');
        }
        self.git_stdin(&["pack-objects", "-q", "--stdout"], list.as_bytes())
    }

    /// Adds a ref to the store's refs file directly, bypassing the push
    /// path (as a ref written before some check existed would be).
    fn seed_ref(&self, name: &str, id: &str) {
        let mut text = self.refs_text();
        text.push_str(&format!("{id} {name}\n"));
        fs::write(self.store.join("refs"), text).unwrap();
    }

    fn unseed_ref(&self, name: &str) {
        let text: String = self
            .refs_text()
            .lines()
            .filter(|l| l.split_once(' ').is_none_or(|(_, n)| n != name))
            .map(|l| format!("{l}\n"))
            .collect();
        fs::write(self.store.join("refs"), text).unwrap();
    }

    /// A git command that reads the store through the harness's
    /// upload-pack mode; `url` is the store as a `file://` url (a bare
    /// path would make git look for a repository there itself).
    fn upload_cmd(&self, dir: &Path, args: &[&str]) -> Command {
        let mut c = self.cmd(dir, args);
        c.env("RECEIVE_STDIO_UPLOAD", "1");
        c
    }

    fn store_url(&self) -> String {
        format!("file://{}", self.store.display())
    }

    fn write_literally(&self, kind: &str, data: &[u8]) -> String {
        let out = self.git_stdin(
            &["hash-object", "-t", kind, "-w", "--literally", "--stdin"],
            data,
        );
        String::from_utf8(out).unwrap().trim().to_owned()
    }
}

const ZERO: &str = "0000000000000000000000000000000000000000";

fn big_text(n: usize, changed: usize) -> String {
    (0..n)
        .map(|i| {
            if i == changed {
                format!("line {i} was changed here\n")
            } else {
                format!("line {i} of a reasonably long file used to provoke deltas\n")
            }
        })
        .collect()
}

#[test]
fn push_to_empty_then_incremental_thin_pack() {
    let f = Fixture::new();
    f.commit("big.txt", &big_text(400, usize::MAX), "one");
    f.commit("small.txt", "hello\n", "two");
    // git asks for quiet unless progress is on; with it, our side-band
    // message shows up as "remote: ...".
    let first = f.push_ok(&["--progress", "main"]);
    assert!(first.contains("remote: cairn: stored 6 objects"), "{first}");
    assert_eq!(
        f.store_ref("refs/heads/main"),
        Some(f.git(&["rev-parse", "main"]))
    );
    assert!(f.refs_text().starts_with("HEAD refs/heads/main\n"));
    let first_packs = f.pack_indices();
    assert_eq!(first_packs.len(), 1);

    // A one-line change of the big file: git sends it as a delta against
    // the blob the store already has (a thin pack).
    f.commit("big.txt", &big_text(400, 7), "three");
    let second = f.push_ok(&["main"]);
    assert!(second.contains("main -> main"), "{second}");
    assert!(!second.contains("remote: cairn"), "{second}");
    assert_eq!(f.pack_indices().len(), 2);
    // The client sent 3 objects (commit, tree, blob delta); the staged pack
    // also holds the delta's base, taken from the store.
    let new_objects = f
        .git(&["rev-list", "--objects", "main~1..main"])
        .lines()
        .count();
    assert_eq!(new_objects, 3);
    let fresh: Vec<PathBuf> = f
        .pack_indices()
        .into_iter()
        .filter(|p| !first_packs.contains(p))
        .collect();
    let fresh = PackSet::open(&fresh).unwrap();
    assert_eq!(fresh.bundles()[0].index.num_objects(), 4);
    assert_eq!(
        f.store_ref("refs/heads/main"),
        Some(f.git(&["rev-parse", "main"]))
    );
    f.assert_store_has(&["main"]);
    // verify-pack on each pack alone proves thin bases were completed.
    f.fsck_store();

    // Nothing to push: the client sends only a flush.
    let third = f.push_ok(&["main"]);
    assert!(third.contains("Everything up-to-date"), "{third}");
    assert_eq!(f.pack_indices().len(), 2);
}

#[test]
fn branches_tags_delete_and_force_push() {
    let f = Fixture::new();
    let c1 = f.commit("a.txt", "a\n", "one");
    f.push_ok(&["main"]);
    f.git(&["checkout", "-q", "-b", "dev"]);
    let c2 = f.commit("b.txt", "b\n", "two");
    f.git(&["tag", "-a", "v1", "-m", "release one"]);
    f.git(&["tag", "light", "main"]);
    // A new branch at an existing commit gets an empty pack.
    f.push_ok(&["dev", "main:refs/heads/copy", "--quiet"]);
    f.push_ok(&["--tags"]);
    assert_eq!(f.store_ref("refs/heads/dev"), Some(c2.clone()));
    assert_eq!(f.store_ref("refs/heads/copy"), Some(c1.clone()));
    assert_eq!(
        f.store_ref("refs/tags/v1"),
        Some(f.git(&["rev-parse", "v1"]))
    );
    assert_eq!(f.store_ref("refs/tags/light"), Some(c1.clone()));
    f.fsck_store();

    // Delete a branch and a tag.
    f.push_ok(&[":copy", ":refs/tags/light"]);
    assert_eq!(f.store_ref("refs/heads/copy"), None);
    assert_eq!(f.store_ref("refs/tags/light"), None);

    // The branch HEAD points to cannot be deleted.
    let err = f.push_err(&[":main"]);
    assert!(
        err.contains("deletion of the current branch prohibited"),
        "{err}"
    );
    assert_eq!(f.store_ref("refs/heads/main"), Some(c1.clone()));

    // Rewrite dev: a plain push is refused by the client, a forced one works.
    f.git(&["reset", "-q", "--hard", &c1]);
    let c3 = f.commit("c.txt", "c\n", "rewritten");
    let err = f.push_err(&["dev"]);
    assert!(err.contains("rejected"), "{err}");
    assert_eq!(f.store_ref("refs/heads/dev"), Some(c2));
    f.push_ok(&["-f", "dev"]);
    assert_eq!(f.store_ref("refs/heads/dev"), Some(c3));
    f.assert_store_has(&["dev", "main", "v1"]);
    f.fsck_store();
}

#[test]
fn atomic_push_with_a_stale_ref_applies_nothing() {
    let f = Fixture::new();
    let c0 = f.commit("a.txt", "a\n", "zero");
    let c1 = f.commit("a.txt", "aa\n", "one");
    f.git(&["branch", "dev", "main~1"]);
    f.push_ok(&["main", "dev"]);
    assert_eq!(f.store_ref("refs/heads/dev"), Some(c0.clone()));
    f.commit("a.txt", "aaa\n", "two");
    f.git(&["checkout", "-q", "dev"]);
    let d1 = f.commit("d.txt", "d\n", "dev one");
    let packs_before = f.pack_indices();

    // Someone else moves dev (to c1) between our advertisement and the
    // update, so the client's old value for dev is stale.
    let race = format!("{c1} refs/heads/dev");
    let out = f
        .push_cmd(&["--atomic", "main", "dev"])
        .env("RECEIVE_STDIO_RACE", &race)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("atomic push failed"), "{err}");
    assert!(err.contains("stale info"), "{err}");
    f.assert_staging_empty();
    assert_eq!(
        f.pack_indices(),
        packs_before,
        "rejected pack must not be kept"
    );
    assert_eq!(f.store_ref("refs/heads/main"), Some(c1.clone()));
    assert_eq!(f.store_ref("refs/heads/dev"), Some(c1.clone()));

    // Without --atomic the good update goes through.
    let refs = f
        .refs_text()
        .replace(&race, &format!("{c0} refs/heads/dev"));
    fs::write(f.store.join("refs"), refs).unwrap();
    let out = f
        .push_cmd(&["main", "dev"])
        .env("RECEIVE_STDIO_RACE", &race)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("stale info"), "{err}");
    f.assert_staging_empty();
    assert_eq!(
        f.store_ref("refs/heads/main"),
        Some(f.git(&["rev-parse", "main"]))
    );
    assert_eq!(f.store_ref("refs/heads/dev"), Some(c1));
    assert_ne!(f.store_ref("refs/heads/dev"), Some(d1));
    assert_eq!(f.pack_indices().len(), packs_before.len() + 1);
    f.fsck_store();
}

#[test]
fn push_options_are_received() {
    let f = Fixture::new();
    f.commit("a.txt", "a\n", "one");
    f.push_ok(&[
        "--push-option=ci.skip",
        "--push-option=reviewer=alice",
        "main",
    ]);
    let options = fs::read_to_string(f.store.join("last-push-options")).unwrap();
    assert_eq!(options, "ci.skip\nreviewer=alice\n");
}

/// A tree entry with `name`, pointing at a real blob.
fn evil_tree(f: &Fixture, mode: &str, name: &[u8]) -> String {
    let blob = f.write_literally("blob", b"payload\n");
    let mut tree = format!("{mode} ").into_bytes();
    tree.extend_from_slice(name);
    tree.push(0);
    tree.extend_from_slice(ObjectId::from_hex(blob.as_bytes()).unwrap().as_slice());
    f.write_literally("tree", &tree)
}

#[test]
fn trees_named_like_dot_git_are_rejected() {
    let f = Fixture::new();
    f.commit("a.txt", "a\n", "one");
    f.push_ok(&["main"]);
    let refs_before = f.refs_text();
    let packs_before = f.pack_indices();
    for (mode, name, id) in [
        ("40000", &b".git"[..], "hasDotgit"),
        ("100644", b".GIT", "hasDotgit"),
        ("40000", b"git~1", "hasDotgit"),
        ("100644", b"..", "hasDotdot"),
        ("100644", b"a/b", "fullPathname"),
    ] {
        let tree = if mode == "40000" {
            // A directory entry must point at a tree to get past the client.
            let inner = evil_tree(&f, "100644", b"x");
            let mut t = format!("{mode} ").into_bytes();
            t.extend_from_slice(name);
            t.push(0);
            t.extend_from_slice(ObjectId::from_hex(inner.as_bytes()).unwrap().as_slice());
            f.write_literally("tree", &t)
        } else {
            evil_tree(&f, mode, name)
        };
        let commit = f.git(&["commit-tree", &tree, "-p", "main", "-m", "evil"]);
        f.git(&["update-ref", "refs/heads/evil", &commit]);
        let err = f.push_err(&["evil"]);
        assert!(err.contains(id), "{name:?}: {err}");
        assert!(err.contains("unpack"), "{err}");
        assert_eq!(f.refs_text(), refs_before);
        assert_eq!(f.pack_indices(), packs_before);
    }
}

#[test]
fn commit_with_broken_header_is_rejected() {
    let f = Fixture::new();
    f.commit("a.txt", "a\n", "one");
    f.push_ok(&["main"]);
    let refs_before = f.refs_text();
    let tree = f.git(&["rev-parse", "main^{tree}"]);
    let parent = f.git(&["rev-parse", "main"]);
    for (body, id) in [
        (
            format!("tree {tree}\nparent {parent}\nauthor nobody\ncommitter C <c@x> 1 +0000\n\nm\n"),
            "missingEmail",
        ),
        (
            format!("tree {tree}\nparent {parent}\ncommitter C <c@x> 1 +0000\n\nm\n"),
            "missingAuthor",
        ),
        (
            format!("tree {tree}\nparent {parent}\nauthor A <a@x> 1 +0000\ncommitter C <c@x> 1 +00\n\nm\n"),
            "badTimezone",
        ),
    ] {
        let commit = f.write_literally("commit", body.as_bytes());
        f.git(&["update-ref", "refs/heads/broken", &commit]);
        let err = f.push_err(&["broken"]);
        assert!(err.contains(id), "{err}");
        assert_eq!(f.refs_text(), refs_before);
    }
}

#[test]
fn unconnected_push_is_refused_per_ref() {
    let f = Fixture::new();
    let c1 = f.commit("a.txt", "a\n", "one");
    f.push_ok(&["main"]);
    let packs_before = f.pack_indices();
    let _c2 = f.commit("b.txt", "b\n", "two");
    let c3 = f.commit("c.txt", "c\n", "three");
    // Everything new in c3, but not c2 (its parent) nor c2's tree.
    let objects: Vec<String> = f
        .git(&["rev-list", "--objects", "main~1..main"])
        .lines()
        .map(|l| l[..40].to_owned())
        .collect();
    let pack = f.pack_of(&objects);
    let report = f.raw_push(
        &[format!("{c1} {c3} refs/heads/main")],
        "report-status",
        &pack,
    );
    assert_eq!(
        report,
        vec!["unpack ok", "ng refs/heads/main missing necessary objects"]
    );
    assert_eq!(f.store_ref("refs/heads/main"), Some(c1.clone()));
    assert_eq!(f.pack_indices(), packs_before);

    // A create pointing at an object nobody sent.
    let report = f.raw_push(
        &[format!("{ZERO} {c3} refs/heads/other")],
        "report-status",
        &f.pack_of(&[]),
    );
    assert_eq!(
        report,
        vec!["unpack ok", "ng refs/heads/other missing necessary objects"]
    );
}

#[test]
fn truncated_and_corrupted_packs_fail_cleanly() {
    let f = Fixture::new();
    let c1 = f.commit("a.txt", &big_text(50, usize::MAX), "one");
    let objects: Vec<String> = f
        .git(&["rev-list", "--objects", "main"])
        .lines()
        .map(|l| l[..40].to_owned())
        .collect();
    let pack = f.pack_of(&objects);
    let cmd = vec![format!("{ZERO} {c1} refs/heads/main")];

    let truncated = &pack[..pack.len() - 30];
    let report = f.raw_push(&cmd, "report-status", truncated);
    assert_eq!(
        report,
        vec![
            "unpack pack is truncated",
            "ng refs/heads/main unpacker error"
        ]
    );

    let mut flipped = pack.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x55;
    let report = f.raw_push(&cmd, "report-status", &flipped);
    assert!(report[0].starts_with("unpack pack"), "{report:?}");
    assert_ne!(report[0], "unpack ok");
    assert_eq!(report[1], "ng refs/heads/main unpacker error");

    // The same corruption with a recomputed trailer: caught while inflating.
    let body = &flipped[..flipped.len() - 20];
    let mut h = gix_hash::hasher(gix_hash::Kind::Sha1);
    h.update(body);
    let mut resealed = body.to_vec();
    resealed.extend_from_slice(h.try_finalize().unwrap().as_slice());
    let report = f.raw_push(&cmd, "report-status", &resealed);
    assert!(
        report[0].starts_with("unpack pack is corrupt"),
        "{report:?}"
    );

    let mut junk = pack.clone();
    junk.extend_from_slice(&[b'j'; 70]);
    let report = f.raw_push(&cmd, "report-status", &junk);
    assert_eq!(
        report,
        vec![
            "unpack pack has junk at the end",
            "ng refs/heads/main unpacker error"
        ]
    );

    let report = f.raw_push(&cmd, "report-status", b"");
    assert_eq!(report[0], "unpack no pack data received");
    let report = f.raw_push(&cmd, "report-status", b"JUNKJUNKJUNKJUNK");
    assert_eq!(report[0], "unpack bad pack header: missing PACK signature");

    assert!(f.refs_text().is_empty());
    assert!(f.pack_indices().is_empty());

    // And the intact pack is accepted.
    let report = f.raw_push(&cmd, "report-status", &pack);
    assert_eq!(report, vec!["unpack ok", "ok refs/heads/main"]);
    f.fsck_store();
}

#[test]
fn ref_delta_against_a_base_both_sent_and_stored() {
    // Without ofs-delta, pack-objects writes in-pack bases as ref-deltas.
    // Such a base that is also in the store must not be added again by
    // thin-pack completion: git rejects packs holding an object twice.
    let f = Fixture::new();
    let c1 = f.commit("big.txt", &big_text(300, usize::MAX), "one");
    f.push_ok(&["main"]);
    let v1 = f.git(&["rev-parse", "main:big.txt"]);
    // Smaller than v1, so pack-objects deltifies it against v1.
    let c2 = f.commit("big.txt", &big_text(250, 3), "two");
    let mut objects: Vec<String> = f
        .git(&["rev-list", "--objects", "main~1..main"])
        .lines()
        .map(|l| l[..40].to_owned())
        .collect();
    objects.push(v1.clone());
    let pack = f.pack_of(&objects);
    let report = f.raw_push(
        &[format!("{c1} {c2} refs/heads/main")],
        "report-status",
        &pack,
    );
    assert_eq!(report, vec!["unpack ok", "ok refs/heads/main"]);
    f.assert_store_has(&["main"]);
    f.fsck_store();
}

/// `prefix` padded with `x` to `len` bytes.
fn long_name(prefix: &str, len: usize) -> String {
    format!("{prefix}{}", "x".repeat(len - prefix.len()))
}

fn run(mut c: Command) -> Output {
    c.output().expect("run git")
}

fn ok_stdout(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn over_long_refs_stored_earlier_break_nothing() {
    let f = Fixture::new();
    f.commit("a.txt", "a\n", "one");
    f.git(&["tag", "-a", "v1", "-m", "release one"]);
    f.push_ok(&["main", "v1"]);
    let tag = f.git(&["rev-parse", "v1"]);
    let main = f.git(&["rev-parse", "main"]);

    // Stored before the cap existed, bypassing the push path: the longest
    // name a command pkt-line can carry, sorting before every other ref,
    // and an annotated tag one byte over the cap (with a peeled line).
    let huge = long_name("refs/a/", 65_430);
    let over = long_name("refs/tags/over-", MAX_REF_NAME_LEN + 1);
    f.seed_ref(&huge, &main);
    f.seed_ref(&over, &tag);

    // A push still gets a usable advertisement.
    let c2 = f.commit("b.txt", "b\n", "two");
    let out = f.push_ok(&["main"]);
    assert!(out.contains("main -> main"), "{out}");
    assert_eq!(f.store_ref("refs/heads/main"), Some(c2.clone()));

    // ls-remote and clones, v0 and v2, work and never show the long refs.
    let url = f.store_url();
    let bin = example_bin();
    let up = format!("--upload-pack={}", bin.display());
    let want = format!(
        "{c2}\tHEAD\n{c2}\trefs/heads/main\n{tag}\trefs/tags/v1\n{main}\trefs/tags/v1^{{}}\n"
    );
    for proto in ["0", "2"] {
        let cfg = format!("protocol.version={proto}");
        let trace = f.root.join(format!("trace-v{proto}"));
        let listed = ok_stdout(
            run({
                let mut c = f.upload_cmd(&f.root, &["-c", &cfg, "ls-remote", &up, &url]);
                c.env("GIT_TRACE_PACKET", &trace);
                c
            }),
            "ls-remote",
        );
        assert_eq!(listed, want, "protocol {proto}");
        let traced = fs::read_to_string(&trace).unwrap();
        assert_eq!(traced.contains("ls-refs"), proto == "2", "protocol {proto}");

        let dest = format!("clone-v{proto}");
        ok_stdout(
            run(f.upload_cmd(&f.root, &["-c", &cfg, "clone", "-q", &up, &url, &dest])),
            "clone",
        );
        let dest = f.root.join(&dest);
        let refs = f.git_in(&dest, &["for-each-ref", "--format=%(refname)"]);
        assert_eq!(
            refs,
            "refs/heads/main\nrefs/remotes/origin/HEAD\nrefs/remotes/origin/main\nrefs/tags/v1",
            "protocol {proto}"
        );
        f.git_in(&dest, &["fsck", "--full", "--strict", "--no-dangling"]);
    }

    // A plain `git push --delete` removes an over-long ref, up to the
    // longest name git's client can send: its first command line carries
    // its capabilities too, so that is a little under what the
    // advertisement can show. Find that length.
    let try_delete = |len: usize| -> bool {
        let name = long_name("refs/heads/d", len);
        f.seed_ref(&name, &main);
        let out = f.push(&["--delete", &name]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        f.assert_staging_empty();
        if out.status.success() {
            assert_eq!(f.store_ref(&name), None, "deleted at {len}");
            true
        } else {
            // Refused by the client itself, never by us.
            assert!(
                stderr.contains("impossibly long line"),
                "{len}: {stderr:.300}"
            );
            assert_eq!(f.store_ref(&name), Some(main.clone()));
            f.unseed_ref(&name);
            false
        }
    };
    let (mut good, mut bad) = (65_000, MAX_DATA_LEN - 42);
    assert!(try_delete(good));
    assert!(
        !try_delete(bad),
        "the longest advertised name cannot be sent back"
    );
    while bad - good > 1 {
        let mid = (good + bad) / 2;
        if try_delete(mid) {
            good = mid;
        } else {
            bad = mid;
        }
    }
    eprintln!("longest ref name git's client can delete: {good} bytes");
    assert!(good > 65_300, "{good}");
    let out = f.push_ok(&["--delete", &over]);
    assert!(out.contains("[deleted]"), "{out}");
    assert_eq!(f.store_ref(&over), None);
    // The one too long for any client stays, harmless.
    assert_eq!(f.store_ref(&huge), Some(main.clone()));

    // New refs over the cap are refused with the reason; at the cap is fine.
    let refs_before = f.refs_text();
    let too_long = long_name("refs/heads/n", MAX_REF_NAME_LEN + 1);
    let err = f.push_err(&[&format!("HEAD:{too_long}")]);
    assert!(
        err.contains("(ref name too long (4097 bytes, limit 4096))"),
        "{err}"
    );
    assert_eq!(f.refs_text(), refs_before);
    let at_cap = long_name("refs/heads/n", MAX_REF_NAME_LEN);
    f.push_ok(&[&format!("HEAD:{at_cap}")]);
    assert_eq!(f.store_ref(&at_cap), Some(c2));
}

/// A commit on top of `main` whose tree also holds `.gitmodules` with
/// `content`, as branch `branch`.
fn with_gitmodules(f: &Fixture, branch: &str, content: &[u8]) -> String {
    let blob = f.write_literally("blob", content);
    let mut listing = f.git(&["ls-tree", "main"]);
    listing.push_str(&format!("\n100644 blob {blob}\t.gitmodules\n"));
    let tree = String::from_utf8(f.git_stdin(&["mktree"], listing.as_bytes())).unwrap();
    let commit = f.git(&["commit-tree", tree.trim(), "-p", "main", "-m", branch]);
    f.git(&["update-ref", &format!("refs/heads/{branch}"), &commit]);
    commit
}

/// Pushes `branch` to a bare git repository with `receive.fsckObjects`;
/// returns whether git accepted it, and its output.
fn git_receives(f: &Fixture, reference: &Path, branch: &str) -> (bool, String) {
    let out = f
        .cmd(&f.client, &["push", reference.to_str().unwrap(), branch])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn gitmodules_attacks_are_refused_like_git_does() {
    let f = Fixture::new();
    f.commit("a.txt", "a\n", "one");
    f.push_ok(&["main"]);
    let reference = f.root.join("reference.git");
    f.git_in(&f.root, &["init", "-q", "--bare", "reference.git"]);
    f.git_in(&reference, &["config", "receive.fsckObjects", "true"]);
    let (accepted, out) = git_receives(&f, &reference, "main");
    assert!(accepted, "{out}");

    let cases: &[(&str, &str, Option<&str>)] = &[
        (
            "fine",
            "[submodule \"lib\"]\n\tpath = lib\n\turl = https://example.com/lib.git\n",
            None,
        ),
        (
            "name",
            "[submodule \"../../../../../hooks\"]\n\tpath = x\n\turl = ./x\n",
            Some("gitmodulesName: disallowed submodule name: ../../../../../hooks"),
        ),
        (
            "path",
            "[submodule \"evil\"]\n\tpath = -evil\n\turl = ./evil\n",
            Some("gitmodulesPath: disallowed submodule path: -evil"),
        ),
        (
            "url",
            "[submodule \"evil\"]\n\tpath = evil\n\turl = -u./payload\n",
            Some("gitmodulesUrl: disallowed submodule url: -u./payload"),
        ),
        (
            "newline",
            "[submodule \"evil\"]\n\tpath = evil\n\turl = https://example.com/%0atest\n",
            Some("gitmodulesUrl: disallowed submodule url: https://example.com/%0atest"),
        ),
        (
            "update",
            "[submodule \"evil\"]\n\tpath = evil\n\tupdate = !sh -c id\n",
            Some("gitmodulesUpdate: disallowed submodule update setting: !sh -c id"),
        ),
    ];
    for (branch, content, refusal) in cases {
        let commit = with_gitmodules(&f, branch, content.as_bytes());
        let refs_before = f.refs_text();
        let packs_before = f.pack_indices();
        let (git_accepted, git_out) = git_receives(&f, &reference, branch);
        assert_eq!(
            git_accepted,
            refusal.is_none(),
            "git on {branch}: {git_out}"
        );
        match refusal {
            None => {
                f.push_ok(&[branch]);
                assert_eq!(f.store_ref(&format!("refs/heads/{branch}")), Some(commit));
            }
            Some(text) => {
                let msg_id = &text[..text.find(':').unwrap()];
                assert!(git_out.contains(text), "git on {branch}: {git_out}");
                let err = f.push_err(&[branch]);
                assert!(err.contains(&format!("({text})")), "{branch}: {err}");
                assert!(err.contains("remote unpack failed"), "{branch}: {err}");
                assert!(err.contains(msg_id), "{branch}: {err}");
                assert_eq!(f.refs_text(), refs_before, "{branch}");
                assert_eq!(f.pack_indices(), packs_before, "{branch}");
            }
        }
    }

    // A blob the repository already holds under a harmless name becomes
    // `.gitmodules` in a later push: checked all the same, by both.
    let evil = b"[submodule \"../../../../../hooks\"]\n\tpath = x\n\turl = ./x\n";
    let blob = f.write_literally("blob", evil);
    fs::write(f.client.join("notes.txt"), evil).unwrap();
    f.git(&["add", "notes.txt"]);
    f.git(&["commit", "-q", "-m", "harmless name"]);
    f.push_ok(&["main"]);
    let (accepted, out) = git_receives(&f, &reference, "main");
    assert!(accepted, "{out}");
    let mut listing = f.git(&["ls-tree", "main"]);
    listing.push_str(&format!("\n100644 blob {blob}\t.gitmodules\n"));
    let tree = String::from_utf8(f.git_stdin(&["mktree"], listing.as_bytes())).unwrap();
    let commit = f.git(&["commit-tree", tree.trim(), "-p", "main", "-m", "renamed"]);
    f.git(&["update-ref", "refs/heads/renamed", &commit]);
    let refs_before = f.refs_text();
    let packs_before = f.pack_indices();
    let (accepted, out) = git_receives(&f, &reference, "renamed");
    assert!(!accepted && out.contains("gitmodulesName"), "{out}");
    let err = f.push_err(&["renamed"]);
    assert!(
        err.contains("(gitmodulesName: disallowed submodule name: ../../../../../hooks)"),
        "{err}"
    );
    assert_eq!(f.refs_text(), refs_before);
    assert_eq!(f.pack_indices(), packs_before);
    f.fsck_store();
}
