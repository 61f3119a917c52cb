//! The Bitbucket Cloud 2.0-shaped REST API: repositories.
//!
//! Each call goes to the replicas of its workspace's shard. A workspace the
//! directory does not know is a 404 (Bitbucket's error JSON) for get,
//! delete and list; creating a repository registers the workspace first,
//! since on Bitbucket a workspace exists before its repositories.

use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use cairn_proto::admin::admin_client::AdminClient;
use cairn_proto::admin::{
    CreateRepositoryRequest, DeleteRepositoryRequest, GetRepositoryRequest,
    ListRepositoriesRequest, Repository,
};
use cairn_proto::{limits, metadata};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::state::AppState;
use cairn_client::Attempt;

/// `{"type":"error","error":{"message":…}}` with `status`.
pub fn error(status: StatusCode, message: &str) -> Response {
    (
        status,
        Json(json!({"type": "error", "error": {"message": message}})),
    )
        .into_response()
}

/// A 400 naming the offending request field, as Bitbucket reports invalid
/// input: `{"type":"error","error":{"message":…,"fields":{field:[…]}}}`.
fn field_error(field: &str, message: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"type": "error", "error": {
            "message": message,
            "fields": {field: [message]},
        }})),
    )
        .into_response()
}

/// Largest REST request body; every field Cairn stores is far smaller.
pub const MAX_BODY_BYTES: usize = 64 << 10;

fn grpc_error(s: tonic::Status) -> Response {
    use tonic::Code;
    match s.code() {
        Code::NotFound => error(StatusCode::NOT_FOUND, s.message()),
        // A name taken by one that differs only in case.
        Code::AlreadyExists
            if s.metadata()
                .get(metadata::NAME_CONFLICT)
                .and_then(|v| v.to_str().ok())
                == Some(metadata::NAME_CONFLICT_CASE) =>
        {
            error(StatusCode::CONFLICT, s.message())
        }
        // Bitbucket answers a taken slug with 400.
        Code::AlreadyExists | Code::InvalidArgument => error(StatusCode::BAD_REQUEST, s.message()),
        Code::Unavailable => error(StatusCode::SERVICE_UNAVAILABLE, "storage unavailable"),
        _ => {
            tracing::error!(code = ?s.code(), message = s.message(), "admin call failed");
            error(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
        }
    }
}

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

pub async fn create(
    State(st): State<AppState>,
    Path((workspace, slug)): Path<(String, String)>,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Response {
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
    let call = st.cluster.call(&req.workspace, |ch| {
        let req = req.clone();
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
    Path((workspace, slug)): Path<(String, String)>,
) -> Response {
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

pub async fn delete(
    State(st): State<AppState>,
    Path((workspace, slug)): Path<(String, String)>,
) -> Response {
    let req = DeleteRepositoryRequest { workspace, slug };
    let call = st.cluster.call(&req.workspace, |ch| {
        let req = req.clone();
        async move {
            AdminClient::new(ch)
                .delete_repository(req)
                .await
                .map_err(Attempt::mutation)
        }
    });
    match call.await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(s) => grpc_error(s),
    }
}

pub async fn list(State(st): State<AppState>, Path(workspace): Path<String>) -> Response {
    let req = ListRepositoriesRequest { workspace };
    let call = st.cluster.call_read(&req.workspace, |ch| {
        let req = req.clone();
        async move { Ok(AdminClient::new(ch).list_repositories(req).await?) }
    });
    match call.await {
        Ok(r) => {
            let values: Vec<Value> = r
                .into_inner()
                .repositories
                .iter()
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
