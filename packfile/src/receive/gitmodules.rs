//! The `.gitmodules` checks of git's fsck (`fsck_blob` and `fsck_finish`
//! in git's fsck.c, `check_submodule_name` and `check_submodule_url` in its
//! submodule-config.c): a blob some received tree names `.gitmodules` must
//! be a parsable git config file whose submodule names cannot escape
//! `.git/modules/` and whose paths, urls and update settings cannot be
//! turned into command-line options or commands on a client that clones
//! the repository (CVE-2018-11235, CVE-2018-17456, CVE-2019-19604,
//! CVE-2020-11008 and their kin).
//!
//! The blobs are checked once every object of the pack is known, wherever
//! they are: a new tree may name a blob the repository already holds.

use std::borrow::Cow;
use std::collections::BTreeSet;

use gix_config::parse::{EventRef, Events};
use gix_hash::ObjectId;
use gix_object::Kind;

use super::fsck::FsckError;
use super::{FsckId, ReceiveError};
use crate::store::PackSet;

/// Largest `.gitmodules` blob parsed. Real ones are a few KiB; the size is
/// read from the pack entry headers, so a larger blob is refused without
/// being inflated.
pub(crate) const MAX_GITMODULES_SIZE: u64 = 4 << 20;

/// Checks each blob in `marked` (named `.gitmodules` by a received tree),
/// looking in the received pack first and then in the repository.
pub(super) fn check_marked(
    marked: &BTreeSet<ObjectId>,
    new: &PackSet,
    repo: &PackSet,
) -> Result<(), ReceiveError> {
    let readers = [new.reader(), repo.reader()];
    let mut buf = Vec::new();
    for id in marked {
        let fail = |kind: Kind, e: FsckError| ReceiveError::Fsck {
            id: *id,
            kind,
            msg_id: e.msg_id,
            detail: e.detail,
        };
        let mut found = None;
        for reader in &readers {
            if let Some((kind, size)) = reader.header(id)? {
                found = Some((reader, kind, size));
                break;
            }
        }
        let Some((reader, kind, size)) = found else {
            return Err(fail(
                Kind::Blob,
                err(FsckId::GitmodulesMissing, "unable to read .gitmodules blob"),
            ));
        };
        if kind != Kind::Blob {
            return Err(fail(
                kind,
                err(FsckId::GitmodulesBlob, "non-blob found at .gitmodules"),
            ));
        }
        if size > MAX_GITMODULES_SIZE {
            return Err(fail(
                kind,
                err(FsckId::GitmodulesLarge, ".gitmodules too large to parse"),
            ));
        }
        let (_, data) = reader.get(id, &mut buf)?;
        check_blob(data).map_err(|e| fail(kind, e))?;
    }
    Ok(())
}

fn err(msg_id: FsckId, detail: impl Into<String>) -> FsckError {
    FsckError {
        msg_id,
        detail: detail.into(),
    }
}

/// Checks the contents of one `.gitmodules` blob; the first problem found
/// is returned.
pub(crate) fn check_blob(data: &[u8]) -> Result<(), FsckError> {
    let parse_error = || err(FsckId::GitmodulesParse, "could not parse gitmodules blob");
    // git reads names and values as C strings, so a NUL would cut them
    // short there but not here; no real .gitmodules holds one.
    if data.contains(&0) {
        return Err(parse_error());
    }
    // git only reports its own parse failures as information: a client
    // cannot read the file either, so nothing in it takes effect. Our
    // parser is not git's, though, and a file it cannot read might still
    // mean something to git, so refusing it is the safe side.
    let events = Events::from_bytes(data, None).map_err(|_| parse_error())?;
    for section in events.sections() {
        let EventRef::SectionHeader {
            name,
            separator,
            subsection_name,
        } = section.header()
        else {
            continue;
        };
        if !name.eq_ignore_ascii_case(b"submodule") {
            continue;
        }
        let Some(subsection) = subsection_name else {
            continue;
        };
        // git lowercases the whole legacy `[submodule.Name]` form.
        let submodule: Cow<'_, [u8]> = if separator.is_some_and(|s| *s == b"."[..]) {
            Cow::Owned(subsection.to_ascii_lowercase())
        } else {
            Cow::Borrowed(&**subsection)
        };
        for (key, value) in entries(section.body()) {
            check_entry(&submodule, &key, value.as_deref())?;
        }
    }
    Ok(())
}

/// The `(key, value)` pairs of a section body, values unquoted and
/// unescaped as git reads them; `None` is a key without `=` (git's NULL
/// value, an implicit boolean).
fn entries<'a>(body: impl Iterator<Item = EventRef<'a>>) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    let mut out = Vec::new();
    let mut key: Option<&[u8]> = None;
    let mut has_value = false;
    let mut partial: Vec<u8> = Vec::new();
    for event in body {
        let done = match event {
            EventRef::SectionValueName(k) => {
                key = Some(&**k);
                has_value = false;
                partial.clear();
                None
            }
            EventRef::KeyValueSeparator => {
                has_value = true;
                None
            }
            EventRef::ValueNotDone(v) => {
                partial.extend_from_slice(v);
                None
            }
            EventRef::Value(v) | EventRef::ValueDone(v) => {
                partial.extend_from_slice(v);
                Some(gix_config::value::normalize(&partial[..]).into_owned())
            }
            _ => None,
        };
        if let Some(value) = done {
            if let Some(k) = key.take() {
                out.push((k.to_ascii_lowercase(), has_value.then(|| value.to_vec())));
            }
            partial.clear();
        }
    }
    out
}

/// git's `fsck_gitmodules_fn` for one `submodule.<name>.<key>` entry.
fn check_entry(name: &[u8], key: &[u8], value: Option<&[u8]>) -> Result<(), FsckError> {
    let shown = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
    if !is_valid_submodule_name(name) {
        return Err(err(
            FsckId::GitmodulesName,
            format!("disallowed submodule name: {}", shown(name)),
        ));
    }
    let Some(value) = value else {
        return Ok(());
    };
    match key {
        b"url" if !is_valid_submodule_url(value) => Err(err(
            FsckId::GitmodulesUrl,
            format!("disallowed submodule url: {}", shown(value)),
        )),
        b"path" if looks_like_option(value) => Err(err(
            FsckId::GitmodulesPath,
            format!("disallowed submodule path: {}", shown(value)),
        )),
        // Only the `!command` form runs anything; git ignores other
        // unknown settings here.
        b"update" if value.first() == Some(&b'!') => Err(err(
            FsckId::GitmodulesUpdate,
            format!("disallowed submodule update setting: {}", shown(value)),
        )),
        _ => Ok(()),
    }
}

fn looks_like_option(value: &[u8]) -> bool {
    value.first() == Some(&b'-')
}

fn is_dir_sep(c: u8) -> bool {
    // Backslash too, on every platform, so the rules do not depend on
    // where the repository is later checked out.
    c == b'/' || c == b'\\'
}

/// git's `check_submodule_name`: not empty, and no `..` path component
/// (the name becomes a directory under `.git/modules/`).
fn is_valid_submodule_name(name: &[u8]) -> bool {
    if name.is_empty() {
        return false;
    }
    let dotdot_at =
        |i: usize| name[i..].starts_with(b"..") && name.get(i + 2).is_none_or(|&c| is_dir_sep(c));
    if dotdot_at(0) {
        return false;
    }
    !(0..name.len()).any(|i| is_dir_sep(name[i]) && dotdot_at(i + 1))
}

fn starts_with_dot_slash(s: &[u8]) -> bool {
    s.first() == Some(&b'.') && s.get(1).is_some_and(|&c| is_dir_sep(c))
}

fn starts_with_dot_dot_slash(s: &[u8]) -> bool {
    s.first() == Some(&b'.') && starts_with_dot_slash(&s[1..])
}

/// git's `check_submodule_url` (the `url_normalize` version of git 2.44+).
fn is_valid_submodule_url(url: &[u8]) -> bool {
    if looks_like_option(url) {
        return false;
    }
    if starts_with_dot_slash(url) || starts_with_dot_dot_slash(url) || url.starts_with(b"git://") {
        // Such a url may be appended to an http one and decoded there.
        // git decodes all but a leading `scheme:`; decoding everything is
        // stricter and never accepts what git refuses.
        if url_decode(url).contains(&b'\n') {
            return false;
        }
        // Escaping the root with `../` can rewrite the host of the url it
        // is resolved against (CVE-2020-11008).
        let mut rest = url;
        let mut dotdots = 0;
        loop {
            if starts_with_dot_dot_slash(rest) {
                dotdots += 1;
                rest = &rest[3..];
            } else if starts_with_dot_slash(rest) {
                rest = &rest[2..];
            } else {
                break;
            }
        }
        return !(dotdots > 0 && matches!(rest.first(), Some(b':' | b'/')));
    }
    if let Some(curl_url) = curl_url(url) {
        return match url_normalize(curl_url) {
            Some(normalized) => !url_decode(&normalized).contains(&b'\n'),
            None => false,
        };
    }
    true
}

/// The url git would hand to `git-remote-curl`, if it would.
fn curl_url(url: &[u8]) -> Option<&[u8]> {
    for helper in [&b"http::"[..], b"https::", b"ftp::", b"ftps::"] {
        if let Some(rest) = url.strip_prefix(helper) {
            return Some(rest);
        }
    }
    let direct = [&b"http://"[..], b"https://", b"ftp://", b"ftps://"];
    direct.iter().any(|p| url.starts_with(p)).then_some(url)
}

fn hex_val(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// The byte `%XX` stands for, if `s` starts with two hex digits.
fn hex_byte(s: &[u8]) -> Option<u8> {
    Some(hex_val(*s.first()?)? << 4 | hex_val(*s.get(1)?)?)
}

/// Percent-decoding as git's `url_decode` does it: malformed escapes and
/// `%00` are kept as they are, `+` is not a space.
fn url_decode(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            if let Some(b) = hex_byte(&s[i + 1..]).filter(|&b| b != 0) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

const URL_UNSAFE: &[u8] = b" <>\"%{}|\\^`";
const URL_RESERVED: &[u8] = b":/?#[]@!$&'()*+,;=";

fn is_scheme_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"+.-".contains(&c)
}

fn is_host_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b".-_[:]".contains(&c)
}

/// Appends `from`, decoding escapes of characters that need none and
/// escaping those that must be (git's `append_normalized_escapes`);
/// `false` on a malformed escape.
fn append_normalized(out: &mut Vec<u8>, from: &[u8], keep_escaped: &[u8]) -> bool {
    let mut i = 0;
    while i < from.len() {
        let mut c = from[i];
        i += 1;
        let mut was_escaped = false;
        if c == b'%' {
            let Some(b) = hex_byte(&from[i..]) else {
                return false;
            };
            c = b;
            i += 2;
            was_escaped = true;
        }
        if c <= 0x1f
            || c >= 0x7f
            || URL_UNSAFE.contains(&c)
            || (was_escaped && keep_escaped.contains(&c))
        {
            out.extend_from_slice(format!("%{c:02X}").as_bytes());
        } else {
            out.push(c);
        }
    }
    true
}

/// git's `url_normalize` (urlmatch.c): the normalized url, or `None` for a
/// url git refuses (bad scheme, missing host, bad port, bad escapes, `..`
/// above the root).
fn url_normalize(url: &[u8]) -> Option<Vec<u8>> {
    let scheme_len = url.iter().take_while(|&&c| is_scheme_char(c)).count();
    if scheme_len == 0
        || !url[0].is_ascii_alphabetic()
        || url.get(scheme_len..scheme_len + 3) != Some(&b"://"[..])
    {
        return None;
    }
    let mut norm = url[..scheme_len + 3].to_ascii_lowercase();
    let mut rest = &url[scheme_len + 3..];
    let end_of_authority = |s: &[u8]| s.iter().position(|c| b"/?#".contains(c)).unwrap_or(s.len());

    // user[:password]@
    let slash = end_of_authority(rest);
    if let Some(at) = rest[..slash].iter().position(|&c| c == b'@') {
        if !append_normalized(&mut norm, &rest[..at], URL_RESERVED) {
            return None;
        }
        norm.push(b'@');
        rest = &rest[at + 1..];
    }
    let slash = end_of_authority(rest);

    // host, then :port
    let has_host = !rest.first().is_some_and(|c| b":/?#".contains(c)) && !rest.is_empty();
    if !has_host && !norm.starts_with(b"file:") {
        return None;
    }
    let colon = rest[..slash]
        .iter()
        .rposition(|&c| c == b':' || c == b']')
        .filter(|&i| rest[i] == b':')
        .unwrap_or(slash);
    if !has_host && colon + 1 < slash {
        // file: urls may not have a port
        return None;
    }
    if !rest[..colon].iter().all(|&c| is_host_char(c)) {
        return None;
    }
    norm.extend(rest[..colon].to_ascii_lowercase());
    if colon < slash {
        let mut port = &rest[colon + 1..slash];
        let zeros = port.iter().take_while(|&&c| c == b'0').count();
        // Leading zeros go, but not the last digit of an all-zero port.
        port = &port[zeros.min(port.len().saturating_sub(1))..];
        let default = port.is_empty()
            || (port == b"80" && norm.starts_with(b"http:"))
            || (port == b"443" && norm.starts_with(b"https:"));
        if !default {
            if !port.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let number = if port.len() <= 5 {
                std::str::from_utf8(port).ok()?.parse::<u32>().ok()?
            } else {
                0
            };
            if number == 0 || number > 65535 {
                return None;
            }
            norm.push(b':');
            norm.extend_from_slice(port);
        }
    }
    rest = &rest[slash..];

    // The path, with `.` and `..` segments resolved.
    let path_off = norm.len();
    norm.push(b'/');
    if rest.first() == Some(&b'/') {
        rest = &rest[1..];
    }
    loop {
        let seg_off = norm.len();
        let seg_end = rest
            .iter()
            .position(|c| b"/?#".contains(c))
            .unwrap_or(rest.len());
        if !append_normalized(&mut norm, &rest[..seg_end], URL_RESERVED) {
            return None;
        }
        let mut skip_slash = false;
        if norm[seg_off..] == b"."[..] {
            if seg_off == path_off + 1 {
                norm.truncate(norm.len() - 1);
                skip_slash = true;
            } else {
                norm.truncate(norm.len() - 2);
            }
        } else if norm[seg_off..] == b".."[..] {
            // The slash before `..`; there must be a segment before it.
            let mut prev = norm.len() - 3;
            if prev == path_off {
                return None;
            }
            prev -= 1;
            while norm[prev] != b'/' {
                prev -= 1;
            }
            if prev == path_off {
                norm.truncate(prev + 1);
                skip_slash = true;
            } else {
                norm.truncate(prev);
            }
        }
        rest = &rest[seg_end..];
        if rest.first() != Some(&b'/') {
            break;
        }
        rest = &rest[1..];
        if !skip_slash {
            norm.push(b'/');
        }
    }

    // Query and fragment: escapes normalized only.
    if !rest.is_empty() && !append_normalized(&mut norm, rest, URL_RESERVED) {
        return None;
    }
    Some(norm)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn submodule_names() {
        // git's t7450 "check names", plus the attack and backslash forms.
        let cases: &[(&str, bool)] = &[
            ("valid", true),
            ("valid/with/paths", true),
            ("...", true),
            ("a..b", true),
            ("..a", true),
            ("a/..b/c", true),
            ("", false),
            ("..", false),
            ("../foo", false),
            ("/../foo", false),
            ("..\\foo", false),
            ("\\..\\foo", false),
            ("foo/..", false),
            ("foo/../", false),
            ("foo\\..", false),
            ("foo\\..\\", false),
            ("foo/../bar", false),
            ("../../../../../hooks", false),
        ];
        for (name, ok) in cases {
            assert_eq!(is_valid_submodule_name(name.as_bytes()), *ok, "{name:?}");
        }
    }

    #[test]
    fn submodule_urls() {
        // git's t7450 "check urls", plus more relative and scp-like forms.
        let cases: &[(&str, bool)] = &[
            ("./bar/baz/foo.git", true),
            ("https://example.com/foo.git", true),
            ("http://example.com:80/deeper/foo.git", true),
            (
                "https://user:pw@example.com:8443/a/./b/../c.git?x=1#y",
                true,
            ),
            ("git@host:path/repo.git", true),
            ("host:path", true),
            ("../sibling.git", true),
            ("../../a/b.git", true),
            ("./../sibling.git", true),
            ("git://example.com/repo.git", true),
            ("ssh://git@example.com/repo.git", true),
            ("/srv/git/repo.git", true),
            ("file:///srv/git/repo.git", true),
            // %2e%2e is `..` and resolved inside the path
            ("https://example.com/a/%2e%2e/b.git", true),
            // a newline in a segment `..` removes is gone after normalizing
            ("https://example.com/%0a/../b.git", true),
            ("-u./payload", false),
            ("-a./foo", false),
            ("../../..//test/foo.git", false),
            ("../../../../../:localhost:8080/foo.git", false),
            ("..\\../.\\../:example.com/foo.git", false),
            ("./../:example.com/foo.git", false),
            (".\\..\\/evil", false),
            ("./%0ahost=example.com/foo.git", false),
            ("../%0Ahost=example.com", false),
            ("git://example.com/%0a", false),
            (
                "https://one.example.com/evil?%0ahost=two.example.com",
                false,
            ),
            ("https://example.com/%0atest", false),
            ("https://example.com/a\nb", false),
            ("https:///example.com/foo.git", false),
            ("http://example.com:test/foo.git", false),
            ("http://example.com:0/foo.git", false),
            ("http://example.com:65536/foo.git", false),
            ("https://exa%6dple.com/", false),
            ("https://example.com/%zz", false),
            ("https://example.com/..", false),
            ("https::example.com/foo.git", false),
            ("http:::example.com/foo.git", false),
            ("http::https://example.com/ok.git", true),
            ("https::https:///bad.git", false),
            ("ftp://user%0a@example.com/x", false),
        ];
        for (url, ok) in cases {
            assert_eq!(is_valid_submodule_url(url.as_bytes()), *ok, "{url:?}");
        }
    }

    #[test]
    fn url_normalize_matches_git() {
        let cases: &[(&str, Option<&str>)] = &[
            ("HTTPS://Example.COM", Some("https://example.com/")),
            ("http://example.com:80/a", Some("http://example.com/a")),
            ("http://example.com:0080/a", Some("http://example.com/a")),
            ("http://example.com:00/a", None),
            ("https://example.com:/a", Some("https://example.com/a")),
            ("https://h/a/./b/../c", Some("https://h/a/c")),
            ("https://h/./a", Some("https://h/a")),
            ("https://h/a/..", Some("https://h/")),
            ("https://h/%7euser/%41%3f", Some("https://h/~user/A%3F")),
            ("https://h/a b", Some("https://h/a%20b")),
            ("https://u%3a@h/", Some("https://u%3A@h/")),
            ("file:///x", Some("file:///x")),
            ("file://:1/x", None),
            ("https://[::1]:8080/x", Some("https://[::1]:8080/x")),
            ("1http://h/", None),
        ];
        for (url, want) in cases {
            let got = url_normalize(url.as_bytes()).map(|v| String::from_utf8(v).unwrap());
            assert_eq!(got.as_deref(), *want, "{url:?}");
        }
    }

    fn blob_id(text: &str) -> Option<FsckId> {
        check_blob(text.as_bytes()).err().map(|e| e.msg_id)
    }

    #[test]
    fn gitmodules_blobs() {
        use FsckId::*;
        let cases: &[(&str, Option<FsckId>)] = &[
            ("", None),
            (
                "[submodule \"lib\"]\n\tpath = lib\n\turl = https://example.com/lib.git\n\tupdate = rebase\n",
                None,
            ),
            ("[submodule \"lib\"]\n\turl = ../lib.git\n\tbranch = .\n", None),
            // unrelated sections and keys are not looked at
            ("[core]\n\turl = -x\n[other \"..\"]\n\tpath = -y\n", None),
            ("[submodule]\n\tpath = -z\n", None),
            // key without a value: no path/url/update check, but the name is
            ("[submodule \"a\"]\n\tpath\n\turl\n\tupdate\n", None),
            ("[submodule \"..\"]\n\tactive\n", Some(GitmodulesName)),
            // a section without keys is never seen by git's callback
            ("[submodule \"..\"]\n", None),
            (
                "[submodule \"../../../../../hooks\"]\n\tpath = x\n",
                Some(GitmodulesName),
            ),
            ("[submodule \"x\"]\n\tpath = -evil\n", Some(GitmodulesPath)),
            ("[submodule \"x\"]\n\tpath = \"-evil\"\n", Some(GitmodulesPath)),
            ("[submodule \"x\"]\n\tPATH = -evil\n", Some(GitmodulesPath)),
            ("[submodule \"x\"]\n\turl = -u./payload\n", Some(GitmodulesUrl)),
            ("[SubModule \"x\"]\n\tUrl = -u./payload\n", Some(GitmodulesUrl)),
            // a line continuation does not hide the leading dash
            ("[submodule \"x\"]\n\turl = -\\\nu./payload\n", Some(GitmodulesUrl)),
            // nor does an escaped newline
            ("[submodule \"x\"]\n\turl = ./a\\nb\n", Some(GitmodulesUrl)),
            (
                "[submodule \"x\"]\n\turl = https://example.com/%0atest\n",
                Some(GitmodulesUrl),
            ),
            ("[submodule \"x\"]\n\tupdate = !rm -rf /\n", Some(GitmodulesUpdate)),
            ("[submodule \"x\"]\n\tupdate = \"!touch x\"\n", Some(GitmodulesUpdate)),
            ("[submodule \"x\"]\n\tupdate = none\n", None),
            // subsection escapes as git reads them
            ("[submodule \"\\.\\.\"]\n\tpath = x\n", Some(GitmodulesName)),
            ("[submodule \"a\\\\..\"]\n\tpath = x\n", Some(GitmodulesName)),
            // legacy dotted form: git lowercases the name
            ("[submodule...]\n\tpath = x\n", Some(GitmodulesName)),
            ("[submodule.Lib]\n\tpath = -x\n", Some(GitmodulesPath)),
            // not git-config syntax
            ("[submodule \"x\"\n\tpath = x\n", Some(GitmodulesParse)),
            ("[submodule \"x\"]\n\tpath = \"unterminated\n", Some(GitmodulesParse)),
            ("[submodule \"x\"]\n\t= x\n", Some(GitmodulesParse)),
            ("[submodule \"x\"]\n\tpath = a\\qb\n", Some(GitmodulesParse)),
            ("[submodule \"x\"]\n\tpath = a\0b\n", Some(GitmodulesParse)),
        ];
        for (text, want) in cases {
            assert_eq!(blob_id(text), *want, "{text:?}");
        }
        let e = check_blob(b"[submodule \"../../../../../hooks\"]\n\turl = ./x\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "gitmodulesName: disallowed submodule name: ../../../../../hooks"
        );
        let e = check_blob(b"[submodule \"x\"]\n\turl = -u./payload\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "gitmodulesUrl: disallowed submodule url: -u./payload"
        );
        let e = check_blob(b"[submodule \"x\"]\n\tpath = -evil\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "gitmodulesPath: disallowed submodule path: -evil"
        );
        let e = check_blob(b"[submodule \"x\"]\n\tupdate = !sh\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "gitmodulesUpdate: disallowed submodule update setting: !sh"
        );
    }
}
