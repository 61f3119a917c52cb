//! REST for workspaces and permissions, in Bitbucket Cloud 2.0's shapes:
//! `/2.0/workspaces[/{ws}[/members|/permissions]]`,
//! `/2.0/user/permissions/repositories` and a repository's
//! `permissions-config/users[/{user}]`.
//!
//! A workspace is visible to its members, to users granted anything in it,
//! to access tokens bound to it, and to site administrators; to anyone
//! else it does not exist.

use axum::body::Bytes;
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use cairn_identity::change::Change;
use cairn_identity::policy::{self, Action, Decision, Principal, RepoRef};
use cairn_identity::{Grant, Index, Level, Role, Scope, Target};
use cairn_proto::admin::admin_client::AdminClient;
use cairn_proto::admin::{ListRepositoriesRequest, Repository};
use cairn_proto::cluster::cluster_client::ClusterClient;
use cairn_proto::cluster::ListWorkspacesRequest;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::accounts::user_json;
use crate::answer::identity_error;
use crate::authz::{self, Caller, Style};
use crate::rest::{error, grpc_error, page, repository_json, PageQuery};
use crate::state::AppState;

fn workspace_json(name: &str, id: u64, base: &str) -> Value {
    json!({
        "type": "workspace",
        "uuid": format!("{{{:08x}-0000-4000-8000-{:012x}}}", id >> 32, id & 0xffff_ffff_ffff),
        "name": name,
        "slug": name,
        "is_private": true,
        "links": {
            "self": {"href": format!("{base}/2.0/workspaces/{name}")},
            "html": {"href": format!("{base}/{name}/")},
            "repositories": {"href": format!("{base}/2.0/repositories/{name}")},
            "members": {"href": format!("{base}/2.0/workspaces/{name}/members")},
        },
    })
}

/// Whether `principal` sees workspace `ws` at all.
fn sees(index: &Index, principal: &Principal, ws: &str) -> bool {
    let ws = ws.to_ascii_lowercase();
    match principal {
        Principal::Anonymous => false,
        Principal::Operator => true,
        Principal::User { username, .. } => index
            .user(username)
            .is_some_and(|u| u.site_admin || index.workspaces_of(&u.username).contains(&ws)),
        Principal::Workspace { workspace, .. } => *workspace == ws,
        Principal::Repository { workspace, .. } => *workspace == ws,
    }
}

/// Whether `principal` administers workspace `ws`.
fn administers(index: &Index, principal: &Principal, ws: &str) -> bool {
    match principal {
        Principal::Operator => true,
        Principal::User { username, .. } => index
            .user(username)
            .is_some_and(|u| u.site_admin || index.role(&u.username, ws) == Some(Role::Owner)),
        _ => false,
    }
}

async fn all_workspaces(st: &AppState) -> Result<Vec<(String, u64)>, Response> {
    let r = st
        .cluster
        .call_read("", |ch| async move {
            Ok(ClusterClient::new(ch)
                .list_workspaces(ListWorkspacesRequest {})
                .await?)
        })
        .await
        .map_err(grpc_error)?;
    Ok(r.into_inner()
        .workspaces
        .into_iter()
        .map(|w| (w.name, w.id))
        .collect())
}

/// The workspace's canonical name and id, if the caller may see it.
async fn visible(st: &AppState, caller: &Caller, ws: &str) -> Result<(String, u64), Response> {
    let index = st.identities.index();
    if caller.principal.is_anonymous() {
        return Err(authz::refusal(Decision::Unauthorized, Style::Rest, ws));
    }
    let found = all_workspaces(st)
        .await?
        .into_iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(ws));
    match found {
        Some(w) if sees(&index, &caller.principal, &w.0) => Ok(w),
        _ => Err(error(
            StatusCode::NOT_FOUND,
            &format!("Workspace {ws} not found"),
        )),
    }
}

pub async fn list(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<PageQuery>,
) -> Response {
    if caller.principal.is_anonymous() {
        return authz::refusal(Decision::Unauthorized, Style::Rest, "");
    }
    let index = st.identities.index();
    let all = match all_workspaces(&st).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let values: Vec<Value> = all
        .iter()
        .filter(|(n, _)| sees(&index, &caller.principal, n))
        .map(|(n, id)| workspace_json(n, *id, &st.base_url))
        .collect();
    Json(page(&st, "/2.0/workspaces", values, &q)).into_response()
}

pub async fn get(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(ws): Path<String>,
) -> Response {
    match visible(&st, &caller, &ws).await {
        Ok((name, id)) => Json(workspace_json(&name, id, &st.base_url)).into_response(),
        Err(r) => r,
    }
}

/// `members` (everyone with a role) or `permissions` (the same, with the
/// role as `permission`; owners only).
async fn memberships(
    st: &AppState,
    caller: &Caller,
    ws: &str,
    q: &PageQuery,
    permissions: bool,
) -> Response {
    let (name, id) = match visible(st, caller, ws).await {
        Ok(w) => w,
        Err(r) => return r,
    };
    let index = st.identities.index();
    if permissions && !administers(&index, &caller.principal, &name) {
        return error(
            StatusCode::FORBIDDEN,
            "Only workspace owners see its permissions.",
        );
    }
    let workspace = workspace_json(&name, id, &st.base_url);
    let mut members: Vec<(&str, Role)> = index
        .users
        .keys()
        .filter_map(|u| index.role(u, &name).map(|r| (u.as_str(), r)))
        .collect();
    members.sort_by(|a, b| a.0.cmp(b.0));
    let values: Vec<Value> = members
        .into_iter()
        .filter_map(|(u, role)| index.user(u).map(|user| (user, role)))
        .map(|(user, role)| {
            let mut v = json!({
                "type": "workspace_membership",
                "user": user_json(user, &st.base_url),
                "workspace": workspace.clone(),
            });
            if permissions {
                v["permission"] = json!(role.as_str());
            }
            v
        })
        .collect();
    let what = if permissions {
        "permissions"
    } else {
        "members"
    };
    Json(page(
        st,
        &format!("/2.0/workspaces/{name}/{what}"),
        values,
        q,
    ))
    .into_response()
}

pub async fn members(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(ws): Path<String>,
    Query(q): Query<PageQuery>,
) -> Response {
    memberships(&st, &caller, &ws, &q, false).await
}

pub async fn permissions(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(ws): Path<String>,
    Query(q): Query<PageQuery>,
) -> Response {
    memberships(&st, &caller, &ws, &q, true).await
}

async fn repos_of(st: &AppState, ws: &str) -> Result<Vec<Repository>, Response> {
    let req = ListRepositoriesRequest {
        workspace: ws.to_owned(),
    };
    let r = st
        .cluster
        .call_read(ws, |ch| {
            let req = req.clone();
            async move { Ok(AdminClient::new(ch).list_repositories(req).await?) }
        })
        .await;
    match r {
        Ok(r) => Ok(r.into_inner().repositories),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(Vec::new()),
        Err(s) => Err(grpc_error(s)),
    }
}

/// `GET /2.0/user/permissions/repositories`: the repositories the caller
/// holds a permission on (public reads aside), with the level.
pub async fn my_repositories(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<PageQuery>,
) -> Response {
    let Principal::User { username, .. } = &caller.principal else {
        return match caller.principal {
            Principal::Anonymous => authz::refusal(Decision::Unauthorized, Style::Rest, ""),
            _ => error(StatusCode::FORBIDDEN, "Access tokens have no account."),
        };
    };
    if !caller.principal.has_scope(Scope::Account) && !caller.principal.has_scope(Scope::Repository)
    {
        return error(StatusCode::FORBIDDEN, policy::MISSING_SCOPE);
    }
    let index = st.identities.index();
    let Some(user) = index.user(username) else {
        return error(StatusCode::NOT_FOUND, "No such user");
    };
    let mut values = Vec::new();
    for ws in index.workspaces_of(&user.username) {
        let repos = match repos_of(&st, &ws).await {
            Ok(r) => r,
            Err(resp) => return resp,
        };
        for r in &repos {
            let as_private = RepoRef {
                workspace: &r.workspace,
                slug: &r.slug,
                is_private: true,
            };
            if let Some(level) = policy::access(&index, &caller.principal, as_private) {
                values.push(json!({
                    "type": "repository_permission",
                    "permission": level.as_str(),
                    "user": user_json(user, &st.base_url),
                    "repository": repository_json(r, &st.base_url),
                }));
            }
        }
    }
    Json(page(&st, "/2.0/user/permissions/repositories", values, &q)).into_response()
}

fn repo_target(ws: &str, slug: &str) -> Target {
    Target::Repository {
        workspace: ws.to_ascii_lowercase(),
        slug: slug.to_ascii_lowercase(),
    }
}

fn user_permission_json(st: &AppState, repo: &Repository, g: &Grant) -> Option<Value> {
    let index = st.identities.index();
    let user = index.user(&g.user)?;
    let full = format!("{}/{}", repo.workspace, repo.slug);
    Some(json!({
        "type": "repository_user_permission",
        "permission": g.level.as_str(),
        "user": user_json(user, &st.base_url),
        "repository": repository_json(repo, &st.base_url),
        "links": {"self": {"href": format!(
            "{}/2.0/repositories/{full}/permissions-config/users/{}", st.base_url, user.username
        )}},
    }))
}

/// `permissions-config/users`: the users granted a permission on the
/// repository itself (admin only).
pub async fn repo_users(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((ws, slug)): Path<(String, String)>,
    Query(q): Query<PageQuery>,
) -> Response {
    let repo = match authz::authorize(&st, &caller, &ws, &slug, Action::Admin, Style::Rest).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let target = repo_target(&ws, &slug);
    let index = st.identities.index();
    let mut grants: Vec<&Grant> = index
        .grants
        .values()
        .flatten()
        .filter(|g| g.target == target)
        .collect();
    grants.sort_by(|a, b| a.user.cmp(&b.user));
    let values: Vec<Value> = grants
        .into_iter()
        .filter_map(|g| user_permission_json(&st, &repo, g))
        .collect();
    let path = format!("/2.0/repositories/{ws}/{slug}/permissions-config/users");
    Json(page(&st, &path, values, &q)).into_response()
}

pub async fn repo_user(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((ws, slug, user)): Path<(String, String, String)>,
) -> Response {
    let repo = match authz::authorize(&st, &caller, &ws, &slug, Action::Admin, Style::Rest).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let target = repo_target(&ws, &slug);
    let index = st.identities.index();
    let found = index
        .user(&user)
        .and_then(|u| index.grants.get(&u.username))
        .and_then(|gs| gs.iter().find(|g| g.target == target));
    match found.and_then(|g| user_permission_json(&st, &repo, g)) {
        Some(v) => Json(v).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            &format!("{user} has no permission of its own here"),
        ),
    }
}

#[derive(Deserialize)]
struct PermissionBody {
    permission: String,
}

pub async fn set_repo_user(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((ws, slug, user)): Path<(String, String, String)>,
    body: Bytes,
) -> Response {
    let repo = match authz::authorize(&st, &caller, &ws, &slug, Action::Admin, Style::Rest).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let level = match serde_json::from_slice::<PermissionBody>(&body) {
        Ok(b) => match Level::parse(&b.permission) {
            Some(l) => l,
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "permission must be read, write or admin",
                )
            }
        },
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("invalid JSON body: {e}")),
    };
    let index = st.identities.index();
    let Some(u) = index.user(&user) else {
        return error(StatusCode::NOT_FOUND, &format!("User {user} not found"));
    };
    let grant = Grant {
        user: u.username.clone(),
        target: repo_target(&repo.workspace, &repo.slug),
        level,
    };
    let actor = caller.principal.actor();
    match crate::identity::propose(
        &st.cluster,
        &actor,
        &caller.from,
        Change::Grant(grant.clone()),
    )
    .await
    {
        Ok(_) => {
            st.identities.refresh(&st.cluster).await;
            user_permission_json(&st, &repo, &grant).map_or_else(
                || StatusCode::OK.into_response(),
                |v| Json(v).into_response(),
            )
        }
        Err(s) => identity_error(s),
    }
}

pub async fn delete_repo_user(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((ws, slug, user)): Path<(String, String, String)>,
) -> Response {
    let repo = match authz::authorize(&st, &caller, &ws, &slug, Action::Admin, Style::Rest).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let change = Change::Revoke {
        user: user.to_ascii_lowercase(),
        target: repo_target(&repo.workspace, &repo.slug),
    };
    let actor = caller.principal.actor();
    match crate::identity::propose(&st.cluster, &actor, &caller.from, change).await {
        Ok(_) => {
            st.identities.refresh(&st.cluster).await;
            StatusCode::NO_CONTENT.into_response()
        }
        Err(s) if s.code() == tonic::Code::FailedPrecondition => {
            error(StatusCode::NOT_FOUND, s.message())
        }
        Err(s) => identity_error(s),
    }
}
