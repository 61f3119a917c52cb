//! Errors of a push that fail it as a whole (git's `unpack <reason>`), and
//! the fsck message ids they carry.

use std::fmt;
use std::path::PathBuf;

use gix_hash::ObjectId;

use crate::pktline::PktError;
use crate::store::StoreError;

/// The fsck problems a received object is rejected for, named as git's
/// `fsck.<msg-id>` so operators can match them to git's documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FsckId {
    // trees
    BadTree,
    BadFilemode,
    ZeroPaddedFilemode,
    EmptyName,
    FullPathname,
    HasDot,
    HasDotdot,
    HasDotgit,
    GitmodulesSymlink,
    NullSha1,
    TreeNotSorted,
    DuplicateEntries,
    // commits and tags
    NulInHeader,
    UnterminatedHeader,
    MissingTree,
    BadTreeSha1,
    BadParentSha1,
    MissingAuthor,
    MultipleAuthors,
    MissingCommitter,
    MissingNameBeforeEmail,
    BadName,
    MissingEmail,
    MissingSpaceBeforeEmail,
    BadEmail,
    MissingSpaceBeforeDate,
    ZeroPaddedDate,
    BadDate,
    BadDateOverflow,
    BadTimezone,
    MissingObject,
    BadObjectSha1,
    MissingTypeEntry,
    BadType,
    MissingTagEntry,
    // .gitmodules blobs named by received trees
    GitmodulesMissing,
    GitmodulesBlob,
    GitmodulesLarge,
    GitmodulesParse,
    GitmodulesName,
    GitmodulesPath,
    GitmodulesUrl,
    GitmodulesUpdate,
    // connectivity: an object referenced with one type is another
    WrongObjectType,
}

impl FsckId {
    /// git's camelCase message id.
    pub fn as_str(self) -> &'static str {
        use FsckId::*;
        match self {
            BadTree => "badTree",
            BadFilemode => "badFilemode",
            ZeroPaddedFilemode => "zeroPaddedFilemode",
            EmptyName => "emptyName",
            FullPathname => "fullPathname",
            HasDot => "hasDot",
            HasDotdot => "hasDotdot",
            HasDotgit => "hasDotgit",
            GitmodulesSymlink => "gitmodulesSymlink",
            NullSha1 => "nullSha1",
            TreeNotSorted => "treeNotSorted",
            DuplicateEntries => "duplicateEntries",
            NulInHeader => "nulInHeader",
            UnterminatedHeader => "unterminatedHeader",
            MissingTree => "missingTree",
            BadTreeSha1 => "badTreeSha1",
            BadParentSha1 => "badParentSha1",
            MissingAuthor => "missingAuthor",
            MultipleAuthors => "multipleAuthors",
            MissingCommitter => "missingCommitter",
            MissingNameBeforeEmail => "missingNameBeforeEmail",
            BadName => "badName",
            MissingEmail => "missingEmail",
            MissingSpaceBeforeEmail => "missingSpaceBeforeEmail",
            BadEmail => "badEmail",
            MissingSpaceBeforeDate => "missingSpaceBeforeDate",
            ZeroPaddedDate => "zeroPaddedDate",
            BadDate => "badDate",
            BadDateOverflow => "badDateOverflow",
            BadTimezone => "badTimezone",
            MissingObject => "missingObject",
            BadObjectSha1 => "badObjectSha1",
            MissingTypeEntry => "missingTypeEntry",
            BadType => "badType",
            MissingTagEntry => "missingTagEntry",
            GitmodulesMissing => "gitmodulesMissing",
            GitmodulesBlob => "gitmodulesBlob",
            GitmodulesLarge => "gitmodulesLarge",
            GitmodulesParse => "gitmodulesParse",
            GitmodulesName => "gitmodulesName",
            GitmodulesPath => "gitmodulesPath",
            GitmodulesUrl => "gitmodulesUrl",
            GitmodulesUpdate => "gitmodulesUpdate",
            WrongObjectType => "wrongObjectType",
        }
    }
}

impl fmt::Display for FsckId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a push failed as a whole. `Display` is a short sentence fit for the
/// `unpack <reason>` line; use [`ReceiveError::unpack_reason`] to get it
/// guaranteed on one line.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("protocol error: {0}")]
    Pkt(#[from] PktError),
    #[error("protocol error: expected a command line, got a {found} packet")]
    UnexpectedPacket { found: &'static str },
    #[error("protocol error: malformed command line {line:?}")]
    MalformedCommand { line: String },
    #[error("protocol error: invalid object id {hex:?}")]
    BadObjectId { hex: String },
    #[error("protocol error: ref name is not valid UTF-8")]
    NonUtf8RefName,
    #[error("shallow pushes are not supported")]
    ShallowUnsupported,
    #[error("signed pushes are not supported")]
    PushCertUnsupported,
    #[error("object format {format:?} is not supported (only sha1)")]
    UnsupportedObjectFormat { format: String },
    #[error("too many ref updates in one push (limit {limit})")]
    TooManyCommands { limit: usize },
    #[error("too many push options (limit {limit})")]
    TooManyPushOptions { limit: usize },
    #[error("push option too long (limit {limit} bytes)")]
    PushOptionTooLong { limit: usize },
    #[error("protocol error: push option is not valid UTF-8")]
    NonUtf8PushOption,
    #[error("protocol error: input ended before the command list was complete")]
    UnexpectedEof,
    #[error("no pack data received")]
    MissingPack,
    #[error("bad pack header: {reason}")]
    BadPackHeader { reason: String },
    #[error("pack announces {announced} objects, more than the limit of {limit}")]
    TooManyObjects { announced: u32, limit: u32 },
    #[error("pack exceeds the size limit of {limit} bytes")]
    PackTooLarge { limit: u64 },
    #[error("pack is truncated")]
    PackTruncated,
    #[error("pack checksum mismatch")]
    PackChecksum,
    /// Bytes follow the pack's trailer (git's index-pack wording).
    #[error("pack has junk at the end")]
    PackJunk,
    #[error("pack is corrupt: {detail}")]
    PackCorrupt { detail: String },
    #[error("pack object exceeds the size limit of {limit} bytes")]
    ObjectTooLarge { limit: usize },
    #[error("delta base {base} is neither in the pack nor in the repository")]
    MissingDeltaBase { base: ObjectId },
    #[error("object {id} appears twice in the pack")]
    DuplicateObject { id: ObjectId },
    #[error("fsck error in {kind} {id}: {msg_id}: {detail}")]
    Fsck {
        id: ObjectId,
        kind: gix_object::Kind,
        msg_id: FsckId,
        detail: String,
    },
    #[error("cannot read received object: {0}")]
    Store(#[from] StoreError),
    #[error("staging I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Longest `unpack <reason>` text.
const MAX_UNPACK_REASON: usize = 400;
/// Longest per-ref reason: it is repeated on every ref's `ng` line.
const MAX_REF_REASON: usize = 300;

impl ReceiveError {
    /// The reason for git's `unpack <reason>` line: one line, bounded length.
    pub fn unpack_reason(&self) -> String {
        one_line(&self.to_string(), MAX_UNPACK_REASON)
    }

    /// The reason for each ref's `ng <ref> <reason>` line when the push
    /// fails as a whole: git's `<msgId>: <message>` for an fsck error (what
    /// a pusher needs to find the offending object), else git's own
    /// `unpacker error`. One line, at most a few hundred bytes.
    pub fn ref_reason(&self) -> String {
        match self {
            ReceiveError::Fsck { msg_id, detail, .. } => {
                one_line(&format!("{msg_id}: {detail}"), MAX_REF_REASON)
            }
            _ => "unpacker error".to_owned(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ReceiveError::Io {
            path: path.into(),
            source,
        }
    }
}

/// `text` with control characters made spaces, cut to `max` bytes on a
/// char boundary.
fn one_line(text: &str, max: usize) -> String {
    let mut s: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn fsck(msg_id: FsckId, detail: &str) -> ReceiveError {
        ReceiveError::Fsck {
            id: gix_hash::Kind::Sha1.null(),
            kind: gix_object::Kind::Blob,
            msg_id,
            detail: detail.to_owned(),
        }
    }

    #[test]
    fn ref_reason_names_the_fsck_problem_on_one_bounded_line() {
        let e = fsck(
            FsckId::GitmodulesName,
            "disallowed submodule name: ../../../../../hooks",
        );
        assert_eq!(
            e.ref_reason(),
            "gitmodulesName: disallowed submodule name: ../../../../../hooks"
        );
        assert!(e.unpack_reason().starts_with("fsck error in blob 0000000"));

        // A url with a newline, then more multi-byte text than fits.
        let long = format!("disallowed submodule url: ./a\nb{}", "é".repeat(400));
        let e = fsck(FsckId::GitmodulesUrl, &long);
        let r = e.ref_reason();
        assert!(
            r.starts_with("gitmodulesUrl: disallowed submodule url: ./a b"),
            "{r}"
        );
        assert!(r.len() <= MAX_REF_REASON && r.len() >= MAX_REF_REASON - 1);
        assert!(!r.contains('\n'));

        for other in [
            ReceiveError::PackJunk,
            ReceiveError::PackTruncated,
            ReceiveError::MissingPack,
        ] {
            assert_eq!(other.ref_reason(), "unpacker error");
        }
        assert_eq!(
            ReceiveError::PackJunk.unpack_reason(),
            "pack has junk at the end"
        );
    }
}
