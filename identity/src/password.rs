//! Web sign-in passwords: Argon2id with a random salt, in the PHC string
//! format, so the parameters travel with the hash.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

/// Shortest and longest password accepted; the upper bound keeps one
/// sign-in attempt's cost bounded.
pub const MIN_LEN: usize = 8;
pub const MAX_LEN: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PasswordError {
    #[error("a password needs {MIN_LEN} to {MAX_LEN} bytes")]
    Length,
    #[error("hashing the password: {0}")]
    Hash(String),
}

pub fn hash(password: &str) -> Result<String, PasswordError> {
    if !(MIN_LEN..=MAX_LEN).contains(&password.len()) {
        return Err(PasswordError::Length);
    }
    let salt_bytes = crate::token::random_bytes::<16>();
    let salt =
        SaltString::encode_b64(&salt_bytes).map_err(|e| PasswordError::Hash(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| PasswordError::Hash(e.to_string()))
}

pub fn verify(password: &str, phc: &str) -> bool {
    if password.len() > MAX_LEN {
        return false;
    }
    PasswordHash::new(phc).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_and_are_salted() {
        let a = hash("correct horse").expect("hash");
        let b = hash("correct horse").expect("hash");
        assert_ne!(a, b, "salted");
        assert!(a.starts_with("$argon2id$"));
        assert!(!a.contains("correct horse"));
        assert!(verify("correct horse", &a));
        assert!(!verify("correct horsf", &a));
        assert!(!verify("correct horse", "not a hash"));
        assert_eq!(hash("short"), Err(PasswordError::Length));
    }
}
