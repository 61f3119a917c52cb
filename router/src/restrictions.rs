//! REST for branch restrictions, in Bitbucket Cloud 2.0's shapes:
//! `/2.0/repositories/{ws}/{slug}/branch-restrictions[/{id}]`. Reading and
//! changing them needs admin on the repository; they live in the
//! repository's shard and receive-pack enforces push, force and delete.

use axum::body::Bytes;
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use cairn_client::Attempt;
use cairn_identity::restriction::{BranchMatch, BranchRestriction, RestrictionKind};
use cairn_identity::Action;
use cairn_proto::admin::admin_client::AdminClient;
use cairn_proto::admin::{
    BranchRestrictionsRequest, DeleteBranchRestrictionRequest, SetBranchRestrictionRequest,
};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::authz::{self, actor_metadata, with_actor, Caller, Style};
use crate::rest::{audit, error, grpc_error, page, PageQuery};
use crate::state::AppState;

fn restriction_json(st: &AppState, full: &str, r: &BranchRestriction) -> Value {
    let index = st.identities.index();
    let users: Vec<Value> = r
        .users
        .iter()
        .map(|u| match index.user(u) {
            Some(u) => crate::accounts::user_json(u, &st.base_url),
            None => json!({"type": "user", "username": u}),
        })
        .collect();
    let (match_kind, pattern, branch_type) = match &r.branch {
        BranchMatch::Glob(p) => ("glob", p.as_str(), Value::Null),
        BranchMatch::BranchingModel(t) => ("branching_model", "", json!(t)),
    };
    json!({
        "type": "branchrestriction",
        "id": r.id,
        "kind": r.kind.as_str(),
        "branch_match_kind": match_kind,
        "pattern": pattern,
        "branch_type": branch_type,
        "users": users,
        "groups": [],
        "value": r.value,
        "links": {"self": {"href": format!(
            "{}/2.0/repositories/{full}/branch-restrictions/{}", st.base_url, r.id
        )}},
    })
}

#[derive(Deserialize)]
struct UserRef {
    username: Option<String>,
    uuid: Option<String>,
}

#[derive(Deserialize)]
struct Body {
    kind: Option<String>,
    branch_match_kind: Option<String>,
    pattern: Option<String>,
    branch_type: Option<String>,
    #[serde(default)]
    users: Vec<UserRef>,
    #[serde(default)]
    groups: Vec<Value>,
    value: Option<u32>,
}

/// A 400 naming the field, as Bitbucket reports invalid input.
fn field(name: &str, message: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"type": "error", "error": {"message": message, "fields": {name: [message]}}})),
    )
        .into_response()
}

/// The restriction a body describes; `base` supplies what a PUT leaves out.
fn parse(
    st: &AppState,
    body: &[u8],
    base: Option<&BranchRestriction>,
) -> Result<BranchRestriction, Box<Response>> {
    parse_body(st, body, base).map_err(Box::new)
}

#[allow(clippy::result_large_err)] // boxed by `parse`, its one caller
fn parse_body(
    st: &AppState,
    body: &[u8],
    base: Option<&BranchRestriction>,
) -> Result<BranchRestriction, Response> {
    let b: Body = serde_json::from_slice(body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("invalid JSON body: {e}")))?;
    let kind = match (b.kind.as_deref(), base) {
        (Some(k), _) => RestrictionKind::parse(k).ok_or_else(|| field("kind", "unknown kind"))?,
        (None, Some(r)) => r.kind,
        (None, None) => return Err(field("kind", "kind is required")),
    };
    let branch = match (b.branch_match_kind.as_deref(), base) {
        (Some("glob"), _) | (None, None) => BranchMatch::Glob(
            b.pattern
                .clone()
                .ok_or_else(|| field("pattern", "pattern is required for glob"))?,
        ),
        (Some("branching_model"), _) => BranchMatch::BranchingModel(
            b.branch_type
                .clone()
                .ok_or_else(|| field("branch_type", "branch_type is required"))?,
        ),
        (Some(_), _) => {
            return Err(field(
                "branch_match_kind",
                "branch_match_kind is glob or branching_model",
            ))
        }
        (None, Some(r)) => match (&r.branch, &b.pattern) {
            (BranchMatch::Glob(_), Some(p)) => BranchMatch::Glob(p.clone()),
            (other, _) => other.clone(),
        },
    };
    if !b.groups.is_empty() {
        return Err(field("groups", "groups are not supported yet"));
    }
    let index = st.identities.index();
    let mut users = Vec::new();
    for u in &b.users {
        let found = u
            .username
            .as_deref()
            .and_then(|n| index.user(n))
            .or_else(|| {
                u.uuid
                    .as_deref()
                    .and_then(|id| index.users.values().find(|x| x.uuid == id))
            });
        match found {
            Some(user) => users.push(user.username.clone()),
            None => return Err(field("users", "no such user")),
        }
    }
    if b.users.is_empty() {
        if let Some(r) = base {
            users.clone_from(&r.users);
        }
    }
    let r = BranchRestriction {
        id: base.map_or(0, |r| r.id),
        kind,
        branch,
        users,
        value: b.value.or(base.and_then(|r| r.value)),
    };
    r.validate().map_err(|m| field("kind", &m))?;
    Ok(r)
}

async fn list_of(st: &AppState, ws: &str, slug: &str) -> Result<Vec<BranchRestriction>, Response> {
    let req = BranchRestrictionsRequest {
        workspace: ws.to_owned(),
        slug: slug.to_owned(),
    };
    let r = st
        .cluster
        .call_read(ws, |ch| {
            let req = req.clone();
            async move { Ok(AdminClient::new(ch).list_branch_restrictions(req).await?) }
        })
        .await
        .map_err(grpc_error)?;
    serde_json::from_slice(&r.into_inner().restrictions_json)
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, &format!("decoding: {e}")))
}

async fn store(
    st: &AppState,
    caller: &Caller,
    ws: &str,
    slug: &str,
    r: &BranchRestriction,
) -> Result<BranchRestriction, Response> {
    let body = serde_json::to_vec(r)
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()))?;
    let actor = actor_metadata(caller);
    let resp = st
        .cluster
        .call(ws, |ch| {
            let req = with_actor(
                SetBranchRestrictionRequest {
                    workspace: ws.to_owned(),
                    slug: slug.to_owned(),
                    restriction_json: body.clone().into(),
                },
                actor.clone(),
            );
            async move {
                AdminClient::new(ch)
                    .set_branch_restriction(req)
                    .await
                    .map_err(Attempt::mutation)
            }
        })
        .await
        .map_err(|s| match s.code() {
            tonic::Code::InvalidArgument => field("kind", s.message()),
            _ => grpc_error(s),
        })?;
    serde_json::from_slice(&resp.into_inner().restriction_json)
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, &format!("decoding: {e}")))
}

async fn admin(st: &AppState, caller: &Caller, ws: &str, slug: &str) -> Result<(), Response> {
    authz::authorize(st, caller, ws, slug, Action::Admin, Style::Rest)
        .await
        .map(|_| ())
}

pub async fn list(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((ws, slug)): Path<(String, String)>,
    Query(q): Query<PageQuery>,
) -> Response {
    if let Err(r) = admin(&st, &caller, &ws, &slug).await {
        return r;
    }
    let full = format!("{ws}/{slug}");
    match list_of(&st, &ws, &slug).await {
        Ok(all) => {
            let values: Vec<Value> = all
                .iter()
                .map(|r| restriction_json(&st, &full, r))
                .collect();
            let path = format!("/2.0/repositories/{full}/branch-restrictions");
            Json(page(&st, &path, values, &q)).into_response()
        }
        Err(r) => r,
    }
}

pub async fn create(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((ws, slug)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    if let Err(r) = admin(&st, &caller, &ws, &slug).await {
        return r;
    }
    let r = match parse(&st, &body, None) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    match store(&st, &caller, &ws, &slug, &r).await {
        Ok(stored) => {
            let full = format!("{ws}/{slug}");
            audit(
                &st,
                &caller,
                "restriction:create",
                full.clone(),
                format!("{} #{}", stored.kind.as_str(), stored.id),
            );
            (
                StatusCode::CREATED,
                Json(restriction_json(&st, &full, &stored)),
            )
                .into_response()
        }
        Err(resp) => resp,
    }
}

async fn one(st: &AppState, ws: &str, slug: &str, id: u64) -> Result<BranchRestriction, Response> {
    list_of(st, ws, slug)
        .await?
        .into_iter()
        .find(|r| r.id == id)
        .ok_or_else(|| error(StatusCode::NOT_FOUND, "No such branch restriction"))
}

pub async fn get(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((ws, slug, id)): Path<(String, String, u64)>,
) -> Response {
    if let Err(r) = admin(&st, &caller, &ws, &slug).await {
        return r;
    }
    match one(&st, &ws, &slug, id).await {
        Ok(r) => Json(restriction_json(&st, &format!("{ws}/{slug}"), &r)).into_response(),
        Err(resp) => resp,
    }
}

pub async fn update(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((ws, slug, id)): Path<(String, String, u64)>,
    body: Bytes,
) -> Response {
    if let Err(r) = admin(&st, &caller, &ws, &slug).await {
        return r;
    }
    let base = match one(&st, &ws, &slug, id).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let r = match parse(&st, &body, Some(&base)) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    match store(&st, &caller, &ws, &slug, &r).await {
        Ok(stored) => {
            let full = format!("{ws}/{slug}");
            audit(
                &st,
                &caller,
                "restriction:update",
                full.clone(),
                format!("#{id}"),
            );
            Json(restriction_json(&st, &full, &stored)).into_response()
        }
        Err(resp) => resp,
    }
}

pub async fn delete(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((ws, slug, id)): Path<(String, String, u64)>,
) -> Response {
    if let Err(r) = admin(&st, &caller, &ws, &slug).await {
        return r;
    }
    let actor = actor_metadata(&caller);
    let call = st
        .cluster
        .call(&ws, |ch| {
            let req = with_actor(
                DeleteBranchRestrictionRequest {
                    workspace: ws.clone(),
                    slug: slug.clone(),
                    id,
                },
                actor.clone(),
            );
            async move {
                AdminClient::new(ch)
                    .delete_branch_restriction(req)
                    .await
                    .map_err(Attempt::mutation)
            }
        })
        .await;
    match call {
        Ok(_) => {
            audit(
                &st,
                &caller,
                "restriction:delete",
                format!("{ws}/{slug}"),
                format!("#{id}"),
            );
            StatusCode::NO_CONTENT.into_response()
        }
        Err(s) if s.code() == tonic::Code::NotFound => {
            error(StatusCode::NOT_FOUND, "No such branch restriction")
        }
        Err(s) => grpc_error(s),
    }
}
