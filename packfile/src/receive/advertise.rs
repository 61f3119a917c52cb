//! The v0 receive-pack ref advertisement: every ref with its object id, the
//! capability list after a NUL on the first line, then a flush. The smart
//! HTTP `# service=git-receive-pack` preamble is the caller's business.

use std::io::{self, Write};

use gix_hash::ObjectId;

use crate::pktline::{PktWriter, MAX_DATA_LEN};
use crate::refs::RepoRefs;

/// Capabilities offered to pushing clients (without `agent=`).
pub const CAPABILITIES: &[&str] = &[
    "report-status",
    "report-status-v2",
    "delete-refs",
    "side-band-64k",
    "quiet",
    "atomic",
    "ofs-delta",
    "push-options",
    "object-format=sha1",
];

/// Longest `agent=` value sent; it is ours, but must never push the
/// capability line past a pkt-line.
const MAX_AGENT_LEN: usize = 256;

/// Writes the advertisement. Unlike upload-pack, receive-pack advertises
/// neither `HEAD` nor peeled tags; an empty repository sends the
/// `capabilities^{}` placeholder so the client still learns the capabilities.
///
/// The store may hold names far longer than [`crate::refs::MAX_REF_NAME_LEN`]
/// (written before that cap existed), so no line is assumed to fit: every
/// ref whose plain line fits a pkt-line is advertised (an admin can then
/// delete it with a plain `git push --delete`), and the capabilities ride
/// on the first ref line that still fits with them, moved to the front
/// (git's client takes capabilities only from the first line but accepts
/// refs in any order). If no ref can carry them, the placeholder is sent
/// alone, since git refuses refs after it.
pub fn advertise(refs: &RepoRefs, agent: &str, out: &mut impl Write) -> io::Result<()> {
    let mut caps = CAPABILITIES.join(" ");
    caps.push_str(" agent=");
    // A space or control character would split the capability list.
    caps.extend(
        agent
            .chars()
            .take(MAX_AGENT_LEN)
            .map(|c| if c.is_ascii_graphic() { c } else { '_' }),
    );

    // `<hex> SP <name> [NUL <caps>] LF`
    let hex_len = gix_hash::Kind::Sha1.len_in_hex();
    let plain_len = |name: &str| hex_len + 1 + name.len() + 1;
    let fits = |name: &str| plain_len(name) <= MAX_DATA_LEN;
    let carries_caps = |name: &str| plain_len(name) + 1 + caps.len() <= MAX_DATA_LEN;

    let mut w = PktWriter::new(out);
    let line = |w: &mut PktWriter<_>, id: ObjectId, name: &str, caps: Option<&str>| {
        let mut line = Vec::with_capacity(plain_len(name) + caps.map_or(0, |c| c.len() + 1));
        line.extend_from_slice(id.to_hex().to_string().as_bytes());
        line.push(b' ');
        line.extend_from_slice(name.as_bytes());
        if let Some(caps) = caps {
            line.push(0);
            line.extend_from_slice(caps.as_bytes());
        }
        line.push(b'\n');
        w.data(&line)
    };
    match refs.refs.iter().position(|r| carries_caps(&r.name)) {
        Some(first) => {
            let head = &refs.refs[first];
            line(&mut w, head.target, &head.name, Some(&caps))?;
            for (i, r) in refs.refs.iter().enumerate() {
                if i != first && fits(&r.name) {
                    line(&mut w, r.target, &r.name, None)?;
                }
            }
        }
        None => {
            let null = gix_hash::Kind::Sha1.null();
            line(&mut w, null, "capabilities^{}", Some(&caps))?;
        }
    }
    w.flush_pkt()?;
    w.flush()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::refs::RefRecord;

    #[test]
    fn empty_repository_uses_placeholder() {
        let mut out = Vec::new();
        advertise(&RepoRefs::default(), "cairn/0.1", &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text[4..].starts_with(
                "0000000000000000000000000000000000000000 capabilities^{}\0report-status "
            ),
            "{text:?}"
        );
        assert!(text.ends_with(" agent=cairn/0.1\n0000"), "{text:?}");
    }

    #[test]
    fn caps_only_on_first_ref() {
        let a = ObjectId::from_hex(b"1111111111111111111111111111111111111111").unwrap();
        let refs = RepoRefs::new(
            vec![
                RefRecord {
                    name: "refs/heads/main".into(),
                    target: a,
                },
                RefRecord {
                    name: "refs/tags/v1".into(),
                    target: a,
                },
            ],
            Some("refs/heads/main".into()),
        );
        let mut out = Vec::new();
        advertise(&refs, "cairn x", &mut out).unwrap();
        let mut r = crate::pktline::PktReader::new(&out[..]);
        let first = r.expect_pkt().unwrap();
        let first = first.text().unwrap();
        assert!(first.starts_with(b"1111111111111111111111111111111111111111 refs/heads/main\0"));
        assert!(first.ends_with(b"object-format=sha1 agent=cairn_x"));
        let second = r.expect_pkt().unwrap();
        assert_eq!(
            second.text().unwrap(),
            b"1111111111111111111111111111111111111111 refs/tags/v1"
        );
        assert_eq!(r.expect_pkt().unwrap(), crate::pktline::Pkt::Flush);
    }

    fn record(name: String, hex: u8) -> RefRecord {
        RefRecord {
            name,
            target: ObjectId::from_bytes_or_panic(&[hex; 20]),
        }
    }

    fn lines(out: &[u8]) -> Vec<Vec<u8>> {
        let mut r = crate::pktline::PktReader::new(out);
        let mut lines = Vec::new();
        loop {
            match r.expect_pkt().unwrap() {
                crate::pktline::Pkt::Flush => break,
                crate::pktline::Pkt::Data(d) => lines.push(d),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(r.read_pkt().unwrap().is_none());
        lines
    }

    /// A ref name whose plain line is exactly `line_len` bytes.
    fn name_for_line(line_len: usize, fill: char) -> String {
        let prefix = "refs/heads/";
        let n = line_len - 42 - prefix.len();
        format!("{prefix}{}", fill.to_string().repeat(n))
    }

    #[test]
    fn over_long_first_ref_moves_caps_to_a_ref_that_fits() {
        // Sorts first; its plain line fits, but not with the capabilities.
        let long = name_for_line(MAX_DATA_LEN, 'a');
        // One byte too long even without capabilities: never sent.
        let too_long = name_for_line(MAX_DATA_LEN + 1, 'b');
        let refs = RepoRefs::new(
            vec![
                record(long.clone(), 0x11),
                record(too_long, 0x22),
                record("refs/heads/main".into(), 0x33),
                record("refs/tags/v1".into(), 0x44),
            ],
            Some("refs/heads/main".into()),
        );
        let mut out = Vec::new();
        advertise(&refs, "cairn/0.1", &mut out).unwrap();
        let lines = lines(&out);
        assert_eq!(
            lines.len(),
            3,
            "{:?}",
            lines.iter().map(|l| l.len()).collect::<Vec<_>>()
        );
        let first = String::from_utf8(lines[0].clone()).unwrap();
        assert!(
            first.starts_with(&format!(
                "{} refs/heads/main\0report-status ",
                "33".repeat(20)
            )),
            "{first:?}"
        );
        assert!(first.ends_with(" agent=cairn/0.1\n"), "{first:?}");
        assert_eq!(lines[1].len(), MAX_DATA_LEN);
        assert_eq!(
            lines[1],
            format!("{} {long}\n", "11".repeat(20)).into_bytes()
        );
        assert_eq!(
            lines[2],
            format!("{} refs/tags/v1\n", "44".repeat(20)).into_bytes()
        );
    }

    #[test]
    fn placeholder_alone_when_no_ref_can_carry_the_capabilities() {
        let refs = RepoRefs::new(
            vec![
                record(name_for_line(MAX_DATA_LEN, 'a'), 0x11),
                record(name_for_line(MAX_DATA_LEN - 50, 'b'), 0x22),
                record(name_for_line(MAX_DATA_LEN + 100, 'c'), 0x33),
            ],
            None,
        );
        let mut out = Vec::new();
        advertise(&refs, &"x".repeat(100_000), &mut out).unwrap();
        let lines = lines(&out);
        assert_eq!(lines.len(), 1);
        let text = String::from_utf8(lines[0].clone()).unwrap();
        assert!(
            text.starts_with(
                "0000000000000000000000000000000000000000 capabilities^{}\0report-status "
            ),
            "{text:?}"
        );
        // The agent is cut, so even a silly one cannot overflow the line.
        assert!(text.ends_with(&format!(" agent={}\n", "x".repeat(MAX_AGENT_LEN))));
    }
}
