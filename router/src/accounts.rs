//! REST for accounts, in Bitbucket Cloud 2.0's shapes: `/2.0/user` (the
//! caller) and `/2.0/users/{user}` (anyone's public profile); and the
//! caller's API tokens at `/2.0/user/tokens[/{id}]`, Cairn's own paths in
//! the same style.

use axum::body::Bytes;
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use cairn_identity::change::{Change, Outcome};
use cairn_identity::policy::MISSING_SCOPE;
use cairn_identity::{token, Principal, Scope, TokenOwner, TokenRecord, User};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::authz::{self, Caller, Style};
use crate::rest::{error, page, rfc3339, PageQuery};
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

// -- The caller's own API tokens (Cairn's paths; Bitbucket has no public
// REST for creating personal tokens). --------------------------------------

fn token_json(t: &TokenRecord) -> Value {
    let scopes: Vec<&str> = t.scopes.iter().map(|s| s.as_str()).collect();
    let state = if t.revoked_at.is_some() {
        "revoked"
    } else if !t.is_live(crate::identity::now()) {
        "expired"
    } else {
        "active"
    };
    json!({
        "type": "api_token",
        "id": t.id,
        "label": t.label,
        "scopes": scopes,
        "state": state,
        "created_on": rfc3339(t.created_at),
        "expires_on": t.expires_at.map(rfc3339),
        "last_used": t.last_used.map(rfc3339),
    })
}

/// The calling user, if the credential is a user's.
fn calling_user(caller: &Caller) -> Result<String, Box<Response>> {
    match &caller.principal {
        Principal::User { username, .. } => Ok(username.clone()),
        Principal::Anonymous => Err(Box::new(authz::refusal(
            cairn_identity::Decision::Unauthorized,
            Style::Rest,
            "",
        ))),
        _ => Err(Box::new(error(
            StatusCode::FORBIDDEN,
            "This credential is not a user's: access tokens have no account.",
        ))),
    }
}

pub async fn tokens(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<PageQuery>,
) -> Response {
    let user = match calling_user(&caller) {
        Ok(u) => u,
        Err(r) => return *r,
    };
    let index = st.identities.index();
    let owner = TokenOwner::User(user);
    let mut mine: Vec<&TokenRecord> = index.tokens.values().filter(|t| t.owner == owner).collect();
    mine.sort_by_key(|t| t.created_at);
    let values = mine.into_iter().map(token_json).collect();
    Json(page(&st, "/2.0/user/tokens", values, &q)).into_response()
}

#[derive(Deserialize)]
struct NewToken {
    #[serde(default)]
    label: String,
    scopes: Option<Vec<String>>,
    /// Seconds until it expires; never without.
    expires_in: Option<u64>,
}

/// Longest lifetime a token may be given: ten years.
const MAX_LIFETIME: u64 = 10 * 366 * 86_400;

pub async fn create_token(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Response {
    let user = match calling_user(&caller) {
        Ok(u) => u,
        Err(r) => return *r,
    };
    let b: NewToken = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("invalid JSON body: {e}")),
    };
    let scopes: Vec<Scope> = match &b.scopes {
        None => Scope::ALL
            .into_iter()
            .filter(|s| caller.principal.has_scope(*s))
            .collect(),
        Some(names) => {
            let mut out = Vec::new();
            for n in names {
                match Scope::parse(n) {
                    Some(s) => out.push(s),
                    None => return error(StatusCode::BAD_REQUEST, &format!("unknown scope {n:?}")),
                }
            }
            out
        }
    };
    // A token never gives more than the credential that made it.
    if scopes.is_empty() || !scopes.iter().all(|s| caller.principal.has_scope(*s)) {
        return error(
            StatusCode::FORBIDDEN,
            "A token may only carry scopes the credential creating it has.",
        );
    }
    if b.expires_in.is_some_and(|e| e == 0 || e > MAX_LIFETIME) {
        return error(
            StatusCode::BAD_REQUEST,
            "expires_in must be 1 second to 10 years",
        );
    }
    let actor = caller.principal.actor();
    let mut index = st.identities.index();
    if index.token_key.is_empty() {
        let key = token::generate_key();
        if let Err(s) = crate::identity::propose(
            &st.cluster,
            &actor,
            &caller.from,
            Change::InitTokenKey { key },
        )
        .await
        {
            return crate::answer::identity_error(s);
        }
        st.identities.refresh(&st.cluster).await;
        index = st.identities.index();
    }
    let owner = TokenOwner::User(user);
    let (id, secret) = token::generate(owner.token_kind());
    let record = TokenRecord {
        id,
        owner,
        label: b.label,
        scopes,
        hash: token::hash(&index.token_key, &secret),
        created_at: 0,
        created_by: String::new(),
        expires_at: b.expires_in.map(|e| crate::identity::now() + e as i64),
        revoked_at: None,
        last_used: None,
    };
    match crate::identity::propose(
        &st.cluster,
        &actor,
        &caller.from,
        Change::CreateToken(record),
    )
    .await
    {
        Ok(Outcome::Token(t)) => {
            st.identities.refresh(&st.cluster).await;
            let mut v = token_json(&t);
            // Shown once: only its hash is kept.
            v["token"] = json!(secret);
            (StatusCode::CREATED, Json(v)).into_response()
        }
        Ok(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "unexpected answer"),
        Err(s) => crate::answer::identity_error(s),
    }
}

pub async fn revoke_token(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    let user = match calling_user(&caller) {
        Ok(u) => u,
        Err(r) => return *r,
    };
    let index = st.identities.index();
    let mine = index
        .tokens
        .get(&id)
        .is_some_and(|t| t.owner == TokenOwner::User(user.clone()));
    if !mine {
        return error(StatusCode::NOT_FOUND, "No such token");
    }
    let actor = caller.principal.actor();
    match crate::identity::propose(
        &st.cluster,
        &actor,
        &caller.from,
        Change::RevokeToken { id },
    )
    .await
    {
        Ok(_) => {
            st.identities.refresh(&st.cluster).await;
            StatusCode::NO_CONTENT.into_response()
        }
        Err(s) => crate::answer::identity_error(s),
    }
}
