//! upload-pack protocol v0/v1: want list, shallow list, have/ACK
//! negotiation (none, `multi_ack`, `multi_ack_detailed`, `no-done`), pack.
//!
//! In `stateless_rpc` mode (smart HTTP) each call handles one request
//! body: the client resends its wants and all haves each round, and the
//! server answers the round and returns unless the pack can be sent.

use std::collections::HashSet;
use std::io::{Read, Write};

use gix_hash::ObjectId;
use gix_object::Kind;

use super::advertise::peeled_tag;
use super::negotiate::{Have, Negotiation};
use super::objects::{peel, CommitCache};
use super::request::{read_v0_request, FetchRequest, MultiAck};
use super::send::{report_error, send_pack, Phase};
use super::shallow::plan_shallow;
use super::{UploadContext, UploadError};
use crate::pktline::{Pkt, PktReader, PktWriter};

/// Serves a v0/v1 upload-pack conversation after the advertisement.
pub fn serve_v0(
    ctx: &UploadContext,
    input: &mut impl Read,
    out: &mut impl Write,
    stateless_rpc: bool,
) -> Result<(), UploadError> {
    let mut rd = PktReader::new(input);
    let mut w = PktWriter::new(out);
    let mut phase = Phase::Lines;
    let res = run(ctx, &mut rd, &mut w, stateless_rpc, &mut phase);
    if let Err(e) = &res {
        report_error(&mut w, phase, e);
    }
    res
}

fn run<R: Read, W: Write>(
    ctx: &UploadContext,
    rd: &mut PktReader<R>,
    w: &mut PktWriter<W>,
    stateless: bool,
    phase: &mut Phase,
) -> Result<(), UploadError> {
    let Some(req) = read_v0_request(rd)? else {
        return Ok(());
    };
    let reader = ctx.packs.reader();
    let mut cache = CommitCache::new(&reader);
    check_wants(ctx, &mut cache, &req.wants)?;

    let shallow = plan_shallow(&mut cache, ctx.refs, &req)?;
    if shallow.send_list {
        // git writes these two without a trailing LF.
        for s in &shallow.shallow {
            w.data(format!("shallow {s}").as_bytes())?;
        }
        for s in &shallow.unshallow {
            w.data(format!("unshallow {s}").as_bytes())?;
        }
        w.flush_pkt()?;
        w.flush()?;
    }

    let mut wants = req.wants.clone();
    wants.extend(shallow.extra_wants.iter().copied());
    let mut neg = Negotiation::default();
    if !negotiate(&mut cache, &req, &wants, &mut neg, rd, w, stateless)? {
        return Ok(());
    }
    send_pack(ctx, &reader, &req, &neg.common, &shallow, w, phase)
}

/// Wants must be advertised (or peeled) tips, or commits reachable from
/// one. Other objects are accepted if we have them, like git's
/// reachability check, which only inspects commits.
fn check_wants(
    ctx: &UploadContext,
    cache: &mut CommitCache<'_>,
    wants: &[ObjectId],
) -> Result<(), UploadError> {
    let reader = cache.reader;
    let mut tips: HashSet<ObjectId> = HashSet::new();
    for r in &ctx.refs.refs {
        tips.insert(r.target);
    }
    let mut pending: Vec<ObjectId> = Vec::new();
    for w in wants {
        if !ctx.packs.contains(w) {
            return Err(UploadError::NotOurRef { id: *w });
        }
        if !tips.contains(w) && cache.get(w)?.is_some() {
            pending.push(*w);
        }
    }
    if pending.is_empty() {
        return Ok(());
    }
    let mut starts = Vec::new();
    for r in &ctx.refs.refs {
        if let Some(p) = peeled_tag(reader, &r.target)? {
            tips.insert(p);
        }
        if let Some((c, Kind::Commit)) = peel(reader, &r.target)? {
            starts.push(c);
        }
    }
    pending.retain(|p| !tips.contains(p));
    let mut missing: HashSet<ObjectId> = pending.iter().copied().collect();
    let mut seen: HashSet<ObjectId> = starts.iter().copied().collect();
    let mut stack = starts;
    while let Some(id) = stack.pop() {
        if missing.is_empty() {
            break;
        }
        missing.remove(&id);
        let Some(c) = cache.get(&id)? else { continue };
        for p in c.parents.clone() {
            if seen.insert(p) {
                stack.push(p);
            }
        }
    }
    match pending.into_iter().find(|p| missing.contains(p)) {
        Some(id) => Err(UploadError::NotOurRef { id }),
        None => Ok(()),
    }
}

/// git's `get_common_commits`. Returns true when the pack is to be sent,
/// false when this call ends without one (stateless round, client hung up).
fn negotiate<R: Read, W: Write>(
    cache: &mut CommitCache<'_>,
    req: &FetchRequest,
    wants: &[ObjectId],
    neg: &mut Negotiation,
    rd: &mut PktReader<R>,
    w: &mut PktWriter<W>,
    stateless: bool,
) -> Result<bool, UploadError> {
    let mut got_common = false;
    let mut got_other = false;
    let mut sent_ready = false;
    let mut last: Option<ObjectId> = None;
    let last_hex = |last: &Option<ObjectId>| last.map(|l| l.to_string()).unwrap_or_default();
    loop {
        let pkt = match rd.read_pkt()? {
            // The client went away (or a stateless request had no more lines).
            None => return Ok(false),
            Some(p) => p,
        };
        let line = match &pkt {
            Pkt::Flush => {
                if req.multi_ack == MultiAck::Detailed
                    && got_common
                    && !got_other
                    && neg.ok_to_give_up(cache, wants)?
                {
                    sent_ready = true;
                    w.text(&format!("ACK {} ready", last_hex(&last)))?;
                }
                if neg.common.is_empty() || req.multi_ack != MultiAck::None {
                    w.text("NAK")?;
                }
                if req.no_done && sent_ready {
                    w.text(&format!("ACK {}", last_hex(&last)))?;
                    w.flush()?;
                    return Ok(true);
                }
                w.flush()?;
                if stateless {
                    return Ok(false);
                }
                got_common = false;
                got_other = false;
                continue;
            }
            Pkt::Data(_) => std::str::from_utf8(pkt.text().unwrap_or_default())
                .map_err(|_| UploadError::protocol("have list is not valid UTF-8"))?,
            other => {
                return Err(UploadError::protocol(format!(
                    "unexpected {other:?} in have list"
                )))
            }
        };
        if let Some(rest) = line.strip_prefix("have ") {
            let id = FetchRequest::parse_oid(rest, "have")?;
            match neg.got_have(cache, id)? {
                Have::Unknown => {
                    got_other = true;
                    if req.multi_ack != MultiAck::None && neg.ok_to_give_up(cache, wants)? {
                        if req.multi_ack == MultiAck::Detailed {
                            sent_ready = true;
                            w.text(&format!("ACK {id} ready"))?;
                        } else {
                            w.text(&format!("ACK {id} continue"))?;
                        }
                    }
                }
                Have::Common { .. } => {
                    got_common = true;
                    last = Some(id);
                    match req.multi_ack {
                        MultiAck::Detailed => w.text(&format!("ACK {id} common"))?,
                        MultiAck::Plain => w.text(&format!("ACK {id} continue"))?,
                        MultiAck::None if neg.common.len() == 1 => w.text(&format!("ACK {id}"))?,
                        MultiAck::None => {}
                    }
                }
            }
            continue;
        }
        if line == "done" {
            if neg.common.is_empty() {
                w.text("NAK")?;
            } else if req.multi_ack != MultiAck::None {
                w.text(&format!("ACK {}", last_hex(&last)))?;
            }
            w.flush()?;
            return Ok(true);
        }
        return Err(UploadError::protocol(format!(
            "expected SHA1 list, got '{line}'"
        )));
    }
}
