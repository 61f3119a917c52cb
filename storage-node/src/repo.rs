//! What a repository is to the services: its record, a consistent view of
//! its refs and packs, the errors of repository operations, and a push's
//! private staging directory.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use cairn_packfile::refs::RepoRefs;
use cairn_packfile::store::PackSet;
use serde::{Deserialize, Serialize};

use crate::names::{self, NameError};

pub type RepoId = u64;

/// What a repository is, as stored under its `workspace/slug` key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoRecord {
    pub id: RepoId,
    pub workspace: String,
    pub slug: String,
    pub head: String,
    pub is_private: bool,
    pub description: String,
    pub created_at: i64,
}

/// A consistent view of one repository for serving a request.
#[derive(Clone)]
pub struct RepoSnapshot {
    pub record: RepoRecord,
    pub refs: RepoRefs,
    pub packs: PackSet,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("repository {workspace}/{slug} not found")]
    RepoNotFound { workspace: String, slug: String },
    #[error("repository {workspace}/{slug} already exists")]
    RepoExists { workspace: String, slug: String },
    /// The requested name differs from a taken one only in case.
    #[error("repository {existing} already exists; names are compared without regard to case, so {requested} is taken too")]
    RepoCaseClash { requested: String, existing: String },
    #[error(transparent)]
    InvalidName(#[from] NameError),
    /// A request's value is not acceptable (e.g. a main branch name).
    #[error("{0}")]
    InvalidArgument(String),
    #[error("I/O on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("corrupt record under key {key:?}: {message}")]
    Corrupt { key: String, message: String },
    #[error("pack store: {0}")]
    Packs(#[from] cairn_packfile::store::StoreError),
}

/// The refusal of a create whose name is taken: exactly, or by a name that
/// differs only in case.
pub fn exists_error(workspace: &str, slug: &str) -> StoreError {
    let requested = format!("{workspace}/{slug}");
    let canonical = names::canonical(&requested);
    if requested == canonical {
        StoreError::RepoExists {
            workspace: workspace.to_owned(),
            slug: slug.to_owned(),
        }
    } else {
        StoreError::RepoCaseClash {
            requested,
            existing: canonical,
        }
    }
}

/// One push's staging directory under `staging/`, so concurrent pushes of
/// identical packs (same checksum, same file names) never collide; removed
/// with whatever is left in it when dropped.
pub struct StagingDir {
    path: PathBuf,
}

impl StagingDir {
    pub fn create(data_dir: &Path) -> Result<Self, StoreError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = crate::layout::staging_dir(data_dir).join(format!(
            "{}{}-{n}",
            crate::layout::PUSH_STAGING_PREFIX,
            std::process::id()
        ));
        fs::create_dir_all(&path).map_err(|source| StoreError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(StagingDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove staging dir");
            }
        }
    }
}
