//! `StagingCleanupWorker`: removes staged pack transfers that nobody
//! committed — packs a leader staged for an entry that never committed (it
//! lost leadership, the push failed), and temp directories of transfers cut
//! off by a crash.
//!
//! The decision (which entries are expired, given their modification times
//! and now) is the pure [`expired`]; the worker only scans and removes.
//! Removal takes the staging area's lock and re-checks the time, so a pack
//! whose `Stage` was just confirmed again (which refreshes its mtime) is
//! never removed by a pass that listed it a moment earlier.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::packs::transfer::StagingArea;

/// When staged transfers expire and how often to look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CleanupOptions {
    /// Age (since the last write, or the last idempotent re-stage) after
    /// which a staged pack or an abandoned transfer is removed. Must exceed
    /// the longest time between staging and commit, with margin.
    pub ttl: Duration,
    /// Time between passes.
    pub interval: Duration,
}

impl Default for CleanupOptions {
    fn default() -> Self {
        CleanupOptions {
            ttl: Duration::from_secs(60 * 60),
            interval: Duration::from_secs(5 * 60),
        }
    }
}

/// One removable unit under `staging/transfer/`: a staged pack with its
/// index, an in-flight (or abandoned) transfer directory, or a stray file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedEntry {
    pub paths: Vec<PathBuf>,
    /// The newest modification time among `paths` and their contents.
    pub modified: SystemTime,
}

/// The entries older than `ttl` at `now`. An entry dated in the future
/// (clock steps) is kept: it cannot be shown to be old.
pub fn expired(entries: &[StagedEntry], now: SystemTime, ttl: Duration) -> Vec<&StagedEntry> {
    entries
        .iter()
        .filter(|e| now.duration_since(e.modified).is_ok_and(|age| age > ttl))
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error("I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CleanupError + '_ {
    move |source| CleanupError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Lists the removable entries under `root` (`staging/transfer/`). Shard
/// and repo directories (`<shard>/<repo>/`) themselves are kept; the packs
/// inside are grouped by name so a pack and its index go together.
pub fn scan(root: &Path) -> Result<Vec<StagedEntry>, CleanupError> {
    let mut out = Vec::new();
    for (path, is_dir) in list(root)? {
        if is_numeric_dir(&path, is_dir) {
            for (repo_dir, is_dir) in list(&path)? {
                if is_numeric_dir(&repo_dir, is_dir) {
                    out.extend(group_packs(&repo_dir)?);
                } else if let Some(entry) = single(repo_dir)? {
                    out.push(entry);
                }
            }
        } else if let Some(entry) = single(path)? {
            out.push(entry);
        }
    }
    Ok(out)
}

fn is_numeric_dir(path: &Path, is_dir: bool) -> bool {
    is_dir
        && path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.parse::<u64>().is_ok())
}

/// `path` (with everything in it) as one entry; `None` if it vanished.
fn single(path: PathBuf) -> Result<Option<StagedEntry>, CleanupError> {
    Ok(newest_mtime(&path)?.map(|modified| StagedEntry {
        paths: vec![path],
        modified,
    }))
}

/// The children of `dir`, with `pack-<id>.pack` and `pack-<id>.idx` (which
/// share a stem) as one entry.
fn group_packs(dir: &Path) -> Result<Vec<StagedEntry>, CleanupError> {
    let mut packs: Vec<StagedEntry> = Vec::new();
    let mut stems: Vec<PathBuf> = Vec::new();
    for (child, _) in list(dir)? {
        let Some(modified) = newest_mtime(&child)? else {
            continue;
        };
        let stem = child.with_extension("");
        match stems.iter().position(|s| *s == stem) {
            Some(i) => {
                packs[i].paths.push(child);
                packs[i].modified = packs[i].modified.max(modified);
            }
            None => {
                stems.push(stem);
                packs.push(StagedEntry {
                    paths: vec![child],
                    modified,
                });
            }
        }
    }
    Ok(packs)
}

/// Entries of `dir` with whether each is a directory; empty when `dir` is
/// missing.
fn list(dir: &Path) -> Result<Vec<(PathBuf, bool)>, CleanupError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(dir)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(dir))?;
        let is_dir = entry.file_type().map_err(io_err(dir))?.is_dir();
        out.push((entry.path(), is_dir));
    }
    Ok(out)
}

/// The newest mtime of `path` and (for a directory) everything in it;
/// `None` when it vanished meanwhile.
fn newest_mtime(path: &Path) -> Result<Option<SystemTime>, CleanupError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    let mut newest = meta.modified().map_err(io_err(path))?;
    if meta.is_dir() {
        for (child, _) in list(path)? {
            if let Some(t) = newest_mtime(&child)? {
                newest = newest.max(t);
            }
        }
    }
    Ok(Some(newest))
}

fn remove(path: &Path) -> Result<(), CleanupError> {
    let res = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    match res {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(path)(e)),
        _ => Ok(()),
    }
}

/// Periodically removes expired entries of one node's staging area.
pub struct StagingCleanupWorker {
    area: StagingArea,
    options: CleanupOptions,
}

impl StagingCleanupWorker {
    pub fn new(area: StagingArea, options: CleanupOptions) -> Self {
        StagingCleanupWorker { area, options }
    }

    /// One pass as of `now`; returns how many entries were removed.
    pub fn run_once(&self, now: SystemTime) -> Result<usize, CleanupError> {
        let entries = scan(self.area.root())?;
        let mut removed = 0;
        for entry in expired(&entries, now, self.options.ttl) {
            let _held = self.area.hold();
            // Re-check under the lock: a re-stage may have refreshed it.
            let mut modified = None;
            for path in &entry.paths {
                modified = modified.max(newest_mtime(path)?);
            }
            let Some(modified) = modified else {
                continue;
            };
            let still = StagedEntry {
                paths: entry.paths.clone(),
                modified,
            };
            if expired(std::slice::from_ref(&still), now, self.options.ttl).is_empty() {
                continue;
            }
            for path in &entry.paths {
                remove(path)?;
            }
            tracing::info!(paths = ?entry.paths, "removed expired staged transfer");
            removed += 1;
        }
        Ok(removed)
    }

    /// Runs passes every `interval` until the runtime shuts down.
    pub fn spawn(self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let worker = std::sync::Arc::new(self);
            let mut ticks = tokio::time::interval(worker.options.interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let w = worker.clone();
                match tokio::task::spawn_blocking(move || w.run_once(SystemTime::now())).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "staging cleanup pass failed"),
                    Err(e) => tracing::warn!(error = %e, "staging cleanup pass did not finish"),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn entry(name: &str, modified: SystemTime) -> StagedEntry {
        StagedEntry {
            paths: vec![PathBuf::from(name)],
            modified,
        }
    }

    #[test]
    fn expiry_is_strictly_older_than_the_ttl() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let cases = [
            ("fresh", now - Duration::from_secs(1), false),
            ("exactly ttl", now - HOUR, false),
            ("just past ttl", now - HOUR - Duration::from_secs(1), true),
            ("ancient", SystemTime::UNIX_EPOCH, true),
            ("future", now + HOUR * 2, false),
        ];
        let entries: Vec<_> = cases.iter().map(|(n, t, _)| entry(n, *t)).collect();
        let gone: Vec<_> = expired(&entries, now, HOUR)
            .into_iter()
            .map(|e| e.paths[0].clone())
            .collect();
        for (name, _, expect) in cases {
            assert_eq!(gone.contains(&PathBuf::from(name)), expect, "{name}");
        }
    }

    fn set_mtime(path: &Path, t: SystemTime) {
        fs::File::open(path)
            .and_then(|f| f.set_modified(t))
            .expect("set mtime");
    }

    #[test]
    fn a_pass_removes_expired_packs_and_transfers_only() {
        let data = tempfile::tempdir().expect("tempdir");
        let area = StagingArea::at(data.path());
        area.create().expect("create area");
        let root = area.root().to_owned();
        let now = SystemTime::now();
        let old = now - HOUR * 2;

        let shard = root.join("4");
        let repo = shard.join("9");
        fs::create_dir_all(&repo).expect("repo dir");
        let (old_pack, old_idx) = (repo.join("pack-a.pack"), repo.join("pack-a.idx"));
        let (new_pack, new_idx) = (repo.join("pack-b.pack"), repo.join("pack-b.idx"));
        for p in [&old_pack, &old_idx, &new_pack, &new_idx] {
            fs::write(p, b"x").expect("write");
        }
        set_mtime(&old_pack, old);
        set_mtime(&old_idx, old);
        // A pair is as young as its youngest file.
        set_mtime(&new_pack, old);

        let abandoned = root.join("tmp-1-1");
        fs::create_dir(&abandoned).expect("tmp dir");
        fs::write(abandoned.join("pack-c.pack"), b"x").expect("write");
        set_mtime(&abandoned.join("pack-c.pack"), old);
        set_mtime(&abandoned, old);
        let active = root.join("tmp-1-2");
        fs::create_dir(&active).expect("tmp dir");
        fs::write(active.join("pack-d.pack"), b"x").expect("write");
        set_mtime(&active, old); // its file is still being written

        let worker = StagingCleanupWorker::new(
            area,
            CleanupOptions {
                ttl: HOUR,
                interval: HOUR,
            },
        );
        assert_eq!(worker.run_once(now).expect("pass"), 2);
        assert!(!old_pack.exists() && !old_idx.exists());
        assert!(new_pack.exists() && new_idx.exists());
        assert!(!abandoned.exists());
        assert!(active.join("pack-d.pack").exists());
        assert!(repo.is_dir(), "shard and repo directories are kept");
        assert_eq!(worker.run_once(now).expect("second pass"), 0);
    }
}
