//! The client's fetch request (wants, capabilities, shallow and deepen
//! options, filter) as parsed from v0 want lists and v2 fetch arguments.

use std::io::Read;

use gix_hash::ObjectId;

use super::filter::Filter;
use super::UploadError;
use crate::pktline::{Pkt, PktReader, Sideband};

/// `deepen 2147483647`, which git sends for `--unshallow`.
pub(crate) const INFINITE_DEPTH: u32 = 0x7fff_ffff;

/// Which acknowledgement style the v0 client negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum MultiAck {
    #[default]
    None,
    Plain,
    Detailed,
}

/// Everything a fetch asks for, independent of protocol version.
#[derive(Debug, Default)]
pub(crate) struct FetchRequest {
    pub wants: Vec<ObjectId>,
    /// v2 only: the haves of this request (v0 reads haves during negotiation).
    pub haves: Vec<ObjectId>,
    pub seen_haves: bool,
    pub done: bool,
    pub client_shallows: Vec<ObjectId>,
    /// 0 when no `deepen <n>` was sent.
    pub depth: u32,
    pub deepen_since: Option<i64>,
    pub deepen_not: Vec<String>,
    pub deepen_relative: bool,
    pub filter: Option<Filter>,
    pub thin_pack: bool,
    pub ofs_delta: bool,
    pub no_progress: bool,
    pub include_tag: bool,
    pub sideband: Option<Sideband>,
    pub multi_ack: MultiAck,
    pub no_done: bool,
    pub wait_for_done: bool,
    pub agent: Option<String>,
}

impl FetchRequest {
    /// Parses the `<hex>` of a `want`/`have`/`shallow` line.
    pub fn parse_oid(line: &str, what: &str) -> Result<ObjectId, UploadError> {
        let hex = line.get(..40).unwrap_or(line);
        if hex.len() != 40 || line.len() > 40 && !line[40..].starts_with(' ') {
            return Err(UploadError::protocol(format!(
                "expected an object id after '{what}', got '{line}'"
            )));
        }
        ObjectId::from_hex(hex.as_bytes()).map_err(|_| {
            UploadError::protocol(format!(
                "expected an object id after '{what}', got '{line}'"
            ))
        })
    }

    /// Applies the shallow/deepen/filter argument lines common to v0 and v2.
    /// Returns false if `line` is none of them.
    pub fn parse_common_line(&mut self, line: &str) -> Result<bool, UploadError> {
        if let Some(rest) = line.strip_prefix("shallow ") {
            self.client_shallows.push(Self::parse_oid(rest, "shallow")?);
        } else if let Some(rest) = line.strip_prefix("deepen ") {
            let depth: i64 = rest
                .parse()
                .map_err(|_| UploadError::protocol(format!("invalid deepen: {rest}")))?;
            if depth <= 0 {
                return Err(UploadError::protocol(format!("invalid deepen: {rest}")));
            }
            self.depth = depth.min(i64::from(INFINITE_DEPTH)) as u32;
        } else if let Some(rest) = line.strip_prefix("deepen-since ") {
            let ts: i64 = rest
                .parse()
                .map_err(|_| UploadError::protocol(format!("invalid deepen-since: {line}")))?;
            self.deepen_since = Some(ts);
        } else if let Some(rest) = line.strip_prefix("deepen-not ") {
            self.deepen_not.push(rest.to_owned());
        } else if let Some(rest) = line.strip_prefix("filter ") {
            let f = Filter::parse(rest).map_err(|e| UploadError::protocol(e.to_string()))?;
            self.filter = Some(f);
        } else {
            return Ok(false);
        }
        Ok(true)
    }

    fn apply_v0_capability(&mut self, cap: &str) {
        match cap {
            "multi_ack" if self.multi_ack == MultiAck::None => self.multi_ack = MultiAck::Plain,
            "multi_ack_detailed" => self.multi_ack = MultiAck::Detailed,
            "no-done" => self.no_done = true,
            "thin-pack" => self.thin_pack = true,
            "ofs-delta" => self.ofs_delta = true,
            "no-progress" => self.no_progress = true,
            "include-tag" => self.include_tag = true,
            "deepen-relative" => self.deepen_relative = true,
            "side-band-64k" => self.sideband = Some(Sideband::Band64k),
            "side-band" if self.sideband.is_none() => self.sideband = Some(Sideband::Band),
            other => {
                if let Some(agent) = other.strip_prefix("agent=") {
                    self.agent = Some(agent.to_owned());
                }
                // Unknown capabilities are ignored, as git does.
            }
        }
    }
}

/// Reads the v0 want list up to its flush. `Ok(None)` if the client hung
/// up or sent only a flush (nothing wanted, e.g. `ls-remote`).
pub(crate) fn read_v0_request<R: Read>(
    rd: &mut PktReader<R>,
) -> Result<Option<FetchRequest>, UploadError> {
    let mut req = FetchRequest::default();
    let mut first = true;
    loop {
        let pkt = match rd.read_pkt()? {
            None if first => return Ok(None),
            None => return Err(UploadError::protocol("unexpected end of want list")),
            Some(p) => p,
        };
        first = false;
        let data = match &pkt {
            Pkt::Flush => break,
            Pkt::Data(_) => pkt.text().unwrap_or_default(),
            other => {
                return Err(UploadError::protocol(format!(
                    "unexpected {other:?} in want list"
                )))
            }
        };
        let line = std::str::from_utf8(data)
            .map_err(|_| UploadError::protocol("want list is not valid UTF-8"))?;
        if let Some(rest) = line.strip_prefix("want ") {
            let id = FetchRequest::parse_oid(rest, "want")?;
            if let Some(caps) = rest.get(41..) {
                for cap in caps.split(' ').filter(|c| !c.is_empty()) {
                    req.apply_v0_capability(cap);
                }
            }
            if !req.wants.contains(&id) {
                req.wants.push(id);
            }
        } else if !req.parse_common_line(line)? {
            return Err(UploadError::protocol(format!(
                "expected want list, got '{line}'"
            )));
        }
    }
    if req.wants.is_empty() {
        return Ok(None);
    }
    Ok(Some(req))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pktline::PktWriter;

    fn pkts(lines: &[&str]) -> Vec<u8> {
        let mut w = PktWriter::new(Vec::new());
        for l in lines {
            if *l == "0000" {
                w.flush_pkt().expect("vec");
            } else {
                w.text(l).expect("vec");
            }
        }
        w.into_inner()
    }

    #[test]
    fn parses_want_list_with_caps() {
        let a = "1111111111111111111111111111111111111111";
        let b = "2222222222222222222222222222222222222222";
        let bytes = pkts(&[
            &format!(
                "want {a} multi_ack_detailed side-band-64k thin-pack ofs-delta agent=git/2.47"
            ),
            &format!("want {b}"),
            &format!("shallow {b}"),
            "deepen 3",
            "filter blob:limit=1k",
            "0000",
        ]);
        let mut rd = PktReader::new(&bytes[..]);
        let req = read_v0_request(&mut rd).expect("ok").expect("wants");
        assert_eq!(req.wants.len(), 2);
        assert_eq!(req.multi_ack, MultiAck::Detailed);
        assert_eq!(req.sideband, Some(Sideband::Band64k));
        assert!(req.thin_pack && req.ofs_delta && !req.no_done);
        assert_eq!(req.depth, 3);
        assert_eq!(req.client_shallows.len(), 1);
        assert_eq!(req.filter, Some(Filter::BlobLimit(1024)));
        assert_eq!(req.agent.as_deref(), Some("git/2.47"));
    }

    #[test]
    fn rejects_garbage() {
        for lines in [
            vec!["want nothex", "0000"],
            vec!["hello", "0000"],
            vec!["deepen 0", "0000"],
            vec![
                "want 1111111111111111111111111111111111111111",
                "filter sparse:oid=x",
                "0000",
            ],
        ] {
            let bytes = pkts(&lines);
            let mut rd = PktReader::new(&bytes[..]);
            assert!(read_v0_request(&mut rd).is_err(), "{lines:?}");
        }
        let mut rd = PktReader::new(&b"0000"[..]);
        assert!(read_v0_request(&mut rd).expect("ok").is_none());
    }
}
