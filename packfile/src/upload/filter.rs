//! Partial-clone object filters (`filter <spec>` from the client).

/// A parsed filter specification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// `blob:none`: no blobs at all.
    BlobNone,
    /// `blob:limit=<n>`: only blobs smaller than `n` bytes.
    BlobLimit(u64),
    /// `tree:<depth>`: no trees or blobs at depth `depth` or deeper, where a
    /// commit's root tree is at depth 0 (so `tree:0` sends commits only).
    TreeDepth(u64),
}

/// A filter spec we do not understand or do not support.
#[derive(Debug, thiserror::Error)]
#[error("unsupported or invalid filter spec '{spec}'")]
pub struct FilterError {
    pub spec: String,
}

impl Filter {
    /// Parses a spec as sent on the wire (`blob:none`, `blob:limit=1k`, `tree:0`).
    pub fn parse(spec: &str) -> Result<Filter, FilterError> {
        let err = || FilterError {
            spec: spec.to_owned(),
        };
        if spec == "blob:none" {
            return Ok(Filter::BlobNone);
        }
        if let Some(n) = spec.strip_prefix("blob:limit=") {
            return parse_size(n).map(Filter::BlobLimit).ok_or_else(err);
        }
        if let Some(n) = spec.strip_prefix("tree:") {
            return n.parse().map(Filter::TreeDepth).map_err(|_| err());
        }
        Err(err())
    }

    /// Whether a blob of `size` bytes is sent when reached through a tree
    /// at `depth` (the depth of the blob entry itself).
    pub(crate) fn wants_blob(self, size: impl FnOnce() -> Option<u64>, depth: u64) -> bool {
        match self {
            Filter::BlobNone => false,
            Filter::BlobLimit(limit) => size().is_some_and(|s| s < limit),
            Filter::TreeDepth(max) => depth < max,
        }
    }

    /// Whether a tree at `depth` is sent.
    pub(crate) fn wants_tree(self, depth: u64) -> bool {
        match self {
            Filter::TreeDepth(max) => depth < max,
            Filter::BlobNone | Filter::BlobLimit(_) => true,
        }
    }

    /// Whether objects of this kind may be missing on a client using this
    /// filter, so they must not serve as thin-pack bases.
    pub(crate) fn may_lack_trees(self) -> bool {
        matches!(self, Filter::TreeDepth(_))
    }
}

/// `<n>[kmg]` as git's `git_parse_ulong` accepts it.
fn parse_size(s: &str) -> Option<u64> {
    let (digits, mult) = match s.as_bytes().last()?.to_ascii_lowercase() {
        b'k' => (&s[..s.len() - 1], 1u64 << 10),
        b'm' => (&s[..s.len() - 1], 1 << 20),
        b'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    digits.parse::<u64>().ok()?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_supported_specs() {
        assert_eq!(Filter::parse("blob:none").ok(), Some(Filter::BlobNone));
        assert_eq!(
            Filter::parse("blob:limit=1k").ok(),
            Some(Filter::BlobLimit(1024))
        );
        assert_eq!(
            Filter::parse("blob:limit=2M").ok(),
            Some(Filter::BlobLimit(2 << 20))
        );
        assert_eq!(
            Filter::parse("blob:limit=10").ok(),
            Some(Filter::BlobLimit(10))
        );
        assert_eq!(Filter::parse("tree:0").ok(), Some(Filter::TreeDepth(0)));
        for bad in [
            "",
            "blob:limit=",
            "blob:limit=x",
            "tree:-1",
            "sparse:oid=abc",
            "blob",
        ] {
            assert!(Filter::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn depth_semantics() {
        let f = Filter::TreeDepth(1);
        assert!(f.wants_tree(0));
        assert!(!f.wants_tree(1));
        assert!(!f.wants_blob(|| Some(1), 1));
        assert!(Filter::BlobLimit(5).wants_blob(|| Some(4), 9));
        assert!(!Filter::BlobLimit(5).wants_blob(|| Some(5), 0));
    }
}
