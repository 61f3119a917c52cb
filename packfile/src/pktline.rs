//! pkt-line framing (gitprotocol-common) on top of `gix-packetline`'s decoder.
//!
//! The reader never reads past the end of the line it returns, so after the
//! command section of a push the same underlying reader continues with the
//! raw pack bytes.

use std::io::{self, BufRead, Read, Write};

use gix_packetline::decode::{hex_prefix, PacketLineOrWantedSize};
use gix_packetline::PacketLineRef;

/// Largest payload of one pkt-line: 65520 minus the 4-byte length prefix.
pub const MAX_DATA_LEN: usize = 65516;
/// Largest side-band payload with `side-band-64k` (one byte goes to the band number).
pub const MAX_SIDEBAND_64K_DATA: usize = MAX_DATA_LEN - 1;
/// Largest side-band payload with plain `side-band`.
pub const MAX_SIDEBAND_DATA: usize = 1000 - 5;

/// One pkt-line as read from the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pkt {
    Data(Vec<u8>),
    Flush,
    Delim,
    ResponseEnd,
}

impl Pkt {
    /// The payload with one trailing LF removed, as git does for text lines.
    pub fn text(&self) -> Option<&[u8]> {
        match self {
            Pkt::Data(d) => Some(d.strip_suffix(b"\n").unwrap_or(d)),
            _ => None,
        }
    }
}

/// Errors while reading pkt-lines from a client.
#[derive(Debug, thiserror::Error)]
pub enum PktError {
    #[error("unexpected end of input while reading a pkt-line")]
    UnexpectedEof,
    #[error("malformed pkt-line length prefix {prefix:?}")]
    BadLength { prefix: String },
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Reads pkt-lines from `R` without any read-ahead of its own.
pub struct PktReader<R> {
    inner: R,
}

impl<R: Read> PktReader<R> {
    pub fn new(inner: R) -> Self {
        PktReader { inner }
    }

    /// The underlying reader, positioned right after the last line read.
    pub fn inner_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Reads one line; `Ok(None)` on a clean end of input before a new line starts.
    pub fn read_pkt(&mut self) -> Result<Option<Pkt>, PktError> {
        let mut prefix = [0u8; 4];
        let mut filled = 0;
        while filled < 4 {
            match self.inner.read(&mut prefix[filled..]) {
                Ok(0) if filled == 0 => return Ok(None),
                Ok(0) => return Err(PktError::UnexpectedEof),
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        }
        let bad = || PktError::BadLength {
            prefix: String::from_utf8_lossy(&prefix).into_owned(),
        };
        match hex_prefix(&prefix).map_err(|_| bad())? {
            PacketLineOrWantedSize::Line(PacketLineRef::Flush) => Ok(Some(Pkt::Flush)),
            PacketLineOrWantedSize::Line(PacketLineRef::Delimiter) => Ok(Some(Pkt::Delim)),
            PacketLineOrWantedSize::Line(PacketLineRef::ResponseEnd) => Ok(Some(Pkt::ResponseEnd)),
            PacketLineOrWantedSize::Line(PacketLineRef::Data(_)) => Err(bad()),
            PacketLineOrWantedSize::Wanted(n) => {
                let n = n as usize;
                if n > MAX_DATA_LEN {
                    return Err(bad());
                }
                let mut data = vec![0u8; n];
                self.inner.read_exact(&mut data).map_err(|e| {
                    if e.kind() == io::ErrorKind::UnexpectedEof {
                        PktError::UnexpectedEof
                    } else {
                        PktError::Io(e)
                    }
                })?;
                Ok(Some(Pkt::Data(data)))
            }
        }
    }

    /// Like [`read_pkt`](Self::read_pkt) but treats end of input as an error.
    pub fn expect_pkt(&mut self) -> Result<Pkt, PktError> {
        self.read_pkt()?.ok_or(PktError::UnexpectedEof)
    }
}

impl<R: BufRead> PktReader<R> {
    /// True if the underlying reader has no more bytes.
    pub fn at_eof(&mut self) -> io::Result<bool> {
        Ok(self.inner.fill_buf()?.is_empty())
    }
}

/// Writes pkt-lines to `W`.
pub struct PktWriter<W> {
    inner: W,
}

impl<W: Write> PktWriter<W> {
    pub fn new(inner: W) -> Self {
        PktWriter { inner }
    }

    pub fn inner_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    pub fn into_inner(self) -> W {
        self.inner
    }

    /// Writes `data` as one line; splits nothing, so `data` must fit.
    pub fn data(&mut self, data: &[u8]) -> io::Result<()> {
        if data.len() > MAX_DATA_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "pkt-line payload too large",
            ));
        }
        write!(self.inner, "{:04x}", data.len() + 4)?;
        self.inner.write_all(data)
    }

    /// Writes `text` followed by LF as one line.
    pub fn text(&mut self, text: &str) -> io::Result<()> {
        let mut line = Vec::with_capacity(text.len() + 1);
        line.extend_from_slice(text.as_bytes());
        line.push(b'\n');
        self.data(&line)
    }

    pub fn flush_pkt(&mut self) -> io::Result<()> {
        self.inner.write_all(b"0000")
    }

    pub fn delim_pkt(&mut self) -> io::Result<()> {
        self.inner.write_all(b"0001")
    }

    pub fn response_end_pkt(&mut self) -> io::Result<()> {
        self.inner.write_all(b"0002")
    }

    /// Writes `data` on side-band `band`, split into lines of at most `max` bytes.
    pub fn band(&mut self, band: u8, data: &[u8], max: usize) -> io::Result<()> {
        for chunk in data.chunks(max.max(1)) {
            write!(self.inner, "{:04x}", chunk.len() + 5)?;
            self.inner.write_all(&[band])?;
            self.inner.write_all(chunk)?;
        }
        Ok(())
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Which side-band flavour, if any, the client asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sideband {
    None,
    Band,
    Band64k,
}

impl Sideband {
    pub fn max_payload(self) -> usize {
        match self {
            Sideband::None => MAX_DATA_LEN,
            Sideband::Band => MAX_SIDEBAND_DATA,
            Sideband::Band64k => MAX_SIDEBAND_64K_DATA,
        }
    }
}

/// Channel numbers of side-band multiplexing.
pub mod band {
    pub const DATA: u8 = 1;
    pub const PROGRESS: u8 = 2;
    pub const ERROR: u8 = 3;
}

/// An `io::Write` that wraps everything written into side-band channel 1
/// pkt-lines (or passes it through raw without side-band).
pub struct BandWriter<'a, W: Write> {
    out: &'a mut PktWriter<W>,
    mode: Sideband,
    buf: Vec<u8>,
}

impl<'a, W: Write> BandWriter<'a, W> {
    pub fn new(out: &'a mut PktWriter<W>, mode: Sideband) -> Self {
        BandWriter {
            out,
            mode,
            buf: Vec::with_capacity(mode.max_payload()),
        }
    }

    fn emit(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        match self.mode {
            Sideband::None => self.out.inner_mut().write_all(&self.buf)?,
            m => self.out.band(band::DATA, &self.buf, m.max_payload())?,
        }
        self.buf.clear();
        Ok(())
    }

    /// Writes progress text on channel 2 (dropped without side-band).
    pub fn progress(&mut self, msg: &str) -> io::Result<()> {
        if self.mode == Sideband::None {
            return Ok(());
        }
        self.emit()?;
        self.out
            .band(band::PROGRESS, msg.as_bytes(), self.mode.max_payload())
    }

    /// Flushes buffered data as a final (possibly short) line.
    pub fn finish(mut self) -> io::Result<()> {
        self.emit()?;
        self.out.flush()
    }
}

impl<W: Write> Write for BandWriter<'_, W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let cap = self.mode.max_payload();
        let take = (cap - self.buf.len()).min(data.len());
        self.buf.extend_from_slice(&data[..take]);
        if self.buf.len() == cap {
            self.emit()?;
        }
        Ok(take)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.emit()?;
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_lines_and_specials() {
        let mut w = PktWriter::new(Vec::new());
        w.text("want abc").unwrap();
        w.delim_pkt().unwrap();
        w.data(b"x").unwrap();
        w.flush_pkt().unwrap();
        w.response_end_pkt().unwrap();
        let bytes = w.into_inner();
        assert_eq!(&bytes, b"000dwant abc\n00010005x00000002");
        let mut r = PktReader::new(&bytes[..]);
        assert_eq!(r.expect_pkt().unwrap().text(), Some(&b"want abc"[..]));
        assert_eq!(r.expect_pkt().unwrap(), Pkt::Delim);
        assert_eq!(r.expect_pkt().unwrap(), Pkt::Data(b"x".to_vec()));
        assert_eq!(r.expect_pkt().unwrap(), Pkt::Flush);
        assert_eq!(r.expect_pkt().unwrap(), Pkt::ResponseEnd);
        assert!(r.read_pkt().unwrap().is_none());
    }

    #[test]
    fn rejects_garbage_and_truncation() {
        for bad in [&b"zzzz"[..], b"0003", b"0004", b"fff0abc"] {
            let mut r = PktReader::new(bad);
            assert!(r.read_pkt().is_err(), "{bad:?} must be rejected");
        }
        let mut r = PktReader::new(&b"000awant"[..]);
        assert!(matches!(r.read_pkt(), Err(PktError::UnexpectedEof)));
        let mut r = PktReader::new(&b"00"[..]);
        assert!(matches!(r.read_pkt(), Err(PktError::UnexpectedEof)));
    }

    #[test]
    fn band_writer_splits_at_64k() {
        let mut w = PktWriter::new(Vec::new());
        let mut b = BandWriter::new(&mut w, Sideband::Band64k);
        b.write_all(&vec![7u8; MAX_SIDEBAND_64K_DATA + 10]).unwrap();
        b.finish().unwrap();
        let bytes = w.into_inner();
        let mut r = PktReader::new(&bytes[..]);
        let first = r.expect_pkt().unwrap();
        let second = r.expect_pkt().unwrap();
        match (first, second) {
            (Pkt::Data(a), Pkt::Data(b)) => {
                assert_eq!(a.len(), MAX_DATA_LEN);
                assert_eq!(a[0], band::DATA);
                assert_eq!(b.len(), 11);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
