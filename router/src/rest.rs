//! The Bitbucket Cloud 2.0-shaped REST API: repositories.
//!
//! Each call goes to the replicas of its workspace's shard. A workspace the
//! directory does not know is a 404 (Bitbucket's error JSON) for get,
//! delete and list; creating a repository registers the workspace first,
//! since on Bitbucket a workspace exists before its repositories.

use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use cairn_proto::admin::admin_client::AdminClient;
use cairn_proto::admin::{
    CreateRepositoryRequest, DeleteRepositoryRequest, GetRepositoryRequest,
    ListRepositoriesRequest, Repository, UpdateRepositoryRequest,
};
use cairn_proto::limits;
use serde::Deserialize;
use serde_json::{json, Value};

pub use crate::answer::{error, field_error, grpc_error};
use crate::authz::{self, with_actor, Caller, Style};
use crate::identity::now;
use crate::state::AppState;
use cairn_client::Attempt;
use cairn_identity::change::AuditEvent;
use cairn_identity::policy::{self, Action, Decision, RepoRef};

/// Largest REST request body; every field Cairn stores is far smaller.
pub const MAX_BODY_BYTES: usize = 64 << 10;

/// Seconds since the epoch as RFC 3339 UTC (days-from-civil inverted).
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}+00:00",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

pub fn repository_json(r: &Repository, base: &str) -> Value {
    let full_name = format!("{}/{}", r.workspace, r.slug);
    let branch = r.head.strip_prefix("refs/heads/").unwrap_or(&r.head);
    json!({
        "type": "repository",
        "uuid": format!("{{{:08x}-0000-4000-8000-{:012x}}}", r.id >> 32, r.id & 0xffff_ffff_ffff),
        "name": r.slug,
        "slug": r.slug,
        "full_name": full_name,
        "scm": "git",
        "is_private": r.is_private,
        "description": r.description,
        "created_on": rfc3339(r.created_at),
        "mainbranch": {"type": "branch", "name": branch},
        "workspace": {"type": "workspace", "slug": r.workspace},
        "links": {
            "self": {"href": format!("{base}/2.0/repositories/{full_name}")},
            "html": {"href": format!("{base}/{full_name}")},
            "clone": [{"name": "https", "href": format!("{base}/{full_name}.git")}],
        },
    })
}

#[derive(Debug, Default, Deserialize)]
pub struct CreateBody {
    #[serde(default)]
    scm: Option<String>,
    #[serde(default)]
    is_private: Option<bool>,
    #[serde(default)]
    description: Option<String>,
}

/// `?page=&pagelen=` of a listing (Bitbucket: pagelen 10 by default, at
/// most 100).
#[derive(Debug, Default, Deserialize)]
pub struct PageQuery {
    page: Option<usize>,
    pagelen: Option<usize>,
}

/// Most pages a listing walks into.
const MAX_PAGE: usize = 100_000;

/// One page of `values` in Bitbucket's envelope, with `next` when more
/// follow. `path` is the listing's path for the links.
pub fn page(st: &AppState, path: &str, values: Vec<Value>, q: &PageQuery) -> Value {
    let pagelen = q.pagelen.unwrap_or(10).clamp(1, 100);
    let page = q.page.unwrap_or(1).clamp(1, MAX_PAGE);
    let size = values.len();
    let start = (page - 1).saturating_mul(pagelen).min(size);
    let end = (start + pagelen).min(size);
    let values: Vec<Value> = values.into_iter().skip(start).take(end - start).collect();
    let mut out = json!({"pagelen": pagelen, "size": size, "page": page, "values": values});
    if end < size {
        out["next"] = json!(format!(
            "{}{path}?page={}&pagelen={pagelen}",
            st.base_url,
            page + 1
        ));
    }
    if page > 1 {
        out["previous"] = json!(format!(
            "{}{path}?page={}&pagelen={pagelen}",
            st.base_url,
            page - 1
        ));
    }
    out
}

/// Queues an audit record of `action` on `target` by `caller`.
pub(crate) fn audit(st: &AppState, caller: &Caller, action: &str, target: String, detail: String) {
    st.identities.record(AuditEvent {
        seq: 0,
        at: now(),
        actor: caller.principal.actor(),
        from: caller.from.clone(),
        action: action.to_owned(),
        target,
        detail,
    });
}

pub async fn create(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((workspace, slug)): Path<(String, String)>,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Response {
    let index = st.identities.index();
    // Those who may create workspaces need not ask whether it exists.
    let exists = if policy::may_create_repository(&index, &caller.principal, &workspace, false)
        == Decision::Allow
    {
        false
    } else {
        match st.cluster.route(&workspace).await {
            Ok(_) => true,
            Err(s) if s.code() == tonic::Code::NotFound => false,
            Err(s) => return grpc_error(s),
        }
    };
    match policy::may_create_repository(&index, &caller.principal, &workspace, exists) {
        Decision::Allow => {}
        d => return authz::refusal(d, Style::Rest, &format!("{workspace}/{slug}")),
    }
    let body = match body {
        Ok(b) => b,
        Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("request body over {MAX_BODY_BYTES} bytes"),
            )
        }
        Err(r) => return error(r.status(), &r.body_text()),
    };
    let parsed: CreateBody = if body.iter().all(u8::is_ascii_whitespace) {
        CreateBody::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => return error(StatusCode::BAD_REQUEST, &format!("invalid JSON body: {e}")),
        }
    };
    if parsed.scm.as_deref().is_some_and(|s| s != "git") {
        return field_error("scm", "only scm \"git\" is supported");
    }
    if let Some(d) = &parsed.description {
        if d.len() > limits::MAX_DESCRIPTION_BYTES {
            return field_error(
                "description",
                &format!(
                    "description is {} bytes long; the limit is {}",
                    d.len(),
                    limits::MAX_DESCRIPTION_BYTES
                ),
            );
        }
    }
    if let Err(s) = st.cluster.ensure_workspace(&workspace).await {
        return grpc_error(s);
    }
    let req = CreateRepositoryRequest {
        workspace,
        slug,
        is_private: parsed.is_private.unwrap_or(true),
        description: parsed.description.unwrap_or_default(),
    };
    let actor = authz::actor_metadata(&caller);
    let call = st.cluster.call(&req.workspace, |ch| {
        let req = with_actor(req.clone(), actor.clone());
        async move {
            AdminClient::new(ch)
                .create_repository(req)
                .await
                .map_err(Attempt::mutation)
        }
    });
    match call.await {
        Ok(r) => {
            let base = &st.base_url;
            let repo = r.into_inner();
            audit(
                &st,
                &caller,
                "repo:create",
                format!("{}/{}", repo.workspace, repo.slug),
                if repo.is_private { "private" } else { "public" }.into(),
            );
            let mut resp =
                (StatusCode::CREATED, Json(repository_json(&repo, base))).into_response();
            if let Ok(loc) =
                format!("{base}/2.0/repositories/{}/{}", repo.workspace, repo.slug).parse()
            {
                resp.headers_mut().insert(header::LOCATION, loc);
            }
            resp
        }
        Err(s) => grpc_error(s),
    }
}

pub async fn get(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((workspace, slug)): Path<(String, String)>,
) -> Response {
    if let Err(r) =
        authz::authorize(&st, &caller, &workspace, &slug, Action::Read, Style::Rest).await
    {
        return r;
    }
    let req = GetRepositoryRequest { workspace, slug };
    let call = st.cluster.call_read(&req.workspace, |ch| {
        let req = req.clone();
        async move { Ok(AdminClient::new(ch).get_repository(req).await?) }
    });
    match call.await {
        Ok(r) => Json(repository_json(&r.into_inner(), &st.base_url)).into_response(),
        Err(s) => grpc_error(s),
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct UpdateBody {
    #[serde(default)]
    is_private: Option<bool>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    mainbranch: Option<BranchName>,
}

#[derive(Debug, Default, Deserialize)]
pub struct BranchName {
    name: String,
}

/// `PUT /2.0/repositories/{ws}/{slug}`: visibility, description and main
/// branch (admin). Other fields of the body are ignored, as Bitbucket
/// ignores read-only ones.
pub async fn update(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((workspace, slug)): Path<(String, String)>,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Response {
    if let Err(r) =
        authz::authorize(&st, &caller, &workspace, &slug, Action::Admin, Style::Rest).await
    {
        return r;
    }
    let body = match body {
        Ok(b) => b,
        Err(r) => return error(r.status(), &r.body_text()),
    };
    let parsed: UpdateBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("invalid JSON body: {e}")),
    };
    if let Some(d) = &parsed.description {
        if d.len() > limits::MAX_DESCRIPTION_BYTES {
            return field_error(
                "description",
                &format!(
                    "description is {} bytes long; the limit is {}",
                    d.len(),
                    limits::MAX_DESCRIPTION_BYTES
                ),
            );
        }
    }
    let head = parsed.mainbranch.map(|b| {
        if b.name.starts_with("refs/") {
            b.name
        } else {
            format!("refs/heads/{}", b.name)
        }
    });
    let req = UpdateRepositoryRequest {
        workspace: workspace.clone(),
        slug: slug.clone(),
        is_private: parsed.is_private,
        description: parsed.description,
        head,
    };
    let actor = authz::actor_metadata(&caller);
    let call = st.cluster.call(&workspace, |ch| {
        let req = with_actor(req.clone(), actor.clone());
        async move {
            AdminClient::new(ch)
                .update_repository(req)
                .await
                .map_err(Attempt::mutation)
        }
    });
    match call.await {
        Ok(r) => {
            let repo = r.into_inner();
            st.repos.forget(&workspace, &slug);
            let full = format!("{}/{}", repo.workspace, repo.slug);
            if parsed.is_private.is_some() {
                let to = if repo.is_private { "private" } else { "public" };
                audit(&st, &caller, "repo:visibility", full.clone(), to.into());
            }
            audit(&st, &caller, "repo:update", full, String::new());
            Json(repository_json(&repo, &st.base_url)).into_response()
        }
        Err(s) if s.code() == tonic::Code::InvalidArgument => {
            field_error("mainbranch", s.message())
        }
        Err(s) => grpc_error(s),
    }
}

pub async fn delete(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((workspace, slug)): Path<(String, String)>,
) -> Response {
    if let Err(r) =
        authz::authorize(&st, &caller, &workspace, &slug, Action::Delete, Style::Rest).await
    {
        return r;
    }
    let req = DeleteRepositoryRequest { workspace, slug };
    let actor = authz::actor_metadata(&caller);
    let call = st.cluster.call(&req.workspace, |ch| {
        let req = with_actor(req.clone(), actor.clone());
        async move {
            AdminClient::new(ch)
                .delete_repository(req)
                .await
                .map_err(Attempt::mutation)
        }
    });
    match call.await {
        Ok(_) => {
            st.repos.forget(&req.workspace, &req.slug);
            audit(
                &st,
                &caller,
                "repo:delete",
                format!("{}/{}", req.workspace, req.slug),
                String::new(),
            );
            StatusCode::NO_CONTENT.into_response()
        }
        Err(s) => grpc_error(s),
    }
}

/// The workspace's repositories the caller may read.
pub async fn list(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(workspace): Path<String>,
) -> Response {
    let req = ListRepositoriesRequest { workspace };
    let call = st.cluster.call_read(&req.workspace, |ch| {
        let req = req.clone();
        async move { Ok(AdminClient::new(ch).list_repositories(req).await?) }
    });
    match call.await {
        Ok(r) => {
            let index = st.identities.index();
            let values: Vec<Value> = r
                .into_inner()
                .repositories
                .iter()
                .filter(|r| {
                    let repo = RepoRef {
                        workspace: &r.workspace,
                        slug: &r.slug,
                        is_private: r.is_private,
                    };
                    policy::decide(&index, &caller.principal, Some(repo), Action::Read)
                        == Decision::Allow
                })
                .map(|r| repository_json(r, &st.base_url))
                .collect();
            Json(
                json!({"pagelen": values.len(), "size": values.len(), "page": 1, "values": values}),
            )
            .into_response()
        }
        Err(s) => grpc_error(s),
    }
}

#[cfg(test)]
mod tests {
    use super::rfc3339;

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00+00:00");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00+00:00");
        assert_eq!(rfc3339(1_795_000_000), "2026-11-18T11:06:40+00:00");
    }
}
