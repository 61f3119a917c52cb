//! Protocol v2 commands: `ls-refs` and `fetch` (acknowledgments, shallow-info
//! and packfile sections). v2 is stateless by design: every fetch request
//! carries all wants and all haves the client still cares about.

use std::io::{Read, Write};

use gix_hash::ObjectId;

use super::advertise::{advertised_head, advertised_refs, peeled_tag};
use super::negotiate::{Have, Negotiation};
use super::objects::CommitCache;
use super::request::FetchRequest;
use super::send::{report_error, send_pack, Phase};
use super::shallow::plan_shallow;
use super::{UploadContext, UploadError};
use crate::pktline::{Pkt, PktReader, PktWriter, Sideband};

/// More prefixes than this and git ignores them all (sends every ref).
const TOO_MANY_PREFIXES: usize = 65536;

/// Serves v2 commands. With `stateless_rpc` exactly one command is handled;
/// otherwise commands are served until end of input or a flush where a
/// command should start.
pub fn serve_v2(
    ctx: &UploadContext,
    input: &mut impl Read,
    out: &mut impl Write,
    stateless_rpc: bool,
) -> Result<(), UploadError> {
    let mut rd = PktReader::new(input);
    let mut w = PktWriter::new(out);
    loop {
        let mut phase = Phase::Lines;
        match one_command(ctx, &mut rd, &mut w, &mut phase) {
            Ok(true) if !stateless_rpc => continue,
            Ok(_) => return Ok(()),
            Err(e) => {
                report_error(&mut w, phase, &e);
                return Err(e);
            }
        }
    }
}

fn text_line(pkt: &Pkt) -> Result<&str, UploadError> {
    std::str::from_utf8(pkt.text().unwrap_or_default())
        .map_err(|_| UploadError::protocol("request line is not valid UTF-8"))
}

/// Reads and runs one command; false at the end of the session.
fn one_command<R: Read, W: Write>(
    ctx: &UploadContext,
    rd: &mut PktReader<R>,
    w: &mut PktWriter<W>,
    phase: &mut Phase,
) -> Result<bool, UploadError> {
    let mut command: Option<String> = None;
    let mut seen_any = false;
    let has_args = loop {
        let Some(pkt) = rd.read_pkt()? else {
            if seen_any {
                return Err(UploadError::protocol("unexpected end of request"));
            }
            return Ok(false);
        };
        match &pkt {
            Pkt::Flush if !seen_any => return Ok(false),
            Pkt::Flush => break false,
            Pkt::Delim => break true,
            Pkt::ResponseEnd => {
                return Err(UploadError::protocol("unexpected response-end packet"))
            }
            Pkt::Data(_) => {}
        }
        seen_any = true;
        let line = text_line(&pkt)?;
        if let Some(c) = line.strip_prefix("command=") {
            if let Some(prev) = &command {
                return Err(UploadError::protocol(format!(
                    "command '{c}' requested after already requesting command '{prev}'"
                )));
            }
            if c != "ls-refs" && c != "fetch" {
                return Err(UploadError::protocol(format!("invalid command '{c}'")));
            }
            command = Some(c.to_owned());
        } else if let Some(fmt) = line.strip_prefix("object-format=") {
            if fmt != "sha1" {
                return Err(UploadError::protocol(format!(
                    "mismatched object format: server sha1; client {fmt}"
                )));
            }
        } else if !(line.starts_with("agent=")
            || line.starts_with("server-option=")
            || line.starts_with("session-id="))
        {
            return Err(UploadError::protocol(format!(
                "unknown capability '{line}'"
            )));
        }
    };
    let command = command.ok_or_else(|| UploadError::protocol("no command requested"))?;
    let mut args = Vec::new();
    if has_args {
        loop {
            let pkt = rd.expect_pkt()?;
            match &pkt {
                Pkt::Flush => break,
                Pkt::Data(_) => args.push(text_line(&pkt)?.to_owned()),
                other => {
                    return Err(UploadError::protocol(format!(
                        "unexpected {other:?} in {command} arguments"
                    )))
                }
            }
        }
    }
    match command.as_str() {
        "ls-refs" => ls_refs(ctx, &args, w)?,
        _ => fetch(ctx, &args, w, phase)?,
    }
    Ok(true)
}

fn ls_refs<W: Write>(
    ctx: &UploadContext,
    args: &[String],
    w: &mut PktWriter<W>,
) -> Result<(), UploadError> {
    let (mut symrefs, mut peel, mut unborn) = (false, false, false);
    let mut prefixes: Vec<&str> = Vec::new();
    for a in args {
        match a.as_str() {
            "symrefs" => symrefs = true,
            "peel" => peel = true,
            "unborn" => unborn = true,
            other => match other.strip_prefix("ref-prefix ") {
                Some(p) => prefixes.push(p),
                None => return Err(UploadError::protocol(format!("unexpected line: '{other}'"))),
            },
        }
    }
    if prefixes.len() > TOO_MANY_PREFIXES {
        prefixes.clear();
    }
    let wanted = |name: &str| prefixes.is_empty() || prefixes.iter().any(|p| name.starts_with(p));
    let reader = ctx.packs.reader();

    if wanted("HEAD") {
        let head = advertised_head(ctx.refs);
        let target = if symrefs {
            head.map(|h| format!(" symref-target:{h}"))
                .unwrap_or_default()
        } else {
            String::new()
        };
        match ctx.refs.head_target() {
            Some(id) => {
                let mut line = format!("{id} HEAD{target}");
                if peel {
                    if let Some(p) = peeled_tag(&reader, &id)? {
                        line.push_str(&format!(" peeled:{p}"));
                    }
                }
                w.text(&line)?;
            }
            // An over-long target is not advertised at all, so neither is
            // the unborn HEAD pointing to it.
            None if unborn && head.is_some() => w.text(&format!("unborn HEAD{target}"))?,
            None => {}
        }
    }
    for r in advertised_refs(ctx.refs).filter(|r| wanted(&r.name)) {
        let mut line = format!("{} {}", r.target, r.name);
        if peel {
            if let Some(p) = peeled_tag(&reader, &r.target)? {
                line.push_str(&format!(" peeled:{p}"));
            }
        }
        w.text(&line)?;
    }
    w.flush_pkt()?;
    w.flush()?;
    Ok(())
}

fn parse_fetch_args(args: &[String]) -> Result<FetchRequest, UploadError> {
    let mut req = FetchRequest {
        sideband: Some(Sideband::Band64k),
        ..FetchRequest::default()
    };
    for line in args {
        let line = line.as_str();
        if let Some(rest) = line.strip_prefix("want ") {
            let id = FetchRequest::parse_oid(rest, "want")?;
            if !req.wants.contains(&id) {
                req.wants.push(id);
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("have ") {
            req.haves.push(FetchRequest::parse_oid(rest, "have")?);
            req.seen_haves = true;
            continue;
        }
        match line {
            "done" => req.done = true,
            "thin-pack" => req.thin_pack = true,
            "ofs-delta" => req.ofs_delta = true,
            "no-progress" => req.no_progress = true,
            "include-tag" => req.include_tag = true,
            "wait-for-done" => req.wait_for_done = true,
            "deepen-relative" => req.deepen_relative = true,
            _ => {
                if !req.parse_common_line(line)? {
                    return Err(UploadError::protocol(format!("unexpected line: '{line}'")));
                }
            }
        }
    }
    Ok(req)
}

fn fetch<W: Write>(
    ctx: &UploadContext,
    args: &[String],
    w: &mut PktWriter<W>,
    phase: &mut Phase,
) -> Result<(), UploadError> {
    let req = parse_fetch_args(args)?;
    if req.wants.is_empty() && !req.wait_for_done {
        return Ok(());
    }
    // v2 lets clients want any object we have (partial clones rely on it).
    if let Some(id) = req.wants.iter().find(|id| !ctx.packs.contains(id)) {
        return Err(UploadError::NotOurRef { id: *id });
    }
    let reader = ctx.packs.reader();
    let mut cache = CommitCache::new(&reader);
    let shallow = plan_shallow(&mut cache, ctx.refs, &req)?;
    let mut wants = req.wants.clone();
    wants.extend(shallow.extra_wants.iter().copied());

    let mut neg = Negotiation::default();
    let mut acks: Vec<ObjectId> = Vec::new();
    for h in &req.haves {
        if let Have::Common { .. } = neg.got_have(&mut cache, *h)? {
            acks.push(*h);
        }
    }
    if req.seen_haves && !req.done {
        w.text("acknowledgments")?;
        if acks.is_empty() {
            w.text("NAK")?;
        }
        for a in &acks {
            w.text(&format!("ACK {a}"))?;
        }
        if req.wait_for_done || !neg.ok_to_give_up(&mut cache, &wants)? {
            w.flush_pkt()?;
            w.flush()?;
            return Ok(());
        }
        w.text("ready")?;
        w.delim_pkt()?;
    }
    if req.wants.is_empty() {
        // wait-for-done without wants: nothing to send.
        w.flush_pkt()?;
        w.flush()?;
        return Ok(());
    }
    if shallow.send_list || !req.client_shallows.is_empty() {
        w.text("shallow-info")?;
        for s in &shallow.shallow {
            w.data(format!("shallow {s}").as_bytes())?;
        }
        for s in &shallow.unshallow {
            w.data(format!("unshallow {s}").as_bytes())?;
        }
        w.delim_pkt()?;
    }
    w.text("packfile")?;
    send_pack(ctx, &reader, &req, &neg.common, &shallow, w, phase)
}
