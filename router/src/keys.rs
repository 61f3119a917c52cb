//! REST for SSH keys in Bitbucket Cloud 2.0's shapes: a user's keys at
//! `/2.0/users/{user}/ssh-keys[/{uuid}]` (the user and site
//! administrators only) and a repository's read-only deploy keys at
//! `/2.0/repositories/{ws}/{slug}/deploy-keys[/{id}]` (its admins).

use axum::body::Bytes;
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use cairn_identity::change::{Change, Outcome};
use cairn_identity::{sshkey, Action, KeyOwner, Principal, SshKey};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::accounts::user_json;
use crate::answer::identity_error;
use crate::authz::{self, Caller, Style};
use crate::rest::{error, page, rfc3339, PageQuery};
use crate::state::AppState;

#[derive(Deserialize)]
struct KeyBody {
    key: String,
    #[serde(default)]
    label: String,
}

/// A deploy key's numeric id (Bitbucket numbers them): from its uuid.
fn deploy_id(k: &SshKey) -> u64 {
    let hex: String = k
        .uuid
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(12)
        .collect();
    u64::from_str_radix(&hex, 16).unwrap_or(0)
}

fn key_json(st: &AppState, k: &SshKey) -> Value {
    let index = st.identities.index();
    let mut v = json!({
        "key": format!("{} {}", k.algorithm, k.key),
        "comment": k.comment,
        "label": k.label,
        "fingerprint": k.fingerprint,
        "created_on": rfc3339(k.created_at),
        "last_used": k.last_used.map(rfc3339),
    });
    match &k.owner {
        KeyOwner::User(u) => {
            v["type"] = json!("ssh_key");
            v["uuid"] = json!(k.uuid);
            v["owner"] = index
                .user(u)
                .map_or(Value::Null, |u| user_json(u, &st.base_url));
            v["links"] = json!({"self": {"href": format!(
                "{}/2.0/users/{u}/ssh-keys/{}", st.base_url, k.uuid
            )}});
        }
        KeyOwner::Deploy { workspace, slug } => {
            v["type"] = json!("deploy_key");
            v["id"] = json!(deploy_id(k));
            v["repository"] =
                json!({"type": "repository", "full_name": format!("{workspace}/{slug}")});
            v["links"] = json!({"self": {"href": format!(
                "{}/2.0/repositories/{workspace}/{slug}/deploy-keys/{}", st.base_url, deploy_id(k)
            )}});
        }
    }
    v
}

/// Whether the caller manages `user`'s keys: the user, or a site admin.
fn manages(st: &AppState, caller: &Caller, user: &str) -> bool {
    let index = st.identities.index();
    match &caller.principal {
        Principal::Operator => true,
        Principal::User { username, .. } => {
            username.eq_ignore_ascii_case(user)
                || index.user(username).is_some_and(|u| u.site_admin)
        }
        _ => false,
    }
}

async fn add(st: &AppState, caller: &Caller, owner: KeyOwner, body: &[u8]) -> Response {
    let b: KeyBody = match serde_json::from_slice(body) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("invalid JSON body: {e}")),
    };
    let parsed = match sshkey::parse(&b.key) {
        Ok(k) => k,
        Err(why) => return error(StatusCode::BAD_REQUEST, &why),
    };
    let key = SshKey {
        uuid: cairn_identity::new_uuid(),
        fingerprint: parsed.fingerprint,
        owner,
        algorithm: parsed.algorithm,
        key: parsed.blob,
        comment: parsed.comment,
        label: b.label,
        created_at: 0,
        last_used: None,
    };
    let actor = caller.principal.actor();
    match crate::identity::propose(&st.cluster, &actor, &caller.from, Change::AddKey(key)).await {
        Ok(Outcome::Key(k)) => {
            st.identities.refresh(&st.cluster).await;
            (StatusCode::CREATED, Json(key_json(st, &k))).into_response()
        }
        Ok(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "unexpected answer"),
        Err(s) => identity_error(s),
    }
}

async fn remove(st: &AppState, caller: &Caller, key: &SshKey) -> Response {
    let change = Change::RemoveKey {
        fingerprint: key.fingerprint.clone(),
    };
    let actor = caller.principal.actor();
    match crate::identity::propose(&st.cluster, &actor, &caller.from, change).await {
        Ok(_) => {
            st.identities.refresh(&st.cluster).await;
            StatusCode::NO_CONTENT.into_response()
        }
        Err(s) => identity_error(s),
    }
}

fn keys_of(st: &AppState, owner: &KeyOwner) -> Vec<SshKey> {
    let mut keys: Vec<SshKey> = st
        .identities
        .index()
        .ssh_keys
        .values()
        .filter(|k| k.owner == *owner)
        .cloned()
        .collect();
    keys.sort_by_key(|k| k.created_at);
    keys
}

/// The owner of `user`'s keys, if the caller manages them (see
/// [`manages`]) and the user exists.
fn keys_owner(st: &AppState, caller: &Caller, user: &str) -> Option<KeyOwner> {
    if !manages(st, caller, user) {
        return None;
    }
    st.identities
        .index()
        .user(user)
        .map(|u| KeyOwner::User(u.username.clone()))
}

pub async fn user_keys(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(user): Path<String>,
    Query(q): Query<PageQuery>,
) -> Response {
    let Some(owner) = keys_owner(&st, &caller, &user) else {
        return not_yours(&caller);
    };
    let values = keys_of(&st, &owner)
        .iter()
        .map(|k| key_json(&st, k))
        .collect();
    Json(page(
        &st,
        &format!("/2.0/users/{user}/ssh-keys"),
        values,
        &q,
    ))
    .into_response()
}

pub async fn add_user_key(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(user): Path<String>,
    body: Bytes,
) -> Response {
    let Some(owner) = keys_owner(&st, &caller, &user) else {
        return not_yours(&caller);
    };
    add(&st, &caller, owner, &body).await
}

fn find_user_key(st: &AppState, owner: &KeyOwner, id: &str) -> Option<SshKey> {
    keys_of(st, owner)
        .into_iter()
        .find(|k| k.uuid == id || k.fingerprint == id)
}

pub async fn user_key(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((user, id)): Path<(String, String)>,
) -> Response {
    let Some(owner) = keys_owner(&st, &caller, &user) else {
        return not_yours(&caller);
    };
    match find_user_key(&st, &owner, &id) {
        Some(k) => Json(key_json(&st, &k)).into_response(),
        None => error(StatusCode::NOT_FOUND, "No such key"),
    }
}

pub async fn delete_user_key(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((user, id)): Path<(String, String)>,
) -> Response {
    let Some(owner) = keys_owner(&st, &caller, &user) else {
        return not_yours(&caller);
    };
    match find_user_key(&st, &owner, &id) {
        Some(k) => remove(&st, &caller, &k).await,
        None => error(StatusCode::NOT_FOUND, "No such key"),
    }
}

fn not_yours(caller: &Caller) -> Response {
    if caller.principal.is_anonymous() {
        authz::refusal(cairn_identity::Decision::Unauthorized, Style::Rest, "")
    } else {
        error(StatusCode::FORBIDDEN, "Only the user manages their keys.")
    }
}

/// The deploy-key owner of a repository the caller administers.
async fn deploy_owner(
    st: &AppState,
    caller: &Caller,
    ws: &str,
    slug: &str,
) -> Result<KeyOwner, Response> {
    let repo = authz::authorize(st, caller, ws, slug, Action::Admin, Style::Rest).await?;
    let (workspace, slug) = if repo.workspace.is_empty() {
        (ws.to_ascii_lowercase(), slug.to_ascii_lowercase())
    } else {
        (
            repo.workspace.to_ascii_lowercase(),
            repo.slug.to_ascii_lowercase(),
        )
    };
    Ok(KeyOwner::Deploy { workspace, slug })
}

pub async fn deploy_keys(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((ws, slug)): Path<(String, String)>,
    Query(q): Query<PageQuery>,
) -> Response {
    let owner = match deploy_owner(&st, &caller, &ws, &slug).await {
        Ok(o) => o,
        Err(r) => return r,
    };
    let values = keys_of(&st, &owner)
        .iter()
        .map(|k| key_json(&st, k))
        .collect();
    let path = format!("/2.0/repositories/{ws}/{slug}/deploy-keys");
    Json(page(&st, &path, values, &q)).into_response()
}

pub async fn add_deploy_key(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((ws, slug)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    match deploy_owner(&st, &caller, &ws, &slug).await {
        Ok(owner) => add(&st, &caller, owner, &body).await,
        Err(r) => r,
    }
}

pub async fn deploy_key(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((ws, slug, id)): Path<(String, String, u64)>,
) -> Response {
    let owner = match deploy_owner(&st, &caller, &ws, &slug).await {
        Ok(o) => o,
        Err(r) => return r,
    };
    match keys_of(&st, &owner)
        .into_iter()
        .find(|k| deploy_id(k) == id)
    {
        Some(k) => Json(key_json(&st, &k)).into_response(),
        None => error(StatusCode::NOT_FOUND, "No such deploy key"),
    }
}

pub async fn delete_deploy_key(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((ws, slug, id)): Path<(String, String, u64)>,
) -> Response {
    let owner = match deploy_owner(&st, &caller, &ws, &slug).await {
        Ok(o) => o,
        Err(r) => return r,
    };
    match keys_of(&st, &owner)
        .into_iter()
        .find(|k| deploy_id(k) == id)
    {
        Some(k) => remove(&st, &caller, &k).await,
        None => error(StatusCode::NOT_FOUND, "No such deploy key"),
    }
}
