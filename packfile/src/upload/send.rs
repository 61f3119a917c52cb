//! The last step shared by v0 and v2: enumerate the objects and stream the
//! pack (on side-band when negotiated), plus error reporting to the client.

use std::io::Write;

use gix_hash::ObjectId;

use super::generate::{write_pack, PackOptions};
use super::request::FetchRequest;
use super::shallow::ShallowPlan;
use super::walk::{plan_objects, WalkInput};
use super::{UploadContext, UploadError};
use crate::pktline::{band, BandWriter, PktWriter, Sideband};
use crate::store::ObjectReader;

/// How far the response got; decides how an error can still be reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Only pkt-lines so far: an `ERR` line is understood.
    Lines,
    /// The pack has started on this side-band (or raw without one).
    Pack(Sideband),
}

/// Tells the client why we stop, where the protocol state allows it.
pub(crate) fn report_error<W: Write>(w: &mut PktWriter<W>, phase: Phase, err: &UploadError) {
    let Some(msg) = err.client_message() else {
        return;
    };
    // The connection may already be gone; the error is returned anyway.
    let _ = match phase {
        // git sends ERR lines without a trailing LF.
        Phase::Lines => w.data(format!("ERR {msg}").as_bytes()),
        Phase::Pack(Sideband::None) => Ok(()),
        Phase::Pack(sb) => w.band(band::ERROR, format!("{msg}\n").as_bytes(), sb.max_payload()),
    };
    let _ = w.flush();
}

/// Enumerates `wants ^haves` (with the shallow plan applied) and writes
/// the pack to `w`, on the side-band the request asked for.
pub(crate) fn send_pack<W: Write>(
    ctx: &UploadContext,
    reader: &ObjectReader<'_>,
    req: &FetchRequest,
    haves: &[ObjectId],
    shallow: &ShallowPlan,
    w: &mut PktWriter<W>,
    phase: &mut Phase,
) -> Result<(), UploadError> {
    let sideband = req.sideband.unwrap_or(Sideband::None);
    let mut wants = req.wants.clone();
    wants.extend(shallow.extra_wants.iter().copied());
    let mut all_haves = haves.to_vec();
    all_haves.extend(shallow.extra_haves.iter().copied());
    let input = WalkInput {
        wants: &wants,
        haves: &all_haves,
        shallow: &shallow.boundary,
        filter: req.filter,
        include_tags: req.include_tag.then_some(ctx.refs),
    };
    let plan = plan_objects(reader, &input)?;
    let opts = PackOptions {
        ofs_delta: req.ofs_delta,
        thin: req.thin_pack,
        client_lacks_blobs: req.filter.is_some(),
        client_lacks_trees: req.filter.is_some_and(|f| f.may_lack_trees()),
    };
    let progress = !req.no_progress && sideband != Sideband::None;

    *phase = Phase::Pack(sideband);
    let mut bw = BandWriter::new(w, sideband);
    if progress {
        bw.progress(&format!(
            "Enumerating objects: {}, done.\n",
            plan.objects.len()
        ))?;
    }
    let stats = write_pack(ctx.packs, &plan, &opts, &mut bw)?;
    if progress {
        bw.progress(&format!(
            "Total {} (delta {}), reused {} (delta {}), pack-reused 0\n",
            stats.objects,
            stats.reused_deltas + stats.new_deltas,
            stats.reused,
            stats.reused_deltas
        ))?;
    }
    bw.finish()?;
    if sideband != Sideband::None {
        w.flush_pkt()?;
    }
    w.flush()?;
    tracing::debug!(?stats, "upload-pack sent pack");
    Ok(())
}
