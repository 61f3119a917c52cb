//! Authentication: who a request's `Authorization` header names.
//!
//! Accepted: HTTP Basic `USERNAME:TOKEN` (a personal API token of that
//! user), Basic `x-token-auth:TOKEN` (git's convention; any token kind),
//! and `Bearer TOKEN`. No header is the anonymous caller; a header that
//! names no live credential is refused outright, whatever it asks for,
//! so a typo never silently downgrades to anonymous. Account passwords
//! are for web sign-in only, as on Bitbucket.

use axum::http::{header, HeaderMap};
use base64::Engine;
use cairn_identity::token;
use cairn_identity::{Index, Principal};

/// Why a request was not authenticated.
#[derive(Debug, PartialEq, Eq)]
pub enum AuthFailure {
    /// Malformed header, unknown, wrong, revoked or expired token, or a
    /// user name that is not the token's owner. The string says which,
    /// for the audit log only: the caller is told nothing more.
    Invalid(&'static str),
}

/// A credential as presented.
struct Presented {
    /// Basic's user name (not `x-token-auth`), which must own the token.
    username: Option<String>,
    secret: String,
}

/// Longest `Authorization` value considered; a token is far shorter.
const MAX_HEADER: usize = 1024;

fn presented(headers: &HeaderMap) -> Result<Option<Presented>, AuthFailure> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| AuthFailure::Invalid("malformed header"))?;
    if value.len() > MAX_HEADER {
        return Err(AuthFailure::Invalid("oversized header"));
    }
    if let Some(b) = value.strip_prefix("Bearer ") {
        return Ok(Some(Presented {
            username: None,
            secret: b.trim().to_owned(),
        }));
    }
    let Some(b) = value.strip_prefix("Basic ") else {
        return Err(AuthFailure::Invalid("unsupported scheme"));
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(b.trim())
        .map_err(|_| AuthFailure::Invalid("malformed header"))?;
    let decoded =
        String::from_utf8(decoded).map_err(|_| AuthFailure::Invalid("malformed header"))?;
    let (user, secret) = decoded
        .split_once(':')
        .ok_or(AuthFailure::Invalid("malformed header"))?;
    Ok(Some(Presented {
        username: (!user.eq_ignore_ascii_case("x-token-auth")).then(|| user.to_owned()),
        secret: secret.to_owned(),
    }))
}

/// The principal the request's credential names, and the id of the token
/// used (for its last-used time).
pub fn authenticate(
    headers: &HeaderMap,
    index: &Index,
    operator_token: Option<&str>,
    now: i64,
) -> Result<(Principal, Option<String>), AuthFailure> {
    let Some(p) = presented(headers)? else {
        return Ok((Principal::Anonymous, None));
    };
    if let Some(op) = operator_token {
        if constant_time_eq(p.secret.as_bytes(), op.as_bytes()) {
            return Ok((Principal::Operator, None));
        }
    }
    if !token::is_token(&p.secret) {
        return Err(AuthFailure::Invalid("not a token"));
    }
    let id = token::id_of(&p.secret).ok_or(AuthFailure::Invalid("not a token"))?;
    let record = index
        .tokens
        .get(id)
        .ok_or(AuthFailure::Invalid("unknown token"))?;
    if !token::matches(&index.token_key, &p.secret, &record.hash) {
        return Err(AuthFailure::Invalid("wrong secret"));
    }
    if record.revoked_at.is_some() {
        return Err(AuthFailure::Invalid("revoked token"));
    }
    if !record.is_live(now) {
        return Err(AuthFailure::Invalid("expired token"));
    }
    if let cairn_identity::TokenOwner::User(owner) = &record.owner {
        if index.user(owner).is_none() {
            return Err(AuthFailure::Invalid("token of a removed user"));
        }
        if p.username
            .as_deref()
            .is_some_and(|u| !u.eq_ignore_ascii_case(owner))
        {
            return Err(AuthFailure::Invalid("user name does not own the token"));
        }
    } else if p.username.is_some() {
        return Err(AuthFailure::Invalid("an access token with a user name"));
    }
    Ok((
        Principal::of_token(&record.owner, &record.scopes, &record.id),
        Some(record.id.clone()),
    ))
}

/// The user name a failed credential claimed, for the audit log.
pub fn claimed_name(headers: &HeaderMap) -> String {
    match presented(headers) {
        Ok(Some(p)) => p
            .username
            .or_else(|| token::id_of(&p.secret).map(|id| format!("token:{id}")))
            .unwrap_or_default()
            .chars()
            .take(64)
            .collect(),
        _ => String::new(),
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
    use cairn_identity::{Scope, Snapshot, TokenOwner, TokenRecord, User};

    fn with(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(value).expect("ascii"),
        );
        h
    }

    fn basic(s: &str) -> HeaderMap {
        with(&format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(s)
        ))
    }

    /// An index with user `alice`, her token, and the key.
    fn setup(expires_at: Option<i64>, revoked: bool) -> (Index, String) {
        let key = token::generate_key();
        let (id, secret) = token::generate(token::Kind::Personal);
        let kb = token::decode_hex(&key).expect("hex");
        let index = Index::new(Snapshot {
            version: 1,
            token_key: key,
            users: vec![User {
                uuid: "{a}".into(),
                username: "alice".into(),
                display_name: "Alice".into(),
                email: String::new(),
                site_admin: false,
                password_hash: None,
                created_at: 0,
            }],
            tokens: vec![TokenRecord {
                id,
                owner: TokenOwner::User("alice".into()),
                label: String::new(),
                scopes: vec![Scope::Repository],
                hash: token::hash(&kb, &secret),
                created_at: 0,
                created_by: String::new(),
                expires_at,
                revoked_at: revoked.then_some(5),
                last_used: None,
            }],
            ..Snapshot::default()
        });
        (index, secret)
    }

    #[test]
    fn accepts_each_form_of_a_live_token() {
        let (ix, secret) = setup(Some(100), false);
        for h in [
            basic(&format!("x-token-auth:{secret}")),
            basic(&format!("Alice:{secret}")),
            with(&format!("Bearer {secret}")),
        ] {
            let (p, id) = authenticate(&h, &ix, None, 10).expect("authenticated");
            assert_eq!(p.username(), Some("alice"));
            assert!(id.is_some());
        }
        assert_eq!(
            authenticate(&HeaderMap::new(), &ix, None, 10)
                .expect("anonymous")
                .0,
            Principal::Anonymous
        );
    }

    #[test]
    fn refuses_what_is_not_a_live_token_of_the_named_user() {
        let (ix, secret) = setup(Some(100), false);
        let mut wrong = secret.clone();
        let last = if wrong.ends_with('0') { "1" } else { "0" };
        wrong.replace_range(wrong.len() - 1.., last);
        for (h, now) in [
            (basic(&format!("bob:{secret}")), 10),
            (basic(&format!("x-token-auth:{wrong}")), 10),
            (with(&format!("Bearer {secret}")), 100),
            (basic("alice:a password"), 10),
            (with("Basic !!!"), 10),
            (basic("justuser"), 10),
            (with("Digest abc"), 10),
        ] {
            assert!(authenticate(&h, &ix, None, now).is_err(), "{h:?} at {now}");
        }
        let (revoked, secret) = setup(None, true);
        assert_eq!(
            authenticate(&with(&format!("Bearer {secret}")), &revoked, None, 10),
            Err(AuthFailure::Invalid("revoked token"))
        );
    }

    #[test]
    fn the_operator_token_is_the_operator() {
        let (ix, _) = setup(None, false);
        let op = "0123456789abcdef0123";
        let h = basic(&format!("x-token-auth:{op}"));
        assert_eq!(
            authenticate(&h, &ix, Some(op), 0).expect("operator").0,
            Principal::Operator
        );
        assert!(authenticate(&h, &ix, None, 0).is_err());
    }
}
