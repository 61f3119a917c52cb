//! The v0 receive-pack ref advertisement: every ref with its object id, the
//! capability list after a NUL on the first line, then a flush. The smart
//! HTTP `# service=git-receive-pack` preamble is the caller's business.

use std::io::{self, Write};

use crate::pktline::PktWriter;
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

/// Writes the advertisement. Unlike upload-pack, receive-pack advertises
/// neither `HEAD` nor peeled tags; an empty repository sends the
/// `capabilities^{}` placeholder so the client still learns the capabilities.
pub fn advertise(refs: &RepoRefs, agent: &str, out: &mut impl Write) -> io::Result<()> {
    let mut caps = CAPABILITIES.join(" ");
    caps.push_str(" agent=");
    // A space or control character would split the capability list.
    caps.extend(
        agent
            .chars()
            .map(|c| if c.is_ascii_graphic() { c } else { '_' }),
    );

    let mut w = PktWriter::new(out);
    let mut first = true;
    let null = gix_hash::Kind::Sha1.null();
    let placeholder = [(null, "capabilities^{}")];
    let lines: Box<dyn Iterator<Item = (gix_hash::ObjectId, &str)>> = if refs.refs.is_empty() {
        Box::new(placeholder.iter().map(|(id, n)| (*id, *n)))
    } else {
        Box::new(refs.refs.iter().map(|r| (r.target, r.name.as_str())))
    };
    for (id, name) in lines {
        let mut line = format!("{} {}", id.to_hex(), name).into_bytes();
        if first {
            line.push(0);
            line.extend_from_slice(caps.as_bytes());
            first = false;
        }
        line.push(b'\n');
        w.data(&line)?;
    }
    w.flush_pkt()?;
    w.flush()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::refs::RefRecord;
    use gix_hash::ObjectId;

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
}
