//! The `PackTransfer` gRPC service of a storage node.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::SystemTime;

use cairn_proto::pack::pack_transfer_server::PackTransfer;
use cairn_proto::pack::{FetchPackRequest, PackChunk, StageAck};
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::receiver::{
    io_err, receive_stream, PackReceiver, ReceiveError, SizeLimits, TransferHeader,
};
use super::source::{pack_chunks, SourceFile};
use super::{parse_pack_id, StagingArea};

/// What a node accepts from `Stage`.
#[derive(Debug, Clone, Copy)]
pub struct TransferLimits {
    /// Largest pack a follower accepts; the index bound follows from it.
    pub max_pack_bytes: u64,
}

impl Default for TransferLimits {
    fn default() -> Self {
        // The storage node's default push limit.
        TransferLimits {
            max_pack_bytes: 2 << 30,
        }
    }
}

pub struct PackTransferService {
    area: StagingArea,
    limits: TransferLimits,
}

impl PackTransferService {
    /// The service over the node's data dir; creates `staging/transfer/`.
    pub fn new(data_dir: &Path, limits: TransferLimits) -> io::Result<Self> {
        Self::with_area(StagingArea::at(data_dir), limits)
    }

    /// The service over an area shared with the cleanup worker.
    pub fn with_area(area: StagingArea, limits: TransferLimits) -> io::Result<Self> {
        area.create()?;
        Ok(PackTransferService { area, limits })
    }

    pub fn area(&self) -> &StagingArea {
        &self.area
    }
}

/// Runs blocking file work off the async runtime.
async fn blocking<T, F>(job: F) -> Result<T, ReceiveError>
where
    F: FnOnce() -> Result<T, ReceiveError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(job)
        .await
        .map_err(ReceiveError::Task)?
}

/// True when `header`'s pack is already staged with the announced sizes; its
/// modification time is then refreshed so the staging TTL starts over for
/// the leader that staged it again.
fn confirm_staged(area: &StagingArea, header: &TransferHeader) -> Result<bool, ReceiveError> {
    let _held = area.hold();
    let (pack, index) = area.staged_paths(header.shard, header.repo, &header.pack_id);
    for (path, size) in [(&pack, header.pack_size), (&index, header.index_size)] {
        match path.metadata() {
            Ok(m) if m.is_file() && m.len() == size => {}
            Ok(_) => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_err(path)(e)),
        }
    }
    let now = SystemTime::now();
    for path in [&pack, &index] {
        File::open(path)
            .and_then(|f| f.set_modified(now))
            .map_err(io_err(path))?;
    }
    Ok(true)
}

/// Opens a pack and its index from the committed location if both are there,
/// else from the shard's staging area. Files are opened under the area lock,
/// so a concurrent commit (rename) or cleanup (unlink) cannot split the pair.
fn open_held(
    area: &StagingArea,
    request: &FetchPackRequest,
    pack_id: &cairn_packfile::ObjectId,
) -> Result<Option<(SourceFile, SourceFile)>, ReceiveError> {
    let _held = area.hold();
    let locations = [
        area.committed_paths(request.repo_id, pack_id),
        area.staged_paths(request.shard_id, request.repo_id, pack_id),
    ];
    for (pack, index) in locations {
        if let (Some(p), Some(i)) = (open_if_present(pack)?, open_if_present(index)?) {
            return Ok(Some((p, i)));
        }
    }
    Ok(None)
}

fn open_if_present(path: PathBuf) -> Result<Option<SourceFile>, ReceiveError> {
    match SourceFile::open(path.clone()) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(&path)(e)),
    }
}

type FetchStream = Pin<Box<dyn Stream<Item = Result<PackChunk, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl PackTransfer for PackTransferService {
    type FetchStream = FetchStream;

    #[tracing::instrument(skip_all, fields(shard, repo, pack))]
    async fn stage(
        &self,
        request: Request<Streaming<PackChunk>>,
    ) -> Result<Response<StageAck>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty pack transfer"))?;
        let limits = SizeLimits {
            max_pack_bytes: self.limits.max_pack_bytes,
        };
        let header = first
            .header
            .as_ref()
            .ok_or(ReceiveError::MissingHeader)
            .and_then(|h| TransferHeader::parse(h, limits))
            .map_err(|e| e.to_status())?;
        let span = tracing::Span::current();
        span.record("shard", header.shard);
        span.record("repo", header.repo);
        span.record("pack", tracing::field::display(&header.pack_id));

        let area = self.area.clone();
        let h = header.clone();
        if blocking(move || confirm_staged(&area, &h))
            .await
            .map_err(|e| e.to_status())?
        {
            // Answer without reading the rest: the stream is dropped and the
            // sender stops sending.
            tracing::debug!("pack already staged");
            return Ok(Response::new(StageAck {
                already_staged: true,
            }));
        }

        let area = self.area.clone();
        let h = header.clone();
        let receiver = blocking(move || {
            let temp = area.temp_dir().map_err(io_err(area.root()))?;
            PackReceiver::begin(h, temp)
        })
        .await
        .map_err(|e| e.to_status())?;
        let verified = receive_stream(receiver, first, inbound)
            .await
            .map_err(|e| {
                tracing::info!(error = %e, "pack transfer refused");
                e.to_status()
            })?;
        let area = self.area.clone();
        blocking(move || {
            let _held = area.hold();
            verified.install(&area.staged_dir(header.shard, header.repo))
        })
        .await
        .map_err(|e| e.to_status())?;
        tracing::debug!("pack staged");
        Ok(Response::new(StageAck {
            already_staged: false,
        }))
    }

    #[tracing::instrument(skip_all, fields(shard, repo, pack))]
    async fn fetch(
        &self,
        request: Request<FetchPackRequest>,
    ) -> Result<Response<FetchStream>, Status> {
        let request = request.into_inner();
        let span = tracing::Span::current();
        span.record("shard", request.shard_id);
        span.record("repo", request.repo_id);
        let pack_id = parse_pack_id(&request.pack_id).ok_or_else(|| {
            Status::invalid_argument(
                ReceiveError::InvalidPackId {
                    value: request.pack_id.clone(),
                }
                .to_string(),
            )
        })?;
        span.record("pack", tracing::field::display(&pack_id));
        let area = self.area.clone();
        let req = request.clone();
        let opened = blocking(move || open_held(&area, &req, &pack_id))
            .await
            .map_err(|e| e.to_status())?;
        let Some((pack, index)) = opened else {
            return Err(Status::not_found(format!(
                "pack {pack_id} of repository {} (shard {}) is not on this node",
                request.repo_id, request.shard_id
            )));
        };
        let header = TransferHeader {
            shard: request.shard_id,
            repo: request.repo_id,
            pack_id,
            pack_size: pack.size,
            index_size: index.size,
        };
        let stream = pack_chunks(header, pack, index).map(|item| {
            item.map_err(|e| {
                tracing::error!(error = %e, "cannot read pack for fetch");
                Status::internal(e.to_string())
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
