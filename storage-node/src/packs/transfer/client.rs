//! The calling side of `PackTransfer`: a leader staging a pack on a follower
//! and a replica fetching a pack it lacks from a peer.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cairn_packfile::ObjectId;
use cairn_proto::pack::pack_transfer_client::PackTransferClient;
use cairn_proto::pack::FetchPackRequest;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;

use super::receiver::{receive_stream, PackReceiver, ReceiveError, SizeLimits, TransferHeader};
use super::source::{pack_chunks, SourceError, SourceFile};
use super::{ShardId, TempDir};
use crate::repo::RepoId;

/// How a successful `Stage` went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageOutcome {
    /// The follower received, verified and fsynced the pack.
    Staged,
    /// The follower already held it staged; nothing was rewritten.
    AlreadyStaged,
}

/// Why staging a pack on a peer failed. `Rejected` means the data itself
/// was refused (retrying the same bytes is pointless); `Rpc` is transport or
/// peer trouble (another attempt, or another peer, may succeed).
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the peer refused the pack: {0}")]
    Rejected(#[source] tonic::Status),
    #[error("staging RPC failed: {0}")]
    Rpc(#[source] tonic::Status),
}

/// Why fetching a pack from a peer failed. `NotFound` and `Corrupt` are the
/// peer's: another replica may have a good copy. `Io` is local.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("the peer does not hold the pack")]
    NotFound,
    #[error("the peer sent an unusable pack: {0}")]
    Corrupt(#[source] ReceiveError),
    #[error("fetch RPC failed: {0}")]
    Rpc(#[source] tonic::Status),
    #[error("I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl From<ReceiveError> for FetchError {
    fn from(e: ReceiveError) -> Self {
        match e {
            ReceiveError::Io { path, source } => FetchError::Io { path, source },
            ReceiveError::Stream(status) => FetchError::Rpc(status),
            other => FetchError::Corrupt(other),
        }
    }
}

/// Streams `pack_path` and `index_path` (the pack `pack_id`) to the peer
/// behind `client`, which stages them for `shard`. Returns once the peer has
/// verified and fsynced both files (or already held them).
#[tracing::instrument(skip_all, fields(shard, repo, pack = %pack_id))]
pub async fn stage_pack(
    client: &mut PackTransferClient<Channel>,
    shard: ShardId,
    repo: RepoId,
    pack_path: &Path,
    index_path: &Path,
    pack_id: ObjectId,
) -> Result<StageOutcome, StageError> {
    let span = tracing::Span::current();
    span.record("shard", shard);
    span.record("repo", repo);
    let (pack, index) = {
        let (p, i) = (pack_path.to_owned(), index_path.to_owned());
        tokio::task::spawn_blocking(move || {
            let pack =
                SourceFile::open(p.clone()).map_err(|source| StageError::Io { path: p, source })?;
            let index =
                SourceFile::open(i.clone()).map_err(|source| StageError::Io { path: i, source })?;
            Ok::<_, StageError>((pack, index))
        })
        .await
        .map_err(|e| StageError::Io {
            path: pack_path.to_owned(),
            source: io::Error::other(e),
        })??
    };
    let header = TransferHeader {
        shard,
        repo,
        pack_id,
        pack_size: pack.size,
        index_size: index.size,
    };
    // A read failure ends the request stream early (the peer then discards
    // the incomplete transfer) and is reported here as the local error it is.
    let failure: Arc<Mutex<Option<SourceError>>> = Arc::default();
    let seen = failure.clone();
    let outbound = pack_chunks(header, pack, index).map_while(move |item| match item {
        Ok(chunk) => Some(chunk),
        Err(e) => {
            *seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            None
        }
    });
    let answer = client.stage(outbound).await;
    if let Some(e) = failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(StageError::Io {
            path: e.path,
            source: e.source,
        });
    }
    match answer {
        Ok(ack) if ack.get_ref().already_staged => Ok(StageOutcome::AlreadyStaged),
        Ok(_) => Ok(StageOutcome::Staged),
        Err(status) => Err(match status.code() {
            Code::InvalidArgument | Code::DataLoss => StageError::Rejected(status),
            _ => StageError::Rpc(status),
        }),
    }
}

/// Fetches pack `pack_id` of `repo` (in `shard`) from the peer behind
/// `client` into `dest_dir` as `pack-<id>.pack` and `pack-<id>.idx`, with
/// the same checks and fsyncs as `Stage`. Nothing is left in `dest_dir` on
/// failure.
#[tracing::instrument(skip_all, fields(shard, repo, pack = %pack_id))]
pub async fn fetch_pack(
    client: &mut PackTransferClient<Channel>,
    shard: ShardId,
    repo: RepoId,
    pack_id: ObjectId,
    dest_dir: &Path,
) -> Result<(PathBuf, PathBuf), FetchError> {
    let span = tracing::Span::current();
    span.record("shard", shard);
    span.record("repo", repo);
    let request = FetchPackRequest {
        shard_id: shard,
        repo_id: repo,
        pack_id: pack_id.to_string(),
    };
    let mut inbound = match client.fetch(request).await {
        Ok(response) => response.into_inner(),
        Err(status) if status.code() == Code::NotFound => return Err(FetchError::NotFound),
        Err(status) => return Err(FetchError::Rpc(status)),
    };
    let first = inbound
        .message()
        .await
        .map_err(FetchError::Rpc)?
        .ok_or(ReceiveError::MissingHeader)?;
    // The pack was accepted by the shard already; the size bound only keeps
    // a confused peer from filling the disk.
    let limits = SizeLimits {
        max_pack_bytes: u64::MAX / 8,
    };
    let header = TransferHeader::parse(
        first.header.as_ref().ok_or(ReceiveError::MissingHeader)?,
        limits,
    )?;
    for (what, expected, got) in [
        ("shard", shard.to_string(), header.shard.to_string()),
        ("repository", repo.to_string(), header.repo.to_string()),
        ("pack", pack_id.to_string(), header.pack_id.to_string()),
    ] {
        if expected != got {
            return Err(ReceiveError::WrongPack {
                what,
                expected,
                got,
            }
            .into());
        }
    }
    let dest = dest_dir.to_owned();
    let receiver = tokio::task::spawn_blocking(move || {
        let temp = TempDir::create_in(&dest).map_err(super::receiver::io_err(&dest))?;
        PackReceiver::begin(header, temp)
    })
    .await
    .map_err(ReceiveError::Task)??;
    let verified = receive_stream(receiver, first, inbound).await?;
    let dest = dest_dir.to_owned();
    let paths = tokio::task::spawn_blocking(move || verified.install(&dest))
        .await
        .map_err(ReceiveError::Task)??;
    Ok(paths)
}
