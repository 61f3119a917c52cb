//! Snapshot files: a group's application rows, framed and checksummed.
//!
//! ```text
//! magic  "CAIRNSN1"
//! record key_len:u32 BE  key  value_len:u32 BE  value     (repeated)
//! end    0xffff_ffff  record_count:u64 BE  crc32:u32 BE  (crc of all bytes before it)
//! ```
//!
//! Keys are stored without the group prefix, so a snapshot can be installed
//! under any group id. Rows are written and read one at a time, so building
//! and verifying never hold the whole snapshot in memory.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::SnapshotError;
use crate::state_machine::Row;

const MAGIC: &[u8; 8] = b"CAIRNSN1";
const END_MARKER: u32 = u32::MAX;
/// Upper bound of one key or value: protects readers of a corrupt file
/// from allocating gigabytes. Refs and manifests are far smaller.
const MAX_FIELD: u32 = 64 << 20;

/// The data of a group snapshot: an open snapshot file.
///
/// Holding the file open keeps it readable (on Unix) while a replication
/// task streams it, even after a newer snapshot replaced it. An incoming
/// snapshot (being received from a leader) is deleted when dropped unless
/// it was installed.
#[derive(Debug)]
pub struct SnapshotFile {
    file: File,
    path: PathBuf,
    remove_on_drop: bool,
}

impl SnapshotFile {
    pub(crate) fn open(path: PathBuf) -> Result<Self, SnapshotError> {
        let file = File::open(&path).map_err(|source| SnapshotError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(Self {
            file,
            path,
            remove_on_drop: false,
        })
    }

    pub(crate) fn create_incoming(path: PathBuf) -> Result<Self, SnapshotError> {
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|source| SnapshotError::Io {
                path: path.clone(),
                source,
            })?;
        Ok(Self {
            file,
            path,
            remove_on_drop: true,
        })
    }

    /// Where the file lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the file in bytes.
    pub fn len(&self) -> Result<u64, SnapshotError> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|source| self.io_err(source))
    }

    /// Whether the file is empty (an incoming snapshot nothing was written to).
    pub fn is_empty(&self) -> Result<bool, SnapshotError> {
        Ok(self.len()? == 0)
    }

    pub(crate) fn io_err(&self, source: io::Error) -> SnapshotError {
        SnapshotError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Marks the file as kept: it was adopted as the current snapshot.
    pub(crate) fn keep(&mut self) {
        self.remove_on_drop = false;
    }

    pub(crate) fn rewind(&mut self) -> Result<(), SnapshotError> {
        self.file
            .seek(SeekFrom::Start(0))
            .map(|_| ())
            .map_err(|source| self.io_err(source))
    }

    pub(crate) fn file_mut(&mut self) -> &mut File {
        &mut self.file
    }
}

impl Drop for SnapshotFile {
    fn drop(&mut self) {
        if self.remove_on_drop {
            // Best effort: a leftover is removed when the group is opened next.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Read for SnapshotFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
}

impl Write for SnapshotFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl Seek for SnapshotFile {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.file.seek(pos)
    }
}

/// Writes rows into a snapshot stream.
pub(crate) struct SnapshotWriter<W: Write> {
    inner: BufWriter<W>,
    crc: crc32fast::Hasher,
    count: u64,
}

impl<W: Write> SnapshotWriter<W> {
    pub(crate) fn new(inner: W) -> io::Result<Self> {
        let mut writer = Self {
            inner: BufWriter::new(inner),
            crc: crc32fast::Hasher::new(),
            count: 0,
        };
        writer.put(MAGIC)?;
        Ok(writer)
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.crc.update(bytes);
        self.inner.write_all(bytes)
    }

    fn put_len(&mut self, len: usize) -> io::Result<()> {
        let len = u32::try_from(len)
            .ok()
            .filter(|l| *l <= MAX_FIELD)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "row too large"))?;
        self.put(&len.to_be_bytes())
    }

    pub(crate) fn push(&mut self, key: &[u8], value: &[u8]) -> io::Result<()> {
        self.put_len(key.len())?;
        self.put(key)?;
        self.put_len(value.len())?;
        self.put(value)?;
        self.count += 1;
        Ok(())
    }

    /// Writes the trailer and returns the underlying writer (not synced).
    pub(crate) fn finish(mut self) -> io::Result<W> {
        self.put(&END_MARKER.to_be_bytes())?;
        let count = self.count;
        self.put(&count.to_be_bytes())?;
        let crc = self.crc.clone().finalize();
        self.inner.write_all(&crc.to_be_bytes())?;
        self.inner.into_inner().map_err(|e| e.into_error())
    }
}

/// Reads rows from a snapshot stream, verifying framing and checksum.
pub(crate) struct SnapshotReader<R: Read> {
    inner: BufReader<R>,
    crc: crc32fast::Hasher,
    count: u64,
    path: PathBuf,
}

impl<R: Read> SnapshotReader<R> {
    pub(crate) fn new(inner: R, path: &Path) -> Result<Self, SnapshotError> {
        let mut reader = Self {
            inner: BufReader::new(inner),
            crc: crc32fast::Hasher::new(),
            count: 0,
            path: path.to_path_buf(),
        };
        let mut magic = [0u8; 8];
        reader.take(&mut magic)?;
        if &magic != MAGIC {
            return Err(reader.corrupt("bad magic"));
        }
        Ok(reader)
    }

    fn corrupt(&self, reason: &'static str) -> SnapshotError {
        SnapshotError::Corrupt {
            path: self.path.clone(),
            reason,
        }
    }

    fn read_raw(&mut self, buf: &mut [u8]) -> Result<(), SnapshotError> {
        self.inner.read_exact(buf).map_err(|source| {
            if source.kind() == io::ErrorKind::UnexpectedEof {
                self.corrupt("truncated")
            } else {
                SnapshotError::Io {
                    path: self.path.clone(),
                    source,
                }
            }
        })
    }

    fn take(&mut self, buf: &mut [u8]) -> Result<(), SnapshotError> {
        self.read_raw(buf)?;
        self.crc.update(buf);
        Ok(())
    }

    fn take_u32(&mut self) -> Result<u32, SnapshotError> {
        let mut b = [0u8; 4];
        self.take(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    fn take_field(&mut self, len: u32) -> Result<Vec<u8>, SnapshotError> {
        if len > MAX_FIELD {
            return Err(self.corrupt("field length over limit"));
        }
        let mut buf = vec![0u8; len as usize];
        self.take(&mut buf)?;
        Ok(buf)
    }

    /// The next row, or `None` after a verified trailer.
    pub(crate) fn next_row(&mut self) -> Result<Option<Row>, SnapshotError> {
        let key_len = self.take_u32()?;
        if key_len == END_MARKER {
            let mut count = [0u8; 8];
            self.take(&mut count)?;
            let expected_crc = self.crc.clone().finalize();
            let mut crc = [0u8; 4];
            self.read_raw(&mut crc)?;
            if u64::from_be_bytes(count) != self.count {
                return Err(self.corrupt("row count mismatch"));
            }
            if u32::from_be_bytes(crc) != expected_crc {
                return Err(self.corrupt("checksum mismatch"));
            }
            let mut rest = [0u8; 1];
            if self
                .inner
                .read(&mut rest)
                .map_err(|source| SnapshotError::Io {
                    path: self.path.clone(),
                    source,
                })?
                != 0
            {
                return Err(self.corrupt("bytes after trailer"));
            }
            return Ok(None);
        }
        let key = self.take_field(key_len)?;
        let value_len = self.take_u32()?;
        let value = self.take_field(value_len)?;
        self.count += 1;
        Ok(Some((key, value)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = SnapshotWriter::new(Vec::new()).expect("writer");
        w.push(b"refs/heads/main", &[7; 20]).expect("push");
        w.push(b"", b"empty key").expect("push");
        w.push(b"k", b"").expect("push");
        w.finish().expect("finish")
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<Row>, SnapshotError> {
        let mut r = SnapshotReader::new(bytes, Path::new("test.snap"))?;
        let mut rows = Vec::new();
        while let Some(row) = r.next_row()? {
            rows.push(row);
        }
        Ok(rows)
    }

    #[test]
    fn rows_round_trip() {
        let rows = read_all(&sample()).expect("valid");
        assert_eq!(
            rows,
            vec![
                (b"refs/heads/main".to_vec(), vec![7; 20]),
                (Vec::new(), b"empty key".to_vec()),
                (b"k".to_vec(), Vec::new()),
            ]
        );
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let good = sample();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x01;
            assert!(read_all(&bad).is_err(), "flip at {i} went unnoticed");
        }
    }

    #[test]
    fn truncation_and_trailing_bytes_are_detected() {
        let good = sample();
        for len in 0..good.len() {
            assert!(read_all(&good[..len]).is_err(), "cut at {len} accepted");
        }
        let mut long = good.clone();
        long.push(0);
        assert!(read_all(&long).is_err());
    }
}
