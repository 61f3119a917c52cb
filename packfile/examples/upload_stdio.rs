//! Test harness: serves upload-pack for a bare git repository over stdin and
//! stdout, so `git clone --no-local --upload-pack=<this binary> <repo> dest`
//! talks to Cairn's implementation. Speaks v2 when `GIT_PROTOCOL` contains
//! `version=2`, else v0 (v1 with `version=1`).
//!
//! Refs come from `packed-refs`, loose refs and `HEAD`; objects from the
//! packs in `objects/pack/` (loose objects are not read, so run
//! `git repack -a -d` first).

use std::fs;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use cairn_packfile::refs::{RefRecord, RepoRefs};
use cairn_packfile::store::PackSet;
use cairn_packfile::upload::{advertise_v0, advertise_v2, serve_v0, serve_v2, UploadContext};
use cairn_packfile::ObjectId;

fn read_refs(repo: &Path) -> io::Result<RepoRefs> {
    let mut refs: Vec<RefRecord> = Vec::new();
    if let Ok(text) = fs::read_to_string(repo.join("packed-refs")) {
        for line in text.lines() {
            if line.starts_with('#') || line.starts_with('^') || line.is_empty() {
                continue;
            }
            if let Some((hex, name)) = line.split_once(' ') {
                if let Ok(target) = ObjectId::from_hex(hex.as_bytes()) {
                    refs.push(RefRecord {
                        name: name.to_owned(),
                        target,
                    });
                }
            }
        }
    }
    // Loose refs override packed ones.
    let mut stack = vec![repo.join("refs")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let text = fs::read_to_string(&path)?;
            let Ok(target) = ObjectId::from_hex(text.trim().as_bytes()) else {
                continue;
            };
            let Ok(rel) = path.strip_prefix(repo) else {
                continue;
            };
            let name = rel.to_string_lossy().replace('\\', "/");
            refs.retain(|r| r.name != name);
            refs.push(RefRecord { name, target });
        }
    }
    let head = fs::read_to_string(repo.join("HEAD"))?;
    let head = head.trim().strip_prefix("ref: ").map(str::to_owned);
    Ok(RepoRefs::new(refs, head))
}

fn open_packs(repo: &Path) -> Result<PackSet, Box<dyn std::error::Error>> {
    let mut idx: Vec<PathBuf> = fs::read_dir(repo.join("objects/pack"))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "idx"))
        .collect();
    idx.sort();
    Ok(PackSet::open(&idx)?)
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let repo = PathBuf::from(
        std::env::args()
            .next_back()
            .ok_or("usage: upload_stdio <repo>")?,
    );
    let refs = read_refs(&repo)?;
    let packs = open_packs(&repo)?;
    let ctx = UploadContext {
        refs: &refs,
        packs: &packs,
        agent: concat!("cairn/", env!("CARGO_PKG_VERSION")),
    };
    let proto = std::env::var("GIT_PROTOCOL").unwrap_or_default();
    let mut input = io::stdin().lock();
    let mut out = BufWriter::new(io::stdout().lock());
    if proto.split(':').any(|p| p == "version=2") {
        advertise_v2(&ctx, &mut out)?;
        serve_v2(&ctx, &mut input, &mut out, false)?;
    } else {
        advertise_v0(&ctx, proto.split(':').any(|p| p == "version=1"), &mut out)?;
        serve_v0(&ctx, &mut input, &mut out, false)?;
    }
    out.flush()?;
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("upload_stdio: {e}");
            ExitCode::FAILURE
        }
    }
}
