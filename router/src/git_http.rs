//! Smart HTTP (gitprotocol-http): `info/refs`, `git-upload-pack` and
//! `git-receive-pack`, streamed to the storage node's `Git` service on the
//! replicas of the workspace's shard. A workspace the directory does not
//! know gets the same 404 as a missing repository (git prints "repository
//! '…' not found"), without any call to a storage node's `Git` service.
//! Each request is authorized first (read to fetch, write to push): a
//! private repository the caller cannot read answers exactly as a missing
//! one.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use async_compression::tokio::bufread::GzipDecoder;
use axum::body::Body;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use cairn_proto::git::git_client::GitClient;
use cairn_proto::git::{
    AdvertiseRefsRequest, GitService, ReceivePackRequest, RepoPath, UploadPackRequest,
};
use futures::{Stream, StreamExt, TryStreamExt};
use serde::Deserialize;
use tokio::io::{AsyncBufRead, BufReader};
use tokio_util::io::{ReaderStream, StreamReader};
use tonic::transport::Channel;

use crate::answer::{no_cache, plain, status_response};
use crate::authz::{self, Caller, Style};
use crate::state::AppState;
use cairn_client::leader::refused_before_acting;
use cairn_client::Attempt;
use cairn_identity::Action;

fn git_client(channel: Channel) -> GitClient<Channel> {
    GitClient::new(channel).max_decoding_message_size(16 << 20)
}

/// `Git-Protocol` header as sent by the client, or empty.
fn git_protocol(headers: &HeaderMap) -> String {
    headers
        .get("git-protocol")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

fn wants_v2(protocol: &str) -> bool {
    protocol.split(':').any(|p| p.trim() == "version=2")
}

/// `repo.git` and `repo` both name the repository `repo`.
fn repo_path(workspace: String, repo: String) -> RepoPath {
    let slug = repo.strip_suffix(".git").map(str::to_owned).unwrap_or(repo);
    RepoPath { workspace, slug }
}

/// Authorization of a git request on `workspace/repo` (`repo` may end in
/// `.git`), before anything reaches a storage node.
async fn allowed(
    st: &AppState,
    caller: &Caller,
    workspace: &str,
    repo: &str,
    action: Action,
) -> Result<(), Response> {
    let slug = repo.strip_suffix(".git").unwrap_or(repo);
    authz::authorize(st, caller, workspace, slug, action, Style::Git)
        .await
        .map(|_| ())
        .map_err(|mut r| {
            no_cache(r.headers_mut());
            r
        })
}

fn streamed(
    content_type: &'static str,
    body: tonic::Streaming<cairn_proto::git::Chunk>,
) -> Response {
    let body = body
        .map_ok(|c| c.data)
        .map_err(|s| io::Error::other(s.message().to_owned()));
    let mut resp = Response::new(Body::from_stream(body));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    no_cache(resp.headers_mut());
    resp
}

/// A request refused before it reaches the storage node.
pub struct Rejection(StatusCode, &'static str);

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        plain(self.0, self.1)
    }
}

#[derive(Deserialize)]
pub struct ServiceQuery {
    service: Option<String>,
}

pub async fn info_refs(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((workspace, repo)): Path<(String, String)>,
    Query(q): Query<ServiceQuery>,
    headers: HeaderMap,
) -> Response {
    let (service, name) = match q.service.as_deref() {
        Some("git-upload-pack") => (GitService::UploadPack, "git-upload-pack"),
        Some("git-receive-pack") => (GitService::ReceivePack, "git-receive-pack"),
        Some(_) => return plain(StatusCode::FORBIDDEN, "Unsupported service"),
        None => {
            return plain(
                StatusCode::FORBIDDEN,
                "Only the smart HTTP protocol is supported; please upgrade your git client",
            )
        }
    };
    let action = match service {
        GitService::ReceivePack => Action::Write,
        _ => Action::Read,
    };
    if let Err(r) = allowed(&st, &caller, &workspace, &repo, action).await {
        return r;
    }
    let protocol = git_protocol(&headers);
    let key = workspace.clone();
    let req = AdvertiseRefsRequest {
        repo: Some(repo_path(workspace, repo)),
        service: service as i32,
        git_protocol: protocol.clone(),
    };
    let advertise = |ch| {
        let req = req.clone();
        async move { Ok(git_client(ch).advertise_refs(req).await?.into_inner()) }
    };
    // The receive-pack advertisement precedes a push: ask the leader, so
    // the push that follows finds it cached.
    let call = match service {
        GitService::ReceivePack => st.cluster.call(&key, advertise).await,
        _ => st.cluster.call_read(&key, advertise).await,
    };
    let inner = match call {
        Ok(r) => r,
        Err(s) => return status_response(s),
    };
    // git http-backend omits the "# service=" preamble for protocol v2
    // upload-pack; v0/v1 clients require it.
    let mut preamble = Vec::new();
    if !(service == GitService::UploadPack && wants_v2(&protocol)) {
        let line = format!("# service={name}\n");
        preamble.extend_from_slice(format!("{:04x}", line.len() + 4).as_bytes());
        preamble.extend_from_slice(line.as_bytes());
        preamble.extend_from_slice(b"0000");
    }
    let body = futures::stream::once(async move { Ok::<Bytes, io::Error>(Bytes::from(preamble)) })
        .chain(
            inner
                .map_ok(|c| c.data)
                .map_err(|s| io::Error::other(s.message().to_owned())),
        );
    let content_type = match service {
        GitService::ReceivePack => "application/x-git-receive-pack-advertisement",
        _ => "application/x-git-upload-pack-advertisement",
    };
    let mut resp = Response::new(Body::from_stream(body));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    no_cache(resp.headers_mut());
    resp
}

/// The request body as a byte stream: gzip undone, size bounded. A broken
/// or oversized body ends the stream early; the storage node then sees a
/// truncated request and rejects it without changing anything.
fn request_bytes(
    headers: &HeaderMap,
    body: Body,
    limit: u64,
) -> Result<impl Stream<Item = Bytes> + Send + 'static, Rejection> {
    let raw = StreamReader::new(body.into_data_stream().map_err(io::Error::other));
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let reader: Pin<Box<dyn AsyncBufRead + Send>> = match encoding.as_str() {
        "" | "identity" => Box::pin(raw),
        "gzip" | "x-gzip" => Box::pin(BufReader::new(GzipDecoder::new(raw))),
        _ => {
            return Err(Rejection(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Unsupported Content-Encoding",
            ))
        }
    };
    let mut seen: u64 = 0;
    Ok(ReaderStream::with_capacity(reader, 64 * 1024)
        .take_while(move |item| {
            let keep = match item {
                Ok(b) => {
                    seen += b.len() as u64;
                    if seen > limit {
                        tracing::warn!(limit, "request body over the limit; cutting it off");
                    }
                    seen <= limit
                }
                Err(e) => {
                    tracing::warn!(error = %e, "request body failed");
                    false
                }
            };
            futures::future::ready(keep)
        })
        .filter_map(|item| futures::future::ready(item.ok())))
}

fn check_content_type(headers: &HeaderMap, expected: &'static str) -> Result<(), Rejection> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if ct == expected {
        Ok(())
    } else {
        Err(Rejection(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Unexpected Content-Type",
        ))
    }
}

pub async fn upload_pack(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((workspace, repo)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Err(r) = allowed(&st, &caller, &workspace, &repo, Action::Read).await {
        return r;
    }
    if let Err(r) = check_content_type(&headers, "application/x-git-upload-pack-request") {
        return r.into_response();
    }
    let bytes = match request_bytes(&headers, body, st.config.max_negotiation_bytes) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    // Negotiation bodies are small (and bounded by max-negotiation-bytes):
    // held in memory so the request can be replayed on another node.
    let body: Vec<Bytes> = bytes.collect().await;
    let key = workspace.clone();
    let first = UploadPackRequest {
        repo: Some(repo_path(workspace, repo)),
        git_protocol: git_protocol(&headers),
        data: Bytes::new(),
        full_duplex: false,
    };
    let call = st.cluster.call_read(&key, |ch| {
        let messages = std::iter::once(first.clone())
            .chain(body.iter().map(|data| UploadPackRequest {
                data: data.clone(),
                ..Default::default()
            }))
            .collect::<Vec<_>>();
        async move {
            let r = git_client(ch)
                .upload_pack(futures::stream::iter(messages))
                .await?;
            Ok(r.into_inner())
        }
    });
    match call.await {
        Ok(r) => streamed("application/x-git-upload-pack-result", r),
        Err(s) => status_response(s),
    }
}

pub async fn receive_pack(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((workspace, repo)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Err(r) = allowed(&st, &caller, &workspace, &repo, Action::Write).await {
        return r;
    }
    if let Err(r) = check_content_type(&headers, "application/x-git-receive-pack-request") {
        return r.into_response();
    }
    let bytes = match request_bytes(&headers, body, st.config.max_push_bytes) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let repo = repo_path(workspace, repo);
    let actor = crate::authz::actor_metadata(&caller);
    let pushed = forward_push(
        &st,
        repo,
        git_protocol(&headers),
        Box::pin(bytes),
        actor,
        None,
    )
    .await;
    match pushed {
        Ok(r) => streamed("application/x-git-receive-pack-result", r),
        Err(s) => status_response(s),
    }
}

/// Sends a push (commands and pack, `body`) to the leader of its shard,
/// with `actor` as the pusher: the transport-independent half of
/// receive-pack, for smart HTTP and SSH alike. `idle` ends the read-ahead
/// when the client pauses: over SSH a push without a pack waits for the
/// report without ending its input.
pub(crate) async fn forward_push(
    st: &AppState,
    repo: RepoPath,
    git_protocol: String,
    mut bytes: BodyStream,
    actor: Option<tonic::metadata::AsciiMetadataValue>,
    idle: Option<std::time::Duration>,
) -> Result<tonic::Streaming<cairn_proto::git::Chunk>, tonic::Status> {
    // A push body is a pack: never buffered whole. Read ahead a bounded
    // prefix (all of a small push); the rest is streamed, and once any of
    // it went to a node the push cannot be replayed elsewhere.
    let mut prefix = Vec::new();
    let mut prefix_len = 0usize;
    let mut ended = false;
    while prefix_len < PUSH_PREFIX_BYTES {
        let next = match idle {
            Some(idle) => match tokio::time::timeout(idle, bytes.next()).await {
                Ok(next) => next,
                // The client waits for us: what it sent so far is the prefix.
                Err(_) => break,
            },
            None => bytes.next().await,
        };
        match next {
            Some(b) => {
                prefix_len += b.len();
                prefix.push(b);
            }
            None => {
                ended = true;
                break;
            }
        }
    }
    let rest = PushRemainder::new((!ended).then_some(bytes));
    let key = repo.workspace.clone();
    let first = ReceivePackRequest {
        repo: Some(repo),
        git_protocol,
        data: Bytes::new(),
    };
    let call = st.cluster.call(&key, |ch| {
        let actor = actor.clone();
        let messages = std::iter::once(first.clone())
            .chain(prefix.iter().map(|data| ReceivePackRequest {
                data: data.clone(),
                ..Default::default()
            }))
            .collect::<Vec<_>>();
        let tail = rest.attempt();
        let rest = Arc::clone(&rest);
        async move {
            let stream =
                futures::stream::iter(messages).chain(tail.map(|data| ReceivePackRequest {
                    data,
                    ..Default::default()
                }));
            let request = crate::authz::with_actor(stream, actor);
            match git_client(ch).receive_pack(request).await {
                Ok(r) => Ok(r.into_inner()),
                // Replayed only if the node certainly did not apply it (it
                // refused as a follower or as not holding the shard): a
                // connection lost after the push reached the node may
                // come after its commit, and a replay would then fail its
                // compare-and-swap and report an applied push as refused.
                Err(status) => {
                    let untouched = rest.fence();
                    let replayable = untouched && refused_before_acting(&status);
                    Err(Attempt { status, replayable })
                }
            }
        }
    });
    call.await
}

pub(crate) type BodyStream = Pin<Box<dyn Stream<Item = Bytes> + Send>>;

/// Push body read ahead before the first attempt. Larger than the storage
/// node's HTTP/2 receive window (1 MiB by default) so that a node refusing at
/// call time stops the transport before it pulls the unreplayable rest;
/// costs this much memory per push in flight.
const PUSH_PREFIX_BYTES: usize = (1 << 20) + (256 << 10);

/// The unread part of a push body, shared by the attempts of one request.
/// Each attempt reads it under a generation number so a failed attempt's
/// request body, which the transport may still poll, can take nothing
/// once the next attempt has started.
struct PushRemainder {
    inner: Mutex<RemainderState>,
}

struct RemainderState {
    generation: u64,
    stream: Option<BodyStream>,
    consumed: bool,
}

impl PushRemainder {
    fn new(stream: Option<BodyStream>) -> Arc<Self> {
        Arc::new(PushRemainder {
            inner: Mutex::new(RemainderState {
                generation: 0,
                stream,
                consumed: false,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RemainderState> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The remainder as read by a new attempt.
    fn attempt(self: &Arc<Self>) -> RemainderReader {
        let generation = self.lock().generation;
        RemainderReader {
            shared: Arc::clone(self),
            generation,
        }
    }

    /// Ends the current attempt's access; true when none of the remainder
    /// was handed out, so the request can be replayed in full.
    fn fence(&self) -> bool {
        let mut st = self.lock();
        st.generation += 1;
        !st.consumed
    }
}

struct RemainderReader {
    shared: Arc<PushRemainder>,
    generation: u64,
}

impl Stream for RemainderReader {
    type Item = Bytes;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        let mut st = self.shared.lock();
        if st.generation != self.generation {
            return Poll::Ready(None);
        }
        let Some(stream) = st.stream.as_mut() else {
            return Poll::Ready(None);
        };
        match stream.as_mut().poll_next(cx) {
            Poll::Ready(Some(b)) => {
                st.consumed = true;
                Poll::Ready(Some(b))
            }
            Poll::Ready(None) => {
                // Ending loses nothing: a replay ends at the same place.
                st.stream = None;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
