//! Tokens: `cnp_` (personal), `cnr_` (repository) or `cnw_` (workspace),
//! then 16 hex digits of id, `_`, and 64 hex digits (256 bits) of secret.
//!
//! The prefix makes a leaked token recognisable to secret scanners; the
//! id finds its record without a scan. The cluster keeps only
//! HMAC-SHA-256 of the whole token under a random cluster key: one hash
//! per request, cheap enough that bad credentials cannot be made to cost
//! more than good ones (a slow hash would hand a denial of service to
//! anyone), and useless to whoever reads the data folder, since the
//! secret is random and far too long to guess.

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const SECRET_HEX: usize = 64;
pub const ID_HEX: usize = 16;

/// Longest string that could be a token; longer credentials are refused
/// before any hashing.
pub const MAX_TOKEN_LEN: usize = 4 + ID_HEX + 1 + SECRET_HEX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Personal,
    Repository,
    Workspace,
}

impl Kind {
    pub fn prefix(self) -> &'static str {
        match self {
            Kind::Personal => "cnp_",
            Kind::Repository => "cnr_",
            Kind::Workspace => "cnw_",
        }
    }
}

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("the operating system's random source");
    b
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A fresh token of `kind`: its id and the whole token (shown once).
pub fn generate(kind: Kind) -> (String, String) {
    let id = format!("{}{}", kind.prefix(), hex(&random_bytes::<8>()));
    let token = format!("{id}_{}", hex(&random_bytes::<32>()));
    (id, token)
}

/// A fresh cluster token key (hex).
pub fn generate_key() -> String {
    hex(&random_bytes::<32>())
}

/// The id of a well-formed token, or of a bare id (`cnp_…` without the
/// secret), else `None`.
pub fn id_of(token: &str) -> Option<&str> {
    if token.len() > MAX_TOKEN_LEN {
        return None;
    }
    let kind_ok = [Kind::Personal, Kind::Repository, Kind::Workspace]
        .iter()
        .any(|k| token.starts_with(k.prefix()));
    if !kind_ok {
        return None;
    }
    let id = token.get(..4 + ID_HEX)?;
    if !is_lower_hex(&id[4..]) {
        return None;
    }
    match &token[id.len()..] {
        "" => Some(id),
        rest => {
            let secret = rest.strip_prefix('_')?;
            (secret.len() == SECRET_HEX && is_lower_hex(secret)).then_some(id)
        }
    }
}

/// Whether `s` is a whole token (id and secret).
pub fn is_token(s: &str) -> bool {
    s.len() == MAX_TOKEN_LEN && id_of(s).is_some()
}

/// The stored form of `token`.
pub fn hash(key: &[u8], token: &str) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(token.as_bytes());
    hex(&mac.finalize().into_bytes())
}

/// Compares a presented token's hash with the stored one in constant
/// time.
pub fn matches(key: &[u8], token: &str, stored_hex: &str) -> bool {
    let Some(stored) = decode_hex(stored_hex) else {
        return false;
    };
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(token.as_bytes());
    mac.verify_slice(&stored).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_parse_and_hash() {
        let (id, token) = generate(Kind::Repository);
        assert!(id.starts_with("cnr_") && id.len() == 20, "{id}");
        assert_eq!(id_of(&token), Some(id.as_str()));
        assert_eq!(id_of(&id), Some(id.as_str()));
        assert!(is_token(&token) && !is_token(&id));
        let key = decode_hex(&generate_key()).expect("hex");
        let stored = hash(&key, &token);
        assert!(!stored.contains(&token[21..]));
        assert!(matches(&key, &token, &stored));
        let mut other = token.clone();
        other.replace_range(30..31, if &token[30..31] == "0" { "1" } else { "0" });
        assert!(!matches(&key, &other, &stored));
        assert!(!matches(b"another key", &token, &stored));
    }

    #[test]
    fn malformed_tokens_are_not_tokens() {
        let (_, token) = generate(Kind::Personal);
        for bad in [
            "",
            "cnp_",
            "cnx_0123456789abcdef",
            "cnp_0123456789ABCDEF",
            "cnp_0123456789abcde",
            &token[..token.len() - 1],
            &format!("{token}0"),
            &token.replace('_', "-"),
        ] {
            assert!(!is_token(bad), "{bad:?}");
        }
        assert_eq!(id_of(&"a".repeat(10_000)), None);
    }
}
