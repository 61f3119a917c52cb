//! The answer to a push: report-status (and report-status-v2, identical
//! without proc-receive hooks) — `unpack ok|<reason>`, then `ok <ref>` or
//! `ng <ref> <reason>` per command, then a flush — wrapped in side-band
//! channel 1 when the client asked for side-band, and progress messages on
//! channel 2 unless it asked for quiet.

use std::io::{self, Write};

use super::ReceiveCaps;
use crate::pktline::{band, PktWriter, Sideband, MAX_DATA_LEN};

/// Writes the status report. Nothing is written if the client asked for no
/// report, except the final flush that ends a side-band stream.
pub fn write_report(
    out: &mut impl Write,
    caps: &ReceiveCaps,
    unpack: Result<(), &str>,
    results: &[(String, Result<(), String>)],
) -> io::Result<()> {
    let mut w = PktWriter::new(out);
    if caps.report_status || caps.report_status_v2 {
        let mut report = PktWriter::new(Vec::new());
        match unpack {
            Ok(()) => report.text("unpack ok")?,
            Err(reason) => report.text(&format!("unpack {}", one_line(reason, MAX_REASON)))?,
        }
        for (name, result) in results {
            match result {
                Ok(()) => report.text(&format!("ok {name}"))?,
                Err(reason) => {
                    // Names come from the client's pkt-lines, so with the
                    // longest of them the reason must give way to fit.
                    let room = MAX_DATA_LEN.saturating_sub("ng  \n".len() + name.len());
                    let reason = one_line(reason, room.min(MAX_REASON));
                    report.text(&format!("ng {name} {reason}"))?
                }
            }
        }
        report.flush_pkt()?;
        let report = report.into_inner();
        match caps.side_band {
            Sideband::None => w.inner_mut().write_all(&report)?,
            mode => w.band(band::DATA, &report, mode.max_payload())?,
        }
    }
    if caps.side_band != Sideband::None {
        w.flush_pkt()?;
    }
    w.flush()
}

/// Sends a human-readable message on the progress channel, which git shows
/// prefixed with `remote:`. Dropped without side-band or with `quiet`.
pub fn write_progress(out: &mut impl Write, caps: &ReceiveCaps, message: &str) -> io::Result<()> {
    if caps.quiet || caps.side_band == Sideband::None {
        return Ok(());
    }
    let mut w = PktWriter::new(out);
    w.band(
        band::PROGRESS,
        message.as_bytes(),
        caps.side_band.max_payload(),
    )?;
    w.flush()
}

/// Longest reason sent.
const MAX_REASON: usize = 1000;

/// A reason must not break the line-based report, and must fit a pkt-line:
/// control characters become spaces, and it is cut to `max` bytes.
fn one_line(reason: &str, max: usize) -> String {
    let mut s: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::pktline::{Pkt, PktReader};

    fn results() -> Vec<(String, Result<(), String>)> {
        vec![
            ("refs/heads/main".into(), Ok(())),
            ("refs/heads/x".into(), Err("stale info\nsecond line".into())),
        ]
    }

    #[test]
    fn plain_report() {
        let caps = ReceiveCaps {
            report_status: true,
            ..ReceiveCaps::default()
        };
        let mut out = Vec::new();
        write_report(&mut out, &caps, Ok(()), &results()).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "000eunpack ok\n0017ok refs/heads/main\n002bng refs/heads/x stale info second line\n0000"
        );
    }

    #[test]
    fn unpack_failure_and_no_report() {
        let caps = ReceiveCaps {
            report_status_v2: true,
            ..ReceiveCaps::default()
        };
        let mut out = Vec::new();
        let res = vec![(
            "refs/heads/main".to_owned(),
            Err("unpacker error".to_owned()),
        )];
        write_report(&mut out, &caps, Err("pack is truncated"), &res).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("001dunpack pack is truncated\n"),
            "{text:?}"
        );
        assert!(text.ends_with("ng refs/heads/main unpacker error\n0000"));

        let mut out = Vec::new();
        write_report(&mut out, &ReceiveCaps::default(), Ok(()), &results()).unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn reason_gives_way_to_the_longest_ref_name() {
        let caps = ReceiveCaps {
            report_status: true,
            ..ReceiveCaps::default()
        };
        // The longest name a command pkt-line can carry.
        let name = format!("refs/heads/{}", "n".repeat(MAX_DATA_LEN - 82 - 11));
        let res = vec![(
            name.clone(),
            Err(format!("gitmodulesUrl: {}", "é".repeat(200))),
        )];
        let mut out = Vec::new();
        write_report(&mut out, &caps, Err("fsck error"), &res).unwrap();
        let mut r = PktReader::new(&out[..]);
        assert_eq!(
            r.expect_pkt().unwrap().text().unwrap(),
            b"unpack fsck error"
        );
        let Pkt::Data(line) = r.expect_pkt().unwrap() else {
            panic!("no ng line");
        };
        assert!(line.len() == MAX_DATA_LEN || line.len() == MAX_DATA_LEN - 1);
        let line = String::from_utf8(line).unwrap();
        assert!(
            line.starts_with(&format!("ng {name} gitmodulesUrl: é")),
            "{}",
            &line[..20]
        );
        assert_eq!(r.expect_pkt().unwrap(), Pkt::Flush);
    }

    #[test]
    fn sideband_wraps_report_and_ends_with_flush() {
        let caps = ReceiveCaps {
            report_status: true,
            side_band: Sideband::Band64k,
            ..ReceiveCaps::default()
        };
        let mut out = Vec::new();
        write_progress(&mut out, &caps, "hello\n").unwrap();
        write_report(&mut out, &caps, Ok(()), &results()).unwrap();
        let mut r = PktReader::new(&out[..]);
        assert_eq!(r.expect_pkt().unwrap(), Pkt::Data(b"\x02hello\n".to_vec()));
        let Pkt::Data(inner) = r.expect_pkt().unwrap() else {
            panic!("expected band data")
        };
        assert_eq!(inner[0], band::DATA);
        let mut plain = Vec::new();
        write_report(
            &mut plain,
            &ReceiveCaps {
                report_status: true,
                ..ReceiveCaps::default()
            },
            Ok(()),
            &results(),
        )
        .unwrap();
        assert_eq!(&inner[1..], &plain[..]);
        assert_eq!(r.expect_pkt().unwrap(), Pkt::Flush);
        assert!(r.read_pkt().unwrap().is_none());

        let quiet = ReceiveCaps {
            quiet: true,
            ..caps
        };
        let mut out = Vec::new();
        write_progress(&mut out, &quiet, "hello\n").unwrap();
        assert!(out.is_empty());
    }
}
