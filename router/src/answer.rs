//! The responses every front-door module shares: Bitbucket's error JSON
//! for REST, git's plain-text answers for smart HTTP, and how a storage
//! node's gRPC failure reads in each. Below the handlers: it imports none
//! of them.

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use cairn_proto::metadata;
use serde_json::json;

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
pub fn field_error(field: &str, message: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"type": "error", "error": {
            "message": message,
            "fields": {field: [message]},
        }})),
    )
        .into_response()
}

/// A storage node's failure, as REST answers it.
pub fn grpc_error(s: tonic::Status) -> Response {
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

/// An identity change's failure as REST answers it.
pub fn identity_error(s: tonic::Status) -> Response {
    match s.code() {
        tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument => {
            error(StatusCode::BAD_REQUEST, s.message())
        }
        _ => grpc_error(s),
    }
}

/// Headers git's HTTP clients expect on every answer: nothing cached.
pub fn no_cache(headers: &mut HeaderMap) {
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, max-age=0, must-revalidate"),
    );
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::EXPIRES,
        HeaderValue::from_static("Fri, 01 Jan 1980 00:00:00 GMT"),
    );
}

pub fn plain(status: StatusCode, msg: &str) -> Response {
    let mut resp = (status, format!("{msg}\n")).into_response();
    no_cache(resp.headers_mut());
    resp
}

/// A gRPC failure before any response byte, as git's HTTP client expects it.
/// `NotFound` covers an unknown workspace as well as an unknown repository.
pub fn status_response(status: tonic::Status) -> Response {
    use tonic::Code;
    match status.code() {
        Code::NotFound => plain(StatusCode::NOT_FOUND, "Repository not found"),
        Code::InvalidArgument => plain(StatusCode::BAD_REQUEST, status.message()),
        Code::Unavailable => plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "Storage temporarily unavailable, try again",
        ),
        _ => {
            tracing::error!(code = ?status.code(), message = status.message(), "storage node error");
            plain(StatusCode::INTERNAL_SERVER_ERROR, "Internal server error")
        }
    }
}
