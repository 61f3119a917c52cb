//! What every request handler shares, and the brief cache of
//! repositories' visibility authorization reads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use cairn_client::Cluster;
use cairn_proto::admin::Repository;

use crate::config::Config;
use crate::identity::Identities;

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    /// The storage nodes; every gRPC call goes through its directory
    /// lookup and leader search.
    pub cluster: Arc<Cluster>,
    /// Where clients reach this router, for links (see `Config::base_url`).
    pub base_url: Arc<str>,
    /// Users, tokens and permissions, kept fresh from the meta group.
    pub identities: Arc<Identities>,
    /// Repositories' visibility, briefly reused across requests.
    pub repos: Arc<RepoCache>,
}

/// How long a repository's visibility is reused before it is read again:
/// a change to private takes effect at the router within this.
const REPO_TTL: Duration = Duration::from_secs(1);
const MAX_CACHED: usize = 10_000;

/// Recently read repositories (found ones only: a create must be seen at
/// once).
#[derive(Default)]
pub struct RepoCache {
    map: Mutex<HashMap<(String, String), (Instant, Repository)>>,
}

impl RepoCache {
    pub(crate) fn get(&self, key: &(String, String)) -> Option<Repository> {
        let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(key)
            .filter(|(at, _)| at.elapsed() < REPO_TTL)
            .map(|(_, r)| r.clone())
    }

    pub(crate) fn put(&self, key: (String, String), repo: Repository) {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= MAX_CACHED {
            map.retain(|_, (at, _)| at.elapsed() < REPO_TTL);
            if map.len() >= MAX_CACHED {
                map.clear();
            }
        }
        map.insert(key, (Instant::now(), repo));
    }

    pub fn forget(&self, workspace: &str, slug: &str) {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(workspace.to_ascii_lowercase(), slug.to_ascii_lowercase()));
    }
}
