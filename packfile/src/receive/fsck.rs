//! fsck-class checks of single received objects, as git makes them with
//! `receive.fsckObjects` (strict mode: its warnings count as errors, its
//! infos do not), and extraction of the object ids an object refers to for
//! the connectivity walk.
//!
//! The checks work on raw object bytes rather than a parser's view so that
//! anything a lenient parser would paper over (odd modes, stray bytes in
//! headers) is still seen.

use std::collections::{BTreeSet, HashSet};

use gix_hash::ObjectId;
use gix_object::Kind;

use super::FsckId;

/// One fsck problem: git's message id and a short description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsckError {
    pub msg_id: FsckId,
    pub detail: String,
}

impl std::fmt::Display for FsckError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.msg_id, self.detail)
    }
}

fn err(msg_id: FsckId, detail: impl Into<String>) -> FsckError {
    FsckError {
        msg_id,
        detail: detail.into(),
    }
}

const HEX_LEN: usize = 40;
const RAW_LEN: usize = 20;

const MODE_FILE: u32 = 0o100644;
const MODE_EXEC: u32 = 0o100755;
/// Written by very old git versions; git itself still reads it as a file.
const MODE_GROUP_WRITABLE: u32 = 0o100664;
const MODE_SYMLINK: u32 = 0o120000;
const MODE_DIR: u32 = 0o40000;
const MODE_GITLINK: u32 = 0o160000;

/// Checks one object; blobs always pass here (a blob named `.gitmodules`
/// is checked once the whole pack is known, see [`check_object_marking`]).
pub fn check_object(kind: Kind, data: &[u8]) -> Result<(), FsckError> {
    check_object_marking(kind, data, &mut BTreeSet::new())
}

/// [`check_object`], also adding to `gitmodules` the id of every entry a
/// tree names `.gitmodules` (or an HFS+/NTFS alias of it): those blobs must
/// pass git's `.gitmodules` checks wherever they are stored.
pub(crate) fn check_object_marking(
    kind: Kind,
    data: &[u8],
    gitmodules: &mut BTreeSet<ObjectId>,
) -> Result<(), FsckError> {
    match kind {
        Kind::Blob => Ok(()),
        Kind::Tree => check_tree(data, gitmodules),
        Kind::Commit => check_commit(data),
        Kind::Tag => check_tag(data),
    }
}

/// One parsed tree entry.
struct TreeEntry<'a> {
    mode: u32,
    zero_padded: bool,
    name: &'a [u8],
    id: &'a [u8],
}

/// Iterates tree entries; an `Err` ends the iteration.
fn tree_entries(data: &[u8]) -> impl Iterator<Item = Result<TreeEntry<'_>, FsckError>> {
    let mut rest = data;
    let mut failed = false;
    std::iter::from_fn(move || {
        if rest.is_empty() || failed {
            return None;
        }
        let entry = (|| {
            let space = rest
                .iter()
                .position(|&b| b == b' ')
                .ok_or_else(|| err(FsckId::BadTree, "entry without a space after its mode"))?;
            let mode_str = &rest[..space];
            if mode_str.is_empty()
                || mode_str.len() > 7
                || !mode_str.iter().all(|b| (b'0'..=b'7').contains(b))
            {
                return Err(err(FsckId::BadTree, "entry with an unparsable mode"));
            }
            let mode = mode_str
                .iter()
                .fold(0u32, |m, &b| (m << 3) | u32::from(b - b'0'));
            let after = &rest[space + 1..];
            let nul = after
                .iter()
                .position(|&b| b == 0)
                .ok_or_else(|| err(FsckId::BadTree, "entry name without NUL terminator"))?;
            let name = &after[..nul];
            let id = after
                .get(nul + 1..nul + 1 + RAW_LEN)
                .ok_or_else(|| err(FsckId::BadTree, "truncated entry object id"))?;
            rest = &after[nul + 1 + RAW_LEN..];
            Ok(TreeEntry {
                mode,
                zero_padded: mode_str.len() > 1 && mode_str[0] == b'0',
                name,
                id,
            })
        })();
        failed = entry.is_err();
        Some(entry)
    })
}

fn check_tree(data: &[u8], gitmodules: &mut BTreeSet<ObjectId>) -> Result<(), FsckError> {
    let mut names: HashSet<&[u8]> = HashSet::new();
    let mut prev: Option<(Vec<u8>, &[u8])> = None;
    for entry in tree_entries(data) {
        let e = entry?;
        let shown = String::from_utf8_lossy(e.name);
        if e.zero_padded {
            return Err(err(
                FsckId::ZeroPaddedFilemode,
                format!("entry {shown:?} has a zero-padded file mode"),
            ));
        }
        if !matches!(
            e.mode,
            MODE_FILE | MODE_EXEC | MODE_GROUP_WRITABLE | MODE_SYMLINK | MODE_DIR | MODE_GITLINK
        ) {
            return Err(err(
                FsckId::BadFilemode,
                format!("entry {shown:?} has bad mode {:o}", e.mode),
            ));
        }
        if e.name.is_empty() {
            return Err(err(FsckId::EmptyName, "entry with an empty name"));
        }
        if e.name.contains(&b'/') {
            return Err(err(
                FsckId::FullPathname,
                format!("entry {shown:?} contains a slash"),
            ));
        }
        if e.name == b"." {
            return Err(err(FsckId::HasDot, "entry named '.'"));
        }
        if e.name == b".." {
            return Err(err(FsckId::HasDotdot, "entry named '..'"));
        }
        if is_dotgit(e.name) {
            return Err(err(
                FsckId::HasDotgit,
                format!("entry {shown:?} would be read as .git"),
            ));
        }
        if is_gitmodules(e.name) {
            if e.mode == MODE_SYMLINK {
                // git's wording; a symlink would make clients read a file
                // outside the repository as their submodule config.
                return Err(err(
                    FsckId::GitmodulesSymlink,
                    ".gitmodules is a symbolic link",
                ));
            }
            if let Ok(id) = gix_hash::oid::try_from_bytes(e.id) {
                gitmodules.insert(id.to_owned());
            }
        }
        if e.id.iter().all(|&b| b == 0) {
            return Err(err(
                FsckId::NullSha1,
                format!("entry {shown:?} points to the null object id"),
            ));
        }
        if !names.insert(e.name) {
            return Err(err(
                FsckId::DuplicateEntries,
                format!("entry {shown:?} appears twice"),
            ));
        }
        // git sorts directories as if their name ended in '/'.
        let mut key = e.name.to_vec();
        if e.mode == MODE_DIR {
            key.push(b'/');
        }
        if let Some((prev_key, prev_name)) = &prev {
            if *prev_key > key {
                return Err(err(
                    FsckId::TreeNotSorted,
                    format!(
                        "entry {shown:?} sorts before {:?}",
                        String::from_utf8_lossy(prev_name)
                    ),
                ));
            }
        }
        prev = Some((key, e.name));
    }
    Ok(())
}

/// Unicode code points HFS+ ignores when comparing names, so `.g\u{200c}it`
/// is `.git` there.
fn is_hfs_ignorable(c: char) -> bool {
    matches!(c as u32, 0x200C..=0x200F | 0x202A..=0x202E | 0x206A..=0x206F | 0xFEFF)
}

/// Whether `name` is `target` (lowercase ASCII) on a case-insensitive HFS+.
fn hfs_equals(name: &[u8], target: &str) -> bool {
    let Ok(s) = std::str::from_utf8(name) else {
        return false;
    };
    let folded: String = s
        .chars()
        .filter(|&c| !is_hfs_ignorable(c))
        .map(|c| c.to_ascii_lowercase())
        .collect();
    folded == target
}

/// Whether `component` means `long` (e.g. `.git`) or its 8.3 short name on
/// NTFS: case-insensitive, trailing dots and spaces dropped, and anything
/// after a `:` (an alternate data stream) ignored.
fn ntfs_equals(component: &[u8], long: &str, short: &str) -> bool {
    let lower = component.to_ascii_lowercase();
    let rest = if let Some(r) = lower.strip_prefix(long.as_bytes()) {
        r
    } else if let Some(r) = lower.strip_prefix(short.as_bytes()) {
        r
    } else {
        return false;
    };
    let rest = match rest.iter().position(|&b| b == b':') {
        Some(colon) => &rest[..colon],
        None => rest,
    };
    rest.iter().all(|&b| b == b'.' || b == b' ')
}

fn is_dotgit(name: &[u8]) -> bool {
    // A backslash separates directories on Windows; check every part.
    hfs_equals(name, ".git")
        || name
            .split(|&b| b == b'\\')
            .any(|c| ntfs_equals(c, ".git", "git~1"))
}

fn is_gitmodules(name: &[u8]) -> bool {
    // As in git, what follows each backslash is checked too, since it is a
    // directory separator on Windows.
    hfs_equals(name, ".gitmodules")
        || ntfs_is_dot_name(name, "gitmodules", "gi7eba")
        || name
            .iter()
            .enumerate()
            .any(|(i, &b)| b == b'\\' && ntfs_is_dot_name(&name[i + 1..], "gitmodules", "gi7eba"))
}

/// Whether NTFS may open `name` as `.<dot_name>` (git's
/// `is_ntfs_dot_generic`): case-insensitively, with trailing spaces and
/// dots ignored, a `:stream` suffix ignored, or as an 8.3 short name,
/// either the usual `<first six>~1`..`~4` or the hashed fallback
/// `<short_prefix>~<digits>` (git precomputed that prefix per name).
fn ntfs_is_dot_name(name: &[u8], dot_name: &str, short_prefix: &str) -> bool {
    let only_spaces_and_dots = |rest: &[u8]| {
        rest.iter()
            .take_while(|&&c| c != b':')
            .all(|&c| c == b' ' || c == b'.')
    };
    let long = dot_name.as_bytes();
    if let Some(after) = name.strip_prefix(b".").and_then(|r| {
        r.get(..long.len())
            .filter(|p| p.eq_ignore_ascii_case(long))
            .map(|_| &r[long.len()..])
    }) {
        return only_spaces_and_dots(after);
    }
    if name.len() >= 8
        && name[..6].eq_ignore_ascii_case(&long[..6])
        && name[6] == b'~'
        && (b'1'..=b'4').contains(&name[7])
    {
        return only_spaces_and_dots(&name[8..]);
    }
    // The fallback: up to six prefix characters, `~`, then digits (the
    // first not 0), eight characters in all.
    let prefix = short_prefix.as_bytes();
    let mut saw_tilde = false;
    let mut i = 0;
    while i < 8 {
        let Some(&c) = name.get(i) else {
            return false;
        };
        if saw_tilde {
            if !c.is_ascii_digit() {
                return false;
            }
        } else if c == b'~' {
            i += 1;
            if !name.get(i).is_some_and(|d| (b'1'..=b'9').contains(d)) {
                return false;
            }
            saw_tilde = true;
        } else if i >= 6 || !c.is_ascii() || c.to_ascii_lowercase() != prefix[i] {
            return false;
        }
        i += 1;
    }
    only_spaces_and_dots(&name[8..])
}

/// The header part of a commit or tag: must hold no NUL and end in a
/// newline (followed by the message, if any).
fn header_of(data: &[u8]) -> Result<&[u8], FsckError> {
    let end = data
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|p| p + 1)
        .unwrap_or(data.len());
    let header = &data[..end];
    if header.contains(&0) {
        return Err(err(FsckId::NulInHeader, "NUL byte in the object header"));
    }
    if !header.ends_with(b"\n") {
        return Err(err(
            FsckId::UnterminatedHeader,
            "header does not end with a newline",
        ));
    }
    Ok(header)
}

/// Splits `"<key> <value>\n..."` off `rest` if it starts with `key `.
fn take_field<'a>(rest: &mut &'a [u8], key: &str) -> Option<&'a [u8]> {
    let r = *rest;
    let after = r.strip_prefix(key.as_bytes())?.strip_prefix(b" ")?;
    let nl = after.iter().position(|&b| b == b'\n')?;
    *rest = &after[nl + 1..];
    Some(&after[..nl])
}

fn parse_hex(v: &[u8]) -> Option<ObjectId> {
    if v.len() != HEX_LEN
        || !v
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
    {
        return None;
    }
    ObjectId::from_hex(v).ok()
}

fn check_commit(data: &[u8]) -> Result<(), FsckError> {
    let mut rest = header_of(data)?;
    if !rest.starts_with(b"tree ") {
        return Err(err(
            FsckId::MissingTree,
            "commit does not start with a tree line",
        ));
    }
    match take_field(&mut rest, "tree") {
        Some(v) if parse_hex(v).is_some() => {}
        _ => return Err(err(FsckId::BadTreeSha1, "commit has an invalid tree id")),
    }
    while rest.starts_with(b"parent ") {
        match take_field(&mut rest, "parent") {
            Some(v) if parse_hex(v).is_some() => {}
            _ => {
                return Err(err(
                    FsckId::BadParentSha1,
                    "commit has an invalid parent id",
                ))
            }
        }
    }
    let Some(author) = take_field(&mut rest, "author") else {
        return Err(err(FsckId::MissingAuthor, "commit has no author line"));
    };
    check_ident(author).map_err(|e| with_context(e, "author"))?;
    if rest.starts_with(b"author ") {
        return Err(err(
            FsckId::MultipleAuthors,
            "commit has several author lines",
        ));
    }
    let Some(committer) = take_field(&mut rest, "committer") else {
        return Err(err(
            FsckId::MissingCommitter,
            "commit has no committer line",
        ));
    };
    check_ident(committer).map_err(|e| with_context(e, "committer"))?;
    Ok(())
}

fn check_tag(data: &[u8]) -> Result<(), FsckError> {
    let mut rest = header_of(data)?;
    if !rest.starts_with(b"object ") {
        return Err(err(
            FsckId::MissingObject,
            "tag does not start with an object line",
        ));
    }
    match take_field(&mut rest, "object") {
        Some(v) if parse_hex(v).is_some() => {}
        _ => return Err(err(FsckId::BadObjectSha1, "tag has an invalid object id")),
    }
    let Some(kind) = take_field(&mut rest, "type") else {
        return Err(err(FsckId::MissingTypeEntry, "tag has no type line"));
    };
    if Kind::from_bytes(kind).is_err() {
        return Err(err(
            FsckId::BadType,
            format!("tag has unknown type {:?}", String::from_utf8_lossy(kind)),
        ));
    }
    if take_field(&mut rest, "tag").is_none() {
        return Err(err(FsckId::MissingTagEntry, "tag has no tag line"));
    }
    // A missing tagger is only informational in git (old tags lack it).
    if let Some(tagger) = take_field(&mut rest, "tagger") {
        check_ident(tagger).map_err(|e| with_context(e, "tagger"))?;
    }
    Ok(())
}

fn with_context(mut e: FsckError, field: &str) -> FsckError {
    e.detail = format!("{field}: {}", e.detail);
    e
}

/// Largest timestamp git accepts (it stores them as unsigned 64-bit, and
/// caps them so that date arithmetic cannot overflow).
const MAX_TIMESTAMP: u64 = u64::MAX >> 1;

/// `Name <email> <seconds> <+hhmm>`, git's identity line rules.
fn check_ident(line: &[u8]) -> Result<(), FsckError> {
    if line.first() == Some(&b'<') {
        return Err(err(
            FsckId::MissingNameBeforeEmail,
            "no name before the email",
        ));
    }
    let lt = match line.iter().position(|&b| b == b'<' || b == b'>') {
        Some(p) if line[p] == b'>' => return Err(err(FsckId::BadName, "'>' in the name")),
        Some(p) => p,
        None => return Err(err(FsckId::MissingEmail, "no email")),
    };
    if lt == 0 || line[lt - 1] != b' ' {
        return Err(err(
            FsckId::MissingSpaceBeforeEmail,
            "no space before the email",
        ));
    }
    let after_lt = &line[lt + 1..];
    let gt = match after_lt.iter().position(|&b| b == b'<' || b == b'>') {
        Some(p) if after_lt[p] == b'>' => p,
        _ => return Err(err(FsckId::BadEmail, "malformed email")),
    };
    let mut rest = &after_lt[gt + 1..];
    rest = rest
        .strip_prefix(b" ")
        .ok_or_else(|| err(FsckId::MissingSpaceBeforeDate, "no space before the date"))?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return Err(err(FsckId::BadDate, "missing or invalid date"));
    }
    if digits > 1 && rest[0] == b'0' {
        return Err(err(FsckId::ZeroPaddedDate, "zero-padded date"));
    }
    let seconds = std::str::from_utf8(&rest[..digits])
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|&s| s <= MAX_TIMESTAMP);
    if seconds.is_none() {
        return Err(err(FsckId::BadDateOverflow, "date out of range"));
    }
    rest = rest[digits..]
        .strip_prefix(b" ")
        .ok_or_else(|| err(FsckId::BadDate, "no space after the date"))?;
    let tz_ok = rest.len() == 5
        && (rest[0] == b'+' || rest[0] == b'-')
        && rest[1..].iter().all(u8::is_ascii_digit);
    if !tz_ok {
        return Err(err(FsckId::BadTimezone, "malformed time zone"));
    }
    Ok(())
}

/// An object id another object refers to, with the kind it must have.
pub(crate) type Reference = (ObjectId, Kind);

/// The objects `data` (already fsck-clean) refers to, with the kind each
/// must have. Gitlinks are skipped.
pub(crate) fn references(kind: Kind, data: &[u8], out: &mut Vec<Reference>) {
    match kind {
        Kind::Blob => {}
        Kind::Tree => {
            for e in tree_entries(data).map_while(Result::ok) {
                let want = match e.mode {
                    MODE_GITLINK => continue,
                    MODE_DIR => Kind::Tree,
                    _ => Kind::Blob,
                };
                if let Ok(id) = gix_hash::oid::try_from_bytes(e.id) {
                    out.push((id.to_owned(), want));
                }
            }
        }
        Kind::Commit => {
            let mut rest = data;
            if let Some(id) = take_field(&mut rest, "tree").and_then(parse_hex) {
                out.push((id, Kind::Tree));
            }
            while let Some(v) = take_field(&mut rest, "parent") {
                if let Some(id) = parse_hex(v) {
                    out.push((id, Kind::Commit));
                }
            }
        }
        Kind::Tag => {
            let mut rest = data;
            let object = take_field(&mut rest, "object").and_then(parse_hex);
            let kind = take_field(&mut rest, "type").and_then(|k| Kind::from_bytes(k).ok());
            if let (Some(id), Some(kind)) = (object, kind) {
                out.push((id, kind));
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const ID: [u8; 20] = [0xab; 20];

    fn tree(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (mode, name) in entries {
            out.extend_from_slice(mode.as_bytes());
            out.push(b' ');
            out.extend_from_slice(name);
            out.push(0);
            out.extend_from_slice(&ID);
        }
        out
    }

    fn tree_id(entries: &[(&str, &[u8])]) -> Option<FsckId> {
        check_object(Kind::Tree, &tree(entries))
            .err()
            .map(|e| e.msg_id)
    }

    #[test]
    fn tree_table() {
        use FsckId::*;
        type Entries<'a> = Vec<(&'a str, &'a [u8])>;
        let cases: Vec<(Entries, Option<FsckId>)> = vec![
            (vec![], None),
            (
                vec![
                    ("100644", b"a"),
                    ("100755", b"b"),
                    ("120000", b"c"),
                    ("40000", b"d"),
                    ("160000", b"e"),
                    ("100664", b"f"),
                ],
                None,
            ),
            // "a.b" < "a/" (dir a) < "a0": directories sort with a slash
            (
                vec![("100644", b"a.b"), ("40000", b"a"), ("100644", b"a0")],
                None,
            ),
            (
                vec![("40000", b"a"), ("100644", b"a.b")],
                Some(TreeNotSorted),
            ),
            (
                vec![("100644", b"b"), ("100644", b"a")],
                Some(TreeNotSorted),
            ),
            (
                vec![("100644", b"a"), ("100644", b"a")],
                Some(DuplicateEntries),
            ),
            // a file and a directory of the same name, not adjacent
            (
                vec![("100644", b"a"), ("100644", b"a.b"), ("40000", b"a")],
                Some(DuplicateEntries),
            ),
            (vec![("040000", b"d")], Some(ZeroPaddedFilemode)),
            (vec![("100600", b"a")], Some(BadFilemode)),
            (vec![("777", b"a")], Some(BadFilemode)),
            (vec![("10064x", b"a")], Some(BadTree)),
            (vec![("", b"a")], Some(BadTree)),
            (vec![("100644", b"")], Some(EmptyName)),
            (vec![("100644", b"a/b")], Some(FullPathname)),
            (vec![("40000", b".")], Some(HasDot)),
            (vec![("40000", b"..")], Some(HasDotdot)),
            (vec![("40000", b".git")], Some(HasDotgit)),
            (vec![("100644", b".GIT")], Some(HasDotgit)),
            (vec![("40000", b".GiT")], Some(HasDotgit)),
            (vec![("40000", b"git~1")], Some(HasDotgit)),
            (vec![("40000", b"GIT~1")], Some(HasDotgit)),
            (vec![("40000", b".git.")], Some(HasDotgit)),
            (vec![("40000", b".git. . ")], Some(HasDotgit)),
            (vec![("40000", b".git::$INDEX_ALLOCATION")], Some(HasDotgit)),
            (vec![("40000", ".g\u{200c}it".as_bytes())], Some(HasDotgit)),
            (vec![("40000", "\u{feff}.GIT".as_bytes())], Some(HasDotgit)),
            (vec![("40000", b"sub\\.git")], Some(HasDotgit)),
            (vec![("40000", b".gitx")], None),
            (vec![("100644", b".gitignore")], None),
            (vec![("100644", b"x.git")], None),
            (vec![("120000", b".gitmodules")], Some(GitmodulesSymlink)),
            (vec![("120000", b".GITMODULES ")], Some(GitmodulesSymlink)),
            (
                vec![("120000", b".gitmodules::$DATA")],
                Some(GitmodulesSymlink),
            ),
            (vec![("120000", b"gitmod~1")], Some(GitmodulesSymlink)),
            (vec![("120000", b"GITMOD~4")], Some(GitmodulesSymlink)),
            (vec![("120000", b"gi7eba~1")], Some(GitmodulesSymlink)),
            (vec![("120000", b"GI7EB~12")], Some(GitmodulesSymlink)),
            (
                vec![("120000", b"sub\\.gitmodules")],
                Some(GitmodulesSymlink),
            ),
            (
                vec![("120000", ".gitmodules\u{200d}".as_bytes())],
                Some(GitmodulesSymlink),
            ),
            (vec![("120000", b"gitmod~5")], None),
            (vec![("120000", b"gi7eba~0")], None),
            (vec![("120000", b".gitmodulesx")], None),
            (vec![("120000", b"x.gitmodules")], None),
            (vec![("100644", b".gitmodules")], None),
        ];
        for (entries, want) in cases {
            assert_eq!(tree_id(&entries), want, "{entries:?}");
        }
    }

    #[test]
    fn gitmodules_entries_are_marked() {
        let mut marked = BTreeSet::new();
        let data = tree(&[
            ("100644", b".GitModules"),
            ("100644", b"a"),
            ("40000", b"gitmod~1"),
            ("160000", b"sub"),
        ]);
        check_object_marking(Kind::Tree, &data, &mut marked).unwrap();
        assert_eq!(
            marked.into_iter().collect::<Vec<_>>(),
            vec![ObjectId::from_bytes_or_panic(&ID)]
        );

        let e = check_object(Kind::Tree, &tree(&[("120000", b".gitmodules")])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "gitmodulesSymlink: .gitmodules is a symbolic link"
        );
    }

    #[test]
    fn tree_truncations_and_null_ids() {
        let good = tree(&[("100644", b"a")]);
        for cut in 1..good.len() {
            assert_eq!(
                check_object(Kind::Tree, &good[..cut]).unwrap_err().msg_id,
                FsckId::BadTree,
                "cut at {cut}"
            );
        }
        let mut null = b"100644 a\0".to_vec();
        null.extend_from_slice(&[0; 20]);
        assert_eq!(
            check_object(Kind::Tree, &null).unwrap_err().msg_id,
            FsckId::NullSha1
        );
    }

    const T: &str = "4b825dc642cb6eb9a060e54bf8d69288fbee4904";
    const IDENT: &str = "A U Thor <author@example.com> 1112911993 -0700";

    fn commit_id(text: &str) -> Option<FsckId> {
        check_object(Kind::Commit, text.as_bytes())
            .err()
            .map(|e| e.msg_id)
    }

    #[test]
    fn commit_table() {
        use FsckId::*;
        let good = format!("tree {T}\nparent {T}\nauthor {IDENT}\ncommitter {IDENT}\n\nmsg\n");
        let cases: Vec<(String, Option<FsckId>)> = vec![
            (good.clone(), None),
            (format!("tree {T}\nauthor {IDENT}\ncommitter {IDENT}\n"), None),
            (
                format!("tree {T}\nauthor {IDENT}\ncommitter {IDENT}\nencoding latin1\ngpgsig x\n y\n\nm"),
                None,
            ),
            (format!("parent {T}\nauthor {IDENT}\ncommitter {IDENT}\n\n"), Some(MissingTree)),
            (format!("tree {}\nauthor {IDENT}\ncommitter {IDENT}\n\n", &T[..39]), Some(BadTreeSha1)),
            (format!("tree {}\nauthor {IDENT}\ncommitter {IDENT}\n\n", T.to_uppercase()), Some(BadTreeSha1)),
            (format!("tree {T}\nparent xyz\nauthor {IDENT}\ncommitter {IDENT}\n\n"), Some(BadParentSha1)),
            (format!("tree {T}\ncommitter {IDENT}\n\n"), Some(MissingAuthor)),
            (format!("tree {T}\nauthor {IDENT}\nauthor {IDENT}\ncommitter {IDENT}\n\n"), Some(MultipleAuthors)),
            (format!("tree {T}\nauthor {IDENT}\n\n"), Some(MissingCommitter)),
            (format!("tree {T}\nauthor {IDENT}\ncommitter {IDENT}"), Some(UnterminatedHeader)),
            (format!("tree {T}\nauthor {IDENT}\0\ncommitter {IDENT}\n\n"), Some(NulInHeader)),
            // the message may contain anything
            (format!("tree {T}\nauthor {IDENT}\ncommitter {IDENT}\n\n\0binary"), None),
        ];
        for (text, want) in cases {
            assert_eq!(commit_id(&text), want, "{text:?}");
        }
    }

    #[test]
    fn ident_table() {
        use FsckId::*;
        let cases: &[(&str, Option<FsckId>)] = &[
            ("A U Thor <a@b> 1 +0000", None),
            (" <a@b> 0 +0000", None),
            ("<a@b> 1 +0000", Some(MissingNameBeforeEmail)),
            ("A > U <a@b> 1 +0000", Some(BadName)),
            ("A U Thor", Some(MissingEmail)),
            ("A<a@b> 1 +0000", Some(MissingSpaceBeforeEmail)),
            ("A <a@b 1 +0000", Some(BadEmail)),
            ("A <a<b> 1 +0000", Some(BadEmail)),
            ("A <a@b>1 +0000", Some(MissingSpaceBeforeDate)),
            ("A <a@b> +0000", Some(BadDate)),
            ("A <a@b> 01 +0000", Some(ZeroPaddedDate)),
            (
                "A <a@b> 99999999999999999999999 +0000",
                Some(BadDateOverflow),
            ),
            ("A <a@b> 1+0000", Some(BadDate)),
            ("A <a@b> 1 0000", Some(BadTimezone)),
            ("A <a@b> 1 +000", Some(BadTimezone)),
            ("A <a@b> 1 +00000", Some(BadTimezone)),
        ];
        for (ident, want) in cases {
            let text = format!("tree {T}\nauthor {ident}\ncommitter {IDENT}\n");
            assert_eq!(commit_id(&text), *want, "{ident:?}");
        }
    }

    #[test]
    fn tag_table() {
        use FsckId::*;
        let cases: Vec<(String, Option<FsckId>)> = vec![
            (
                format!("object {T}\ntype tree\ntag v1\ntagger {IDENT}\n\nmsg\n"),
                None,
            ),
            // no tagger: informational only in git
            (format!("object {T}\ntype commit\ntag v1\n\nmsg\n"), None),
            ("type tree\ntag v1\n\n".to_owned(), Some(MissingObject)),
            (
                format!("object {}\ntype tree\ntag v1\n\n", &T[1..]),
                Some(BadObjectSha1),
            ),
            (format!("object {T}\ntag v1\n\n"), Some(MissingTypeEntry)),
            (format!("object {T}\ntype bogus\ntag v1\n\n"), Some(BadType)),
            (format!("object {T}\ntype tree\n\n"), Some(MissingTagEntry)),
            (
                format!("object {T}\ntype tree\ntag v1\ntagger nobody\n\n"),
                Some(MissingEmail),
            ),
        ];
        for (text, want) in cases {
            let got = check_object(Kind::Tag, text.as_bytes())
                .err()
                .map(|e| e.msg_id);
            assert_eq!(got, want, "{text:?}");
        }
    }

    #[test]
    fn references_of_each_kind() {
        let t = ObjectId::from_hex(T.as_bytes()).unwrap();
        let mut out = Vec::new();
        references(
            Kind::Commit,
            format!("tree {T}\nparent {T}\nparent {T}\nauthor {IDENT}\n").as_bytes(),
            &mut out,
        );
        assert_eq!(
            out,
            vec![(t, Kind::Tree), (t, Kind::Commit), (t, Kind::Commit)]
        );
        out.clear();
        references(
            Kind::Tag,
            format!("object {T}\ntype blob\ntag x\n").as_bytes(),
            &mut out,
        );
        assert_eq!(out, vec![(t, Kind::Blob)]);
        out.clear();
        let data = tree(&[("100644", b"a"), ("160000", b"sub"), ("40000", b"z")]);
        references(Kind::Tree, &data, &mut out);
        let id = ObjectId::from_bytes_or_panic(&ID);
        assert_eq!(out, vec![(id, Kind::Blob), (id, Kind::Tree)]);
    }
}
