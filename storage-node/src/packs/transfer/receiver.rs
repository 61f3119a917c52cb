//! Receiving one pack transfer: checks every chunk as it arrives, hashes both
//! files on the fly (no second read), verifies the whole at the end, fsyncs,
//! and only then renames the files to their final names.
//!
//! The blocking part ([`PackReceiver`]) is driven from an async chunk stream
//! by [`receive_stream`] through a bounded channel, so SHA-1 and disk writes
//! stay off the async runtime and a slow disk slows the sender down.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use cairn_packfile::ObjectId;
use cairn_proto::pack::{PackChunk, PackFile, PackHeader};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;

use super::{fsync_dir, pack_file_paths, parse_pack_id, ShardId, TempDir, MAX_CHUNK_BYTES};
use crate::repo::RepoId;

/// SHA-1 trailer length of both files.
const TRAILER: u64 = 20;
/// Smallest pack: 12-byte header, no entries, trailer.
const MIN_PACK_BYTES: u64 = 12 + TRAILER;
/// Smallest version-2 index: magic and version, fan-out table, no entries,
/// pack checksum and index checksum.
const MIN_INDEX_BYTES: u64 = 8 + 256 * 4 + 2 * TRAILER;
/// Chunks buffered between the async stream and the writer thread.
const CHANNEL_DEPTH: usize = 4;

/// Which of the two files a chunk or a check is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferFile {
    Pack,
    Index,
}

impl std::fmt::Display for TransferFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TransferFile::Pack => "pack",
            TransferFile::Index => "index",
        })
    }
}

/// Why a transfer was refused. Everything but `Io` and `Stream` is the
/// sender's fault (bad or corrupt data); the receiver keeps nothing of it.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("the first message carries no header")]
    MissingHeader,
    #[error("a header after the first message")]
    UnexpectedHeader,
    #[error("pack id {value:?} is not 40 lowercase hex digits")]
    InvalidPackId { value: String },
    #[error("header names {what} {got}, expected {expected}")]
    WrongPack {
        what: &'static str,
        expected: String,
        got: String,
    },
    #[error("{file} size {size} is out of range ({min}..={max} bytes)")]
    SizeOutOfRange {
        file: TransferFile,
        size: u64,
        min: u64,
        max: u64,
    },
    #[error("chunk names unknown file {value}")]
    UnknownFile { value: i32 },
    #[error("{file} chunk of {len} bytes exceeds the {MAX_CHUNK_BYTES}-byte limit")]
    ChunkTooLarge { file: TransferFile, len: usize },
    #[error("{file} chunk at offset {offset}: crc32 {actual:08x}, sender said {expected:08x}")]
    Crc {
        file: TransferFile,
        offset: u64,
        expected: u32,
        actual: u32,
    },
    #[error("{file} chunk at offset {got}, expected {expected}")]
    Offset {
        file: TransferFile,
        expected: u64,
        got: u64,
    },
    #[error("{file} chunk at offset {offset} of {len} bytes runs past the declared size {size}")]
    Overflow {
        file: TransferFile,
        offset: u64,
        len: usize,
        size: u64,
    },
    #[error("stream ended after {received} of {size} {file} bytes")]
    Incomplete {
        file: TransferFile,
        received: u64,
        size: u64,
    },
    #[error("pack trailer is {trailer}, not the pack id {pack_id}")]
    TrailerMismatch {
        pack_id: ObjectId,
        trailer: ObjectId,
    },
    #[error("{file} content hashes to {actual}, its trailer says {trailer}")]
    ChecksumMismatch {
        file: TransferFile,
        trailer: ObjectId,
        actual: ObjectId,
    },
    #[error("SHA-1 collision attack detected in the {file}")]
    HashCollision { file: TransferFile },
    #[error("index does not belong to the pack: {reason}")]
    IndexMismatch { reason: String },
    #[error("index does not open: {source}")]
    BadIndex {
        #[source]
        source: cairn_packfile::store::StoreError,
    },
    #[error("I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("pack writer task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
    #[error("the chunk stream failed: {0}")]
    Stream(#[source] tonic::Status),
}

impl ReceiveError {
    /// The stable gRPC code a `Stage` caller sees.
    pub fn to_status(&self) -> tonic::Status {
        use tonic::Status;
        match self {
            ReceiveError::ChecksumMismatch { .. } | ReceiveError::HashCollision { .. } => {
                Status::data_loss(self.to_string())
            }
            ReceiveError::Io { .. } | ReceiveError::Task(_) => {
                tracing::error!(error = %self, "pack transfer I/O failure");
                Status::internal(self.to_string())
            }
            ReceiveError::Stream(s) => Status::new(s.code(), self.to_string()),
            _ => Status::invalid_argument(self.to_string()),
        }
    }
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ReceiveError + '_ {
    move |source| ReceiveError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Size bounds a receiver applies to a header before accepting any data.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SizeLimits {
    pub max_pack_bytes: u64,
}

/// A header whose fields have been checked.
#[derive(Debug, Clone)]
pub(crate) struct TransferHeader {
    pub shard: ShardId,
    pub repo: RepoId,
    pub pack_id: ObjectId,
    pub pack_size: u64,
    pub index_size: u64,
}

impl TransferHeader {
    pub(crate) fn parse(header: &PackHeader, limits: SizeLimits) -> Result<Self, ReceiveError> {
        let pack_id =
            parse_pack_id(&header.pack_id).ok_or_else(|| ReceiveError::InvalidPackId {
                value: header.pack_id.clone(),
            })?;
        let max_pack = limits.max_pack_bytes.max(MIN_PACK_BYTES);
        check_range(
            TransferFile::Pack,
            header.pack_size,
            MIN_PACK_BYTES,
            max_pack,
        )?;
        // Every pack entry takes at least 9 bytes (1 header byte, an 8-byte
        // zlib stream) and at most 36 index bytes (name, crc32, offset,
        // large offset), so an honest index is never larger than this.
        let max_index = MIN_INDEX_BYTES.saturating_add(header.pack_size.saturating_mul(4));
        check_range(
            TransferFile::Index,
            header.index_size,
            MIN_INDEX_BYTES,
            max_index,
        )?;
        Ok(TransferHeader {
            shard: header.shard_id,
            repo: header.repo_id,
            pack_id,
            pack_size: header.pack_size,
            index_size: header.index_size,
        })
    }

    pub(crate) fn to_proto(&self) -> PackHeader {
        PackHeader {
            shard_id: self.shard,
            repo_id: self.repo,
            pack_id: self.pack_id.to_string(),
            pack_size: self.pack_size,
            index_size: self.index_size,
        }
    }
}

fn check_range(file: TransferFile, size: u64, min: u64, max: u64) -> Result<(), ReceiveError> {
    if (min..=max).contains(&size) {
        Ok(())
    } else {
        Err(ReceiveError::SizeOutOfRange {
            file,
            size,
            min,
            max,
        })
    }
}

/// One file being received: written in order, hashed as it arrives, its
/// trailer captured from the last 20 bytes.
struct FileSink {
    file_kind: TransferFile,
    path: PathBuf,
    file: File,
    size: u64,
    received: u64,
    hasher: gix_hash::Hasher,
    trailer: [u8; TRAILER as usize],
}

impl FileSink {
    fn create(file_kind: TransferFile, path: PathBuf, size: u64) -> Result<Self, ReceiveError> {
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err(&path))?;
        Ok(FileSink {
            file_kind,
            path,
            file,
            size,
            received: 0,
            hasher: gix_hash::hasher(gix_hash::Kind::Sha1),
            trailer: [0; TRAILER as usize],
        })
    }

    fn accept(&mut self, offset: u64, data: &[u8]) -> Result<(), ReceiveError> {
        if offset != self.received {
            return Err(ReceiveError::Offset {
                file: self.file_kind,
                expected: self.received,
                got: offset,
            });
        }
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|end| *end <= self.size)
            .ok_or(ReceiveError::Overflow {
                file: self.file_kind,
                offset,
                len: data.len(),
                size: self.size,
            })?;
        // Bytes before `body_end` are hashed; the rest is the trailer.
        let body_end = self.size - TRAILER;
        let hashed = usize::try_from(body_end.saturating_sub(offset))
            .map_or(data.len(), |n| n.min(data.len()));
        self.hasher.update(&data[..hashed]);
        let tail = &data[hashed..];
        if !tail.is_empty() {
            // `tail` starts at `max(offset, body_end)` and ends by `size`,
            // so it fits the 20-byte trailer.
            let from = (offset.max(body_end) - body_end) as usize;
            self.trailer[from..from + tail.len()].copy_from_slice(tail);
        }
        self.file.write_all(data).map_err(io_err(&self.path))?;
        self.received = end;
        Ok(())
    }

    /// Checks completeness and the trailer against the content's SHA-1;
    /// returns the trailer.
    fn finish(self) -> Result<(File, PathBuf, ObjectId), ReceiveError> {
        if self.received != self.size {
            return Err(ReceiveError::Incomplete {
                file: self.file_kind,
                received: self.received,
                size: self.size,
            });
        }
        let trailer = ObjectId::from_bytes_or_panic(&self.trailer);
        let actual = self
            .hasher
            .try_finalize()
            .map_err(|_| ReceiveError::HashCollision {
                file: self.file_kind,
            })?;
        if actual != trailer {
            return Err(ReceiveError::ChecksumMismatch {
                file: self.file_kind,
                trailer,
                actual,
            });
        }
        Ok((self.file, self.path, trailer))
    }
}

/// A transfer in progress, written into its own temp directory (removed,
/// with whatever it holds, unless the pack is installed).
pub(crate) struct PackReceiver {
    header: TransferHeader,
    pack: FileSink,
    index: FileSink,
    temp: TempDir,
}

impl PackReceiver {
    pub(crate) fn begin(header: TransferHeader, temp: TempDir) -> Result<Self, ReceiveError> {
        // The temp files carry their final names: the index is opened with
        // gix, which finds the pack next to it by name.
        let (pack_path, index_path) = pack_file_paths(temp.path(), &header.pack_id);
        Ok(PackReceiver {
            pack: FileSink::create(TransferFile::Pack, pack_path, header.pack_size)?,
            index: FileSink::create(TransferFile::Index, index_path, header.index_size)?,
            header,
            temp,
        })
    }

    /// Checks one non-first chunk and writes it. Chunks without data carry
    /// nothing to check and are skipped.
    pub(crate) fn accept(&mut self, chunk: &PackChunk) -> Result<(), ReceiveError> {
        if chunk.header.is_some() {
            return Err(ReceiveError::UnexpectedHeader);
        }
        self.accept_data(chunk)
    }

    fn accept_data(&mut self, chunk: &PackChunk) -> Result<(), ReceiveError> {
        if chunk.data.is_empty() {
            return Ok(());
        }
        let sink = match PackFile::try_from(chunk.file) {
            Ok(PackFile::Pack) => &mut self.pack,
            Ok(PackFile::Index) => &mut self.index,
            _ => return Err(ReceiveError::UnknownFile { value: chunk.file }),
        };
        if chunk.data.len() > MAX_CHUNK_BYTES {
            return Err(ReceiveError::ChunkTooLarge {
                file: sink.file_kind,
                len: chunk.data.len(),
            });
        }
        let actual = crc32fast::hash(&chunk.data);
        if actual != chunk.crc32 {
            return Err(ReceiveError::Crc {
                file: sink.file_kind,
                offset: chunk.offset,
                expected: chunk.crc32,
                actual,
            });
        }
        sink.accept(chunk.offset, &chunk.data)
    }

    /// Verifies the complete transfer and makes both files durable under
    /// their temp names.
    pub(crate) fn finish(self) -> Result<VerifiedPack, ReceiveError> {
        let PackReceiver {
            header,
            pack,
            index,
            temp,
        } = self;
        let (pack_file, pack_path, trailer) = pack.finish()?;
        if trailer != header.pack_id {
            return Err(ReceiveError::TrailerMismatch {
                pack_id: header.pack_id,
                trailer,
            });
        }
        let (index_file, index_path, _) = index.finish()?;
        pack_file.sync_all().map_err(io_err(&pack_path))?;
        index_file.sync_all().map_err(io_err(&index_path))?;
        drop((pack_file, index_file));

        let bundle = cairn_packfile::store::open_bundle(&index_path)
            .map_err(|source| ReceiveError::BadIndex { source })?;
        let named = bundle.index.pack_checksum();
        if named != header.pack_id {
            return Err(ReceiveError::IndexMismatch {
                reason: format!("it indexes pack {named}"),
            });
        }
        let (in_index, in_pack) = (bundle.index.num_objects(), bundle.pack.num_objects());
        if in_index != in_pack {
            return Err(ReceiveError::IndexMismatch {
                reason: format!("it lists {in_index} objects, the pack holds {in_pack}"),
            });
        }
        Ok(VerifiedPack {
            pack_id: header.pack_id,
            pack_path,
            index_path,
            temp,
        })
    }
}

/// A complete, verified, fsynced pack still under its temp directory.
pub(crate) struct VerifiedPack {
    pack_id: ObjectId,
    pack_path: PathBuf,
    index_path: PathBuf,
    temp: TempDir,
}

impl VerifiedPack {
    /// Renames both files into `dir` (pack first, index last: a pack without
    /// its index is not a usable bundle, so a crash in between leaves
    /// nothing that looks complete) and makes the renames durable.
    pub(crate) fn install(self, dir: &Path) -> Result<(PathBuf, PathBuf), ReceiveError> {
        let created = !dir.is_dir();
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let (pack_dst, index_dst) = pack_file_paths(dir, &self.pack_id);
        fs::rename(&self.pack_path, &pack_dst).map_err(io_err(&pack_dst))?;
        fs::rename(&self.index_path, &index_dst).map_err(io_err(&index_dst))?;
        fsync_dir(dir).map_err(io_err(dir))?;
        if created {
            if let Some(parent) = dir.parent() {
                fsync_dir(parent).map_err(io_err(parent))?;
            }
        }
        drop(self.temp);
        Ok((pack_dst, index_dst))
    }
}

enum Feed {
    Chunk(PackChunk),
    End,
}

/// Feeds `first` (the header message, whose data counts too) and the rest of
/// `stream` into `receiver` on a blocking thread and verifies the result.
///
/// A stream that fails or is dropped midway never reaches `finish`: the
/// writer sees the channel close without `End` and discards the transfer.
pub(crate) async fn receive_stream<S>(
    receiver: PackReceiver,
    mut first: PackChunk,
    mut stream: S,
) -> Result<VerifiedPack, ReceiveError>
where
    S: Stream<Item = Result<PackChunk, tonic::Status>> + Unpin,
{
    let (tx, mut rx) = mpsc::channel::<Feed>(CHANNEL_DEPTH);
    let span = tracing::Span::current();
    let writer = tokio::task::spawn_blocking(move || {
        let _enter = span.enter();
        let mut receiver = receiver;
        while let Some(feed) = rx.blocking_recv() {
            match feed {
                Feed::Chunk(chunk) => receiver.accept(&chunk)?,
                Feed::End => return receiver.finish().map(Some),
            }
        }
        // The forwarding side stopped without `End`: the stream failed.
        Ok(None)
    });

    // The header was consumed by the caller; the first message's data is
    // part of the transfer like any other chunk's.
    first.header = None;
    let mut stream_error = None;
    if tx.send(Feed::Chunk(first)).await.is_ok() {
        loop {
            match stream.next().await {
                Some(Ok(chunk)) => {
                    if tx.send(Feed::Chunk(chunk)).await.is_err() {
                        break; // the writer rejected a chunk and stopped
                    }
                }
                Some(Err(status)) => {
                    stream_error = Some(status);
                    break;
                }
                None => {
                    let _ = tx.send(Feed::End).await;
                    break;
                }
            }
        }
    }
    drop(tx);
    let written = writer.await.map_err(ReceiveError::Task)?;
    match (written, stream_error) {
        (Err(e), _) => Err(e),
        (Ok(Some(verified)), _) => Ok(verified),
        (Ok(None), Some(status)) => Err(ReceiveError::Stream(status)),
        (Ok(None), None) => Err(ReceiveError::Stream(tonic::Status::aborted(
            "transfer stopped before its end",
        ))),
    }
}
