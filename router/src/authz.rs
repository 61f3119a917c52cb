//! Authorization at the router: the caller a request carries (set by the
//! authentication middleware) and the repository decision every git and
//! REST handler makes before touching a storage node's data.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use cairn_client::Attempt;
use cairn_identity::policy::{self, Action, Decision, Principal, RepoRef};
use cairn_proto::admin::admin_client::AdminClient;
use cairn_proto::admin::{GetRepositoryRequest, Repository};

use crate::state::AppState;

/// Who is calling, from where.
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Principal,
    /// Client address, for the audit log.
    pub from: String,
}

/// The caller's identity as gRPC metadata for the storage node (see
/// `cairn_proto::metadata::ACTOR`); `None` for anonymous.
pub fn actor_metadata(caller: &Caller) -> Option<tonic::metadata::AsciiMetadataValue> {
    let actor = caller.principal.actor();
    if actor.is_empty() {
        return None;
    }
    actor.parse().ok()
}

/// `message` as a gRPC request carrying `actor` (see [`actor_metadata`]).
pub fn with_actor<T>(
    message: T,
    actor: Option<tonic::metadata::AsciiMetadataValue>,
) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    if let Some(a) = actor {
        req.metadata_mut().insert(cairn_proto::metadata::ACTOR, a);
    }
    req
}

/// How a refusal is written: git's plain text or Bitbucket's JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    Git,
    Rest,
}

pub fn challenge(mut resp: Response) -> Response {
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"Cairn\""),
    );
    resp
}

/// The answer to a refused decision. "Not found" reads the same whether
/// the repository is missing or hidden.
pub fn refusal(decision: Decision, style: Style, what: &str) -> Response {
    let (status, msg) = match &decision {
        Decision::Allow => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error".to_owned(),
        ),
        Decision::NotFound => (
            StatusCode::NOT_FOUND,
            match style {
                Style::Git => "Repository not found".to_owned(),
                Style::Rest => format!("Repository {what} not found"),
            },
        ),
        Decision::Unauthorized => (
            StatusCode::UNAUTHORIZED,
            "Authentication required".to_owned(),
        ),
        Decision::Forbidden(m) => (StatusCode::FORBIDDEN, m.clone()),
    };
    let resp = match style {
        Style::Git => (status, format!("{msg}\n")).into_response(),
        Style::Rest => crate::answer::error(status, &msg),
    };
    if decision == Decision::Unauthorized {
        challenge(resp)
    } else {
        resp
    }
}

/// The repository, or `None` if it (or its workspace) does not exist.
pub async fn find_repo(
    st: &AppState,
    workspace: &str,
    slug: &str,
) -> Result<Option<Repository>, tonic::Status> {
    let key = (workspace.to_ascii_lowercase(), slug.to_ascii_lowercase());
    if let Some(r) = st.repos.get(&key) {
        return Ok(Some(r));
    }
    let req = GetRepositoryRequest {
        workspace: workspace.to_owned(),
        slug: slug.to_owned(),
    };
    let call = st.cluster.call_read(workspace, |ch| {
        let req = req.clone();
        async move {
            AdminClient::new(ch)
                .get_repository(req)
                .await
                .map_err(Attempt::from)
        }
    });
    match call.await {
        Ok(r) => {
            let r = r.into_inner();
            st.repos.put(key, r.clone());
            Ok(Some(r))
        }
        Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
        // A malformed name names no repository.
        Err(s) if s.code() == tonic::Code::InvalidArgument => Ok(None),
        Err(s) => Err(s),
    }
}

/// Decides `action` on `workspace/slug` for `caller`: the repository if
/// allowed, else the response to send.
pub async fn authorize(
    st: &AppState,
    caller: &Caller,
    workspace: &str,
    slug: &str,
    action: Action,
    style: Style,
) -> Result<Repository, Response> {
    // Administers everything: no lookup needed (the storage node still
    // answers "not found" for a missing repository).
    if caller.principal == Principal::Operator {
        return Ok(Repository::default());
    }
    let found = match find_repo(st, workspace, slug).await {
        Ok(r) => r,
        Err(s) => {
            return Err(match style {
                Style::Git => crate::answer::status_response(s),
                Style::Rest => crate::answer::grpc_error(s),
            })
        }
    };
    let index = st.identities.index();
    let repo_ref = found.as_ref().map(|r| RepoRef {
        workspace: &r.workspace,
        slug: &r.slug,
        is_private: r.is_private,
    });
    match policy::decide(&index, &caller.principal, repo_ref, action) {
        Decision::Allow => Ok(found.unwrap_or_default()),
        d => Err(refusal(d, style, &format!("{workspace}/{slug}"))),
    }
}
