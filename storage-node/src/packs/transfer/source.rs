//! Sending one pack: the header, then the pack and its index in chunks of at
//! most [`MAX_CHUNK_BYTES`], each with its CRC-32, read from the files as the
//! stream is polled (never a whole file in memory).

use std::fs::File;
use std::io::{self, Read};
use std::path::PathBuf;

use bytes::Bytes;
use cairn_proto::pack::{PackChunk, PackFile};
use futures::Stream;

use super::receiver::{TransferFile, TransferHeader};
use super::MAX_CHUNK_BYTES;

/// An open file to send, with the size announced in the header.
pub(crate) struct SourceFile {
    pub path: PathBuf,
    pub file: File,
    pub size: u64,
}

impl SourceFile {
    pub(crate) fn open(path: PathBuf) -> io::Result<SourceFile> {
        let file = File::open(&path)?;
        let size = file.metadata()?.len();
        Ok(SourceFile { path, file, size })
    }
}

/// A read failure while sending.
#[derive(Debug, thiserror::Error)]
#[error("reading {path}: {source}")]
pub(crate) struct SourceError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

struct State {
    header: Option<TransferHeader>,
    files: [(TransferFile, Option<SourceFile>); 2],
    current: usize,
    offset: u64,
}

/// The chunk stream of one pack; ends after the last index byte, or after
/// the first error.
pub(crate) fn pack_chunks(
    header: TransferHeader,
    pack: SourceFile,
    index: SourceFile,
) -> impl Stream<Item = Result<PackChunk, SourceError>> + Send + 'static {
    let state = State {
        header: Some(header),
        files: [
            (TransferFile::Pack, Some(pack)),
            (TransferFile::Index, Some(index)),
        ],
        current: 0,
        offset: 0,
    };
    futures::stream::unfold(Some(state), |state| async move {
        let mut st = state?;
        if let Some(header) = st.header.take() {
            let chunk = PackChunk {
                header: Some(header.to_proto()),
                ..Default::default()
            };
            return Some((Ok(chunk), Some(st)));
        }
        loop {
            let (kind, slot) = st.files.get_mut(st.current)?;
            let kind = *kind;
            let source = slot.take()?;
            let remaining = source.size - st.offset;
            if remaining == 0 {
                st.current += 1;
                st.offset = 0;
                continue;
            }
            let len = remaining.min(MAX_CHUNK_BYTES as u64) as usize;
            // File reads block; keep them off the async runtime.
            let read = tokio::task::spawn_blocking(move || {
                let mut source = source;
                let mut buf = vec![0u8; len];
                let res = source.file.read_exact(&mut buf);
                (source, res.map(|_| buf))
            })
            .await;
            let (source, data) = match read {
                Ok((source, Ok(data))) => (source, data),
                Ok((source, Err(e))) => {
                    let err = SourceError {
                        path: source.path,
                        source: e,
                    };
                    return Some((Err(err), None));
                }
                Err(join) => {
                    let err = SourceError {
                        path: PathBuf::new(),
                        source: io::Error::other(join),
                    };
                    return Some((Err(err), None));
                }
            };
            let data = Bytes::from(data);
            let chunk = PackChunk {
                header: None,
                file: match kind {
                    TransferFile::Pack => PackFile::Pack,
                    TransferFile::Index => PackFile::Index,
                } as i32,
                offset: st.offset,
                crc32: crc32fast::hash(&data),
                data,
            };
            st.offset += len as u64;
            st.files[st.current].1 = Some(source);
            return Some((Ok(chunk), Some(st)));
        }
    })
}
