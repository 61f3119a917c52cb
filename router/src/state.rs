//! What every request handler shares.

use std::sync::Arc;

use cairn_client::Cluster;

use crate::authz::RepoCache;
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
