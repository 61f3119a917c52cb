//! Deterministic benchmark repositories.
//!
//! Builds bare git repositories of fixed shapes (small, medium, large, and
//! many-refs variants) by streaming a generated history into
//! `git fast-import`, then repacking them into one pack with bitmaps and packed
//! refs, the way a well-kept operator repository looks. Everything is derived
//! from fixed seeds, names and timestamps, so object ids are identical on every
//! run and machine. Generated repositories are cached under a versioned name.
//!
//! Also describes existing repositories and appends commits to working clones
//! for the fetch and push scenarios.

use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

/// Bump whenever the generator's output changes, so stale caches are ignored.
const FORMAT_VERSION: u32 = 1;

/// Timestamps start here and advance a minute per commit.
const EPOCH: u64 = 1_700_000_000;

const AUTHOR: &str = "Cairn Bench <bench@cairn.invalid>";

/// Repository sizes the benchmark knows how to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Size {
    Small,
    Medium,
    Large,
}

impl Size {
    pub fn name(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Medium => "medium",
            Size::Large => "large",
        }
    }

    fn shape(self) -> Shape {
        match self {
            Size::Small => Shape {
                seed: 0x5EED_0001,
                commits: 1_000,
                initial_files: 300,
                dir_fanout: [6, 4, 3],
                lines: (20, 300),
                edits_per_commit: 3,
                hunks_per_edit: 3,
                insert_lines: 12,
                add_per_mille: 120,
                delete_per_mille: 10,
                hot_files: 30,
                side_branches: 3,
                tags: 5,
            },
            Size::Medium => Shape {
                seed: 0x5EED_0002,
                commits: 20_000,
                initial_files: 2_500,
                dir_fanout: [8, 5, 4],
                lines: (40, 1_200),
                edits_per_commit: 4,
                hunks_per_edit: 4,
                insert_lines: 42,
                add_per_mille: 200,
                delete_per_mille: 20,
                hot_files: 200,
                side_branches: 3,
                tags: 5,
            },
            Size::Large => Shape {
                seed: 0x5EED_0003,
                commits: 25_000,
                initial_files: 12_000,
                dir_fanout: [10, 6, 5],
                lines: (40, 3_000),
                edits_per_commit: 5,
                hunks_per_edit: 4,
                insert_lines: 90,
                add_per_mille: 150,
                delete_per_mille: 30,
                hot_files: 500,
                side_branches: 3,
                tags: 5,
            },
        }
    }
}

/// A generated bare repository.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Generated {
    pub name: String,
    /// The bare repository.
    pub path: PathBuf,
    /// Commits reachable from all refs.
    pub commits: u64,
    /// Number of refs.
    pub refs: u64,
    /// Size of the .pack files.
    pub pack_bytes: u64,
    /// Files in main's tip tree.
    pub files: u64,
}

/// The repository of `size` under `cache_dir`, generated on first use.
pub fn ensure(size: Size, cache_dir: &Path) -> Result<Generated> {
    cached(size.name(), cache_dir, |stream| {
        write_history(stream, &size.shape(), 0)
    })
}

/// A small repository with exactly `refs` refs (including `main`), cached the
/// same way as [`ensure`].
pub fn ensure_refs(refs: u64, cache_dir: &Path) -> Result<Generated> {
    if refs == 0 {
        bail!("a repository with refs needs at least main");
    }
    let shape = Shape {
        seed: 0x5EED_0100,
        commits: 50,
        initial_files: 40,
        dir_fanout: [3, 2, 2],
        lines: (10, 80),
        edits_per_commit: 2,
        hunks_per_edit: 2,
        insert_lines: 6,
        add_per_mille: 100,
        delete_per_mille: 0,
        hot_files: 5,
        side_branches: 0,
        tags: 0,
    };
    cached(&format!("refs-{refs}"), cache_dir, |stream| {
        write_history(stream, &shape, refs - 1)
    })
}

/// Describes an existing bare repository: commits reachable from all refs,
/// refs, pack bytes and files in the tip tree of `main` (or `HEAD`).
pub fn describe(name: &str, path: &Path) -> Result<Generated> {
    let commits = git(path, &["rev-list", "--all", "--count"])?
        .trim()
        .parse()
        .context("parsing rev-list --count")?;
    let refs = git(path, &["for-each-ref", "--format=x"])?.lines().count() as u64;
    let git_dir = PathBuf::from(git(path, &["rev-parse", "--absolute-git-dir"])?.trim());
    let pack_bytes = pack_bytes(&git_dir.join("objects").join("pack"))?;
    let tip = if git(
        path,
        &["rev-parse", "--verify", "--quiet", "refs/heads/main"],
    )
    .is_ok()
    {
        "refs/heads/main"
    } else {
        "HEAD"
    };
    let files = match git(path, &["ls-tree", "-r", "-z", "--name-only", tip]) {
        Ok(listing) => listing.bytes().filter(|&b| b == 0).count() as u64,
        // An empty repository has no tip tree.
        Err(_) => 0,
    };
    Ok(Generated {
        name: name.to_string(),
        path: path.to_path_buf(),
        commits,
        refs,
        pack_bytes,
        files,
    })
}

/// Appends `n` commits on top of `branch` in the working clone at `clone`,
/// each rewriting one small file with content derived from `seed`, and
/// returns the new tip. The work tree and index are left alone.
pub fn add_commits(clone: &Path, branch: &str, n: u32, seed: u64) -> Result<String> {
    let refname = if branch.starts_with("refs/") {
        branch.to_string()
    } else {
        format!("refs/heads/{branch}")
    };
    let parent = git(
        clone,
        &["rev-parse", "--verify", &format!("{refname}^{{commit}}")],
    )?;
    let parent = parent.trim();
    let words = Vocabulary::new(seed);
    let mut stream = Vec::new();
    let mut content = Vec::new();
    stream.extend_from_slice(b"feature done\n");
    for i in 0..u64::from(n) {
        let key = mix(seed, i);
        // Well after any generated history, as new work would be.
        let when = EPOCH + 50_000_000 + i * 60;
        let message = format!("bench: change {i} from seed {seed}\n");
        write!(
            stream,
            "commit {refname}\nauthor {AUTHOR} {when} +0000\ncommitter {AUTHOR} {when} +0000\ndata {}\n{message}",
            message.len()
        )?;
        if i == 0 {
            writeln!(stream, "from {parent}")?;
        }
        content.clear();
        let mut rng = Rng(key);
        for _ in 0..8 + rng.below(8) {
            words.line(rng.next(), &mut content);
        }
        write!(
            stream,
            "M 100644 inline bench/change-{:02}.txt\ndata {}\n",
            key % 16,
            content.len()
        )?;
        stream.extend_from_slice(&content);
        stream.extend_from_slice(b"\n\n");
    }
    stream.extend_from_slice(b"done\n");
    fast_import(clone, false, &[], |out| Ok(out.write_all(&stream)?))?;
    Ok(git(clone, &["rev-parse", "--verify", &refname])?
        .trim()
        .to_string())
}

/// The knobs that decide a generated repository's shape and size.
struct Shape {
    seed: u64,
    /// Commits on main, the first of which imports the initial files.
    commits: u32,
    initial_files: u32,
    /// Directories per level under the top; files land at any level.
    dir_fanout: [u32; 3],
    /// Range of a file's target length in lines; edits keep it near.
    lines: (u32, u32),
    edits_per_commit: u32,
    hunks_per_edit: u32,
    insert_lines: u32,
    add_per_mille: u64,
    delete_per_mille: u64,
    /// Files that take half of all edits, as real repositories have.
    hot_files: u32,
    side_branches: u32,
    tags: u32,
}

/// A file over the whole history: its edits are replayed in order when its
/// blobs are written, so every version can be written next to the previous
/// one and fast-import stores it as a delta against it.
struct FilePlan {
    path: String,
    seed: u64,
    target_lines: u32,
    edit_seeds: Vec<u64>,
    /// The fast-import mark of each version; the first is the file as added.
    marks: Vec<u64>,
}

enum Change {
    Put { file: u32, version: u32 },
    Delete { file: u32 },
}

/// Looks `name` up in the cache, generating it with `stream` when missing.
fn cached(
    name: &str,
    cache_dir: &Path,
    stream: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<Generated> {
    let repos = cache_dir.join("repos");
    let path = repos.join(format!("v{FORMAT_VERSION}-{name}.git"));
    if path.is_dir() {
        return describe(name, &path);
    }
    fs::create_dir_all(&repos).with_context(|| format!("creating {}", repos.display()))?;
    eprintln!("repogen: generating {name} repository (first run only)…");
    let started = Instant::now();
    // Built under a temporary name so a crash never leaves a half-made
    // repository where the cache would find it; removed on any error.
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".tmp-v{FORMAT_VERSION}-{name}-"))
        .tempdir_in(&repos)?;
    let repo = tmp.path();
    git_isolated(repo, &["init", "--bare", "--quiet", "."])?;
    git_isolated(repo, &["symbolic-ref", "HEAD", "refs/heads/main"])?;
    fast_import(repo, true, &["--depth=50"], stream)?;
    let imported = started.elapsed();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    git_isolated(
        repo,
        &[
            "-c",
            &format!("pack.threads={threads}"),
            "-c",
            "repack.writeBitmaps=true",
            "repack",
            "-a",
            "-d",
            "-b",
            "-q",
        ],
    )?;
    git_isolated(repo, &["pack-refs", "--all"])?;
    git_isolated(repo, &["commit-graph", "write", "--reachable"])?;
    // Temporary directories are private, but the baseline's server may read
    // the repository as another user.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(repo, fs::Permissions::from_mode(0o755))?;
    }
    if let Err(err) = fs::rename(repo, &path) {
        // Another process may have finished the same repository first.
        if !path.is_dir() {
            return Err(err).with_context(|| format!("renaming into {}", path.display()));
        }
    }
    drop(tmp);
    let generated = describe(name, &path)?;
    eprintln!(
        "repogen: {name}: {} commits, {} refs, {} files, {:.1} MB pack, {:.1} s ({:.1} s import)",
        generated.commits,
        generated.refs,
        generated.files,
        generated.pack_bytes as f64 / 1e6,
        started.elapsed().as_secs_f64(),
        imported.as_secs_f64()
    );
    Ok(generated)
}

/// Writes the fast-import stream for `shape`, plus `extra_refs` refs spread
/// over main's commits.
fn write_history(out: &mut dyn Write, shape: &Shape, extra_refs: u64) -> Result<()> {
    let words = Vocabulary::new(shape.seed);
    let dirs = directories(shape, &words);
    let (files, commits, blob_marks) = plan(shape, &words, &dirs);
    let commit_mark = |c: usize| blob_marks + 1 + c as u64;

    out.write_all(b"feature done\n")?;

    // Every version of a file right after the previous one: fast-import
    // deltas each blob against the blob written just before it, so this
    // yields real per-file delta chains that repack then reuses.
    let mut lines = Vec::new();
    let mut content = Vec::new();
    for (id, file) in files.iter().enumerate() {
        // A tiny unreferenced blob first (too small for fast-import to
        // delta), so the file's first version is not stored as a delta
        // against an unrelated file; repack drops it as unreachable.
        let seam = format!("seam {id}\n");
        write!(out, "blob\ndata {}\n{seam}\n", seam.len())?;
        initial_lines(file, &mut lines);
        for (version, mark) in file.marks.iter().enumerate() {
            if version > 0 {
                apply_edit(
                    &mut lines,
                    file.edit_seeds[version - 1],
                    file.target_lines,
                    shape,
                );
            }
            content.clear();
            for &line in &lines {
                words.line(line, &mut content);
            }
            write!(out, "blob\nmark :{mark}\ndata {}\n", content.len())?;
            out.write_all(&content)?;
            out.write_all(b"\n")?;
        }
    }

    let mut rng = Rng(mix(shape.seed, 0x00C0_FFEE));
    for (c, changes) in commits.iter().enumerate() {
        let when = EPOCH + c as u64 * 60;
        let message = if c == 0 {
            "Initial import\n".to_string()
        } else {
            commit_message(&mut rng, &words)
        };
        write!(
            out,
            "commit refs/heads/main\nmark :{}\nauthor {AUTHOR} {when} +0000\ncommitter {AUTHOR} {when} +0000\ndata {}\n{message}",
            commit_mark(c),
            message.len()
        )?;
        if c > 0 {
            writeln!(out, "from :{}", commit_mark(c - 1))?;
        }
        for change in changes {
            match *change {
                Change::Put { file, version } => {
                    let file = &files[file as usize];
                    writeln!(
                        out,
                        "M 100644 :{} {}",
                        file.marks[version as usize], file.path
                    )?;
                }
                Change::Delete { file } => writeln!(out, "D {}", files[file as usize].path)?,
            }
        }
        out.write_all(b"\n")?;
    }

    let main_commits = commits.len() as u64;
    let mut next_mark = commit_mark(commits.len());
    let mut when = EPOCH + main_commits * 60;
    for b in 0..u64::from(shape.side_branches) {
        let name = format!("topic/{}-{b}", words.word(rng.next()));
        // Forked from the later half of main, as live topics usually are.
        let fork = main_commits / 2 + rng.below(main_commits / 2);
        for k in 0..4 + rng.below(20) {
            let message = commit_message(&mut rng, &words);
            write!(
                out,
                "commit refs/heads/{name}\nmark :{next_mark}\nauthor {AUTHOR} {when} +0000\ncommitter {AUTHOR} {when} +0000\ndata {}\n{message}",
                message.len()
            )?;
            if k == 0 {
                writeln!(out, "from :{}", commit_mark(fork as usize))?;
            }
            content.clear();
            for _ in 0..10 + rng.below(60) {
                words.line(rng.next(), &mut content);
            }
            write!(
                out,
                "M 100644 inline topic-{b}/notes-{k}.txt\ndata {}\n",
                content.len()
            )?;
            out.write_all(&content)?;
            out.write_all(b"\n\n")?;
            next_mark += 1;
            when += 60;
        }
    }
    for t in 0..u64::from(shape.tags) {
        let target = (t + 1) * main_commits / (u64::from(shape.tags) + 1);
        let message = format!("Release 1.{t}.0\n");
        write!(
            out,
            "tag v1.{t}.0\nfrom :{}\ntagger {AUTHOR} {} +0000\ndata {}\n{message}\n",
            commit_mark(target as usize),
            EPOCH + target * 60 + 30,
            message.len()
        )?;
    }
    // Odd refs are branches, even ones annotated tags, each at a commit
    // picked from the ref's number.
    for i in 1..=extra_refs {
        let target = mix(shape.seed, i) % main_commits;
        if i % 2 == 1 {
            write!(
                out,
                "reset refs/heads/b/{i:05}\nfrom :{}\n\n",
                commit_mark(target as usize)
            )?;
        } else {
            let message = format!("Tag {i}\n");
            write!(
                out,
                "tag t/{i:05}\nfrom :{}\ntagger {AUTHOR} {} +0000\ndata {}\n{message}\n",
                commit_mark(target as usize),
                EPOCH + target * 60 + 30,
                message.len()
            )?;
        }
    }
    out.write_all(b"done\n")?;
    Ok(())
}

/// Plans main's history: which file versions each commit writes. Returns the
/// files, each commit's changes, and the number of blob marks used.
fn plan(
    shape: &Shape,
    words: &Vocabulary,
    dirs: &[String],
) -> (Vec<FilePlan>, Vec<Vec<Change>>, u64) {
    let mut rng = Rng(mix(shape.seed, 1));
    let mut files: Vec<FilePlan> = Vec::new();
    let mut marks = 0u64;
    let new_file = |rng: &mut Rng, files: &mut Vec<FilePlan>, marks: &mut u64| -> u32 {
        let id = files.len() as u32;
        let dir = &dirs[rng.below(dirs.len() as u64) as usize];
        let ext =
            ["rs", "rs", "rs", "c", "h", "py", "go", "md", "txt", "toml"][rng.below(10) as usize];
        let (lo, hi) = shape.lines;
        // Log-uniform lengths: mostly small files, a few large ones.
        let span = f64::from(hi) / f64::from(lo);
        let target_lines = (f64::from(lo) * span.powf(rng.unit())) as u32;
        *marks += 1;
        files.push(FilePlan {
            path: format!("{dir}{}_{id}.{ext}", words.word(rng.next())),
            seed: rng.next(),
            target_lines,
            edit_seeds: Vec::new(),
            marks: vec![*marks],
        });
        id
    };

    // Files edited by index into `live`; the first `hot_files` entries are
    // never deleted, so they stay hot.
    let mut live: Vec<u32> = Vec::new();
    let mut commits = Vec::with_capacity(shape.commits as usize);
    let mut first = Vec::new();
    for _ in 0..shape.initial_files {
        let id = new_file(&mut rng, &mut files, &mut marks);
        live.push(id);
        first.push(Change::Put {
            file: id,
            version: 0,
        });
    }
    commits.push(first);
    let hot = (shape.hot_files as usize).min(live.len());
    for _ in 1..shape.commits {
        let mut changes = Vec::new();
        let mut touched: Vec<u32> = Vec::new();
        if rng.below(1000) < shape.add_per_mille {
            for _ in 0..1 + rng.below(3) {
                let id = new_file(&mut rng, &mut files, &mut marks);
                live.push(id);
                touched.push(id);
                changes.push(Change::Put {
                    file: id,
                    version: 0,
                });
            }
        }
        for _ in 0..1 + rng.below(u64::from(shape.edits_per_commit)) {
            let index = if rng.below(2) == 0 && hot > 0 {
                rng.below(hot as u64)
            } else {
                rng.below(live.len() as u64)
            };
            let id = live[index as usize];
            if touched.contains(&id) {
                continue;
            }
            touched.push(id);
            let file = &mut files[id as usize];
            file.edit_seeds.push(rng.next());
            marks += 1;
            file.marks.push(marks);
            changes.push(Change::Put {
                file: id,
                version: file.marks.len() as u32 - 1,
            });
        }
        if rng.below(1000) < shape.delete_per_mille && live.len() > hot + 1 {
            let index = hot + rng.below((live.len() - hot) as u64) as usize;
            let id = live[index];
            if !touched.contains(&id) {
                live.swap_remove(index);
                changes.push(Change::Delete { file: id });
            }
        }
        commits.push(changes);
    }
    (files, commits, marks)
}

/// Nested directory prefixes (each ending in `/`), including the top level.
fn directories(shape: &Shape, words: &Vocabulary) -> Vec<String> {
    let mut rng = Rng(mix(shape.seed, 2));
    let mut dirs = vec![String::new()];
    let mut level = vec![String::new()];
    for &fanout in &shape.dir_fanout {
        let mut next = Vec::new();
        for parent in &level {
            for i in 0..fanout {
                next.push(format!("{parent}{}{i}/", words.word(rng.next())));
            }
        }
        dirs.extend(next.iter().cloned());
        level = next;
    }
    dirs
}

fn initial_lines(file: &FilePlan, lines: &mut Vec<u64>) {
    let mut rng = Rng(file.seed);
    lines.clear();
    lines.extend((0..file.target_lines.max(1)).map(|_| rng.next()));
}

/// Changes, inserts or deletes runs of lines at random places, drifting the
/// length back towards `target` so files neither vanish nor grow forever.
fn apply_edit(lines: &mut Vec<u64>, seed: u64, target: u32, shape: &Shape) {
    let mut rng = Rng(seed);
    let target = target as usize;
    for _ in 0..1 + rng.below(u64::from(shape.hunks_per_edit)) {
        let len = lines.len();
        let pos = rng.below(len as u64 + 1) as usize;
        let big = u64::from(shape.insert_lines);
        let (mut delete, insert) = match rng.below(10) {
            0..=4 => (1 + rng.below(6), 1 + rng.below(8)),
            5..=7 => (0, 1 + rng.below(big)),
            _ => (1 + rng.below(big), 0),
        };
        if len > target + target / 4 {
            delete += insert;
        } else if len < target - target / 4 {
            delete = 0;
        }
        let end = (pos + delete as usize).min(len);
        let new: Vec<u64> = (0..insert).map(|_| rng.next()).collect();
        lines.splice(pos..end, new);
    }
}

fn commit_message(rng: &mut Rng, words: &Vocabulary) -> String {
    let verbs = [
        "Fix", "Add", "Update", "Refactor", "Remove", "Speed up", "Document",
    ];
    let mut message = format!(
        "{}: {} {} {}\n",
        words.word(rng.next()),
        verbs[rng.below(verbs.len() as u64) as usize],
        words.word(rng.next()),
        words.word(rng.next())
    );
    if rng.below(3) > 0 {
        message.push('\n');
        for _ in 0..1 + rng.below(4) {
            for w in 0..6 + rng.below(6) {
                if w > 0 {
                    message.push(' ');
                }
                message.push_str(words.word(rng.next()));
            }
            message.push('\n');
        }
    }
    message
}

/// Pseudo-words and source-like lines built from them. Word frequencies are
/// skewed, like identifiers in code, so text compresses roughly as code does.
struct Vocabulary {
    words: Vec<String>,
}

impl Vocabulary {
    fn new(seed: u64) -> Self {
        const SYLLABLES: [&str; 32] = [
            "ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ba", "de", "fi", "go", "hu", "ja",
            "pe", "qui", "ro", "st", "tr", "ul", "an", "en", "or", "ex", "ch", "th", "pl", "gr",
            "in", "at", "el", "um",
        ];
        let mut rng = Rng(mix(seed, 3));
        let words = (0..2048)
            .map(|_| {
                (0..1 + rng.below(3))
                    .map(|_| SYLLABLES[rng.below(32) as usize])
                    .collect()
            })
            .collect();
        Self { words }
    }

    fn word(&self, key: u64) -> &str {
        // The product of two uniforms favours low indices.
        let a = (key >> 32) & 0xFFFF;
        let b = key & 0xFFFF;
        let index = (a * b) >> 21;
        &self.words[index as usize]
    }

    /// Appends the line for `seed`, newline included.
    fn line(&self, seed: u64, out: &mut Vec<u8>) {
        let mut rng = Rng(seed);
        let indent = rng.below(4) as usize * 4;
        out.extend(std::iter::repeat_n(b' ', indent));
        let push = |out: &mut Vec<u8>, s: &str| out.extend_from_slice(s.as_bytes());
        match rng.below(20) {
            0 => {}
            1 => push(out, "}"),
            2 | 3 => {
                push(out, "// ");
                for w in 0..3 + rng.below(8) {
                    if w > 0 {
                        push(out, " ");
                    }
                    push(out, self.word(rng.next()));
                }
            }
            4 | 5 => {
                push(out, "fn ");
                push(out, self.word(rng.next()));
                push(out, "_");
                push(out, self.word(rng.next()));
                push(out, "(");
                for a in 0..rng.below(3) {
                    if a > 0 {
                        push(out, ", ");
                    }
                    push(out, self.word(rng.next()));
                    push(out, ": &");
                    push(out, self.word(rng.next()));
                }
                push(out, ") -> ");
                push(out, self.word(rng.next()));
                push(out, " {");
            }
            6..=12 => {
                push(out, "let ");
                push(out, self.word(rng.next()));
                push(out, " = ");
                push(out, self.word(rng.next()));
                push(out, ".");
                push(out, self.word(rng.next()));
                push(out, "(");
                push(out, self.word(rng.next()));
                push(out, ", ");
                push(out, &rng.below(4096).to_string());
                push(out, ");");
            }
            _ => {
                push(out, self.word(rng.next()));
                push(out, "_");
                push(out, self.word(rng.next()));
                push(out, ".");
                push(out, self.word(rng.next()));
                push(out, "(\"");
                for w in 0..2 + rng.below(5) {
                    if w > 0 {
                        push(out, " ");
                    }
                    push(out, self.word(rng.next()));
                }
                push(out, "\");");
            }
        }
        out.push(b'\n');
    }
}

/// splitmix64: tiny, fast and the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn mix(a: u64, b: u64) -> u64 {
    Rng(a ^ b.wrapping_mul(0xD6E8_FEB8_6659_FD93)).next()
}

/// Runs `git fast-import --quiet` in `repo`, feeding it what `stream` writes.
fn fast_import(
    repo: &Path,
    isolated: bool,
    extra: &[&str],
    stream: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<()> {
    let mut child = git_command(repo, isolated)
        .arg("fast-import")
        .arg("--quiet")
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting git fast-import")?;
    let stdin = child.stdin.take().context("fast-import stdin")?;
    let mut writer = BufWriter::with_capacity(1 << 20, stdin);
    let written = stream(&mut writer).and_then(|()| Ok(writer.flush()?));
    // Closing stdin lets fast-import finish (or fail on a truncated stream).
    drop(writer);
    let output = child
        .wait_with_output()
        .context("waiting for git fast-import")?;
    if !output.status.success() {
        bail!(
            "git fast-import failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    written.context("writing the fast-import stream")
}

/// A git command in `repo`. Generation ignores system and global
/// configuration so packs do not depend on the machine's settings; work on
/// the user's repositories keeps it (e.g. `safe.directory`).
fn git_command(repo: &Path, isolated: bool) -> Command {
    let mut command = Command::new("git");
    command.current_dir(repo);
    if isolated {
        command
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null");
    }
    command
}

/// Runs git in `repo` and returns its stdout.
fn git(repo: &Path, args: &[&str]) -> Result<String> {
    run_git(repo, args, false)
}

/// Runs git in `repo`, ignoring system and global configuration.
fn git_isolated(repo: &Path, args: &[&str]) -> Result<String> {
    run_git(repo, args, true)
}

fn run_git(repo: &Path, args: &[&str], isolated: bool) -> Result<String> {
    let output = git_command(repo, isolated)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running git {}", args.join(" ")))?;
    if !output.status.success() {
        bail!(
            "git {} in {} failed ({}): {}",
            args.join(" "),
            repo.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    String::from_utf8(output.stdout).context("git output is not UTF-8")
}

fn pack_bytes(pack_dir: &Path) -> Result<u64> {
    let mut total = 0;
    let entries = match fs::read_dir(pack_dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(err) => return Err(err).with_context(|| format!("reading {}", pack_dir.display())),
    };
    for entry in entries {
        let entry = entry?;
        if entry.path().extension().is_some_and(|ext| ext == "pack") {
            total += entry.metadata()?.len();
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tip(path: &Path) -> String {
        let out = Command::new("git")
            .args(["rev-parse", "refs/heads/main"])
            .current_dir(path)
            .output()
            .expect("git rev-parse");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    #[test]
    fn generation_is_deterministic_and_counts_refs() {
        let (a, b) = (
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
        );
        let first = ensure_refs(10, a.path()).expect("generate");
        let second = ensure_refs(10, b.path()).expect("generate");
        assert_eq!(first.refs, 10);
        assert_eq!(tip(&first.path), tip(&second.path));
        assert_eq!(tip(&first.path).len(), 40);
        let again = ensure_refs(10, a.path()).expect("cached");
        assert_eq!(again.path, first.path);
        let described = describe("x", &first.path).expect("describe");
        assert_eq!((described.refs, described.commits), (10, first.commits));
    }

    #[test]
    fn added_commits_are_deterministic() {
        let src = tempfile::tempdir().expect("tempdir");
        let gen = ensure_refs(10, src.path()).expect("generate");
        let mut tips = Vec::new();
        for _ in 0..2 {
            let dir = tempfile::tempdir().expect("tempdir");
            let clone = dir.path().join("c");
            let ok = Command::new("git")
                .args(["clone", "-q", "--no-checkout"])
                .arg(&gen.path)
                .arg(&clone)
                .status()
                .expect("git clone")
                .success();
            assert!(ok);
            tips.push(add_commits(&clone, "main", 3, 7).expect("add"));
            let count = Command::new("git")
                .args(["rev-list", "--count", "main"])
                .current_dir(&clone)
                .output()
                .expect("rev-list");
            assert_eq!(
                String::from_utf8_lossy(&count.stdout).trim(),
                (gen.commits + 3).to_string()
            );
            drop(dir);
        }
        assert_eq!(tips[0], tips[1]);
    }
}
