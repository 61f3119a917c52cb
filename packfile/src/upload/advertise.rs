//! Ref and capability advertisements (v0/v1 ref list, v2 capability list).

use std::io::Write;

use gix_hash::ObjectId;
use gix_object::Kind;

use super::objects::peel;
use super::{UploadContext, UploadError};
use crate::pktline::PktWriter;
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
    if let (Some(name), Some(_)) = (&ctx.refs.head, head) {
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
    for r in &ctx.refs.refs {
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
