//! Token authentication: HTTP Basic with any user name (git's
//! `x-token-auth:<token>` convention) or a Bearer token.

use axum::http::{header, HeaderMap};
use base64::Engine;

/// Why a request was not authenticated.
#[derive(Debug, PartialEq, Eq)]
pub enum AuthFailure {
    Missing,
    Invalid,
}

/// Checks the `Authorization` header against `token`.
pub fn check(headers: &HeaderMap, token: &str) -> Result<(), AuthFailure> {
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or(AuthFailure::Missing)?;
    let presented = if let Some(b) = value.strip_prefix("Bearer ") {
        b.trim().to_owned()
    } else if let Some(b) = value.strip_prefix("Basic ") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(b.trim())
            .map_err(|_| AuthFailure::Invalid)?;
        let decoded = String::from_utf8(decoded).map_err(|_| AuthFailure::Invalid)?;
        let (_, password) = decoded.split_once(':').ok_or(AuthFailure::Invalid)?;
        password.to_owned()
    } else {
        return Err(AuthFailure::Invalid);
    };
    if constant_time_eq(presented.as_bytes(), token.as_bytes()) {
        Ok(())
    } else {
        Err(AuthFailure::Invalid)
    }
}

/// Compares without an early exit, so timing does not reveal a prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(value).expect("ascii"),
        );
        h
    }

    #[test]
    fn accepts_basic_and_bearer() {
        let token = "0123456789abcdef";
        let basic =
            base64::engine::general_purpose::STANDARD.encode("x-token-auth:0123456789abcdef");
        assert_eq!(check(&with(&format!("Basic {basic}")), token), Ok(()));
        assert_eq!(check(&with("Bearer 0123456789abcdef"), token), Ok(()));
    }

    #[test]
    fn rejects_missing_wrong_and_malformed() {
        let token = "0123456789abcdef";
        assert_eq!(check(&HeaderMap::new(), token), Err(AuthFailure::Missing));
        assert_eq!(
            check(&with("Bearer 0123456789abcdeX"), token),
            Err(AuthFailure::Invalid)
        );
        assert_eq!(check(&with("Basic !!!"), token), Err(AuthFailure::Invalid));
        let no_colon = base64::engine::general_purpose::STANDARD.encode("justuser");
        assert_eq!(
            check(&with(&format!("Basic {no_colon}")), token),
            Err(AuthFailure::Invalid)
        );
        assert_eq!(check(&with("Digest abc"), token), Err(AuthFailure::Invalid));
    }
}
