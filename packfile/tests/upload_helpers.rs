//! Shared fixtures for the upload-pack tests: repositories built with the
//! real `git` (pinned dates, isolated configuration) and access to the
//! `upload_stdio` example harness.
#![allow(dead_code)]

use std::cell::Cell;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use cairn_packfile::pktline::{Pkt, PktReader};
use cairn_packfile::refs::{RefRecord, RepoRefs};
use cairn_packfile::store::PackSet;
use cairn_packfile::ObjectId;

/// 2020-01-01T00:00:00Z; commit `n` is dated `n` days later.
pub const EPOCH: i64 = 1_577_836_800;
pub const DAY: i64 = 86_400;

pub struct Fixture {
    pub dir: tempfile::TempDir,
    commits: Cell<i64>,
}

impl Fixture {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(dir.path().join("home")).expect("home");
        Fixture {
            dir,
            commits: Cell::new(0),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn command(&self, cwd: &Path, args: &[&str]) -> Command {
        let date = format!("@{} +0000", EPOCH + self.commits.get() * DAY);
        let mut c = Command::new("git");
        c.current_dir(cwd)
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.dir.path().join("home"))
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_AUTHOR_NAME", "A U Thor")
            .env("GIT_AUTHOR_EMAIL", "author@example.com")
            .env("GIT_COMMITTER_NAME", "C O Mitter")
            .env("GIT_COMMITTER_EMAIL", "committer@example.com")
            .env("GIT_AUTHOR_DATE", &date)
            .env("GIT_COMMITTER_DATE", &date);
        c
    }

    /// Runs git and returns its output, whatever the exit status.
    pub fn run(&self, cwd: &Path, args: &[&str], envs: &[(&str, &str)], stdin: &[u8]) -> Output {
        let mut c = self.command(cwd, args);
        for (k, v) in envs {
            c.env(k, v);
        }
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn git");
        let mut input = child.stdin.take().expect("stdin");
        let data = stdin.to_vec();
        let feeder = std::thread::spawn(move || {
            let _ = input.write_all(&data);
        });
        let out = child.wait_with_output().expect("git output");
        feeder.join().expect("stdin feeder");
        out
    }

    /// Runs git, panicking with its stderr on failure; returns trimmed stdout.
    pub fn git(&self, cwd: &Path, args: &[&str]) -> String {
        self.git_env(cwd, args, &[])
    }

    pub fn git_env(&self, cwd: &Path, args: &[&str], envs: &[(&str, &str)]) -> String {
        let out = self.run(cwd, args, envs, b"");
        assert!(
            out.status.success(),
            "git {args:?} failed in {cwd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Creates a non-bare repository with branch `main`.
    pub fn init(&self, name: &str) -> PathBuf {
        let p = self.path(name);
        self.git(self.dir.path(), &["init", "-q", "-b", "main", name]);
        p
    }

    /// Writes `files` (path, content) and commits them; each commit one day later.
    pub fn commit(&self, repo: &Path, files: &[(&str, String)], msg: &str) -> String {
        for (name, content) in files {
            let p = repo.join(name);
            if let Some(parent) = p.parent() {
                fs::create_dir_all(parent).expect("mkdir");
            }
            fs::write(p, content).expect("write file");
        }
        self.commits.set(self.commits.get() + 1);
        self.git(repo, &["add", "-A"]);
        self.git(repo, &["commit", "-q", "-m", msg]);
        self.git(repo, &["rev-parse", "HEAD"])
    }

    pub fn tag(&self, repo: &Path, name: &str, rev: &str) {
        self.git(
            repo,
            &["tag", "-a", name, "-m", &format!("release {name}"), rev],
        );
    }

    /// The date of commit number `n` as git accepts it.
    pub fn date_of(n: i64) -> String {
        format!("@{}", EPOCH + n * DAY)
    }

    /// A source repository with realistic history: a growing file edited
    /// in place, a subdirectory, a larger text file, tags and a side branch.
    pub fn history(&self, name: &str, commits: usize) -> PathBuf {
        let repo = self.init(name);
        for i in 0..commits {
            let mut files = vec![
                ("README.md", readme(i)),
                ("src/lib.rs", source(i, 120)),
                (
                    "src/nested/data.txt",
                    (0..=i)
                        .map(|k| format!("entry {k}: {}\n", k * 7919 % 1000))
                        .collect(),
                ),
            ];
            if i % 5 == 0 {
                files.push(("docs/big.txt", source(i / 5, 800)));
            }
            self.commit(&repo, &files, &format!("commit {i}"));
            if i == commits / 2 {
                self.tag(&repo, "v1", "HEAD");
                self.git(&repo, &["tag", "light", "HEAD~1"]);
            }
        }
        self.git(&repo, &["branch", "side", "HEAD~3"]);
        repo
    }

    /// Copies `src`'s refs into the bare repository `bare` (creating it),
    /// then packs everything into one pack and packs the refs.
    pub fn publish(&self, src: &Path, bare: &Path) {
        if !bare.exists() {
            self.git(
                self.dir.path(),
                &[
                    "init",
                    "-q",
                    "--bare",
                    "-b",
                    "main",
                    bare.to_str().expect("utf8"),
                ],
            );
            self.git(bare, &["config", "uploadpack.allowFilter", "true"]);
        }
        self.git(
            bare,
            &[
                "fetch",
                "-q",
                "--force",
                src.to_str().expect("utf8"),
                "refs/heads/*:refs/heads/*",
                "refs/tags/*:refs/tags/*",
            ],
        );
        self.git(bare, &["repack", "-a", "-d", "-q"]);
        self.git(bare, &["pack-refs", "--all"]);
    }
}

impl Default for Fixture {
    fn default() -> Self {
        Self::new()
    }
}

fn readme(i: usize) -> String {
    format!(
        "# Project\n\nRevision {i}.\n\nSome stable text that does not change between commits.\n"
    )
}

/// `lines` lines of code-like text; revision `rev` edits a few of them.
pub fn source(rev: usize, lines: usize) -> String {
    let mut s = String::new();
    for l in 0..lines {
        if l % 17 == rev % 17 {
            s.push_str(&format!(
                "    let value_{l} = compute({l}, {rev}); // edited in {rev}\n"
            ));
        } else {
            s.push_str(&format!(
                "    let value_{l} = compute({l}, {}); // stable line\n",
                l * 31 % 97
            ));
        }
    }
    s
}

/// Path of the `upload_stdio` example next to this test binary.
pub fn harness() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let debug = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let p = debug
        .join("examples")
        .join(format!("upload_stdio{}", std::env::consts::EXE_SUFFIX));
    assert!(p.exists(), "harness not built at {p:?}");
    p
}

/// Refs and packs of a bare repository, read like the harness does.
pub fn open_repo(bare: &Path) -> (RepoRefs, PackSet) {
    let mut refs = Vec::new();
    if let Ok(text) = fs::read_to_string(bare.join("packed-refs")) {
        for line in text.lines() {
            if line.starts_with('#') || line.starts_with('^') {
                continue;
            }
            if let Some((hex, name)) = line.split_once(' ') {
                refs.push(RefRecord {
                    name: name.to_owned(),
                    target: ObjectId::from_hex(hex.as_bytes()).expect("hex"),
                });
            }
        }
    }
    let head = fs::read_to_string(bare.join("HEAD")).expect("HEAD");
    let head = head.trim().strip_prefix("ref: ").map(str::to_owned);
    let mut idx: Vec<PathBuf> = fs::read_dir(bare.join("objects/pack"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    idx.retain(|p| p.extension().is_some_and(|x| x == "idx"));
    idx.sort();
    (
        RepoRefs::new(refs, head),
        PackSet::open(&idx).expect("open packs"),
    )
}

/// Splits pkt-line output into lines; side-band data stops the parse and
/// is returned as `"<pack>"`.
pub fn pkt_lines(bytes: &[u8]) -> Vec<String> {
    let mut rd = PktReader::new(bytes);
    let mut out = Vec::new();
    while let Ok(Some(p)) = rd.read_pkt() {
        match p {
            Pkt::Flush => out.push("0000".to_owned()),
            Pkt::Delim => out.push("0001".to_owned()),
            Pkt::ResponseEnd => out.push("0002".to_owned()),
            Pkt::Data(d) if d.first().is_some_and(|b| *b < 4) => {
                out.push("<pack>".to_owned());
                break;
            }
            Pkt::Data(d) => out.push(String::from_utf8_lossy(&d).into_owned()),
        }
    }
    out
}

/// Builds a request body of pkt-lines; `"0000"`/`"0001"` are flush/delim.
pub fn request(lines: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    for l in lines {
        match *l {
            "0000" | "0001" => out.extend_from_slice(l.as_bytes()),
            text => {
                out.extend_from_slice(format!("{:04x}", text.len() + 5).as_bytes());
                out.extend_from_slice(text.as_bytes());
                out.push(b'\n');
            }
        }
    }
    out
}
