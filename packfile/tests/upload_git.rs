//! End-to-end upload-pack tests: the real `git` client clones and fetches
//! through the `upload_stdio` harness (protocol v0 and v2), results are
//! checked with `git fsck --full` and against stock `git upload-pack`,
//! including the size of the packs sent.

#[path = "upload_helpers.rs"]
mod helpers;

use std::fs;
use std::path::{Path, PathBuf};

use helpers::{harness, Fixture};

const PROTOCOLS: [&str; 2] = ["0", "2"];

/// Allowed size of our pack relative to the one stock git sends.
const MAX_RATIO: f64 = 1.1;

struct Server {
    fx: Fixture,
    src: PathBuf,
    bare: PathBuf,
}

impl Server {
    fn new(commits: usize) -> Self {
        let fx = Fixture::new();
        let src = fx.history("src", commits);
        let bare = fx.path("srv.git");
        fx.publish(&src, &bare);
        Server { fx, src, bare }
    }

    fn bare(&self) -> &str {
        self.bare.to_str().expect("utf8 path")
    }

    /// Runs a clone (ours when `ours`, else stock git) and returns the
    /// clone's path and the size of the pack it received.
    fn clone(&self, ours: bool, proto: &str, dest: &str, extra: &[&str]) -> (PathBuf, u64) {
        let trace = self.fx.path(&format!("{dest}.pack-trace"));
        // A stale trace would stand in for one git failed to write.
        let _ = fs::remove_file(&trace);
        let h = harness();
        let up = format!("--upload-pack={}", h.display());
        let cfg = format!("protocol.version={proto}");
        let mut args = vec!["-c", cfg.as_str(), "clone", "-q", "--no-local"];
        if ours {
            args.push(&up);
        }
        args.extend_from_slice(extra);
        args.push(self.bare());
        args.push(dest);
        let trace_s = trace.to_str().expect("utf8").to_owned();
        self.fx.git_env(
            self.fx.dir.path(),
            &args,
            &[("GIT_TRACE_PACKFILE", &trace_s)],
        );
        let dest = self.fx.path(dest);
        if ours {
            // Later fetches (including lazy ones) must use the harness too.
            self.fx.git(
                &dest,
                &[
                    "config",
                    "remote.origin.uploadpack",
                    h.to_str().expect("utf8"),
                ],
            );
        }
        let size = pack_size(&trace);
        assert!(size > 0, "clone into {dest:?} traced no pack in {trace:?}");
        (dest, size)
    }

    /// Fetches in `repo`, returning the size of the received pack (0 when
    /// the fetch transferred none).
    fn fetch(&self, repo: &Path, proto: &str, extra: &[&str]) -> u64 {
        let trace = repo.with_extension("fetch-trace");
        let _ = fs::remove_file(&trace);
        let cfg = format!("protocol.version={proto}");
        let mut args = vec!["-c", cfg.as_str(), "fetch", "-q"];
        args.extend_from_slice(extra);
        let trace_s = trace.to_str().expect("utf8").to_owned();
        self.fx
            .git_env(repo, &args, &[("GIT_TRACE_PACKFILE", &trace_s)]);
        pack_size(&trace)
    }

    fn fsck(&self, repo: &Path) {
        self.fx.git(repo, &["fsck", "--full", "--no-progress"]);
    }

    fn refs(&self, repo: &Path) -> String {
        self.fx
            .git(repo, &["for-each-ref", "--format=%(objectname) %(refname)"])
    }
}

/// Total size of the packs git copied into the `GIT_TRACE_PACKFILE` file
/// `trace`, or 0 if the transfer carried none.
///
/// git creates the file as soon as it reads any pkt-line, so a missing file
/// means the variable or path is wrong; reading that as "0 bytes" would let
/// every size check pass. Non-empty contents must be whole packs and
/// nothing else, so that a partial or foreign trace cannot be measured
/// either. There may be several: git appends every pack the process
/// receives (e.g. a fetch's second connection that backfills tags).
fn pack_size(trace: &Path) -> u64 {
    let bytes = fs::read(trace).unwrap_or_else(|e| {
        panic!("pack trace {trace:?} was not written ({e}); is GIT_TRACE_PACKFILE honoured?")
    });
    let mut start = 0;
    while start < bytes.len() {
        let rest = &bytes[start..];
        let len = pack_len(rest).unwrap_or_else(|| {
            panic!(
                "pack trace {trace:?} holds no complete pack at byte {start} of {} (starts {:?})",
                bytes.len(),
                String::from_utf8_lossy(&rest[..rest.len().min(16)])
            )
        });
        start += len;
    }
    bytes.len() as u64
}

/// Length of the complete pack at the start of `b`: a pack header, then
/// a SHA-1 trailer of everything before it, ending either where the next
/// `PACK` signature starts or at the end of `b`.
fn pack_len(b: &[u8]) -> Option<usize> {
    // Header (12 bytes) and trailer (20): the smallest, empty pack.
    const MIN: usize = 32;
    let version = u32::from_be_bytes(b.get(4..8)?.try_into().ok()?);
    if b.len() < MIN || !b.starts_with(b"PACK") || !(version == 2 || version == 3) {
        return None;
    }
    let next_signatures = (MIN..b.len()).filter(|&i| b[i..].starts_with(b"PACK"));
    next_signatures.chain([b.len()]).find(|&end| {
        let (body, trailer) = b[..end].split_at(end - 20);
        let mut h = gix_hash::hasher(gix_hash::Kind::Sha1);
        h.update(body);
        h.try_finalize().is_ok_and(|sum| sum.as_slice() == trailer)
    })
}

fn assert_ratio(what: &str, ours: u64, git: u64) {
    // Both sides must have measured a pack, or the ratio means nothing.
    assert!(
        ours > 0 && git > 0,
        "{what}: no pack measured (ours {ours}, git {git})"
    );
    let ratio = ours as f64 / git as f64;
    eprintln!("{what}: ours {ours} bytes, git {git} bytes, ratio {ratio:.3}");
    assert!(
        ratio <= MAX_RATIO,
        "{what}: our pack is {ours} bytes vs git's {git}"
    );
}

#[test]
fn clone_and_incremental_fetch_match_git() {
    let s = Server::new(30);
    for proto in PROTOCOLS {
        let (ours, ours_size) = s.clone(true, proto, &format!("ours-v{proto}"), &[]);
        let (stock, git_size) = s.clone(false, proto, &format!("git-v{proto}"), &[]);
        s.fsck(&ours);
        assert_eq!(s.refs(&ours), s.refs(&stock), "v{proto} clone refs");
        assert_eq!(
            s.fx.git(&ours, &["symbolic-ref", "HEAD"]),
            "refs/heads/main",
            "HEAD follows the symref"
        );
        assert!(s.fx.git(&ours, &["tag"]).contains("v1"));
        assert_ratio(&format!("v{proto} full clone"), ours_size, git_size);
    }

    // New history on the server, including an annotated tag that clients
    // pick up through include-tag.
    for i in 30..36 {
        s.fx.commit(
            &s.src,
            &[
                ("src/lib.rs", helpers::source(i, 120)),
                ("new.txt", format!("added in {i}\n")),
            ],
            &format!("commit {i}"),
        );
    }
    s.fx.tag(&s.src, "v2", "HEAD~1");
    s.fx.publish(&s.src, &s.bare);

    for proto in PROTOCOLS {
        let ours = s.fx.path(&format!("ours-v{proto}"));
        let stock = s.fx.path(&format!("git-v{proto}"));
        let ours_size = s.fetch(&ours, proto, &[]);
        let git_size = s.fetch(&stock, proto, &[]);
        s.fsck(&ours);
        assert_eq!(s.refs(&ours), s.refs(&stock), "v{proto} fetched refs");
        assert!(
            s.fx.git(&ours, &["tag"]).contains("v2"),
            "include-tag brought v2"
        );
        assert_ratio(&format!("v{proto} incremental fetch"), ours_size, git_size);
        // Nothing new: a second fetch negotiates and transfers nothing.
        assert_eq!(s.fetch(&ours, proto, &[]), 0);
    }
}

#[test]
fn shallow_depth_deepen_and_unshallow() {
    let s = Server::new(12);
    for proto in PROTOCOLS {
        let (ours, _) = s.clone(true, proto, &format!("ours-v{proto}"), &["--depth", "1"]);
        let (stock, _) = s.clone(false, proto, &format!("git-v{proto}"), &["--depth", "1"]);
        let shallow = |r: &Path| fs::read_to_string(r.join(".git/shallow")).unwrap_or_default();
        let count = |r: &Path| s.fx.git(r, &["rev-list", "--count", "HEAD"]);
        assert_eq!(count(&ours), "1");
        assert_eq!(shallow(&ours), shallow(&stock));
        s.fsck(&ours);

        s.fetch(&ours, proto, &["--deepen=1"]);
        s.fetch(&stock, proto, &["--deepen=1"]);
        assert_eq!(count(&ours), "2", "v{proto} deepen");
        assert_eq!(shallow(&ours), shallow(&stock));
        s.fsck(&ours);

        s.fetch(&ours, proto, &["--deepen=2"]);
        s.fetch(&stock, proto, &["--deepen=2"]);
        assert_eq!(count(&ours), count(&stock));
        s.fsck(&ours);

        s.fetch(&ours, proto, &["--unshallow"]);
        assert!(!ours.join(".git/shallow").exists(), "v{proto} unshallow");
        assert_eq!(count(&ours), "12");
        s.fsck(&ours);
    }
}

#[test]
fn shallow_since_and_exclude() {
    let s = Server::new(12);
    let since = format!("--shallow-since={}", Fixture::date_of(8));
    for proto in PROTOCOLS {
        for (i, opt) in [since.as_str(), "--shallow-exclude=v1"].iter().enumerate() {
            let (ours, _) = s.clone(true, proto, &format!("ours-{i}-v{proto}"), &[opt]);
            let (stock, _) = s.clone(false, proto, &format!("git-{i}-v{proto}"), &[opt]);
            let count = |r: &Path| s.fx.git(r, &["rev-list", "--count", "HEAD"]);
            assert_eq!(count(&ours), count(&stock), "v{proto} {opt}");
            assert_eq!(
                fs::read_to_string(ours.join(".git/shallow")).ok(),
                fs::read_to_string(stock.join(".git/shallow")).ok(),
                "v{proto} {opt}"
            );
            s.fsck(&ours);
        }
    }
}

#[test]
fn partial_clone_filters_and_lazy_fetch() {
    let s = Server::new(15);
    for proto in PROTOCOLS {
        for filter in ["blob:none", "tree:0", "blob:limit=2k"] {
            let name = format!("ours-{}-v{proto}", filter.replace([':', '='], "_"));
            let arg = format!("--filter={filter}");
            let (ours, ours_size) = s.clone(true, proto, &name, &[&arg, "--no-checkout"]);
            let (_, git_size) = s.clone(
                false,
                proto,
                &format!("git-{name}"),
                &[&arg, "--no-checkout"],
            );
            assert_ratio(&format!("v{proto} {filter} clone"), ours_size, git_size);
            // Checking out old commits fetches missing trees and blobs lazily.
            s.fx.git(&ours, &["checkout", "-q", "HEAD~10"]);
            s.fx.git(&ours, &["checkout", "-q", "main"]);
            let expect = fs::read_to_string(s.src.join("src/lib.rs")).expect("source file");
            assert_eq!(
                fs::read_to_string(ours.join("src/lib.rs")).expect("checked out"),
                expect
            );
            s.fsck(&ours);
        }
    }
}

#[test]
fn protocol_v1_clone() {
    let s = Server::new(5);
    let (ours, _) = s.clone(true, "1", "ours-v1", &[]);
    s.fsck(&ours);
    assert_eq!(s.fx.git(&ours, &["rev-list", "--count", "HEAD"]), "5");
}
