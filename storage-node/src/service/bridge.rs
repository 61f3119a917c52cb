//! Bridges between async gRPC streams and the blocking `Read`/`Write` the
//! protocol state machines in `cairn-packfile` work on.
//!
//! Both directions go through bounded channels, so a slow client slows the
//! pack writer down instead of letting a whole pack pile up in memory.

use std::io::{self, BufRead, Read, Write};

use bytes::Bytes;
use cairn_proto::git::Chunk;
use tokio::sync::mpsc;
use tonic::Status;

/// Output chunks are cut at this size; a little under gRPC's 4 MiB default
/// message limit and large enough to keep per-message overhead small.
const CHUNK_SIZE: usize = 256 * 1024;

/// Number of chunks in flight per direction.
pub const CHANNEL_DEPTH: usize = 8;

/// A blocking reader over byte chunks arriving on a channel.
pub struct ChannelReader {
    rx: mpsc::Receiver<Result<Bytes, io::Error>>,
    current: Bytes,
    done: bool,
}

impl ChannelReader {
    pub fn new(rx: mpsc::Receiver<Result<Bytes, io::Error>>) -> Self {
        ChannelReader {
            rx,
            current: Bytes::new(),
            done: false,
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for ChannelReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.current.is_empty() && !self.done {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.current = b,
                Some(Err(e)) => return Err(e),
                None => self.done = true,
            }
        }
        Ok(&self.current)
    }

    fn consume(&mut self, amt: usize) {
        let _ = self.current.split_to(amt.min(self.current.len()));
    }
}

/// A blocking writer that sends what is written as gRPC `Chunk`s.
pub struct ChunkWriter {
    tx: mpsc::Sender<Result<Chunk, Status>>,
    buf: Vec<u8>,
}

impl ChunkWriter {
    pub fn new(tx: mpsc::Sender<Result<Chunk, Status>>) -> Self {
        ChunkWriter {
            tx,
            buf: Vec::with_capacity(CHUNK_SIZE),
        }
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK_SIZE));
        self.tx
            .blocking_send(Ok(Chunk { data: data.into() }))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "client went away"))
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let take = (CHUNK_SIZE - self.buf.len()).min(data.len());
        self.buf.extend_from_slice(&data[..take]);
        if self.buf.len() >= CHUNK_SIZE {
            self.send()?;
        }
        Ok(take)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

impl Drop for ChunkWriter {
    fn drop(&mut self) {
        let _ = self.send();
    }
}

/// Forwards the `data` of every inbound message into a [`ChannelReader`].
pub fn forward_inbound<M, F>(
    mut inbound: tonic::Streaming<M>,
    first: Bytes,
    data_of: F,
) -> ChannelReader
where
    M: Send + 'static,
    F: Fn(M) -> Bytes + Send + 'static,
{
    let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
    tokio::spawn(async move {
        if !first.is_empty() && tx.send(Ok(first)).await.is_err() {
            return;
        }
        loop {
            let item = match inbound.message().await {
                Ok(Some(m)) => Ok(data_of(m)),
                Ok(None) => break,
                Err(status) => Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    status.message().to_owned(),
                )),
            };
            let failed = item.is_err();
            if tx.send(item).await.is_err() || failed {
                break;
            }
        }
    });
    ChannelReader::new(rx)
}
