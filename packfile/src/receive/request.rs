//! Parsing of the client's half of a v0 push before the pack: the command
//! list (capabilities after a NUL on the first line) and, when negotiated,
//! the push options.

use std::io::Read;

use gix_hash::ObjectId;

use super::{Limits, ReceiveError};
use crate::pktline::{Pkt, PktReader, Sideband};

/// One ref update: `old` is what the client believes the ref holds (null:
/// the ref must not exist), `new` what it should hold (null: delete).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub old: ObjectId,
    pub new: ObjectId,
    pub name: String,
}

impl Command {
    pub fn is_create(&self) -> bool {
        self.old.is_null() && !self.new.is_null()
    }

    pub fn is_delete(&self) -> bool {
        self.new.is_null()
    }
}

/// The capabilities the client asked for on its first command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiveCaps {
    pub report_status: bool,
    pub report_status_v2: bool,
    pub side_band: Sideband,
    pub atomic: bool,
    pub quiet: bool,
    pub push_options: bool,
    pub ofs_delta: bool,
    pub delete_refs: bool,
    pub agent: Option<String>,
    pub session_id: Option<String>,
    /// Anything else the client sent, kept for logging; git ignores unknown
    /// capabilities too.
    pub other: Vec<String>,
}

impl Default for ReceiveCaps {
    fn default() -> Self {
        ReceiveCaps {
            report_status: false,
            report_status_v2: false,
            side_band: Sideband::None,
            atomic: false,
            quiet: false,
            push_options: false,
            ofs_delta: false,
            delete_refs: false,
            agent: None,
            session_id: None,
            other: Vec::new(),
        }
    }
}

impl ReceiveCaps {
    /// Parses the space-separated list after the NUL of the first command.
    pub fn parse(list: &str) -> Result<Self, ReceiveError> {
        let mut caps = ReceiveCaps::default();
        for word in list.split_ascii_whitespace() {
            match word {
                "report-status" => caps.report_status = true,
                "report-status-v2" => caps.report_status_v2 = true,
                "side-band-64k" => caps.side_band = Sideband::Band64k,
                // Not advertised, but honoured if a client asks anyway,
                // unless it also asked for the 64k flavour.
                "side-band" if caps.side_band == Sideband::None => caps.side_band = Sideband::Band,
                "side-band" => {}
                "atomic" => caps.atomic = true,
                "quiet" => caps.quiet = true,
                "push-options" => caps.push_options = true,
                "ofs-delta" => caps.ofs_delta = true,
                "delete-refs" => caps.delete_refs = true,
                _ => {
                    if let Some(agent) = word.strip_prefix("agent=") {
                        caps.agent = Some(agent.to_owned());
                    } else if let Some(id) = word.strip_prefix("session-id=") {
                        caps.session_id = Some(id.to_owned());
                    } else if let Some(format) = word.strip_prefix("object-format=") {
                        if format != "sha1" {
                            return Err(ReceiveError::UnsupportedObjectFormat {
                                format: format.to_owned(),
                            });
                        }
                    } else {
                        caps.other.push(word.to_owned());
                    }
                }
            }
        }
        Ok(caps)
    }
}

/// Everything the client sent before the pack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushRequest {
    pub commands: Vec<Command>,
    pub caps: ReceiveCaps,
    pub push_options: Vec<String>,
}

impl PushRequest {
    /// True if any command creates or updates a ref: git's client sends a
    /// pack (possibly empty) exactly then, and none for pure deletions.
    pub fn expects_pack(&self) -> bool {
        self.commands.iter().any(|c| !c.new.is_null())
    }
}

/// Reads the command list, and the push options if the client negotiated
/// them. `Ok(None)` when the client sent only a flush (or hung up before
/// sending anything): there is nothing to do and no pack follows.
pub fn read_request<R: Read>(
    input: &mut PktReader<R>,
    limits: &Limits,
) -> Result<Option<PushRequest>, ReceiveError> {
    let mut commands = Vec::new();
    let mut caps: Option<ReceiveCaps> = None;
    loop {
        let pkt = match input.read_pkt()? {
            None if commands.is_empty() && caps.is_none() => return Ok(None),
            None => return Err(ReceiveError::UnexpectedEof),
            Some(p) => p,
        };
        let line = match &pkt {
            Pkt::Flush if commands.is_empty() => return Ok(None),
            Pkt::Flush => break,
            Pkt::Delim => return Err(ReceiveError::UnexpectedPacket { found: "delim" }),
            Pkt::ResponseEnd => {
                return Err(ReceiveError::UnexpectedPacket {
                    found: "response-end",
                })
            }
            Pkt::Data(_) => pkt.text().unwrap_or_default(),
        };
        if commands.is_empty() {
            if line.starts_with(b"shallow ") {
                return Err(ReceiveError::ShallowUnsupported);
            }
            if line.starts_with(b"push-cert") {
                return Err(ReceiveError::PushCertUnsupported);
            }
        }
        if commands.len() >= limits.max_commands {
            return Err(ReceiveError::TooManyCommands {
                limit: limits.max_commands,
            });
        }
        let (cmd_part, cap_part) = match line.iter().position(|&b| b == 0) {
            Some(nul) => (&line[..nul], Some(&line[nul + 1..])),
            None => (line, None),
        };
        if caps.is_none() {
            // Old clients may send no capabilities at all; git accepts that.
            let list = std::str::from_utf8(cap_part.unwrap_or_default()).map_err(|_| {
                ReceiveError::MalformedCommand {
                    line: String::from_utf8_lossy(line).into_owned(),
                }
            })?;
            caps = Some(ReceiveCaps::parse(list)?);
        } else if cap_part.is_some() {
            // Capabilities are only allowed on the first line.
            return Err(malformed(line));
        }
        commands.push(parse_command(cmd_part).ok_or_else(|| malformed(line))??);
    }

    let caps = caps.unwrap_or_default();
    let mut push_options = Vec::new();
    if caps.push_options {
        loop {
            match input.read_pkt()? {
                None => return Err(ReceiveError::UnexpectedEof),
                Some(Pkt::Flush) => break,
                Some(Pkt::Data(d)) => {
                    if push_options.len() >= limits.max_push_options {
                        return Err(ReceiveError::TooManyPushOptions {
                            limit: limits.max_push_options,
                        });
                    }
                    let text = d.strip_suffix(b"\n").unwrap_or(&d);
                    if text.len() > limits.max_push_option_bytes {
                        return Err(ReceiveError::PushOptionTooLong {
                            limit: limits.max_push_option_bytes,
                        });
                    }
                    let option = String::from_utf8(text.to_vec())
                        .map_err(|_| ReceiveError::NonUtf8PushOption)?;
                    push_options.push(option);
                }
                Some(Pkt::Delim) => return Err(ReceiveError::UnexpectedPacket { found: "delim" }),
                Some(Pkt::ResponseEnd) => {
                    return Err(ReceiveError::UnexpectedPacket {
                        found: "response-end",
                    })
                }
            }
        }
    }
    Ok(Some(PushRequest {
        commands,
        caps,
        push_options,
    }))
}

fn malformed(line: &[u8]) -> ReceiveError {
    ReceiveError::MalformedCommand {
        line: String::from_utf8_lossy(line).into_owned(),
    }
}

/// `<old-hex> SP <new-hex> SP <name>`; `None` when the shape is wrong, an
/// inner error when a field is invalid.
fn parse_command(line: &[u8]) -> Option<Result<Command, ReceiveError>> {
    const HEX: usize = 40;
    if line.len() < 2 * HEX + 3 || line[HEX] != b' ' || line[2 * HEX + 1] != b' ' {
        return None;
    }
    let name = &line[2 * HEX + 2..];
    if name.is_empty() {
        return None;
    }
    Some((|| {
        let old = parse_hex(&line[..HEX])?;
        let new = parse_hex(&line[HEX + 1..2 * HEX + 1])?;
        let name = std::str::from_utf8(name)
            .map_err(|_| ReceiveError::NonUtf8RefName)?
            .to_owned();
        Ok(Command { old, new, name })
    })())
}

fn parse_hex(hex: &[u8]) -> Result<ObjectId, ReceiveError> {
    let bad = || ReceiveError::BadObjectId {
        hex: String::from_utf8_lossy(hex).into_owned(),
    };
    if !hex.iter().all(u8::is_ascii_hexdigit) {
        return Err(bad());
    }
    ObjectId::from_hex(hex).map_err(|_| bad())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::pktline::{PktError, PktWriter};

    const A: &str = "1111111111111111111111111111111111111111";
    const B: &str = "2222222222222222222222222222222222222222";
    const Z: &str = "0000000000000000000000000000000000000000";

    fn pkts(lines: &[&[u8]]) -> Vec<u8> {
        let mut w = PktWriter::new(Vec::new());
        for l in lines {
            if l.is_empty() {
                w.flush_pkt().unwrap();
            } else {
                w.data(l).unwrap();
            }
        }
        w.into_inner()
    }

    fn parse(bytes: &[u8]) -> Result<Option<PushRequest>, ReceiveError> {
        read_request(&mut PktReader::new(bytes), &Limits::default())
    }

    fn oid(hex: &str) -> ObjectId {
        ObjectId::from_hex(hex.as_bytes()).unwrap()
    }

    #[test]
    fn parses_commands_caps_and_options() {
        let first = format!(
            "{Z} {A} refs/heads/main\0 report-status report-status-v2 side-band-64k quiet atomic push-options ofs-delta agent=git/2.47 object-format=sha1 x-unknown"
        );
        let second = format!("{A} {B} refs/heads/dev\n");
        let third = format!("{B} {Z} refs/tags/old");
        let mut bytes = pkts(&[
            first.as_bytes(),
            second.as_bytes(),
            third.as_bytes(),
            b"",
            b"ci.skip",
            b"reviewer=alice\n",
            b"",
        ]);
        bytes.extend_from_slice(b"PACK...");
        let mut r = PktReader::new(&bytes[..]);
        let req = read_request(&mut r, &Limits::default()).unwrap().unwrap();
        assert_eq!(req.commands.len(), 3);
        assert_eq!(req.commands[0].old, oid(Z));
        assert_eq!(req.commands[0].new, oid(A));
        assert_eq!(req.commands[0].name, "refs/heads/main");
        assert_eq!(req.commands[1].name, "refs/heads/dev");
        assert!(req.commands[2].is_delete());
        assert!(req.commands[0].is_create());
        let c = &req.caps;
        assert!(c.report_status && c.report_status_v2 && c.atomic && c.quiet);
        assert!(c.push_options && c.ofs_delta && !c.delete_refs);
        assert_eq!(c.side_band, Sideband::Band64k);
        assert_eq!(c.agent.as_deref(), Some("git/2.47"));
        assert_eq!(c.other, vec!["x-unknown".to_owned()]);
        assert_eq!(req.push_options, vec!["ci.skip", "reviewer=alice"]);
        assert!(req.expects_pack());
        // The reader stops exactly before the pack bytes.
        let mut rest = Vec::new();
        r.inner_mut().read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"PACK...");
    }

    #[test]
    fn flush_only_or_hangup_means_nothing_to_do() {
        assert!(parse(b"0000").unwrap().is_none());
        assert!(parse(b"").unwrap().is_none());
    }

    #[test]
    fn first_line_without_caps_is_accepted() {
        let line = format!("{A} {Z} refs/heads/gone");
        let req = parse(&pkts(&[line.as_bytes(), b""])).unwrap().unwrap();
        assert_eq!(req.caps, ReceiveCaps::default());
        assert!(!req.expects_pack());
    }

    #[test]
    fn rejects_malformed_transcripts() {
        let good = format!("{Z} {A} refs/heads/main\0report-status");
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"zzzz".to_vec(), "protocol error"),
            (b"0003".to_vec(), "protocol error"),
            (b"0010short-line".to_vec(), "protocol error"),
            (pkts(&[b"hello world", b""]), "malformed command"),
            (
                pkts(&[format!("{Z} {A}refs/heads/x").as_bytes(), b""]),
                "malformed command",
            ),
            (
                pkts(&[format!("{Z} {A} ").as_bytes(), b""]),
                "malformed command",
            ),
            (
                pkts(&[
                    format!("{} {A} refs/heads/x", "g".repeat(40)).as_bytes(),
                    b"",
                ]),
                "invalid object id",
            ),
            (
                pkts(&[format!("{Z} {} refs/heads/x", &A[..39]).as_bytes(), b""]),
                "malformed command",
            ),
            (
                pkts(&[
                    good.as_bytes(),
                    format!("{A} {B} refs/heads/y\0atomic").as_bytes(),
                    b"",
                ]),
                "malformed command",
            ),
            (pkts(&[good.as_bytes()]), "input ended"),
            (
                pkts(&[format!("shallow {A}").as_bytes(), b""]),
                "shallow pushes",
            ),
            (
                pkts(&[
                    format!("{Z} {A} refs/heads/m\0object-format=sha256").as_bytes(),
                    b"",
                ]),
                "object format",
            ),
            (
                [pkts(&[good.as_bytes()]), b"0001".to_vec()].concat(),
                "delim",
            ),
        ];
        for (bytes, want) in cases {
            let err = parse(&bytes).expect_err(&String::from_utf8_lossy(&bytes));
            let msg = err.to_string();
            assert!(msg.contains(want), "{bytes:?}: {msg:?} lacks {want:?}");
            assert!(!err.unpack_reason().contains('\n'));
        }
    }

    #[test]
    fn non_utf8_ref_name_is_rejected() {
        let mut line = format!("{Z} {A} refs/heads/").into_bytes();
        line.push(0xff);
        let err = parse(&pkts(&[&line, b""])).unwrap_err();
        assert!(matches!(err, ReceiveError::NonUtf8RefName), "{err}");
    }

    #[test]
    fn oversized_pkt_line_is_rejected() {
        // A length prefix beyond the 65520-byte maximum.
        assert!(matches!(
            parse(b"fff5xxxx"),
            Err(ReceiveError::Pkt(PktError::BadLength { .. }))
        ));
    }

    #[test]
    fn enforces_limits() {
        let limits = Limits {
            max_commands: 2,
            max_push_options: 1,
            ..Limits::default()
        };
        let l1 = format!("{Z} {A} refs/heads/a\0report-status push-options");
        let l2 = format!("{Z} {A} refs/heads/b");
        let l3 = format!("{Z} {A} refs/heads/c");
        let bytes = pkts(&[l1.as_bytes(), l2.as_bytes(), l3.as_bytes(), b""]);
        assert!(matches!(
            read_request(&mut PktReader::new(&bytes[..]), &limits),
            Err(ReceiveError::TooManyCommands { limit: 2 })
        ));
        let bytes = pkts(&[l1.as_bytes(), l2.as_bytes(), b"", b"one", b"two", b""]);
        assert!(matches!(
            read_request(&mut PktReader::new(&bytes[..]), &limits),
            Err(ReceiveError::TooManyPushOptions { limit: 1 })
        ));
        let bytes = pkts(&[l1.as_bytes(), b"", b"one", b""]);
        let req = read_request(&mut PktReader::new(&bytes[..]), &limits)
            .unwrap()
            .unwrap();
        assert_eq!(req.push_options, vec!["one"]);
        let long = "x".repeat(Limits::default().max_push_option_bytes + 1);
        let bytes = pkts(&[l1.as_bytes(), b"", long.as_bytes(), b""]);
        assert!(matches!(
            read_request(&mut PktReader::new(&bytes[..]), &Limits::default()),
            Err(ReceiveError::PushOptionTooLong { limit: 1024 })
        ));
    }
}
