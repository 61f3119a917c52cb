//! Minimal parsing of commits, tags and trees plus a commit cache, which is
//! all the graph walks of upload-pack need.

use std::collections::HashMap;

use gix_hash::{oid, ObjectId};
use gix_object::Kind;

use super::UploadError;
use crate::store::ObjectReader;

/// The parts of a commit the walks use.
#[derive(Debug, Clone)]
pub(crate) struct CommitInfo {
    pub tree: ObjectId,
    pub parents: Vec<ObjectId>,
    /// Committer time, seconds since the epoch.
    pub time: i64,
}

fn corrupt(id: &oid, message: &str) -> UploadError {
    UploadError::Corrupt {
        id: id.to_owned(),
        message: message.to_owned(),
    }
}

fn hex_id(id: &oid, hex: &[u8]) -> Result<ObjectId, UploadError> {
    ObjectId::from_hex(hex).map_err(|_| corrupt(id, "bad object id in header"))
}

/// Parses the header of a commit object.
pub(crate) fn parse_commit(id: &oid, data: &[u8]) -> Result<CommitInfo, UploadError> {
    let mut tree = None;
    let mut parents = Vec::new();
    let mut time = 0i64;
    for line in data.split(|&b| b == b'\n') {
        if line.is_empty() {
            break; // end of headers
        }
        if let Some(rest) = line.strip_prefix(b"tree ") {
            tree = Some(hex_id(id, rest)?);
        } else if let Some(rest) = line.strip_prefix(b"parent ") {
            parents.push(hex_id(id, rest)?);
        } else if let Some(rest) = line.strip_prefix(b"committer ") {
            time = signature_time(rest).unwrap_or(0);
        }
    }
    let tree = tree.ok_or_else(|| corrupt(id, "commit without tree"))?;
    Ok(CommitInfo {
        tree,
        parents,
        time,
    })
}

/// The timestamp of `Name <email> 1234567890 +0000`.
pub(crate) fn signature_time(sig: &[u8]) -> Option<i64> {
    let close = sig.iter().rposition(|&b| b == b'>')?;
    let rest = std::str::from_utf8(&sig[close + 1..]).ok()?;
    rest.split_whitespace().next()?.parse().ok()
}

/// The `object` a tag points to and that object's declared kind.
pub(crate) fn parse_tag(id: &oid, data: &[u8]) -> Result<(ObjectId, Option<Kind>), UploadError> {
    let mut target = None;
    let mut kind = None;
    for line in data.split(|&b| b == b'\n') {
        if line.is_empty() {
            break;
        }
        if let Some(rest) = line.strip_prefix(b"object ") {
            target = Some(hex_id(id, rest)?);
        } else if let Some(rest) = line.strip_prefix(b"type ") {
            kind = Kind::from_bytes(rest).ok();
        }
    }
    Ok((
        target.ok_or_else(|| corrupt(id, "tag without object"))?,
        kind,
    ))
}

/// One entry of a tree object.
pub(crate) struct TreeEntry<'a> {
    pub name: &'a [u8],
    pub id: ObjectId,
    pub kind: EntryKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EntryKind {
    Tree,
    Blob,
    /// A submodule commit: not part of this repository's object graph.
    Gitlink,
}

/// Iterates the entries of a raw tree; stops with an error on malformed data.
pub(crate) fn tree_entries<'a>(
    id: &'a oid,
    mut data: &'a [u8],
) -> impl Iterator<Item = Result<TreeEntry<'a>, UploadError>> + 'a {
    std::iter::from_fn(move || {
        if data.is_empty() {
            return None;
        }
        let parsed = (|| {
            let sp = data.iter().position(|&b| b == b' ')?;
            let nul = sp + 1 + data[sp + 1..].iter().position(|&b| b == 0)?;
            let mode = &data[..sp];
            let name = &data[sp + 1..nul];
            let raw = data.get(nul + 1..nul + 21)?;
            let kind = if mode == b"40000" || mode == b"040000" {
                EntryKind::Tree
            } else if mode == b"160000" {
                EntryKind::Gitlink
            } else {
                EntryKind::Blob
            };
            let entry = TreeEntry {
                name,
                id: ObjectId::try_from(raw).ok()?,
                kind,
            };
            Some((entry, nul + 21))
        })();
        match parsed {
            Some((entry, used)) => {
                data = &data[used..];
                Some(Ok(entry))
            }
            None => {
                data = &[];
                Some(Err(corrupt(id, "malformed tree entry")))
            }
        }
    })
}

/// Commits parsed so far; the walks share it so each commit is decoded once.
pub(crate) struct CommitCache<'r> {
    pub reader: &'r ObjectReader<'r>,
    commits: HashMap<ObjectId, CommitInfo>,
    buf: Vec<u8>,
}

impl<'r> CommitCache<'r> {
    pub fn new(reader: &'r ObjectReader<'r>) -> Self {
        CommitCache {
            reader,
            commits: HashMap::new(),
            buf: Vec::new(),
        }
    }

    /// The commit `id`, or `None` if it is missing or not a commit.
    pub fn get(&mut self, id: &oid) -> Result<Option<&CommitInfo>, UploadError> {
        if !self.commits.contains_key(id) {
            let Some((kind, data)) = self.reader.find(id, &mut self.buf)? else {
                return Ok(None);
            };
            if kind != Kind::Commit {
                return Ok(None);
            }
            let info = parse_commit(id, data)?;
            self.commits.insert(id.to_owned(), info);
        }
        Ok(self.commits.get(id))
    }

    /// Like [`get`](Self::get) but the commit must exist.
    pub fn require(&mut self, id: &oid) -> Result<&CommitInfo, UploadError> {
        self.get(id)?
            .ok_or_else(|| corrupt(id, "expected a commit"))
    }

    /// How many commits were parsed so far.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.commits.len()
    }

    /// Already-parsed commit, without touching storage.
    pub fn cached(&self, id: &oid) -> Option<&CommitInfo> {
        self.commits.get(id)
    }
}

/// Follows tag objects from `id` until a non-tag; returns the final object
/// and its kind, or `None` if something along the way is missing.
pub(crate) fn peel(
    reader: &ObjectReader<'_>,
    id: &oid,
) -> Result<Option<(ObjectId, Kind)>, UploadError> {
    let mut buf = Vec::new();
    let mut cur = id.to_owned();
    // Tag chains are short; the bound only guards against crafted loops.
    for _ in 0..64 {
        let Some((kind, data)) = reader.find(&cur, &mut buf)? else {
            return Ok(None);
        };
        if kind != Kind::Tag {
            return Ok(Some((cur, kind)));
        }
        cur = parse_tag(&cur, data)?.0;
    }
    Err(corrupt(id, "tag chain too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commit_headers() {
        let id = ObjectId::null(gix_hash::Kind::Sha1);
        let data = b"tree 4b825dc642cb6eb9a060e54bf8d69288fbee4904\n\
parent 1111111111111111111111111111111111111111\n\
parent 2222222222222222222222222222222222222222\n\
author A <a@b> 5 +0000\ncommitter C <c@d> 1577836800 +0100\n\nmsg\nparent x\n";
        let c = parse_commit(&id, data).expect("valid");
        assert_eq!(c.parents.len(), 2);
        assert_eq!(c.time, 1577836800);
        assert_eq!(
            c.tree.to_string(),
            "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
        );
    }

    #[test]
    fn tree_entry_iteration_and_garbage() {
        let id = ObjectId::null(gix_hash::Kind::Sha1);
        let mut data = Vec::new();
        data.extend_from_slice(b"100644 a\0");
        data.extend_from_slice(&[1u8; 20]);
        data.extend_from_slice(b"40000 d\0");
        data.extend_from_slice(&[2u8; 20]);
        let kinds: Vec<_> = tree_entries(&id, &data)
            .map(|e| e.expect("valid").kind)
            .collect();
        assert_eq!(kinds, vec![EntryKind::Blob, EntryKind::Tree]);
        let bad: Vec<_> = tree_entries(&id, b"100644 a\0short").collect();
        assert_eq!(bad.len(), 1);
        assert!(bad[0].is_err());
    }
}
