//! Wiring: routes, authentication, the gRPC clients, serving.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::serve::ListenerExt as _;
use tokio::net::TcpListener;

use crate::auth::{self, AuthFailure};
use crate::authz::{self, Caller, Style};
use crate::config::Config;
use crate::identity::{self, Identities};
pub use crate::state::AppState;
use crate::{accounts, git_http, keys, rest, restrictions, workspaces};
use cairn_client::{Cluster, RetryPolicy};
use cairn_identity::change::AuditEvent;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("invalid storage node endpoint: {0}")]
    Endpoint(#[from] tonic::transport::Error),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("SSH host key {path}: {source}")]
    HostKey {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// How long a starting router waits for the identity snapshot before
/// serving without one (every token refused until it arrives).
const STARTUP_SNAPSHOT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A running router.
pub struct Router {
    pub http_addr: SocketAddr,
    /// Where git over SSH is served, if it is.
    pub ssh_addr: Option<SocketAddr>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Authenticates every request but `/healthz`: the caller goes into the
/// request's extensions for the handlers' authorization. A credential
/// that names nobody is refused (and audited), never taken as anonymous.
async fn authenticate(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    let from = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string())
        .unwrap_or_default();
    let index = st.identities.index();
    let result = auth::authenticate(
        req.headers(),
        &index,
        st.config.token.as_deref(),
        identity::now(),
    );
    match result {
        Ok((principal, token)) => {
            if let Some(id) = token {
                st.identities.touch(&id);
            }
            req.extensions_mut().insert(Caller { principal, from });
            next.run(req).await
        }
        Err(AuthFailure::Invalid(why)) => {
            st.identities.record(AuditEvent {
                seq: 0,
                at: identity::now(),
                actor: String::new(),
                from,
                action: "signin:failed".into(),
                target: auth::claimed_name(req.headers()),
                detail: why.into(),
            });
            let style = if req.uri().path().starts_with("/2.0/") {
                Style::Rest
            } else {
                Style::Git
            };
            let resp = match style {
                Style::Rest => rest::error(StatusCode::UNAUTHORIZED, "Invalid credentials"),
                Style::Git => (StatusCode::UNAUTHORIZED, "Invalid credentials\n").into_response(),
            };
            authz::challenge(resp)
        }
    }
}

pub fn app(state: AppState) -> axum::Router {
    // REST bodies are read whole, so bounded here; git bodies stream with
    // limits of their own.
    let rest_routes = axum::Router::new()
        .route(
            "/2.0/repositories/{workspace}/{slug}",
            post(rest::create)
                .get(rest::get)
                .put(rest::update)
                .delete(rest::delete),
        )
        .route("/2.0/repositories/{workspace}", get(rest::list))
        .route(
            "/2.0/repositories/{workspace}/{slug}/branch-restrictions",
            get(restrictions::list).post(restrictions::create),
        )
        .route(
            "/2.0/repositories/{workspace}/{slug}/branch-restrictions/{id}",
            get(restrictions::get)
                .put(restrictions::update)
                .delete(restrictions::delete),
        )
        .route(
            "/2.0/repositories/{workspace}/{slug}/permissions-config/users",
            get(workspaces::repo_users),
        )
        .route(
            "/2.0/repositories/{workspace}/{slug}/permissions-config/users/{user}",
            get(workspaces::repo_user)
                .put(workspaces::set_repo_user)
                .delete(workspaces::delete_repo_user),
        )
        .route("/2.0/workspaces", get(workspaces::list))
        .route("/2.0/workspaces/{workspace}", get(workspaces::get))
        .route(
            "/2.0/workspaces/{workspace}/members",
            get(workspaces::members),
        )
        .route(
            "/2.0/workspaces/{workspace}/permissions",
            get(workspaces::permissions),
        )
        .route(
            "/2.0/user/permissions/repositories",
            get(workspaces::my_repositories),
        )
        .route(
            "/2.0/users/{user}/ssh-keys",
            get(keys::user_keys).post(keys::add_user_key),
        )
        .route(
            "/2.0/users/{user}/ssh-keys/{key}",
            get(keys::user_key).delete(keys::delete_user_key),
        )
        .route(
            "/2.0/repositories/{workspace}/{slug}/deploy-keys",
            get(keys::deploy_keys).post(keys::add_deploy_key),
        )
        .route(
            "/2.0/repositories/{workspace}/{slug}/deploy-keys/{id}",
            get(keys::deploy_key).delete(keys::delete_deploy_key),
        )
        .route(
            "/2.0/user/tokens",
            get(accounts::tokens).post(accounts::create_token),
        )
        .route("/2.0/user/tokens/{id}", delete(accounts::revoke_token))
        .route("/2.0/user", get(accounts::me))
        .route("/2.0/users/{user}", get(accounts::user))
        .layer(DefaultBodyLimit::max(rest::MAX_BODY_BYTES));
    let protected = axum::Router::new()
        .route("/{workspace}/{repo}/info/refs", get(git_http::info_refs))
        .route(
            "/{workspace}/{repo}/git-upload-pack",
            post(git_http::upload_pack),
        )
        .route(
            "/{workspace}/{repo}/git-receive-pack",
            post(git_http::receive_pack),
        )
        .merge(rest_routes)
        .layer(middleware::from_fn_with_state(state.clone(), authenticate));
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .merge(protected)
        .fallback(|| async { rest::error(StatusCode::NOT_FOUND, "not found") })
        .with_state(state)
}

impl Router {
    pub async fn start(config: Config) -> Result<Self, StartError> {
        config.validate()?;
        // Reject malformed URLs now rather than on the first request.
        for node in config.nodes() {
            tonic::transport::Endpoint::from_shared(node)?;
        }
        let addr = config.http_addr;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        let http_addr = listener
            .local_addr()
            .map_err(|source| StartError::Bind { addr, source })?;
        if config.public_url.is_none() && http_addr.ip().is_unspecified() {
            tracing::warn!(
                "no public-url configured: links in REST answers name localhost; set public-url"
            );
        }
        let cluster = if config.pinned {
            Cluster::pinned(config.nodes(), RetryPolicy::default())
        } else {
            Cluster::new(config.nodes(), RetryPolicy::default())
        };
        let identities = Identities::new();
        // Callers are refused until the first snapshot: wait for it a while
        // (the nodes may still be starting), then go on refreshing.
        let until = tokio::time::Instant::now() + STARTUP_SNAPSHOT_WAIT;
        while tokio::time::Instant::now() < until {
            match identities.try_refresh(&cluster).await {
                Ok(()) => break,
                // Nodes without the service: nothing to wait for.
                Err(s) if s.code() == tonic::Code::Unimplemented => break,
                Err(_) => tokio::time::sleep(identity::POLL).await,
            }
        }
        identities.spawn(Arc::clone(&cluster));
        let config_ssh = config.ssh_addr.map(|a| {
            let key = config
                .ssh_host_key
                .clone()
                .unwrap_or_else(|| std::path::PathBuf::from("ssh_host_ed25519_key"));
            (a, key)
        });
        let state = AppState {
            cluster,
            base_url: config.base_url(http_addr).into(),
            config: Arc::new(config),
            identities,
            repos: Arc::default(),
        };
        let ssh_addr = match config_ssh {
            Some((addr, key_path)) => {
                let listener = TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartError::Bind { addr, source })?;
                let bound = listener
                    .local_addr()
                    .map_err(|source| StartError::Bind { addr, source })?;
                let key =
                    crate::ssh::host_key(&key_path).map_err(|source| StartError::HostKey {
                        path: key_path.clone(),
                        source,
                    })?;
                let st = state.clone();
                tokio::spawn(async move {
                    if let Err(e) = crate::ssh::serve(listener, key, st).await {
                        tracing::error!(error = %e, "the SSH server stopped");
                    }
                });
                tracing::info!(addr = %bound, "serving git over SSH");
                Some(bound)
            }
            None => None,
        };
        let app = app(state);
        // TCP_NODELAY on every accepted stream: under Nagle the small
        // answers of a fetch's negotiation wait out the client's delayed
        // ACK (40 ms each); axum does not set it.
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY not set");
            }
        });
        let task = tokio::spawn(async move {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await
        });
        tracing::info!(addr = %http_addr, "router serving");
        Ok(Router {
            http_addr,
            ssh_addr,
            task,
        })
    }

    pub async fn wait(self) -> std::io::Result<()> {
        match self.task.await {
            Ok(r) => r,
            Err(e) => panic!("router task panicked: {e}"),
        }
    }
}
