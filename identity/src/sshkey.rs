//! SSH public keys as users paste them (`ssh-ed25519 AAAA… comment`):
//! parsed, checked (ed25519, ECDSA on the NIST curves, RSA of at least
//! 2048 bits; DSA and anything else refused) and fingerprinted as
//! `ssh-keygen -l` prints it (`SHA256:` and unpadded base64).

use base64::Engine;
use sha2::{Digest, Sha256};

/// Longest key line accepted (a 16384-bit RSA key is about 2.8 KiB).
pub const MAX_LINE: usize = 16 << 10;
pub const MIN_RSA_BITS: usize = 2048;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub algorithm: String,
    /// Base64 of the key blob, as in `authorized_keys`.
    pub blob: String,
    pub comment: String,
    pub fingerprint: String,
}

impl PublicKey {
    /// `ALGORITHM BLOB`, without the comment.
    pub fn line(&self) -> String {
        format!("{} {}", self.algorithm, self.blob)
    }
}

/// Reads one SSH wire-format string (u32 length, bytes).
fn take<'a>(data: &mut &'a [u8]) -> Result<&'a [u8], String> {
    let (len, rest) = data.split_first_chunk::<4>().ok_or("truncated key blob")?;
    let len = u32::from_be_bytes(*len) as usize;
    if rest.len() < len {
        return Err("truncated key blob".into());
    }
    let (s, rest) = rest.split_at(len);
    *data = rest;
    Ok(s)
}

/// Bits of an SSH `mpint` (big-endian, maybe with a leading zero byte).
fn mpint_bits(m: &[u8]) -> usize {
    let m = match m.iter().position(|&b| b != 0) {
        Some(i) => &m[i..],
        None => return 0,
    };
    m.len() * 8 - m[0].leading_zeros() as usize
}

pub fn parse(line: &str) -> Result<PublicKey, String> {
    if line.len() > MAX_LINE {
        return Err(format!("a key line is at most {MAX_LINE} bytes"));
    }
    let mut parts = line.split_whitespace();
    let algorithm = parts.next().ok_or("empty key")?.to_owned();
    let blob64 = parts.next().ok_or("no key data after the algorithm")?;
    let comment = parts.collect::<Vec<_>>().join(" ");
    let blob = base64::engine::general_purpose::STANDARD
        .decode(blob64)
        .map_err(|_| "the key data is not base64")?;
    let mut rest = blob.as_slice();
    let inner = take(&mut rest)?;
    if inner != algorithm.as_bytes() {
        return Err("the key data does not match its algorithm".into());
    }
    match algorithm.as_str() {
        "ssh-ed25519" => {
            if take(&mut rest)?.len() != 32 {
                return Err("an ed25519 key is 32 bytes".into());
            }
        }
        "ecdsa-sha2-nistp256" | "ecdsa-sha2-nistp384" | "ecdsa-sha2-nistp521" => {
            let curve = take(&mut rest)?;
            if !algorithm.ends_with(std::str::from_utf8(curve).unwrap_or("?")) {
                return Err("the ECDSA curve does not match the algorithm".into());
            }
            let point = take(&mut rest)?;
            if point.first() != Some(&4) {
                return Err("an ECDSA key must be an uncompressed point".into());
            }
        }
        "ssh-rsa" => {
            let _e = take(&mut rest)?;
            let n = take(&mut rest)?;
            let bits = mpint_bits(n);
            if bits < MIN_RSA_BITS {
                return Err(format!(
                    "RSA keys need at least {MIN_RSA_BITS} bits; this one has {bits}"
                ));
            }
        }
        "ssh-dss" => return Err("DSA keys are not accepted; use ed25519".into()),
        other => return Err(format!("unsupported key type {other:?}")),
    }
    if !rest.is_empty() {
        return Err("trailing bytes after the key".into());
    }
    let digest = Sha256::digest(&blob);
    Ok(PublicKey {
        algorithm,
        blob: blob64.to_owned(),
        comment,
        fingerprint: format!(
            "SHA256:{}",
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(parts: &[&[u8]]) -> String {
        let mut b = Vec::new();
        for p in parts {
            b.extend_from_slice(&(p.len() as u32).to_be_bytes());
            b.extend_from_slice(p);
        }
        base64::engine::general_purpose::STANDARD.encode(b)
    }

    #[test]
    fn accepts_ed25519_and_long_rsa_refuses_the_rest() {
        let ed = format!(
            "ssh-ed25519 {} alice@laptop",
            blob(&[b"ssh-ed25519", &[7; 32]])
        );
        let k = parse(&ed).expect("ed25519");
        assert_eq!(k.comment, "alice@laptop");
        assert!(k.fingerprint.starts_with("SHA256:") && k.fingerprint.len() == 50);

        let mut n = vec![0u8];
        n.extend([0xff; 256]);
        let rsa = format!("ssh-rsa {}", blob(&[b"ssh-rsa", &[1, 0, 1], &n]));
        parse(&rsa).expect("rsa 2048");
        let short = format!("ssh-rsa {}", blob(&[b"ssh-rsa", &[1, 0, 1], &[0xff; 128]]));
        assert!(parse(&short).expect_err("rsa 1024").contains("2048"));

        for bad in [
            String::new(),
            "ssh-ed25519".into(),
            "ssh-ed25519 !!!".into(),
            format!("ssh-rsa {}", blob(&[b"ssh-ed25519", &[7; 32]])),
            format!("ssh-ed25519 {}", blob(&[b"ssh-ed25519", &[7; 31]])),
            format!("ssh-dss {}", blob(&[b"ssh-dss", &[1; 10]])),
            format!("ssh-ed25519 {}", blob(&[b"ssh-ed25519", &[7; 32], b"x"])),
        ] {
            assert!(parse(&bad).is_err(), "{bad}");
        }
    }
}
