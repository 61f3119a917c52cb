//! The router sends a workspace's requests to the replicas the cluster
//! directory names for it. The peers here are tiny gRPC services that only
//! speak the routing contract: a `Cluster` service answering
//! `ResolveWorkspace`/`CreateWorkspace` from a script shared by all nodes
//! (any node answers for the meta group), a `Git` service that serves fixed
//! or echoed bytes or refuses as not holding the shard, and an `Admin`
//! service that only creates repositories. They model no storage.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use cairn_proto::admin::{CreateRepositoryRequest, Repository};
use cairn_proto::cluster::{
    CreateWorkspaceRequest, NodeState, ResolveWorkspaceRequest, ResolveWorkspaceResponse,
    ShardPlacement, Workspace,
};
use cairn_proto::git::git_server::{Git, GitServer};
use cairn_proto::git::{AdvertiseRefsRequest, Chunk, ReceivePackRequest, UploadPackRequest};
use cairn_proto::routing::Refusal;
use cairn_router::{Config, Router};
use futures::{Stream, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::body::Body;
use tonic::codegen::{http, BoxFuture, Service};
use tonic::server::UnaryService;
use tonic::{Request, Response, Status, Streaming};

const TOKEN: &str = "directory-routing-test-token";

type ChunkStream = Pin<Box<dyn Stream<Item = Result<Chunk, Status>> + Send>>;

/// What the directory says about one workspace.
#[derive(Clone)]
enum Answer {
    Replicas(Vec<SocketAddr>),
    NotFound,
}

/// The meta group, as every fake node forwards to it. Each workspace has a
/// script of answers: each lookup takes the next, the last one stays.
#[derive(Default)]
struct Directory {
    answers: Mutex<HashMap<String, VecDeque<Answer>>>,
    resolves: AtomicUsize,
    created: Mutex<Vec<String>>,
}

impl Directory {
    fn script(&self, workspace: &str, answers: Vec<Answer>) {
        self.answers
            .lock()
            .expect("lock")
            .insert(workspace.to_owned(), answers.into());
    }

    fn resolves(&self) -> usize {
        self.resolves.load(Ordering::SeqCst)
    }

    fn next(&self, workspace: &str) -> Answer {
        let mut answers = self.answers.lock().expect("lock");
        let Some(q) = answers.get_mut(workspace) else {
            return Answer::NotFound;
        };
        if q.len() > 1 {
            q.pop_front().expect("non-empty")
        } else {
            q.front().cloned().unwrap_or(Answer::NotFound)
        }
    }
}

/// Routes a method name to its answer; `None` for methods not handled.
type Handler = Arc<
    dyn Fn(&str, http::Request<Body>) -> Option<BoxFuture<http::Response<Body>, Infallible>>
        + Send
        + Sync,
>;

/// A gRPC service (named `SERVICE_NAMES[N]`) answering only the unary
/// methods a test needs, by path, and `UNIMPLEMENTED` for the rest. Written
/// against the wire rather than the generated server traits so that new
/// RPCs in the protos need no stub here.
#[derive(Clone)]
struct Partial<const N: usize> {
    handler: Handler,
}

/// Decodes a unary request, runs `f`, encodes its answer.
async fn unary<Req, Resp>(
    req: http::Request<Body>,
    f: impl FnOnce(Req) -> Result<Resp, Status> + Send + 'static,
) -> http::Response<Body>
where
    Req: prost::Message + Default + Send + 'static,
    Resp: prost::Message + Send + 'static,
{
    struct Once<F, Req, Resp>(Option<F>, PhantomData<fn(Req) -> Resp>);
    impl<F, Req, Resp> UnaryService<Req> for Once<F, Req, Resp>
    where
        F: FnOnce(Req) -> Result<Resp, Status>,
    {
        type Response = Resp;
        type Future = std::future::Ready<Result<Response<Resp>, Status>>;
        fn call(&mut self, request: Request<Req>) -> Self::Future {
            let f = self.0.take().expect("called once");
            std::future::ready(f(request.into_inner()).map(Response::new))
        }
    }
    tonic::server::Grpc::new(tonic_prost::ProstCodec::<Resp, Req>::default())
        .unary(Once(Some(f), PhantomData), req)
        .await
}

/// The services a [`Partial`] can stand in for, by index.
const SERVICE_NAMES: [&str; 2] = ["cairn.cluster.v1.Cluster", "cairn.admin.v1.Admin"];
const CLUSTER: usize = 0;
const ADMIN: usize = 1;

impl<const N: usize> tonic::server::NamedService for Partial<N> {
    const NAME: &'static str = SERVICE_NAMES[N];
}

impl<const N: usize> Service<http::Request<Body>> for Partial<N> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<http::Response<Body>, Infallible>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let path = req.uri().path().to_owned();
        let method = path.rsplit('/').next().unwrap_or_default().to_owned();
        (self.handler)(&method, req).unwrap_or_else(|| {
            Box::pin(async { Ok(Status::unimplemented("not in this fake").into_http()) })
        })
    }
}

fn cluster_service(dir: Arc<Directory>) -> Partial<CLUSTER> {
    Partial {
        handler: Arc::new(move |method: &str, req| {
            let dir = Arc::clone(&dir);
            let fut: BoxFuture<_, Infallible> = match method {
                "ResolveWorkspace" => Box::pin(async move {
                    Ok(unary(req, move |r: ResolveWorkspaceRequest| {
                        dir.resolve(r.workspace)
                    })
                    .await)
                }),
                "CreateWorkspace" => Box::pin(async move {
                    Ok(unary(req, move |r: CreateWorkspaceRequest| dir.create(r.name)).await)
                }),
                _ => return None,
            };
            Some(fut)
        }),
    }
}

impl Directory {
    fn resolve(&self, name: String) -> Result<ResolveWorkspaceResponse, Status> {
        self.resolves.fetch_add(1, Ordering::SeqCst);
        match self.next(&name) {
            Answer::NotFound => Err(Status::not_found(format!("no workspace {name}"))),
            Answer::Replicas(addrs) => {
                let ids: Vec<u64> = (1..=addrs.len() as u64).collect();
                Ok(ResolveWorkspaceResponse {
                    workspace: Some(Workspace {
                        id: 1,
                        name,
                        shard_id: 3,
                    }),
                    placement: Some(ShardPlacement {
                        shard_id: 3,
                        replicas: ids.clone(),
                        epoch: 5,
                    }),
                    replicas: ids
                        .iter()
                        .zip(&addrs)
                        .map(|(id, a)| cairn_proto::cluster::Node {
                            id: *id,
                            addr: a.to_string(),
                            state: NodeState::Active as i32,
                        })
                        .collect(),
                    map_epoch: 5,
                })
            }
        }
    }

    fn create(&self, name: String) -> Result<Workspace, Status> {
        self.created.lock().expect("lock").push(name.clone());
        Ok(Workspace {
            id: 1,
            name,
            shard_id: 3,
        })
    }
}

/// One storage node: serves git while it holds the shard, else refuses as
/// a node the shard moved away from.
struct Peer {
    name: String,
    holds: Arc<AtomicBool>,
    git_calls: Arc<AtomicUsize>,
}

impl Peer {
    fn check(&self) -> Result<(), Status> {
        self.git_calls.fetch_add(1, Ordering::SeqCst);
        if self.holds.load(Ordering::SeqCst) {
            return Ok(());
        }
        Err(Refusal::WrongShard { epoch: Some(6) }
            .into_status("wrong shard: shard 3 is not on this node"))
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
        self.check()?;
        Ok(Response::new(once(
            format!("0000refs-from:{}", self.name).into_bytes(),
        )))
    }

    async fn upload_pack(
        &self,
        req: Request<Streaming<UploadPackRequest>>,
    ) -> Result<Response<ChunkStream>, Status> {
        self.check()?;
        let mut body = format!("{}-echo:", self.name).into_bytes();
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
        // Refused before reading any byte, as a real node does.
        self.check()?;
        let mut body = format!("{}-echo:", self.name).into_bytes();
        let mut s = req.into_inner();
        while let Some(m) = s.next().await {
            body.extend_from_slice(&m?.data);
        }
        Ok(Response::new(once(body)))
    }
}

/// Admin: creates repositories (echoing the request); counts every call.
fn admin_service(calls: Arc<AtomicUsize>) -> Partial<ADMIN> {
    Partial {
        handler: Arc::new(move |method: &str, req| {
            calls.fetch_add(1, Ordering::SeqCst);
            let fut: BoxFuture<_, Infallible> = match method {
                "CreateRepository" => Box::pin(async move {
                    Ok(unary(req, |r: CreateRepositoryRequest| {
                        Ok(Repository {
                            id: 1,
                            workspace: r.workspace,
                            slug: r.slug,
                            head: "refs/heads/main".into(),
                            is_private: r.is_private,
                            ..Default::default()
                        })
                    })
                    .await)
                }),
                _ => return None,
            };
            Some(fut)
        }),
    }
}

/// A running fake node and its counters.
struct Node {
    addr: SocketAddr,
    holds: Arc<AtomicBool>,
    git_calls: Arc<AtomicUsize>,
    admin_calls: Arc<AtomicUsize>,
}

impl Node {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    fn git(&self) -> usize {
        self.git_calls.load(Ordering::SeqCst)
    }
    fn admin(&self) -> usize {
        self.admin_calls.load(Ordering::SeqCst)
    }
}

/// A node that serves the directory when given one (else it is "too old":
/// tonic answers `UNIMPLEMENTED` for the unknown service).
async fn start_node(name: &str, directory: Option<&Arc<Directory>>) -> Node {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let holds = Arc::new(AtomicBool::new(true));
    let git_calls = Arc::new(AtomicUsize::new(0));
    let admin_calls = Arc::new(AtomicUsize::new(0));
    let peer = || Peer {
        name: name.to_owned(),
        holds: Arc::clone(&holds),
        git_calls: Arc::clone(&git_calls),
    };
    let cluster = directory.map(|d| cluster_service(Arc::clone(d)));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(GitServer::new(peer()))
            .add_service(admin_service(Arc::clone(&admin_calls)))
            .add_optional_service(cluster)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    Node {
        addr,
        holds,
        git_calls,
        admin_calls,
    }
}

async fn start_router(nodes: Vec<String>) -> SocketAddr {
    let mut config = Config::new(String::new(), Some(TOKEN.to_owned()));
    config.storage_nodes = nodes;
    config.http_addr = "127.0.0.1:0".parse().expect("addr");
    Router::start(config).await.expect("router").http_addr
}

/// One HTTP/1.1 exchange; returns the whole raw response.
async fn http(router: SocketAddr, head: &str, content_type: &str, body: &[u8]) -> String {
    let mut conn = TcpStream::connect(router).await.expect("connect");
    let req = format!(
        "{head} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\
         Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(req.as_bytes()).await.expect("write");
    conn.write_all(body).await.expect("write body");
    let mut out = Vec::new();
    conn.read_to_end(&mut out).await.expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

async fn git(router: SocketAddr, head: &str, body: &[u8]) -> String {
    let service = if head.contains("receive") {
        "receive-pack"
    } else {
        "upload-pack"
    };
    http(
        router,
        head,
        &format!("application/x-git-{service}-request"),
        body,
    )
    .await
}

const READ: &str = "GET /ws/repo.git/info/refs?service=git-upload-pack";
const PUSH_ADVERTISEMENT: &str = "GET /ws/repo.git/info/refs?service=git-receive-pack";
const PUSH: &str = "POST /ws/repo.git/git-receive-pack";

#[tokio::test]
async fn reads_go_only_to_the_workspace_replicas() {
    let dir = Arc::new(Directory::default());
    let a = start_node("a", Some(&dir)).await;
    let b = start_node("b", Some(&dir)).await;
    let c = start_node("c", Some(&dir)).await;
    let d = start_node("d", Some(&dir)).await;
    dir.script("ws", vec![Answer::Replicas(vec![b.addr, c.addr])]);
    dir.script("other", vec![Answer::Replicas(vec![d.addr])]);
    // Every node is a seed; only the directory decides where requests go.
    let router = start_router(vec![a.url(), b.url(), c.url(), d.url()]).await;

    for _ in 0..4 {
        let resp = git(router, READ, b"").await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    }
    assert_eq!((a.git(), b.git(), c.git(), d.git()), (0, 2, 2, 0));
    assert_eq!(dir.resolves(), 1, "the placement is cached");

    // A write starts at the first replica (no leader known yet).
    let resp = git(router, PUSH_ADVERTISEMENT, b"").await;
    assert!(resp.contains("refs-from:b"), "{resp}");

    // Another workspace, another shard.
    let resp = git(
        router,
        "GET /other/repo.git/info/refs?service=git-upload-pack",
        b"",
    )
    .await;
    assert!(resp.contains("refs-from:d"), "{resp}");
    assert_eq!((a.git(), b.git(), c.git(), d.git()), (0, 3, 2, 1));
    assert_eq!(dir.resolves(), 2);
}

#[tokio::test]
async fn wrong_shard_refusal_re_resolves_onto_the_new_replicas() {
    let dir = Arc::new(Directory::default());
    let a = start_node("a", Some(&dir)).await;
    let b = start_node("b", Some(&dir)).await;
    dir.script("ws", vec![Answer::Replicas(vec![a.addr])]);
    let router = start_router(vec![a.url(), b.url()]).await;

    let resp = git(router, READ, b"").await;
    assert!(resp.contains("refs-from:a"), "{resp}");
    assert_eq!(dir.resolves(), 1);

    // The shard moves from a to b while the router's entry is warm.
    a.holds.store(false, Ordering::SeqCst);
    dir.script("ws", vec![Answer::Replicas(vec![b.addr])]);

    // A push: refused by a before any byte was read, so replayed on b.
    let resp = git(router, PUSH, b"PACKdata").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("b-echo:PACKdata"), "{resp}");
    assert_eq!((a.git(), b.git()), (2, 1));
    assert_eq!(dir.resolves(), 2, "resolved again after the refusal");

    // The fresh entry is cached: reads go straight to b.
    let resp = git(
        router,
        "POST /ws/repo.git/git-upload-pack",
        b"0009want\n0000",
    )
    .await;
    assert!(resp.contains("b-echo:0009want\n0000"), "{resp}");
    assert_eq!((a.git(), b.git()), (2, 2));
    assert_eq!(dir.resolves(), 2);
}

#[tokio::test]
async fn all_replicas_unreachable_re_resolves_once() {
    let dir = Arc::new(Directory::default());
    let b = start_node("b", Some(&dir)).await;
    let gone = {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("addr")
    };
    // The first answer names a node that is gone; the next the new home.
    dir.script(
        "ws",
        vec![Answer::Replicas(vec![gone]), Answer::Replicas(vec![b.addr])],
    );
    let router = start_router(vec![b.url()]).await;
    let resp = git(router, READ, b"").await;
    assert!(resp.contains("refs-from:b"), "{resp}");
    assert_eq!(dir.resolves(), 2);
    assert_eq!(b.git(), 1);
}

#[tokio::test]
async fn unknown_workspace_is_not_found_without_any_storage_call() {
    let dir = Arc::new(Directory::default());
    let a = start_node("a", Some(&dir)).await;
    let router = start_router(vec![a.url()]).await;

    for (head, body) in [
        (READ, &b""[..]),
        (PUSH_ADVERTISEMENT, b""),
        ("POST /ws/repo.git/git-upload-pack", b"0009want\n0000"),
        (PUSH, b"PACKdata"),
    ] {
        let resp = git(router, head, body).await;
        // What the router answers for a missing repository: git prints
        // "repository '…' not found".
        assert!(resp.starts_with("HTTP/1.1 404"), "{head}: {resp}");
        assert!(
            resp.ends_with("\r\n\r\nRepository not found\n"),
            "{head}: {resp}"
        );
    }
    for head in [
        "GET /2.0/repositories/ws/repo",
        "DELETE /2.0/repositories/ws/repo",
        "GET /2.0/repositories/ws",
    ] {
        let resp = http(router, head, "application/json", b"").await;
        assert!(resp.starts_with("HTTP/1.1 404"), "{head}: {resp}");
        let json = resp.split("\r\n\r\n").nth(1).expect("body");
        let v: serde_json::Value = serde_json::from_str(json).expect("json");
        assert_eq!(v["type"], "error", "{head}: {resp}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("ws")),
            "{head}: {resp}"
        );
    }
    assert_eq!(a.git(), 0, "no Git call for an unknown workspace");
    assert_eq!(a.admin(), 0, "no Admin call for an unknown workspace");
    assert_eq!(dir.resolves(), 7, "not found is not cached");
}

#[tokio::test]
async fn nodes_without_the_directory_fall_back_to_the_configured_nodes() {
    // No Cluster service: ResolveWorkspace answers UNIMPLEMENTED.
    let a = start_node("a", None).await;
    let b = start_node("b", None).await;
    let router = start_router(vec![a.url(), b.url()]).await;
    for _ in 0..4 {
        let resp = git(router, READ, b"").await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    }
    assert_eq!((a.git(), b.git()), (2, 2), "reads rotate as before");
    let resp = git(router, PUSH, b"PACKdata").await;
    assert!(resp.contains("a-echo:PACKdata"), "{resp}");

    // Creating a repository needs no workspace registration there.
    let resp = http(
        router,
        "POST /2.0/repositories/ws/new",
        "application/json",
        b"{}",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 201"), "{resp}");
    assert_eq!(a.admin(), 1);
}

#[tokio::test]
async fn creating_a_repository_registers_an_unknown_workspace_first() {
    let dir = Arc::new(Directory::default());
    let a = start_node("a", Some(&dir)).await;
    let b = start_node("b", Some(&dir)).await;
    dir.script(
        "fresh",
        vec![Answer::NotFound, Answer::Replicas(vec![b.addr])],
    );
    let router = start_router(vec![a.url()]).await;
    let resp = http(
        router,
        "POST /2.0/repositories/fresh/repo",
        "application/json",
        b"{\"is_private\": false}",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 201"), "{resp}");
    assert!(resp.contains("\"full_name\":\"fresh/repo\""), "{resp}");
    assert_eq!(*dir.created.lock().expect("lock"), vec!["fresh".to_owned()]);
    assert_eq!((a.admin(), b.admin()), (0, 1), "created on the new shard");
    assert_eq!(dir.resolves(), 2);

    // A known workspace is not registered again.
    let resp = http(
        router,
        "POST /2.0/repositories/fresh/other",
        "application/json",
        b"",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 201"), "{resp}");
    assert_eq!(dir.created.lock().expect("lock").len(), 1);
    assert_eq!(b.admin(), 2);
}
