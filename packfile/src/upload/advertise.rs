//! Ref and capability advertisements (v0/v1 ref list, v2 capability list).

use std::io::Write;

use gix_hash::ObjectId;
use gix_object::Kind;

use super::objects::peel;
use super::{UploadContext, UploadError};
use crate::pktline::PktWriter;
use crate::refs::{RefRecord, RepoRefs, MAX_REF_NAME_LEN};
use crate::store::ObjectReader;

/// v0 capabilities, in git's order; `symref`, `agent` and the object format
/// are appended per repository.
const V0_CAPS: &str = "multi_ack thin-pack side-band side-band-64k ofs-delta shallow \
deepen-since deepen-not deepen-relative no-progress include-tag multi_ack_detailed \
allow-tip-sha1-in-want allow-reachable-sha1-in-want no-done";

/// The object an annotated tag ultimately points to, or `None` if `id` is
/// not a tag (or cannot be read).
pub(crate) fn peeled_tag(
    reader: &ObjectReader<'_>,
    id: &ObjectId,
) -> Result<Option<ObjectId>, UploadError> {
    if !is_tag(reader, id) {
        return Ok(None);
    }
    Ok(peel(reader, id)?.map(|(p, _)| p))
}

/// Cheap kind check from the pack entry header (tags are never deltified
/// by git, but fall back to a full read if they are).
fn is_tag(reader: &ObjectReader<'_>, id: &ObjectId) -> bool {
    let packs = reader.packs();
    let Some(loc) = packs.locate(id) else {
        return false;
    };
    match packs.bundles()[loc.pack].pack.entry(loc.offset) {
        Ok(e) if e.header.is_base() => e.header.as_kind() == Some(Kind::Tag),
        _ => matches!(reader.kind(id), Ok(Some(Kind::Tag))),
    }
}

/// The refs upload-pack advertises: names over [`MAX_REF_NAME_LEN`]
/// (stored before that cap existed) are left out, with their peeled lines.
/// No client could store such a ref as a file, and leaving them out keeps
/// every advertised line well inside a pkt-line.
pub(crate) fn advertised_refs(refs: &RepoRefs) -> impl Iterator<Item = &RefRecord> {
    refs.refs
        .iter()
        .filter(|r| r.name.len() <= MAX_REF_NAME_LEN)
}

/// HEAD's symbolic target as advertised (`symref=`, `symref-target:`,
/// `unborn`): hidden when over [`MAX_REF_NAME_LEN`], like the ref itself.
pub(crate) fn advertised_head(refs: &RepoRefs) -> Option<&str> {
    refs.head.as_deref().filter(|h| h.len() <= MAX_REF_NAME_LEN)
}

/// v0/v1 ref advertisement, as `git upload-pack --advertise-refs` prints
/// it (without the smart-HTTP `# service=` preamble). `version1` prefixes
/// the `version 1` line.
pub fn advertise_v0(
    ctx: &UploadContext,
    version1: bool,
    out: &mut impl Write,
) -> Result<(), UploadError> {
    let mut w = PktWriter::new(out);
    if version1 {
        w.text("version 1")?;
    }
    let mut caps = V0_CAPS.to_owned();
    let head = ctx.refs.head_target();
    if let (Some(name), Some(_)) = (advertised_head(ctx.refs), head) {
        caps.push_str(&format!(" symref=HEAD:{name}"));
    }
    caps.push_str(&format!(" filter object-format=sha1 agent={}", ctx.agent));

    let reader = ctx.packs.reader();
    let mut first = true;
    let line = |w: &mut PktWriter<_>,
                id: &ObjectId,
                name: &str,
                first: &mut bool|
     -> std::io::Result<()> {
        let mut text = format!("{id} {name}");
        if *first {
            text.push('\0');
            text.push_str(&caps);
            *first = false;
        }
        w.text(&text)
    };
    if let Some(h) = head {
        line(&mut w, &h, "HEAD", &mut first)?;
    }
    for r in advertised_refs(ctx.refs) {
        line(&mut w, &r.target, &r.name, &mut first)?;
        if let Some(p) = peeled_tag(&reader, &r.target)? {
            line(&mut w, &p, &format!("{}^{{}}", r.name), &mut first)?;
        }
    }
    if first {
        let null = ObjectId::null(gix_hash::Kind::Sha1);
        line(&mut w, &null, "capabilities^{}", &mut first)?;
    }
    w.flush_pkt()?;
    w.flush()?;
    Ok(())
}

/// v2 capability advertisement.
pub fn advertise_v2(ctx: &UploadContext, out: &mut impl Write) -> Result<(), UploadError> {
    let mut w = PktWriter::new(out);
    w.text("version 2")?;
    w.text(&format!("agent={}", ctx.agent))?;
    w.text("ls-refs=unborn")?;
    w.text("fetch=shallow wait-for-done filter")?;
    w.text("server-option")?;
    w.text("object-format=sha1")?;
    w.flush_pkt()?;
    w.flush()?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::Path;
    use std::process::Command;

    use super::*;
    use crate::pktline::{Pkt, PktReader, MAX_DATA_LEN};
    use crate::store::PackSet;

    fn git(dir: &Path, args: &[&str]) -> String {
        let out = Command::new("git")
            .current_dir(dir)
            .args(args)
            .env("HOME", dir)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_AUTHOR_NAME", "A")
            .env("GIT_AUTHOR_EMAIL", "a@example.com")
            .env("GIT_COMMITTER_NAME", "C")
            .env("GIT_COMMITTER_EMAIL", "c@example.com")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// One commit and an annotated tag on it, in one pack; returns the
    /// packs, the commit and the tag.
    fn repo(dir: &Path) -> (PackSet, ObjectId, ObjectId) {
        git(dir, &["init", "-q", "r"]);
        let r = dir.join("r");
        git(&r, &["commit", "-q", "--allow-empty", "-m", "one"]);
        git(&r, &["tag", "-a", "-m", "tag", "v1"]);
        git(&r, &["repack", "-a", "-d", "-q"]);
        let idx = std::fs::read_dir(r.join(".git/objects/pack"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "idx"))
            .unwrap();
        let id = |rev: &str| ObjectId::from_hex(git(&r, &["rev-parse", rev]).as_bytes()).unwrap();
        (PackSet::open(&[idx]).unwrap(), id("HEAD"), id("v1"))
    }

    fn rec(name: &str, target: ObjectId) -> RefRecord {
        RefRecord {
            name: name.to_owned(),
            target,
        }
    }

    /// Every pkt-line of `out`, asserting each one parses and fits.
    fn pkts(out: &[u8]) -> Vec<Pkt> {
        let mut r = PktReader::new(out);
        let mut v = Vec::new();
        while let Some(p) = r.read_pkt().unwrap() {
            if let Pkt::Data(d) = &p {
                assert!(d.len() <= MAX_DATA_LEN);
            }
            v.push(p);
        }
        v
    }

    fn v0(refs: &RepoRefs, packs: &PackSet) -> Vec<u8> {
        let ctx = UploadContext {
            refs,
            packs,
            agent: "cairn/test",
        };
        let mut out = Vec::new();
        advertise_v0(&ctx, false, &mut out).unwrap();
        out
    }

    fn ls_refs(refs: &RepoRefs, packs: &PackSet) -> Vec<u8> {
        let ctx = UploadContext {
            refs,
            packs,
            agent: "cairn/test",
        };
        let mut req = PktWriter::new(Vec::new());
        req.text("command=ls-refs").unwrap();
        req.delim_pkt().unwrap();
        for arg in ["peel", "symrefs", "unborn"] {
            req.text(arg).unwrap();
        }
        req.flush_pkt().unwrap();
        let req = req.into_inner();
        let mut out = Vec::new();
        crate::upload::serve_v2(&ctx, &mut &req[..], &mut out, true).unwrap();
        out
    }

    /// Names sorting before every normal ref: an annotated tag (with a
    /// peeled line) as long as a pkt-line command could carry, and a
    /// commit one byte over the cap.
    fn long_refs(commit: ObjectId, tag: ObjectId) -> Vec<RefRecord> {
        let huge = format!("refs/a/{}", "t".repeat(65_430 - 7));
        let over = format!("refs/b/{}", "c".repeat(MAX_REF_NAME_LEN + 1 - 7));
        vec![rec(&huge, tag), rec(&over, commit)]
    }

    #[test]
    fn over_long_refs_are_left_out_of_v0_and_ls_refs() {
        let tmp = tempfile::tempdir().unwrap();
        let (packs, commit, tag) = repo(tmp.path());
        let normal = vec![
            rec("refs/heads/main", commit),
            rec(
                &format!("refs/tags/{}", "v".repeat(MAX_REF_NAME_LEN - 10)),
                tag,
            ),
        ];
        let head = Some("refs/heads/main".to_owned());
        let plain = RepoRefs::new(normal.clone(), head.clone());
        let mut all = normal;
        all.extend(long_refs(commit, tag));
        let with_long = RepoRefs::new(all, head);
        assert!(with_long.refs[0].name.len() > 65_000, "sorts first");

        // Byte for byte what the same repository without them sends.
        let want = v0(&plain, &packs);
        assert_eq!(v0(&with_long, &packs), want);
        let lines = pkts(&want);
        assert_eq!(lines.len(), 5, "HEAD, main, tag, peeled tag, flush");
        let text = String::from_utf8_lossy(lines[0].text().unwrap()).into_owned();
        assert!(text.starts_with(&format!("{commit} HEAD\0")), "{text}");
        assert!(text.contains(" symref=HEAD:refs/heads/main "), "{text}");
        let peeled = lines[3].text().unwrap();
        assert!(peeled.starts_with(format!("{commit} refs/tags/vvv").as_bytes()));
        assert!(peeled.ends_with(b"^{}"));

        let want = ls_refs(&plain, &packs);
        assert_eq!(ls_refs(&with_long, &packs), want);
        let lines = pkts(&want);
        assert_eq!(lines.len(), 4, "HEAD, main, tag, flush");
        let tag_line = String::from_utf8_lossy(lines[2].text().unwrap()).into_owned();
        assert!(
            tag_line.ends_with(&format!(" peeled:{commit}")),
            "{tag_line}"
        );
    }

    #[test]
    fn over_long_head_target_is_not_advertised() {
        let tmp = tempfile::tempdir().unwrap();
        let (packs, commit, tag) = repo(tmp.path());
        let long = long_refs(commit, tag);
        // HEAD points to the over-long commit ref.
        let refs = RepoRefs::new(long.clone(), Some(long[1].name.clone()));
        let lines = pkts(&v0(&refs, &packs));
        assert_eq!(lines.len(), 2, "HEAD and flush only");
        let text = String::from_utf8_lossy(lines[0].text().unwrap()).into_owned();
        assert!(text.starts_with(&format!("{commit} HEAD\0")), "{text}");
        assert!(!text.contains("symref="), "{text}");
        assert_eq!(
            pkts(&ls_refs(&refs, &packs)),
            vec![
                Pkt::Data(format!("{commit} HEAD\n").into_bytes()),
                Pkt::Flush
            ]
        );

        // Unborn, pointing to an over-long name: nothing about HEAD.
        let unborn = RepoRefs::new(
            Vec::new(),
            Some(format!("refs/heads/{}", "u".repeat(65_000))),
        );
        assert_eq!(pkts(&ls_refs(&unborn, &packs)), vec![Pkt::Flush]);
        let unborn_ok = RepoRefs::new(Vec::new(), Some("refs/heads/main".into()));
        assert_eq!(
            pkts(&ls_refs(&unborn_ok, &packs)),
            vec![
                Pkt::Data(b"unborn HEAD symref-target:refs/heads/main\n".to_vec()),
                Pkt::Flush
            ]
        );
        // The v0 empty-repository placeholder is unchanged.
        let lines = pkts(&v0(&unborn, &packs));
        assert_eq!(lines.len(), 2);
        assert!(lines[0]
            .text()
            .unwrap()
            .starts_with(b"0000000000000000000000000000000000000000 capabilities^{}\0"));
    }
}
