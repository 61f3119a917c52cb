//! REST for accounts, in Bitbucket Cloud 2.0's shapes: `/2.0/user` (the
//! caller) and `/2.0/users/{user}` (anyone's public profile).

use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use cairn_identity::policy::MISSING_SCOPE;
use cairn_identity::{Principal, Scope, User};
use serde_json::{json, Value};

use crate::authz::{self, Caller, Style};
use crate::rest::{error, rfc3339};
use crate::state::AppState;

pub fn user_json(u: &User, base: &str) -> Value {
    json!({
        "type": "user",
        "uuid": u.uuid,
        "username": u.username,
        "nickname": u.username,
        "display_name": u.display_name,
        "account_status": "active",
        "created_on": rfc3339(u.created_at),
        "links": {
            "self": {"href": format!("{base}/2.0/users/{}", u.username)},
            "html": {"href": format!("{base}/{}/", u.username)},
        },
    })
}

/// `GET /2.0/user`: the authenticated user (needs the `account` scope).
pub async fn me(State(st): State<AppState>, Extension(caller): Extension<Caller>) -> Response {
    let username = match &caller.principal {
        Principal::Anonymous => {
            return authz::refusal(cairn_identity::Decision::Unauthorized, Style::Rest, "")
        }
        Principal::User { username, .. } => username.clone(),
        _ => {
            return error(
                StatusCode::FORBIDDEN,
                "This credential is not a user's: access tokens have no account.",
            )
        }
    };
    if !caller.principal.has_scope(Scope::Account) {
        return error(StatusCode::FORBIDDEN, MISSING_SCOPE);
    }
    match st.identities.index().user(&username) {
        Some(u) => Json(user_json(u, &st.base_url)).into_response(),
        None => error(StatusCode::NOT_FOUND, "No such user"),
    }
}

/// `GET /2.0/users/{user}` by username or `{uuid}`.
pub async fn user(
    State(st): State<AppState>,
    Extension(_caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Response {
    let index = st.identities.index();
    let found = index
        .user(&name)
        .or_else(|| index.users.values().find(|u| u.uuid == name));
    match found {
        Some(u) => Json(user_json(u, &st.base_url)).into_response(),
        None => error(StatusCode::NOT_FOUND, &format!("User {name} not found")),
    }
}
