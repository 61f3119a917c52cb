//! Wiring: routes, authentication, the gRPC clients, serving.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt as _;
use tokio::net::TcpListener;

use crate::auth::{self, AuthFailure};
use crate::config::Config;
pub use crate::state::AppState;
use crate::{git_http, rest};
use cairn_client::{Cluster, RetryPolicy};

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
}

/// A running router.
pub struct Router {
    pub http_addr: SocketAddr,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn require_token(State(st): State<AppState>, req: Request, next: Next) -> Response {
    match auth::check(req.headers(), &st.config.token) {
        Ok(()) => next.run(req).await,
        Err(failure) => {
            let is_rest = req.uri().path().starts_with("/2.0/");
            let msg = match failure {
                AuthFailure::Missing => "Authentication required",
                AuthFailure::Invalid => "Invalid credentials",
            };
            let mut resp = if is_rest {
                rest::error(StatusCode::UNAUTHORIZED, msg)
            } else {
                (StatusCode::UNAUTHORIZED, format!("{msg}\n")).into_response()
            };
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"Cairn\""),
            );
            resp
        }
    }
}

pub fn app(state: AppState) -> axum::Router {
    // REST bodies are read whole, so bounded here; git bodies stream with
    // limits of their own.
    let rest_routes = axum::Router::new()
        .route(
            "/2.0/repositories/{workspace}/{slug}",
            post(rest::create).get(rest::get).delete(rest::delete),
        )
        .route("/2.0/repositories/{workspace}", get(rest::list))
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
        .layer(middleware::from_fn_with_state(state.clone(), require_token));
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
        let state = AppState {
            cluster: if config.pinned {
                Cluster::pinned(config.nodes(), RetryPolicy::default())
            } else {
                Cluster::new(config.nodes(), RetryPolicy::default())
            },
            base_url: config.base_url(http_addr).into(),
            config: Arc::new(config),
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
        let task = tokio::spawn(async move { axum::serve(listener, app).await });
        tracing::info!(addr = %http_addr, "router serving");
        Ok(Router { http_addr, task })
    }

    pub async fn wait(self) -> std::io::Result<()> {
        match self.task.await {
            Ok(r) => r,
            Err(e) => panic!("router task panicked: {e}"),
        }
    }
}
