//! The router finds and follows the shard leader. The peers here are tiny
//! gRPC `Git` services that only speak the routing contract (refuse with a
//! leader hint, or answer with fixed/echoed bytes); they model no storage.
//! They serve no `Cluster` service, so the directory lookup answers
//! `UNIMPLEMENTED` and the router routes over its configured nodes, as in
//! front of nodes that predate the directory (`directory_routing.rs` covers
//! routing by the directory).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use cairn_proto::git::git_server::{Git, GitServer};
use cairn_proto::git::{AdvertiseRefsRequest, Chunk, ReceivePackRequest, UploadPackRequest};
use cairn_proto::routing::Refusal;
use cairn_router::{Config, Router};
use futures::{Stream, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::{Request, Response, Status, Streaming};

const TOKEN: &str = "leader-routing-test-token";
const REFS: &[u8] = b"0000-fixed-advertisement-from-the-leader";

type ChunkStream = Pin<Box<dyn Stream<Item = Result<Chunk, Status>> + Send>>;

/// Either refuses everything as a follower naming `leader`, or serves.
struct Peer {
    leader_hint: Option<String>,
    /// Read the whole push before refusing it, as a node losing leadership
    /// mid-push would.
    drain_push: bool,
    calls: Arc<AtomicUsize>,
}

impl Peer {
    fn refuse(&self) -> Result<(), Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match &self.leader_hint {
            None => Ok(()),
            Some(hint) => Err(Refusal::NotLeader {
                hint: Some(hint.clone()),
            }
            .into_status("not the shard leader")),
        }
    }
}

fn once(data: Vec<u8>) -> ChunkStream {
    Box::pin(futures::stream::iter([Ok(Chunk {
        data: Bytes::from(data),
    })]))
}

#[tonic::async_trait]
impl Git for Peer {
    type AdvertiseRefsStream = ChunkStream;
    type UploadPackStream = ChunkStream;
    type ReceivePackStream = ChunkStream;

    async fn advertise_refs(
        &self,
        _: Request<AdvertiseRefsRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        self.refuse()?;
        Ok(Response::new(once(REFS.to_vec())))
    }

    async fn upload_pack(
        &self,
        req: Request<Streaming<UploadPackRequest>>,
    ) -> Result<Response<ChunkStream>, Status> {
        self.refuse()?;
        let mut body = b"echo:".to_vec();
        let mut s = req.into_inner();
        while let Some(m) = s.next().await {
            body.extend_from_slice(&m?.data);
        }
        Ok(Response::new(once(body)))
    }

    async fn receive_pack(
        &self,
        req: Request<Streaming<ReceivePackRequest>>,
    ) -> Result<Response<ChunkStream>, Status> {
        let mut body = b"echo:".to_vec();
        let mut s = req.into_inner();
        if !self.drain_push {
            self.refuse()?;
        }
        while let Some(m) = s.next().await {
            body.extend_from_slice(&m?.data);
        }
        if self.drain_push {
            self.refuse()?;
        }
        Ok(Response::new(once(body)))
    }
}

async fn start_peer(leader_hint: Option<String>) -> (SocketAddr, Arc<AtomicUsize>) {
    start_peer_with(leader_hint, false).await
}

async fn start_peer_with(
    leader_hint: Option<String>,
    drain_push: bool,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let calls = Arc::new(AtomicUsize::new(0));
    let peer = Peer {
        leader_hint,
        drain_push,
        calls: Arc::clone(&calls),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(GitServer::new(peer))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (addr, calls)
}

async fn start_router(nodes: Vec<String>) -> SocketAddr {
    let mut config = Config::new(String::new(), Some(TOKEN.to_owned()));
    config.storage_nodes = nodes;
    config.http_addr = "127.0.0.1:0".parse().expect("addr");
    Router::start(config).await.expect("router").http_addr
}

/// One HTTP/1.1 exchange; returns the whole raw response.
async fn http(router: SocketAddr, head: &str, body: &[u8]) -> String {
    let mut conn = TcpStream::connect(router).await.expect("connect");
    let req = format!(
        "{head} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\
         Content-Type: application/x-git-{}-request\r\nContent-Length: {}\r\n\r\n",
        if head.contains("receive") {
            "receive-pack"
        } else {
            "upload-pack"
        },
        body.len()
    );
    conn.write_all(req.as_bytes()).await.expect("write");
    conn.write_all(body).await.expect("write body");
    let mut out = Vec::new();
    conn.read_to_end(&mut out).await.expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

const INFO_REFS: &str = "GET /ws/repo.git/info/refs?service=git-upload-pack";

/// Writes (and the receive-pack advertisement before them) go to the
/// leader; reads rotate over the replicas instead.
const PUSH_INFO_REFS: &str = "GET /ws/repo.git/info/refs?service=git-receive-pack";

#[tokio::test]
async fn follows_hint_and_caches_leader() {
    let (leader, leader_calls) = start_peer(None).await;
    let (follower, follower_calls) = start_peer(Some(leader.to_string())).await;
    // Only the follower is configured: the hinted leader is dialled on demand.
    let router = start_router(vec![format!("http://{follower}")]).await;

    let resp = http(router, PUSH_INFO_REFS, b"").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        resp.contains(std::str::from_utf8(REFS).expect("utf8")),
        "{resp}"
    );
    assert_eq!(follower_calls.load(Ordering::SeqCst), 1);
    assert_eq!(leader_calls.load(Ordering::SeqCst), 1);

    let resp = http(router, PUSH_INFO_REFS, b"").await;
    assert!(
        resp.contains(std::str::from_utf8(REFS).expect("utf8")),
        "{resp}"
    );
    assert_eq!(
        follower_calls.load(Ordering::SeqCst),
        1,
        "leader not cached"
    );
    assert_eq!(leader_calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn bodies_replayed_on_the_leader() {
    let (leader, leader_calls) = start_peer(None).await;
    let (follower, follower_calls) = start_peer(Some(leader.to_string())).await;
    let router = start_router(vec![format!("http://{follower}")]).await;

    let resp = http(
        router,
        "POST /ws/repo.git/git-upload-pack",
        b"0009want\n0000",
    )
    .await;
    assert!(resp.contains("echo:0009want\n0000"), "{resp}");
    assert_eq!(follower_calls.load(Ordering::SeqCst), 1);

    // The leader is cached now; point a fresh router at the follower again
    // to see a (small, fully read-ahead) push replayed too.
    let router = start_router(vec![format!("http://{follower}")]).await;
    let resp = http(router, "POST /ws/repo.git/git-receive-pack", b"PACKdata").await;
    assert!(resp.contains("echo:PACKdata"), "{resp}");
    assert_eq!(follower_calls.load(Ordering::SeqCst), 2);
    assert_eq!(leader_calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn skips_a_node_that_is_down() {
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("addr")
    };
    let (live, live_calls) = start_peer(None).await;
    let router = start_router(vec![format!("http://{closed}"), format!("http://{live}")]).await;

    let resp = http(router, INFO_REFS, b"").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        resp.contains(std::str::from_utf8(REFS).expect("utf8")),
        "{resp}"
    );
    assert_eq!(live_calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn gives_up_when_no_leader() {
    // Two followers naming each other: bounded attempts, then 503.
    let a = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a_addr = a.local_addr().expect("addr");
    drop(a);
    let (b, _) = start_peer(Some(a_addr.to_string())).await;
    let router = start_router(vec![format!("http://{b}")]).await;
    let resp = http(router, INFO_REFS, b"").await;
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
}

#[tokio::test]
async fn consumed_push_is_not_replayed() {
    let (leader, leader_calls) = start_peer(None).await;
    let (follower, follower_calls) = start_peer_with(Some(leader.to_string()), true).await;
    let router = start_router(vec![format!("http://{follower}")]).await;
    // Larger than the router's read-ahead: part of it is streamed and gone.
    let pack = vec![b'x'; 3 << 20];
    let resp = http(router, "POST /ws/repo.git/git-receive-pack", &pack).await;
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp:.200}");
    assert_eq!(follower_calls.load(Ordering::SeqCst), 1);
    assert_eq!(leader_calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn large_push_refused_at_call_time_is_replayed() {
    let (leader, leader_calls) = start_peer(None).await;
    let (follower, follower_calls) = start_peer(Some(leader.to_string())).await;
    let router = start_router(vec![format!("http://{follower}")]).await;
    // Beyond the read-ahead: the refusal must arrive before the transport
    // pulls the streamed rest, which the read-ahead (over the HTTP/2
    // window) ensures.
    let pack = vec![b'x'; 3 << 20];
    let resp = http(router, "POST /ws/repo.git/git-receive-pack", &pack).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp:.200}");
    assert!(resp.contains("echo:x"), "{resp:.200}");
    assert!(resp.matches('x').count() >= pack.len(), "truncated replay");
    assert_eq!(follower_calls.load(Ordering::SeqCst), 1);
    assert_eq!(leader_calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn reads_rotate_over_the_replicas_and_writes_stay_on_the_leader() {
    let (a, a_calls) = start_peer(None).await;
    let (b, b_calls) = start_peer(None).await;
    let router = start_router(vec![format!("http://{a}"), format!("http://{b}")]).await;
    for _ in 0..4 {
        let resp = http(router, INFO_REFS, b"").await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    }
    assert_eq!(a_calls.load(Ordering::SeqCst), 2, "clones spread evenly");
    assert_eq!(b_calls.load(Ordering::SeqCst), 2, "clones spread evenly");
    for _ in 0..2 {
        let resp = http(router, PUSH_INFO_REFS, b"").await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    }
    assert_eq!(
        (
            a_calls.load(Ordering::SeqCst),
            b_calls.load(Ordering::SeqCst)
        ),
        (4, 2),
        "writes go to the cached leader (the first node until told otherwise)"
    );
}
