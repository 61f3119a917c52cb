//! The `Git` gRPC service: ref advertisement, upload-pack and receive-pack,
//! each run as a blocking protocol state machine on its own thread.

use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cairn_packfile::pktline::{PktReader, PktWriter};
use cairn_packfile::receive::{self, Ingested, Limits};
use cairn_packfile::upload::{self, UploadContext};
use cairn_proto::git::git_server::Git;
use cairn_proto::git::{
    AdvertiseRefsRequest, Chunk, GitService as Service, ReceivePackRequest, RepoPath,
    UploadPackRequest,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::repo::{RepoSnapshot, StagingDir, StoreError};
use crate::repos::{PushExtras, ReplicatedError, ReplicatedStore};
use crate::service::bridge::{forward_inbound, ChannelReader, ChunkWriter, CHANNEL_DEPTH};
use crate::status::status_of;
use cairn_identity::restriction::{self, BranchRestriction, RestrictionKind, Update};
use cairn_packfile::store::PackSet;

pub const AGENT: &str = concat!("cairn/", env!("CARGO_PKG_VERSION"));

/// Which protocol version the client asked for with `Git-Protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolVersion {
    V0,
    V1,
    V2,
}

impl ProtocolVersion {
    /// Parses a `Git-Protocol` value: colon-separated `key=value` pairs; the
    /// highest `version=` wins, unknown keys are ignored as git does.
    pub fn from_header(value: &str) -> Self {
        let mut v = ProtocolVersion::V0;
        for param in value.split(':') {
            match param.trim() {
                "version=2" => v = ProtocolVersion::V2,
                "version=1" if v == ProtocolVersion::V0 => v = ProtocolVersion::V1,
                _ => {}
            }
        }
        v
    }
}

pub struct GitService {
    repos: Arc<ReplicatedStore>,
    /// The node's data folder, for pushes' staging directories.
    data_dir: PathBuf,
    limits: Limits,
}

impl GitService {
    pub fn new(repos: Arc<ReplicatedStore>, data_dir: PathBuf, limits: Limits) -> Self {
        GitService {
            repos,
            data_dir,
            limits,
        }
    }

    /// Also the leadership check of a replicated node: it runs before the
    /// handler returns its stream, so a follower answers with a status and
    /// never a byte of git protocol.
    async fn snapshot(&self, repo: Option<RepoPath>) -> Result<RepoSnapshot, Status> {
        let repo = repo.ok_or_else(|| Status::invalid_argument("missing repository"))?;
        Box::pin(self.repos.snapshot(&repo.workspace, &repo.slug))
            .await
            .map_err(status_of)
    }
}

type ChunkStream = ReceiverStream<Result<Chunk, Status>>;

/// Runs `job` on a blocking thread with a writer feeding the response stream.
fn stream_blocking<F>(job: F) -> ChunkStream
where
    F: FnOnce(&mut ChunkWriter) + Send + 'static,
{
    let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || {
        let _enter = span.enter();
        let mut out = ChunkWriter::new(tx);
        job(&mut out);
        let _ = out.flush();
    });
    ReceiverStream::new(rx)
}

#[tonic::async_trait]
impl Git for GitService {
    type AdvertiseRefsStream = ChunkStream;
    type UploadPackStream = ChunkStream;
    type ReceivePackStream = ChunkStream;

    #[tracing::instrument(skip_all, fields(repo))]
    async fn advertise_refs(
        &self,
        request: Request<AdvertiseRefsRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let req = request.into_inner();
        let service = Service::try_from(req.service).unwrap_or(Service::Unspecified);
        let version = ProtocolVersion::from_header(&req.git_protocol);
        let snap = self.snapshot(req.repo).await?;
        tracing::Span::current().record("repo", snap.record.id);
        let stream = match service {
            Service::UploadPack => stream_blocking(move |out| {
                let ctx = UploadContext {
                    refs: &snap.refs,
                    packs: &snap.packs,
                    agent: AGENT,
                };
                let res = match version {
                    ProtocolVersion::V2 => upload::advertise_v2(&ctx, out),
                    v => upload::advertise_v0(&ctx, v == ProtocolVersion::V1, out),
                };
                if let Err(e) = res {
                    tracing::warn!(error = %e, "upload-pack advertisement failed");
                }
            }),
            Service::ReceivePack => stream_blocking(move |out| {
                // receive-pack has no v2; a v1 request gets the "version 1" preamble.
                let mut res = Ok(());
                if version != ProtocolVersion::V0 {
                    res = PktWriter::new(&mut *out).text("version 1");
                }
                if let Err(e) = res.and_then(|_| receive::advertise(&snap.refs, AGENT, out)) {
                    tracing::warn!(error = %e, "receive-pack advertisement failed");
                }
            }),
            Service::Unspecified => return Err(Status::invalid_argument("unknown git service")),
        };
        Ok(Response::new(stream))
    }

    #[tracing::instrument(skip_all, fields(repo))]
    async fn upload_pack(
        &self,
        request: Request<Streaming<UploadPackRequest>>,
    ) -> Result<Response<ChunkStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty upload-pack request"))?;
        let version = ProtocolVersion::from_header(&first.git_protocol);
        let stateless = !first.full_duplex;
        let snap = self.snapshot(first.repo).await?;
        tracing::Span::current().record("repo", snap.record.id);
        let mut input = forward_inbound(inbound, first.data, |m: UploadPackRequest| m.data);
        let stream = stream_blocking(move |out| {
            let ctx = UploadContext {
                refs: &snap.refs,
                packs: &snap.packs,
                agent: AGENT,
            };
            let res = match version {
                ProtocolVersion::V2 => upload::serve_v2(&ctx, &mut input, out, stateless),
                _ => upload::serve_v0(&ctx, &mut input, out, stateless),
            };
            if let Err(e) = res {
                tracing::info!(error = %e, "upload-pack ended with an error");
            }
        });
        Ok(Response::new(stream))
    }

    #[tracing::instrument(skip_all, fields(repo))]
    async fn receive_pack(
        &self,
        request: Request<Streaming<ReceivePackRequest>>,
    ) -> Result<Response<ChunkStream>, Status> {
        let actor = crate::service::admin::actor_of(&request);
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty receive-pack request"))?;
        // Before reading the pack: a follower must refuse while the router
        // can still send the request to the leader. From here until its
        // entry is proposed, the push holds off a planned leader transfer.
        let write = match &first.repo {
            Some(repo) => Some(
                Box::pin(self.repos.begin_write(&repo.workspace))
                    .await
                    .map_err(status_of)?,
            ),
            None => None,
        };
        let snap = self.snapshot(first.repo).await?;
        tracing::Span::current().record("repo", snap.record.id);
        let restrictions = self
            .repos
            .branch_restrictions_of(&snap.record)
            .map_err(status_of)?;
        let input = forward_inbound(inbound, first.data, |m: ReceivePackRequest| m.data);
        let repos = self.repos.clone();
        let data_dir = self.data_dir.clone();
        let limits = self.limits.clone();
        let runtime = tokio::runtime::Handle::current();
        let span = tracing::Span::current();
        let stream = stream_blocking(move |out| {
            let _enter = span.enter();
            let push = Push {
                repos: &repos,
                data_dir: &data_dir,
                runtime: &runtime,
                limits: &limits,
                actor,
                restrictions,
            };
            if let Err(e) = push.run(snap, input, out) {
                tracing::warn!(error = %e, "receive-pack failed");
            }
            drop(write);
        });
        Ok(Response::new(stream))
    }
}

#[derive(Debug, thiserror::Error)]
enum PushError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Ref-status reasons of a push that did not apply normally.
pub const NG_NOT_LEADER: &str = "not the shard leader, nothing changed";
pub const NG_UNKNOWN: &str = "outcome unknown, please fetch and retry";
pub const NG_REPLICAS: &str = "replicas unavailable, nothing changed";
pub const NG_INTERNAL: &str = "internal storage error, nothing changed";
pub const NG_LEADER_LOST: &str = "shard leader changed mid-push, nothing changed; push again";

/// The `ng` reason every ref of a push gets when applying it failed: a
/// failure before the commit point says nothing changed, one after it that
/// the outcome is unknown — never "ok".
fn apply_failure_reason(e: &ReplicatedError) -> &'static str {
    match e {
        // Refused before proposing: nothing was appended anywhere.
        ReplicatedError::NotLeader { .. } | ReplicatedError::WrongShard { .. } => NG_NOT_LEADER,
        ReplicatedError::Transfer { .. } => NG_REPLICAS,
        ReplicatedError::NotApplied { .. } => NG_LEADER_LOST,
        ReplicatedError::Store(_)
        | ReplicatedError::Io { .. }
        | ReplicatedError::UnknownShard(_)
        | ReplicatedError::WorkspaceNotFound(_)
        | ReplicatedError::Directory(_) => NG_INTERNAL,
        // A raft failure may strike after the entry was appended.
        ReplicatedError::Indeterminate { .. }
        | ReplicatedError::Raft(_)
        | ReplicatedError::State(_) => NG_UNKNOWN,
    }
}

/// What one push needs besides its request.
struct Push<'a> {
    repos: &'a ReplicatedStore,
    data_dir: &'a Path,
    runtime: &'a tokio::runtime::Handle,
    limits: &'a Limits,
    /// Who pushes, as the router authenticated them.
    actor: Option<String>,
    /// The repository's branch restrictions as of the push's start.
    restrictions: Vec<BranchRestriction>,
}

impl Push<'_> {
    /// Adds the refusals of branch restrictions to the per-command errors.
    fn restrict(
        &self,
        request: &receive::PushRequest,
        snap: &RepoSnapshot,
        ing: &mut Ingested,
    ) -> Result<(), PushError> {
        if self.restrictions.is_empty() {
            return Ok(());
        }
        let guards_history = self
            .restrictions
            .iter()
            .any(|r| r.kind == RestrictionKind::Force);
        let staged = match (&ing.pack, guards_history) {
            (Some(p), true) => Some(PackSet::default().with_bundle(Arc::new(
                cairn_packfile::store::open_bundle(&p.index_path).map_err(std::io::Error::other)?,
            ))),
            _ => None,
        };
        let actor = self.actor.as_deref().unwrap_or_default();
        for (cmd, err) in request.commands.iter().zip(ing.command_errors.iter_mut()) {
            if err.is_some() {
                continue;
            }
            let update = if cmd.old.is_null() {
                Update::Create
            } else if cmd.new.is_null() {
                Update::Delete
            } else if !guards_history {
                Update::FastForward
            } else {
                let mut packs = vec![&snap.packs];
                packs.extend(staged.as_ref());
                match receive::is_ancestor(&packs, &cmd.old, &cmd.new) {
                    Ok(true) => Update::FastForward,
                    Ok(false) => Update::Force,
                    Err(e) => {
                        tracing::warn!(error = %e, "ancestry unreadable; taken as a rewrite");
                        Update::Force
                    }
                }
            };
            *err = restriction::refusal(
                &self.restrictions,
                &cmd.name,
                &snap.record.head,
                actor,
                update,
            );
        }
        Ok(())
    }

    /// Commands, pack ingestion and validation, the replicated
    /// compare-and-swap, the report.
    fn run(
        &self,
        snap: RepoSnapshot,
        input: ChannelReader,
        out: &mut ChunkWriter,
    ) -> Result<(), PushError> {
        let mut reader = PktReader::new(input);
        let request = match receive::read_request(&mut reader, self.limits) {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(e) => {
                // No capabilities are known yet, so the error goes out as a
                // plain ERR line, which every client prints.
                PktWriter::new(&mut *out).text(&format!("ERR {e}"))?;
                return Ok(());
            }
        };
        let n = request.commands.len();
        let staging = StagingDir::create(self.data_dir)?;
        let ingested = if request.expects_pack() {
            let mut pack = BufReader::with_capacity(64 * 1024, reader.into_inner());
            receive::ingest(
                &request,
                &mut pack,
                &snap.packs,
                staging.path(),
                self.limits,
            )
        } else {
            Ok(Ingested {
                pack: None,
                command_errors: vec![None; n],
            })
        };
        let (unpack, results) = match ingested {
            Ok(mut ing) => {
                self.restrict(&request, &snap, &mut ing)?;
                // A push nobody can accept needs no pack on any replica.
                let staged = if ing.command_errors.iter().all(Option::is_some) {
                    None
                } else {
                    ing.pack
                };
                let applied = self.runtime.block_on(Box::pin(self.repos.push(
                    &snap.record,
                    &request.commands,
                    request.caps.atomic,
                    &ing.command_errors,
                    staged,
                    PushExtras {
                        push_options: request.push_options.clone(),
                        actor: self.actor.clone(),
                    },
                )));
                match applied {
                    Ok(results) => (Ok(()), results),
                    Err(e) => {
                        tracing::error!(error = %e, "applying a push failed");
                        (Ok(()), vec![Err(apply_failure_reason(&e).to_owned()); n])
                    }
                }
            }
            Err(e) => {
                tracing::info!(error = %e, "push rejected while unpacking");
                (Err(e.unpack_reason()), vec![Err(e.ref_reason()); n])
            }
        };
        if !request.push_options.is_empty() {
            tracing::debug!(options = ?request.push_options, "push options");
        }
        let named: Vec<(String, Result<(), String>)> = request
            .commands
            .iter()
            .map(|c| c.name.clone())
            .zip(results)
            .collect();
        receive::write_report(
            out,
            &request.caps,
            unpack.as_ref().map(|_| ()).map_err(String::as_str),
            &named,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::ProtocolVersion;

    #[test]
    fn git_protocol_header_parsing() {
        assert_eq!(ProtocolVersion::from_header(""), ProtocolVersion::V0);
        assert_eq!(
            ProtocolVersion::from_header("version=2"),
            ProtocolVersion::V2
        );
        assert_eq!(
            ProtocolVersion::from_header("object-format=sha1:version=1"),
            ProtocolVersion::V1
        );
        assert_eq!(
            ProtocolVersion::from_header("version=1:version=2"),
            ProtocolVersion::V2
        );
        assert_eq!(
            ProtocolVersion::from_header("version=3"),
            ProtocolVersion::V0
        );
    }
}
